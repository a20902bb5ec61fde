//! MiniCPM-V 2.0's vision tower: timm's SigLIP ViT (`vit_so400m_patch14_siglip_384` layout,
//! no class token, attention pool removed, last block dropped), with its learned 27×27
//! position table resampled to each image's patch grid by antialiased bicubic interpolation.
//!
//! The reference runs every image separately; here all images of a batch run together,
//! padded to the longest and with padded keys masked, which computes the same values.

use candle_core::{Tensor, D};

use crate::block::{gelu as block_gelu, BlockLayer, Bridge};
use crate::config::{Gelu, VisionConfig};
use crate::error::{ModelError, Result};
use crate::image::{stack_patches, ImageInput};
use crate::linear::{Linear, Mode};
use crate::ops::{attention, key_padding_mask, layer_norm};
use crate::params::ParamStore;
use crate::positions::aa_bicubic_matrix;
use crate::profile::part;
use cpmv_block::vision as bv;

struct Block {
    norm1: (Tensor, Tensor),
    norm2: (Tensor, Tensor),
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// A batch of images ready for the first layer of a vision tower.
pub struct VisionInput {
    /// `[n, l_max, C]`
    pub x: Tensor,
    /// Additive key mask `[n, 1, 1, l_max]` when images are padded (and the scheme masks).
    pub mask: Option<Tensor>,
    /// Patches per image.
    pub lens: Vec<usize>,
}

/// The V2.0 vision transformer.
pub struct VitSiglip {
    cfg: VisionConfig,
    patch_embed: Linear,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: (Tensor, Tensor),
}

pub(crate) fn patch_linear(p: &mut ParamStore, module: &str) -> Result<Linear> {
    let mut lin = p.linear(module, true)?;
    let (out, c, kh, kw) = lin.weight.dims4()?;
    lin.weight = lin.weight.reshape((out, c * kh * kw))?;
    Ok(lin)
}

pub(crate) fn ln(p: &ParamStore, module: &str) -> Result<(Tensor, Tensor)> {
    Ok((
        p.get(&format!("{module}.weight"))?,
        p.get(&format!("{module}.bias"))?,
    ))
}

/// The vision MLP `fc2(gelu(fc1(x)))` of both towers.
pub(crate) fn mlp(
    x: &Tensor,
    fc1: &Linear,
    fc2: &Linear,
    gelu: Gelu,
    mode: &Mode,
) -> Result<Tensor> {
    let h = fc1.forward_act(x, mode, Some(gelu))?;
    Ok(fc2.forward(&h, mode)?)
}

impl VitSiglip {
    pub fn load(cfg: &VisionConfig, p: &mut ParamStore) -> Result<Self> {
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let pre = format!("vpm.blocks.{i}");
            blocks.push(Block {
                norm1: ln(p, &format!("{pre}.norm1"))?,
                norm2: ln(p, &format!("{pre}.norm2"))?,
                qkv: p.linear(&format!("{pre}.attn.qkv"), true)?,
                proj: p.linear(&format!("{pre}.attn.proj"), true)?,
                fc1: p.linear(&format!("{pre}.mlp.fc1"), true)?,
                fc2: p.linear(&format!("{pre}.mlp.fc2"), true)?,
            });
        }
        Ok(VitSiglip {
            cfg: cfg.clone(),
            patch_embed: patch_linear(p, "vpm.patch_embed.proj")?,
            pos_embed: p.get("vpm.pos_embed")?,
            blocks,
            norm: ln(p, "vpm.norm")?,
        })
    }

    /// The learned position table resampled to an `h × w` patch grid: `[h·w, C]`.
    fn positions(&self, h: usize, w: usize) -> Result<Tensor> {
        let g = self.cfg.grid();
        let c = self.cfg.hidden_size;
        let table = self.pos_embed.reshape((g, g, c))?;
        if h == g && w == g {
            return Ok(table.reshape((g * g, c))?);
        }
        let dev = self.pos_embed.device();
        let dt = self.pos_embed.dtype();
        let rh = Tensor::from_vec(aa_bicubic_matrix(g, h), (h, g), dev)?.to_dtype(dt)?;
        let rw = Tensor::from_vec(aa_bicubic_matrix(g, w), (w, g), dev)?.to_dtype(dt)?;
        // Rows first: [h, g·C] → [h, g, C]; then columns: [h, w, g] × [h, g, C].
        let t1 = rh.matmul(&table.reshape((g, g * c))?)?.reshape((h, g, c))?;
        let out = rw.unsqueeze(0)?.broadcast_as((h, w, g))?.matmul(&t1)?;
        Ok(out.reshape((h * w, c))?)
    }

