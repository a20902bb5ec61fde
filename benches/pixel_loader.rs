//! What a shard set costs on disk and how fast the trainer's loader turns it into model batches:
//! one row per shard directory, for sets of `--pixels slices` and `--pixels source`.
//!
//! ```text
//! cargo bench --bench pixel_loader -- DIR [DIR ...]      (driven by benches/pixels.sh)
//! ```
//!
//! The loader is `cpmv_train::data::make_batch` (what the trainer's background thread runs), one
//! pack at a time on one thread, over every pack of the set, repeated until at least 2 s have
//! passed; with source pixels it decodes and slices every image reference again. Prints one JSON
//! line per directory: pixels, samples, bytes on disk (all files), bytes per sample, loader
//! samples/s on one core.

use std::path::Path;
use std::time::Instant;

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let dirs: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if dirs.is_empty() {
        eprintln!("usage: pixel_loader DIR [DIR ...]");
        std::process::exit(2);
    }
    for d in dirs {
        let dir = Path::new(&d);
        let data = match cpmv_train::data::Dataset::open(dir) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{d}: {e}");
                std::process::exit(1);
            }
        };
        let patch = data.shards.manifest.settings.sample.patch_size as usize;
        let samples = data.samples();
        let start = Instant::now();
        let (mut done, mut passes) = (0usize, 0u32);
        while passes == 0 || start.elapsed().as_secs_f64() < 2.0 {
            for p in 0..data.packs.len() {
                let (batch, _, n) = cpmv_train::data::make_batch(&data, &[p], patch)
                    .unwrap_or_else(|e| panic!("{d}: pack {p}: {e}"));
                std::hint::black_box(&batch);
                done += n;
            }
            passes += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let bytes = dir_bytes(dir);
        let line = serde_json::json!({
            "dir": d,
            "pixels": data.shards.manifest.pixels,
            "samples": samples,
            "bytes": bytes,
            "bytes_per_sample": bytes as f64 / samples.max(1) as f64,
            "loader_samples_per_s": done as f64 / secs,
            "passes": passes,
        });
        println!("{line}");
    }
}
