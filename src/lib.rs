//! cpmv: fine-tune MiniCPM-V models on your own images and conversations.
//!
//! This crate only re-exports the workspace libraries so that a downstream user can depend on
//! one name: [`shard`] (the packed Arrow shard format), [`image`] (Pillow-exact decoding,
//! resampling and UHD slicing) and [`prep`] (sample validation, templates, packing, `prep build`).

pub use cpmv_image as image;
pub use cpmv_prep as prep;
pub use cpmv_shard as shard;
