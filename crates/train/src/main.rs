//! `train`: the cpmv trainer binary (thin; the logic lives in the library crates).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use cpmv_model::init::{init_model, Size};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Fine-tune MiniCPM-V (full or LoRA) on prep shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::InitModel {
            like,
            size,
            seed,
            dtype,
            out,
        } => {
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
    }
    Ok(())
}
