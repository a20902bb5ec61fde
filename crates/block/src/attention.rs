//! Attention as matrix products: per sequence, the scores of all heads `S = scale·Q·Kᵀ` in
//! one batched GEMM per query head of a key/value group, a masked softmax over each query's key
//! range, then `O = P·V`; backward recomputes `P` from the saved log-sum-exp and runs the four
//! gradient products (`dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dQ = dS·K`, `dK = dSᵀ·Q`). The matrix
//! products are the backend's GEMMs (tensor cores on a GPU), so only the three row kernels
//! ([`Backend::attn_softmax`], [`Backend::attn_probs`], [`Backend::attn_softmax_backward`])
//! are attention-specific.
//!
//! The scores of one sequence are materialised (`heads × len × len`, reused across
//! sequences): it reads q, k and v by strides from the fused projection and writes the key and
//! value gradients of a group by accumulating its query heads (β = 1), with no atomics, so the
//! result does not vary from run to run. A sequence's keys outside a query's range cost their
//! products anyway (half of a causal row); a tiled kernel that skips them is the next step.

use crate::backend::{same_len, Attn, Backend, Batch, Mat};
use crate::error::Result;

/// The views of sequence `seq`'s projection columns, output columns and scores, for query head
/// `h = g·rep + r` batched over the key/value groups `g`; each with the stride between groups.
struct Views<'a> {
    a: &'a Attn,
    seq: usize,
}

impl Views<'_> {
    fn rep(&self) -> usize {
        self.a.heads / self.a.kv_heads
    }

    /// `d` columns at `off` in the sequence's rows of a buffer with rows `ld` apart.
    fn cols(&self, off: usize, ld: usize) -> Mat {
        let a = self.a;
        Mat {
            off: self.seq * a.len * ld + off,
            rows: a.len,
            cols: a.head_dim,
            ld,
        }
    }

    /// Query head `r` of every group: projection columns `q_col + (g·rep + r)·d`.
    fn q(&self, r: usize) -> (Mat, usize) {
        let d = self.a.head_dim;
        (self.cols(self.a.q_col + r * d, self.a.ld), self.rep() * d)
    }

    /// The key (`col` = k_col) or value (v_col) head of every group.
    fn kv(&self, col: usize) -> (Mat, usize) {
        (self.cols(col, self.a.ld), self.a.head_dim)
    }

    /// Output (or output gradient) columns of query head `r` of every group.
    fn out(&self, r: usize) -> (Mat, usize) {
        let d = self.a.head_dim;
        (self.cols(r * d, self.a.width()), self.rep() * d)
    }

    /// Scores of query head `r` of every group: `[h][len][len]` with `h = g·rep + r`.
    fn scores(&self, r: usize) -> (Mat, usize) {
        let len = self.a.len;
        let m = Mat {
            off: r * len * len,
            ..Mat::dense(len, len)
        };
        (m, self.rep() * len * len)
    }

    /// A product per group, the operands `a`, `b`, `c` elements apart.
    fn batch(&self, a: usize, b: usize, c: usize) -> Batch {
        Batch {
            count: self.a.kv_heads,
            a,
            b,
            c,
        }
    }
}

/// `s` = scale·Q·Kᵀ of every head of the sequence.
fn scores<B: Backend>(be: &B, s: &mut B::Buf, qkv: &B::Buf, v: &Views) -> Result<()> {
    let (km, ks) = v.kv(v.a.k_col);
    for r in 0..v.rep() {
        let (qm, qs) = v.q(r);
        let (sm, ss) = v.scores(r);
        be.gemm_batched(
            s,
            sm,
            qkv,
            qm,
            false,
            qkv,
            km,
            true,
            v.a.scale,
            0.0,
            v.batch(qs, ks, ss),
        )?;
    }
    Ok(())
}

/// Attention forward over [`Backend`] primitives: `out` (dense `rows × heads·head_dim`) and
/// `lse` (`heads × rows`), as [`Backend::attention`] defines them.
pub fn forward<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    lse: &mut B::Stat,
    qkv: &B::Buf,
    a: &Attn,
) -> Result<()> {
    a.check(be.len(qkv))?;
    same_len(be.len(out), a.rows() * a.width(), "attention out")?;
    if a.rows() == 0 {
        return Ok(());
    }
    let mut s = be.zeros(a.heads * a.len * a.len)?;
    for seq in 0..a.seqs {
        let v = Views { a, seq };
        scores(be, &mut s, qkv, &v)?;
        be.attn_softmax(&mut s, lse, a, seq)?;
        let (vm, vs) = v.kv(a.v_col);
        for r in 0..v.rep() {
            let (om, os) = v.out(r);
            let (sm, ss) = v.scores(r);
            be.gemm_batched(
                out,
                om,
                &s,
                sm,
                false,
                qkv,
                vm,
                false,
                1.0,
                0.0,
                v.batch(ss, vs, os),
            )?;
        }
    }
    Ok(())
}

/// Attention backward over [`Backend`] primitives, as [`Backend::attention_backward`]
/// defines it: `dqkv`'s q, k and v columns receive their gradients (other columns untouched).
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    dqkv: &mut B::Buf,
    dout: &B::Buf,
    out: &B::Buf,
    lse: &B::Stat,
    qkv: &B::Buf,
    a: &Attn,
) -> Result<()> {
    a.check(be.len(qkv))?;
    same_len(be.len(dqkv), be.len(qkv), "attention_backward dqkv")?;
    same_len(be.len(out), a.rows() * a.width(), "attention_backward out")?;
    same_len(
        be.len(dout),
        a.rows() * a.width(),
        "attention_backward dout",
    )?;
    if a.rows() == 0 {
        return Ok(());
    }
    let n = a.heads * a.len * a.len;
    let (mut p, mut ds) = (be.zeros(n)?, be.zeros(n)?);
    for seq in 0..a.seqs {
        let v = Views { a, seq };
        scores(be, &mut p, qkv, &v)?;
        be.attn_probs(&mut p, lse, a, seq)?;
        let (km, ks) = v.kv(a.k_col);
        let (vm, vs) = v.kv(a.v_col);
        // dV of a group = Σ over its query heads Pᵀ·dO; dP = dO·Vᵀ.
        for r in 0..v.rep() {
            let (sm, ss) = v.scores(r);
            let (om, os) = v.out(r);
            let beta = if r == 0 { 0.0 } else { 1.0 };
            be.gemm_batched(
                dqkv,
                vm,
                &p,
                sm,
                true,
                dout,
                om,
                false,
                1.0,
                beta,
                v.batch(ss, os, vs),
            )?;
            be.gemm_batched(
                &mut ds,
                sm,
                dout,
                om,
                false,
                qkv,
                vm,
                true,
                1.0,
                0.0,
                v.batch(os, vs, ss),
            )?;
        }
        be.attn_softmax_backward(&mut ds, &p, dout, out, a, seq)?;
        // dQ = dS·K; dK of a group = Σ over its query heads dSᵀ·Q.
        for r in 0..v.rep() {
            let (sm, ss) = v.scores(r);
            let (qm, qs) = v.q(r);
            be.gemm_batched(
                dqkv,
                qm,
                &ds,
                sm,
                false,
                qkv,
                km,
                false,
                1.0,
                0.0,
                v.batch(ss, ks, qs),
            )?;
            let beta = if r == 0 { 0.0 } else { 1.0 };
            be.gemm_batched(
                dqkv,
                km,
                &ds,
                sm,
                true,
                qkv,
                qm,
                false,
                1.0,
                beta,
                v.batch(ss, qs, ks),
            )?;
        }
    }
    Ok(())
}
