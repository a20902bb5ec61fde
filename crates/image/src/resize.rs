//! Pillow's BICUBIC resampling, bit for bit.
//!
//! A port of the 8-bit path of Pillow's `libImaging/Resample.c` (unchanged in behaviour from
//! Pillow 7 to 13; the reference pins 10.1): a separable convolution with the Keys cubic kernel
//! (a = −0.5), widened by the scale factor when down-scaling (antialiasing), weights normalised in
//! f64 and converted to 22-bit fixed point, horizontal pass first into an 8-bit intermediate that
//! holds only the rows the vertical pass reads, then the vertical pass. Integer sums are exact, so
//! the order of additions is free; everything that rounds is done in Pillow's order.

use crate::rgb::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;
const SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis.
struct Coeffs {
    /// Taps per output index, `ksize` apart, 22-bit fixed point.
    k: Vec<i32>,
    ksize: usize,
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut k = vec![0i32; out_size * ksize];
    let mut bounds = Vec::with_capacity(out_size);
    let ss = 1.0 / filterscale;
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let v = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { k, ksize, bounds }
}

/// Pillow's `clip8`: the sum shifted down to 8 bits, saturated (branch-free, so it vectorises).
#[inline(always)]
fn clip8(v: i32) -> u8 {
    (v.max(0) >> PRECISION_BITS).min(255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows handled together by the horizontal pass.
const STRIP: usize = 32;
const LANES: usize = STRIP * 3;

/// Horizontal pass over rows `y0..y0 + rows` of `src` (width `in_w`) into `out_w`-wide rows.
///
/// Rows are processed in strips of [`STRIP`]: a strip is first transposed so that the 16 rows'
/// RGB values of one input column are 48 contiguous bytes; one filter tap is then a 48-lane
/// multiply-add (vectorised like the vertical pass) instead of a 3-lane one per pixel. The
/// integer sums are exactly Pillow's; only the order of exact additions changes.
#[inline(always)]
fn horizontal_impl(src: &[u8], in_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = vec![0u8; out_w * rows * 3];
    let mut strip = vec![0u8; in_w * LANES];
    let mut out_strip = vec![0u8; out_w * LANES];
    for s0 in (0..rows).step_by(STRIP) {
        let sr = STRIP.min(rows - s0);
        for r in 0..sr {
            let row = &src[(y0 + s0 + r) * in_w * 3..(y0 + s0 + r + 1) * in_w * 3];
            for (dst, px) in strip.chunks_exact_mut(LANES).zip(row.chunks_exact(3)) {
                dst[r * 3..r * 3 + 3].copy_from_slice(px);
            }
        }
        for xx in 0..out_w {
            let (xmin, n) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let mut acc = [HALF; LANES];
            for (t, &kv) in k.iter().enumerate() {
                let col: &[u8; LANES] = strip[(xmin + t) * LANES..(xmin + t + 1) * LANES]
                    .try_into()
                    .expect("LANES bytes");
                for (a, &p) in acc.iter_mut().zip(col) {
                    *a += p as i32 * kv;
                }
            }
            let dst: &mut [u8; LANES] = (&mut out_strip[xx * LANES..(xx + 1) * LANES])
                .try_into()
                .expect("LANES bytes");
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
        for r in 0..sr {
            let row = &mut out[(s0 + r) * out_w * 3..(s0 + r + 1) * out_w * 3];
            for (px, src_col) in row.chunks_exact_mut(3).zip(out_strip.chunks_exact(LANES)) {
                px.copy_from_slice(&src_col[r * 3..r * 3 + 3]);
            }
        }
    }
    out
}

/// Vertical pass: each output row is a weighted sum of whole input rows (vectorisable).
#[inline(always)]
fn vertical_impl(src: &[u8], width: usize, c: &Coeffs, ybase: usize) -> Vec<u8> {
    let stride = width * 3;
    let out_h = c.bounds.len();
    let mut out = vec![0u8; stride * out_h];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        acc.fill(HALF);
        for (t, &kv) in k.iter().enumerate() {
            let y = ymin + t - ybase;
            let row = &src[y * stride..(y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * kv;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
    out
}

// The passes are compiled twice: for the baseline target and with AVX2 (chosen at run time), so
// the integer multiply-adds vectorise on current CPUs without requiring them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(src: &[u8], in_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    horizontal_impl(src, in_w, y0, rows, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(src: &[u8], width: usize, c: &Coeffs, ybase: usize) -> Vec<u8> {
    vertical_impl(src, width, c, ybase)
}

fn horizontal(src: &[u8], in_w: usize, y0: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { horizontal_avx2(src, in_w, y0, rows, c) };
    }
    horizontal_impl(src, in_w, y0, rows, c)
}

fn vertical(src: &[u8], width: usize, c: &Coeffs, ybase: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { vertical_avx2(src, width, c, ybase) };
    }
    vertical_impl(src, width, c, ybase)
}

/// Resizes `img` to `out_w` × `out_h` exactly as Pillow's `Image.resize(size, BICUBIC)` does for
/// an RGB image. Returns a copy when the size is unchanged (as Pillow does).
///
/// # Panics
/// If the output size has a zero side.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    assert!(out_w > 0 && out_h > 0, "resize to an empty size");
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    if !need_h && !need_v {
        return img.clone();
    }
    let vert = precompute(in_h, out_h);
    let (data, width) = if need_h {
        let horiz = precompute(in_w, out_w);
        // Only the input rows the vertical pass will read (all of them when it is skipped).
        let (first, last) = if need_v {
            let first = vert.bounds[0].0;
            let (lmin, ln) = vert.bounds[out_h - 1];
            (first, lmin + ln)
        } else {
            (0, in_h)
        };
        let tmp = horizontal(&img.data, in_w, first, last - first, &horiz);
        if need_v {
            (vertical(&tmp, out_w, &vert, first), out_w)
        } else {
            (tmp, out_w)
        }
    } else {
        (vertical(&img.data, in_w, &vert, 0), in_w)
    };
    RgbImage {
        width: width as u32,
        height: out_h as u32,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_matches_keys_cubic() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert!((bicubic(0.5) - 0.5625).abs() < 1e-12);
        assert!((bicubic(1.5) + 0.0625).abs() < 1e-12);
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(resize_bicubic(&img, 2, 1), img);
    }

    /// The run-time dispatch (AVX2 where available) and the portable build of the passes give
    /// the same bytes.
    #[test]
    fn dispatched_and_portable_passes_agree() {
        let (w, h) = (157usize, 61usize);
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 2654435761usize) >> 7) as u8)
            .collect();
        for (ow, oh) in [(40, 23), (300, 100), (157, 30), (3, 61)] {
            let hc = precompute(w, ow);
            assert_eq!(
                horizontal(&src, w, 0, h, &hc),
                horizontal_impl(&src, w, 0, h, &hc)
            );
            let vc = precompute(h, oh);
            assert_eq!(vertical(&src, w, &vc, 0), vertical_impl(&src, w, &vc, 0));
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_raw(7, 5, vec![200; 7 * 5 * 3]).unwrap();
        for (w, h) in [(3, 2), (20, 13), (7, 9), (1, 1)] {
            let out = resize_bicubic(&img, w, h);
            assert!(out.data.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }
}
