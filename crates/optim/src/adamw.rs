//! AdamW with the update of `torch.optim.AdamW` (single-tensor path: `foreach=False`,
//! `fused=False`, `amsgrad=False`), fp32 moments and fp32 master weights, as the reference's
//! DeepSpeed AdamW runs it (spec §8.5).
//!
//! All per-step math runs in f32 on the parameters' device; nothing is copied to the host during
//! [`AdamW::step`]. With the `cuda` feature, all f32/bf16 parameters on a CUDA device are updated
//! by one multi-tensor kernel launch per dtype (cpmv-kernels: gradient read once, moments, master
//! and parameter written in place, same formula); elsewhere by candle tensor ops.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::host::{self, HostMut, HostRef};
use serde::{Deserialize, Serialize};

/// Errors from the optimiser: candle failures, bad parameter lists and unusable state files.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed (device, shape or dtype trouble).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The same parameter name was given twice to [`AdamW::new`].
    #[error("parameter {0:?} is listed twice")]
    DuplicateParam(String),
    /// A parameter has a dtype AdamW cannot train (only f32, bf16 and f16 are supported).
    #[error("parameter {name:?} has dtype {dtype:?}; AdamW trains f32, bf16 and f16 parameters")]
    UnsupportedDtype { name: String, dtype: DType },
    /// Reading or writing an optimiser state file failed.
    #[error("optimizer state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An optimiser state file could not be written or parsed as safetensors.
    #[error("optimizer state {path}: {source}")]
    SafeTensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    /// An optimiser state file does not fit this optimiser (names the tensor or field at fault).
    #[error("optimizer state {path}: {msg}")]
    State { path: PathBuf, msg: String },
}

/// AdamW hyper-parameters (the learning rate is passed per step).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment (the official scripts use 0.95, not torch's 0.999).
    pub beta2: f64,
    /// Added to `sqrt(v̂)` in the denominator.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies a decayed parameter by `1 − lr·weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The reference's values: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Per-parameter optimiser state.
pub(crate) struct ParamState {
    name: String,
    var: Var,
    /// Whether weight decay applies (the `decay` predicate, evaluated once in [`AdamW::new`]).
    decay: bool,
    /// f32 master copy for non-f32 vars; `None` when the var is f32 and is its own master.
    master: Option<Tensor>,
    /// First moment (f32).
    exp_avg: Tensor,
    /// Second moment (f32).
    exp_avg_sq: Tensor,
    /// Updates applied to this parameter (torch's per-parameter `step`): drives bias correction.
    step: u64,
}

impl ParamState {
    /// The current f32 value of the parameter, detached from the autograd graph.
    fn value(&self) -> Tensor {
        match &self.master {
            Some(m) => m.clone(),
            None => self.var.as_detached_tensor(),
        }
    }
}

/// The host-side scalars of one parameter's next update, in f64 as torch computes them.
struct UpdateScalars {
    /// `1 − lr·wd`, or `None` when the parameter is not decayed.
    decay: Option<f64>,
    /// `lr / (1 − β1ᵗ)`.
    step_size: f64,
    /// `sqrt(1 − β2ᵗ)`.
    bc2_sqrt: f64,
}

impl AdamWConfig {
    /// The scalars for update number `t` of a parameter (`decay`: whether weight decay applies
    /// to it) at learning rate `lr`.
    fn scalars(&self, t: u64, decay: bool, lr: f64) -> UpdateScalars {
        let tf = t as f64;
        UpdateScalars {
            decay: (decay && self.weight_decay != 0.0).then_some(1.0 - lr * self.weight_decay),
            step_size: lr / (1.0 - self.beta1.powf(tf)),
            bc2_sqrt: (1.0 - self.beta2.powf(tf)).powf(0.5),
        }
    }
}

/// Optimizer-state bytes per value of a parameter of `dtype`: both f32 moments, plus an f32
/// master copy unless the parameter is f32 itself.
pub fn state_bytes_per_value(dtype: DType) -> usize {
    let copies = if dtype == DType::F32 { 2 } else { 3 };
    copies * DType::F32.size_in_bytes()
}

