//! The reference's adaptive "UHD" slicing: an overview image plus a grid of slices.
//!
//! Every number here is computed exactly as the Python reference does it (spec §2): IEEE f64,
//! Python 3 `round` (half to even), `int()` truncation, candidate grids in the reference's order
//! and a strict `<` on the log-ratio error, so that floating-point rounding breaks apparent ties
//! the same way (a 1024×1024 image gets a 3×2 grid, not 2×3).

use crate::resize::{resize_bicubic, resize_bicubic_into, Tiles};
use crate::rgb::RgbImage;

/// The three knobs of the slicing (from the checkpoint's config, overridable on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceConfig {
    /// Upper bound on the number of slices per image (`max_slice_nums`, 9 in the released models).
    pub max_slice_nums: u32,
    /// Target side of the overview and of each slice, in pixels (`scale_resolution`, 448).
    pub scale_resolution: u32,
    /// Vision patch size; every output side is a multiple of it (`patch_size`, 14).
    pub patch_size: u32,
}

impl Default for SliceConfig {
    fn default() -> Self {
        Self {
            max_slice_nums: 9,
            scale_resolution: 448,
            patch_size: 14,
        }
    }
}

/// What the slicing does to one image, in sizes only (no pixels): enough to count tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlicePlan {
    /// Size (width, height) of the overview image the whole picture is resized to.
    pub source: (u32, u32),
    /// `Some((columns, rows))` when the image is sliced.
    pub grid: Option<(u32, u32)>,
    /// Size the original is resized to before being cut into the grid (only when sliced).
    pub refine: Option<(u32, u32)>,
}

impl SlicePlan {
    /// Size of each slice, when the image is sliced.
    pub fn slice_size(&self) -> Option<(u32, u32)> {
        match (self.grid, self.refine) {
            (Some((cols, rows)), Some((w, h))) => Some((w / cols, h / rows)),
            _ => None,
        }
    }

    /// Number of images the model receives for this picture: the overview plus the slices.
    pub fn num_images(&self) -> usize {
        1 + self.grid.map_or(0, |(c, r)| (c * r) as usize)
    }

    /// Sizes (width, height) of every output image in model order: overview, then slices
    /// row-major.
    pub fn image_sizes(&self) -> Vec<(u32, u32)> {
        let mut out = vec![self.source];
        if let Some(s) = self.slice_size() {
            out.extend(std::iter::repeat_n(s, self.num_images() - 1));
        }
        out
    }
}

/// `max(round(len / p) * p, p)` with Python's half-to-even rounding on a true division.
fn ensure_divide(len: f64, p: u32) -> u32 {
    let p_f = p as f64;
    let v = (len / p_f).round_ties_even() * p_f;
    (v as u32).max(p)
}

/// The reference's `find_best_resize`: scale to about `s²` pixels keeping the aspect ratio
/// (always when `allow_upscale`, otherwise only when the image is larger than `s²`), then snap
/// both sides to multiples of the patch size.
fn find_best_resize(w: f64, h: f64, s: u32, p: u32, allow_upscale: bool) -> (u32, u32) {
    let (mut w, mut h) = (w, h);
    if w * h > (s as f64) * (s as f64) || allow_upscale {
        let r = w / h;
        let new_h = ((s as f64) / r.sqrt()).trunc();
        let new_w = (new_h * r).trunc();
        h = new_h;
        w = new_w;
    }
    (ensure_divide(w, p), ensure_divide(h, p))
}

/// The reference's `get_refine_size`: the size the original is resized to so that each grid
/// cell is a well-sized, patch-aligned slice.
fn get_refine_size(w: u32, h: u32, grid: (u32, u32), s: u32, p: u32) -> (u32, u32) {
    let (gx, gy) = grid;
    let rw = ensure_divide(w as f64, gx);
    let rh = ensure_divide(h as f64, gy);
    let cell_w = rw as f64 / gx as f64;
    let cell_h = rh as f64 / gy as f64;
    let (cw, ch) = find_best_resize(cell_w, cell_h, s, p, true);
    (cw * gx, ch * gy)
}

/// Computes the slicing plan for an image of `width` × `height` pixels.
///
/// Both sides must be at least 1 (a decoder never yields an empty image).
pub fn plan_slices(width: u32, height: u32, cfg: &SliceConfig) -> SlicePlan {
    let (w, h) = (width as f64, height as f64);
    let s = cfg.scale_resolution;
    let p = cfg.patch_size;
    let log_ratio = (w / h).ln();
    let ratio = w * h / ((s as f64) * (s as f64));
    let multiple = (ratio.ceil() as u64).min(cfg.max_slice_nums as u64) as u32;

    if multiple <= 1 {
        return SlicePlan {
            source: find_best_resize(w, h, s, p, true),
            grid: None,
            refine: None,
        };
    }

    let mut best = (1u32, 1u32);
    let mut min_error = f64::INFINITY;
    for n in [multiple - 1, multiple, multiple + 1] {
        if n == 1 || n > cfg.max_slice_nums {
            continue;
        }
        for m in 1..=n {
            if n % m != 0 {
                continue;
            }
            let grid = (m, n / m);
            // The quotient is a float division of the two integers, as in the reference; taking
            // ln(m) - ln(k) instead changes which of two "equal" grids wins.
            let error = (log_ratio - (grid.0 as f64 / grid.1 as f64).ln()).abs();
            if error < min_error {
                best = grid;
                min_error = error;
            }
        }
    }

    SlicePlan {
        source: find_best_resize(w, h, s, p, false),
        grid: Some(best),
        refine: Some(get_refine_size(width, height, best, s, p)),
    }
}

