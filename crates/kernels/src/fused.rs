//! The custom ops (forward + backward) and their launchers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Storage, Tensor,
};
use half::bf16;
use std::sync::Arc;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cpmv.ptx"));
const MODULE: &str = "cpmv_kernels";
/// Rows per block in the norm backward kernels (their weight-gradient atomics are this many
/// times fewer than one per row).
const NORM_BWD_ROWS: usize = 4;
/// Largest row a norm kernel handles: 32 columns per thread × 256 threads.
const MAX_NORM_DIM: usize = 32 * 256;

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => bail!("cpmv-kernels: {d:?} is not supported (f32 and bf16 are)"),
    }
}

/// A kernel of the embedded module and the device's stream to launch it on.
fn func(dev: &CudaDevice, name: &str, dtype: DType) -> Result<Kernel> {
    let f = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(dtype)?), MODULE, PTX)?;
    Ok(Kernel {
        func: f.into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name}: a CUDA-only fused op was called on CPU tensors (use the composition in cpmv-model's ops)")
}

/// The `name` and the refusing `cpu_fwd` of a CUDA-only custom op of 1, 2 or 3 arguments.
macro_rules! cuda_only {
    (1, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported($name)
        }
    };
    (2, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported($name)
        }
    };
    (3, $name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported($name)
        }
    };
}

// Launch soundness. Every `unsafe` launch below relies on these, and its `SAFETY:` comment
// adds what is particular to it (argument list, buffer lengths, the checks guaranteeing them):
// - Types: `func` loads `{name}_{f32|bf16}` for the dtype that `typed!` binds `T` to, and
//   `as_cuda_slice::<T>` fails on storage of any other dtype, so every pointer has the element
//   type the kernel declares. Scalars are pushed as `i32` (`int`, converted by `int`, never
//   wrapped), `f32` (`float`), `usize`/`u64` (`size_t`/`uint64_t`, 64-bit on our targets).
// - Inputs: `view` hands out exactly a contiguous layout's elements, or fails.
// - Outputs: allocated just before the launch, so never aliased with an input or anything else.
// - Grids: `rows_cfg`/`elems_cfg` refuse grids over the 2³¹ − 1 block limit (never truncate),
//   and the element kernels return for indices past their `n`.
// - Ordering: the kernel is queued on the device's stream (`dev.cuda_stream()`), the one candle
//   queues this device's work on, so it runs after the writes of its inputs and before any later
//   read or (stream-ordered) free of its buffers.

/// Rows of 256 threads (the row kernels), one block per row.
fn rows_cfg(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(rows)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One thread per element, 256 per block (the kernel returns for indices `>= n`).
fn elems_cfg(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(n.div_ceil(256))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid's x size: CUDA allows at most 2³¹ − 1 blocks (a plain `as u32` would truncate).
fn grid_x(blocks: usize) -> Result<u32> {
    match u32::try_from(blocks) {
        Ok(b) if b <= i32::MAX as u32 => Ok(b),
        _ => bail!("cpmv-kernels: a grid of {blocks} blocks (at most 2³¹ − 1)"),
    }
}

/// A size passed as a kernel's `int` argument: an error past `i32::MAX` instead of a wrapped
/// (possibly negative) value.
fn int(v: usize, what: &str) -> Result<i32> {
    match i32::try_from(v) {
        Ok(v) => Ok(v),
        Err(_) => bail!("cpmv-kernels: {what} of {v} does not fit a kernel's int"),
    }
}

/// The kernel reads `n` elements of this argument: its layout must hold exactly that many.
fn check_len(l: &Layout, n: usize, what: &str) -> Result<()> {
    let got = l.shape().elem_count();
    if got != n {
        bail!("cpmv-kernels: {what} has {got} elements, the kernel reads {n}");
    }
    Ok(())
}

/// A contiguous view of a storage of element type `T`.
fn view<'a, T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => bail!("cpmv-kernels: {what} must be contiguous"),
    }
}

/// Dispatches a body over the two supported element types.
macro_rules! typed {
    ($dtype:expr, $t:ident, $body:block) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            d => bail!("cpmv-kernels: {d:?} is not supported (f32 and bf16 are)"),
        }
    };
}

fn check_same(a: DType, b: DType, what: &str) -> Result<()> {
    if a != b {
        bail!("cpmv-kernels: {what}: dtypes differ ({a:?} vs {b:?})");
    }
    Ok(())
}

fn last_dim(l: &Layout) -> Result<(usize, usize)> {
    let d = l.shape().dims().last().copied().unwrap_or(1);
    let n = l.shape().elem_count() / d.max(1);
    Ok((n, d))
}

