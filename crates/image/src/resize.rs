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

/// Columns (and rows) moved together by [`load_strip`] / [`store_strip`]: a block of the
/// transposition small enough that both its rows and its columns stay in the L1 cache, and the
/// unit of the SIMD transposition.
const BLOCK: usize = 16;

/// Copies rows `y..y + sr` of `src` (`in_w` pixels wide) into `strip` transposed: the `sr` rows'
/// RGB values of input column `x` become `strip[x * LANES..x * LANES + sr * 3]`. In blocks of
/// [`BLOCK`] × [`BLOCK`] pixels; `simd`: full blocks through [`avx2::load_block`].
fn load_strip(src: &[u8], in_w: usize, y: usize, sr: usize, strip: &mut [u8], simd: bool) {
    let w3 = in_w * 3;
    let rows = &src[y * w3..(y + sr) * w3];
    for x0 in (0..in_w).step_by(BLOCK) {
        let bw = BLOCK.min(in_w - x0);
        for r0 in (0..sr).step_by(BLOCK) {
            let bh = BLOCK.min(sr - r0);
            #[cfg(target_arch = "x86_64")]
            if simd && bw == BLOCK && bh == BLOCK {
                // SAFETY: `simd` is only set where the CPU has AVX2.
                unsafe { avx2::load_block(rows, w3, r0, x0, strip) };
                continue;
            }
            let _ = simd;
            let cols = &mut strip[x0 * LANES..(x0 + bw) * LANES];
            for r in r0..r0 + bh {
                let px = &rows[r * w3 + x0 * 3..r * w3 + (x0 + bw) * 3];
                for (col, p) in cols.chunks_exact_mut(LANES).zip(px.chunks_exact(3)) {
                    col[r * 3..r * 3 + 3].copy_from_slice(p);
                }
            }
        }
    }
}

/// The inverse of [`load_strip`] for the `out_w` output columns: `out_strip` column `xx` holds
/// output pixel `xx` of `sr` rows, written into rows `y..y + sr` of `out`.
fn store_strip(out_strip: &[u8], out_w: usize, y: usize, sr: usize, out: &mut [u8], simd: bool) {
    let w3 = out_w * 3;
    let rows = &mut out[y * w3..(y + sr) * w3];
    for x0 in (0..out_w).step_by(BLOCK) {
        let bw = BLOCK.min(out_w - x0);
        for r0 in (0..sr).step_by(BLOCK) {
            let bh = BLOCK.min(sr - r0);
            #[cfg(target_arch = "x86_64")]
            if simd && bw == BLOCK && bh == BLOCK {
                // SAFETY: `simd` is only set where the CPU has AVX2.
                unsafe { avx2::store_block(out_strip, r0, x0, rows, w3) };
                continue;
            }
            let _ = simd;
            let cols = &out_strip[x0 * LANES..(x0 + bw) * LANES];
            for r in r0..r0 + bh {
                let px = &mut rows[r * w3 + x0 * 3..r * w3 + (x0 + bw) * 3];
                for (col, p) in cols.chunks_exact(LANES).zip(px.chunks_exact_mut(3)) {
                    p.copy_from_slice(&col[r * 3..r * 3 + 3]);
                }
            }
        }
    }
}

/// `dst[i] = clip8(HALF + Σ_t k[t]·strip[(xmin + t)·LANES + i])` for all [`LANES`] lanes.
fn weighted_lanes(strip: &[u8], xmin: usize, k: &[i32], dst: &mut [u8]) {
    let mut acc = [HALF; LANES];
    for (t, &kv) in k.iter().enumerate() {
        let col: &[u8; LANES] = strip[(xmin + t) * LANES..(xmin + t + 1) * LANES]
            .try_into()
            .expect("LANES bytes");
        for (a, &p) in acc.iter_mut().zip(col) {
            *a += p as i32 * kv;
        }
    }
    for (d, &a) in dst.iter_mut().zip(&acc) {
        *d = clip8(a);
    }
}

