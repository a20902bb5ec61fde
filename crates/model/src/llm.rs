//! The decoder-only language models: MiniCPM-2.4B (V2.0), Llama-3 (2.5) and Qwen2 (2.6).
//!
//! They share one structure — pre-norm RMSNorm blocks, rotary attention with grouped KV heads,
//! SiLU-gated MLP — and differ only in what the config switches: q/k/v biases (Qwen2), and the
//! MiniCPM scalings (embeddings ×`scale_emb`, residual branches ×`scale_depth/√layers`, hidden
//! states ÷`hidden/dim_model_base` before `lm_head`).

use candle_core::{DType, Device, Tensor};

use crate::config::LlmConfig;
use crate::error::Result;
use crate::linear::{Linear, Mode};
use crate::ops::{masked_attention_probs, rms_norm, rope_heads, silu_mul};
use crate::params::ParamStore;
use crate::profile::part;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln1: Tensor,
    ln2: Tensor,
}

/// The language model.
pub struct Llm {
    cfg: LlmConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
}

/// Keys and values of the positions decoded so far, per layer (`[B, KV, T, Dh]`), so each new
/// token costs one position's work instead of the whole sequence's (generation only).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Positions held (0 before the first step).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Per-row rotary tables and the attention mask of a (possibly packed) batch.
pub struct LlmAux {
    /// `[B, 1, T, Dh]`
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive `[B, 1, T, T]`: 0 where query i may see key j (same sample, j ≤ i), −∞ else.
    /// Only built for the op-by-op path; the fused CUDA softmax reads `bounds`.
    pub mask: Option<Tensor>,
    /// u32 `[B, T, 2]`: the keys query i may see, `start ≤ j < i + 1` with `start` the first
    /// position of its sample (fused CUDA path only).
    pub bounds: Option<Tensor>,
    /// The same key ranges on the host, one per token of all rows (the block path's input).
    pub keys: Vec<(u32, u32)>,
    /// `cos` and `sin` as f32 on the host, `[B·T, Dh]` (the block path's input).
    pub cos_rows: Vec<f32>,
    pub sin_rows: Vec<f32>,
}

impl LlmAux {
    /// Builds the tables from position ids `[B][T]` and sample lengths per row (a row's
    /// samples are contiguous from position 0; trailing padding forms its own segment).
    pub fn new(
        cfg: &LlmConfig,
        position_ids: &[Vec<u32>],
        segments: &[Vec<usize>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let b = position_ids.len();
        let t = position_ids.first().map_or(0, Vec::len);
        let (cos_rows, sin_rows) = rotary_rows(cfg, position_ids);
        let shape = (b, 1, t, cfg.head_dim());
        let cos = Tensor::from_slice(&cos_rows, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&sin_rows, shape, device)?.to_dtype(dtype)?;
        // Every row's samples, then its trailing padding as one more segment.
        let mut keys = Vec::with_capacity(b * t);
        for segs in segments {
            let total: usize = segs.iter().sum();
            let mut start = 0u32;
            for len in segs.iter().copied().chain((total < t).then_some(t - total)) {
                for i in 0..len as u32 {
                    keys.push((start, start + i + 1));
                }
                start += len as u32;
            }
        }
        let (mask, bounds) = if crate::ops::fused(&cos) {
            let flat: Vec<u32> = keys.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
            (None, Some(Tensor::from_vec(flat, (b, t, 2), device)?))
        } else {
            let mut mask = vec![f32::NEG_INFINITY; b * t * t];
            for (i, &(lo, hi)) in keys.iter().enumerate() {
                mask[i * t + lo as usize..i * t + hi as usize].fill(0.0);
            }
            let mask = Tensor::from_vec(mask, (b, 1, t, t), device)?.to_dtype(dtype)?;
            (Some(mask), None)
        };
        Ok(LlmAux {
            cos,
            sin,
            mask,
            bounds,
            keys,
            cos_rows,
            sin_rows,
        })
    }
}

impl LlmAux {
    /// Rotary tables only (`mask` and `bounds` unset, no key ranges), for one row at
    /// `positions`: what a cached generation step needs.
    pub fn rotary(
        cfg: &LlmConfig,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (cos_rows, sin_rows) = rotary_rows(cfg, &[positions.to_vec()]);
        let shape = (1, 1, positions.len(), cfg.head_dim());
        Ok(LlmAux {
            cos: Tensor::from_slice(&cos_rows, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&sin_rows, shape, device)?.to_dtype(dtype)?,
            mask: None,
            bounds: None,
            keys: Vec::new(),
            cos_rows,
            sin_rows,
        })
    }
}

/// Cos and sin tables `[B·T, Dh]` (f32) of position ids `[B][T]`.
fn rotary_rows(cfg: &LlmConfig, position_ids: &[Vec<u32>]) -> (Vec<f32>, Vec<f32>) {
    let b = position_ids.len();
    let t = position_ids.first().map_or(0, Vec::len);
    let dh = cfg.head_dim();
    let half = dh / 2;
    // As transformers: inv_freq in f32 from integer exponents, freqs = pos · inv_freq in f32.
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dh as f32))
        .collect();
    let mut cos = Vec::with_capacity(b * t * dh);
    let mut sin = Vec::with_capacity(b * t * dh);
    for row in position_ids {
        for &p in row {
            let f: Vec<f32> = inv.iter().map(|w| p as f32 * w).collect();
            for _ in 0..2 {
                cos.extend(f.iter().map(|x| x.cos()));
                sin.extend(f.iter().map(|x| x.sin()));
            }
        }
    }
    (cos, sin)
}

