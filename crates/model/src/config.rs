//! `config.json` of a MiniCPM-V checkpoint, read the way the official configuration classes
//! read it (spec §7.6–7.7): keys missing from the file take the *class* defaults, which differ
//! from the released models — so a file lacking them builds the same (different) model here as
//! in PyTorch, instead of silently assuming the real sizes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use crate::error::ModelError;

/// The three supported model versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// MiniCPM-V 2.0: MiniCPM-2.4B + timm SigLIP ViT.
    V2_0,
    /// MiniCPM-Llama3-V 2.5: Llama-3-8B + Idefics2 NaViT (1-D position quirk).
    V2_5,
    /// MiniCPM-V 2.6: Qwen2-7B + NaViT SigLIP with 2-D positions.
    V2_6,
}

impl Version {
    /// The version string as written in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V2_0 => "2.0",
            Version::V2_5 => "2.5",
            Version::V2_6 => "2.6",
        }
    }
}

/// The language model half.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlmConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// q/k/v projections carry a bias (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Input embeddings are multiplied by this (MiniCPM: 12; others 1).
    pub scale_emb: f64,
    /// Residual branches are multiplied by this (MiniCPM: scale_depth/√layers; others 1).
    pub residual_scale: f64,
    /// Hidden states are divided by this before `lm_head` (MiniCPM: hidden/dim_model_base).
    pub logit_divisor: f64,
}

impl LlmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Which GELU the vision MLP uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Gelu {
    /// Exact, erf-based (timm's `nn.GELU`, V2.0).
    Erf,
    /// `gelu_pytorch_tanh` (2.5, 2.6).
    Tanh,
}

/// The vision tower (layer count already reduced by `drop_vision_last_layer`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub layer_norm_eps: f64,
    pub gelu: Gelu,
}

impl VisionConfig {
    /// Patches per side of the learned position table (V2.0: 27; NaViT: 70).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The perceiver resampler between the two.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResamplerConfig {
    pub query_num: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub kv_dim: usize,
    /// V2.0 adds a stored query position table; 2.5/2.6 do not.
    pub query_pos: bool,
}

/// Options that change what the model computes relative to the reference; off means
/// reference behaviour (spec §10).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fixes {
    /// 2.5 only: mask padding patches and use 2-D position buckets, as 2.6 does, instead of
    /// the reference's "all patches valid" 1-D positions (spec §7.2).
    pub v25_vision_masking: bool,
}

/// A parsed checkpoint configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub version: Version,
    pub llm: LlmConfig,
    pub vision: VisionConfig,
    pub resampler: ResamplerConfig,
    /// The file as read, written back (with updates) by checkpoint writers.
    pub raw: Value,
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| {
        x.as_f64()
            .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
    })
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize)
}

