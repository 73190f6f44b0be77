//! Max pooling 2×2×2 (ceil mode) launchers (`kernels/pooling.cu`).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, cast, dev_of, empty, ensure_float, nbytes, vec_groups};
use crate::ops::pooling::pooled_extent;
use crate::tensor::{DType, Tensor, Vol};

fn dims(v: Vol) -> [Arg; 5] {
    [Arg::I32(v.n as i32), Arg::I32(v.x as i32), Arg::I32(v.y as i32), Arg::I32(v.z as i32), Arg::I32(v.c as i32)]
}

/// (y, argmax offsets as u8 per output).
pub fn forward(x: &Tensor, v: Vol) -> Result<(Tensor, CudaBuf)> {
    ensure_float(x, "maxpool2")?;
    let dev = dev_of(x);
    let shape = [v.n, pooled_extent(v.x), pooled_extent(v.y), pooled_extent(v.z), v.c];
    let y = empty(dev, &shape, x.dtype())?;
    let arg = dev.alloc(y.numel())?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::Ptr(arg.ptr())];
    args.extend(dims(v));
    let cost = Cost::mem(nbytes(x) + nbytes(&y) + y.numel());
    let (k, items) = vec_groups(
        x.dtype(),
        [KernelId::Maxpool2ForwardF32x4, KernelId::Maxpool2ForwardBf16x8],
        &[x.ptr(), y.ptr(), arg.ptr()],
        v.c,
        y.numel() / v.c.max(1),
    )
    .unwrap_or((KernelId::typed(x.dtype(), KernelId::Maxpool2ForwardF32, KernelId::Maxpool2ForwardBf16), y.numel()));
    dev.launch_1d(k, items, &args, cost)?;
    Ok((y, arg))
}

/// dx [v] in `dtype`, plus `acc` (a gradient of the same shape and dtype already accumulated
/// for the pooled tensor's input) when given.
pub fn backward(dy: &Tensor, arg: &CudaBuf, v: Vol, dtype: DType, acc: Option<&Tensor>) -> Result<Tensor> {
    let dy = cast(dy, dtype)?;
    let dev = dev_of(&dy);
    if let Some(a) = acc {
        ensure!(
            a.shape() == v.shape() && a.dtype() == dtype,
            "maxpool2 backward: accumulated gradient {:?} {:?}, expected {:?} {dtype:?}",
            a.shape(),
            a.dtype(),
            v.shape()
        );
    }
    let dx = empty(dev, &v.shape(), dtype)?;
    let mut args =
        vec![Arg::Ptr(dy.ptr()), Arg::Ptr(arg.ptr()), Arg::Ptr(acc.map_or(0, |a| a.ptr())), Arg::Ptr(dx.ptr())];
    args.extend(dims(v));
    let cost = Cost::mem(nbytes(&dy) + dy.numel() + nbytes(&dx) + acc.map_or(0, nbytes));
    let ptrs = [dy.ptr(), arg.ptr(), acc.map_or(0, |a| a.ptr()), dx.ptr()];
    let (k, items) = vec_groups(
        dtype,
        [KernelId::Maxpool2BackwardF32x4, KernelId::Maxpool2BackwardBf16x8],
        &ptrs,
        v.c,
        dy.numel() / v.c.max(1),
    )
    .unwrap_or((KernelId::typed(dtype, KernelId::Maxpool2BackwardF32, KernelId::Maxpool2BackwardBf16), dx.numel()));
    dev.launch_1d(k, items, &args, cost)?;
    Ok(dx)
}
