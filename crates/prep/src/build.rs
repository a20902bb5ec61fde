//! `prep build`: stream samples from the data files, process them in parallel, pack them and
//! write shards, the rejection report and the manifest.
//!
//! Samples stream through a rayon pool, a bounded number in flight, and their results are
//! consumed in input order ([`process_in_order`]), so the output is byte-identical whatever the
//! thread count. Packing needs only lengths and slice counts, so samples are planned first
//! (JSON, image headers, tokens) and packed; a pack's images are decoded and sliced into one
//! buffer when the pack is final, a pack per job, and that buffer goes to the file as it is. A
//! writer thread overlaps Arrow/Parquet writing with the processing. Memory is bounded by the
//! packs in flight (count and bytes), the packing window of planned samples and the writer
//! queue.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cpmv_fsio::Input;
use cpmv_shard::fingerprint::sha256_hex;
use cpmv_shard::manifest::{
    Counts, Fingerprints, InputFile, Manifest, ModelInfo, Packing, TokenTotals, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_FILE, REJECTED_FILE,
};
use cpmv_shard::writer::{is_set_file_name, PARTIAL_SUFFIX};
use cpmv_shard::{
    BuildSettings, ClosedShardSet, PackPixels, Sample, ShardEntry, ShardSetWriter, WriterOptions,
};

use crate::config::{
    defaults, BuildOptions, OnError, OutputFormat, PrepPreset, ResolvedSetting, SettingSource,
};
use crate::input::{InputError, Location, RawSample, SampleReader};
use crate::model::{ModelDir, ModelError};
use crate::pack::{PackConfig, Packable, Packer};
use crate::process::{InputSource, Planned, Processor, Rejected, SampleSettings};
use crate::reject::{RejectKind, RejectionRecord};

/// Why a build stopped.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Shard(#[from] cpmv_shard::ShardError),
    /// An output that overlaps an input, or a file that could not be made durable.
    #[error(transparent)]
    Fs(#[from] cpmv_fsio::FsError),
    #[error("{0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The shard writer thread stopped; its own error is reported instead when it has one.
    #[error("the shard writer stopped")]
    WriterStopped,
    /// `--on-error fail` met a bad sample.
    #[error("{file} sample {index} ({location}, id {id:?}): {kind}: {message}")]
    Sample {
        file: String,
        index: u64,
        location: String,
        id: String,
        kind: &'static str,
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a finished build reports.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub manifest: Manifest,
    pub elapsed: Duration,
    /// Bytes of input data files.
    pub input_bytes: u64,
    /// Bytes of image files read for written samples.
    pub image_bytes: u64,
}

impl BuildReport {
    /// True when every sample was written.
    pub fn clean(&self) -> bool {
        self.manifest.counts.rejected == 0
    }
}

/// Resolves every sample setting from the model directory and the user's settings.
pub fn resolve_settings(model: &ModelDir, p: &PrepPreset) -> Result<SampleSettings, BuildError> {
    let s = SampleSettings {
        llm_type: model.llm_type,
        max_slice_nums: p.max_slice_nums.unwrap_or(model.slice.max_slice_nums),
        scale_resolution: p.scale_resolution.unwrap_or(model.slice.scale_resolution),
        patch_size: p.patch_size.unwrap_or(model.slice.patch_size),
        query_num: p.query_num.unwrap_or(model.query_num),
        max_length: p.max_length.unwrap_or(defaults::MAX_LENGTH),
        truncate: p.truncate.unwrap_or(false),
        image_id_mode: p.image_id_mode.unwrap_or_default(),
        exif_transpose: p.exif_transpose.unwrap_or(false),
    };
    let bad = |m: &str| Err(BuildError::Setup(m.to_string()));
    if !(1..=64).contains(&s.max_slice_nums) {
        return bad(&format!(
            "--max-slice-nums (max_slice_nums) is {}: expected 1 to 64",
            s.max_slice_nums
        ));
    }
    if !(1..=8192).contains(&s.scale_resolution) {
        return bad(&format!(
            "--scale-resolution (scale_resolution) is {}: expected 1 to 8192",
            s.scale_resolution
        ));
    }
    if !(1..=s.scale_resolution).contains(&s.patch_size) {
        return bad(&format!(
            "--patch-size (patch_size) is {}: expected 1 to the scale resolution ({})",
            s.patch_size, s.scale_resolution
        ));
    }
    if !(1..=4096).contains(&s.query_num) {
        return bad(&format!(
            "--query-num (query_num) is {}: expected 1 to 4096",
            s.query_num
        ));
    }
    if !(1..=1 << 24).contains(&s.max_length) {
        return bad(&format!(
            "--max-length (max_length) is {}: expected 1 to 16777216",
            s.max_length
        ));
    }
    Ok(s)
}

/// Every `[prep]` setting a build with these layers would use, each with where it came from:
/// a flag, else the preset, else the checkpoint (slicing, query_num, llm type), else prep's
/// default. Validated like a build validates them. What `prep build --print-config` prints.
pub fn resolved_with_sources(
    model: &ModelDir,
    preset: &PrepPreset,
    flags: &PrepPreset,
) -> Result<Vec<ResolvedSetting>, BuildError> {
    let merged = preset.clone().overlay(flags.clone());
    let s = resolve_settings(model, &merged)?;
    let source = |key: &'static str, flag: bool, preset: bool, checkpoint: bool| {
        if flag {
            SettingSource::Flag
        } else if preset {
            SettingSource::Preset
        } else if checkpoint && !model.defaulted.contains(&key) {
            SettingSource::Checkpoint
        } else {
            SettingSource::Default
        }
    };
    let mut out = Vec::new();
    macro_rules! setting {
        ($key:ident, $val:expr, $checkpoint:expr) => {
            out.push(ResolvedSetting {
                key: stringify!($key),
                value: toml_value(&$val),
                source: source(
                    stringify!($key),
                    flags.$key.is_some(),
                    preset.$key.is_some(),
                    $checkpoint,
                ),
            })
        };
    }
    setting!(llm_type, s.llm_type, true);
    setting!(max_slice_nums, s.max_slice_nums, true);
    setting!(scale_resolution, s.scale_resolution, true);
    setting!(patch_size, s.patch_size, true);
    setting!(query_num, s.query_num, true);
    setting!(max_length, s.max_length, false);
    setting!(truncate, s.truncate, false);
    setting!(image_id_mode, s.image_id_mode, false);
    setting!(exif_transpose, s.exif_transpose, false);
    setting!(pack, merged.pack.unwrap_or(true), false);
    setting!(
        max_slices_per_pack,
        merged
            .max_slices_per_pack
            .unwrap_or(defaults::MAX_SLICES_PER_PACK),
        false
    );
    setting!(
        pack_window,
        merged.pack_window.unwrap_or(defaults::PACK_WINDOW),
        false
    );
    setting!(format, merged.format.unwrap_or_default(), false);
    setting!(pixels, merged.pixels.unwrap_or_default(), false);
    setting!(compression, merged.compression.unwrap_or_default(), false);
    setting!(
        shard_size_mb,
        merged.shard_size_mb.unwrap_or(defaults::SHARD_SIZE_MB),
        false
    );
    setting!(on_error, merged.on_error.unwrap_or_default(), false);
    Ok(out)
}

