//! Voxel gather / scatter-add and channel concatenation launchers (`kernels/gather.cu`).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, cast, dev_of, empty, ensure_f32, ensure_float, nbytes, zeros};
use crate::tensor::{DType, Tensor, Vol};

/// out [P, C] f32 = rows `offs` (flat voxel indices, i64 on the device) of f [.., C].
pub fn gather_rows(f: &Tensor, offs: &CudaBuf, p: usize, c: usize) -> Result<Tensor> {
    ensure_float(f, "gather_voxels")?;
    let dev = dev_of(f);
    let out = empty(dev, &[p, c], DType::F32)?;
    dev.launch_1d(
        KernelId::typed(f.dtype(), KernelId::GatherRowsF32, KernelId::GatherRowsBf16),
        p * c,
        &[Arg::Ptr(f.ptr()), Arg::Ptr(offs.ptr()), Arg::Ptr(out.ptr()), Arg::I64(p as i64), Arg::I32(c as i32)],
        Cost::mem(p * c * (f.dtype().size_in_bytes() + 4) + p * 8),
    )?;
    Ok(out)
}

/// The gather's pairs grouped by voxel, on the device, for a deterministic backward.
pub struct Segments {
    order: CudaBuf,
    start: CudaBuf,
    voxel: CudaBuf,
    pairs: usize,
    count: usize,
    /// Segments as launched: `count` padded to a bound fixed by the shapes.
    padded: usize,
}

/// Group the pairs of `offs` (flat voxel index per pair) by voxel: a stable sort, so each
/// voxel sums its pairs in pair order. Padded (voxel -1: empty) to `bound` segments, at least
/// as many as there can be (the fewer of the pairs and the level's voxels), so that the
/// backward's launch is the same for every batch of these shapes (a step graph's nodes then
/// repeat, `cuda::graph`).
pub fn segments(dev: &std::sync::Arc<crate::cuda::CudaDevice>, offs: &[usize], bound: usize) -> Result<Segments> {
    let mut order: Vec<i64> = (0..offs.len() as i64).collect();
    order.sort_by_key(|&p| offs[p as usize]);
    let (mut start, mut voxel) = (Vec::new(), Vec::new());
    for (q, &p) in order.iter().enumerate() {
        let o = offs[p as usize] as i64;
        if voxel.last() != Some(&o) {
            start.push(q as i64);
            voxel.push(o);
        }
    }
    let count = voxel.len();
    ensure!(count <= bound, "gather_voxels: {count} distinct voxels, more than the bound {bound}");
    start.resize(bound + 1, order.len() as i64);
    voxel.resize(bound, -1);
    Ok(Segments {
        order: dev.upload(&order)?,
        start: dev.upload(&start)?,
        voxel: dev.upload(&voxel)?,
        pairs: offs.len(),
        count,
        padded: bound,
    })
}

/// df of shape `v` in `dtype`: dy's rows summed per voxel (fixed order, no atomics), zeros
/// elsewhere. The only full-size buffer is df itself, in its own dtype.
pub fn scatter_segments(dy: &Tensor, seg: &Segments, v: Vol, dtype: DType) -> Result<Tensor> {
    ensure_f32(dy, "gather_voxels backward")?;
    let dev = dev_of(dy);
    let df = zeros(dev, &v.shape(), dtype)?;
    let c = v.c;
    dev.launch_1d(
        KernelId::typed(dtype, KernelId::ScatterSegmentsF32, KernelId::ScatterSegmentsBf16),
        seg.padded.max(1) * c,
        &[
            Arg::Ptr(dy.ptr()),
            Arg::Ptr(seg.order.ptr()),
            Arg::Ptr(seg.start.ptr()),
            Arg::Ptr(seg.voxel.ptr()),
            Arg::Ptr(df.ptr()),
            Arg::I64(seg.padded as i64),
            Arg::I32(c as i32),
        ],
        Cost::mem(seg.pairs * c * 4 + seg.count * c * dtype.size_in_bytes() + 8 * (2 * seg.count + seg.pairs)),
    )?;
    Ok(df)
}

/// dst[:, dst_off .. dst_off + width] = src[:, src_off .. src_off + width] (f32 rows).
fn copy_cols(src: &Tensor, src_off: usize, dst: &Tensor, dst_off: usize, rows: usize, width: usize) -> Result<()> {
    let dev = dev_of(src);
    let (src_ld, dst_ld) = (src.shape()[1], dst.shape()[1]);
    dev.launch_1d(
        KernelId::CopyCols,
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

/// x [rows, c] (bf16) widened to [rows, w] with zero columns c .. w.
pub fn pad_channels_bf16(x: &Tensor, c: usize, w: usize) -> Result<Tensor> {
    ensure!(
        x.dtype() == DType::BF16 && c <= w && w < i32::MAX as usize && x.numel().is_multiple_of(c.max(1)),
        "pad_channels: {:?} {:?} from {c} to {w} channels",
        x.shape(),
        x.dtype()
    );
    let dev = dev_of(x);
    let rows = x.numel() / c;
    let y = empty(dev, &[rows, w], DType::BF16)?;
    dev.launch_1d(
        KernelId::PadChannelsBf16,
        rows * w,
        &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I32(c as i32), Arg::I32(w as i32), Arg::I64(rows as i64)],
        Cost::mem(nbytes(x) + nbytes(&y)),
    )?;
    Ok(y)
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
