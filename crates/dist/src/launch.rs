//! The process's place in a multi-process run, from the environment its launcher set: torchrun
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), Slurm's
//! `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST`/`SLURM_NODELIST`),
//! Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`). Read once at start-up; every inconsistency is an
//! error naming the variables, never a guess.

use crate::DistError;

/// Which launcher described the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun / torch.distributed.run (or any launcher setting its variables).
    Torchrun,
    /// Slurm `srun`.
    Slurm,
    /// Open MPI `mpirun`.
    OpenMpi,
}

/// This process's rank and the size of the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub launcher: Launcher,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: the GPU this process drives.
    pub local_rank: usize,
    /// Processes on this node, when the launcher says.
    pub local_world_size: Option<usize>,
    /// Host of rank 0 (the rendezvous address), when known.
    pub master_addr: Option<String>,
    /// torchrun's store port (the NCCL bootstrap must not take it).
    pub master_port: Option<u16>,
}

impl World {
    /// Rank 0 prints progress and writes logs and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Where NCCL's own bootstrap listens (`NCCL_COMM_ID` form `host:port`): `NCCL_COMM_ID`
    /// when set, else the master address on `MASTER_PORT + 1` (torchrun's TCP store holds
    /// `MASTER_PORT` itself).
    pub fn nccl_comm_id(&self, env: impl Fn(&str) -> Option<String>) -> Result<String, DistError> {
        if let Some(id) = env("NCCL_COMM_ID").filter(|s| !s.trim().is_empty()) {
            return Ok(id);
        }
        self.master_plus(1, "the NCCL rendezvous (or set NCCL_COMM_ID)")
    }

    /// Where the ranks' TCP control group meets (`host:port`): the master address on
    /// `MASTER_PORT + 2` (torchrun's store holds `MASTER_PORT`, NCCL's bootstrap `+ 1`).
    pub fn control_addr(&self) -> Result<String, DistError> {
        self.master_plus(2, "the ranks' rendezvous")
    }

    /// `MASTER_ADDR:(MASTER_PORT + offset)`, for `what`.
    fn master_plus(&self, offset: u16, what: &str) -> Result<String, DistError> {
        let addr = self
            .master_addr
            .clone()
            .ok_or_else(|| DistError::Env(format!("no MASTER_ADDR for {what}")))?;
        let port = self
            .master_port
            .ok_or_else(|| DistError::Env(format!("no MASTER_PORT for {what}")))?;
        let port = port.checked_add(offset).ok_or_else(|| {
            DistError::Env(format!(
                "MASTER_PORT {port}: {what} uses MASTER_PORT + {offset}"
            ))
        })?;
        Ok(format!("{addr}:{port}"))
    }
}

fn parse_usize(
    env: &impl Fn(&str) -> Option<String>,
    var: &str,
) -> Result<Option<usize>, DistError> {
    match env(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| DistError::Env(format!("{var}={v:?} is not a non-negative integer"))),
    }
}

fn required(
    env: &impl Fn(&str) -> Option<String>,
    var: &str,
    launcher: &str,
) -> Result<usize, DistError> {
    parse_usize(env, var)?
        .ok_or_else(|| DistError::Env(format!("{launcher} environment without {var}")))
}

