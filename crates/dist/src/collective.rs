//! Collective operations over the ranks of a run, and a backend that runs the ranks as threads of
//! one process (`train --device cpu --nproc-per-node N`, and the tests that prove W ranks train
//! as one process would). Sums are taken in rank order, so a result never depends on which rank
//! arrived first: runs are reproducible bit for bit.
//!
//! Every rank calls the same operations, in the same order, with the same lengths; a rank that
//! calls another operation, or goes away (returns, panics), makes every other rank's pending and
//! later calls fail with an error naming it, instead of hanging.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::DistError;

/// The operations data-parallel training needs, on host `f32` buffers.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `buf` becomes the element-wise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// `input` (the same length on every rank, a multiple of the world size) is cut into
    /// `world_size` equal chunks; rank r's `out` becomes the sum over ranks of chunk r.
    fn reduce_scatter_sum(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError>;
    /// `out` becomes every rank's `input` (same length everywhere), in rank order.
    fn all_gather(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError>;
    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
}

/// What a round of the in-process group does, checked to be the same on every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduce(usize),
    ReduceScatter(usize),
    AllGather(usize),
    Broadcast(usize, usize),
    Barrier,
}

#[derive(Default)]
struct State {
    /// Rounds completed.
    round: u64,
    /// The operation of the round in progress, set by its first caller.
    op: Option<Op>,
    /// Contributions of the round in progress, by rank.
    slots: Vec<Option<Vec<f32>>>,
    /// All contributions of the last completed round, in rank order.
    last: Option<Arc<Vec<Vec<f32>>>>,
    /// Why the group can no longer be used.
    broken: Option<String>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

/// One rank of an in-process group (move it to the rank's thread).
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    /// Whether `finish` was called: dropping an unfinished rank breaks the group.
    finished: bool,
}

impl InProcess {
    /// A group of `world` ranks, rank i at index i.
    pub fn group(world: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
                finished: false,
            })
            .collect()
    }

    /// Leaves the group normally (after the last collective of the run). A rank that calls a
    /// collective afterwards gets an error (it would wait forever).
    pub fn finish(mut self) {
        self.finished = true;
        let rank = self.rank;
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(format!("rank {rank} has finished its collectives"));
        }
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a rank panicked holding it; the state stays consistent
        // (every update is a single assignment) and `broken` tells the others.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds this rank's contribution to the round and returns every rank's, in rank order.
    fn exchange(&self, op: Op, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>, DistError> {
        let mut st = self.lock();
        if let Some(why) = &st.broken {
            return Err(DistError::Group(why.clone()));
        }
        match st.op {
            None => st.op = Some(op),
            Some(o) if o == op => {}
            Some(o) => {
                let why = format!(
                    "rank {} called {op:?} while another rank called {o:?} (every rank must call \
                     the same collectives in the same order)",
                    self.rank
                );
                st.broken = Some(why.clone());
                self.shared.changed.notify_all();
                return Err(DistError::Group(why));
            }
        }
        st.slots[self.rank] = Some(data);
        let round = st.round;
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<Vec<f32>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            st.last = Some(Arc::new(all));
            st.op = None;
            st.round += 1;
            self.shared.changed.notify_all();
        } else {
            while st.round == round && st.broken.is_none() {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if st.round == round {
                let why = st.broken.clone().unwrap_or_default();
                return Err(DistError::Group(why));
            }
        }
        Ok(st.last.clone().unwrap_or_default())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let why = if std::thread::panicking() {
            format!("rank {} failed (panicked)", self.rank)
        } else {
            format!("rank {} left the group before the run ended", self.rank)
        };
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(why);
        }
        self.shared.changed.notify_all();
    }
}

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<(), DistError> {
    if got == want {
        Ok(())
    } else {
        Err(DistError::Group(format!(
            "{what}: buffer of {got} values, expected {want}"
        )))
    }
}

/// The chunk a reduce-scatter of `input` values over `world` ranks gives each rank, checked
/// against the output's length.
pub(crate) fn scatter_chunk(world: usize, input: usize, out: usize) -> Result<usize, DistError> {
    if !input.is_multiple_of(world) {
        return Err(DistError::Group(format!(
            "reduce_scatter: {input} values do not split into {world} equal chunks"
        )));
    }
    check_len("reduce_scatter output", out, input / world)?;
    Ok(input / world)
}

