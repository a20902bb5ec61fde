//! In-place access to the values of tensors in host memory, so the host AdamW update (CPU
//! training, the offloaded optimizer) touches each value of the state once instead of copying
//! every tensor out and back in per step.

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::OptimError;

/// A host tensor's values, mutable.
pub(crate) enum HostMut<'a> {
    F32(&'a mut [f32]),
    BF16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

/// A host tensor's values, read-only.
pub(crate) enum HostRef<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HostRef<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            HostRef::F32(v) => v.len(),
            HostRef::BF16(v) => v.len(),
            HostRef::F16(v) => v.len(),
        }
    }
}

fn internal(msg: String) -> OptimError {
    OptimError::Candle(candle_core::Error::Msg(msg))
}

type Body<'f> = Box<dyn for<'b> FnOnce(HostMut<'b>) -> Result<(), OptimError> + 'f>;

/// Calls `f` once with the values of `t` (on the CPU, contiguous), in place.
struct Op<'f> {
    f: RefCell<Option<Body<'f>>>,
    out: RefCell<Option<Result<(), OptimError>>>,
}

impl InplaceOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "cpmv-host-values"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (a, b) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("a non-contiguous optimizer tensor".into()))?;
        let values = match storage {
            CpuStorage::F32(v) => HostMut::F32(&mut v[a..b]),
            CpuStorage::BF16(v) => HostMut::BF16(&mut v[a..b]),
            CpuStorage::F16(v) => HostMut::F16(&mut v[a..b]),
            _ => {
                return Err(candle_core::Error::Msg(
                    "an optimizer tensor neither f32 nor half precision".into(),
                ))
            }
        };
        if let Some(f) = self.f.borrow_mut().take() {
            *self.out.borrow_mut() = Some(f(values));
        }
        Ok(())
    }
}

/// Runs `f` on the values of the host tensor `t`, in place (an error for a tensor on a device,
/// non-contiguous, or of another dtype than f32/bf16/f16).
pub(crate) fn with_mut(
    t: &Tensor,
    f: impl for<'b> FnOnce(HostMut<'b>) -> Result<(), OptimError>,
) -> Result<(), OptimError> {
    if !t.device().is_cpu() {
        return Err(internal("host update of a tensor on a device".into()));
    }
    let op = Op {
        f: RefCell::new(Some(Box::new(f))),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op)?;
    op.out
        .into_inner()
        .unwrap_or_else(|| Err(internal("host update did not run".into())))
}

/// Runs `f` on the values of the host tensor `t` (contiguous, or made so).
pub(crate) fn with_ref<R>(
    t: &Tensor,
    f: impl FnOnce(HostRef<'_>) -> Result<R, OptimError>,
) -> Result<R, OptimError> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(internal("host update with a gradient on a device".into()));
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| internal("a non-contiguous gradient".into()))?;
    let values = match cpu {
        CpuStorage::F32(v) => HostRef::F32(&v[a..b]),
        CpuStorage::BF16(v) => HostRef::BF16(&v[a..b]),
        CpuStorage::F16(v) => HostRef::F16(&v[a..b]),
        _ => return Err(internal("a gradient neither f32 nor half precision".into())),
    };
    f(values)
}
