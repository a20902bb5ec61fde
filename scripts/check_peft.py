#!/usr/bin/env python3
"""Check a MiniCPM-V LoRA adapter (PEFT layout) and, optionally, a merged checkpoint against PEFT.

    python scripts/check_peft.py --base BASE_DIR --adapter ADAPTER_DIR [--merged MERGED_DIR]
                                 [--tol TOL] [--threads N] [--allow-skip]

BASE_DIR / MERGED_DIR: checkpoints in the MiniCPM-V layout (config.json with `version` 2.0/2.5/2.6,
model.safetensors or shards + model.safetensors.index.json, f32 or bf16/f16).
ADAPTER_DIR: what `PeftModel.save_pretrained` writes (adapter_config.json, adapter_model.safetensors).

What is checked (exit 1 on any failure, 0 on success):
 1. The PyTorch module tree for the config's version is built (reusing the building blocks and the
    packed-row forward of scripts/fixtures/gen_model_fixtures.py, sized from config.json) and BASE is
    loaded with strict key checking.
 2. adapter_config.json is read with PEFT (`PeftConfig.from_pretrained`), the model is wrapped with
    `peft.get_peft_model` and the adapter file is loaded with PEFT's own `load_peft_weights` +
    `set_peft_model_state_dict`. Missing / unexpected keys are reported; any unexpected adapter key,
    any lora_A/lora_B or modules_to_save parameter that did not receive a value from the file (all of
    them are filled with NaN before loading), or a shape mismatch fails. The file's key set must
    also equal the one PEFT's save_pretrained writes for this model and config (PEFT's loader alone
    tolerates e.g. a kept `.default.` infix or silently loads a stray base key). The official path
    `PeftModel.from_pretrained(base, ADAPTER_DIR)` is run too and must give the same parameters.
 3. The adapted model (eval mode, so no LoRA dropout) runs a deterministic packed row with three
    images (two samples), built like gen_model_fixtures.build_case and sized from the config.
 4. With --merged: MERGED_DIR is built from its own config.json and loaded strictly; its logits must
    match the adapted model's: max|diff| <= tol * max(1, max|logit|). PEFT's `merge_and_unload()`
    result is compared with MERGED_DIR tensor by tensor (max diff per group).

--tol defaults to 1e-4 when every merged tensor is float32, else 2e-2 (16-bit rounding of the
merged weights). Weight comparison: max|diff| <= tol * max(1, max|w|) (+ eps(dtype) * max|w| for a
16-bit merged tensor); tensors neither LoRA-merged nor in modules_to_save must be bit-identical to
BASE when stored in the same dtype. One CPU thread by default (bit-reproducible runs).

Missing torch/peft/transformers/timm/safetensors/numpy: prints "SKIP: <package>" and exits 0 with
--allow-skip, else exits 2. Environment: scripts/requirements-peft.txt.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

REQUIRED = ["torch", "numpy", "safetensors", "transformers", "timm", "peft"]
HERE = Path(__file__).resolve().parent

# config.json keys that define the architecture; MERGED_DIR must agree with BASE_DIR on them
ARCH_KEYS = ["version", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "query_num",
             "drop_vision_last_layer", "scale_emb", "scale_depth", "dim_model_base", "patch_size",
             "vision_config", "tie_word_embeddings", "hidden_act"]


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Model building (glue around gen_model_fixtures, sized from config.json)
# ---------------------------------------------------------------------------------------------
def version_key(cfg: dict) -> str:
    v = float(cfg["version"])
    for key, val in (("v2_0", 2.0), ("v2_5", 2.5), ("v2_6", 2.6)):
        if abs(v - val) < 1e-6:
            return key
    raise CheckFailed(f"config.json: unsupported version {cfg['version']!r} (want 2.0, 2.5 or 2.6)")


def vision_cfg(cfg: dict) -> dict:
    # the real V2.0 config has no vision_config: vit_so400m_patch14_siglip_384 (spec 7.1)
    d = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "patch_size": 14,
         "image_size": 384 if version_key(cfg) == "v2_0" else 980}
    d.update(cfg.get("vision_config") or {})
    return d


def configure_fixture_module(gm, cfg: dict) -> None:
    """gen_model_fixtures' forward reads a few module-level sizes; point them at this config."""
    import torch

    vc = vision_cfg(cfg)
    gm.VOCAB = int(cfg["vocab_size"])
    gm.HIDDEN = int(cfg["hidden_size"])
    gm.PATCH = int(vc["patch_size"])
    if int(cfg.get("patch_size", gm.PATCH)) != gm.PATCH:
        raise CheckFailed(f"config.json: patch_size {cfg['patch_size']} != vision_config.patch_size "
                          f"{gm.PATCH}")
    n = int(vc["image_size"]) // gm.PATCH
    gm.NUM_PATCHES_PER_SIDE = n
    gm.NAVIT_BOUNDARIES = torch.arange(1 / n, 1.0, 1 / n)


