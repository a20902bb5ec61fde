# Self-contained Hugging Face remote code for cpmv's tiny MiniCPM-V test checkpoints.
#
# Copied next to config.json (whose auto_map names `configuration_minicpm.MiniCPMVConfig`) by
# scripts/remote_code/install.py. transformers copies it into its modules cache, so it may import only
# transformers (and torch / numpy / timm in modeling_minicpmv.py), never this repository's scripts.
"""MiniCPM-V configuration (one class for MiniCPM-V 2.0, MiniCPM-Llama3-V 2.5, MiniCPM-V 2.6)."""

from transformers import PretrainedConfig


class MiniCPMVConfig(PretrainedConfig):
    """Keeps every config.json key as an attribute. The model reads the keys listed in the project
    spec (section 7.7) with the same fallbacks as scripts/check_peft.py's builder; `version` selects
    the architecture (missing `version` with MiniCPM's `scale_emb` = 2.0, as in the released file)."""

    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=122753,
        hidden_size=2304,
        intermediate_size=5760,
        num_hidden_layers=40,
        num_attention_heads=36,
        num_key_value_heads=None,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_num=64,
        patch_size=14,
        drop_vision_last_layer=True,
        vision_config=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (num_attention_heads if num_key_value_heads is None
                                    else num_key_value_heads)
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.query_num = query_num
        self.patch_size = patch_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.vision_config = dict(vision_config) if vision_config else None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def minicpmv_version(self) -> str:
        """"v2_0" | "v2_5" | "v2_6"."""
        v = getattr(self, "version", None)
        if v is None:
            if getattr(self, "scale_emb", None) is not None:
                return "v2_0"
            raise ValueError("config.json: no `version` and no `scale_emb`; cannot tell the "
                             "MiniCPM-V version")
        for key, val in (("v2_0", 2.0), ("v2_5", 2.5), ("v2_6", 2.6)):
            if abs(float(v) - val) < 1e-6:
                return key
        raise ValueError(f"config.json: unsupported version {v!r} (want 2.0, 2.5 or 2.6)")
