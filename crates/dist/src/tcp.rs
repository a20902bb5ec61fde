//! Collectives between processes over TCP, for ranks on the CPU started by a launcher (torchrun,
//! srun, mpirun): a star through rank 0, which sums every round's contributions in rank order
//! and sends each rank its result. The results are bit-identical to [`crate::InProcess`]'s (the
//! same additions in the same order), so a multi-process run reproduces a `--nproc-per-node`
//! run exactly. Rank 0 carries all traffic: a backend for CPU ranks and tests, not for GPUs
//! (NCCL's job).
//!
//! Rendezvous: rank 0 listens on the address it is given, the others connect (retrying until
//! the timeout, as rank 0 may start later) and say who they are. A rank that goes away (exits,
//! crashes, is killed) closes its connection: rank 0 tells every other rank which one it was,
//! and each stops with that error instead of hanging. A rank that stays silent longer than the
//! timeout is reported the same way.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::collective::{check_len, check_root, scatter_chunk, Collective, Op};
use crate::DistError;

/// Greeting a rank sends after connecting: magic, rank, world size.
const MAGIC: &[u8; 4] = b"cpmv";

/// Frame kinds.
const DATA: u8 = 0;
const ABORT: u8 = 1;

/// One rank's end of a TCP group.
pub struct Tcp {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the connection of rank r at index r − 1. Others: the connection to rank 0.
    links: Vec<TcpStream>,
}

fn err(msg: String) -> DistError {
    DistError::Group(msg)
}

fn op_code(op: Op) -> (u8, u64, u64) {
    match op {
        Op::AllReduce(n) => (0, n as u64, 0),
        Op::ReduceScatter(n) => (1, n as u64, 0),
        Op::AllGather(n) => (2, n as u64, 0),
        Op::Broadcast(n, root) => (3, n as u64, root as u64),
        Op::Barrier => (4, 0, 0),
    }
}

/// Writes a frame: kind, op code, two operands, payload length (bytes), payload.
fn send(s: &TcpStream, kind: u8, op: (u8, u64, u64), payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 26];
    head[0] = kind;
    head[1] = op.0;
    head[2..10].copy_from_slice(&op.1.to_le_bytes());
    head[10..18].copy_from_slice(&op.2.to_le_bytes());
    head[18..26].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut w = s;
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

struct Frame {
    kind: u8,
    op: (u8, u64, u64),
    payload: Vec<u8>,
}

/// Longest message an abort frame carries.
const MAX_ABORT_BYTES: usize = 64 << 10;

/// Reads a frame whose payload may be at most `limit` bytes (an abort's message at most
/// [`MAX_ABORT_BYTES`]): a longer one is a peer of another version or a corrupt stream.
fn recv(s: &TcpStream, limit: usize) -> std::io::Result<Frame> {
    let mut head = [0u8; 26];
    let mut r = s;
    r.read_exact(&mut head)?;
    let word = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[a..a + 8]);
        u64::from_le_bytes(b)
    };
    let len = word(18);
    let limit = if head[0] == ABORT {
        MAX_ABORT_BYTES
    } else {
        limit
    };
    if len > limit as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes where at most {limit} were expected"),
        ));
    }
    let len = len as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame {
        kind: head[0],
        op: (head[1], word(2), word(10)),
        payload,
    })
}

fn to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// What an I/O failure on the link to `rank` means for the group.
fn gone(rank: usize, e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "rank {rank} did not answer within {} s (stuck, or much slower than the others; \
             CPMV_DIST_TIMEOUT_S sets the limit)",
            timeout.as_secs()
        ),
        _ => format!("rank {rank} went away (it failed or was killed): {e}"),
    }
}

