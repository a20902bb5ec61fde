//! File bytes → 8-bit RGB with Pillow's `Image.open(f).convert("RGB")` semantics.
//!
//! The reference opens images with Pillow, so the pixels a checkpoint was trained on are
//! Pillow's. JPEG goes through libjpeg-turbo's decoder (built from source, the decoder Pillow
//! bundles: integer slow DCT, fancy upsampling), WebP through libwebp, PNG/GIF/BMP through
//! lossless decoders. Conversions follow Pillow: alpha is dropped without compositing, grey and
//! palettes are expanded, 16-bit samples keep their high byte, CMYK is converted with Pillow's
//! formula, and EXIF orientation is ignored unless asked for.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::rgb::RgbImage;

/// Container formats we can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    WebP,
    Gif,
    Bmp,
}

impl ImageFormat {
    /// Lower-case name, as shown in messages and statistics.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::WebP => "webp",
            ImageFormat::Gif => "gif",
            ImageFormat::Bmp => "bmp",
        }
    }

    /// Recognises the format from the first bytes of the file (never from the file name).
    pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Ok(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Ok(ImageFormat::Png)
        } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Ok(ImageFormat::WebP)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Ok(ImageFormat::Gif)
        } else if bytes.starts_with(b"BM") {
            Ok(ImageFormat::Bmp)
        } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
            Err(DecodeError::Unsupported("tiff".into()))
        } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
            Err(DecodeError::Unsupported("heif/avif".into()))
        } else if bytes.is_empty() {
            Err(DecodeError::Empty)
        } else {
            Err(DecodeError::Unsupported(
                "unrecognised file signature".into(),
            ))
        }
    }
}

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the file is empty")]
    Empty,
    #[error("unsupported image format ({0}); supported: JPEG, PNG, WebP, GIF, BMP")]
    Unsupported(String),
    #[error("corrupt {format} data: {message}")]
    Corrupt {
        format: &'static str,
        message: String,
    },
    #[error("truncated {0} data (the file ends before the image does)")]
    Truncated(&'static str),
    #[error("image has an empty side ({0}x{1})")]
    EmptyImage(u32, u32),
    #[error(
        "image is {0}x{1} pixels, more than Pillow opens ({MAX_PIXELS}: decompression-bomb limit)"
    )]
    TooLarge(u32, u32),
}

/// Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` (`DecompressionBombError`), so
/// the reference never trains on them; refusing them here also bounds memory per image.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Options that change which pixels come out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Apply the EXIF orientation tag (Pillow's `ImageOps.exif_transpose`). Off in the
    /// reference: it trains on the stored pixel order.
    pub exif_transpose: bool,
}

/// Format and size read from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Whether JPEG decoding uses libjpeg-turbo's SIMD kernels in this binary on this CPU (built
/// with `nasm`, feature `jpeg-simd`, and a CPU with SSE2/AVX2 or NEON). Pixels are the same
/// either way; tools print it because it changes decoding speed about threefold.
pub fn jpeg_simd() -> bool {
    extern "C" {
        // libjpeg-turbo's own query: nonzero when its SIMD inverse DCT is compiled in and the
        // CPU supports it (`jsimd_none.c` defines it as 0 in builds without SIMD).
        fn jsimd_can_idct_islow() -> std::os::raw::c_int;
    }
    // SAFETY: a libjpeg-turbo function without arguments that reads (and once initialises)
    // its CPU-feature flags; it is linked from mozjpeg-sys's static library in every build.
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// Decodes an image file held in memory to 8-bit RGB, as Pillow's `convert("RGB")` would.
pub fn decode(bytes: &[u8], opts: DecodeOptions) -> Result<RgbImage, DecodeError> {
    // Header first: refuses empty and oversized images before any pixel buffer is allocated.
    let format = probe(bytes)?.format;
    let img = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes)?,
        ImageFormat::WebP => decode_webp(bytes)?,
        ImageFormat::Gif => decode_gif(bytes)?,
        ImageFormat::Png | ImageFormat::Bmp => decode_with_image_crate(bytes, format)?,
    };
    if img.width == 0 || img.height == 0 {
        return Err(DecodeError::EmptyImage(img.width, img.height));
    }
    if opts.exif_transpose {
        if let Some(o) = crate::exif::orientation(bytes) {
            return Ok(crate::exif::apply_orientation(img, o));
        }
    }
    Ok(img)
}

