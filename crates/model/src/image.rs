//! Image inputs of the vision towers: pixel slices cut into flattened patches on the host.

use crate::error::{ModelError, Result};

/// One image slice as the vision tower consumes it: `ph × pw` patches, each flattened in the
/// order of the patch-embedding weight `[out, 3, p, p]` (channel, row, column), normalised.
/// Patches are row-major, which is also the order of the reference's patch strips (spec §5).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    pub ph: usize,
    pub pw: usize,
    pub patch: usize,
    /// `[ph·pw, 3·patch·patch]`
    pub patches: Vec<f32>,
}

/// The reference normalisation `((u/255) − 0.5)/0.5` in f32 (spec §5).
pub fn normalise(u: u8) -> f32 {
    ((u as f32) / 255f32 - 0.5f32) / 0.5f32
}

impl ImageInput {
    fn check(h: usize, w: usize, patch: usize, len: usize) -> Result<()> {
        if patch == 0 || h == 0 || w == 0 || !h.is_multiple_of(patch) || !w.is_multiple_of(patch) {
            return Err(ModelError::Batch(format!(
                "image {h}x{w} is not a positive multiple of the patch size {patch}"
            )));
        }
        if len != 3 * h * w {
            return Err(ModelError::Batch(format!(
                "image {h}x{w} needs {} values, got {len}",
                3 * h * w
            )));
        }
        Ok(())
    }

    /// From normalised f32 pixels in CHW layout.
    pub fn from_chw(data: &[f32], h: usize, w: usize, patch: usize) -> Result<Self> {
        Self::check(h, w, patch, data.len())?;
        Ok(Self::build(h, w, patch, |c, y, x| {
            data[c * h * w + y * w + x]
        }))
    }

    /// From u8 RGB in HWC layout (the shard format), normalised here.
    pub fn from_hwc_u8(data: &[u8], h: usize, w: usize, patch: usize) -> Result<Self> {
        Self::check(h, w, patch, data.len())?;
        let lut: Vec<f32> = (0..=255u8).map(normalise).collect();
        Ok(Self::build(h, w, patch, |c, y, x| {
            lut[data[(y * w + x) * 3 + c] as usize]
        }))
    }

    fn build(h: usize, w: usize, p: usize, px: impl Fn(usize, usize, usize) -> f32) -> Self {
        let (ph, pw) = (h / p, w / p);
        let mut patches = Vec::with_capacity(3 * h * w);
        for r in 0..ph {
            for c in 0..pw {
                for ch in 0..3 {
                    for ky in 0..p {
                        for kx in 0..p {
                            patches.push(px(ch, r * p + ky, c * p + kx));
                        }
                    }
                }
            }
        }
        ImageInput {
            ph,
            pw,
            patch: p,
            patches,
        }
    }

    /// Number of patches.
    pub fn len(&self) -> usize {
        self.ph * self.pw
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
