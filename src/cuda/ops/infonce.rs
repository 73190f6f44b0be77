//! InfoNCE on the device (`kernels/infonce.cu`): flash-style kernels that never hold an N x N
//! matrix. The forward streams tiles of the similarities into per-row log-sum-exps (2N
//! values) and the loss; the backward recomputes the tiles from e1, e2 and those
//! log-sum-exps. Memory O(N d); deterministic. Two kernel sets: exact fp32 on CUDA cores
//! (`kernels/infonce.cu`, the GPU's oracle) and bf16x3 on tensor cores
//! (`kernels/infonce_tc.cu`, for d a multiple of 16 up to [`TC_MAX_DIM`]).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, dev_of, empty, ensure_f32};
use crate::tensor::{DType, Tensor};

/// Rows per block of both kernels (`NCE_BR` in the kernel file).
const ROWS: usize = 32;
/// The widest embedding the backward kernels hold in registers.
pub const MAX_DIM: usize = 512;

/// Rows per block of the tensor-core kernels (`NTC_ROWS`).
const TC_ROWS: usize = 64;
/// The widest embedding of the tensor-core kernels (`NTC_D`).
pub const TC_MAX_DIM: usize = 128;

/// What the forward leaves for the backward: the per-row log-sum-exps [2N] (f64), and on
/// the tensor-core path the bf16 split of [e1; e2] (hi, lo: [2N, d] each).
pub struct InfonceSaved {
    pub lse: CudaBuf,
    split: Option<(CudaBuf, CudaBuf)>,
}

/// Whether the tensor-core kernels take embeddings d wide.
pub fn tensor_cores_for(d: usize) -> bool {
    d.is_multiple_of(16) && d > 0 && d <= TC_MAX_DIM
}

/// (loss [1] f32, saved) for unit rows e1, e2 [n, d] at temperature t; on tensor cores (bf16x3)
/// when `tensor_cores` and d allows it, else in exact fp32.
pub fn forward(
    e1: &Tensor,
    e2: &Tensor,
    n: usize,
    d: usize,
    t: f64,
    tensor_cores: bool,
) -> Result<(Tensor, InfonceSaved)> {
    ensure_f32(e1, "infonce")?;
    ensure_f32(e2, "infonce")?;
    ensure!(d <= MAX_DIM, "infonce on the GPU supports embeddings up to {MAX_DIM} wide, got {d}");
    let dev = dev_of(e1);
    let lse = dev.alloc(2 * n * 8)?;
    let diag = dev.alloc(n * 8)?;
    let flops = 8.0 * (n * n * d) as f64;
    let split = if tensor_cores && tensor_cores_for(d) {
        let (hi, lo) = (dev.alloc(2 * n * d * 2)?, dev.alloc(2 * n * d * 2)?);
        dev.launch_1d(
            KernelId::InfonceSplitBf16,
            2 * n * d,
            &[Arg::Ptr(e1.ptr()), Arg::Ptr(e2.ptr()), Arg::Ptr(hi.ptr()), Arg::Ptr(lo.ptr()), Arg::I64((n * d) as i64)],
            Cost::mem(2 * n * d * 8),
        )?;
        // Three bf16 MMAs per product (bf16x3).
        dev.launch(
            KernelId::InfonceTcRowLse,
            (n.div_ceil(TC_ROWS) as u32, 2, 1),
            (128, 1, 1),
            0,
            &[
                Arg::Ptr(hi.ptr()),
                Arg::Ptr(lo.ptr()),
                Arg::I32(n as i32),
                Arg::I32(d as i32),
                Arg::F32((1.0 / t) as f32),
                Arg::Ptr(lse.ptr()),
                Arg::Ptr(diag.ptr()),
            ],
            Cost::tensor_bf16(3.0 * flops, 2 * n * d * 4 + 24 * n),
        )?;
        Some((hi, lo))
    } else {
        dev.launch(
            KernelId::InfonceRowLse,
            (n.div_ceil(ROWS) as u32, 2, 1),
            (256, 1, 1),
            0,
            &[
                Arg::Ptr(e1.ptr()),
                Arg::Ptr(e2.ptr()),
                Arg::I32(n as i32),
                Arg::I32(d as i32),
                Arg::F32((1.0 / t) as f32),
                Arg::Ptr(lse.ptr()),
                Arg::Ptr(diag.ptr()),
            ],
            Cost::fp32(flops, 2 * n * d * 4 + 24 * n),
        )?;
        None
    };
    let loss = empty(dev, &[1], DType::F32)?;
    dev.launch(
        KernelId::InfonceLoss,
        (1, 1, 1),
        (256, 1, 1),
        0,
        &[Arg::Ptr(lse.ptr()), Arg::Ptr(diag.ptr()), Arg::I32(n as i32), Arg::Ptr(loss.ptr())],
        Cost::mem(24 * n),
    )?;
    Ok((loss, InfonceSaved { lse, split }))
}

