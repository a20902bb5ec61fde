//! The block path's vision and decoder layers against candle's autograd path on the tiny
//! real-format models of all three versions: outputs, input gradients and the gradient of
//! every trainable tensor (full fine-tune, LoRA with dropout over frozen weights, both at once),
//! f32, relative error ≤ 1e-5, and the same LoRA dropout draws.
//!
//! On the CPU by default. The GPU test binary (`tests/gpu`) runs the same checks on the GPU
//! with `CPMV_TEST_DEVICE=cuda CPMV_CUDA_BLOCKS=1`: the CUDA backend against candle's fused
//! CUDA path, masks made on the device from the same seeds.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use cpmv_model::config::Fixes;
use cpmv_model::{synthetic, LoadOptions, LoraConfig, MiniCpmV, Trainable};

// The GPU test binary includes this file and its sibling as modules: each brings the shared
// module along, a copy apiece.
#[allow(clippy::duplicate_mod)]
#[path = "common/mod.rs"]
mod common;
pub(crate) use common::{device, fixture_dir};

/// `max |a − b| / max |b|`.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}

pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub(crate) fn seeded(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    let mut rng = cpmv_model::Rng(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, device).unwrap()
}

pub(crate) struct Setup {
    pub(crate) name: &'static str,
    pub(crate) trainable: Trainable,
    pub(crate) lora: Option<LoraConfig>,
}

pub(crate) fn setups() -> Vec<Setup> {
    let vision_only = Trainable {
        vision: true,
        ..Trainable::NONE
    };
    // Every vision projection of both towers.
    let all_vision = r"vpm\.(blocks|encoder\.layers)\.\d+\.(attn\.qkv|attn\.proj|self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)";
    vec![
        Setup {
            name: "full",
            trainable: vision_only,
            lora: None,
        },
        Setup {
            name: "lora over frozen weights, dropout",
            trainable: Trainable::NONE,
            lora: Some(LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.2,
                target: all_vision.into(),
            }),
        },
        Setup {
            name: "full + lora on some projections",
            trainable: vision_only,
            lora: Some(LoraConfig {
                r: 3,
                alpha: 3.0,
                dropout: 0.1,
                target: r"vpm\..*\.(qkv|k_proj|fc1)".into(),
            }),
        },
    ]
}

fn check(version: &str, fixes: Fixes) {
    for s in setups() {
        let opts = LoadOptions {
            trainable: s.trainable,
            lora: s.lora.clone(),
            seed: 7,
            fixes,
            device: device(),
            ..Default::default()
        };
        let model = MiniCpmV::load(&fixture_dir(version), &opts).unwrap();
        assert!(model.vision_on_blocks(), "the block path is off");
        let cfg = model.config().clone();
        // Images of three sizes: padded rows, and a masked or unmasked scheme.
        let batch = synthetic::batch(&cfg, 1, 3, 8, &[(2, 3), (4, 4), (1, 2)], 11);
        let input = model.vision_embed(&batch.images, true).unwrap();
        let vars = model.params().trainable_vars();
        let mut x = input.x.detach();
        for i in 0..model.vision_num_layers() {
            let what = format!("{version} {:?} [{}] layer {i}", fixes, s.name);
            let gy = seeded(x.dims(), 100 + i as u64, x.device());
            let state = model.dropout_state();

            // Reference: candle's autograd.
            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = model
                .vision_layer(i, xv.as_tensor(), input.mask.as_ref(), true)
                .unwrap();
            let grads = cpmv_model::ops::backward_with(&y_ref, &gy).unwrap();
            let after_ref = model.dropout_state();

            // Block path, same dropout draws.
            model.set_dropout_state(state);
            let (y, st) = model
                .vision_block_forward(i, &x, &input, true, true)
                .unwrap();
            assert_eq!(
                model.dropout_state(),
                after_ref,
                "{what}: dropout draws differ"
            );
            let (gx, pgrads) = model.vision_block_backward(&st.unwrap(), &gy).unwrap();

            let e = rel_err(&y, &y_ref);
            assert!(e <= 1e-5, "{what}: output rel err {e}");
            let e = rel_err(&gx, grads.get(xv.as_tensor()).unwrap());
            assert!(e <= 1e-5, "{what}: input gradient rel err {e}");
            compare_grads(true, &what, &vars, &grads, &pgrads);
            x = y_ref.detach();
        }
    }
}

#[test]
fn v2_0_vit_block_matches_autograd() {
    check("v2_0", Fixes::default());
}

#[test]
fn v2_5_navit_block_matches_autograd_reference_and_fixed_scheme() {
    check("v2_5", Fixes::default());
    check(
        "v2_5",
        Fixes {
            v25_vision_masking: true,
        },
    );
}

#[test]
fn v2_6_navit_block_matches_autograd() {
    check("v2_6", Fixes::default());
}