/// AdamW over a fixed list of named parameters, with fp32 moments and, for bf16/f16 parameters,
/// an fp32 master copy that receives the updates (the var gets the master rounded to its dtype
/// after every step, so updates below the var's resolution still accumulate).
///
/// Moments are allocated (zero) for every parameter at construction, so [`AdamW::state_bytes`]
/// is known up front and every parameter appears in a saved state.
pub struct AdamW {
    params: Vec<ParamState>,
    cfg: AdamWConfig,
    steps: u64,
}

impl AdamW {
    /// An optimiser over `params` (name, var), in a stable order (it is the order of the state
    /// file); `decay(name)` says whether weight decay applies to that parameter (the reference
    /// decays everything; `--no-decay-norm-bias` exempts biases and norm weights). The predicate
    /// is evaluated once here and stored as a flag per parameter.
    ///
    /// Errors on a repeated name or a parameter that is not f32, bf16 or f16.
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        decay: impl Fn(&str) -> bool,
    ) -> Result<Self, OptimError> {
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::DuplicateParam(name));
            }
            let master = match var.dtype() {
                DType::F32 => None,
                DType::BF16 | DType::F16 => Some(var.as_detached_tensor().to_dtype(DType::F32)?),
                dtype => return Err(OptimError::UnsupportedDtype { name, dtype }),
            };
            let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
            states.push(ParamState {
                decay: decay(&name),
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                master,
                name,
                var,
                step: 0,
            });
        }
        Ok(Self {
            params: states,
            cfg,
            steps: 0,
        })
    }

    /// The hyper-parameters this optimiser runs with.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// One AdamW update at learning rate `lr`, with every gradient in `grads` (looked up by
    /// `var.as_tensor()`) first multiplied by `grad_scale` (the clip factor times any
    /// accumulation scale; 1.0 leaves gradients as they are).
    ///
    /// A parameter with no gradient in `grads` is left untouched and its moments and its own
    /// step count (which drives its bias correction, as torch's per-parameter `step` does) do not
    /// advance. The optimiser's [`AdamW::steps`] counts the call regardless.
    ///
    /// The update, in torch's order of operations (f32 tensors, scalars computed in f64):
    /// `p ← p·(1 − lr·wd)` if decay applies; `m ← lerp(m, g, 1 − β1)`; `v ← β2·v + (1 − β2)·g·g`;
    /// `denom = sqrt(v)/sqrt(1 − β2ᵗ) + eps`; `p ← p − (lr/(1 − β1ᵗ))·m/denom`.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<(), OptimError> {
        #[cfg(feature = "cuda")]
        let fused = self.fused_step(grads, lr, grad_scale)?;
        #[cfg(not(feature = "cuda"))]
        let fused = vec![false; self.params.len()];
        for (p, fused) in self.params.iter_mut().zip(fused) {
            if fused {
                p.step += 1;
                continue;
            }
            let Some(grad) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if p.var.device().is_cpu() {
                update_host(&self.cfg, p, grad, lr, grad_scale)?;
            } else {
                update(&self.cfg, p, grad, lr, grad_scale)?;
            }
        }
        self.steps += 1;
        Ok(())
    }

    /// The CUDA part of [`AdamW::step`]: every f32/bf16 parameter on a CUDA device that has a
    /// gradient is updated by one multi-tensor kernel launch (per dtype). Returns which
    /// parameters it updated; their step counts are advanced by the caller.
    #[cfg(feature = "cuda")]
    fn fused_step(
        &self,
        grads: &GradStore,
        lr: f64,
        grad_scale: f64,
    ) -> Result<Vec<bool>, OptimError> {
        let AdamWConfig {
            beta1, beta2, eps, ..
        } = self.cfg;
        let mut which = vec![false; self.params.len()];
        let mut cast = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if !(p.var.device().is_cuda() && matches!(p.var.dtype(), DType::F32 | DType::BF16)) {
                continue;
            }
            if let Some(g) = grads.get(p.var.as_tensor()) {
                cast.push((i, g.to_dtype(p.var.dtype())?));
                which[i] = true;
            }
        }
        let items: Vec<cpmv_kernels::AdamWParam> = cast
            .iter()
            .map(|(i, g)| {
                let p = &self.params[*i];
                let sc = self.cfg.scalars(p.step + 1, p.decay, lr);
                cpmv_kernels::AdamWParam {
                    param: p.var.as_tensor(),
                    master: p.master.as_ref(),
                    m: &p.exp_avg,
                    v: &p.exp_avg_sq,
                    grad: g,
                    decay_factor: sc.decay.unwrap_or(1.0) as f32,
                    step_size: sc.step_size as f32,
                    bc2_sqrt: sc.bc2_sqrt as f32,
                }
            })
            .collect();
        cpmv_kernels::adamw_multi(
            &items,
            cpmv_kernels::AdamWHyper {
                one_minus_beta1: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                eps: eps as f32,
                grad_scale: grad_scale as f32,
            },
        )?;
        Ok(which)
    }

    /// Updates parameter `index` alone with `grad` (same shape; any dtype and device, moved to
    /// the parameter's), as [`AdamW::step`] would: for callers that stream gradients one
    /// parameter at a time (e.g. into an offloaded optimizer). The step is counted by
    /// [`AdamW::count_step`] once every parameter of it was given. `grad` must not share
    /// storage with the parameter or its state (see `update_host`).
    pub fn step_param(
        &mut self,
        index: usize,
        grad: &Tensor,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimError> {
        let p = &mut self.params[index];
        let g = grad.to_device(p.var.device())?.reshape(p.var.dims())?;
        if p.var.device().is_cpu() {
            update_host(&self.cfg, p, &g, lr, grad_scale)
        } else {
            update(&self.cfg, p, &g, lr, grad_scale)
        }
    }

    /// Counts a step whose parameters were updated by [`AdamW::step_param`].
    pub fn count_step(&mut self) {
        self.steps += 1;
    }

    /// Number of completed [`AdamW::step`] calls (restored by [`AdamW::load_state`]).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Bytes of optimiser state held on the device: both moments of every parameter plus the f32
    /// master copies of non-f32 parameters.
    pub fn state_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.var.elem_count() * state_bytes_per_value(p.var.dtype()))
            .sum()
    }

    /// Saves the optimiser state to `path` as safetensors: `<param>.exp_avg`,
    /// `<param>.exp_avg_sq` and, for non-f32 parameters, `<param>.master` (all f32), with
    /// metadata `step` (completed steps), `param_steps` (JSON object name → that parameter's
    /// update count) and `config` (the [`AdamWConfig`] as JSON). f32 parameters have no master
    /// here: their values belong in the model checkpoint. Written to `<path>.tmp` and renamed,
    /// so an interrupted save never leaves a truncated file at `path`.
    pub fn save_state(&self, path: &Path) -> Result<(), OptimError> {
        let mut tensors: Vec<(String, &Tensor)> = Vec::with_capacity(self.params.len() * 3);
        let mut param_steps = BTreeMap::new();
        for p in &self.params {
            tensors.push((format!("{}.exp_avg", p.name), &p.exp_avg));
            tensors.push((format!("{}.exp_avg_sq", p.name), &p.exp_avg_sq));
            if let Some(m) = &p.master {
                tensors.push((format!("{}.master", p.name), m));
            }
            param_steps.insert(p.name.as_str(), p.step);
        }
        let json_err = |e: serde_json::Error| OptimError::State {
            path: path.into(),
            msg: e.to_string(),
        };
        let metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("step".to_string(), self.steps.to_string()),
            (
                "param_steps".to_string(),
                serde_json::to_string(&param_steps).map_err(json_err)?,
            ),
            (
                "config".to_string(),
                serde_json::to_string(&self.cfg).map_err(json_err)?,
            ),
        ]);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp).map_err(|source| {
            OptimError::SafeTensors {
                path: tmp.clone(),
                source,
            }
        })?;
        std::fs::rename(&tmp, path).map_err(|source| OptimError::Io {
            path: path.into(),
            source,
        })
    }

    /// Restores a state written by [`AdamW::save_state`] for the same parameter list, so that
    /// continuing is bit-identical to never having stopped (given the same parameter values:
    /// f32 vars must already hold the checkpointed weights). Non-f32 vars are set to their
    /// restored master rounded to the var's dtype.
    ///
    /// Every parameter must have its moments (and, if not f32, its master) with its shape and
    /// dtype f32, and every tensor in the file must belong to a parameter; errors name the first
    /// offender. These are checked before anything is changed; the file is memory-mapped and
    /// each tensor copied once into its place. The saved `config` is informational: the
    /// optimiser keeps the config it was built with.
    pub fn load_state(&mut self, path: &Path) -> Result<(), OptimError> {
        let files = crate::zero::StateFiles::open(&[path.to_path_buf()])?;
        self.load_from(&files)
    }

    /// Restores a state saved by one or more ranks, sharded or not ([`crate::zero`]), for the
    /// same parameters; as [`AdamW::load_state`] otherwise.
    pub fn load_from(&mut self, files: &crate::zero::StateFiles) -> Result<(), OptimError> {
        let sources: Vec<crate::zero::Source> = self
            .params
            .iter()
            .map(|p| crate::zero::Source {
                name: p.name.clone(),
                dims: p.var.dims().to_vec(),
                range: 0..p.var.elem_count(),
            })
            .collect();
        files.check_names(
            self.params
                .iter()
                .map(|p| (p.name.as_str(), p.var.dims(), p.master.is_some())),
        )?;
        self.load_pieces(files, &sources)
    }

    pub(crate) fn params_mut(&mut self) -> &mut [ParamState] {
        &mut self.params
    }

    pub(crate) fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }
}