impl Llm {
    pub fn load(cfg: &LlmConfig, p: &mut ParamStore) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let pre = format!("llm.model.layers.{i}");
            layers.push(Layer {
                q: p.linear(&format!("{pre}.self_attn.q_proj"), cfg.qkv_bias)?,
                k: p.linear(&format!("{pre}.self_attn.k_proj"), cfg.qkv_bias)?,
                v: p.linear(&format!("{pre}.self_attn.v_proj"), cfg.qkv_bias)?,
                o: p.linear(&format!("{pre}.self_attn.o_proj"), false)?,
                gate: p.linear(&format!("{pre}.mlp.gate_proj"), false)?,
                up: p.linear(&format!("{pre}.mlp.up_proj"), false)?,
                down: p.linear(&format!("{pre}.mlp.down_proj"), false)?,
                ln1: p.get(&format!("{pre}.input_layernorm.weight"))?,
                ln2: p.get(&format!("{pre}.post_attention_layernorm.weight"))?,
            });
        }
        Ok(Llm {
            cfg: cfg.clone(),
            embed: p.get("llm.model.embed_tokens.weight")?,
            layers,
            norm: p.get("llm.model.norm.weight")?,
            lm_head: p.linear("llm.lm_head", false)?,
        })
    }

    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    /// Token embeddings `[B, T, H]`, already multiplied by `scale_emb`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.embed.index_select(&ids.flatten_all()?, 0)?;
        let e = if self.cfg.scale_emb != 1.0 {
            (e * self.cfg.scale_emb)?
        } else {
            e
        };
        Ok(e.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// One decoder layer (exposed so a trainer can checkpoint layer by layer).
    pub fn layer(&self, i: usize, x: &Tensor, aux: &LlmAux, mode: &Mode) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.attention_inputs(&self.layers[i], x, &aux.cos, &aux.sin, mode)?;
        let attn = part(x.device(), "llm.attn", || -> candle_core::Result<_> {
            self.attention(
                q,
                k,
                v,
                aux,
                (b, t, c.num_heads, c.num_kv_heads, c.head_dim()),
            )
        })?;
        self.attention_output(&self.layers[i], x, &attn, mode)
    }

    /// The first half of a decoder layer: input norm, q/k/v projections and rotary embedding.
    /// Returns q and k as `[B, H, T, Dh]` views and v as `[B, KV, T, Dh]`.
    fn attention_inputs(
        &self,
        l: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mode: &Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, dh) = (c.num_heads, c.num_kv_heads, c.head_dim());
        let dev = x.device();
        let h = part(dev, "llm.norm", || rms_norm(x, &l.ln1, c.rms_norm_eps))?;
        let (q, k, v) = part(dev, "llm.qkv", || -> candle_core::Result<_> {
            Ok((
                l.q.forward(&h, mode)?.reshape((b, t, nh, dh))?,
                l.k.forward(&h, mode)?.reshape((b, t, nkv, dh))?,
                l.v.forward(&h, mode)?
                    .reshape((b, t, nkv, dh))?
                    .transpose(1, 2)?,
            ))
        })?;
        let (q, k) = part(dev, "llm.rope", || -> candle_core::Result<_> {
            Ok((rope_heads(&q, cos, sin)?, rope_heads(&k, cos, sin)?))
        })?;
        Ok((q, k, v))
    }

    /// The second half of a decoder layer from the attention's `[B, T, H·Dh]` output: output
    /// projection and residual, post-attention norm, MLP and residual.
    fn attention_output(
        &self,
        l: &Layer,
        x: &Tensor,
        attn: &Tensor,
        mode: &Mode,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let dev = x.device();
        let attn = part(dev, "llm.o", || l.o.forward(attn, mode))?;
        let x = (x + scaled(attn, c.residual_scale)?)?;
        let h = part(dev, "llm.norm", || rms_norm(&x, &l.ln2, c.rms_norm_eps))?;
        let mlp = part(dev, "llm.mlp", || -> candle_core::Result<_> {
            let a = silu_mul(&l.gate.forward(&h, mode)?, &l.up.forward(&h, mode)?)?;
            l.down.forward(&a, mode)
        })?;
        Ok((x + scaled(mlp, c.residual_scale)?)?)
    }

    /// The additive causal mask of `t` new positions after `past` cached ones, `[1, 1, 1, t,
    /// past + t]` (new position j sees keys ≤ past + j; shared by every head and layer), or
    /// `None` for a single new position, which sees every key.
    pub fn cached_mask(
        past: usize,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        if t <= 1 {
            return Ok(None);
        }
        let total = past + t;
        let mut mask = vec![0f32; t * total];
        for j in 0..t {
            mask[j * total + past + j + 1..(j + 1) * total].fill(f32::NEG_INFINITY);
        }
        Ok(Some(
            Tensor::from_vec(mask, (1, 1, 1, t, total), device)?.to_dtype(dtype)?,
        ))
    }

    /// Decoder layer `i` over `x` `[B, t, H]`, the positions that follow the ones in `cache`
    /// (whose keys and values it attends to, causally, and then extends). `cos`/`sin` are the
    /// rotary tables of the new positions (`[B, 1, t, Dh]`), `mask` their
    /// [`Llm::cached_mask`]. Inference only: no dropout, and plain ops (no fused attention) on
    /// every device.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_cached(
        &self,
        i: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: &Mode,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, dh) = (c.num_heads, c.num_kv_heads, c.head_dim());
        let (q, k, v) = self.attention_inputs(&self.layers[i], x, cos, sin, mode)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        if cache.layers.len() < self.layers.len() {
            cache.layers.resize_with(self.layers.len(), || None);
        }
        let (k, v) = match cache.layers[i].take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        cache.layers[i] = Some((k.clone(), v.clone()));
        let total = k.dim(2)?;
        let rep = nh / nkv;
        // Query heads that share a key/value head side by side: [B, KV, rep·t, Dh].
        let q = q.reshape((b, nkv, rep * t, dh))?;
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
        if let Some(mask) = mask {
            scores = scores
                .reshape((b, nkv, rep, t, total))?
                .broadcast_add(mask)?
                .reshape((b, nkv, rep * t, total))?;
        }
        let probs = crate::ops::softmax_last(&scores)?;
        let attn = probs
            .matmul(&v)?
            .reshape((b, nh, t, dh))?
            .transpose(1, 2)?
            .reshape((b, t, nh * dh))?;
        self.attention_output(&self.layers[i], x, &attn, mode)
    }

    /// Grouped-query attention over `[B, T, H, Dh]`-laid-out q (after rope, as `[B, H, T, Dh]`
    /// views), k and v; returns `[B, T, H·Dh]`.
    fn attention(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        aux: &LlmAux,
        (b, t, nh, nkv, dh): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        // Grouped heads without copying k and v `rep` times: the `rep` query heads that share a
        // key/value head are stacked along the query axis ([B, H, T, Dh] is [B, KV, rep·T, Dh]
        // in memory), so one batched product per KV head serves them all and the backward pass
        // sums their k/v gradients inside the matmul.
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, rep * t, dh))?;
        let scores = q.matmul(&k.t()?.contiguous()?)?.reshape((b, nh, t, t))?;
        let probs = masked_attention_probs(&scores, aux.mask.as_ref(), aux.bounds.as_ref(), dh)?;
        let attn = probs
            .contiguous()?
            .reshape((b, nkv, rep * t, t))?
            .matmul(&v.contiguous()?)?
            .reshape((b, nh, t, dh))?;
        attn.transpose(1, 2)?.reshape((b, t, nh * dh))
    }

    /// Decoder layer `i` made for the block path.
    pub(crate) fn block_layer<B: crate::block::Bridge>(
        &self,
        be: &B,
        i: usize,
    ) -> Result<crate::block::BlockLayer<cpmv_block::llm::LlmLayer<B>>> {
        let l = self.layers.get(i).ok_or_else(|| {
            crate::error::ModelError::Batch(format!("internal: no decoder layer {i}"))
        })?;
        let c = &self.cfg;
        crate::block::BlockLayer::new(be, |p| {
            Ok(cpmv_block::llm::LlmLayer {
                ln1: p.param(&l.ln1)?,
                q: p.linear(&l.q)?,
                k: p.linear(&l.k)?,
                v: p.linear(&l.v)?,
                o: p.linear(&l.o)?,
                ln2: p.param(&l.ln2)?,
                gate: p.linear(&l.gate)?,
                up: p.linear(&l.up)?,
                down: p.linear(&l.down)?,
                hidden: c.hidden_size,
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim(),
                eps: c.rms_norm_eps as f32,
                residual_scale: c.residual_scale as f32,
            })
        })
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?)
    }

    /// Logits of normed hidden states `[.., H]` → `[.., V]` (MiniCPM divides first).
    pub fn logits(&self, h: &Tensor, mode: &Mode) -> Result<Tensor> {
        let h = if self.cfg.logit_divisor != 1.0 {
            (h / self.cfg.logit_divisor)?
        } else {
            h.clone()
        };
        Ok(self.lm_head.forward(&h, mode)?)
    }
}

fn scaled(x: Tensor, s: f64) -> candle_core::Result<Tensor> {
    if s == 1.0 {
        Ok(x)
    } else {
        x * s
    }
}
