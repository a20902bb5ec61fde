//! Image inputs of the vision towers: pixel slices cut into flattened patches on the host,
//! kept as u8 until they reach the device (a quarter of the bytes of f32 to copy), where a
//! 256-entry table gives each value its exact reference normalisation.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The values of an image's patches, in patch order.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// Raw u8 values (the shard format), normalised on the device by [`normalise`].
    U8(Vec<u8>),
    /// Already normalised values.
    F32(Vec<f32>),
}

/// One image slice as the vision tower consumes it: `ph × pw` patches, each flattened in the
/// order of the patch-embedding weight `[out, 3, p, p]` (channel, row, column).
/// Patches are row-major, which is also the order of the reference's patch strips (spec §5).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    pub ph: usize,
    pub pw: usize,
    pub patch: usize,
    /// `[ph·pw, 3·patch·patch]` values.
    pub pixels: Pixels,
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
        let px = patch_order(h, w, patch, |c, y, x| data[c * h * w + y * w + x]);
        Ok(Self::of(h, w, patch, Pixels::F32(px)))
    }

    /// From u8 RGB in HWC layout (the shard format); normalised later, on the device.
    pub fn from_hwc_u8(data: &[u8], h: usize, w: usize, patch: usize) -> Result<Self> {
        Self::check(h, w, patch, data.len())?;
        let px = patch_order(h, w, patch, |c, y, x| data[(y * w + x) * 3 + c]);
        Ok(Self::of(h, w, patch, Pixels::U8(px)))
    }

    fn of(h: usize, w: usize, patch: usize, pixels: Pixels) -> Self {
        ImageInput {
            ph: h / patch,
            pw: w / patch,
            patch,
            pixels,
        }
    }

    /// The normalised values on the host (what the device computes from u8 pixels).
    pub fn normalised(&self) -> Vec<f32> {
        match &self.pixels {
            Pixels::U8(v) => v.iter().map(|&u| normalise(u)).collect(),
            Pixels::F32(v) => v.clone(),
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

/// Reorders an image's values (`px(channel, row, column)`) into patch order: row-major patches,
/// each flattened channel, row, column.
fn patch_order<T>(h: usize, w: usize, p: usize, px: impl Fn(usize, usize, usize) -> T) -> Vec<T> {
    let (ph, pw) = (h / p, w / p);
    let mut out = Vec::with_capacity(3 * h * w);
    for r in 0..ph {
        for c in 0..pw {
            for ch in 0..3 {
                for ky in 0..p {
                    for kx in 0..p {
                        out.push(px(ch, r * p + ky, c * p + kx));
                    }
                }
            }
        }
    }
    out
}

/// Stacks the images' patches into `[n, l_max, 3·p·p]` of `dtype` on `device`, zero-padded
/// after each image's last patch.
///
/// When every image holds u8 values, only those bytes are copied to the device; a 256-entry
/// table (the reference normalisation of each value, computed in f32 on the host) is indexed
/// there, so the result is bit-identical to normalising on the host.
pub fn stack_patches(
    images: &[ImageInput],
    l_max: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = images.len();
    let dim = images.first().map_or(0, |i| 3 * i.patch * i.patch);
    let all_u8 = images.iter().all(|i| matches!(i.pixels, Pixels::U8(_)));
    if !all_u8 || n == 0 || dim == 0 {
        let mut data = vec![0f32; n * l_max * dim];
        for (i, im) in images.iter().enumerate() {
            let v = im.normalised();
            data[i * l_max * dim..i * l_max * dim + v.len()].copy_from_slice(&v);
        }
        return Ok(Tensor::from_vec(data, (n, l_max, dim), device)?.to_dtype(dtype)?);
    }
    let total: usize = images.iter().map(ImageInput::len).sum();
    let mut bytes = Vec::with_capacity(total * dim);
    for im in images {
        if let Pixels::U8(v) = &im.pixels {
            bytes.extend_from_slice(v);
        }
    }
    let lut: Vec<f32> = (0..=255u8).map(normalise).collect();
    let lut = Tensor::from_vec(lut, 256, device)?.to_dtype(dtype)?;
    // Widened to u32 on the device: candle's index_select reads the largest value of the index
    // type (255 for u8) as "no row" and returns zeros for it.
    let ids = Tensor::from_vec(bytes, total * dim, device)?.to_dtype(DType::U32)?;
    let x = lut.index_select(&ids, 0)?.reshape((total, dim))?;
    if total == n * l_max {
        return Ok(x.reshape((n, l_max, dim))?);
    }
    // Padded slots point at an appended zero row.
    let x = Tensor::cat(&[&x, &Tensor::zeros((1, dim), dtype, device)?], 0)?;
    let mut rows = Vec::with_capacity(n * l_max);
    let mut start = 0u32;
    for im in images {
        let len = im.len() as u32;
        rows.extend(start..start + len);
        rows.extend(std::iter::repeat_n(total as u32, l_max - len as usize));
        start += len;
    }
    let rows = Tensor::from_vec(rows, n * l_max, device)?;
    Ok(x.index_select(&rows, 0)?.reshape((n, l_max, dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(h: usize, w: usize, seed: u8) -> Vec<u8> {
        (0..h * w * 3)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn device_normalisation_equals_the_host_path() {
        // Every u8 value occurs (255 included, which candle's index_select would read as "no
        // row" were it the index type).
        assert_eq!(
            image(16, 16, 0)
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            256
        );
        // Two sizes (so one is padded) plus an equal-size batch, in f32 and bf16.
        for sizes in [vec![(28, 42), (14, 28)], vec![(28, 28), (28, 28)]] {
            let u8s: Vec<ImageInput> = sizes
                .iter()
                .enumerate()
                .map(|(k, &(h, w))| {
                    ImageInput::from_hwc_u8(&image(h, w, k as u8), h, w, 14).unwrap()
                })
                .collect();
            let f32s: Vec<ImageInput> = u8s
                .iter()
                .map(|im| ImageInput {
                    pixels: Pixels::F32(im.normalised()),
                    ..im.clone()
                })
                .collect();
            let l_max = u8s.iter().map(ImageInput::len).max().unwrap();
            for dt in [DType::F32, DType::BF16] {
                let a = stack_patches(&u8s, l_max, dt, &Device::Cpu).unwrap();
                let b = stack_patches(&f32s, l_max, dt, &Device::Cpu).unwrap();
                assert_eq!(a.dims(), &[2, l_max, 3 * 14 * 14]);
                let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                let bad = a
                    .iter()
                    .zip(&b)
                    .position(|(x, y)| x.to_bits() != y.to_bits());
                assert!(
                    bad.is_none(),
                    "{sizes:?} {dt:?}: first difference at {bad:?} of {}: {:?} vs {:?}",
                    a.len(),
                    bad.map(|i| a[i]),
                    bad.map(|i| b[i])
                );
                // The padding is zeros, not normalised zeros (-1).
                if sizes[0] != sizes[1] {
                    assert!(a[(l_max + 2) * 588..].iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    #[test]
    fn u8_and_chw_inputs_give_the_same_values() {
        let (h, w) = (28, 42);
        let hwc = image(h, w, 7);
        let mut chw = vec![0f32; 3 * h * w];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    chw[c * h * w + y * w + x] = normalise(hwc[(y * w + x) * 3 + c]);
                }
            }
        }
        let a = ImageInput::from_hwc_u8(&hwc, h, w, 14).unwrap();
        let b = ImageInput::from_chw(&chw, h, w, 14).unwrap();
        assert_eq!((a.ph, a.pw), (2, 3));
        assert_eq!(a.normalised(), b.normalised());
    }
}
