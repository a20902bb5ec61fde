#!/usr/bin/env python3
"""Python baseline for the `prep build` throughput benchmark: the reference's per-sample work.

    /work/pyenv/bin/python benches/prep_baseline.py --data .bench/data/train.json \
        --model examples/models/minicpm-v-2_6-tiny [--workers N] [--tensor] [--limit K]

For every sample it does what the reference dataset's `__getitem__` does (spec §1-§5), using the
faithful re-implementation in scripts/fixtures/reference_preprocess.py for the slicing,
placeholders, placement and labels:

1. `Image.open(path).convert("RGB")` for every image of the sample;
2. UHD slicing: overview and refine image resized with Pillow BICUBIC from the original, crops;
3. placeholders (2.6 schema with the reference's image-id quirk), placement in the conversation;
4. the checkpoint's chat template rendered by transformers (`apply_chat_template`, Jinja, as the
   reference does), then ONE encode of that text with the HF `tokenizers` library (the reference
   goes through `PreTrainedTokenizerFast`, which is a little slower: this favours the baseline),
   the supervision mask, shifted labels and image bounds;
5. with --tensor also what the reference really computes next (spec §5): ToTensor +
   Normalize(0.5, 0.5) to float32 CHW, and the patch-strip re-layout `[3, 14, L*14]` for 2.6
   (`batch_vision`). NumPy stands in for torch (not installed); both run one thread per process
   here, and NumPy's element-wise float path is not slower than torch's for this.

Samples are processed by a `multiprocessing.Pool` of --workers processes (fork; the tokenizer and
the parsed samples are loaded once in the parent and inherited). The timed region is the pool's
whole lifetime: worker start, every sample, result collection. Interpreter start, imports,
tokenizer loading and JSON parsing are NOT timed (they are in `prep build`'s wall time, so this
favours the baseline). A checksum of every produced pixel buffer / token list is accumulated so
that no work can be skipped, and the JSON result printed on stdout:

    {"samples": N, "ok": N_ok, "errors": {...}, "images": ..., "slices": ..., "seconds": s,
     "samples_per_s": r, "workers": w, "tensor": bool, "checksum": c}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "fixtures"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import reference_preprocess as ref  # noqa: E402

# Set in the parent before the pool forks.
G: dict = {}


def setup(data: Path, model: Path, tensor: bool, limit: int | None) -> None:
    cfg = ref.read_model_config(model)
    llm_type = ref.detect_llm_type(cfg)
    if llm_type != "qwen":
        raise SystemExit("the baseline implements the qwen (2.6) text path only")
    samples = json.loads(data.read_text(encoding="utf-8"))
    if limit:
        samples = samples[:limit]
    G.update(
        samples=samples,
        base=data.parent,
        tok=ref.RefTokenizer(model, llm_type),
        llm_type=llm_type,
        query_num=cfg["query_num"],
        slice_config=ref.slice_settings(cfg),
        batch_vision=bool(cfg.get("batch_vision_input", False)),
        tensor=tensor,
    )


def qwen_ids(chat: list[dict], tok: ref.RefTokenizer) -> tuple[list[int], list[int]]:
    """conversation_to_ids_qwen with one render and one encode (spec §4.3)."""
    last = chat[-1]["content"]
    enable_thinking = "<think>" in last and "</think>" in last
    text = tok.render_chat(chat, enable_thinking=enable_thinking)
    ids = np.array(tok.raw.encode(text, add_special_tokens=False).ids)
    offset = 4 if "<think>\n\n</think>\n\n" in text else 0
    starts = set(np.where(ids == tok.im_start_tok)[0].tolist())
    assistants = np.where(ids == tok.assistant_tok)[0]
    ends = np.where(ids == tok.im_end_tok)[0]
    ctx = np.ones_like(ids, dtype=np.int8)
    for i, a in enumerate(assistants):
        if a - 1 in starts:
            st = a + 2 + (offset if i == len(assistants) - 1 else 0)
            for e in ends:
                if e > st:
                    ctx[st:e + 1] = 0
                    break
    return ids.tolist(), ctx.tolist()


def to_tensor(im: Image.Image, patch: int, batch_vision: bool) -> np.ndarray:
    """ToTensor + Normalize(0.5, 0.5) (float32 CHW), then reshape_by_patch for 2.5/2.6."""
    a = np.asarray(im, dtype=np.uint8)  # H, W, 3
    t = (a.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    t = np.ascontiguousarray(t.transpose(2, 0, 1))  # ToTensor's CHW layout
    if not batch_vision:
        return t
    c, h, w = t.shape
    hp, wp = h // patch, w // patch
    # strip[c, kh, l*p + kw] = img[c, (l // wp)*p + kh, (l % wp)*p + kw]   (spec §5)
    return np.ascontiguousarray(
        t.reshape(c, hp, patch, wp, patch).transpose(0, 2, 1, 3, 4)).reshape(c, patch, hp * wp * patch)


def process(index: int) -> tuple[int, int, int, float, str | None]:
    """-> (images, slices, tokens, checksum, error code)."""
    s = G["samples"][index]
    tok = G["tok"]
    try:
        conv = s.get("conversations")
        if not isinstance(conv, list) or len(conv) <= 1 or conv[0].get("role") != "user":
            raise ref.PreprocessError("bad_conversation", "")
        images_dict = ref.load_images(s, G["base"])  # open + convert("RGB")
        images, placeholders = ref.build_images_and_placeholders(
            images_dict, tok, G["llm_type"], G["query_num"], G["slice_config"])
        placed = ref.place(conv, placeholders)
        chat = [{"role": m["role"], "content": m["content"]} for m in placed]
        ids, ctx = qwen_ids(chat, tok)
        enc = ref.finish(ids, ctx, tok, G["llm_type"], 2048)
        if enc.truncated:
            raise ref.PreprocessError("too_long", "")
        patch = G["slice_config"]["patch_size"]
        check = float(len(enc.input_ids) + sum(enc.labels[-8:]) + len(enc.image_bound))
        for im in images:
            if G["tensor"]:
                t = to_tensor(im, patch, G["batch_vision"])
                check += float(t[0, 0, 0]) + float(t[-1, -1, -1])
            else:
                px = im.getpixel((im.size[0] - 1, im.size[1] - 1))
                check += px[0] + px[1] + px[2]
        return len(images_dict), len(images), len(enc.input_ids), check, None
    except ref.PreprocessError as e:
        return 0, 0, 0, 0.0, e.code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tensor", action="store_true", help="also ToTensor+Normalize and the patch strip")
    ap.add_argument("--limit", type=int, help="only the first K samples")
    ap.add_argument("--chunksize", type=int, default=4)
    args = ap.parse_args()

    setup(args.data, args.model, args.tensor, args.limit)
    tok = G["tok"]
    tok.im_start_tok = tok.tid("<|im_start|>")
    tok.im_end_tok = tok.tid("<|im_end|>")
    tok.assistant_tok = tok.tid("assistant")
    process(0)  # warm-up: compiles the chat template in the parent, inherited by the workers
    n = len(G["samples"])

    t0 = time.perf_counter()
    with get_context("fork").Pool(args.workers) as pool:
        results = list(pool.imap(process, range(n), chunksize=args.chunksize))
    seconds = time.perf_counter() - t0

    errors: dict[str, int] = {}
    for r in results:
        if r[4]:
            errors[r[4]] = errors.get(r[4], 0) + 1
    out = {
        "samples": n,
        "ok": n - sum(errors.values()),
        "errors": errors,
        "images": sum(r[0] for r in results),
        "slices": sum(r[1] for r in results),
        "tokens": sum(r[2] for r in results),
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "workers": args.workers,
        "tensor": args.tensor,
        "checksum": sum(r[3] for r in results),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