// ------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    cuda_only!(2, "cpmv-rms-norm");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), w.dtype(), "rms_norm")?;
        let dev = x.device().clone();
        let (n, d) = last_dim(lx)?;
        check_len(lw, d, "rms_norm weight")?;
        let (a_d, cfg) = (int(d, "rms_norm row")?, rows_cfg(n)?);
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let ws = view(w.as_cuda_slice::<T>()?, lw, "weight")?;
            // SAFETY: uninitialised memory, but the launch below writes all n·d elements (each
            // block all d of its row) before anything reads it; on error it is dropped unread.
            let y = unsafe { dev.alloc::<T>(n * d)? };
            let f = func(&dev, "rms_norm_fwd", x.dtype())?;
            let mut b = f.builder();
            b.arg(&xs).arg(&ws).arg(&y).arg(&a_d).arg(&self.eps);
            // SAFETY: rms_norm_fwd(x, w, y, int d, float eps), see "Launch soundness". Block r
            // of n reads x[r·d..][..d] and w[..d] and writes y[r·d..][..d]: x and y hold n·d
            // elements (`last_dim`), w d (`check_len`).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), lx.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let out = x.apply_op3_no_bwd(
            w,
            &dy.contiguous()?,
            &NormBwd {
                eps: self.eps,
                bias: false,
            },
        )?;
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        // The weight gradient is copied out of the activation-sized buffer (a view would keep
        // that buffer alive as long as the gradient is held, i.e. until the optimiser step),
        // and not made at all for a frozen weight.
        let dw = match w.track_op() {
            true => Some(out.narrow(0, n, d)?.copy()?.reshape(w.shape())?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

/// Backward of RMSNorm (`bias: false`; output `[dx | dw]`) or LayerNorm (`bias: true`; output
/// `[dx | dw | db]`), flattened.
struct NormBwd {
    eps: f32,
    bias: bool,
}

impl CustomOp3 for NormBwd {
    cuda_only!(3, "cpmv-norm-bwd");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), w.dtype(), "norm backward")?;
        check_same(x.dtype(), dy.dtype(), "norm backward")?;
        let dev = x.device().clone();
        let (n, d) = last_dim(lx)?;
        // The kernels keep MAX_COLS_PER_THREAD (32) weight-gradient accumulators per thread in a
        // local array: a longer row would index past it. Rows are counted in int, `r0 + rows`
        // included.
        if d == 0 || d > MAX_NORM_DIM || n > i32::MAX as usize - NORM_BWD_ROWS {
            bail!("cpmv-kernels: norm backward of {n} rows of {d}");
        }
        check_len(lw, d, "norm backward weight")?;
        check_len(ldy, n * d, "norm backward grad")?;
        let nacc = if self.bias { 2 * d } else { d };
        let total = n * d + nacc;
        let (a_n, a_d, a_nacc) = (
            int(n, "norm rows")?,
            int(d, "norm row")?,
            int(nacc, "norm")?,
        );
        let a_rows = NORM_BWD_ROWS as i32;
        let (cfg, cast_cfg) = (rows_cfg(n.div_ceil(NORM_BWD_ROWS))?, elems_cfg(nacc)?);
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let ws = view(w.as_cuda_slice::<T>()?, lw, "weight")?;
            let gs = view(dy.as_cuda_slice::<T>()?, ldy, "grad")?;
            // SAFETY: uninitialised memory, but the two launches below write all of it (dx: all
            // n·d; the tail: all nacc) before anything reads it; on error it is dropped unread.
            let out = unsafe { dev.alloc::<T>(total)? };
            let acc = dev.alloc_zeros::<f32>(nacc)?;
            let name = if self.bias {
                "layer_norm_bwd"
            } else {
                "rms_norm_bwd"
            };
            let f = func(&dev, name, x.dtype())?;
            let dx = out.slice(0..n * d);
            let mut b = f.builder();
            b.arg(&xs)
                .arg(&ws)
                .arg(&gs)
                .arg(&dx)
                .arg(&acc)
                .arg(&a_n)
                .arg(&a_d)
                .arg(&self.eps)
                .arg(&a_rows);
            // SAFETY: {rms,layer}_norm_bwd(x, w, dy, dx, dw32, int n, int d, float eps, int rows),
            // see "Launch soundness". Block k does rows [4k, 4k + 4) ∩ [0, n) of x, dy, dx (n·d
            // each, checked above), reads w[..d] and adds into acc (nacc f32, zeroed). d ≤ 8192
            // keeps each thread's ceil(d/256) ≤ 32 local accumulators in bounds.
            unsafe { b.launch(cfg) }.w()?;
            let tail = out.slice(n * d..total);
            let f = func(&dev, "cast_out", x.dtype())?;
            let mut b = f.builder();
            b.arg(&acc).arg(&tail).arg(&a_nacc);
            // SAFETY: cast_out(const float *src, T *out, int n), see "Launch soundness": thread
            // i < nacc reads acc[i] and writes tail[i]; both hold nacc elements. Ordered after
            // the kernel above (same stream), which finished the atomics into acc.
            unsafe { b.launch(cast_cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(total)))
        })
    }
}

/// A norm's row length must equal its parameters' and fit the kernels (1 ≤ D ≤ 8192); rows
/// of zero are not launched.
fn check_norm_shapes(x: &Tensor, params: &[&Tensor], what: &str) -> Result<()> {
    let d = x.dim(candle_core::D::Minus1)?;
    if d == 0 || d > MAX_NORM_DIM {
        bail!("cpmv-kernels: {what} rows of {d} (1..={MAX_NORM_DIM} supported)");
    }
    for p in params {
        if p.dims() != [d] {
            bail!(
                "cpmv-kernels: {what} parameter {:?} for rows of {d}",
                p.dims()
            );
        }
    }
    if x.elem_count() == 0 {
        bail!("cpmv-kernels: {what} of an empty tensor");
    }
    Ok(())
}

/// RMSNorm over the last axis: `round(x / sqrt(mean(x²) + eps)) · w`, statistics in f32.
/// `x` `[.., D]` and `w` `[D]` on one CUDA device, same dtype (f32 or bf16), `D ≤ 8192`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm_shapes(x, &[w], "rms_norm")?;
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    cuda_only!(3, "cpmv-layer-norm");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), w.dtype(), "layer_norm")?;
        check_same(x.dtype(), bias.dtype(), "layer_norm")?;
        let dev = x.device().clone();
        let (n, d) = last_dim(lx)?;
        check_len(lw, d, "layer_norm weight")?;
        check_len(lb, d, "layer_norm bias")?;
        let (a_d, cfg) = (int(d, "layer_norm row")?, rows_cfg(n)?);
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let ws = view(w.as_cuda_slice::<T>()?, lw, "weight")?;
            let bs = view(bias.as_cuda_slice::<T>()?, lb, "bias")?;
            // SAFETY: uninitialised memory, but the launch below writes all n·d elements (each
            // block all d of its row) before anything reads it; on error it is dropped unread.
            let y = unsafe { dev.alloc::<T>(n * d)? };
            let f = func(&dev, "layer_norm_fwd", x.dtype())?;
            let mut b = f.builder();
            b.arg(&xs)
                .arg(&ws)
                .arg(&bs)
                .arg(&y)
                .arg(&a_d)
                .arg(&self.eps);
            // SAFETY: layer_norm_fwd(x, w, b, y, int d, float eps), see "Launch soundness". Block
            // r of n reads x[r·d..][..d], w[..d], b[..d] and writes y[r·d..][..d]: x and y hold
            // n·d elements (`last_dim`), w and b d each (`check_len`).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), lx.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let out = x.apply_op3_no_bwd(
            w,
            &dy.contiguous()?,
            &NormBwd {
                eps: self.eps,
                bias: true,
            },
        )?;
        let dx = out.narrow(0, 0, n)?.reshape(x.shape())?;
        // Copied out, or not made when frozen (see RmsNorm's backward).
        let tail = |t: &Tensor, start: usize| -> Result<Option<Tensor>> {
            match t.track_op() {
                true => Ok(Some(out.narrow(0, start, d)?.copy()?.reshape(t.shape())?)),
                false => Ok(None),
            }
        };
        Ok((Some(dx), tail(w, n)?, tail(b, n + d)?))
    }
}