/// Horizontal pass over rows `y0..y0 + rows` of `src` (width `in_w`) into `out_w`-wide rows.
///
/// Rows are processed in strips of [`STRIP`]: a strip is first transposed so that the rows' RGB
/// values of one input column are [`LANES`] contiguous bytes; one filter tap is then a
/// [`LANES`]-wide multiply-add (vectorised like the vertical pass) instead of a 3-lane one per
/// pixel. The integer sums are exactly Pillow's; only the order of exact additions changes.
/// `simd`: use the AVX2 kernel (the caller checked the CPU has it).
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    y0: usize,
    rows: usize,
    c: &Coeffs,
    hp: &mut HPass,
    out: &mut [u8],
) {
    let out_w = c.bounds.len();
    assert_eq!(out.len(), out_w * rows * 3, "horizontal pass output size");
    let HPass {
        strip,
        out_strip,
        kernel,
    } = hp;
    strip.resize(in_w * LANES, 0);
    out_strip.resize(out_w * LANES, 0);
    for s0 in (0..rows).step_by(STRIP) {
        let sr = STRIP.min(rows - s0);
        load_strip(src, in_w, y0 + s0, sr, strip, kernel.simd);
        for (xx, dst) in out_strip.chunks_exact_mut(LANES).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            if !kernel.run(strip, LANES, xmin, k, &mut dst[..sr * 3]) {
                weighted_lanes(strip, xmin, k, dst);
            }
        }
        store_strip(out_strip, out_w, s0, sr, out, kernel.simd);
    }
}

/// The horizontal pass's scratch (transposed strips, split taps), kept across the chunks of
/// one resize.
struct HPass {
    strip: Vec<u8>,
    out_strip: Vec<u8>,
    kernel: Kernel,
}

impl HPass {
    fn new(simd: bool) -> Self {
        HPass {
            strip: Vec::new(),
            out_strip: Vec::new(),
            kernel: Kernel::new(simd),
        }
    }
}

/// Input rows the horizontal pass resamples at a time when both passes run (a multiple of
/// [`STRIP`]): the intermediate rows live in a window of about this many rows plus the
/// vertical filter's taps, which stays in the L2 cache, instead of a whole image's worth
/// going out to memory and back.
const CHUNK: usize = 64;

/// Both passes, the vertical one consuming the horizontal one's rows as they are made: the
/// window `tmp` holds intermediate rows `lo..hi`; output rows whose taps all lie in the
/// window are made, then rows no longer needed are dropped and the next [`CHUNK`] input rows
/// resampled. Every output row is the same sum as with a whole intermediate image.
fn both_passes(img: &RgbImage, horiz: &Coeffs, vert: &Coeffs, simd: bool, out: &mut Tiles) {
    let in_w = img.width as usize;
    let row = horiz.bounds.len() * 3;
    let end = |y: usize| vert.bounds[y].0 + vert.bounds[y].1;
    let out_h = vert.bounds.len();
    let last = end(out_h - 1);
    let mut tmp = vec![0u8; (vert.ksize + CHUNK) * row];
    let (mut hp, mut vp) = (HPass::new(simd), VPass::new(simd));
    let (mut lo, mut hi) = (vert.bounds[0].0, vert.bounds[0].0);
    let mut y = 0;
    while y < out_h {
        let mut ready = y;
        while ready < out_h && end(ready) <= hi {
            ready += 1;
        }
        if ready > y {
            vertical_pass(
                &tmp[..(hi - lo) * row],
                row / 3,
                vert,
                lo,
                &mut vp,
                out,
                y..ready,
            );
            y = ready;
            continue;
        }
        // Output row `y` needs rows past `hi`: keep its first row onwards, resample more.
        let keep = vert.bounds[y].0;
        tmp.copy_within((keep - lo) * row..(hi - lo) * row, 0);
        lo = keep;
        let n = CHUNK.min(last - hi);
        let at = (hi - lo) * row;
        horizontal_pass(
            &img.data,
            in_w,
            hi,
            n,
            horiz,
            &mut hp,
            &mut tmp[at..at + n * row],
        );
        hi += n;
    }
}

