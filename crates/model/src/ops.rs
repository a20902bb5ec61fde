//! Differentiable building blocks.
//!
//! candle-nn's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and rotary kernels have no
//! backward pass: a model built from them trains silently wrong (the gradient just stops). Every
//! function here is either a composition of ops that candle differentiates, or a custom op with its
//! own backward ([`frozen_linear`]). Each is checked against finite differences in the tests.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use crate::config::Gelu;

/// Whether `x` goes through a fused CUDA kernel (cpmv-kernels) instead of the op-by-op
/// composition: CUDA tensors of f32 or bf16, unless `CPMV_UNFUSED=1` is set (a switch to
/// compare the two paths on a GPU). Without the `cuda` feature, never.
#[cfg(feature = "cuda")]
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && !crate::block::unfused_env()
}

/// Whether `x` goes through a fused CUDA kernel (never without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub fn fused(_x: &Tensor) -> bool {
    false
}

/// Statistics of half-precision tensors are computed in f32; f32/f64 stay as they are.
fn stat_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16)
}

/// `x + b` for a parameter row `b` `[D]` broadcast over `x` `[.., D]`. In half precision the add
/// runs in f32 and rounds once, which gives the same values as the half-precision add (that
/// too computes in f32 and rounds), but the backward sum over all rows that makes `b`'s gradient
/// then accumulates in f32, as PyTorch's reductions do, instead of in bf16 (which loses
/// several percent over a few thousand rows).
pub fn add_row_param(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    widened(x, b, |x, b| x.broadcast_add(b))
}

/// `x · w` for a parameter row `w` `[D]`, with `w`'s gradient summed in f32 (see
/// [`add_row_param`]; the product of two bf16 values is exact in f32).
pub fn mul_row_param(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    widened(x, w, |x, w| x.broadcast_mul(w))
}

/// `f(x, p)`, computed in f32 and rounded back when `x` is half precision.
fn widened(
    x: &Tensor,
    p: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if is_half(x.dtype()) {
        f(&x.to_dtype(DType::F32)?, &p.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else {
        f(x, p)
    }
}

/// Root-mean-square normalisation over the last axis, statistics in f32 (as the reference
/// LLMs: normalise in f32, cast back, then multiply by the weight).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        return cpmv_kernels::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(stat_dtype(dtype))?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    mul_row_param(&normed.to_dtype(dtype)?, weight)
}

/// LayerNorm over the last axis (biased variance, as torch), computed in f32 and rounded once.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        return cpmv_kernels::layer_norm(x, weight, bias, eps);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(stat_dtype(dtype))?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    if is_half(dtype) {
        // As torch's LayerNorm on half-precision input: all in f32, one rounding at the end
        // (which also makes the weight and bias gradients f32 sums).
        return normed
            .broadcast_mul(&weight.to_dtype(DType::F32)?)?
            .broadcast_add(&bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype);
    }
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last axis. The row maximum is subtracted as a constant (softmax does not
/// depend on it), so no gradient is routed through the max. Half-precision scores are
/// normalised in f32 and the probabilities rounded once (the reference's attention does the
/// same: `softmax(dtype=float32).to(dtype)`), so the backward pass runs in f32 too.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        return cpmv_kernels::softmax_last(x, 1.0);
    }
    if is_half(x.dtype()) {
        return softmax_last(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last axis (max subtracted as a constant).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Rotary position embedding, "rotate half" convention over the full head dimension:
/// `x * cos + rotate_half(x) * sin`, `rotate_half([a, b]) = [-b, a]`.
/// `x` is `[.., T, Dh]`; `cos`/`sin` are `[T, Dh]` (broadcast over the leading axes).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let half = dh / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Rotary embedding of `x` laid out `[B, T, H, Dh]` (as a projection's output is) with tables
/// `[B, 1, T, Dh]`; returns `[B, H, T, Dh]`. The composition transposes first and calls
/// [`rope`]; the fused kernel works in the projection's layout.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let y = cpmv_kernels::rope_bthd(x, &cos.squeeze(1)?, &sin.squeeze(1)?)?;
        return y.transpose(1, 2);
    }
    rope(&x.transpose(1, 2)?, cos, sin)
}

/// `silu(gate) · up`, the gated MLP's activation (one kernel on CUDA).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(gate) {
        return cpmv_kernels::silu_mul(gate, up);
    }
    gate.silu()? * up
}

