//! `train bench`: training-step throughput of a real-size model with seeded random weights on
//! the benchmark workload (benches/gpu/README.md), as one JSON line per configuration; the
//! PyTorch baseline (benches/gpu/torch_baseline.py) prints the same fields.

use candle_core::{DType, Device, Tensor};
use cpmv_model::flops::{step_flops, StepFlops};
use cpmv_model::init::{derive_config, init_tensor, Size};
use cpmv_model::weights::{param_specs, InitKind};
use cpmv_model::{LoadOptions, LoraConfig, MiniCpmV, ModelConfig, ParamStore, Trainable};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::{open_device, ComputeDtype};
use crate::error::TrainError;
use crate::optimizer::{Exchange, GradAccum, Optimizer};
use crate::trainer::{micro_step, peak_memory_bytes, Accum};

/// Dense bf16 peak of an H100/H200 SXM (TFLOP/s), the MFU denominator.
pub const PEAK_TFLOPS: f64 = 989.0;

/// What is trained in a benchmark configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// Everything trains (vision, resampler, LLM, embeddings, lm_head).
    Full,
    /// LoRA r=64 on the LLM's q/k/v/o (the targets finetune_lora.sh passes), vision and
    /// resampler trained whole, the embeddings frozen (`--lora-embeddings false`).
    Lora,
    /// As `lora`, plus trainable embeddings: what finetune_lora.sh trains (`modules_to_save`).
    LoraEmbed,
}

/// One benchmark configuration.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A checkpoint directory whose config.json gives the version (weights not read).
    pub like: PathBuf,
    pub size: Size,
    pub mode: BenchMode,
    pub seq: usize,
    pub samples: usize,
    pub slices: usize,
    pub slice_px: usize,
    pub warmup: usize,
    pub steps: usize,
    pub device: String,
    pub dtype: ComputeDtype,
    pub grad_checkpointing: bool,
    pub seed: u64,
    /// The optimizer state in host memory, AdamW on the CPU (`train --offload-optimizer`).
    pub offload_optimizer: bool,
}

/// One configuration's measurements (a JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub version: String,
    pub mode: BenchMode,
    pub weights: String,
    pub seq: usize,
    pub samples: usize,
    pub slices: usize,
    pub slice_px: usize,
    pub steps: usize,
    pub grad_checkpointing: bool,
    pub offload_optimizer: bool,
    /// How the transformer layers ran: `blocks` (the block path), `fused` (candle's graph
    /// with cpmv's fused kernels) or `unfused` (`CPMV_UNFUSED=1`, candle op by op).
    pub path: &'static str,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub flops_per_step: f64,
    pub flops: StepFlops,
    pub mfu: f64,
    pub peak_mem_bytes: u64,
    pub trainable_params: usize,
    pub total_params: usize,
    pub loss_first: f64,
    pub loss_last: f64,
    pub device: String,
    pub build_s: f64,
    /// Seconds per step by phase (`CPMV_PROFILE=1`; empty otherwise).
    pub phases_s: BTreeMap<String, f64>,
    pub error: Option<String>,
}

fn config_for(opts: &BenchOptions) -> Result<ModelConfig, TrainError> {
    let path = opts.like.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::Io {
        path: path.clone(),
        source: e,
    })?;
    let template: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    Ok(derive_config(&template, opts.size, opts.dtype.dtype())?)
}

/// Seeded random weights made directly on the device (a real-size checkpoint would be 7–17 GB
/// to write and read; the values do not change the speed).
fn random_params(
    cfg: &ModelConfig,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let mut map = BTreeMap::new();
    if !device.is_cuda() {
        // The CPU generator cannot be seeded: the host initialiser (tiny sizes only in practice).
        for spec in param_specs(cfg) {
            let t = init_tensor(&spec, cfg, seed, dtype)?;
            map.insert(spec.name.clone(), t);
        }
        return Ok(map);
    }
    device.set_seed(seed)?;
    for spec in param_specs(cfg) {
        let t = match spec.init {
            InitKind::Normal(std) => {
                Tensor::randn(0f32, std as f32, spec.shape.clone(), device)?.to_dtype(dtype)?
            }
            InitKind::Ones => Tensor::ones(spec.shape.clone(), dtype, device)?,
            InitKind::Zeros => Tensor::zeros(spec.shape.clone(), dtype, device)?,
            _ => init_tensor(&spec, cfg, seed, dtype)?.to_device(device)?,
        };
        map.insert(spec.name.clone(), t);
    }
    Ok(map)
}

