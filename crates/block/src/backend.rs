//! The primitives a layer is written in. A backend owns its buffers (host vectors, device
//! memory) and implements these few ops; the layers in this crate never touch memory directly.

use crate::error::{shape, Result};

/// Checks a score buffer of one sequence (`heads × len × len`) and the sequence index.
fn check_scores(len: usize, a: &Attn, seq: usize, what: &str) -> Result<()> {
    if seq >= a.seqs {
        return shape(format!("{what}: sequence {seq} of {}", a.seqs));
    }
    same_len(len, a.heads * a.len * a.len, what)
}

/// Checks the operands of [`Backend::attn_softmax`] or [`Backend::attn_probs`]: the scores
/// of sequence `seq`, the log-sum-exp of all rows, the key ranges.
pub(crate) fn check_softmax(s: usize, lse: usize, a: &Attn, seq: usize) -> Result<()> {
    check_scores(s, a, seq, "attention scores")?;
    same_len(lse, a.heads * a.rows(), "attention lse")?;
    a.check_bounds()
}

/// Checks the operands of [`Backend::attn_softmax_backward`] by their lengths.
pub(crate) fn check_softmax_backward(
    d: usize,
    p: usize,
    dout: usize,
    out: usize,
    a: &Attn,
    seq: usize,
) -> Result<()> {
    check_scores(d, a, seq, "attn_softmax_backward dP")?;
    same_len(p, d, "attn_softmax_backward P")?;
    same_len(dout, a.rows() * a.width(), "attn_softmax_backward dout")?;
    same_len(out, a.rows() * a.width(), "attn_softmax_backward out")
}

/// Checks that two operands have the same number of elements.
pub(crate) fn same_len(a: usize, b: usize, what: &str) -> Result<()> {
    if a != b {
        return shape(format!("{what}: lengths {a} and {b} differ"));
    }
    Ok(())
}

/// Rows of a dense operand of `len` elements in rows of `cols`.
pub(crate) fn rows_of(len: usize, cols: usize, what: &str) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return shape(format!("{what}: {len} values in rows of {cols}"));
    }
    Ok(len / cols)
}

/// Checks the gate and up views of a gated MLP's `[g | u]` buffer of `len` elements: both fit,
/// with the same shape and row stride.
pub(crate) fn check_gate(len: usize, gm: Mat, um: Mat, what: &str) -> Result<()> {
    gm.check(len, what)?;
    um.check(len, what)?;
    if gm.rows != um.rows || gm.cols != um.cols || gm.ld != um.ld {
        return shape(format!(
            "{what}: gate {}×{} (ld {}) and up {}×{} (ld {})",
            gm.rows, gm.cols, gm.ld, um.rows, um.cols, um.ld
        ));
    }
    Ok(())
}

/// The two GELU variants of the vision towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// Exact, erf-based.
    Erf,
    /// The tanh approximation (`gelu_pytorch_tanh`).
    Tanh,
}

/// A row-major matrix inside a buffer: `rows × cols` starting at element `off`, rows `ld`
/// elements apart. Column blocks of a wider matrix (q, k and v inside a fused projection's
/// output) are views with the parent's `ld`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat {
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Mat {
    /// A dense `rows × cols` matrix at the start of its buffer.
    pub fn dense(rows: usize, cols: usize) -> Mat {
        Mat {
            off: 0,
            rows,
            cols,
            ld: cols,
        }
    }

    /// The same view `by` elements further into its buffer.
    pub fn shifted(self, by: usize) -> Mat {
        Mat {
            off: self.off + by,
            ..self
        }
    }

    /// Columns `c0 .. c0 + n` of this matrix.
    pub fn cols(self, c0: usize, n: usize) -> Mat {
        Mat {
            off: self.off + c0,
            cols: n,
            ..self
        }
    }

    /// One past the last element the view touches (0 for an empty view).
    pub fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        self.off + (self.rows - 1) * self.ld + self.cols
    }

    /// Checks that the view fits a buffer of `len` elements and its rows do not overlap.
    pub fn check(&self, len: usize, what: &str) -> Result<()> {
        if self.cols > self.ld && self.rows > 1 {
            return shape(format!(
                "{what}: {} columns in rows {} apart",
                self.cols, self.ld
            ));
        }
        if self.end() > len {
            return shape(format!(
                "{what}: view {}×{} at {} (ld {}) exceeds its buffer of {len}",
                self.rows, self.cols, self.off, self.ld
            ));
        }
        Ok(())
    }
}

