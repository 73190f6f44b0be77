//! What a CPU pretraining step needs, estimated before a run starts, so that a batch the
//! machine cannot hold is refused with the figures instead of aborting on a failed allocation.

use super::BatchShape;

/// What a pretraining step on the CPU backend needs: a fixed part (binary, weights, Adam) plus
/// bytes per voxel of both views scaled with the base width, and seconds per million view
/// voxels; fitted to the peak RSS and time of one-step runs (docs/performance.md, CPU memory).
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
