//! The CUDA backend against the CPU backend (needs a GPU; built with `--features cuda`):
//! every primitive on views, GQA and packed key ranges, dropout masks of both kinds (bit for
//! bit), and whole vision and decoder layers (LoRA with dropout, biases, MiniCPM's residual
//! scale) forward and backward. Errors are relative to the largest magnitude of the CPU result:
//! ≤ 1e-5 with f32 buffers; the layers also with bf16 buffers, within a few percent (`BF16`).
//!
//! ```text
//! cargo test -p cpmv-block --features cuda --test cuda -- --nocapture
//! ```
#![cfg(feature = "cuda")]

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use cpmv_block::linear::{Grads, Linear, Lora, Param, Run};
use cpmv_block::llm::{LlmLayer, Tokens};
use cpmv_block::vision::{Images, Norm, Qkv, VisionLayer};
use cpmv_block::{host_mask, Attn, Backend, Cpu, Cuda, Elem, Gelu, MaskDraws, Mat};
use half::bf16;

fn cuda<T: Elem>() -> Cuda<T> {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    Cuda::new(ctx.default_stream()).expect("the CUDA backend")
}

/// How close a layer on the GPU must come to the CPU's f32: 1e-5 in f32; in bf16 the
/// rounding of inputs, weights and every stored activation (2⁻⁸ relative each) allows a few
/// percent, which still catches any wrong index or missing term.
#[derive(Clone, Copy)]
struct Tol {
    out: f32,
    dx: f32,
    grad: f32,
}

const F32: Tol = Tol {
    out: 1e-5,
    dx: 1e-5,
    grad: 1e-5,
};
const BF16: Tol = Tol {
    out: 2e-2,
    dx: 3e-2,
    grad: 5e-2,
};

/// Deterministic values in (-1, 1).
fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    println!("{what}: max rel diff {:.2e}", worst / scale);
    assert!(worst <= tol * scale, "{what}: {worst} (scale {scale})");
}

