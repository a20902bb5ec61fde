//! `train eval`: the loss of a checkpoint (base, fine-tuned, or base + LoRA adapter) on
//! shards, per sample — to compare runs and to find the samples a model finds surprising.
//! The forward pass and loss are the training ones (no second implementation).

use cpmv_model::{LoadOptions, MiniCpmV};
use cpmv_shard::reader::{Row, SampleView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::data::{batch_of_rows, Dataset};
use crate::error::TrainError;
use crate::trainer::check_fit;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub shards: PathBuf,
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// Evaluate packs as trained (samples of a pack share one forward pass) instead of one
    /// sample at a time.
    pub pack: bool,
    /// 2.5 only: the corrected vision masking (as `train --v25-vision-masking`).
    pub v25_vision_masking: bool,
    pub quiet: bool,
}

/// The loss of one sample.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleLoss {
    pub id: String,
    /// Mean cross-entropy over its supervised tokens (NaN when it has none).
    pub loss: f64,
    pub loss_sum: f64,
    pub n_tokens: u64,
    pub n_images: u64,
    pub n_slices: u64,
}

/// The result of `train eval` (`schemas/eval.schema.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub samples: Vec<SampleLoss>,
    /// Mean of the per-sample mean losses (samples with supervised tokens).
    pub mean_loss: f64,
    /// Sum of all token losses / number of supervised tokens.
    pub token_mean_loss: f64,
    pub model: String,
    pub adapter: Option<String>,
    pub shards: String,
    pub packed: bool,
}

/// Images of a sample: image-start tokens outside `<slice>…</slice>` spans (the old schema
/// wraps each slice's placeholder in `<image>` inside one `<slice>` group; the new schema uses
/// `<slice>` per slice).
fn count_images(s: &SampleView, image_start: u32, slice_start: u32, slice_end: u32) -> u64 {
    let mut inside = false;
    let mut n = 0;
    for &t in s.input_ids {
        let t = t as u32;
        if t == slice_start {
            inside = true;
        } else if t == slice_end {
            inside = false;
        } else if t == image_start && !inside {
            n += 1;
        }
    }
    n
}

/// Loads the model of `opts` (with its adapter, if any), frozen.
pub fn load_model(
    model: &Path,
    adapter: Option<&Path>,
    fixes: cpmv_model::Fixes,
) -> Result<MiniCpmV, TrainError> {
    match adapter {
        Some(a) => crate::checkpoint::load_with_adapter(model, a, fixes),
        None => Ok(MiniCpmV::load(
            model,
            &LoadOptions {
                fixes,
                ..Default::default()
            },
        )?),
    }
}