/// A setting value as TOML text (`9`, `true`, `"qwen"`).
fn toml_value<T: serde::Serialize>(v: &T) -> String {
    toml::Value::try_from(v).map_or_else(|e| format!("(unprintable: {e})"), |v| v.to_string())
}

/// Refuses an `--out` that could overwrite or delete an input, before anything is touched
/// (paths compared with symlinks resolved): one that is, contains or lies inside `--model`;
/// one that is or contains a `--data` file; one that is or contains `--image-root` (a shard
/// directory inside the image folder is fine).
fn refuse_overlapping_out(opts: &BuildOptions) -> Result<(), BuildError> {
    let mut inputs = vec![Input {
        flag: "--model",
        path: &opts.model,
    }];
    inputs.extend(opts.data.iter().map(|path| Input {
        flag: "--data",
        path,
    }));
    cpmv_fsio::refuse_overlap("--out", &opts.out, &inputs)?;
    if let Some(root) = &opts.image_root {
        refuse_out_containing(&opts.out, "--image-root", root)?;
    }
    Ok(())
}

/// Refuses an `out` that is or contains `input` (but not one inside it).
fn refuse_out_containing(out: &Path, flag: &str, input: &Path) -> Result<(), BuildError> {
    let (o, i) = (cpmv_fsio::resolve(out)?, cpmv_fsio::resolve(input)?);
    let relation = if o == i {
        "is"
    } else if i.starts_with(&o) {
        "contains"
    } else {
        return Ok(());
    };
    Err(BuildError::Setup(format!(
        "--out {} {relation} {flag} {} ({}); --overwrite deletes files in --out: choose an \
         output directory outside it (a folder inside it is fine)",
        out.display(),
        input.display(),
        i.display()
    )))
}

/// True for a directory entry `prep build` may have written: a regular file with one of the
/// shard set's names (final or `.partial`), see [`is_set_file_name`].
fn is_set_file(entry: &std::fs::DirEntry) -> bool {
    entry.file_type().is_ok_and(|t| t.is_file())
        && entry.file_name().to_str().is_some_and(is_set_file_name)
}

/// True for a `.partial` name: a file a run writes before it publishes it.
fn is_partial_name(entry: &std::fs::DirEntry) -> bool {
    entry
        .file_name()
        .to_str()
        .is_some_and(|n| n.ends_with(PARTIAL_SUFFIX))
}

/// Makes `out` ready for a new shard set. A missing directory is created and an empty one
/// used. A non-empty one needs `overwrite`, and then the whole directory is checked before
/// anything is deleted: when an entry is not one `prep build` writes, or `manifest.json` is
/// not a cpmv shard manifest, nothing is touched and the foreign entries are named. Only the
/// `.partial` leftovers of an earlier run are removed here: the previous set stays complete
/// and readable until the new one is ready to be published ([`replace_previous_set`]).
fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<(), BuildError> {
    let entries = match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::create_dir_all(out).map_err(io_err(out));
        }
        Err(e) => return Err(io_err(out)(e)),
        Ok(dir) => dir.collect::<Result<Vec<_>, _>>().map_err(io_err(out))?,
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(BuildError::Setup(format!(
            "{} exists and is not empty; pass --overwrite to replace a previous shard set",
            out.display()
        )));
    }
    let mut foreign: Vec<String> = entries
        .iter()
        .filter(|e| !is_set_file(e))
        .map(|e| format!("{:?}", e.file_name()))
        .collect();
    if !foreign.is_empty() {
        foreign.sort();
        const SHOWN: usize = 10;
        let more = foreign.len().saturating_sub(SHOWN);
        foreign.truncate(SHOWN);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        return Err(BuildError::Setup(format!(
            "--overwrite: {} holds {}{tail}, which prep build did not write; refusing to \
             overwrite (nothing was deleted): move them away or choose another --out",
            out.display(),
            foreign.join(", ")
        )));
    }
    check_manifest_is_ours(out)?;
    remove_set_files(out, SetFiles::Partial)
}

