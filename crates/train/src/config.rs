//! Training settings: one struct with the defaults of the official scripts (spec §8.1),
//! overlaid by a preset's `[train]` table and then by command-line flags.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::TrainError;

/// Full fine-tuning or LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    #[default]
    Full,
    Lora,
}

/// How losses of the micro-batches of one optimiser step combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossNorm {
    /// Mean of per-micro-batch token means (what DeepSpeed + the official trainer do).
    #[default]
    Reference,
    /// One token mean over all micro-batches of the step.
    Tokens,
}

/// Dtype of the weights and activations while training. AdamW keeps f32 master weights and
/// f32 moments for bf16 parameters; losses and softmax statistics are computed in f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Opens a device named `cpu`, `cuda` or `cuda:N`. CUDA needs a binary built with
/// `--features cuda`; on CUDA the memory pool is told to keep freed memory (steps reuse it) and
/// per-tensor event tracking is off (cpmv uses one stream).
/// Parses a device name: `None` for `cpu`, the ordinal for `cuda` (0) or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Option<usize>, TrainError> {
    let name = name.trim();
    let bad = || TrainError::Config(format!("--device {name}: expected cpu, cuda or cuda:N"));
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Some)
            .ok_or_else(bad),
    }
}

pub fn open_device(name: &str) -> Result<candle_core::Device, TrainError> {
    let Some(ordinal) = parse_device(name)? else {
        return Ok(candle_core::Device::Cpu);
    };
    let name = name.trim();
    if !cfg!(feature = "cuda") {
        return Err(TrainError::Config(format!(
            "--device {name}: this `train` was built without CUDA support (build with \
             `cargo build --release --features cuda`; README: \"train on NVIDIA GPUs\")"
        )));
    }
    let dev = candle_core::Device::new_cuda(ordinal)
        .map_err(|e| TrainError::Config(format!("--device {name}: {e}")))?;
    #[cfg(feature = "cuda")]
    {
        if let candle_core::Device::Cuda(cd) = &dev {
            // SAFETY: cpmv runs every kernel and copy on this device's one stream.
            unsafe { cd.disable_event_tracking() };
        }
        cpmv_kernels::keep_pool_memory(&dev)?;
    }
    Ok(dev)
}

/// Learning-rate schedules (spec §8.5); `reference` = DeepSpeed WarmupLR as the scripts run.
pub use cpmv_optim::ScheduleKind;

/// Every training setting. Field names are the TOML keys of a preset's `[train]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub mode: TrainMode,
    pub tune_vision: bool,
    pub tune_llm: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_target: String,
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Exempt biases and norm weights from weight decay (the reference decays everything).
    pub no_decay_norm_bias: bool,
    pub max_grad_norm: f64,
    pub schedule: ScheduleKind,
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when set.
    pub warmup_steps: Option<u64>,
    pub loss_norm: LossNorm,
    pub seed: u64,
    /// Packs per micro-batch.
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_steps: Option<u64>,
    pub epochs: Option<f64>,
    pub save_every: u64,
    pub keep_last: usize,
    pub eval_every: u64,
    pub grad_checkpointing: bool,
    pub skip_nonfinite: bool,
    /// 2.5 only: the corrected vision masking instead of the reference quirk.
    pub v25_vision_masking: bool,
    pub log_every: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub dtype: ComputeDtype,
    /// LoRA mode: train the token embeddings too, as the reference does (`modules_to_save`
    /// holds `embed_tokens`). Off saves their gradient, master copy and moments.
    pub lora_embeddings: bool,
    /// Data-parallel ranks: threads of this process (CPU only so far), or, recorded by a run
    /// under a launcher, its world size. Each step covers `nproc_per_node × grad_accum ×
    /// micro_batch` packs, as that many GPUs would.
    pub nproc_per_node: usize,
    /// ZeRO stage: 0 replicates the optimizer on every rank; 1 shards the fp32 master weights
    /// and AdamW moments over the ranks; 2 also keeps only the rank's shard of the accumulated
    /// gradients (reduced after every micro-batch).
    pub zero: u8,
    /// Keeps the optimizer state (fp32 masters and moments) in host memory and runs AdamW on
    /// the CPU, as DeepSpeed's `offload_optimizer`.
    pub offload_optimizer: bool,
    /// Values per collective call when gradients and weights are exchanged, in MiB of f32.
    pub bucket_mb: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: TrainMode::Full,
            tune_vision: true,
            tune_llm: false,
            lora_r: 64,
            lora_alpha: 64.0,
            lora_dropout: 0.05,
            lora_target: cpmv_model::DEFAULT_LORA_TARGET.to_string(),
            learning_rate: 1e-6,
            adam_beta1: 0.9,
            adam_beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            no_decay_norm_bias: false,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::Reference,
            warmup_ratio: 0.01,
            warmup_steps: None,
            loss_norm: LossNorm::Reference,
            seed: 42,
            micro_batch: 1,
            grad_accum: 1,
            max_steps: None,
            epochs: None,
            save_every: 1000,
            keep_last: 10,
            eval_every: 1000,
            grad_checkpointing: false,
            skip_nonfinite: false,
            v25_vision_masking: false,
            log_every: 1,
            device: "cpu".into(),
            dtype: ComputeDtype::F32,
            lora_embeddings: true,
            nproc_per_node: 1,
            zero: 0,
            offload_optimizer: false,
            bucket_mb: 64,
        }
    }
}

