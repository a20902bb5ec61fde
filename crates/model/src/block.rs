//! The block path: a vision layer as one op of `cpmv-block` (hand-written forward and
//! backward) instead of candle's autograd graph of ~100 ops. Layer-wise trainers call
//! [`MiniCpmV::vision_block_forward`] and [`MiniCpmV::vision_block_backward`] where they would
//! recompute a layer and back-propagate through it; the result is the same values (tests hold
//! them to 1e-5 of the autograd path, gradients included) with the same LoRA dropout draws.
//!
//! Decoder layers the same way: [`MiniCpmV::llm_block_forward`] and
//! [`MiniCpmV::llm_block_backward`].
//!
//! The block path runs on the CPU backend in f32, and on the CUDA backend in f32 or bf16
//! (device buffers handed to and from candle without a host round trip, LoRA dropout masks
//! drawn as candle's GPU path draws them) when `CPMV_CUDA_BLOCKS=1` asks for it. Other
//! devices and dtypes, and `CPMV_UNFUSED=1`, keep the autograd path (the reference).

use candle_core::{DType, Device, Shape, Tensor};
use cpmv_block::llm as bl;
use cpmv_block::vision::{self as bv, Grads, Images, Run};
use cpmv_block::{Backend, Cpu, MaskDraws};

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

/// Whether `CPMV_CUDA_BLOCKS=1` asks for the block path on a GPU (f32 or bf16). Off by default
/// until the CUDA backend has passed its checks on a device (benches/gpu/run.sh check).
pub fn cuda_blocks_env() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CPMV_CUDA_BLOCKS").is_ok_and(|v| v == "1"))
}

/// A block backend the model hands its tensors to: candle tensors in, the backend's buffers
/// out, and back, on the device the tensors live on (no host round trip on a GPU).
pub(crate) trait Bridge: Backend {
    /// How LoRA dropout masks are drawn: as candle's path on this device draws them.
    const MASKS: MaskDraws;
    /// The values of `t` (any float dtype) as a buffer of this backend's element type.
    fn buf(&self, t: &Tensor) -> Result<Self::Buf>;
    /// `b` as a tensor of `shape` on `device`, of the backend's element type.
    fn tensor(&self, b: Self::Buf, shape: Shape, device: &Device) -> Result<Tensor>;
    /// Calls `f` with the rotary tables (cos, sin) of a batch, one `[head_dim]` row per token
    /// of all rows: the host tables themselves on the CPU, copies on a device.
    fn with_rope<R>(
        &self,
        aux: &LlmAux,
        f: impl FnOnce(&Self::Buf, &Self::Buf) -> Result<R>,
    ) -> Result<R>;
}

impl Bridge for Cpu {
    const MASKS: MaskDraws = MaskDraws::PerElement;

    fn buf(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    fn tensor(&self, b: Vec<f32>, shape: Shape, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(b, shape, device)?)
    }

    fn with_rope<R>(
        &self,
        aux: &LlmAux,
        f: impl FnOnce(&Vec<f32>, &Vec<f32>) -> Result<R>,
    ) -> Result<R> {
        f(&aux.cos_rows, &aux.sin_rows)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{Device, Shape, Storage, Tensor, WithDType};
    use cpmv_block::{Cuda, Elem, MaskDraws};

    use super::Bridge;
    use crate::error::{ModelError, Result};
    use crate::llm::LlmAux;

    fn not_cuda(what: &str) -> ModelError {
        ModelError::Batch(format!("internal: the CUDA block path got {what}"))
    }

    impl<T: Elem + CudaDType + WithDType> Bridge for Cuda<T> {
        const MASKS: MaskDraws = MaskDraws::PerMask;

        fn buf(&self, t: &Tensor) -> Result<CudaSlice<T>> {
            let t = t.to_dtype(T::DTYPE)?.contiguous()?;
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(not_cuda("a tensor off the GPU"));
            };
            let start = layout.start_offset();
            let view = cs
                .as_cuda_slice::<T>()?
                .slice(start..start + t.elem_count());
            self.stream()
                .clone_dtod(&view)
                .map_err(|e| ModelError::Batch(format!("cuda: {e:?}")))
        }

        fn tensor(&self, b: CudaSlice<T>, shape: Shape, device: &Device) -> Result<Tensor> {
            let Device::Cuda(dev) = device else {
                return Err(not_cuda("a CPU device"));
            };
            if b.len() != shape.elem_count() {
                return Err(ModelError::Batch(format!(
                    "internal: {} values for a tensor of shape {shape:?}",
                    b.len()
                )));
            }
            let storage = CudaStorage::wrap_cuda_slice(b, dev.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }

        fn with_rope<R>(
            &self,
            aux: &LlmAux,
            f: impl FnOnce(&CudaSlice<T>, &CudaSlice<T>) -> Result<R>,
        ) -> Result<R> {
            f(&self.buf(&aux.cos)?, &self.buf(&aux.sin)?)
        }
    }
}

/// Collects a layer's tensors for the block path; trainable ones get a gradient slot.
pub(crate) struct Collect<'a, B> {
    be: &'a B,
    /// The tensor of each slot (a variable's tensor: gradients are keyed by its id).
    params: Vec<Tensor>,
}