/// Refuses a directory whose `manifest.json` (when there is one) is not a cpmv shard
/// manifest: a file that is not JSON, or JSON without `"format": "cpmv-shards"`, was written
/// by someone else, and the shard-like files next to it are theirs too. Any format version is
/// accepted (a set from an older cpmv is still prep's own).
fn check_manifest_is_ours(out: &Path) -> Result<(), BuildError> {
    let path = out.join(MANIFEST_FILE);
    let file = match std::fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path)(e)),
        Ok(f) => f,
    };
    // A manifest lists one entry per shard: far below this. A larger file is not prep's and
    // is not read whole.
    const MAX_MANIFEST_BYTES: u64 = 256 << 20;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(&path))?;
    let format = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("format")?.as_str().map(str::to_owned));
    if format.as_deref() == Some(FORMAT_NAME) {
        return Ok(());
    }
    let found = match format {
        Some(f) => format!("its \"format\" is {f:?}"),
        None => "it is not JSON with a \"format\" field".to_string(),
    };
    Err(BuildError::Setup(format!(
        "--overwrite: {} is not a cpmv shard manifest ({found}, expected {FORMAT_NAME:?}): the \
         directory holds someone else's files; refusing to overwrite (nothing was deleted): \
         move them away or choose another --out",
        path.display()
    )))
}

/// Which files of a shard set [`remove_set_files`] removes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SetFiles {
    /// `.partial` files only: an unpublished run's.
    Partial,
    /// The published ones only: a previous set's.
    Final,
    /// Both.
    All,
}

impl SetFiles {
    fn covers(self, entry: &std::fs::DirEntry) -> bool {
        is_set_file(entry)
            && match self {
                SetFiles::Partial => is_partial_name(entry),
                SetFiles::Final => !is_partial_name(entry),
                SetFiles::All => true,
            }
    }
}

