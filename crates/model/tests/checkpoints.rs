//! Tiny checkpoints written by `init_model` from the bundled example model directories:
//! loading, dtype conversion, sharding, errors naming bad tensors, forward + backward on CPU,
//! freezing by part and LoRA without frozen-weight gradients.

use candle_core::{DType, Tensor};
use cpmv_model::init::{init_model, Size};
use cpmv_model::weights::{param_specs, save_tensors, Checkpoint};
use cpmv_model::{
    synthetic, LoadOptions, LoraConfig, MiniCpmV, ModelConfig, ModelError, Trainable,
};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

const EXAMPLES: [&str; 3] = [
    "minicpm-v-2-tiny",
    "minicpm-llama3-v-2_5-tiny",
    "minicpm-v-2_6-tiny",
];

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/models")
        .join(name)
}

fn tiny(name: &str, dtype: DType) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    init_model(&example(name), &out, Size::Tiny, 7, dtype).unwrap();
    (tmp, out)
}

fn small_batch(cfg: &ModelConfig) -> cpmv_model::Batch {
    synthetic::batch(cfg, 1, 2, 24, &[(2, 3), (3, 4)], 11)
}

#[test]
fn tiny_checkpoints_carry_the_config_keys_the_official_code_needs() {
    for name in EXAMPLES {
        let (_tmp, dir) = tiny(name, DType::F32);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        for key in [
            "rms_norm_eps",
            "rope_theta",
            "query_num",
            "drop_vision_last_layer",
            "num_key_value_heads",
            "vision_config",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "patch_size",
            "hidden_act",
            "tie_word_embeddings",
            "version",
            "model_type",
            "architectures",
            "auto_map",
        ] {
            assert!(v.get(key).is_some(), "{name}: config.json lacks `{key}`");
        }
        // The tokenizer files are copied unchanged.
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(example(name).join(f)).unwrap(),
                "{name}: {f} changed"
            );
        }
    }
}

#[test]
fn forward_and_backward_on_every_version() {
    for name in EXAMPLES {
        let (_tmp, dir) = tiny(name, DType::F32);
        let opts = LoadOptions {
            trainable: Trainable::ALL,
            ..Default::default()
        };
        let model = MiniCpmV::load(&dir, &opts).unwrap();
        let batch = small_batch(model.config());
        let out = model.loss(&batch, true).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap();
        // Random weights with std 0.02: the loss is close to ln(vocab).
        let ln_v = (model.config().llm.vocab_size as f32).ln();
        assert!(
            (loss - ln_v).abs() < 1.0,
            "{name}: loss {loss} vs ln V {ln_v}"
        );
        let grads = out.loss.backward().unwrap();
        for (pname, var) in model.params().vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            assert_eq!(g.dims(), var.as_tensor().dims());
        }
        // The loss head equals the mean of the per-token losses.
        let rows = model.token_losses(&batch).unwrap();
        let mean = rows.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean - loss).abs() < 1e-5, "{name}: {mean} vs {loss}");
        assert_eq!(rows.dim(0).unwrap(), batch.supervised());
    }
}

#[test]
fn bf16_and_f16_checkpoints_load_and_convert() {
    let (_t32, d32) = tiny("minicpm-v-2_6-tiny", DType::F32);
    let (_t16, d16) = tiny("minicpm-v-2_6-tiny", DType::BF16);
    let (_th, dh) = tiny("minicpm-v-2_6-tiny", DType::F16);
    let opts = LoadOptions::default();
    let m32 = MiniCpmV::load(&d32, &opts).unwrap();
    let batch = small_batch(m32.config());
    let l32 = m32
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    for d in [&d16, &dh] {
        let m = MiniCpmV::load(d, &opts).unwrap();
        let l = m
            .loss(&batch, false)
            .unwrap()
            .loss
            .to_scalar::<f32>()
            .unwrap();
        // Same seeded values, rounded to 16 bits: close but not equal.
        assert!((l - l32).abs() < 0.05, "{}: {l} vs f32 {l32}", d.display());
    }
    // A model can also run in bf16 (statistics in f32).
    let opts = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let m = MiniCpmV::load(&d16, &opts).unwrap();
    let l = m
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert!((l - l32).abs() < 0.1, "bf16 compute: {l} vs {l32}");
}

