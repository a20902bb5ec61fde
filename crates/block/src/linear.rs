//! The parts every layer is made of: tensors with their gradient slots, projections with
//! optional LoRA adapters (dropout drawn from the model's generator), and their forward and
//! backward passes.

use std::collections::BTreeMap;

use crate::backend::{Backend, Gelu, MaskDraws, Mat};
use crate::error::{shape, Result};

/// A tensor of the layer; `slot` is where its gradient is reported, `None` when it is frozen.
pub struct Param<B: Backend> {
    pub value: B::Buf,
    pub slot: Option<usize>,
}

/// A LoRA adapter `(scale)·B(A(dropout(x)))`: `a` is `[rank, in]`, `b` `[out, rank]`.
pub struct Lora<B: Backend> {
    pub a: Param<B>,
    pub b: Param<B>,
    pub rank: usize,
    pub scale: f32,
    pub dropout: f64,
}

/// `y = x Wᵀ + bias (+ LoRA)`, weight `[out, in]`.
pub struct Linear<B: Backend> {
    pub weight: Param<B>,
    pub bias: Option<Param<B>>,
    pub out: usize,
    pub inp: usize,
    pub lora: Option<Lora<B>>,
}

/// Whether the pass trains (LoRA dropout on), the model's dropout generator and how masks are
/// drawn from it.
pub struct Run<'a> {
    pub train: bool,
    pub draw: &'a mut dyn FnMut() -> u64,
    pub masks: MaskDraws,
}

/// Gradients by slot, summed over calls until taken.
pub struct Grads<B: Backend> {
    pub by_slot: BTreeMap<usize, B::Buf>,
}

impl<B: Backend> Default for Grads<B> {
    fn default() -> Self {
        Grads {
            by_slot: BTreeMap::new(),
        }
    }
}

impl<B: Backend> Grads<B> {
    /// The gradient buffer of `p` (zeros the first time), or `None` for a frozen tensor.
    pub(crate) fn take(&mut self, be: &B, p: &Param<B>) -> Result<Option<B::Buf>> {
        let Some(slot) = p.slot else { return Ok(None) };
        match self.by_slot.remove(&slot) {
            Some(g) => Ok(Some(g)),
            None => Ok(Some(be.zeros(be.len(&p.value))?)),
        }
    }

    pub(crate) fn put(&mut self, p: &Param<B>, g: Option<B::Buf>) {
        if let (Some(slot), Some(g)) = (p.slot, g) {
            self.by_slot.insert(slot, g);
        }
    }
}

/// What a projection's backward needs beyond its input: the LoRA input after dropout and its
/// mask, and the adapter's hidden `[rows, rank]`.
pub(crate) struct LinSaved<B: Backend> {
    mask: Option<B::Buf>,
    xd: Option<B::Buf>,
    h: Option<B::Buf>,
}

/// `y(ym) = β·y + α·(x Wᵀ + LoRA)`, then `act(y + bias)`; `x` dense `[rows, in]`. α scales a
/// residual branch (MiniCPM's `scale_depth / √layers`); a bias is not scaled, so α ≠ 1 with a
/// bias is refused.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    x: &B::Buf,
    y: &mut B::Buf,
    ym: Mat,
    alpha: f32,
    beta: f32,
    act: Option<Gelu>,
    pre: Option<&mut B::Buf>,
    run: &mut Run,
) -> Result<LinSaved<B>> {
    if alpha != 1.0 && lin.bias.is_some() {
        return shape("a scaled projection with a bias");
    }
    let rows = ym.rows;
    let xm = Mat::dense(rows, lin.inp);
    let wm = Mat::dense(lin.out, lin.inp);
    be.gemm(
        y,
        ym,
        x,
        xm,
        false,
        &lin.weight.value,
        wm,
        true,
        alpha,
        beta,
    )?;
    let mut saved = LinSaved {
        mask: None,
        xd: None,
        h: None,
    };
    if let Some(l) = &lin.lora {
        if run.train && l.dropout > 0.0 {
            let mask = be.dropout_mask(rows * lin.inp, 1.0 - l.dropout, run.masks, run.draw)?;
            let mut xd = be.zeros(rows * lin.inp)?;
            be.mul(&mut xd, x, &mask)?;
            saved.mask = Some(mask);
            saved.xd = Some(xd);
        }
        let xin = saved.xd.as_ref().unwrap_or(x);
        let mut h = be.zeros(rows * l.rank)?;
        let hm = Mat::dense(rows, l.rank);
        let am = Mat::dense(l.rank, lin.inp);
        let bm = Mat::dense(lin.out, l.rank);
        be.gemm(&mut h, hm, xin, xm, false, &l.a.value, am, true, 1.0, 0.0)?;
        be.gemm(
            y,
            ym,
            &h,
            hm,
            false,
            &l.b.value,
            bm,
            true,
            alpha * l.scale,
            1.0,
        )?;
        saved.h = Some(h);
    }
    be.bias_act(y, ym, lin.bias.as_ref().map(|b| &b.value), act, pre)?;
    Ok(saved)
}

