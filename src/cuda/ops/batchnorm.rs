//! BatchNorm launchers (`kernels/batchnorm.cu`, statistics through `kernels/reduce.cu`).
//! Statistics stay on the device (f64 mean and 1/std), as do the updated running statistics.

use anyhow::{Result, ensure};

use super::reduce::{ColPass, col_partials};
use crate::cuda::{Arg, Cost, CudaBuf, KernelId, cast, dev_of, empty, ensure_float, nbytes, vec_or_scalar};
use crate::tensor::{DType, Tensor};

/// Per-channel mean and 1/std (f64 device buffers of C values).
pub struct DeviceBnStats {
    pub mean: CudaBuf,
    pub invstd: CudaBuf,
}

/// Batch statistics of x viewed as [M, C] and the updated running statistics (f32 [C]).
pub fn train_stats(
    x: &Tensor,
    c: usize,
    eps: f64,
    momentum: f64,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(DeviceBnStats, Tensor, Tensor)> {
    ensure_float(x, "batch_norm")?;
    let dev = dev_of(x);
    let m = x.numel() / c;
    // One pass over x: shifted sums and sums of squares (the pass also writes the shift to `mean`).
    let mean = dev.alloc(c * 8)?;
    let sums = col_partials(x, None, Some(&mean), m, c, ColPass::ShiftedMoments)?;
    let s2 = sums.part1.as_ref().expect("shifted moments have two partials");
    finalize_train(x, &sums.part0, s2.ptr(), sums.chunks, c, c, None, m, mean, eps, momentum, running_mean, running_var)
}

/// Batch statistics over `m` values per channel from a fused convolution's per-brick partials
/// [bricks, 2 C] (Σ (y − shift), Σ (y − shift)², `conv3d::Fusion::partials`), and the updated
/// running statistics.
pub fn train_stats_from_partials(
    part: &Tensor,
    c: usize,
    m: usize,
    shift: Option<&Tensor>,
    eps: f64,
    momentum: f64,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(DeviceBnStats, Tensor, Tensor)> {
    let (sums, s2) = brick_sums(part, c)?;
    let mean = dev_of(part).alloc_zeroed(c * 8)?;
    finalize_train(
        part,
        &sums.part0,
        s2,
        sums.chunks,
        2 * c,
        c,
        shift,
        m,
        mean,
        eps,
        momentum,
        running_mean,
        running_var,
    )
}

/// Chunk sums (f64, rows of 2 C) of a fused convolution's per-brick partials [bricks, 2 C], and
/// the address of the second half of the first row (where the second sum starts).
fn brick_sums(part: &Tensor, c: usize) -> Result<(super::reduce::ColPartials, u64)> {
    ensure!(
        part.shape().len() == 2 && part.shape()[1] == 2 * c,
        "batch_norm: partials {:?} are not [bricks, 2 x {c}]",
        part.shape()
    );
    let sums = col_partials(part, None, None, part.shape()[0], 2 * c, ColPass::Sum)?;
    let second = sums.part0.ptr() + 8 * c as u64;
    Ok((sums, second))
}

/// bn_train_finalize over chunk sums (s1 at `s1`, s2 at `s2_ptr`, rows of `stride` f64) on
/// the device of `on`; `mean` holds the shift unless `shift` is given.
#[allow(clippy::too_many_arguments)]
fn finalize_train(
    on: &Tensor,
    s1: &CudaBuf,
    s2_ptr: u64,
    chunks: usize,
    stride: usize,
    c: usize,
    shift: Option<&Tensor>,
    m: usize,
    mean: CudaBuf,
    eps: f64,
    momentum: f64,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(DeviceBnStats, Tensor, Tensor)> {
    let dev = dev_of(on);
    let invstd = dev.alloc(c * 8)?;
    let (rm, rv) = (running_mean.to_device(on.device())?, running_var.to_device(on.device())?);
    let rm_out = empty(dev, &[c], DType::F32)?;
    let rv_out = empty(dev, &[c], DType::F32)?;
    dev.launch_1d(
        KernelId::BnTrainFinalize,
        c,
        &[
            Arg::Ptr(s1.ptr()),
            Arg::Ptr(s2_ptr),
            Arg::I32(chunks as i32),
            Arg::I32(stride as i32),
            Arg::I32(c as i32),
            Arg::Ptr(shift.map_or(0, |t| t.ptr())),
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
        Cost::mem(2 * chunks * c * 8 + c * 48),
    )?;
    Ok((DeviceBnStats { mean, invstd }, rm_out, rv_out))
}

/// BatchNorm's per-channel constants as an f32 [3, C] table (mean, invstd γ, β), the form the
/// fused convolutions apply (`conv3d::Fusion`).
pub fn affine_table(st: &DeviceBnStats, gamma: &Tensor, beta: &Tensor, c: usize) -> Result<CudaBuf> {
    let dev = dev_of(gamma);
    let tab = dev.alloc(3 * c * 4)?;
    dev.launch_1d(
        KernelId::BnAffineTable,
        c,
        &[
            Arg::Ptr(st.mean.ptr()),
            Arg::Ptr(st.invstd.ptr()),
            Arg::Ptr(gamma.ptr()),
            Arg::Ptr(beta.ptr()),
            Arg::I32(c as i32),
            Arg::Ptr(tab.ptr()),
        ],
        Cost::mem(c * 36),
    )?;
    Ok(tab)
}

/// Eval mode: the running statistics as mean and 1/std.
pub fn eval_stats(running_mean: &Tensor, running_var: &Tensor, eps: f64) -> Result<DeviceBnStats> {
    let dev = dev_of(running_mean);
    let c = running_mean.numel();
    let rv = running_var.to_device(running_mean.device())?;
    let mean = dev.alloc(c * 8)?;
    let invstd = dev.alloc(c * 8)?;
    dev.launch_1d(
        KernelId::BnEvalStats,
        c,
        &[
            Arg::Ptr(running_mean.ptr()),
            Arg::Ptr(rv.ptr()),
            Arg::I32(c as i32),
            Arg::F64(eps),
            Arg::Ptr(mean.ptr()),
            Arg::Ptr(invstd.ptr()),
        ],
        Cost::mem(c * 24),
    )?;
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

fn apply_maybe_relu(
    x: &Tensor,
    c: usize,
    st: &DeviceBnStats,
    gamma: &Tensor,
    beta: &Tensor,
    relu: bool,
) -> Result<Tensor> {
    let dev = dev_of(x);
    let y = empty(dev, x.shape(), x.dtype())?;
    let m = x.numel() / c;
    let (k, lanes) = vec_or_scalar(
        x.dtype(),
        [KernelId::BnApplyF32, KernelId::BnApplyBf16],
        [KernelId::BnApplyF32x4, KernelId::BnApplyBf16x8],
        &[x.ptr(), y.ptr()],
        c,
    );
    dev.launch_1d(
        k,
        x.numel() / lanes,
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
pub fn backward(
    x: &Tensor,
    dy: &Tensor,
    c: usize,
    st: &DeviceBnStats,
    gamma: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dy = cast(dy, x.dtype())?;
    let m = x.numel() / c;
    let p = col_partials(x, Some(&dy), Some(&st.mean), m, c, ColPass::GradSums)?;
    let p1 = p.part1.as_ref().expect("gradient sums have two partials").ptr();
    backward_apply(x, &dy, &p.part0, p1, p.chunks, c, c, st, gamma, train, None)
}

/// The training backward from a fused convolution's per-brick sums [bricks, 2 C] of dy
/// (Σ dy, Σ dy (x − mean): `conv3d::Fusion` with a ReLU mask), plus `add` (same shape as x)
/// added to dx in the same pass: (dx, dγ, dβ).
pub fn backward_from_partials(
    x: &Tensor,
    dy: &Tensor,
    part: &Tensor,
    c: usize,
    st: &DeviceBnStats,
    gamma: &Tensor,
    add: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    ensure!(
        dy.dtype() == x.dtype() && add.is_none_or(|a| a.dtype() == x.dtype() && a.shape() == x.shape()),
        "batch_norm backward: dy/add do not match x"
    );
    let (sums, p1) = brick_sums(part, c)?;
    backward_apply(x, dy, &sums.part0, p1, sums.chunks, 2 * c, c, st, gamma, true, add)
}

/// bn_backward_finalize over chunk sums (Σ dy at `part0`, Σ dy (x − mean) at `part1`, rows of
/// `stride` f64), then bn_backward_apply.
#[allow(clippy::too_many_arguments)]
fn backward_apply(
    x: &Tensor,
    dy: &Tensor,
    part0: &CudaBuf,
    part1: u64,
    chunks: usize,
    stride: usize,
    c: usize,
    st: &DeviceBnStats,
    gamma: &Tensor,
    train: bool,
    add: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = dev_of(x);
    let m = x.numel() / c;
    let dgamma = empty(dev, &[c], DType::F32)?;
    let dbeta = empty(dev, &[c], DType::F32)?;
    let coef = dev.alloc(3 * c * 4)?;
    dev.launch_1d(
        KernelId::BnBackwardFinalize,
        c,
        &[
            Arg::Ptr(part0.ptr()),
            Arg::Ptr(part1),
            Arg::I32(chunks as i32),
            Arg::I32(stride as i32),
            Arg::I32(c as i32),
            Arg::I64(m as i64),
            Arg::Ptr(st.invstd.ptr()),
            Arg::Ptr(gamma.ptr()),
            Arg::I32(train as i32),
            Arg::Ptr(dgamma.ptr()),
            Arg::Ptr(dbeta.ptr()),
            Arg::Ptr(coef.ptr()),
        ],
        Cost::mem(2 * chunks * c * 8 + c * 28),
    )?;
    let dx = empty(dev, x.shape(), x.dtype())?;
    let ptrs = [x.ptr(), dy.ptr(), add.map_or(0, |a| a.ptr()), dx.ptr()];
    let (k, lanes) = vec_or_scalar(
        x.dtype(),
        [KernelId::BnBackwardApplyF32, KernelId::BnBackwardApplyBf16],
        [KernelId::BnBackwardApplyF32x4, KernelId::BnBackwardApplyBf16x8],
        &ptrs,
        c,
    );
    dev.launch_1d(
        k,
        x.numel() / lanes,
        &[
            Arg::Ptr(x.ptr()),
            Arg::Ptr(dy.ptr()),
            Arg::Ptr(add.map_or(0, |a| a.ptr())),
            Arg::Ptr(dx.ptr()),
            Arg::Ptr(st.mean.ptr()),
            Arg::Ptr(coef.ptr()),
            Arg::I64(m as i64),
            Arg::I32(c as i32),
        ],
        Cost::mem((3 + add.is_some() as usize) * nbytes(x)),
    )?;
    Ok((dx, dgamma, dbeta))
}
