//! The CPU primitives against naive definitions and central differences.

use super::*;

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

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn gemm_matches_the_definition_for_every_transpose_view_and_beta() {
    let be = Cpu;
    let (m, n, k) = (5, 7, 6);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        // Operands as views inside wider buffers, at offsets.
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
        let a = vals(am.end() + 5, 1);
        let b = vals(bm.end() + 5, 2);
        let c0 = vals(cm.end() + 5, 3);
        let at = |i: usize, p: usize| {
            if ta {
                a[am.off + p * am.ld + i]
            } else {
                a[am.off + i * am.ld + p]
            }
        };
        let bt = |p: usize, j: usize| {
            if tb {
                b[bm.off + j * bm.ld + p]
            } else {
                b[bm.off + p * bm.ld + j]
            }
        };
        for beta in [0.0f32, 1.0, 0.5] {
            let mut c = c0.clone();
            be.gemm(&mut c, cm, &a, am, ta, &b, bm, tb, 1.5, beta)
                .unwrap();
            let mut want = c0.clone();
            for i in 0..m {
                for j in 0..n {
                    let s: f32 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                    let idx = cm.off + i * cm.ld + j;
                    want[idx] = 1.5 * s + if beta == 0.0 { 0.0 } else { beta * c0[idx] };
                }
            }
            assert_close(
                &c,
                &want,
                1e-6,
                &format!("gemm ta={ta} tb={tb} beta={beta}"),
            );
        }
    }
    // Shape mistakes are errors, not panics.
    let mut c = vec![0.0; 4];
    assert!(be
        .gemm(
            &mut c,
            Mat::dense(2, 2),
            &vec![0.0; 6],
            Mat::dense(2, 3),
            false,
            &vec![0.0; 4],
            Mat::dense(2, 2),
            false,
            1.0,
            0.0
        )
        .is_err());
    assert!(be
        .gemm(
            &mut c,
            Mat::dense(2, 3),
            &vec![0.0; 6],
            Mat::dense(2, 3),
            false,
            &vec![0.0; 9],
            Mat::dense(3, 3),
            false,
            1.0,
            0.0
        )
        .is_err());
}

#[test]
fn gelu_gradients_match_central_differences() {
    for act in [Gelu::Erf, Gelu::Tanh] {
        for &x in &[-3.0f32, -1.2, -0.3, 0.0, 0.4, 1.7, 3.5] {
            let h = 1e-3f32;
            let fd = (gelu(x + h, act) as f64 - gelu(x - h, act) as f64) / (2.0 * h as f64);
            assert!(
                (gelu_grad(x, act) as f64 - fd).abs() < 2e-3,
                "{act:?} at {x}"
            );
        }
    }
    assert!((gelu(1.0, Gelu::Erf) - 0.841_344_7).abs() < 1e-6);
    assert!((gelu(1.0, Gelu::Tanh) - 0.841_192).abs() < 1e-5);
}

