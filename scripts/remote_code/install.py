#!/usr/bin/env python3
"""Copy the tiny MiniCPM-V remote code into model directories.

    python scripts/remote_code/install.py MODEL_DIR [MODEL_DIR ...] [--check]

Copies modeling_minicpmv.py, configuration_minicpm.py and tokenization_minicpmv_fast.py (the files
that config.json's and tokenizer_config.json's auto_map name) next to config.json, so
`AutoModel.from_pretrained(MODEL_DIR, trust_remote_code=True)` and AutoPeftModelForCausalLM load it.
--check: copy nothing; exit 1 if any file is missing or differs. Standard library only.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ["configuration_minicpm.py", "modeling_minicpmv.py", "tokenization_minicpmv_fast.py"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    bad = []
    for d in args.dirs:
        if not (d / "config.json").is_file():
            print(f"{d}: no config.json", file=sys.stderr)
            return 2
        for f in FILES:
            src, dst = HERE / f, d / f
            if args.check:
                if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
                    bad.append(str(dst))
            else:
                shutil.copyfile(src, dst)
    if bad:
        print("missing or out of date (run scripts/remote_code/install.py): " + ", ".join(bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
