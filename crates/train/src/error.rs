//! Errors of the trainer library.

use std::path::PathBuf;

/// Everything that stops a training run, with what a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {0}")]
    Config(String),
    #[error("data: {0}")]
    Data(String),
    /// The shards were made for another tokenizer/template/model than the one given.
    #[error("the shards do not fit the model: {0}")]
    Mismatch(String),
    #[error("non-finite {what} at step {step}; samples of the batch: {ids}")]
    NonFinite {
        what: String,
        step: u64,
        ids: String,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// An output that overlaps an input, or a file that could not be made durable.
    #[error(transparent)]
    Fs(#[from] cpmv_fsio::FsError),
    #[error(transparent)]
    Model(#[from] cpmv_model::ModelError),
    #[error(transparent)]
    Optim(#[from] cpmv_optim::OptimError),
    #[error(transparent)]
    Log(#[from] cpmv_runlog::LogError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Dist(#[from] cpmv_dist::DistError),
}

/// `map_err` helper for I/O on a path.
pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}