    /// Patch embeddings plus positions of all images, padded: the input of layer 0.
    pub fn embed(&self, images: &[ImageInput], mode: &Mode) -> Result<VisionInput> {
        let lens: Vec<usize> = images.iter().map(ImageInput::len).collect();
        let l_max = lens.iter().copied().max().unwrap_or(0);
        let dt = self.pos_embed.dtype();
        let dev = self.pos_embed.device().clone();
        let x = stack_patches(images, l_max, dt, &dev)?;
        let x = self.patch_embed.forward(&x, mode)?;
        let c = self.cfg.hidden_size;
        let mut pos = Vec::with_capacity(images.len());
        for (im, &n) in images.iter().zip(&lens) {
            let p = self.positions(im.ph, im.pw)?;
            pos.push(if n < l_max {
                Tensor::cat(&[&p, &Tensor::zeros((l_max - n, c), dt, &dev)?], 0)?
            } else {
                p
            });
        }
        let x = (x + Tensor::stack(&pos, 0)?)?;
        let mask = if lens.iter().any(|&n| n < l_max) {
            Some(key_padding_mask(&lens, l_max, dt, &dev)?)
        } else {
            None
        };
        Ok(VisionInput { x, mask, lens })
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Block `i` (exposed for layer-wise recomputation).
    pub fn layer(
        &self,
        i: usize,
        x: &Tensor,
        mask: Option<&Tensor>,
        mode: &Mode,
    ) -> Result<Tensor> {
        let b = &self.blocks[i];
        let (n, l_max, c) = x.dims3()?;
        let (heads, hd) = (self.cfg.num_heads, c / self.cfg.num_heads);
        let eps = self.cfg.layer_norm_eps;
        let dev = x.device();
        let h = part(dev, "vision.norm", || {
            layer_norm(x, &b.norm1.0, &b.norm1.1, eps)
        })?;
        // qkv output is [q | k | v], each head-major.
        let qkv = part(dev, "vision.qkv", || -> candle_core::Result<_> {
            b.qkv
                .forward(&h, mode)?
                .reshape((n, l_max, 3, heads, hd))?
                .permute((2, 0, 3, 1, 4))
        })?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let a = part(dev, "vision.attn", || -> candle_core::Result<_> {
            attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?
                .transpose(1, 2)?
                .reshape((n, l_max, c))
        })?;
        let x = (x + part(dev, "vision.proj", || b.proj.forward(&a, mode))?)?;
        let h = part(dev, "vision.norm", || {
            layer_norm(&x, &b.norm2.0, &b.norm2.1, eps)
        })?;
        let m = part(dev, "vision.mlp", || {
            mlp(&h, &b.fc1, &b.fc2, self.cfg.gelu, mode)
        })?;
        Ok((x + m)?)
    }

    /// Block `i` for the block path (see [`crate::block`]).
    pub(crate) fn block_layer<B: Bridge>(
        &self,
        be: &B,
        i: usize,
    ) -> Result<BlockLayer<bv::VisionLayer<B>>> {
        let b = self
            .blocks
            .get(i)
            .ok_or_else(|| ModelError::Batch(format!("internal: no vision layer {i}")))?;
        BlockLayer::new(be, |c| {
            Ok(bv::VisionLayer {
                ln1: c.norm(&b.norm1)?,
                qkv: bv::Qkv::Fused(c.linear(&b.qkv)?),
                out: c.linear(&b.proj)?,
                ln2: c.norm(&b.norm2)?,
                fc1: c.linear(&b.fc1)?,
                fc2: c.linear(&b.fc2)?,
                hidden: self.cfg.hidden_size,
                heads: self.cfg.num_heads,
                eps: self.cfg.layer_norm_eps as f32,
                gelu: block_gelu(self.cfg.gelu),
            })
        })
    }

    /// The final LayerNorm.
    pub fn finish(&self, x: &Tensor) -> Result<Tensor> {
        let x = layer_norm(x, &self.norm.0, &self.norm.1, self.cfg.layer_norm_eps)?;
        debug_assert_eq!(x.dim(D::Minus1)?, self.cfg.hidden_size);
        Ok(x)
    }

    /// Runs the tower over all images: `[n, l_max, C]` (rows beyond an image's patch count
    /// are padding) and the patch counts.
    pub fn forward(&self, images: &[ImageInput], mode: &Mode) -> Result<(Tensor, Vec<usize>)> {
        let VisionInput { mut x, mask, lens } = self.embed(images, mode)?;
        for i in 0..self.blocks.len() {
            x = self.layer(i, &x, mask.as_ref(), mode)?;
        }
        Ok((self.finish(&x)?, lens))
    }
}
