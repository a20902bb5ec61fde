#!/usr/bin/env python3
"""Reference evaluation loss of a MiniCPM-V 2.0 / 2.5 / 2.6 checkpoint (optionally + LoRA) on shards.

    python scripts/reference_eval.py --shards SHARD_DIR --model MODEL_DIR [--adapter ADAPTER_DIR]
                                     --out OUT.json [--threads 1] [--limit N] [--allow-skip]
                                     [--v25-vision-masking]

SHARD_DIR: what `prep build` writes (manifest.json + shard-NNNNN.arrow, columns in
schemas/shard.schema.json); every row is read with pyarrow (memory-mapped), in manifest order.
MODEL_DIR: checkpoint in the MiniCPM-V layout (config.json, model.safetensors or shards + index,
f32/bf16/f16). The PyTorch module tree is built by scripts/check_peft.py (building blocks of
scripts/fixtures/gen_model_fixtures.py) and loaded with strict key checking; everything runs in
float32 on the CPU. ADAPTER_DIR: a PEFT LoRA adapter (adapter_config.json +
adapter_model.safetensors), applied with PEFT itself as check_peft.py does (every adapter key must be
used, every lora_A/lora_B/modules_to_save parameter must receive a value), eval mode.

Reference semantics (spec sections 5-7), ONE SAMPLE (= one shard row) AT A TIME, i.e. a batch of 1:
  * pixels: u8 HWC -> CHW float32 ((u / 255) - 0.5) / 0.5.
  * V2.0: every slice through the timm ViT separately (batch 1, no padding; pos_embed resampled
    bicubic+antialias to the slice's grid), then the resampler separately (2-D sin-cos key positions
    of (H/14, W/14), stored query pos_embed).
  * 2.5: this sample's slices become patch strips zero-padded to L_max = the largest h*w among THIS
    SAMPLE's slices; the vision tower sees every position as valid (the 2.5 mask bug: no attention
    mask, position ids bucket(j, L_max) of row 0 for every slice, whatever its real h x w); the
    resampler then masks keys >= h*w and uses the true (h, w) sin-cos positions.
    --v25-vision-masking replaces the quirk by the 2.6 computation (the trainer's optional fix).
  * 2.6: strips padded to L_max over this sample's slices, vision tower in chunks of
    config.vision_batch_size (default 16) with the key-padding attention mask (omitted when a chunk
    has no padding), position ids bucket(r, h) * 70 + bucket(c, w); resampler as for 2.5.
  * LLM: E = embed_tokens(input_ids) (x scale_emb for V2.0, before the image rows are written);
    E[image_bound runs, in order] = features of the slices in order (each run exactly query_num
    long); position_ids = arange(N); no attention mask (pure causal); logits in float32.
  * loss: cross-entropy over positions with labels != -100, NO shift (labels are pre-shifted);
    loss = mean over this sample's supervised tokens (torch CrossEntropyLoss, float32),
    loss_sum = the float32 sum, n_tokens = the count.

Output JSON (samples in shard row order):
  {"samples": [{"id", "loss", "loss_sum", "n_tokens", "n_slices", "n_images", "num_tokens"}, ...],
   "mean_loss": mean of the per-sample losses, "token_mean_loss": sum(loss_sum) / sum(n_tokens),
   "n_samples", "version", "model", "adapter" (or null), "shards", "v25_vision_masking", "torch"}
n_images (overviews, i.e. images) is derived from the token before each bound (<image> vs <slice>,
and for 2.0/2.5 whether the bound lies inside a <slice> ... </slice> group); it is omitted when the
tokenizer files do not name those tokens. A sample with no supervised token gets "loss": null and
is left out of mean_loss. The per-sample loss is re-computed from the logits in float64 (NumPy
log-sum-exp) and must agree to 1e-5 relative, else the run fails.

Deterministic: torch.set_num_threads(--threads) (default 1), deterministic algorithms; two runs
give byte-identical JSON. Timing goes to stdout only.

Exit status: 0 ok, 1 failure, 2 a required package is missing (prints "SKIP: <package>"; exit 0
instead with --allow-skip). Packages: torch, numpy, safetensors, transformers, timm, pyarrow (+ peft
with --adapter); environment: scripts/requirements-peft.txt on top of scripts/fixtures/requirements-*.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = ["torch", "numpy", "safetensors", "transformers", "timm", "pyarrow"]


class EvalFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Config / model
# ---------------------------------------------------------------------------------------------
def normalise_config(cfg: dict) -> dict:
    """The released V2.0 config.json has no `version` key (examples/models/README.md): infer it."""
    cfg = dict(cfg)
    if "version" not in cfg:
        if "scale_emb" in cfg or ("slice_config" not in cfg and "batch_vision_input" not in cfg):
            cfg["version"] = 2.0
        else:
            raise EvalFailed("config.json has no `version` and does not look like MiniCPM-V 2.0")
    return cfg


def load_model(cp, model_dir: Path):
    cfg = normalise_config(cp.read_config(model_dir))
    ver = cp.version_key(cfg)
    sd = cp.read_checkpoint(model_dir)
    print(f"model    {model_dir}: MiniCPM-V {cfg['version']} ({ver}), {len(sd)} tensors "
          f"[{cp.dtype_summary(sd)}]")
    model = cp.build_model(cfg)
    cp.load_strict(model, sd, "MODEL")
    print(f"strict load OK: {len(sd)} tensors")
    return cfg, ver, model


def apply_adapter(cp, model, adapter_dir: Path):
    """PEFT LoRA on top of the loaded base, as check_peft.py loads it (strict on adapter keys)."""
    import torch
    import peft
    from peft import get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvalFailed(f"{adapter_dir}: no adapter_config.json")
    try:
        pcfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
        if pcfg.peft_type != peft.PeftType.LORA:
            raise EvalFailed(f"adapter_config.json: peft_type {pcfg.peft_type} (want LORA)")
        pcfg = peft.LoraConfig.from_pretrained(str(adapter_dir))
    except EvalFailed:
        raise
    except Exception as e:  # noqa: BLE001
        raise EvalFailed(f"adapter_config.json rejected by PEFT: {type(e).__name__}: {e}") from e
    file_sd = load_peft_weights(str(adapter_dir), device="cpu")
    model.name_or_path = pcfg.base_model_name_or_path
    with warnings.catch_warnings(record=True) as wrec:
        warnings.simplefilter("always")
        pm = get_peft_model(model, pcfg)
        adapter_params = {n: p for n, p in pm.named_parameters() if cp.is_adapter_param(n)}
        with torch.no_grad():
            for p in adapter_params.values():
                p.fill_(float("nan"))
        try:
            res = set_peft_model_state_dict(pm, file_sd, adapter_name="default")
        except (KeyError, RuntimeError) as e:
            raise EvalFailed(f"set_peft_model_state_dict: {type(e).__name__}: {e}") from e
    for w in wrec:
        print(f"peft     warning: {w.message}")
    problems = []
    if res.unexpected_keys:
        problems.append(f"{len(res.unexpected_keys)} unexpected adapter key(s): "
                        f"{list(res.unexpected_keys)[:10]}")
    unset = sorted(n for n, p in adapter_params.items() if torch.isnan(p).any())
    if unset:
        problems.append(f"{len(unset)} adapter parameter(s) not set by the file: {unset[:10]}")
    expected = set(peft.get_peft_model_state_dict(pm, save_embedding_layers=False))
    if set(file_sd) != expected:
        problems.append(f"adapter key set differs from what PEFT writes for this model: "
                        f"{sorted(set(file_sd) ^ expected)[:10]}")
    if problems:
        raise EvalFailed("ADAPTER: " + "; ".join(problems))
    n_lora = sum(1 for n in adapter_params if ".lora_" in n)
    print(f"adapter  {adapter_dir}: r={pcfg.r} lora_alpha={pcfg.lora_alpha} "
          f"target_modules={pcfg.target_modules!r} modules_to_save={pcfg.modules_to_save!r}; "
          f"{len(file_sd)} tensors, {n_lora} lora_A/lora_B + {len(adapter_params) - n_lora} "
          f"modules_to_save parameters set: OK")
    return pm


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------
def iter_rows(shard_dir: Path):
    """(shard file, row index, row dict) for every row, in manifest order; pixel_values stay
    zero-copy pyarrow buffers."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    manifest = json.loads((shard_dir / "manifest.json").read_text())
    scalar_cols = ["id", "input_ids", "labels", "image_bound", "tgt_sizes", "num_tokens", "pack"]
    for s in manifest["shards"]:
        if s.get("file"):
            src = pa.memory_map(str(shard_dir / s["file"]))
            table = ipc.open_file(src).read_all()
            name = s["file"]
        elif s.get("parquet"):
            table = pq.read_table(shard_dir / s["parquet"], memory_map=True)
            name = s["parquet"]
        else:
            raise EvalFailed(f"manifest shard entry without a file: {s}")
        if table.num_rows != s["rows"]:
            raise EvalFailed(f"{name}: {table.num_rows} rows, manifest says {s['rows']}")
        missing = [c for c in scalar_cols + ["pixel_values"] if c not in table.column_names]
        if missing:
            raise EvalFailed(f"{name}: missing columns {missing}")
        pix_col = table.column("pixel_values")
        for i in range(table.num_rows):
            row = {c: table.column(c)[i].as_py() for c in scalar_cols}
            lst = pix_col[i]  # ListScalar of large_binary
            row["pixel_values"] = [lst.values[k].as_buffer() for k in range(len(lst.values))] \
                if lst.values is not None else []
            yield name, i, row