/// LayerNorm over the last axis (biased variance, as torch): `round(x̂·w + b)`, all in f32. Same constraints as [`rms_norm`].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm_shapes(x, &[w, b], "layer_norm")?;
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

// ------------------------------------------------------------------------------------------
// SiLU(gate) · up

struct SiluMul;

impl CustomOp2 for SiluMul {
    cuda_only!(2, "cpmv-silu-mul");
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(g.dtype(), u.dtype(), "silu_mul")?;
        if lg.shape() != lu.shape() {
            bail!("cpmv-kernels: silu_mul shapes differ");
        }
        let dev = g.device().clone();
        let n = lg.shape().elem_count();
        let cfg = elems_cfg(n)?;
        typed!(g.dtype(), T, {
            let gs = view(g.as_cuda_slice::<T>()?, lg, "gate")?;
            let us = view(u.as_cuda_slice::<T>()?, lu, "up")?;
            // SAFETY: uninitialised memory, but the launch below writes all n elements before
            // anything reads it; on error it is dropped unread.
            let y = unsafe { dev.alloc::<T>(n)? };
            let f = func(&dev, "silu_mul_fwd", g.dtype())?;
            let mut b = f.builder();
            b.arg(&gs).arg(&us).arg(&y).arg(&n);
            // SAFETY: silu_mul_fwd(g, u, y, size_t n), see "Launch soundness": thread i < n
            // reads g[i], u[i] and writes y[i]; all three hold n elements (equal shapes above).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), lg.shape().clone()))
        })
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let out = g.apply_op3_no_bwd(u, &dy.contiguous()?, &SiluMulBwd)?;
        Ok((
            Some(out.narrow(0, 0, n)?.reshape(g.shape())?),
            Some(out.narrow(0, n, n)?.reshape(u.shape())?),
        ))
    }
}

struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    cuda_only!(3, "cpmv-silu-mul-bwd");
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        u: &CudaStorage,
        lu: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = g.device().clone();
        let n = lg.shape().elem_count();
        check_len(lu, n, "silu_mul backward up")?;
        check_len(ldy, n, "silu_mul backward grad")?;
        let cfg = elems_cfg(n)?;
        typed!(g.dtype(), T, {
            let gs = view(g.as_cuda_slice::<T>()?, lg, "gate")?;
            let us = view(u.as_cuda_slice::<T>()?, lu, "up")?;
            let ds = view(dy.as_cuda_slice::<T>()?, ldy, "grad")?;
            // SAFETY: uninitialised memory, but the launch below writes all 2n elements
            // (out[i] and out[n + i] for every i < n) before anything reads it.
            let out = unsafe { dev.alloc::<T>(2 * n)? };
            let f = func(&dev, "silu_mul_bwd", g.dtype())?;
            let mut b = f.builder();
            b.arg(&gs).arg(&us).arg(&ds).arg(&out).arg(&n);
            // SAFETY: silu_mul_bwd(g, u, dy, out, size_t n), see "Launch soundness": thread
            // i < n reads g[i], u[i], dy[i] (n each, `check_len`) and writes out[i], out[n + i].
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(2 * n)))
        })
    }
}

/// `silu(gate) · up` in one pass (the gated MLP's activation), same shapes and dtype.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.elem_count() == 0 {
        return gate.mul(up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

// ------------------------------------------------------------------------------------------
// Rotary embedding

struct Rope {
    heads: usize,
    forward: bool,
}

impl CustomOp3 for Rope {
    cuda_only!(3, "cpmv-rope");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        c: &CudaStorage,
        lc: &Layout,
        s: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), c.dtype(), "rope")?;
        check_same(x.dtype(), s.dtype(), "rope")?;
        let dev = x.device().clone();
        let n = lx.shape().elem_count();
        let (bt, dh) = last_dim(lc)?;
        if n != bt * self.heads * dh {
            bail!("cpmv-kernels: rope tables do not match x");
        }
        check_len(ls, bt * dh, "rope sin table")?;
        let a_bt = int(bt, "rope rows")?;
        let a_heads = int(self.heads, "rope heads")?;
        let a_dh = int(dh, "rope head dim")?;
        let cfg = elems_cfg(n)?;
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let cs = view(c.as_cuda_slice::<T>()?, lc, "cos")?;
            let ss = view(s.as_cuda_slice::<T>()?, ls, "sin")?;
            // SAFETY: uninitialised memory, but the launch below writes all n elements before
            // anything reads it; on error it is dropped unread.
            let y = unsafe { dev.alloc::<T>(n)? };
            let f = func(&dev, "rope", x.dtype())?;
            let dir: f32 = if self.forward { 1.0 } else { -1.0 };
            let mut b = f.builder();
            b.arg(&xs)
                .arg(&cs)
                .arg(&ss)
                .arg(&y)
                .arg(&a_bt)
                .arg(&a_heads)
                .arg(&a_dh)
                .arg(&dir);
            // SAFETY: rope(x, cos, sin, y, int bt, int h, int dh, float dir), see "Launch
            // soundness". Thread i < n = bt·h·dh (checked above) reads x[i ± dh/2] within its
            // row of dh and table entries (i / (h·dh))·dh + k (± dh/2) < bt·dh, the length of
            // both tables (`last_dim`, `check_len`), and writes y[i].
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), lx.shape().clone()))
        })
    }
    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3_no_bwd(
            c,
            s,
            &Rope {
                heads: self.heads,
                forward: false,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding (rotate-half convention over the full head dimension) of `x` laid out
/// `[B, T, H, Dh]` with tables `cos`/`sin` `[B, T, Dh]` (no gradient to the tables).
pub fn rope_bthd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, h, dh) = x.dims4()?;
    if dh % 2 != 0 || cos.dims() != [b, t, dh] || sin.dims() != [b, t, dh] {
        bail!(
            "cpmv-kernels: rope of {:?} needs an even head dim and tables [{b}, {t}, {dh}], got {:?} / {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope {
            heads: h,
            forward: true,
        },
    )
}

