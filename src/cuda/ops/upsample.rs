//! Upsample ×2 + crop launchers (`kernels/upsample.cu`).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, KernelId, cast, dev_of, empty, ensure_float, nbytes, vec_groups};
use crate::tensor::{DType, Tensor, Vol};

fn args(src: &Tensor, dst: &Tensor, v: Vol, t: [usize; 3]) -> Vec<Arg> {
    vec![
        Arg::Ptr(src.ptr()),
        Arg::Ptr(dst.ptr()),
        Arg::I32(v.n as i32),
        Arg::I32(v.x as i32),
        Arg::I32(v.y as i32),
        Arg::I32(v.z as i32),
        Arg::I32(v.c as i32),
        Arg::I32(t[0] as i32),
        Arg::I32(t[1] as i32),
        Arg::I32(t[2] as i32),
    ]
}

/// Checks that the crop lies within the doubled grid (every output has a source voxel).
fn check_target(v: Vol, t: [usize; 3]) -> Result<()> {
    ensure!(
        (0..3).all(|a| t[a] <= 2 * [v.x, v.y, v.z][a]),
        "upsample2_crop: target {t:?} exceeds twice the input {:?}",
        [v.x, v.y, v.z]
    );
    Ok(())
}

pub fn forward(x: &Tensor, v: Vol, target: [usize; 3]) -> Result<Tensor> {
    ensure_float(x, "upsample2_crop")?;
    let dev = dev_of(x);
    let y = empty(dev, &[v.n, target[0], target[1], target[2], v.c], x.dtype())?;
    check_target(v, target)?;
    let (k, items) = vec_groups(
        x.dtype(),
        [KernelId::Upsample2ForwardF32x4, KernelId::Upsample2ForwardBf16x8],
        &[x.ptr(), y.ptr()],
        v.c,
        v.voxels(),
    )
    .unwrap_or((KernelId::typed(x.dtype(), KernelId::Upsample2ForwardF32, KernelId::Upsample2ForwardBf16), y.numel()));
    dev.launch_1d(k, items, &args(x, &y, v, target), Cost::mem(nbytes(x) + nbytes(&y)))?;
    Ok(y)
}

pub fn backward(dy: &Tensor, v: Vol, target: [usize; 3], dtype: DType) -> Result<Tensor> {
    let dy = cast(dy, dtype)?;
    let dev = dev_of(&dy);
    let dx = empty(dev, &v.shape(), dtype)?;
    check_target(v, target)?;
    let (k, items) = vec_groups(
        dtype,
        [KernelId::Upsample2BackwardF32x4, KernelId::Upsample2BackwardBf16x8],
        &[dy.ptr(), dx.ptr()],
        v.c,
        v.voxels(),
    )
    .unwrap_or((KernelId::typed(dtype, KernelId::Upsample2BackwardF32, KernelId::Upsample2BackwardBf16), dx.numel()));
    dev.launch_1d(k, items, &args(&dy, &dx, v, target), Cost::mem(nbytes(&dy) + nbytes(&dx)))?;
    Ok(dx)
}