/// Reads format and size from the file header without decoding pixels. The size is the stored
/// one (before any EXIF rotation), as the reference uses it.
pub fn probe(bytes: &[u8]) -> Result<ImageInfo, DecodeError> {
    let format = ImageFormat::sniff(bytes)?;
    let (width, height) = match format {
        ImageFormat::Jpeg => guard("jpeg", || {
            let d =
                mozjpeg::Decompress::new_mem(bytes).map_err(|e| corrupt("jpeg", e.to_string()))?;
            Ok((d.width() as u32, d.height() as u32))
        })?,
        ImageFormat::WebP => {
            let (mut w, mut h) = (0i32, 0i32);
            // SAFETY: the pointer/length pair describes `bytes`; w/h are valid out-pointers.
            let ok =
                unsafe { libwebp_sys::WebPGetInfo(bytes.as_ptr(), bytes.len(), &mut w, &mut h) };
            if ok == 0 {
                return Err(corrupt("webp", "invalid header".into()));
            }
            (w as u32, h as u32)
        }
        ImageFormat::Gif => {
            if bytes.len() < 10 {
                return Err(DecodeError::Truncated("gif"));
            }
            (
                u16::from_le_bytes([bytes[6], bytes[7]]) as u32,
                u16::from_le_bytes([bytes[8], bytes[9]]) as u32,
            )
        }
        ImageFormat::Png | ImageFormat::Bmp => {
            let reader = image::ImageReader::with_format(
                std::io::Cursor::new(bytes),
                image_crate_format(format),
            );
            reader
                .into_dimensions()
                .map_err(|e| corrupt(format.name(), e.to_string()))?
        }
    };
    if width == 0 || height == 0 {
        return Err(DecodeError::EmptyImage(width, height));
    }
    if width as u64 * height as u64 > MAX_PIXELS {
        return Err(DecodeError::TooLarge(width, height));
    }
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

fn corrupt(format: &'static str, message: String) -> DecodeError {
    DecodeError::Corrupt { format, message }
}

/// Runs a libjpeg call, turning its error unwinds into `DecodeError`s.
fn guard<T>(
    format: &'static str,
    f: impl FnOnce() -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "decoder error".into());
            if msg == TRUNCATED {
                Err(DecodeError::Truncated(format))
            } else {
                Err(corrupt(format, msg))
            }
        }
    }
}

const TRUNCATED: &str = "cpmv: premature end of JPEG data";

/// libjpeg's default error manager, except that errors unwind (so we can report them) and the
/// "premature end of file" warning counts as an error: Pillow refuses truncated JPEGs ("image
/// file is truncated") instead of training on the grey fill libjpeg substitutes.
fn jpeg_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};
    use std::os::raw::c_int;

    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        // SAFETY: libjpeg guarantees `err` points at the installed manager during the call.
        let code = unsafe { cinfo.err.as_ref().map(|e| e.msg_code).unwrap_or(-1) };
        std::panic::resume_unwind(Box::new(format!("libjpeg error code {code}")));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: as above.
        let code = unsafe { cinfo.err.as_ref().map(|e| e.msg_code).unwrap_or(-1) };
        if level < 0 && code == mozjpeg_sys::JWRN_JPEG_EOF as c_int {
            std::panic::resume_unwind(Box::new(TRUNCATED.to_string()));
        }
    }
    // SAFETY: jpeg_std_error fills every field of a zeroed manager.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    use mozjpeg::ColorSpace;
    guard("jpeg", || {
        let d = mozjpeg::Decompress::with_err(jpeg_error_mgr())
            .from_mem(bytes)
            .map_err(|e| corrupt("jpeg", e.to_string()))?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        let cmyk = matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
        let data = if cmyk {
            let mut started = d
                .to_colorspace(ColorSpace::JCS_CMYK)
                .map_err(|e| corrupt("jpeg", e.to_string()))?;
            let raw: Vec<u8> = started
                .read_scanlines()
                .map_err(|e| corrupt("jpeg", e.to_string()))?;
            started
                .finish()
                .map_err(|e| corrupt("jpeg", e.to_string()))?;
            cmyk_to_rgb(&raw)
        } else {
            // Grey JPEGs are expanded by libjpeg (R = G = B), as Pillow's L → RGB does.
            let mut started = d.rgb().map_err(|e| corrupt("jpeg", e.to_string()))?;
            let raw: Vec<u8> = started
                .read_scanlines()
                .map_err(|e| corrupt("jpeg", e.to_string()))?;
            started
                .finish()
                .map_err(|e| corrupt("jpeg", e.to_string()))?;
            raw
        };
        RgbImage::from_raw(w, h, data).ok_or(DecodeError::Truncated("jpeg"))
    })
}

