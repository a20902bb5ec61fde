//! Command-line interface of the `prep` binary (the binary itself only calls [`main`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::build::{build, reasons_by_count, BuildError};
use crate::config::{BuildOptions, OnError, OutputFormat, Pixels, PrepPreset, ShardCompression};
use crate::inspect::{inspect, InspectOptions};
use crate::model::LlmType;
use crate::placeholder::ImageIdMode;
use crate::stats::{
    measure, refuse_overlapping_outputs, render_text, stats_from_shards, StatsOptions,
};

/// Exit status: all samples written.
pub const EXIT_OK: u8 = 0;
/// Exit status: an error stopped the run (bad arguments, unreadable model or data file).
pub const EXIT_ERROR: u8 = 1;
/// Exit status: finished, but some samples were rejected (see rejected.jsonl).
pub const EXIT_REJECTED: u8 = 3;
/// Exit status: `--on-error fail` stopped at a bad sample.
pub const EXIT_SAMPLE_FAILED: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "prep",
    version,
    about = "Prepare MiniCPM-V fine-tuning data as packed Arrow shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate, slice, tokenize and pack samples into shards (exit 0: all written, 3: some
    /// rejected, 4: stopped by --on-error fail, 1: error).
    Build(BuildArgs),
    /// Token-length statistics of data files (image sizes from headers only) or of built shards.
    Stats(StatsArgs),
    /// Show one sample of a shard set as the model will see it.
    Inspect(InspectArgs),
}

/// Flags that decide what a sample becomes (shared by build and stats).
#[derive(Args, Debug, Clone)]
struct SampleFlags {
    /// Preset (pipelines/*.toml); its [prep] table overrides the defaults below, flags override
    /// it (`--print-config` shows where each setting came from).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Base folder of relative image paths (default: each data file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// minicpm, llama3 or qwen [default: detected from config.json].
    #[arg(long, value_parser = parse_llm)]
    llm_type: Option<LlmType>,
    /// Maximum slices per image, 1-64 [default: the checkpoint's, else 9].
    #[arg(long)]
    max_slice_nums: Option<u32>,
    /// Side of the overview and slices in pixels [default: the checkpoint's, else 448].
    #[arg(long)]
    scale_resolution: Option<u32>,
    /// Vision patch size in pixels [default: the checkpoint's, else 14].
    #[arg(long)]
    patch_size: Option<u32>,
    /// Placeholder tokens per image or slice [default: the checkpoint's query_num, else 64].
    #[arg(long)]
    query_num: Option<u32>,
    /// Maximum tokens per sample and per pack [default: 2048].
    #[arg(long)]
    max_length: Option<usize>,
    /// 2.6 image ids: `reference` (the fine-tune code: sliced images only, numbered among
    /// them) or `inference` (every image, as the inference processor) [default: reference].
    #[arg(long, value_enum)]
    image_id_mode: Option<ImageIdModeArg>,
    /// Apply EXIF orientation (changes pixels; the reference does not) [default: off].
    #[arg(long, overrides_with = "no_exif_transpose")]
    exif_transpose: bool,
    /// Keep the stored pixel order (the default; overrides a preset).
    #[arg(long, overrides_with = "exif_transpose")]
    no_exif_transpose: bool,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar (the summary is still printed).
    #[arg(long)]
    quiet: bool,
}

impl SampleFlags {
    /// The preset's `[prep]` table (empty without --config).
    fn preset_layer(&self) -> Result<PrepPreset, String> {
        match &self.config {
            Some(p) => PrepPreset::load(p),
            None => Ok(PrepPreset::default()),
        }
    }

    /// The settings these flags give (absent = not given).
    fn flag_layer(&self) -> PrepPreset {
        PrepPreset {
            llm_type: self.llm_type,
            max_slice_nums: self.max_slice_nums,
            scale_resolution: self.scale_resolution,
            patch_size: self.patch_size,
            query_num: self.query_num,
            max_length: self.max_length,
            image_id_mode: self.image_id_mode.map(|m| match m {
                ImageIdModeArg::Reference => ImageIdMode::Reference,
                ImageIdModeArg::Inference => ImageIdMode::Inference,
            }),
            exif_transpose: flag(self.exif_transpose, self.no_exif_transpose),
            ..PrepPreset::default()
        }
    }

