//! The training loop: micro-batches from the shards, forward/backward (optionally
//! checkpointed per layer), gradient accumulation, clipping, AdamW, schedule, evaluation,
//! checkpoints and resumption.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_model::block::VisionBlockState;
use cpmv_model::weights::Checkpoint;
use cpmv_model::{Batch, LoadOptions, MiniCpmV, Rng};
use cpmv_optim::LrSchedule;
use cpmv_runlog::{RunLog, StepRecord};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{
    self, checkpoints, load_trainable, read_state, save_model, save_trainable, write_state,
    ResumeOverride, SaveContext, TrainState, TRAINABLE_FILE,
};
use crate::config::{LossNorm, SettingChange, TrainConfig};
use crate::data::{make_batch, stream, Cursor, Dataset};
use crate::error::{io, TrainError};
use crate::optimizer::{Exchange, Optimizer};
pub use cpmv_model::profile;

/// What to train on and where to write.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub shards: PathBuf,
    pub model: PathBuf,
    pub output: PathBuf,
    pub eval_shards: Option<PathBuf>,
    pub resume: bool,
    /// With `resume`: accept settings that change the math (recorded in the state).
    pub resume_override: bool,
    pub config: TrainConfig,
    /// No progress bar.
    pub quiet: bool,
}

/// Summary of a finished run.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: u64,
    pub skipped: u64,
    /// Training loss of every applied step (from the resumed step on, when resuming).
    pub losses: Vec<f64>,
    pub eval_losses: Vec<(u64, f64)>,
    pub output: PathBuf,
    pub peak_mem_bytes: u64,
    /// The rank that ran (0 reports for the run; others only took part).
    pub rank: usize,
}

/// `--skip-nonfinite` stops the run after this many non-finite steps in a row (a model that
/// only produces NaN would otherwise never finish).
pub const MAX_CONSECUTIVE_SKIPS: u64 = 20;

/// Peak resident memory of the process (CPU runs), bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak memory of the run: the device memory pool's high-water mark on CUDA, the process's
/// peak resident memory on CPU.
pub fn peak_memory_bytes(device: &Device) -> u64 {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cpmv_kernels::pool_memory(device).map_or(0, |(high, _)| high);
    }
    let _ = device;
    peak_rss_bytes()
}

/// Refuses shards made for another tokenizer, template or model version.
pub fn check_fit(data: &Dataset, model_dir: &Path, model: &MiniCpmV) -> Result<(), TrainError> {
    let m = &data.shards.manifest;
    let version = model.config().version.as_str();
    let llm = cpmv_shard::LlmType::for_version(version)
        .ok_or_else(|| TrainError::Mismatch(format!("no llm type for MiniCPM-V {version}")))?;
    let (tok, tmpl) = cpmv_shard::fingerprint::model_fingerprints(model_dir, llm)
        .map_err(|e| TrainError::Mismatch(format!("{}: {e}", model_dir.display())))?;
    if tok != m.fingerprints.tokenizer {
        return Err(TrainError::Mismatch(format!(
            "tokenizer fingerprint of the shards {} (made with {}) differs from {} of {}; \
             rebuild the shards with this model's tokenizer",
            m.fingerprints.tokenizer,
            m.model.dir,
            tok,
            model_dir.display()
        )));
    }
    if tmpl != m.fingerprints.chat_template {
        return Err(TrainError::Mismatch(format!(
            "chat template fingerprint of the shards {} differs from {} of {}",
            m.fingerprints.chat_template,
            tmpl,
            model_dir.display()
        )));
    }
    if m.model.version != version {
        return Err(TrainError::Mismatch(format!(
            "the shards were made for MiniCPM-V {} but {} is {version}",
            m.model.version,
            model_dir.display()
        )));
    }
    let q = m.settings.sample.query_num as usize;
    if q != model.config().resampler.query_num {
        return Err(TrainError::Mismatch(format!(
            "the shards hold {q} placeholders per image, the model's query_num is {}",
            model.config().resampler.query_num
        )));
    }
    Ok(())
}

/// Gradients of the trainable variables, accumulated over micro-batches.
#[derive(Default)]
pub struct Accum {
    grads: HashMap<candle_core::TensorId, Tensor>,
}

impl Accum {
    /// Adds the variables' gradients found in `store`.
    pub fn add(&mut self, store: &GradStore, vars: &[(String, Var)]) -> Result<(), TrainError> {
        for (_, v) in vars {
            if let Some(g) = store.get(v.as_tensor()) {
                // Detached: a stored gradient must not carry the graph of its backward pass.
                self.add_one(v.as_tensor().id(), g.detach())?;
            }
        }
        Ok(())
    }

    /// Adds gradients given with the variable tensors they belong to (the block path's).
    pub fn add_pairs(&mut self, pairs: Vec<(Tensor, Tensor)>) -> Result<(), TrainError> {
        for (p, g) in pairs {
            self.add_one(p.id(), g)?;
        }
        Ok(())
    }

    fn add_one(&mut self, id: candle_core::TensorId, g: Tensor) -> Result<(), TrainError> {
        let sum = match self.grads.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.grads.insert(id, sum);
        Ok(())
    }

    /// The accumulated gradients as a store keyed by the variables.
    pub fn into_store(self, vars: &[(String, Var)]) -> GradStore {
        let mut store = GradStore::default();
        let mut grads = self.grads;
        for (_, v) in vars {
            if let Some(g) = grads.remove(&v.as_tensor().id()) {
                store.insert(v.as_tensor(), g);
            }
        }
        store
    }
}

