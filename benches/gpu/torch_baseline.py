#!/usr/bin/env python3
"""PyTorch baseline for the GPU training benchmark: MiniCPM-V training steps the way a user runs them.

    python3 benches/gpu/torch_baseline.py --version 2.6 --mode lora [--weights fp32-amp|bf16]
        [--seq 2048 --samples 2 --slices 5 --slice-px 448 --warmup 2 --steps 5] [--out FILE]
    /work/pyenv/bin/python benches/gpu/torch_baseline.py --tiny --device cpu --check   # CPU self-test

It measures the seconds per optimiser step (forward, backward, grad-norm clip, AdamW step, zero_grad)
of the same model configurations and the same synthetic workload as cpmv's `train bench`
(benches/gpu/README.md), and prints one JSON object on stdout (also appended to --out as a line).

The model is a stand-in with the real architecture and sizes, built from stock parts so that PEFT
regexes and module names match the reference (`vpm`, `resampler`, `llm`; spec section 7):
  * vpm: transformers' Idefics2VisionTransformer (SigLIP-so400m; 2.5/2.6 use exactly it, 27 layers;
    2.0's timm ViT has the compute of 26 such layers);
  * resampler: spec section 7.3 (plus the 8x8 query position table of 2.0, section 7.1);
  * llm: transformers' LlamaForCausalLM with the dims of MiniCPM-2.4B (2.0, MiniCPM's scalings left
    out: same compute), Llama-3-8B (2.5) and Qwen2-7B (2.6; attention_bias=True also gives o_proj a
    bias, 3584 extra parameters, irrelevant for speed).
How it runs, chosen to be what a single-GPU user of the official scripts gets:
  * --weights fp32-amp (default) = HF Trainer --bf16 without DeepSpeed: fp32 master parameters,
    forward under torch.autocast(bfloat16), backward outside it; --weights bf16 = parameters
    stored in bf16, no autocast (the leaner variant);
  * attention: PyTorch SDPA (attn_implementation="sdpa") in vision tower and LLM; packed samples
    get a 4-D additive block-causal mask (as LLaMA-Factory / ms-swift packing without flash-attn
    varlen), positions restart at 0 for every sample; --check verifies the mask is honoured;
  * gradient checkpointing (use_reentrant=False) on the LLM and the vision tower, as
    finetune_ds.sh / finetune_lora.sh; the JSON reports how often one layer ran in the first step
    (2 = recomputed);
  * torch.optim.AdamW(lr 1e-5, betas (0.9, 0.95), wd 0.1, fused on CUDA), clip_grad_norm_ 1.0;
  * modes: full (everything trainable), lora (PEFT, r=alpha=64, q/k/v/o of the LLM, vpm and
    resampler in modules_to_save = finetune_lora.sh with tune_vision), lora-embed (+ embed_tokens).
Weights are random (built directly on the device); throughput does not depend on their values.
peak_mem_bytes is torch.cuda.max_memory_allocated() over the timed steps (model, data and AdamW
state resident; the same window as cpmv's `train bench`), or up to the failure; total_params counts every parameter the process holds, including PEFT's
frozen originals of modules_to_save.
"""
import argparse, contextlib, functools, gc, json, math, re, sys, time, traceback

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

TF_VERSION = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
PROMPT = 32  # unsupervised prompt tokens at the start of every sample

# (llm: vocab, hidden, layers, heads, kv heads, intermediate, eps, theta, qkv bias), Q, vision layers
VERSIONS = {
    "2.0": (dict(vocab=122753, hidden=2304, layers=40, heads=36, kv=36, inter=5760, eps=1e-5, theta=1e4, bias=False), 64, 26),
    "2.5": (dict(vocab=128256, hidden=4096, layers=32, heads=32, kv=8, inter=14336, eps=1e-5, theta=5e5, bias=False), 96, 27),
    "2.6": (dict(vocab=151666, hidden=3584, layers=28, heads=28, kv=4, inter=18944, eps=1e-6, theta=1e6, bias=True), 64, 27),
}
VISION = dict(hidden=1152, inter=4304, heads=16)
TINY_LLM = dict(vocab=1000, hidden=256, layers=2, heads=4, kv=2, inter=512)
TINY_VISION = dict(hidden=64, inter=128, heads=2, layers=2)
LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


