//! `prep build` settings: defaults in one place, presets from `pipelines/*.toml`, flags on top.
//!
//! Precedence, lowest first: built-in defaults, the checkpoint's config.json (slicing and
//! query_num), the preset's `[prep]` table, command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::LlmType;
use crate::placeholder::ImageIdMode;

/// Which files `prep build` writes next to the manifest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Arrow IPC shards only (what `train` maps).
    #[default]
    Arrow,
    /// Parquet (zstd) only, for pandas/datasets users.
    Parquet,
    /// Both.
    Both,
}

/// How a set stores pixels (`--pixels`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Pixels {
    /// The final u8 slices of every sample (about 3 MB per sample at 9 slices).
    #[default]
    Slices,
    /// Each distinct image file once, sliced again by the reader (about the images' size).
    Source,
}

impl From<Pixels> for cpmv_shard::PixelMode {
    fn from(p: Pixels) -> Self {
        match p {
            Pixels::Slices => cpmv_shard::PixelMode::Slices,
            Pixels::Source => cpmv_shard::PixelMode::Source,
        }
    }
}

/// Buffer compression of the Arrow shards (`--compression`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ShardCompression {
    /// Uncompressed: the trainer uses the mapped columns in place.
    #[default]
    None,
    /// LZ4 frames (fast to decode, modest gain).
    Lz4,
    /// Zstandard, level 1 (smaller; the reader decompresses one pack at a time).
    Zstd,
}

impl From<ShardCompression> for cpmv_shard::Compression {
    fn from(c: ShardCompression) -> Self {
        match c {
            ShardCompression::None => cpmv_shard::Compression::None,
            ShardCompression::Lz4 => cpmv_shard::Compression::Lz4,
            ShardCompression::Zstd => cpmv_shard::Compression::Zstd,
        }
    }
}

/// What to do with a sample that cannot be used.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Write it to rejected.jsonl with its reason and go on (exit code 3 at the end).
    #[default]
    Skip,
    /// Stop at the first one, naming it (exit code 4).
    Fail,
}

/// The `[prep]` table of a preset; every field optional (absent = keep the lower layer).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrepPreset {
    pub llm_type: Option<LlmType>,
    pub max_slice_nums: Option<u32>,
    pub scale_resolution: Option<u32>,
    pub patch_size: Option<u32>,
    pub query_num: Option<u32>,
    pub max_length: Option<usize>,
    pub truncate: Option<bool>,
    pub image_id_mode: Option<ImageIdMode>,
    pub exif_transpose: Option<bool>,
    pub pack: Option<bool>,
    pub max_slices_per_pack: Option<usize>,
    pub pack_window: Option<usize>,
    pub format: Option<OutputFormat>,
    pub pixels: Option<Pixels>,
    pub compression: Option<ShardCompression>,
    pub shard_size_mb: Option<u64>,
    pub on_error: Option<OnError>,
}

impl PrepPreset {
    /// Reads the `[prep]` table of a preset file (other tables, e.g. `[train]`, are left to
    /// their tools).
    pub fn load(path: &Path) -> Result<PrepPreset, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let value: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        match value.get("prep") {
            None => Ok(PrepPreset::default()),
            Some(v) => v
                .clone()
                .try_into()
                .map_err(|e| format!("{}: [prep]: {e}", path.display())),
        }
    }

    /// The keys a `[prep]` table may hold (its field names).
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(PrepPreset::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// `self` with every field that `top` sets replaced.
    pub fn overlay(self, top: PrepPreset) -> PrepPreset {
        macro_rules! pick {
            ($($f:ident),*) => { PrepPreset { $($f: top.$f.or(self.$f)),* } };
        }
        pick!(
            llm_type,
            max_slice_nums,
            scale_resolution,
            patch_size,
            query_num,
            max_length,
            truncate,
            image_id_mode,
            exif_transpose,
            pack,
            max_slices_per_pack,
            pack_window,
            format,
            pixels,
            compression,
            shard_size_mb,
            on_error
        )
    }
}

/// Where a resolved setting came from (lowest layer first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingSource {
    /// Built into prep (the reference's value where it has one).
    Default,
    /// The checkpoint directory (config.json, preprocessor_config.json, detected llm type).
    Checkpoint,
    /// The preset's `[prep]` table.
    Preset,
    /// A command-line flag.
    Flag,
}

impl SettingSource {
    /// The word `--print-config` shows.
    pub fn name(self) -> &'static str {
        match self {
            SettingSource::Default => "default",
            SettingSource::Checkpoint => "checkpoint",
            SettingSource::Preset => "preset",
            SettingSource::Flag => "flag",
        }
    }
}

/// One `[prep]` setting as a build would use it: its key, its value as TOML, and its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSetting {
    pub key: &'static str,
    pub value: String,
    pub source: SettingSource,
}

/// Resolved options of one `prep build` run.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub data: Vec<PathBuf>,
    /// Base of relative image paths; default: each data file's folder.
    pub image_root: Option<PathBuf>,
    pub model: PathBuf,
    pub out: PathBuf,
    /// Settings from presets and flags (model config values fill the slicing gaps).
    pub prep: PrepPreset,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Replace an existing shard set in `out`.
    pub overwrite: bool,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

/// Defaults for settings that neither the model directory nor the user gave.
pub mod defaults {
    pub const MAX_LENGTH: usize = 2048;
    pub const MAX_SLICES_PER_PACK: usize = 40;
    pub const PACK_WINDOW: usize = 512;
    pub const PACK_WINDOW_BYTES: usize = 1 << 30;
    pub const SHARD_SIZE_MB: u64 = 1024;
}
