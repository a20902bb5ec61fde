# Self-contained Hugging Face remote code for cpmv's tiny MiniCPM-V test checkpoints.
#
# Copied next to config.json (auto_map: `modeling_minicpmv.MiniCPMV` for AutoModel and
# AutoModelForCausalLM) by scripts/remote_code/install.py. transformers copies it into its modules
# cache (transformers_modules.<dir>.<hash>.modeling_minicpmv), so it imports only torch, numpy,
# transformers and timm -- never this repository's scripts.
#
# The math is scripts/fixtures/gen_model_fixtures.py's (the PyTorch rendering the parity fixtures
# come from), sized from config.json like scripts/check_peft.py's build_model; the module tree and
# parameter names are those of the released checkpoints (project spec section 7.5):
#   llm.model.*, llm.lm_head.weight, vpm.*, resampler.*
# scripts/check_peft_reload.py checks that this model's logits equal build_model's on the same weights.
"""MiniCPM-V 2.0 / 2.5 / 2.6 (tiny-test rendering) as a transformers PreTrainedModel."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from transformers import GenerationMixin, Idefics2VisionConfig, LlamaConfig, PreTrainedModel, Qwen2Config
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from .configuration_minicpm import MiniCPMVConfig


# ---------------------------------------------------------------------------------------------
# Shared helpers (gen_model_fixtures.py)
# ---------------------------------------------------------------------------------------------
def sincos_2d(embed_dim: int, h: int, w: int) -> np.ndarray:
    """2-D sin-cos table [h*w, D] (spec 7.4), float32 NumPy, row-major; first half = column."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows = np.arange(h, dtype=np.float32)
    cols = np.arange(w, dtype=np.float32)
    cc, rr = np.meshgrid(cols, rows)
    return np.concatenate([one_d(embed_dim // 2, cc), one_d(embed_dim // 2, rr)], axis=1)


def navit_bucket(n, side: int) -> torch.Tensor:
    """Reference bucketing (n an integer tensor, so the arange step is f32(1/n))."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.arange(0, 1 - 1e-6, 1 / n)
    return torch.bucketize(coords, boundaries, right=True)


def to_strip(img: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> patch strip [3, p, (H/p)*(W/p)*p] (spec section 5)."""
    c, h, w = img.shape
    hp, wp = h // patch, w // patch
    x = img.reshape(c, hp, patch, wp, patch).permute(0, 2, 1, 3, 4)
    return x.reshape(c, patch, hp * wp * patch).contiguous()


def vision_cfg(config) -> dict:
    ver = config.minicpmv_version()
    d = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "patch_size": 14,
         "image_size": 384 if ver == "v2_0" else 980}
    d.update(config.vision_config or {})
    return d


# ---------------------------------------------------------------------------------------------
# MiniCPM-2.4B style LLM (V2.0) from Llama building blocks
# ---------------------------------------------------------------------------------------------
class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, idx: int, residual_scale: float):
        super().__init__()
        self.self_attn = LlamaAttention(config, idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = residual_scale

    def forward(self, h, position_embeddings, mask):
        a, _ = self.self_attn(self.input_layernorm(h), position_embeddings=position_embeddings,
                              attention_mask=mask)
        h = h + a * self.residual_scale
        h = h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale
        return h


class MiniCPMModel(nn.Module):
    def __init__(self, config: LlamaConfig, scale_depth: float):
        super().__init__()
        scale = scale_depth / math.sqrt(config.num_hidden_layers)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [MiniCPMDecoderLayer(config, i, scale) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, inputs_embeds, position_ids):
        n = inputs_embeds.shape[1]
        dt = inputs_embeds.dtype
        mask = torch.full((n, n), torch.finfo(dt).min, dtype=dt,
                          device=inputs_embeds.device).triu(1)[None, None]
        pe = self.rotary_emb(inputs_embeds, position_ids)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, pe, mask)
        return self.norm(h)


class MiniCPMForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, scale_emb, scale_depth, dim_model_base):
        super().__init__()
        self.config = config
        self.scale_emb = scale_emb
        self.logit_div = config.hidden_size / dim_model_base
        self.model = MiniCPMModel(config, scale_depth)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, inputs_embeds, position_ids):
        h = self.model(inputs_embeds, position_ids)
        return self.lm_head(h / self.logit_div).float()


