//! `prep build`: stream samples from the data files, process them in parallel, pack them and
//! write shards, the rejection report and the manifest.
//!
//! Samples are read in chunks; each chunk is processed by rayon and its results are consumed in
//! input order, so the output is byte-identical whatever the thread count. A writer thread
//! overlaps Arrow/Parquet writing with the processing of the next chunk. Memory is bounded by
//! the chunk size, the packing window and the writer queue.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use cpmv_shard::manifest::{
    Counts, Fingerprints, InputFile, Manifest, ModelInfo, Packing, TokenTotals, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_FILE, REJECTED_FILE,
};
use cpmv_shard::{Sample, ShardEntry, ShardSetWriter, WriterOptions};

use crate::config::{defaults, BuildOptions, OnError, OutputFormat};
use crate::input::{InputError, SampleReader};
use crate::model::{LlmType, ModelDir, ModelError};
use crate::pack::{PackConfig, Packer};
use crate::process::{InputSource, Processor, SampleSettings};
use crate::reject::{RejectKind, RejectionRecord};
use crate::template::{LLAMA3_TRAINING_TEMPLATE, MINICPM_TRAINING_SCHEME};

/// Why a build stopped.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Shard(#[from] cpmv_shard::ShardError),
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

/// Settings that are fingerprinted together (anything that changes the rows).
#[derive(Serialize)]
struct FingerprintedSettings<'a> {
    format_version: u32,
    sample: &'a SampleSettings,
    batch_vision: bool,
    pack: bool,
    max_slices_per_pack: usize,
    pack_window: usize,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Resolves every sample setting from the model directory and the user's settings.
pub fn resolve_settings(
    model: &ModelDir,
    opts: &BuildOptions,
) -> Result<SampleSettings, BuildError> {
    let p = &opts.prep;
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
        return bad("max_slice_nums must be between 1 and 64");
    }
    if !(1..=8192).contains(&s.scale_resolution)
        || !(1..=s.scale_resolution).contains(&s.patch_size)
    {
        return bad("scale_resolution must be between 1 and 8192, patch_size between 1 and it");
    }
    if !(1..=4096).contains(&s.query_num) {
        return bad("query_num must be between 1 and 4096");
    }
    if !(1..=1 << 24).contains(&s.max_length) {
        return bad("max_length must be between 1 and 16777216");
    }
    Ok(s)
}

/// Empties `out` of a previous shard set (manifest first, so an interrupted clean-up never
/// leaves a manifest that lists missing shards), or refuses to touch a non-empty directory.
fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<(), BuildError> {
    if out.exists() {
        let entries: Vec<_> = std::fs::read_dir(out)
            .map_err(io_err(out))?
            .filter_map(Result::ok)
            .collect();
        if !entries.is_empty() {
            if !overwrite {
                return Err(BuildError::Setup(format!(
                    "{} exists and is not empty; pass --overwrite to replace a previous shard set",
                    out.display()
                )));
            }
            let ours = |name: &str| {
                name == MANIFEST_FILE
                    || name.starts_with(MANIFEST_FILE)
                    || name.starts_with(REJECTED_FILE)
                    || (name.starts_with("shard-")
                        && (name.contains(".arrow") || name.contains(".parquet")))
            };
            let manifest = out.join(MANIFEST_FILE);
            if manifest.exists() {
                std::fs::remove_file(&manifest).map_err(io_err(&manifest))?;
            }
            for e in entries {
                let name = e.file_name().to_string_lossy().to_string();
                if name == MANIFEST_FILE {
                    continue; // removed above
                }
                if ours(&name) {
                    std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                } else {
                    return Err(BuildError::Setup(format!(
                        "{} holds {name}, which prep did not write; refusing to overwrite",
                        out.display()
                    )));
                }
            }
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))
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
    match model.llm_type {
        LlmType::Minicpm => MINICPM_TRAINING_SCHEME.to_string(),
        LlmType::Llama3 => LLAMA3_TRAINING_TEMPLATE.to_string(),
        LlmType::Qwen => model.chat_template.clone().unwrap_or_default(),
    }
}

/// The tokenizer and chat-template fingerprints a model directory gives samples, as written
/// into a manifest by `prep build` — so a trainer can refuse shards made for another model.
pub fn model_fingerprints(dir: &Path) -> Result<(String, String), BuildError> {
    let model = ModelDir::load(dir, None)?;
    let template = training_chat_template(&model);
    Ok((
        model.tokenizer_sha256.clone(),
        sha256_hex(template.as_bytes()),
    ))
}

