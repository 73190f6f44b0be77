//! Upsample ×2 + crop launchers (`kernels/upsample.cu`).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, K, cast, dev_of, empty, ensure_float, nbytes, vec_or_scalar};
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

/// The kernel for `dtype` (16-byte channel groups when they fit, see upsample.cu) and the
/// number of work items: one per coarse voxel and channel group.
fn pick(dtype: DType, scalar: [K; 2], vector: [K; 2], ptrs: &[u64], v: Vol, t: [usize; 3]) -> Result<(K, usize, bool)> {
    ensure!((0..3).all(|a| t[a] <= 2 * [v.x, v.y, v.z][a]), "upsample2_crop: target {t:?} exceeds twice the input {:?}", [v.x, v.y, v.z]);
    let (k, lanes) = vec_or_scalar(dtype, scalar, vector, ptrs, v.c);
    let groups = v.n * v.x * v.y * v.z * v.c / lanes;
    Ok(if lanes > 1 && groups < u32::MAX as usize { (k, groups, true) } else { (K::typed(dtype, scalar[0], scalar[1]), 0, false) })
}

pub fn forward(x: &Tensor, v: Vol, target: [usize; 3]) -> Result<Tensor> {
    ensure_float(x, "upsample2_crop")?;
    let dev = dev_of(x);
    let y = empty(dev, &[v.n, target[0], target[1], target[2], v.c], x.dtype())?;
    let (k, groups, vector) = pick(x.dtype(), [K::Upsample2ForwardF32, K::Upsample2ForwardBf16], [K::Upsample2ForwardF32x4, K::Upsample2ForwardBf16x8], &[x.ptr(), y.ptr()], v, target)?;
    dev.launch_1d(k, if vector { groups } else { y.numel() }, &args(x, &y, v, target), Cost::mem(nbytes(x) + nbytes(&y)))?;
    Ok(y)
}

pub fn backward(dy: &Tensor, v: Vol, target: [usize; 3], dtype: DType) -> Result<Tensor> {
    let dy = cast(dy, dtype)?;
    let dev = dev_of(&dy);
    let dx = empty(dev, &v.shape(), dtype)?;
    let (k, groups, vector) = pick(dtype, [K::Upsample2BackwardF32, K::Upsample2BackwardBf16], [K::Upsample2BackwardF32x4, K::Upsample2BackwardBf16x8], &[dy.ptr(), dx.ptr()], v, target)?;
    dev.launch_1d(k, if vector { groups } else { dx.numel() }, &args(&dy, &dx, v, target), Cost::mem(nbytes(&dy) + nbytes(&dx)))?;
    Ok(dx)
}