/// Pillow opens CMYK JPEGs with raw mode "CMYK;I" (Adobe's inverted storage) and converts with
/// `cmyk2rgb`: R = clip(255 − K' − C'·(255 − K')/255) using its rounding MULDIV255, where C', K'
/// are the inverted stored values.
fn cmyk_to_rgb(raw: &[u8]) -> Vec<u8> {
    fn muldiv255(a: i32, b: i32) -> i32 {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    }
    let mut out = Vec::with_capacity(raw.len() / 4 * 3);
    for px in raw.chunks_exact(4) {
        let (c, m, y, k) = (
            255 - px[0] as i32,
            255 - px[1] as i32,
            255 - px[2] as i32,
            255 - px[3] as i32,
        );
        let nk = 255 - k;
        for v in [c, m, y] {
            out.push((nk - muldiv255(v, nk)).clamp(0, 255) as u8);
        }
    }
    out
}

fn decode_webp(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let (mut w, mut h) = (0i32, 0i32);
    // SAFETY: libwebp reads `bytes` only; the returned buffer is w*h*4 bytes, freed below.
    let ptr = unsafe { libwebp_sys::WebPDecodeRGBA(bytes.as_ptr(), bytes.len(), &mut w, &mut h) };
    if ptr.is_null() {
        return Err(corrupt(
            "webp",
            "libwebp could not decode the bitstream".into(),
        ));
    }
    let n = w as usize * h as usize;
    // SAFETY: libwebp returned a buffer of n RGBA pixels.
    let rgba = unsafe { std::slice::from_raw_parts(ptr, n * 4) };
    let mut data = Vec::with_capacity(n * 3);
    for px in rgba.chunks_exact(4) {
        data.extend_from_slice(&px[..3]);
    }
    // SAFETY: `ptr` came from WebPDecodeRGBA and is freed once.
    unsafe { libwebp_sys::WebPFree(ptr as *mut std::ffi::c_void) };
    RgbImage::from_raw(w as u32, h as u32, data).ok_or(DecodeError::Truncated("webp"))
}

/// First frame of a GIF through its palette, as Pillow's first frame (mode "P") converted to RGB:
/// transparent pixels keep their palette colour; area outside the first frame gets colour 0 of the
/// palette... unless the frame covers the screen, which is the common case.
fn decode_gif(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    let mut dec = opts
        .read_info(std::io::Cursor::new(bytes))
        .map_err(|e| corrupt("gif", e.to_string()))?;
    let (sw, sh) = (dec.width() as u32, dec.height() as u32);
    let global = dec.global_palette().map(|p| p.to_vec());
    let frame = dec
        .read_next_frame()
        .map_err(|e| corrupt("gif", e.to_string()))?
        .ok_or_else(|| corrupt("gif", "no image frame".into()))?;
    let palette = frame
        .palette
        .clone()
        .or(global)
        .ok_or_else(|| corrupt("gif", "no colour table".into()))?;
    let colour = |i: u8| -> [u8; 3] {
        let j = i as usize * 3;
        if j + 2 < palette.len() {
            [palette[j], palette[j + 1], palette[j + 2]]
        } else {
            [0, 0, 0]
        }
    };
    let fill = colour(0);
    let mut data = Vec::with_capacity(sw as usize * sh as usize * 3);
    for _ in 0..sw as usize * sh as usize {
        data.extend_from_slice(&fill);
    }
    let (fl, ft, fw, fh) = (
        frame.left as u32,
        frame.top as u32,
        frame.width as u32,
        frame.height as u32,
    );
    for y in 0..fh {
        for x in 0..fw {
            let (dx, dy) = (fl + x, ft + y);
            if dx < sw && dy < sh {
                let c = colour(frame.buffer[(y * fw + x) as usize]);
                let o = (dy as usize * sw as usize + dx as usize) * 3;
                data[o..o + 3].copy_from_slice(&c);
            }
        }
    }
    RgbImage::from_raw(sw, sh, data).ok_or(DecodeError::Truncated("gif"))
}