    /// Preset (if any) overlaid with these flags.
    fn preset(&self) -> Result<PrepPreset, String> {
        Ok(self.preset_layer()?.overlay(self.flag_layer()))
    }
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// Training data: a JSON list (the reference format) or JSONL. Repeatable.
    #[arg(long = "data", required_unless_present = "print_config")]
    data: Vec<PathBuf>,
    /// Hugging Face MiniCPM-V checkpoint directory (config.json, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// Output directory for shards, manifest.json and rejected.jsonl.
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
    /// Print the resolved settings as a `[prep]` table, each with its source (default,
    /// checkpoint, preset or flag), and exit without reading data or writing anything.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    sample: SampleFlags,
    /// Cut over-long samples after their last image (while supervision remains) instead of
    /// rejecting them.
    #[arg(long, overrides_with = "no_truncate")]
    truncate: bool,
    /// Reject over-long samples (the default; overrides a preset's `truncate = true`).
    #[arg(long, overrides_with = "truncate")]
    no_truncate: bool,
    /// Pack samples (the default; overrides a preset's `pack = false`).
    #[arg(long, overrides_with = "no_pack")]
    pack: bool,
    /// One sample per pack (no packing).
    #[arg(long, overrides_with = "pack")]
    no_pack: bool,
    /// Upper bound on image slices per pack, 0 = none [default: 40].
    #[arg(long)]
    max_slices_per_pack: Option<usize>,
    /// Samples per packing window (best-fit decreasing within it) [default: 512].
    #[arg(long)]
    pack_window: Option<usize>,
    /// Files to write: arrow (what train maps), parquet or both [default: arrow].
    #[arg(long, value_enum)]
    format: Option<OutputFormat>,
    /// How pixels are stored: slices (the final u8 slices, ready to train on) or source (each
    /// distinct image file once, sliced again by the trainer with the same code: the set costs
    /// about what its images do) [default: slices].
    #[arg(long, value_enum)]
    pixels: Option<Pixels>,
    /// Buffer compression of the Arrow shards: none (the trainer uses the mapped columns in
    /// place), lz4 or zstd (one record batch per pack, decompressed when read; pyarrow reads
    /// them as they are) [default: none].
    #[arg(long, value_enum)]
    compression: Option<ShardCompression>,
    /// Start a new shard after this many MiB [default: 1024].
    #[arg(long)]
    shard_size_mb: Option<u64>,
    /// `skip` bad samples (report them in rejected.jsonl) or `fail` at the first
    /// [default: skip].
    #[arg(long, value_enum)]
    on_error: Option<OnError>,
    /// Replace a previous shard set in --out (it stays whole until the new set is complete;
    /// a failed run leaves it as it was).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["data", "shards"])))]
struct StatsArgs {
    /// Data files to measure (JSON list or JSONL). Repeatable.
    #[arg(long = "data", requires = "model")]
    data: Vec<PathBuf>,
    /// Checkpoint directory (with --data; optional with --shards to find the tokenizer).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Exact figures from a built shard directory instead of data files.
    #[arg(long, conflicts_with = "data")]
    shards: Option<PathBuf>,
    #[command(flatten)]
    sample_flags: SampleFlags,
    /// Measure a uniform random sample of N samples (seeded reservoir) instead of all.
    #[arg(long, conflicts_with = "shards", value_parser = clap::value_parser!(u64).range(1..))]
    sample: Option<u64>,
    /// Seed of --sample.
    #[arg(long, default_value_t = 0, conflicts_with = "shards")]
    seed: u64,
    /// Print the figures as one JSON object (schemas/stats.schema.json).
    #[arg(long)]
    json: bool,
    /// Write a PNG histogram of total tokens with the max length marked (not a --data file,
    /// nor inside --model or --shards).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write one JSON line per measured sample (id and counts; not a --data file, nor inside
    /// --model).
    #[arg(long, conflicts_with = "shards")]
    per_sample: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "index"])))]