// ------------------------------------------------------------------------------------------
// Softmax (optionally masked by allowed-key ranges)

struct Softmax {
    heads: usize,
    tq: usize,
    scale: f32,
}

impl Softmax {
    fn launch(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        bounds: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        let (rows, tk) = last_dim(ls)?;
        // Row r reads bounds[2·(b·tq + q)..][..2], b = r / (heads·tq), q = r % tq: exactly
        // [B, tq, 2] words when rows = B·heads·tq.
        if let Some((_, lb)) = bounds {
            let per_b = self.heads * self.tq;
            if per_b == 0 || rows % per_b != 0 {
                bail!("cpmv-kernels: masked softmax of {rows} rows, not [B, {per_b}]");
            }
            check_len(lb, 2 * (rows / per_b) * self.tq, "softmax bounds")?;
        }
        let a_tk = int(tk, "softmax row")?;
        let (heads, tq) = (int(self.heads, "heads")?, int(self.tq, "queries")?);
        let cfg = rows_cfg(rows)?;
        typed!(s.dtype(), T, {
            let ss = view(s.as_cuda_slice::<T>()?, ls, "scores")?;
            // SAFETY: uninitialised memory, but the launch below writes all rows·tk elements
            // (each block every j < tk of its row) before anything reads it.
            let p = unsafe { dev.alloc::<T>(rows * tk)? };
            let f = func(&dev, "softmax_fwd", s.dtype())?;
            let mut b = f.builder();
            b.arg(&ss).arg(&p);
            let bv;
            let null = 0u64;
            match bounds {
                Some((bs, lb)) => {
                    bv = view(bs.as_cuda_slice::<u32>()?, lb, "bounds")?;
                    b.arg(&bv);
                }
                None => {
                    b.arg(&null);
                }
            }
            b.arg(&heads).arg(&tq).arg(&a_tk).arg(&self.scale);
            // SAFETY: softmax_fwd(s, p, const uint32_t *bounds, int heads, int tq, int tk, float
            // scale), see "Launch soundness"; `null` is a 64-bit NULL pointer (no bounds). Block
            // r of rows reads s and writes p in [r·tk, r·tk + tk) (rows·tk each); the bounds it
            // reads are in range (checked above) and clamped to [0, tk] by the kernel.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(p, dev), ls.shape().clone()))
        })
    }
}

impl CustomOp1 for Softmax {
    cuda_only!(1, "cpmv-softmax");
    fn cuda_fwd(&self, s: &CudaStorage, ls: &Layout) -> Result<(CudaStorage, Shape)> {
        self.launch(s, ls, None)
    }
    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(
            &dp.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

impl CustomOp2 for Softmax {
    cuda_only!(2, "cpmv-masked-softmax");
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if b.dtype() != DType::U32 {
            bail!("cpmv-kernels: softmax bounds must be u32");
        }
        self.launch(s, ls, Some((b, lb)))
    }
    fn bwd(
        &self,
        _s: &Tensor,
        _b: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    cuda_only!(2, "cpmv-softmax-bwd");
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        lp: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(p.dtype(), dp.dtype(), "softmax backward")?;
        let dev = p.device().clone();
        let (rows, tk) = last_dim(lp)?;
        check_len(ldp, rows * tk, "softmax backward grad")?;
        let (a_tk, cfg) = (int(tk, "softmax row")?, rows_cfg(rows)?);
        typed!(p.dtype(), T, {
            let ps = view(p.as_cuda_slice::<T>()?, lp, "probs")?;
            let gs = view(dp.as_cuda_slice::<T>()?, ldp, "grad")?;
            // SAFETY: uninitialised memory, but the launch below writes all rows·tk elements
            // before anything reads it; on error it is dropped unread.
            let ds = unsafe { dev.alloc::<T>(rows * tk)? };
            let f = func(&dev, "softmax_bwd", p.dtype())?;
            let mut b = f.builder();
            b.arg(&ps).arg(&gs).arg(&ds).arg(&a_tk).arg(&self.scale);
            // SAFETY: softmax_bwd(p, dp, ds, int tk, float scale), see "Launch soundness":
            // block r of rows reads p, dp and writes ds in [r·tk, r·tk + tk); all three hold
            // rows·tk elements (`last_dim`, `check_len`).
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(ds, dev), lp.shape().clone()))
        })
    }
}

/// Softmax over the last axis of `scores · scale`, statistics in f32.
pub fn softmax_last(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.elem_count() == 0 {
        bail!("cpmv-kernels: softmax of an empty tensor");
    }
    scores.contiguous()?.apply_op1(Softmax {
        heads: 1,
        tq: 1,
        scale: scale as f32,
    })
}

/// Attention probabilities of `scores` `[B, H, Tq, Tk]` (times `scale`) where query `q` of row
/// `b` may only see keys `lo ≤ j < hi`, `(lo, hi) = bounds[b, q]` (`bounds` u32 `[B, Tq, 2]`);
/// other keys get probability 0. A packed causal row uses `lo` = its sample's first position and
/// `hi = q + 1`, so no `[T, T]` mask tensor exists.
pub fn masked_softmax(scores: &Tensor, bounds: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, tq, tk) = scores.dims4()?;
    if b * h * tq * tk == 0 {
        bail!(
            "cpmv-kernels: masked_softmax of empty scores {:?}",
            scores.dims()
        );
    }
    if bounds.dims() != [b, tq, 2] {
        bail!(
            "cpmv-kernels: bounds {:?} do not match scores {:?}",
            bounds.dims(),
            scores.dims()
        );
    }
    scores.contiguous()?.apply_op2(
        &bounds.contiguous()?,
        Softmax {
            heads: h,
            tq,
            scale: scale as f32,
        },
    )
}

// ------------------------------------------------------------------------------------------
// Cross-entropy

struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    cuda_only!(2, "cpmv-cross-entropy");
    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        t: &CudaStorage,
        lt: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = l.device().clone();
        let (n, v) = ll.shape().dims2()?;
        if lt.shape().elem_count() != n {
            bail!(
                "cpmv-kernels: cross_entropy: {n} rows but {} targets",
                lt.shape().elem_count()
            );
        }
        let (a_v, cfg) = (int(v, "cross_entropy classes")?, rows_cfg(n)?);
        typed!(l.dtype(), T, {
            let ls = view(l.as_cuda_slice::<T>()?, ll, "logits")?;
            let ts = view(t.as_cuda_slice::<u32>()?, lt, "targets")?;
            // SAFETY: uninitialised memory, but the launch below writes loss[r] for all n rows
            // before anything reads it; on error it is dropped unread.
            let loss = unsafe { dev.alloc::<f32>(n)? };
            let f = func(&dev, "ce_fwd", l.dtype())?;
            let mut b = f.builder();
            b.arg(&ls).arg(&ts).arg(&loss).arg(&a_v);
            // SAFETY: ce_fwd(l, const uint32_t *t, float *loss, int v), see "Launch soundness":
            // block r of n reads l[r·v..][..v] (n·v, `dims2`), t[r] (n targets, checked above)
            // and writes loss[r]; a target ≥ v gives NaN without indexing l with it.
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(loss, dev), Shape::from(n)))
        })
    }
    fn bwd(
        &self,
        l: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        Ok((Some(l.apply_op3_no_bwd(t, &g, &CrossEntropyBwd)?), None))
    }
}

struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    cuda_only!(3, "cpmv-cross-entropy-bwd");
    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        t: &CudaStorage,
        lt: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = l.device().clone();
        let (n, v) = ll.shape().dims2()?;
        check_len(lt, n, "cross_entropy backward targets")?;
        check_len(lg, n, "cross_entropy backward grad")?;
        let (a_v, cfg) = (int(v, "cross_entropy classes")?, rows_cfg(n)?);
        typed!(l.dtype(), T, {
            let ls = view(l.as_cuda_slice::<T>()?, ll, "logits")?;
            let ts = view(t.as_cuda_slice::<u32>()?, lt, "targets")?;
            let gs = view(g.as_cuda_slice::<f32>()?, lg, "grad")?;
            // SAFETY: uninitialised memory, but the launch below writes all n·v elements
            // (each block every j < v of its row) before anything reads it.
            let dl = unsafe { dev.alloc::<T>(n * v)? };
            let f = func(&dev, "ce_bwd", l.dtype())?;
            let mut b = f.builder();
            b.arg(&ls).arg(&ts).arg(&gs).arg(&dl).arg(&a_v);
            // SAFETY: ce_bwd(l, const uint32_t *t, const float *g, T *dl, int v), see "Launch
            // soundness": block r of n reads l[r·v..][..v], t[r], g[r] (n each, `check_len`;
            // the target is only compared, never used as an index) and writes dl[r·v..][..v].
            unsafe { b.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dl, dev), ll.shape().clone()))
        })
    }
}

/// Per-row cross-entropy `[N]` (f32) of `logits` `[N, V]` (f32 or bf16) against u32 `targets`
/// `[N]`: one pass per row for the loss and one for the gradient (written in the logits' dtype),
/// so no f32 copy of the `[N, V]` logits (or of their softmax) is ever made.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if targets.dtype() != DType::U32 {
        bail!("cpmv-kernels: cross_entropy targets must be u32");
    }
    let (n, v) = logits.dims2()?;
    if n == 0 || v == 0 {
        bail!("cpmv-kernels: cross_entropy of {n} rows of {v} classes");
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)
}

// ------------------------------------------------------------------------------------------
// Bias + activation, and the bias gradient as coalesced column sums

/// The activation applied after a fused bias add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// The bias add alone.
    None,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// GELU with erf (exact).
    GeluErf,
}

impl Act {
    fn code(self) -> i32 {
        match self {
            Act::None => 0,
            Act::GeluTanh => 1,
            Act::GeluErf => 2,
        }
    }
}

/// Rows one block of the column-sum kernel covers (its 8 warps take every 8th row).
const COL_SUM_ROWS: usize = 256;

struct BiasAct {
    act: Act,
}

impl CustomOp2 for BiasAct {
    cuda_only!(2, "cpmv-bias-act");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), b.dtype(), "bias_act")?;
        let dev = x.device().clone();
        let (_, d) = last_dim(lx)?;
        let n = lx.shape().elem_count();
        check_len(lb, d, "bias_act bias")?;
        let (a_d, a_act) = (int(d, "bias_act row")?, self.act.code());
        let cfg = elems_cfg(n)?;
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let bs = view(b.as_cuda_slice::<T>()?, lb, "bias")?;
            // SAFETY: uninitialised memory, but the launch below writes all n elements before
            // anything reads it; on error it is dropped unread.
            let y = unsafe { dev.alloc::<T>(n)? };
            let f = func(&dev, "bias_act_fwd", x.dtype())?;
            let mut bld = f.builder();
            bld.arg(&xs).arg(&bs).arg(&y).arg(&n).arg(&a_d).arg(&a_act);
            // SAFETY: bias_act_fwd(x, b, y, size_t n, int d, int act), see "Launch soundness":
            // thread i < n reads x[i], b[i % d] (d elements, `check_len`; d ≥ 1 as n ≥ 1) and
            // writes y[i]; x and y hold n.
            unsafe { bld.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(y, dev), lx.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dz = match self.act {
            Act::None => dy,
            act => x.apply_op3_no_bwd(b, &dy, &BiasActBwd { act })?,
        };
        // A frozen bias (e.g. the LLM's q/k/v biases under LoRA) needs no column sums.
        let db = if b.track_op() {
            Some(col_sum(&dz)?.reshape(b.shape())?)
        } else {
            None
        };
        Ok((Some(dz), db))
    }
}

struct BiasActBwd {
    act: Act,
}