/// Settings a resumed run may change freely: they decide when things are saved, evaluated,
/// logged or recomputed, or where the optimizer state lives and in what pieces it is exchanged,
/// never what a step computes (sharding changes only the order of float sums). Every other setting changes the math and
/// is refused on `--resume` unless `--resume-override` is given.
pub const RESUME_FREE_SETTINGS: &[&str] = &[
    "save_every",
    "keep_last",
    "eval_every",
    "log_every",
    "grad_checkpointing",
    "skip_nonfinite",
    "zero",
    "offload_optimizer",
    "bucket_mb",
];

/// One setting that differs between a checkpoint's run and the resumed one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingChange {
    /// The setting's key (the preset key; the flag is `--` + key with `-` for `_`).
    pub setting: String,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
    /// True when the setting changes what a step computes.
    pub changes_math: bool,
}

impl SettingChange {
    /// The command-line flag of the setting.
    pub fn flag(&self) -> String {
        format!("--{}", self.setting.replace('_', "-"))
    }
}

/// The keys a preset's `[train]` table sets (for `train --print-config`).
pub fn preset_keys(path: &Path) -> Result<Vec<String>, TrainError> {
    Ok(match train_table(path)? {
        Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    })
}

#[derive(Deserialize)]
struct PresetFile {
    #[serde(default)]
    train: Option<toml::Value>,
}

/// The `[train]` table of a preset file, if it has one.
fn train_table(path: &Path) -> Result<Option<toml::Value>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let file: PresetFile = toml::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    Ok(file.train)
}

impl TrainConfig {
    /// Reads the `[train]` table of a preset (other tables, e.g. `[prep]`, are ignored).
    pub fn from_preset(path: &Path) -> Result<Self, TrainError> {
        match train_table(path)? {
            None => Ok(TrainConfig::default()),
            Some(v) => v
                .try_into()
                .map_err(|e| TrainError::Config(format!("{}: [train]: {e}", path.display()))),
        }
    }