/// Vertical pass over output rows `rows`: each is a weighted sum of whole rows of `src` (which
/// holds input rows from `ybase` on), vectorisable, written where `out` wants it (`out` holds
/// the output image cut into tiles, see [`Tiles`]).
/// `simd`: use the AVX2 kernel (the caller checked the CPU has it).
fn vertical_pass(
    src: &[u8],
    width: usize,
    c: &Coeffs,
    ybase: usize,
    vp: &mut VPass,
    out: &mut Tiles,
    rows: std::ops::Range<usize>,
) {
    let stride = width * 3;
    let VPass {
        acc,
        scratch,
        kernel,
    } = vp;
    acc.resize(stride, 0);
    for yy in rows {
        let (ymin, n) = c.bounds[yy];
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        // A plain image takes the row in place; tiles take it through a row of scratch
        // (in the L1 cache) cut into their pieces.
        let out_row = match out.row_mut(yy) {
            Some(row) => row,
            None => {
                scratch.resize(stride, 0);
                &mut scratch[..]
            }
        };
        if !kernel.run(src, stride, ymin - ybase, k, out_row) {
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
        if out.cols > 1 {
            out.put_row(yy, scratch);
        }
    }
}

/// The vertical pass's scratch (accumulators, a row for tiles, split taps), kept across the
/// chunks of one resize.
struct VPass {
    acc: Vec<i32>,
    scratch: Vec<u8>,
    kernel: Kernel,
}

impl VPass {
    fn new(simd: bool) -> Self {
        VPass {
            acc: Vec::new(),
            scratch: Vec::new(),
            kernel: Kernel::new(simd),
        }
    }
}

/// An output image cut into a `cols` × `rows` grid of equal tiles, stored one tile after
/// another (row-major tile order), each tile row-major without padding: what the slicing
/// hands the model. A 1 × 1 grid is the plain image. Resizing straight into the tiles saves
/// the copy that cropping a resized image would make.
pub struct Tiles<'a> {
    out: &'a mut [u8],
    /// Size of the whole image.
    width: usize,
    height: usize,
    cols: usize,
    /// Rows of one tile.
    tile_h: usize,
}

impl<'a> Tiles<'a> {
    /// `out` for a `width` × `height` image cut into `cols` × `rows` tiles.
    ///
    /// # Panics
    /// If `out` is not `width · height · 3` bytes or the grid does not divide the image
    /// (callers derive both from a slicing plan).
    pub fn new(out: &'a mut [u8], width: u32, height: u32, cols: u32, rows: u32) -> Self {
        let (w, h, cols, rows) = (
            width as usize,
            height as usize,
            cols as usize,
            rows as usize,
        );
        assert_eq!(out.len(), w * h * 3, "tile buffer size");
        assert!(
            cols > 0 && rows > 0 && w.is_multiple_of(cols) && h.is_multiple_of(rows),
            "a {cols}x{rows} grid does not divide {w}x{h}"
        );
        Tiles {
            out,
            width: w,
            height: h,
            cols,
            tile_h: h / rows,
        }
    }

    /// Bytes of one row of the whole image.
    fn stride(&self) -> usize {
        self.width * 3
    }

    /// Output row `y` in place, when the image is not cut across its width.
    fn row_mut(&mut self, y: usize) -> Option<&mut [u8]> {
        let stride = self.stride();
        (self.cols == 1).then(|| &mut self.out[y * stride..(y + 1) * stride])
    }

    /// Writes the whole-width output row `y` into its tiles.
    fn put_row(&mut self, y: usize, row: &[u8]) {
        let seg = self.stride() / self.cols;
        let tile = self.tile_h * seg;
        let (band, r) = (y / self.tile_h, y % self.tile_h);
        for (c, piece) in row.chunks_exact(seg).enumerate() {
            let at = (band * self.cols + c) * tile + r * seg;
            self.out[at..at + seg].copy_from_slice(piece);
        }
    }

    /// Writes a whole plain image (`stride`-byte rows) into the tiles.
    fn put_image(&mut self, data: &[u8]) {
        if self.cols == 1 {
            self.out.copy_from_slice(data);
            return;
        }
        for (y, row) in data.chunks_exact(self.stride()).enumerate() {
            self.put_row(y, row);
        }
    }
}

/// Whether this CPU runs the SIMD kernel ([`avx2::weighted_rows`]).
fn have_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return true;
    }
    false
}

/// The SIMD kernel when enabled, with its scratch (the taps split for it).
struct Kernel {
    simd: bool,
    #[cfg(target_arch = "x86_64")]
    pairs: Vec<(i32, i32)>,
}

impl Kernel {
    fn new(simd: bool) -> Self {
        Self {
            simd: simd && have_simd(),
            #[cfg(target_arch = "x86_64")]
            pairs: Vec::new(),
        }
    }

