//! The block path: a vision layer as one op of `cpmv-block` (hand-written forward and
//! backward) instead of candle's autograd graph of ~100 ops. Layer-wise trainers call
//! [`MiniCpmV::vision_block_forward`] and [`MiniCpmV::vision_block_backward`] where they would
//! recompute a layer and back-propagate through it; the result is the same values (tests hold
//! them to 1e-5 of the autograd path, gradients included) with the same LoRA dropout draws.
//!
//! Today the block path runs on the CPU backend in f32; other devices and dtypes, and
//! `CPMV_UNFUSED=1`, keep the autograd path (the reference).

use candle_core::{DType, Tensor};
use cpmv_block::vision::{self as bv, Grads, Images, Run};
use cpmv_block::Cpu;

use crate::config::Gelu;
use crate::error::{ModelError, Result};
use crate::linear::{Linear, Mode};
use crate::model::MiniCpmV;
use crate::vision_vit::VisionInput;

impl From<cpmv_block::BlockError> for ModelError {
    fn from(e: cpmv_block::BlockError) -> Self {
        ModelError::Batch(e.to_string())
    }
}

/// Whether `CPMV_UNFUSED=1` asks for candle's autograd everywhere (the reference path).
pub fn unfused_env() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CPMV_UNFUSED").is_ok_and(|v| v == "1"))
}

/// Collects a layer's tensors for the block path; trainable ones get a gradient slot.
#[derive(Default)]
pub(crate) struct Collect {
    /// The tensor of each slot (a variable's tensor: gradients are keyed by its id).
    params: Vec<Tensor>,
}

impl Collect {
    fn param(&mut self, t: &Tensor) -> Result<bv::Param<Cpu>> {
        let value = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let slot = t.is_variable().then(|| {
            self.params.push(t.clone());
            self.params.len() - 1
        });
        Ok(bv::Param { value, slot })
    }

    pub(crate) fn norm(&mut self, n: &(Tensor, Tensor)) -> Result<bv::Norm<Cpu>> {
        Ok(bv::Norm {
            weight: self.param(&n.0)?,
            bias: self.param(&n.1)?,
        })
    }

    pub(crate) fn linear(&mut self, l: &Linear) -> Result<bv::Linear<Cpu>> {
        let (out, inp) = l.weight.dims2()?;
        let lora = match &l.lora {
            Some(ad) => Some(bv::Lora {
                a: self.param(ad.a.as_tensor())?,
                b: self.param(ad.b.as_tensor())?,
                rank: ad.a.as_tensor().dim(0)?,
                scale: ad.scale as f32,
                dropout: ad.dropout,
            }),
            None => None,
        };
        Ok(bv::Linear {
            weight: self.param(&l.weight)?,
            bias: l.bias.as_ref().map(|b| self.param(b)).transpose()?,
            out,
            inp,
            lora,
        })
    }
}

pub(crate) fn gelu(g: Gelu) -> cpmv_block::Gelu {
    match g {
        Gelu::Erf => cpmv_block::Gelu::Erf,
        Gelu::Tanh => cpmv_block::Gelu::Tanh,
    }
}

/// A vision layer made for the block path, with the tensors behind its gradient slots.
pub(crate) struct BlockLayer {
    pub(crate) layer: bv::VisionLayer<Cpu>,
    pub(crate) params: Vec<Tensor>,
}

impl BlockLayer {
    pub(crate) fn new(
        f: impl FnOnce(&mut Collect) -> Result<bv::VisionLayer<Cpu>>,
    ) -> Result<Self> {
        let mut c = Collect::default();
        let layer = f(&mut c)?;
        Ok(BlockLayer {
            layer,
            params: c.params,
        })
    }
}

/// What [`MiniCpmV::vision_block_backward`] needs of a forward pass.
pub struct VisionBlockState {
    layer: usize,
    dims: (usize, usize, usize),
    saved: bv::Saved<Cpu>,
}

/// Query key ranges of a vision batch: every image's valid patches when padded keys are
/// masked, else all `l_max` positions (the 2.5 reference scheme, or no padding).
fn key_bounds(input: &VisionInput, l_max: usize) -> Vec<(u32, u32)> {
    let mut b = Vec::with_capacity(input.lens.len() * l_max);
    for &n in &input.lens {
        let hi = if input.mask.is_some() {
            n.min(l_max)
        } else {
            l_max
        };
        b.extend(std::iter::repeat_n((0u32, hi as u32), l_max));
    }
    b
}

impl MiniCpmV {
    /// Whether vision layers run on the block path: asked for at load
    /// ([`crate::LoadOptions::block_path`]) and available for the model's device and dtype
    /// (today: CPU, f32).
    pub fn vision_on_blocks(&self) -> bool {
        self.block_path() && self.params().device().is_cpu() && self.params().dtype() == DType::F32
    }

    /// Vision layer `i` on the block path: the output for `x` `[n, l_max, C]` (the batch
    /// `input` describes), and with `save` the state its backward pass needs. Draws the same
    /// LoRA dropout masks, in the same order, as [`MiniCpmV::vision_layer`].
    pub fn vision_block_forward(
        &self,
        i: usize,
        x: &Tensor,
        input: &VisionInput,
        train: bool,
        save: bool,
    ) -> Result<(Tensor, Option<VisionBlockState>)> {
        let (n, l_max, c) = x.dims3()?;
        if n != input.lens.len() {
            return Err(ModelError::Batch(format!(
                "vision layer {i}: {n} images in x, {} in the batch",
                input.lens.len()
            )));
        }
        let bl = self.vision_block_layer(i)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let bounds = key_bounds(input, l_max);
        let im = Images {
            seqs: n,
            len: l_max,
            bounds: &bounds,
        };
        let mode = Mode {
            train,
            rng: self.dropout_cell(),
        };
        let mut draw = || {
            mode.rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_u64()
        };
        let mut run = Run {
            train: mode.train,
            draw: &mut draw,
        };
        let (y, saved) = bl.layer.forward(&Cpu, &xs, &im, &mut run, save)?;
        let y = Tensor::from_vec(y, (n, l_max, c), x.device())?;
        let state = saved.map(|saved| VisionBlockState {
            layer: i,
            dims: (n, l_max, c),
            saved,
        });
        Ok((y, state))
    }

    /// Backward of [`MiniCpmV::vision_block_forward`] from the output gradient `gy`: the
    /// input gradient, and the gradient of every trainable tensor of the layer (LoRA A/B
    /// included) with the tensor it belongs to.
    pub fn vision_block_backward(
        &self,
        state: &VisionBlockState,
        gy: &Tensor,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (n, l_max, c) = state.dims;
        if gy.dims() != [n, l_max, c] {
            return Err(ModelError::Batch(format!(
                "vision layer {}: gradient of shape {:?} for an output of {:?}",
                state.layer,
                gy.dims(),
                [n, l_max, c]
            )));
        }
        let bl = self.vision_block_layer(state.layer)?;
        let gys = gy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut grads = Grads::<Cpu>::default();
        let gx = bl.layer.backward(&Cpu, &state.saved, &gys, &mut grads)?;
        let gx = Tensor::from_vec(gx, (n, l_max, c), gy.device())?;
        let mut out = Vec::with_capacity(grads.by_slot.len());
        for (slot, g) in grads.by_slot {
            let p = &bl.params[slot];
            out.push((p.clone(), Tensor::from_vec(g, p.shape(), p.device())?));
        }
        Ok((gx, out))
    }
}