    /// Refuses what the reference refuses and what cannot work.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.mode == TrainMode::Lora && self.tune_llm {
            return bad(
                "LoRA with --tune-llm true: the official fine-tune refuses this \
                        combination (ValueError); LoRA adapts the LLM instead of training it"
                    .into(),
            );
        }
        if self.mode == TrainMode::Lora && self.lora_r == 0 {
            return bad("--lora-r must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "--lora-dropout {} is not in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.micro_batch == 0 || self.grad_accum == 0 {
            return bad("--micro-batch and --grad-accum must be at least 1".into());
        }
        if !(1..=256).contains(&self.nproc_per_node) {
            return bad(format!(
                "--nproc-per-node {}: expected 1 to 256",
                self.nproc_per_node
            ));
        }
        if self.nproc_per_node > 1 && crate::config::parse_device(&self.device)?.is_some() {
            return bad(format!(
                "--nproc-per-node {} with --device {}: ranks run as CPU threads so far (NCCL \
                 ranks on GPUs are not built yet); use --device cpu",
                self.nproc_per_node, self.device
            ));
        }
        if self.zero > 2 {
            return bad(format!("--zero {}: expected 0, 1 or 2", self.zero));
        }
        if !(1..=65536).contains(&self.bucket_mb) {
            return bad(format!(
                "--bucket-mb {}: expected 1 to 65536",
                self.bucket_mb
            ));
        }
        if self.max_steps.is_none() && self.epochs.is_none() {
            return bad("give --max-steps or --epochs".into());
        }
        if self.max_steps == Some(0) || self.epochs.is_some_and(|e| e.is_nan() || e <= 0.0) {
            return bad("--max-steps / --epochs must be positive".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(format!(
                "--learning-rate {} is not a non-negative number",
                self.learning_rate
            ));
        }
        parse_device(&self.device)?;
        if self.save_every == 0 || self.eval_every == 0 || self.log_every == 0 {
            return bad("--save-every, --eval-every and --log-every must be at least 1".into());
        }
        Ok(())
    }

    /// Every setting that differs from `saved` (the checkpoint's), in key order, each marked
    /// with whether it changes the math (see [`RESUME_FREE_SETTINGS`]). `max_steps` and `epochs`
    /// are compared as the run length they give.
    pub fn changes_from(&self, saved: &TrainConfig) -> Vec<SettingChange> {
        let as_map = |c: &TrainConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let (old, new) = (as_map(saved), as_map(self));
        let mut out = Vec::new();
        for (k, to) in &new {
            let from = old.get(k).cloned().unwrap_or(serde_json::Value::Null);
            if &from != to {
                out.push(SettingChange {
                    setting: k.clone(),
                    from,
                    to: to.clone(),
                    changes_math: !RESUME_FREE_SETTINGS.contains(&k.as_str()),
                });
            }
        }
        // Ranks × accumulation steps is the step's batch: another world size with the same
        // product trains the same steps (e.g. checkpointed on 2 ranks × 1, resumed on 1 × 2).
        if self.nproc_per_node * self.grad_accum == saved.nproc_per_node * saved.grad_accum {
            for c in &mut out {
                if c.setting == "nproc_per_node" || c.setting == "grad_accum" {
                    c.changes_math = false;
                }
            }
        }
        out.sort_by(|a, b| a.setting.cmp(&b.setting));
        out
    }

    /// The parts that train (spec §8.2).
    pub fn trainable(&self) -> cpmv_model::Trainable {
        match self.mode {
            TrainMode::Full => cpmv_model::Trainable {
                vision: self.tune_vision,
                resampler: true,
                llm: self.tune_llm,
                embeddings: self.tune_llm,
            },
            // PEFT modules_to_save: embed_tokens, resampler, and vpm when tuning vision.
            TrainMode::Lora => cpmv_model::Trainable {
                vision: self.tune_vision,
                resampler: true,
                llm: false,
                embeddings: self.lora_embeddings,
            },
        }
    }

    /// LoRA settings in LoRA mode.
    pub fn lora(&self) -> Option<cpmv_model::LoraConfig> {
        (self.mode == TrainMode::Lora).then(|| cpmv_model::LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target: self.lora_target.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset's `[train]` table parses, validates and means what its name says.
    #[test]
    fn presets_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let c = TrainConfig::from_preset(&p).unwrap();
            c.validate().unwrap();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with("-lora.toml") {
                assert_eq!(c.mode, TrainMode::Lora, "{name}");
                assert!(
                    c.lora_target.contains("o_proj"),
                    "{name}: finetune_lora.sh adds o_proj"
                );
            } else if name.starts_with("minicpm") {
                assert_eq!(
                    c,
                    TrainConfig {
                        max_steps: Some(10000),
                        grad_checkpointing: true,
                        ..Default::default()
                    },
                    "{name}"
                );
            }
            n += 1;
        }
        assert!(n >= 7, "only {n} presets");
    }

    #[test]
    fn devices_are_parsed_and_cuda_needs_the_feature() {
        assert!(matches!(open_device("cpu"), Ok(candle_core::Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda0", ""] {
            let e = open_device(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
            let c = TrainConfig {
                device: bad.into(),
                max_steps: Some(1),
                ..Default::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        if !cfg!(feature = "cuda") {
            let e = open_device("cuda:0").unwrap_err().to_string();
            assert!(
                e.contains("without CUDA support") && e.contains("--features cuda"),
                "{e}"
            );
        }
        let c = TrainConfig {
            device: "cuda:1".into(),
            max_steps: Some(1),
            ..Default::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn lora_embeddings_switch_sets_the_trainable_parts_and_modules_to_save() {
        let mut c = TrainConfig {
            mode: TrainMode::Lora,
            ..Default::default()
        };
        assert!(
            c.trainable().embeddings,
            "the reference trains embeddings in LoRA mode"
        );
        assert!(crate::checkpoint::modules_to_save(&c).contains(&"embed_tokens".to_string()));
        c.lora_embeddings = false;
        assert!(!c.trainable().embeddings);
        assert_eq!(
            crate::checkpoint::modules_to_save(&c),
            vec!["resampler".to_string(), "vpm".to_string()]
        );
    }

    #[test]
    fn resume_changes_are_classified_by_whether_they_change_the_math() {
        let saved = TrainConfig {
            max_steps: Some(10),
            ..Default::default()
        };
        let mut now = saved.clone();
        assert!(now.changes_from(&saved).is_empty());
        now.save_every = 5;
        now.grad_checkpointing = true;
        now.log_every = 3;
        let c = now.changes_from(&saved);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|c| !c.changes_math), "{c:?}");
        now.learning_rate = 2e-6;
        now.max_steps = Some(20);
        now.dtype = ComputeDtype::Bf16;
        let math: Vec<String> = now
            .changes_from(&saved)
            .into_iter()
            .filter(|c| c.changes_math)
            .map(|c| c.flag())
            .collect();
        assert_eq!(math, ["--dtype", "--learning-rate", "--max-steps"]);
        // Every free setting is a real key (a rename would silently make it math-changing).
        let keys = match serde_json::to_value(&saved).unwrap() {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        for k in RESUME_FREE_SETTINGS {
            assert!(keys.contains_key(*k), "{k}");
        }
    }

    #[test]
    fn unknown_keys_and_refused_combinations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(&p, "[train]\nlearnig_rate = 1.0\n").unwrap();
        let e = TrainConfig::from_preset(&p).unwrap_err().to_string();
        assert!(e.contains("learnig_rate"), "{e}");
        let c = TrainConfig {
            mode: TrainMode::Lora,
            tune_llm: true,
            max_steps: Some(1),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("refuses"));
    }
}
