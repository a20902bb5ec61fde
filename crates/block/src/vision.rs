//! One pre-norm vision transformer layer (SigLIP ViT of 2.0, NaViT of 2.5 / 2.6) as a single
//! op: `x + attn(LN1(x))`, then `+ fc2(gelu(fc1(LN2(·))))`, every projection with its optional
//! LoRA adapter, attention non-causal over each image's valid keys.

use crate::backend::{Attn, Backend, Gelu, Mat};
use crate::error::{shape, Result};
use crate::linear::{linear_backward, linear_forward, LinSaved};
pub use crate::linear::{Grads, Linear, Lora, Param, Run};

/// LayerNorm weight and bias.
pub struct Norm<B: Backend> {
    pub weight: Param<B>,
    pub bias: Param<B>,
}

/// The attention input projection: one fused `[3C, C]` (ViT) or q, k and v apart (NaViT).
/// Either way the output is `[q | k | v]`, heads contiguous within each.
pub enum Qkv<B: Backend> {
    Fused(Linear<B>),
    Split(Box<[Linear<B>; 3]>),
}

/// One vision transformer layer.
pub struct VisionLayer<B: Backend> {
    pub ln1: Norm<B>,
    pub qkv: Qkv<B>,
    pub out: Linear<B>,
    pub ln2: Norm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub hidden: usize,
    pub heads: usize,
    pub eps: f32,
    pub gelu: Gelu,
}

/// The images of a call: `seqs` padded to `len` patches; query row `r` attends to keys
/// `bounds[r]` of its image.
pub struct Images<'a> {
    pub seqs: usize,
    pub len: usize,
    pub bounds: &'a [(u32, u32)],
}

/// Activations of one forward pass, kept for the backward pass.
pub struct Saved<B: Backend> {
    rows: usize,
    attn: Attn,
    x: B::Buf,
    h1: B::Buf,
    st1: B::Stat,
    qkv: B::Buf,
    lin_qkv: Vec<LinSaved<B>>,
    att: B::Buf,
    lse: B::Stat,
    lin_out: LinSaved<B>,
    x2: B::Buf,
    h2: B::Buf,
    st2: B::Stat,
    pre: B::Buf,
    g: B::Buf,
    lin_fc1: LinSaved<B>,
    lin_fc2: LinSaved<B>,
}

// The layer-norm backward's operands, as the backend primitive takes them.
#[allow(clippy::too_many_arguments)]
fn norm_backward<B: Backend>(
    be: &B,
    n: &Norm<B>,
    dx: &mut B::Buf,
    dy: &B::Buf,
    x: &B::Buf,
    stats: &B::Stat,
    cols: usize,
    grads: &mut Grads<B>,
) -> Result<()> {
    let mut dw = grads.take(be, &n.weight)?;
    let mut db = grads.take(be, &n.bias)?;
    be.layer_norm_backward(
        dx,
        dw.as_mut(),
        db.as_mut(),
        dy,
        x,
        &n.weight.value,
        stats,
        cols,
    )?;
    grads.put(&n.weight, dw);
    grads.put(&n.bias, db);
    Ok(())
}

impl<B: Backend> VisionLayer<B> {
    fn check(&self, be: &B, x: &B::Buf, im: &Images) -> Result<()> {
        let c = self.hidden;
        let rows = im.seqs * im.len;
        if be.len(x) != rows * c {
            return shape(format!(
                "vision layer: input of {} values for {} images of {} patches × {c}",
                be.len(x),
                im.seqs,
                im.len
            ));
        }
        if self.heads == 0 || !c.is_multiple_of(self.heads) {
            return shape(format!(
                "vision layer: {c} channels over {} heads",
                self.heads
            ));
        }
        Ok(())
    }

    fn attn_shape(&self, im: &Images) -> Attn {
        let c = self.hidden;
        let hd = c / self.heads;
        Attn {
            seqs: im.seqs,
            len: im.len,
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: hd,
            ld: 3 * c,
            q_col: 0,
            k_col: c,
            v_col: 2 * c,
            scale: 1.0 / (hd as f32).sqrt(),
            bounds: im.bounds.to_vec(),
        }
    }