/// Every trainable tensor the reference gives a gradient gets the same one from the block
/// path, and no other tensor gets one. `zero_key_bias`: the layers' key-bias gradients are
/// analytically zero (no rotary embedding between the bias and the scores).
fn compare_grads(
    zero_key_bias: bool,
    what: &str,
    vars: &[(String, Var)],
    grads: &GradStore,
    pgrads: &[(Tensor, Tensor)],
) {
    let scale = vars
        .iter()
        .filter_map(|(_, v)| grads.get(v.as_tensor()))
        .map(max_abs)
        .fold(0f32, f32::max);
    let mut want = 0;
    for (name, v) in vars {
        let Some(g_ref) = grads.get(v.as_tensor()) else {
            continue;
        };
        want += 1;
        let g = pgrads
            .iter()
            .find(|(p, _)| p.id() == v.as_tensor().id())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        if zero_key_bias && name.ends_with("k_proj.bias") {
            // Analytically zero (a key bias shifts all of a query's scores by the same
            // amount, which softmax ignores): both paths give rounding noise, held small
            // against the layer's gradients.
            let noise = max_abs(&g.1).max(max_abs(g_ref));
            assert!(noise <= 1e-5 * scale, "{what}: {name} gradient {noise}");
            continue;
        }
        let e = rel_err(&g.1, g_ref);
        assert!(e <= 1e-5, "{what}: {name} gradient rel err {e}");
    }
    assert!(want > 0, "{what}: nothing trains");
    assert_eq!(pgrads.len(), want, "{what}: gradients of other tensors");
}

pub(crate) fn llm_setups() -> Vec<Setup> {
    let llm_only = Trainable {
        llm: true,
        ..Trainable::NONE
    };
    vec![
        Setup {
            name: "full",
            trainable: llm_only,
            lora: None,
        },
        Setup {
            name: "lora on q/k/v/o over frozen weights, dropout",
            trainable: Trainable::NONE,
            lora: Some(LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.2,
                target: r"llm\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj".into(),
            }),
        },
        Setup {
            name: "full + lora on some projections",
            trainable: llm_only,
            lora: Some(LoraConfig {
                r: 3,
                alpha: 3.0,
                dropout: 0.1,
                target: r"llm\..*\.(k_proj|gate_proj|down_proj)".into(),
            }),
        },
    ]
}

/// Decoder layers over packed rows (three samples per row, so several causal segments) with
/// rotary positions restarting per sample.
fn check_llm(version: &str) {
    for s in llm_setups() {
        let opts = LoadOptions {
            trainable: s.trainable,
            lora: s.lora.clone(),
            seed: 7,
            device: device(),
            ..Default::default()
        };
        let model = MiniCpmV::load(&fixture_dir(version), &opts).unwrap();
        assert!(model.llm_on_blocks(), "the block path is off");
        let cfg = model.config().clone();
        let batch = synthetic::batch(&cfg, 2, 3, 6, &[(2, 2), (1, 3)], 13);
        let aux = model.llm_aux(&batch).unwrap();
        let vars = model.params().trainable_vars();
        let mut x = model.input_embeddings(&batch, true).unwrap().detach();
        for i in 0..model.llm().num_layers() {
            let what = format!("{version} LLM [{}] layer {i}", s.name);
            let gy = seeded(x.dims(), 200 + i as u64, x.device());
            let state = model.dropout_state();

            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = model.layer_forward(i, xv.as_tensor(), &aux, true).unwrap();
            let grads = cpmv_model::ops::backward_with(&y_ref, &gy).unwrap();
            let after_ref = model.dropout_state();

            model.set_dropout_state(state);
            let (y, st) = model.llm_block_forward(i, &x, &aux, true, true).unwrap();
            assert_eq!(
                model.dropout_state(),
                after_ref,
                "{what}: dropout draws differ"
            );
            let (gx, pgrads) = model.llm_block_backward(&st.unwrap(), &aux, &gy).unwrap();

            let e = rel_err(&y, &y_ref);
            assert!(e <= 1e-5, "{what}: output rel err {e}");
            let e = rel_err(&gx, grads.get(xv.as_tensor()).unwrap());
            assert!(e <= 1e-5, "{what}: input gradient rel err {e}");
            // Rotary positions make a key bias matter: its gradient is compared as any other.
            compare_grads(false, &what, &vars, &grads, &pgrads);
            x = y_ref.detach();
        }
    }
}

#[test]
fn v2_0_minicpm_decoder_block_matches_autograd() {
    check_llm("v2_0");
}

#[test]
fn v2_5_llama3_decoder_block_matches_autograd() {
    check_llm("v2_5");
}

#[test]
fn v2_6_qwen2_decoder_block_matches_autograd() {
    check_llm("v2_6");
}
