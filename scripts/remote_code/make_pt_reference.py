#!/usr/bin/env python3
"""Write a small reference .pt with torch.save, and describe / verify .pt files byte by byte.

    python scripts/remote_code/make_pt_reference.py --out FILE.pt [--describe]
    python scripts/remote_code/make_pt_reference.py --check FILE.pt [--describe]

--out: torch.save({"base_model.model.resampler.modules_to_save.default.query": f32 [2, 3],
                   "base_model.model.llm.model.embed_tokens.modules_to_save.default.weight": bf16 [3, 2]})
       (values 0.5 * arange, deterministic), the layout cpmv's vpm_resampler_embedtokens.pt writer
       must produce; the file is byte-stable for a given archive name (the torch.save archive
       name is the file's stem; serialization_id is random, see --describe).
--check: torch.load(FILE, weights_only=True) (exit 1 if rejected), print each key, dtype, shape and
       whether the values equal the reference's for the reference keys.
--manual FILE.pt: write the same dict WITHOUT torch.save, with the byte layout described in
       manual_pt_bytes() (what a Rust writer must produce), then torch.load it (weights_only=True)
       and compare it byte for byte with torch.save's file (serialization_id copied from it).
--describe: list the zip entries (name, data offset, size, 64-byte alignment) and the pickle
       opcodes of data.pkl (pickletools.dis).
Environment: torch (scripts/requirements-peft.txt).
"""

from __future__ import annotations

import argparse
import io
import pickletools
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import torch

REFERENCE = {
    "base_model.model.resampler.modules_to_save.default.query":
        (0.5 * torch.arange(6, dtype=torch.float32)).reshape(2, 3),
    "base_model.model.llm.model.embed_tokens.modules_to_save.default.weight":
        (0.5 * torch.arange(6, dtype=torch.float32)).reshape(3, 2).to(torch.bfloat16),
}


# ---------------------------------------------------------------------------------------------
# torch.save's layout, written by hand (reference for cpmv's Rust writer)
# ---------------------------------------------------------------------------------------------
STORAGE = {torch.float32: ("FloatStorage", 4), torch.bfloat16: ("BFloat16Storage", 2),
           torch.float16: ("HalfStorage", 2)}