/// Runs `prep build`.
pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    let start = Instant::now();
    let model = ModelDir::load(&opts.model, opts.prep.llm_type)?;
    let settings = resolve_settings(&model, opts)?;
    let batch_vision = model.batch_vision;
    let chat_template = training_chat_template(&model);
    let tokenizer_sha = model.tokenizer_sha256.clone();
    let processor = Processor::new(model, settings.clone())
        .map_err(|e| BuildError::Setup(format!("{}: {e}", opts.model.display())))?;

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
    let format = opts.prep.format.unwrap_or_default();
    let on_error = opts.prep.on_error.unwrap_or_default();
    let fingerprinted = FingerprintedSettings {
        format_version: FORMAT_VERSION,
        sample: &settings,
        batch_vision,
        pack: pack_cfg.enabled,
        max_slices_per_pack: pack_cfg.max_slices,
        pack_window: pack_cfg.window,
    };
    let settings_json = serde_json::to_value(&fingerprinted).expect("settings serialise");
    let fingerprints = Fingerprints {
        tokenizer: tokenizer_sha,
        chat_template: sha256_hex(chat_template.as_bytes()),
        settings: sha256_hex(settings_json.to_string().as_bytes()),
    };

    let (sources, input_bytes) = input_sources(&opts.data, opts.image_root.as_deref())?;

    prepare_out_dir(&opts.out, opts.overwrite)?;
    let rejected_path = opts.out.join(format!("{REJECTED_FILE}.partial"));
    let mut rejected_out = std::io::BufWriter::new(
        std::fs::File::create(&rejected_path).map_err(io_err(&rejected_path))?,
    );

    let (pool, threads) = thread_pool(opts.threads)?;

    // The writer thread owns the shard writer; packs reach it through a bounded queue.
    let writer_opts = WriterOptions {
        max_shard_bytes: opts.prep.shard_size_mb.unwrap_or(defaults::SHARD_SIZE_MB) << 20,
        parquet: matches!(format, OutputFormat::Parquet | OutputFormat::Both),
        arrow: matches!(format, OutputFormat::Arrow | OutputFormat::Both),
        ..Default::default()
    };
    // `None` means "the run succeeded, finish the set"; a closed channel without it means the
    // run failed, and the writer removes its partial files instead of naming them final.
    let (tx, rx) = mpsc::sync_channel::<Option<(u32, Vec<Sample>)>>(4);
    let out_dir = opts.out.clone();
    let writer = std::thread::spawn(move || -> Result<Vec<ShardEntry>, BuildError> {
        let mut w = ShardSetWriter::new(&out_dir, writer_opts);
        for msg in rx {
            match msg {
                Some((pack, rows)) => {
                    if let Err(e) = w.write_pack(pack, rows) {
                        w.abort();
                        return Err(e.into());
                    }
                }
                None => return Ok(w.finish()?),
            }
        }
        w.abort();
        Err(BuildError::WriterStopped)
    });

    let pb = progress_bar(input_bytes, opts.progress);
    let mut counts = Counts::default();
    let mut tokens = TokenTotals::default();
    let mut packer = Packer::new(pack_cfg);
    let mut next_pack: u32 = 0;
    let mut image_bytes = 0u64;
    let mut inputs = Vec::new();
    let mut bytes_before = 0u64;
    let chunk_size = 16 * threads.max(1);

    let result: Result<(), BuildError> = (|| {
        let send = |packs: Vec<Vec<Sample>>, next_pack: &mut u32| -> Result<(), BuildError> {
            for rows in packs {
                if tx.send(Some((*next_pack, rows))).is_err() {
                    // The writer stopped on an error; it is reported when joined.
                    return Err(BuildError::WriterStopped);
                }
                *next_pack += 1;
            }
            Ok(())
        };
        for (file_idx, (source, file_bytes)) in sources.iter().enumerate() {
            let mut reader = SampleReader::open(&source.path, file_idx)?;
            let mut file_counts = InputFile {
                path: source.path.display().to_string(),
                bytes: *file_bytes,
                samples: 0,
                written: 0,
                rejected: 0,
            };
            loop {
                let chunk = reader.next_chunk(chunk_size)?;
                if chunk.is_empty() {
                    break;
                }
                let results: Vec<_> = pool.install(|| {
                    chunk
                        .par_iter()
                        .map(|raw| processor.process_guarded(raw, source))
                        .collect()
                });
                for (raw, res) in chunk.iter().zip(results) {
                    counts.read += 1;
                    file_counts.samples += 1;
                    match res {
                        Ok(prepared) => {
                            counts.written += 1;
                            file_counts.written += 1;
                            let st = prepared.stats;
                            tokens.total += prepared.sample.num_tokens() as u64;
                            tokens.max_sample =
                                tokens.max_sample.max(prepared.sample.num_tokens() as u64);
                            tokens.supervised += st.supervised as u64;
                            tokens.image += st.image_tokens as u64;
                            tokens.images += st.images as u64;
                            tokens.slices += st.slices as u64;
                            tokens.truncated += st.truncated as u64;
                            image_bytes += st.image_bytes;
                            let packs = packer.push(prepared.sample);
                            send(packs, &mut next_pack)?;
                        }
                        Err(rej) => {
                            let kind = rej.rejection.kind;
                            if on_error == OnError::Fail {
                                return Err(BuildError::Sample {
                                    file: source.path.display().to_string(),
                                    index: raw.index,
                                    location: raw.location.to_string(),
                                    id: rej.id,
                                    kind: kind.name(),
                                    message: rej.rejection.message,
                                });
                            }
                            counts.rejected += 1;
                            file_counts.rejected += 1;
                            *counts
                                .rejected_by_reason
                                .entry(kind.name().to_string())
                                .or_insert(0) += 1;
                            let record = RejectionRecord {
                                file: source.path.display().to_string(),
                                index: raw.index,
                                location: raw.location.to_string(),
                                id: rej.id,
                                reason: kind,
                                message: rej.rejection.message,
                            };
                            let line = serde_json::to_string(&record).expect("record serialises");
                            writeln!(rejected_out, "{line}").map_err(io_err(&rejected_path))?;
                        }
                    }
                }
                pb.set_position(bytes_before + reader.bytes_read);
                pb.set_message(format!(
                    "{} samples ({} rejected), {:.0}/s",
                    counts.read,
                    counts.rejected,
                    counts.read as f64 / start.elapsed().as_secs_f64().max(1e-9)
                ));
            }
            bytes_before += file_bytes;
            inputs.push(file_counts);
        }
        let packs = packer.flush();
        send(packs, &mut next_pack)?;
        tx.send(None).map_err(|_| BuildError::WriterStopped)
    })();
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| BuildError::Setup("the shard writer panicked".into()))?;
    pb.finish_and_clear();
    let shards = match (result, written) {
        (Ok(()), written) => written?,
        // The writer's own error (disk full, permissions) explains a stopped writer best.
        (Err(BuildError::WriterStopped), Err(e)) => return Err(e),
        (Err(e), _) => {
            drop(rejected_out);
            let _ = std::fs::remove_file(&rejected_path);
            return Err(e);
        }
    };

    rejected_out.flush().map_err(io_err(&rejected_path))?;
    drop(rejected_out);
    let final_rejected = opts.out.join(REJECTED_FILE);
    std::fs::rename(&rejected_path, &final_rejected).map_err(io_err(&final_rejected))?;

    let packs = next_pack as u64;
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        tool: format!("cpmv-prep {}", env!("CARGO_PKG_VERSION")),
        model: ModelInfo {
            dir: opts.model.display().to_string(),
            version: settings.llm_type.version().into(),
            llm_type: settings.llm_type.name().into(),
        },
        fingerprints,
        settings: settings_json,
        inputs,
        counts,
        tokens: tokens.clone(),
        packing: Packing {
            enabled: pack_cfg.enabled,
            max_length: settings.max_length as u32,
            max_slices_per_pack: pack_cfg.max_slices as u32,
            packs,
            fill_ratio: if packs == 0 {
                0.0
            } else {
                tokens.total as f64 / (packs as f64 * settings.max_length as f64)
            },
        },
        shards,
    };
    manifest.save(&opts.out)?;
    Ok(BuildReport {
        manifest,
        elapsed: start.elapsed(),
        input_bytes,
        image_bytes,
    })
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
