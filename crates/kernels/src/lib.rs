//! Fused CUDA kernels for training MiniCPM-V with candle on NVIDIA GPUs.
//!
//! candle runs RMSNorm, SiLU·mul, rotary embeddings, a masked softmax or a cross-entropy as chains
//! of separate element-wise kernels, each a full pass over device memory, and several of its own
//! fused versions have no backward pass. Each op here is one kernel forward and one backward
//! (statistics in f32 for bf16 storage), exposed as candle custom ops so autograd sees them:
//! the norms, SiLU·mul, RoPE, the (block-causal) masked softmax, cross-entropy, bias + GELU with
//! the bias gradient as row-coalesced column sums, dropout masks, and the optimiser's pieces
//! (a multi-tensor AdamW over all parameters of a dtype in one launch, sums of squares).
//!
//! Every op is CUDA-only: the CPU reference is the op-by-op composition in `cpmv-model`'s `ops`
//! module, which dispatches here for CUDA tensors; `crates/model/tests/gpu/ops.rs` checks the two
//! against each other (values and gradients) on a GPU (`benches/gpu/run.sh check`). Without the
//! `cuda` feature this crate is empty.

#[cfg(feature = "cuda")]
mod fused;

#[cfg(feature = "cuda")]
pub use fused::*;