/// (de1, de2) [n, d] f32, times the upstream gradient `dloss` (one f32 on the device).
pub fn backward(
    e1: &Tensor,
    e2: &Tensor,
    saved: &InfonceSaved,
    dloss: &Tensor,
    n: usize,
    d: usize,
    t: f64,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        dloss.numel() == 1 && dloss.dtype() == DType::F32,
        "infonce backward: the upstream gradient must be one f32 value"
    );
    let dev = dev_of(e1);
    let de1 = empty(dev, &[n, d], DType::F32)?;
    let de2 = empty(dev, &[n, d], DType::F32)?;
    // Each logit tile is recomputed (2d FLOPs per pair) and weighs a row update (2d more).
    let flops = 16.0 * (n * n * d) as f64;
    // Both kernels take these; the tensor-core one takes the bf16 split before them.
    let args = [
        Arg::Ptr(e1.ptr()),
        Arg::Ptr(e2.ptr()),
        Arg::I32(n as i32),
        Arg::I32(d as i32),
        Arg::F32((1.0 / t) as f32),
        Arg::Ptr(saved.lse.ptr()),
        Arg::Ptr(dloss.ptr()),
        Arg::Ptr(de1.ptr()),
        Arg::Ptr(de2.ptr()),
    ];
    if let Some((hi, lo)) = &saved.split {
        let mut tc_args = vec![Arg::Ptr(hi.ptr()), Arg::Ptr(lo.ptr())];
        tc_args.extend(args);
        let cost = Cost::tensor_bf16(3.0 * flops, 2 * n * d * 4 + 4 * n * d * 4 + 16 * n);
        dev.launch(KernelId::InfonceTcBackward, (n.div_ceil(TC_ROWS) as u32, 2, 1), (128, 1, 1), 0, &tc_args, cost)?;
    } else {
        let k = if d <= 128 { KernelId::InfonceBackwardD128 } else { KernelId::InfonceBackwardD512 };
        dev.launch(
            k,
            (n.div_ceil(ROWS) as u32, 2, 1),
            (256, 1, 1),
            0,
            &args,
            Cost::fp32(flops, 4 * n * d * 4 + 16 * n),
        )?;
    }
    Ok((de1, de2))
}

/// The learning signal (`ops::infonce::Signal`) on the device: [top1, pos_sim, neg_sim] as
/// f64 in a device buffer, read when the caller reads (`read`), so that a training step can
/// queue it and read it with its loss.
pub struct DeviceSignal {
    pub buf: CudaBuf,
}

impl DeviceSignal {
    pub fn read(&self) -> Result<crate::ops::infonce::Signal> {
        let v = self.buf.device().download::<f64>(self.buf.ptr(), 3)?;
        Ok(crate::ops::infonce::Signal { top1: v[0], pos_sim: v[1], neg_sim: v[2] })
    }
}

/// Queue the signal of unit rows e1, e2 [n, d]: top-1 over the first min(n,
/// SIGNAL_ANCHORS) anchors of each view (fp32 dot tiles as the loss's), similarities in f64.
pub fn signal(e1: &Tensor, e2: &Tensor, n: usize, d: usize) -> Result<DeviceSignal> {
    ensure_f32(e1, "signal")?;
    ensure_f32(e2, "signal")?;
    ensure!(n >= 1, "signal: no pairs");
    let dev = dev_of(e1);
    let anchors = n.min(crate::ops::infonce::SIGNAL_ANCHORS);
    let blocks = anchors.div_ceil(ROWS);
    let hits = dev.alloc(2 * blocks * 8)?;
    dev.launch(
        KernelId::InfonceSignalHits,
        (blocks as u32, 2, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(e1.ptr()),
            Arg::Ptr(e2.ptr()),
            Arg::I32(n as i32),
            Arg::I32(d as i32),
            Arg::I32(anchors as i32),
            Arg::Ptr(hits.ptr()),
        ],
        Cost::fp32(2.0 * 2.0 * (anchors * n * d) as f64, 2 * n * d * 4 + 2 * blocks * 8),
    )?;
    let out = dev.alloc(3 * 8)?;
    dev.launch(
        KernelId::InfonceSignalFinalize,
        (1, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(e1.ptr()),
            Arg::Ptr(e2.ptr()),
            Arg::I32(n as i32),
            Arg::I32(d as i32),
            Arg::I32(anchors as i32),
            Arg::Ptr(hits.ptr()),
            Arg::I32((2 * blocks) as i32),
            Arg::Ptr(out.ptr()),
        ],
        Cost::mem(2 * n * d * 4 + 2 * blocks * 8 + 24),
    )?;
    Ok(DeviceSignal { buf: out })
}
