//! Seeded synthetic batches shaped like real ones (placeholder runs, packed samples, images
//! of several sizes), for tests and benchmarks that need model inputs without a data set.

use crate::config::ModelConfig;
use crate::image::ImageInput;
use crate::linear::Rng;
use crate::model::Batch;

/// A batch of `rows` rows; each row packs `samples` samples of `text` text tokens plus one
/// image per sample (image `k` is `sizes[k % sizes.len()]` patches, `(h, w)`); tokens and
/// labels are random (prompt tokens and placeholders unsupervised).
pub fn batch(
    cfg: &ModelConfig,
    rows: usize,
    samples: usize,
    text: usize,
    sizes: &[(usize, usize)],
    seed: u64,
) -> Batch {
    let mut rng = Rng(seed);
    let q = cfg.resampler.query_num;
    let p = cfg.vision.patch_size;
    let vocab = cfg.llm.vocab_size as u64;
    let prompt = text / 4;
    let sample_len = text + q;
    let t = samples * sample_len;
    let mut out = Batch::default();
    let mut k = 0;
    for r in 0..rows {
        let mut ids = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut labels = Vec::with_capacity(t);
        for _ in 0..samples {
            let start = ids.len();
            for i in 0..sample_len {
                pos.push(i as u32);
                ids.push((rng.next_u64() % vocab) as u32);
                let in_image = i >= prompt && i < prompt + q;
                let supervised = i >= prompt + q && i + 1 < sample_len;
                labels.push(if supervised && !in_image {
                    (rng.next_u64() % vocab) as i64
                } else {
                    -100
                });
            }
            out.bounds.push((r, start + prompt, start + prompt + q));
            out.image_groups.push(k);
            let (h, w) = sizes[k % sizes.len()];
            k += 1;
            let px: Vec<u8> = (0..h * p * w * p * 3)
                .map(|_| (rng.next_u64() & 0xff) as u8)
                .collect();
            // Sizes are multiples of the patch by construction.
            if let Ok(img) = ImageInput::from_hwc_u8(&px, h * p, w * p, p) {
                out.images.push(img);
            }
        }
        out.input_ids.push(ids);
        out.position_ids.push(pos);
        out.labels.push(labels);
        out.segments.push(vec![sample_len; samples]);
    }
    out
}

/// The benchmark workload (benches/gpu/README.md), identical to what
/// `benches/gpu/torch_baseline.py` builds: one row of `seq` tokens packing `samples` samples of
/// `seq / samples` tokens each. A sample is a 32-token prompt, then the placeholder runs of
/// `slices` square image slices of `slice_px` pixels, then text; every text token after the
/// images is supervised except the sample's last. Each sample's images form one vision group.
pub fn bench_batch(
    cfg: &ModelConfig,
    seq: usize,
    samples: usize,
    slices: usize,
    slice_px: usize,
    seed: u64,
) -> Result<Batch, String> {
    const PROMPT: usize = 32;
    let q = cfg.resampler.query_num;
    let p = cfg.vision.patch_size;
    let samples = samples.max(1);
    let len = seq / samples;
    if len < PROMPT + slices * q + 2 {
        return Err(format!(
            "a sample of {len} tokens cannot hold a {PROMPT}-token prompt and {slices} slices of \
             {q} placeholders"
        ));
    }
    if slice_px == 0 || !slice_px.is_multiple_of(p) {
        return Err(format!(
            "--slice-px {slice_px} is not a multiple of the patch size {p}"
        ));
    }
    let mut rng = Rng(seed);
    let vocab = cfg.llm.vocab_size as u64;
    let mut out = Batch::default();
    let (mut ids, mut pos, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for s in 0..samples {
        let start = s * len;
        let images_end = PROMPT + slices * q;
        for i in 0..len {
            ids.push((rng.next_u64() % vocab) as u32);
            pos.push(i as u32);
            let supervised = i >= images_end && i + 1 < len;
            labels.push(if supervised {
                (rng.next_u64() % vocab) as i64
            } else {
                -100
            });
        }
        for j in 0..slices {
            let b = start + PROMPT + j * q;
            out.bounds.push((0, b, b + q));
            out.image_groups.push(s);
            let px: Vec<u8> = (0..slice_px * slice_px * 3)
                .map(|_| (rng.next_u64() & 0xff) as u8)
                .collect();
            let img =
                ImageInput::from_hwc_u8(&px, slice_px, slice_px, p).map_err(|e| e.to_string())?;
            out.images.push(img);
        }
    }
    let used = samples * len;
    // Left-over tokens (seq not a multiple of samples) are padding: no loss, own segment.
    for _ in used..seq {
        ids.push(0);
        pos.push(0);
        labels.push(-100);
    }
    out.input_ids.push(ids);
    out.position_ids.push(pos);
    out.labels.push(labels);
    out.segments.push(vec![len; samples]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/models/minicpm-llama3-v-2_5-tiny");
        ModelConfig::from_dir(&dir).unwrap()
    }

    #[test]
    fn bench_batch_is_the_documented_workload() {
        let c = cfg();
        let q = c.resampler.query_num;
        let b = bench_batch(&c, 1001, 2, 3, 28, 7).unwrap();
        assert_eq!(b.dims(), (1, 1001));
        assert_eq!(b.segments, vec![vec![500, 500]]);
        assert_eq!(b.images.len(), 6);
        assert!(b.images.iter().all(|im| (im.ph, im.pw) == (2, 2)));
        assert_eq!(b.image_groups, vec![0, 0, 0, 1, 1, 1]);
        // Placeholder runs right after each 32-token prompt, back to back.
        assert_eq!(b.bounds[0], (0, 32, 32 + q));
        assert_eq!(b.bounds[3], (0, 500 + 32, 500 + 32 + q));
        // Supervised: every token after the images except each sample's last; none in padding.
        let per_sample = 500 - (32 + 3 * q) - 1;
        assert_eq!(b.supervised(), 2 * per_sample);
        assert_eq!(b.labels[0][1000], -100);
        assert_eq!(b.position_ids[0][500], 0);
        // Same seed, same batch; too short a sample is refused.
        assert_eq!(
            bench_batch(&c, 1001, 2, 3, 28, 7).unwrap().input_ids,
            b.input_ids
        );
        assert!(bench_batch(&c, 64, 2, 3, 28, 7).is_err());
        assert!(bench_batch(&c, 2048, 2, 3, 30, 7).is_err());
    }
}