/// `gelu(x)` in the given variant, or `x` for `None`. Half-precision inputs are evaluated in
/// f32 and rounded once, forward (as the half-precision op does) and backward (which candle
/// would otherwise compose from a dozen half-precision ops, each rounding).
pub fn activation(x: Tensor, gelu: Option<Gelu>) -> Result<Tensor> {
    if gelu.is_some() && is_half(x.dtype()) {
        return activation(x.to_dtype(DType::F32)?, gelu)?.to_dtype(x.dtype());
    }
    match gelu {
        None => Ok(x),
        Some(Gelu::Erf) => x.gelu_erf(),
        Some(Gelu::Tanh) => x.gelu(),
    }
}

/// `activation(x + b)` for `x` `[.., D]` and a bias `b` `[D]`. On CUDA one kernel each way, with
/// the bias gradient summed row-coalesced (candle's reduction over the leading axis, the
/// broadcast add's backward, reads one strided element per thread); else the composition.
pub fn bias_act(x: &Tensor, b: &Tensor, gelu: Option<Gelu>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x) {
        let act = match gelu {
            None => cpmv_kernels::Act::None,
            Some(Gelu::Tanh) => cpmv_kernels::Act::GeluTanh,
            Some(Gelu::Erf) => cpmv_kernels::Act::GeluErf,
        };
        return cpmv_kernels::bias_act(x, b, act);
    }
    activation(add_row_param(x, b)?, gelu)
}

