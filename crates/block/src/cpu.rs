//! The reference backend: f32 vectors on the host, matrix products through the `gemm` crate
//! (the one candle's CPU matmul uses), attention one (sequence, key/value head) per rayon task.

use rayon::prelude::*;

use crate::backend::{
    check_gate, check_softmax, check_softmax_backward, host_mask, rows_of, same_len, Attn, Backend,
    Batch, Gelu, MaskDraws, Mat,
};
use crate::error::{shape, Result};

/// The CPU backend (f32).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// `gelu(x)` evaluated in f64 and rounded once.
pub fn gelu(x: f32, act: Gelu) -> f32 {
    let v = x as f64;
    let y = match act {
        Gelu::Erf => 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)),
        Gelu::Tanh => 0.5 * v * (1.0 + (SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)).tanh()),
    };
    y as f32
}

/// `gelu'(x)`.
pub fn gelu_grad(x: f32, act: Gelu) -> f32 {
    let v = x as f64;
    let d = match act {
        Gelu::Erf => {
            let cdf = 0.5 * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + v * pdf
        }
        Gelu::Tanh => {
            let u = SQRT_2_OVER_PI * (v + 0.044715 * v * v * v);
            let t = u.tanh();
            0.5 * (1.0 + t)
                + 0.5 * v * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * v * v)
        }
    };
    d as f32
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Stat = Vec<f32>;

    fn zeros_stat(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn download_stat(&self, s: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(s.clone())
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }

    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }

    fn copy(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }

    fn gemm_batched(
        &self,
        c: &mut Vec<f32>,
        cm: Mat,
        a: &Vec<f32>,
        am: Mat,
        ta: bool,
        b: &Vec<f32>,
        bm: Mat,
        tb: bool,
        alpha: f32,
        beta: f32,
        batch: Batch,
    ) -> Result<()> {
        for i in 0..batch.count {
            gemm_one(
                c,
                cm.shifted(i * batch.c),
                a,
                am.shifted(i * batch.a),
                ta,
                b,
                bm.shifted(i * batch.b),
                tb,
                alpha,
                beta,
            )?;
        }
        Ok(())
    }

    fn bias_act(
        &self,
        y: &mut Vec<f32>,
        ym: Mat,
        bias: Option<&Vec<f32>>,
        act: Option<Gelu>,
        mut pre: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        ym.check(y.len(), "bias_act y")?;
        if let Some(b) = bias {
            same_len(b.len(), ym.cols, "bias_act bias")?;
        }
        if let Some(p) = pre.as_deref() {
            same_len(p.len(), ym.rows * ym.cols, "bias_act pre")?;
        }
        for r in 0..ym.rows {
            let row = &mut y[ym.off + r * ym.ld..ym.off + r * ym.ld + ym.cols];
            for (c, x) in row.iter_mut().enumerate() {
                let v = *x + bias.map_or(0.0, |b| b[c]);
                if let Some(p) = pre.as_deref_mut() {
                    p[r * ym.cols + c] = v;
                }
                *x = match act {
                    Some(a) => gelu(v, a),
                    None => v,
                };
            }
        }
        Ok(())
    }

    fn act_backward(&self, d: &mut Vec<f32>, pre: &Vec<f32>, act: Gelu) -> Result<()> {
        same_len(d.len(), pre.len(), "act_backward")?;
        d.par_iter_mut()
            .zip(pre.par_iter())
            .for_each(|(d, &x)| *d *= gelu_grad(x, act));
        Ok(())
    }

    fn bias_grad(&self, db: &mut Vec<f32>, dy: &Vec<f32>, dym: Mat) -> Result<()> {
        dym.check(dy.len(), "bias_grad dy")?;
        same_len(db.len(), dym.cols, "bias_grad db")?;
        // Summed in f64: the reference sums in f32 with pairwise reductions; both are far
        // below the tests' tolerance from the exact sum.
        let mut acc = vec![0f64; dym.cols];
        for r in 0..dym.rows {
            let row = &dy[dym.off + r * dym.ld..dym.off + r * dym.ld + dym.cols];
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += x as f64;
            }
        }
        for (d, a) in db.iter_mut().zip(acc) {
            *d += a as f32;
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        y: &mut Vec<f32>,
        stats: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "layer_norm")?;
        same_len(y.len(), x.len(), "layer_norm y")?;
        same_len(stats.len(), 2 * rows, "layer_norm stats")?;
        same_len(w.len(), cols, "layer_norm weight")?;
        same_len(b.len(), cols, "layer_norm bias")?;
        y.par_chunks_mut(cols)
            .zip(stats.par_chunks_mut(2))
            .zip(x.par_chunks(cols))
            .for_each(|((y, st), x)| {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                for c in 0..cols {
                    let n = (x[c] as f64 - mean) * rstd;
                    y[c] = (n * w[c] as f64 + b[c] as f64) as f32;
                }
                st[0] = mean as f32;
                st[1] = rstd as f32;
            });
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        db: Option<&mut Vec<f32>>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        stats: &Vec<f32>,
        cols: usize,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "layer_norm_backward")?;
        same_len(dx.len(), x.len(), "layer_norm_backward dx")?;
        same_len(dy.len(), x.len(), "layer_norm_backward dy")?;
        same_len(stats.len(), 2 * rows, "layer_norm_backward stats")?;
        same_len(w.len(), cols, "layer_norm_backward weight")?;
        if let Some(dw) = dw.as_deref() {
            same_len(dw.len(), cols, "layer_norm_backward dw")?;
        }
        if let Some(db) = db.as_deref() {
            same_len(db.len(), cols, "layer_norm_backward db")?;
        }
        dx.par_chunks_mut(cols)
            .zip(dy.par_chunks(cols))
            .zip(x.par_chunks(cols))
            .zip(stats.par_chunks(2))
            .for_each(|(((dx, dy), x), st)| {
                let (mean, rstd) = (st[0] as f64, st[1] as f64);
                let (mut s1, mut s2) = (0f64, 0f64);
                for c in 0..cols {
                    let xh = (x[c] as f64 - mean) * rstd;
                    let g = dy[c] as f64 * w[c] as f64;
                    s1 += g;
                    s2 += g * xh;
                }
                let (m1, m2) = (s1 / cols as f64, s2 / cols as f64);
                for c in 0..cols {
                    let xh = (x[c] as f64 - mean) * rstd;
                    let g = dy[c] as f64 * w[c] as f64;
                    dx[c] += (rstd * (g - m1 - xh * m2)) as f32;
                }
            });
        if dw.is_none() && db.is_none() {
            return Ok(());
        }
        let (mut gw, mut gb) = (vec![0f64; cols], vec![0f64; cols]);
        for r in 0..rows {
            let (mean, rstd) = (stats[2 * r] as f64, stats[2 * r + 1] as f64);
            for c in 0..cols {
                let i = r * cols + c;
                gw[c] += dy[i] as f64 * (x[i] as f64 - mean) * rstd;
                gb[c] += dy[i] as f64;
            }
        }
        if let Some(dw) = dw {
            dw.iter_mut().zip(gw).for_each(|(d, g)| *d += g as f32);
        }
        if let Some(db) = db {
            db.iter_mut().zip(gb).for_each(|(d, g)| *d += g as f32);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        cols: usize,
        eps: f32,
    ) -> Result<()> {
        let rows = rows_of(x.len(), cols, "rms_norm")?;
        same_len(y.len(), x.len(), "rms_norm y")?;
        same_len(rstd.len(), rows, "rms_norm rstd")?;
        same_len(w.len(), cols, "rms_norm weight")?;
        y.par_chunks_mut(cols)
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(cols))
            .for_each(|((y, r), x)| {
                let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for c in 0..cols {
                    y[c] = (x[c] as f64 * inv * w[c] as f64) as f32;
                }
                *r = inv as f32;
            });
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
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
        // y = x·r·w with r = (mean(x²) + eps)^(-1/2):
        // ∂/∂x = r·(g − x·r²·mean(g·x)), g = dy·w.
        dx.par_chunks_mut(cols)
            .zip(dy.par_chunks(cols))
            .zip(x.par_chunks(cols))
            .zip(rstd.par_iter())
            .for_each(|(((dx, dy), x), &r)| {
                let r = r as f64;
                let gx = (0..cols)
                    .map(|c| dy[c] as f64 * w[c] as f64 * x[c] as f64)
                    .sum::<f64>()
                    / cols as f64;
                for c in 0..cols {
                    let g = dy[c] as f64 * w[c] as f64;
                    dx[c] += (r * (g - x[c] as f64 * r * r * gx)) as f32;
                }
            });
        if let Some(dw) = dw {
            let mut acc = vec![0f64; cols];
            for ((dy, x), &inv) in dy.chunks(cols).zip(x.chunks(cols)).zip(rstd) {
                for ((a, &d), &xv) in acc.iter_mut().zip(dy).zip(x) {
                    *a += d as f64 * xv as f64 * inv as f64;
                }
            }
            dw.iter_mut().zip(acc).for_each(|(d, a)| *d += a as f32);
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        m: Mat,
        head_dim: usize,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        transpose: bool,
    ) -> Result<()> {
        m.check(x.len(), "rope x")?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !m.cols.is_multiple_of(head_dim) {
            return shape(format!("rope: {} columns in heads of {head_dim}", m.cols));
        }
        same_len(cos.len(), m.rows * head_dim, "rope cos")?;
        same_len(sin.len(), m.rows * head_dim, "rope sin")?;
        let half = head_dim / 2;
        let mut rot = vec![0f32; head_dim];
        for r in 0..m.rows {
            let c = &cos[r * head_dim..][..head_dim];
            let s = &sin[r * head_dim..][..head_dim];
            let row = &mut x[m.off + r * m.ld..][..m.cols];
            for head in row.chunks_mut(head_dim) {
                rot.copy_from_slice(head);
                let (x1, x2) = rot.split_at(half);
                for i in 0..half {
                    let j = i + half;
                    if transpose {
                        // Transposed: dx_i = dy_i·c_i + dy_j·s_j, dx_j = dy_j·c_j − dy_i·s_i.
                        head[i] = x1[i] * c[i] + x2[i] * s[j];
                        head[j] = x2[i] * c[j] - x1[i] * s[i];
                    } else {
                        head[i] = x1[i] * c[i] - x2[i] * s[i];
                        head[j] = x2[i] * c[j] + x1[i] * s[j];
                    }
                }
            }
        }
        Ok(())
    }

    fn swiglu(&self, y: &mut Vec<f32>, gu: &Vec<f32>, gm: Mat, um: Mat) -> Result<()> {
        check_gate(gu.len(), gm, um, "swiglu")?;
        same_len(y.len(), gm.rows * gm.cols, "swiglu y")?;
        y.par_chunks_mut(gm.cols).enumerate().for_each(|(r, y)| {
            let g = &gu[gm.off + r * gm.ld..][..gm.cols];
            let u = &gu[um.off + r * um.ld..][..um.cols];
            for c in 0..y.len() {
                y[c] = silu(g[c]) * u[c];
            }
        });
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgu: &mut Vec<f32>,
        dy: &Vec<f32>,
        gu: &Vec<f32>,
        gm: Mat,
        um: Mat,
    ) -> Result<()> {
        check_gate(gu.len(), gm, um, "swiglu_backward")?;
        same_len(dgu.len(), gu.len(), "swiglu_backward dgu")?;
        same_len(dy.len(), gm.rows * gm.cols, "swiglu_backward dy")?;
        for r in 0..gm.rows {
            for c in 0..gm.cols {
                let (gi, ui) = (gm.off + r * gm.ld + c, um.off + r * um.ld + c);
                let (g, u, d) = (gu[gi] as f64, gu[ui] as f64, dy[r * gm.cols + c] as f64);
                let sig = 1.0 / (1.0 + (-g).exp());
                dgu[gi] = (d * u * sig * (1.0 + g * (1.0 - sig))) as f32;
                dgu[ui] = (d * g * sig) as f32;
            }
        }
        Ok(())
    }

    fn add(&self, y: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        same_len(y.len(), x.len(), "add")?;
        y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
        Ok(())
    }

    fn mul(&self, y: &mut Vec<f32>, x: &Vec<f32>, m: &Vec<f32>) -> Result<()> {
        same_len(y.len(), x.len(), "mul")?;
        same_len(x.len(), m.len(), "mul mask")?;
        y.iter_mut()
            .zip(x.iter().zip(m))
            .for_each(|(y, (x, m))| *y = x * m);
        Ok(())
    }

    fn dropout_mask(
        &self,
        n: usize,
        keep: f64,
        masks: MaskDraws,
        draw: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<f32>> {
        Ok(host_mask(n, keep, masks, draw))
    }

    fn attn_softmax(
        &self,
        s: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        check_softmax(s.len(), lse.len(), a, seq)?;
        let (len, rows) = (a.len, a.rows());
        let sums: Vec<(usize, f32)> = s
            .par_chunks_mut(len.max(1))
            .enumerate()
            .map(|(hi_row, x)| {
                let (h, i) = (hi_row / len, hi_row % len);
                let row = seq * len + i;
                let (lo, hi) = (a.bounds[row].0 as usize, a.bounds[row].1 as usize);
                let m = x[lo..hi].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (t, v) in x.iter_mut().enumerate() {
                    *v = if (lo..hi).contains(&t) {
                        let e = (*v - m).exp();
                        sum += e;
                        e
                    } else {
                        0.0
                    };
                }
                if hi > lo {
                    x.iter_mut().for_each(|v| *v /= sum);
                }
                let l = if hi > lo {
                    m + sum.ln()
                } else {
                    f32::NEG_INFINITY
                };
                (h * rows + row, l)
            })
            .collect();
        for (k, l) in sums {
            lse[k] = l;
        }
        Ok(())
    }

    fn attn_probs(&self, s: &mut Vec<f32>, lse: &Vec<f32>, a: &Attn, seq: usize) -> Result<()> {
        check_softmax(s.len(), lse.len(), a, seq)?;
        let (len, rows) = (a.len, a.rows());
        s.par_chunks_mut(len.max(1))
            .enumerate()
            .for_each(|(hi_row, x)| {
                let (h, i) = (hi_row / len, hi_row % len);
                let row = seq * len + i;
                let (lo, hi) = (a.bounds[row].0 as usize, a.bounds[row].1 as usize);
                let l = lse[h * rows + row];
                for (t, v) in x.iter_mut().enumerate() {
                    *v = if (lo..hi).contains(&t) {
                        (*v - l).exp()
                    } else {
                        0.0
                    };
                }
            });
        Ok(())
    }

    fn attn_softmax_backward(
        &self,
        d: &mut Vec<f32>,
        p: &Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        a: &Attn,
        seq: usize,
    ) -> Result<()> {
        check_softmax_backward(d.len(), p.len(), dout.len(), out.len(), a, seq)?;
        let w = a.width();
        let (len, hd) = (a.len, a.head_dim);
        d.par_chunks_mut(len.max(1))
            .zip(p.par_chunks(len.max(1)))
            .enumerate()
            .for_each(|(hi_row, (x, pr))| {
                let (h, i) = (hi_row / len, hi_row % len);
                let at = (seq * len + i) * w + h * hd;
                let delta = dot(&dout[at..at + hd], &out[at..at + hd]);
                for (v, &pv) in x.iter_mut().zip(pr) {
                    *v = pv * (*v - delta) * a.scale;
                }
            });
        Ok(())
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        a: &Attn,
    ) -> Result<()> {
        a.check(qkv.len())?;
        let rows = a.rows();
        same_len(out.len(), rows * a.width(), "attention out")?;
        same_len(lse.len(), a.heads * rows, "attention lse")?;
        let d = a.head_dim;
        let rep = a.heads / a.kv_heads;
        let tasks: Vec<(usize, usize)> = (0..a.seqs)
            .flat_map(|s| (0..a.kv_heads).map(move |g| (s, g)))
            .collect();
        // Each task: outputs [rep][len][d] and lse [rep][len] of its heads.
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(s, g)| {
                let mut o = vec![0f32; rep * a.len * d];
                let mut l = vec![f32::NEG_INFINITY; rep * a.len];
                let mut p = vec![0f32; a.len];
                let kcol = a.k_col + g * d;
                let vcol = a.v_col + g * d;
                for j in 0..rep {
                    let qcol = a.q_col + (g * rep + j) * d;
                    for i in 0..a.len {
                        let row = s * a.len + i;
                        let (lo, hi) = (a.bounds[row].0 as usize, a.bounds[row].1 as usize);
                        if lo == hi {
                            continue;
                        }
                        let q = &qkv[row * a.ld + qcol..][..d];
                        let mut m = f32::NEG_INFINITY;
                        for t in lo..hi {
                            let k = &qkv[(s * a.len + t) * a.ld + kcol..][..d];
                            let sc = dot(q, k) * a.scale;
                            p[t] = sc;
                            m = m.max(sc);
                        }
                        let mut sum = 0f32;
                        for x in &mut p[lo..hi] {
                            *x = (*x - m).exp();
                            sum += *x;
                        }
                        let dst = &mut o[(j * a.len + i) * d..][..d];
                        for t in lo..hi {
                            let v = &qkv[(s * a.len + t) * a.ld + vcol..][..d];
                            let w = p[t] / sum;
                            dst.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
                        }
                        l[j * a.len + i] = m + sum.ln();
                    }
                }
                (o, l)
            })
            .collect();
        let width = a.width();
        for (&(s, g), (o, l)) in tasks.iter().zip(results) {
            for j in 0..rep {
                let h = g * rep + j;
                for i in 0..a.len {
                    let row = s * a.len + i;
                    out[row * width + h * d..][..d].copy_from_slice(&o[(j * a.len + i) * d..][..d]);
                    lse[h * rows + row] = l[j * a.len + i];
                }
            }
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        qkv: &Vec<f32>,
        a: &Attn,
    ) -> Result<()> {
        a.check(qkv.len())?;
        same_len(dqkv.len(), qkv.len(), "attention_backward dqkv")?;
        let rows = a.rows();
        let width = a.width();
        same_len(out.len(), rows * width, "attention_backward out")?;
        same_len(dout.len(), rows * width, "attention_backward dout")?;
        same_len(lse.len(), a.heads * rows, "attention_backward lse")?;
        let d = a.head_dim;
        let rep = a.heads / a.kv_heads;
        let tasks: Vec<(usize, usize)> = (0..a.seqs)
            .flat_map(|s| (0..a.kv_heads).map(move |g| (s, g)))
            .collect();
        // Each task: dq [rep][len][d], dk and dv [len][d].
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(s, g)| {
                let mut dq = vec![0f32; rep * a.len * d];
                let mut dk = vec![0f32; a.len * d];
                let mut dv = vec![0f32; a.len * d];
                let kcol = a.k_col + g * d;
                let vcol = a.v_col + g * d;
                for j in 0..rep {
                    let h = g * rep + j;
                    let qcol = a.q_col + h * d;
                    for i in 0..a.len {
                        let row = s * a.len + i;
                        let (lo, hi) = (a.bounds[row].0 as usize, a.bounds[row].1 as usize);
                        if lo == hi {
                            continue;
                        }
                        let q = &qkv[row * a.ld + qcol..][..d];
                        let go = &dout[row * width + h * d..][..d];
                        let o = &out[row * width + h * d..][..d];
                        let delta = dot(go, o);
                        let l = lse[h * rows + row];
                        let dqi = &mut dq[(j * a.len + i) * d..][..d];
                        for t in lo..hi {
                            let kr = (s * a.len + t) * a.ld;
                            let k = &qkv[kr + kcol..][..d];
                            let v = &qkv[kr + vcol..][..d];
                            let p = (dot(q, k) * a.scale - l).exp();
                            dv[t * d..][..d]
                                .iter_mut()
                                .zip(go)
                                .for_each(|(x, g)| *x += p * g);
                            let ds = p * (dot(go, v) - delta) * a.scale;
                            dqi.iter_mut().zip(k).for_each(|(x, k)| *x += ds * k);
                            dk[t * d..][..d]
                                .iter_mut()
                                .zip(q)
                                .for_each(|(x, q)| *x += ds * q);
                        }
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        for (&(s, g), (dq, dk, dv)) in tasks.iter().zip(results) {
            for i in 0..a.len {
                let row = (s * a.len + i) * a.ld;
                for j in 0..rep {
                    let qcol = a.q_col + (g * rep + j) * d;
                    dqkv[row + qcol..][..d].copy_from_slice(&dq[(j * a.len + i) * d..][..d]);
                }
                dqkv[row + a.k_col + g * d..][..d].copy_from_slice(&dk[i * d..][..d]);
                dqkv[row + a.v_col + g * d..][..d].copy_from_slice(&dv[i * d..][..d]);
            }
        }
        Ok(())
    }
}

/// `silu(x) = x·σ(x)`, evaluated in f64 and rounded once.
pub fn silu(x: f32) -> f32 {
    let v = x as f64;
    (v / (1.0 + (-v).exp())) as f32
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One product of [`Backend::gemm`] on host vectors.
#[allow(clippy::too_many_arguments)]
fn gemm_one(
    c: &mut [f32],
    cm: Mat,
    a: &[f32],
    am: Mat,
    ta: bool,
    b: &[f32],
    bm: Mat,
    tb: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    cm.check(c.len(), "gemm C")?;
    am.check(a.len(), "gemm A")?;
    bm.check(b.len(), "gemm B")?;
    // op(X)'s (rows, cols, row stride, column stride).
    let op = |m: Mat, t: bool| -> (usize, usize, isize, isize) {
        if t {
            (m.cols, m.rows, 1, m.ld as isize)
        } else {
            (m.rows, m.cols, m.ld as isize, 1)
        }
    };
    let (m, k, a_rs, a_cs) = op(am, ta);
    let (k2, n, b_rs, b_cs) = op(bm, tb);
    if k != k2 || cm.rows != m || cm.cols != n {
        return shape(format!(
            "gemm: op(A) {m}×{k} · op(B) {k2}×{n} into C {}×{}",
            cm.rows, cm.cols
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty product: C = β·C.
        for r in 0..m {
            let row = &mut c[cm.off + r * cm.ld..cm.off + r * cm.ld + n];
            row.iter_mut().for_each(|x| *x *= beta);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every view was checked against its buffer above, `c` is borrowed mutably
    // and so aliases neither `a` nor `b`, and the strides describe exactly those views.
    // `gemm` computes dst = alpha·dst + beta·lhs·rhs (its names are the other way round).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(cm.off),
            1,
            cm.ld as isize,
            beta != 0.0,
            a.as_ptr().add(am.off),
            a_cs,
            a_rs,
            b.as_ptr().add(bm.off),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
