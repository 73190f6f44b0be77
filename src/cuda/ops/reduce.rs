//! Deterministic column sums of [M, C] data (`kernels/reduce.cu`): per-chunk partial sums in
//! f64, then the chunks summed in order. Used by BatchNorm's statistics and gradients and by
//! every bias gradient.

use std::sync::Arc;

use anyhow::Result;

use crate::cuda::{Arg, Cost, CudaBuf, CudaDevice, KernelId, dev_of, empty, nbytes};
use crate::tensor::{DType, Tensor};

/// Partial sums [chunks, C] (f64) of one pass.
pub struct ColPartials {
    pub part0: CudaBuf,
    pub part1: Option<CudaBuf>,
    pub chunks: usize,
}

/// Rows per chunk: enough chunks to fill the GPU, few enough to sum quickly.
fn rows_per_chunk(m: usize) -> usize {
    m.div_ceil(2048).max(64)
}

/// What one `col_partials` pass sums per column (the kernel's `mode`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ColPass {
    /// part0 = Σ x.
    Sum = 0,
    /// part0 = Σ g, part1 = Σ g (x − mean) (`g` the same dtype as x): BatchNorm's backward.
    GradSums = 1,
    /// part0 = Σ (x − k), part1 = Σ (x − k)² with k = x's first row, which the pass writes to
    /// `mean`: BatchNorm's statistics in one pass.
    ShiftedMoments = 2,
}

pub fn col_partials(
    x: &Tensor,
    g: Option<&Tensor>,
    mean: Option<&CudaBuf>,
    m: usize,
    c: usize,
    pass: ColPass,
) -> Result<ColPartials> {
    let dev = dev_of(x);
    let rows = rows_per_chunk(m);
    let chunks = m.div_ceil(rows).max(1);
    let part0 = dev.alloc(chunks * c * 8)?;
    let two = pass != ColPass::Sum;
    let part1 = if two { Some(dev.alloc(chunks * c * 8)?) } else { None };
    let k = KernelId::typed(x.dtype(), KernelId::ColPartialsF32, KernelId::ColPartialsBf16);
    dev.launch(
        k,
        (chunks as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(x.ptr()),
            Arg::Ptr(g.map_or(0, |g| g.ptr())),
            Arg::Ptr(mean.map_or(0, |b| b.ptr())),
            Arg::Ptr(part0.ptr()),
            Arg::Ptr(part1.as_ref().map_or(0, |b| b.ptr())),
            Arg::I64(m as i64),
            Arg::I32(c as i32),
            Arg::I64(rows as i64),
            Arg::I32(pass as i32),
        ],
        Cost::mem(nbytes(x) + g.map_or(0, nbytes) + chunks * c * 8 * if two { 2 } else { 1 }),
    )?;
    Ok(ColPartials { part0, part1, chunks })
}

/// out_d[c] (f64) and/or out_f[c] (f32) = scale · Σ_chunks part[chunk, c].
pub fn reduce_chunks(
    dev: &Arc<CudaDevice>,
    part: &CudaBuf,
    chunks: usize,
    c: usize,
    scale: f64,
    out_d: Option<u64>,
    out_f: Option<u64>,
) -> Result<()> {
    reduce_chunks_acc(dev, part, chunks, c, scale, out_d, out_f, None)
}

/// `reduce_chunks` with out_f[c] = acc[c] + (f32) scale · Σ (an accumulated f32 [C] gradient).
#[allow(clippy::too_many_arguments)]
pub fn reduce_chunks_acc(
    dev: &Arc<CudaDevice>,
    part: &CudaBuf,
    chunks: usize,
    c: usize,
    scale: f64,
    out_d: Option<u64>,
    out_f: Option<u64>,
    acc: Option<&Tensor>,
) -> Result<()> {
    dev.launch_1d(
        KernelId::ReduceChunks,
        c,
        &[
            Arg::Ptr(part.ptr()),
            Arg::I32(chunks as i32),
            Arg::I32(c as i32),
            Arg::F64(scale),
            Arg::Ptr(out_d.unwrap_or(0)),
            Arg::Ptr(out_f.unwrap_or(0)),
            Arg::Ptr(acc.map_or(0, |a| a.ptr())),
        ],
        Cost::mem((chunks + 1) * c * 8 + acc.map_or(0, nbytes)),
    )
}

/// Σ over rows of x viewed as [M, C], as an f32 [C] tensor (bias gradients).
pub fn col_sum(x: &Tensor, c: usize) -> Result<Tensor> {
    col_sum_acc(x, c, None)
}

/// `col_sum` plus an accumulated f32 [C] gradient.
pub fn col_sum_acc(x: &Tensor, c: usize, acc: Option<&Tensor>) -> Result<Tensor> {
    let m = x.numel() / c;
    let dev = dev_of(x);
    let p = col_partials(x, None, None, m, c, ColPass::Sum)?;
    let out = empty(dev, &[c], DType::F32)?;
    reduce_chunks_acc(dev, &p.part0, p.chunks, c, 1.0, None, Some(out.ptr()), acc)?;
    Ok(out)
}
