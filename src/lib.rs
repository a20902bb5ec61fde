//! cpmv: fine-tune MiniCPM-V models on your own images and conversations.
//!
//! This crate only re-exports the workspace libraries so that a downstream user can depend on
//! one name: [`shard`] (the packed Arrow shard format), [`image`] (Pillow-exact decoding,
//! resampling and UHD slicing), [`prep`] (sample validation, templates, packing, `prep build`)
//! and [`model`] (MiniCPM-V 2.0/2.5/2.6 as trainable candle modules).

pub use cpmv_image as image;
pub use cpmv_model as model;
pub use cpmv_prep as prep;
pub use cpmv_shard as shard;
