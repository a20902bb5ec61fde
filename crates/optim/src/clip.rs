//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_` (the reference clips to a
//! global L2 norm of 1.0).
//!
//! Clipping is split in two so that no gradient is rewritten: [`global_norm`] measures, and the
//! factor from [`clip_factor`] is passed to [`crate::AdamW::step`] as (part of) its `grad_scale`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::OptimError;

/// Elements per f64 chunk in [`global_norm`]: bounds the transient f64 copy (32 MiB) however
/// large a gradient is (an embedding matrix can hold 10⁹ elements).
const NORM_CHUNK: usize = 1 << 22;

/// Global L2 norm of the gradients of `params` that are present in `grads` (parameters with no
/// gradient are skipped), squared and summed in f64 on the gradients' device; one scalar comes
/// back to the host.
///
/// The result also reports non-finite gradients: it is NaN or +∞ exactly when some gradient
/// element is NaN or ±∞ (squares of finite f32/bf16/f16 values cannot overflow f64), which is
/// the signal to skip the step. Returns 0.0 when no parameter has a gradient.
pub fn global_norm(grads: &GradStore, params: &[(String, Var)]) -> Result<f64, OptimError> {
    let mut total: Option<Tensor> = None;
    for (_, var) in params {
        let Some(grad) = grads.get(var.as_tensor()) else {
            continue;
        };
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() && matches!(grad.dtype(), DType::F32 | DType::BF16) {
            // One many-block pass (candle's sum_all reduces in a single block).
            let sum = cpmv_kernels::sum_squares(grad)?;
            total = Some(match total {
                Some(t) => (t + sum)?,
                None => sum,
            });
            continue;
        }
        let flat = grad.detach().flatten_all()?;
        let n = flat.elem_count();
        let mut start = 0;
        while start < n {
            let len = NORM_CHUNK.min(n - start);
            let part = flat.narrow(0, start, len)?.to_dtype(DType::F64)?;
            let sum = part.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sum)?,
                None => sum,
            });
            start += len;
        }
    }
    match total {
        Some(t) => Ok(t.to_scalar::<f64>()?.sqrt()),
        None => Ok(0.0),
    }
}

/// The factor to multiply gradients by so that their global norm is at most `max_norm`:
/// torch's `clip_grad_norm_` coefficient `max_norm / (norm + 1e-6)`, capped at 1 (so gradients
/// under the limit are left as they are, not scaled up). A NaN `norm` gives NaN (torch's clamp
/// propagates it too); check `norm.is_finite()` and skip the step instead of using it.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    let coef = max_norm / (norm + 1e-6);
    if coef.is_nan() {
        return f64::NAN;
    }
    coef.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn factor_caps_at_one_and_propagates_nan() {
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert!((clip_factor(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert!(clip_factor(f64::NAN, 1.0).is_nan());
        assert_eq!(clip_factor(f64::INFINITY, 1.0), 0.0);
    }

    #[test]
    fn norm_skips_missing_and_flags_non_finite() -> Result<(), OptimError> {
        let dev = Device::Cpu;
        let a = Var::zeros(3, DType::F32, &dev)?;
        let b = Var::zeros(2, DType::F32, &dev)?;
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let mut grads = GradStore::default();
        assert_eq!(global_norm(&grads, &params)?, 0.0);
        grads.insert(a.as_tensor(), Tensor::new(&[3f32, 0.0, 4.0], &dev)?);
        assert_eq!(global_norm(&grads, &params)?, 5.0);
        grads.insert(b.as_tensor(), Tensor::new(&[f32::NAN, 1.0], &dev)?);
        assert!(global_norm(&grads, &params)?.is_nan());
        grads.insert(b.as_tensor(), Tensor::new(&[f32::INFINITY, 1.0], &dev)?);
        assert_eq!(global_norm(&grads, &params)?, f64::INFINITY);
        Ok(())
    }
}
