//! Forward + backward time and peak memory of one training step of each tiny config on the
//! CPU (full fine-tune and LoRA), on a packed row like the ones `prep build` writes.
//! `cargo bench -p cpmv-model --bench tiny_step` prints a table.

use candle_core::DType;
use cpmv_model::init::{init_model, Size};
use cpmv_model::{synthetic, LoadOptions, LoraConfig, MiniCpmV, Trainable};
use std::path::PathBuf;
use std::time::Instant;

/// Peak resident memory since the last reset, in MiB (Linux).
fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models");
    let tmp = tempfile::tempdir().expect("temp dir");
    println!("| config | mode | tokens/row | images | step (fwd+bwd) ms | peak RSS MiB |");
    println!("|---|---|---:|---:|---:|---:|");
    for name in [
        "minicpm-v-2-tiny",
        "minicpm-llama3-v-2_5-tiny",
        "minicpm-v-2_6-tiny",
    ] {
        let dir = tmp.path().join(name);
        init_model(&root.join(name), &dir, Size::Tiny, 1, DType::F32).expect("init");
        for lora in [false, true] {
            reset_peak();
            let opts = LoadOptions {
                trainable: if lora {
                    Trainable {
                        vision: true,
                        resampler: true,
                        llm: false,
                        embeddings: true,
                    }
                } else {
                    Trainable::ALL
                },
                lora: lora.then(LoraConfig::default),
                ..Default::default()
            };
            let model = MiniCpmV::load(&dir, &opts).expect("load");
            // Two samples of 448 text tokens, each with a 448x448 image cut like prep does
            // (source 32x32 patches... here 16x16 and 12x20 patch grids).
            let batch = synthetic::batch(model.config(), 1, 2, 448, &[(16, 16), (12, 20)], 3);
            let (_, t) = batch.dims();
            let steps = 3;
            let mut best = f64::MAX;
            for _ in 0..steps {
                let t0 = Instant::now();
                let out = model.loss(&batch, true).expect("forward");
                let grads = out.loss.backward().expect("backward");
                std::hint::black_box(&grads);
                best = best.min(t0.elapsed().as_secs_f64() * 1e3);
            }
            println!(
                "| {name} | {} | {t} | {} | {best:.0} | {:.0} |",
                if lora { "LoRA r64" } else { "full" },
                batch.images.len(),
                peak_rss_mib()
            );
        }
    }
}
