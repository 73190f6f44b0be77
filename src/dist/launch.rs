//! Where a rank learns who it is, and how one command starts several ranks.
//!
//! A rank reads what torchrun and SLURM users already have in their environment: torchrun's
//! RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or SLURM's SLURM_PROCID,
//! SLURM_NTASKS, SLURM_LOCALID (with MASTER_ADDR from the environment, else the node srun
//! was launched from, SLURM_LAUNCH_NODE_IPADDR; MASTER_PORT 29500 when unset, torchrun's
//! default). Under torchrun (TORCHELASTIC_RUN_ID set) rank 0 listens on MASTER_PORT + 1, as
//! torchrun's agent serves its own store on MASTER_PORT; VOX2VEC_MASTER_PORT overrides both. `vox2vec-train --gpus N` (or `--cpu-ranks N`) on one machine starts N copies of
//! itself with those variables set, waits for them, and stops them all when one fails.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A rank's place in its run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this machine: the GPU it takes.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankEnv {
    /// From this process's environment; None when it names no rank (a single-process run).
    pub fn from_env() -> Result<Option<RankEnv>> {
        RankEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// From the variables `get` returns (torchrun's first, else SLURM's).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a non-negative integer")))
                .transpose()
        };
        let (rank, world, local, source) = if let Some(rank) = num("RANK")? {
            let world = num("WORLD_SIZE")?.context("RANK is set but WORLD_SIZE is not (torchrun sets both)")?;
            (rank, world, num("LOCAL_RANK")?.unwrap_or(rank), "RANK/WORLD_SIZE")
        } else if let Some(rank) = num("SLURM_PROCID")? {
            let world = num("SLURM_NTASKS")?.context("SLURM_PROCID is set but SLURM_NTASKS is not")?;
            (rank, world, num("SLURM_LOCALID")?.unwrap_or(0), "SLURM_PROCID/SLURM_NTASKS")
        } else {
            return Ok(None);
        };
        if world == 0 || rank >= world {
            bail!("{source}: rank {rank} in a world of {world}: the rank must be below the world size");
        }
        let master_addr = match get("MASTER_ADDR").or_else(|| get("SLURM_LAUNCH_NODE_IPADDR")) {
            Some(a) if !a.trim().is_empty() => a.trim().to_string(),
            _ if world == 1 => "127.0.0.1".to_string(),
            _ => bail!("{source} name rank {rank} of {world}, but MASTER_ADDR (rank 0's host) is not set"),
        };
        let port =
            |k: &str, p: String| p.trim().parse::<u16>().with_context(|| format!("{k}={p:?} is not a port number"));
        let master_port = match (get("VOX2VEC_MASTER_PORT"), get("MASTER_PORT")) {
            (Some(p), _) => port("VOX2VEC_MASTER_PORT", p)?,
            // torchrun's agent already serves its own store on MASTER_PORT: the next port is ours.
            (None, Some(p)) if get("TORCHELASTIC_RUN_ID").is_some() => {
                port("MASTER_PORT", p)?.checked_add(1).context("MASTER_PORT 65535 leaves no port for the rendezvous")?
            }
            (None, Some(p)) => port("MASTER_PORT", p)?,
            (None, None) => 29500,
        };
        Ok(Some(RankEnv { rank, world, local_rank: local, master_addr, master_port }))
    }
}

/// A free TCP port on this machine for rank 0 to listen on.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port for the ranks' rendezvous")?
        .local_addr()?
        .port())
}

/// Refuse `--gpus n` on a machine without n usable CUDA devices or without NCCL, saying why.
pub fn check_gpus(n: usize) -> Result<()> {
    let have = crate::cuda::device_count();
    anyhow::ensure!(
        have >= n,
        "--gpus {n}, but this machine has {have} CUDA device(s){}",
        crate::cuda::unavailable_reason().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    if let Some(why) = crate::dist::nccl::unavailable_reason() {
        anyhow::bail!("--gpus {n}: {why}");
    }
    Ok(())
}

/// Runs `world` copies of this program with `args`, rank r with RANK=r, LOCAL_RANK=r,
/// WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT; waits for all of them. When one
/// fails, the others are stopped and the error names it.
pub fn run_local_ranks(world: usize, args: &[OsString]) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program to start its ranks")?;
    let port = free_port()?;
    let mut children: Vec<Child> = Vec::with_capacity(world);
    for rank in 0..world {
        let child = Command::new(&exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        }
    }
    let mut done = vec![false; world];
    while done.iter().any(|d| !d) {
        for rank in 0..world {
            if done[rank] {
                continue;
            }
            if let Some(status) = children[rank].try_wait()? {
                done[rank] = true;
                if !status.success() {
                    stop_all(&mut children);
                    bail!(
                        "rank {rank} of {world} failed ({status}); the other ranks were stopped (its error is printed above)"
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        assert_eq!(RankEnv::from_vars(env(&[])).unwrap(), None);
        let t = RankEnv::from_vars(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t, RankEnv { rank: 3, world: 8, local_rank: 1, master_addr: "node7".into(), master_port: 1234 });
        let s = RankEnv::from_vars(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            s,
            RankEnv { rank: 5, world: 16, local_rank: 5, master_addr: "10.0.0.2".into(), master_port: 29500 }
        );
        let tr = RankEnv::from_vars(env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "x"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(tr.master_port, 29501);
        // torchrun's variables win over SLURM's (torchrun launched under SLURM).
        let both = RankEnv::from_vars(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((both.rank, both.world), (0, 2));
        for bad in [
            vec![("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")],
            vec![("RANK", "0")],
            vec![("RANK", "x"), ("WORLD_SIZE", "2")],
            vec![("RANK", "1"), ("WORLD_SIZE", "2")],
            vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "99999")],
        ] {
            assert!(RankEnv::from_vars(env(&bad)).is_err(), "{bad:?} accepted");
        }
    }
}