fn image_crate_format(format: ImageFormat) -> image::ImageFormat {
    match format {
        ImageFormat::Png => image::ImageFormat::Png,
        _ => image::ImageFormat::Bmp,
    }
}

fn decode_with_image_crate(bytes: &[u8], format: ImageFormat) -> Result<RgbImage, DecodeError> {
    use image::DynamicImage as D;
    let img = image::load_from_memory_with_format(bytes, image_crate_format(format)).map_err(
        |e| match e {
            image::ImageError::IoError(ref io)
                if io.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                DecodeError::Truncated(format.name())
            }
            other => corrupt(format.name(), other.to_string()),
        },
    )?;
    let (w, h) = (img.width(), img.height());
    let data = match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageRgba8(b) => drop_alpha(b.as_raw(), 4),
        D::ImageLuma8(b) => grey_to_rgb(b.as_raw().iter().copied()),
        D::ImageLumaA8(b) => grey_to_rgb(b.as_raw().chunks_exact(2).map(|p| p[0])),
        // 16-bit colour: Pillow unpacks "RGB;16B"/"RGBA;16B"/"LA;16B" keeping the high byte.
        D::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        D::ImageLumaA16(b) => grey_to_rgb(b.as_raw().chunks_exact(2).map(|p| (p[0] >> 8) as u8)),
        // 16-bit grey: Pillow opens it as a 32-bit integer image ("I") and clips to 0..255 when
        // converting (values above 255 become white), it does not scale.
        D::ImageLuma16(b) => grey_to_rgb(b.as_raw().iter().map(|&v| v.min(255) as u8)),
        other => {
            return Err(DecodeError::Unsupported(format!(
                "{} pixel layout {:?}",
                format.name(),
                other.color()
            )))
        }
    };
    RgbImage::from_raw(w, h, data).ok_or(DecodeError::Truncated(format.name()))
}

fn drop_alpha(raw: &[u8], channels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() / channels * 3);
    for px in raw.chunks_exact(channels) {
        out.extend_from_slice(&px[..3]);
    }
    out
}

fn grey_to_rgb(values: impl Iterator<Item = u8>) -> Vec<u8> {
    values.flat_map(|v| [v, v, v]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_names_unsupported_formats() {
        assert_eq!(
            ImageFormat::sniff(b"II*\0rest"),
            Err(DecodeError::Unsupported("tiff".into()))
        );
        assert_eq!(ImageFormat::sniff(b""), Err(DecodeError::Empty));
        assert!(matches!(
            ImageFormat::sniff(b"hello world"),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn garbage_jpeg_is_an_error_not_a_panic() {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
        bytes.extend_from_slice(&[0x12; 64]);
        assert!(decode(&bytes, DecodeOptions::default()).is_err());
        assert!(probe(&bytes).is_err());
    }

    #[test]
    fn decompression_bombs_are_refused_before_decoding() {
        // A GIF header announcing a 65535 x 65535 screen (4.3 G pixels).
        let mut gif = b"GIF89a".to_vec();
        gif.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0]);
        assert_eq!(probe(&gif), Err(DecodeError::TooLarge(65535, 65535)));
        assert_eq!(
            decode(&gif, DecodeOptions::default()),
            Err(DecodeError::TooLarge(65535, 65535))
        );
    }

    #[test]
    fn cmyk_formula_matches_pillow_corners() {
        // Stored (Adobe-inverted) values: 255 = no ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), vec![255, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 0]), vec![0, 0, 0]);
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), vec![0, 255, 255]);
    }
}
