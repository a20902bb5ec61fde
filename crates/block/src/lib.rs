//! Transformer layers as single ops with a hand-written forward and backward.
//!
//! candle's autograd builds a graph of ~100 small ops per layer and materialises every
//! intermediate and its gradient; on a GPU that costs more than the matrix products. Here a
//! layer's algebra is written out once — norms, projections with their LoRA adapters, attention
//! from the fused projection by strides, the MLP, residuals — in terms of a few primitives
//! ([`Backend`]): a strided GEMM with α/β (weight gradients accumulate with β = 1), bias +
//! activation, LayerNorm / RMSNorm forward/backward, rotary embedding, SiLU gating, attention
//! forward/backward with per-query key ranges and f32 softmax statistics. [`Cpu`] is the reference backend: tests hold every layer
//! against candle's autograd path, so the same algebra over a device backend is checked by the
//! same tests.
//!
//! Layers: [`vision::VisionLayer`] (SigLIP ViT of 2.0 with a fused qkv projection, NaViT of
//! 2.5 / 2.6 with separate q/k/v) and [`llm::LlmLayer`] (the decoders of all three versions:
//! RMSNorm, rotary grouped-query attention over packed rows, SiLU-gated MLP, Qwen2's q/k/v
//! biases, MiniCPM's residual scale). [`linear`] holds the projections with LoRA both share;
//! [`attention`] the matrix-product formulation of attention a device backend runs.

pub mod attention;
pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod linear;
pub mod llm;
pub mod vision;

pub use backend::{host_mask, Attn, Backend, Batch, Gelu, MaskDraws, Mat};
pub use cpu::Cpu;
#[cfg(feature = "cuda")]
pub use cuda::{Cuda, Elem};
pub use error::{BlockError, Result};
