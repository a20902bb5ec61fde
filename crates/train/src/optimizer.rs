//! The optimizer of one rank, and how a step's gradients and new weights travel between the
//! ranks for it.
//!
//! - `--zero 0` ([`Optimizer::Replicated`]): every rank holds the whole AdamW state on the
//!   training device, gradients are all-reduced, every rank applies the same update.
//! - `--zero 1` ([`Optimizer::Sharded`]): rank r holds the fp32 masters and moments of shard r
//!   of the flat parameter space ([`cpmv_optim::zero`]); gradients are reduce-scattered (rank r
//!   receives the sum of shard r), each rank updates its shard, and the new weights are
//!   all-gathered into every rank's model.
//! - `--zero 2`: as 1, but the gradients are reduce-scattered after every micro-batch, so a
//!   rank keeps only its shard of the accumulated gradients across the step.
//! - `--offload-optimizer`: the state lives in host memory and AdamW runs on the CPU; with
//!   `--zero 0` every rank holds the whole state there.
//!
//! Every collective is cut into calls of `--bucket-mb`. candle computes a micro-batch's
//! gradients in one backward pass, so communication starts after it, not during it.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_dist::Collective;
use cpmv_optim::{AdamW, AdamWConfig, FlatLayout, ShardedAdamW, StateFiles};

use crate::checkpoint::OPTIMIZER_FILE;
use crate::config::TrainConfig;
use crate::error::{io, TrainError};

/// State file of shard `rank` of `world` in a checkpoint.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-rank{rank}-of-{world}.safetensors")
}

/// The optimizer state files of checkpoint `dir`: its unsharded file, or every rank's shard.
/// Errors name a missing shard.
pub fn state_files(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let plain = dir.join(OPTIMIZER_FILE);
    if plain.exists() {
        return Ok(vec![plain]);
    }
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut world = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let w = name
            .strip_prefix("optimizer-rank")
            .and_then(|r| r.strip_suffix(".safetensors"))
            .and_then(|r| r.split_once("-of-"))
            .and_then(|(_, w)| w.parse::<usize>().ok());
        if let Some(w) = w {
            if world.is_some_and(|x| x != w) {
                return Err(TrainError::Config(format!(
                    "{} holds optimizer shards of two world sizes",
                    dir.display()
                )));
            }
            world = Some(w);
        }
    }
    let Some(world) = world else {
        return Err(TrainError::Config(format!(
            "{} holds no optimizer state ({OPTIMIZER_FILE} or {})",
            dir.display(),
            shard_file(0, 1)
        )));
    };
    (0..world)
        .map(|r| {
            let p = dir.join(shard_file(r, world));
            if p.exists() {
                Ok(p)
            } else {
                Err(TrainError::Config(format!(
                    "{} lacks {} (the optimizer state of rank {r} of {world})",
                    dir.display(),
                    shard_file(r, world)
                )))
            }
        })
        .collect()
}

/// How a rank's collectives run: its group (None: the only rank) and the bucket size.
#[derive(Clone, Copy)]
pub struct Exchange<'a> {
    pub comm: Option<&'a dyn Collective>,
    /// Values per collective call.
    pub bucket: usize,
}

impl Exchange<'_> {
    /// Sum over ranks, in buckets (identity on one rank).
    fn all_reduce(&self, buf: &mut [f32]) -> Result<(), TrainError> {
        if let Some(c) = self.comm {
            cpmv_dist::all_reduce_buckets(c, buf, self.bucket)?;
        }
        Ok(())
    }
}

/// The optimizer of one rank (see the module doc).
pub enum Optimizer {
    Replicated(AdamW),
    Sharded { opt: ShardedAdamW, stage: u8 },
}

/// A step's gradients as the optimizer takes them.
pub enum StepGrads {
    /// Every parameter's summed gradient (replicated optimizer).
    Full(GradStore),
    /// The rank's shard of the summed gradients, and which parameters have one.
    Shard {
        values: Vec<f32>,
        present: Vec<bool>,
    },
}

