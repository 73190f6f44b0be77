//! Row-wise L2 normalisation launchers (`kernels/normalize.cu`): one warp per row.

use anyhow::Result;

use crate::cuda::{Arg, Cost, KernelId, cast, dev_of, empty, ensure_f32};
use crate::tensor::{DType, Tensor};

const ROWS_PER_BLOCK: usize = 8;

pub fn forward(x: &Tensor, d: usize) -> Result<Tensor> {
    ensure_f32(x, "l2_normalize_rows")?;
    let dev = dev_of(x);
    let n = x.numel() / d;
    let y = empty(dev, x.shape(), DType::F32)?;
    let blocks = n.div_ceil(ROWS_PER_BLOCK).max(1) as u32;
    dev.launch(
        KernelId::L2NormalizeForward,
        (blocks, 1, 1),
        (256, 1, 1),
        0,
        &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64), Arg::I32(d as i32)],
        Cost::mem(2 * n * d * 4),
    )?;
    Ok(y)
}

pub fn backward(x: &Tensor, dy: &Tensor, d: usize) -> Result<Tensor> {
    let dy = cast(dy, DType::F32)?;
    let dev = dev_of(x);
    let n = x.numel() / d;
    let dx = empty(dev, x.shape(), DType::F32)?;
    let blocks = n.div_ceil(ROWS_PER_BLOCK).max(1) as u32;
    dev.launch(
        KernelId::L2NormalizeBackward,
        (blocks, 1, 1),
        (256, 1, 1),
        0,
        &[Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(dx.ptr()), Arg::I64(n as i64), Arg::I32(d as i32)],
        Cost::mem(3 * n * d * 4),
    )?;
    Ok(dx)
}
