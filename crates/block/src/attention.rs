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

/// The views of one sequence's projection columns and scores, for head `h = g·rep + r`
/// batched over the key/value groups `g`.
struct Views {
    len: usize,
    d: usize,
    rep: usize,
    groups: usize,
    /// Row stride of the projection buffer and width of the output.
    ld: usize,
    width: usize,
    /// First element of the sequence's rows in the projection and in the output.
    qkv0: usize,
    out0: usize,
    q_col: usize,
    k_col: usize,
    v_col: usize,
}

impl Views {
    fn new(a: &Attn, seq: usize) -> Views {
        let rows0 = seq * a.len;
        Views {
            len: a.len,
            d: a.head_dim,
            rep: a.heads / a.kv_heads,
            groups: a.kv_heads,
            ld: a.ld,
            width: a.width(),
            qkv0: rows0 * a.ld,
            out0: rows0 * a.width(),
            q_col: a.q_col,
            k_col: a.k_col,
            v_col: a.v_col,
        }
    }

    /// Query head `r` of every group: columns `q_col + (g·rep + r)·d`.
    fn q(&self, r: usize) -> (Mat, usize) {
        let m = Mat {
            off: self.qkv0 + self.q_col + r * self.d,
            rows: self.len,
            cols: self.d,
            ld: self.ld,
        };
        (m, self.rep * self.d)
    }

    /// Key (or value, `col` = v_col) head of every group.
    fn kv(&self, col: usize) -> (Mat, usize) {
        let m = Mat {
            off: self.qkv0 + col,
            rows: self.len,
            cols: self.d,
            ld: self.ld,
        };
        (m, self.d)
    }

    /// Scores of query head `r` of every group: `[h][len][len]` with `h = g·rep + r`.
    fn scores(&self, r: usize) -> (Mat, usize) {
        let sq = self.len * self.len;
        let m = Mat {
            off: r * sq,
            rows: self.len,
            cols: self.len,
            ld: self.len,
        };
        (m, self.rep * sq)
    }

    /// Output (or output gradient) columns of query head `r` of every group.
    fn out(&self, r: usize) -> (Mat, usize) {
        let m = Mat {
            off: self.out0 + r * self.d,
            rows: self.len,
            cols: self.d,
            ld: self.width,
        };
        (m, self.rep * self.d)
    }

    fn batch(&self, a: usize, b: usize, c: usize) -> Batch {
        Batch {
            count: self.groups,
            a,
            b,
            c,
        }
    }
}

/// `s` = scale·Q·Kᵀ of every head of the sequence.
fn scores<B: Backend>(be: &B, s: &mut B::Buf, qkv: &B::Buf, v: &Views, scale: f32) -> Result<()> {
    let (km, ks) = v.kv(v.k_col);
    for r in 0..v.rep {
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
            scale,
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
        let v = Views::new(a, seq);
        scores(be, &mut s, qkv, &v, a.scale)?;
        be.attn_softmax(&mut s, lse, a, seq)?;
        let (vm, vs) = v.kv(v.v_col);
        for r in 0..v.rep {
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
        let v = Views::new(a, seq);
        scores(be, &mut p, qkv, &v, a.scale)?;
        be.attn_probs(&mut p, lse, a, seq)?;
        let (km, ks) = v.kv(v.k_col);
        let (vm, vs) = v.kv(v.v_col);
        // dV of a group = Σ over its query heads Pᵀ·dO; dP = dO·Vᵀ.
        for r in 0..v.rep {
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
        for r in 0..v.rep {
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
