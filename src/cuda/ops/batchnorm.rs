//! BatchNorm launchers (`kernels/batchnorm.cu`, statistics through `kernels/reduce.cu`).
//! Statistics stay on the device (f64 mean and 1/std), as do the updated running statistics.

use anyhow::Result;

use super::reduce::{ColPass, col_partials};
use crate::cuda::{Arg, Cost, CudaBuf, K, cast, dev_of, empty, ensure_float, nbytes};
use crate::tensor::{DType, Tensor};

/// Per-channel mean and 1/std (f64 device buffers of C values).
pub struct DeviceBnStats {
    pub mean: CudaBuf,
    pub invstd: CudaBuf,
}

/// Batch statistics of x viewed as [M, C] and the updated running statistics (f32 [C]).
pub fn train_stats(x: &Tensor, c: usize, eps: f64, momentum: f64, running_mean: &Tensor, running_var: &Tensor) -> Result<(DeviceBnStats, Tensor, Tensor)> {
    ensure_float(x, "batch_norm")?;
    let dev = dev_of(x);
    let m = x.numel() / c;
    // One pass over x: shifted sums and sums of squares (the pass also writes the shift to `mean`).
    let mean = dev.alloc(c * 8)?;
    let sums = col_partials(x, None, Some(&mean), m, c, ColPass::ShiftedMoments)?;
    let invstd = dev.alloc(c * 8)?;
    let (rm, rv) = (running_mean.to_device(x.device())?, running_var.to_device(x.device())?);
    let rm_out = empty(dev, &[c], DType::F32)?;
    let rv_out = empty(dev, &[c], DType::F32)?;
    dev.launch_1d(
        K::BnTrainFinalize,
        c,
        &[
            Arg::Ptr(sums.part0.ptr()),
            Arg::Ptr(sums.part1.as_ref().expect("shifted moments have two partials").ptr()),
            Arg::I32(sums.chunks as i32),
            Arg::I32(c as i32),
            Arg::I64(m as i64),
            Arg::F64(eps),
            Arg::F64(momentum),
            Arg::Ptr(mean.ptr()),
            Arg::Ptr(invstd.ptr()),
            Arg::Ptr(rm.ptr()),
            Arg::Ptr(rv.ptr()),
            Arg::Ptr(rm_out.ptr()),
            Arg::Ptr(rv_out.ptr()),
        ],
        Cost::mem(2 * sums.chunks * c * 8 + c * 48),
    )?;
    Ok((DeviceBnStats { mean, invstd }, rm_out, rv_out))
}

/// Eval mode: the running statistics as mean and 1/std.
pub fn eval_stats(running_mean: &Tensor, running_var: &Tensor, eps: f64) -> Result<DeviceBnStats> {
    let dev = dev_of(running_mean);
    let c = running_mean.numel();
    let rv = running_var.to_device(running_mean.device())?;
    let mean = dev.alloc(c * 8)?;
    let invstd = dev.alloc(c * 8)?;
    dev.launch_1d(K::BnEvalStats, c, &[Arg::Ptr(running_mean.ptr()), Arg::Ptr(rv.ptr()), Arg::I32(c as i32), Arg::F64(eps), Arg::Ptr(mean.ptr()), Arg::Ptr(invstd.ptr())], Cost::mem(c * 24))?;
    Ok(DeviceBnStats { mean, invstd })
}

/// y = (x − mean) · invstd · γ + β, in x's dtype.
pub fn apply(x: &Tensor, c: usize, st: &DeviceBnStats, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    apply_maybe_relu(x, c, st, gamma, beta, false)
}

/// max((x − mean) · invstd · γ + β, 0) in one pass, in x's dtype.
pub fn apply_relu(x: &Tensor, c: usize, st: &DeviceBnStats, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    apply_maybe_relu(x, c, st, gamma, beta, true)
}

fn apply_maybe_relu(x: &Tensor, c: usize, st: &DeviceBnStats, gamma: &Tensor, beta: &Tensor, relu: bool) -> Result<Tensor> {
    let dev = dev_of(x);
    let y = empty(dev, x.shape(), x.dtype())?;
    let m = x.numel() / c;
    dev.launch_1d(
        K::typed(x.dtype(), K::BnApplyF32, K::BnApplyBf16),
        x.numel(),
        &[
            Arg::Ptr(x.ptr()),
            Arg::Ptr(y.ptr()),
            Arg::Ptr(st.mean.ptr()),
            Arg::Ptr(st.invstd.ptr()),
            Arg::Ptr(gamma.ptr()),
            Arg::Ptr(beta.ptr()),
            Arg::I64(m as i64),
            Arg::I32(c as i32),
            Arg::I32(relu as i32),
        ],
        Cost::mem(2 * nbytes(x)),
    )?;
    Ok(y)
}

/// (dx in x's dtype, dγ f32, dβ f32).
pub fn backward(x: &Tensor, dy: &Tensor, c: usize, st: &DeviceBnStats, gamma: &Tensor, train: bool) -> Result<(Tensor, Tensor, Tensor)> {
    let dy = cast(dy, x.dtype())?;
    let dev = dev_of(x);
    let m = x.numel() / c;
    let p = col_partials(x, Some(&dy), Some(&st.mean), m, c, ColPass::GradSums)?;
    let dgamma = empty(dev, &[c], DType::F32)?;
    let dbeta = empty(dev, &[c], DType::F32)?;
    let coef = dev.alloc(3 * c * 4)?;
    dev.launch_1d(
        K::BnBackwardFinalize,
        c,
        &[
            Arg::Ptr(p.part0.ptr()),
            Arg::Ptr(p.part1.as_ref().expect("gradient sums have two partials").ptr()),
            Arg::I32(p.chunks as i32),
            Arg::I32(c as i32),
            Arg::I64(m as i64),
            Arg::Ptr(st.invstd.ptr()),
            Arg::Ptr(gamma.ptr()),
            Arg::I32(train as i32),
            Arg::Ptr(dgamma.ptr()),
            Arg::Ptr(dbeta.ptr()),
            Arg::Ptr(coef.ptr()),
        ],
        Cost::mem(2 * p.chunks * c * 8 + c * 28),
    )?;
    let dx = empty(dev, x.shape(), x.dtype())?;
    dev.launch_1d(
        K::typed(x.dtype(), K::BnBackwardApplyF32, K::BnBackwardApplyBf16),
        x.numel(),
        &[Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(dx.ptr()), Arg::Ptr(st.mean.ptr()), Arg::Ptr(coef.ptr()), Arg::I64(m as i64), Arg::I32(c as i32)],
        Cost::mem(3 * nbytes(x)),
    )?;
    Ok((dx, dgamma, dbeta))
}