/// Attention probabilities `softmax(scores / sqrt(dh) + mask)` of `[B, H, Tq, Tk]` scores.
/// The composition adds the additive `mask` (`[B, 1, Tq, Tk]`); the fused kernel reads the
/// allowed key range of every query from `bounds` (u32 `[B, Tq, 2]`) instead, so no mask tensor
/// is needed. Whichever the path, the one it uses must be given.
pub fn masked_attention_probs(
    scores: &Tensor,
    mask: Option<&Tensor>,
    bounds: Option<&Tensor>,
    dh: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(scores) {
        if let Some(b) = bounds {
            return cpmv_kernels::masked_softmax(scores, b, 1.0 / (dh as f64).sqrt());
        }
    }
    let _ = bounds;
    let scores = (scores / (dh as f64).sqrt())?;
    match mask {
        Some(m) => softmax_last(&scores.broadcast_add(m)?),
        None => candle_core::bail!("masked_attention_probs: no mask for the unfused path"),
    }
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` (u32 `[N]`), computed in f32
/// (f64 stays f64).
/// Rows are expected to be supervised ones only (callers select them), so this is the
/// reference's `CrossEntropyLoss(ignore_index=-100)` mean when the selection is done first.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    #[cfg(feature = "cuda")]
    if fused(logits) {
        return cpmv_kernels::cross_entropy_rows(logits, targets)?.sum_all()? / n as f64;
    }
    let logp = log_softmax_last(&logits.to_dtype(stat_dtype(logits.dtype()))?)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    picked.sum_all()?.neg()? / n as f64
}

/// Per-row cross-entropy `[N]` in f32 (for evaluation and summed losses).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(logits) {
        return cpmv_kernels::cross_entropy_rows(logits, targets);
    }
    let logp = log_softmax_last(&logits.to_dtype(stat_dtype(logits.dtype()))?)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// `x @ wᵀ` for a weight that is not trained.
///
/// candle's matmul backward computes the gradient of both operands, so a frozen weight would
/// still get a full-size gradient materialised in every backward pass (LoRA and the default
/// "vision only" full fine-tune would pay for the whole LLM's weight gradients). This op passes
/// the gradient to `x` only. `x` is `[.., K]`, `w` is `[N, K]`, the result `[.., N]`.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    on_rows(x, |x2| x2.contiguous()?.apply_op2(w, FrozenMatmul))
}

/// Applies `f` to `x` `[.., K]` viewed as one `[M, K]` matrix of all leading positions and
/// gives the result `[M, N]` back the leading shape `[.., N]`. Linear layers run as one 2-D
/// product this way: one weight-gradient product instead of one per batch entry plus a sum.
pub fn on_rows(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let y = f(&x.reshape((m, k))?)?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = y.dim(1)?;
    }
    y.reshape(out)
}

struct FrozenMatmul;

impl FrozenMatmul {
    fn shapes(l1: &Layout, l2: &Layout) -> Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_linear: x has {k} columns but the weight has {k2}");
        }
        Ok(((1, m, n, k), l2.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bmnk, l2t) = Self::shapes(l1, l2)?;
        let out = s1.matmul(s2, bmnk, l1, &l2t)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, l2t) = Self::shapes(l1, l2)?;
        let out = s1.matmul(s2, bmnk, l1, &l2t)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// Scaled dot-product attention `softmax(q kᵀ · scale + mask) v` over `[.., L, Dh]` inputs;
/// `mask` is additive and broadcast to the scores.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(q) && mask.is_none() {
        // The scale goes into the fused softmax (no separate pass over the scores), and the
        // product reads kᵀ as a transposed view.
        let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
        return cpmv_kernels::softmax_last(&scores, scale)?.matmul(&v.contiguous()?);
    }
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last(&scores)?.matmul(&v.contiguous()?)
}

/// Additive key-padding mask `[n, 1, 1, l_max]`: 0 for the first `lens[i]` keys of row i,
/// −∞ after.
pub fn key_padding_mask(
    lens: &[usize],
    l_max: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; lens.len() * l_max];
    for (i, &n) in lens.iter().enumerate() {
        for x in &mut m[i * l_max + n.min(l_max)..(i + 1) * l_max] {
            *x = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (lens.len(), 1, 1, l_max), device)?.to_dtype(dtype)
}

/// A dropout mask made on the device for a CUDA tensor `like` (see
/// `cpmv_kernels::dropout_mask`): values `1/keep` or 0, a pure function of `seed`. Only for
/// tensors that [`fused`] accepts; CPU masks are drawn on the host by the callers.
pub fn dropout_mask(like: &Tensor, seed: u64, keep: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(like) {
        return cpmv_kernels::dropout_mask(like, seed, keep);
    }
    let _ = (like, seed, keep);
    candle_core::bail!("dropout_mask: device masks need a CUDA tensor of f32 or bf16")
}

/// Back-propagates from `y` with `grad` as its gradient (the vector-Jacobian product used to
/// run a checkpointed layer's backward with the gradient of its output).
///
/// Equivalent to `(y · grad).sum_all().backward()` without the reduction: the forward of a
/// custom op returns a placeholder zero scalar, and its backward hands `grad` to `y` unchanged.
/// (candle reduces a whole tensor in a single thread block: a `sum_all` over a layer's
/// activations costs milliseconds on a GPU, dozens of times per step.)
pub fn backward_with(y: &Tensor, grad: &Tensor) -> Result<candle_core::backprop::GradStore> {
    if y.shape() != grad.shape() {
        candle_core::bail!(
            "backward_with: gradient {:?} for a tensor of shape {:?}",
            grad.dims(),
            y.dims()
        );
    }
    y.apply_op1(SeedGrad {
        grad: grad.to_dtype(y.dtype())?.detach(),
    })?
    .backward()
}

struct SeedGrad {
    grad: Tensor,
}

impl candle_core::CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = match s.dtype() {
            DType::F32 => CpuStorage::F32(vec![0.0]),
            DType::F64 => CpuStorage::F64(vec![0.0]),
            DType::BF16 => CpuStorage::BF16(vec![half::bf16::ZERO]),
            DType::F16 => CpuStorage::F16(vec![half::f16::ZERO]),
            d => candle_core::bail!("backward_with: unsupported dtype {d:?}"),
        };
        Ok((z, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let shape = Shape::from(());
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

/// Bytes held by a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn var(shape: &[usize], seed: u64) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Compares the analytic gradient of `sum(f(inputs) * probe)` with central finite
    /// differences, in f64, for every input.
    fn check_grad(inputs: &[Var], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let probe =
            Tensor::from_vec(values(out.elem_count(), 99), out.shape(), &Device::Cpu).unwrap();
        let objective = |ts: &[Tensor]| -> f64 {
            (f(ts).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let loss = (out * &probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        for (i, v) in inputs.iter().enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("input {i}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for j in 0..base.len() {
                let shifted = |d: f64| {
                    let mut vals = base.clone();
                    vals[j] += d;
                    let t = Tensor::from_vec(vals, v.as_tensor().shape(), &Device::Cpu).unwrap();
                    let mut args = ts.clone();
                    args[i] = t;
                    objective(&args)
                };
                let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                let err = (fd - g[j]).abs();
                assert!(
                    err <= 1e-6 + 1e-5 * fd.abs(),
                    "input {i} elem {j}: analytic {} vs finite difference {fd}",
                    g[j]
                );
            }
        }
    }

    #[test]
    fn rms_norm_gradient() {
        let x = var(&[3, 8], 1);
        let w = var(&[8], 2);
        check_grad(&[x, w], &|t| rms_norm(&t[0], &t[1], 1e-5));
    }

    #[test]
    fn layer_norm_gradient() {
        let x = var(&[3, 8], 3);
        let w = var(&[8], 4);
        let b = var(&[8], 5);
        check_grad(&[x, w, b], &|t| layer_norm(&t[0], &t[1], &t[2], 1e-6));
    }

    #[test]
    fn softmax_and_log_softmax_gradients() {
        check_grad(&[var(&[2, 3, 7], 6)], &|t| softmax_last(&t[0]));
        check_grad(&[var(&[4, 9], 7)], &|t| log_softmax_last(&t[0]));
    }

    #[test]
    fn rope_gradient() {
        let x = var(&[2, 5, 8], 8);
        let cos = Tensor::from_vec(values(40, 9), (5, 8), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(values(40, 10), (5, 8), &Device::Cpu).unwrap();
        check_grad(&[x], &|t| rope(&t[0], &cos, &sin));
    }

    #[test]
    fn cross_entropy_gradient() {
        let targets = Tensor::new(&[1u32, 0, 6, 3], &Device::Cpu).unwrap();
        check_grad(&[var(&[4, 7], 11)], &|t| cross_entropy(&t[0], &targets));
    }

    #[test]
    fn cross_entropy_matches_definition() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, 0.5, -1.0]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let got = cross_entropy(&logits, &targets)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l0 = -(3f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        let l1 = -(0.5f64 - (2.0 * 0.5f64.exp() + (-1f64).exp()).ln());
        assert!((got as f64 - (l0 + l1) / 2.0).abs() < 1e-6);
    }

    /// `backward_with(y, g)` gives every input the gradients of `sum(y · g)`.
    #[test]
    fn backward_with_equals_the_gradient_of_the_dot_product() {
        let x = var(&[3, 5], 21);
        let w = var(&[4, 5], 22);
        let y = x
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .tanh()
            .unwrap();
        let g = Tensor::from_vec(values(12, 23), (3, 4), &Device::Cpu).unwrap();
        let a = backward_with(&y, &g).unwrap();
        let b = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let ga = a.get(v.as_tensor()).unwrap();
            let gb = b.get(v.as_tensor()).unwrap();
            let d = (ga - gb)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "{d}");
        }
        assert!(backward_with(&y, &g.t().unwrap()).is_err());
    }

    /// The composed (CPU) paths of helpers the fused kernels replace on CUDA.
    #[test]
    fn silu_mul_gradient_and_unmasked_probs_refused() {
        let g = var(&[2, 3, 4], 24);
        let u = var(&[2, 3, 4], 25);
        check_grad(&[g, u], &|t| silu_mul(&t[0], &t[1]));
        // Without a mask the composed path has nothing to use: an error, not a silent softmax.
        let s = Tensor::zeros((1, 1, 2, 2), DType::F64, &Device::Cpu).unwrap();
        assert!(masked_attention_probs(&s, None, None, 4).is_err());
    }

    #[test]
    fn frozen_linear_gradient_reaches_input_only() {
        let x = var(&[2, 3, 5], 12);
        let w = Tensor::from_vec(values(20, 13), (4, 5), &Device::Cpu).unwrap();
        check_grad(std::slice::from_ref(&x), &|t| frozen_linear(&t[0], &w));
        // Same values as a plain matmul.
        let plain = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_linear(x.as_tensor(), &w).unwrap();
        let diff = (plain - frozen).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);
        // No gradient for the weight (nor any tensor of its shape) is stored.
        let grads = frozen_linear(x.as_tensor(), &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            assert_ne!(g.dims(), &[4, 5]);
            assert_ne!(g.dims(), &[5, 4]);
        }
    }

    #[test]
    fn gelu_variants_have_gradients() {
        check_grad_loose(&[var(&[10], 14)], &|t| t[0].gelu_erf());
        check_grad_loose(&[var(&[10], 15)], &|t| t[0].gelu());
        check_grad(&[var(&[10], 16)], &|t| t[0].silu());
    }

    /// candle's GELU backward uses 6-digit constants: check to 1e-5 relative.
    fn check_grad_loose(inputs: &[Var], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
        let out = f(&[inputs[0].as_tensor().clone()]).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(inputs[0].as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = inputs[0].as_tensor().to_vec1::<f64>().unwrap();
        for (j, &x0) in base.iter().enumerate() {
            let eval = |x: f64| {
                f(&[Tensor::new(&[x], &Device::Cpu).unwrap()])
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[0]
            };
            let fd = (eval(x0 + 1e-6) - eval(x0 - 1e-6)) / 2e-6;
            assert!((fd - g[j]).abs() < 1e-5, "elem {j}: {} vs {fd}", g[j]);
        }
    }
}