/// Removes the set files `which` selects from `out` (regular files with the set's names;
/// nothing else). With [`SetFiles::All`], `manifest.json` goes first and the directory is
/// flushed, so an interrupted clean-up never leaves a manifest that lists missing shards (when
/// it cannot be removed, nothing else is); [`SetFiles::Final`] is only used once the caller
/// has done that. Then tries every other file, flushes the directory when anything was
/// removed and returns the first error.
fn remove_set_files(out: &Path, which: SetFiles) -> Result<(), BuildError> {
    if which == SetFiles::All && remove_manifest(out)? {
        cpmv_fsio::sync_dir(out)?;
    }
    let mut first_err = None;
    let mut removed = false;
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let res = entry.map_err(io_err(out)).and_then(|e| {
            if which.covers(&e) {
                removed = true;
                std::fs::remove_file(e.path()).map_err(io_err(&e.path()))
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
    }
    if removed {
        if let Err(e) = cpmv_fsio::sync_dir(out) {
            first_err.get_or_insert(e.into());
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Removes `out/manifest.json` when it is a regular file; returns whether it was there.
fn remove_manifest(out: &Path) -> Result<bool, BuildError> {
    let manifest = out.join(MANIFEST_FILE);
    if !std::fs::symlink_metadata(&manifest).is_ok_and(|m| m.is_file()) {
        return Ok(false);
    }
    std::fs::remove_file(&manifest).map_err(io_err(&manifest))?;
    Ok(true)
}

/// How far a run got in replacing the previous set, for the clean-up after a failure.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// Only `.partial` files were written: the previous set (if any) is untouched.
    Writing,
    /// The previous manifest is gone: what is left of the old set is no longer a set, and
    /// the new one is not one yet.
    Replacing,
}

/// Removes the previous set's published files just before the new set is published (the
/// new files still carry `.partial` names, so none of them is touched): `manifest.json`
/// first, the directory flushed, then `rejected.jsonl` and every shard file, including those
/// with indices the new set does not have, and the directory flushed again. `stage` becomes
/// [`Stage::Replacing`] once the old manifest is gone; a failure before that leaves the old
/// set whole.
fn replace_previous_set(out: &Path, stage: &mut Stage) -> Result<(), BuildError> {
    let had_manifest = remove_manifest(out)?;
    *stage = Stage::Replacing;
    if had_manifest {
        cpmv_fsio::sync_dir(out)?;
    }
    remove_set_files(out, SetFiles::Final)
}

/// The data files of a run (with their sizes) and where their relative image paths point.
pub(crate) fn input_sources(
    data: &[PathBuf],
    image_root: Option<&Path>,
) -> Result<(Vec<(InputSource, u64)>, u64), BuildError> {
    let mut sources = Vec::with_capacity(data.len());
    let mut total = 0;
    for path in data {
        let len = std::fs::metadata(path).map_err(io_err(path))?.len();
        total += len;
        let source = InputSource {
            path: path.clone(),
            stem: path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            image_root: match image_root {
                Some(r) => r.to_path_buf(),
                None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            },
        };
        sources.push((source, len));
    }
    Ok((sources, total))
}

/// The worker pool (`threads`, default all cores) and its size.
pub(crate) fn thread_pool(
    threads: Option<usize>,
) -> Result<(rayon::ThreadPool, usize), BuildError> {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| BuildError::Setup(format!("thread pool: {e}")))?;
    Ok((pool, n))
}

/// A bytes-based progress bar (hidden when `enabled` is false or stderr is not a terminal).
pub(crate) fn progress_bar(total: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// The chat template text training samples are made with (fingerprinted in the manifest).
pub fn training_chat_template(model: &ModelDir) -> String {
    cpmv_shard::fingerprint::training_chat_template(model.llm_type, model.chat_template.as_deref())
}

/// Everything a build needs before it touches the output directory: the model checked, the
/// settings resolved and fingerprinted, the input files measured.
struct BuildSetup {
    processor: Processor,
    tokenizer: crate::tokenizer::TokenizerKind,
    settings: SampleSettings,
    pack_cfg: PackConfig,
    format: OutputFormat,
    pixels: cpmv_shard::PixelMode,
    compression: cpmv_shard::Compression,
    on_error: OnError,
    build_settings: BuildSettings,
    fingerprints: Fingerprints,
    sources: Vec<(InputSource, u64)>,
    input_bytes: u64,
}

impl BuildSetup {
    fn new(opts: &BuildOptions) -> Result<BuildSetup, BuildError> {
        let model = ModelDir::load(&opts.model, opts.prep.llm_type)?;
        model.check_vocab()?;
        let settings = resolve_settings(&model, &opts.prep)?;
        let batch_vision = model.batch_vision;
        let chat_template = training_chat_template(&model);
        let tokenizer_sha = model.tokenizer_sha256.clone();
        let tokenizer = model.tokenizer.kind();
        let mut processor = Processor::new(model, settings.clone())
            .map_err(|e| BuildError::Setup(format!("{}: {e}", opts.model.display())))?;
        let pixels: cpmv_shard::PixelMode = opts.prep.pixels.unwrap_or_default().into();
        processor.keep_source = pixels == cpmv_shard::PixelMode::Source;
        let pack_cfg = PackConfig {
            enabled: opts.prep.pack.unwrap_or(true),
            max_length: settings.max_length,
            max_slices: opts
                .prep
                .max_slices_per_pack
                .unwrap_or(defaults::MAX_SLICES_PER_PACK),
            window: opts.prep.pack_window.unwrap_or(defaults::PACK_WINDOW),
            window_bytes: defaults::PACK_WINDOW_BYTES,
        };
        let build_settings = BuildSettings {
            format_version: FORMAT_VERSION,
            sample: settings.clone(),
            batch_vision,
            pack: pack_cfg.enabled,
            max_slices_per_pack: pack_cfg.max_slices,
            pack_window: pack_cfg.window,
        };
        let fingerprints = Fingerprints {
            tokenizer: tokenizer_sha,
            chat_template: sha256_hex(chat_template.as_bytes()),
            settings: sha256_hex(build_settings.canonical_json().as_bytes()),
        };
        let (sources, input_bytes) = input_sources(&opts.data, opts.image_root.as_deref())?;
        Ok(BuildSetup {
            processor,
            tokenizer,
            settings,
            pack_cfg,
            format: opts.prep.format.unwrap_or_default(),
            pixels,
            compression: opts.prep.compression.unwrap_or_default().into(),
            on_error: opts.prep.on_error.unwrap_or_default(),
            build_settings,
            fingerprints,
            sources,
            input_bytes,
        })
    }
}

/// What the sample loop adds up for the manifest.
#[derive(Default)]
struct RunTotals {
    counts: Counts,
    tokens: TokenTotals,
    inputs: Vec<InputFile>,
    packs: u64,
    image_bytes: u64,
}

/// Runs `prep build`.
///
/// Nothing is touched before the inputs, the model and the output directory have been checked.
/// The output is written under `.partial` names; a previous set in `--out` (with `--overwrite`)
/// stays complete and readable meanwhile. Once every sample is written, the previous set's
/// files are removed (its manifest first) and the new ones published in order (shards, then
/// `rejected.jsonl`, then `manifest.json`), each flushed to the disk first. When the run fails
/// before the previous manifest was removed, only the files it wrote are removed and the
/// previous set is left as it was; after that point every set file is removed, so a failed
/// run never leaves a manifest (the mark of a finished set) over a mix of files.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let start = Instant::now();
    refuse_overlapping_out(opts)?;
    let setup = BuildSetup::new(opts)?;
    prepare_out_dir(&opts.out, opts.overwrite)?;
    let input_bytes = setup.input_bytes;
    let mut stage = Stage::Writing;
    match write_set(opts, setup, start, &mut stage) {
        Ok((manifest, image_bytes)) => Ok(BuildReport {
            manifest,
            elapsed: start.elapsed(),
            input_bytes,
            image_bytes,
        }),
        Err(e) => {
            // prepare_out_dir removed every `.partial` leftover: the partial files now in
            // `out` are this run's. Once the previous manifest is gone, nothing in `out` is a
            // set any more, and every set file goes.
            let which = match stage {
                Stage::Writing => SetFiles::Partial,
                Stage::Replacing => SetFiles::All,
            };
            let _ = remove_set_files(&opts.out, which);
            Err(e)
        }
    }
}

/// Processes every sample into `opts.out` under `.partial` names, replaces the previous set
/// and publishes the new one; returns the manifest and the bytes of images read. On an error
/// the caller removes what was written (and, past [`Stage::Replacing`], what is left of the
/// previous set).
fn write_set(
    opts: &BuildOptions,
    setup: BuildSetup,
    start: Instant,
    stage: &mut Stage,
) -> Result<(Manifest, u64), BuildError> {
    let rejected_path = opts.out.join(format!("{REJECTED_FILE}{PARTIAL_SUFFIX}"));
    let mut rejected_out = std::io::BufWriter::new(
        std::fs::File::create(&rejected_path).map_err(io_err(&rejected_path))?,
    );
    let (closed, totals) = run_samples(opts, &setup, &mut rejected_out, &rejected_path, start)?;
    // Flushed into the file here; flushed to the disk when published.
    rejected_out
        .into_inner()
        .map_err(|e| io_err(&rejected_path)(e.into_error()))?;

    if let Err(e) = replace_previous_set(&opts.out, stage) {
        closed.discard();
        return Err(e);
    }
    let images = closed.images().cloned();
    let shards = closed.publish()?;
    cpmv_fsio::publish(&rejected_path, &opts.out.join(REJECTED_FILE))?;
    let image_bytes = totals.image_bytes;
    let mut manifest = make_manifest(opts, setup, totals, shards);
    manifest.images = images;
    manifest.save(&opts.out)?;
    Ok((manifest, image_bytes))
}

/// What the writer thread receives: a pack (id, rows, their slices), or `None` for "the run
/// succeeded, close the set".
type PackMsg = Option<(u32, Vec<Sample>, PackPixels)>;

/// The shard writer thread: packs arrive through `rx`; `None` means "the run succeeded, close
/// the set". A channel closed without it means the run failed: the writer removes its partial
/// files. Returns the closed (complete, flushed, not yet published) set.
fn spawn_writer(
    dir: PathBuf,
    opts: WriterOptions,
    rx: mpsc::Receiver<PackMsg>,
) -> std::thread::JoinHandle<Result<ClosedShardSet, BuildError>> {
    std::thread::spawn(move || {
        let mut w = ShardSetWriter::new(&dir, opts);
        for msg in rx {
            match msg {
                Some((pack, rows, pixels)) => {
                    if let Err(e) = w.write_pack_pixels(pack, rows, pixels) {
                        w.abort();
                        return Err(e.into());
                    }
                }
                None => return Ok(w.close()?),
            }
        }
        w.abort();
        Err(BuildError::WriterStopped)
    })
}

/// Streams, processes and packs every sample: rows go to the writer thread, rejections to
/// `rejected_out`. Returns the closed shard set and the totals.
fn run_samples(
    opts: &BuildOptions,
    setup: &BuildSetup,
    rejected_out: &mut impl Write,
    rejected_path: &Path,
    start: Instant,
) -> Result<(ClosedShardSet, RunTotals), BuildError> {
    let (pool, threads) = thread_pool(opts.threads)?;
    let writer_opts = WriterOptions {
        max_shard_bytes: opts.prep.shard_size_mb.unwrap_or(defaults::SHARD_SIZE_MB) << 20,
        parquet: matches!(setup.format, OutputFormat::Parquet | OutputFormat::Both),
        arrow: matches!(setup.format, OutputFormat::Arrow | OutputFormat::Both),
        pixels: setup.pixels,
        compression: setup.compression,
        ..Default::default()
    };
    let (tx, rx) = mpsc::sync_channel::<PackMsg>(4);
    let writer = spawn_writer(opts.out.clone(), writer_opts, rx);

    let pb = progress_bar(setup.input_bytes, opts.progress);
    // Per input file from the start: a file's samples can be rejected (when their pixels are
    // made) after the next file has begun.
    let mut totals = RunTotals {
        inputs: setup
            .sources
            .iter()
            .map(|(source, bytes)| InputFile {
                path: source.path.display().to_string(),
                bytes: *bytes,
                samples: 0,
                written: 0,
                rejected: 0,
            })
            .collect(),
        ..RunTotals::default()
    };
    let mut packer = Packer::new(setup.pack_cfg);
    let mut bytes_before = 0u64;
    // Samples being planned at once (JSON, image headers, tokens: a few kB each): enough that
    // a slow one never idles the other threads.
    let window = 8 * threads.max(1) + 8;
    // Packs whose pixels are being made at once (a pack's slices are up to a few tens of MB):
    // a few per thread, so a slow pack does not idle the others; fewer when packs are larger
    // than PACK_PIXEL_BUDGET (see `PackRun::finish_packs`).
    let pack_window = 2 * threads.max(1) + 2;
    // Finished packs are handed to the pixel stage this many at a time (and at the end of
    // every input file), so that its threads have work side by side even when packs come one
    // at a time (`--no-pack`).
    let pack_batch = 16 * pack_window;
    let mut ready: Vec<Vec<Waiting>> = Vec::new();
    let processor = &setup.processor;
    let sources: Vec<&InputSource> = setup.sources.iter().map(|(s, _)| s).collect();
    let mut run = PackRun {
        pb: &pb,
        start,
        pool: &pool,
        pack_window,
        processor,
        sources: &sources,
        on_error: setup.on_error,
        tx: &tx,
        rejected_out,
        rejected_path,
    };

    let result: Result<(), BuildError> = (|| {
        for (file_idx, (source, file_bytes)) in setup.sources.iter().enumerate() {
            let mut reader = SampleReader::open(&source.path, file_idx)?;
            let jobs = std::iter::from_fn(|| {
                let raw = reader.next()?;
                let at = reader.bytes_read;
                Some(raw.map(|raw| (raw, at)))
            });
            let base = bytes_before;
            let work = |(raw, at): (RawSample, u64)| {
                let res = processor.plan_guarded(&raw, source);
                (Origin::of(&raw, base + at), res)
            };
            process_in_order(&pool, window, jobs, work, |(origin, res)| {
                totals.counts.read += 1;
                totals.inputs[file_idx].samples += 1;
                match res {
                    Ok(planned) => {
                        ready.extend(packer.push((origin, planned)));
                        if ready.len() < pack_batch {
                            return Ok(());
                        }
                        run.finish_packs(std::mem::take(&mut ready), &mut totals)
                    }
                    Err(rej) => run.reject(&mut totals, origin, rej),
                }
            })?;
            // Packs already final go out before the next file is read (which may be slow to
            // come, e.g. a pipe).
            run.finish_packs(std::mem::take(&mut ready), &mut totals)?;
            bytes_before += file_bytes;
        }
        ready.extend(packer.flush());
        run.finish_packs(std::mem::take(&mut ready), &mut totals)?;
        tx.send(None).map_err(|_| BuildError::WriterStopped)
    })();
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| BuildError::Setup("the shard writer panicked".into()))?;
    pb.finish_and_clear();
    match (result, written) {
        (Ok(()), written) => Ok((written?, totals)),
        // The writer's own error (disk full, permissions) explains a stopped writer best.
        (Err(BuildError::WriterStopped), Err(e)) => Err(e),
        (Err(e), written) => {
            if let Ok(closed) = written {
                closed.discard();
            }
            Err(e)
        }
    }
}

/// Where a sample came from: what a rejection names, and how far into the input it ends.
#[derive(Clone, Copy, Debug)]
struct Origin {
    file: usize,
    index: u64,
    location: Location,
    /// Input bytes (all files so far) read up to the end of this sample.
    at: u64,
}

impl Origin {
    fn of(raw: &RawSample, at: u64) -> Self {
        Self {
            file: raw.file,
            index: raw.index,
            location: raw.location,
            at,
        }
    }
}

/// A planned sample waiting in the packing window.
type Waiting = (Origin, Planned);

impl Packable for Waiting {
    fn num_tokens(&self) -> usize {
        self.1.num_tokens()
    }
    fn num_slices(&self) -> usize {
        self.1.num_slices()
    }
    fn pixel_bytes(&self) -> usize {
        self.1.pixel_bytes()
    }
}

/// Pixel bytes per pack of the pixel stage's window: packs larger than this shrink the window
/// (down to one pack at a time), so the slices in flight stay under `pack_window` times this.
const PACK_PIXEL_BUDGET: usize = 32 << 20;

/// What turns packed samples into rows for the writer, and records rejections.
struct PackRun<'a, W: Write> {
    pb: &'a indicatif::ProgressBar,
    start: Instant,
    pool: &'a rayon::ThreadPool,
    /// Packs in flight in [`PackRun::finish_packs`].
    pack_window: usize,
    processor: &'a Processor,
    sources: &'a [&'a InputSource],
    on_error: OnError,
    tx: &'a mpsc::SyncSender<PackMsg>,
    rejected_out: &'a mut W,
    rejected_path: &'a Path,
}

