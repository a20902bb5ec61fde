//! The training loop: micro-batches from the shards, forward/backward (optionally
//! checkpointed per layer), gradient accumulation, clipping, AdamW, schedule, evaluation,
//! checkpoints and resumption.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_model::weights::Checkpoint;
use cpmv_model::{Batch, LoadOptions, MiniCpmV, Rng};
use cpmv_optim::{AdamW, AdamWConfig, LrSchedule};
use cpmv_runlog::{RunLog, StepRecord};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint::{
    self, checkpoints, load_trainable, read_state, save_model, save_trainable, write_state,
    SaveContext, TrainState, OPTIMIZER_FILE, TRAINABLE_FILE,
};
use crate::config::{LossNorm, TrainConfig};
use crate::data::{make_batch, stream, Cursor, Dataset};
use crate::error::{io, TrainError};
pub use cpmv_model::profile;

/// What to train on and where to write.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub shards: PathBuf,
    pub model: PathBuf,
    pub output: PathBuf,
    pub eval_shards: Option<PathBuf>,
    pub resume: bool,
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
    let (tok, tmpl) = cpmv_prep::build::model_fingerprints(model_dir)
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
    let v = model.config().version.as_str();
    if m.model.version != v {
        return Err(TrainError::Mismatch(format!(
            "the shards were made for MiniCPM-V {} but {} is {v}",
            m.model.version,
            model_dir.display()
        )));
    }
    let q = m
        .settings
        .pointer("/sample/query_num")
        .and_then(|x| x.as_u64());
    if let Some(q) = q {
        if q as usize != model.config().resampler.query_num {
            return Err(TrainError::Mismatch(format!(
                "the shards hold {q} placeholders per image, the model's query_num is {}",
                model.config().resampler.query_num
            )));
        }
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
                let id = v.as_tensor().id();
                // Detached: a stored gradient must not carry the graph of its backward pass.
                let sum = match self.grads.remove(&id) {
                    Some(prev) => (prev + g.detach())?,
                    None => g.detach(),
                };
                self.grads.insert(id, sum);
            }
        }
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
pub fn micro_step(
    model: &MiniCpmV,
    batch: &Batch,
    weight: f64,
    checkpointing: bool,
    vars: &[(String, Var)],
    acc: &mut Accum,
) -> Result<f64, TrainError> {
    if !checkpointing {
        let out = model.loss(batch, true)?;
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = (out.loss * weight)?.backward()?;
        acc.add(&grads, vars)?;
        return Ok(loss);
    }
    // Vision layers: keep each layer's input only; the tower's last output becomes a leaf
    // whose gradient the LLM side produces.
    struct Group {
        first: cpmv_model::vision_vit::VisionInput,
        inputs: Vec<Tensor>,
        states: Vec<Rng>,
        last: Option<Var>,
    }
    let device = model.params().device().clone();
    let mut timer = profile::Timer::start(&device);
    let vision_trains = model.vision_trains();
    let plan = model.vision_plan(batch.images.len(), &batch.image_groups);
    let nv = model.vision_num_layers();
    let mut groups = Vec::with_capacity(plan.len());
    let mut last = Vec::with_capacity(plan.len());
    let mut lens = Vec::with_capacity(batch.images.len());
    for r in plan {
        let first = model.vision_embed(&batch.images[r], true)?;
        let mut x = first.x.detach();
        let (mut inputs, mut states) = (Vec::with_capacity(nv), Vec::with_capacity(nv));
        for i in 0..nv {
            inputs.push(x.clone());
            states.push(model.dropout_state());
            x = model
                .vision_layer(i, &x, first.mask.as_ref(), true)?
                .detach();
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
            last: leaf,
        });
    }
    timer.mark("vision_fwd");
    let x0 = model.embeddings_from_vision_layers(batch, &last, &lens, true)?;
    drop(last);
    timer.mark("resampler_embed_fwd");
    let aux = model.llm_aux(batch)?;
    let n = model.llm().num_layers();
    let mut inputs = Vec::with_capacity(n);
    let mut states: Vec<Rng> = Vec::with_capacity(n);
    let mut x = x0.detach();
    for i in 0..n {
        inputs.push(x.clone());
        states.push(model.dropout_state());
        x = model.layer_forward(i, &x, &aux, true)?.detach();
    }
    timer.mark("llm_fwd");
    let xl = Var::from_tensor(&x)?;
    let out = model.head_loss(xl.as_tensor(), batch, true)?;
    let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads = (out.loss * weight)?.backward()?;
    acc.add(&grads, vars)?;
    let mut gx = grads
        .get(xl.as_tensor())
        .map(Tensor::detach)
        .ok_or_else(|| TrainError::Config("internal: no gradient reached the LLM".into()))?;
    drop(grads);
    timer.mark("head_fwd_bwd");
    let end_state = model.dropout_state();
    for i in (0..n).rev() {
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
            .ok_or_else(|| TrainError::Config(format!("internal: no gradient below layer {i}")))?;
    }
    timer.mark("llm_bwd");
    if x0.track_op() {
        let grads = cpmv_model::ops::backward_with(&x0, &gx)?;
        acc.add(&grads, vars)?;
        timer.mark("resampler_embed_bwd");
        // Back through the vision layers, group by group.
        for g in groups {
            let Some(leaf) = g.last else { continue };
            let Some(mut gv) = grads.get(leaf.as_tensor()).map(Tensor::detach) else {
                continue;
            };
            for i in (0..nv).rev() {
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
    model.set_dropout_state(end_state);
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
    let micro = (packs as f64 / cfg.micro_batch as f64).ceil();
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

/// Runs `train`.
pub fn train(opts: &TrainOptions) -> Result<TrainReport, TrainError> {
    let cfg = &opts.config;
    cfg.validate()?;
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
    let max_slice_nums = data
        .shards
        .manifest
        .settings
        .pointer("/sample/max_slice_nums")
        .and_then(|x| x.as_u64());
    let vars = model.params().trainable_vars();
    if vars.is_empty() {
        return Err(TrainError::Config(
            "nothing to train: every part is frozen".into(),
        ));
    }
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
        decay_predicate(cfg.no_decay_norm_bias),
    )?;
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

    // Resume or start.
    let mut state = TrainState {
        step: 0,
        skipped: 0,
        cursor: Cursor::default(),
        dropout_rng: model.dropout_state().0,
        tokens_seen: 0,
        samples_seen: 0,
        config: cfg.clone(),
        model_dir: opts.model.display().to_string(),
        shards_dir: opts.shards.display().to_string(),
        packs: data.packs.len(),
    };
    let existing = checkpoints(&opts.output);
    if opts.resume {
        let (_, dir) = existing.last().ok_or_else(|| {
            TrainError::Config(format!(
                "--resume: no checkpoint-N directory in {}",
                opts.output.display()
            ))
        })?;
        let saved = read_state(dir)?;
        let same =
            |a: &str, b: &Path| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
        if !same(&saved.model_dir, &opts.model) || !same(&saved.shards_dir, &opts.shards) {
            return Err(TrainError::Config(format!(
                "--resume: {} was trained with --model {} --shards {}; got --model {} --shards {}",
                dir.display(),
                saved.model_dir,
                saved.shards_dir,
                opts.model.display(),
                opts.shards.display()
            )));
        }
        if saved.packs != 0 && saved.packs != data.packs.len() {
            return Err(TrainError::Config(format!(
                "--resume: the shards now hold {} packs, {} when the run started",
                data.packs.len(),
                saved.packs
            )));
        }
        let mut a = saved.config.clone();
        let mut b = cfg.clone();
        // Only the run length may change on resume.
        a.max_steps = None;
        b.max_steps = None;
        a.epochs = None;
        b.epochs = None;
        // A run may continue on another device.
        a.device.clear();
        b.device.clear();
        if a != b {
            return Err(TrainError::Config(format!(
                "--resume: the settings differ from those of {} (only --max-steps/--epochs may change)",
                dir.display()
            )));
        }
        load_trainable(&model, &dir.join(TRAINABLE_FILE))?;
        opt.load_state(&dir.join(OPTIMIZER_FILE))?;
        model.set_dropout_state(Rng(saved.dropout_rng));
        state = TrainState {
            config: cfg.clone(),
            ..saved
        };
    } else if !existing.is_empty() {
        return Err(TrainError::Config(format!(
            "{} already holds checkpoints; pass --resume to continue it or choose another --output",
            opts.output.display()
        )));
    }
    std::fs::create_dir_all(&opts.output).map_err(io(&opts.output))?;
    let mut log = RunLog::create(&opts.output, opts.resume.then_some(state.step))?;
    let patch = model.config().vision.patch_size;
    let rx = stream(data.clone(), cfg.seed, cfg.micro_batch, patch, state.cursor);
    let ctx = SaveContext {
        base_dir: &opts.model,
        base: &base,
        config: cfg,
        max_slice_nums,
    };
    let pb = progress(total, opts.quiet);
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
        let step_tokens: usize = mbs.iter().map(|m| m.batch.supervised()).sum();
        let mut acc = Accum::default();
        let mut loss = 0f64;
        for mb in &mbs {
            let n = mb.batch.supervised();
            if n == 0 {
                continue;
            }
            let w = match cfg.loss_norm {
                LossNorm::Reference => 1.0 / cfg.grad_accum as f64,
                LossNorm::Tokens => n as f64 / step_tokens.max(1) as f64,
            };
            let l = micro_step(
                &model,
                &mb.batch,
                w,
                cfg.grad_checkpointing,
                &vars,
                &mut acc,
            )?;
            loss += l * w;
        }
        let ids = || {
            mbs.iter()
                .flat_map(|m| m.ids.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let store = acc.into_store(&vars);
        let norm = cpmv_optim::clip::global_norm(&store, &vars)?;
        let cursor = mbs.last().map(|m| m.cursor).unwrap_or(state.cursor);
        state.cursor = cursor;
        state.tokens_seen += mbs
            .iter()
            .flat_map(|m| m.batch.segments.iter().flatten())
            .map(|&n| n as u64)
            .sum::<u64>();
        state.samples_seen += mbs.iter().map(|m| m.samples as u64).sum::<u64>();
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
        let lr = sched.lr_at(state.step + 1);
        opt.step(&store, lr, factor)?;
        state.step += 1;
        state.dropout_rng = model.dropout_state().0;
        report.steps = state.step;
        report.losses.push(loss);
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let peak = peak_memory_bytes(&device);
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
        if let Some(e) = &eval_data {
            if state.step.is_multiple_of(cfg.eval_every) || state.step == total {
                let (el, n) = evaluate(&model, e)?;
                log.eval(state.step, el, n)?;
                report.eval_losses.push((state.step, el));
            }
        }
        if state.step.is_multiple_of(cfg.save_every) || state.step == total {
            save_checkpoint(&model, &ctx, &opt, &state, &opts.output)?;
            checkpoint::prune(&opts.output, cfg.keep_last.max(1))?;
        }
    }
    log.flush()?;
    pb.finish_and_clear();
    save_model(&model, &ctx, &opts.output)?;
    let png = opts.output.join("loss.png");
    cpmv_runlog::loss_curve_png(&opts.output, &png, "training loss")?;
    Ok(report)
}

/// Writes `checkpoint-<step>` atomically (a `.partial` directory renamed when complete).
fn save_checkpoint(
    model: &MiniCpmV,
    ctx: &SaveContext,
    opt: &AdamW,
    state: &TrainState,
    run: &Path,
) -> Result<(), TrainError> {
    let name = format!("checkpoint-{}", state.step);
    let tmp = run.join(format!("{name}.partial"));
    let dir = run.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let res = (|| {
        // Fault injection for tests: a full disk while writing this step's checkpoint.
        if std::env::var("CPMV_FAULT_FULL_DISK_AT_STEP")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            == Some(state.step)
        {
            std::fs::write(tmp.join("model.safetensors"), b"partial").map_err(io(&tmp))?;
            return Err(TrainError::Io {
                path: tmp.join("model.safetensors"),
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        save_model(model, ctx, &tmp)?;
        save_trainable(model, &tmp.join(TRAINABLE_FILE))?;
        opt.save_state(&tmp.join(OPTIMIZER_FILE))?;
        write_state(&tmp, state)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))
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
