//! MiniCPM-V 2.0, MiniCPM-Llama3-V 2.5 and MiniCPM-V 2.6 as trainable candle modules.
//!
//! Loads real Hugging Face checkpoint directories by their tensor names (spec §7.5), runs the
//! forward pass of the reference (vision tower → resampler → features over the placeholder
//! embeddings → LLM) over packed rows, and differentiates all of it: every op on the training
//! path has a backward (see [`ops`]), frozen weights get no gradient, LoRA adapters attach by
//! module-name regex.

pub mod block;
pub mod config;
pub mod error;
pub mod flops;
pub mod generate;
pub mod image;
pub mod init;
pub mod linear;
pub mod llm;
pub mod model;
pub mod ops;
pub mod params;
pub mod positions;
pub mod profile;
pub mod resampler;
pub mod synthetic;
pub mod vision_navit;
pub mod vision_vit;
pub mod weights;

pub use config::{Fixes, ModelConfig, Version};
pub use error::ModelError;
pub use generate::{Generated, Sampling, StopReason};
pub use image::{ImageInput, Pixels};
pub use linear::{LoraConfig, Rng, DEFAULT_LORA_TARGET};
pub use model::{Batch, LossOutput, MiniCpmV};
pub use params::{LoadOptions, ParamStore, Trainable};