impl<W: Write> PackRun<'_, W> {
    /// Makes the pixels of every pack of `packs` (a pack per job, on the pool, in pack order;
    /// its slices in one buffer, the one the writer writes) and sends each pack's rows to the
    /// writer. A sample whose images fail to decode is rejected here, after packing: its pack
    /// goes out without it (a pack left empty is dropped), so only such a sample's pack is
    /// less full than planned.
    fn finish_packs(
        &mut self,
        packs: Vec<Vec<Waiting>>,
        totals: &mut RunTotals,
    ) -> Result<(), BuildError> {
        let processor = self.processor;
        let pack_bytes =
            |rows: &[Waiting]| -> usize { rows.iter().map(|w| processor.slice_bytes(&w.1)).sum() };
        let largest = packs.iter().map(|p| pack_bytes(p)).max().unwrap_or(0);
        let window =
            (self.pack_window * PACK_PIXEL_BUDGET / largest.max(1)).clamp(1, self.pack_window);
        let jobs = packs.into_iter().map(Ok);
        let work = |rows: Vec<Waiting>| {
            let bytes = pack_bytes(&rows);
            let mut pixels = PackPixels {
                data: Vec::with_capacity(bytes),
                ..PackPixels::default()
            };
            let rows: Vec<_> = rows
                .into_iter()
                .map(|(origin, planned)| {
                    (origin, processor.pixels_into_guarded(planned, &mut pixels))
                })
                .collect();
            (rows, pixels)
        };
        process_in_order(self.pool, window, jobs, work, |(rows, pixels)| {
            let mut samples = Vec::with_capacity(rows.len());
            for (origin, res) in rows {
                match res {
                    Ok(prepared) => {
                        totals.counts.written += 1;
                        totals.inputs[origin.file].written += 1;
                        add_sample(totals, &prepared);
                        samples.push(prepared.sample);
                        self.progress(totals, origin);
                    }
                    Err(rej) => self.reject(totals, origin, rej)?,
                }
            }
            self.send(samples, pixels, totals)
        })
    }

    /// Shows how far the finished samples (written or rejected) reach into the input.
    fn progress(&self, totals: &RunTotals, origin: Origin) {
        let c = &totals.counts;
        let done = c.written + c.rejected;
        if origin.at > self.pb.position() {
            self.pb.set_position(origin.at);
        }
        if done.is_multiple_of(16) {
            let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
            self.pb.set_message(format!(
                "{done} samples ({} rejected), {rate:.0}/s",
                c.rejected
            ));
        }
    }

    /// Sends one pack's rows to the writer (nothing when every sample of it was rejected).
    fn send(
        &mut self,
        rows: Vec<Sample>,
        pixels: PackPixels,
        totals: &mut RunTotals,
    ) -> Result<(), BuildError> {
        if rows.is_empty() {
            return Ok(());
        }
        let pack = u32::try_from(totals.packs)
            .map_err(|_| BuildError::Setup("more than 2^32 packs".into()))?;
        if self.tx.send(Some((pack, rows, pixels))).is_err() {
            // The writer stopped on an error; it is reported when joined.
            return Err(BuildError::WriterStopped);
        }
        totals.packs += 1;
        Ok(())
    }

    /// Records a rejected sample (or, with `--on-error fail`, stops the run naming it).
    fn reject(
        &mut self,
        totals: &mut RunTotals,
        origin: Origin,
        rej: Rejected,
    ) -> Result<(), BuildError> {
        let source = self.sources[origin.file];
        if self.on_error == OnError::Fail {
            return Err(BuildError::Sample {
                file: source.path.display().to_string(),
                index: origin.index,
                location: origin.location.to_string(),
                id: rej.id,
                kind: rej.rejection.kind.name(),
                message: rej.rejection.message,
            });
        }
        totals.inputs[origin.file].rejected += 1;
        record_rejection(
            &mut totals.counts,
            source,
            origin,
            rej,
            self.rejected_out,
            self.rejected_path,
        )?;
        self.progress(totals, origin);
        Ok(())
    }
}

