//! Learning-rate schedules: the reference's DeepSpeed `WarmupLR` (log warmup) and the
//! Hugging Face schedules users may pick instead.
//!
//! Every schedule is a pure function of the optimiser step number `k` (1-based, counting only
//! steps that were applied: a step skipped for a non-finite gradient advances nothing), so
//! resuming needs no scheduler state beyond [`crate::AdamW::steps`].

use serde::{Deserialize, Serialize};

/// Which learning-rate schedule to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// DeepSpeed `WarmupLR` with `warmup_type: "log"`, `warmup_min_lr: 0`, as the official
    /// scripts configure it: log warmup to `max_lr` over `W = max(2, warmup_steps)` scheduler
    /// steps, then constant `max_lr` (`total_steps` is not used). The scheduler starts at counter
    /// −1 (lr 0) and is stepped after every optimiser step, so step `k` runs at
    /// `lr(k − 2)` with `lr(s) = max_lr · ln(s + 1) / ln(W)` for `0 ≤ s < W` and 0 for `s < 0`:
    /// steps 1 and 2 run at lr 0.
    #[default]
    Reference,
    /// transformers' `get_cosine_schedule_with_warmup` (half a cycle): linear warmup from 0, then
    /// cosine decay to 0 at `total_steps`. Past `total_steps` it follows the formula, which rises
    /// again, exactly as transformers does.
    Cosine,
    /// transformers' `get_linear_schedule_with_warmup`: linear warmup from 0, then linear decay to
    /// 0 at `total_steps`, and 0 after.
    Linear,
    /// transformers' `get_constant_schedule_with_warmup`: linear warmup from 0, then `max_lr`.
    Constant,
}

/// A learning-rate schedule: the kind, its peak learning rate and its step counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Which schedule.
    pub kind: ScheduleKind,
    /// Peak learning rate (the `--learning_rate` of the scripts).
    pub max_lr: f64,
    /// Warmup length in steps (see [`LrSchedule::warmup_from_ratio`]).
    pub warmup_steps: u64,
    /// Total optimiser steps of the run (used by the decaying schedules).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate used by optimiser step `step` (1-based, counting only steps that were
    /// applied). The HF kinds follow `LambdaLR`'s convention (step `k` uses `λ(k − 1)·max_lr`, so
    /// with warmup > 0 the first step runs at lr 0); [`ScheduleKind::Reference`] follows the
    /// DeepSpeed off-by-two described on the variant. `step` 0 is treated as step 1.
    pub fn lr_at(&self, step: u64) -> f64 {
        match self.kind {
            ScheduleKind::Reference => self.deepspeed_warmup_log(step),
            _ => self.max_lr * self.hf_lambda(step.saturating_sub(1)),
        }
    }

    /// Warmup steps from a ratio of the total, as the official scripts (via transformers'
    /// `TrainingArguments.get_warmup_steps`) compute it: `ceil(ratio · total)` in f64. A negative
    /// or NaN ratio gives 0.
    pub fn warmup_from_ratio(ratio: f64, total: u64) -> u64 {
        // `as` saturates: NaN and negatives become 0.
        (total as f64 * ratio).ceil() as u64
    }

    /// DeepSpeed `WarmupLR.get_lr` with counter `step − 2`, evaluated in its order of operations
    /// (`min_lr + (max_lr − min_lr) · (1/ln W) · ln(s + 1)`, `min_lr` = 0).
    fn deepspeed_warmup_log(&self, step: u64) -> f64 {
        let Some(s) = step.checked_sub(2) else {
            return 0.0; // counter −1: the value set at construction
        };
        let w = self.warmup_steps.max(2);
        if s >= w {
            return self.max_lr;
        }
        let inverse_log_warm_up = 1.0 / (w as f64).ln();
        let gamma = inverse_log_warm_up * ((s + 1) as f64).ln();
        0.0 + self.max_lr * gamma
    }

    /// The transformers lr lambda at `current` (its `current_step`), term for term.
    fn hf_lambda(&self, current: u64) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps);
        if current < w {
            return current as f64 / w.max(1) as f64;
        }
        let decay_len = total.saturating_sub(w).max(1) as f64;
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::Reference => 1.0,
            ScheduleKind::Linear => {
                let left = (i128::from(total) - i128::from(current)) as f64;
                (left / decay_len).max(0.0)
            }
            ScheduleKind::Cosine => {
                let progress = (current - w) as f64 / decay_len;
                // transformers: math.pi * num_cycles(0.5) * 2.0 * progress; π·0.5·2 is exactly π.
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64) -> LrSchedule {
        LrSchedule {
            kind,
            max_lr: 1.0,
            warmup_steps: warmup,
            total_steps: total,
        }
    }

    #[test]
    fn reference_off_by_two() {
        let s = sched(ScheduleKind::Reference, 10, 100);
        assert_eq!(s.lr_at(1), 0.0);
        assert_eq!(s.lr_at(2), 0.0);
        assert!((s.lr_at(3) - 2f64.ln() / 10f64.ln()).abs() < 1e-15);
        assert_eq!(s.lr_at(12), 1.0);
        assert_eq!(s.lr_at(10_000), 1.0);
    }

    #[test]
    fn zero_warmup_hf_starts_at_max() {
        for kind in [
            ScheduleKind::Cosine,
            ScheduleKind::Linear,
            ScheduleKind::Constant,
        ] {
            assert_eq!(sched(kind, 0, 10).lr_at(1), 1.0, "{kind:?}");
        }
        // total < warmup must not underflow
        assert_eq!(sched(ScheduleKind::Linear, 5, 2).lr_at(7), 0.0);
    }

    #[test]
    fn kind_serde_names() {
        let kinds: Vec<ScheduleKind> =
            serde_json::from_str(r#"["reference","cosine","linear","constant"]"#).unwrap();
        assert_eq!(
            kinds,
            [
                ScheduleKind::Reference,
                ScheduleKind::Cosine,
                ScheduleKind::Linear,
                ScheduleKind::Constant
            ]
        );
    }
}