/// Forward + backward of one micro-batch; gradients of `loss · weight` are added to `acc`.
/// Returns the micro-batch's mean loss. With `checkpointing`, the activations of every
/// transformer layer — vision tower and LLM — are dropped after the forward pass and
/// recomputed in backward (the same dropout masks are replayed), keeping only layer inputs.
///
/// Vision and decoder layers run on the block path when the model has it
/// ([`MiniCpmV::vision_on_blocks`], [`MiniCpmV::llm_on_blocks`]): one hand-written forward and
/// backward per layer instead of candle's graph; without checkpointing their saved
/// activations serve the backward pass directly.
pub fn micro_step(
    model: &MiniCpmV,
    batch: &Batch,
    weight: f64,
    checkpointing: bool,
    vars: &[(String, Var)],
    acc: &mut Accum,
) -> Result<f64, TrainError> {
    let blocks = model.vision_on_blocks() && !batch.images.is_empty();
    let llm_blocks = model.llm_on_blocks();
    if !checkpointing && !blocks && !llm_blocks {
        let out = model.loss(batch, true)?;
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = (out.loss * weight)?.backward()?;
        acc.add(&grads, vars)?;
        return Ok(loss);
    }
    // Vision layers: keep each layer's input (checkpointing) or its block state (block path
    // without checkpointing); the tower's last output becomes a leaf whose gradient the LLM
    // side produces.
    struct Group {
        first: cpmv_model::vision_vit::VisionInput,
        inputs: Vec<Tensor>,
        states: Vec<Rng>,
        saved: Vec<VisionBlockState>,
        last: Option<Var>,
    }
    let device = model.params().device().clone();
    let mut timer = profile::Timer::start(&device);
    let vision_trains = model.vision_trains();
    let plan = model.vision_plan(batch.images.len(), &batch.image_groups);
    let nv = model.vision_num_layers();
    let keep_blocks = blocks && !checkpointing && vision_trains;
    let mut groups = Vec::with_capacity(plan.len());
    let mut last = Vec::with_capacity(plan.len());
    let mut lens = Vec::with_capacity(batch.images.len());
    for r in plan {
        let first = model.vision_embed(&batch.images[r], true)?;
        let mut x = first.x.detach();
        let (mut inputs, mut states, mut saved) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..nv {
            if checkpointing {
                inputs.push(x.clone());
                states.push(model.dropout_state());
            }
            x = if blocks {
                let (y, st) = model.vision_block_forward(i, &x, &first, true, keep_blocks)?;
                saved.extend(st);
                y
            } else {
                model
                    .vision_layer(i, &x, first.mask.as_ref(), true)?
                    .detach()
            };
        }
        lens.extend(first.lens.iter().copied());
        let leaf = if vision_trains {
            let v = Var::from_tensor(&x)?;
            last.push(v.as_tensor().clone());
            Some(v)
        } else {
            last.push(x);
            None
        };
        groups.push(Group {
            first,
            inputs,
            states,
            saved,
            last: leaf,
        });
    }
    timer.mark("vision_fwd");
    let x0 = model.embeddings_from_vision_layers(batch, &last, &lens, true)?;
    drop(last);
    timer.mark("resampler_embed_fwd");
    let aux = model.llm_aux(batch)?;
    let n = model.llm().num_layers();
    let (mut inputs, mut states, mut llm_saved) = (Vec::new(), Vec::new(), Vec::new());
    // Decoder layers one by one (block path, or checkpointing); else the LLM stays one graph
    // from the embeddings to the loss.
    let layerwise = checkpointing || llm_blocks;
    let mut x = if layerwise { x0.detach() } else { x0.clone() };
    for i in 0..n {
        if checkpointing {
            inputs.push(x.clone());
            states.push(model.dropout_state());
        }
        x = if llm_blocks {
            let (y, st) = model.llm_block_forward(i, &x, &aux, true, !checkpointing)?;
            llm_saved.extend(st);
            y
        } else if checkpointing {
            model.layer_forward(i, &x, &aux, true)?.detach()
        } else {
            model.layer_forward(i, &x, &aux, true)?
        };
    }
    timer.mark("llm_fwd");
    let xl = if layerwise {
        Some(Var::from_tensor(&x)?)
    } else {
        None
    };
    let out = model.head_loss(xl.as_ref().map_or(&x, |v| v.as_tensor()), batch, true)?;
    let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = (out.loss * weight)?.backward()?;
    acc.add(&grads, vars)?;
    timer.mark("head_fwd_bwd");
    let end_state = model.dropout_state();
    // The gradient of the embeddings (checkpointing: after the LLM's backward here; else the
    // one backward pass above reached through the LLM already).
    let mut vision_grads = None;
    if let Some(xl) = xl {
        let mut gx = grads
            .get(xl.as_tensor())
            .map(Tensor::detach)
            .ok_or_else(|| TrainError::Config("internal: no gradient reached the LLM".into()))?;
        drop(grads);
        for i in (0..n).rev() {
            if llm_blocks {
                // The state kept by the forward pass, or (checkpointing) recomputed.
                let st = match llm_saved.pop() {
                    Some(st) => st,
                    None => {
                        model.set_dropout_state(states[i]);
                        profile::part(&device, "llm.recompute", || {
                            model.llm_block_forward(i, &inputs[i], &aux, true, true)
                        })?
                        .1
                        .ok_or_else(|| TrainError::Config("internal: no block state".into()))?
                    }
                };
                let (gxi, pgrads) = profile::part(&device, "llm.backward", || {
                    model.llm_block_backward(&st, &aux, &gx)
                })?;
                acc.add_pairs(pgrads)?;
                gx = gxi;
                continue;
            }
            model.set_dropout_state(states[i]);
            let xi = Var::from_tensor(&inputs[i])?;
            let y = profile::part(&device, "llm.recompute", || {
                model.layer_forward(i, xi.as_tensor(), &aux, true)
            })?;
            let grads = profile::part(&device, "llm.backward", || {
                cpmv_model::ops::backward_with(&y, &gx)
            })?;
            acc.add(&grads, vars)?;
            gx = grads
                .get(xi.as_tensor())
                .map(Tensor::detach)
                .ok_or_else(|| {
                    TrainError::Config(format!("internal: no gradient below layer {i}"))
                })?;
        }
        timer.mark("llm_bwd");
        if x0.track_op() {
            let grads = cpmv_model::ops::backward_with(&x0, &gx)?;
            acc.add(&grads, vars)?;
            vision_grads = Some(grads);
        }
        timer.mark("resampler_embed_bwd");
    } else {
        vision_grads = Some(grads);
    }
    // Back through the vision layers, group by group.
    if let Some(grads) = vision_grads {
        for mut g in groups {
            let Some(leaf) = g.last else { continue };
            let Some(mut gv) = grads.get(leaf.as_tensor()).map(Tensor::detach) else {
                continue;
            };
            for i in (0..nv).rev() {
                if blocks {
                    // The state kept by the forward pass, or (checkpointing) recomputed.
                    let st = match g.saved.pop() {
                        Some(st) => st,
                        None => {
                            model.set_dropout_state(g.states[i]);
                            profile::part(&device, "vision.recompute", || {
                                model.vision_block_forward(i, &g.inputs[i], &g.first, true, true)
                            })?
                            .1
                            .ok_or_else(|| TrainError::Config("internal: no block state".into()))?
                        }
                    };
                    let (gx, pgrads) = profile::part(&device, "vision.backward", || {
                        model.vision_block_backward(&st, &gv)
                    })?;
                    acc.add_pairs(pgrads)?;
                    gv = gx;
                    continue;
                }
                model.set_dropout_state(g.states[i]);
                let xi = Var::from_tensor(&g.inputs[i])?;
                let y = profile::part(&device, "vision.recompute", || {
                    model.vision_layer(i, xi.as_tensor(), g.first.mask.as_ref(), true)
                })?;
                let grads = profile::part(&device, "vision.backward", || {
                    cpmv_model::ops::backward_with(&y, &gv)
                })?;
                acc.add(&grads, vars)?;
                gv = grads
                    .get(xi.as_tensor())
                    .map(Tensor::detach)
                    .ok_or_else(|| {
                        TrainError::Config(format!("internal: no gradient below vision layer {i}"))
                    })?;
            }
            if g.first.x.track_op() {
                let grads = cpmv_model::ops::backward_with(&g.first.x, &gv)?;
                acc.add(&grads, vars)?;
            }
        }
    }
    timer.mark("vision_bwd");
    if checkpointing {
        model.set_dropout_state(end_state);
    }
    Ok(loss)
}

