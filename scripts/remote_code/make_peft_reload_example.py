#!/usr/bin/env python3
"""Write, with PEFT itself, the LoRA run layout that scripts/check_peft_reload.py checks.

    python scripts/remote_code/make_peft_reload_example.py --base MODEL_DIR --out DIR
           [--r 8] [--alpha 16] [--dropout 0.05] [--vpm] [--o-proj]
           [--task-type none|CAUSAL_LM] [--merged-dtype f32|bf16]

MODEL_DIR: a MiniCPM-V checkpoint with the remote code installed (scripts/remote_code/install.py).
The base is loaded with AutoModel.from_pretrained(MODEL_DIR, trust_remote_code=True) in float32,
wrapped with peft.get_peft_model and the reference LoraConfig (spec 8.3: target regex, modules_to_save
["embed_tokens", "resampler"] (+ "vpm"), no task_type unless --task-type CAUSAL_LM), every lora_B and
modules_to_save parameter is perturbed with seeded noise, then:

    DIR/adapter/  PeftModel.save_pretrained (adapter_config.json, adapter_model.safetensors, README.md)
                  + vpm_resampler_embedtokens.pt: torch.save of the modules_to_save copies under the
                    wrapped model's state-dict names (base_model.model.<m>.modules_to_save.default.*),
                    in the base checkpoint's dtypes
                  + the base's side files (tokenizer, processor, remote code, config.json), as cpmv
    DIR/merged/   merge_and_unload() as model.safetensors (+ config.json and side files)

Environment: scripts/requirements-peft.txt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel

TARGET = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
TARGET_O = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def copy_side_files(src: Path, dst: Path) -> None:
    """cpmv's copy_side_files: every plain file but config.json and weights."""
    for f in src.iterdir():
        n = f.name
        if (n == "config.json" or n.endswith((".safetensors", ".bin", ".pt", ".index.json"))
                or not f.is_file()):
            continue
        shutil.copyfile(f, dst / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--vpm", action="store_true")
    ap.add_argument("--o-proj", action="store_true")
    ap.add_argument("--task-type", choices=["none", "CAUSAL_LM"], default="none")
    ap.add_argument("--merged-dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()

    torch.manual_seed(0)
    base_dir = args.base.resolve()
    base_sd = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        base_sd.update(load_file(str(f)))
    model = AutoModel.from_pretrained(str(base_dir), trust_remote_code=True, dtype=torch.float32)
    mts = ["embed_tokens", "resampler"] + (["vpm"] if args.vpm else [])
    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, bias="none",
                      target_modules=TARGET_O if args.o_proj else TARGET,
                      layers_to_transform=None, modules_to_save=mts,
                      task_type=None if args.task_type == "none" else args.task_type)
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            z = torch.randn(p.shape, generator=g)
            if ".lora_B." in name:
                p.copy_(0.05 * z)
            elif ".modules_to_save." in name:
                p.add_(0.02 * z * max(float(p.abs().mean()), 1e-3))
                # the values a bf16 checkpoint run would hold
                src = name.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")
                p.copy_(p.to(base_sd[src].dtype).float())

    adapter_dir, merged_dir = args.out / "adapter", args.out / "merged"
    for d in (adapter_dir, merged_dir):
        if d.exists():
            shutil.rmtree(d)
    pm.save_pretrained(str(adapter_dir))
    pt = {}
    for k, v in pm.state_dict().items():
        if ".modules_to_save.default." in k:
            src = k.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")
            pt[k] = v.detach().to(base_sd[src].dtype).contiguous().clone()
    torch.save(pt, adapter_dir / "vpm_resampler_embedtokens.pt")
    copy_side_files(base_dir, adapter_dir)
    shutil.copyfile(base_dir / "config.json", adapter_dir / "config.json")

    merged = pm.merge_and_unload()
    dt = torch.float32 if args.merged_dtype == "f32" else torch.bfloat16
    sd = {k: v.detach().to(dt).contiguous().clone() for k, v in merged.state_dict().items()
          if k in base_sd}
    assert set(sd) == set(base_sd), sorted(set(sd) ^ set(base_sd))[:5]
    merged_dir.mkdir(parents=True)
    save_file(sd, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base_dir / "config.json").read_text())
    cfg["torch_dtype"] = "float32" if dt == torch.float32 else "bfloat16"
    (merged_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_side_files(base_dir, merged_dir)
    print(f"wrote {adapter_dir} ({len(pt)} tensors in the .pt) and {merged_dir} ({len(sd)} tensors)")


if __name__ == "__main__":
    main()