/// The steps of a batched matrix product: `count` products, the i-th with each operand's view
/// moved `i·a`, `i·b` and `i·c` elements into its buffer (heads side by side in the columns of
/// a projection, or score matrices one after another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Batch {
    /// One product.
    pub fn one() -> Batch {
        Batch {
            count: 1,
            a: 0,
            b: 0,
            c: 0,
        }
    }
}

/// Attention over rows of a fused projection output: `seqs` sequences of `len` rows each;
/// query head `h` reads columns `q_col + h·head_dim` of the row, its key/value head
/// `h / (heads / kv_heads)` columns `k_col + g·head_dim` and `v_col + g·head_dim`. Query row
/// `r` (of all `seqs·len`) attends to keys `bounds[r].0 .. bounds[r].1` of its own sequence:
/// `(0, valid)` for padded images, `(segment start, r + 1)` for packed causal rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Attn {
    pub seqs: usize,
    pub len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Row stride of the projection buffer.
    pub ld: usize,
    pub q_col: usize,
    pub k_col: usize,
    pub v_col: usize,
    pub scale: f32,
    pub bounds: Vec<(u32, u32)>,
}

impl Attn {
    /// Rows of all sequences.
    pub fn rows(&self) -> usize {
        self.seqs * self.len
    }

    /// Width of the attention output (`heads · head_dim`).
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Checks the key ranges: one per query row, each within its sequence.
    pub fn check_bounds(&self) -> Result<()> {
        if self.bounds.len() != self.rows() {
            return shape(format!(
                "attention: {} key ranges for {} query rows",
                self.bounds.len(),
                self.rows()
            ));
        }
        for (r, &(lo, hi)) in self.bounds.iter().enumerate() {
            if lo > hi || hi as usize > self.len {
                return shape(format!(
                    "attention: query row {r} has key range {lo}..{hi} in a sequence of {}",
                    self.len
                ));
            }
        }
        Ok(())
    }

    /// Checks the layout against a projection buffer of `len` elements.
    pub fn check(&self, qkv_len: usize) -> Result<()> {
        let (h, g, d) = (self.heads, self.kv_heads, self.head_dim);
        if g == 0 || h % g != 0 {
            return shape(format!(
                "attention: {h} query heads over {g} key/value heads"
            ));
        }
        self.check_bounds()?;
        let widest = (self.q_col + h * d)
            .max(self.k_col + g * d)
            .max(self.v_col + g * d);
        if widest > self.ld {
            return shape(format!(
                "attention: heads reach column {widest} of rows {} wide",
                self.ld
            ));
        }
        Mat {
            off: 0,
            rows: self.rows(),
            cols: widest,
            ld: self.ld,
        }
        .check(qkv_len, "attention input")
    }
}

/// How a LoRA dropout mask is drawn from the model's generator. The block path must draw as
/// the path it replaces does on the same device, so that both train on the same masks (and a
/// recomputed layer replays its forward pass's masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskDraws {
    /// One draw per element, kept when the uniform `(draw >> 11) / 2⁵³` is below `keep`:
    /// candle's path on the CPU.
    PerElement,
    /// One draw per mask, the seed of a counter-based hash of each element's index: candle's
    /// path on a GPU (`cpmv_kernels::dropout_mask`), where a mask as large as the activations
    /// is made on the device instead of the host.
    PerMask,
}

