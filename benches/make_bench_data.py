#!/usr/bin/env python3
"""Generates the `prep build` throughput benchmark dataset (deterministic, seeded).

    /work/pyenv/bin/python benches/make_bench_data.py [--out .bench/data] [-n 2000] [--seed 0]

Writes, under --out (default .bench/data, git-ignored):

* images/<photo>_<W>x<H>.jpg — every real photo of examples/images (public domain / CC0, see
  examples/images/ATTRIBUTION.md) centre-cropped to the target aspect ratio and resized with
  Pillow LANCZOS to each benchmark size, saved as JPEG quality 90 (4:2:0, Pillow's defaults);
* images/<photo>_<W>x<H>.png — the same for a few PNG sizes (lossless, so much larger files);
* train.json — a JSON list (the reference's input format) of N samples whose image paths are
  relative to the data file: mostly one image (string form, sometimes the `{"<image>": path}`
  object form, `<image>` tag in the text or not), some two-image samples with
  `<image_00>`/`<image_01>` tags, some text-only samples; 1 to 3 user/assistant turns; every
  answer ends in a clause of random words and numbers (some Chinese), so texts do not repeat
  the way real data's do not (a tokenizer cannot coast on repeated strings);
* info.json — what was generated (sizes, counts, total image bytes referenced by the samples,
  counting repeats, which is the "MB of input" of the benchmark table).

Every sample passes `prep build` with the 2.6 tiny checkpoint (max length 2048) and the Python
baseline: the largest two-image sample stays far below 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "examples" / "images"

# (width, height, weight): the mix of sizes in the samples. 640x427 is the size of the original
# rocket photo; the others are common camera / web / dataset sizes.
JPEG_SIZES = [
    (448, 448, 2),
    (640, 427, 3),
    (800, 600, 3),
    (1024, 768, 3),
    (1344, 1344, 1),
    (1920, 1080, 2),
]
PNG_SIZES = [(640, 427, 1), (800, 600, 1)]
PNG_SHARE = 0.05  # of image references

QUESTIONS = [
    "What is shown in this picture?",
    "Describe the image in detail.",
    "What colours dominate the scene?",
    "Is this photo taken indoors or outdoors? Explain.",
    "Count the main objects you can see.",
    "What might have happened just before this photo was taken?",
    "Write a short caption for this image.",
    "What is in the background?",
]
ANSWERS = [
    "The picture shows {thing}, photographed in natural light.",
    "It is {thing}. The framing is centred and the background is mostly out of focus, which "
    "draws attention to the subject.",
    "Mostly warm tones: browns, oranges and a little white. {Thing} fills the middle of the frame.",
    "Outdoors, judging by the sky and the long shadows. {Thing} is the main subject.",
    "I can see {thing}, plus a few smaller objects near the edges of the frame.",
    "Probably nothing dramatic: {thing} was simply set up and photographed.",
    "{Thing}, seen up close.",
    "A plain, slightly blurred background that does not distract from {thing}.",
]
THINGS = {
    "astronaut": "an astronaut in an orange flight suit",
    "chelsea": "a tabby cat lying down",
    "coffee": "a cup of coffee with latte art",
    "hubble_deep_field": "thousands of distant galaxies",
    "rocket": "a rocket lifting off its launch pad",
    "tall_rocket": "the exhaust plume of a rocket",
    "wide_coffee": "a coffee cup on a saucer",
}
TEXT_ONLY = [
    ("What is the capital of France?", "Paris."),
    ("Explain what a JPEG quality setting changes.",
     "It scales the quantisation tables: lower quality discards more high-frequency detail, "
     "which makes files smaller and adds block artefacts."),
    ("Give me three words that rhyme with cat.", "Hat, bat and mat."),
]


# Words for the random clause every answer ends in: common English, some capitalised, some with
# apostrophes or hyphens, and Chinese, so the tokenizer's pre-tokenizer and normaliser see the
# kinds of text real captions hold.
WORDS = (
    "the a of and to in is it that for on with as was at by this from are be or an which not "
    "light shadow colour edge corner surface detail texture frame picture image photo scene view "
    "left right top bottom centre middle background foreground subject object person animal cat "
    "cup table window sky cloud tree road building car wall floor door street water metal glass "
    "bright dark warm cool soft sharp blurred small large tall wide narrow old new round square "
    "red orange yellow green blue purple brown grey white black pale deep faint vivid "
    "shows appears looks seems sits stands lies holds covers fills frames catches reflects "
    "probably clearly slightly mostly nearly quite rather very almost only also still just "
    "there's it's doesn't isn't can't won't they're we've I'd you'll "
    "well-lit close-up out-of-focus black-and-white hand-made "
    "NASA JPEG RGB HDR Monday London Paris "
    "图片 显示 一只 猫 咖啡 杯子 火箭 天空 背景 颜色 光线 细节 左边 右边 中间 非常 清楚 "
).split()


def clause(rng: random.Random) -> str:
    """A clause of 6 to 30 random words, sometimes with a number or a measurement."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 30))]
    for _ in range(rng.choice([0, 0, 1, 2])):
        num = rng.choice([str(rng.randint(0, 9999)), f"{rng.uniform(0, 100):.1f}%",
                          f"{rng.randint(1, 4096)}x{rng.randint(1, 4096)}", f"{rng.randint(1, 60)} cm"])
        words.insert(rng.randrange(len(words) + 1), num)
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "!", "?", "...", ";"])