def sincos_2d(dim, h, w):
    """Spec 7.4: pos(r, c) = [e1(c), e1(r)], e1(p) = [sin(p w_k), cos(p w_k)], w_k = 1e4^(-k/(dim/4))."""
    k = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float32) / k)

    def e1(p):
        a = p.float()[:, None] * omega[None, :]
        return torch.cat([a.sin(), a.cos()], dim=1)

    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([e1(c.flatten()), e1(r.flatten())], dim=1)  # [h*w, dim], row-major


class Resampler(nn.Module):
    """Spec 7.3: ln_post(MHA(ln_q(query) [+ pos], ln_kv(kv_proj(x)) + key pos, ln_kv(kv_proj(x)))) @ proj."""

    def __init__(self, q, dim, kv_dim, grid, query_pos):
        super().__init__()
        self.query = nn.Parameter(0.02 * torch.randn(q, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, max(1, dim // 128))
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.register_buffer("key_pos", sincos_2d(dim, grid, grid), persistent=False)
        side = math.isqrt(q)
        self.register_buffer("pos_embed", sincos_2d(dim, side, side) if query_pos else None, persistent=False)

    def forward(self, x):  # [N, L, kv_dim] -> [N, Q, dim]
        n = x.shape[0]
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # [L, N, dim]
        q = self.ln_q(self.query)
        if self.pos_embed is not None:  # 2.0 only (spec 7.1)
            q = q + self.pos_embed.to(q.dtype)
        q = q.unsqueeze(1).expand(-1, n, -1)
        # need_weights left at its default (True), as the reference calls it
        out = self.attn(q, kv + self.key_pos.to(kv.dtype).unsqueeze(1), kv)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


class MiniCPMVBench(nn.Module):
    def __init__(self, version, tiny, grid):
        super().__init__()
        llm, q, vlayers = VERSIONS[version]
        vis = dict(VISION, layers=vlayers)
        if tiny:
            llm, q, vis = dict(llm, **TINY_LLM), 16, TINY_VISION
        self.query_num = q
        vcfg = Idefics2VisionConfig(
            hidden_size=vis["hidden"], intermediate_size=vis["inter"], num_hidden_layers=vis["layers"],
            num_attention_heads=vis["heads"], patch_size=14, image_size=980, hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6, attn_implementation="sdpa")
        try:
            self.vpm = Idefics2VisionTransformer(vcfg)
        except (KeyError, ValueError):  # old transformers: no SDPA class for the Idefics2 vision tower
            vcfg._attn_implementation = "eager"
            self.vpm = Idefics2VisionTransformer(vcfg)
        self.resampler = Resampler(q, llm["hidden"], vis["hidden"], grid, query_pos=version == "2.0")
        lcfg = LlamaConfig(
            vocab_size=llm["vocab"], hidden_size=llm["hidden"], num_hidden_layers=llm["layers"],
            num_attention_heads=llm["heads"], num_key_value_heads=llm["kv"], intermediate_size=llm["inter"],
            rms_norm_eps=llm["eps"], rope_theta=llm["theta"], attention_bias=llm["bias"],
            max_position_embeddings=32768, tie_word_embeddings=False, use_cache=False,
            attn_implementation="sdpa")
        self.llm = LlamaForCausalLM(lcfg)

    def forward(self, input_ids, pixel_values, patch_mask, image_pos, position_ids, attention_mask, labels=None):
        feats = self.vpm(pixel_values=pixel_values, patch_attention_mask=patch_mask)[0]  # [N, P, 1152]
        feats = self.resampler(feats)  # [N, Q, D]
        emb = self.llm.get_input_embeddings()(input_ids)  # [1, T, D]
        rows = torch.zeros_like(image_pos)
        emb = emb.index_put((rows, image_pos), feats.reshape(-1, feats.shape[-1]).to(emb.dtype))
        return self.llm(inputs_embeds=emb, position_ids=position_ids, attention_mask=attention_mask,
                        labels=labels, use_cache=False)


def block_causal_mask(segment, dtype):
    """[1, 1, T, T] mask: causal within a sample, blocked across samples."""
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(
        len(segment), len(segment), dtype=torch.bool, device=segment.device).tril()
    if TF_VERSION < (4, 41):  # 4.38-4.40 took custom 4-D masks as 1 = attend, 0 = blocked
        return allowed.to(dtype)[None, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]  # additive, max == 0


def make_batch(args, vocab, q, dev, cdtype):
    """One packed row: per sample PROMPT prompt tokens, slices*Q placeholders, then supervised text.
    Labels use HF's convention (the model shifts them): every token from the first one after the
    placeholders up to the sample's second-to-last is trained to predict its successor."""
    t, s = args.seq, args.samples
    n = t // s
    if PROMPT + args.slices * q + 2 > n:
        sys.exit(f"--seq {t} does not hold {s} samples of {PROMPT} + {args.slices}x{q} + text tokens")
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, vocab, (1, t), generator=g)
    labels = torch.full((1, t), -100)
    # tokens left over when seq is not a multiple of samples: padding, own segment, no loss
    image_pos, segment = [], (torch.arange(t) // n).clamp(max=s)
    for i in range(s):
        a = i * n + PROMPT
        b = a + args.slices * q
        ids[0, a:b] = 0  # placeholder id; the rows are overwritten by vision features
        image_pos.append(torch.arange(a, b))
        labels[0, b + 1:(i + 1) * n] = ids[0, b + 1:(i + 1) * n]
    side = args.slice_px // 14
    pixels = torch.randn(s * args.slices, 3, args.slice_px, args.slice_px, generator=g)
    return dict(
        input_ids=ids.to(dev), labels=labels.to(dev),
        pixel_values=pixels.to(dev, cdtype),  # bf16 unless a pure-fp32 check
        patch_mask=torch.ones(s * args.slices, side, side, dtype=torch.bool, device=dev),
        image_pos=torch.cat(image_pos).unsqueeze(0).to(dev),
        position_ids=torch.where(segment < s, torch.arange(t) % n, 0).unsqueeze(0).to(dev),
        attention_mask=block_causal_mask(segment.to(dev), cdtype))


def enable_checkpointing(module):
    kw = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers 5.x name
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    else:  # transformers < ~4.46: the Idefics2 vision tower was a plain nn.Module
        fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing, m._gradient_checkpointing_func = True, fn


def build(args, dev, weights):
    wdtype = torch.bfloat16 if weights == "bf16" else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(wdtype)
    try:
        with torch.device(dev):
            model = MiniCPMVBench(args.version, args.tiny, args.slice_px // 14)
    finally:
        torch.set_default_dtype(old)
    for p in model.parameters():  # buffers (rotary inv_freq, sin-cos tables) stay fp32
        if p.dtype != wdtype:
            p.data = p.data.to(wdtype)
    info = dict(vocab=model.llm.config.vocab_size, q=model.query_num,
                attn={"vpm": model.vpm.config._attn_implementation, "llm": model.llm.config._attn_implementation})
    enable_checkpointing(model.llm)
    enable_checkpointing(model.vpm)
    if args.mode != "full":
        from peft import LoraConfig, get_peft_model
        model.llm.enable_input_require_grads()
        save = ["resampler", "vpm"] + (["embed_tokens"] if args.mode == "lora-embed" else [])
        cfg = LoraConfig(r=64, lora_alpha=64, lora_dropout=0.05, bias="none",
                         target_modules=LORA_TARGETS, modules_to_save=save)
        model = get_peft_model(model, cfg)
    model.train()
    return model, info


def count_layer_calls(model):
    """Counts the calls of layer 0's MLP in the LLM and in the (active) vision tower. Wraps `forward`
    on the instance (module hooks are not re-run by torch's non-reentrant recompute); call the
    returned function to undo."""
    counts, wrapped = {"llm": 0, "vpm": 0}, []
    for name, m in model.named_modules():
        for tower, suffix in (("llm", "model.layers.0.mlp"), ("vpm", "encoder.layers.0.mlp")):
            if name.endswith(suffix) and tower in name.split("."):
                def fwd(*a, _f=m.forward, _t=tower, **k):
                    counts[_t] += 1
                    return _f(*a, **k)
                m.forward = fwd
                wrapped.append(m)

    def undo():
        for m in wrapped:
            del m.forward
    return counts, undo


def sample_loss(logits, labels, a, b):
    lg, lb = logits[0, a:b - 1].float(), labels[0, a + 1:b]
    return F.cross_entropy(lg, lb, ignore_index=-100).item()


def check(args, dev):
    """Packed-mask check (sample 2 alone == sample 2 inside the packed row) and recompute check."""
    res, ok = {"check": True, "transformers": transformers.__version__}, True
    for weights, tol in (("fp32", 1e-3), (args.weights, 1e-3 if args.weights == "fp32" else 2e-2)):
        model, info = build(args, dev, "bf16" if weights == "bf16" else "fp32")
        amp = weights == "fp32-amp"
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        cdtype = torch.bfloat16 if weights != "fp32" else torch.float32
        b = make_batch(args, info["vocab"], info["q"], dev, cdtype)
        n, per = args.seq // args.samples, args.slices * info["q"]
        model.eval()
        with torch.no_grad(), ctx:
            packed = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            causal = block_causal_mask(torch.zeros(args.seq, dtype=torch.long, device=dev), cdtype)
            leaky = model(**{k: v for k, v in b.items() if k not in ("labels", "attention_mask")},
                          attention_mask=causal).logits
            alone = dict(
                input_ids=b["input_ids"][:, n:2 * n], position_ids=b["position_ids"][:, n:2 * n],
                pixel_values=b["pixel_values"][args.slices:2 * args.slices],
                patch_mask=b["patch_mask"][args.slices:2 * args.slices],
                image_pos=b["image_pos"][:, per:2 * per] - n,
                attention_mask=block_causal_mask(torch.zeros(n, dtype=torch.long, device=dev), cdtype))
            single = model(**alone).logits
        lp, lc = sample_loss(packed, b["labels"], n, 2 * n), sample_loss(leaky, b["labels"], n, 2 * n)
        la = sample_loss(single, b["labels"][:, n:2 * n], 0, n)
        # equal within tol, and a leak across samples would have moved it 10x more than packing did
        good = abs(lp - la) <= tol and abs(lc - la) > 10 * max(abs(lp - la), 1e-4)
        res[weights] = dict(packed=lp, alone=la, causal_only=lc, diff=abs(lp - la), tol=tol, ok=good)
        ok &= good
        model.train()
        counts, undo = count_layer_calls(model)
        with ctx:
            loss = model(**b).loss
        loss.backward()
        undo()
        res[weights]["layer0_calls"] = counts  # forward + recompute = 2 with checkpointing
        ok &= counts == {"llm": 2, "vpm": 2}
        del model, loss
    res["ok"] = bool(ok)
    return res


def train(args, dev, res):
    model, info = build(args, dev, args.weights)
    res["attn"] = info["attn"]
    amp = args.weights == "fp32-amp"
    b = make_batch(args, info["vocab"], info["q"], dev, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = sum(p.numel() for p in params)
    res["total_params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        with ctx():
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    counts, undo = count_layer_calls(model)
    losses = [step()]
    undo()
    res["layer0_calls"] = counts
    for _ in range(args.warmup - 1):
        losses.append(step())
    sync()
    if dev.type == "cuda":  # the peak of the timed (steady-state) steps, as cpmv's `train bench`
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    sync()
    res["step_s"] = (time.perf_counter() - t0) / args.steps
    res["tokens_per_s"] = args.seq / res["step_s"]
    res["loss_first"], res["loss_last"] = losses[0].item(), losses[-1].item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", choices=sorted(VERSIONS), default="2.6")
    ap.add_argument("--mode", choices=["full", "lora", "lora-embed"], default="lora")
    ap.add_argument("--weights", choices=["fp32-amp", "bf16"], default="fp32-amp")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--slices", type=int, default=5)
    ap.add_argument("--slice-px", type=int, default=448)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny dims for CPU testing")
    ap.add_argument("--check", action="store_true", help="run the packed-mask and recompute checks only")
    ap.add_argument("--out", help="also append the JSON line to this file")
    args = ap.parse_args()
    if args.slice_px % 14:
        sys.exit("--slice-px must be a multiple of 14")
    args.warmup = max(args.warmup, 1)  # the first step is never timed (it allocates optimiser state)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.check:
        res = check(args, dev)
        print(json.dumps(res), flush=True)
        sys.exit(0 if res["ok"] else 1)
    res = {"impl": "pytorch", "version": args.version, "mode": args.mode, "weights": args.weights,
           "seq": args.seq, "samples": args.samples, "slices": args.slices, "slice_px": args.slice_px,
           "steps": args.steps, "tiny": args.tiny, "step_s": None, "tokens_per_s": None,
           "peak_mem_bytes": None, "peak_reserved_bytes": None, "trainable_params": None,
           "total_params": None, "loss_first": None, "loss_last": None,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "error": None}
    rc = 0
    try:
        train(args, dev, res)
    except torch.cuda.OutOfMemoryError as e:
        res["error"] = "OOM: " + str(e).strip().split("\n")[0][:300]
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the driver goes on
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        rc = 1
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    line = json.dumps(res)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
