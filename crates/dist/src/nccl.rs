//! NCCL collectives between GPU ranks (feature `nccl`): the engine of multi-GPU training in this
//! field, over NVLink, PCIe, InfiniBand or sockets, whichever NCCL finds.
//!
//! The NCCL id is never passed around: with `NCCL_COMM_ID=host:port` set (by default the
//! launcher's `MASTER_ADDR` and `MASTER_PORT + 1`), every rank's `ncclGetUniqueId` gives the
//! same id and rank 0's init listens there. Beside NCCL runs a [`Tcp`] control group (on
//! `MASTER_PORT + 2`): before every collective the ranks agree on the operation over it, so a
//! rank that has gone away, or calls another collective, is named before NCCL would wait on it
//! forever; and a collective that does not finish within the timeout (or that NCCL reports
//! failed) aborts the communicator and asks the control group who is missing.
//!
//! Buffers are host slices, as [`Collective`] has them: each call copies its input to the GPU,
//! runs the NCCL operation on the device's stream and copies the result back.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};

use crate::collective::{check_len, check_root, scatter_chunk, Collective, Op};
use crate::{DistError, Tcp};

/// One rank of an NCCL group (not `Send`: it stays on the thread that drives its GPU).
pub struct Nccl {
    control: Tcp,
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    timeout: Duration,
    /// Set once the communicator is aborted: it must not be used or destroyed again.
    aborted: Cell<bool>,
}

fn err(msg: String) -> DistError {
    DistError::Group(msg)
}

fn nccl_err(what: &str, e: &result::NcclError) -> DistError {
    err(format!("NCCL {what}: {:?}", e.0))
}

/// The GPU a rank with `local_rank` drives: that ordinal when the node's ranks share the
/// visible devices (torchrun), or the only visible one when the launcher gave each rank its own
/// (Slurm's `--gpus-per-task`, `CUDA_VISIBLE_DEVICES` per rank).
pub fn device_ordinal(local_rank: usize) -> Result<usize, DistError> {
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| err(format!("counting CUDA devices: {e:?}")))?;
    let count = usize::try_from(count).unwrap_or(0);
    match count {
        0 => Err(err("no CUDA device is visible".into())),
        1 => Ok(0),
        n if local_rank < n => Ok(local_rank),
        n => Err(err(format!(
            "LOCAL_RANK {local_rank} but only {n} CUDA devices are visible"
        ))),
    }
}

