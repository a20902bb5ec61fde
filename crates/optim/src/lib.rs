//! The optimiser side of fine-tuning (spec §8.5): AdamW with torch semantics, the learning-rate
//! schedules, and global-norm gradient clipping.
//!
//! The official fine-tune runs DeepSpeed's AdamW with decoupled weight decay over a single
//! parameter group, fp32 master weights and fp32 moments, clips gradients to a global L2 norm of
//! 1.0, and schedules the learning rate with DeepSpeed's `WarmupLR` (log warmup). [`AdamW`],
//! [`clip`] and [`LrSchedule`] reproduce those numbers (checked against torch and transformers
//! fixtures in `tests/fixtures/optim/`), with the HF schedules as alternatives.
//!
//! A training step, in the order the reference runs it:
//!
//! ```no_run
//! # fn demo(opt: &mut cpmv_optim::AdamW, params: &[(String, candle_core::Var)],
//! #         grads: &candle_core::backprop::GradStore, sched: &cpmv_optim::LrSchedule)
//! #         -> Result<(), cpmv_optim::OptimError> {
//! let norm = cpmv_optim::clip::global_norm(grads, params)?;
//! if norm.is_finite() {
//!     let scale = cpmv_optim::clip::clip_factor(norm, 1.0);
//!     let lr = sched.lr_at(opt.steps() + 1);
//!     opt.step(grads, lr, scale)?;
//! } // else: skip the update; neither the optimiser nor the schedule advances
//! # Ok(()) }
//! ```

pub mod adamw;
pub mod clip;
mod host;
pub mod schedule;
pub mod zero;

pub use adamw::{AdamW, AdamWConfig, OptimError};
pub use schedule::{LrSchedule, ScheduleKind};
pub use zero::{FlatLayout, ShardedAdamW, StateFiles};