    /// The layer's output `[rows, C]`, and with `save` what [`VisionLayer::backward`] needs.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        im: &Images,
        run: &mut Run,
        save: bool,
    ) -> Result<(B::Buf, Option<Saved<B>>)> {
        self.check(be, x, im)?;
        let c = self.hidden;
        let f = self.fc1.out;
        let rows = im.seqs * im.len;
        let attn = self.attn_shape(im);
        let mut h1 = be.zeros(rows * c)?;
        let mut st1 = be.zeros_stat(2 * rows)?;
        be.layer_norm(
            &mut h1,
            &mut st1,
            x,
            &self.ln1.weight.value,
            &self.ln1.bias.value,
            c,
            self.eps,
        )?;
        let mut qkv = be.zeros(rows * 3 * c)?;
        let qm = Mat::dense(rows, 3 * c);
        let lin_qkv = match &self.qkv {
            Qkv::Fused(l) => vec![linear_forward(
                be, l, &h1, &mut qkv, qm, 1.0, 0.0, None, None, run,
            )?],
            Qkv::Split(ls) => {
                let mut v = Vec::with_capacity(3);
                for (j, l) in ls.iter().enumerate() {
                    let m = qm.cols(j * c, c);
                    v.push(linear_forward(
                        be, l, &h1, &mut qkv, m, 1.0, 0.0, None, None, run,
                    )?);
                }
                v
            }
        };
        let mut att = be.zeros(rows * c)?;
        let mut lse = be.zeros_stat(self.heads * rows)?;
        be.attention(&mut att, &mut lse, &qkv, &attn)?;
        let cm = Mat::dense(rows, c);
        let mut x2 = be.copy(x)?;
        let lin_out = linear_forward(be, &self.out, &att, &mut x2, cm, 1.0, 1.0, None, None, run)?;
        let mut h2 = be.zeros(rows * c)?;
        let mut st2 = be.zeros_stat(2 * rows)?;
        be.layer_norm(
            &mut h2,
            &mut st2,
            &x2,
            &self.ln2.weight.value,
            &self.ln2.bias.value,
            c,
            self.eps,
        )?;
        let mut g = be.zeros(rows * f)?;
        let mut pre = be.zeros(rows * f)?;
        let fm = Mat::dense(rows, f);
        let lin_fc1 = linear_forward(
            be,
            &self.fc1,
            &h2,
            &mut g,
            fm,
            1.0,
            0.0,
            Some(self.gelu),
            Some(&mut pre),
            run,
        )?;
        let mut y = be.copy(&x2)?;
        let lin_fc2 = linear_forward(be, &self.fc2, &g, &mut y, cm, 1.0, 1.0, None, None, run)?;
        let saved = match save {
            false => None,
            true => Some(be.copy(x)?),
        };
        let saved = saved.map(|x| Saved {
            rows,
            attn,
            x,
            h1,
            st1,
            qkv,
            lin_qkv,
            att,
            lse,
            lin_out,
            x2,
            h2,
            st2,
            pre,
            g,
            lin_fc1,
            lin_fc2,
        });
        Ok((y, saved))
    }

    /// Backward from the output gradient `dy`: parameter gradients are added to `grads`, the
    /// input gradient returned.
    pub fn backward(
        &self,
        be: &B,
        s: &Saved<B>,
        dy: &B::Buf,
        grads: &mut Grads<B>,
    ) -> Result<B::Buf> {
        let c = self.hidden;
        let f = self.fc1.out;
        let rows = s.rows;
        if be.len(dy) != rows * c {
            return shape(format!(
                "vision layer backward: gradient of {} values for {rows} rows × {c}",
                be.len(dy)
            ));
        }
        let cm = Mat::dense(rows, c);
        let fm = Mat::dense(rows, f);
        // Residual: the output gradient flows to x2 unchanged.
        let mut dx2 = be.copy(dy)?;
        let mut dg = be.zeros(rows * f)?;
        linear_backward(
            be, &self.fc2, &s.lin_fc2, &s.g, dy, cm, 1.0, &mut dg, 0.0, grads,
        )?;
        be.act_backward(&mut dg, &s.pre, self.gelu)?;
        let mut dh2 = be.zeros(rows * c)?;
        linear_backward(
            be, &self.fc1, &s.lin_fc1, &s.h2, &dg, fm, 1.0, &mut dh2, 0.0, grads,
        )?;
        drop(dg);
        norm_backward(be, &self.ln2, &mut dx2, &dh2, &s.x2, &s.st2, c, grads)?;
        drop(dh2);
        let mut datt = be.zeros(rows * c)?;
        linear_backward(
            be, &self.out, &s.lin_out, &s.att, &dx2, cm, 1.0, &mut datt, 0.0, grads,
        )?;
        let mut dqkv = be.zeros(rows * 3 * c)?;
        be.attention_backward(&mut dqkv, &datt, &s.att, &s.lse, &s.qkv, &s.attn)?;
        drop(datt);
        let qm = Mat::dense(rows, 3 * c);
        let mut dh1 = be.zeros(rows * c)?;
        match &self.qkv {
            Qkv::Fused(l) => linear_backward(
                be,
                l,
                &s.lin_qkv[0],
                &s.h1,
                &dqkv,
                qm,
                1.0,
                &mut dh1,
                0.0,
                grads,
            )?,
            Qkv::Split(ls) => {
                for (j, (l, ls)) in ls.iter().zip(&s.lin_qkv).enumerate() {
                    let beta = if j == 0 { 0.0 } else { 1.0 };
                    let m = qm.cols(j * c, c);
                    linear_backward(be, l, ls, &s.h1, &dqkv, m, 1.0, &mut dh1, beta, grads)?;
                }
            }
        }
        drop(dqkv);
        norm_backward(be, &self.ln1, &mut dx2, &dh1, &s.x, &s.st1, c, grads)?;
        Ok(dx2)
    }
}
