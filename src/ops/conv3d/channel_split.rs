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

/// Whether this path should run: a SIMD kernel set, at least 64 output channels, an im2col
/// matrix of all voxels of at most 16 MiB, and not a volume the shifted path does better: lines
/// of Z ≥ 4 with at most 64 output channels (docs/performance.md, CPU kernel choices).
pub fn applicable(v: Vol, co: usize, k: usize, kernels: CpuKernels) -> bool {
    let shifted_better = v.z >= 4 && co <= 2 * CHANNELS && super::shifted::applicable(v, k);
    cfg!(target_arch = "x86_64")
        && kernels.simd()
        && co >= 2 * CHANNELS
        && !shifted_better
        && v.voxels() * valid_taps(v, k).len() * v.c * 4 <= MAX_COLS_BYTES
}

/// y = conv(x, w) + bias, `w` [Co, k, k, k, Ci].
#[cfg(target_arch = "x86_64")]
pub fn forward(
    x: &[f32],
    v: Vol,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    k: usize,
    kernels: CpuKernels,
) -> Vec<f32> {
    assert_eq!(w.len(), co * k * k * k * v.c, "conv3d: weight size");
    run(x, v, Weight::Natural(w), bias, co, k, kernels)
}

/// The input gradient dx [N, X, Y, Z, Ci] = conv(dy, w_flip) of a convolution with weight `w`
/// [Co, k, k, k, Ci] (w_flip[i, t, o] = w[o, k³−1−t, i]), `dy` [N, X, Y, Z, Co] (v_out.c = Co).
/// The flipped kernel is never built: a task's transposed weight columns are rows of `w`.
#[cfg(target_arch = "x86_64")]
pub fn input_grad(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    assert_eq!(w.len(), v_out.c * k * k * k * ci, "conv3d backward: weight size");
    run(dy, v_out, Weight::Flipped(w), None, ci, k, kernels)
}

/// Where the path reads its weights (also the shifted input gradient's flipped operand).
#[derive(Clone, Copy)]
pub(super) enum Weight<'a> {
    /// The convolution's own w [Co, k³, Ci].
    Natural(&'a [f32]),
    /// The input gradient's flipped kernel, read from the forward weight w [Co_f, k³, Ci_f]:
    /// this convolution's input channels are Co_f (dy's), its output channels Ci_f (dx's).
    Flipped(&'a [f32]),
}

impl Weight<'_> {
    /// Output channels c0..c0 + n of Wᵀ over `taps`, padded to `width`:
    /// bt[(j·Ci + i)·width + o] = W[c0 + o, taps[j], i] (zero for o ≥ n).
    pub(super) fn transposed_columns(
        self,
        taps: &[usize],
        k3: usize,
        ci: usize,
        c0: usize,
        n: usize,
        width: usize,
    ) -> Vec<f32> {
        let mut bt = vec![0.0f32; taps.len() * ci * width];
        match self {
            // Blocks of 16 reduction indices: per output channel o, one contiguous read of 16
            // weights (a cache line) scattered into the block's 16 rows of bt (2 KiB, in L1).
            // A strided gather of one weight per output channel per index was 27 % of the
            // convolution's time at 4×4×2 with 128 channels.
            Weight::Natural(w) => {
                const IB: usize = 16;
                for (j, &tap) in taps.iter().enumerate() {
                    for i0 in (0..ci).step_by(IB) {
                        let ib = IB.min(ci - i0);
                        let dst = &mut bt[(j * ci + i0) * width..(j * ci + i0 + ib) * width];
                        for o in 0..n {
                            let src = &w[((c0 + o) * k3 + tap) * ci + i0..][..ib];
                            for (d, &val) in dst.chunks_exact_mut(width).zip(src) {
                                d[o] = val;
                            }
                        }
                    }
                }
            }
            // W[c0 + o, j, i] = w[i, k³−1−taps[j], c0 + o]: each row of bt is n contiguous
            // values of w, a copy.
            Weight::Flipped(w) => {
                let ci_f = w.len() / (k3 * ci); // dx's channels, w's last axis
                for (j, &tap) in taps.iter().enumerate() {
                    for i in 0..ci {
                        let src = &w[(i * k3 + k3 - 1 - tap) * ci_f + c0..][..n];
                        bt[(j * ci + i) * width..][..n].copy_from_slice(src);
                    }
                }
            }
        }
        bt
    }
}

/// The path: y [N, X, Y, Z, Co] = conv(x, W) + bias.
#[cfg(target_arch = "x86_64")]
fn run(x: &[f32], v: Vol, w: Weight, bias: Option<&[f32]>, co: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    let (ci, m) = (v.c, v.voxels());
    let taps = valid_taps(v, k);
    let kdim = taps.len() * ci;
    // The im2col matrix of every voxel, rows built in parallel.
    let mut cols = vec![0.0f32; m * kdim];
    const ROWS: usize = 64;
    cols.par_chunks_mut(ROWS * kdim)
        .enumerate()
        .for_each(|(b, chunk)| im2col(x, v, k, &taps, b * ROWS, chunk.len() / kdim, chunk));
    super::avx2::check_rows(cols.len(), kdim, &[0], kdim, 0, m);
    let mut y = vec![0.0f32; m * co];
    let yp = SyncPtr(y.as_mut_ptr());
    (0..co.div_ceil(CHANNELS)).into_par_iter().for_each(|task| {
        let (c0, c1) = (task * CHANNELS, ((task + 1) * CHANNELS).min(co));
        let (n, width) = (c1 - c0, (c1 - c0).next_multiple_of(8));
        let bt = w.transposed_columns(&taps, k * k * k, ci, c0, n, width);
        let mut b = vec![0.0f32; width];
        if let Some(bias) = bias {
            b[..n].copy_from_slice(&bias[c0..c1]);
        }
        let mut out = vec![0.0f32; m * width];
        // SAFETY: the kernel set is available (the caller checked); rows 0..m of `cols` are in
        // bounds (assert above); bt holds kdim·width values and b width.
        let g = super::RowGemm::dense(&cols, kdim, &bt, width, &b);
        unsafe { kernels.forward_rows(&g, 0, &mut out) };
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