/// The values of a dropout mask of `n` elements drawn as `masks` says: the CPU backend's
/// masks, and the reference a device backend's masks are checked against.
pub fn host_mask(n: usize, keep: f64, masks: MaskDraws, draw: &mut dyn FnMut() -> u64) -> Vec<f32> {
    match masks {
        MaskDraws::PerElement => {
            let scaled = (1.0 / keep) as f32;
            (0..n)
                .map(|_| {
                    let u = (draw() >> 11) as f64 / (1u64 << 53) as f64;
                    if u < keep {
                        scaled
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        MaskDraws::PerMask => {
            // The device kernel's arithmetic exactly: keep in f32, the uniform in f64.
            let seed = draw();
            let keep = keep as f32;
            let scaled = 1.0f32 / keep;
            (0..n as u64)
                .map(|i| {
                    let z = splitmix64(seed ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
                    let u = (z >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0);
                    if u < f64::from(keep) {
                        scaled
                    } else {
                        0.0
                    }
                })
                .collect()
        }
    }
}

/// SplitMix64's output function of `z` (the step added first), as the device kernels hash.
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The operations layers are written in. Buffers hold f32 values in the CPU backend; a device
/// backend may store bf16 and compute in f32 where the reference does (statistics stay f32).
pub trait Backend {
    /// A buffer of elements (activations, weights, gradients).
    type Buf;
    /// A buffer of per-row statistics (norm statistics, softmax log-sum-exp): f32 whatever
    /// the elements are, as the reference computes them.
    type Stat;

    /// A zero-filled buffer.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A zero-filled statistics buffer.
    fn zeros_stat(&self, n: usize) -> Result<Self::Stat>;
    /// The statistics' values.
    fn download_stat(&self, s: &Self::Stat) -> Result<Vec<f32>>;
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// The buffer's values.
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of elements.
    fn len(&self, b: &Self::Buf) -> usize;
    /// A copy.
    fn copy(&self, b: &Self::Buf) -> Result<Self::Buf>;

    /// `C = α·op(A)·op(B) + β·C` where `op` transposes when asked; `op(A)` is `m × k`,
    /// `op(B)` `k × n`, `C` `m × n`. With β = 0, `C`'s previous values are not read.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        c: &mut Self::Buf,
        cm: Mat,
        a: &Self::Buf,
        am: Mat,
        ta: bool,
        b: &Self::Buf,
        bm: Mat,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_batched(c, cm, a, am, ta, b, bm, tb, alpha, beta, Batch::one())
    }

    /// [`Backend::gemm`] `batch.count` times, operand views moved by the batch's strides
    /// each time (one launch on a device).
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        c: &mut Self::Buf,
        cm: Mat,
        a: &Self::Buf,
        am: Mat,
        ta: bool,
        b: &Self::Buf,
        bm: Mat,
        tb: bool,
        alpha: f32,
        beta: f32,
        batch: Batch,
    ) -> Result<()>;

    /// `y = act(y + bias)` over the view (bias `[cols]`); with an activation, `pre` (dense
    /// `rows × cols`) receives `y + bias`, which the backward pass needs.
    fn bias_act(
        &self,
        y: &mut Self::Buf,
        ym: Mat,
        bias: Option<&Self::Buf>,
        act: Option<Gelu>,
        pre: Option<&mut Self::Buf>,
    ) -> Result<()>;

    /// `d = d · act'(pre)` in place (both dense, same length).
    fn act_backward(&self, d: &mut Self::Buf, pre: &Self::Buf, act: Gelu) -> Result<()>;

    /// `db += Σ_rows dy` over the view (db `[cols]`).
    fn bias_grad(&self, db: &mut Self::Buf, dy: &Self::Buf, dym: Mat) -> Result<()>;

    /// LayerNorm of the dense `rows × cols` `x` into `y`, biased variance; `stats` (2 per
    /// row) receives mean and 1/σ.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        y: &mut Self::Buf,
        stats: &mut Self::Stat,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        cols: usize,
        eps: f32,
    ) -> Result<()>;

    /// LayerNorm backward: `dx += ∂/∂x`, and when given `dw += ∂/∂w`, `db += ∂/∂b`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        db: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        stats: &Self::Stat,
        cols: usize,
    ) -> Result<()>;

    /// RMSNorm of the dense `rows × cols` `x` into `y`: `y = x / √(mean(x²) + eps) · w`;
    /// `rstd` (one per row) receives `1 / √(mean(x²) + eps)`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        y: &mut Self::Buf,
        rstd: &mut Self::Stat,
        x: &Self::Buf,
        w: &Self::Buf,
        cols: usize,
        eps: f32,
    ) -> Result<()>;

    /// RMSNorm backward: `dx += ∂/∂x`, and when given `dw += ∂/∂w`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Stat,
        cols: usize,
    ) -> Result<()>;

    /// Rotary embedding in place on the heads of view `m` (each `head_dim` wide, halves
    /// rotated as `x·cos + rotate_half(x)·sin`), with tables `cos`, `sin` of one dense
    /// `[m.rows, head_dim]` row per query row. `transpose` applies the transposed rotation,
    /// which is the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        m: Mat,
        head_dim: usize,
        cos: &Self::Buf,
        sin: &Self::Buf,
        transpose: bool,
    ) -> Result<()>;

    /// `y = silu(g) · u` with `g` and `u` views of `gu` (same shape and row stride), `y` dense
    /// (the gated MLP).
    fn swiglu(&self, y: &mut Self::Buf, gu: &Self::Buf, gm: Mat, um: Mat) -> Result<()>;

    /// Backward of [`Backend::swiglu`] from the dense `dy`: the views `gm` and `um` of `dgu`
    /// receive the gradients of `g` and `u`.
    fn swiglu_backward(
        &self,
        dgu: &mut Self::Buf,
        dy: &Self::Buf,
        gu: &Self::Buf,
        gm: Mat,
        um: Mat,
    ) -> Result<()>;

    /// `y += x` (same length).
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;

    /// `y = x · m` elementwise (same length).
    fn mul(&self, y: &mut Self::Buf, x: &Self::Buf, m: &Self::Buf) -> Result<()>;

    /// An inverted-dropout mask of `n` values, `1/keep` or 0, drawn from the model's
    /// generator `draw` the way `masks` says (the values [`host_mask`] gives).
    fn dropout_mask(
        &self,
        n: usize,
        keep: f64,
        masks: MaskDraws,
        draw: &mut dyn FnMut() -> u64,
    ) -> Result<Self::Buf>;

    /// Softmax of one sequence's attention scores in place: `s` holds `heads × len × len`
    /// scores (scaled) of sequence `seq` of `a`; row `i` of head `h` becomes its probabilities
    /// over the query's key range (0 elsewhere) and `lse[h·rows + seq·len + i]` its
    /// log-sum-exp (−∞ for an empty range). One step of [`crate::attention::forward`].
    fn attn_softmax(
        &self,
        s: &mut Self::Buf,
        lse: &mut Self::Stat,
        a: &Attn,
        seq: usize,
    ) -> Result<()>;

    /// The probabilities again from the scores `s` and the forward pass's `lse`, in place
    /// (as [`Backend::attn_softmax`] left them).
    fn attn_probs(&self, s: &mut Self::Buf, lse: &Self::Stat, a: &Attn, seq: usize) -> Result<()>;

    /// Softmax backward of one sequence in place: `d` holds `dP` (`heads × len × len`) and
    /// becomes `dS = P·(dP − δ)·scale`, with `p` the probabilities and `δ` of each query and
    /// head `Σ dout·out` over the head's columns (`dout`, `out` dense `rows × heads·head_dim`).
    #[allow(clippy::too_many_arguments)]
    fn attn_softmax_backward(
        &self,
        d: &mut Self::Buf,
        p: &Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        a: &Attn,
        seq: usize,
    ) -> Result<()>;

    /// Attention forward: `out` (dense `rows × heads·head_dim`) and the softmax log-sum-exp
    /// `lse` (`heads × rows`, f32) of every query.
    fn attention(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Stat,
        qkv: &Self::Buf,
        shape: &Attn,
    ) -> Result<()>;

    /// Attention backward from `dout`: `dqkv` (same layout as `qkv`) receives the gradients
    /// of the q, k and v columns (other columns untouched).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Stat,
        qkv: &Self::Buf,
        shape: &Attn,
    ) -> Result<()>;
}
