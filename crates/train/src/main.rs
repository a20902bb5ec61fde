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
/// (--config) < these flags. Every default below may be changed by a preset;
/// `--print-config` shows the resolved settings and where each came from.
#[derive(Args)]
struct RunArgs {
    /// Shard directory written by `prep build`.
    #[arg(long, required_unless_present = "print_config")]
    shards: Option<PathBuf>,
    /// Checkpoint directory to fine-tune (config.json, safetensors, tokenizer files).
    #[arg(long, required_unless_present = "print_config")]
    model: Option<PathBuf>,
    /// Run directory: checkpoints, logs, the final model (new or empty, or a run to --resume).
    #[arg(long, required_unless_present = "print_config")]
    output: Option<PathBuf>,
    /// Preset TOML (pipelines/*.toml); its `[train]` table overrides the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved settings as a `[train]` table, each with its source (default, preset
    /// or flag), and exit without training.
    #[arg(long)]
    print_config: bool,
    /// Shards to evaluate the loss on every --eval-every steps (default: no evaluation).
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
    /// No progress bar (the summary line and errors are still printed).
    #[arg(long)]
    quiet: bool,
    /// `full` (train whole parts, see --tune-vision/--tune-llm) or `lora` (adapters on the LLM,
    /// resampler and vision trained whole as PEFT modules_to_save) [default: full].
    #[arg(long, value_enum)]
    mode: Option<TrainMode>,
    /// Train the vision tower [default: true].
    #[arg(long, value_name = "BOOL")]
    tune_vision: Option<bool>,
    /// Full mode: train the LLM and its embeddings (LoRA refuses it) [default: false].
    #[arg(long, value_name = "BOOL")]
    tune_llm: Option<bool>,
    /// LoRA rank [default: 64].
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA scaling numerator: updates are scaled by alpha / r [default: 64].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the LoRA input, in [0, 1) [default: 0.05].
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Regex over full module names (PEFT full match) choosing the adapted linears
    /// [default: the q/k/v/o projections of the LLM, as finetune_lora.sh].
    #[arg(long)]
    lora_target: Option<String>,
    /// Peak learning rate [default: 1e-6, finetune_ds.sh's].
    #[arg(long)]
    learning_rate: Option<f64>,
    /// AdamW beta2 [default: 0.95] (beta1 0.9 and eps 1e-8 are preset keys).
    #[arg(long)]
    adam_beta2: Option<f64>,
    /// AdamW decoupled weight decay [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Exempt biases and norm weights from weight decay (the reference decays everything)
    /// [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    no_decay_norm_bias: Option<bool>,
    /// Clip the global gradient norm to this (0: no clipping) [default: 1.0].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Learning-rate schedule: `reference` (what the official scripts really run: DeepSpeed
    /// WarmupLR, log warm-up then constant), `cosine`, `linear`, `constant` [default: reference].
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// Warm-up as a share of the run's steps (rounded up) [default: 0.01].
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Warm-up steps; overrides --warmup-ratio [default: unset].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// How micro-batch losses combine: `reference` (mean of per-micro-batch token means) or
    /// `tokens` (one token mean over the step) [default: reference].
    #[arg(long, value_enum)]
    loss_norm: Option<LossNorm>,
    /// Seed of the data order, LoRA initialisation and dropout [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Packs per micro-batch (padded to the longest) [default: 1].
    #[arg(long)]
    micro_batch: Option<usize>,
    /// Micro-batches per optimiser step [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Run length in optimiser steps (replaces --epochs) [default: none; give this or --epochs].
    #[arg(long)]
    max_steps: Option<u64>,
    /// Run length in passes over the packs, fractions allowed (replaces --max-steps).
    #[arg(long)]
    epochs: Option<f64>,
    /// Write checkpoint-N every this many steps (and at the end) [default: 1000].
    #[arg(long)]
    save_every: Option<u64>,
    /// Keep the newest this many checkpoints [default: 10].
    #[arg(long)]
    keep_last: Option<usize>,
    /// Evaluate --eval-shards every this many steps (and at the end) [default: 1000].
    #[arg(long)]
    eval_every: Option<u64>,
    /// Log a step line every this many steps [default: 1].
    #[arg(long)]
    log_every: Option<u64>,
    /// Recompute each vision and decoder layer in backward instead of keeping its activations
    /// (`--grad-checkpointing false` turns a preset's setting off) [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    grad_checkpointing: Option<bool>,
    /// Skip (and count) steps with a non-finite loss or gradient instead of stopping
    /// [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    skip_nonfinite: Option<bool>,
    /// 2.5 only: correct vision masking instead of the reference quirk [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    v25_vision_masking: Option<bool>,
    /// Where to train: cpu, cuda or cuda:N (CUDA needs a build with --features cuda)
    /// [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// Weights and activations in f32 or bf16 (f32 master weights and moments either way)
    /// [default: f32].
    #[arg(long, value_enum)]
    dtype: Option<cpmv_train::config::ComputeDtype>,
    /// LoRA: also train the token embeddings, as the reference does (modules_to_save)
    /// [default: true].
    #[arg(long, value_name = "BOOL")]
    lora_embeddings: Option<bool>,
    /// Data-parallel ranks in this process, as threads on the CPU (multi-GPU ranks are not
    /// built yet): a step covers ranks × grad-accum × micro-batch packs. Under a launcher
    /// (torchrun, srun, mpirun) each process is one rank: leave it out [default: 1].
    #[arg(long)]
    nproc_per_node: Option<usize>,
    /// ZeRO stage: 0 replicates the optimizer on every rank, 1 shards fp32 masters and AdamW
    /// moments over the ranks, 2 also shards the accumulated gradients [default: 0].
    #[arg(long, value_name = "0|1|2")]
    zero: Option<u8>,
    /// Optimizer state (fp32 masters, moments) in host memory, AdamW on the CPU, as DeepSpeed's
    /// offload_optimizer; with or without --zero [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    offload_optimizer: Option<bool>,
    /// MiB of f32 values per collective call when ranks exchange gradients and weights
    /// [default: 64].
    #[arg(long, value_name = "MIB")]
    bucket_mb: Option<usize>,
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
        /// `tiny` (a few small layers, real vocabulary) or `full` (the released sizes).
        #[arg(long, value_enum, default_value_t = SizeArg::Tiny)]
        size: SizeArg,
        /// Seed of the random weights.
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
        /// Shard directory written by `prep build`.
        #[arg(long)]
        shards: PathBuf,
        /// Checkpoint directory (a base, or a full fine-tune).
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
        /// No progress bar.
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
        /// `full` (the released sizes) or `tiny`.
        #[arg(long, value_enum, default_value_t = SizeArg::Full)]
        size: SizeArg,
        /// What trains: `full` (everything), `lora` (q/k/v/o adapters, vision and resampler,
        /// embeddings frozen) or `lora-embed` (as lora, embeddings trained too).
        #[arg(long, value_enum, default_value_t = cpmv_train::bench::BenchMode::Full)]
        mode: cpmv_train::bench::BenchMode,
        /// Tokens of the packed row.
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
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Weights and activations in f32 or bf16.
        #[arg(long, value_enum, default_value_t = cpmv_train::config::ComputeDtype::Bf16)]
        dtype: cpmv_train::config::ComputeDtype,
        /// Keep every layer's activations instead of recomputing them (the official scripts
        /// checkpoint).
        #[arg(long)]
        no_grad_checkpointing: bool,
        /// Optimizer state in host memory, AdamW on the CPU (as `train --offload-optimizer`).
        #[arg(long)]
        offload_optimizer: bool,
        /// Seed of the random weights and inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also append the JSON line to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Talk to a checkpoint or a fine-tune, as its official inference code would prompt it.
    ///
    /// The checkpoint's inference chat template (not the training one), the images before the
    /// question and sliced as at inference, a key/value cache, greedy decoding unless
    /// --temperature is set, the reply streamed as it is produced. With --prompt: one reply,
    /// then exit; without: an interactive conversation (the images go with the first question;
    /// an empty line or end of input ends it).
    Chat(ChatArgs),
    /// Merge a LoRA adapter written by `train --mode lora` into its base: a full checkpoint.
    MergeLora {
        /// Base checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (adapter_config.json, adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory for the merged checkpoint (new or empty).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct ChatArgs {
    /// Checkpoint directory: a base, a full fine-tune or a merged LoRA run.
    #[arg(long)]
    model: PathBuf,
    /// LoRA run directory (PEFT layout, e.g. a `train --mode lora` output) applied to --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Image file shown with the (first) question; repeat for several, in order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The question. Without it, chat interactively on the terminal.
    #[arg(long)]
    prompt: Option<String>,
    /// System prompt (2.5 and 2.6; 2.0 has none) [default: the template's own].
    #[arg(long)]
    system: Option<String>,
    /// Most tokens generated per reply.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// 0 decodes greedily (token for token what the PyTorch model's greedy `generate` gives);
    /// above 0 samples at this temperature.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens holding this much probability
    /// (with --temperature above 0), in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum slices per image [default: the checkpoint's config.json].
    #[arg(long)]
    max_slice_nums: Option<u32>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and activations in f32 or bf16 [default: f32 on the CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    dtype: Option<cpmv_train::config::ComputeDtype>,
    /// Print one JSON object per reply (prompt text and ids, generated ids, text, why it
    /// stopped) instead of streaming the text.
    #[arg(long)]
    json: bool,
}

/// `train chat`.
fn run_chat(a: ChatArgs) -> Result<()> {
    use std::io::{BufRead, Write};
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        anyhow::bail!(
            "--temperature {}: expected 0 (greedy) or a positive number",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p {}: expected a number in (0, 1]", a.top_p);
    }
    if a.top_p < 1.0 && a.temperature == 0.0 {
        anyhow::bail!("--top-p applies to sampling: give --temperature above 0 as well");
    }
    let device = cpmv_train::config::open_device(&a.device)?;
    let dtype = a.dtype.map(|d| d.dtype()).unwrap_or(if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    });
    let model = match &a.adapter {
        Some(adapter) => cpmv_train::checkpoint::load_with_adapter_on(
            &a.model,
            adapter,
            Default::default(),
            &device,
            dtype,
        )
        .with_context(|| format!("loading {} with {}", a.model.display(), adapter.display()))?,
        None => cpmv_model::MiniCpmV::load(
            &a.model,
            &cpmv_model::LoadOptions {
                device: device.clone(),
                dtype,
                ..Default::default()
            },
        )
        .with_context(|| format!("loading {}", a.model.display()))?,
    };
    // Prompt as the fine-tune saw its data (its tokenizer files and slicing).
    let prompt_dir = match &a.adapter {
        Some(run) => cpmv_train::checkpoint::settings_dir(&a.model, run),
        None => a.model.as_path(),
    };
    let chat = cpmv_chat::Chat::new(&model, prompt_dir, a.max_slice_nums)?;
    let mut images = Vec::new();
    for path in &a.images {
        images.push(cpmv_chat::ChatImage::open(path)?);
    }
    let sampling = cpmv_model::Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let mut turns = Vec::new();
    if let Some(system) = &a.system {
        turns.push(cpmv_chat::Turn {
            role: cpmv_chat::Role::System,
            text: system.clone(),
            images: Vec::new(),
        });
    }
    let ask = |turns: &mut Vec<cpmv_chat::Turn>, text: String| -> Result<()> {
        let first = !turns.iter().any(|t| t.role == cpmv_chat::Role::User);
        turns.push(cpmv_chat::Turn {
            role: cpmv_chat::Role::User,
            text,
            images: if first { images.clone() } else { Vec::new() },
        });
        let prompt = chat.prompt(turns)?;
        let reply = if a.json {
            let reply = chat.reply(&prompt, a.max_new_tokens, &sampling, |_| {})?;
            let v = serde_json::json!({
                "prompt_text": prompt.text,
                "prompt_ids": prompt.ids,
                "generated_ids": reply.ids,
                "text": reply.text,
                "stop": format!("{:?}", reply.stop),
            });
            println!("{v}");
            reply
        } else {
            let stdout = std::io::stdout();
            let reply = chat.reply(&prompt, a.max_new_tokens, &sampling, |piece| {
                let mut out = stdout.lock();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })?;
            println!();
            reply
        };
        turns.push(cpmv_chat::Turn {
            role: cpmv_chat::Role::Assistant,
            text: reply.text,
            images: Vec::new(),
        });
        Ok(())
    };
    if let Some(prompt) = &a.prompt {
        return ask(&mut turns, prompt.clone());
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        ask(&mut turns, line.trim_end_matches(['\n', '\r']).to_string())?;
    }
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
        dtype,
        nproc_per_node,
        zero,
        offload_optimizer,
        bucket_mb
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

/// The resolved settings as a `[train]` table (a valid preset), each line marked with where
/// its value came from; unset options as comments.
fn render_config(
    config: &TrainConfig,
    preset_keys: &[String],
    matches: &clap::ArgMatches,
    preset: Option<&std::path::Path>,
) -> String {
    let serde_json::Value::Object(map) = serde_json::to_value(config).unwrap_or_default() else {
        return String::new();
    };
    let from_flag = |key: &str| {
        matches.try_get_raw(key).ok().flatten().is_some()
            && matches.value_source(key) == Some(clap::parser::ValueSource::CommandLine)
    };
    let mut out = String::from("[train]\n");
    for (key, value) in &map {
        let source = if from_flag(key) {
            "flag".to_string()
        } else if preset_keys.iter().any(|k| k == key) {
            format!(
                "preset {}",
                preset.map_or(String::new(), |p| p.display().to_string())
            )
        } else {
            "default".to_string()
        };
        let line = match value {
            serde_json::Value::Null => format!("# {key} = (not set)"),
            v => format!("{key} = {v}"),
        };
        out.push_str(&format!("{line:<48} # {source}\n"));
    }
    out
}

fn run() -> Result<()> {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
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
                use cpmv_fsio::Input;
                let inputs: Vec<Input> = [
                    Some(Input::new("--model", &opts.model)),
                    Some(Input::new("--shards", &opts.shards)),
                    opts.adapter.as_deref().map(|a| Input::new("--adapter", a)),
                ]
                .into_iter()
                .flatten()
                .collect();
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
            offload_optimizer,
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
                offload_optimizer,
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
        Some(Command::Chat(args)) => run_chat(args)?,
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
            if a.print_config {
                let preset_keys = match &a.config {
                    Some(p) => cpmv_train::config::preset_keys(p)?,
                    None => Vec::new(),
                };
                print!(
                    "{}",
                    render_config(&config, &preset_keys, &matches, a.config.as_deref())
                );
                return Ok(());
            }
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
            if r.rank != 0 {
                // One of several launched processes: rank 0 reports for the run.
                return Ok(());
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command says what it does (a flag without help shows no default).
    #[test]
    fn every_flag_has_help() {
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some() || arg.get_long_help().is_some(),
                    "{path} --{id} has no help"
                );
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "train");
    }
}