/// The pixels of one sliced picture: the overview and the slices in row-major order.
#[derive(Clone, Debug)]
pub struct SlicedImage {
    pub plan: SlicePlan,
    /// Overview first, then slices row by row, left to right.
    pub images: Vec<RgbImage>,
}

/// Resizes and cuts `image` according to its plan, as the reference's `slice_image` does: the
/// overview and the refine image are both resized from the original (not from each other).
pub fn slice_image(image: &RgbImage, cfg: &SliceConfig) -> SlicedImage {
    let plan = plan_slices(image.width, image.height, cfg);
    let mut images = Vec::with_capacity(plan.num_images());
    images.push(resize_bicubic(image, plan.source.0, plan.source.1));
    if let (Some((cols, rows)), Some((rw, rh))) = (plan.grid, plan.refine) {
        let refine = resize_bicubic(image, rw, rh);
        let (sw, sh) = (rw / cols, rh / rows);
        for r in 0..rows {
            for c in 0..cols {
                images.push(refine.crop(c * sw, r * sh, sw, sh));
            }
        }
    }
    SlicedImage { plan, images }
}

/// [`slice_image`]'s pixels appended to `out`, image after image (overview first, then the
/// slices row by row), each u8 RGB row-major: the layout of a shard's pixel column. The slices
/// are resized straight into place (no refine image cropped afterwards). Returns the plan,
/// whose [`SlicePlan::image_sizes`] give each image's size.
pub fn slice_image_into(image: &RgbImage, cfg: &SliceConfig, out: &mut Vec<u8>) -> SlicePlan {
    let plan = plan_slices(image.width, image.height, cfg);
    let mut place = |(w, h): (u32, u32), (cols, rows): (u32, u32)| {
        let at = out.len();
        out.resize(at + w as usize * h as usize * 3, 0);
        resize_bicubic_into(image, Tiles::new(&mut out[at..], w, h, cols, rows));
    };
    place(plan.source, (1, 1));
    if let (Some(grid), Some(refine)) = (plan.grid, plan.refine) {
        place(refine, grid);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(w: u32, h: u32) -> SlicePlan {
        plan_slices(w, h, &SliceConfig::default())
    }

    /// The worked examples A–H of spec §2.4.
    #[test]
    fn spec_worked_examples() {
        type Case = (u32, u32, Option<(u32, u32)>, (u32, u32), Option<(u32, u32)>);
        let cases: &[Case] = &[
            (448, 448, None, (448, 448), None),
            (300, 200, None, (546, 364), None),
            (1024, 768, Some((2, 2)), (518, 392), Some((1036, 784))),
            (1024, 1024, Some((3, 2)), (448, 448), Some((1092, 1092))),
            (1920, 1080, Some((4, 2)), (602, 336), Some((1680, 952))),
            (612, 612, Some((1, 2)), (448, 448), Some((630, 644))),
            (1000, 250, Some((3, 1)), (896, 224), Some((1554, 392))),
            (100, 170, None, (336, 588), None),
        ];
        for &(w, h, grid, source, refine) in cases {
            let p = plan(w, h);
            assert_eq!(p.grid, grid, "{w}x{h} grid");
            assert_eq!(p.source, source, "{w}x{h} source");
            assert_eq!(p.refine, refine, "{w}x{h} refine");
        }
        assert_eq!(plan(1024, 1024).slice_size(), Some((364, 546)));
        assert_eq!(plan(1920, 1080).slice_size(), Some((420, 476)));
        assert_eq!(plan(1920, 1080).num_images(), 9);
    }

    /// The appended bytes are [`slice_image`]'s images, in order, for sliced and unsliced
    /// pictures.
    #[test]
    fn slices_appended_in_place_are_slice_image_s() {
        for (w, h) in [(1920u32, 1080u32), (300, 200), (1000, 250), (612, 612)] {
            let data = (0..w * h * 3)
                .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
                .collect();
            let img = RgbImage::from_raw(w, h, data).unwrap();
            let cfg = SliceConfig::default();
            let want: Vec<u8> = slice_image(&img, &cfg)
                .images
                .into_iter()
                .flat_map(|i| i.data)
                .collect();
            let mut got = vec![9u8; 5];
            let plan = slice_image_into(&img, &cfg, &mut got);
            assert_eq!(plan, plan_slices(w, h, &cfg));
            assert_eq!(&got[..5], &[9; 5], "what was there is kept");
            assert!(got[5..] == want[..], "{w}x{h}");
        }
    }

    #[test]
    fn half_to_even_rounding_is_used() {
        // 343 / 14 = 24.5 rounds to 24 (half-up would give 25 → 350).
        assert_eq!(ensure_divide(343.0, 14), 336);
        assert_eq!(ensure_divide(357.0, 14), 364); // 25.5 → 26
        assert_eq!(ensure_divide(3.0, 14), 14); // never below one patch
    }

    #[test]
    fn one_slice_cap_downscales_large_images() {
        let cfg = SliceConfig {
            max_slice_nums: 1,
            ..Default::default()
        };
        let p = plan_slices(1920, 1080, &cfg);
        assert_eq!(p.grid, None);
        assert_eq!(p.source, (602, 336));
    }
}
