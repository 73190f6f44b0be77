//! Forward convolution for few voxels and many channels (the pyramid's coarse levels: 8×8×2
//! at 256 channels, 4×4×1 at 512), on the SIMD kernels.
//!
//! The row-parallel paths give each thread a block of rows, and each block streams the whole
//! weight matrix (7 MB at 256 channels): with 100 voxels the weights are read many times
//! and the arithmetic is a small part of the time. Here the im2col matrix of *all* voxels is
//! built once (over the taps that can reach the volume, `valid_taps`), and the threads split
//! the output channels instead: each packs and transposes its own 32 columns of the weight
//! (no shared transpose pass) and runs `forward_rows` over every row, so every weight is
//! read once. Per output the FMAs are bias, then the reduction in tap-then-channel order, as
//! in the im2col path: the same bits. (The shifted path orders each tap group's reduction
//! channel-then-z-tap, `shifted.rs`: equal to rounding.)
//!
//! Layout: x [N, X, Y, Z, Ci], w [Co, k, k, k, Ci], y [N, X, Y, Z, Co] (written =).

use rayon::prelude::*;

use super::CpuKernels;
use super::im2col::{im2col, valid_taps};
use crate::cpu::SyncPtr;
use crate::tensor::Vol;

/// Output channels per task.
const CHANNELS: usize = 32;
/// Largest im2col matrix (bytes) this path builds.
const MAX_COLS_BYTES: usize = 16 << 20;

/// Whether this path should run: a SIMD kernel set, at least 64 output channels, and an im2col
/// matrix of all voxels of at most 16 MiB.
pub fn applicable(v: Vol, co: usize, k: usize, kernels: CpuKernels) -> bool {
    cfg!(target_arch = "x86_64") && kernels.simd() && co >= 2 * CHANNELS && v.voxels() * valid_taps(v, k).len() * v.c * 4 <= MAX_COLS_BYTES
}

/// y = conv(x, w) + bias, `w` [Co, k, k, k, Ci].
#[cfg(target_arch = "x86_64")]
pub fn forward(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    let k3 = k * k * k;
    assert_eq!(w.len(), co * k3 * v.c, "conv3d: weight size");
    let taps = valid_taps(v, k);
    run(x, v, w, k3 * v.c, &taps, bias, co, k, kernels)
}

/// `forward` with the weight already packed over `valid_taps(v, k)`: `wp` [Co, taps, Ci]
/// (`im2col::pack_weight`, the input gradient's flipped kernel).
#[cfg(target_arch = "x86_64")]
pub fn forward_packed(x: &[f32], v: Vol, wp: &[f32], bias: Option<&[f32]>, co: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    let t = valid_taps(v, k).len();
    assert_eq!(wp.len(), co * t * v.c, "conv3d: packed weight size");
    run(x, v, wp, t * v.c, &(0..t).collect::<Vec<_>>(), bias, co, k, kernels)
}

/// The path, with output channel o's weights for valid tap j at w[o·o_stride + tap_at[j]·Ci + :Ci].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn run(x: &[f32], v: Vol, w: &[f32], o_stride: usize, tap_at: &[usize], bias: Option<&[f32]>, co: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    let (ci, m) = (v.c, v.voxels());
    let taps = valid_taps(v, k);
    let kdim = taps.len() * ci;
    // The im2col matrix of every voxel, rows built in parallel.
    let mut cols = vec![0.0f32; m * kdim];
    const ROWS: usize = 64;
    cols.par_chunks_mut(ROWS * kdim).enumerate().for_each(|(b, chunk)| im2col(x, v, k, &taps, b * ROWS, chunk.len() / kdim, chunk));
    super::avx2::check_rows(cols.len(), kdim, &[0], kdim, 0, m);
    let mut y = vec![0.0f32; m * co];
    let yp = SyncPtr(y.as_mut_ptr());
    (0..co.div_ceil(CHANNELS)).into_par_iter().for_each(|task| {
        let (c0, c1) = (task * CHANNELS, ((task + 1) * CHANNELS).min(co));
        let (n, width) = (c1 - c0, (c1 - c0).next_multiple_of(8));
        // This task's columns of Wᵀ: bt[(j·Ci + i)·width + o] = w[c0 + o, taps[j], i].
        // Written row by row (contiguous), read from n weight rows at once (n cache lines
        // that stay in L1 while i advances): column-wise writes were a cache miss each.
        let mut bt = vec![0.0f32; kdim * width];
        for (j, &tap) in tap_at.iter().enumerate() {
            for i in 0..ci {
                let dst = &mut bt[(j * ci + i) * width..(j * ci + i) * width + n];
                for (o, d) in dst.iter_mut().enumerate() {
                    *d = w[(c0 + o) * o_stride + tap * ci + i];
                }
            }
        }
        let mut b = vec![0.0f32; width];
        if let Some(bias) = bias {
            b[..n].copy_from_slice(&bias[c0..c1]);
        }
        let mut out = vec![0.0f32; m * width];
        // SAFETY: the kernel set is available (the caller checked); rows 0..m of `cols` are in
        // bounds (assert above); bt holds kdim·width values and b width.
        unsafe { kernels.forward_rows(&cols, kdim, &[0], kdim, &bt, width, &b, 0, &mut out) };
        for (r, row) in out.chunks_exact(width).enumerate() {
            // SAFETY: tasks write disjoint columns c0..c1 of y's rows.
            let dst = unsafe { std::slice::from_raw_parts_mut(yp.get().add(r * co + c0), n) };
            dst.copy_from_slice(&row[..n]);
        }
    });
    y
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The same FMAs in the same order as the im2col path: the same bits; the shifted path
    /// sums in another order: equal to rounding (all 27 taps valid).
    #[test]
    fn same_bits_as_the_im2col_path() {
        let Some(&kernels) = CpuKernels::available().iter().find(|k| k.simd()) else { return };
        let v = Vol { n: 1, x: 5, y: 4, z: 3, c: 12 };
        let co = 72;
        let x: Vec<f32> = (0..v.voxels() * v.c).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let w: Vec<f32> = (0..co * 27 * v.c).map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0).collect();
        let b: Vec<f32> = (0..co).map(|i| i as f32 / 7.0).collect();
        assert!(super::super::shifted::applicable(v, 3) && applicable(v, co, 3, kernels));
        let a = forward(&x, v, &w, Some(&b), co, 3, kernels);
        let taps = valid_taps(v, 3);
        let wp = super::super::im2col::pack_weight(&w, co, v.c, 3, &taps, false);
        let i = super::super::im2col::forward(&x, v, &wp, &taps, Some(&b), co, 3, kernels);
        assert!(a.iter().zip(&i).all(|(p, q)| p.to_bits() == q.to_bits()));
        let s = super::super::shifted::forward(&x, v, &w, Some(&b), co, kernels);
        let norm = |d: &mut dyn Iterator<Item = f32>| d.map(|e| (e as f64).powi(2)).sum::<f64>().sqrt();
        let rel = norm(&mut a.iter().zip(&s).map(|(p, q)| p - q)) / norm(&mut s.iter().copied());
        assert!(rel < 1e-6, "channel split and shifted differ beyond rounding: {rel:e}");
    }
}
