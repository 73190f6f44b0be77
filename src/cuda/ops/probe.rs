//! The tensor-core layout probe (`kernels/mma_probe.cu`): one warp reports the fragment
//! coordinates `kernels/mma.cuh` assigns and what mma.sync and ldmatrix produce with them,
//! so a test can check the mappings against CuTe's published layouts and the hardware.

use anyhow::Result;

use crate::cuda::{Arg, Cost, CudaDevice, KernelId};

/// Floats per lane in the probe's output (the layout is documented in the kernel file).
pub const PROBE_STRIDE: usize = 52;

/// One lane's report.
#[derive(Debug, Clone)]
pub struct LaneReport {
    /// D values of the probe's mma, element e = 0..4.
    pub d: [f32; 4],
    /// The ldmatrix .x4 registers as 8 bf16 values (register q: halves 2q, 2q + 1).
    pub ldmatrix: [f32; 8],
    /// The ldmatrix .x4 .trans registers of the same matrices, likewise.
    pub ldmatrix_trans: [f32; 8],
    /// (row, col) of A element e = 0..8, (k, n) of B element e = 0..4, (row, col) of C/D e = 0..4.
    pub a: [(usize, usize); 8],
    pub b: [(usize, usize); 4],
    pub c: [(usize, usize); 4],
}

/// Dynamic shared memory the probe uses (its A matrix, 16 x 16 bf16).
pub const PROBE_SHARED_BYTES: u32 = 512;

/// Run the probe (one warp) and return the 32 lanes' reports.
pub fn mma_layout(dev: &std::sync::Arc<CudaDevice>) -> Result<Vec<LaneReport>> {
    mma_layout_with_shared(dev, PROBE_SHARED_BYTES)
}

/// The probe launched with `shared_bytes` of dynamic shared memory (tests of the launch
/// limits; fewer than `PROBE_SHARED_BYTES` is a kernel writing past its shared memory).
pub fn mma_layout_with_shared(dev: &std::sync::Arc<CudaDevice>, shared_bytes: u32) -> Result<Vec<LaneReport>> {
    let out = dev.alloc(32 * PROBE_STRIDE * 4)?;
    dev.launch(
        KernelId::MmaLayoutProbe,
        (1, 1, 1),
        (32, 1, 1),
        shared_bytes,
        &[Arg::Ptr(out.ptr())],
        Cost::mem(32 * PROBE_STRIDE * 4),
    )?;
    let v: Vec<f32> = dev.download(out.ptr(), 32 * PROBE_STRIDE)?;
    let pair = |o: &[f32], i: usize| (o[i] as usize, o[i + 1] as usize);
    Ok(v.chunks(PROBE_STRIDE)
        .map(|o| LaneReport {
            d: std::array::from_fn(|e| o[e]),
            ldmatrix: std::array::from_fn(|e| o[4 + e]),
            ldmatrix_trans: std::array::from_fn(|e| o[44 + e]),
            a: std::array::from_fn(|e| pair(o, 12 + 2 * e)),
            b: std::array::from_fn(|e| pair(o, 28 + 2 * e)),
            c: std::array::from_fn(|e| pair(o, 36 + 2 * e)),
        })
        .collect())
}
