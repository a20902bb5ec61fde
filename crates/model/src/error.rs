//! Errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// The checkpoint's tensors do not match what the config describes; every problem listed.
    #[error("{dir}: the weights do not match config.json ({} missing, {} unexpected, {} mis-shaped):{}", missing.len(), unexpected.len(), misshaped.len(), list(missing, unexpected, misshaped))]
    WeightsMismatch {
        dir: PathBuf,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// (name, expected shape, found shape)
        misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    },
    #[error("batch: {0}")]
    Batch(String),
    #[error("LoRA: {0}")]
    Lora(String),
    /// An output that overlaps an input, or a file that could not be made durable.
    #[error(transparent)]
    Fs(#[from] cpmv_fsio::FsError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn list(
    missing: &[String],
    unexpected: &[String],
    misshaped: &[(String, Vec<usize>, Vec<usize>)],
) -> String {
    const SHOW: usize = 20;
    let mut s = String::new();
    for m in missing.iter().take(SHOW) {
        s.push_str(&format!("\n  missing: {m}"));
    }
    for u in unexpected.iter().take(SHOW) {
        s.push_str(&format!("\n  unexpected: {u}"));
    }
    for (n, e, f) in misshaped.iter().take(SHOW) {
        s.push_str(&format!("\n  mis-shaped: {n}: expected {e:?}, found {f:?}"));
    }
    let hidden = missing.len().saturating_sub(SHOW)
        + unexpected.len().saturating_sub(SHOW)
        + misshaped.len().saturating_sub(SHOW);
    if hidden > 0 {
        s.push_str(&format!("\n  ... and {hidden} more"));
    }
    s
}

pub type Result<T> = std::result::Result<T, ModelError>;