def special_ids(model_dir: Path) -> dict:
    """ids of <image>, </image>, <slice>, </slice> from the tokenizer files (absent: not there)."""
    want = {"<image>", "</image>", "<slice>", "</slice>"}
    found: dict[str, int] = {}
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text()).get("added_tokens", []):
            if t.get("content") in want:
                found.setdefault(t["content"], int(t["id"]))
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        for k, t in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            if t.get("content") in want:
                found.setdefault(t["content"], int(k))
    return found


def count_images(ids: list[int], bounds: list, sp: dict) -> int | None:
    """A bound is an image's overview when the token before it is <image> and it does not sit inside
    an open <slice> ... </slice> group (2.0/2.5 wrap slices as <slice><image>U</image>...</slice>;
    2.6 writes each slice as <slice>U</slice>)."""
    if not {"<image>", "<slice>", "</slice>"} <= set(sp):
        return None
    im, sl, sl_end = sp["<image>"], sp["<slice>"], sp["</slice>"]
    n, open_slice, pos = 0, False, 0
    for start, _ in bounds:
        for t in ids[pos:start - 1]:
            if t == sl:
                open_slice = True
            elif t == sl_end:
                open_slice = False
        pos = max(pos, start - 1)
        if ids[start - 1] == im and not open_slice:
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Forward of one sample
# ---------------------------------------------------------------------------------------------
def pixel_tensors(row: dict, patch: int):
    import numpy as np
    import torch

    out = []
    for k, ((hp, wp), buf) in enumerate(zip(row["tgt_sizes"], row["pixel_values"])):
        h, w = hp * patch, wp * patch
        u8 = np.frombuffer(buf, dtype=np.uint8)  # zero-copy view of the Arrow buffer
        if u8.size != h * w * 3:
            raise EvalFailed(f"{row['id']}: slice {k} has {u8.size} bytes, tgt_size {hp}x{wp} "
                             f"needs {h * w * 3}")
        u8 = u8.reshape(h, w, 3)
        x = torch.from_numpy(u8.transpose(2, 0, 1).astype(np.float32))  # CHW, exact u8 values
        out.append((x / 255 - 0.5) / 0.5)
    return out


