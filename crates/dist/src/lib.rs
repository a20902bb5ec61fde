//! Plumbing for training on several processes (GPUs, nodes): where this process sits in the run,
//! as its launcher (torchrun, Slurm, Open MPI) describes it, and the collective operations
//! data-parallel training is made of, with an in-process backend whose ranks are threads.

pub mod collective;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

pub use collective::{
    all_gather_buckets, all_reduce_buckets, reduce_scatter_buckets, Collective, InProcess,
};
pub use launch::{world_from_env, Launcher, World};
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use tcp::Tcp;

/// A launcher environment that does not describe a usable world, or a collective that cannot
/// complete.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("launcher environment: {0}")]
    Env(String),
    #[error("collective: {0}")]
    Group(String),
}
