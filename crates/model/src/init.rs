//! Seeded random checkpoints in the real layout: a tiny model of a version for tests and CPU
//! demos, or the real sizes for benchmarks. Version, LLM type and tokenizer come from an
//! existing checkpoint directory (`--like`); its non-weight files are copied unchanged.

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, Version};
use crate::error::{ModelError, Result};
use crate::linear::Rng;
use crate::positions::sincos_2d;
use crate::weights::{param_specs, InitKind, ParamSpec};

/// Which sizes to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A few layers, small widths; the vocabulary and query count of the template.
    Tiny,
    /// The released model's sizes (spec §7).
    Full,
}

/// Largest shard written (bytes), as transformers' default `max_shard_size` of 5 GB.
pub const SHARD_BYTES: usize = 5_000_000_000;

fn set(v: &mut Value, key: &str, x: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_string(), x);
    }
}

/// The config of the model to write, derived from the template's `config.json`.
pub fn derive_config(template: &Value, size: Size, dtype: DType) -> Result<ModelConfig> {
    let base = ModelConfig::from_value(template.clone()).map_err(|reason| ModelError::Config {
        path: PathBuf::from("config.json"),
        reason,
    })?;
    let mut v = template.clone();
    let version = base.version;
    let drop = template
        .get("drop_vision_last_layer")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let mut vision = template
        .get("vision_config")
        .cloned()
        .unwrap_or_else(|| json!({}));
    match size {
        Size::Tiny => {
            let kv = if version == Version::V2_0 { 4 } else { 2 };
            for (k, x) in [
                ("hidden_size", json!(256)),
                ("intermediate_size", json!(512)),
                ("num_hidden_layers", json!(2)),
                ("num_attention_heads", json!(4)),
                ("num_key_value_heads", json!(kv)),
            ] {
                set(&mut v, k, x);
            }
            set(&mut vision, "hidden_size", json!(64));
            set(&mut vision, "intermediate_size", json!(128));
            set(&mut vision, "num_attention_heads", json!(2));
            set(
                &mut vision,
                "num_hidden_layers",
                json!(if drop { 3 } else { 2 }),
            );
            set(&mut vision, "patch_size", json!(14));
            let image = if version == Version::V2_0 { 384 } else { 980 };
            set(&mut vision, "image_size", json!(image));
        }
        Size::Full => {
            let (h, i, l, nh, kv, eps, theta, q, vocab) = match version {
                Version::V2_0 => (2304, 5760, 40, 36, 36, 1e-5, 10000.0, 64, 122_753),
                Version::V2_5 => (4096, 14336, 32, 32, 8, 1e-5, 500000.0, 96, 128_256),
                Version::V2_6 => (3584, 18944, 28, 28, 4, 1e-6, 1000000.0, 64, 151_666),
            };
            for (k, x) in [
                // The released vocabulary (embeddings and lm_head are a large part of the model);
                // a tiny tokenizer's ids all fit in it.
                ("vocab_size", json!(vocab)),
                ("hidden_size", json!(h)),
                ("intermediate_size", json!(i)),
                ("num_hidden_layers", json!(l)),
                ("num_attention_heads", json!(nh)),
                ("num_key_value_heads", json!(kv)),
                ("rms_norm_eps", json!(eps)),
                ("rope_theta", json!(theta)),
                ("query_num", json!(q)),
            ] {
                set(&mut v, k, x);
            }
            if version == Version::V2_0 {
                set(&mut v, "scale_emb", json!(12));
                set(&mut v, "dim_model_base", json!(256));
                set(&mut v, "scale_depth", json!(1.4));
                set(&mut v, "drop_vision_last_layer", json!(true));
            } else {
                set(&mut v, "drop_vision_last_layer", json!(false));
            }
            set(&mut vision, "hidden_size", json!(1152));
            set(&mut vision, "intermediate_size", json!(4304));
            set(&mut vision, "num_attention_heads", json!(16));
            set(&mut vision, "num_hidden_layers", json!(27));
            set(&mut vision, "patch_size", json!(14));
            let image = if version == Version::V2_0 { 384 } else { 980 };
            set(&mut vision, "image_size", json!(image));
        }
    }
    set(&mut v, "vision_config", vision);
    // The released V2.0 config has no `version`; writing it makes the version explicit to
    // every reader (the official code ignores it there).
    let number = match version {
        Version::V2_0 => 2.0,
        Version::V2_5 => 2.5,
        Version::V2_6 => 2.6,
    };
    set(&mut v, "version", json!(number));
    let name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    set(&mut v, "torch_dtype", json!(name));
    ModelConfig::from_value(v).map_err(|reason| ModelError::Config {
        path: PathBuf::from("config.json"),
        reason,
    })
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name mixed with the seed: a tensor's values do not depend on the order
    // in which tensors are generated.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The seeded value of one parameter.
pub fn init_tensor(spec: &ParamSpec, cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<Tensor> {
    let n: usize = spec.shape.iter().product();
    let data: Vec<f32> = match spec.init {
        InitKind::Normal(std) => {
            let mut rng = Rng(name_seed(seed, &spec.name));
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        }
        InitKind::Ones => vec![1.0; n],
        InitKind::Zeros => vec![0.0; n],
        InitKind::QuerySinCos => {
            let side = (cfg.resampler.query_num as f64).sqrt().round() as usize;
            sincos_2d(side, side, cfg.resampler.embed_dim)
        }
    };
    Ok(Tensor::from_vec(data, spec.shape.clone(), &Device::Cpu)?.to_dtype(dtype)?)
}

/// Summary of a written checkpoint.
#[derive(Debug, Clone)]
pub struct Written {
    pub dir: PathBuf,
    pub version: Version,
    pub parameters: usize,
    pub files: Vec<PathBuf>,
}

/// Writes a seeded checkpoint directory shaped like `like` into `out` (which must not
/// exist or be empty).
pub fn init_model(like: &Path, out: &Path, size: Size, seed: u64, dtype: DType) -> Result<Written> {
    let cfg_path = like.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Io {
        path: cfg_path.clone(),
        source: e,
    })?;
    let template: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    let cfg = derive_config(&template, size, dtype).map_err(|e| match e {
        ModelError::Config { reason, .. } => ModelError::Config {
            path: cfg_path.clone(),
            reason,
        },
        other => other,
    })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| ModelError::Io { path, source: e }
    };
    cpmv_fsio::refuse_overlap(
        "--out",
        out,
        &[cpmv_fsio::Input {
            flag: "--like",
            path: like,
        }],
    )?;
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(ModelError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory exists and is not empty",
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    // Tokenizer, processor and code files are copied unchanged; weights and config are ours.
    crate::weights::copy_side_files(like, out)?;
    let cfg_text = serde_json::to_string_pretty(&cfg.raw).map_err(|e| ModelError::Config {
        path: out.join("config.json"),
        reason: e.to_string(),
    })?;
    std::fs::write(out.join("config.json"), cfg_text + "\n")
        .map_err(io(&out.join("config.json")))?;

    let specs = param_specs(&cfg);
    let elem = dtype.size_in_bytes();
    // Group tensors into shards first so the file names can carry the shard count.
    let mut groups: Vec<Vec<&ParamSpec>> = vec![Vec::new()];
    let mut size_acc = 0usize;
    for s in &specs {
        let b = s.shape.iter().product::<usize>() * elem;
        if size_acc + b > SHARD_BYTES && !groups.last().is_none_or(Vec::is_empty) {
            groups.push(Vec::new());
            size_acc = 0;
        }
        size_acc += b;
        if let Some(g) = groups.last_mut() {
            g.push(s);
        }
    }
    let n = groups.len();
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, g) in groups.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let mut group = Vec::with_capacity(g.len());
        for s in g {
            let t = init_tensor(s, &cfg, seed, dtype)?;
            total += crate::ops::tensor_bytes(&t);
            weight_map.insert(s.name.clone(), fname.clone());
            group.push((s.name.clone(), t));
        }
        let path = out.join(&fname);
        crate::weights::write_safetensors(&path, &group)?;
        files.push(path);
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = out.join("model.safetensors.index.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).unwrap_or_default(),
        )
        .map_err(io(&path))?;
        files.push(path);
    }
    Ok(Written {
        dir: out.to_path_buf(),
        version: cfg.version,
        parameters: specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(dir: &str) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/models")
            .join(dir)
            .join("config.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        derive_config(&v, Size::Full, DType::BF16).unwrap()
    }

    fn parameters(cfg: &ModelConfig) -> usize {
        crate::weights::param_specs(cfg)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// `--size full` has the released models' parameter counts (spec §7.1, §7.3 accounting:
    /// half the safetensors index `total_size` of the bf16 checkpoints).
    #[test]
    fn full_size_matches_the_released_checkpoints() {
        assert_eq!(parameters(&full("minicpm-v-2-tiny")), 3_434_965_792);
        assert_eq!(parameters(&full("minicpm-v-2_6-tiny")), 8_099_175_152);
        let v25 = full("minicpm-llama3-v-2_5-tiny");
        assert_eq!(v25.llm.vocab_size, 128_256);
        let n = parameters(&v25);
        assert!((8_400_000_000..8_600_000_000).contains(&n), "{n}");
    }
}
