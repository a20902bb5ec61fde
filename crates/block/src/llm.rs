//! One decoder layer of the language models (MiniCPM-2.4B of 2.0, Llama-3 of 2.5, Qwen2 of
//! 2.6) as a single op: `x + s·o(attn(rope(qkv(RMS1(x)))))`, then `+ s·down(silu(gate)·up)` of
//! `RMS2(·)`, every projection with its optional LoRA adapter. Attention is grouped-query over
//! packed rows (each token sees its own sample's earlier tokens); `s` is MiniCPM's residual
//! scale `scale_depth / √layers` (1 for the others); q/k/v biases are Qwen2's.

use crate::backend::{Attn, Backend, Mat};
use crate::error::{shape, Result};
use crate::linear::{linear_backward, linear_forward, Grads, LinSaved, Linear, Param, Run};

/// One decoder layer.
pub struct LlmLayer<B: Backend> {
    pub ln1: Param<B>,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub ln2: Param<B>,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    /// Scale of both residual branches.
    pub residual_scale: f32,
}

/// The rows of a call: `seqs` rows of `len` tokens; token `r` (of all `seqs·len`) attends to
/// keys `bounds[r]` of its row, and is rotated by row `r` of the `[seqs·len, head_dim]` tables
/// `cos` and `sin`.
pub struct Tokens<'a, B: Backend> {
    pub seqs: usize,
    pub len: usize,
    pub bounds: &'a [(u32, u32)],
    pub cos: &'a B::Buf,
    pub sin: &'a B::Buf,
}

/// Activations of one forward pass, kept for the backward pass.
pub struct Saved<B: Backend> {
    rows: usize,
    x: B::Buf,
    h1: B::Buf,
    r1: B::Stat,
    /// q, k (rotated) and v side by side.
    qkv: B::Buf,
    lin_qkv: Vec<LinSaved<B>>,
    att: B::Buf,
    lse: B::Stat,
    lin_o: LinSaved<B>,
    x2: B::Buf,
    h2: B::Buf,
    r2: B::Stat,
    /// gate and up side by side.
    gu: B::Buf,
    lin_gu: Vec<LinSaved<B>>,
    act: B::Buf,
    lin_down: LinSaved<B>,
}