/// Checks that `root` is a rank of a group of `world`.
pub(crate) fn check_root(root: usize, world: usize) -> Result<(), DistError> {
    if root < world {
        Ok(())
    } else {
        Err(DistError::Group(format!(
            "broadcast from rank {root} in a group of {world}"
        )))
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let all = self.exchange(Op::AllReduce(buf.len()), buf.to_vec())?;
        buf.copy_from_slice(&all[0]);
        for c in &all[1..] {
            for (b, x) in buf.iter_mut().zip(c) {
                *b += x;
            }
        }
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let chunk = scatter_chunk(self.shared.world, input.len(), out.len())?;
        let all = self.exchange(Op::ReduceScatter(input.len()), input.to_vec())?;
        let range = self.rank * chunk..(self.rank + 1) * chunk;
        out.copy_from_slice(&all[0][range.clone()]);
        for c in &all[1..] {
            for (o, x) in out.iter_mut().zip(&c[range.clone()]) {
                *o += x;
            }
        }
        Ok(())
    }

    fn all_gather(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        check_len(
            "all_gather output",
            out.len(),
            input.len() * self.shared.world,
        )?;
        let all = self.exchange(Op::AllGather(input.len()), input.to_vec())?;
        for (dst, c) in out.chunks_mut(input.len().max(1)).zip(all.iter()) {
            dst.copy_from_slice(c);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, self.shared.world)?;
        let mine = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let all = self.exchange(Op::Broadcast(buf.len(), root), mine)?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.exchange(Op::Barrier, Vec::new()).map(|_| ())
    }
}

/// [`Collective::all_reduce_sum`] of `buf` in calls of at most `bucket` values, so no staging
/// copy of the whole buffer is needed at once.
pub fn all_reduce_buckets(
    c: &dyn Collective,
    buf: &mut [f32],
    bucket: usize,
) -> Result<(), DistError> {
    for piece in buf.chunks_mut(bucket.max(1)) {
        c.all_reduce_sum(piece)?;
    }
    Ok(())
}

/// [`Collective::reduce_scatter_sum`] of a flat space of `world × out.len()` values in calls
/// covering at most `bucket` values of each rank's chunk: rank r's `out` becomes the sum over
/// ranks of `input[r·n .. (r+1)·n]`.
pub fn reduce_scatter_buckets(
    c: &dyn Collective,
    input: &[f32],
    out: &mut [f32],
    bucket: usize,
) -> Result<(), DistError> {
    let (w, n) = (c.world_size(), out.len());
    check_len("reduce_scatter input", input.len(), w * n)?;
    let mut staging = Vec::new();
    let mut at = 0;
    while at < n {
        let len = bucket.max(1).min(n - at);
        staging.clear();
        for r in 0..w {
            staging.extend_from_slice(&input[r * n + at..r * n + at + len]);
        }
        c.reduce_scatter_sum(&staging, &mut out[at..at + len])?;
        at += len;
    }
    Ok(())
}

