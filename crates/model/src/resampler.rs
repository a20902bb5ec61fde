//! The perceiver resampler: `query_num` learned queries attend over an image's vision features
//! (keys carry 2-D sin-cos positions of the true patch grid), giving a fixed number of
//! LLM-width rows per image (spec §7.1, §7.3). `out = ln_post(attn) @ proj`.

use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::ResamplerConfig;
use crate::error::Result;
use crate::image::ImageInput;
use crate::linear::{right_matmul, Linear, Mode};
use crate::ops::{attention, key_padding_mask, layer_norm};
use crate::params::ParamStore;
use crate::positions::sincos_2d;
use crate::vision_vit::ln;

/// The resampler.
pub struct Resampler {
    cfg: ResamplerConfig,
    query: Tensor,
    query_pos: Option<Tensor>,
    kv_proj: Linear,
    q_in: Linear,
    k_in: Linear,
    v_in: Linear,
    out_proj: Linear,
    ln_q: (Tensor, Tensor),
    ln_kv: (Tensor, Tensor),
    ln_post: (Tensor, Tensor),
    proj: Tensor,
    proj_trainable: bool,
    /// Key position tables by patch grid `(h, w)`: `[h·w, D]` on the model's device.
    pos_cache: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl Resampler {
    pub fn load(cfg: &ResamplerConfig, p: &mut ParamStore) -> Result<Self> {
        let d = cfg.embed_dim;
        let w = p.get("resampler.attn.in_proj_weight")?;
        let b = p.get("resampler.attn.in_proj_bias")?;
        let trainable = p.is_trainable("resampler.attn.in_proj_weight");
        // The packed in-projection rows are [Wq; Wk; Wv].
        let part = |i: usize| -> candle_core::Result<Linear> {
            Ok(Linear {
                weight: w.narrow(0, i * d, d)?,
                bias: Some(b.narrow(0, i * d, d)?),
                weight_trainable: trainable,
                lora: None,
            })
        };
        Ok(Resampler {
            cfg: cfg.clone(),
            query: p.get("resampler.query")?,
            query_pos: if cfg.query_pos {
                Some(p.get("resampler.pos_embed")?)
            } else {
                None
            },
            kv_proj: p.linear("resampler.kv_proj", false)?,
            q_in: part(0)?,
            k_in: part(1)?,
            v_in: part(2)?,
            out_proj: p.linear("resampler.attn.out_proj", true)?,
            ln_q: ln(p, "resampler.ln_q")?,
            ln_kv: ln(p, "resampler.ln_kv")?,
            ln_post: ln(p, "resampler.ln_post")?,
            proj: p.get("resampler.proj")?,
            proj_trainable: p.is_trainable("resampler.proj"),
            pos_cache: Mutex::new(HashMap::new()),
        })
    }

    /// The 2-D sin-cos key positions of every image, zero-padded to `l_max`: `[n, l_max, D]`.
    /// Tables are made once per grid size and kept on the device (building them on the host
    /// for every image of every step costs more than the resampler's own work on a GPU).
    fn key_positions(
        &self,
        images: &[ImageInput],
        l_max: usize,
        dt: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let d = self.cfg.embed_dim;
        let mut cache = self.pos_cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::with_capacity(images.len());
        for im in images {
            let key = (im.ph, im.pw);
            let t = match cache.get(&key) {
                Some(t) if t.dtype() == dt && t.device().same_device(dev) => t.clone(),
                _ => {
                    let t = Tensor::from_vec(sincos_2d(im.ph, im.pw, d), (im.ph * im.pw, d), dev)?
                        .to_dtype(dt)?;
                    cache.insert(key, t.clone());
                    t
                }
            };
            let n = im.ph * im.pw;
            rows.push(if n < l_max {
                Tensor::cat(&[&t, &Tensor::zeros((l_max - n, d), dt, dev)?], 0)?
            } else {
                t
            });
        }
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// `x` `[n, l_max, kv_dim]` vision features with `lens` valid rows per image →
    /// `[n, query_num, embed_dim]`.
    pub fn forward(
        &self,
        x: &Tensor,
        lens: &[usize],
        images: &[ImageInput],
        mode: &Mode,
    ) -> Result<Tensor> {
        let (n, l_max, _) = x.dims3()?;
        let d = self.cfg.embed_dim;
        let dt = x.dtype();
        let dev = x.device().clone();
        let eps = 1e-6;
        let kv = self.kv_proj.forward(x, mode)?;
        let kv = layer_norm(&kv, &self.ln_kv.0, &self.ln_kv.1, eps)?;
        let pos = self.key_positions(images, l_max, dt, &dev)?;
        let q = layer_norm(&self.query, &self.ln_q.0, &self.ln_q.1, eps)?;
        let q = match &self.query_pos {
            Some(qp) => (q + qp)?,
            None => q,
        };
        let (heads, hd) = (self.cfg.num_heads, d / self.cfg.num_heads);
        let nq = self.cfg.query_num;
        let qh = self
            .q_in
            .forward(&q, mode)?
            .reshape((1, nq, heads, hd))?
            .transpose(1, 2)?
            .broadcast_as((n, heads, nq, hd))?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((n, l_max, heads, hd))?.transpose(1, 2)
        };
        let kh = split(self.k_in.forward(&(&kv + pos)?, mode)?)?;
        let vh = split(self.v_in.forward(&kv, mode)?)?;
        let mask = if lens.iter().any(|&k| k < l_max) {
            Some(key_padding_mask(lens, l_max, dt, &dev)?)
        } else {
            None
        };
        let a = attention(&qh, &kh, &vh, mask.as_ref(), 1.0 / (hd as f64).sqrt())?;
        let a = a.transpose(1, 2)?.reshape((n, nq, d))?;
        let a = self.out_proj.forward(&a, mode)?;
        let a = layer_norm(&a, &self.ln_post.0, &self.ln_post.1, eps)?;
        let out = right_matmul(&a, &self.proj, self.proj_trainable)?;
        debug_assert_eq!(out.dim(D::Minus1)?, d);
        Ok(out)
    }
}
