//! `manifest.json`: what a shard directory holds and how it was made.
//!
//! The trainer compares the fingerprints with the model directory it is given (a different
//! tokenizer or slicing setting is refused); people read the counts. Documented in
//! `schemas/manifest.schema.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ShardError;

/// File name of the manifest inside a shard directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the rejection report inside a shard directory.
pub const REJECTED_FILE: &str = "rejected.jsonl";
/// Value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "cpmv-shards";
/// Current [`Manifest::format_version`].
pub const FORMAT_VERSION: u32 = 1;

/// How a set stores its pixels (`prep build --pixels`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PixelMode {
    /// The final u8 slices of every sample, ready to train on (the default).
    #[default]
    Slices,
    /// Each distinct image file once (`images.arrow`), sliced again by the reader with the
    /// same code, bit for bit.
    Source,
}

/// How the Arrow shards' buffers are compressed (`prep build --compression`). Arrow IPC
/// buffer compression, which pyarrow reads transparently; Parquet twins are zstd either way.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Uncompressed: readers use the mapped columns in place (the default).
    #[default]
    None,
    /// LZ4 frames: fast to decode, modest gain.
    Lz4,
    /// Zstandard at level 1 (level 3 compresses u8 slices a few percent better and writes
    /// at half the speed).
    Zstd,
}

impl Compression {
    /// The name used by the flag, the preset key and the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The image store of a set of `--pixels source`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImagesEntry {
    /// Arrow IPC file name (relative to the directory).
    pub file: String,
    /// Distinct image files stored.
    pub count: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// One shard of the set.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// Arrow IPC file name (relative to the directory), absent with `--format parquet`.
    pub file: Option<String>,
    /// Parquet twin, when written.
    pub parquet: Option<String>,
    pub rows: u64,
    pub packs: u64,
    /// `pack` value of the shard's first row.
    pub first_pack: u32,
    /// Size of the Arrow file in bytes.
    pub bytes: u64,
}

/// sha256 digests that identify what the samples depend on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprints {
    /// Of the model directory's `tokenizer.json` bytes.
    pub tokenizer: String,
    /// Of the chat template text used for training (empty string's digest when none).
    pub chat_template: String,
    /// Of the canonical JSON of every setting that changes the samples (`settings`).
    pub settings: String,
}

/// An input data file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputFile {
    pub path: String,
    pub bytes: u64,
    pub samples: u64,
    pub written: u64,
    pub rejected: u64,
}

/// Sample counts; `read == written + rejected`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub written: u64,
    pub rejected: u64,
    /// Rejections by machine-readable reason.
    pub rejected_by_reason: BTreeMap<String, u64>,
}

/// Token totals over the written samples.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenTotals {
    pub total: u64,
    /// Tokens with a label (loss-carrying).
    pub supervised: u64,
    /// Image placeholder tokens (inside image bounds).
    pub image: u64,
    pub images: u64,
    pub slices: u64,
    pub max_sample: u64,
    /// Tokens cut off by `--truncate` (0 without it).
    #[serde(default)]
    pub truncated: u64,
}

/// How samples were grouped into packs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Packing {
    pub enabled: bool,
    pub max_length: u32,
    pub max_slices_per_pack: u32,
    pub packs: u64,
    /// Tokens written / (packs × max_length).
    pub fill_ratio: f64,
}

/// The whole manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Name and version of the tool that wrote the set.
    pub tool: String,
    /// Model directory, version and llm type the samples were made for.
    pub model: ModelInfo,
    pub fingerprints: Fingerprints,
    /// Every setting that changes the samples (hashed into `fingerprints.settings`).
    pub settings: crate::settings::BuildSettings,
    pub inputs: Vec<InputFile>,
    pub counts: Counts,
    pub tokens: TokenTotals,
    pub packing: Packing,
    pub shards: Vec<ShardEntry>,
    /// How pixels are stored (sets built before the switch: slices).
    #[serde(default)]
    pub pixels: PixelMode,
    /// The image store of a set of `--pixels source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesEntry>,
    /// Buffer compression of the Arrow shards (sets built before the switch: none). The image
    /// store is never compressed: it holds encoded image files.
    #[serde(default)]
    pub compression: Compression,
}

/// The model the samples were made for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelInfo {
    pub dir: String,
    pub version: String,
    pub llm_type: String,
    /// Which tokenizer encoded the text (`TokenizerKind::describe`); empty in manifests of
    /// sets built before prep recorded it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tokenizer: String,
}

impl Manifest {
    /// Reads `dir/manifest.json`. A directory without one is an unfinished or foreign run.
    pub fn load(dir: &Path) -> Result<Manifest, ShardError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ShardError::Manifest {
                    path: path.display().to_string(),
                    reason: "missing: the directory is not a finished shard set".into(),
                }
            } else {
                ShardError::io(&path, e)
            }
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| ShardError::Manifest {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if m.format != FORMAT_NAME || m.format_version != FORMAT_VERSION {
            return Err(ShardError::Manifest {
                path: path.display().to_string(),
                reason: format!(
                    "format {} v{} (this build reads {FORMAT_NAME} v{FORMAT_VERSION})",
                    m.format, m.format_version
                ),
            });
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json` durably and atomically: written as `manifest.json.partial`,
    /// flushed to the disk, renamed, and the directory flushed, so the manifest is never seen
    /// (even after a crash) before it is complete. A failed save leaves no partial file.
    pub fn save(&self, dir: &Path) -> Result<(), ShardError> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        cpmv_fsio::write_atomic(&dir.join(MANIFEST_FILE), (text + "\n").as_bytes())?;
        Ok(())
    }
}