/// Mean token loss over all packs of `data` (one pack at a time; never holds full logits of
/// more than one pack's supervised tokens).
pub fn evaluate(model: &MiniCpmV, data: &Dataset) -> Result<(f64, u64), TrainError> {
    let patch = model.config().vision.patch_size;
    let (mut sum, mut n) = (0f64, 0u64);
    for p in 0..data.packs.len() {
        let (batch, _, _) = make_batch(data, &[p], patch)?;
        if batch.supervised() == 0 {
            continue;
        }
        let rows = model.token_losses(&batch)?.to_dtype(DType::F64)?;
        sum += rows.sum_all()?.to_scalar::<f64>()?;
        n += rows.dim(0)? as u64;
    }
    Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, n))
}

fn decay_predicate(no_decay_norm_bias: bool) -> impl Fn(&str) -> bool {
    move |name: &str| {
        if !no_decay_norm_bias {
            return true;
        }
        let norm = name.contains("norm") || name.contains(".ln_") || name.contains("layernorm");
        !(name.ends_with(".bias") || name.ends_with("_bias") || norm)
    }
}

fn total_steps(cfg: &TrainConfig, packs: usize) -> u64 {
    if let Some(s) = cfg.max_steps {
        return s;
    }
    let epochs = cfg.epochs.unwrap_or(1.0);
    let micro = (packs as f64 / (cfg.micro_batch * cfg.nproc_per_node) as f64).ceil();
    ((epochs * micro) / cfg.grad_accum as f64).ceil().max(1.0) as u64
}

