//! `prep`: MiniCPM-V training JSON + a checkpoint directory → packed Arrow shards.
//!
//! The modules follow the data: [`input`] streams raw samples, [`sample`] validates them and
//! places images, [`placeholder`] and [`template`] turn them into token ids, labels and image
//! bounds exactly as the reference does, [`process`] adds the pixels, [`pack`] groups rows and
//! [`build`] runs the whole thing in parallel and writes shards through `cpmv-shard`;
//! [`stats`] measures lengths from image headers with the same code, and [`inspect`] shows a
//! built sample back as text.

pub mod alloc;
pub mod build;
pub mod bytelevel;
pub mod cli;
pub mod config;
pub mod input;
pub mod inspect;
pub mod model;
pub mod pack;
pub mod placeholder;
pub mod plot;
pub mod process;
pub mod reject;
pub mod sample;
pub mod stats;
pub mod template;
pub mod tokenizer;

pub use build::{build, BuildError, BuildReport};
pub use config::{BuildOptions, PrepPreset};
pub use model::{LlmType, ModelDir};
pub use process::{Processor, SampleSettings};
