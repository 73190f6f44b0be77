//! The segmentation loss on the device (`kernels/segloss.cu`): BCE in the ROI + soft Dice of
//! logits [N, X, Y, Z, C] against one-hot targets, deterministic (f64 partial sums per voxel
//! chunk and class, reduced in order). The CPU oracle is `ops::segloss::segmentation_loss_cpu`.

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, dev_of, empty, ensure_f32, ensure_float, nbytes};
use crate::tensor::{DType, Tensor};

/// Voxels per block of the partial sums: enough blocks to fill the GPU, few enough partials.
fn rows_per_chunk(v: usize) -> usize {
    v.div_ceil(512).max(256)
}

/// What the backward needs: per (sample, class) the Dice sums [I, S + 1] and the ROI element
/// count, f64 on the device.
pub struct SeglossSaved {
    pub stats: CudaBuf,
}

fn check(logits: &Tensor, targets: &Tensor, roi: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    let s = logits.shape();
    ensure!(
        s.len() == 5 && targets.shape() == s,
        "segmentation loss: logits {s:?} and targets {:?} must be equal [N, X, Y, Z, C]",
        targets.shape()
    );
    ensure_float(logits, "segmentation loss logits")?;
    ensure_f32(targets, "segmentation loss targets")?;
    let (n, c) = (s[0], s[4]);
    let v = s[1] * s[2] * s[3];
    if let Some(r) = roi {
        ensure_f32(r, "segmentation loss ROI")?;
        ensure!(r.numel() == n * v, "segmentation loss: ROI of {} voxels for {} voxels", r.numel(), n * v);
    }
    Ok((n, v, c))
}

/// (loss [1] f32, saved). `roi` is an f32 [N, X, Y, Z] mask of 0 and 1 (None: every voxel);
/// an empty ROI gives a NaN loss (the caller checks for that on the host, where the ROI is made).
pub fn forward(logits: &Tensor, targets: &Tensor, roi: Option<&Tensor>) -> Result<(Tensor, SeglossSaved)> {
    let (n, v, c) = check(logits, targets, roi)?;
    let dev = dev_of(logits);
    let rows = rows_per_chunk(v);
    let chunks = v.div_ceil(rows).max(1);
    let stride = 3 * c + 1;
    let part = dev.alloc(n * chunks * stride * 8)?;
    let roi_ptr = roi.map_or(0, |r| r.ptr());
    let k = KernelId::typed(logits.dtype(), KernelId::SeglossPartialsF32, KernelId::SeglossPartialsBf16);
    dev.launch(
        k,
        (chunks as u32, n as u32, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(logits.ptr()),
            Arg::Ptr(targets.ptr()),
            Arg::Ptr(roi_ptr),
            Arg::I64(v as i64),
            Arg::I32(c as i32),
            Arg::I64(rows as i64),
            Arg::Ptr(part.ptr()),
        ],
        Cost::mem(nbytes(logits) + nbytes(targets) + roi.map_or(0, nbytes) + n * chunks * stride * 8),
    )?;
    let stats = dev.alloc((2 * n * c + 1) * 8)?;
    let loss = empty(dev, &[1], DType::F32)?;
    dev.launch(
        KernelId::SeglossFinalize,
        (1, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(part.ptr()),
            Arg::I32(chunks as i32),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
            Arg::Ptr(stats.ptr()),
            Arg::Ptr(loss.ptr()),
        ],
        Cost::mem(n * chunks * stride * 8 + (2 * n * c + 1) * 8 + 4),
    )?;
    Ok((loss, SeglossSaved { stats }))
}

/// d loss / d logits, scaled by `dloss` ([1] f32 on the device), in the logits' dtype.
pub fn backward(
    logits: &Tensor,
    targets: &Tensor,
    roi: Option<&Tensor>,
    saved: &SeglossSaved,
    dloss: &Tensor,
) -> Result<Tensor> {
    let (n, v, c) = check(logits, targets, roi)?;
    ensure!(
        dloss.numel() == 1 && dloss.dtype() == DType::F32,
        "segmentation loss backward: the output gradient must be one f32 value"
    );
    let dev = dev_of(logits);
    let grad = empty(dev, logits.shape(), logits.dtype())?;
    let k = KernelId::typed(logits.dtype(), KernelId::SeglossBackwardF32, KernelId::SeglossBackwardBf16);
    dev.launch_1d(
        k,
        logits.numel(),
        &[
            Arg::Ptr(logits.ptr()),
            Arg::Ptr(targets.ptr()),
            Arg::Ptr(roi.map_or(0, |r| r.ptr())),
            Arg::Ptr(saved.stats.ptr()),
            Arg::Ptr(dloss.ptr()),
            Arg::Ptr(grad.ptr()),
            Arg::I64(v as i64),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
        ],
        Cost::mem(nbytes(logits) + nbytes(targets) + roi.map_or(0, nbytes) + nbytes(&grad) + (2 * n * c + 1) * 8),
    )?;
    Ok(grad)
}
