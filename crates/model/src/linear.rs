//! Linear layers that know whether their weight trains, with optional LoRA adapters.

use candle_core::{DType, Device, Tensor, Var};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

use crate::config::Gelu;
use crate::ops::{activation, add_row_param, bias_act, frozen_linear, on_rows};

/// The reference's default target: only the LLM's attention q/k/v projections.
pub const DEFAULT_LORA_TARGET: &str = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)";

/// LoRA settings (spec §8.3; defaults of the official script).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Regex matched against the full module name (PEFT full-match semantics).
    pub target: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 64,
            alpha: 64.0,
            dropout: 0.05,
            target: DEFAULT_LORA_TARGET.into(),
        }
    }
}

impl LoraConfig {
    /// The target as an anchored regex (PEFT uses `re.fullmatch`).
    pub fn regex(&self) -> Result<Regex, regex::Error> {
        Regex::new(&format!("^(?:{})$", self.target))
    }
}

/// A small, seedable generator (SplitMix64): LoRA initialisation and dropout masks must be
/// reproducible across runs and resumes, which candle's CPU RNG is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Whether a forward pass trains (dropout on) and the dropout generator.
pub struct Mode<'a> {
    pub train: bool,
    pub rng: &'a Mutex<Rng>,
}

/// The low-rank update `(α/r)·B(A(dropout(x)))` of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// PEFT initialisation: A Kaiming-uniform (a = √5, i.e. U(±1/√in)), B zeros.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_dim)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (cfg.r, in_dim), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_dim, cfg.r), dtype, device)?;
        Ok(LoraAdapter {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: cfg.alpha / cfg.r as f64,
            dropout: cfg.dropout,
        })
    }

    fn forward(&self, x: &Tensor, mode: &Mode) -> candle_core::Result<Tensor> {
        let x = if mode.train && self.dropout > 0.0 && crate::ops::fused(x) {
            // On the GPU: one draw of the model's generator seeds a mask made on the device
            // (a host-made mask is as large as the activations and costs seconds per step).
            let seed = mode
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_u64();
            let mask = crate::ops::dropout_mask(x, seed, 1.0 - self.dropout)?;
            (x * mask)?
        } else if mode.train && self.dropout > 0.0 {
            let n = x.elem_count();
            let keep = 1.0 - self.dropout;
            let mask: Vec<f32> = {
                let mut rng = mode.rng.lock().unwrap_or_else(|p| p.into_inner());
                (0..n)
                    .map(|_| {
                        if rng.uniform() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect()
            };
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
            (x * mask)?
        } else {
            x.clone()
        };
        let h = matmul_t(&x, self.a.as_tensor())?;
        let y = matmul_t(&h, self.b.as_tensor())?;
        y * self.scale
    }
}

/// `y = x Wᵀ (+ b) (+ LoRA)`. A frozen weight gets no gradient computed (see
/// [`frozen_linear`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub weight_trainable: bool,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, mode: &Mode) -> candle_core::Result<Tensor> {
        self.forward_act(x, mode, None)
    }

    /// `gelu(x Wᵀ + b (+ LoRA))`, or without the activation for `None`. On CUDA the bias add
    /// and the activation are one fused op after the LoRA term (see [`bias_act`]); elsewhere
    /// the reference order: bias, LoRA, activation.
    pub fn forward_act(
        &self,
        x: &Tensor,
        mode: &Mode,
        gelu: Option<Gelu>,
    ) -> candle_core::Result<Tensor> {
        let y = if self.weight_trainable {
            matmul_t(x, &self.weight)?
        } else {
            frozen_linear(x, &self.weight)?
        };
        if let (Some(b), true) = (&self.bias, crate::ops::fused(&y)) {
            let y = match &self.lora {
                Some(l) => (y + l.forward(x, mode)?)?,
                None => y,
            };
            return bias_act(&y, b, gelu);
        }
        let y = match &self.bias {
            Some(b) => add_row_param(&y, b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => (y + l.forward(x, mode)?)?,
            None => y,
        };
        activation(y, gelu)
    }
}

/// `x Wᵀ` for `x` `[.., K]` and a trainable `W` `[N, K]`, as one 2-D matrix product over all
/// leading positions (see [`on_rows`]).
fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    on_rows(x, |x2| x2.matmul(&w.t()?))
}

/// `x @ P` for a matrix applied by right-multiplication (the resampler's `proj`).
pub fn right_matmul(x: &Tensor, p: &Tensor, trainable: bool) -> candle_core::Result<Tensor> {
    if trainable {
        on_rows(x, |x2| x2.matmul(p))
    } else {
        frozen_linear(x, &p.t()?)
    }
}