impl<B: Bridge> Collect<'_, B> {
    pub(crate) fn param(&mut self, t: &Tensor) -> Result<bv::Param<B>> {
        let value = self.be.buf(t)?;
        let slot = t.is_variable().then(|| {
            self.params.push(t.clone());
            self.params.len() - 1
        });
        Ok(bv::Param { value, slot })
    }

    pub(crate) fn norm(&mut self, n: &(Tensor, Tensor)) -> Result<bv::Norm<B>> {
        Ok(bv::Norm {
            weight: self.param(&n.0)?,
            bias: self.param(&n.1)?,
        })
    }

    pub(crate) fn linear(&mut self, l: &Linear) -> Result<bv::Linear<B>> {
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

/// A layer made for the block path (vision or decoder) on a backend, with the tensors
/// behind its gradient slots.
pub(crate) struct BlockLayer<L> {
    pub(crate) layer: L,
    pub(crate) params: Vec<Tensor>,
}

impl<L> BlockLayer<L> {
    pub(crate) fn new<B: Bridge>(
        be: &B,
        f: impl FnOnce(&mut Collect<'_, B>) -> Result<L>,
    ) -> Result<Self> {
        let mut c = Collect {
            be,
            params: Vec::new(),
        };
        let layer = f(&mut c)?;
        Ok(BlockLayer {
            layer,
            params: c.params,
        })
    }
}

/// A vision layer's saved activations on the backend that ran it.
enum VisionSaved {
    Cpu(Box<bv::Saved<Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<bv::Saved<cpmv_block::Cuda>>),
    #[cfg(feature = "cuda")]
    CudaBf16(Box<bv::Saved<cpmv_block::Cuda<half::bf16>>>),
}

/// A decoder layer's saved activations on the backend that ran it.
enum LlmSaved {
    Cpu(Box<bl::Saved<Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<bl::Saved<cpmv_block::Cuda>>),
    #[cfg(feature = "cuda")]
    CudaBf16(Box<bl::Saved<cpmv_block::Cuda<half::bf16>>>),
}

/// What [`MiniCpmV::vision_block_backward`] needs of a forward pass.
pub struct VisionBlockState {
    layer: usize,
    dims: (usize, usize, usize),
    saved: VisionSaved,
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

/// The block path asked of a device it does not run on.
fn unsupported(device: &Device) -> ModelError {
    ModelError::Batch(format!("the block path does not run on {device:?}"))
}

/// A backward pass given the state of a forward pass on another device.
fn mismatch(layer: &str) -> ModelError {
    ModelError::Batch(format!(
        "internal: {layer} state from another device than the model's"
    ))
}

impl MiniCpmV {
    /// Whether vision layers run on the block path: asked for at load
    /// ([`crate::LoadOptions::block_path`]) and available for the model's device and dtype:
    /// f32 on the CPU; f32 or bf16 on a GPU with `CPMV_CUDA_BLOCKS=1` ([`cuda_blocks_env`]).
    pub fn vision_on_blocks(&self) -> bool {
        let (device, dtype) = (self.params().device(), self.params().dtype());
        let here = match device {
            Device::Cpu => dtype == DType::F32,
            Device::Cuda(_) => {
                cfg!(feature = "cuda")
                    && cuda_blocks_env()
                    && matches!(dtype, DType::F32 | DType::BF16)
            }
            _ => false,
        };
        self.block_path() && here
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
        let bounds = key_bounds(input, l_max);
        let im = Images {
            seqs: n,
            len: l_max,
            bounds: &bounds,
        };
        let (y, saved) = match x.device() {
            Device::Cpu => {
                let (y, s) = self.vision_forward_on(&Cpu, i, x, &im, train, save)?;
                (y, s.map(|s| VisionSaved::Cpu(Box::new(s))))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) if x.dtype() == DType::BF16 => {
                let g = &self.cuda_backends(dev)?.1;
                let (y, s) = self.vision_forward_on(g, i, x, &im, train, save)?;
                (y, s.map(|s| VisionSaved::CudaBf16(Box::new(s))))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let g = &self.cuda_backends(dev)?.0;
                let (y, s) = self.vision_forward_on(g, i, x, &im, train, save)?;
                (y, s.map(|s| VisionSaved::Cuda(Box::new(s))))
            }
            other => return Err(unsupported(other)),
        };
        let state = saved.map(|saved| VisionBlockState {
            layer: i,
            dims: (n, l_max, c),
            saved,
        });
        Ok((y, state))
    }

    fn vision_forward_on<B: Bridge>(
        &self,
        be: &B,
        i: usize,
        x: &Tensor,
        im: &Images,
        train: bool,
        save: bool,
    ) -> Result<(Tensor, Option<bv::Saved<B>>)> {
        let layer = self.vision_block_layer(be, i)?;
        let xs = be.buf(x)?;
        let (y, saved) = run_with::<B, _>(self, train, |run| {
            layer.layer.forward(be, &xs, im, run, save)
        })?;
        Ok((be.tensor(y, x.shape().clone(), x.device())?, saved))
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
        match (&state.saved, gy.device()) {
            (VisionSaved::Cpu(s), Device::Cpu) => self.vision_backward_on(&Cpu, state.layer, s, gy),
            #[cfg(feature = "cuda")]
            (VisionSaved::Cuda(s), Device::Cuda(dev)) => {
                self.vision_backward_on(&self.cuda_backends(dev)?.0, state.layer, s, gy)
            }
            #[cfg(feature = "cuda")]
            (VisionSaved::CudaBf16(s), Device::Cuda(dev)) => {
                self.vision_backward_on(&self.cuda_backends(dev)?.1, state.layer, s, gy)
            }
            _ => Err(mismatch("vision layer")),
        }
    }

    fn vision_backward_on<B: Bridge>(
        &self,
        be: &B,
        i: usize,
        saved: &bv::Saved<B>,
        gy: &Tensor,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let layer = self.vision_block_layer(be, i)?;
        let gys = be.buf(gy)?;
        let mut grads = Grads::<B>::default();
        let gx = layer.layer.backward(be, saved, &gys, &mut grads)?;
        let gx = be.tensor(gx, gy.shape().clone(), gy.device())?;
        Ok((gx, param_grads(be, &layer.params, grads)?))
    }
}

/// The gradients of a block layer's slots, each with the tensor it belongs to.
fn param_grads<B: Bridge>(
    be: &B,
    params: &[Tensor],
    grads: Grads<B>,
) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out = Vec::with_capacity(grads.by_slot.len());
    for (slot, g) in grads.by_slot {
        let p = &params[slot];
        out.push((p.clone(), be.tensor(g, p.shape().clone(), p.device())?));
    }
    Ok(out)
}

/// The generator-backed draw of the model's LoRA dropout masks, drawn as `B` draws them.
fn run_with<B: Bridge, T>(model: &MiniCpmV, train: bool, f: impl FnOnce(&mut Run) -> T) -> T {
    let rng = model.dropout_cell();
    let mut draw = || rng.lock().unwrap_or_else(|p| p.into_inner()).next_u64();
    let mut run = Run {
        train,
        draw: &mut draw,
        masks: B::MASKS,
    };
    f(&mut run)
}

/// A batch of `seqs` rows of `len` tokens for the decoder block, with its rotary tables.
fn tokens<'a, B: Bridge>(
    aux: &'a LlmAux,
    seqs: usize,
    len: usize,
    cos: &'a B::Buf,
    sin: &'a B::Buf,
) -> bl::Tokens<'a, B> {
    bl::Tokens {
        seqs,
        len,
        bounds: &aux.keys,
        cos,
        sin,
    }
}