impl Tcp {
    /// Joins the group of `world` ranks as `rank`, meeting at `addr` (`host:port`, where rank
    /// 0 listens). Waits up to `timeout` for the others, and afterwards for any one answer.
    pub fn connect(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
    ) -> Result<Tcp, DistError> {
        if rank >= world {
            return Err(err(format!("rank {rank} in a world of {world}")));
        }
        let deadline = Instant::now() + timeout;
        let links = if rank == 0 {
            Self::accept_all(world, addr, timeout, deadline)?
        } else {
            vec![Self::join(rank, world, addr, timeout, deadline)?]
        };
        for l in &links {
            l.set_read_timeout(Some(timeout))
                .and_then(|()| l.set_write_timeout(Some(timeout)))
                .and_then(|()| l.set_nodelay(true))
                .map_err(|e| err(format!("rendezvous at {addr}: {e}")))?;
        }
        let t = Tcp {
            rank,
            world,
            timeout,
            links,
        };
        // Nobody starts before everybody has joined.
        t.barrier()?;
        Ok(t)
    }

    fn accept_all(
        world: usize,
        addr: &str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Vec<TcpStream>, DistError> {
        // On every interface, as torchrun's store: MASTER_ADDR may name this host by an
        // address other nodes reach but that resolves to loopback here (127.0.1.1).
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .ok_or_else(|| err(format!("rendezvous address {addr}: no port")))?;
        let listener = TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| err(format!("rank 0 cannot listen on port {port} ({addr}): {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("{addr}: {e}")))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)
                        .and_then(|()| s.set_read_timeout(Some(Duration::from_secs(10))))
                        .map_err(|e| err(format!("{addr}: {e}")))?;
                    let mut hello = [0u8; 12];
                    if (&s).read_exact(&mut hello).is_err() || &hello[..4] != MAGIC {
                        // Not one of ours (a port scanner, another program): ignore it.
                        continue;
                    }
                    let r = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]) as usize;
                    let w = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
                    if w != world {
                        return Err(err(format!(
                            "rank {r} joined {addr} for a world of {w}, rank 0 for {world} \
                             (another run on the same port?)"
                        )));
                    }
                    if r == 0 || r >= world || slots[r - 1].is_some() {
                        return Err(err(format!(
                            "a second rank {r} joined {addr} (two runs on the same port, or a \
                             launcher giving the same RANK twice?)"
                        )));
                    }
                    slots[r - 1] = Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(err(format!(
                            "rank(s) {} did not join {addr} within {} s",
                            missing.join(", "),
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(format!("rank 0 accepting on {addr}: {e}"))),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }

    fn join(
        rank: usize,
        world: usize,
        addr: &str,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<TcpStream, DistError> {
        let target = addr
            .to_socket_addrs()
            .map_err(|e| err(format!("rendezvous address {addr}: {e}")))?
            .next()
            .ok_or_else(|| err(format!("rendezvous address {addr} resolves to nothing")))?;
        loop {
            match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                Ok(s) => {
                    let mut hello = Vec::with_capacity(12);
                    hello.extend_from_slice(MAGIC);
                    hello.extend_from_slice(&(rank as u32).to_le_bytes());
                    hello.extend_from_slice(&(world as u32).to_le_bytes());
                    (&s).write_all(&hello)
                        .map_err(|e| err(format!("rank {rank} greeting rank 0 at {addr}: {e}")))?;
                    return Ok(s);
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(err(format!(
                        "rank {rank} could not reach rank 0 at {addr} within {} s: {e}",
                        timeout.as_secs()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Checks that every rank is here and about to run `op` (the NCCL backend's liveness
    /// check before it hands a collective to NCCL).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn agree(&self, op: Op) -> Result<(), DistError> {
        self.round(op, &[], Sizes::NONE, |_, _| Vec::new())
            .map(|_| ())
    }

    /// Rank 0: tells every rank why the group stops, and returns that reason.
    fn abort(&self, why: String) -> DistError {
        for l in &self.links {
            let _ = send(l, ABORT, (0, 0, 0), why.as_bytes());
        }
        err(why)
    }

    /// One round: every rank's contribution goes to rank 0, which answers each rank with
    /// `answer(rank, contributions in rank order)`.
    fn round(
        &self,
        op: Op,
        data: &[f32],
        sizes: Sizes,
        answer: impl Fn(usize, &[Vec<f32>]) -> Vec<f32>,
    ) -> Result<Vec<f32>, DistError> {
        let code = op_code(op);
        if self.rank != 0 {
            let link = &self.links[0];
            send(link, DATA, code, &to_bytes(data)).map_err(|e| err(gone(0, &e, self.timeout)))?;
            let f = recv(link, sizes.answer * 4).map_err(|e| err(gone(0, &e, self.timeout)))?;
            return match f.kind {
                DATA if f.payload.len() == sizes.answer * 4 => Ok(from_bytes(&f.payload)),
                DATA => Err(err(format!(
                    "rank 0 answered {op:?} with {} bytes, {} expected",
                    f.payload.len(),
                    sizes.answer * 4
                ))),
                _ => Err(err(String::from_utf8_lossy(&f.payload).into_owned())),
            };
        }
        let mut all = Vec::with_capacity(self.world);
        all.push(data.to_vec());
        for (i, link) in self.links.iter().enumerate() {
            let r = i + 1;
            let want = sizes.contribution(r) * 4;
            let f = match recv(link, want) {
                Ok(f) => f,
                Err(e) => return Err(self.abort(gone(r, &e, self.timeout))),
            };
            if f.kind != DATA || f.op != code {
                return Err(self.abort(format!(
                    "rank {r} called another collective than rank 0 ({:?} vs {op:?}; every rank \
                     must call the same collectives in the same order)",
                    f.op
                )));
            }
            if f.payload.len() != want {
                return Err(self.abort(format!(
                    "rank {r} sent {} bytes for {op:?}, {want} expected",
                    f.payload.len()
                )));
            }
            all.push(from_bytes(&f.payload));
        }
        for (i, link) in self.links.iter().enumerate() {
            let out = answer(i + 1, &all);
            if let Err(e) = send(link, DATA, code, &to_bytes(&out)) {
                return Err(self.abort(gone(i + 1, &e, self.timeout)));
            }
        }
        Ok(answer(0, &all))
    }
}

/// Values each rank contributes to a round, and values each rank gets back.
#[derive(Clone, Copy)]
struct Sizes {
    /// Every rank contributes this many values...
    each: usize,
    /// ...except that in a broadcast only its root does.
    only_root: Option<usize>,
    answer: usize,
}

impl Sizes {
    /// Nothing in, nothing out (barriers, the NCCL backend's agreement rounds).
    const NONE: Sizes = Sizes {
        each: 0,
        only_root: None,
        answer: 0,
    };

    fn contribution(&self, rank: usize) -> usize {
        match self.only_root {
            Some(root) if rank != root => 0,
            _ => self.each,
        }
    }
}

/// The element-wise sum of `all[..][range]`, in rank order (as [`crate::InProcess`] adds).
fn sum_range(all: &[Vec<f32>], range: std::ops::Range<usize>) -> Vec<f32> {
    let mut out = all[0][range.clone()].to_vec();
    for c in &all[1..] {
        for (o, x) in out.iter_mut().zip(&c[range.clone()]) {
            *o += x;
        }
    }
    out
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), DistError> {
        let n = buf.len();
        let sizes = Sizes {
            each: n,
            only_root: None,
            answer: n,
        };
        let out = self.round(Op::AllReduce(n), buf, sizes, |_, all| sum_range(all, 0..n))?;
        check_len("all_reduce result", out.len(), n)?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        let chunk = scatter_chunk(self.world, input.len(), out.len())?;
        let sizes = Sizes {
            each: input.len(),
            only_root: None,
            answer: chunk,
        };
        let got = self.round(Op::ReduceScatter(input.len()), input, sizes, |r, all| {
            sum_range(all, r * chunk..(r + 1) * chunk)
        })?;
        check_len("reduce_scatter result", got.len(), chunk)?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn all_gather(&self, input: &[f32], out: &mut [f32]) -> Result<(), DistError> {
        check_len("all_gather output", out.len(), input.len() * self.world)?;
        let sizes = Sizes {
            each: input.len(),
            only_root: None,
            answer: out.len(),
        };
        let got = self.round(Op::AllGather(input.len()), input, sizes, |_, all| {
            all.concat()
        })?;
        check_len("all_gather result", got.len(), out.len())?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), DistError> {
        check_root(root, self.world)?;
        let mine: &[f32] = if self.rank == root { buf } else { &[] };
        let sizes = Sizes {
            each: buf.len(),
            only_root: Some(root),
            answer: buf.len(),
        };
        let got = self.round(Op::Broadcast(buf.len(), root), mine, sizes, |_, all| {
            all[root].clone()
        })?;
        check_len("broadcast result", got.len(), buf.len())?;
        buf.copy_from_slice(&got);
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.round(Op::Barrier, &[], Sizes::NONE, |_, _| Vec::new())
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcess;
    use std::sync::Arc;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((rank * 7919 + i * 104729) % 1000) as f32 * 1e-3 + (rank as f32) * 1e7)
            .collect()
    }

    /// Every operation of `c` on rank-dependent values.
    fn exercise(c: &dyn Collective) -> Vec<Vec<f32>> {
        let w = c.world_size();
        let mut a = values(c.rank(), 13);
        c.all_reduce_sum(&mut a).unwrap();
        let input = values(c.rank() + 3, 4 * w);
        let mut shard = vec![0.0; 4];
        c.reduce_scatter_sum(&input, &mut shard).unwrap();
        let mut full = vec![0.0; 4 * w];
        c.all_gather(&shard, &mut full).unwrap();
        let mut b = vec![c.rank() as f32; 3];
        c.broadcast(&mut b, w - 1).unwrap();
        c.barrier().unwrap();
        vec![a, shard, full, b]
    }

    #[test]
    fn tcp_ranks_compute_what_in_process_ranks_compute_bit_for_bit() {
        for w in [1, 2, 4] {
            let addr = free_addr();
            let tcp: Vec<_> = (0..w)
                .map(|r| {
                    let addr = addr.clone();
                    std::thread::spawn(move || {
                        let t = Tcp::connect(r, w, &addr, Duration::from_secs(20)).unwrap();
                        exercise(&t)
                    })
                })
                .collect();
            let tcp: Vec<_> = tcp.into_iter().map(|h| h.join().unwrap()).collect();
            let threads: Vec<_> = InProcess::group(w)
                .into_iter()
                .map(|c| {
                    std::thread::spawn(move || {
                        let out = exercise(&c);
                        c.finish();
                        out
                    })
                })
                .collect();
            let threads: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
            assert_eq!(tcp, threads, "world {w}");
        }
    }

    #[test]
    fn a_rank_that_goes_away_stops_the_others_with_its_name() {
        let addr = Arc::new(free_addr());
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let t = Tcp::connect(r, 3, &addr, Duration::from_secs(20)).unwrap();
                    let mut b = vec![1.0; 4];
                    t.all_reduce_sum(&mut b).unwrap();
                    if r == 2 {
                        drop(t); // closes its connection, as a dying process does
                        return String::from("gone");
                    }
                    let mut b = vec![1.0; 4];
                    t.all_reduce_sum(&mut b).unwrap_err().to_string()
                })
            })
            .collect();
        let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got[2], "gone");
        for e in &got[..2] {
            assert!(e.contains("rank 2 went away"), "{e}");
        }
    }

    /// A peer that sends a frame of the wrong size (another version, a corrupt stream) is an
    /// error naming it, not a panic or a huge allocation.
    #[test]
    fn a_malformed_contribution_is_refused() {
        let addr = free_addr();
        let a = addr.clone();
        let root = std::thread::spawn(move || {
            let t = Tcp::connect(0, 2, &a, Duration::from_secs(20)).unwrap();
            let mut b = vec![1.0; 4];
            t.all_reduce_sum(&mut b).unwrap_err().to_string()
        });
        // Rank 1 by hand: greeting, the start-up barrier, then 2 values for a sum of 4.
        let s = loop {
            match TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&2u32.to_le_bytes());
        (&s).write_all(&hello).unwrap();
        send(&s, DATA, op_code(Op::Barrier), &[]).unwrap();
        recv(&s, 0).unwrap();
        send(&s, DATA, op_code(Op::AllReduce(4)), &to_bytes(&[1.0, 2.0])).unwrap();
        let e = root.join().unwrap();
        assert!(
            e.contains("rank 1 sent 8 bytes") && e.contains("16 expected"),
            "{e}"
        );
        // ...and it is told why the group stopped.
        let f = recv(&s, 0).unwrap();
        assert_eq!(f.kind, ABORT);
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let addr = free_addr();
        let e = Tcp::connect(0, 3, &addr, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 1, 2 did not join"), "{e}");
    }
}
