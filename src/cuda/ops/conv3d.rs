//! 3-D convolution launchers (`kernels/conv3d.cu`): forward, backward input, backward weight
//! (split-K partials reduced in a fixed order) and the bias gradient (column sum of dy).

use anyhow::Result;

use crate::cuda::{Arg, Cost, K, cast, dev_of, empty, ensure_f32, ensure_float, nbytes};
use crate::tensor::{DType, Tensor, Vol};

const TILE: usize = 64;

fn dims(v: Vol) -> [Arg; 4] {
    [Arg::I32(v.n as i32), Arg::I32(v.x as i32), Arg::I32(v.y as i32), Arg::I32(v.z as i32)]
}

/// Tiles along one grid axis (at least one: the kernels check bounds, and an empty grid is a
/// launch error).
fn tiles(n: usize) -> u32 {
    n.div_ceil(TILE).max(1) as u32
}

/// y [N, X, Y, Z, Co] in x's dtype; w [Co, k, k, k, Ci] f32, bias [Co] f32.
pub fn forward(x: &Tensor, v: Vol, w: &Tensor, bias: Option<&Tensor>, co: usize, k: usize) -> Result<Tensor> {
    ensure_float(x, "conv3d")?;
    ensure_f32(w, "conv3d weight")?;
    let dev = dev_of(x);
    let y = empty(dev, &v.with_c(co).shape(), x.dtype())?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(bias.map_or(0, |b| b.ptr())), Arg::Ptr(y.ptr())];
    args.extend(dims(v));
    args.extend([Arg::I32(v.c as i32), Arg::I32(co as i32), Arg::I32(k as i32)]);
    // fp32 FMAs on CUDA cores; compulsory bytes: x, w, bias, y once each.
    let cost = Cost::fp32(2.0 * (v.voxels() * co * k * k * k * v.c) as f64, nbytes(x) + nbytes(w) + co * 4 + nbytes(&y));
    dev.launch(K::typed(x.dtype(), K::Conv3dForwardF32, K::Conv3dForwardBf16), (tiles(v.voxels()), tiles(co), 1), (256, 1, 1), 0, &args, cost)?;
    Ok(y)
}

/// dx [N, X, Y, Z, Ci] in `dtype` from dy [N, X, Y, Z, Co] (v_out) and w.
pub fn backward_input(dy: &Tensor, v_out: Vol, w: &Tensor, ci: usize, k: usize, dtype: DType) -> Result<Tensor> {
    let dy = cast(dy, dtype)?;
    let dev = dev_of(&dy);
    let dx = empty(dev, &v_out.with_c(ci).shape(), dtype)?;
    let mut args = vec![Arg::Ptr(dy.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(dx.ptr())];
    args.extend(dims(v_out));
    args.extend([Arg::I32(ci as i32), Arg::I32(v_out.c as i32), Arg::I32(k as i32)]);
    let cost = Cost::fp32(2.0 * (v_out.voxels() * ci * k * k * k * v_out.c) as f64, nbytes(&dy) + nbytes(w) + nbytes(&dx));
    dev.launch(K::typed(dtype, K::Conv3dBackwardInputF32, K::Conv3dBackwardInputBf16), (tiles(v_out.voxels()), tiles(ci), 1), (256, 1, 1), 0, &args, cost)?;
    Ok(dx)
}

/// Number of split-K partials for a weight gradient over `voxels` rows of a [co, kdim]
/// result: about 2048 voxels per split, at most 256 splits and 64 Mi partial values.
pub fn weight_splits(voxels: usize, co: usize, kdim: usize) -> (usize, usize) {
    let budget = ((64usize << 20) / (co * kdim).max(1)).max(1);
    let splits = voxels.div_ceil(2048).clamp(1, 256).min(budget);
    let chunk = voxels.div_ceil(splits).div_ceil(16) * 16;
    (voxels.div_ceil(chunk.max(1)).max(1), chunk.max(16))
}

/// (dw [Co, k, k, k, Ci] f32, db [Co] f32) from x (v) and dy.
pub fn backward_weight(x: &Tensor, v: Vol, dy: &Tensor, co: usize, k: usize) -> Result<(Tensor, Tensor)> {
    let dy = cast(dy, x.dtype())?;
    let dev = dev_of(x);
    let kdim = k * k * k * v.c;
    let (splits, chunk) = weight_splits(v.voxels(), co, kdim);
    let part = dev.alloc(splits * co * kdim * 4)?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(part.ptr())];
    args.extend(dims(v));
    args.extend([Arg::I32(v.c as i32), Arg::I32(co as i32), Arg::I32(k as i32), Arg::I64(chunk as i64)]);
    // x and dy once each, plus this kernel's split-K partials written.
    let cost = Cost::fp32(2.0 * (v.voxels() * co * kdim) as f64, nbytes(x) + nbytes(&dy) + splits * co * kdim * 4);
    dev.launch(K::typed(x.dtype(), K::Conv3dBackwardWeightF32, K::Conv3dBackwardWeightBf16), (tiles(kdim), tiles(co), splits as u32), (256, 1, 1), 0, &args, cost)?;
    let dw = empty(dev, &[co, k, k, k, v.c], DType::F32)?;
    let n = co * kdim;
    dev.launch_1d(K::Conv3dReduceSplits, n, &[Arg::Ptr(part.ptr()), Arg::Ptr(dw.ptr()), Arg::I32(splits as i32), Arg::I64(n as i64)], Cost::mem((splits + 1) * n * 4))?;
    let db = super::reduce::col_sum(&dy, co)?;
    Ok((dw, db))
}