/// Backward of [`linear_forward`] (same α) from `dy(dym)`: parameter gradients into `grads`,
/// and `dx = β·dx + ∂/∂x` (dense `[rows, in]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward<B: Backend>(
    be: &B,
    lin: &Linear<B>,
    saved: &LinSaved<B>,
    x: &B::Buf,
    dy: &B::Buf,
    dym: Mat,
    alpha: f32,
    dx: &mut B::Buf,
    beta: f32,
    grads: &mut Grads<B>,
) -> Result<()> {
    let rows = dym.rows;
    let xm = Mat::dense(rows, lin.inp);
    let wm = Mat::dense(lin.out, lin.inp);
    if let Some(mut dw) = grads.take(be, &lin.weight)? {
        be.gemm(&mut dw, wm, dy, dym, true, x, xm, false, alpha, 1.0)?;
        grads.put(&lin.weight, Some(dw));
    }
    if let Some(b) = &lin.bias {
        if let Some(mut db) = grads.take(be, b)? {
            be.bias_grad(&mut db, dy, dym)?;
            grads.put(b, Some(db));
        }
    }
    be.gemm(
        dx,
        xm,
        dy,
        dym,
        false,
        &lin.weight.value,
        wm,
        false,
        alpha,
        beta,
    )?;
    if let Some(l) = &lin.lora {
        let h = saved
            .h
            .as_ref()
            .ok_or_else(|| crate::BlockError::Shape("LoRA state missing".into()))?;
        let hm = Mat::dense(rows, l.rank);
        let am = Mat::dense(l.rank, lin.inp);
        let bm = Mat::dense(lin.out, l.rank);
        let s = alpha * l.scale;
        if let Some(mut db) = grads.take(be, &l.b)? {
            be.gemm(&mut db, bm, dy, dym, true, h, hm, false, s, 1.0)?;
            grads.put(&l.b, Some(db));
        }
        let mut dh = be.zeros(rows * l.rank)?;
        be.gemm(&mut dh, hm, dy, dym, false, &l.b.value, bm, false, s, 0.0)?;
        let xin = saved.xd.as_ref().unwrap_or(x);
        if let Some(mut da) = grads.take(be, &l.a)? {
            be.gemm(&mut da, am, &dh, hm, true, xin, xm, false, 1.0, 1.0)?;
            grads.put(&l.a, Some(da));
        }
        match &saved.mask {
            None => be.gemm(dx, xm, &dh, hm, false, &l.a.value, am, false, 1.0, 1.0)?,
            Some(mask) => {
                // dx += mask · (dh A): the product, then masked into a second buffer.
                let mut t = be.zeros(rows * lin.inp)?;
                be.gemm(&mut t, xm, &dh, hm, false, &l.a.value, am, false, 1.0, 0.0)?;
                let mut masked = be.zeros(rows * lin.inp)?;
                be.mul(&mut masked, &t, mask)?;
                be.add(dx, &masked)?;
            }
        }
    }
    Ok(())
}