/// Runs the evaluation.
pub fn evaluate_samples(opts: &EvalOptions) -> Result<EvalReport, TrainError> {
    let data = Dataset::open(&opts.shards)?;
    let fixes = cpmv_model::Fixes {
        v25_vision_masking: opts.v25_vision_masking,
    };
    let model = load_model(&opts.model, opts.adapter.as_deref(), fixes)?;
    check_fit(&data, &opts.model, &model)?;
    let [image_start, slice_start, slice_end] =
        crate::tokens::token_ids(&opts.model, ["<image>", "<slice>", "</slice>"])?;
    let patch = model.config().vision.patch_size;
    let pb = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(data.samples() as u64)
    };
    let mut samples = Vec::with_capacity(data.samples());
    let mut push = |s: &SampleView, token_losses: &[f64]| {
        let sum: f64 = token_losses.iter().sum();
        let n = token_losses.len() as u64;
        samples.push(SampleLoss {
            id: s.id.to_string(),
            loss: if n > 0 { sum / n as f64 } else { f64::NAN },
            loss_sum: sum,
            n_tokens: n,
            n_images: count_images(s, image_start, slice_start, slice_end),
            n_slices: s.tgt_sizes.len() as u64,
        });
    };
    if opts.pack {
        for p in 0..data.packs.len() {
            // One decode of the pack (in a compressed set) for the batch and the per-sample
            // losses alike.
            let found = data.pack_rows(p)?;
            let rows: Vec<SampleView> = found.iter().map(Row::view).collect();
            let batch = batch_of_rows(&data.shards, std::slice::from_ref(&rows), patch)?;
            let losses: Vec<f64> = if batch.supervised() > 0 {
                model
                    .token_losses(&batch)?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1()?
            } else {
                Vec::new()
            };
            // Supervised positions come in row order, so each sample's are contiguous.
            let mut at = 0;
            for s in &rows {
                let n = s.labels.iter().filter(|&&l| l >= 0).count();
                push(s, &losses[at..at + n]);
                at += n;
                pb.inc(1);
            }
        }
    } else {
        for found in data.shards.samples() {
            let found = found.map_err(|e| TrainError::Data(e.to_string()))?;
            let s = found.view();
            let batch = batch_of_rows(&data.shards, &[vec![s.clone()]], patch)?;
            let losses: Vec<f64> = if batch.supervised() > 0 {
                model
                    .token_losses(&batch)?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1()?
            } else {
                Vec::new()
            };
            push(&s, &losses);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let with_tokens: Vec<&SampleLoss> = samples.iter().filter(|s| s.n_tokens > 0).collect();
    let mean_loss =
        with_tokens.iter().map(|s| s.loss).sum::<f64>() / with_tokens.len().max(1) as f64;
    let tok: u64 = samples.iter().map(|s| s.n_tokens).sum();
    let token_mean_loss = samples.iter().map(|s| s.loss_sum).sum::<f64>() / tok.max(1) as f64;
    Ok(EvalReport {
        samples,
        mean_loss,
        token_mean_loss,
        model: opts.model.display().to_string(),
        adapter: opts.adapter.as_ref().map(|a| a.display().to_string()),
        shards: opts.shards.display().to_string(),
        packed: opts.pack,
    })
}

/// The human summary: mean losses, a histogram of per-sample loss and the `top` highest.
pub fn render(report: &EvalReport, top: usize) -> String {
    let mut out = String::new();
    let n = report.samples.len();
    let tok: u64 = report.samples.iter().map(|s| s.n_tokens).sum();
    out.push_str(&format!(
        "{n} samples, {tok} supervised tokens: mean loss {:.4} (per sample), {:.4} (per token)\n",
        report.mean_loss, report.token_mean_loss
    ));
    let losses: Vec<f64> = report
        .samples
        .iter()
        .filter(|s| s.n_tokens > 0)
        .map(|s| s.loss)
        .collect();
    if !losses.is_empty() {
        let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let bins = 12usize;
        let width = ((hi - lo) / bins as f64).max(1e-9);
        let mut counts = vec![0usize; bins];
        for l in &losses {
            counts[(((l - lo) / width) as usize).min(bins - 1)] += 1;
        }
        let max = counts.iter().copied().max().unwrap_or(1).max(1);
        out.push_str("per-sample loss:\n");
        for (i, c) in counts.iter().enumerate() {
            let a = lo + i as f64 * width;
            out.push_str(&format!(
                "  {:>8.3} – {:<8.3} {:>6} {}\n",
                a,
                a + width,
                c,
                "█".repeat((c * 40).div_ceil(max))
            ));
        }
    }
    if top > 0 {
        let mut idx: Vec<&SampleLoss> = report.samples.iter().filter(|s| s.n_tokens > 0).collect();
        idx.sort_by(|a, b| b.loss.total_cmp(&a.loss));
        out.push_str(&format!(
            "highest loss (inspect with `prep inspect --shards {} --id ID`):\n",
            report.shards
        ));
        for s in idx.iter().take(top) {
            out.push_str(&format!(
                "  {:>8.4}  {:>5} tokens  {} image(s), {} slice(s)  {}\n",
                s.loss, s.n_tokens, s.n_images, s.n_slices, s.id
            ));
        }
    }
    out
}