struct InspectArgs {
    /// Shard directory written by `prep build`.
    #[arg(long)]
    shards: PathBuf,
    /// Sample id.
    #[arg(long)]
    id: Option<String>,
    /// Row number over the whole set (0-based).
    #[arg(long)]
    index: Option<usize>,
    /// Checkpoint directory for the tokenizer (default: the one in the manifest).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write each slice as a PNG file into this directory (not --shards, nor inside it).
    #[arg(long)]
    dump_images: Option<PathBuf>,
    /// Plain output even on a terminal (loss tokens in [[…]]).
    #[arg(long)]
    no_color: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ImageIdModeArg {
    Reference,
    Inference,
}

/// A `--x` / `--no-x` pair: set only when one of them is given.
fn flag(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

fn parse_llm(s: &str) -> Result<LlmType, String> {
    s.parse()
}

impl BuildArgs {
    /// The flags of this command that are `[prep]` settings, with the shared sample flags.
    fn flag_layer(&self) -> PrepPreset {
        self.sample.flag_layer().overlay(PrepPreset {
            truncate: flag(self.truncate, self.no_truncate),
            pack: flag(self.pack, self.no_pack),
            max_slices_per_pack: self.max_slices_per_pack,
            pack_window: self.pack_window,
            format: self.format,
            pixels: self.pixels,
            compression: self.compression,
            shard_size_mb: self.shard_size_mb,
            on_error: self.on_error,
            ..PrepPreset::default()
        })
    }

    fn options(self) -> Result<BuildOptions, String> {
        let prep = self.sample.preset_layer()?.overlay(self.flag_layer());
        Ok(BuildOptions {
            data: self.data,
            image_root: self.sample.image_root.clone(),
            model: self.model,
            out: self.out.ok_or("--out is required")?,
            prep,
            threads: self.sample.threads,
            overwrite: self.overwrite,
            progress: !self.sample.quiet,
        })
    }
}

fn report_error(e: &dyn std::error::Error) {
    eprintln!("error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}

/// `prep build --print-config`: the resolved `[prep]` table with each setting's source.
fn print_config(args: &BuildArgs) -> u8 {
    let result = (|| -> Result<String, BuildError> {
        let preset = args.sample.preset_layer().map_err(BuildError::Setup)?;
        let flags = args.flag_layer();
        let llm = flags.llm_type.or(preset.llm_type);
        let model = crate::model::ModelDir::load(&args.model, llm)?;
        let settings = crate::build::resolved_with_sources(&model, &preset, &flags)?;
        let preset_name = args
            .sample
            .config
            .as_ref()
            .map(|p| format!("preset {}", p.display()));
        let mut out = format!(
            "# model: {}\n# tokenizer: {}\n[prep]\n",
            args.model.display(),
            model.tokenizer.kind().describe()
        );
        for s in settings {
            let source = match (s.source, &preset_name) {
                (crate::config::SettingSource::Preset, Some(name)) => name.clone(),
                (source, _) => source.name().to_string(),
            };
            let line = format!("{} = {}", s.key, s.value);
            out.push_str(&format!("{line:<40} # {source}\n"));
        }
        Ok(out)
    })();
    print_or_report(result)
}

/// Prints a command's text output, or its error with the chain of causes.
fn print_or_report(result: Result<String, BuildError>) -> u8 {
    match result {
        Ok(text) => {
            print!("{text}");
            EXIT_OK
        }
        Err(e) => {
            report_error(&e);
            EXIT_ERROR
        }
    }
}

fn run_build(args: BuildArgs) -> u8 {
    if args.print_config {
        return print_config(&args);
    }
    let opts = match args.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_ERROR;
        }
    };
    match build(&opts) {
        Ok(report) => {
            let m = &report.manifest;
            let secs = report.elapsed.as_secs_f64().max(1e-9);
            println!(
                "read {} samples: {} written, {} rejected ({:.1} s, {:.0} samples/s, {:.1} MB/s of data and images)",
                m.counts.read,
                m.counts.written,
                m.counts.rejected,
                secs,
                m.counts.read as f64 / secs,
                (report.input_bytes + report.image_bytes) as f64 / secs / 1e6
            );
            for (reason, n) in reasons_by_count(&m.counts.rejected_by_reason) {
                println!("  rejected {n:>8}  {reason}");
            }
            println!("tokenizer: {}", m.model.tokenizer);
            println!(
                "jpeg decoder: {}",
                if cpmv_image::jpeg_simd() {
                    "libjpeg-turbo with SIMD"
                } else {
                    "libjpeg-turbo without SIMD (on x86 a build with nasm installed decodes \
                     ~2.8x faster)"
                }
            );
            println!(
                "tokens: {} total, {} supervised, {} image; {} images, {} slices",
                m.tokens.total,
                m.tokens.supervised,
                m.tokens.image,
                m.tokens.images,
                m.tokens.slices
            );
            println!(
                "packs: {} (max length {}, fill {:.1}%), {} shard(s) in {}",
                m.packing.packs,
                m.packing.max_length,
                m.packing.fill_ratio * 100.0,
                m.shards.len(),
                opts.out.display()
            );
            let shard_bytes: u64 = m.shards.iter().map(|e| e.bytes).sum();
            let codec = match m.compression {
                cpmv_shard::Compression::None => String::new(),
                c => format!(" ({} compressed)", c.name()),
            };
            match &m.images {
                Some(i) => println!(
                    "pixels: source, {} distinct image file(s) in {} ({:.1} MB), shards \
                     {:.1} MB{codec}",
                    i.count,
                    i.file,
                    i.bytes as f64 / 1e6,
                    shard_bytes as f64 / 1e6
                ),
                None => println!(
                    "pixels: slices, shards {:.1} MB{codec} (--pixels source stores the image \
                     files instead)",
                    shard_bytes as f64 / 1e6
                ),
            }
            if m.counts.rejected > 0 {
                println!(
                    "rejected samples are listed in {}",
                    opts.out.join(cpmv_shard::manifest::REJECTED_FILE).display()
                );
                EXIT_REJECTED
            } else {
                EXIT_OK
            }
        }
        Err(e @ BuildError::Sample { .. }) => {
            eprintln!("error: {e}");
            EXIT_SAMPLE_FAILED
        }
        Err(e) => {
            report_error(&e);
            EXIT_ERROR
        }
    }
}

fn run_stats(args: StatsArgs) -> u8 {
    let result = (|| -> Result<crate::stats::StatsReport, BuildError> {
        // Before anything is read or created: --plot is written at the end, --per-sample as
        // samples are measured, and either could be a data file or a file of a shard set.
        let outputs: Vec<(&str, &std::path::Path)> = [
            ("--per-sample", args.per_sample.as_deref()),
            ("--plot", args.plot.as_deref()),
        ]
        .into_iter()
        .filter_map(|(flag, path)| Some((flag, path?)))
        .collect();
        refuse_overlapping_outputs(
            &outputs,
            &args.data,
            args.model.as_deref(),
            args.shards.as_deref(),
        )?;
        if let Some(dir) = &args.shards {
            return stats_from_shards(dir, args.model.as_deref());
        }
        let opts = StatsOptions {
            data: args.data.clone(),
            image_root: args.sample_flags.image_root.clone(),
            model: args
                .model
                .clone()
                .expect("clap requires --model with --data"),
            prep: args.sample_flags.preset().map_err(BuildError::Setup)?,
            sample: args.sample.map(|n| n as usize),
            seed: args.seed,
            threads: args.sample_flags.threads,
            progress: !args.sample_flags.quiet,
            per_sample: args.per_sample.clone(),
        };
        let m = measure(&opts)?;
        Ok(m.measured.report(
            m.samples_read,
            m.rejected_by_reason,
            m.settings_max_length,
            // A "sample" as large as the data set is the data set: exact figures.
            args.sample
                .filter(|&n| n < m.samples_read)
                .map(|_| args.seed),
        ))
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            report_error(&e);
            return EXIT_ERROR;
        }
    };
    if let Some(path) = &args.plot {
        let title = format!("total tokens per sample ({} samples)", report.samples);
        if let Err(e) = crate::plot::histogram_png(&report, &title, path) {
            eprintln!("error: plot: {e}");
            return EXIT_ERROR;
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print!("{}", render_text(&report));
        if let Some(path) = &args.plot {
            println!("histogram written to {}", path.display());
        }
    }
    EXIT_OK
}

fn run_inspect(args: InspectArgs) -> u8 {
    let opts = InspectOptions {
        shards: args.shards,
        id: args.id,
        index: args.index,
        model: args.model,
        dump_images: args.dump_images,
        color: args.no_color.then_some(false),
    };
    print_or_report(inspect(&opts))
}

/// Entry point of the `prep` binary.
pub fn main() -> ExitCode {
    // Behave like other command-line tools when the reader of stdout goes away
    // (`prep stats ... | head`): end quietly instead of panicking on a failed print.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Build(args) => run_build(args),
        Command::Stats(args) => run_stats(args),
        Command::Inspect(args) => run_inspect(args),
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag of every command says what it does, and every setting flag its default
    /// (in clap's `[default: …]` or in its help text).
    #[test]
    fn every_flag_has_help_and_settings_their_default() {
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let help = arg
                    .get_help()
                    .or(arg.get_long_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                assert!(!help.is_empty(), "{path} --{id} has no help");
                let is_setting = PrepPreset::keys().iter().any(|k| k == id);
                if is_setting && arg.get_action().takes_values() {
                    assert!(
                        help.contains("default") || !arg.get_default_values().is_empty(),
                        "{path} --{id} does not say its default: {help}"
                    );
                }
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "prep");
    }

    /// `--print-config` lists every key a preset may set, each once.
    #[test]
    fn print_config_covers_every_preset_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/models/minicpm-v-2_6-tiny");
        let model = crate::model::ModelDir::load(&dir, None).unwrap();
        let d = PrepPreset::default();
        let mut got: Vec<String> = crate::build::resolved_with_sources(&model, &d, &d)
            .unwrap()
            .iter()
            .map(|r| r.key.to_string())
            .collect();
        let mut want = PrepPreset::keys();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(want.len(), 17);
    }
}