impl CustomOp3 for BiasActBwd {
    cuda_only!(3, "cpmv-bias-act-bwd");
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        check_same(x.dtype(), dy.dtype(), "bias_act backward")?;
        let dev = x.device().clone();
        let (_, d) = last_dim(lx)?;
        let n = lx.shape().elem_count();
        check_len(lb, d, "bias_act backward bias")?;
        check_len(ldy, n, "bias_act backward grad")?;
        let (a_d, a_act) = (int(d, "bias_act row")?, self.act.code());
        let cfg = elems_cfg(n)?;
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let bs = view(b.as_cuda_slice::<T>()?, lb, "bias")?;
            let gs = view(dy.as_cuda_slice::<T>()?, ldy, "grad")?;
            // SAFETY: uninitialised memory, but the launch below writes all n elements before
            // anything reads it; on error it is dropped unread.
            let dz = unsafe { dev.alloc::<T>(n)? };
            let f = func(&dev, "bias_act_bwd", x.dtype())?;
            let mut bld = f.builder();
            bld.arg(&xs)
                .arg(&bs)
                .arg(&gs)
                .arg(&dz)
                .arg(&n)
                .arg(&a_d)
                .arg(&a_act);
            // SAFETY: bias_act_bwd(x, b, dy, dz, size_t n, int d, int act), see "Launch
            // soundness": thread i < n reads x[i], dy[i] (n each), b[i % d] (d, `check_len`)
            // and writes dz[i].
            unsafe { bld.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(dz, dev), lx.shape().clone()))
        })
    }
}

struct ColSum;

impl CustomOp1 for ColSum {
    cuda_only!(1, "cpmv-col-sum");
    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (m, d) = last_dim(lx)?;
        // grid.y ≤ 65535: taller matrices give each block more rows.
        let rows = COL_SUM_ROWS.max(m.div_ceil(65_535));
        let cfg = LaunchConfig {
            grid_dim: (grid_x(d.div_ceil(32))?, m.div_ceil(rows) as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (a_m, a_d) = (int(m, "col_sum rows")?, int(d, "col_sum columns")?);
        let a_rows = int(rows, "col_sum rows per block")?;
        let acc = dev.alloc_zeros::<f32>(d)?;
        typed!(x.dtype(), T, {
            let xs = view(x.as_cuda_slice::<T>()?, lx, "x")?;
            let f = func(&dev, "col_sum", x.dtype())?;
            let mut bld = f.builder();
            bld.arg(&xs).arg(&acc).arg(&a_m).arg(&a_d).arg(&a_rows);
            // SAFETY: col_sum(x, float *out, int m, int d, int rows), see "Launch soundness".
            // Block (32, 8) matches the kernel's shared sh[8][33]; column col < d and rows
            // r < m of x (m·d, `last_dim`) are read, acc[col] (f32, d, zeroed) is added to.
            // grid.y = ceil(m / rows) ≤ 65535 by the choice of rows; m, d < 2³¹ (`int`).
            unsafe { bld.launch(cfg) }.w()?;
        });
        if x.dtype() == DType::F32 {
            return Ok((CudaStorage::wrap_cuda_slice(acc, dev), Shape::from(d)));
        }
        // SAFETY: uninitialised memory, but the launch below writes all d elements before
        // anything reads it; on error it is dropped unread.
        let out = unsafe { dev.alloc::<bf16>(d)? };
        let f = func(&dev, "cast_out", DType::BF16)?;
        let mut bld = f.builder();
        bld.arg(&acc).arg(&out).arg(&a_d);
        // SAFETY: cast_out_bf16(const float *src, bf16 *out, int n), see "Launch soundness":
        // thread i < d reads acc[i] and writes out[i] (d each), after col_sum (same stream).
        unsafe { bld.launch(elems_cfg(d)?) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(d)))
    }
}

/// Sums of `x` `[.., D]` over all leading positions: `[D]`, accumulated in f32 and read
/// row-coalesced (candle's reduction over a leading axis reads one strided element per
/// thread). The backward pass of a bias; no gradient of its own.
pub fn col_sum(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if x.elem_count() == 0 || d >= i32::MAX as usize || x.elem_count() / d >= i32::MAX as usize {
        bail!(
            "cpmv-kernels: col_sum of {:?} (non-empty, < 2³¹ rows and columns)",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1_no_bwd(&ColSum)
}

/// `act(round(x + b))` for `x` `[.., D]` and a bias `b` `[D]` (same dtype, f32 or bf16): one
/// pass forward, one backward (the pre-activation gradient), and the bias gradient as
/// [`col_sum`]s of it.
pub fn bias_act(x: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if b.dims() != [d] {
        bail!("cpmv-kernels: bias {:?} for rows of {d}", b.dims());
    }
    if x.elem_count() == 0 {
        bail!("cpmv-kernels: bias_act of an empty tensor");
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAct { act })
}

// ------------------------------------------------------------------------------------------
// AdamW

/// Words per parameter in the descriptor table of the multi-tensor AdamW kernel.
const ADAMW_DESC: usize = 10;
/// Elements one block of the multi-tensor AdamW kernel updates.
const ADAMW_CHUNK: usize = 65_536;

/// The AdamW hyper-parameters shared by all parameters of one step (see [`adamw_multi`]).
#[derive(Debug, Clone, Copy)]
pub struct AdamWHyper {
    /// `1 − β1`, computed in f64 and rounded (as torch passes it).
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// `1 − β2`, computed in f64 and rounded.
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// Multiplies every gradient first (clip factor).
    pub grad_scale: f32,
}

/// One parameter of a multi-tensor AdamW update with its own step-dependent scalars.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParam<'a> {
    /// The parameter (f32 or bf16), updated in place.
    pub param: &'a Tensor,
    /// Its f32 master copy when the parameter is bf16 (`None`: the f32 parameter is its own).
    pub master: Option<&'a Tensor>,
    /// First and second moments (f32).
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// The gradient, in the parameter's dtype.
    pub grad: &'a Tensor,
    /// `1 − lr·wd` (1 when the parameter is not decayed).
    pub decay_factor: f32,
    /// `lr / (1 − β1ᵗ)` for this parameter's own step count `t`.
    pub step_size: f32,
    /// `sqrt(1 − β2ᵗ)`.
    pub bc2_sqrt: f32,
}

/// The device address of a contiguous CUDA tensor's first element. Valid while the tensor
/// lives; candle runs everything on one stream, so work queued later on it is ordered after
/// whatever reads or writes through the address.
fn device_address(t: &Tensor, what: &str) -> Result<(u64, CudaDevice)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (s, l) = t.storage_and_layout();
    let Some((start, _)) = l.contiguous_offsets() else {
        bail!("cpmv-kernels: adamw {what} must be contiguous");
    };
    let Storage::Cuda(c) = &*s else {
        bail!("cpmv-kernels: adamw {what} must be a CUDA tensor");
    };
    let dev = c.device().clone();
    let stream = dev.cuda_stream();
    let base = match t.dtype() {
        DType::F32 => c.as_cuda_slice::<f32>()?.device_ptr(&stream).0 + 4 * start as u64,
        DType::BF16 => c.as_cuda_slice::<bf16>()?.device_ptr(&stream).0 + 2 * start as u64,
        d => bail!("cpmv-kernels: adamw {what} of {d:?}"),
    };
    Ok((base, dev))
}