/// [`Collective::all_gather`] of every rank's `input` into `out` (`world × input.len()`
/// values, rank order) in calls of at most `bucket` values per rank.
pub fn all_gather_buckets(
    c: &dyn Collective,
    input: &[f32],
    out: &mut [f32],
    bucket: usize,
) -> Result<(), DistError> {
    let (w, n) = (c.world_size(), input.len());
    check_len("all_gather output", out.len(), w * n)?;
    let mut staging = Vec::new();
    let mut at = 0;
    while at < n {
        let len = bucket.max(1).min(n - at);
        staging.resize(w * len, 0.0);
        c.all_gather(&input[at..at + len], &mut staging)?;
        for r in 0..w {
            out[r * n + at..r * n + at + len].copy_from_slice(&staging[r * len..(r + 1) * len]);
        }
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a group of `w` threads; returns the results by rank.
    fn on_ranks<T: Send + 'static>(
        w: usize,
        f: impl Fn(&InProcess) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = InProcess::group(w)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let out = f(&c);
                    c.finish();
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Values whose float sum depends on the order of addition.
    fn values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((rank * 7919 + i * 104729) % 1000) as f32 * 1e-3 + (rank as f32) * 1e7)
            .collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        for w in 1..=4 {
            let n = 37;
            let got = on_ranks(w, move |c| {
                let mut b = values(c.rank(), n);
                c.all_reduce_sum(&mut b).unwrap();
                // several rounds in a row
                let mut b2 = vec![c.rank() as f32; 3];
                c.all_reduce_sum(&mut b2).unwrap();
                (b, b2)
            });
            let mut want = values(0, n);
            for r in 1..w {
                for (a, x) in want.iter_mut().zip(values(r, n)) {
                    *a += x;
                }
            }
            let s = (0..w).map(|r| r as f32).sum::<f32>();
            for (b, b2) in &got {
                assert_eq!(b, &want, "w={w}");
                assert_eq!(b2, &vec![s; 3]);
            }
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_all_reduce() {
        let w = 3;
        let got = on_ranks(w, move |c| {
            let input = values(c.rank(), 12);
            let mut shard = vec![0.0; 4];
            c.reduce_scatter_sum(&input, &mut shard).unwrap();
            let mut full = vec![0.0; 12];
            c.all_gather(&shard, &mut full).unwrap();
            let mut reduced = input.clone();
            c.all_reduce_sum(&mut reduced).unwrap();
            (full, reduced)
        });
        for (full, reduced) in got {
            assert_eq!(full, reduced);
        }
    }

    #[test]
    fn bucketed_calls_give_the_unbucketed_result() {
        for w in [1, 2, 3] {
            for bucket in [1, 3, 4, 100] {
                let got = on_ranks(w, move |c| {
                    let n = 7;
                    let input = values(c.rank(), w * n);
                    let (mut shard, mut shard1) = (vec![0.0; n], vec![0.0; n]);
                    reduce_scatter_buckets(c, &input, &mut shard, bucket).unwrap();
                    c.reduce_scatter_sum(&input, &mut shard1).unwrap();
                    let (mut full, mut full1) = (vec![0.0; w * n], vec![0.0; w * n]);
                    all_gather_buckets(c, &shard, &mut full, bucket).unwrap();
                    c.all_gather(&shard1, &mut full1).unwrap();
                    let mut reduced = input.clone();
                    all_reduce_buckets(c, &mut reduced, bucket).unwrap();
                    (shard == shard1, full == full1, full == reduced)
                });
                assert!(
                    got.iter().all(|&g| g == (true, true, true)),
                    "{w} {bucket} {got:?}"
                );
            }
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        let got = on_ranks(4, |c| {
            let mut b = vec![c.rank() as f32; 5];
            c.broadcast(&mut b, 2).unwrap();
            c.barrier().unwrap();
            b
        });
        assert!(got.iter().all(|b| b == &vec![2.0; 5]));
    }

    #[test]
    fn a_rank_that_fails_stops_the_others_with_its_name() {
        let got = on_ranks(3, |c| {
            if c.rank() == 1 {
                // Leaves without finishing, as a failing rank's thread would.
                let me = InProcess {
                    rank: c.rank,
                    shared: c.shared.clone(),
                    finished: false,
                };
                drop(me);
                return String::from("left");
            }
            let mut b = vec![1.0; 2];
            match c.all_reduce_sum(&mut b) {
                Ok(()) => "no error".to_string(),
                Err(e) => e.to_string(),
            }
        });
        assert_eq!(got[1], "left");
        for r in [0, 2] {
            assert!(got[r].contains("rank 1 left"), "{}", got[r]);
        }
    }

    #[test]
    fn mismatched_calls_are_an_error_not_a_hang() {
        let got = on_ranks(2, |c| {
            let mut b = vec![1.0; 2 + c.rank()];
            c.all_reduce_sum(&mut b).err().map(|e| e.to_string())
        });
        assert!(
            got.iter().flatten().any(|e| e.contains("same collectives")),
            "{got:?}"
        );
        assert!(got.iter().all(Option::is_some), "{got:?}");
    }
}