/// What [`MiniCpmV::llm_block_backward`] needs of a forward pass.
pub struct LlmBlockState {
    layer: usize,
    dims: (usize, usize, usize),
    saved: LlmSaved,
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
        let (y, saved) = match x.device() {
            Device::Cpu => {
                let (y, s) = self.llm_forward_on(&Cpu, i, x, aux, train, save)?;
                (y, s.map(|s| LlmSaved::Cpu(Box::new(s))))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) if x.dtype() == DType::BF16 => {
                let g = &self.cuda_backends(dev)?.1;
                let (y, s) = self.llm_forward_on(g, i, x, aux, train, save)?;
                (y, s.map(|s| LlmSaved::CudaBf16(Box::new(s))))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                let g = &self.cuda_backends(dev)?.0;
                let (y, s) = self.llm_forward_on(g, i, x, aux, train, save)?;
                (y, s.map(|s| LlmSaved::Cuda(Box::new(s))))
            }
            other => return Err(unsupported(other)),
        };
        let state = saved.map(|saved| LlmBlockState {
            layer: i,
            dims: (b, t, h),
            saved,
        });
        Ok((y, state))
    }

    fn llm_forward_on<B: Bridge>(
        &self,
        be: &B,
        i: usize,
        x: &Tensor,
        aux: &LlmAux,
        train: bool,
        save: bool,
    ) -> Result<(Tensor, Option<bl::Saved<B>>)> {
        let (b, t, _) = x.dims3()?;
        let layer = self.llm().block_layer(be, i)?;
        let xs = be.buf(x)?;
        let (y, saved) = be.with_rope(aux, |cos, sin| {
            let tokens = tokens(aux, b, t, cos, sin);
            Ok(run_with::<B, _>(self, train, |run| {
                layer.layer.forward(be, &xs, &tokens, run, save)
            })?)
        })?;
        Ok((be.tensor(y, x.shape().clone(), x.device())?, saved))
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
        match (&state.saved, gy.device()) {
            (LlmSaved::Cpu(s), Device::Cpu) => self.llm_backward_on(&Cpu, state.layer, s, aux, gy),
            #[cfg(feature = "cuda")]
            (LlmSaved::Cuda(s), Device::Cuda(dev)) => {
                self.llm_backward_on(&self.cuda_backends(dev)?.0, state.layer, s, aux, gy)
            }
            #[cfg(feature = "cuda")]
            (LlmSaved::CudaBf16(s), Device::Cuda(dev)) => {
                self.llm_backward_on(&self.cuda_backends(dev)?.1, state.layer, s, aux, gy)
            }
            _ => Err(mismatch("decoder layer")),
        }
    }

    fn llm_backward_on<B: Bridge>(
        &self,
        be: &B,
        i: usize,
        saved: &bl::Saved<B>,
        aux: &LlmAux,
        gy: &Tensor,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (b, t, _) = gy.dims3()?;
        let layer = self.llm().block_layer(be, i)?;
        let gys = be.buf(gy)?;
        let mut grads = Grads::<B>::default();
        let gx = be.with_rope(aux, |cos, sin| {
            let tokens = tokens(aux, b, t, cos, sin);
            Ok(layer.layer.backward(be, saved, &tokens, &gys, &mut grads)?)
        })?;
        let gx = be.tensor(gx, gy.shape().clone(), gy.device())?;
        Ok((gx, param_grads(be, &layer.params, grads)?))
    }
}