impl ParamState {
    pub(crate) fn has_master(&self) -> bool {
        self.master.is_some()
    }

    pub(crate) fn dims(&self) -> Vec<usize> {
        self.var.dims().to_vec()
    }

    pub(crate) fn device(&self) -> candle_core::Device {
        self.var.device().clone()
    }

    /// Takes an update's results: the new f32 value (the var gets it rounded to its dtype, and
    /// a non-f32 var keeps it as its master), the moments, and the parameter's update count.
    fn commit(
        &mut self,
        param: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: u64,
    ) -> Result<(), OptimError> {
        match &mut self.master {
            Some(master) => {
                self.var.set(&param.to_dtype(self.var.dtype())?)?;
                *master = param;
            }
            None => self.var.set(&param)?,
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
        Ok(())
    }

    /// Sets the moments, the master (a non-f32 var then holds it rounded) and the step.
    pub(crate) fn restore(
        &mut self,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        master: Option<Tensor>,
        step: u64,
    ) -> Result<(), OptimError> {
        if let Some(m) = master {
            self.var.set(&m.to_dtype(self.var.dtype())?)?;
            self.master = Some(m);
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
        Ok(())
    }
}

/// One AdamW update of `p` with gradient `grad` (see [`AdamW::step`]).
fn update(
    cfg: &AdamWConfig,
    p: &mut ParamState,
    grad: &Tensor,
    lr: f64,
    grad_scale: f64,
) -> Result<(), OptimError> {
    let AdamWConfig {
        beta1, beta2, eps, ..
    } = *cfg;
    let mut g = grad.detach().to_dtype(DType::F32)?;
    if grad_scale != 1.0 {
        g = g.affine(grad_scale, 0.0)?;
    }
    let t = p.step + 1;
    let sc = cfg.scalars(t, p.decay, lr);

    let mut param = p.value();
    if let Some(f) = sc.decay {
        param = param.affine(f, 0.0)?;
    }

    // exp_avg.lerp_(grad, 1 - beta1): torch's lerp picks its formula by weight size.
    let w = 1.0 - beta1;
    let diff = (&g - &p.exp_avg)?;
    let exp_avg = if w < 0.5 {
        (&p.exp_avg + diff.affine(w, 0.0)?)?
    } else {
        (&g - diff.affine(1.0 - w, 0.0)?)?
    };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let exp_avg_sq = (p.exp_avg_sq.affine(beta2, 0.0)? + (g.affine(1.0 - beta2, 0.0)? * &g)?)?;

    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), a true f32 division
    // like torch's (multiplying by the reciprocal rounds differently); `full` fills the
    // scalar on the device.
    let bc2_sqrt = Tensor::full(sc.bc2_sqrt as f32, (), g.device())?;
    let denom = exp_avg_sq
        .sqrt()?
        .broadcast_div(&bc2_sqrt)?
        .affine(1.0, eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    let param = (param + exp_avg.affine(-sc.step_size, 0.0)?.div(&denom)?)?;

    p.commit(param, exp_avg, exp_avg_sq, t)
}

/// [`update`] for a parameter in host memory (CPU training, the offloaded optimizer): one pass
/// over the values in place (master or f32 weights, both moments, and a half-precision var's
/// rounded copy), in parallel chunks, with the f32 operations of [`update`] in the same order
/// (candle's CPU `affine(m, a)` is `x·m + a` in f32), so the result is the same bit for bit.
/// Nothing is copied but a gradient that is not contiguous. The gradient must not share storage
/// with the parameter or its state (candle's backward pass always makes fresh gradients): the
/// update holds a read lock on it while it writes the others.
fn update_host(
    cfg: &AdamWConfig,
    p: &mut ParamState,
    grad: &Tensor,
    lr: f64,
    grad_scale: f64,
) -> Result<(), OptimError> {
    let t = p.step + 1;
    let sc = cfg.scalars(t, p.decay, lr);
    let f = |x: f64| x as f32;
    let w = 1.0 - cfg.beta1;
    let k = HostKernel {
        scale: (grad_scale != 1.0).then(|| f(grad_scale)),
        decay: sc.decay.map(f),
        lerp_small: w < 0.5,
        w: f(w),
        one_minus_w: f(1.0 - w),
        beta2: f(cfg.beta2),
        one_minus_beta2: f(1.0 - cfg.beta2),
        bc2: f(sc.bc2_sqrt),
        eps: f(cfg.eps),
        neg_step: f(-sc.step_size),
    };
    let name = &p.name;
    let wrong = |what: &str| {
        OptimError::Candle(candle_core::Error::Msg(format!(
            "parameter {name:?}: {what} (host update)"
        )))
    };
    let master = p.value();
    let var = p.var.as_tensor();
    let rounded = p.master.is_some();
    host::with_ref(grad, |g| {
        host::with_mut(&p.exp_avg, |m| {
            host::with_mut(&p.exp_avg_sq, |v| {
                host::with_mut(&master, |x| {
                    let (HostMut::F32(m), HostMut::F32(v), HostMut::F32(x)) = (m, v, x) else {
                        return Err(wrong("optimizer state is not f32"));
                    };
                    if g.len() != x.len() || m.len() != x.len() || v.len() != x.len() {
                        return Err(wrong(&format!(
                            "gradient of {} values for {} weights",
                            g.len(),
                            x.len()
                        )));
                    }
                    if !rounded {
                        return k.run(x, m, v, &g, None);
                    }
                    host::with_mut(var, |out| k.run(x, m, v, &g, Some(out)))
                })
            })
        })
    })?;
    p.step = t;
    Ok(())
}

/// The scalars of one host update (see [`update_host`]).
struct HostKernel {
    scale: Option<f32>,
    decay: Option<f32>,
    lerp_small: bool,
    w: f32,
    one_minus_w: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bc2: f32,
    eps: f32,
    neg_step: f32,
}

impl HostKernel {
    /// Updates `x` (f32 weights), `m` and `v` from `g`; `out` (a half-precision var) receives
    /// the new weights rounded.
    fn run(
        &self,
        x: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &HostRef,
        out: Option<HostMut>,
    ) -> Result<(), OptimError> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let n = x.len();
        let chunks = n.div_ceil(CHUNK);
        // Every output as chunks, zipped by index.
        let mut out_chunks: Vec<Option<HostMut>> = match out {
            None => (0..chunks).map(|_| None).collect(),
            Some(HostMut::BF16(o)) if o.len() == n => o
                .chunks_mut(CHUNK)
                .map(|c| Some(HostMut::BF16(c)))
                .collect(),
            Some(HostMut::F16(o)) if o.len() == n => {
                o.chunks_mut(CHUNK).map(|c| Some(HostMut::F16(c))).collect()
            }
            Some(_) => {
                return Err(OptimError::Candle(candle_core::Error::Msg(
                    "host update: the parameter's rounded copy does not match its master".into(),
                )))
            }
        };
        x.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(out_chunks.par_iter_mut())
            .enumerate()
            .for_each(|(c, (((xc, mc), vc), oc))| {
                let at = c * CHUNK;
                for i in 0..xc.len() {
                    let gv = match g {
                        HostRef::F32(s) => s[at + i],
                        HostRef::BF16(s) => s[at + i].to_f32(),
                        HostRef::F16(s) => s[at + i].to_f32(),
                    };
                    xc[i] = self.one(xc[i], &mut mc[i], &mut vc[i], gv);
                }
                match oc {
                    Some(HostMut::BF16(o)) => {
                        for (o, &x) in o.iter_mut().zip(xc.iter()) {
                            *o = half::bf16::from_f32(x);
                        }
                    }
                    Some(HostMut::F16(o)) => {
                        for (o, &x) in o.iter_mut().zip(xc.iter()) {
                            *o = half::f16::from_f32(x);
                        }
                    }
                    _ => {}
                }
            });
        Ok(())
    }

    /// One value's update; returns the new weight.
    #[inline]
    fn one(&self, x: f32, mv: &mut f32, vv: &mut f32, gv: f32) -> f32 {
        let g = match self.scale {
            Some(s) => gv * s + 0.0,
            None => gv,
        };
        let mut x = x;
        if let Some(d) = self.decay {
            x = x * d + 0.0;
        }
        let diff = g - *mv;
        let m_new = if self.lerp_small {
            *mv + (diff * self.w + 0.0)
        } else {
            g - (diff * self.one_minus_w + 0.0)
        };
        let v_new = (*vv * self.beta2 + 0.0) + ((g * self.one_minus_beta2 + 0.0) * g);
        let denom = (v_new.sqrt() / self.bc2) * 1.0 + self.eps;
        *mv = m_new;
        *vv = v_new;
        x + (m_new * self.neg_step + 0.0) / denom
    }
}

/// `format` metadata value of state files, bumped if their layout changes.
pub(crate) const STATE_FORMAT: &str = "cpmv-optim-adamw/1";

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass host update gives what candle's tensor ops give, bit for bit, for f32 and
    /// bf16 parameters, with and without decay, scaling, and both lerp formulas.
    #[test]
    fn host_update_equals_the_tensor_op_update_bit_for_bit() -> Result<(), OptimError> {
        let dev = Device::Cpu;
        let n = 40_000; // more than one parallel chunk
        let vals = |seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * 0.731 + seed).sin() * 3.0).powi(3) * 1e-2)
                .collect()
        };
        for dtype in [DType::F32, DType::BF16] {
            for (beta1, decay, scale) in [(0.9, true, 1.0), (0.3, false, 0.37)] {
                let cfg = AdamWConfig {
                    beta1,
                    ..AdamWConfig::default()
                };
                let make = || -> Result<AdamW, OptimError> {
                    let var =
                        Var::from_tensor(&Tensor::from_vec(vals(1.0), n, &dev)?.to_dtype(dtype)?)?;
                    AdamW::new(vec![("w".into(), var)], cfg.clone(), |_| decay)
                };
                let (mut a, mut b) = (make()?, make()?);
                for t in 0..3 {
                    // Gradients in the parameter's dtype, as training makes them.
                    let g = Tensor::from_vec(vals(t as f32 + 2.0), n, &dev)?.to_dtype(dtype)?;
                    update(&a.cfg, &mut a.params[0], &g, 1e-3, scale)?;
                    update_host(&b.cfg, &mut b.params[0], &g, 1e-3, scale)?;
                    let bits = |o: &AdamW| -> Result<Vec<Vec<u32>>, OptimError> {
                        let p = &o.params[0];
                        let v = |x: &Tensor| -> Result<Vec<u32>, OptimError> {
                            Ok(x.to_dtype(DType::F32)?
                                .to_vec1::<f32>()?
                                .iter()
                                .map(|f| f.to_bits())
                                .collect())
                        };
                        Ok(vec![
                            v(p.var.as_tensor())?,
                            v(&p.value())?,
                            v(&p.exp_avg)?,
                            v(&p.exp_avg_sq)?,
                        ])
                    };
                    assert!(bits(&a)? == bits(&b)?, "{dtype:?} beta1 {beta1} step {t}");
                }
            }
        }
        Ok(())
    }
}
