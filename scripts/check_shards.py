#!/usr/bin/env python3
"""Check a `prep build` output directory with the Python data stack a user would use.

    python scripts/check_shards.py OUT_DIR [OUT_DIR ...]

Opens every Arrow shard with pyarrow (memory-mapped) and every Parquet twin with pyarrow and
pandas, compares their columns with schemas/shard.schema.json, validates manifest.json and
rejected.jsonl against their JSON schemas, and checks the row invariants (lengths, bounds,
pixel sizes, packs, counts); in a set of `--pixels source`, the image store (one row per distinct
file, sha256 matching its bytes) and that every image_refs entry points into it; in a set of
`--compression lz4|zstd`, that the shards hold frames of that codec (pyarrow decompresses them
transparently). Exits 1 on the first directory that fails.
Needs: pyarrow, pandas, jsonschema.
"""
import hashlib
import json
import pathlib
import sys

import jsonschema
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"


def arrow_type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{arrow_type_name(t.value_type)}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{arrow_type_name(t.value_type)}>[{t.list_size}]"
    return str(t)


def check_table(t: pa.Table, columns, patch: int, where: str, images: int | None):
    """`images`: the image store's row count in a set of pixels "source", else None."""
    names = [c["name"] for c in columns]
    assert t.column_names == names, f"{where}: columns {t.column_names} != {names}"
    for c in columns:
        got = arrow_type_name(t.schema.field(c["name"]).type)
        assert got == c["arrow_type"], f"{where}: {c['name']} is {got}, schema says {c['arrow_type']}"
        assert t.schema.field(c["name"]).nullable is False or t.column(c["name"]).null_count == 0
    rows = t.to_pylist()
    for r in rows:
        n = len(r["input_ids"])
        assert len(r["labels"]) == n == r["num_tokens"], f"{where} {r['id']}: lengths"
        assert len(r["image_bound"]) == len(r["tgt_sizes"]), f"{where} {r['id']}: slices"
        for (s, e) in r["image_bound"]:
            assert 0 < s <= e <= n, f"{where} {r['id']}: bound {s, e}"
        if images is None:
            assert len(r["pixel_values"]) == len(r["tgt_sizes"]) and not r["image_refs"], f"{where} {r['id']}: slices"
            for (h, w), px in zip(r["tgt_sizes"], r["pixel_values"]):
                assert len(px) == h * patch * w * patch * 3, f"{where} {r['id']}: pixel bytes"
        else:
            assert not r["pixel_values"], f"{where} {r['id']}: slices stored in a set of source pixels"
            assert len(r["image_refs"]) <= len(r["tgt_sizes"]), f"{where} {r['id']}: more images than slices"
            assert all(0 <= i < images for i in r["image_refs"]), f"{where} {r['id']}: image_refs {r['image_refs']}"
    packs = [r["pack"] for r in rows]
    seen, prev = set(), None
    for p in packs:
        if p != prev:
            assert p not in seen, f"{where}: pack {p} is split"
            seen.add(p)
            prev = p
    return rows


def check_dir(d: pathlib.Path) -> str:
    manifest = json.loads((d / "manifest.json").read_text())
    jsonschema.validate(manifest, json.loads((SCHEMAS / "manifest.schema.json").read_text()))
    rej_schema = json.loads((SCHEMAS / "rejected.schema.json").read_text())
    rejected = [json.loads(l) for l in (d / "rejected.jsonl").read_text().splitlines() if l.strip()]
    for r in rejected:
        jsonschema.validate(r, rej_schema)
    c = manifest["counts"]
    assert c["read"] == c["written"] + c["rejected"], "counts do not add up"
    assert c["rejected"] == len(rejected) == sum(c["rejected_by_reason"].values())
    columns = json.loads((SCHEMAS / "shard.schema.json").read_text())["columns"]
    patch = manifest["settings"]["sample"]["patch_size"]
    images = None
    if manifest.get("pixels", "slices") == "source":
        store = manifest["images"]
        with pa.memory_map(str(d / store["file"])) as src:
            it = ipc.open_file(src).read_all()
        assert it.column_names == ["sha256", "bytes"], f"{store['file']}: columns {it.column_names}"
        assert it.num_rows == store["count"], f"{store['file']}: {it.num_rows} rows, manifest says {store['count']}"
        digests = it.column("sha256").to_pylist()
        assert len(set(digests)) == len(digests), f"{store['file']}: a file is stored twice"
        for digest, data in zip(digests, it.column("bytes").to_pylist()):
            assert hashlib.sha256(data).digest() == digest, f"{store['file']}: sha256 does not match the bytes"
        images = it.num_rows
    # Frame magic numbers of the codecs Arrow IPC buffer compression uses.
    magic = {"lz4": bytes.fromhex("04224d18"), "zstd": bytes.fromhex("28b52ffd")}
    codec = manifest.get("compression", "none")
    max_len = manifest["packing"]["max_length"]
    total = 0
    pack_tokens = {}
    for s in manifest["shards"]:
        arrow_rows = None
        if s["file"]:
            with pa.memory_map(str(d / s["file"])) as src:
                t = ipc.open_file(src).read_all()
            arrow_rows = check_table(t, columns, patch, s["file"], images)
            assert len(arrow_rows) == s["rows"]
            if codec != "none":
                raw = (d / s["file"]).read_bytes()
                assert magic[codec] in raw, f"{s['file']}: no {codec} frame in a set of {codec}"
            for r in arrow_rows:
                pack_tokens[r["pack"]] = pack_tokens.get(r["pack"], 0) + r["num_tokens"]
        if s["parquet"]:
            t = pq.read_table(d / s["parquet"])
            rows = check_table(t, columns, patch, s["parquet"], images)
            df = pd.read_parquet(d / s["parquet"])
            assert len(df) == s["rows"] == len(rows)
            if arrow_rows is not None:
                assert rows == arrow_rows, f"{s['parquet']} differs from {s['file']}"
        total += s["rows"]
    assert total == c["written"], f"{total} rows in shards, manifest says {c['written']} written"
    if manifest["packing"]["enabled"]:
        assert all(v <= max_len for v in pack_tokens.values()), "a pack exceeds max_length"
    return f"{d}: ok ({total} rows in {len(manifest['shards'])} shard(s), {c['rejected']} rejected, pyarrow {pa.__version__})"


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    for arg in sys.argv[1:]:
        try:
            print(check_dir(pathlib.Path(arg)))
        except (AssertionError, jsonschema.ValidationError, OSError, ValueError) as e:
            print(f"{arg}: FAILED: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