/// The world the environment describes, or `None` when no launcher variable is set (a plain
/// single-process run). torchrun's variables win over Slurm's and Open MPI's (torchrun inside an
/// `srun` allocation sets both).
pub fn world_from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<World>, DistError> {
    let master_port = match env("MASTER_PORT") {
        None => None,
        Some(p) => Some(
            p.trim()
                .parse::<u16>()
                .map_err(|_| DistError::Env(format!("MASTER_PORT={p:?} is not a port number")))?,
        ),
    };
    let master_addr = env("MASTER_ADDR").filter(|s| !s.trim().is_empty());
    let world = if env("RANK").is_some() || env("WORLD_SIZE").is_some() {
        let t = "torchrun";
        World {
            launcher: Launcher::Torchrun,
            rank: required(&env, "RANK", t)?,
            world_size: required(&env, "WORLD_SIZE", t)?,
            local_rank: required(&env, "LOCAL_RANK", t)?,
            local_world_size: parse_usize(&env, "LOCAL_WORLD_SIZE")?,
            master_addr,
            master_port,
        }
    } else if env("SLURM_PROCID").is_some() {
        let s = "Slurm";
        let nodelist = env("SLURM_STEP_NODELIST").or_else(|| env("SLURM_NODELIST"));
        let first_host = match &nodelist {
            Some(list) => Some(first_host(list).ok_or_else(|| {
                DistError::Env(format!(
                    "SLURM_NODELIST={list:?}: cannot read its first host"
                ))
            })?),
            None => None,
        };
        World {
            launcher: Launcher::Slurm,
            rank: required(&env, "SLURM_PROCID", s)?,
            world_size: required(&env, "SLURM_NTASKS", s)?,
            local_rank: required(&env, "SLURM_LOCALID", s)?,
            local_world_size: parse_usize(&env, "SLURM_NTASKS_PER_NODE")?,
            master_addr: master_addr.or(first_host),
            master_port,
        }
    } else if env("OMPI_COMM_WORLD_RANK").is_some() {
        let o = "Open MPI";
        World {
            launcher: Launcher::OpenMpi,
            rank: required(&env, "OMPI_COMM_WORLD_RANK", o)?,
            world_size: required(&env, "OMPI_COMM_WORLD_SIZE", o)?,
            local_rank: required(&env, "OMPI_COMM_WORLD_LOCAL_RANK", o)?,
            local_world_size: parse_usize(&env, "OMPI_COMM_WORLD_LOCAL_SIZE")?,
            master_addr,
            master_port,
        }
    } else {
        return Ok(None);
    };
    if world.world_size == 0 || world.rank >= world.world_size {
        return Err(DistError::Env(format!(
            "{:?} says rank {} of world size {}",
            world.launcher, world.rank, world.world_size
        )));
    }
    if let Some(l) = world.local_world_size {
        if l == 0 || world.local_rank >= l || l > world.world_size {
            return Err(DistError::Env(format!(
                "{:?} says local rank {} of {} on this node (world size {})",
                world.launcher, world.local_rank, l, world.world_size
            )));
        }
    }
    if world.local_rank >= world.world_size {
        return Err(DistError::Env(format!(
            "{:?} says local rank {} with world size {}",
            world.launcher, world.local_rank, world.world_size
        )));
    }
    Ok(Some(world))
}

/// The first host of a Slurm host list: `node07`, `gpu[003-008,010]` → `gpu003`,
/// `a[1-2],b` → `a1`.
fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..end];
    if list[end..].starts_with('[') {
        let close = list[end..].find(']')? + end;
        let first = list[end + 1..close].split([',', '-']).next()?.trim();
        if first.is_empty() || !first.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let suffix_end = list[close + 1..]
            .find(',')
            .map_or(list.len(), |i| close + 1 + i);
        return Some(format!("{prefix}{first}{}", &list[close + 1..suffix_end]));
    }
    (!prefix.is_empty()).then(|| prefix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn no_launcher_is_a_single_process() {
        assert_eq!(world_from_env(env(&[])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_are_read_and_win_over_slurm() {
        let w = world_from_env(env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.launcher, Launcher::Torchrun);
        assert_eq!((w.rank, w.world_size, w.local_rank), (5, 16, 1));
        assert_eq!(w.nccl_comm_id(env(&[])).unwrap(), "10.0.0.1:29501");
        assert_eq!(
            w.nccl_comm_id(env(&[("NCCL_COMM_ID", "h:7")])).unwrap(),
            "h:7"
        );
        assert!(!w.is_main());
    }

    #[test]
    fn slurm_takes_the_first_node_as_master() {
        let w = world_from_env(env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NODELIST", "gpu[007-008]"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.launcher, Launcher::Slurm);
        assert_eq!(w.master_addr.as_deref(), Some("gpu007"));
        assert_eq!(w.nccl_comm_id(env(&[])).unwrap(), "gpu007:29501");
    }

    #[test]
    fn open_mpi_variables_are_read() {
        let w = world_from_env(env(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.launcher, Launcher::OpenMpi);
        assert!(w.is_main());
        let e = w.nccl_comm_id(env(&[])).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }

    #[test]
    fn inconsistent_worlds_are_refused_naming_the_variables() {
        for (pairs, needle) in [
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
                "rank 2",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "2")], "LOCAL_RANK"),
            (
                vec![("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
                "RANK=\"x\"",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "4"),
                    ("LOCAL_RANK", "3"),
                    ("LOCAL_WORLD_SIZE", "2"),
                ],
                "local rank 3 of 2",
            ),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")],
                "SLURM_LOCALID",
            ),
        ] {
            let e = world_from_env(env(&pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("node07").as_deref(), Some("node07"));
        assert_eq!(first_host("gpu[003-008,010]").as_deref(), Some("gpu003"));
        assert_eq!(first_host("a[1-2],b").as_deref(), Some("a1"));
        assert_eq!(first_host("x1,x2").as_deref(), Some("x1"));
        assert_eq!(first_host("rack[2-3]-gpu").as_deref(), Some("rack2-gpu"));
        assert_eq!(first_host("bad[").as_deref(), None);
        assert_eq!(first_host("").as_deref(), None);
    }
}
