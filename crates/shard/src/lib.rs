//! The shard format shared by `prep` (writer) and `train` (reader).
//!
//! A shard directory holds `shard-NNNNN.arrow` files (Arrow IPC *file* format, 64-byte aligned
//! buffers, so a reader maps them and uses the column buffers in place; or, with
//! `--compression lz4|zstd`, one LZ4/zstd-compressed record batch per pack), optional
//! `shard-NNNNN.parquet` twins for pandas/datasets users, `manifest.json` (written last: a
//! directory without it is incomplete), `rejected.jsonl`, and with `--pixels source` the image
//! store `images.arrow` ([`images`]). Columns are described in
//! [`schema`] and in `schemas/shard.schema.json`.

pub mod fingerprint;
pub mod images;
pub mod manifest;
pub mod reader;
pub mod schema;
pub mod settings;
pub mod writer;

pub use manifest::{Compression, ImagesEntry, Manifest, PixelMode, ShardEntry};
pub use reader::{Row, SampleView, ShardDir, ShardReader};
pub use schema::{shard_schema, Sample, SourceImage};
pub use settings::{BuildSettings, ImageIdMode, LlmType, SampleSettings};
pub use writer::{ClosedShardSet, PackMark, PackPixels, ShardSetWriter, WriterOptions};

/// Errors of the shard format (I/O, Arrow, a file that does not follow the schema).
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: Arrow error: {source}")]
    Arrow {
        path: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("{path}: Parquet error: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: not a cpmv shard: {reason}")]
    Format { path: String, reason: String },
    /// A pack handed to the writer whose pixels do not add up (a caller's bug).
    #[error("pack {pack}: {reason}")]
    Pack { pack: u32, reason: String },
    #[error("{path}: invalid manifest: {reason}")]
    Manifest { path: String, reason: String },
    /// The set was written with `prep build --format parquet`: it has no Arrow files, which
    /// every reader that maps shards (train, `prep stats --shards`, `prep inspect`) needs.
    #[error(
        "{dir}: this shard set holds Parquet files only (built with `prep build --format parquet`), \
         and train, `prep stats --shards` and `prep inspect` read the Arrow shards: rerun \
         `prep build` with `--format arrow` or `--format both`"
    )]
    ParquetOnly { dir: String },
    /// Flushing or publishing a file failed.
    #[error(transparent)]
    Fs(#[from] cpmv_fsio::FsError),
    /// A model directory file (tokenizer_config.json) the fingerprints are computed from is
    /// not valid JSON.
    #[error("{path}: {reason}")]
    ModelFile { path: String, reason: String },
}

impl ShardError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ShardError::Io {
            path: path.display().to_string(),
            source,
        }
    }
    pub(crate) fn arrow(path: &std::path::Path, source: arrow_schema::ArrowError) -> Self {
        ShardError::Arrow {
            path: path.display().to_string(),
            source,
        }
    }
    pub(crate) fn format(path: &std::path::Path, reason: impl Into<String>) -> Self {
        ShardError::Format {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}