/// Runs `work` on every job `jobs` yields, on `pool`, at most `window` at a time, and hands each
/// result to `handle` on this thread in the jobs' order. A slow job holds back only the handling
/// of the ones after it, never the other threads' work, as long as fewer than `window` jobs wait
/// behind it; the results do not depend on `pool`'s size. `work` must not panic (the sample
/// steps turn panics into rejections); if it does, the run stops with an internal error.
fn process_in_order<J: Send, R: Send>(
    pool: &rayon::ThreadPool,
    window: usize,
    mut jobs: impl Iterator<Item = Result<J, InputError>>,
    work: impl Fn(J) -> R + Sync,
    mut handle: impl FnMut(R) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let (tx, rx) = mpsc::channel::<(u64, Option<R>)>();
    let work = &work;
    let window = window.max(1) as u64;
    pool.in_place_scope(|scope| {
        // Results that came back ahead of their turn, by sequence number.
        let mut finished: HashMap<u64, Option<R>> = HashMap::new();
        // Sequence numbers: the next to hand out, and the next to hand to `handle` (the
        // jobs in flight are those in between).
        let (mut next, mut front) = (0u64, 0u64);
        let mut exhausted = false;
        loop {
            while !exhausted && next - front < window {
                match jobs.next() {
                    None => exhausted = true,
                    Some(job) => {
                        let (job, tx, seq) = (job?, tx.clone(), next);
                        next += 1;
                        scope.spawn(move |_| {
                            let result =
                                std::panic::catch_unwind(AssertUnwindSafe(|| work(job))).ok();
                            // The receiver outlives the scope, so the send cannot fail.
                            let _ = tx.send((seq, result));
                        });
                    }
                }
            }
            if front == next {
                return Ok(());
            }
            let result = loop {
                if let Some(done) = finished.remove(&front) {
                    break done;
                }
                // This thread holds a sender, so `recv` waits for a job rather than failing;
                // every spawned job sends exactly once.
                match rx.recv() {
                    Ok((seq, done)) => {
                        finished.insert(seq, done);
                    }
                    Err(_) => unreachable!("a sender is held by this thread"),
                }
            };
            front += 1;
            let result = result.ok_or_else(|| {
                BuildError::Setup("internal error (please report): a worker panicked".into())
            })?;
            handle(result)?;
        }
    })
}

