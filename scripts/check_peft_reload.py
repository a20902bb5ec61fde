#!/usr/bin/env python3
"""Check that a MiniCPM-V LoRA run reloads with the official readme snippet (AutoPeftModelForCausalLM
+ vpm_resampler_embedtokens.pt) and reproduces the run's merged checkpoint.

    python scripts/check_peft_reload.py --adapter RUN_DIR --merged MERGED_DIR
                                        [--tol TOL] [--threads N] [--keep-modules-cache] [--allow-skip]

RUN_DIR: the LoRA run (adapter_config.json, adapter_model.safetensors, vpm_resampler_embedtokens.pt,
and whatever else it holds, e.g. tokenizer files); adapter_config.json's base_model_name_or_path must
be an absolute path to the base checkpoint, whose config.json auto_map names remote code found there
(scripts/remote_code/install.py). MERGED_DIR: the run merged into a checkpoint (loads with
AutoModel.from_pretrained(MERGED_DIR, trust_remote_code=True)).

The check runs in a fresh Python process (nothing pre-imported), by default with an empty temporary
Hugging Face modules cache (HF_MODULES_CACHE; --keep-modules-cache uses the environment's) and
HF_HUB_OFFLINE=1. There, the readme snippet is executed verbatim (SNIPPET below), then:
 1. `msg.unexpected_keys` must be empty, and the embedding matrix must not have been resized by
    AutoPeftModel's tokenizer logic.
 2. vpm_resampler_embedtokens.pt (torch.load with weights_only=True) must hold exactly the
    modules_to_save copies of the PEFT-wrapped model (base_model.model.<m>.modules_to_save.default.*),
    with their shapes; after the snippet every one of them must equal the file's value; they are then
    filled with NaN and the snippet's load_state_dict repeated: every value must be set again (no NaN
    left). The values must also equal the same modules in adapter_model.safetensors.
 3. PEFT's merge_and_unload() of the snippet's model is compared tensor by tensor with
    AutoModel.from_pretrained(MERGED_DIR, trust_remote_code=True) (the same default dtype rule as the
    snippet): max|diff| <= tol * max(1, max|w|) (+ eps(dtype) * max|w| for 16-bit) for LoRA-merged and
    modules_to_save tensors; every other tensor must be bit-identical.
 4. Logits on a deterministic packed row (scripts/check_peft.py build_case): the adapted model
    (upcast to float32) vs MERGED_DIR loaded in float32: max|diff| <= tol * max(1, max|logit|).
 5. The remote-code model of MERGED_DIR (float32) gives bit-identical logits to scripts/check_peft.py's
    build_model (the parity-fixture rendering) on the same weights.

--tol defaults to 1e-4 when every tensor of MERGED_DIR's safetensors is float32, else 2e-2 (as
scripts/check_peft.py). Exit 0 on success, 1 on a failed check; a missing package prints
"SKIP: <package>" and exits 2 (0 with --allow-skip). Environment: scripts/requirements-peft.txt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIRED = ["torch", "numpy", "safetensors", "transformers", "timm", "peft", "accelerate"]
HERE = Path(__file__).resolve().parent

# The official readme's reload snippet, verbatim (run with `path_to_adapter` set, after
# `import torch` and `from peft import AutoPeftModelForCausalLM`, as the readme does).
SNIPPET = '''\
model = AutoPeftModelForCausalLM.from_pretrained(path_to_adapter, device_map="auto", trust_remote_code=True).eval()
vpm_resampler_embedtokens_weight = torch.load(f"{path_to_adapter}/vpm_resampler_embedtokens.pt")
msg = model.load_state_dict(vpm_resampler_embedtokens_weight, strict=False)
'''
PT_NAME = "vpm_resampler_embedtokens.pt"
MTS_INFIX = ".modules_to_save.default."
PEFT_PREFIX = "base_model.model."


class CheckFailed(Exception):
    pass


def fmt(x: float) -> str:
    return f"{x:.3e}"


# ---------------------------------------------------------------------------------------------
# Child process: the snippet, then the checks
# ---------------------------------------------------------------------------------------------
def run_snippet(adapter: str) -> dict:
    """Executes SNIPPET verbatim in its own namespace; returns the namespace."""
    pre = sorted(m for m in sys.modules if m.startswith("transformers_modules"))
    if pre:
        raise CheckFailed(f"remote code already imported before the snippet: {pre}")
    import torch
    from peft import AutoPeftModelForCausalLM

    ns = {"torch": torch, "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM,
          "path_to_adapter": adapter}
    try:
        exec(compile(SNIPPET, "<readme snippet>", "exec"), ns)
    except Exception as e:  # noqa: BLE001
        import traceback

        tb = "".join(traceback.format_exception(e)[-6:])
        raise CheckFailed(f"the readme snippet raised {type(e).__name__}: {e}\n{tb}") from e
    return ns


def read_safetensors_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckFailed(f"{d}: no *.safetensors")
    for f in files:
        out.update(load_file(str(f)))
    return out


def child(args) -> None:
    adapter, merged_dir = Path(args.adapter).resolve(), Path(args.merged).resolve()
    failures: list[str] = []

    # ---- 0. the adapter config (before anything is imported) --------------------------------
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckFailed(f"{adapter}: no adapter_config.json")
    acfg = json.loads(cfg_path.read_text())
    base = acfg.get("base_model_name_or_path")
    print(f"adapter  {adapter}: task_type={acfg.get('task_type')!r} "
          f"auto_mapping={acfg.get('auto_mapping')!r}")
    print(f"adapter  base_model_name_or_path={base!r} modules_to_save={acfg.get('modules_to_save')!r}")
    if not base or not os.path.isabs(base):
        failures.append(f"adapter_config.json: base_model_name_or_path {base!r} is not an absolute "
                        f"path")
    elif not (Path(base) / "config.json").is_file():
        failures.append(f"adapter_config.json: base_model_name_or_path {base} has no config.json")
    if not (adapter / PT_NAME).is_file():
        raise CheckFailed(f"{adapter}: no {PT_NAME}")
    tok = (adapter / "tokenizer_config.json").is_file()
    print(f"adapter  tokenizer_config.json {'present: AutoPeftModel loads the tokenizer from the adapter dir' if tok else 'absent'}")

    # ---- 1. the snippet, verbatim -------------------------------------------------------------
    ns = run_snippet(str(adapter))
    import torch
    from peft.utils.other import ModulesToSaveWrapper
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    model, msg = ns["model"], ns["msg"]
    print(f"snippet  OK: {type(model).__name__} over {type(model.get_base_model()).__name__} "
          f"({type(model.get_base_model()).__module__}), dtype {model.get_base_model().dtype}, "
          f"device {next(model.parameters()).device}")
    print(f"snippet  load_state_dict: {len(msg.unexpected_keys)} unexpected, "
          f"{len(msg.missing_keys)} missing (keys not in the .pt, as expected)")
    if msg.unexpected_keys:
        failures.append(f"{len(msg.unexpected_keys)} unexpected key(s) in {PT_NAME}: "
                        f"{list(msg.unexpected_keys)[:10]}")
    base_cfg = json.loads((Path(base) / "config.json").read_text()) if base else {}
    emb_rows = model.get_base_model().get_input_embeddings().weight.shape[0]
    if base_cfg.get("vocab_size") and emb_rows != int(base_cfg["vocab_size"]):
        failures.append(f"embedding resized to {emb_rows} rows (config vocab_size "
                        f"{base_cfg['vocab_size']}): AutoPeftModel's tokenizer check resized it")

    # ---- 2. the .pt really sets the modules_to_save copies ------------------------------------
    pt = torch.load(adapter / PT_NAME, weights_only=True)
    if not isinstance(pt, dict):
        raise CheckFailed(f"{PT_NAME} holds a {type(pt).__name__}, not a dict")
    from collections import Counter

    dts = Counter(str(v.dtype).replace("torch.", "") for v in pt.values())
    print(f"pt       {PT_NAME}: {len(pt)} tensors [{', '.join(f'{k} x{n}' for k, n in sorted(dts.items()))}], "
          f"torch.load(weights_only=True) OK")
    params = dict(model.named_parameters())
    sd_now = model.state_dict()
    mts_params = {n for n in params if MTS_INFIX in n}
    pt_keys = set(pt)
    not_mts = sorted(k for k in pt_keys if MTS_INFIX not in k)
    if not_mts:
        failures.append(f"{len(not_mts)} key(s) of {PT_NAME} are not modules_to_save copies "
                        f"(want base_model.model.<module>.modules_to_save.default.*): {not_mts[:5]}")
    missing_mts = sorted(mts_params - pt_keys)
    if missing_mts:
        failures.append(f"{len(missing_mts)} modules_to_save parameter(s) not in {PT_NAME}: "
                        f"{missing_mts[:5]}")
    bad_shape = [f"{k}: {tuple(pt[k].shape)} vs {tuple(sd_now[k].shape)}" for k in sorted(pt_keys)
                 if k in sd_now and tuple(pt[k].shape) != tuple(sd_now[k].shape)]
    if bad_shape:
        failures.append(f"shape mismatch in {PT_NAME}: {bad_shape[:5]}")
    known = sorted(k for k in pt_keys if k in sd_now and k not in bad_shape)
    not_equal = [k for k in known
                 if not torch.equal(sd_now[k], pt[k].to(sd_now[k].dtype).to(sd_now[k].device))]
    if not_equal:
        failures.append(f"{len(not_equal)} tensor(s) differ from {PT_NAME} after the snippet: "
                        f"{not_equal[:5]}")
    fillable = [k for k in known if k in params and params[k].is_floating_point()]
    with torch.no_grad():
        for k in fillable:
            params[k].fill_(float("nan"))
    model.load_state_dict(pt, strict=False)
    still_nan = [k for k in fillable if torch.isnan(params[k]).any()]
    if still_nan:
        failures.append(f"{len(still_nan)} parameter(s) not set by load_state_dict({PT_NAME}): "
                        f"{still_nan[:5]}")
    # the same modules in adapter_model.safetensors (what PeftModel.from_pretrained loads)
    ad_file = adapter / "adapter_model.safetensors"
    if ad_file.is_file():
        from safetensors.torch import load_file

        ad = load_file(str(ad_file))
        diff_ad = []
        for k in known:
            ak = k.replace(MTS_INFIX, ".")
            if ak not in ad:
                diff_ad.append(f"{ak} (absent)")
            elif not torch.equal(ad[ak].to(sd_now[k].dtype), pt[k].to(sd_now[k].dtype)):
                diff_ad.append(ak)
        if diff_ad:
            failures.append(f"{len(diff_ad)} modules_to_save tensor(s) of {PT_NAME} differ from "
                            f"adapter_model.safetensors: {diff_ad[:5]}")
    if not failures:
        print(f"pt       every key is a modules_to_save copy, all {len(mts_params)} copies covered, "
              f"values set (NaN-filled, then reloaded): OK")
    if failures:
        raise CheckFailed("\n".join(failures))

    # ---- 3/4. merged checkpoint -----------------------------------------------------------------
    import copy

    merged_files = read_safetensors_dir(merged_dir)
    all_f32 = all(v.dtype == torch.float32 for v in merged_files.values())
    tol = args.tol if args.tol is not None else (1e-4 if all_f32 else 2e-2)
    mcfg = json.loads((merged_dir / "config.json").read_text())
    sys.path.insert(0, str(HERE))
    import check_peft as cp

    cp.fixture_module()
    ccfg = dict(mcfg)
    if "version" not in ccfg and ccfg.get("scale_emb") is not None:
        ccfg["version"] = 2.0  # the released 2.0 config has no version (spec 7.1)
    case = cp.build_case(ccfg)

    def logits_of(m):
        cp.set_inference_mode(m)
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        with torch.no_grad():
            return m(data=case).logits.float().cpu()

    adapted32 = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    adapted_logits = logits_of(adapted32)
    del adapted32
    merged32 = AutoModel.from_pretrained(str(merged_dir), trust_remote_code=True,
                                         dtype=torch.float32)
    merged_logits = logits_of(merged32)
    scale = max(1.0, float(adapted_logits.abs().max()))
    d_logit = float((merged_logits - adapted_logits).abs().max())
    print(f"logits   packed row {case['input_ids'].numel()} tokens, {case['tgt_sizes'].shape[0]} images; "
          f"max|merged - adapted| {fmt(d_logit)} (bound {fmt(tol * scale)}, tol {tol})")
    if not torch.isfinite(adapted_logits).all():
        failures.append("adapted model produced non-finite logits")
    if d_logit > tol * scale:
        failures.append(f"merged logits differ from the snippet model's: {fmt(d_logit)} > "
                        f"{fmt(tol * scale)}")

    # ---- 5. remote code == the fixture rendering ----------------------------------------------
    ref = cp.build_model(ccfg)
    cp.load_strict(ref, merged_files, "MERGED")
    ref_logits = cp.run_forward(ref, case)
    d_ref = float((ref_logits - merged_logits).abs().max())
    same = torch.equal(ref_logits, merged_logits)
    print(f"logits   remote code vs check_peft.build_model on MERGED (float32): "
          f"{'bit-identical' if same else 'max diff ' + fmt(d_ref)}")
    if not same:
        failures.append(f"remote-code logits differ from check_peft.build_model's: {fmt(d_ref)}")
    del ref, merged32

    # PEFT's merge of the snippet model vs MERGED_DIR loaded as the snippet loads a model
    lora_targets = {n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules()
                    if isinstance(m, LoraLayer)}
    mts_targets = [n.removeprefix(PEFT_PREFIX) for n, m in model.named_modules()
                   if isinstance(m, ModulesToSaveWrapper)]
    pm_merged = model.merge_and_unload()
    merged_native = AutoModel.from_pretrained(str(merged_dir), trust_remote_code=True)
    a_sd, b_sd = pm_merged.state_dict(), merged_native.state_dict()
    print(f"weights  merge_and_unload() dtype {pm_merged.dtype}; MERGED via AutoModel dtype "
          f"{merged_native.dtype}")
    if set(a_sd) != set(b_sd):
        raise CheckFailed(f"merge_and_unload() key set differs from MERGED: "
                          f"{sorted(set(a_sd) ^ set(b_sd))[:10]}")
    groups: dict[str, list] = {}
    bad = []
    for k in sorted(a_sd):
        mod = k.rsplit(".", 1)[0]
        if mod in lora_targets and k.endswith(".weight"):
            g = "lora-merged weights"
        else:
            g = next((f"modules_to_save {t}" for t in mts_targets
                      if k == t or k.startswith(t + ".")), None) or \
                ("unchanged " + ("llm" if k.startswith("llm.") else k.split(".", 1)[0]))
        a, b = a_sd[k].detach().cpu(), b_sd[k].detach().cpu()
        if a.shape != b.shape:
            bad.append(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        if g.startswith("unchanged") and a.dtype == b.dtype:
            d = 0.0 if torch.equal(a, b) else float((a.float() - b.float()).abs().max())
            lim = 0.0
        else:
            d = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
            wmax = float(b.float().abs().max()) if b.numel() else 0.0
            ulp = 0.0 if b.dtype == torch.float32 else float(torch.finfo(b.dtype).eps) * wmax
            lim = tol * max(1.0, wmax) + ulp
        if d > lim or d != d:
            bad.append(f"{k}: max diff {fmt(d)} > {fmt(lim)}")
        groups.setdefault(g, []).append(d)
    for g, ds in groups.items():
        print(f"weights  {g:<40} {len(ds):4d} tensors, max diff {fmt(max(ds))}")
    if bad:
        failures.append(f"{len(bad)} tensor(s) of merge_and_unload() differ from MERGED: "
                        + "; ".join(bad[:10]))
    if failures:
        raise CheckFailed("\n".join(failures))
    print(f"summary  snippet reload OK ({len(pt)} .pt tensors, {len(lora_targets)} LoRA modules, "
          f"modules_to_save {mts_targets}); merged checkpoint reproduces it (logits {fmt(d_logit)})")


# ---------------------------------------------------------------------------------------------
# Parent: package check, fresh process
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="LoRA run / adapter directory")
    ap.add_argument("--merged", required=True, help="merged checkpoint directory")
    ap.add_argument("--tol", type=float, default=None,
                    help="relative tolerance (default 1e-4 for an f32 merged checkpoint, else 2e-2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--keep-modules-cache", action="store_true",
                    help="use the environment's HF modules cache instead of an empty temporary one")
    ap.add_argument("--allow-skip", action="store_true",
                    help="exit 0 (SKIP) instead of 2 when a required package is missing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        try:
            child(args)
        except CheckFailed as e:
            print(f"FAIL: {e}")
            return 1
        print("PASS")
        return 0

    for p in (args.adapter, args.merged):
        if not Path(p).is_dir():
            print(f"FAIL: {p} is not a directory")
            return 1
    # look for the packages without importing them (the check itself needs a clean process)
    for mod in REQUIRED:
        if importlib.util.find_spec(mod) is None:
            print(f"SKIP: {mod}")
            return 0 if args.allow_skip else 2
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
           "--adapter", args.adapter, "--merged", args.merged, "--threads", str(args.threads)]
    if args.tol is not None:
        cmd += ["--tol", str(args.tol)]
    with tempfile.TemporaryDirectory(prefix="cpmv-hf-modules-") as tmp:
        if not args.keep_modules_cache:
            env["HF_MODULES_CACHE"] = tmp
            print(f"env      fresh process, empty HF_MODULES_CACHE={tmp}, HF_HUB_OFFLINE=1")
        else:
            print("env      fresh process, environment's HF modules cache, HF_HUB_OFFLINE=1")
        sys.stdout.flush()
        r = subprocess.run(cmd, env=env)
    if r.returncode not in (0, 1):
        print(f"FAIL: the check process exited with {r.returncode}")
        return 1
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
