//! The model's tensors by checkpoint name, which of them train, and the LoRA adapters.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::{LoraAdapter, LoraConfig, Rng};
use crate::weights::{param_specs, part_of, Checkpoint, Part};

/// Which parts train (spec §8.2). The resampler trains in every reference mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trainable {
    pub vision: bool,
    pub resampler: bool,
    /// The LLM's layers, final norm and `lm_head`.
    pub llm: bool,
    /// `llm.model.embed_tokens`.
    pub embeddings: bool,
}

impl Trainable {
    /// Nothing trains (evaluation).
    pub const NONE: Trainable = Trainable {
        vision: false,
        resampler: false,
        llm: false,
        embeddings: false,
    };
    /// Everything trains.
    pub const ALL: Trainable = Trainable {
        vision: true,
        resampler: true,
        llm: true,
        embeddings: true,
    };

    fn covers(&self, part: Part) -> bool {
        match part {
            Part::Vision => self.vision,
            Part::Resampler => self.resampler,
            Part::Llm => self.llm,
            Part::Embeddings => self.embeddings,
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub trainable: Trainable,
    pub lora: Option<LoraConfig>,
    /// Seeds the LoRA A initialisation.
    pub seed: u64,
    pub fixes: crate::config::Fixes,
    /// Run vision layers on the block path where it exists (see [`crate::block`]); off
    /// keeps candle's autograd, the reference. Default: on, unless `CPMV_UNFUSED=1`.
    pub block_path: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: Trainable::NONE,
            lora: None,
            seed: 0,
            fixes: Default::default(),
            block_path: !crate::block::unfused_env(),
        }
    }
}

/// Tensors that never train: V2.0's fixed query position table.
fn always_frozen(name: &str) -> bool {
    name == "resampler.pos_embed"
}

/// All checkpoint tensors plus the trainable subset and LoRA adapters.
pub struct ParamStore {
    tensors: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
    lora: BTreeMap<String, LoraAdapter>,
    lora_cfg: Option<LoraConfig>,
    lora_regex: Option<regex::Regex>,
    lora_rng: Rng,
    dtype: DType,
    device: Device,
}

impl ParamStore {
    /// Loads every tensor `cfg` implies from the checkpoint, after checking names and shapes.
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, opts: &LoadOptions) -> Result<Self> {
        let specs = param_specs(cfg);
        ckpt.check(&specs)?;
        let mut map = BTreeMap::new();
        for s in &specs {
            map.insert(
                s.name.clone(),
                ckpt.load(&s.name, opts.dtype, &opts.device)?,
            );
        }
        Self::from_tensors(map, opts)
    }

    /// Builds a store from tensors already in memory (e.g. freshly initialised ones).
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>, opts: &LoadOptions) -> Result<Self> {
        let mut out = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for (name, t) in tensors {
            let t = t.to_dtype(opts.dtype)?.to_device(&opts.device)?;
            if opts.trainable.covers(part_of(&name)) && !always_frozen(&name) {
                let v = Var::from_tensor(&t)?;
                out.insert(name.clone(), v.as_tensor().clone());
                vars.insert(name, v);
            } else {
                out.insert(name, t);
            }
        }
        let lora_regex =
            match &opts.lora {
                Some(l) => Some(l.regex().map_err(|e| {
                    ModelError::Lora(format!("bad target regex `{}`: {e}", l.target))
                })?),
                None => None,
            };
        Ok(ParamStore {
            tensors: out,
            vars,
            lora: BTreeMap::new(),
            lora_cfg: opts.lora.clone(),
            lora_regex,
            lora_rng: Rng(opts.seed ^ 0x4C6F_5241),
            dtype: opts.dtype,
            device: opts.device.clone(),
        })
    }

    /// A tensor by checkpoint name.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::Batch(format!("internal: no parameter `{name}`")))
    }

    /// Whether the tensor of that name trains.
    pub fn is_trainable(&self, name: &str) -> bool {
        self.vars.contains_key(name)
    }

    /// A linear layer `<module>.weight` (+ `<module>.bias` if `bias`), with a LoRA adapter
    /// when the module name matches the LoRA target.
    pub fn linear(&mut self, module: &str, bias: bool) -> Result<crate::linear::Linear> {
        let wname = format!("{module}.weight");
        let weight = self.get(&wname)?;
        let bias = if bias {
            Some(self.get(&format!("{module}.bias"))?)
        } else {
            None
        };
        let lora = match (&self.lora_cfg, &self.lora_regex) {
            (Some(cfg), Some(re)) if re.is_match(module) => {
                let (out_dim, in_dim) = weight.dims2()?;
                let ad = LoraAdapter::new(
                    in_dim,
                    out_dim,
                    cfg,
                    &mut self.lora_rng,
                    self.dtype,
                    &self.device,
                )?;
                self.lora.insert(module.to_string(), ad.clone());
                Some(ad)
            }
            _ => None,
        };
        Ok(crate::linear::Linear {
            weight_trainable: self.is_trainable(&wname),
            weight,
            bias,
            lora,
        })
    }

    /// Trainable checkpoint tensors, by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// LoRA adapters by module name.
    pub fn lora(&self) -> &BTreeMap<String, LoraAdapter> {
        &self.lora
    }

    /// Every variable the optimiser updates: trainable tensors and LoRA A/B, with names
    /// (`<module>.lora_A.weight` / `.lora_B.weight` for adapters).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (m, ad) in &self.lora {
            v.push((format!("{m}.lora_A.weight"), ad.a.clone()));
            v.push((format!("{m}.lora_B.weight"), ad.b.clone()));
        }
        v
    }

    /// All checkpoint tensors (current values), by name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// The LoRA settings the store was built with.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_cfg.as_ref()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// A shared dropout generator, seeded.
pub fn dropout_rng(seed: u64) -> Mutex<Rng> {
    Mutex::new(Rng(seed ^ 0x0D40_F0A7))
}