fn rewrite(dir: &Path, f: impl Fn(&mut BTreeMap<String, Tensor>)) {
    let ck = Checkpoint::open(dir).unwrap();
    let mut map = BTreeMap::new();
    for n in ck.names() {
        map.insert(
            n.to_string(),
            ck.load(n, DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    }
    drop(ck);
    f(&mut map);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let v: Vec<(String, Tensor)> = map.into_iter().collect();
    save_tensors(dir, &v, None).unwrap();
}

#[test]
fn bad_checkpoints_name_every_problem_tensor() {
    let (_tmp, dir) = tiny("minicpm-v-2_6-tiny", DType::F32);
    rewrite(&dir, |m| {
        m.remove("llm.model.layers.1.mlp.up_proj.weight");
        m.remove("vpm.post_layernorm.bias");
        let t = m.remove("resampler.proj").unwrap();
        m.insert("resampler.proj".into(), t.narrow(0, 0, 128).unwrap());
        m.insert(
            "llm.model.layers.9.self_attn.q_proj.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &candle_core::Device::Cpu).unwrap(),
        );
    });
    let err = MiniCpmV::load(&dir, &LoadOptions::default()).err().unwrap();
    let msg = err.to_string();
    match err {
        ModelError::WeightsMismatch {
            missing,
            unexpected,
            misshaped,
            ..
        } => {
            assert_eq!(
                missing,
                vec![
                    "llm.model.layers.1.mlp.up_proj.weight".to_string(),
                    "vpm.post_layernorm.bias".to_string()
                ]
            );
            assert_eq!(
                unexpected,
                vec!["llm.model.layers.9.self_attn.q_proj.weight"]
            );
            assert_eq!(misshaped.len(), 1);
            assert_eq!(misshaped[0].0, "resampler.proj");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(
        msg.contains("mis-shaped: resampler.proj: expected [256, 256], found [128, 256]"),
        "{msg}"
    );

    // A missing weight file is named too.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = MiniCpmV::load(&dir, &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let (_tmp, dir) = tiny("minicpm-llama3-v-2_5-tiny", DType::F32);
    let single = MiniCpmV::load(&dir, &LoadOptions::default()).unwrap();
    let batch = small_batch(single.config());
    let want = single
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let tensors: Vec<(String, Tensor)> = ck
        .names()
        .map(|n| {
            (
                n.to_string(),
                ck.load(n, DType::F32, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    drop(ck);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let files = save_tensors(&dir, &tensors, Some(4 << 20)).unwrap();
    assert!(
        files.len() >= 4,
        "expected several shards and an index: {files:?}"
    );
    let sharded = MiniCpmV::load(&dir, &LoadOptions::default()).unwrap();
    let got = sharded
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(got, want);
}

fn trainable_names(model: &MiniCpmV) -> HashSet<String> {
    model.params().vars().keys().cloned().collect()
}

#[test]
fn freezing_by_part() {
    let (_tmp, dir) = tiny("minicpm-v-2-tiny", DType::F32);
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let all: Vec<String> = param_specs(&cfg).into_iter().map(|s| s.name).collect();
    // finetune_ds.sh defaults: vision + resampler.
    let opts = LoadOptions {
        trainable: Trainable {
            vision: true,
            resampler: true,
            llm: false,
            embeddings: false,
        },
        ..Default::default()
    };
    let model = MiniCpmV::load(&dir, &opts).unwrap();
    let names = trainable_names(&model);
    for n in &all {
        let want =
            (n.starts_with("vpm.") || n.starts_with("resampler.")) && n != "resampler.pos_embed";
        assert_eq!(names.contains(n), want, "{n}");
    }
    // Frozen LLM layers still carry the gradient back to the vision tower.
    let batch = small_batch(model.config());
    let grads = model.loss(&batch, true).unwrap().loss.backward().unwrap();
    let g = grads
        .get(model.params().vars()["vpm.patch_embed.proj.weight"].as_tensor())
        .unwrap();
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

/// LoRA on a frozen base: only A/B (and modules_to_save) get gradients; no tensor of a frozen
/// weight's shape is materialised by the backward pass. Reports the bytes of gradients held.
#[test]
fn lora_step_holds_no_frozen_weight_gradient() {
    let (_tmp, dir) = tiny("minicpm-v-2_6-tiny", DType::F32);
    let opts = LoadOptions {
        trainable: Trainable {
            vision: false,
            resampler: true,
            llm: false,
            embeddings: true,
        },
        lora: Some(LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            ..Default::default()
        }),
        seed: 3,
        ..Default::default()
    };
    let model = MiniCpmV::load(&dir, &opts).unwrap();
    let cfg = model.config();
    // The default target adapts q/k/v of every LLM layer and nothing else.
    let mut adapted: Vec<&String> = model.params().lora().keys().collect();
    adapted.sort();
    assert_eq!(adapted.len(), 3 * cfg.llm.num_layers);
    assert!(adapted.iter().all(|m| m.starts_with("llm.model.layers.")
        && (m.ends_with("q_proj") || m.ends_with("k_proj") || m.ends_with("v_proj"))));
    // B = 0 at initialisation: the adapted model computes the base model.
    let base = MiniCpmV::load(&dir, &LoadOptions::default()).unwrap();
    let batch = synthetic::batch(cfg, 1, 2, 27, &[(2, 3), (3, 4)], 5);
    let lb = base
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    let out = model.loss(&batch, false).unwrap();
    assert_eq!(out.loss.to_scalar::<f32>().unwrap(), lb);

    let out = model.loss(&batch, true).unwrap();
    let grads = out.loss.backward().unwrap();
    let var_ids: HashSet<_> = model
        .params()
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    let mut frozen_shapes = HashSet::new();
    let mut frozen_bytes = 0usize;
    for (name, t) in model.params().tensors() {
        if t.rank() == 2 && !model.params().is_trainable(name) && name.starts_with("llm.") {
            let (a, b) = t.dims2().unwrap();
            frozen_shapes.insert((a, b));
            frozen_shapes.insert((b, a));
            frozen_bytes += t.elem_count() * 4;
        }
    }
    let (mut held, mut var_bytes) = (0usize, 0usize);
    for id in grads.get_ids() {
        let g = grads.get_id(*id).unwrap();
        let bytes = g.elem_count() * g.dtype().size_in_bytes();
        held += bytes;
        if var_ids.contains(id) {
            var_bytes += bytes;
        } else if let Ok((a, b)) = g.dims2() {
            assert!(
                !frozen_shapes.contains(&(a, b)),
                "a gradient of frozen-weight shape [{a}, {b}] was materialised"
            );
        }
    }
    // Every trainable variable got its gradient.
    for (name, v) in model.params().trainable_vars() {
        assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
    }
    eprintln!(
        "LoRA step (2.6 tiny): {held} bytes of gradients held after backward ({var_bytes} for \
         trainable variables, the rest activation-sized); the frozen LLM weights would add \
         {frozen_bytes} bytes with candle's plain matmul backward"
    );
}

/// 2.5's reference vision makes an image's features depend on the other images of its vision
/// batch; per-sample groups isolate them. 2.6 (masked) does not depend on the grouping.
#[test]
fn vision_grouping_matters_only_for_the_2_5_quirk() {
    for (name, dependent) in [
        ("minicpm-llama3-v-2_5-tiny", true),
        ("minicpm-v-2_6-tiny", false),
    ] {
        let (_tmp, dir) = tiny(name, DType::F32);
        let model = MiniCpmV::load(&dir, &LoadOptions::default()).unwrap();
        let b = synthetic::batch(model.config(), 1, 2, 24, &[(2, 3), (4, 5)], 1);
        let alone = model.image_features(&b.images[..1], &[], false).unwrap();
        let grouped = model.image_features(&b.images, &[0, 1], false).unwrap();
        let together = model.image_features(&b.images, &[], false).unwrap();
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let first = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
        assert!(
            d(&alone, &first(&grouped)) < 1e-5,
            "{name}: grouped features differ from alone"
        );
        let mixed = d(&alone, &first(&together));
        assert_eq!(
            mixed > 1e-3,
            dependent,
            "{name}: one-batch difference {mixed}"
        );
    }
}
