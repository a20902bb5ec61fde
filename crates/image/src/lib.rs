//! Images the way the MiniCPM-V reference sees them.
//!
//! The official fine-tuning code opens every image with Pillow, converts it to 8-bit RGB, cuts it
//! into an overview plus a grid of slices ("UHD" slicing) and resizes each with Pillow's BICUBIC
//! filter. Training on different pixels than the released models saw is a silent regression, so
//! this crate reproduces each step bit for bit:
//!
//! * [`decode`]: file bytes → [`RgbImage`] with Pillow's `convert("RGB")` semantics (JPEG through
//!   libjpeg-turbo's decoder, WebP through libwebp, as Pillow does);
//! * [`resize`]: Pillow's fixed-point separable BICUBIC resampler;
//! * [`slice`]: the slicing plan (grid, overview size, refine size) in the reference's f64
//!   arithmetic, and [`slice::slice_image`] which produces the pixels.

pub mod decode;
pub mod exif;
pub mod resize;
pub mod rgb;
pub mod slice;

pub use decode::{decode, jpeg_simd, probe, DecodeError, DecodeOptions, ImageFormat, ImageInfo};
pub use resize::{resize_bicubic, resize_bicubic_into, Tiles};
pub use rgb::RgbImage;
pub use slice::{plan_slices, slice_image, slice_image_into, SliceConfig, SlicePlan, SlicedImage};
