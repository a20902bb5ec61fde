//! The GPU checks, in one test binary so that one file travels to the GPU machine
//! (benches/gpu/run.sh): the fused kernels against their CPU references (`ops`), the fused
//! AdamW step against the CPU optimiser (`adamw`), and the PyTorch parity fixtures run on the
//! GPU (`parity`, f32 and bf16, with `CPMV_TEST_DEVICE=cuda`), and the block path's layers on
//! the CUDA backend against candle's autograd path on the GPU (`blocks`, with
//! `CPMV_TEST_DEVICE=cuda CPMV_CUDA_BLOCKS=1`), in f32 and in bf16 (`blocks_bf16`).
//!
//! `cargo test -p cpmv-model --features cuda --test gpu` on a machine with a GPU; without the
//! `cuda` feature the binary is empty.
#![cfg(feature = "cuda")]

mod adamw;
#[path = "../block_path.rs"]
mod blocks;
mod blocks_bf16;
mod ops;
#[path = "../pytorch_parity.rs"]
mod parity;
