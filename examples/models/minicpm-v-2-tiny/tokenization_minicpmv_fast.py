# Self-contained Hugging Face remote code for cpmv's tiny MiniCPM-V test checkpoints: the tokenizer
# class named by the 2.5 / 2.6 tokenizer_config.json auto_map
# (`tokenization_minicpmv_fast.MiniCPMVTokenizerFast`). Copied next to tokenizer.json by
# scripts/remote_code/install.py; imports only transformers.
"""MiniCPM-V 2.5 / 2.6 fast tokenizer (tokenizer.json as is)."""

from transformers import PreTrainedTokenizerFast


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """The released class adds image-token helpers for the processor; loading and encoding are
    tokenizer.json's, which is all the tests (and AutoPeftModel's tokenizer check) need."""
