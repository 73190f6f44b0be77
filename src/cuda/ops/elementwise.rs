//! ReLU, addition and scaling by a device scalar (`kernels/elementwise.cu`).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, KernelId, cast, dev_of, empty, ensure_f32, ensure_float, nbytes, vec_or_scalar};
use crate::tensor::{DType, Tensor};

pub fn relu_forward(x: &Tensor) -> Result<Tensor> {
    ensure_float(x, "relu")?;
    let dev = dev_of(x);
    let y = empty(dev, x.shape(), x.dtype())?;
    let n = x.numel();
    let (k, lanes) = vec_or_scalar(
        x.dtype(),
        [KernelId::ReluForwardF32, KernelId::ReluForwardBf16],
        [KernelId::ReluForwardF32x4, KernelId::ReluForwardBf16x8],
        &[x.ptr(), y.ptr()],
        n,
    );
    dev.launch_1d(k, n / lanes, &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)], Cost::mem(2 * nbytes(x)))?;
    Ok(y)
}

/// dx = dy where y > 0 (dx in y's dtype).
pub fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dy = cast(dy, y.dtype())?;
    let dev = dev_of(y);
    let dx = empty(dev, y.shape(), y.dtype())?;
    let n = y.numel();
    let (k, lanes) = vec_or_scalar(
        y.dtype(),
        [KernelId::ReluBackwardF32, KernelId::ReluBackwardBf16],
        [KernelId::ReluBackwardF32x4, KernelId::ReluBackwardBf16x8],
        &[y.ptr(), dy.ptr(), dx.ptr()],
        n,
    );
    dev.launch_1d(
        k,
        n / lanes,
        &[Arg::Ptr(y.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(dx.ptr()), Arg::I64(n as i64)],
        Cost::mem(3 * nbytes(y)),
    )?;
    Ok(dx)
}

/// a + b, in a's dtype (b is converted when it differs).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    ensure_float(a, "add")?;
    let b = cast(b, a.dtype())?;
    let dev = dev_of(a);
    let y = empty(dev, a.shape(), a.dtype())?;
    let n = a.numel();
    let (k, lanes) = vec_or_scalar(
        a.dtype(),
        [KernelId::AddF32, KernelId::AddBf16],
        [KernelId::AddF32x4, KernelId::AddBf16x8],
        &[a.ptr(), b.ptr(), y.ptr()],
        n,
    );
    dev.launch_1d(
        k,
        n / lanes,
        &[Arg::Ptr(a.ptr()), Arg::Ptr(b.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)],
        Cost::mem(3 * nbytes(a)),
    )?;
    Ok(y)
}

/// x · s[0] for an f32 tensor x and a one-element f32 device tensor s (a new tensor).
pub fn scale_by_scalar(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    ensure_f32(x, "scale")?;
    ensure!(s.numel() == 1 && s.dtype() == DType::F32, "scale: the factor must be one f32 value");
    let dev = dev_of(x);
    let y = empty(dev, x.shape(), DType::F32)?;
    let n = x.numel();
    dev.copy_device(y.ptr(), x.ptr(), n * 4)?;
    dev.launch_1d(
        KernelId::ScaleByScalarF32,
        n,
        &[Arg::Ptr(y.ptr()), Arg::Ptr(s.ptr()), Arg::I64(n as i64)],
        Cost::mem(2 * n * 4),
    )?;
    Ok(y)
}
