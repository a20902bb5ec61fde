//! The block path: a vision layer as one op of `cpmv-block` (hand-written forward and
//! backward) instead of candle's autograd graph of ~100 ops. Layer-wise trainers call
//! [`MiniCpmV::vision_block_forward`] and [`MiniCpmV::vision_block_backward`] where they would
//! recompute a layer and back-propagate through it; the result is the same values (tests hold
//! them to 1e-5 of the autograd path, gradients included) with the same LoRA dropout draws.
//!
//! Decoder layers the same way: [`MiniCpmV::llm_block_forward`] and
//! [`MiniCpmV::llm_block_backward`].
//!
//! Today the block path runs on the CPU backend in f32; other devices and dtypes, and
//! `CPMV_UNFUSED=1`, keep the autograd path (the reference).

use candle_core::{DType, Tensor};
use cpmv_block::llm as bl;
use cpmv_block::vision::{self as bv, Grads, Images, Run};
use cpmv_block::Cpu;

use crate::config::Gelu;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::llm::LlmAux;
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
    pub(crate) fn param(&mut self, t: &Tensor) -> Result<bv::Param<Cpu>> {
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

/// A layer made for the block path (vision or decoder), with the tensors behind its
/// gradient slots.
pub(crate) struct BlockLayer<L = bv::VisionLayer<Cpu>> {
    pub(crate) layer: L,
    pub(crate) params: Vec<Tensor>,
}

impl<L> BlockLayer<L> {
    pub(crate) fn new(f: impl FnOnce(&mut Collect) -> Result<L>) -> Result<Self> {
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
        let (y, saved) = run_with(self, train, |run| {
            bl.layer.forward(&Cpu, &xs, &im, run, save)
        })?;
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
        Ok((gx, param_grads(&bl.params, grads)?))
    }
}

/// The gradients of a block layer's slots, each with the tensor it belongs to.
fn param_grads(params: &[Tensor], grads: Grads<Cpu>) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out = Vec::with_capacity(grads.by_slot.len());
    for (slot, g) in grads.by_slot {
        let p = &params[slot];
        out.push((p.clone(), Tensor::from_vec(g, p.shape(), p.device())?));
    }
    Ok(out)
}

/// The generator-backed draw of the model's LoRA dropout masks.
fn run_with<T>(model: &MiniCpmV, train: bool, f: impl FnOnce(&mut Run) -> T) -> T {
    let rng = model.dropout_cell();
    let mut draw = || rng.lock().unwrap_or_else(|p| p.into_inner()).next_u64();
    let mut run = Run {
        train,
        draw: &mut draw,
    };
    f(&mut run)
}

/// What [`MiniCpmV::llm_block_backward`] needs of a forward pass.
pub struct LlmBlockState {
    layer: usize,
    dims: (usize, usize, usize),
    saved: bl::Saved<Cpu>,
}

impl MiniCpmV {
    /// Whether decoder layers run on the block path (as [`MiniCpmV::vision_on_blocks`]).
    pub fn llm_on_blocks(&self) -> bool {
        self.vision_on_blocks()
    }

    /// Decoder layer `i` on the block path: the output for `x` `[B, T, H]` with the batch's
    /// `aux`, and with `save` the state its backward pass needs. Draws the same LoRA dropout
    /// masks, in the same order, as [`MiniCpmV::layer_forward`].
    pub fn llm_block_forward(
        &self,
        i: usize,
        x: &Tensor,
        aux: &LlmAux,
        train: bool,
        save: bool,
    ) -> Result<(Tensor, Option<LlmBlockState>)> {
        let (b, t, h) = x.dims3()?;
        if aux.keys.len() != b * t {
            return Err(ModelError::Batch(format!(
                "decoder layer {i}: {} key ranges for {b} rows of {t} tokens",
                aux.keys.len()
            )));
        }
        let layer = self.llm().block_layer(i)?;
        let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let tokens = bl::Tokens::<Cpu> {
            seqs: b,
            len: t,
            bounds: &aux.keys,
            cos: &aux.cos_rows,
            sin: &aux.sin_rows,
        };
        let (y, saved) = run_with(self, train, |run| {
            layer.layer.forward(&Cpu, &xs, &tokens, run, save)
        })?;
        let y = Tensor::from_vec(y, (b, t, h), x.device())?;
        let state = saved.map(|saved| LlmBlockState {
            layer: i,
            dims: (b, t, h),
            saved,
        });
        Ok((y, state))
    }

    /// Backward of [`MiniCpmV::llm_block_forward`] (same `aux`) from the output gradient `gy`:
    /// the input gradient, and the gradient of every trainable tensor of the layer with its
    /// tensor.
    pub fn llm_block_backward(
        &self,
        state: &LlmBlockState,
        aux: &LlmAux,
        gy: &Tensor,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (b, t, h) = state.dims;
        if gy.dims() != [b, t, h] {
            return Err(ModelError::Batch(format!(
                "decoder layer {}: gradient of shape {:?} for an output of {:?}",
                state.layer,
                gy.dims(),
                [b, t, h]
            )));
        }
        let layer = self.llm().block_layer(state.layer)?;
        let gys = gy.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut grads = Grads::<Cpu>::default();
        let tokens = bl::Tokens::<Cpu> {
            seqs: b,
            len: t,
            bounds: &aux.keys,
            cos: &aux.cos_rows,
            sin: &aux.sin_rows,
        };
        let gx = layer
            .layer
            .backward(&Cpu, &state.saved, &tokens, &gys, &mut grads)?;
        let gx = Tensor::from_vec(gx, (b, t, h), gy.device())?;
        Ok((gx, param_grads(&layer.params, grads)?))
    }
}