/// One AdamW update of many parameters in place, torch's formula: one kernel launch per
/// parameter dtype (usually one in all). Each element's gradient is read once; the f32 moments,
/// the f32 master (for bf16 parameters) and the parameter are written in the same pass.
///
/// The tensors are modified in place: callers own them exclusively (no other tensor may share
/// their storage, and no two parameters may share a buffer: they are updated concurrently,
/// which is checked by address range).
pub fn adamw_multi(params: &[AdamWParam<'_>], h: AdamWHyper) -> Result<()> {
    if let Some(p) = params
        .iter()
        .find(|p| !matches!(p.param.dtype(), DType::F32 | DType::BF16))
    {
        bail!("cpmv-kernels: adamw of a {:?} parameter", p.param.dtype());
    }
    // Every group is checked and its table built before the first launch, so an error leaves
    // all parameters untouched (never half a step).
    let mut launches = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let group: Vec<&AdamWParam> = params
            .iter()
            .filter(|p| p.param.dtype() == dtype && p.param.elem_count() > 0)
            .collect();
        if let Some(l) = adamw_table(&group, dtype)? {
            launches.push(l);
        }
    }
    for (dev, dtype, words, chunks, grads) in launches {
        let table = dev.cuda_stream().clone_htod(&words).w()?;
        let count = int(words.len() / ADAMW_DESC, "adamw parameters")?;
        let f = func(&dev, "adamw_multi", dtype)?;
        let mut b = f.builder();
        b.arg(&table)
            .arg(&count)
            .arg(&h.one_minus_beta1)
            .arg(&h.beta2)
            .arg(&h.one_minus_beta2)
            .arg(&h.eps)
            .arg(&h.grad_scale);
        let cfg = LaunchConfig {
            grid_dim: (chunks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: adamw_multi_{f32,bf16}(const u64 *desc, int count, 5 × float), see "Launch
        // soundness"; `table` holds count·ADAMW_DESC words. Block k < chunks updates chunk k of
        // the entry holding it, within [0, n); `adamw_table` checked every entry's buffers (n
        // elements, contiguous, f32/T, this device) and that no written range overlaps any other.
        unsafe { b.launch(cfg) }.w()?;
        // The table and any contiguous copies of gradients are freed in stream order, after
        // the kernel.
        drop(grads);
    }
    Ok(())
}

/// One dtype's launch of [`adamw_multi`]: the device, the descriptor words, the number of
/// chunks (blocks) and the gradients the table points into (kept alive until the launch).
type AdamWLaunch = (CudaDevice, DType, Vec<u64>, u32, Vec<Tensor>);

/// Checks one dtype group of parameters and builds its descriptor table (`None` when empty).
fn adamw_table(group: &[&AdamWParam<'_>], dtype: DType) -> Result<Option<AdamWLaunch>> {
    use candle_core::backend::BackendDevice;
    let mut words: Vec<u64> = Vec::with_capacity(ADAMW_DESC * group.len());
    let mut grads = Vec::with_capacity(group.len());
    let mut chunks = 0u64;
    let mut device: Option<CudaDevice> = None;
    // Byte ranges [start, end) the kernel writes (param, master, m, v) and reads (grad).
    let mut written: Vec<(u64, u64)> = Vec::with_capacity(4 * group.len());
    let mut read: Vec<(u64, u64)> = Vec::with_capacity(group.len());
    for p in group {
        let n = p.param.elem_count();
        for (what, t) in [("m", p.m), ("v", p.v), ("grad", p.grad)] {
            if t.elem_count() != n {
                bail!(
                    "cpmv-kernels: adamw {what} has {} elements, the parameter {n}",
                    t.elem_count()
                );
            }
        }
        for (what, t) in [("m", Some(p.m)), ("v", Some(p.v)), ("master", p.master)] {
            if let Some(t) = t {
                if t.dtype() != DType::F32 || t.elem_count() != n {
                    bail!("cpmv-kernels: adamw {what} must be f32 with {n} elements");
                }
            }
        }
        if dtype != DType::F32 && p.master.is_none() {
            bail!("cpmv-kernels: a {dtype:?} parameter needs an f32 master copy");
        }
        check_same(dtype, p.grad.dtype(), "adamw gradient")?;
        let grad = p.grad.contiguous()?;
        // The kernel dereferences every one of these addresses on the launch's device (and
        // stream): all must live on that one device.
        let mut address = |t: &Tensor, what: &str| -> Result<u64> {
            let (a, dev) = device_address(t, what)?;
            match &device {
                Some(d) if !d.same_device(&dev) => {
                    bail!("cpmv-kernels: adamw tensors on different devices")
                }
                Some(_) => {}
                None => device = Some(dev),
            }
            Ok(a)
        };
        let pa = address(p.param, "param")?;
        let master = match p.master {
            Some(t) => address(t, "master")?,
            None => 0,
        };
        let (ma, va) = (address(p.m, "m")?, address(p.v, "v")?);
        let ga = address(&grad, "grad")?;
        let (bytes, bytes32) = ((n * dtype.size_in_bytes()) as u64, 4 * n as u64);
        written.extend([(pa, pa + bytes), (ma, ma + bytes32), (va, va + bytes32)]);
        if master != 0 {
            written.push((master, master + bytes32));
        }
        read.push((ga, ga + bytes));
        words.extend([
            pa,
            master,
            ma,
            va,
            ga,
            n as u64,
            chunks,
            u64::from(p.decay_factor.to_bits()) | (u64::from(p.step_size.to_bits()) << 32),
            u64::from(p.bc2_sqrt.to_bits()),
            0,
        ]);
        chunks += n.div_ceil(ADAMW_CHUNK) as u64;
        grads.push(grad);
    }
    let Some(dev) = device else {
        return Ok(None);
    };
    // The entries of one launch are updated concurrently by different blocks: no byte may be
    // written through two of them, nor written through one and read as a gradient.
    written.sort_unstable();
    let overlap = written.windows(2).any(|w| w[1].0 < w[0].1)
        || read.iter().any(|&(start, end)| {
            // `written` is now sorted and disjoint, so its ends ascend too.
            let i = written.partition_point(|w| w.1 <= start);
            i < written.len() && written[i].0 < end
        });
    if overlap {
        bail!("cpmv-kernels: adamw buffers overlap (between parameters, or with a gradient)");
    }
    if chunks > i32::MAX as u64 {
        bail!("cpmv-kernels: adamw over {chunks} chunks");
    }
    Ok(Some((dev, dtype, words, chunks as u32, grads)))
}

/// A dropout mask shaped like `like` (its dtype and device): each element `1/keep` with
/// probability `keep`, else 0, drawn by a counter-based generator from `seed`, so the same seed
/// gives the same mask (gradient checkpointing replays masks from their seeds).
pub fn dropout_mask(like: &Tensor, seed: u64, keep: f64) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = like.device() else {
        bail!("cpmv-kernels: dropout_mask needs a CUDA tensor");
    };
    let n = like.elem_count();
    if n == 0 {
        return like.zeros_like();
    }
    let cfg = elems_cfg(n)?;
    typed!(like.dtype(), T, {
        // SAFETY: uninitialised memory, but the launch below writes all n elements before
        // anything reads it; on error it is dropped unread.
        let out = unsafe { dev.alloc::<T>(n)? };
        let f = func(dev, "dropout_mask", like.dtype())?;
        let keep = keep as f32;
        let mut b = f.builder();
        b.arg(&out).arg(&n).arg(&seed).arg(&keep);
        // SAFETY: dropout_mask(T *out, size_t n, uint64_t seed, float keep), see "Launch
        // soundness": thread i < n writes out[i] only, and `out` holds n elements.
        unsafe { b.launch(cfg) }.w()?;
        let s = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(s),
            like.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    })
}

/// Blocks of the sum-of-squares kernel (each leaves one f64 partial).
const SUMSQ_BLOCKS: usize = 1024;

/// `Σ x²` of a CUDA tensor (f32 or bf16) in f64, as a scalar f64 tensor on the device: one
/// pass over memory with many blocks (candle's `sum_all` reduces in a single block).
pub fn sum_squares(x: &Tensor) -> Result<Tensor> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        bail!("cpmv-kernels: sum_squares needs a CUDA tensor");
    };
    let x = x.contiguous()?;
    let n = x.elem_count();
    let blocks = SUMSQ_BLOCKS.min(n.div_ceil(256)).max(1);
    let (st, l) = x.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        bail!("cpmv-kernels: sum_squares needs a CUDA tensor");
    };
    let partial = typed!(x.dtype(), T, {
        let xs = view(cs.as_cuda_slice::<T>()?, l, "x")?;
        let partial = dev.alloc_zeros::<f64>(blocks)?;
        let f = func(dev, "sum_squares", x.dtype())?;
        let mut b = f.builder();
        b.arg(&xs).arg(&n).arg(&partial);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sum_squares(x, size_t n, double *partial), see "Launch soundness": a
        // grid-stride loop reads x[i] for i < n (contiguous x's n elements); block
        // k < blocks ≤ 1024 writes partial[k] (f64, `blocks` elements); 256 threads are 8
        // warps, within the kernel's shared sh[32].
        unsafe { b.launch(cfg) }.w()?;
        partial
    });
    drop(st);
    let s = CudaStorage::wrap_cuda_slice(partial, dev.clone());
    Tensor::from_storage(
        Storage::Cuda(s),
        blocks,
        candle_core::op::BackpropOp::none(),
        false,
    )
    .sum_all()
}