/// Adds a written sample's counts to the totals.
fn add_sample(totals: &mut RunTotals, prepared: &crate::process::Prepared) {
    let t = &mut totals.tokens;
    let st = prepared.stats;
    let n = prepared.sample.num_tokens() as u64;
    t.total += n;
    t.max_sample = t.max_sample.max(n);
    t.supervised += st.supervised as u64;
    t.image += st.image_tokens as u64;
    t.images += st.images as u64;
    t.slices += st.slices as u64;
    t.truncated += st.truncated as u64;
    totals.image_bytes += st.image_bytes;
}

/// Counts a rejected sample and writes its line of `rejected.jsonl`.
fn record_rejection(
    counts: &mut Counts,
    source: &InputSource,
    origin: Origin,
    rej: crate::process::Rejected,
    out: &mut impl Write,
    path: &Path,
) -> Result<(), BuildError> {
    let kind = rej.rejection.kind;
    counts.rejected += 1;
    *counts
        .rejected_by_reason
        .entry(kind.name().to_string())
        .or_insert(0) += 1;
    let record = RejectionRecord {
        file: source.path.display().to_string(),
        index: origin.index,
        location: origin.location.to_string(),
        id: rej.id,
        reason: kind,
        message: rej.rejection.message,
    };
    let line = serde_json::to_string(&record).expect("record serialises");
    writeln!(out, "{line}").map_err(io_err(path))
}

