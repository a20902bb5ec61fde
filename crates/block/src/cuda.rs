//! The CUDA backend: buffers are device slices of f32 or bf16 ([`Elem`]), matrix products go to
//! cuBLAS (f32 accumulation; full f32 without TF32 for f32 buffers), everything else to the
//! kernels of `cuda/block.cu`, each the device version of a [`Cpu`](crate::Cpu) method,
//! instantiated for both element types. Per-row statistics stay f32. Work is queued on one
//! stream (candle's, when built from a candle device), so it is ordered with the model's other
//! work.
//!
//! Attention is [`crate::attention`]'s formulation: batched cuBLAS products around three row
//! kernels (scores of a sequence materialised, not saved). Dropout masks are made on the
//! device from one seed each ([`MaskDraws::PerMask`], as candle's GPU path), or drawn per
//! element on the host and copied over.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
use candle_core::cuda_backend::cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use half::bf16;

use crate::backend::{
    check_gate, check_softmax, check_softmax_backward, host_mask, rows_of, same_len, Attn, Backend,
    Batch, Gelu, MaskDraws, Mat,
};
use crate::error::{shape, BlockError, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/block.ptx"));

/// An element type of the CUDA backend's buffers: f32, or bf16 (stored; arithmetic in f32).
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Unpin + Send + Sync + 'static {
    /// The suffix of the kernels instantiated for this type (`cuda/block.cu`).
    const SUFFIX: &'static str;
    /// cuBLAS's name for the type.
    const DATA: cudaDataType_t;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
    const DATA: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// The CUDA backend, buffers of `T` (f32 by default).
pub struct Cuda<T: Elem = f32> {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    module: Arc<CudaModule>,
    /// The key ranges last copied to the device: every layer of a step has the same ones.
    bounds: Mutex<Option<DeviceBounds>>,
    elem: PhantomData<T>,
}

/// The log-sum-exp operand of a softmax row kernel: written or read.
enum Lse<'a> {
    Write(&'a mut CudaSlice<f32>),
    Read(&'a CudaSlice<f32>),
}

/// Key ranges on the host and their copy on the device.
type DeviceBounds = (Vec<(u32, u32)>, Arc<CudaSlice<u32>>);

fn dev<E: std::fmt::Debug>(e: E) -> BlockError {
    BlockError::Backend(format!("cuda: {e:?}"))
}

/// One thread per item, 256 per block.
fn items(n: usize) -> Result<LaunchConfig> {
    blocks(n.div_ceil(256), 256)
}

fn blocks(n: usize, threads: u32) -> Result<LaunchConfig> {
    let grid = u32::try_from(n.max(1))
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| BlockError::Backend(format!("cuda: a grid of {n} blocks")))?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Rows a column-sum partial covers (`CHUNK` in cuda/block.cu).
const CHUNK: usize = 64;

/// One thread per column (blocks of 256) times one block row per chunk of `CHUNK` rows.
fn column_chunks(cols: usize, chunks: usize) -> Result<LaunchConfig> {
    let big = |what: &str, n: usize| BlockError::Backend(format!("cuda: {n} {what}"));
    let x = u32::try_from(cols.div_ceil(256).max(1)).map_err(|_| big("column blocks", cols))?;
    let y = u32::try_from(chunks.max(1))
        .ok()
        .filter(|&y| y <= 65_535)
        .ok_or_else(|| big("row chunks", chunks))?;
    Ok(LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn act_code(act: Option<Gelu>) -> i32 {
    match act {
        None => 0,
        Some(Gelu::Erf) => 1,
        Some(Gelu::Tanh) => 2,
    }
}

impl<T: Elem> Cuda<T> {
    /// A backend on `stream` (e.g. candle's: `CudaDevice::cuda_stream`).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone()).map_err(dev)?;
        let module = stream
            .context()
            .load_module(Ptx::from_src(PTX))
            .map_err(dev)?;
        Ok(Cuda {
            stream,
            blas,
            module,
            bounds: Mutex::new(None),
            elem: PhantomData,
        })
    }

    /// The stream the backend's work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `name` instantiated for `T`.
    fn func(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(&format!("{name}_{}", T::SUFFIX))
            .map_err(dev)
    }
}

// Launch soundness, for every `unsafe` launch below: the kernels' parameter lists in
// cuda/block.cu are matched argument by argument (`T*` ← CudaSlice<T> of the kernel
// instantiated for T, `float*` ← CudaSlice<f32>, `size_t` ← usize, `int` ← i32, `float` ←
// f32, `uint64_t` ← u64, `const uint32_t*` ← CudaSlice<u32>; counts checked against the PTX
// by scripts/check_kernel_launches.py); every view and length was checked against its buffer
// before the launch (Mat::check, same_len, Attn::check), and the
// kernels return for indices past their counts; work is queued on `self.stream`, which orders
// it after the writes of its inputs.

impl<T: Elem> Backend for Cuda<T> {
    type Buf = CudaSlice<T>;
    type Stat = CudaSlice<f32>;

    fn zeros(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n).map_err(dev)
    }

    fn zeros_stat(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n).map_err(dev)
    }

    fn download_stat(&self, s: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(s).map_err(dev)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<T>> {
        let vals: Vec<T> = host.iter().map(|&v| T::from_f32(v)).collect();
        self.stream.clone_htod(&vals).map_err(dev)
    }

    fn download(&self, b: &CudaSlice<T>) -> Result<Vec<f32>> {
        let vals = self.stream.clone_dtoh(b).map_err(dev)?;
        Ok(vals.into_iter().map(T::to_f32).collect())
    }

    fn len(&self, b: &CudaSlice<T>) -> usize {
        b.len()
    }

    fn copy(&self, b: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.stream.clone_dtod(b).map_err(dev)
    }

    fn gemm_batched(
        &self,
        c: &mut CudaSlice<T>,
        cm: Mat,
        a: &CudaSlice<T>,
        am: Mat,
        ta: bool,
        b: &CudaSlice<T>,
        bm: Mat,
        tb: bool,
        alpha: f32,
        beta: f32,
        batch: Batch,
    ) -> Result<()> {
        // The first and the last product's views must fit (those between lie in between).
        let last = batch.count.saturating_sub(1);
        for (m, stride, len, what) in [
            (cm, batch.c, c.len(), "gemm C"),
            (am, batch.a, a.len(), "gemm A"),
            (bm, batch.b, b.len(), "gemm B"),
        ] {
            m.check(len, what)?;
            m.shifted(last * stride).check(len, what)?;
        }
        let (m, k) = if ta {
            (am.cols, am.rows)
        } else {
            (am.rows, am.cols)
        };
        let (k2, n) = if tb {
            (bm.cols, bm.rows)
        } else {
            (bm.rows, bm.cols)
        };
        if k != k2 || cm.rows != m || cm.cols != n {
            return shape(format!(
                "gemm: op(A) {m}×{k} · op(B) {k2}×{n} into C {}×{}",
                cm.rows, cm.cols
            ));
        }
        if m == 0 || n == 0 || batch.count == 0 {
            return Ok(());
        }
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| BlockError::Backend(format!("cuda: gemm size {v}")))
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major matrix
        // read column-major is its transpose: so B goes first, each with its own flag.
        let (gm, gn, gk) = (int(n)?, int(m)?, int(k)?);
        // cuBLAS wants a leading dimension of at least the row length even for one row (which
        // Mat::check lets through with any ld).
        let lead = |m: Mat| int(if m.rows <= 1 { m.ld.max(m.cols) } else { m.ld }.max(1));
        let (lda, ldb, ldc) = (lead(bm)?, lead(am)?, lead(cm)?);
        let stride = |v: usize| {
            i64::try_from(v).map_err(|_| BlockError::Backend(format!("cuda: gemm stride {v}")))
        };
        // cuBLAS's A is our B (see above): the strides swap with the operands.
        let (sa, sb, sc) = (stride(batch.b)?, stride(batch.a)?, stride(batch.c)?);
        let count = int(batch.count)?;
        if am.off > a.len() || bm.off > b.len() || cm.off > c.len() {
            return shape("gemm: a view starts past the end of its buffer");
        }
        let av = a.slice(am.off..);
        let bv = b.slice(bm.off..);
        let mut cv = c.slice_mut(cm.off..);
        let (ap, _ra) = av.device_ptr(&self.stream);
        let (bp, _rb) = bv.device_ptr(&self.stream);
        let (cp, _rc) = cv.device_ptr_mut(&self.stream);
        // SAFETY: the first and last views of each operand were checked against their buffers
        // above, with the leading dimensions passed here (the products between lie between
        // them); `c` is borrowed mutably, so it aliases neither `a` nor `b`. α and β are f32
        // (the compute type's scalars) for both element types; f32 computes in full f32 (no
        // TF32), bf16 accumulates in f32. One product is a batch of one.
        unsafe {
            gemm_strided_batched_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                gm,
                gn,
                gk,
                (&alpha) as *const f32 as *const _,
                bp as *const _,
                T::DATA,
                lda,
                sa,
                ap as *const _,
                T::DATA,
                ldb,
                sb,
                (&beta) as *const f32 as *const _,
                cp as *mut _,
                T::DATA,
                ldc,
                sc,
                count,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(dev)
    }

    fn bias_act(
        &self,
        y: &mut CudaSlice<T>,
        ym: Mat,
        bias: Option<&CudaSlice<T>>,
        act: Option<Gelu>,
        pre: Option<&mut CudaSlice<T>>,
    ) -> Result<()> {
        ym.check(y.len(), "bias_act y")?;
        if let Some(b) = bias {
            same_len(b.len(), ym.cols, "bias_act bias")?;
        }
        if let Some(p) = pre.as_deref() {
            same_len(p.len(), ym.rows * ym.cols, "bias_act pre")?;
        }
        let n = ym.rows * ym.cols;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("bias_act")?;
        let null = 0u64;
        let mut l = self.stream.launch_builder(&f);
        l.arg(y)
            .arg(&ym.off)
            .arg(&ym.rows)
            .arg(&ym.cols)
            .arg(&ym.ld);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        let code = act_code(act);
        l.arg(&code);
        match pre {
            Some(p) => l.arg(p),
            None => l.arg(&null),
        };
        // SAFETY: see "Launch soundness" above; a missing bias or `pre` is a null pointer,
        // which the kernel tests.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn act_backward(&self, d: &mut CudaSlice<T>, pre: &CudaSlice<T>, act: Gelu) -> Result<()> {
        same_len(d.len(), pre.len(), "act_backward")?;
        let f = self.func("act_backward")?;
        let (n, code) = (d.len(), act_code(Some(act)));
        let mut l = self.stream.launch_builder(&f);
        l.arg(d).arg(pre).arg(&n).arg(&code);
        // SAFETY: see "Launch soundness" above.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn bias_grad(&self, db: &mut CudaSlice<T>, dy: &CudaSlice<T>, dym: Mat) -> Result<()> {
        dym.check(dy.len(), "bias_grad dy")?;
        same_len(db.len(), dym.cols, "bias_grad db")?;
        let (rows, cols) = (dym.rows, dym.cols);
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let chunks = rows.div_ceil(CHUNK);
        let mut part = self.stream.alloc_zeros::<f32>(chunks * cols).map_err(dev)?;
        let f = self.func("bias_grad_part")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&mut part)
            .arg(dy)
            .arg(&dym.off)
            .arg(&rows)
            .arg(&cols)
            .arg(&dym.ld);
        // SAFETY: see "Launch soundness" above; `part` holds a partial per (chunk, column).
        unsafe { l.launch(column_chunks(cols, chunks)?) }.map_err(dev)?;
        self.col_sum_add(db, &part, 0, chunks, cols)
    }

    fn layer_norm(
        &self,
        y: &mut CudaSlice<T>,
        stats: &mut CudaSlice<f32>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        b: &CudaSlice<T>,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "layer_norm")?;
        same_len(y.len(), x.len(), "layer_norm y")?;
        same_len(stats.len(), 2 * rows, "layer_norm stats")?;
        same_len(w.len(), cols, "layer_norm weight")?;
        same_len(b.len(), cols, "layer_norm bias")?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.func("layer_norm")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(y)
            .arg(stats)
            .arg(x)
            .arg(w)
            .arg(b)
            .arg(&cols)
            .arg(&eps);
        // SAFETY: see "Launch soundness" above; one block of 256 threads per row.
        unsafe { l.launch(blocks(rows, 256)?) }.map_err(dev)?;
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        dx: &mut CudaSlice<T>,
        dw: Option<&mut CudaSlice<T>>,
        db: Option<&mut CudaSlice<T>>,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        stats: &CudaSlice<f32>,
        cols: usize,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "layer_norm_backward")?;
        same_len(dx.len(), x.len(), "layer_norm_backward dx")?;
        same_len(dy.len(), x.len(), "layer_norm_backward dy")?;
        same_len(stats.len(), 2 * rows, "layer_norm_backward stats")?;
        same_len(w.len(), cols, "layer_norm_backward weight")?;
        for g in [&dw, &db].into_iter().flatten() {
            same_len(g.len(), cols, "layer_norm_backward dw/db")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.func("layer_norm_backward_dx")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(dx).arg(dy).arg(x).arg(w).arg(stats).arg(&cols);
        // SAFETY: see "Launch soundness" above; one block of 256 threads per row.
        unsafe { l.launch(blocks(rows, 256)?) }.map_err(dev)?;
        if dw.is_none() && db.is_none() {
            return Ok(());
        }
        let chunks = rows.div_ceil(CHUNK);
        let mut part = self
            .stream
            .alloc_zeros::<f32>(2 * chunks * cols)
            .map_err(dev)?;
        let f = self.func("layer_norm_backward_dwb_part")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&mut part)
            .arg(dy)
            .arg(x)
            .arg(stats)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: see "Launch soundness" above; `part` holds two partials per (chunk, column).
        unsafe { l.launch(column_chunks(cols, chunks)?) }.map_err(dev)?;
        if let Some(dw) = dw {
            self.col_sum_add(dw, &part, 0, chunks, cols)?;
        }
        if let Some(db) = db {
            self.col_sum_add(db, &part, chunks * cols, chunks, cols)?;
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        y: &mut CudaSlice<T>,
        rstd: &mut CudaSlice<f32>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "rms_norm")?;
        same_len(y.len(), x.len(), "rms_norm y")?;
        same_len(rstd.len(), rows, "rms_norm rstd")?;
        same_len(w.len(), cols, "rms_norm weight")?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.func("rms_norm")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(y).arg(rstd).arg(x).arg(w).arg(&cols).arg(&eps);
        // SAFETY: see "Launch soundness" above; one block of 256 threads per row.
        unsafe { l.launch(blocks(rows, 256)?) }.map_err(dev)?;
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dx: &mut CudaSlice<T>,
        dw: Option<&mut CudaSlice<T>>,
        dy: &CudaSlice<T>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        rstd: &CudaSlice<f32>,
        cols: usize,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "rms_norm_backward")?;
        same_len(dx.len(), x.len(), "rms_norm_backward dx")?;
        same_len(dy.len(), x.len(), "rms_norm_backward dy")?;
        same_len(rstd.len(), rows, "rms_norm_backward rstd")?;
        same_len(w.len(), cols, "rms_norm_backward weight")?;
        if let Some(dw) = dw.as_deref() {
            same_len(dw.len(), cols, "rms_norm_backward dw")?;
        }
        if rows == 0 {
            return Ok(());
        }
        let f = self.func("rms_norm_backward_dx")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(dx).arg(dy).arg(x).arg(w).arg(rstd).arg(&cols);
        // SAFETY: see "Launch soundness" above; one block of 256 threads per row.
        unsafe { l.launch(blocks(rows, 256)?) }.map_err(dev)?;
        if let Some(dw) = dw {
            let chunks = rows.div_ceil(CHUNK);
            let mut part = self.stream.alloc_zeros::<f32>(chunks * cols).map_err(dev)?;
            let f = self.func("rms_norm_backward_dw_part")?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(&mut part)
                .arg(dy)
                .arg(x)
                .arg(rstd)
                .arg(&rows)
                .arg(&cols);
            // SAFETY: see "Launch soundness" above; `part` holds a partial per (chunk, column).
            unsafe { l.launch(column_chunks(cols, chunks)?) }.map_err(dev)?;
            self.col_sum_add(dw, &part, 0, chunks, cols)?;
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<T>,
        m: Mat,
        head_dim: usize,
        cos: &CudaSlice<T>,
        sin: &CudaSlice<T>,
        transpose: bool,
    ) -> Result<()> {
        m.check(x.len(), "rope x")?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !m.cols.is_multiple_of(head_dim) {
            return shape(format!("rope: {} columns in heads of {head_dim}", m.cols));
        }
        same_len(cos.len(), m.rows * head_dim, "rope cos")?;
        same_len(sin.len(), m.rows * head_dim, "rope sin")?;
        let n = m.rows * m.cols / 2;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("rope")?;
        let t = i32::from(transpose);
        let mut l = self.stream.launch_builder(&f);
        l.arg(x)
            .arg(&m.off)
            .arg(&m.rows)
            .arg(&m.cols)
            .arg(&m.ld)
            .arg(&head_dim)
            .arg(cos)
            .arg(sin)
            .arg(&t);
        // SAFETY: see "Launch soundness" above.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn swiglu(&self, y: &mut CudaSlice<T>, gu: &CudaSlice<T>, gm: Mat, um: Mat) -> Result<()> {
        check_gate(gu.len(), gm, um, "swiglu")?;
        same_len(y.len(), gm.rows * gm.cols, "swiglu y")?;
        let n = gm.rows * gm.cols;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("swiglu")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(y)
            .arg(gu)
            .arg(&gm.off)
            .arg(&um.off)
            .arg(&gm.ld)
            .arg(&gm.rows)
            .arg(&gm.cols);
        // SAFETY: see "Launch soundness" above; `check_gate` holds both views to one `ld`.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgu: &mut CudaSlice<T>,
        dy: &CudaSlice<T>,
        gu: &CudaSlice<T>,
        gm: Mat,
        um: Mat,
    ) -> Result<()> {
        check_gate(gu.len(), gm, um, "swiglu_backward")?;
        same_len(dgu.len(), gu.len(), "swiglu_backward dgu")?;
        same_len(dy.len(), gm.rows * gm.cols, "swiglu_backward dy")?;
        let n = gm.rows * gm.cols;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("swiglu_backward")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(dgu)
            .arg(dy)
            .arg(gu)
            .arg(&gm.off)
            .arg(&um.off)
            .arg(&gm.ld)
            .arg(&gm.rows)
            .arg(&gm.cols);
        // SAFETY: see "Launch soundness" above; `check_gate` holds both views to one `ld`.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn add(&self, y: &mut CudaSlice<T>, x: &CudaSlice<T>) -> Result<()> {
        same_len(y.len(), x.len(), "add")?;
        let f = self.func("add")?;
        let n = y.len();
        let mut l = self.stream.launch_builder(&f);
        l.arg(y).arg(x).arg(&n);
        // SAFETY: see "Launch soundness" above.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn mul(&self, y: &mut CudaSlice<T>, x: &CudaSlice<T>, m: &CudaSlice<T>) -> Result<()> {
        same_len(y.len(), x.len(), "mul")?;
        same_len(x.len(), m.len(), "mul mask")?;
        let f = self.func("mul")?;
        let n = y.len();
        let mut l = self.stream.launch_builder(&f);
        l.arg(y).arg(x).arg(m).arg(&n);
        // SAFETY: see "Launch soundness" above.
        unsafe { l.launch(items(n)?) }.map_err(dev)?;
        Ok(())
    }

    fn dropout_mask(
        &self,
        n: usize,
        keep: f64,
        masks: MaskDraws,
        draw: &mut dyn FnMut() -> u64,
    ) -> Result<CudaSlice<T>> {
        match masks {
            // One draw per element happens on the host.
            MaskDraws::PerElement => self.upload(&host_mask(n, keep, masks, draw)),
            MaskDraws::PerMask => {
                // The seed is drawn even for an empty mask, as candle's path and host_mask do,
                // so the generator stays in step.
                let seed = draw();
                let mut m = self.zeros(n)?;
                if n == 0 {
                    return Ok(m);
                }
                let keep = keep as f32;
                let f = self.func("dropout_mask")?;
                let mut l = self.stream.launch_builder(&f);
                l.arg(&mut m).arg(&n).arg(&seed).arg(&keep);
                // SAFETY: see "Launch soundness" above; thread i < n writes m[i] only, and `m`
                // holds n values.
                unsafe { l.launch(items(n)?) }.map_err(dev)?;
                Ok(m)
            }
        }
    }

    fn attn_softmax(
        &self,
        s: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        check_softmax(s.len(), lse.len(), a, seq)?;
        self.score_rows("attn_softmax", s, Lse::Write(lse), a, seq)
    }

    fn attn_probs(
        &self,
        s: &mut CudaSlice<T>,
        lse: &CudaSlice<f32>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        check_softmax(s.len(), lse.len(), a, seq)?;
        self.score_rows("attn_probs", s, Lse::Read(lse), a, seq)
    }

    fn attn_softmax_backward(
        &self,
        d: &mut CudaSlice<T>,
        p: &CudaSlice<T>,
        dout: &CudaSlice<T>,
        out: &CudaSlice<T>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        check_softmax_backward(d.len(), p.len(), dout.len(), out.len(), a, seq)?;
        let f = self.func("attn_softmax_backward")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(d)
            .arg(p)
            .arg(dout)
            .arg(out)
            .arg(&seq)
            .arg(&a.len)
            .arg(&a.heads)
            .arg(&a.head_dim)
            .arg(&a.scale);
        // SAFETY: see "Launch soundness" above; one warp per (head, query) row; the rows of
        // `dout` and `out` are heads·head_dim wide (checked above).
        unsafe { l.launch(items(a.heads * a.len * 32)?) }.map_err(dev)?;
        Ok(())
    }

    fn attention(
        &self,
        out: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
        qkv: &CudaSlice<T>,
        a: &Attn,
    ) -> Result<()> {
        crate::attention::forward(self, out, lse, qkv, a)
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaSlice<T>,
        dout: &CudaSlice<T>,
        out: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        qkv: &CudaSlice<T>,
        a: &Attn,
    ) -> Result<()> {
        crate::attention::backward(self, dqkv, dout, out, lse, qkv, a)
    }
}