#[test]
fn gemm_matches_cpu_for_every_transpose_view_and_beta() {
    let (g, c) = (cuda::<f32>(), Cpu);
    let (m, n, k) = (37, 29, 45);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let am = if ta {
            Mat {
                off: 3,
                rows: k,
                cols: m,
                ld: m + 2,
            }
        } else {
            Mat {
                off: 3,
                rows: m,
                cols: k,
                ld: k + 2,
            }
        };
        let bm = if tb {
            Mat {
                off: 1,
                rows: n,
                cols: k,
                ld: k + 4,
            }
        } else {
            Mat {
                off: 1,
                rows: k,
                cols: n,
                ld: n + 4,
            }
        };
        let cm = Mat {
            off: 2,
            rows: m,
            cols: n,
            ld: n + 3,
        };
        let (a, b, c0) = (
            vals(am.end() + 5, 1),
            vals(bm.end() + 5, 2),
            vals(cm.end() + 5, 3),
        );
        for beta in [0.0, 1.0] {
            let mut want = c0.clone();
            c.gemm(&mut want, cm, &a, am, ta, &b, bm, tb, 0.7, beta)
                .unwrap();
            let mut got = g.upload(&c0).unwrap();
            let (ad, bd) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
            g.gemm(&mut got, cm, &ad, am, ta, &bd, bm, tb, 0.7, beta)
                .unwrap();
            close(
                &format!("gemm ta={ta} tb={tb} beta={beta}"),
                &g.download(&got).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

/// Batched products (one cuBLAS call) against the CPU's loop of single ones: heads side by
/// side in columns (strides within a row) into score matrices one after another.
#[test]
fn batched_gemm_matches_cpu_with_column_and_matrix_strides() {
    let (g, c) = (cuda::<f32>(), Cpu);
    let (len, d, heads, ld) = (19, 6, 3, 3 * 6 + 5);
    let q = Mat {
        off: 2,
        rows: len,
        cols: d,
        ld,
    };
    let s = Mat::dense(len, len);
    let x = vals(len * ld + 8, 4);
    let c0 = vals(heads * len * len, 5);
    for (tb, beta) in [(true, 0.0), (true, 1.0), (false, 1.0)] {
        // B: per head, the columns next to its q (transposed, like keys), or one d×len block
        // shared by all products (stride 0).
        let (bm, bstride) = if tb {
            (q.shifted(1), d)
        } else {
            (
                Mat {
                    rows: d,
                    cols: len,
                    ..q
                },
                0,
            )
        };
        let batch = cpmv_block::Batch {
            count: heads,
            a: d,
            b: bstride,
            c: len * len,
        };
        let mut want = c0.clone();
        c.gemm_batched(&mut want, s, &x, q, false, &x, bm, tb, 0.3, beta, batch)
            .unwrap();
        let xd = g.upload(&x).unwrap();
        let mut got = g.upload(&c0).unwrap();
        g.gemm_batched(&mut got, s, &xd, q, false, &xd, bm, tb, 0.3, beta, batch)
            .unwrap();
        close(
            &format!("batched gemm tb={tb} beta={beta}"),
            &g.download(&got).unwrap(),
            &want,
            1e-5,
        );
    }
}

#[test]
fn elementwise_and_norm_primitives_match_cpu() {
    let (g, c) = (cuda::<f32>(), Cpu);
    let (rows, cols) = (13, 300);
    let x: Vec<f32> = vals(rows * cols, 4).iter().map(|v| v * 3.0 + 0.2).collect();
    let w = vals(cols, 5);
    let b = vals(cols, 6);
    let dy = vals(rows * cols, 7);
    let up = |v: &Vec<f32>| g.upload(v).unwrap();
    let down = |v: &<Cuda as Backend>::Buf| g.download(v).unwrap();

    // bias + activation on a view, with and without the pre-activation.
    let ym = Mat {
        off: 5,
        rows,
        cols: cols - 10,
        ld: cols,
    };
    for act in [None, Some(Gelu::Erf), Some(Gelu::Tanh)] {
        let bias = vals(ym.cols, 8);
        let mut want = x.clone();
        let mut pre_w = vec![0.0; ym.rows * ym.cols];
        c.bias_act(&mut want, ym, Some(&bias), act, Some(&mut pre_w))
            .unwrap();
        let mut got = up(&x);
        let mut pre_g = g.zeros(ym.rows * ym.cols).unwrap();
        g.bias_act(&mut got, ym, Some(&up(&bias)), act, Some(&mut pre_g))
            .unwrap();
        close(&format!("bias_act {act:?}"), &down(&got), &want, 1e-6);
        close(
            &format!("bias_act pre {act:?}"),
            &down(&pre_g),
            &pre_w,
            1e-6,
        );
        if let Some(a) = act {
            let mut dw = dy[..pre_w.len()].to_vec();
            c.act_backward(&mut dw, &pre_w, a).unwrap();
            let mut dg = up(&dy[..pre_w.len()].to_vec());
            g.act_backward(&mut dg, &pre_g, a).unwrap();
            close(&format!("act_backward {a:?}"), &down(&dg), &dw, 1e-6);
        }
    }
    let mut dbw = vals(ym.cols, 9);
    let mut dbg = up(&dbw);
    c.bias_grad(&mut dbw, &dy, ym).unwrap();
    g.bias_grad(&mut dbg, &up(&dy), ym).unwrap();
    close("bias_grad", &down(&dbg), &dbw, 1e-6);

    // LayerNorm and RMSNorm, forward and backward (accumulating into what is there).
    let (mut yw, mut sw) = (vec![0.0; x.len()], vec![0.0; 2 * rows]);
    c.layer_norm(&mut yw, &mut sw, &x, &w, &b, cols, 1e-6)
        .unwrap();
    let (mut yg, mut sg) = (g.zeros(x.len()).unwrap(), g.zeros(2 * rows).unwrap());
    g.layer_norm(&mut yg, &mut sg, &up(&x), &up(&w), &up(&b), cols, 1e-6)
        .unwrap();
    close("layer_norm", &down(&yg), &yw, 1e-6);
    let (mut dxw, mut dww, mut dbw) = (vec![0.5; x.len()], vec![0.1; cols], vec![0.2; cols]);
    c.layer_norm_backward(
        &mut dxw,
        Some(&mut dww),
        Some(&mut dbw),
        &dy,
        &x,
        &w,
        &sw,
        cols,
    )
    .unwrap();
    let (mut dxg, mut dwg, mut dbg) = (
        up(&vec![0.5; x.len()]),
        up(&vec![0.1; cols]),
        up(&vec![0.2; cols]),
    );
    g.layer_norm_backward(
        &mut dxg,
        Some(&mut dwg),
        Some(&mut dbg),
        &up(&dy),
        &up(&x),
        &up(&w),
        &sg,
        cols,
    )
    .unwrap();
    close("layer_norm dx", &down(&dxg), &dxw, 1e-5);
    close("layer_norm dw", &down(&dwg), &dww, 1e-5);
    close("layer_norm db", &down(&dbg), &dbw, 1e-5);

    let (mut yw, mut rw) = (vec![0.0; x.len()], vec![0.0; rows]);
    c.rms_norm(&mut yw, &mut rw, &x, &w, cols, 1e-6).unwrap();
    let (mut yg, mut rg) = (g.zeros(x.len()).unwrap(), g.zeros(rows).unwrap());
    g.rms_norm(&mut yg, &mut rg, &up(&x), &up(&w), cols, 1e-6)
        .unwrap();
    close("rms_norm", &down(&yg), &yw, 1e-6);
    let (mut dxw, mut dww) = (vec![0.5; x.len()], vec![0.1; cols]);
    c.rms_norm_backward(&mut dxw, Some(&mut dww), &dy, &x, &w, &rw, cols)
        .unwrap();
    let (mut dxg, mut dwg) = (up(&vec![0.5; x.len()]), up(&vec![0.1; cols]));
    g.rms_norm_backward(
        &mut dxg,
        Some(&mut dwg),
        &up(&dy),
        &up(&x),
        &up(&w),
        &rg,
        cols,
    )
    .unwrap();
    close("rms_norm dx", &down(&dxg), &dxw, 1e-5);
    close("rms_norm dw", &down(&dwg), &dww, 1e-5);

    // add, mul.
    let mut aw = x.clone();
    c.add(&mut aw, &dy).unwrap();
    let mut ag = up(&x);
    g.add(&mut ag, &up(&dy)).unwrap();
    close("add", &down(&ag), &aw, 0.0);
    let mut mw = vec![0.0; x.len()];
    c.mul(&mut mw, &x, &dy).unwrap();
    let mut mg = g.zeros(x.len()).unwrap();
    g.mul(&mut mg, &up(&x), &up(&dy)).unwrap();
    close("mul", &down(&mg), &mw, 0.0);
}

#[test]
fn rope_and_swiglu_match_cpu() {
    let (g, c) = (cuda::<f32>(), Cpu);
    let (rows, d, heads) = (11, 16, 3);
    let m = Mat {
        off: 2,
        rows,
        cols: heads * d,
        ld: heads * d + 7,
    };
    let x = vals(rows * m.ld + 4, 10);
    let cos = vals(rows * d, 11);
    let sin = vals(rows * d, 12);
    for transpose in [false, true] {
        let mut want = x.clone();
        c.rope(&mut want, m, d, &cos, &sin, transpose).unwrap();
        let mut got = g.upload(&x).unwrap();
        g.rope(
            &mut got,
            m,
            d,
            &g.upload(&cos).unwrap(),
            &g.upload(&sin).unwrap(),
            transpose,
        )
        .unwrap();
        close(
            &format!("rope transpose={transpose}"),
            &g.download(&got).unwrap(),
            &want,
            1e-6,
        );
    }
    let f = 40;
    let whole = Mat::dense(rows, 2 * f);
    let (gm, um) = (whole.cols(0, f), whole.cols(f, f));
    let gu: Vec<f32> = vals(rows * 2 * f, 13).iter().map(|v| v * 4.0).collect();
    let dy = vals(rows * f, 14);
    let mut yw = vec![0.0; rows * f];
    c.swiglu(&mut yw, &gu, gm, um).unwrap();
    let gud = g.upload(&gu).unwrap();
    let mut yg = g.zeros(rows * f).unwrap();
    g.swiglu(&mut yg, &gud, gm, um).unwrap();
    close("swiglu", &g.download(&yg).unwrap(), &yw, 1e-6);
    let mut dw = vec![0.0; gu.len()];
    c.swiglu_backward(&mut dw, &dy, &gu, gm, um).unwrap();
    let mut dg = g.zeros(gu.len()).unwrap();
    g.swiglu_backward(&mut dg, &g.upload(&dy).unwrap(), &gud, gm, um)
        .unwrap();
    close("swiglu_backward", &g.download(&dg).unwrap(), &dw, 1e-6);
}

#[test]
fn attention_matches_cpu_with_gqa_causal_segments_and_padding() {
    let (g, c) = (cuda::<f32>(), Cpu);
    let (seqs, len, heads, kv, d) = (3, 37, 8, 2, 64);
    let ld = (heads + 2 * kv) * d + 3;
    // Row 0: two packed causal samples; row 1: one causal sample and padding; row 2: a
    // padded image (every query sees the first 30 keys).
    let mut bounds = Vec::new();
    for i in 0..len as u32 {
        bounds.push(if i < 20 { (0, i + 1) } else { (20, i + 1) });
    }
    for i in 0..len as u32 {
        bounds.push(if i < 33 { (0, i + 1) } else { (33, i + 1) });
    }
    bounds.extend(std::iter::repeat_n((0, 30), len));
    let a = Attn {
        seqs,
        len,
        heads,
        kv_heads: kv,
        head_dim: d,
        ld,
        q_col: 1,
        k_col: 1 + heads * d,
        v_col: 1 + (heads + kv) * d,
        scale: 1.0 / (d as f32).sqrt(),
        bounds,
    };
    let rows = a.rows();
    let qkv: Vec<f32> = vals(rows * ld, 15).iter().map(|v| v * 2.0).collect();
    let (mut ow, mut lw) = (vec![0.0; rows * a.width()], vec![0.0; heads * rows]);
    c.attention(&mut ow, &mut lw, &qkv, &a).unwrap();
    let qd = g.upload(&qkv).unwrap();
    let (mut og, mut lg) = (
        g.zeros(rows * a.width()).unwrap(),
        g.zeros(heads * rows).unwrap(),
    );
    g.attention(&mut og, &mut lg, &qd, &a).unwrap();
    close("attention out", &g.download(&og).unwrap(), &ow, 1e-5);
    close("attention lse", &g.download(&lg).unwrap(), &lw, 1e-5);
    let dout = vals(rows * a.width(), 16);
    let mut dw = vec![7.0; qkv.len()];
    c.attention_backward(&mut dw, &dout, &ow, &lw, &qkv, &a)
        .unwrap();
    let mut dg = g.upload(&vec![7.0; qkv.len()]).unwrap();
    g.attention_backward(&mut dg, &g.upload(&dout).unwrap(), &og, &lg, &qd, &a)
        .unwrap();
    // The q/k/v columns against the CPU; the others (0 and the last two) left as they were.
    let dg = g.download(&dg).unwrap();
    let grads =
        |v: &[f32]| -> Vec<f32> { v.chunks(ld).flat_map(|r| r[1..ld - 2].to_vec()).collect() };
    close("attention dqkv", &grads(&dg), &grads(&dw), 1e-5);
    for r in dg.chunks(ld) {
        assert!(
            r[0] == 7.0 && r[ld - 2] == 7.0 && r[ld - 1] == 7.0,
            "a column outside q/k/v was written"
        );
    }
}

/// A parameter on `be` from seeded values; trainable ones get the next slot.
fn param<B: Backend>(be: &B, n: usize, seed: u64, slot: &mut usize, train: bool) -> Param<B> {
    let value = be
        .upload(&vals(n, seed).iter().map(|v| v * 0.2).collect::<Vec<_>>())
        .unwrap();
    let slot = train.then(|| {
        *slot += 1;
        *slot - 1
    });
    Param { value, slot }
}

fn linear<B: Backend>(
    be: &B,
    out: usize,
    inp: usize,
    bias: bool,
    lora: bool,
    seed: u64,
    slot: &mut usize,
) -> Linear<B> {
    Linear {
        weight: param(be, out * inp, seed, slot, !lora),
        bias: bias.then(|| param(be, out, seed + 1, slot, true)),
        out,
        inp,
        lora: lora.then(|| Lora {
            a: param(be, 4 * inp, seed + 2, slot, true),
            b: param(be, out * 4, seed + 3, slot, true),
            rank: 4,
            scale: 2.0,
            dropout: 0.1,
        }),
    }
}

fn compare_grads<B: Backend>(what: &str, be: &B, got: Grads<B>, want: &Grads<Cpu>, tol: f32) {
    assert_eq!(
        got.by_slot.len(),
        want.by_slot.len(),
        "{what}: gradient slots"
    );
    for (slot, g) in got.by_slot {
        close(
            &format!("{what} grad slot {slot}"),
            &be.download(&g).unwrap(),
            &want.by_slot[&slot],
            tol,
        );
    }
}

fn vision_layer<B: Backend>(be: &B) -> VisionLayer<B> {
    let (c, f) = (64, 160);
    let slot = &mut 0;
    let norm = |seed, slot: &mut usize| Norm {
        weight: param(be, c, seed, slot, true),
        bias: param(be, c, seed + 1, slot, true),
    };
    VisionLayer {
        ln1: norm(20, slot),
        qkv: Qkv::Split(Box::new([
            linear(be, c, c, true, true, 22, slot),
            linear(be, c, c, true, false, 26, slot),
            linear(be, c, c, true, true, 30, slot),
        ])),
        out: linear(be, c, c, true, false, 34, slot),
        ln2: norm(38, slot),
        fc1: linear(be, f, c, true, true, 40, slot),
        fc2: linear(be, c, f, true, false, 44, slot),
        hidden: c,
        heads: 4,
        eps: 1e-6,
        gelu: Gelu::Tanh,
    }
}

fn llm_layer<B: Backend>(be: &B) -> LlmLayer<B> {
    let (c, heads, kv, d, f) = (64, 4, 2, 16, 96);
    let slot = &mut 0;
    LlmLayer {
        ln1: param(be, c, 50, slot, true),
        q: linear(be, heads * d, c, true, true, 52, slot),
        k: linear(be, kv * d, c, true, false, 56, slot),
        v: linear(be, kv * d, c, true, true, 60, slot),
        o: linear(be, c, heads * d, false, true, 64, slot),
        ln2: param(be, c, 68, slot, true),
        gate: linear(be, f, c, false, false, 70, slot),
        up: linear(be, f, c, false, true, 74, slot),
        down: linear(be, c, f, false, false, 78, slot),
        hidden: c,
        heads,
        kv_heads: kv,
        head_dim: d,
        eps: 1e-6,
        residual_scale: 0.37,
    }
}

#[test]
fn dropout_masks_are_the_host_draws_exactly() {
    let g = cuda::<f32>();
    for masks in [MaskDraws::PerElement, MaskDraws::PerMask] {
        for (n, keep) in [(100_003, 0.95), (4096, 0.8), (1, 0.5)] {
            let want = host_mask(n, keep, masks, &mut draws(17));
            let got = g.dropout_mask(n, keep, masks, &mut draws(17)).unwrap();
            let got = g.download(&got).unwrap();
            assert!(
                got == want,
                "{masks:?}, {n} values at keep {keep}: masks differ"
            );
        }
    }
}

/// The model's dropout generator, replayed from `seed`.
fn draws(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

#[test]
fn vision_layer_matches_cpu_forward_and_backward() {
    vision_case::<f32>(F32);
}

#[test]
fn vision_layer_in_bf16_stays_near_cpu_f32() {
    vision_case::<bf16>(BF16);
}

fn vision_case<T: Elem>(tol: Tol) {
    let (g, c) = (cuda::<T>(), Cpu);
    let (seqs, len) = (3, 25);
    let bounds: Vec<(u32, u32)> = [25u32, 16, 9]
        .iter()
        .flat_map(|&n| std::iter::repeat_n((0, n), len))
        .collect();
    let im = Images {
        seqs,
        len,
        bounds: &bounds,
    };
    let x = vals(seqs * len * 64, 90);
    let dy = vals(seqs * len * 64, 91);
    let (lc, lg) = (vision_layer(&c), vision_layer(&g));
    let mut d1 = draws(5);
    let (yc, sc) = lc
        .forward(
            &c,
            &x,
            &im,
            &mut Run {
                train: true,
                draw: &mut d1,
                masks: MaskDraws::PerMask,
            },
            true,
        )
        .unwrap();
    let mut d2 = draws(5);
    let (yg, sg) = lg
        .forward(
            &g,
            &g.upload(&x).unwrap(),
            &im,
            &mut Run {
                train: true,
                draw: &mut d2,
                masks: MaskDraws::PerMask,
            },
            true,
        )
        .unwrap();
    let what = format!("vision layer {}", T::SUFFIX);
    close(
        &format!("{what} output"),
        &g.download(&yg).unwrap(),
        &yc,
        tol.out,
    );
    let mut gc = Grads::default();
    let dxc = lc.backward(&c, &sc.unwrap(), &dy, &mut gc).unwrap();
    let mut gg = Grads::default();
    let dxg = lg
        .backward(&g, &sg.unwrap(), &g.upload(&dy).unwrap(), &mut gg)
        .unwrap();
    close(
        &format!("{what} dx"),
        &g.download(&dxg).unwrap(),
        &dxc,
        tol.dx,
    );
    compare_grads(&what, &g, gg, &gc, tol.grad);
}

#[test]
fn decoder_layer_matches_cpu_forward_and_backward() {
    decoder_case::<f32>(F32);
}

#[test]
fn decoder_layer_in_bf16_stays_near_cpu_f32() {
    decoder_case::<bf16>(BF16);
}

fn decoder_case<T: Elem>(tol: Tol) {
    let (g, c) = (cuda::<T>(), Cpu);
    let (seqs, len, d) = (2, 30, 16);
    let mut bounds = Vec::new();
    for segs in [[12u32, 18], [25, 5]] {
        let mut start = 0;
        for n in segs {
            for i in 0..n {
                bounds.push((start, start + i + 1));
            }
            start += n;
        }
    }
    let cos = vals(seqs * len * d, 92);
    let sin = vals(seqs * len * d, 93);
    let x = vals(seqs * len * 64, 94);
    let dy = vals(seqs * len * 64, 95);
    let (lc, lg) = (llm_layer(&c), llm_layer(&g));
    let tc = Tokens::<Cpu> {
        seqs,
        len,
        bounds: &bounds,
        cos: &cos,
        sin: &sin,
    };
    let (cg, sg_) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
    let tg = Tokens::<Cuda<T>> {
        seqs,
        len,
        bounds: &bounds,
        cos: &cg,
        sin: &sg_,
    };
    let mut d1 = draws(9);
    let (yc, sc) = lc
        .forward(
            &c,
            &x,
            &tc,
            &mut Run {
                train: true,
                draw: &mut d1,
                masks: MaskDraws::PerElement,
            },
            true,
        )
        .unwrap();
    let mut d2 = draws(9);
    let (yg, sg) = lg
        .forward(
            &g,
            &g.upload(&x).unwrap(),
            &tg,
            &mut Run {
                train: true,
                draw: &mut d2,
                masks: MaskDraws::PerElement,
            },
            true,
        )
        .unwrap();
    let what = format!("decoder layer {}", T::SUFFIX);
    close(
        &format!("{what} output"),
        &g.download(&yg).unwrap(),
        &yc,
        tol.out,
    );
    let mut gc = Grads::default();
    let dxc = lc.backward(&c, &sc.unwrap(), &tc, &dy, &mut gc).unwrap();
    let mut gg = Grads::default();
    let dxg = lg
        .backward(&g, &sg.unwrap(), &tg, &g.upload(&dy).unwrap(), &mut gg)
        .unwrap();
    close(
        &format!("{what} dx"),
        &g.download(&dxg).unwrap(),
        &dxc,
        tol.dx,
    );
    compare_grads(&what, &g, gg, &gc, tol.grad);
}
