//! The cpmv trainer: full and LoRA fine-tuning of MiniCPM-V over memory-mapped prep shards,
//! writing checkpoints that transformers and PEFT load, resumable exactly.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod memory;
pub mod optimizer;
pub mod tokens;
pub mod torch_save;
pub mod trainer;

pub use config::{LossNorm, TrainConfig, TrainMode};
pub use error::TrainError;
pub use trainer::{train, TrainOptions, TrainReport};
