//! Voxel gather / scatter-add and channel concatenation launchers (`kernels/gather.cu`).

use anyhow::Result;

use crate::cuda::{Arg, Cost, CudaBuf, K, cast, dev_of, empty, ensure_f32, ensure_float, zeros};
use crate::tensor::{DType, Tensor, Vol};

/// out [P, C] f32 = rows `offs` (flat voxel indices, i64 on the device) of f [.., C].
pub fn gather_rows(f: &Tensor, offs: &CudaBuf, p: usize, c: usize) -> Result<Tensor> {
    ensure_float(f, "gather_voxels")?;
    let dev = dev_of(f);
    let out = empty(dev, &[p, c], DType::F32)?;
    dev.launch_1d(
        K::typed(f.dtype(), K::GatherRowsF32, K::GatherRowsBf16),
        p * c,
        &[Arg::Ptr(f.ptr()), Arg::Ptr(offs.ptr()), Arg::Ptr(out.ptr()), Arg::I64(p as i64), Arg::I32(c as i32)],
        Cost::mem(p * c * (f.dtype().size_in_bytes() + 4) + p * 8),
    )?;
    Ok(out)
}

/// df of shape `v` in `dtype`: zeros with dy's rows added at `offs`.
pub fn scatter_add_rows(dy: &Tensor, offs: &CudaBuf, v: Vol, dtype: DType) -> Result<Tensor> {
    ensure_f32(dy, "gather_voxels backward")?;
    let dev = dev_of(dy);
    let df = zeros(dev, &v.shape(), DType::F32)?;
    let p = dy.shape()[0];
    dev.launch_1d(K::ScatterAddRows, p * v.c, &[Arg::Ptr(dy.ptr()), Arg::Ptr(offs.ptr()), Arg::Ptr(df.ptr()), Arg::I64(p as i64), Arg::I32(v.c as i32)], Cost::mem(p * v.c * 12 + p * 8))?;
    cast(&df, dtype)
}

/// dst[:, dst_off .. dst_off + width] = src[:, src_off .. src_off + width] (f32 rows).
fn copy_cols(src: &Tensor, src_off: usize, dst: &Tensor, dst_off: usize, rows: usize, width: usize) -> Result<()> {
    let dev = dev_of(src);
    let (src_ld, dst_ld) = (src.shape()[1], dst.shape()[1]);
    dev.launch_1d(
        K::CopyCols,
        rows * width,
        &[
            Arg::Ptr(src.ptr()),
            Arg::I64(src_ld as i64),
            Arg::I64(src_off as i64),
            Arg::Ptr(dst.ptr()),
            Arg::I64(dst_ld as i64),
            Arg::I64(dst_off as i64),
            Arg::I64(rows as i64),
            Arg::I64(width as i64),
        ],
        Cost::mem(rows * width * 8),
    )
}

/// [P, C0] ‖ [P, C1] ‖ … (f32).
pub fn concat(parts: &[&Tensor]) -> Result<Tensor> {
    let p = parts[0].shape()[0];
    let total: usize = parts.iter().map(|t| t.shape()[1]).sum();
    let out = empty(dev_of(parts[0]), &[p, total], DType::F32)?;
    let mut off = 0;
    for t in parts {
        ensure_f32(t, "concat_channels")?;
        copy_cols(t, 0, &out, off, p, t.shape()[1])?;
        off += t.shape()[1];
    }
    Ok(out)
}

/// The inverse of `concat`: dy [P, Σw] split into [P, w] parts.
pub fn split(dy: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let dy = cast(dy, DType::F32)?;
    let p = dy.shape()[0];
    let mut off = 0;
    let mut out = Vec::with_capacity(widths.len());
    for &w in widths {
        let part = empty(dev_of(&dy), &[p, w], DType::F32)?;
        copy_cols(&dy, off, &part, 0, p, w)?;
        out.push(part);
        off += w;
    }
    Ok(out)
}