def pos_ids_2d(gm, tgt_sizes, l_max: int):
    """2.6 position ids: bucket(r, h) * 70 + bucket(c, w) on the first h*w positions, 0 after."""
    import torch

    pos = torch.zeros((tgt_sizes.shape[0], l_max), dtype=torch.long)
    for i in range(tgt_sizes.shape[0]):
        nb_h, nb_w = tgt_sizes[i, 0], tgt_sizes[i, 1]  # int64 tensors, as in the reference
        ids = (gm.navit_bucket(nb_h)[:, None] * gm.NUM_PATCHES_PER_SIDE
               + gm.navit_bucket(nb_w)).flatten()
        pos[i, : ids.numel()] = ids
    return pos


def vision_26_chunked(model, gm, pixel_values, tgt_sizes, chunk: int):
    """2.6 reference: pad all strips to the sample's L_max, vpm in chunks of vision_batch_size
    (mask only when the chunk has padding), one resampler call over all slices. Also the 2.5
    `--v25-vision-masking` variant (same computation, one chunk)."""
    import torch

    patch = gm.PATCH
    strips = [gm.to_strip(p) for p in pixel_values]
    l_max = max(s.shape[-1] // patch for s in strips)
    n = len(strips)
    batch = torch.zeros((n, 3, patch, l_max * patch), dtype=torch.float32)
    for i, s in enumerate(strips):
        batch[i, :, :, : s.shape[-1]] = s
    pos_ids = pos_ids_2d(gm, tgt_sizes, l_max)
    valid = torch.zeros((n, l_max), dtype=torch.bool)
    for i in range(n):
        valid[i, : int(tgt_sizes[i, 0] * tgt_sizes[i, 1])] = True
    hs = []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        emb = model.vpm.embeddings.patch_embedding(batch[a:b]).flatten(2).transpose(1, 2)
        h = emb + model.vpm.embeddings.position_embedding(pos_ids[a:b])
        mask = None
        if not bool(valid[a:b].all()):
            mask = torch.zeros((b - a, 1, l_max, l_max), dtype=torch.float32)
            mask.masked_fill_(~valid[a:b, None, None, :], torch.finfo(torch.float32).min)
        for layer in model.vpm.encoder.layers:
            h = layer(h, mask)
        hs.append(model.vpm.post_layernorm(h))
    return model.resampler.forward_batched(torch.cat(hs, 0), tgt_sizes)


def sample_logits(model, gm, ver: str, cfg: dict, row: dict, v25_fix: bool = False):
    """float32 logits [N, vocab] of one sample (batch of 1)."""
    import torch

    ids = torch.tensor(row["input_ids"], dtype=torch.int64)
    n = ids.numel()
    q = int(cfg.get("query_num", 64))
    bounds = row["image_bound"]
    pixels = pixel_tensors(row, gm.PATCH)
    if len(bounds) != len(pixels):
        raise EvalFailed(f"{row['id']}: {len(bounds)} image bounds but {len(pixels)} slices")
    for s, e in bounds:
        if not (0 < s < e <= n) or e - s != q:
            raise EvalFailed(f"{row['id']}: bound [{s}, {e}) is not a run of query_num={q} "
                             f"placeholders inside {n} tokens")
    feats = None
    if pixels:
        tgt = torch.tensor(row["tgt_sizes"], dtype=torch.int64).reshape(-1, 2)
        if ver == "v2_0":
            feats = model.vision_v20(pixels)[0]  # each slice separately
        elif ver == "v2_5" and not v25_fix:
            feats = model.vision_batched(pixels, tgt)[0]  # one batch: this sample's slices
        elif ver == "v2_5":  # the trainer's optional fix: 2.6 masking + 2-D positions
            feats = vision_26_chunked(model, gm, pixels, tgt, len(pixels))
        else:
            feats = vision_26_chunked(model, gm, pixels, tgt,
                                      int(cfg.get("vision_batch_size", 16)))
    e = model.llm.model.embed_tokens(ids)
    if ver == "v2_0":
        e = e * model.cfg["scale_emb"]
    if feats is not None:
        idx = torch.cat([torch.arange(s, t) for s, t in bounds])
        e = e.index_put((idx,), feats.reshape(-1, feats.shape[-1]).to(e.dtype))
    pos = torch.arange(n, dtype=torch.int64)
    if ver == "v2_0":
        lg = model.llm(e[None], pos[None])
    else:
        lg = model.llm(inputs_embeds=e[None], position_ids=pos[None], use_cache=False).logits
    return lg[0].float()


def manual_loss(logits, labels) -> float:
    """float64 NumPy log-sum-exp cross-entropy over supervised rows (independent re-computation)."""
    import numpy as np

    sel = labels != -100
    lg = logits[sel].double().numpy()
    tg = labels[sel].numpy()
    m = lg.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))
    return float(np.mean(lse - lg[np.arange(len(tg)), tg]))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def evaluate(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    sys.path.insert(0, str(HERE))
    import check_peft as cp  # noqa: E402  (model building + strict loading)

    gm = cp.fixture_module()
    shard_dir, model_dir = Path(args.shards), Path(args.model)
    if not (shard_dir / "manifest.json").is_file():
        raise EvalFailed(f"{shard_dir}: no manifest.json")
    try:
        cfg, ver, model = load_model(cp, model_dir)
    except cp.CheckFailed as e:
        raise EvalFailed(str(e)) from e

    # the shards must have been made for this model's version and placeholder length
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    m_ver = str((manifest.get("model") or {}).get("version", ""))
    if m_ver and abs(float(m_ver) - float(cfg["version"])) > 1e-6:
        raise EvalFailed(f"shards were built for MiniCPM-V {m_ver}, model is {cfg['version']}")
    sample_cfg = (manifest.get("settings") or {}).get("sample") or {}
    for key, want in (("query_num", int(cfg.get("query_num", 64))), ("patch_size", gm.PATCH)):
        if key in sample_cfg and int(sample_cfg[key]) != want:
            raise EvalFailed(f"shards: {key} {sample_cfg[key]} != model's {want}")

    if args.v25_vision_masking and ver != "v2_5":
        print(f"note     --v25-vision-masking has no effect on {ver}")
    if args.adapter:
        model = apply_adapter(cp, model, Path(args.adapter))
    cp.set_inference_mode(model)  # eval (no LoRA dropout); MHA kept on the reference slow path
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    sp = special_ids(model_dir)
    vocab = int(cfg["vocab_size"])

    samples, times, worst = [], [], 0.0
    t_all = time.perf_counter()
    with torch.no_grad():
        for k, (shard, i, row) in enumerate(iter_rows(shard_dir)):
            if args.limit is not None and k >= args.limit:
                break
            if len(row["labels"]) != len(row["input_ids"]):
                raise EvalFailed(f"{shard} row {i} ({row['id']}): labels/input_ids lengths differ")
            t0 = time.perf_counter()
            logits = sample_logits(net, gm, ver, cfg, row, args.v25_vision_masking)
            labels = torch.tensor(row["labels"], dtype=torch.int64)
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= vocab))]
            if bad.numel():
                raise EvalFailed(f"{row['id']}: label ids outside the vocabulary: {bad[:5].tolist()}")
            n_tok = int((labels != -100).sum())
            rec = {"id": row["id"]}
            if n_tok:
                loss = F.cross_entropy(logits, labels, ignore_index=-100)  # reference: mean, f32
                loss_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                if not (torch.isfinite(loss) and torch.isfinite(loss_sum)):
                    raise EvalFailed(f"{row['id']}: non-finite loss")
                man = manual_loss(logits, labels)
                rel = abs(man - float(loss)) / max(1.0, abs(man))
                worst = max(worst, rel)
                if rel > 1e-5:
                    raise EvalFailed(f"{row['id']}: loss {float(loss)} != float64 re-computation "
                                     f"{man} (rel {rel:.2e})")
                rec.update(loss=float(loss), loss_sum=float(loss_sum))
            else:
                rec.update(loss=None, loss_sum=0.0)
            rec.update(n_tokens=n_tok, n_slices=len(row["tgt_sizes"]))
            n_img = count_images(row["input_ids"], row["image_bound"], sp)
            if n_img is not None:
                rec["n_images"] = n_img
            rec["num_tokens"] = len(row["input_ids"])
            dt = time.perf_counter() - t0
            times.append(dt)
            samples.append(rec)
            loss_txt = "  (no supervised token)" if rec["loss"] is None else f"{rec['loss']:.6f}"
            print(f"sample   {k:4d} {row['id']:<24} tokens {rec['num_tokens']:5d} supervised "
                  f"{n_tok:4d} slices {rec['n_slices']:2d} loss {loss_txt}  {dt:.3f}s")
    if not samples:
        raise EvalFailed(f"{shard_dir}: no rows")
    losses = [s["loss"] for s in samples if s["loss"] is not None]
    n_total = sum(s["n_tokens"] for s in samples)
    out = {
        "samples": samples,
        "mean_loss": (math.fsum(losses) / len(losses)) if losses else None,
        "token_mean_loss": (math.fsum(s["loss_sum"] for s in samples) / n_total)
        if n_total else None,
        "n_samples": len(samples),
        "version": float(cfg["version"]),
        "model": args.model,
        "adapter": args.adapter,
        "shards": args.shards,
        "v25_vision_masking": bool(args.v25_vision_masking),
        "torch": torch.__version__,
    }
    total = time.perf_counter() - t_all
    f6 = lambda x: "n/a" if x is None else f"{x:.6f}"  # noqa: E731
    print(f"summary  {len(samples)} samples ({len(losses)} with supervision, {n_total} supervised "
          f"tokens): mean_loss {f6(out['mean_loss'])} token_mean_loss "
          f"{f6(out['token_mean_loss'])} (ln(vocab {vocab}) = {math.log(vocab):.6f})")
    print(f"check    max rel |loss - float64 re-computation| {worst:.2e}")
    print(f"timing   {total:.2f}s total, {total / len(samples):.3f}s/sample mean, "
          f"max {max(times):.3f}s ({args.threads} thread(s))")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="shard directory written by `prep build`")
    ap.add_argument("--model", required=True, help="checkpoint directory (MiniCPM-V layout)")
    ap.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    ap.add_argument("--v25-vision-masking", action="store_true",
                    help="2.5 only: mask padding patches and use 2-D position buckets (as 2.6; "
                         "the trainer's optional fix) instead of the reference's quirk")
    ap.add_argument("--allow-skip", action="store_true",
                    help="exit 0 (SKIP) instead of 2 when a required package is missing")
    args = ap.parse_args(argv)

    for mod in REQUIRED + (["peft"] if args.adapter else []):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001  (ImportError, or a broken install)
            print(f"SKIP: {mod}")
            return 0 if args.allow_skip else 2
    try:
        out = evaluate(args)
    except EvalFailed as e:
        print(f"FAIL: {e}")
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote    {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
