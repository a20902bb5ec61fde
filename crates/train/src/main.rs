//! `train`: the cpmv trainer binary (thin; the logic lives in the library crates).

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use cpmv_model::init::{init_model, Size};
use cpmv_train::config::ScheduleKind;
use cpmv_train::{LossNorm, TrainConfig, TrainMode, TrainOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Fine-tune MiniCPM-V (full or LoRA) on shards written by `prep build`",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// A training run. Settings: defaults of the official scripts < the preset's `[train]` table
/// (--config) < these flags.
#[derive(Args)]
struct RunArgs {
    /// Shard directory written by `prep build`.
    #[arg(long, required = true)]
    shards: Option<PathBuf>,
    /// Checkpoint directory to fine-tune (config.json, safetensors, tokenizer files).
    #[arg(long, required = true)]
    model: Option<PathBuf>,
    /// Run directory: checkpoints, logs, the final model.
    #[arg(long, required = true)]
    output: Option<PathBuf>,
    /// Preset TOML (pipelines/*.toml); its `[train]` table.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shards to evaluate the loss on every --eval-every steps.
    #[arg(long)]
    eval_shards: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in --output. Settings that change the
    /// math (learning rate, schedule and its length, dtype, device, seed, data, ...) must be
    /// those of the run; cadence settings (save/eval/log every, keep-last, checkpointing,
    /// quiet) may change.
    #[arg(long)]
    resume: bool,
    /// With --resume: accept settings that change the math, printing and recording each change
    /// (in trainer_state.json) instead of refusing.
    #[arg(long, requires = "resume")]
    resume_override: bool,
    #[arg(long)]
    quiet: bool,
    #[arg(long, value_enum)]
    mode: Option<TrainMode>,
    #[arg(long)]
    tune_vision: Option<bool>,
    #[arg(long)]
    tune_llm: Option<bool>,
    #[arg(long)]
    lora_r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Regex over full module names (PEFT full match).
    #[arg(long)]
    lora_target: Option<String>,
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    adam_beta2: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Exempt biases and norm weights from weight decay (the reference decays everything).
    /// `--no-decay-norm-bias false` turns a preset's setting off.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_decay_norm_bias: Option<bool>,
    #[arg(long)]
    max_grad_norm: Option<f64>,
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    #[arg(long)]
    warmup_ratio: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long, value_enum)]
    loss_norm: Option<LossNorm>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    micro_batch: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long)]
    save_every: Option<u64>,
    #[arg(long)]
    keep_last: Option<usize>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    log_every: Option<u64>,
    /// Recompute each vision and decoder layer in backward instead of keeping its activations
    /// (`--grad-checkpointing false` turns a preset's setting off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    grad_checkpointing: Option<bool>,
    /// Skip (and count) steps with a non-finite loss or gradient instead of stopping.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    skip_nonfinite: Option<bool>,
    /// 2.5 only: correct vision masking instead of the reference quirk.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    v25_vision_masking: Option<bool>,
    /// Where to train: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long)]
    device: Option<String>,
    /// Weights and activations in f32 or bf16 (f32 master weights and moments either way).
    #[arg(long, value_enum)]
    dtype: Option<cpmv_train::config::ComputeDtype>,
    /// LoRA: also train the token embeddings (the reference does: modules_to_save).
    #[arg(long)]
    lora_embeddings: Option<bool>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Reference,
    Cosine,
    Linear,
    Constant,
}