/// The default memory pool of a CUDA device (cudarc allocates stream-ordered from it).
fn default_pool(
    dev: &candle_core::Device,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(cd) = dev else {
        bail!("cpmv-kernels: {what} needs a CUDA device");
    };
    let ordinal = cd.cuda_stream().context().ordinal();
    let mut pool = std::ptr::null_mut();
    let ordinal = int(ordinal, "device ordinal")?;
    // SAFETY: `pool` is a live local the driver writes one handle into; `ordinal` is the
    // device of a context candle created (so the driver is initialised); errors are returned.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ordinal) }
        .result()
        .w()?;
    Ok(pool)
}

/// Reads (`set: None`) or writes a u64 attribute of the device's default memory pool.
fn pool_attribute(
    dev: &candle_core::Device,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
    what: &str,
) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev, what)?;
    let mut value = set.unwrap_or(0);
    let ptr = &mut value as *mut u64 as *mut std::ffi::c_void;
    // SAFETY: `pool` is the device's default pool (a handle valid for the process); `ptr`
    // points to a live local u64, and every attribute passed here (USED_MEM_HIGH,
    // USED_MEM_CURRENT, RELEASE_THRESHOLD) is a cuuint64_t, so the driver reads or writes
    // exactly those 8 bytes.
    unsafe {
        match set {
            Some(_) => sys::cuMemPoolSetAttribute(pool, attr, ptr),
            None => sys::cuMemPoolGetAttribute(pool, attr, ptr),
        }
    }
    .result()
    .w()?;
    Ok(value)
}

/// Peak bytes allocated from the device's default memory pool since the last
/// [`reset_peak_memory`] (cudarc allocates stream-ordered from that pool), and the bytes in use now.
pub fn pool_memory(dev: &candle_core::Device) -> Result<(u64, u64)> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    let high = pool_attribute(dev, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None, "pool_memory")?;
    let used = pool_attribute(
        dev,
        A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        None,
        "pool_memory",
    )?;
    Ok((high, used))
}

/// Makes the device's default memory pool keep freed memory instead of returning it to the
/// driver at every synchronisation (its default threshold is 0): without this, every step
/// re-maps gigabytes of activations. Call once before training.
pub fn keep_pool_memory(dev: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    let attr = A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    pool_attribute(dev, attr, Some(u64::MAX), "keep_pool_memory").map(|_| ())
}

/// Resets the pool's high-water mark to the current use.
pub fn reset_peak_memory(dev: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute as A;
    let attr = A::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pool_attribute(dev, attr, Some(0), "reset_peak_memory").map(|_| ())
}