def build_model(cfg: dict):
    """MiniCPM-V module tree with the checkpoint's parameter names, float32, eager attention."""
    import torch.nn as nn
    from timm.models.vision_transformer import VisionTransformer
    from transformers import Idefics2VisionConfig, LlamaConfig, Qwen2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
    from transformers.models.llama.modeling_llama import LlamaForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

    gm = fixture_module()
    ver = version_key(cfg)
    configure_fixture_module(gm, cfg)
    vc = vision_cfg(cfg)
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    v_hidden, v_layers = int(vc["hidden_size"]), int(vc["num_hidden_layers"])
    v_heads, v_inter = int(vc["num_attention_heads"]), int(vc["intermediate_size"])
    drop_last = bool(cfg.get("drop_vision_last_layer", True))  # class default is true (spec 7.7)
    query_num = int(cfg.get("query_num", 64))

    class MiniCPMV(gm.TinyMiniCPMV):  # the reference's class name
        def __init__(self):
            nn.Module.__init__(self)  # TinyMiniCPMV.__init__ uses the fixture's fixed sizes
            self.ver = ver
            self.cfg = {"query_num": query_num, "scale_emb": cfg.get("scale_emb", 1)}

        def prepare_inputs_for_generation(self, *args, **kwargs):
            # PeftModelForCausalLM (task_type CAUSAL_LM, what cpmv writes) looks it up at wrap
            # time; the real remote code inherits it from transformers' GenerationMixin.
            raise NotImplementedError("generation is not part of this check")

    m = MiniCPMV()
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    common = dict(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
                  intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=layers,
                  num_attention_heads=heads,
                  num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                  rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_parameters=rope,
                  hidden_act=cfg.get("hidden_act", "silu"), tie_word_embeddings=False,
                  bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
    if cfg.get("tie_word_embeddings", False):
        raise CheckFailed("config.json: tie_word_embeddings true is not a MiniCPM-V layout")
    if ver == "v2_0":
        lc = LlamaConfig(**common, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                         attention_bias=bool(cfg.get("attention_bias", False)))
        lc._attn_implementation = "eager"
        m.llm = gm.MiniCPMForCausalLM(lc, cfg.get("scale_emb", 1), cfg.get("scale_depth", 1),
                                      cfg.get("dim_model_base", 1))
        vpm = VisionTransformer(
            img_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]), embed_dim=v_hidden,
            depth=v_layers, num_heads=v_heads, mlp_ratio=(v_inter + 0.5) / v_hidden,
            class_token=False, global_pool="map", num_classes=0,
            dynamic_img_size=True, dynamic_img_pad=True)
        vpm.attn_pool = nn.Identity()
        if drop_last:
            vpm.blocks = vpm.blocks[:-1]
        for blk in vpm.blocks:
            blk.attn.fused_attn = False
            assert blk.mlp.fc1.out_features == v_inter
        m.vpm = vpm
        m.resampler = gm.Resampler(query_num, hidden, v_hidden, query_pos=True)
    else:
        if ver == "v2_5":
            lc = LlamaConfig(**common,
                             max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
                             attention_bias=bool(cfg.get("attention_bias", False)))
            lc._attn_implementation = "eager"
            m.llm = LlamaForCausalLM(lc)
        else:
            lc = Qwen2Config(**common,
                             max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                             use_sliding_window=bool(cfg.get("use_sliding_window", False)),
                             sliding_window=int(cfg.get("sliding_window") or 131072),
                             max_window_layers=int(cfg.get("max_window_layers", layers)))
            lc._attn_implementation = "eager"
            m.llm = Qwen2ForCausalLM(lc)
        ivc = Idefics2VisionConfig(hidden_size=v_hidden, intermediate_size=v_inter,
                                   num_hidden_layers=v_layers, num_attention_heads=v_heads,
                                   num_channels=3, image_size=int(vc["image_size"]),
                                   patch_size=int(vc["patch_size"]),
                                   hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"),
                                   layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
                                   attention_dropout=0.0)
        ivc._attn_implementation = "eager"
        m.vpm = Idefics2VisionTransformer(ivc)
        if drop_last:
            m.vpm.encoder.layers = m.vpm.encoder.layers[:-1]
        m.resampler = gm.Resampler(query_num, hidden, v_hidden, query_pos=False)
    return m


