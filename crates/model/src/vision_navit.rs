//! The NaViT SigLIP vision tower of 2.5 and 2.6 (Idefics2 layout): images of any patch grid
//! run as one padded batch; positions come from a 70×70 learned table through float32
//! buckets (spec §7.3).
//!
//! 2.6: 2-D buckets per image, padding keys masked. 2.5 (reference behaviour, spec §7.2):
//! every padded position counts as valid and positions are 1-D buckets over the batch's
//! longest patch count, so an image's features depend on the other images of its batch;
//! [`crate::config::Fixes::v25_vision_masking`] switches to the 2.6 behaviour.

use candle_core::Tensor;

use crate::block::{gelu as block_gelu, BlockLayer, Bridge};
use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::image::{stack_patches, ImageInput};
use crate::linear::{Linear, Mode};
use crate::ops::{attention, key_padding_mask, layer_norm};
use crate::params::ParamStore;
use crate::positions::navit_buckets;
use crate::profile::part;
use crate::vision_vit::{ln, mlp, patch_linear, VisionInput};
use cpmv_block::vision as bv;

struct Layer {
    ln1: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// Position scheme of the tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NavitPositions {
    /// 2-D buckets per image, padding masked (2.6, and 2.5 with the fix).
    TwoD,
    /// The 2.5 reference quirk: all positions valid, 1-D buckets over `l_max`.
    AllValid1D,
}

/// The NaViT vision transformer.
pub struct NavitSiglip {
    cfg: VisionConfig,
    scheme: NavitPositions,
    patch_embed: Linear,
    pos_table: Tensor,
    layers: Vec<Layer>,
    post: (Tensor, Tensor),
}