/// The manifest of a finished run.
fn make_manifest(
    opts: &BuildOptions,
    setup: BuildSetup,
    totals: RunTotals,
    shards: Vec<ShardEntry>,
) -> Manifest {
    let settings = &setup.settings;
    let packs = totals.packs;
    let tokens = totals.tokens;
    let pixels = setup.pixels;
    Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        tool: format!("cpmv-prep {}", env!("CARGO_PKG_VERSION")),
        model: ModelInfo {
            dir: opts.model.display().to_string(),
            version: settings.llm_type.version().into(),
            llm_type: settings.llm_type.name().into(),
            tokenizer: setup.tokenizer.describe().into(),
        },
        fingerprints: setup.fingerprints,
        settings: setup.build_settings,
        inputs: totals.inputs,
        counts: totals.counts,
        packing: Packing {
            enabled: setup.pack_cfg.enabled,
            max_length: settings.max_length as u32,
            max_slices_per_pack: setup.pack_cfg.max_slices as u32,
            packs,
            fill_ratio: if packs == 0 {
                0.0
            } else {
                tokens.total as f64 / (packs as f64 * settings.max_length as f64)
            },
        },
        tokens,
        shards,
        pixels,
        images: None,
        compression: setup.compression,
    }
}
/// Rejection counts sorted by count (descending), for summaries.
pub fn reasons_by_count(counts: &BTreeMap<String, u64>) -> Vec<(&str, u64)> {
    let mut v: Vec<(&str, u64)> = counts.iter().map(|(k, &n)| (k.as_str(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}

/// Every rejection kind's name (for documentation and schema checks).
pub fn all_reject_kinds() -> Vec<&'static str> {
    RejectKind::ALL.iter().map(|k| k.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader_of(n: usize, dir: &Path) -> SampleReader {
        let path = dir.join("data.jsonl");
        let lines: String = (0..n).map(|i| format!("{{\"id\": \"s{i}\"}}\n")).collect();
        std::fs::write(&path, lines).unwrap();
        SampleReader::open(&path, 0).unwrap()
    }

    /// The sample's index and a name for it, slowly for early samples so that later ones
    /// finish first.
    fn named(raw: RawSample) -> (u64, String) {
        if raw.index.is_multiple_of(7) {
            std::thread::sleep(Duration::from_millis(15));
        }
        (raw.index, format!("s{}", raw.index))
    }

    #[test]
    fn results_are_handled_in_input_order_whatever_finishes_first() {
        let dir = tempfile::tempdir().unwrap();
        for (threads, window) in [(1, 1), (3, 2), (3, 16), (4, 100)] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut seen = Vec::new();
            process_in_order(&pool, window, reader_of(60, dir.path()), named, |r| {
                seen.push(r);
                Ok(())
            })
            .unwrap();
            let want: Vec<_> = (0..60u64).map(|i| (i, format!("s{i}"))).collect();
            assert_eq!(seen, want, "{threads} threads, window {window}");
        }
    }

    #[test]
    fn an_error_from_the_handler_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut handled = 0;
        let err = process_in_order(&pool, 8, reader_of(40, dir.path()), named, |(i, _)| {
            handled += 1;
            if i == 9 {
                return Err(BuildError::Setup("stop at 9".into()));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("stop at 9"), "{err}");
        assert_eq!(handled, 10);
    }

    #[test]
    fn a_panicking_job_stops_the_run_with_an_internal_error() {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut handled = Vec::new();
        let work = |raw: RawSample| {
            assert!(raw.index != 5, "job 5 panics");
            raw.index
        };
        let err = process_in_order(&pool, 4, reader_of(20, dir.path()), work, |i| {
            handled.push(i);
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("a worker panicked"), "{err}");
        assert_eq!(handled, vec![0, 1, 2, 3, 4]);
    }
}