impl<B: Backend> LlmLayer<B> {
    /// Width of the fused `[q | k | v]` rows.
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn check(&self, be: &B, x: &B::Buf, t: &Tokens<B>) -> Result<()> {
        let (c, rows) = (self.hidden, t.seqs * t.len);
        if be.len(x) != rows * c {
            return shape(format!(
                "decoder layer: input of {} values for {} rows of {} tokens × {c}",
                be.len(x),
                t.seqs,
                t.len
            ));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return shape(format!(
                "decoder layer: {} query heads over {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        let outs = [
            (self.q.out, self.heads * self.head_dim, "q"),
            (self.k.out, self.kv_heads * self.head_dim, "k"),
            (self.v.out, self.kv_heads * self.head_dim, "v"),
            (self.gate.out, self.up.out, "gate"),
            (self.o.out, c, "o"),
            (self.down.out, c, "down"),
            (self.down.inp, self.up.out, "down input"),
            (self.q.inp, c, "q input"),
            (self.k.inp, c, "k input"),
            (self.v.inp, c, "v input"),
            (self.o.inp, self.heads * self.head_dim, "o input"),
            (self.gate.inp, c, "gate input"),
            (self.up.inp, c, "up input"),
            (be.len(&self.ln1.value), c, "input norm"),
            (be.len(&self.ln2.value), c, "post-attention norm"),
        ];
        for (got, want, what) in outs {
            if got != want {
                return shape(format!(
                    "decoder layer: {what} projection of width {got}, expected {want}"
                ));
            }
        }
        Ok(())
    }

    fn attn_shape(&self, t: &Tokens<B>) -> Attn {
        let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        Attn {
            seqs: t.seqs,
            len: t.len,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ld: self.qkv_width(),
            q_col: 0,
            k_col: nq,
            v_col: nq + nkv,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            bounds: t.bounds.to_vec(),
        }
    }

    /// The views of q and k inside the `[rows, q | k | v]` buffer (the rotated parts).
    fn qk_views(&self, rows: usize) -> [Mat; 2] {
        let qm = Mat::dense(rows, self.qkv_width());
        let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        [qm.cols(0, nq), qm.cols(nq, nkv)]
    }

    /// The layer's output `[rows, hidden]`, and with `save` what [`LlmLayer::backward`] needs.
    /// LoRA dropout masks are drawn in the order q, k, v, o, gate, up, down.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        t: &Tokens<B>,
        run: &mut Run,
        save: bool,
    ) -> Result<(B::Buf, Option<Saved<B>>)> {
        self.check(be, x, t)?;
        let c = self.hidden;
        let f = self.up.out;
        let rows = t.seqs * t.len;
        let s = self.residual_scale;
        let attn = self.attn_shape(t);
        let mut h1 = be.zeros(rows * c)?;
        let mut r1 = be.zeros_stat(rows)?;
        be.rms_norm(&mut h1, &mut r1, x, &self.ln1.value, c, self.eps)?;
        let w = self.qkv_width();
        let mut qkv = be.zeros(rows * w)?;
        let qkv_m = Mat::dense(rows, w);
        let mut lin_qkv = Vec::with_capacity(3);
        let mut col = 0;
        for l in [&self.q, &self.k, &self.v] {
            let m = qkv_m.cols(col, l.out);
            lin_qkv.push(linear_forward(
                be, l, &h1, &mut qkv, m, 1.0, 0.0, None, None, run,
            )?);
            col += l.out;
        }
        for m in self.qk_views(rows) {
            be.rope(&mut qkv, m, self.head_dim, t.cos, t.sin, false)?;
        }
        let mut att = be.zeros(rows * self.heads * self.head_dim)?;
        let mut lse = be.zeros_stat(self.heads * rows)?;
        be.attention(&mut att, &mut lse, &qkv, &attn)?;
        let cm = Mat::dense(rows, c);
        let mut x2 = be.copy(x)?;
        let lin_o = linear_forward(be, &self.o, &att, &mut x2, cm, s, 1.0, None, None, run)?;
        let mut h2 = be.zeros(rows * c)?;
        let mut r2 = be.zeros_stat(rows)?;
        be.rms_norm(&mut h2, &mut r2, &x2, &self.ln2.value, c, self.eps)?;
        let gu_m = Mat::dense(rows, 2 * f);
        let (gm, um) = (gu_m.cols(0, f), gu_m.cols(f, f));
        let mut gu = be.zeros(rows * 2 * f)?;
        let lin_gu = vec![
            linear_forward(be, &self.gate, &h2, &mut gu, gm, 1.0, 0.0, None, None, run)?,
            linear_forward(be, &self.up, &h2, &mut gu, um, 1.0, 0.0, None, None, run)?,
        ];
        let mut act = be.zeros(rows * f)?;
        be.swiglu(&mut act, &gu, gm, um)?;
        let mut y = be.copy(&x2)?;
        let lin_down = linear_forward(be, &self.down, &act, &mut y, cm, s, 1.0, None, None, run)?;
        if !save {
            return Ok((y, None));
        }
        let saved = Saved {
            rows,
            x: be.copy(x)?,
            h1,
            r1,
            qkv,
            lin_qkv,
            att,
            lse,
            lin_o,
            x2,
            h2,
            r2,
            gu,
            lin_gu,
            act,
            lin_down,
        };
        Ok((y, Some(saved)))
    }

    /// Backward from the output gradient `dy` of the forward pass over `t` (the same rows; its
    /// key ranges and rotary tables are read again rather than kept per layer): parameter gradients are added
    /// to `grads`, the input gradient returned.
    pub fn backward(
        &self,
        be: &B,
        s: &Saved<B>,
        t: &Tokens<B>,
        dy: &B::Buf,
        grads: &mut Grads<B>,
    ) -> Result<B::Buf> {
        let c = self.hidden;
        let f = self.up.out;
        let rows = s.rows;
        let rs = self.residual_scale;
        if be.len(dy) != rows * c || t.seqs * t.len != rows {
            return shape(format!(
                "decoder layer backward: gradient of {} values and {} × {} tokens for {rows} \
                 rows × {c}",
                be.len(dy),
                t.seqs,
                t.len
            ));
        }
        let cm = Mat::dense(rows, c);
        // Residual: the output gradient flows to x2 unchanged.
        let mut dx2 = be.copy(dy)?;
        let mut dact = be.zeros(rows * f)?;
        linear_backward(
            be,
            &self.down,
            &s.lin_down,
            &s.act,
            dy,
            cm,
            rs,
            &mut dact,
            0.0,
            grads,
        )?;
        let gu_m = Mat::dense(rows, 2 * f);
        let (gm, um) = (gu_m.cols(0, f), gu_m.cols(f, f));
        let mut dgu = be.zeros(rows * 2 * f)?;
        be.swiglu_backward(&mut dgu, &dact, &s.gu, gm, um)?;
        drop(dact);
        let mut dh2 = be.zeros(rows * c)?;
        for (j, (l, ls)) in [&self.gate, &self.up]
            .into_iter()
            .zip(&s.lin_gu)
            .enumerate()
        {
            let m = [gm, um][j];
            let beta = if j == 0 { 0.0 } else { 1.0 };
            linear_backward(be, l, ls, &s.h2, &dgu, m, 1.0, &mut dh2, beta, grads)?;
        }
        drop(dgu);
        self.norm_backward(be, &self.ln2, &mut dx2, &dh2, &s.x2, &s.r2, grads)?;
        drop(dh2);
        let mut datt = be.zeros(rows * self.heads * self.head_dim)?;
        linear_backward(
            be, &self.o, &s.lin_o, &s.att, &dx2, cm, rs, &mut datt, 0.0, grads,
        )?;
        let mut dqkv = be.zeros(rows * self.qkv_width())?;
        let attn = self.attn_shape(t);
        be.attention_backward(&mut dqkv, &datt, &s.att, &s.lse, &s.qkv, &attn)?;
        drop(datt);
        for m in self.qk_views(rows) {
            be.rope(&mut dqkv, m, self.head_dim, t.cos, t.sin, true)?;
        }
        let qkv_m = Mat::dense(rows, self.qkv_width());
        let mut dh1 = be.zeros(rows * c)?;
        let mut col = 0;
        for (j, (l, ls)) in [&self.q, &self.k, &self.v]
            .into_iter()
            .zip(&s.lin_qkv)
            .enumerate()
        {
            let m = qkv_m.cols(col, l.out);
            let beta = if j == 0 { 0.0 } else { 1.0 };
            linear_backward(be, l, ls, &s.h1, &dqkv, m, 1.0, &mut dh1, beta, grads)?;
            col += l.out;
        }
        drop(dqkv);
        self.norm_backward(be, &self.ln1, &mut dx2, &dh1, &s.x, &s.r1, grads)?;
        Ok(dx2)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        be: &B,
        w: &Param<B>,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &B::Buf,
        rstd: &B::Stat,
        grads: &mut Grads<B>,
    ) -> Result<()> {
        let mut dw = grads.take(be, w)?;
        be.rms_norm_backward(dx, dw.as_mut(), dy, x, &w.value, rstd, self.hidden)?;
        grads.put(w, dw);
        Ok(())
    }
}
