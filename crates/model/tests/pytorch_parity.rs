//! The three model versions against PyTorch: logits, loss, vision outputs, resampler features
//! and gradients of a packed row of two samples with three images of different sizes.
//! Fixtures: tests/fixtures/model (made by scripts/fixtures/gen_model_fixtures.py from
//! transformers' Llama/Qwen2/Idefics2, timm's ViT and a PyTorch rendering of the spec).

use candle_core::{DType, Device, Tensor};
use cpmv_model::{Batch, ImageInput, LoadOptions, MiniCpmV, Trainable};
use std::collections::HashMap;
use std::path::PathBuf;

/// `tests/fixtures/model/<v>` of the repository (`CPMV_REPO` overrides the root, for a test
/// binary carried to another machine).
fn fixture_dir(v: &str) -> PathBuf {
    let root = std::env::var_os("CPMV_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join("tests/fixtures/model").join(v)
}

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
                assert_eq!(img, alt, "image {k}: u8 and f32 paths differ");
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

/// Where the parity tests run: the CPU in f32 by default; `CPMV_TEST_DEVICE=cuda` (a build
/// with `--features cuda`, on a GPU machine) and `CPMV_TEST_DTYPE=bf16` run the same fixtures
/// on the GPU, with tolerances widened for bf16 (f32 keeps the CPU's).
fn target() -> (Device, DType, f32) {
    let device = match std::env::var("CPMV_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("CPMV_TEST_DEVICE=cuda needs a CUDA build and GPU")
        }
        _ => Device::Cpu,
    };
    match std::env::var("CPMV_TEST_DTYPE").as_deref() {
        // bf16 keeps 8 bits of mantissa: relative errors of ~1e-2 through a few layers.
        Ok("bf16") => (device, DType::BF16, 300.0),
        _ => (device, DType::F32, 1.0),
    }
}

/// f32 compares absolute differences (as the CPU always has); bf16 compares them relative to
/// the reference's largest magnitude (bf16 keeps ~3 significant digits of any magnitude).
fn rel_scale(want: &Tensor, widen: f32) -> f32 {
    if widen > 1.0 {
        max_abs(want).max(1.0)
    } else {
        1.0
    }
}

/// On the CPU in f32.
fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn run(v: &str) {
    let dir = fixture_dir(v);
    let (device, dtype, widen) = target();
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
        assert!(
            d < 1e-4 * widen * rel_scale(want, widen),
            "{v}: vision_out.{k} differs by {d}"
        );
    }
    // Resampler features.
    let feats = model
        .image_features(&batch.images, &batch.image_groups, false)
        .unwrap();
    let d = max_diff(&host(&feats), case.get("features"));
    assert!(
        d < 1e-4 * widen * rel_scale(case.get("features"), widen),
        "{v}: features differ by {d}"
    );

    // Logits of every position.
    let logits = host(&model.logits(&batch).unwrap().squeeze(0).unwrap());
    let want = case.get("logits");
    let d = max_diff(&logits, want);
    let scale = max_abs(want);
    assert!(
        d <= 1e-4 * widen * scale.max(1.0),
        "{v}: logits differ by {d} (max |logit| {scale})"
    );

    // Loss and gradients.
    let out = model.loss(&batch, true).unwrap();
    let loss = host(&out.loss).to_scalar::<f32>().unwrap();
    let want_loss = case.get("loss").to_scalar::<f32>().unwrap();
    assert!(
        ((loss - want_loss) / want_loss).abs() < if widen > 1.0 { 4e-5 * widen } else { 1e-5 },
        "{v}: loss {loss} vs PyTorch {want_loss}"
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
                assert!(
                    max_abs(&zero_g) < if widen > 1.0 { 1e-2 * gmax } else { 1e-6 },
                    "{v}: {name}[{start}..] should be ~0"
                );
                let rest: Vec<f32> = got.to_vec1::<f32>().unwrap();
                let want_v: Vec<f32> = want.to_vec1::<f32>().unwrap();
                for (i, (a, b)) in rest.iter().zip(&want_v).enumerate() {
                    if i < start || i >= start + len {
                        assert!(
                            (a - b).abs() <= 1e-4 * widen * gmax + 1e-7,
                            "{v}: {name}[{i}] {a} vs {b}"
                        );
                    }
                }
            }
            None => {
                let d = max_diff(&got, want);
                worst = worst.max(d / gmax.max(1e-6));
                if d > 1e-4 * widen * gmax.max(1e-6) {
                    // Collected, so one run reports every gradient out of tolerance.
                    failed.push(format!(
                        "{name} differs by {d} (max |g| {gmax}, {:.1e} relative)",
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
    run("v2_0");
}

#[test]
fn v2_5_matches_pytorch() {
    run("v2_5");
}

#[test]
fn v2_6_matches_pytorch() {
    run("v2_6");
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
