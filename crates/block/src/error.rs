//! Errors of the block path.

/// What went wrong in a block op: always a caller's shape or layout mistake, or a backend
/// failure (allocation, device).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block: {0}")]
    Shape(String),
    #[error("block backend: {0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// A shape error with a formatted message.
pub(crate) fn shape<T>(msg: impl Into<String>) -> Result<T> {
    Err(BlockError::Shape(msg.into()))
}
