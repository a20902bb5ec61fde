#!/usr/bin/env python3
"""Checks, without a GPU, that every kernel launch of the block path's CUDA backend passes as many
arguments as the kernel takes, for each element type, and that every kernel is launched.

The CUDA backend (crates/block/src/cuda.rs) launches the kernels of crates/block/cuda/block.cu by
name through cudarc's launch builder, which cannot check argument lists at compile time; a
missing or extra argument would only show on a GPU. This reads the PTX that the `cuda` build
compiled (its `.entry` parameter lists) and counts the `.arg(` calls between each
`self.func(...)` and its `.launch(`. A launch in a helper that takes the kernel name as a
parameter is checked against every kernel name its callers pass.

usage: check_kernel_launches.py BLOCK_PTX [CUDA_RS]
"""
import re
import sys


def entries(ptx: str) -> dict:
    out = {}
    for m in re.finditer(r"\.visible \.entry (\w+)\((.*?)\)", ptx, re.S):
        out[m.group(1)] = m.group(2).count(".param")
    return out


def launches(src: str):
    """(kernel name or parameter name, argument count, enclosing fn) per launch."""
    for m in re.finditer(r'self\.func\((\w+|"\w+")\)\?;', src):
        seg = src[m.end():]
        seg = seg[: seg.index(".launch(")]
        n = seg.count(".arg(")
        # Alternatives of one argument (`match … { A => l.arg(..), B => l.arg(..) }`) count once.
        for block in re.findall(r"match [^{]*\{([^}]*)\}", seg):
            k = block.count(".arg(")
            if k > 1:
                n -= k - 1
        fn = re.findall(r"fn (\w+)\(", src[: m.start()])[-1]
        yield m.group(1), n, fn


def main() -> int:
    ptx_path = sys.argv[1]
    rs_path = sys.argv[2] if len(sys.argv) > 2 else "crates/block/src/cuda.rs"
    params = entries(open(ptx_path).read())
    src = open(rs_path).read()
    suffixes = sorted({k.rsplit("_", 1)[1] for k in params})
    bad, launched = [], set()
    for name, n, fn in launches(src):
        if name.startswith('"'):
            kernels = [name.strip('"')]
        else:
            kernels = re.findall(rf'self\.{fn}\(\s*"(\w+)"', src)
            if not kernels:
                bad.append(f"{fn}: launches kernel `{name}` but no caller names one")
        for k in kernels:
            launched.add(k)
            for sfx in suffixes:
                want = params.get(f"{k}_{sfx}")
                if want is None:
                    bad.append(f"{k}_{sfx}: not in the PTX")
                elif want != n:
                    bad.append(f"{k}_{sfx}: takes {want} arguments, launched with {n}")
    never = {k.rsplit("_", 1)[0] for k in params} - launched
    bad += [f"{k}: compiled, never launched" for k in sorted(never)]
    for line in bad:
        print(f"check_kernel_launches: {line}", file=sys.stderr)
    print(f"check_kernel_launches: {len(launched)} kernels x {len(suffixes)} types, "
          f"{'OK' if not bad else f'{len(bad)} problems'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
