//! The three model versions against PyTorch: logits, loss, vision outputs, resampler features
//! and gradients of a packed row of two samples with three images of different sizes.
//! Fixtures: tests/fixtures/model (made by scripts/fixtures/gen_model_fixtures.py from
//! transformers' Llama/Qwen2/Idefics2, timm's ViT and a PyTorch rendering of the spec).

use candle_core::{DType, Device, Tensor};
use cpmv_model::{Batch, ImageInput, LoadOptions, MiniCpmV, Trainable};
use std::collections::HashMap;

// The GPU test binary includes this file and its sibling as modules: each brings the shared
// module along, a copy apiece.
#[allow(clippy::duplicate_mod)]
#[path = "common/mod.rs"]
mod common;
use common::{device, fixture_dir};

struct Case {
    t: HashMap<String, Tensor>,
}

impl Case {
    fn load(v: &str) -> Self {
        let t =
            candle_core::safetensors::load(fixture_dir(v).join("case.safetensors"), &Device::Cpu)
                .unwrap();
        Case { t }
    }
    fn get(&self, k: &str) -> &Tensor {
        self.t
            .get(k)
            .unwrap_or_else(|| panic!("fixture has no `{k}`"))
    }
    fn i64s(&self, k: &str) -> Vec<i64> {
        self.get(k).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    fn batch(&self) -> Batch {
        let ids = self.i64s("input_ids");
        let pos = self.i64s("position_ids");
        let labels = self.i64s("labels");
        let lens = self.i64s("sample_lens");
        let bounds = self.i64s("image_bound");
        let tgt = self.i64s("tgt_sizes");
        let n_img = bounds.len() / 2;
        let images = (0..n_img)
            .map(|k| {
                let u8s = self.get(&format!("pixel_u8.{k}"));
                let (_, h, w) = u8s.dims3().unwrap();
                assert_eq!(
                    (h / 14, w / 14),
                    (tgt[2 * k] as usize, tgt[2 * k + 1] as usize)
                );
                // CHW u8 → HWC, the shard layout, so the u8 path is what is tested.
                let hwc = u8s.permute((1, 2, 0)).unwrap().flatten_all().unwrap();
                let hwc = hwc.to_vec1::<u8>().unwrap();
                let img = ImageInput::from_hwc_u8(&hwc, h, w, 14).unwrap();
                // The f32 path gives the same patches.
                let chw = self
                    .get(&format!("pixel_values.{k}"))
                    .flatten_all()
                    .unwrap();
                let alt = ImageInput::from_chw(&chw.to_vec1::<f32>().unwrap(), h, w, 14).unwrap();
                assert_eq!(
                    img.normalised(),
                    alt.normalised(),
                    "image {k}: u8 and f32 paths differ"
                );
                img
            })
            .collect();
        Batch {
            input_ids: vec![ids.iter().map(|&x| x as u32).collect()],
            position_ids: vec![pos.iter().map(|&x| x as u32).collect()],
            labels: vec![labels],
            segments: vec![lens.iter().map(|&x| x as usize).collect()],
            images,
            // The fixture is the reference with both samples in one micro-batch: one vision
            // batch for all images.
            image_groups: vec![0; n_img],
            bounds: (0..n_img)
                .map(|k| (0, bounds[2 * k] as usize, bounds[2 * k + 1] as usize))
                .collect(),
        }
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// Gradients whose true value is exactly zero (a bias added to every key of a softmax);
/// the fixture stores float noise there, compared with an absolute tolerance.
fn structurally_zero(name: &str, cfg_d: usize, vis: usize) -> Option<(usize, usize)> {
    match name {
        "vpm.encoder.layers.0.self_attn.k_proj.bias" => Some((0, vis)),
        "vpm.blocks.0.attn.qkv.bias" => Some((vis, vis)),
        "resampler.attn.in_proj_bias" => Some((cfg_d, cfg_d)),
        _ => None,
    }
}

/// How far a result may be from the f32 reference.
///
/// f32: absolute bounds (of f32 rounding through the model). bf16: measured against PyTorch's
/// own bf16 run of the same model and case (`bf16_reference.json`, written by the fixture
/// generator), since bf16 has no absolute yardstick: PyTorch's bf16 gradients are up to 3.8 %
/// (largest element, relative to the largest) and 2.8 % (relative L2) off its f32 ones here.
/// cpmv in bf16 may deviate from the f32 reference by `BF16_FACTOR` × PyTorch's bf16
/// deviation, in the largest element (outputs and gradients) and, for gradients, also in
/// relative L2 norm (the steadier measure), each with a floor of `BF16_FLOOR`. (On the CPU,
/// cpmv's bf16 gradients are within 0.9–1.3× PyTorch's L2 deviation.)
enum Tolerance {
    F32,
    Bf16(serde_json::Value),
}

const BF16_FACTOR: f32 = 2.0;
const BF16_FLOOR: f32 = 1e-2;

impl Tolerance {
    fn load(dtype: DType, v: &str) -> Self {
        if dtype == DType::F32 {
            return Tolerance::F32;
        }
        let path = fixture_dir(v).join("bf16_reference.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tolerance::Bf16(serde_json::from_str(&text).unwrap())
    }

    /// PyTorch's bf16 error entry at `path` (keys and indices).
    fn torch(&self, path: &[&str]) -> Option<&serde_json::Value> {
        let Tolerance::Bf16(j) = self else {
            return None;
        };
        let mut e = j;
        for k in path {
            e = match k.parse::<usize>() {
                Ok(i) => &e[i],
                Err(_) => &e[*k],
            };
        }
        assert!(!e.is_null(), "bf16_reference.json has no {path:?}");
        Some(e)
    }

    /// The largest allowed `max|got − want|` for a result whose reference has largest
    /// magnitude `scale`; `f32_abs` is the f32 bound, `path` the result's entry in
    /// `bf16_reference.json`.
    fn bound(&self, f32_abs: f32, scale: f32, path: &[&str]) -> f32 {
        match self.torch(path) {
            None => f32_abs,
            Some(e) => {
                let rel = e["rel"].as_f64().unwrap() as f32;
                (BF16_FACTOR * rel).max(BF16_FLOOR) * scale.max(1e-6)
            }
        }
    }

    /// In bf16, whether the gradient `got` is within `BF16_FACTOR` × PyTorch's relative L2
    /// error of `want`: `Err` with the figures when not (f32: always `Ok`).
    fn l2_check(&self, name: &str, got: &Tensor, want: &Tensor) -> Result<(), String> {
        let Some(e) = self.torch(&["grads", name]) else {
            return Ok(());
        };
        let torch = e["rel_l2"].as_f64().unwrap() as f32;
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let rel = norm(&(got - want).unwrap()) / norm(want).max(1e-12);
        let bound = (BF16_FACTOR * torch).max(BF16_FLOOR);
        if rel <= bound {
            Ok(())
        } else {
            Err(format!(
                "{name}: relative L2 error {rel:.2e} (PyTorch bf16 {torch:.2e}; bound {bound:.2e})"
            ))
        }
    }

    /// The bound for a part of a gradient that is exactly zero in exact arithmetic (the f32
    /// reference holds rounding noise there): PyTorch's bf16 run leaves much more than noise.
    fn zero_bound(&self, gmax: f32, name: &str) -> f32 {
        match self.torch(&["grads", name]) {
            None => 1e-6,
            Some(e) => {
                let abs = e["max_abs_diff"].as_f64().unwrap() as f32;
                (BF16_FACTOR * abs).max(BF16_FLOOR * gmax)
            }
        }
    }
}

/// On the CPU in f32.
fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn run(v: &str, dtype: DType) {
    let dir = fixture_dir(v);
    let device = device();
    let tol = Tolerance::load(dtype, v);
    let opts = LoadOptions {
        trainable: Trainable::ALL,
        device: device.clone(),
        dtype,
        ..Default::default()
    };
    let model = MiniCpmV::load(&dir, &opts).unwrap();
    let case = Case::load(v);
    let batch = case.batch();

    // Vision tower, valid rows of each image.
    let (vis, lens) = model
        .vision_tower(&batch.images, &batch.image_groups)
        .unwrap();
    for (k, &n) in lens.iter().enumerate() {
        let got = host(&vis.get(k).unwrap().narrow(0, 0, n).unwrap());
        let want = case.get(&format!("vision_out.{k}"));
        let d = max_diff(&got, want);
        let bound = tol.bound(1e-4, max_abs(want), &["vision_out", &k.to_string()]);
        assert!(
            d <= bound,
            "{v}: vision_out.{k} differs by {d} (bound {bound})"
        );
    }
    // Resampler features.
    let feats = model
        .image_features(&batch.images, &batch.image_groups, false)
        .unwrap();
    let want = case.get("features");
    let d = max_diff(&host(&feats), want);
    let bound = tol.bound(1e-4, max_abs(want), &["features"]);
    assert!(d <= bound, "{v}: features differ by {d} (bound {bound})");

    // Logits of every position.
    let logits = host(&model.logits(&batch).unwrap().squeeze(0).unwrap());
    let want = case.get("logits");
    let d = max_diff(&logits, want);
    let scale = max_abs(want);
    let bound = tol.bound(1e-4 * scale.max(1.0), scale, &["logits"]);
    assert!(
        d <= bound,
        "{v}: logits differ by {d} (max |logit| {scale}, bound {bound})"
    );

    // Loss and gradients.
    let out = model.loss(&batch, true).unwrap();
    let loss = host(&out.loss).to_scalar::<f32>().unwrap();
    let want_loss = case.get("loss").to_scalar::<f32>().unwrap();
    // The loss is compared relatively (its magnitude is its scale).
    let bound = tol.bound(1e-5 * want_loss.abs(), want_loss.abs(), &["loss"]);
    assert!(
        (loss - want_loss).abs() <= bound,
        "{v}: loss {loss} vs PyTorch {want_loss} (bound {bound})"
    );
    let grads = out.loss.backward().unwrap();
    let vars = model.params().vars();
    let cfg = model.config();
    let mut checked = 0;
    let mut worst = 0f32;
    let mut failed = Vec::new();
    for (key, want) in &case.t {
        let Some(name) = key.strip_prefix("grad.") else {
            continue;
        };
        let Some(var) = vars.get(name) else {
            // Frozen in the reference as well (V2.0's resampler.pos_embed).
            assert_eq!(name, "resampler.pos_embed", "{v}: no variable for {name}");
            continue;
        };
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{v}: no gradient for {name}"));
        let got = host(got);
        let gmax = max_abs(want);
        match structurally_zero(name, cfg.resampler.embed_dim, cfg.vision.hidden_size) {
            Some((start, len)) => {
                let zero_g = got.narrow(0, start, len).unwrap();
                let zb = tol.zero_bound(gmax, name);
                let z = max_abs(&zero_g);
                if z > zb {
                    failed.push(format!(
                        "{name}[{start}..] is {z}, should be ~0 (bound {zb})"
                    ));
                }
                let rest: Vec<f32> = got.to_vec1::<f32>().unwrap();
                let want_v: Vec<f32> = want.to_vec1::<f32>().unwrap();
                let bound = tol.bound(1e-4 * gmax + 1e-7, gmax, &["grads", name]);
                for (i, (a, b)) in rest.iter().zip(&want_v).enumerate() {
                    if (i < start || i >= start + len) && (a - b).abs() > bound {
                        failed.push(format!("{name}[{i}] {a} vs {b} (bound {bound})"));
                        break;
                    }
                }
            }
            None => {
                if let Err(e) = tol.l2_check(name, &got, want) {
                    failed.push(e);
                }
                let d = max_diff(&got, want);
                worst = worst.max(d / gmax.max(1e-6));
                let bound = tol.bound(1e-4 * gmax.max(1e-6), gmax, &["grads", name]);
                if d > bound {
                    // Collected, so one run reports every gradient out of tolerance.
                    let torch = tol
                        .torch(&["grads", name])
                        .map(|e| format!(", PyTorch bf16 {:.1e}", e["rel"].as_f64().unwrap_or(0.0)))
                        .unwrap_or_default();
                    failed.push(format!(
                        "{name} differs by {d} (max |g| {gmax}, {:.1e} relative{torch}; bound {bound})",
                        d / gmax.max(1e-6)
                    ));
                }
            }
        }
        checked += 1;
    }
    assert!(
        failed.is_empty(),
        "{v} on {dtype:?}: {} of {checked} gradients out of tolerance:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(checked >= 30, "{v}: only {checked} gradients compared");
    eprintln!(
        "{v} on {device:?} {dtype:?}: loss {loss} (PyTorch {want_loss}), {checked} gradients \
         match (worst max|diff|/max|g| {worst:.2e})"
    );
}

#[test]
fn v2_0_matches_pytorch() {
    run("v2_0", DType::F32);
}

#[test]
fn v2_0_matches_pytorch_in_bf16() {
    run("v2_0", DType::BF16);
}

#[test]
fn v2_5_matches_pytorch() {
    run("v2_5", DType::F32);
}

#[test]
fn v2_5_matches_pytorch_in_bf16() {
    run("v2_5", DType::BF16);
}

#[test]
fn v2_6_matches_pytorch() {
    run("v2_6", DType::F32);
}

#[test]
fn v2_6_matches_pytorch_in_bf16() {
    run("v2_6", DType::BF16);
}

/// V2.0's learned position grid resampled with PyTorch's antialiased bicubic.
#[test]
fn v2_0_position_resampling_matches_torch_interpolate() {
    use cpmv_model::positions::aa_bicubic_matrix;
    let t = candle_core::safetensors::load(
        fixture_dir("v2_0").join("pos_interp.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let src = t["src"].squeeze(0).unwrap(); // [C, 6, 6]
    let (c, g, _) = src.dims3().unwrap();
    let mut n = 0;
    for (key, want) in &t {
        let Some(size) = key.strip_prefix("out.") else {
            continue;
        };
        let (h, w) = size.split_once('x').unwrap();
        let (h, w): (usize, usize) = (h.parse().unwrap(), w.parse().unwrap());
        let rh = Tensor::from_vec(aa_bicubic_matrix(g, h), (h, g), &Device::Cpu).unwrap();
        let rw = Tensor::from_vec(aa_bicubic_matrix(g, w), (w, g), &Device::Cpu).unwrap();
        // out[c] = Rh · src[c] · Rwᵀ
        let got = rh
            .broadcast_matmul(&src)
            .unwrap()
            .broadcast_matmul(&rw.t().unwrap())
            .unwrap();
        let d = max_diff(&got, &want.squeeze(0).unwrap());
        assert!(d < 1e-5, "{h}x{w}: differs by {d}");
        assert_eq!(got.dims(), &[c, h, w]);
        n += 1;
    }
    assert_eq!(n, 8);
}