impl NavitSiglip {
    pub fn load(cfg: &VisionConfig, scheme: NavitPositions, p: &mut ParamStore) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let pre = format!("vpm.encoder.layers.{i}");
            layers.push(Layer {
                ln1: ln(p, &format!("{pre}.layer_norm1"))?,
                ln2: ln(p, &format!("{pre}.layer_norm2"))?,
                q: p.linear(&format!("{pre}.self_attn.q_proj"), true)?,
                k: p.linear(&format!("{pre}.self_attn.k_proj"), true)?,
                v: p.linear(&format!("{pre}.self_attn.v_proj"), true)?,
                out: p.linear(&format!("{pre}.self_attn.out_proj"), true)?,
                fc1: p.linear(&format!("{pre}.mlp.fc1"), true)?,
                fc2: p.linear(&format!("{pre}.mlp.fc2"), true)?,
            });
        }
        Ok(NavitSiglip {
            cfg: cfg.clone(),
            scheme,
            patch_embed: patch_linear(p, "vpm.embeddings.patch_embedding")?,
            pos_table: p.get("vpm.embeddings.position_embedding.weight")?,
            layers,
            post: ln(p, "vpm.post_layernorm")?,
        })
    }

    /// Whether an image's output depends on the other images of its batch (the 2.5 quirk).
    pub fn batch_dependent(&self) -> bool {
        self.scheme == NavitPositions::AllValid1D
    }

    /// Position ids `[n·l_max]` of the batch.
    fn position_ids(&self, images: &[ImageInput], l_max: usize) -> Vec<u32> {
        let g = self.cfg.grid();
        let mut ids = vec![0u32; images.len() * l_max];
        match self.scheme {
            NavitPositions::TwoD => {
                for (i, im) in images.iter().enumerate() {
                    let bh = navit_buckets(im.ph, g);
                    let bw = navit_buckets(im.pw, g);
                    for r in 0..im.ph {
                        for c in 0..im.pw {
                            ids[i * l_max + r * im.pw + c] = (bh[r] * g + bw[c]) as u32;
                        }
                    }
                }
            }
            NavitPositions::AllValid1D => {
                let b = navit_buckets(l_max, g);
                for i in 0..images.len() {
                    for (j, &x) in b.iter().enumerate() {
                        ids[i * l_max + j] = x as u32;
                    }
                }
            }
        }
        ids
    }

    /// Patch embeddings plus positions of all images, padded: the input of layer 0.
    pub fn embed(&self, images: &[ImageInput], mode: &Mode) -> Result<VisionInput> {
        let lens: Vec<usize> = images.iter().map(ImageInput::len).collect();
        let l_max = lens.iter().copied().max().unwrap_or(0);
        let n = images.len();
        let dt = self.pos_table.dtype();
        let dev = self.pos_table.device().clone();
        let c = self.cfg.hidden_size;
        let x = stack_patches(images, l_max, dt, &dev)?;
        let x = self.patch_embed.forward(&x, mode)?;
        let ids = Tensor::from_vec(self.position_ids(images, l_max), n * l_max, &dev)?;
        let pos = self
            .pos_table
            .index_select(&ids, 0)?
            .reshape((n, l_max, c))?;
        let x = (x + pos)?;
        let mask = match self.scheme {
            NavitPositions::TwoD if lens.iter().any(|&k| k < l_max) => {
                Some(key_padding_mask(&lens, l_max, dt, &dev)?)
            }
            _ => None,
        };
        Ok(VisionInput { x, mask, lens })
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Encoder layer `i` (exposed for layer-wise recomputation).
    pub fn layer(
        &self,
        i: usize,
        x: &Tensor,
        mask: Option<&Tensor>,
        mode: &Mode,
    ) -> Result<Tensor> {
        let l = &self.layers[i];
        let (n, l_max, c) = x.dims3()?;
        let (heads, hd) = (self.cfg.num_heads, c / self.cfg.num_heads);
        let eps = self.cfg.layer_norm_eps;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((n, l_max, heads, hd))?.transpose(1, 2)
        };
        let dev = x.device();
        let h = part(dev, "vision.norm", || {
            layer_norm(x, &l.ln1.0, &l.ln1.1, eps)
        })?;
        let (q, k, v) = part(dev, "vision.qkv", || -> candle_core::Result<_> {
            Ok((
                split(l.q.forward(&h, mode)?)?,
                split(l.k.forward(&h, mode)?)?,
                split(l.v.forward(&h, mode)?)?,
            ))
        })?;
        let a = part(dev, "vision.attn", || -> candle_core::Result<_> {
            attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?
                .transpose(1, 2)?
                .reshape((n, l_max, c))
        })?;
        let x = (x + part(dev, "vision.proj", || l.out.forward(&a, mode))?)?;
        let h = part(dev, "vision.norm", || {
            layer_norm(&x, &l.ln2.0, &l.ln2.1, eps)
        })?;
        let m = part(dev, "vision.mlp", || {
            mlp(&h, &l.fc1, &l.fc2, self.cfg.gelu, mode)
        })?;
        Ok((x + m)?)
    }

    /// Layer `i` for the block path (see [`crate::block`]).
    pub(crate) fn block_layer<B: Bridge>(
        &self,
        be: &B,
        i: usize,
    ) -> Result<BlockLayer<bv::VisionLayer<B>>> {
        let l = self
            .layers
            .get(i)
            .ok_or_else(|| ModelError::Batch(format!("internal: no vision layer {i}")))?;
        BlockLayer::new(be, |c| {
            let q = c.linear(&l.q)?;
            let k = c.linear(&l.k)?;
            let v = c.linear(&l.v)?;
            Ok(bv::VisionLayer {
                ln1: c.norm(&l.ln1)?,
                qkv: bv::Qkv::Split(Box::new([q, k, v])),
                out: c.linear(&l.out)?,
                ln2: c.norm(&l.ln2)?,
                fc1: c.linear(&l.fc1)?,
                fc2: c.linear(&l.fc2)?,
                hidden: self.cfg.hidden_size,
                heads: self.cfg.num_heads,
                eps: self.cfg.layer_norm_eps as f32,
                gelu: block_gelu(self.cfg.gelu),
            })
        })
    }

    /// The post LayerNorm.
    pub fn finish(&self, x: &Tensor) -> Result<Tensor> {
        Ok(layer_norm(
            x,
            &self.post.0,
            &self.post.1,
            self.cfg.layer_norm_eps,
        )?)
    }

    /// Runs the tower: `[n, l_max, C]` and the patch counts.
    pub fn forward(&self, images: &[ImageInput], mode: &Mode) -> Result<(Tensor, Vec<usize>)> {
        let VisionInput { mut x, mask, lens } = self.embed(images, mode)?;
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, mask.as_ref(), mode)?;
        }
        Ok((self.finish(&x)?, lens))
    }
}
