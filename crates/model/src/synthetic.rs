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