# ---------------------------------------------------------------------------------------------
# Resampler (2.0: stored query pos + no mask; 2.5/2.6: no query pos + key padding mask)
# ---------------------------------------------------------------------------------------------
class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, query_pos: bool):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        if query_pos:
            self.pos_embed = nn.Parameter(torch.zeros(num_queries, embed_dim))
        else:
            self.pos_embed = None
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // 128)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.embed_dim = embed_dim

    def forward_v20(self, x: torch.Tensor, tgt: tuple) -> torch.Tensor:
        """x [1, h*w, kv_dim] -> [1, Q, D]."""
        key_pos = torch.from_numpy(sincos_2d(self.embed_dim, *tgt)).to(x.dtype).to(x.device)
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)
        qq = q.unsqueeze(1) + self.pos_embed.unsqueeze(1)
        out = self.attn(qq, kv + key_pos.unsqueeze(1), kv)[0]
        out = self.ln_post(out.permute(1, 0, 2))
        return out @ self.proj

    def forward_batched(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x [B, L_max, kv_dim] -> [B, Q, D]; keys beyond h*w are masked."""
        bs, l_max, _ = x.shape
        patch_len = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        key_padding_mask = torch.zeros((bs, l_max), dtype=torch.bool)
        pos = torch.zeros((bs, l_max, self.embed_dim), dtype=x.dtype)
        for i in range(bs):
            h, w = int(tgt_sizes[i, 0]), int(tgt_sizes[i, 1])
            pos[i, : h * w] = torch.from_numpy(sincos_2d(self.embed_dim, h, w))
            key_padding_mask[i, int(patch_len[i]):] = True
        pos, key_padding_mask = pos.to(x.device), key_padding_mask.to(x.device)
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)
        qq = q.unsqueeze(1).repeat(1, bs, 1)
        out = self.attn(qq, kv + pos.permute(1, 0, 2), kv, key_padding_mask=key_padding_mask)[0]
        out = self.ln_post(out.permute(1, 0, 2))
        return out @ self.proj


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "model"  # as the released classes (Qwen2/Llama PreTrainedModel)
    supports_gradient_checkpointing = False
    _no_split_modules = ["MiniCPMDecoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer",
                         "Idefics2EncoderLayer", "Block", "Resampler"]
    _supports_sdpa = False
    _supports_flash_attn = False


class MiniCPMV(MiniCPMVPreTrainedModel, GenerationMixin):
    """llm + vpm + resampler, parameter names as the released checkpoints.

    forward(data) takes the packed-row dict of scripts/fixtures/gen_model_fixtures.py:
    input_ids [L], position_ids [L], sample_lens [S], image_bound [N, 2] (absolute row positions),
    image_sample [N], tgt_sizes [N, 2] (patches), pixel_values.{k} [3, H, W] (normalised), and
    optionally labels [L]; returns CausalLMOutputWithPast(loss, logits [L, vocab] float32)."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        ver = config.minicpmv_version()
        self.ver = ver
        vc = vision_cfg(config)
        hidden = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        v_hidden, v_layers = int(vc["hidden_size"]), int(vc["num_hidden_layers"])
        v_heads, v_inter = int(vc["num_attention_heads"]), int(vc["intermediate_size"])
        self.patch = int(vc["patch_size"])
        if int(getattr(config, "patch_size", self.patch)) != self.patch:
            raise ValueError(f"config.json: patch_size {config.patch_size} != "
                             f"vision_config.patch_size {self.patch}")
        self.side = int(vc["image_size"]) // self.patch
        drop_last = bool(config.drop_vision_last_layer)
        self.query_num = int(config.query_num)
        self.scale_emb = getattr(config, "scale_emb", None) or 1
        if config.tie_word_embeddings:
            raise ValueError("config.json: tie_word_embeddings true is not a MiniCPM-V layout")
        rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
        common = dict(vocab_size=int(config.vocab_size), hidden_size=hidden,
                      intermediate_size=int(config.intermediate_size), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=int(config.num_key_value_heads),
                      rms_norm_eps=float(config.rms_norm_eps), rope_parameters=rope,
                      hidden_act=config.hidden_act or "silu", tie_word_embeddings=False,
                      bos_token_id=getattr(config, "bos_token_id", None),
                      eos_token_id=getattr(config, "eos_token_id", None))
        mpe = getattr(config, "max_position_embeddings", None)
        if ver == "v2_0":
            lc = LlamaConfig(**common, max_position_embeddings=int(mpe or 4096),
                             attention_bias=bool(getattr(config, "attention_bias", False)))
            lc._attn_implementation = "eager"
            self.llm = MiniCPMForCausalLM(lc, self.scale_emb,
                                          getattr(config, "scale_depth", None) or 1,
                                          getattr(config, "dim_model_base", None) or 1)
            vpm = VisionTransformer(
                img_size=int(vc["image_size"]), patch_size=self.patch, embed_dim=v_hidden,
                depth=v_layers, num_heads=v_heads, mlp_ratio=(v_inter + 0.5) / v_hidden,
                class_token=False, global_pool="map", num_classes=0,
                dynamic_img_size=True, dynamic_img_pad=True)
            vpm.attn_pool = nn.Identity()
            if drop_last:
                vpm.blocks = vpm.blocks[:-1]
            for blk in vpm.blocks:
                blk.attn.fused_attn = False  # eager attention, as the fixtures
            self.vpm = vpm
            self.resampler = Resampler(self.query_num, hidden, v_hidden, query_pos=True)
        else:
            if ver == "v2_5":
                lc = LlamaConfig(**common, max_position_embeddings=int(mpe or 8192),
                                 attention_bias=bool(getattr(config, "attention_bias", False)))
                lc._attn_implementation = "eager"
                self.llm = LlamaForCausalLM(lc)
            else:
                lc = Qwen2Config(**common, max_position_embeddings=int(mpe or 32768),
                                 use_sliding_window=bool(getattr(config, "use_sliding_window", False)),
                                 sliding_window=int(getattr(config, "sliding_window", None) or 131072),
                                 max_window_layers=int(getattr(config, "max_window_layers", None)
                                                       or layers))
                lc._attn_implementation = "eager"
                self.llm = Qwen2ForCausalLM(lc)
            ivc = Idefics2VisionConfig(hidden_size=v_hidden, intermediate_size=v_inter,
                                       num_hidden_layers=v_layers, num_attention_heads=v_heads,
                                       num_channels=3, image_size=int(vc["image_size"]),
                                       patch_size=self.patch,
                                       hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"),
                                       layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
                                       attention_dropout=0.0)
            ivc._attn_implementation = "eager"
            self.vpm = Idefics2VisionTransformer(ivc)
            if drop_last:
                self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
            self.resampler = Resampler(self.query_num, hidden, v_hidden, query_pos=False)
        self.post_init()

    # -- embeddings (spec 8.3, issue #168: AutoPeftModel calls these) ---------------------------
    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.lm_head

    def set_output_embeddings(self, value):
        self.llm.lm_head = value

    # _init_weights: PreTrainedModel's. Every persistent tensor comes from model.safetensors; the
    # default also recomputes the non-persistent rotary inv_freq buffers (created on the meta
    # device by from_pretrained), including the 2.0 LLM's, which is not a PreTrainedModel.

    # -- vision --------------------------------------------------------------------------------
    def vision_v20(self, pixel_values):
        feats = []
        for img in pixel_values:
            h, w = math.ceil(img.shape[1] / self.patch), math.ceil(img.shape[2] / self.patch)
            x = self.vpm.forward_features(img.unsqueeze(0))
            feats.append(self.resampler.forward_v20(x, (h, w))[0])
        return torch.stack(feats)

    def vision_position_ids(self, tgt_sizes: torch.Tensor, l_max: int) -> torch.Tensor:
        bs = tgt_sizes.shape[0]
        pos = torch.zeros((bs, l_max), dtype=torch.long)
        for i in range(bs):
            if self.ver == "v2_5":
                # 2.5 quirk (spec 7.2): every position valid, one row of L_max patches
                mask = torch.ones((1, l_max), dtype=torch.bool)
                nb_h, nb_w = mask[:, 0].sum(), mask[0].sum()
                n_valid = l_max
            else:
                nb_h, nb_w = tgt_sizes[i, 0].cpu(), tgt_sizes[i, 1].cpu()
                n_valid = int(nb_h * nb_w)
            bh, bw = navit_bucket(nb_h, self.side), navit_bucket(nb_w, self.side)
            ids = (bh[:, None] * self.side + bw).flatten()
            pos[i, :n_valid] = ids
        return pos

    def vision_batched(self, pixel_values, tgt_sizes):
        strips = [to_strip(p, self.patch) for p in pixel_values]
        l_max = max(s.shape[-1] // self.patch for s in strips)
        batch = torch.zeros((len(strips), 3, self.patch, l_max * self.patch),
                            dtype=strips[0].dtype, device=strips[0].device)
        for i, s in enumerate(strips):
            batch[i, :, :, : s.shape[-1]] = s
        pos_ids = self.vision_position_ids(tgt_sizes, l_max).to(batch.device)
        emb = self.vpm.embeddings.patch_embedding(batch).flatten(2).transpose(1, 2)
        h = emb + self.vpm.embeddings.position_embedding(pos_ids)
        mask = None
        if self.ver == "v2_6":
            valid = torch.zeros((len(strips), l_max), dtype=torch.bool, device=h.device)
            for i in range(len(strips)):
                valid[i, : int(tgt_sizes[i, 0] * tgt_sizes[i, 1])] = True
            if not bool(valid.all()):
                mask = torch.zeros((len(strips), 1, l_max, l_max), dtype=h.dtype, device=h.device)
                mask.masked_fill_(~valid[:, None, None, :], torch.finfo(h.dtype).min)
        for layer in self.vpm.encoder.layers:
            h = layer(h, mask)
        h = self.vpm.post_layernorm(h)
        return self.resampler.forward_batched(h, tgt_sizes)

    # -- packed-row forward --------------------------------------------------------------------
    def forward(self, data=None, input_ids=None, **kwargs):
        if data is None and isinstance(input_ids, dict):  # PeftModelForCausalLM passes input_ids=
            data = input_ids
        if data is None:
            raise ValueError("MiniCPMV.forward needs the packed-row dict `data` (see the class doc)")
        dev = self.llm.lm_head.weight.device
        dt = self.resampler.query.dtype
        n_img = int(data["tgt_sizes"].shape[0]) if "tgt_sizes" in data else 0
        pixel_values = [data[f"pixel_values.{k}"].to(device=dev, dtype=dt) for k in range(n_img)]
        feats = None
        if n_img:
            if self.ver == "v2_0":
                feats = self.vision_v20(pixel_values)
            else:
                feats = self.vision_batched(pixel_values, data["tgt_sizes"])
        emb_layer = self.llm.get_input_embeddings()
        hidden = emb_layer.weight.shape[1]
        input_ids = data["input_ids"].to(dev)
        position_ids = data["position_ids"].to(dev)
        sample_lens = data.get("sample_lens", torch.tensor([input_ids.numel()]))
        logits = []
        start = 0
        for s, n in enumerate(sample_lens.tolist()):
            e = emb_layer(input_ids[start: start + n])
            if self.ver == "v2_0":
                e = e * self.scale_emb
            imgs = [k for k in range(n_img) if int(data["image_sample"][k]) == s]
            if imgs:
                idx = torch.cat([torch.arange(int(data["image_bound"][k, 0]) - start,
                                              int(data["image_bound"][k, 1]) - start)
                                 for k in imgs]).to(dev)
                e = e.index_put((idx,), feats[imgs].reshape(-1, hidden).to(e.dtype))
            pos = position_ids[start: start + n]
            if self.ver == "v2_0":
                lg = self.llm(e[None], pos[None])
            else:
                lg = self.llm(inputs_embeds=e[None], position_ids=pos[None], use_cache=False).logits
            logits.append(lg[0].float())
            start += n
        logits = torch.cat(logits, 0)
        loss = None
        if data.get("labels") is not None:
            loss = nn.CrossEntropyLoss()(logits, data["labels"].to(dev))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM reads it
        raise NotImplementedError("generation is not supported by the tiny test model")


# ---------------------------------------------------------------------------------------------
# Tokenizer class named by the 2.0 tokenizer_config.json auto_map
# (`modeling_minicpmv.LlamaTokenizerWrapper`, as in the released MiniCPM-V 2.0 files)
# ---------------------------------------------------------------------------------------------
from transformers import PreTrainedTokenizerFast  # noqa: E402


class LlamaTokenizerWrapper(PreTrainedTokenizerFast):
    """tokenizer.json as is (the tiny 2.0 tokenizer has no sentencepiece model file)."""