/// Σ r·f(x) for a fixed random `r`: the scalar whose gradient the backward passes compute.
fn project(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

#[test]
fn layer_norm_forward_and_backward() {
    let be = Cpu;
    let (rows, cols) = (3, 8);
    let x: Vec<f32> = vals(rows * cols, 4).iter().map(|v| v * 3.0 + 0.5).collect();
    let w = vals(cols, 5);
    let b = vals(cols, 6);
    let r = vals(rows * cols, 7);
    let run = |x: &Vec<f32>, w: &Vec<f32>, b: &Vec<f32>| {
        let mut y = vec![0.0; rows * cols];
        let mut st = vec![0.0; 2 * rows];
        be.layer_norm(&mut y, &mut st, x, w, b, cols, 1e-6).unwrap();
        (y, st)
    };
    let (y, st) = run(&x, &w, &b);
    for i in 0..rows {
        let row = &x[i * cols..(i + 1) * cols];
        let mean = row.iter().sum::<f32>() / cols as f32;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / cols as f32;
        for c in 0..cols {
            let want = (row[c] - mean) / (var + 1e-6).sqrt() * w[c] + b[c];
            assert!((y[i * cols + c] - want).abs() < 1e-5);
        }
    }
    let mut dx = vec![0.25; rows * cols]; // accumulates onto what is there
    let (mut dw, mut db) = (vec![0.0; cols], vec![0.0; cols]);
    be.layer_norm_backward(&mut dx, Some(&mut dw), Some(&mut db), &r, &x, &w, &st, cols)
        .unwrap();
    let h = 1e-2f32;
    let fd = |f: &dyn Fn(f32) -> f64| ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
    let want_dx: Vec<f32> = (0..x.len())
        .map(|i| {
            0.25 + fd(&|e| {
                let mut x2 = x.clone();
                x2[i] += e;
                project(&run(&x2, &w, &b).0, &r)
            })
        })
        .collect();
    assert_close(&dx, &want_dx, 2e-3, "layer_norm dx");
    let want_dw: Vec<f32> = (0..cols)
        .map(|i| {
            fd(&|e| {
                let mut w2 = w.clone();
                w2[i] += e;
                project(&run(&x, &w2, &b).0, &r)
            })
        })
        .collect();
    assert_close(&dw, &want_dw, 2e-3, "layer_norm dw");
    let want_db: Vec<f32> = (0..cols)
        .map(|c| (0..rows).map(|i| r[i * cols + c]).sum())
        .collect();
    assert_close(&db, &want_db, 1e-5, "layer_norm db");
}

/// A GQA layout with causal packed segments and a padded, non-causal one.
fn attn_case() -> Attn {
    let (seqs, len, heads, kv, d) = (2, 5, 4, 2, 3);
    let width = heads * d + 2 * kv * d + 1; // one spare column: untouched by the backward
    let mut bounds = Vec::new();
    // Sequence 0: two packed causal segments [0, 2) and [2, 5).
    for i in 0..len {
        let start = if i < 2 { 0 } else { 2 };
        bounds.push((start, i as u32 + 1));
    }
    // Sequence 1: an image of 3 valid patches padded to 5 (padded queries see the valid keys).
    bounds.extend(std::iter::repeat_n((0u32, 3u32), len));
    Attn {
        seqs,
        len,
        heads,
        kv_heads: kv,
        head_dim: d,
        ld: width,
        q_col: 1,
        k_col: 1 + heads * d,
        v_col: 1 + heads * d + kv * d,
        scale: 1.0 / (d as f32).sqrt(),
        bounds,
    }
}

fn attention_naive(qkv: &[f32], a: &Attn) -> Vec<f32> {
    let d = a.head_dim;
    let rep = a.heads / a.kv_heads;
    let mut out = vec![0f32; a.rows() * a.width()];
    for s in 0..a.seqs {
        for h in 0..a.heads {
            let g = h / rep;
            for i in 0..a.len {
                let row = s * a.len + i;
                let (lo, hi) = (a.bounds[row].0 as usize, a.bounds[row].1 as usize);
                let q = &qkv[row * a.ld + a.q_col + h * d..][..d];
                let sc: Vec<f64> = (lo..hi)
                    .map(|t| {
                        let k = &qkv[(s * a.len + t) * a.ld + a.k_col + g * d..][..d];
                        q.iter().zip(k).map(|(x, y)| (x * y) as f64).sum::<f64>() * a.scale as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|v| (v - m).exp()).sum();
                for (t, v) in (lo..hi).zip(&sc) {
                    let p = (v - m).exp() / z;
                    let vv = &qkv[(s * a.len + t) * a.ld + a.v_col + g * d..][..d];
                    for e in 0..d {
                        out[row * a.width() + h * d + e] += (p * vv[e] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_softmax_with_key_ranges_and_gqa() {
    let be = Cpu;
    let a = attn_case();
    let qkv: Vec<f32> = vals(a.rows() * a.ld, 8).iter().map(|v| v * 2.0).collect();
    let mut out = vec![0.0; a.rows() * a.width()];
    let mut lse = vec![0.0; a.heads * a.rows()];
    be.attention(&mut out, &mut lse, &qkv, &a).unwrap();
    assert_close(&out, &attention_naive(&qkv, &a), 1e-5, "attention out");
    assert!(lse.iter().all(|v| v.is_finite()));
    // Bad layouts are errors.
    let mut bad = a.clone();
    bad.bounds[3] = (0, 6);
    assert!(be.attention(&mut out, &mut lse, &qkv, &bad).is_err());
    let mut bad = a.clone();
    bad.kv_heads = 3;
    assert!(be.attention(&mut out, &mut lse, &qkv, &bad).is_err());
}

#[test]
fn attention_backward_matches_central_differences() {
    let be = Cpu;
    let a = attn_case();
    let qkv: Vec<f32> = vals(a.rows() * a.ld, 9).iter().map(|v| v * 2.0).collect();
    let r = vals(a.rows() * a.width(), 10);
    let fwd = |qkv: &Vec<f32>| {
        let mut out = vec![0.0; a.rows() * a.width()];
        let mut lse = vec![0.0; a.heads * a.rows()];
        be.attention(&mut out, &mut lse, qkv, &a).unwrap();
        (out, lse)
    };
    let (out, lse) = fwd(&qkv);
    let mut dqkv = vec![7.0; qkv.len()];
    be.attention_backward(&mut dqkv, &r, &out, &lse, &qkv, &a)
        .unwrap();
    let h = 1e-2f32;
    for i in 0..qkv.len() {
        let col = i % a.ld;
        if col == 0 {
            assert_eq!(dqkv[i], 7.0, "column outside q/k/v was written");
            continue;
        }
        let f = |e: f32| {
            let mut x = qkv.clone();
            x[i] += e;
            project(&fwd(&x).0, &r)
        };
        let fd = ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
        assert!((dqkv[i] - fd).abs() < 2e-3, "dqkv[{i}] {} vs {fd}", dqkv[i]);
    }
}

/// The GEMM formulation (`crate::attention`, what the CUDA backend runs) against the direct
/// CPU kernels: same outputs, log-sum-exp and gradients, GQA, packed causal segments, padding
/// and a query with no keys; untouched columns stay untouched.
#[test]
fn attention_as_matrix_products_matches_the_direct_kernels() {
    let be = Cpu;
    let mut a = attn_case();
    a.bounds[7] = (0, 0); // a query that sees nothing
    let qkv: Vec<f32> = vals(a.rows() * a.ld, 11).iter().map(|v| v * 2.0).collect();
    let dout = vals(a.rows() * a.width(), 12);
    let n = a.rows() * a.width();
    let (mut out_ref, mut lse_ref) = (vec![0.0; n], vec![0.0; a.heads * a.rows()]);
    be.attention(&mut out_ref, &mut lse_ref, &qkv, &a).unwrap();
    let (mut out, mut lse) = (vec![5.0; n], vec![5.0; a.heads * a.rows()]);
    crate::attention::forward(&be, &mut out, &mut lse, &qkv, &a).unwrap();
    assert_close(&out, &out_ref, 1e-6, "out");
    for (i, (l, r)) in lse.iter().zip(&lse_ref).enumerate() {
        assert!(
            l == r || (l - r).abs() <= 1e-6 * r.abs().max(1.0),
            "lse[{i}] {l} vs {r}"
        );
    }
    assert!(lse.contains(&f32::NEG_INFINITY));
    let mut g_ref = vec![7.0; qkv.len()];
    be.attention_backward(&mut g_ref, &dout, &out_ref, &lse_ref, &qkv, &a)
        .unwrap();
    let mut g = vec![7.0; qkv.len()];
    crate::attention::backward(&be, &mut g, &dout, &out, &lse, &qkv, &a).unwrap();
    assert_close(&g, &g_ref, 1e-5, "dqkv");
    assert!(
        (0..a.rows()).all(|r| g[r * a.ld] == 7.0),
        "spare column written"
    );
    // Layouts are checked as the direct kernels check them.
    let mut bad = a.clone();
    bad.bounds[3] = (0, 6);
    assert!(crate::attention::forward(&be, &mut out, &mut lse, &qkv, &bad).is_err());
    assert!(be.attn_softmax(&mut vec![0.0; 3], &mut lse, &a, 0).is_err());
    assert!(be
        .attn_softmax(&mut vec![0.0; a.heads * a.len * a.len], &mut lse, &a, 2)
        .is_err());
}

fn counter_draws() -> impl FnMut() -> u64 {
    let mut s = 0u64;
    move || {
        s += 1;
        s.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

#[test]
fn dropout_mask_replays_the_generator() {
    let be = Cpu;
    for masks in [MaskDraws::PerElement, MaskDraws::PerMask] {
        let mut draw = counter_draws();
        let m = be.dropout_mask(1000, 0.75, masks, &mut draw).unwrap();
        let kept = m.iter().filter(|&&v| v != 0.0).count();
        assert!(
            (650..850).contains(&kept),
            "{masks:?}: {kept} of 1000 kept at 0.75"
        );
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75f32));
        let second = be.dropout_mask(1000, 0.75, masks, &mut draw).unwrap();
        assert_ne!(second, m, "{masks:?}: the next mask is another one");
        assert_eq!(
            be.dropout_mask(1000, 0.75, masks, &mut counter_draws())
                .unwrap(),
            m,
            "{masks:?}: the same draws give the same mask"
        );
    }
}

#[test]
fn a_per_mask_draw_takes_one_value_of_the_generator() {
    let mut calls = 0;
    let mut draw = || {
        calls += 1;
        0x1234_5678_9ABC_DEF0u64
    };
    let m = host_mask(10_000, 0.9, MaskDraws::PerMask, &mut draw);
    assert_eq!(calls, 1);
    // The hash's first values for this seed, worked out by hand from SplitMix64: element 0
    // hashes the seed itself.
    let z0 = {
        let mut z = 0x1234_5678_9ABC_DEF0u64.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let u0 = (z0 >> 11) as f64 / 9_007_199_254_740_992.0;
    assert_eq!(m[0] != 0.0, u0 < 0.9f32 as f64);
    let kept = m.iter().filter(|&&v| v != 0.0).count();
    assert!((8800..9200).contains(&kept), "{kept} of 10000 kept at 0.9");
    let mut calls = 0;
    let mut draw = || {
        calls += 1;
        calls
    };
    host_mask(10, 0.9, MaskDraws::PerElement, &mut draw);
    assert_eq!(calls, 10);
}

#[test]
fn rms_norm_forward_and_backward() {
    let be = Cpu;
    let (rows, cols) = (3, 8);
    let x: Vec<f32> = vals(rows * cols, 11)
        .iter()
        .map(|v| v * 3.0 + 0.5)
        .collect();
    let w = vals(cols, 12);
    let r = vals(rows * cols, 13);
    let run = |x: &Vec<f32>, w: &Vec<f32>| {
        let mut y = vec![0.0; rows * cols];
        let mut rstd = vec![0.0; rows];
        be.rms_norm(&mut y, &mut rstd, x, w, cols, 1e-6).unwrap();
        (y, rstd)
    };
    let (y, rstd) = run(&x, &w);
    for i in 0..rows {
        let row = &x[i * cols..(i + 1) * cols];
        let ms = row.iter().map(|v| v * v).sum::<f32>() / cols as f32;
        for c in 0..cols {
            let want = row[c] / (ms + 1e-6).sqrt() * w[c];
            assert!((y[i * cols + c] - want).abs() < 1e-5);
        }
    }
    let mut dx = vec![0.25; rows * cols];
    let mut dw = vec![0.5; cols];
    be.rms_norm_backward(&mut dx, Some(&mut dw), &r, &x, &w, &rstd, cols)
        .unwrap();
    let h = 1e-2f32;
    let fd = |f: &dyn Fn(f32) -> f64| ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
    let want_dx: Vec<f32> = (0..x.len())
        .map(|i| {
            0.25 + fd(&|e| {
                let mut x2 = x.clone();
                x2[i] += e;
                project(&run(&x2, &w).0, &r)
            })
        })
        .collect();
    assert_close(&dx, &want_dx, 2e-3, "rms_norm dx");
    let want_dw: Vec<f32> = (0..cols)
        .map(|i| {
            0.5 + fd(&|e| {
                let mut w2 = w.clone();
                w2[i] += e;
                project(&run(&x, &w2).0, &r)
            })
        })
        .collect();
    assert_close(&dw, &want_dw, 2e-3, "rms_norm dw");
}

#[test]
fn rope_rotates_halves_and_its_transpose_is_the_backward() {
    let be = Cpu;
    let (rows, d, heads) = (3, 4, 2);
    // Two heads at column 1 of rows 10 wide: the rest of the row stays as it was.
    let m = Mat {
        off: 1,
        rows,
        cols: heads * d,
        ld: 10,
    };
    let x = vals(rows * 10, 14);
    // Tables as the model builds them: both halves of a row hold the same angles.
    let angles: Vec<f32> = (0..rows * d / 2).map(|i| 0.3 + 0.7 * i as f32).collect();
    let mut cos = vec![0.0; rows * d];
    let mut sin = vec![0.0; rows * d];
    for r in 0..rows {
        for i in 0..d / 2 {
            let a = angles[r * d / 2 + i];
            for j in [i, i + d / 2] {
                cos[r * d + j] = a.cos();
                sin[r * d + j] = a.sin();
            }
        }
    }
    let mut y = x.clone();
    be.rope(&mut y, m, d, &cos, &sin, false).unwrap();
    for r in 0..rows {
        for c in 0..10 {
            let i = r * 10 + c;
            if !(1..1 + heads * d).contains(&c) {
                assert_eq!(y[i], x[i], "column {c} outside the heads changed");
                continue;
            }
            let k = (c - 1) % d;
            let base = i - k;
            let (other, sign) = if k < d / 2 {
                (x[base + k + d / 2], -1.0)
            } else {
                (x[base + k - d / 2], 1.0)
            };
            let want = x[i] * cos[r * d + k] + sign * other * sin[r * d + k];
            assert!(
                (y[i] - want).abs() < 1e-6,
                "rope [{r}, {c}]: {} vs {want}",
                y[i]
            );
        }
    }
    // A rotation's transpose is its inverse, and is the backward of the linear map.
    let mut back = y.clone();
    be.rope(&mut back, m, d, &cos, &sin, true).unwrap();
    assert_close(&back, &x, 1e-6, "rope transposed after rope");
    // The transpose is the backward pass for any tables (the model's are symmetric; these
    // are not, so mixing up a half's angle shows).
    let (cos, sin) = (vals(rows * d, 18), vals(rows * d, 19));
    let r = vals(rows * 10, 15);
    let mut g = r.clone();
    be.rope(&mut g, m, d, &cos, &sin, true).unwrap();
    let h = 1e-2f32;
    for i in 0..x.len() {
        if !(1..1 + heads * d).contains(&(i % 10)) {
            continue;
        }
        let f = |e: f32| {
            let mut x2 = x.clone();
            x2[i] += e;
            be.rope(&mut x2, m, d, &cos, &sin, false).unwrap();
            project(&x2, &r)
        };
        let fd = ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
        assert!(
            (g[i] - fd).abs() < 1e-3,
            "rope grad [{i}]: {} vs {fd}",
            g[i]
        );
    }
}

#[test]
fn swiglu_forward_and_backward() {
    let be = Cpu;
    let (rows, f) = (3, 5);
    let gu: Vec<f32> = vals(rows * 2 * f, 16).iter().map(|v| v * 4.0).collect();
    let whole = Mat::dense(rows, 2 * f);
    let (gm, um) = (whole.cols(0, f), whole.cols(f, f));
    let run = |gu: &Vec<f32>| {
        let mut y = vec![0.0; rows * f];
        be.swiglu(&mut y, gu, gm, um).unwrap();
        y
    };
    let y = run(&gu);
    for r in 0..rows {
        for c in 0..f {
            let (g, u) = (gu[r * 2 * f + c], gu[r * 2 * f + f + c]);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((y[r * f + c] - want).abs() < 1e-6);
        }
    }
    let r = vals(rows * f, 17);
    let mut dgu = vec![9.0; gu.len()];
    be.swiglu_backward(&mut dgu, &r, &gu, gm, um).unwrap();
    let h = 1e-2f32;
    for i in 0..gu.len() {
        let fdiff = |e: f32| {
            let mut x = gu.clone();
            x[i] += e;
            project(&run(&x), &r)
        };
        let fd = ((fdiff(h) - fdiff(-h)) / (2.0 * h as f64)) as f32;
        assert!((dgu[i] - fd).abs() < 1e-3, "dgu[{i}] {} vs {fd}", dgu[i]);
    }
}