    /// `out[i] = clip8(HALF + Σ_t k[t]·src[(first + t)·stride + i])` on the SIMD kernel;
    /// false (nothing written) when it is not enabled.
    #[allow(unused_variables)]
    fn run(&mut self, src: &[u8], stride: usize, first: usize, k: &[i32], out: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            avx2::split_pairs(k, &mut self.pairs);
            // SAFETY: `simd` is only set where the CPU has AVX2.
            unsafe { avx2::weighted_rows(src, stride, first, k, &self.pairs, out) };
            return true;
        }
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 kernels. Pillow's sum `HALF + Σ p·k` (p an 8-bit sample, k a 22-bit tap) is
    //! computed exactly with 16-bit multiplies by splitting every tap as `k = hi·2¹¹ + lo`
    //! (0 ≤ lo < 2¹¹; |k| < 2²³, so hi fits 16 bits): `Σ p·k = 2¹¹·Σ p·hi + Σ p·lo`, two sums
    //! of 16-bit products (`vpmaddwd` multiplies two taps' pairs and adds them into 32 bits),
    //! none of which can overflow; the result is the same integer, so the same bytes. The
    //! horizontal pass's transpositions move 16 × 16 pixel blocks as 32-bit words.

    use std::arch::x86_64::*;

    use super::{BLOCK, HALF, LANES, PRECISION_BITS};

    const LO_BITS: i32 = 11;

    /// Two taps as the 32-bit lane pattern `vpmaddwd` wants: `(a, b)` as two 16-bit halves.
    fn pair(a: i32, b: i32) -> i32 {
        (a as u16 as u32 | ((b as u16 as u32) << 16)) as i32
    }

    /// Per pair of taps: (lo halves, hi halves) lane patterns.
    pub(super) fn split_pairs(k: &[i32], out: &mut Vec<(i32, i32)>) {
        out.clear();
        for t in k.chunks(2) {
            let (a, b) = (t[0], t.get(1).copied().unwrap_or(0));
            let lo = |v: i32| v & ((1 << LO_BITS) - 1);
            let hi = |v: i32| v >> LO_BITS;
            out.push((pair(lo(a), lo(b)), pair(hi(a), hi(b))));
        }
    }

    /// 4 RGB pixels (12 bytes at the start, or at byte 4 with `HI`) -> 4 words `R G B 0`.
    const EXPAND: [i8; 16] = [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1];
    const EXPAND_HI: [i8; 16] = [4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1];
    /// The inverse of `EXPAND`: 4 words -> 12 bytes (the last 4 zero).
    const COMPRESS: [i8; 16] = [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1];

    #[target_feature(enable = "avx2")]
    unsafe fn mask(m: [i8; 16]) -> __m128i {
        _mm_loadu_si128(m.as_ptr() as *const __m128i)
    }

    /// Transposes 4 × 4 words: `v[i]` = row i -> `v[j]` = column j.
    #[target_feature(enable = "avx2")]
    unsafe fn transpose4(v: [__m128i; 4]) -> [__m128i; 4] {
        let t0 = _mm_unpacklo_epi32(v[0], v[1]);
        let t1 = _mm_unpacklo_epi32(v[2], v[3]);
        let t2 = _mm_unpackhi_epi32(v[0], v[1]);
        let t3 = _mm_unpackhi_epi32(v[2], v[3]);
        [
            _mm_unpacklo_epi64(t0, t1),
            _mm_unpackhi_epi64(t0, t1),
            _mm_unpacklo_epi64(t2, t3),
            _mm_unpackhi_epi64(t2, t3),
        ]
    }

    /// Stores the first 12 bytes of `v` at `dst`.
    #[target_feature(enable = "avx2")]
    unsafe fn store12(dst: *mut u8, v: __m128i) {
        _mm_storel_epi64(dst as *mut __m128i, v);
        std::ptr::write_unaligned(dst.add(8) as *mut i32, _mm_extract_epi32(v, 2));
    }

    /// Loads 12 bytes from `src` into the low bytes of a vector.
    #[target_feature(enable = "avx2")]
    unsafe fn load12(src: *const u8) -> __m128i {
        let lo = _mm_loadl_epi64(src as *const __m128i);
        _mm_insert_epi32(lo, std::ptr::read_unaligned(src.add(8) as *const i32), 2)
    }