_GM = None
_FIXTURE_PATCH = 14


def fixture_module():
    global _GM, _FIXTURE_PATCH
    if _GM is None:
        sys.path.insert(0, str(HERE / "fixtures"))
        import gen_model_fixtures as gm  # noqa: E402  (the shared reference building blocks)
        _FIXTURE_PATCH = gm.PATCH  # gm.IMAGES are in pixels of the fixture's 14-px patches
        _GM = gm
    return _GM


# ---------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------
def read_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        raise CheckFailed(f"{d}: no config.json")
    return json.loads(p.read_text())


def read_checkpoint(d: Path) -> dict:
    from safetensors.torch import load_file

    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        out = {}
        for shard in sorted(set(wm.values())):
            part = load_file(str(d / shard))
            extra = set(part) - {k for k, v in wm.items() if v == shard}
            if extra:
                raise CheckFailed(f"{d}/{shard}: tensors not listed for it in the index: "
                                  f"{sorted(extra)[:5]}")
            out.update(part)
        missing = set(wm) - set(out)
        if missing:
            raise CheckFailed(f"{d}: index lists tensors found in no shard: {sorted(missing)[:5]}")
        return out
    raise CheckFailed(f"{d}: neither model.safetensors nor model.safetensors.index.json")


def format_note(files: list[Path]) -> str | None:
    """save_pretrained (PEFT and transformers) always writes {"format": "pt"} into the safetensors
    header; several transformers 4.x loaders (the reference runs 4.40) raise OSError without it."""
    from safetensors import safe_open

    bad = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            md = h.metadata() or {}
        if md.get("format") != "pt":
            bad.append(f"{f.name} ({md or 'no metadata'})")
    return ("WARN: safetensors header metadata lacks format \"pt\" (save_pretrained writes it; "
            f"some transformers 4.x loaders reject the file without it): {bad}") if bad else None


def checkpoint_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file() or not index.is_file():
        return [d / "model.safetensors"]
    return [d / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]


def dtype_summary(tensors: dict) -> str:
    from collections import Counter

    c = Counter(str(v.dtype).replace("torch.", "") for v in tensors.values())
    return ", ".join(f"{k} x{n}" for k, n in sorted(c.items()))


