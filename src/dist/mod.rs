//! Data-parallel pretraining: a run split over ranks (one per GPU, or CPU processes and threads
//! for tests), each training on its own batches and averaging gradients every step.
//!
//! Semantics are PyTorch DDP's with the reference recipe:
//! - every rank starts from the same weights (same seed, or the same checkpoint) and samples
//!   its own batches: batch i of rank r is a function of (seed, r, i) (`rank_seed`), and rank
//!   0's sequence is the single-process run's;
//! - BatchNorm normalises with each rank's own batch statistics; the running statistics of
//!   rank 0 are copied to every rank before each step (DDP's `broadcast_buffers`), so all
//!   ranks hold rank 0's state and a checkpoint restores every rank exactly;
//! - gradients are averaged over the ranks (summed in rank order, then divided by the rank
//!   count, so every rank has the same bits), then the global-norm clip and Adam run
//!   identically on every rank;
//! - rank 0 alone writes checkpoints, metrics and pictures.
//!
//! `Communicator` is what a step needs from the group; implementations: `Single` (one rank,
//! nothing to do), `local::LocalGroup` (threads of one process: the tests' N-rank CPU runs),
//! `tcp::TcpComm` (CPU processes over TCP: `vox2vec-train --cpu-ranks N`), and
//! `nccl::NcclComm` (GPUs through NCCL, the id exchanged over `rendezvous`). Every collective
//! has a timeout, and a rank that stops makes the others fail with a message naming it
//! instead of hanging.

pub mod buckets;
pub mod launch;
pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod tcp;

use anyhow::{Result, bail};

/// The collectives a data-parallel step takes.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over the ranks of host values, in place; the ranks' values are added in
    /// rank order, so every rank ends with the same bits.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Rank `root`'s host values copied to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Element-wise mean over the ranks of device f32 buffers (pointer, values), in place, on
    /// the device's stream. Only a device communicator (NCCL) has it.
    fn all_reduce_mean_device(&mut self, bufs: &[(u64, usize)]) -> Result<()> {
        let _ = bufs;
        bail!(
            "the {} communicator works on host memory; device tensors need NCCL (vox2vec-train --gpus N)",
            self.name()
        )
    }
    /// `all_reduce_mean_device` queued behind the work already on the device's stream but run
    /// beside the work queued after it (NCCL: on its own stream, after an event), so that a
    /// bucket's reduction overlaps the rest of the backward; `wait_device` makes the device's
    /// stream wait for every such reduction. By default, in stream order.
    fn all_reduce_mean_device_overlapped(&mut self, bufs: &[(u64, usize)]) -> Result<()> {
        self.all_reduce_mean_device(bufs)
    }
    /// The device's stream waits (on the device) for the overlapped reductions queued so far.
    fn wait_device(&mut self) -> Result<()> {
        Ok(())
    }
    /// Rank `root`'s device f32 buffers copied to every rank.
    fn broadcast_device(&mut self, bufs: &[(u64, usize)], root: usize) -> Result<()> {
        let _ = (bufs, root);
        bail!(
            "the {} communicator works on host memory; device tensors need NCCL (vox2vec-train --gpus N)",
            self.name()
        )
    }
    /// For messages: "in-process", "tcp", "nccl".
    fn name(&self) -> &'static str;
}

/// One rank: every collective is the identity.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_mean_device(&mut self, _: &[(u64, usize)]) -> Result<()> {
        Ok(())
    }
    fn broadcast_device(&mut self, _: &[(u64, usize)], _: usize) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "single"
    }
}

/// The seed of rank `rank`'s batch sequence: `seed` itself for rank 0 (a one-rank run draws
/// the batches it always did), a SplitMix64 mix of (seed, rank) for the others.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    let mut z = seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How long a collective or the rendezvous waits for the other ranks before failing:
/// `VOX2VEC_DIST_TIMEOUT` seconds, 30 minutes by default (PyTorch's default; rank 0 may spend
/// minutes on a checkpoint, a validation or an online probe while the others wait).
pub fn timeout() -> std::time::Duration {
    let secs = std::env::var("VOX2VEC_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1800.0);
    std::time::Duration::from_secs_f64(secs)
}

/// The sum over ranks in rank order: parts[0] + parts[1] + ... (the order every
/// communicator's host all-reduce uses, so that results do not depend on the transport).
pub(crate) fn sum_in_rank_order<'a>(parts: impl IntoIterator<Item = &'a [f32]>, len: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; len];
    for (i, p) in parts.into_iter().enumerate() {
        if i == 0 {
            out.copy_from_slice(p);
        } else {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_seeds_differ_and_rank_zero_keeps_the_seed() {
        assert_eq!(rank_seed(7, 0), 7);
        let s: std::collections::HashSet<u64> = (0..64).map(|r| rank_seed(7, r)).collect();
        assert_eq!(s.len(), 64);
        assert_ne!(rank_seed(7, 1), rank_seed(8, 1));
    }
}