impl Optimizer {
    /// The optimizer of `rank` of `world` over `vars`, as `cfg` asks.
    pub fn new(
        cfg: &TrainConfig,
        vars: &[(String, Var)],
        rank: usize,
        world: usize,
        decay: impl Fn(&str) -> bool,
    ) -> Result<Self, TrainError> {
        let adam = AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        };
        if cfg.zero == 0 && !cfg.offload_optimizer {
            return Ok(Optimizer::Replicated(AdamW::new(
                vars.to_vec(),
                adam,
                decay,
            )?));
        }
        let (shard_rank, shard_world) = if cfg.zero == 0 { (0, 1) } else { (rank, world) };
        let device = match (cfg.offload_optimizer, vars.first()) {
            (false, Some((_, v))) => v.device().clone(),
            _ => Device::Cpu,
        };
        let opt = ShardedAdamW::new(vars, shard_rank, shard_world, adam, decay, &device)?;
        Ok(Optimizer::Sharded {
            opt,
            stage: cfg.zero,
        })
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> usize {
        match self {
            Optimizer::Replicated(o) => o.state_bytes(),
            Optimizer::Sharded { opt, .. } => opt.state_bytes(),
        }
    }

    /// Restores the state saved in checkpoint `dir`, whatever sharding saved it; `vars` must
    /// already hold the checkpoint's weights.
    pub fn load(&mut self, dir: &Path, vars: &[(String, Var)]) -> Result<(), TrainError> {
        let files = StateFiles::open(&state_files(dir)?)?;
        match self {
            Optimizer::Replicated(o) => o.load_from(&files)?,
            Optimizer::Sharded { opt, .. } => opt.load_state(&files, vars)?,
        }
        Ok(())
    }

    /// Writes this rank's part of the state into checkpoint directory `dir` (the replicated
    /// state by rank 0 only; a shard by the rank that owns it).
    pub fn save(&self, dir: &Path, rank: usize) -> Result<(), TrainError> {
        match self {
            Optimizer::Replicated(o) if rank == 0 => o.save_state(&dir.join(OPTIMIZER_FILE))?,
            Optimizer::Replicated(_) => {}
            Optimizer::Sharded { opt, .. } => {
                let w = opt.layout().world();
                if opt.rank() < w && (w > 1 || rank == 0) {
                    opt.save_state(&dir.join(shard_file(opt.rank(), w)))?;
                }
            }
        }
        Ok(())
    }

    /// Whether the gradients travel as a flat space cut into shards (ZeRO over several
    /// ranks), rather than as the parameters' own gradients.
    fn shards_grads(&self) -> bool {
        matches!(self, Optimizer::Sharded { opt, .. } if opt.layout().world() > 1)
    }

    /// An empty accumulator for one step's gradients.
    pub fn accumulator(&self) -> GradAccum {
        match self {
            Optimizer::Sharded { opt, stage: 2 } if opt.layout().world() > 1 => GradAccum::Shard {
                values: vec![0.0; opt.layout().shard_len()],
                present: vec![0.0; opt.layout().vars()],
            },
            _ => GradAccum::Full(crate::trainer::Accum::default()),
        }
    }

    /// The step's gradients summed over the ranks, in the form this optimizer takes.
    pub fn reduce(
        &self,
        acc: GradAccum,
        vars: &[(String, Var)],
        ex: Exchange,
    ) -> Result<StepGrads, TrainError> {
        match (self, acc) {
            (_, GradAccum::Shard { values, present }) => Ok(StepGrads::Shard {
                values,
                present: present.iter().map(|&p| p > 0.0).collect(),
            }),
            (Optimizer::Sharded { opt, .. }, GradAccum::Full(a)) if self.shards_grads() => {
                let (values, present) =
                    reduce_to_shard(opt.layout(), &a.into_store(vars), vars, ex)?;
                Ok(StepGrads::Shard {
                    values,
                    present: present.iter().map(|&p| p > 0.0).collect(),
                })
            }
            (_, GradAccum::Full(a)) => {
                let store = a.into_store(vars);
                Ok(StepGrads::Full(match ex.comm {
                    Some(c) => all_reduce_grads(c, store, vars, ex.bucket)?,
                    None => store,
                }))
            }
        }
    }

