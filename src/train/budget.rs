//! What a CPU pretraining step needs, estimated before a run starts, so that a batch the
//! machine cannot hold is refused with the figures instead of aborting on a failed allocation.

use super::BatchShape;

/// What a pretraining step on the CPU backend needs, estimated before a run starts so that a
/// batch the machine cannot hold is refused with the figures instead of aborting on a failed
/// allocation. Fitted to peak RSS of one-step runs on a 2-vCPU, 24 GiB machine (base 16, 6
/// scales, synthetic pairs): 3.02 GB for 1 pair of 128x128x32, 9.01 GB for 4 pairs, 21.9 GB for
/// the reference's 10 pairs (93 s); 1.35 / 1.78 GB for 1 / 2 pairs of 64x64x32 (below the line).
/// So ~0.95 GB fixed (binary, weights, Adam) plus ~2.05 KB per voxel of both views, scaled with
/// the base width; and ~10 s per million view voxels for the step on 2 threads.
#[derive(Clone, Copy, Debug)]
pub struct CpuStepEstimate {
    pub bytes: f64,
    pub seconds: f64,
}

/// Fixed bytes of a CPU pretraining run (see `CpuStepEstimate`).
pub const CPU_FIXED_BYTES: f64 = 0.95e9;

pub fn estimate_cpu_step(batch: BatchShape, fpn: crate::model::FpnConfig, threads: usize) -> CpuStepEstimate {
    let voxels = 2.0 * batch.pairs as f64 * batch.patch.iter().product::<usize>() as f64;
    let width = fpn.base_channels as f64 / 16.0;
    CpuStepEstimate {
        bytes: CPU_FIXED_BYTES + 2050.0 * width * voxels,
        seconds: 10.0 * (voxels / 1e6) * width * 2.0 / threads.max(1) as f64,
    }
}

/// MemAvailable of /proc/meminfo in bytes (None where there is no such file).
pub fn available_memory_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}
