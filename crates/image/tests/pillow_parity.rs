//! Byte-for-byte parity with Pillow: the spec's Appendix A hashes and the fixtures produced by
//! `scripts/fixtures/gen_image_fixtures.py` (Pillow 10.1, the version the reference pins).

use cpmv_image::{resize_bicubic, RgbImage};
use sha2::{Digest, Sha256};

/// The synthetic source of Appendix A: R = 7x+13y, G = 3x+5y, B = x²+y (mod 256).
pub fn synthetic(w: u32, h: u32) -> RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h as u64 {
        for x in 0..w as u64 {
            data.push(((7 * x + 13 * y) % 256) as u8);
            data.push(((3 * x + 5 * y) % 256) as u8);
            data.push(((x * x + y) % 256) as u8);
        }
    }
    RgbImage::from_raw(w, h, data).unwrap()
}

fn sha(img: &RgbImage) -> String {
    hex::encode(Sha256::digest(&img.data))
}

#[test]
fn appendix_a_resize_hashes() {
    let cases = [
        (
            300,
            200,
            546,
            364,
            "c22d3a166d4af4552f29f5a4f170578a7770cf4693dd3956d3dd7fec986f894f",
        ),
        (
            1920,
            1080,
            602,
            336,
            "6015828513aa44b9c96f9b3593885e6f9a55417732784215b94f5ed13869e668",
        ),
        (
            1920,
            1080,
            1680,
            952,
            "76499bb9af1d044339d72710ed246caa688137420af213943c91fd9a24b0a092",
        ),
        (
            1024,
            768,
            1036,
            784,
            "65f50a37161cf1770d9b4e8e51d425a7cd43f79a19c2fe6c831b6c8d0ee01c1c",
        ),
        (
            1024,
            768,
            518,
            392,
            "1fe42b02efc8515374dcce69955e51b3bc7fa6b52fa96b09739319ddc5c2220c",
        ),
        (
            100,
            170,
            336,
            588,
            "2ea3cbff33905e8bab5c0f259d3832b1aa39a6b2fe21c97fb666df310d9fa9fd",
        ),
    ];
    for (w, h, ow, oh, want) in cases {
        let out = resize_bicubic(&synthetic(w, h), ow, oh);
        assert_eq!(sha(&out), want, "{w}x{h} -> {ow}x{oh}");
    }
    let out = resize_bicubic(&synthetic(1920, 1080), 602, 336);
    assert_eq!(out.pixel(0, 0), [23, 9, 3]);
    assert_eq!(out.pixel(301, 168), [199, 213, 95]);
}

use cpmv_image::{decode, plan_slices, DecodeOptions, SliceConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn pair(v: &Value) -> Option<(u32, u32)> {
    v.as_array()
        .map(|a| (a[0].as_u64().unwrap() as u32, a[1].as_u64().unwrap() as u32))
}

/// Thousands of sizes, generated with Python's own round() by the fixture script.
#[test]
fn slicing_sweep_matches_python() {
    let f = fixture("tests/fixtures/slicing/sweep.json");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() > 1000);
    let mut failures = Vec::new();
    for c in cases {
        let g = |k: &str| c[k].as_u64().unwrap() as u32;
        let cfg = SliceConfig {
            max_slice_nums: g("max_slice_nums"),
            scale_resolution: g("scale_resolution"),
            patch_size: g("patch_size"),
        };
        let p = plan_slices(g("w"), g("h"), &cfg);
        let want = (
            pair(&c["grid"]),
            pair(&c["source"]).unwrap(),
            pair(&c["refine"]),
            pair(&c["slice"]),
        );
        let got = (p.grid, p.source, p.refine, p.slice_size());
        if got != want {
            failures.push(format!("{c}: got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

fn load_rgb(rel: &str) -> RgbImage {
    let bytes = std::fs::read(repo_root().join(rel)).unwrap();
    decode(&bytes, DecodeOptions::default()).unwrap()
}

#[test]
fn resize_fixtures_match_pillow() {
    let f = fixture("tests/fixtures/resize/resize.json");
    let mut failures = Vec::new();
    for c in f["cases"].as_array().unwrap() {
        let input = &c["input"];
        let src = match input["kind"].as_str().unwrap() {
            "synthetic" => synthetic(
                input["w"].as_u64().unwrap() as u32,
                input["h"].as_u64().unwrap() as u32,
            ),
            _ => load_rgb(input["path"].as_str().unwrap()),
        };
        let (w, h) = pair(&c["out"]).unwrap();
        let out = resize_bicubic(&src, w, h);
        if sha(&out) != c["sha256"].as_str().unwrap() {
            failures.push(format!("{input} -> {w}x{h}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn decoded_pixels_match_pillow() {
    let f = fixture("tests/fixtures/decode/decode.json");
    let mut failures = Vec::new();
    let cases = f["cases"].as_array().unwrap();
    for c in cases {
        let path = c["path"].as_str().unwrap();
        let bytes = std::fs::read(repo_root().join(path)).unwrap();
        for (transpose, size_key, sha_key) in [
            (false, "size", "rgb_sha256"),
            (true, "transposed_size", "transposed_sha256"),
        ] {
            let opts = DecodeOptions {
                exif_transpose: transpose,
            };
            match decode(&bytes, opts) {
                Ok(img) => {
                    let want_size = pair(&c[size_key]).unwrap();
                    if (img.width, img.height) != want_size
                        || sha(&img) != c[sha_key].as_str().unwrap()
                    {
                        failures.push(format!("{path} (transpose {transpose}): {}", c["note"]));
                    }
                }
                Err(e) => failures.push(format!("{path}: error {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len() * 2,
        failures.join("\n")
    );
}

/// CI runs these parity tests twice, with libjpeg-turbo's SIMD decoder and with the portable one
/// (`--no-default-features`), and says which it expects through `CPMV_EXPECT_JPEG_SIMD`, so a
/// build that silently fell back (no `nasm`) cannot pass for the SIMD run.
#[test]
fn the_jpeg_decoder_is_the_one_expected() {
    let simd = cpmv_image::jpeg_simd();
    eprintln!("libjpeg-turbo SIMD: {simd}");
    match std::env::var("CPMV_EXPECT_JPEG_SIMD").as_deref() {
        Ok("1") => assert!(simd, "expected the SIMD JPEG decoder (is nasm installed?)"),
        Ok("0") => assert!(!simd, "expected the portable JPEG decoder"),
        Ok(other) => panic!("CPMV_EXPECT_JPEG_SIMD={other:?}: expected 0 or 1"),
        Err(_) => assert!(
            !simd || cfg!(feature = "jpeg-simd"),
            "SIMD without the feature"
        ),
    }
}