def load_strict(model, sd: dict, what: str) -> None:
    import torch

    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
                 for k in sorted(set(sd) & set(want)) if tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad_shape:
        lines = [f"{what}: checkpoint does not match the {model.ver} module tree"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {unexpected[:10]}")
        if bad_shape:
            lines.append(f"  shape mismatch ({len(bad_shape)}): {bad_shape[:10]}")
        raise CheckFailed("\n".join(lines))
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# Synthetic packed row (gen_model_fixtures.build_case, sized from the config)
# ---------------------------------------------------------------------------------------------
def build_case(cfg: dict, seed: int = 4711) -> dict:
    import numpy as np
    import torch

    gm = fixture_module()
    vocab, q, patch = int(cfg["vocab_size"]), int(cfg.get("query_num", 64)), gm.PATCH
    unk, im_start, im_end = (gm.UNK_ID, gm.IM_START_ID, gm.IM_END_ID) if vocab > gm.IM_END_ID \
        else (0, vocab - 2, vocab - 1)
    # same shapes (in patches) as the fixture case: 2x3 and 2x25 in sample 0, 3x4 in sample 1
    images = [(s, h // _FIXTURE_PATCH, w // _FIXTURE_PATCH) for s, h, w in gm.IMAGES]
    rng = np.random.default_rng(seed)
    ids, labels, pos, sample_lens, bounds, img_sample, tgt = [], [], [], [], [], [], []
    case = {}
    for s in range(2):
        s_ids, s_lab = [], []

        def text(n, supervised):
            s_ids.extend(rng.integers(0, vocab, n).tolist())
            s_lab.extend(rng.integers(0, vocab, n).tolist() if supervised else [-100] * n)

        def image():
            s_ids.append(im_start)
            s_lab.append(int(rng.integers(0, vocab)))
            st = len(ids) + len(s_ids)
            s_ids.extend([unk] * q)
            s_lab.extend([-100] * q)
            bounds.append((st, st + q))
            img_sample.append(s)
            s_ids.append(im_end)
            s_lab.append(int(rng.integers(0, vocab)))

        text(gm.PREFIX_LEN[s], False)
        n_img = sum(1 for smp, _, _ in images if smp == s)
        for j in range(n_img):
            if j:
                text(gm.BETWEEN_LEN, True)
            image()
        text(gm.TAIL_LEN[s], True)
        s_lab[-1] = -100
        ids.extend(s_ids)
        labels.extend(s_lab)
        pos.extend(range(len(s_ids)))
        sample_lens.append(len(s_ids))
    for k, (_, hp, wp) in enumerate(images):
        u8 = rng.integers(0, 256, size=(3, hp * patch, wp * patch), dtype=np.uint8)
        case[f"pixel_values.{k}"] = (torch.from_numpy(u8).to(torch.float32) / 255 - 0.5) / 0.5
        tgt.append((hp, wp))
    case.update({
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "position_ids": torch.tensor(pos, dtype=torch.int64),
        "sample_lens": torch.tensor(sample_lens, dtype=torch.int64),
        "image_bound": torch.tensor(bounds, dtype=torch.int64),
        "image_sample": torch.tensor(img_sample, dtype=torch.int64),
        "tgt_sizes": torch.tensor(tgt, dtype=torch.int64),
    })
    return case


def set_inference_mode(model) -> None:
    """eval() everywhere (LoRA dropout off); nn.MultiheadAttention back in train mode (dropout 0)
    so it keeps the reference's slow path, as gen_model_fixtures does."""
    import torch.nn as nn

    model.eval()
    for mod in model.modules():
        if isinstance(mod, nn.MultiheadAttention):
            assert mod.dropout == 0.0
            mod.train()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Dropout) and mod.training and mod.p > 0:
            raise CheckFailed(f"dropout {name} (p={mod.p}) still active")


def run_forward(model, case):
    import torch

    set_inference_mode(model)
    if hasattr(model, "get_base_model"):  # PeftModel: LoRA layers are injected in place
        model = model.get_base_model()
    with torch.no_grad():
        return model(case)[1]  # logits [L, vocab], float32


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------
def is_adapter_param(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


def compact_names(names: list[str]) -> str:
    """llm.model.layers.{0,1}.self_attn.q_proj style summary: one entry per pattern."""
    import re

    pats: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        key = n if m is None else n[:m.start()] + ".{}." + n[m.end():]
        pats.setdefault(key, []).append(-1 if m is None else int(m.group(1)))

    def span(ix):
        ix = sorted(set(ix))
        return str(ix[0]) if len(ix) == 1 else (f"{ix[0]}..{ix[-1]}" if ix == list(
            range(ix[0], ix[-1] + 1)) else ",".join(map(str, ix)))

    return ", ".join(k if ix == [-1] else k.replace("{}", "{" + span(ix) + "}")
                     for k, ix in pats.items())


def fmt(x: float) -> str:
    return f"{x:.3e}"


def check(args) -> None:
    import torch
    import peft
    from peft import PeftConfig, PeftModel, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from peft.utils.other import ModulesToSaveWrapper
    from peft.tuners.lora import LoraLayer

    torch.set_num_threads(args.threads)  # 1: bit-reproducible (the fixtures were made so)
    torch.manual_seed(0)
    base_dir, adapter_dir = Path(args.base), Path(args.adapter)
    failures: list[str] = []

    # ---- 1. base checkpoint --------------------------------------------------------------
    cfg = read_config(base_dir)
    ver = version_key(cfg)
    base_sd = read_checkpoint(base_dir)
    print(f"base     {base_dir}: MiniCPM-V {cfg['version']} ({ver}), {len(base_sd)} tensors "
          f"[{dtype_summary(base_sd)}]")
    base = build_model(cfg)
    load_strict(base, base_sd, "BASE")
    print("base     strict load OK")

    # ---- 2. adapter --------------------------------------------------------------------------
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckFailed(f"{adapter_dir}: no adapter_config.json")
    raw_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    try:
        pcfg = PeftConfig.from_pretrained(str(adapter_dir))
        if pcfg.peft_type != peft.PeftType.LORA:
            raise CheckFailed(f"adapter_config.json: peft_type {pcfg.peft_type} (want LORA)")
        pcfg = peft.LoraConfig.from_pretrained(str(adapter_dir))
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"adapter_config.json rejected by PEFT: {type(e).__name__}: {e}") from e
    print(f"adapter  {adapter_dir}: peft_type={pcfg.peft_type.value} r={pcfg.r} "
          f"lora_alpha={pcfg.lora_alpha} lora_dropout={pcfg.lora_dropout} bias={pcfg.bias!r} "
          f"task_type={pcfg.task_type}")
    print(f"adapter  target_modules={pcfg.target_modules!r}")
    print(f"adapter  modules_to_save={pcfg.modules_to_save!r} "
          f"base_model_name_or_path={pcfg.base_model_name_or_path!r}")
    if pcfg.task_type not in (None, "CAUSAL_LM"):
        print(f"adapter  note: task_type {pcfg.task_type!r} (the reference writes null, cpmv "
              "CAUSAL_LM so the official AutoPeftModelForCausalLM snippet works)")
    for k in ("use_dora", "use_rslora", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if raw_cfg.get(k):
            print(f"adapter  note: {k}={raw_cfg[k]!r}")
    try:
        file_sd = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckFailed(f"{adapter_dir}: cannot read adapter weights: {type(e).__name__}: {e}") from e
    src = "adapter_model.safetensors" if (adapter_dir / "adapter_model.safetensors").is_file() \
        else "adapter_model.bin"
    print(f"adapter  {src}: {len(file_sd)} tensors [{dtype_summary(file_sd)}]")
    if src.endswith(".safetensors"):
        note = format_note([adapter_dir / src])
        if note:
            print(f"adapter  {note}")
    for k in sorted(file_sd):
        if not torch.isfinite(file_sd[k].float()).all():
            failures.append(f"adapter tensor {k} has non-finite values")

    if pcfg.base_model_name_or_path and Path(pcfg.base_model_name_or_path).resolve() != \
            base_dir.resolve():
        print(f"adapter  note: base_model_name_or_path is not --base ({base_dir.resolve()})")
    adapted_base = build_model(cfg)
    load_strict(adapted_base, base_sd, "BASE")
    # get_peft_model copies the model's name_or_path into the config (as for a transformers model)
    adapted_base.name_or_path = pcfg.base_model_name_or_path
    with warnings.catch_warnings(record=True) as wrec:
        warnings.simplefilter("always")
        try:
            pm = get_peft_model(adapted_base, pcfg)
        except Exception as e:  # noqa: BLE001
            raise CheckFailed(f"get_peft_model failed: {type(e).__name__}: {e}") from e
    for w in wrec:
        print(f"peft     warning (get_peft_model): {w.message}")
    lora_mods = [n for n, m in pm.named_modules() if isinstance(m, LoraLayer)]
    mts_mods = [n for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    strip = lambda n: n.removeprefix("base_model.model.")  # noqa: E731
    print(f"adapted  {len(lora_mods)} LoRA modules: {compact_names([strip(n) for n in lora_mods])}")
    print(f"adapted  modules_to_save wrappers: {[strip(n) for n in mts_mods]}")
    if pcfg.modules_to_save and len(mts_mods) < len(pcfg.modules_to_save):
        failures.append(f"modules_to_save {pcfg.modules_to_save} matched only "
                        f"{[strip(n) for n in mts_mods]}")

    # the key set PEFT itself would save for this model and config
    expected_keys = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False))
    file_keys = set(file_sd)
    not_in_file = sorted(expected_keys - file_keys)
    not_expected = sorted(file_keys - expected_keys)

    # every adapter-owned parameter starts as NaN, so "received a value" is observable
    adapter_params = {n: p for n, p in pm.named_parameters() if is_adapter_param(n)}
    with torch.no_grad():
        for p in adapter_params.values():
            p.fill_(float("nan"))
    load_result = None
    with warnings.catch_warnings(record=True) as wrec:
        warnings.simplefilter("always")
        try:
            load_result = set_peft_model_state_dict(pm, file_sd, adapter_name="default")
        except KeyError as e:
            failures.append(f"set_peft_model_state_dict: KeyError {e} (a modules_to_save tensor "
                            f"is missing from the adapter file)")
        except RuntimeError as e:
            failures.append(f"set_peft_model_state_dict: {str(e).strip()}")
    for w in wrec:
        print(f"peft     warning (load): {w.message}")
    if load_result is not None:
        unexpected = list(load_result.unexpected_keys)
        missing_adapter = [k for k in load_result.missing_keys if is_adapter_param(k)]
        print(f"load     PEFT load_state_dict: {len(unexpected)} unexpected, "
              f"{len(missing_adapter)} missing adapter keys "
              f"({len(load_result.missing_keys) - len(missing_adapter)} base keys not in the "
              f"adapter, as expected)")
        if unexpected:
            failures.append(f"{len(unexpected)} unexpected adapter key(s) (as PEFT maps them): "
                            f"{unexpected[:10]}")
        if missing_adapter:
            failures.append(f"{len(missing_adapter)} adapter parameter(s) missing from the file: "
                            f"{missing_adapter[:10]}")
    if not_expected:
        failures.append(f"{len(not_expected)} key(s) in the adapter file that PEFT's save_pretrained "
                        f"would not write for this model/config: {not_expected[:10]}")
    if not_in_file:
        failures.append(f"{len(not_in_file)} key(s) that PEFT's save_pretrained writes for this "
                        f"model/config are not in the file: {not_in_file[:10]}")
    unset = sorted(n for n, p in adapter_params.items() if torch.isnan(p).any())
    if unset and load_result is not None:
        failures.append(f"{len(unset)} lora_A/lora_B/modules_to_save parameter(s) did not "
                        f"receive a value from the file: {[strip(n) for n in unset[:10]]}")
    n_lora = sum(1 for n in adapter_params if ".lora_" in n)
    n_mts = len(adapter_params) - n_lora
    print(f"load     file keys {len(file_keys)}, PEFT-expected keys {len(expected_keys)}; "
          f"{n_lora} lora_A/lora_B and {n_mts} modules_to_save parameters in the wrapped model")
    if failures:
        raise CheckFailed("\n".join(failures))
    print("load     every adapter key used, every LoRA / modules_to_save parameter set: OK")

    # cross-check with the official reload path
    official_base = build_model(cfg)
    load_strict(official_base, base_sd, "BASE")
    with warnings.catch_warnings(record=True) as wrec:
        warnings.simplefilter("always")
        official = PeftModel.from_pretrained(official_base, str(adapter_dir))
    for w in wrec:
        print(f"peft     warning (PeftModel.from_pretrained): {w.message}")
    off_params = dict(official.named_parameters())
    diff_off = [n for n, p in adapter_params.items()
                if n not in off_params or not torch.equal(off_params[n].float(), p.float())]
    if diff_off:
        raise CheckFailed(f"PeftModel.from_pretrained gives different adapter parameters: "
                          f"{diff_off[:10]}")
    print("load     PeftModel.from_pretrained(base, ADAPTER_DIR) gives the same parameters: OK")
    del official, official_base

    # ---- 3. forward ------------------------------------------------------------------------
    case = build_case(cfg)
    n_tok = int(case["input_ids"].numel())
    adapted_logits = run_forward(pm, case)
    base_logits = run_forward(base, case)
    scale = max(1.0, float(adapted_logits.abs().max()))
    effect = float((adapted_logits - base_logits).abs().max())
    print(f"forward  packed row: {n_tok} tokens, {case['tgt_sizes'].shape[0]} images "
          f"{case['tgt_sizes'].tolist()}; max|logit| {fmt(scale)}; "
          f"max|adapted - base| {fmt(effect)}" + ("  (adapter is a no-op!)" if effect == 0 else ""))
    if not torch.isfinite(adapted_logits).all():
        raise CheckFailed("adapted model produced non-finite logits")

    if not args.merged:
        print(f"summary  {ver}: adapter OK ({len(lora_mods)} LoRA modules, modules_to_save "
              f"{[strip(n) for n in mts_mods]}, {len(file_keys)} tensors); no --merged given")
        return

    # ---- 4. merged checkpoint --------------------------------------------------------------
    merged_dir = Path(args.merged)
    mcfg = read_config(merged_dir)
    diff_keys = [k for k in ARCH_KEYS if mcfg.get(k) != cfg.get(k)]
    if diff_keys:
        raise CheckFailed("MERGED config.json differs from BASE on "
                          + ", ".join(f"{k}: {cfg.get(k)!r} -> {mcfg.get(k)!r}" for k in diff_keys))
    other = sorted(k for k in set(cfg) | set(mcfg) if k not in ARCH_KEYS and cfg.get(k) != mcfg.get(k))
    if other:
        print(f"merged   note: config.json keys differing from BASE (non-architectural): {other}")
    merged_sd = read_checkpoint(merged_dir)
    all_f32 = all(v.dtype == torch.float32 for v in merged_sd.values())
    tol = args.tol if args.tol is not None else (1e-4 if all_f32 else 2e-2)
    print(f"merged   {merged_dir}: {len(merged_sd)} tensors [{dtype_summary(merged_sd)}]; tol {tol}")
    note = format_note(checkpoint_files(merged_dir))
    if note:
        print(f"merged   {note}")
    merged = build_model(mcfg)
    load_strict(merged, merged_sd, "MERGED")
    print("merged   strict load OK")
    merged_logits = run_forward(merged, case)
    d_logit = float((merged_logits - adapted_logits).abs().max())
    bound = tol * scale
    ok_logits = d_logit <= bound
    print(f"logits   max|merged - adapted| {fmt(d_logit)} (bound {fmt(bound)}): "
          f"{'OK' if ok_logits else 'FAIL'}")

    # PEFT's own merge, tensor by tensor against MERGED_DIR
    lora_targets = {strip(n) for n in lora_mods}
    mts_targets = [strip(n) for n in mts_mods]
    pm_merged = pm.merge_and_unload()
    peft_sd = pm_merged.state_dict()
    if set(peft_sd) != set(merged_sd):
        raise CheckFailed(f"merge_and_unload() key set differs from MERGED: "
                          f"{sorted(set(peft_sd) ^ set(merged_sd))[:10]}")
    groups: dict[str, list] = {}
    bad = []
    for k in sorted(peft_sd):
        mod = k.rsplit(".", 1)[0]
        if mod in lora_targets and k.endswith(".weight"):
            g = "lora-merged weights"
        else:
            g = next((f"modules_to_save {t}" for t in mts_targets
                      if k == t or k.startswith(t + ".")), None)
            if g is None:
                g = "unchanged " + ("llm" if k.startswith("llm.") else k.split(".", 1)[0])
        a = peft_sd[k].float()
        b = merged_sd[k].float()
        d = float((a - b).abs().max()) if a.numel() else 0.0
        wmax = float(a.abs().max()) if a.numel() else 0.0
        ulp = 0.0 if merged_sd[k].dtype == torch.float32 else \
            float(torch.finfo(merged_sd[k].dtype).eps) * wmax
        lim = tol * max(1.0, wmax) + ulp
        if g.startswith("unchanged") and merged_sd[k].dtype == base_sd[k].dtype:
            lim = 0.0  # untouched tensors must be copied exactly
        if d > lim:
            bad.append(f"{k}: max diff {fmt(d)} > {fmt(lim)}")
        groups.setdefault(g, []).append(d)
    for g, ds in groups.items():
        print(f"weights  {g:<40} {len(ds):4d} tensors, max diff {fmt(max(ds))}")
    # also: PEFT's merged model reproduces the adapted logits (sanity of the reference itself)
    peft_merged_logits = run_forward(pm_merged, case)
    d_pm = float((peft_merged_logits - adapted_logits).abs().max())
    print(f"logits   max|merge_and_unload() - adapted| {fmt(d_pm)}")
    if bad:
        failures.append(f"{len(bad)} merged tensor(s) differ from PEFT's merge_and_unload(): "
                        + "; ".join(bad[:10]))
    if not ok_logits:
        failures.append(f"merged logits differ from the adapted model's: {fmt(d_logit)} > "
                        f"{fmt(bound)}")
    if d_pm > bound:
        failures.append(f"PEFT merge_and_unload() itself differs from the adapted model: {fmt(d_pm)}")
    if failures:
        raise CheckFailed("\n".join(failures))
    print(f"summary  {ver}: adapter OK ({len(lora_mods)} LoRA modules, modules_to_save "
          f"{mts_targets}, {len(file_keys)} tensors); merged checkpoint reproduces the adapted "
          f"model (logits {fmt(d_logit)}, weights max {fmt(max(max(v) for v in groups.values()))})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base checkpoint directory (MiniCPM-V layout)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--merged", help="merged checkpoint directory (MiniCPM-V layout)")
    ap.add_argument("--tol", type=float, default=None,
                    help="relative tolerance (default 1e-4 for an f32 merged checkpoint, else 2e-2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--allow-skip", action="store_true",
                    help="exit 0 (SKIP) instead of 2 when a required package is missing")
    args = ap.parse_args(argv)

    for mod in REQUIRED:
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  (ImportError, or a broken install)
            print(f"SKIP: {mod}")
            return 0 if args.allow_skip else 2
    fixture_module()
    try:
        check(args)
    except CheckFailed as e:
        print(f"FAIL: {e}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