impl<T: Elem> Cuda<T> {
    /// `out[c] += Σ_k part[at + k·cols + c]` over the `chunks` partials of each column.
    fn col_sum_add(
        &self,
        out: &mut CudaSlice<T>,
        part: &CudaSlice<f32>,
        at: usize,
        chunks: usize,
        cols: usize,
    ) -> Result<()> {
        same_len(out.len(), cols, "column sums")?;
        if at + chunks * cols > part.len() {
            return shape("column sums: partials past their buffer");
        }
        let part = part.slice(at..);
        let f = self.func("col_sum_add")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(out).arg(&part).arg(&chunks).arg(&cols);
        // SAFETY: see "Launch soundness" above; the partials were checked against their
        // buffer, `out` holds one value per column.
        unsafe { l.launch(items(cols)?) }.map_err(dev)?;
        Ok(())
    }

    /// Launches softmax row kernel `name` (`attn_softmax`, which writes the log-sum-exp, or
    /// `attn_probs`, which reads it) over the scores of sequence `seq`, operands checked.
    fn score_rows(
        &self,
        name: &str,
        s: &mut CudaSlice<T>,
        lse: Lse<'_>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        let bounds = self.bounds(a)?;
        let f = self.func(name)?;
        let rows = a.rows();
        let mut l = self.stream.launch_builder(&f);
        l.arg(s);
        match lse {
            Lse::Write(x) => l.arg(x),
            Lse::Read(x) => l.arg(x),
        };
        l.arg(&*bounds)
            .arg(&seq)
            .arg(&a.len)
            .arg(&a.heads)
            .arg(&rows);
        // SAFETY: see "Launch soundness" above; one warp per (head, query) row of the
        // sequence's heads·len·len scores (checked by the caller, with the key ranges).
        unsafe { l.launch(items(a.heads * a.len * 32)?) }.map_err(dev)?;
        Ok(())
    }

    /// The key ranges on the device, two u32 per query row: copied when they differ from the
    /// last ones copied.
    fn bounds(&self, a: &Attn) -> Result<Arc<CudaSlice<u32>>> {
        let mut last = self.bounds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((host, dev)) = last.as_ref() {
            if *host == a.bounds {
                return Ok(dev.clone());
            }
        }
        let flat: Vec<u32> = a.bounds.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
        let d = Arc::new(self.stream.clone_htod(&flat).map_err(dev)?);
        *last = Some((a.bounds.clone(), d.clone()));
        Ok(d)
    }
}