    /// The global L2 norm of the step's gradients (the same on every rank).
    pub fn grad_norm(
        &self,
        grads: &StepGrads,
        vars: &[(String, Var)],
        ex: Exchange,
    ) -> Result<f64, TrainError> {
        match (self, grads) {
            (_, StepGrads::Full(store)) => Ok(cpmv_optim::clip::global_norm(store, vars)?),
            (Optimizer::Sharded { opt, .. }, StepGrads::Shard { values, .. }) => {
                let sq: f64 = values.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
                if opt.layout().world() == 1 {
                    return Ok(sq.sqrt());
                }
                let mut b = [sq as f32];
                ex.all_reduce(&mut b)?;
                Ok(f64::from(b[0]).sqrt())
            }
            (Optimizer::Replicated(_), StepGrads::Shard { .. }) => Err(TrainError::Data(
                "a replicated optimizer was given sharded gradients (a cpmv bug)".into(),
            )),
        }
    }

    /// One AdamW update at `lr` with gradients scaled by `scale`; afterwards every rank's
    /// `vars` hold the new weights.
    pub fn step(
        &mut self,
        grads: StepGrads,
        vars: &[(String, Var)],
        lr: f64,
        scale: f64,
        ex: Exchange,
    ) -> Result<(), TrainError> {
        match (self, grads) {
            (Optimizer::Replicated(o), StepGrads::Full(store)) => o.step(&store, lr, scale)?,
            (Optimizer::Sharded { opt, .. }, StepGrads::Full(store)) => {
                opt.step_vars(&store, vars, lr, scale)?
            }
            (Optimizer::Sharded { opt, .. }, StepGrads::Shard { values, present }) => {
                opt.step(&values, &present, lr, scale)?;
                let layout = opt.layout().clone();
                let mine = opt.shard_values()?;
                let full = match ex.comm {
                    Some(c) if layout.world() > 1 => {
                        let mut full = vec![0f32; layout.padded_len()];
                        cpmv_dist::all_gather_buckets(c, &mine, &mut full, ex.bucket)?;
                        full
                    }
                    _ => mine,
                };
                for (i, (_, v)) in vars.iter().enumerate() {
                    if present[i] {
                        let t =
                            Tensor::from_slice(&full[layout.var_range(i)], v.dims(), v.device())?;
                        v.set(&t.to_dtype(v.dtype())?)?;
                    }
                }
            }
            _ => {
                return Err(TrainError::Data(
                    "optimizer and gradient form disagree (a cpmv bug)".into(),
                ))
            }
        }
        Ok(())
    }
}

/// A step's gradients while its micro-batches run.
pub enum GradAccum {
    /// Every parameter's gradient, summed over this rank's micro-batches.
    Full(crate::trainer::Accum),
    /// ZeRO-2: this rank's shard of the gradients, summed over ranks after every micro-batch,
    /// and per parameter whether any rank had a gradient (> 0).
    Shard { values: Vec<f32>, present: Vec<f32> },
}

impl GradAccum {
    /// Adds one micro-batch's gradients (`store`: None when this rank's micro-batch had nothing
    /// to learn from). ZeRO-2 reduces them at once: every rank must call this for every
    /// micro-batch, in the same order.
    pub fn add(
        &mut self,
        store: Option<&GradStore>,
        opt: &Optimizer,
        vars: &[(String, Var)],
        ex: Exchange,
    ) -> Result<(), TrainError> {
        match (self, opt) {
            (GradAccum::Full(a), _) => {
                if let Some(s) = store {
                    a.add(s, vars)?;
                }
            }
            (GradAccum::Shard { values, present }, Optimizer::Sharded { opt, .. }) => {
                let empty = GradStore::default();
                let (v, p) = reduce_to_shard(opt.layout(), store.unwrap_or(&empty), vars, ex)?;
                for (a, b) in values.iter_mut().zip(v) {
                    *a += b;
                }
                for (a, b) in present.iter_mut().zip(p) {
                    *a += b;
                }
            }
            (GradAccum::Shard { .. }, Optimizer::Replicated(_)) => {
                return Err(TrainError::Data(
                    "a replicated optimizer accumulates full gradients (a cpmv bug)".into(),
                ))
            }
        }
        Ok(())
    }