fn progress(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Everything a run needs before its first step besides the optimiser: data, model, schedule.
struct Setup {
    data: Arc<Dataset>,
    eval_data: Option<Dataset>,
    device: Device,
    model: MiniCpmV,
    base: Checkpoint,
    max_slice_nums: Option<u64>,
    vars: Vec<(String, Var)>,
    sched: LrSchedule,
    total: u64,
    /// sha256 of the training shards' manifest: identifies the data a run was started on.
    data_digest: String,
}

/// Refuses a run directory that is, contains or lies inside one of the run's inputs: the final
/// model copied onto its own base truncates the tokenizer files, and weights written over the
/// mapped base corrupt both.
fn refuse_overlapping_output(opts: &TrainOptions) -> Result<(), TrainError> {
    use cpmv_fsio::Input;
    let inputs: Vec<Input> = [
        Some(Input::new("--model", &opts.model)),
        Some(Input::new("--shards", &opts.shards)),
        opts.eval_shards
            .as_deref()
            .map(|e| Input::new("--eval-shards", e)),
    ]
    .into_iter()
    .flatten()
    .collect();
    cpmv_fsio::refuse_overlap("--output", &opts.output, &inputs)?;
    Ok(())
}

fn setup(opts: &TrainOptions) -> Result<Setup, TrainError> {
    let cfg = &opts.config;
    let data = Arc::new(Dataset::open(&opts.shards)?);
    let eval_data = match &opts.eval_shards {
        Some(d) => Some(Dataset::open(d)?),
        None => None,
    };
    let device = crate::config::open_device(&cfg.device)?;
    let load = LoadOptions {
        dtype: cfg.dtype.dtype(),
        device: device.clone(),
        trainable: cfg.trainable(),
        lora: cfg.lora(),
        seed: cfg.seed,
        fixes: cpmv_model::Fixes {
            v25_vision_masking: cfg.v25_vision_masking,
        },
        ..Default::default()
    };
    let model = MiniCpmV::load(&opts.model, &load)?;
    if cfg.mode == crate::config::TrainMode::Lora && model.params().lora().is_empty() {
        return Err(TrainError::Config(format!(
            "--lora-target `{}` matches no module (it must fully match names like \
             llm.model.layers.0.self_attn.q_proj)",
            cfg.lora_target
        )));
    }
    check_fit(&data, &opts.model, &model)?;
    if let Some(e) = &eval_data {
        check_fit(e, &opts.model, &model)?;
    }
    let base = Checkpoint::open(&opts.model)?;
    let max_slice_nums = Some(u64::from(
        data.shards.manifest.settings.sample.max_slice_nums,
    ));
    let vars = model.params().trainable_vars();
    if vars.is_empty() {
        return Err(TrainError::Config(
            "nothing to train: every part is frozen".into(),
        ));
    }
    let total = total_steps(cfg, data.packs.len());
    let warmup = cfg
        .warmup_steps
        .unwrap_or_else(|| LrSchedule::warmup_from_ratio(cfg.warmup_ratio, total));
    let sched = LrSchedule {
        kind: cfg.schedule,
        max_lr: cfg.learning_rate,
        warmup_steps: warmup,
        total_steps: total,
    };
    let manifest = opts.shards.join(cpmv_shard::manifest::MANIFEST_FILE);
    let data_digest = sha256_file(&manifest)?;
    let setup = Setup {
        data,
        eval_data,
        device,
        model,
        base,
        max_slice_nums,
        vars,
        sched,
        total,
        data_digest,
    };
    Ok(setup)
}

fn sha256_file(path: &Path) -> Result<String, TrainError> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// A path as stored in a checkpoint: absolute, symlinks resolved, so a run resumes from any
/// working directory.
fn canonical_string(p: &Path) -> Result<String, TrainError> {
    Ok(cpmv_fsio::resolve(p)?.display().to_string())
}

/// What a resumed run differs in from its checkpoint: the data and model it reads, and its
/// settings. Refuses math-changing differences unless `--resume-override` accepts them.
fn resume_changes(
    opts: &TrainOptions,
    setup: &Setup,
    saved: &TrainState,
    dir: &Path,
) -> Result<Vec<SettingChange>, TrainError> {
    let cfg = &opts.config;
    let packs = setup.data.packs.len();
    let mut changes: Vec<SettingChange> = cfg
        .changes_from(&saved.config)
        .into_iter()
        .filter(|c| match c.setting.as_str() {
            // One run length, given as steps or epochs: only the number of steps matters.
            "max_steps" | "epochs" => {
                total_steps(cfg, packs) != total_steps(&saved.config, saved_packs(saved, packs))
            }
            // Another GPU (`cuda`, `cuda:0`, a launched rank's `cuda:LOCAL_RANK`) computes the
            // same; CPU and GPU kernels do not.
            "device" => {
                let on_gpu = |d: &str| crate::config::parse_device(d).map(|o| o.is_some()).ok();
                on_gpu(&cfg.device) != on_gpu(&saved.config.device)
            }
            _ => true,
        })
        .collect();
    let path_change = |setting: &str, saved: &str, now: &Path, math: bool| {
        let now_s = canonical_string(now)?;
        let saved_s = cpmv_fsio::resolve(Path::new(saved))?.display().to_string();
        Ok::<_, TrainError>((saved_s != now_s).then(|| SettingChange {
            setting: setting.into(),
            from: saved_s.into(),
            to: now_s.into(),
            changes_math: math,
        }))
    };
    changes.extend(path_change("model", &saved.model_dir, &opts.model, true)?);
    // Shards moved or copied elsewhere are the same data when their manifest is the same.
    let same_data = !saved.data_digest.is_empty() && saved.data_digest == setup.data_digest;
    changes.extend(path_change(
        "shards",
        &saved.shards_dir,
        &opts.shards,
        !same_data,
    )?);
    if saved.packs != 0 && saved.packs != packs {
        changes.push(SettingChange {
            setting: "shards (packs)".into(),
            from: saved.packs.into(),
            to: packs.into(),
            changes_math: true,
        });
    }
    if !saved.data_digest.is_empty() && saved.data_digest != setup.data_digest {
        changes.push(SettingChange {
            setting: "shards (manifest.json sha256)".into(),
            from: saved.data_digest.clone().into(),
            to: setup.data_digest.clone().into(),
            changes_math: true,
        });
    }
    let math: Vec<&SettingChange> = changes.iter().filter(|c| c.changes_math).collect();
    if !math.is_empty() && !opts.resume_override {
        let list: Vec<String> = math
            .iter()
            .map(|c| format!("{} {} (was {})", c.flag(), c.to, c.from))
            .collect();
        return Err(TrainError::Config(format!(
            "--resume: {} was trained with other settings that change the math: {}; run with \
             the checkpoint's settings, or pass --resume-override to continue with the new ones \
             (recorded in trainer_state.json)",
            dir.display(),
            list.join(", ")
        )));
    }
    Ok(changes)
}

/// `checkpoint-<digits>.partial`: a save or prune that did not finish.
fn is_partial_checkpoint(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .and_then(|r| r.strip_suffix(".partial"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes `checkpoint-N.partial` directories a killed save left behind.
fn remove_stale_partials(run: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if (is_partial_checkpoint(&name) || name == FINAL_PARTIAL) && e.path().is_dir() {
            std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// The packs a checkpoint's run had (older states did not record them: assume today's).
fn saved_packs(saved: &TrainState, now: usize) -> usize {
    if saved.packs == 0 {
        now
    } else {
        saved.packs
    }
}

/// What a run writes before its first checkpoint (and what a failed run leaves): a fresh run may
/// start in a directory holding only these. Anything else, e.g. another model's files that the
/// final save would overwrite, is refused.
fn refuse_foreign_entries(run: &Path) -> Result<(), TrainError> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Ok(());
    };
    let mut foreign: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| {
            let ours = [cpmv_runlog::LOG_FILE, cpmv_runlog::TB_DIR, FINAL_PARTIAL];
            !(is_partial_checkpoint(n) || ours.contains(&n.as_str()))
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    foreign.truncate(5);
    Err(TrainError::Config(format!(
        "--output {} is not empty ({}, ...) and holds no checkpoint to resume; the run would \
         overwrite what is there: choose a new or empty directory",
        run.display(),
        foreign.join(", ")
    )))
}

/// The state a run starts from: fresh, or restored from the newest complete checkpoint
/// (values, optimiser state, data cursor, dropout generator) after checking the settings.
fn start_or_resume(
    opts: &TrainOptions,
    setup: &Setup,
    opt: &mut Optimizer,
    announce: bool,
) -> Result<TrainState, TrainError> {
    let cfg = &opts.config;
    let fresh = TrainState {
        step: 0,
        skipped: 0,
        cursor: Cursor::default(),
        dropout_rng: setup.model.dropout_state().0,
        tokens_seen: 0,
        samples_seen: 0,
        config: cfg.clone(),
        model_dir: canonical_string(&opts.model)?,
        shards_dir: canonical_string(&opts.shards)?,
        packs: setup.data.packs.len(),
        data_digest: setup.data_digest.clone(),
        overrides: Vec::new(),
    };
    let existing = checkpoints(&opts.output);
    if !opts.resume {
        if !existing.is_empty() {
            return Err(TrainError::Config(format!(
                "{} already holds checkpoints; pass --resume to continue it or choose another \
                 --output",
                opts.output.display()
            )));
        }
        refuse_foreign_entries(&opts.output)?;
        return Ok(fresh);
    }
    let (_, dir) = existing.last().ok_or_else(|| {
        TrainError::Config(format!(
            "--resume: no complete checkpoint-N directory in {}",
            opts.output.display()
        ))
    })?;
    let saved = read_state(dir)?;
    let changes = resume_changes(opts, setup, &saved, dir)?;
    for c in changes.iter().filter(|_| announce) {
        let kind = if c.changes_math {
            "--resume-override: changes the math"
        } else {
            "same math"
        };
        eprintln!(
            "resume from step {}: {} {} -> {} ({kind})",
            saved.step,
            c.flag(),
            c.from,
            c.to
        );
    }
    load_trainable(&setup.model, &dir.join(TRAINABLE_FILE))?;
    opt.load(dir, &setup.vars)?;
    setup.model.set_dropout_state(Rng(saved.dropout_rng));
    let mut overrides = saved.overrides.clone();
    let math: Vec<SettingChange> = changes.into_iter().filter(|c| c.changes_math).collect();
    if !math.is_empty() {
        overrides.push(ResumeOverride {
            step: saved.step,
            changes: math,
        });
    }
    Ok(TrainState {
        config: cfg.clone(),
        model_dir: fresh.model_dir,
        shards_dir: fresh.shards_dir,
        packs: fresh.packs,
        data_digest: fresh.data_digest,
        overrides,
        ..saved
    })
}

/// Runs `train`: checks that the output cannot harm an input, sets up, starts or resumes, runs
/// the steps (checkpointing on the way) and writes the final model. With `nproc_per_node` N > 1
/// the N data-parallel ranks run as threads of this process (`cpmv_dist::InProcess`); rank 0
/// prints, logs and writes, and its report is returned.
pub fn train(opts: &TrainOptions) -> Result<TrainReport, TrainError> {
    opts.config.validate()?;
    refuse_overlapping_output(opts)?;
    let env = |k: &str| std::env::var(k).ok();
    // A launched world of one is a plain run, except on GPUs with NCCL built in and a
    // rendezvous address given (torchrun always gives one): a world-size-1 NCCL run.
    let nccl_of_one = |w: &cpmv_dist::World| {
        cfg!(feature = "nccl")
            && w.master_addr.is_some()
            && w.master_port.is_some()
            && crate::config::parse_device(&opts.config.device).is_ok_and(|d| d.is_some())
    };
    if let Some(w) = cpmv_dist::world_from_env(env)?.filter(|w| w.world_size > 1 || nccl_of_one(w))
    {
        return train_launched(opts, &w);
    }
    let world = opts.config.nproc_per_node;
    if world == 1 {
        return train_rank(opts, None);
    }
    let results: Vec<Result<TrainReport, TrainError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = cpmv_dist::InProcess::group(world)
            .into_iter()
            .map(|comm| {
                scope.spawn(move || {
                    let r = train_rank(opts, Some(&comm));
                    if r.is_ok() {
                        comm.finish();
                    }
                    // On an error `comm` is dropped unfinished: the other ranks stop too.
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(TrainError::Data(format!(
                        "rank {rank} panicked (a cpmv bug)"
                    )))
                })
            })
            .collect()
    });
    let mut errors: Vec<TrainError> = Vec::new();
    let mut rank0 = None;
    for r in results {
        match r {
            Ok(report) => {
                rank0.get_or_insert(report);
            }
            Err(e) => errors.push(e),
        }
    }
    // The cause, not the echo: a rank's own error before the others' "rank r failed".
    if let Some(i) = errors
        .iter()
        .position(|e| !matches!(e, TrainError::Dist(_)))
    {
        return Err(errors.swap_remove(i));
    }
    match (errors.into_iter().next(), rank0) {
        (Some(e), _) => Err(e),
        (None, Some(report)) => Ok(report),
        (None, None) => Err(TrainError::Data("no rank reported".into())),
    }
}

/// Runs this process as one rank of a run its launcher (torchrun, srun, mpirun) started: the
/// ranks meet at `MASTER_ADDR:MASTER_PORT+2` and exchange over TCP on the CPU, or over NCCL
/// (bootstrapped at `MASTER_PORT+1` or `NCCL_COMM_ID`) on GPU `LOCAL_RANK`.
/// The run's config records the launcher's world size as `nproc_per_node`, so a checkpoint
/// resumes the same under `--nproc-per-node` threads.
fn train_launched(opts: &TrainOptions, w: &cpmv_dist::World) -> Result<TrainReport, TrainError> {
    let cfg = &opts.config;
    let whoami = format!(
        "started by {:?} as rank {} of {}",
        w.launcher, w.rank, w.world_size
    );
    if cfg.nproc_per_node != 1 && cfg.nproc_per_node != w.world_size {
        return Err(TrainError::Config(format!(
            "{whoami}, with --nproc-per-node {}: the launcher starts the ranks (one per \
             process); leave --nproc-per-node out",
            cfg.nproc_per_node
        )));
    }
    let env = |k: &str| std::env::var(k).ok();
    let timeout = match env("CPMV_DIST_TIMEOUT_S") {
        None => 1800,
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            TrainError::Config(format!(
                "CPMV_DIST_TIMEOUT_S={v:?} is not a number of seconds"
            ))
        })?,
    };
    let timeout = std::time::Duration::from_secs(timeout);
    let mut opts = opts.clone();
    opts.config.nproc_per_node = w.world_size;
    let on_gpu = crate::config::parse_device(&cfg.device)?.is_some();
    if on_gpu && !cfg!(feature = "nccl") {
        return Err(TrainError::Config(format!(
            "{whoami} on --device {}: ranks on GPUs need NCCL, and this `train` was built \
             without it (cargo build --release --features cuda,nccl); launched ranks on the CPU \
             (--device cpu) exchange over TCP",
            cfg.device
        )));
    }
    let control = cpmv_dist::Tcp::connect(w.rank, w.world_size, &w.control_addr()?, timeout)?;
    if !on_gpu {
        return train_rank(&opts, Some(&control));
    }
    #[cfg(feature = "nccl")]
    {
        // Device = LOCAL_RANK (or the one device the launcher left visible), whatever ordinal
        // --device named.
        let ordinal = cpmv_dist::nccl::device_ordinal(w.local_rank)?;
        opts.config.device = format!("cuda:{ordinal}");
        let comm = cpmv_dist::Nccl::connect(ordinal, control, &w.nccl_comm_id(env)?, timeout)?;
        train_rank(&opts, Some(&comm))
    }
    #[cfg(not(feature = "nccl"))]
    unreachable!("refused above")
}

/// One rank of a run (`comm` None: the only one).
fn train_rank(
    opts: &TrainOptions,
    comm: Option<&dyn cpmv_dist::Collective>,
) -> Result<TrainReport, TrainError> {
    let (rank, world) = comm.map_or((0, 1), |c| (c.rank(), c.world_size()));
    let main = rank == 0;
    let setup = setup(opts)?;
    let cfg = &opts.config;
    let mut opt = Optimizer::new(
        cfg,
        &setup.vars,
        rank,
        world,
        decay_predicate(cfg.no_decay_norm_bias),
    )?;
    if main && !opts.quiet {
        eprintln!(
            "{}",
            crate::memory::MemoryPlan::of(&setup.model, &setup.vars, cfg, world)
        );
    }
    let state = start_or_resume(opts, &setup, &mut opt, main)?;
    if let Some(c) = comm {
        // Every rank has read the run directory before rank 0 writes into it.
        c.barrier()?;
    }
    let mut log = None;
    if main {
        std::fs::create_dir_all(&opts.output).map_err(io(&opts.output))?;
        remove_stale_partials(&opts.output)?;
        log = Some(RunLog::create(
            &opts.output,
            opts.resume.then_some(state.step),
        )?);
    }
    let ctx = SaveContext {
        base_dir: &opts.model,
        base: &setup.base,
        config: &opts.config,
        max_slice_nums: setup.max_slice_nums,
    };
    let report = run_steps(opts, &setup, &mut opt, state, &ctx, log.as_mut(), comm)?;
    if let Some(log) = log.as_mut() {
        log.flush()?;
        save_final(&setup.model, &ctx, &opts.output)?;
        let png = opts.output.join("loss.png");
        cpmv_runlog::loss_curve_png(&opts.output, &png, "training loss")?;
    }
    Ok(report)
}

/// The sum over ranks of a few step figures (identity on one rank).
fn all_reduce_figures(
    comm: Option<&dyn cpmv_dist::Collective>,
    figures: &mut [f64],
) -> Result<(), TrainError> {
    if let Some(c) = comm {
        let mut b: Vec<f32> = figures.iter().map(|&x| x as f32).collect();
        c.all_reduce_sum(&mut b)?;
        for (f, x) in figures.iter_mut().zip(b) {
            *f = f64::from(x);
        }
    }
    Ok(())
}

/// The step loop: micro-batches, accumulation, the non-finite check, clipping, the update,
/// logging, evaluation and checkpoints, until the run's last step.
fn run_steps(
    opts: &TrainOptions,
    setup: &Setup,
    opt: &mut Optimizer,
    mut state: TrainState,
    ctx: &SaveContext,
    mut log: Option<&mut RunLog>,
    comm: Option<&dyn cpmv_dist::Collective>,
) -> Result<TrainReport, TrainError> {
    let cfg = &opts.config;
    let total = setup.total;
    let (model, vars, data) = (&setup.model, &setup.vars, &setup.data);
    let patch = model.config().vision.patch_size;
    let (rank, world) = comm.map_or((0, 1), |c| (c.rank(), c.world_size()));
    let main = rank == 0;
    let ex = Exchange {
        comm,
        bucket: (cfg.bucket_mb << 20) / 4,
    };
    let rx = stream(
        data.clone(),
        cfg.seed,
        cfg.micro_batch,
        patch,
        state.cursor,
        (rank, world),
    );
    let pb = progress(total, opts.quiet || !main);
    pb.set_position(state.step);
    let started = Instant::now();
    let (tokens_at_start, samples_at_start) = (state.tokens_seen, state.samples_seen);
    let mut report = TrainReport {
        steps: state.step,
        skipped: state.skipped,
        losses: Vec::new(),
        eval_losses: Vec::new(),
        output: opts.output.clone(),
        peak_mem_bytes: 0,
        rank,
    };
    let mut consecutive_skips = 0u64;
    while state.step < total {
        let mut mbs = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            let mb = rx
                .recv()
                .map_err(|_| TrainError::Data("the data thread stopped".into()))??;
            mbs.push(mb);
        }
        // Supervised tokens of the whole step, over every rank.
        let mut figures = [mbs.iter().map(|m| m.batch.supervised()).sum::<usize>() as f64];
        all_reduce_figures(comm, &mut figures)?;
        let step_tokens = figures[0] as usize;
        let mut acc = opt.accumulator();
        let mut loss = 0f64;
        for mb in &mbs {
            let n = mb.batch.supervised();
            // The reference averages micro-batch means over accumulation and over ranks (HF
            // Trainer); `tokens` weighs by the step's supervised tokens on all ranks.
            let w = match cfg.loss_norm {
                LossNorm::Reference => 1.0 / (cfg.grad_accum * world) as f64,
                LossNorm::Tokens => n as f64 / step_tokens.max(1) as f64,
            };
            if let Some(a) = acc.full_mut() {
                if n > 0 {
                    loss += w * micro_step(model, &mb.batch, w, cfg.grad_checkpointing, vars, a)?;
                }
                continue;
            }
            // ZeRO-2: every rank reduces after every micro-batch, with or without gradients.
            let store = if n > 0 {
                let mut a = Accum::default();
                loss += w * micro_step(model, &mb.batch, w, cfg.grad_checkpointing, vars, &mut a)?;
                Some(a.into_store(vars))
            } else {
                None
            };
            acc.add(store.as_ref(), opt, vars, ex)?;
        }
        let ids = || {
            mbs.iter()
                .flat_map(|m| m.ids.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut figures = [
            loss,
            mbs.iter()
                .flat_map(|m| m.batch.segments.iter().flatten())
                .map(|&n| n as f64)
                .sum::<f64>(),
            mbs.iter().map(|m| m.samples as f64).sum::<f64>(),
        ];
        // Every rank then holds the step's gradient (or its shard of it), loss and counts, and
        // takes the same non-finite, clipping and update decisions.
        let grads = opt.reduce(acc, vars, ex)?;
        all_reduce_figures(comm, &mut figures)?;
        loss = figures[0];
        let norm = opt.grad_norm(&grads, vars, ex)?;
        let cursor = mbs.last().map(|m| m.cursor).unwrap_or(state.cursor);
        state.cursor = cursor;
        state.tokens_seen += figures[1] as u64;
        state.samples_seen += figures[2] as u64;
        if step_tokens == 0 {
            // Nothing supervised in the whole step: no update, the schedule does not advance.
            state.skipped += 1;
            report.skipped = state.skipped;
            continue;
        }
        if !loss.is_finite() || !norm.is_finite() {
            let what = if loss.is_finite() {
                "gradient norm"
            } else {
                "loss"
            };
            if !cfg.skip_nonfinite {
                return Err(TrainError::NonFinite {
                    what: what.into(),
                    step: state.step + 1,
                    ids: ids(),
                });
            }
            state.skipped += 1;
            report.skipped = state.skipped;
            consecutive_skips += 1;
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS {
                return Err(TrainError::NonFinite {
                    what: format!("{what} in {MAX_CONSECUTIVE_SKIPS} consecutive steps (--skip-nonfinite gives up)"),
                    step: state.step + 1,
                    ids: ids(),
                });
            }
            continue;
        }
        consecutive_skips = 0;
        let factor = if cfg.max_grad_norm > 0.0 {
            cpmv_optim::clip::clip_factor(norm, cfg.max_grad_norm)
        } else {
            1.0
        };
        let lr = setup.sched.lr_at(state.step + 1);
        opt.step(grads, vars, lr, factor, ex)?;
        state.step += 1;
        state.dropout_rng = model.dropout_state().0;
        report.steps = state.step;
        report.losses.push(loss);
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let peak = peak_memory_bytes(&setup.device);
        report.peak_mem_bytes = peak;
        let rec = StepRecord {
            step: state.step,
            epoch: cursor.epoch as f64 + cursor.pos as f64 / data.packs.len() as f64,
            loss,
            lr,
            grad_norm: norm,
            tokens: state.tokens_seen,
            samples: state.samples_seen,
            tokens_per_s: (state.tokens_seen - tokens_at_start) as f64 / elapsed,
            samples_per_s: (state.samples_seen - samples_at_start) as f64 / elapsed,
            elapsed_s: elapsed,
            peak_mem_bytes: peak,
            eval_loss: None,
            skipped_nonfinite: (state.skipped > 0).then_some(state.skipped),
        };
        let save_now = state.step.is_multiple_of(cfg.save_every) || state.step == total;
        if let Some(log) = log.as_deref_mut() {
            // Rank 0 logs and evaluates; every rank takes part in a save (its optimizer shard).
            if state.step.is_multiple_of(cfg.log_every) || state.step == total {
                log.train_step(&rec)?;
            }
            pb.set_position(state.step);
            pb.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} |g| {norm:.3} {:.0} tok/s {:.2} samples/s peak {:.0} MiB",
                rec.tokens_per_s,
                rec.samples_per_s,
                peak as f64 / (1 << 20) as f64
            ));
            if let Some(e) = &setup.eval_data {
                if state.step.is_multiple_of(cfg.eval_every) || state.step == total {
                    let (el, n) = evaluate(model, e)?;
                    log.eval(state.step, el, n)?;
                    report.eval_losses.push((state.step, el));
                }
            }
            if save_now {
                // The log's lines up to this step reach the disk before the checkpoint that a
                // resume would continue after them.
                log.flush()?;
            }
        }
        if save_now {
            save_checkpoint(model, ctx, opt, &state, &opts.output, comm)?;
            if main {
                checkpoint::prune(&opts.output, cfg.keep_last.max(1))?;
            }
        }
    }
    pb.finish_and_clear();
    Ok(report)
}

