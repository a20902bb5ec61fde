//! Position schemes of the vision side: NaViT position buckets (2.5/2.6), 2-D sin-cos tables
//! (resampler keys and V2.0 queries) and the antialiased bicubic resampling of V2.0's learned
//! position grid. All are computed on the host; only their results enter the graph.

/// One element of PyTorch's CPU float32 `arange(start, end, step)` at `idx`, reproducing its
/// vectorised evaluation (16-element blocks of two 8-lane vectors; spec §7.3 and
/// `minicpmv-navit-bucket-exceptions.json`): the rounding differs from a scalar loop.
fn torch_arange_f32(start: f64, step: f64, len: usize, idx: usize) -> f32 {
    let full = len / 16 * 16;
    if idx >= full {
        return (start + step * idx as f64) as f32;
    }
    let block = idx / 16 * 16;
    let half = if idx - block >= 8 { 8 } else { 0 };
    let base = (start + step * (block + half) as f64) as f32;
    let j = idx - block - half;
    (base as f64 + j as f64 * step) as f32
}

/// Length of `arange(start, end, step)` as PyTorch computes it.
fn arange_len(start: f64, end: f64, step: f64) -> usize {
    ((end - start) / step).ceil().max(0.0) as usize
}

/// Buckets of a NaViT position table with `grid` entries per side for an axis of `n`
/// patches: `bucketize(arange(0, 1-1e-6, 1/n), arange(1/grid, 1, 1/grid), right=True)` with
/// PyTorch's float32 rounding (so e.g. n = 25 gives 13 at i = 5, not 14).
pub fn navit_buckets(n: usize, grid: usize) -> Vec<usize> {
    let bstep = 1.0 / grid as f64;
    let blen = arange_len(bstep, 1.0, bstep);
    let bounds: Vec<f32> = (0..blen)
        .map(|k| torch_arange_f32(bstep, bstep, blen, k))
        .collect();
    // `1 / n` with n an integer tensor is computed in float32.
    let step = (1.0f32 / n as f32) as f64;
    let len = arange_len(0.0, 1.0 - 1e-6, step);
    (0..n)
        .map(|i| {
            let x = if i < len {
                torch_arange_f32(0.0, step, len, i)
            } else {
                // Unreachable for the lengths PyTorch produces; keep the last bucket.
                1.0
            };
            bounds.iter().filter(|&&b| b <= x).count()
        })
        .collect()
}

/// 2-D sin-cos table `[h·w, dim]` (row-major cells; each row = column encoding then row
/// encoding, spec §7.4), computed in f32 as the reference's NumPy code does.
pub fn sincos_2d(h: usize, w: usize, dim: usize) -> Vec<f32> {
    let k = dim / 4;
    let omega: Vec<f32> = (0..k)
        .map(|i| 1.0f32 / 10000f32.powf(i as f32 / k as f32))
        .collect();
    let mut out = Vec::with_capacity(h * w * dim);
    for r in 0..h {
        for c in 0..w {
            for p in [c as f32, r as f32] {
                out.extend(omega.iter().map(|o| (p * o).sin()));
                out.extend(omega.iter().map(|o| (p * o).cos()));
            }
        }
    }
    out
}

/// Weights `[out, in]` of PyTorch's antialiased bicubic interpolation along one axis
/// (`interpolate(..., mode="bicubic", antialias=True, align_corners=False)`): the a = −0.5
/// kernel, PIL-style support and per-row normalisation, also when up-sampling.
pub fn aa_bicubic_matrix(input: usize, output: usize) -> Vec<f32> {
    fn cubic(x: f32) -> f32 {
        let a = -0.5f32;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0f32 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut m = vec![0f32; output * input];
    for i in 0..output {
        let center = scale * (i as f32 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
        let mut ws: Vec<f32> = (xmin..xmax)
            .map(|j| cubic((j as f32 - center + 0.5) * invscale))
            .collect();
        let total: f32 = ws.iter().sum();
        if total != 0.0 {
            for w in &mut ws {
                *w /= total;
            }
        }
        for (j, w) in (xmin..xmax).zip(ws) {
            m[i * input + j] = w;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's measured exception table: every (n, i) whose bucket differs from
    /// floor(70·i/n), for n = 1..2600.
    #[test]
    fn buckets_match_the_measured_exception_table() {
        let text = include_str!("../../../tests/fixtures/model/navit-bucket-exceptions.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let exc = v["exceptions"].as_object().unwrap();
        for n in 1..=2600usize {
            let got = navit_buckets(n, 70);
            let mut want: Vec<usize> = (0..n).map(|i| 70 * i / n).collect();
            if let Some(list) = exc.get(&n.to_string()) {
                for pair in list.as_array().unwrap() {
                    let i = pair[0].as_u64().unwrap() as usize;
                    want[i] = pair[1].as_u64().unwrap() as usize;
                }
            }
            assert_eq!(got, want, "n = {n}");
        }
    }

    #[test]
    fn aa_bicubic_upsampling_taps_match_the_spec() {
        // Spec §7.1: an impulse up-sampled ×2 gives taps −0.0234375, −0.0703125, 0.2265625,
        // 0.8671875.
        let m = aa_bicubic_matrix(8, 16);
        let row: Vec<f32> = m[8 * 16 / 2..8 * 16 / 2 + 8].to_vec();
        let mut taps: Vec<f32> = row.iter().copied().filter(|w| *w != 0.0).collect();
        taps.sort_by(f32::total_cmp);
        assert_eq!(taps, vec![-0.0703125, -0.0234375, 0.2265625, 0.8671875]);
        // Identity when sizes are equal.
        let id = aa_bicubic_matrix(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert_eq!(id[i * 5 + j], if i == j { 1.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn sincos_first_half_is_the_column() {
        let t = sincos_2d(2, 3, 8);
        // cell (r=1, c=2): first half encodes c=2 → sin(2·ω0) = sin(2).
        let cell = &t[(3 + 2) * 8..(3 + 2) * 8 + 8];
        assert!((cell[0] - 2f32.sin()).abs() < 1e-6);
        assert!((cell[4] - 1f32.sin()).abs() < 1e-6);
    }
}