/// Runs one configuration: builds the model on the device, `warmup` untimed steps, then
/// `steps` timed ones (forward, backward, global norm, AdamW).
pub fn run(opts: &BenchOptions) -> Result<BenchResult, TrainError> {
    let built = Instant::now();
    let cfg = config_for(opts)?;
    let device = open_device(&opts.device)?;
    let dtype = opts.dtype.dtype();
    let (trainable, lora) = match opts.mode {
        BenchMode::Full => (Trainable::ALL, None),
        BenchMode::Lora | BenchMode::LoraEmbed => (
            Trainable {
                vision: true,
                resampler: true,
                llm: false,
                embeddings: opts.mode == BenchMode::LoraEmbed,
            },
            Some(LoraConfig {
                r: 64,
                alpha: 64.0,
                dropout: 0.05,
                target: r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)".into(),
            }),
        ),
    };
    let load = LoadOptions {
        dtype,
        device: device.clone(),
        trainable,
        lora: lora.clone(),
        seed: opts.seed,
        fixes: Default::default(),
        ..Default::default()
    };
    let tensors = random_params(&cfg, &device, dtype, opts.seed)?;
    let total_params: usize = tensors.values().map(Tensor::elem_count).sum();
    let params = ParamStore::from_tensors(tensors, &load)?;
    let model = MiniCpmV::from_params(cfg.clone(), params, &load)?;
    let path = if model.vision_on_blocks() {
        "blocks"
    } else if cpmv_model::block::unfused_env() {
        "unfused"
    } else {
        "fused"
    };
    let vars = model.params().trainable_vars();
    let trainable_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    // The trainer's optimizer (AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
    // everything), one rank.
    let train_cfg = crate::config::TrainConfig {
        offload_optimizer: opts.offload_optimizer,
        ..Default::default()
    };
    let mut opt = Optimizer::new(&train_cfg, &vars, 0, 1, |_| true)?;
    let ex = Exchange {
        comm: None,
        bucket: (train_cfg.bucket_mb << 20) / 4,
    };
    let batch = cpmv_model::synthetic::bench_batch(
        &cfg,
        opts.seq,
        opts.samples,
        opts.slices,
        opts.slice_px,
        opts.seed,
    )
    .map_err(TrainError::Config)?;
    let flops = step_flops(&cfg, &batch, &trainable, lora.as_ref());
    device.synchronize()?;
    let build_s = built.elapsed().as_secs_f64();

    let mut losses = Vec::new();
    let mut step = || -> Result<f64, TrainError> {
        let mut acc = Accum::default();
        let loss = micro_step(
            &model,
            &batch,
            1.0,
            opts.grad_checkpointing,
            &vars,
            &mut acc,
        )?;
        let mut timer = crate::trainer::profile::Timer::start(&device);
        let grads = opt.reduce(GradAccum::Full(acc), &vars, ex)?;
        let norm = opt.grad_norm(&grads, &vars, ex)?;
        timer.mark("grad_norm");
        if !(loss.is_finite() && norm.is_finite()) {
            return Err(TrainError::Config(format!(
                "bench: non-finite loss {loss} or gradient norm {norm}"
            )));
        }
        opt.step(
            grads,
            &vars,
            1e-5,
            cpmv_optim::clip::clip_factor(norm, 1.0),
            ex,
        )?;
        timer.mark("adamw");
        Ok(loss)
    };
    for _ in 0..opts.warmup {
        losses.push(step()?);
    }
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        // The peak of the timed steps (steady state), not of the build.
        let _ = cpmv_kernels::reset_peak_memory(&device);
    }
    let _ = crate::trainer::profile::take();
    let t0 = Instant::now();
    for _ in 0..opts.steps {
        losses.push(step()?);
    }
    device.synchronize()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let step_s = elapsed / opts.steps.max(1) as f64;
    let phases_s: BTreeMap<String, f64> = crate::trainer::profile::take()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v / opts.steps.max(1) as f64))
        .collect();
    let total = flops.total();
    Ok(BenchResult {
        implementation: "cpmv",
        version: cfg.version.as_str().to_string(),
        mode: opts.mode,
        weights: match opts.dtype {
            ComputeDtype::Bf16 => "bf16".into(),
            ComputeDtype::F32 => "f32".into(),
        },
        seq: opts.seq,
        samples: opts.samples,
        slices: opts.slices,
        slice_px: opts.slice_px,
        steps: opts.steps,
        grad_checkpointing: opts.grad_checkpointing,
        offload_optimizer: opts.offload_optimizer,
        path,
        step_s,
        tokens_per_s: opts.seq as f64 / step_s,
        flops_per_step: total,
        flops,
        mfu: total / step_s / (PEAK_TFLOPS * 1e12),
        peak_mem_bytes: peak_memory_bytes(&device),
        trainable_params,
        total_params,
        loss_first: losses.first().copied().unwrap_or(f64::NAN),
        loss_last: losses.last().copied().unwrap_or(f64::NAN),
        device: format!("{:?}", device.location()),
        build_s,
        phases_s,
        error: None,
    })
}