/// Name of the directory the final model is written in before its files are published.
const FINAL_PARTIAL: &str = "final.partial";

/// Writes the final model into the run directory: into `final.partial` first, flushed, then
/// each file renamed into place, so a kill never leaves a torn weight file under its final name
/// (a resume rewrites the final model).
fn save_final(model: &MiniCpmV, ctx: &SaveContext, run: &Path) -> Result<(), TrainError> {
    let tmp = run.join(FINAL_PARTIAL);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let res = save_model(model, ctx, &tmp).and_then(|()| {
        cpmv_fsio::sync_tree(&tmp)?;
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))? {
            let e = e.map_err(io(&tmp))?;
            std::fs::rename(e.path(), run.join(e.file_name())).map_err(io(&e.path()))?;
        }
        cpmv_fsio::sync_dir(run)?;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&tmp);
    res
}

/// Writes `checkpoint-<step>` atomically: a `.partial` directory whose files and entries are
/// flushed to the disk, then renamed (and the run directory flushed), so a crash at any point
/// leaves either no `checkpoint-<step>` or a complete one. Every rank calls it: rank 0 writes
/// the model and the trainer state, each rank its part of the optimizer state (a rank that fails
/// stops the others at the next collective, and the `.partial` is never published).
fn save_checkpoint(
    model: &MiniCpmV,
    ctx: &SaveContext,
    opt: &Optimizer,
    state: &TrainState,
    run: &Path,
    comm: Option<&dyn cpmv_dist::Collective>,
) -> Result<(), TrainError> {
    let rank = comm.map_or(0, |c| c.rank());
    let name = format!("checkpoint-{}", state.step);
    let tmp = run.join(format!("{name}.partial"));
    let dir = run.join(&name);
    let res = (|| {
        if rank == 0 {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
            }
            std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
            fault::full_disk(state.step, &tmp)?;
            save_model(model, ctx, &tmp)?;
            save_trainable(model, &tmp.join(TRAINABLE_FILE))?;
            fault::pause(state.step);
        }
        if let Some(c) = comm {
            c.barrier()?;
        }
        opt.save(&tmp, rank)?;
        if let Some(c) = comm {
            c.barrier()?;
        }
        if rank == 0 {
            write_state(&tmp, state)?;
            cpmv_fsio::sync_tree(&tmp)?;
        }
        Ok(())
    })();
    if rank != 0 {
        return res;
    }
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // `checkpoints` ignores a directory of this name without trainer state: not ours to
        // delete.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(TrainError::Config(format!(
            "{} exists but is not a complete checkpoint (no {}); move it away and resume",
            dir.display(),
            checkpoint::STATE_FILE
        )));
    }
    cpmv_fsio::publish(&tmp, &dir)?;
    Ok(())
}