def fit(im: Image.Image, w: int, h: int) -> Image.Image:
    """Centre crop to the w:h aspect ratio, then resize to w x h (Pillow LANCZOS)."""
    sw, sh = im.size
    if sw * h > sh * w:  # too wide
        cw = round(sh * w / h)
        box = ((sw - cw) // 2, 0, (sw - cw) // 2 + cw, sh)
    else:
        ch = round(sw * h / w)
        box = (0, (sh - ch) // 2, sw, (sh - ch) // 2 + ch)
    return im.crop(box).resize((w, h), Image.Resampling.LANCZOS)


def make_images(out: Path) -> list[dict]:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    made = []
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    for p in photos:
        stem = p.stem.replace("_720x1280", "").replace("_1600x900", "")
        with Image.open(p) as src:
            src = src.convert("RGB")
            for fmt, sizes in (("jpg", JPEG_SIZES), ("png", PNG_SIZES)):
                for w, h, weight in sizes:
                    name = f"{stem}_{w}x{h}.{fmt}"
                    path = img_dir / name
                    if (w, h) == src.size and fmt == "jpg" and p.suffix.lower() == ".jpg":
                        path.write_bytes(p.read_bytes())  # the original file, not re-encoded
                    else:
                        im = fit(src, w, h)
                        if fmt == "jpg":
                            im.save(path, "JPEG", quality=90)
                        else:
                            im.save(path, "PNG")
                    made.append({"path": f"images/{name}", "photo": stem, "format": fmt,
                                 "size": [w, h], "weight": weight, "bytes": path.stat().st_size})
    return made


def conversation(rng: random.Random, thing: str, first_prefix: str) -> list[dict]:
    turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    conv = []
    for t in range(turns):
        q = rng.choice(QUESTIONS)
        a = rng.choice(ANSWERS).format(thing=thing, Thing=thing[0].upper() + thing[1:])
        a = f"{a} {clause(rng)}"
        conv.append({"role": "user", "content": (first_prefix + q) if t == 0 else q})
        conv.append({"role": "assistant", "content": a})
    return conv


def make_samples(images: list[dict], n: int, rng: random.Random) -> list[dict]:
    jpgs = [i for i in images if i["format"] == "jpg"]
    pngs = [i for i in images if i["format"] == "png"]

    def pick() -> dict:
        pool = pngs if rng.random() < PNG_SHARE else jpgs
        return rng.choices(pool, weights=[i["weight"] for i in pool])[0]

    samples = []
    for k in range(n):
        kind = rng.choices(["single", "multi", "text"], weights=[85, 10, 5])[0]
        sid = f"bench-{k:06d}"
        if kind == "text":
            q, a = rng.choice(TEXT_ONLY)
            samples.append({"id": sid, "conversations": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"{a} {clause(rng)}"}]})
        elif kind == "single":
            im = pick()
            thing = THINGS[im["photo"]]
            form = rng.random()
            if form < 0.4:  # no tag: the placeholder is prepended
                conv = conversation(rng, thing, "")
                image = im["path"]
            elif form < 0.8:  # tag at the start
                conv = conversation(rng, thing, "<image>\n")
                image = im["path"]
            else:  # object form with a single <image> key, tag inside the text
                conv = conversation(rng, thing, "Look at this: <image> ")
                image = {"<image>": im["path"]}
            samples.append({"id": sid, "image": image, "conversations": conv})
        else:
            a, b = pick(), pick()
            conv = [
                {"role": "user", "content": f"<image_00>\n<image_01>\nCompare the two pictures."},
                {"role": "assistant", "content": f"The first shows {THINGS[a['photo']]}, the "
                                                 f"second {THINGS[b['photo']]}. {clause(rng)}"},
            ]
            samples.append({"id": sid, "image": {"<image_00>": a["path"], "<image_01>": b["path"]},
                            "conversations": conv})
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".bench" / "data"))
    ap.add_argument("-n", "--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    images = make_images(out)
    samples = make_samples(images, args.samples, rng)
    data = out / "train.json"
    data.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    by_path = {i["path"]: i for i in images}
    refs = []
    for s in samples:
        img = s.get("image")
        if isinstance(img, str):
            refs.append(img)
        elif isinstance(img, dict):
            refs.extend(img.values())
    sizes: dict[str, int] = {}
    for r in refs:
        key = f"{by_path[r]['size'][0]}x{by_path[r]['size'][1]} {by_path[r]['format']}"
        sizes[key] = sizes.get(key, 0) + 1
    info = {
        "samples": len(samples),
        "seed": args.seed,
        "image_files": len(images),
        "image_refs": len(refs),
        "image_ref_bytes": sum(by_path[r]["bytes"] for r in refs),
        "data_file_bytes": data.stat().st_size,
        "refs_by_size": dict(sorted(sizes.items())),
        "kinds": {
            "text_only": sum(1 for s in samples if "image" not in s),
            "multi_image": sum(1 for s in samples if isinstance(s.get("image"), dict) and len(s["image"]) > 1),
        },
    }
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