    /// [`super::load_strip`] of one full block: rows `r0..r0 + 16` (of `rows`, `w3` bytes
    /// apart), pixels `x0..x0 + 16`, into strip columns `x0..x0 + 16`, lanes from `r0 * 3`.
    /// Each pixel travels as a 32-bit word through 4 × 4 word transposes.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn load_block(
        rows: &[u8],
        w3: usize,
        r0: usize,
        x0: usize,
        strip: &mut [u8],
    ) {
        assert!((r0 + BLOCK - 1) * w3 + (x0 + BLOCK) * 3 <= rows.len());
        assert!((x0 + BLOCK) * LANES <= strip.len() && (r0 + BLOCK) * 3 <= LANES);
        let (expand, expand_hi, compress) = (mask(EXPAND), mask(EXPAND_HI), mask(COMPRESS));
        for g in 0..BLOCK / 4 {
            // words[q][i]: row r0 + 4g + i, pixels x0 + 4q..x0 + 4q + 4.
            let mut words = [[_mm_setzero_si128(); 4]; 4];
            // (Indexing, not iterators: closures would not inherit the AVX2 target feature.)
            #[allow(clippy::needless_range_loop)]
            for i in 0..4 {
                // SAFETY: the 48 bytes of the block's row are inside `rows` (asserted).
                let p = rows.as_ptr().add((r0 + 4 * g + i) * w3 + x0 * 3);
                words[0][i] = _mm_shuffle_epi8(_mm_loadu_si128(p as *const __m128i), expand);
                words[1][i] = _mm_shuffle_epi8(_mm_loadu_si128(p.add(12) as *const _), expand);
                words[2][i] = _mm_shuffle_epi8(_mm_loadu_si128(p.add(24) as *const _), expand);
                words[3][i] = _mm_shuffle_epi8(_mm_loadu_si128(p.add(32) as *const _), expand_hi);
            }
            for (q, quad) in words.into_iter().enumerate() {
                for (j, col) in transpose4(quad).into_iter().enumerate() {
                    let x = x0 + 4 * q + j;
                    // SAFETY: column x's lanes (r0 + 4g) * 3 .. + 12 are inside `strip`.
                    let dst = strip.as_mut_ptr().add(x * LANES + (r0 + 4 * g) * 3);
                    store12(dst, _mm_shuffle_epi8(col, compress));
                }
            }
        }
    }

    /// [`super::store_strip`] of one full block: strip columns `x0..x0 + 16`, lanes from
    /// `r0 * 3`, into rows `r0..r0 + 16` (of `rows`, `w3` bytes apart), pixels `x0..x0 + 16`.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn store_block(
        strip: &[u8],
        r0: usize,
        x0: usize,
        rows: &mut [u8],
        w3: usize,
    ) {
        assert!((r0 + BLOCK - 1) * w3 + (x0 + BLOCK) * 3 <= rows.len());
        assert!((x0 + BLOCK) * LANES <= strip.len() && (r0 + BLOCK) * 3 <= LANES);
        let (expand, compress) = (mask(EXPAND), mask(COMPRESS));
        for g in 0..BLOCK / 4 {
            for q in 0..4 {
                // cols[j]: pixel x0 + 4q + j of rows r0 + 4g..r0 + 4g + 4, as words.
                let mut cols = [_mm_setzero_si128(); 4];
                for (j, c) in cols.iter_mut().enumerate() {
                    // SAFETY: column x's lanes (r0 + 4g) * 3 .. + 12 are inside `strip`.
                    let p = strip
                        .as_ptr()
                        .add((x0 + 4 * q + j) * LANES + (r0 + 4 * g) * 3);
                    *c = _mm_shuffle_epi8(load12(p), expand);
                }
                for (i, row) in transpose4(cols).into_iter().enumerate() {
                    // SAFETY: the block's pixels of this row are inside `rows` (asserted).
                    let dst = rows
                        .as_mut_ptr()
                        .add((r0 + 4 * g + i) * w3 + (x0 + 4 * q) * 3);
                    store12(dst, _mm_shuffle_epi8(row, compress));
                }
            }
        }
    }

    /// `out[i] = clip8(HALF + Σ_t k[t]·src[(first + t)·stride + i])`: one output row of the
    /// vertical pass, or one output column of a transposed strip in the horizontal pass.
    /// `pairs` is `split_pairs(k)`.
    ///
    /// # Safety
    /// AVX2 must be available.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn weighted_rows(
        src: &[u8],
        stride: usize,
        first: usize,
        k: &[i32],
        pairs: &[(i32, i32)],
        out: &mut [u8],
    ) {
        let n = k.len();
        let len = out.len();
        if n == 0 {
            out.fill(super::clip8(HALF));
            return;
        }
        assert!(len <= stride && (first + n - 1) * stride + len <= src.len());
        assert_eq!(pairs.len(), n.div_ceil(2));
        let base = src.as_ptr().add(first * stride);
        let half = _mm256_set1_epi32(HALF);
        let zero = _mm_setzero_si128();
        let mut i = 0;
        while i + 16 <= len {
            let (mut l0, mut h0) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            let (mut l1, mut h1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (j, &(lo, hi)) in pairs.iter().enumerate() {
                let t = 2 * j;
                // SAFETY: rows first..first + n lie in `src` (asserted), i + 16 <= len.
                let a = _mm_loadu_si128(base.add(t * stride + i) as *const __m128i);
                let b = if t + 1 < n {
                    _mm_loadu_si128(base.add((t + 1) * stride + i) as *const __m128i)
                } else {
                    zero
                };
                let x0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
                let x1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
                let (klo, khi) = (_mm256_set1_epi32(lo), _mm256_set1_epi32(hi));
                l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(x0, klo));
                h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(x0, khi));
                l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(x1, klo));
                h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(x1, khi));
            }
            let s0 = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h0, LO_BITS), l0), half);
            let s1 = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(h1, LO_BITS), l1), half);
            // Pillow's clip8: after the shift every sum fits 16 bits; the two packs saturate
            // negative ones to 0 and those past 255 to 255.
            let s0 = _mm256_srai_epi32(s0, PRECISION_BITS as i32);
            let s1 = _mm256_srai_epi32(s1, PRECISION_BITS as i32);
            // packs works per 128-bit half: [s0 0..4, s1 0..4 | s0 4..8, s1 4..8] -> reorder.
            let w = _mm256_permute4x64_epi64(_mm256_packs_epi32(s0, s1), 0b11_01_10_00);
            let bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, bytes);
            i += 16;
        }
        for (o, idx) in out[i..].iter_mut().zip(i..) {
            let mut acc = HALF;
            for (t, &kv) in k.iter().enumerate() {
                acc += src[(first + t) * stride + idx] as i32 * kv;
            }
            *o = super::clip8(acc);
        }
    }
}