#[derive(Subcommand)]
enum Command {
    /// Write a checkpoint directory with seeded random weights in the real layout.
    ///
    /// Version, LLM type, tokenizer and processor files come from the checkpoint directory given
    /// with --like (its weights are not read). `tiny` gives a few small layers for tests and CPU
    /// demos; `full` gives the released model's sizes, for benchmarks.
    InitModel {
        /// Checkpoint directory to imitate (config.json + tokenizer files).
        #[arg(long)]
        like: PathBuf,
        #[arg(long, value_enum, default_value_t = SizeArg::Tiny)]
        size: SizeArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage dtype of the weights (default: f32 for tiny, bf16 for full).
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss of a checkpoint on shards, per sample: compare runs, find surprising samples.
    ///
    /// The model is the base checkpoint, a full fine-tune, or --model BASE --adapter LORA_DIR.
    /// Loss exactly as training computes it, in f32 on the CPU, one sample at a time (--pack:
    /// packs as trained).
    Eval {
        #[arg(long)]
        shards: PathBuf,
        #[arg(long)]
        model: PathBuf,
        /// LoRA adapter directory (PEFT layout) applied to --model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Evaluate packs as trained instead of one sample at a time.
        #[arg(long)]
        pack: bool,
        /// 2.5 only: the corrected vision masking (for runs trained with it).
        #[arg(long)]
        v25_vision_masking: bool,
        /// Print the JSON report (schemas/eval.schema.json) instead of the summary.
        #[arg(long)]
        json: bool,
        /// Also write the JSON report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Show this many highest-loss samples.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        quiet: bool,
    },
    /// Training-step throughput of a real-size model with seeded random weights (no data, no
    /// checkpoint on disk): prints one JSON line (benches/gpu/README.md).
    Bench {
        /// Checkpoint directory giving the version and config (its weights are not read),
        /// e.g. examples/models/minicpm-v-2-tiny.
        #[arg(long)]
        like: PathBuf,
        #[arg(long, value_enum, default_value_t = SizeArg::Full)]
        size: SizeArg,
        #[arg(long, value_enum, default_value_t = cpmv_train::bench::BenchMode::Full)]
        mode: cpmv_train::bench::BenchMode,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Samples packed in the row.
        #[arg(long, default_value_t = 2)]
        samples: usize,
        /// Image slices per sample.
        #[arg(long, default_value_t = 5)]
        slices: usize,
        /// Side of a (square) slice in pixels.
        #[arg(long, default_value_t = 448)]
        slice_px: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, value_enum, default_value_t = cpmv_train::config::ComputeDtype::Bf16)]
        dtype: cpmv_train::config::ComputeDtype,
        /// Keep every layer's activations instead of recomputing them (the official scripts
        /// checkpoint).
        #[arg(long)]
        no_grad_checkpointing: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also append the JSON line to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Merge a LoRA adapter written by `train --mode lora` into its base: a full checkpoint.
    MergeLora {
        /// Base checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SizeArg {
    Tiny,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn overlay(mut c: TrainConfig, a: &RunArgs) -> TrainConfig {
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { c.$f = v; } )* };
    }
    set!(
        mode,
        tune_vision,
        tune_llm,
        lora_r,
        lora_alpha,
        lora_dropout,
        lora_target,
        lora_embeddings,
        device,
        dtype
    );
    set!(
        learning_rate,
        adam_beta2,
        weight_decay,
        max_grad_norm,
        warmup_ratio,
        loss_norm
    );
    set!(
        seed,
        micro_batch,
        grad_accum,
        save_every,
        keep_last,
        eval_every,
        log_every
    );
    set!(
        no_decay_norm_bias,
        grad_checkpointing,
        skip_nonfinite,
        v25_vision_masking
    );
    if a.warmup_steps.is_some() {
        c.warmup_steps = a.warmup_steps;
    }
    if a.max_steps.is_some() {
        c.max_steps = a.max_steps;
        c.epochs = None;
    }
    if a.epochs.is_some() {
        c.epochs = a.epochs;
        c.max_steps = None;
    }
    if let Some(s) = a.schedule {
        c.schedule = match s {
            ScheduleArg::Reference => ScheduleKind::Reference,
            ScheduleArg::Cosine => ScheduleKind::Cosine,
            ScheduleArg::Linear => ScheduleKind::Linear,
            ScheduleArg::Constant => ScheduleKind::Constant,
        };
    }
    c
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::InitModel {
            like,
            size,
            seed,
            dtype,
            out,
        }) => {
            let size = match size {
                SizeArg::Tiny => Size::Tiny,
                SizeArg::Full => Size::Full,
            };
            let dtype = match (dtype, size) {
                (Some(DtypeArg::F32), _) | (None, Size::Tiny) => candle_core::DType::F32,
                (Some(DtypeArg::Bf16), _) | (None, Size::Full) => candle_core::DType::BF16,
                (Some(DtypeArg::F16), _) => candle_core::DType::F16,
            };
            let w = init_model(&like, &out, size, seed, dtype)
                .with_context(|| format!("init-model --like {}", like.display()))?;
            println!(
                "wrote MiniCPM-V {} checkpoint {} ({} parameters, {} weight file(s), {:?})",
                w.version.as_str(),
                w.dir.display(),
                w.parameters,
                w.files.len(),
                dtype
            );
        }
        Some(Command::Eval {
            shards,
            model,
            adapter,
            pack,
            v25_vision_masking,
            json,
            out,
            top,
            quiet,
        }) => {
            let opts = cpmv_train::eval::EvalOptions {
                shards,
                model,
                adapter,
                pack,
                v25_vision_masking,
                quiet: quiet || json,
            };
            if let Some(path) = &out {
                let mut inputs = vec![
                    cpmv_fsio::Input {
                        flag: "--model",
                        path: &opts.model,
                    },
                    cpmv_fsio::Input {
                        flag: "--shards",
                        path: &opts.shards,
                    },
                ];
                if let Some(a) = &opts.adapter {
                    inputs.push(cpmv_fsio::Input {
                        flag: "--adapter",
                        path: a,
                    });
                }
                cpmv_fsio::refuse_overlap("--out", path, &inputs)?;
            }
            let report = cpmv_train::eval::evaluate_samples(&opts)?;
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(path) = &out {
                std::fs::write(path, format!("{text}\n"))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                println!("{text}");
            } else {
                print!("{}", cpmv_train::eval::render(&report, top));
            }
        }
        Some(Command::Bench {
            like,
            size,
            mode,
            seq,
            samples,
            slices,
            slice_px,
            warmup,
            steps,
            device,
            dtype,
            no_grad_checkpointing,
            seed,
            out,
        }) => {
            let opts = cpmv_train::bench::BenchOptions {
                like,
                size: match size {
                    SizeArg::Tiny => Size::Tiny,
                    SizeArg::Full => Size::Full,
                },
                mode,
                seq,
                samples,
                slices,
                slice_px,
                warmup,
                steps,
                device,
                dtype,
                grad_checkpointing: !no_grad_checkpointing,
                seed,
            };
            let r = cpmv_train::bench::run(&opts).context("train bench")?;
            let line = serde_json::to_string(&r)?;
            println!("{line}");
            if let Some(path) = &out {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Some(Command::MergeLora {
            model,
            adapter,
            out,
        }) => {
            let n = cpmv_train::checkpoint::merge_lora(&model, &adapter, &out)
                .with_context(|| format!("merge-lora {}", adapter.display()))?;
            println!("merged {n} LoRA adapters into {}", out.display());
        }
        None => {
            let a = &cli.run;
            let base = match &a.config {
                Some(p) => TrainConfig::from_preset(p)?,
                None => TrainConfig::default(),
            };
            let config = overlay(base, a);
            let (Some(shards), Some(model), Some(output)) =
                (a.shards.clone(), a.model.clone(), a.output.clone())
            else {
                anyhow::bail!("--shards, --model and --output are required");
            };
            let opts = TrainOptions {
                shards,
                model,
                output,
                eval_shards: a.eval_shards.clone(),
                resume: a.resume,
                resume_override: a.resume_override,
                config,
                quiet: a.quiet,
            };
            let r = cpmv_train::train(&opts)?;
            let first = r.losses.first().copied().unwrap_or(f64::NAN);
            let last = r.losses.last().copied().unwrap_or(f64::NAN);
            println!(
                "trained {} steps ({} skipped): loss {first:.4} -> {last:.4}; peak memory {:.0} MiB; \
                 output {}",
                r.steps,
                r.skipped,
                r.peak_mem_bytes as f64 / (1 << 20) as f64,
                r.output.display()
            );
            if let Some((s, l)) = r.eval_losses.last() {
                println!("eval loss at step {s}: {l:.4}");
            }
        }
    }
    Ok(())
}