/// Faults that tests inject into real processes, compiled into test builds only
/// (`--features fault-injection`); without the feature these do nothing.
mod fault {
    #[cfg(feature = "fault-injection")]
    use super::{io, TrainError};
    use std::path::Path;

    #[cfg(feature = "fault-injection")]
    fn at(var: &str) -> Option<u64> {
        std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok())
    }

    /// `CPMV_FAULT_FULL_DISK_AT_STEP=N`: the checkpoint of step N fails as a full disk would,
    /// after writing part of a file.
    #[cfg(feature = "fault-injection")]
    pub fn full_disk(step: u64, tmp: &Path) -> Result<(), TrainError> {
        if at("CPMV_FAULT_FULL_DISK_AT_STEP") == Some(step) {
            let file = tmp.join("model.safetensors");
            std::fs::write(&file, b"partial").map_err(io(tmp))?;
            return Err(TrainError::Io {
                path: file,
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        Ok(())
    }

    /// `CPMV_FAULT_PAUSE_SAVE_AT_STEP=N`: the save of step N's checkpoint stops half-way (model
    /// and trainable values written, optimiser state and trainer state not) until the process
    /// is killed: a kill test's deterministic "killed while saving".
    #[cfg(feature = "fault-injection")]
    pub fn pause(step: u64) {
        if at("CPMV_FAULT_PAUSE_SAVE_AT_STEP") == Some(step) {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn full_disk(_step: u64, _tmp: &Path) -> Result<(), super::TrainError> {
        Ok(())
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn pause(_step: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_decay_exemption_covers_biases_and_norms_only_when_asked() {
        let reference = decay_predicate(false);
        let exempt = decay_predicate(true);
        for name in [
            "llm.model.layers.0.self_attn.q_proj.bias",
            "llm.model.layers.0.input_layernorm.weight",
            "llm.model.norm.weight",
            "vpm.encoder.layers.0.layer_norm1.weight",
            "vpm.blocks.0.norm1.bias",
            "resampler.ln_q.weight",
            "resampler.attn.in_proj_bias",
            "vpm.post_layernorm.bias",
        ] {
            assert!(reference(name), "the reference decays {name} too");
            assert!(!exempt(name), "{name} should be exempt");
        }
        for name in [
            "llm.model.layers.0.self_attn.q_proj.weight",
            "llm.model.embed_tokens.weight",
            "resampler.proj",
            "resampler.query",
            "vpm.embeddings.patch_embedding.weight",
            "llm.model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert!(exempt(name), "{name} should decay");
        }
    }

    #[test]
    fn run_length_from_steps_or_epochs() {
        let mut c = TrainConfig {
            max_steps: Some(7),
            ..Default::default()
        };
        assert_eq!(total_steps(&c, 100), 7);
        c.max_steps = None;
        c.epochs = Some(2.0);
        c.micro_batch = 3;
        c.grad_accum = 2;
        // 10 packs → 4 micro-batches per epoch → 8 micro-batches → 4 steps.
        assert_eq!(total_steps(&c, 10), 4);
        c.epochs = Some(0.5);
        assert_eq!(total_steps(&c, 10), 1);
    }
}