impl Nccl {
    /// Joins the NCCL group of `control`'s ranks on GPU `ordinal`, bootstrapping at `comm_id`
    /// (`host:port`). Call it before the process starts other threads: it sets `NCCL_COMM_ID`
    /// in the environment, where NCCL reads it.
    pub fn connect(
        ordinal: usize,
        control: Tcp,
        comm_id: &str,
        timeout: Duration,
    ) -> Result<Nccl, DistError> {
        std::env::set_var("NCCL_COMM_ID", comm_id);
        let cuda = |e: cudarc::driver::DriverError| err(format!("CUDA device {ordinal}: {e:?}"));
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(cuda)?;
        ctx.bind_to_thread().map_err(cuda)?;
        // A stream of its own: buffers are staged through the host, so the model's stream has
        // finished with them before a collective starts.
        let stream = ctx.new_stream().map_err(cuda)?;
        let id = result::get_uniqueid().map_err(|e| nccl_err("get unique id", &e))?;
        let (rank, world) = (control.rank(), control.world_size());
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful init and read only then.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                .map_err(|e| nccl_err(&format!("init rank {rank} of {world} at {comm_id}"), &e))?;
            comm.assume_init()
        };
        let me = Nccl {
            control,
            comm,
            stream,
            timeout,
            aborted: Cell::new(false),
        };
        me.control.barrier()?;
        Ok(me)
    }

    /// Runs one collective: the ranks agree on `op` over the control group, `input` goes to the
    /// GPU, `launch(send, recv, stream)` enqueues the NCCL call, and the `out_len` results come
    /// back once it finished (or the group is aborted).
    fn run(
        &self,
        op: Op,
        input: &[f32],
        out_len: usize,
        launch: impl FnOnce(
            *const std::ffi::c_void,
            *mut std::ffi::c_void,
            sys::cudaStream_t,
        ) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<Vec<f32>, DistError> {
        if self.aborted.get() {
            return Err(err("the NCCL group was aborted".into()));
        }
        self.control.agree(op)?;
        let cuda = |e: cudarc::driver::DriverError| err(format!("CUDA: {e:?}"));
        // NCCL wants a valid pointer even for empty buffers.
        let src = self
            .stream
            .clone_htod(if input.is_empty() { &[0f32][..] } else { input })
            .map_err(cuda)?;
        let mut dst = self
            .stream
            .alloc_zeros::<f32>(out_len.max(1))
            .map_err(cuda)?;
        {
            let (s, _keep_src) = src.device_ptr(&self.stream);
            let (d, _keep_dst) = dst.device_ptr_mut(&self.stream);
            launch(s as _, d as _, self.stream.cu_stream() as _)
                .map_err(|e| nccl_err(&format!("{op:?}"), &e))?;
        }
        let done = self.stream.record_event(None).map_err(cuda)?;
        let started = Instant::now();
        while !done.is_complete() {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out pointer.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            let failed = state != sys::ncclResult_t::ncclSuccess;
            if failed || started.elapsed() > self.timeout {
                self.aborted.set(true);
                // SAFETY: aborting a live communicator; it is never used again.
                let _ = unsafe { result::comm_abort(self.comm) };
                let who = match self.control.barrier() {
                    Err(e) => e.to_string(),
                    Ok(()) => "every rank is still there".to_string(),
                };
                let why = if failed {
                    format!("NCCL reported {state:?}")
                } else {
                    format!(
                        "it did not finish within {} s (CPMV_DIST_TIMEOUT_S)",
                        self.timeout.as_secs()
                    )
                };
                return Err(err(format!("{op:?} failed: {why}; {who}")));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut out = vec![0f32; out_len.max(1)];
        self.stream.memcpy_dtoh(&dst, &mut out).map_err(cuda)?;
        out.truncate(out_len);
        Ok(out)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.aborted.get() {
            // SAFETY: a live communicator, destroyed once.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

const F32: sys::ncclDataType_t = sys::ncclDataType_t::ncclFloat32;
const SUM: sys::ncclRedOp_t = sys::ncclRedOp_t::ncclSum;

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let n = buf.len();
        let comm = self.comm;
        let out = self.run(Op::AllReduce(n), buf, n, |s, d, st| unsafe {
            // SAFETY: device buffers of n values on this stream.
            result::all_reduce(s, d, n, F32, SUM, comm, st)
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let chunk = scatter_chunk(self.world_size(), input.len(), out.len())?;
        let comm = self.comm;
        let got = self.run(
            Op::ReduceScatter(input.len()),
            input,
            chunk,
            |s, d, st| unsafe {
                // SAFETY: a send buffer of world × chunk values, a receive buffer of chunk.
                result::reduce_scatter(s, d, chunk, F32, SUM, comm, st)
            },
        )?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn all_gather(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let n = input.len();
        check_len("all_gather output", out.len(), n * self.world_size())?;
        let comm = self.comm;
        let got = self.run(Op::AllGather(n), input, out.len(), |s, d, st| unsafe {
            // SAFETY: a send buffer of n values, a receive buffer of world × n.
            result::all_gather(s, d, n, F32, comm, st)
        })?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, self.world_size())?;
        let n = buf.len();
        let comm = self.comm;
        let got = self.run(Op::Broadcast(n, root), buf, n, |s, d, st| unsafe {
            // SAFETY: send and receive buffers of n values.
            result::broadcast(s, d, n, F32, root as i32, comm, st)
        })?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.control.barrier()
    }
}