    /// The full form's accumulator (micro-batches add into it directly), if this is it.
    pub fn full_mut(&mut self) -> Option<&mut crate::trainer::Accum> {
        match self {
            GradAccum::Full(a) => Some(a),
            GradAccum::Shard { .. } => None,
        }
    }
}

/// Per parameter 1.0 if `store` holds its gradient, summed over the ranks.
fn presence(
    store: &GradStore,
    vars: &[(String, Var)],
    ex: Exchange,
) -> Result<Vec<f32>, TrainError> {
    let mut present: Vec<f32> = vars
        .iter()
        .map(|(_, v)| f32::from(u8::from(store.get(v.as_tensor()).is_some())))
        .collect();
    if let Some(c) = ex.comm {
        c.all_reduce_sum(&mut present)?;
    }
    Ok(present)
}

/// The gradients in `store` laid out in the flat space (zero where a parameter has none).
fn flatten(
    layout: &FlatLayout,
    store: &GradStore,
    vars: &[(String, Var)],
) -> Result<Vec<f32>, TrainError> {
    let mut flat = vec![0f32; layout.padded_len()];
    for (i, (_, v)) in vars.iter().enumerate() {
        if let Some(g) = store.get(v.as_tensor()) {
            let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            flat[layout.var_range(i)].copy_from_slice(&g);
        }
    }
    Ok(flat)
}

/// This rank's shard of the gradients in `store` summed over the ranks, and the presence
/// flags summed over the ranks.
fn reduce_to_shard(
    layout: &FlatLayout,
    store: &GradStore,
    vars: &[(String, Var)],
    ex: Exchange,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let present = presence(store, vars, ex)?;
    let mut flat = flatten(layout, store, vars)?;
    let shard = match ex.comm {
        Some(c) if layout.world() > 1 => {
            let mut out = vec![0f32; layout.shard_len()];
            cpmv_dist::reduce_scatter_buckets(c, &flat, &mut out, ex.bucket)?;
            out
        }
        _ => {
            // One shard: every rank updates the whole space from the all-reduced gradients.
            ex.all_reduce(&mut flat)?;
            flat
        }
    };
    Ok((shard, present))
}

/// Sums the step's gradients over the ranks (a variable with a gradient on no rank stays
/// without one, as in a single process).
fn all_reduce_grads(
    comm: &dyn Collective,
    store: GradStore,
    vars: &[(String, Var)],
    bucket: usize,
) -> Result<GradStore, TrainError> {
    let ex = Exchange {
        comm: Some(comm),
        bucket,
    };
    let present = presence(&store, vars, ex)?;
    let mut flat = Vec::new();
    for ((_, v), &p) in vars.iter().zip(&present) {
        if p == 0.0 {
            continue;
        }
        match store.get(v.as_tensor()) {
            Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, v.as_tensor().elem_count())),
        }
    }
    ex.all_reduce(&mut flat)?;
    let mut out = GradStore::default();
    let mut at = 0;
    for ((_, v), &p) in vars.iter().zip(&present) {
        if p == 0.0 {
            continue;
        }
        let t = v.as_tensor();
        let n = t.elem_count();
        let g = Tensor::from_slice(&flat[at..at + n], t.dims(), t.device())?.to_dtype(t.dtype())?;
        out.insert(t, g);
        at += n;
    }
    Ok(out)
}
