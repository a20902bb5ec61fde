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
        }
    }
}

#[derive(Deserialize)]
struct PresetFile {
    #[serde(default)]
    train: Option<toml::Value>,
}

impl TrainConfig {
    /// Reads the `[train]` table of a preset (other tables, e.g. `[prep]`, are ignored).
    pub fn from_preset(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let file: PresetFile = toml::from_str(&text)
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        match file.train {
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
        if self.save_every == 0 || self.eval_every == 0 || self.log_every == 0 {
            return bad("--save-every, --eval-every and --log-every must be at least 1".into());
        }
        Ok(())
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
                embeddings: true,
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