/// Resizes `img` to `out_w` × `out_h` exactly as Pillow's `Image.resize(size, BICUBIC)` does for
/// an RGB image. Returns a copy when the size is unchanged (as Pillow does).
///
/// # Panics
/// If the output size has a zero side.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    assert!(out_w > 0 && out_h > 0, "resize to an empty size");
    let mut data = vec![0u8; out_w as usize * out_h as usize * 3];
    resize_bicubic_into(img, Tiles::new(&mut data, out_w, out_h, 1, 1));
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// [`resize_bicubic`] into `out` (its size is the output size), cut into `out`'s tiles: the
/// bytes of `resize_bicubic(img, w, h)` cropped tile by tile, without the whole image in
/// between.
///
/// # Panics
/// If the output size has a zero side.
pub fn resize_bicubic_into(img: &RgbImage, mut out: Tiles) {
    let (in_w, in_h) = (img.width as usize, img.height as usize);
    let (out_w, out_h) = (out.width, out.height);
    assert!(out_w > 0 && out_h > 0, "resize to an empty size");
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    if !need_h && !need_v {
        out.put_image(&img.data);
        return;
    }
    let vert = precompute(in_h, out_h);
    if !need_h {
        let vp = &mut VPass::new(true);
        vertical_pass(&img.data, in_w, &vert, 0, vp, &mut out, 0..out_h);
        return;
    }
    let horiz = precompute(in_w, out_w);
    if need_v {
        both_passes(img, &horiz, &vert, true, &mut out);
        return;
    }
    let mut hp = HPass::new(true);
    if out.cols == 1 {
        horizontal_pass(&img.data, in_w, 0, in_h, &horiz, &mut hp, out.out);
    } else {
        let mut tmp = vec![0u8; out_w * in_h * 3];
        horizontal_pass(&img.data, in_w, 0, in_h, &horiz, &mut hp, &mut tmp);
        out.put_image(&tmp);
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

    /// A `w` × `h` test image of hashed bytes with runs of 0 and 255 next to each other (the
    /// largest overshoots of the cubic filter).
    fn test_image(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| match (i / 5) % 7 {
                0 => 0,
                1 => 255,
                _ => ((i * 2654435761usize) >> 7) as u8,
            })
            .collect();
        RgbImage::from_raw(w as u32, h as u32, data).unwrap()
    }

    /// The SIMD kernel (where the CPU has it) and the portable loops give the same bytes.
    #[test]
    fn dispatched_and_portable_passes_agree() {
        let (w, h) = (157usize, 61usize);
        let src = test_image(w, h).data;
        // Down- and up-scaling (negative lobes push sums past both ends of clip8), few and
        // many taps, widths with and without a tail past the 16-byte blocks.
        for (ow, oh) in [(40, 23), (300, 100), (157, 30), (3, 61), (1, 1), (158, 200)] {
            let hc = precompute(w, ow);
            let horizontal = |simd| {
                let mut out = vec![0u8; ow * h * 3];
                horizontal_pass(&src, w, 0, h, &hc, &mut HPass::new(simd), &mut out);
                out
            };
            assert_eq!(horizontal(true), horizontal(false));
            let vc = precompute(h, oh);
            let vertical = |simd| {
                let mut out = vec![0u8; w * oh * 3];
                let tiles = &mut Tiles::new(&mut out, w as u32, oh as u32, 1, 1);
                vertical_pass(&src, w, &vc, 0, &mut VPass::new(simd), tiles, 0..oh);
                out
            };
            assert_eq!(vertical(true), vertical(false));
        }
    }

    /// Resizing into tiles gives the resized image cropped tile by tile, for every kind of
    /// resize (both passes, one of them, none).
    #[test]
    fn tiles_are_the_crops_of_the_resized_image() {
        // Taller than CHUNK, so tiles are also cut across the chunks of the two passes.
        let img = test_image(60, 150);
        for (ow, oh, cols, rows) in [
            (40, 96, 2, 3),    // both passes
            (120, 150, 2, 3),  // horizontal only
            (60, 300, 2, 2),   // vertical only
            (60, 150, 3, 5),   // no resize
            (90, 90, 3, 3),    // both, upscaling across, downscaling down
            (40, 24, 1, 1),    // the plain image
            (60, 150, 60, 75), // single pixels, two rows
        ] {
            let whole = resize_bicubic(&img, ow, oh);
            let (tw, th) = (ow / cols, oh / rows);
            let mut want = Vec::new();
            for r in 0..rows {
                for c in 0..cols {
                    want.extend(whole.crop(c * tw, r * th, tw, th).data);
                }
            }
            let mut got = vec![0u8; want.len()];
            resize_bicubic_into(&img, Tiles::new(&mut got, ow, oh, cols, rows));
            assert!(got == want, "{ow}x{oh} in {cols}x{rows} tiles");
        }
    }

    /// The chunked two-pass resize gives the bytes of a whole intermediate image followed by
    /// the vertical pass (Pillow's order), across chunk boundaries, for down- and up-scaling.
    #[test]
    fn chunked_passes_are_the_whole_image_passes() {
        let (w, h) = (83usize, 301usize);
        let img = test_image(w, h);
        for (ow, oh) in [
            (40, 150),
            (61, 37),
            (120, 600),
            (82, 300),
            (7, 5),
            (166, 64),
        ] {
            let (hc, vc) = (precompute(w, ow), precompute(h, oh));
            let first = vc.bounds[0].0;
            let last = vc.bounds[oh - 1].0 + vc.bounds[oh - 1].1;
            let mut tmp = vec![0u8; ow * (last - first) * 3];
            let hp = &mut HPass::new(true);
            horizontal_pass(&img.data, w, first, last - first, &hc, hp, &mut tmp);
            let mut want = vec![0u8; ow * oh * 3];
            let whole = &mut Tiles::new(&mut want, ow as u32, oh as u32, 1, 1);
            vertical_pass(&tmp, ow, &vc, first, &mut VPass::new(true), whole, 0..oh);
            let got = resize_bicubic(&img, ow as u32, oh as u32);
            assert!(got.data == want, "{ow}x{oh}");
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