impl ModelConfig {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_value(raw).map_err(|reason| ModelError::Config { path, reason })
    }

    /// Interprets a parsed `config.json`.
    pub fn from_value(raw: Value) -> Result<Self, String> {
        let version = detect_version(&raw)?;
        let need = |key: &str| {
            get_usize(&raw, key).ok_or_else(|| format!("`{key}` is missing or not an integer"))
        };
        let hidden_size = need("hidden_size")?;
        let num_heads = need("num_attention_heads")?;
        let num_layers = need("num_hidden_layers")?;
        let (scale_emb, residual_scale, logit_divisor) = match version {
            Version::V2_0 => {
                let scale_emb = get_f64(&raw, "scale_emb").unwrap_or(1.0);
                let scale_depth = get_f64(&raw, "scale_depth").unwrap_or(1.0);
                let dim_model_base = get_f64(&raw, "dim_model_base").unwrap_or(1.0);
                (
                    scale_emb,
                    scale_depth / (num_layers as f64).sqrt(),
                    hidden_size as f64 / dim_model_base,
                )
            }
            _ => (1.0, 1.0, 1.0),
        };
        let llm = LlmConfig {
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: get_usize(&raw, "num_key_value_heads").unwrap_or(num_heads),
            rms_norm_eps: get_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta: get_f64(&raw, "rope_theta").unwrap_or(10000.0),
            qkv_bias: version == Version::V2_6
                || raw
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            scale_emb,
            residual_scale,
            logit_divisor,
        };
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(format!(
                "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            ));
        }
        if llm.num_kv_heads == 0 || num_heads % llm.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {}",
                llm.num_kv_heads
            ));
        }
        let drop_last = raw
            .get("drop_vision_last_layer")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let vision = vision_config(&raw, version, drop_last)?;
        if hidden_size % 128 != 0 {
            return Err(format!(
                "hidden_size {hidden_size} is not a multiple of 128 (the resampler uses \
                 hidden_size / 128 heads)"
            ));
        }
        let query_num = get_usize(&raw, "query_num").unwrap_or(64);
        if version == Version::V2_0 {
            let side = (query_num as f64).sqrt().round() as usize;
            if side * side != query_num {
                return Err(format!(
                    "query_num {query_num} is not a perfect square (V2.0 lays queries on a grid)"
                ));
            }
        }
        let resampler = ResamplerConfig {
            query_num,
            embed_dim: hidden_size,
            num_heads: hidden_size / 128,
            kv_dim: vision.hidden_size,
            query_pos: version == Version::V2_0,
        };
        Ok(ModelConfig {
            version,
            llm,
            vision,
            resampler,
            raw,
        })
    }
}

fn detect_version(raw: &Value) -> Result<Version, String> {
    if let Some(v) = get_f64(raw, "version") {
        return match (v * 10.0).round() as i64 {
            20 => Ok(Version::V2_0),
            25 => Ok(Version::V2_5),
            26 => Ok(Version::V2_6),
            _ => Err(format!(
                "`version` {v} is not a supported MiniCPM-V version (2.0, 2.5, 2.6)"
            )),
        };
    }
    // The released V2.0 config has no `version`; it is the one with MiniCPM scalings.
    if raw.get("scale_emb").is_some() {
        return Ok(Version::V2_0);
    }
    let vt = raw
        .get("vision_config")
        .and_then(|v| v.get("model_type"))
        .and_then(Value::as_str);
    match vt {
        Some("idefics2") => Ok(Version::V2_5),
        Some("siglip") => Ok(Version::V2_6),
        _ => Err(
            "cannot tell the MiniCPM-V version: no `version`, no `scale_emb`, no \
                  `vision_config.model_type`"
                .into(),
        ),
    }
}

fn vision_config(raw: &Value, version: Version, drop_last: bool) -> Result<VisionConfig, String> {
    let vc = raw.get("vision_config");
    let patch_default = get_usize(raw, "patch_size").unwrap_or(14);
    let key = |k: &str, v2_default: usize| -> Result<usize, String> {
        match vc.and_then(|v| get_usize(v, k)) {
            Some(x) => Ok(x),
            // V2.0's real config has no vision_config: the tower is timm's
            // vit_so400m_patch14_siglip_384.
            None if version == Version::V2_0 => Ok(v2_default),
            None => Err(format!(
                "`vision_config.{k}` is missing (the official code would silently build a \
                 smaller default tower)"
            )),
        }
    };
    let hidden_size = key("hidden_size", 1152)?;
    let num_heads = key("num_attention_heads", 16)?;
    let layers = key("num_hidden_layers", 27)?;
    let layers = if drop_last {
        layers.saturating_sub(1)
    } else {
        layers
    };
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(format!(
            "vision hidden_size {hidden_size} is not a multiple of its {num_heads} heads"
        ));
    }
    Ok(VisionConfig {
        hidden_size,
        intermediate_size: key("intermediate_size", 4304)?,
        num_layers: layers,
        num_heads,
        patch_size: key("patch_size", patch_default)?,
        image_size: key("image_size", 384)?,
        layer_norm_eps: 1e-6,
        gelu: if version == Version::V2_0 {
            Gelu::Erf
        } else {
            Gelu::Tanh
        },
    })
}