class _Pickle:
    """Pickle protocol 2 exactly as pickle.Pickler emits it for torch.save's dict of tensors
    (memo puts included, so the bytes match; an unpickler needs none of them)."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict = {}

    def put(self, key=None):
        i = len(self.memo)
        if key is not None:
            self.memo[key] = i
        else:
            self.memo[object()] = i
        self.out += (b"q" + bytes([i])) if i < 256 else (b"r" + struct.pack("<I", i))

    def get(self, key) -> bool:
        if key not in self.memo:
            return False
        i = self.memo[key]
        self.out += (b"h" + bytes([i])) if i < 256 else (b"j" + struct.pack("<I", i))
        return True

    def str_(self, s: str, memo_key=None):
        if memo_key is not None and self.get(memo_key):
            return
        b = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE
        self.put(memo_key)

    def int_(self, v: int):
        if 0 <= v <= 0xFF:
            self.out += b"K" + bytes([v])  # BININT1
        elif 0 <= v <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", v)  # BININT2
        elif -(2 ** 31) <= v < 2 ** 31:
            self.out += b"J" + struct.pack("<i", v)  # BININT
        else:
            n = (v.bit_length() + 8) // 8  # two's complement, little endian (pickle.encode_long)
            b = v.to_bytes(n, "little", signed=True)
            if b[-1] == 0xFF and (b[-2] & 0x80 if n > 1 else False):
                b = b[:-1]
            self.out += b"\x8a" + bytes([len(b)]) + b  # LONG1

    def global_(self, module: str, name: str):
        if self.get(("global", module, name)):
            return
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL
        self.put(("global", module, name))

    def int_tuple(self, t):
        if len(t) == 0:
            self.out += b")"  # EMPTY_TUPLE (not memoised)
            return
        if len(t) > 3:
            self.out += b"("  # MARK
        for v in t:
            self.int_(v)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(t), b"t")  # TUPLE1/2/3/TUPLE
        self.put()


def manual_pt_bytes(tensors: dict, archive: str, serialization_id: bytes) -> bytes:
    """The bytes torch.save(dict_of_tensors, f"{archive}.pt") writes (< 4 GiB, no zip64 entries)."""
    p = _Pickle()
    p.out += b"}"  # EMPTY_DICT
    p.put()
    items = list(tensors.items())
    if len(items) > 1:
        p.out += b"("  # MARK (pickle batches 1000 items per SETITEMS; one item: SETITEM, no MARK)
    storages = []
    for i, (key, t) in enumerate(items):
        cls, esize = STORAGE[t.dtype]
        t = t.contiguous()
        p.str_(key)
        p.global_("torch._utils", "_rebuild_tensor_v2")
        p.out += b"(("  # MARK (args), MARK (persistent id)
        p.str_("storage", memo_key="s:storage")
        p.global_("torch", cls)
        p.str_(str(i))
        p.str_("cpu", memo_key="s:cpu")
        p.int_(t.numel())
        p.out += b"t"  # TUPLE ('storage', <class>, key, 'cpu', numel)
        p.put()
        p.out += b"Q"  # BINPERSID
        p.int_(0)  # storage offset
        p.int_tuple(tuple(t.shape))
        p.int_tuple(tuple(t.stride()))
        p.out += b"\x89"  # NEWFALSE (requires_grad)
        p.global_("collections", "OrderedDict")
        p.out += b")R"  # EMPTY_TUPLE, REDUCE -> OrderedDict() (backward hooks)
        p.put()
        p.out += b"t"  # TUPLE (storage, offset, size, stride, requires_grad, hooks)
        p.put()
        p.out += b"R"  # REDUCE _rebuild_tensor_v2(*args)
        p.put()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        storages.append((str(i), raw))
    p.out += b"u" if len(items) > 1 else (b"s" if items else b"")  # SETITEMS / SETITEM
    p.out += b"."  # STOP

    records = [("data.pkl", bytes(p.out)), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", b"little")]
    records += [(f"data/{k}", raw) for k, raw in storages]
    records += [("version", b"3\n"), (".data/serialization_id", serialization_id)]

    out = bytearray()
    central = bytearray()
    for name, data in records:
        full = f"{archive}/{name}".encode()
        off = len(out)
        start = off + 30 + len(full) + 4  # data would start here with an empty FB extra field
        pad = (-start) % 64
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data) & 0xFFFFFFFF
        # local file header: version 0, flags 0x0808 (data descriptor, UTF-8), stored, time/date 0,
        # crc/sizes 0 (they follow in the data descriptor)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(full),
                           len(extra)) + full + extra
        assert len(out) % 64 == 0
        out += data
        out += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))  # data descriptor
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0, crc,
                               len(data), len(data), len(full), 0, 0, 0, 0, 0, off) + full
    cd_off, cd_size, n = len(out), len(central), len(records)
    out += central
    z64_off = len(out)
    # zip64 end of central directory record + locator (torch always writes them), then the EOCD
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, cd_size, cd_off)
    out += struct.pack("<IIQI", 0x07064B50, 0, z64_off, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_off, 0)
    return bytes(out)


def manual(path: Path) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / path.name
        torch.save(REFERENCE, ref_path)
        with zipfile.ZipFile(ref_path) as z:
            sid = z.read(f"{path.stem}/.data/serialization_id")
        want = ref_path.read_bytes()
    got = manual_pt_bytes(REFERENCE, path.stem, sid)
    path.write_bytes(got)
    print(f"wrote {path} ({len(got)} bytes) without torch.save; torch.save's file: {len(want)} bytes, "
          f"{'byte-identical' if got == want else 'DIFFERENT'}")
    rc = check(path)
    if got != want:
        i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), None)
        print(f"FAIL: first differing byte at {i}")
        return 1
    return rc


def describe(path: Path) -> None:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        print(f"{path}: {len(raw)} bytes, {len(z.infolist())} entries")
        for info in z.infolist():
            # local header: 30 bytes + name + extra; data follows
            off = info.header_offset
            n, e = struct.unpack("<HH", raw[off + 26: off + 30])
            data_off = off + 30 + n + e
            print(f"  {info.filename:<48} header@{off:<6} data@{data_off:<6} size {info.file_size:<6} "
                  f"method {info.compress_type} extra {e:<3} aligned64 {data_off % 64 == 0} "
                  f"crc {info.CRC:08x}")
        pkl = next(i.filename for i in z.infolist() if i.filename.endswith("/data.pkl"))
        print(f"--- {pkl}")
        pickletools.dis(io.BytesIO(z.read(pkl)), annotate=0)
        for i in z.infolist():
            if not i.filename.endswith("data.pkl"):
                print(f"--- {i.filename}: {z.read(i.filename)[:32]!r}")


def check(path: Path) -> int:
    try:
        sd = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        print(f"FAIL: torch.load(weights_only=True) rejected {path}: {type(e).__name__}: {e}")
        return 1
    if not isinstance(sd, dict):
        print(f"FAIL: {path} holds a {type(sd).__name__}, not a dict")
        return 1
    bad = 0
    for k, v in sd.items():
        ref = REFERENCE.get(k)
        same = "" if ref is None else (" equal to the reference" if (
            ref.dtype == v.dtype and ref.shape == v.shape and torch.equal(ref, v))
            else " DIFFERS from the reference")
        bad += "DIFFERS" in same
        print(f"  {k}: {str(v.dtype).replace('torch.', '')} {list(v.shape)} "
              f"stride {list(v.stride())} offset {v.storage_offset()}{same}")
    print("FAIL" if bad else "PASS")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path)
    g.add_argument("--check", type=Path)
    g.add_argument("--manual", type=Path)
    ap.add_argument("--describe", action="store_true")
    args = ap.parse_args(argv)
    if args.out:
        torch.save(REFERENCE, args.out)
        print(f"wrote {args.out}")
        path = args.out
        rc = check(path)
    elif args.manual:
        path = args.manual
        rc = manual(path)
    else:
        path = args.check
        rc = check(path)
    if args.describe:
        describe(path)
    return rc


if __name__ == "__main__":
    sys.exit(main())
