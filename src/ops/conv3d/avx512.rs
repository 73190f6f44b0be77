//! AVX-512 register-tiled micro-kernels of the CPU convolutions: the same two operations, on
//! the same operands and with the same results up to summation order, as `avx2.rs` (see its
//! header for the operand layout), with 16-lane zmm registers and twice the register file.
//!
//! - `forward_rows`: out[i, :] = bias + Σ_t Σ_k a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
//!   (written =). Tiles of up to 14 rows × 16 channels (14 accumulators) or 14 rows × 32
//!   channels (28 accumulators) over the whole reduction: per reduction index, one or two
//!   loads of the weight row and one broadcast per row feed 14 or 28 FMAs, so the FMA ports,
//!   not the loads, bound the loop (oneDNN's direct-convolution blocking for channels-last
//!   data with few channels: rows of output voxels × a 16-wide channel block).
//! - `weight_grad_runs`: dW[o, t·kk + k] += Σ_runs a[(row + offs[t])·rs + k] · dy[voxel·co + o]
//!   (accumulated +=) on `WgPlan`'s tiles: up to 4 vectors of 16 reduction indices × up to 16
//!   output channels (6 to 16 at 4 to 1 vectors), ≤ 24 accumulators.
//!
//! `cop` (padded output channels) is a multiple of 8: a last block of 8 channels runs with
//! masked loads and stores. Callers check AVX-512F support (`available`) and the bounds
//! (`avx2::check_rows`); the kernels are pointer arithmetic over those buffers.
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::wg_plan::WgPlan;

/// Rows of the forward's register tile.
const R: usize = 14;

/// Whether these kernels can run on this processor.
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
}

/// The channel blocks of a row of `cop` channels: (first channel, zmm registers, lane mask of
/// the last register). 32-channel blocks while they fit, then 16, then a masked 8.
fn channel_blocks(cop: usize) -> Vec<(usize, usize, u16)> {
    let mut out = Vec::new();
    let mut cb = 0;
    while cb < cop {
        let rem = cop - cb;
        let (v, mask, width) = if rem >= 32 {
            (2, 0xFFFF, 32)
        } else if rem >= 16 {
            (1, 0xFFFF, 16)
        } else {
            (1, 0x00FF, 8)
        };
        out.push((cb, v, mask));
        cb += width;
    }
    out
}

/// out[i, :] = bias + Σ_t Σ_{k<kk} a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
/// for the rows of `out` ([nr, cop], cop a multiple of 8).
///
/// # Safety
/// AVX-512F and FMA must be available; `avx2::check_rows(a.len(), rs, offs, kk, r0, r0 + nr)`
/// must hold, `bt` must hold offs.len()·kk·cop values and `bias` cop values.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn forward_rows(a: &[f32], rs: usize, offs: &[usize], kk: usize, bt: &[f32], cop: usize, bias: &[f32], r0: usize, out: &mut [f32]) {
    let nr = out.len() / cop;
    debug_assert!(bt.len() >= offs.len() * kk * cop && bias.len() >= cop && cop % 8 == 0);
    let (xp, bt, bias, o) = (a.as_ptr(), bt.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
    let total = offs.len() * kk;
    for (cb, v, mask) in channel_blocks(cop) {
        // The reduction in blocks of KB indices, each applied to every row tile before the
        // next: a block's weight rows stay in cache for all tiles instead of every tile
        // streaming the whole weight matrix (coarse levels: 7 MB of weights). Tiles keep their
        // partial sums in `out` between blocks; each sum takes the same FMAs in the same
        // order, so the results are those of one pass (and of `avx2.rs`).
        let mut j0 = 0;
        while j0 < total.max(1) {
            let j1 = (j0 + KB).min(total);
            let mut i = 0;
            while i < nr {
                // Balanced tiles (a run of 16 rows as 8 + 8, not 14 + 2): each row's sum is the same.
                let rows = (nr - i).div_ceil((nr - i).div_ceil(R));
                let args = FwdArgs { xp, ci: rs, offs, kk, bt, cop, bias, r: r0 + i, cb, out: o.add(i * cop), mask, j0, j1 };
                macro_rules! tile {
                    ($($n:literal),*) => {
                        match (rows, v) {
                            $(($n, 2) => fwd_tile::<$n, 2>(&args), ($n, _) => fwd_tile::<$n, 1>(&args),)*
                            _ => unreachable!(),
                        }
                    };
                }
                tile!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
                i += rows;
            }
            j0 = j1.max(j0 + 1);
        }
    }
}

/// Reduction indices per block of `forward_rows`: 2048 weight rows of a 32-channel block are
/// 256 KiB, an L2-resident block.
pub const KB: usize = 2048;

struct FwdArgs<'a> {
    xp: *const f32,
    ci: usize,
    offs: &'a [usize],
    kk: usize,
    bt: *const f32,
    cop: usize,
    bias: *const f32,
    r: usize,
    cb: usize,
    out: *mut f32,
    mask: u16,
    /// Reduction indices j0..j1 (j = t·kk + k) of this pass; the first starts from the bias,
    /// later ones from the partial sums in `out`.
    j0: usize,
    j1: usize,
}

/// The lane mask of register `v` of `V` (only the last one may be partial).
#[inline(always)]
fn lanes(v: usize, last: usize, mask: u16) -> u16 {
    if v == last { mask } else { 0xFFFF }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn fwd_tile<const N: usize, const V: usize>(p: &FwdArgs) {
    let mut acc = [[_mm512_setzero_ps(); V]; N];
    if p.j0 == 0 {
        for v in 0..V {
            let b = _mm512_maskz_loadu_ps(lanes(v, V - 1, p.mask), p.bias.add(p.cb + 16 * v));
            for a in acc.iter_mut() {
                a[v] = b;
            }
        }
    } else {
        for (i, a) in acc.iter_mut().enumerate() {
            for v in 0..V {
                a[v] = _mm512_maskz_loadu_ps(lanes(v, V - 1, p.mask), p.out.add(i * p.cop + p.cb + 16 * v));
            }
        }
    }
    let mut j = p.j0;
    while j < p.j1 {
        let t = j / p.kk;
        let (k0, k1) = (j - t * p.kk, p.kk.min(j - t * p.kk + (p.j1 - j)));
        j += k1 - k0;
        let a_base = p.xp.add((p.r + p.offs[t]) * p.ci);
        let b_base = p.bt.add(t * p.kk * p.cop + p.cb);
        for k in k0..k1 {
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_maskz_loadu_ps(lanes(v, V - 1, p.mask), b_base.add(k * p.cop + 16 * v));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a_base.add(i * p.ci + k));
                for v in 0..V {
                    a[v] = _mm512_fmadd_ps(x, bv[v], a[v]);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for v in 0..V {
            _mm512_mask_storeu_ps(p.out.add(i * p.cop + p.cb + 16 * v), lanes(v, V - 1, p.mask), a[v]);
        }
    }
}

/// The most output channels a tile of 1, 2, 3, 4 vectors holds (≤ 24 accumulators + A + 1 of
/// the 32 zmm registers).
pub const WG_MAX_B: [usize; 4] = [16, 12, 8, 6];

/// dw[o·ldw + t·kk + k] += Σ_{(row, voxel, len) ∈ runs} Σ_{j < len} a[(row + j + offs[t])·rs + k] ·
/// dy[(voxel + j)·co + o] (accumulated +=), ldw = offs.len()·kk: `WgPlan`'s tiles (built with
/// 16 lanes and `WG_MAX_B`), each a register tile over a block of runs.
///
/// # Safety
/// AVX-512F and FMA must be available and `plan.check(a.len(), dy.len(), dw.len())` must hold.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn weight_grad_runs(a: &[f32], dy: &[f32], dw: &mut [f32], plan: &WgPlan) {
    let (ap, dyp, dwp) = (a.as_ptr(), dy.as_ptr(), dw.as_mut_ptr());
    for tile in plan.tiles(16) {
        let args = WgArgs {
            a: ap.add(tile.a),
            rs: plan.rs,
            runs: tile.runs,
            dy: dyp.add(tile.dy),
            co: plan.co,
            dw: dwp.add(tile.dw),
            ldw: plan.ldw(),
            mask: (((1u32 << tile.tail) - 1) & 0xFFFF) as u16,
        };
        macro_rules! tile {
            ($($a:literal => [$($b:literal),*]),*) => {
                match (tile.vectors, tile.channels) {
                    $($(($a, $b) => wg_tile::<$a, $b>(&args),)*)*
                    (a, b) => unreachable!("weight-gradient tile {a}x{b}"),
                }
            };
        }
        tile!(1 => [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], 2 => [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 3 => [1, 2, 3, 4, 5, 6, 7, 8], 4 => [1, 2, 3, 4, 5, 6]);
    }
}

struct WgArgs<'r> {
    a: *const f32,
    rs: usize,
    runs: &'r [(usize, usize, usize)],
    dy: *const f32,
    co: usize,
    dw: *mut f32,
    ldw: usize,
    mask: u16,
}

/// dw[j·ldw + 16·i + :16] += Σ_runs Σ_l a[(row + l)·rs + 16·i + :16] · dy[(voxel + l)·co + j]
/// for i < A, j < B: A·B accumulators, A loads and B broadcasts per row.
#[target_feature(enable = "avx512f,fma")]
unsafe fn wg_tile<const A: usize, const B: usize>(p: &WgArgs) {
    let mut acc = [[_mm512_setzero_ps(); A]; B];
    for (j, row) in acc.iter_mut().enumerate() {
        for (i, a) in row.iter_mut().enumerate() {
            *a = _mm512_maskz_loadu_ps(lanes(i, A - 1, p.mask), p.dw.add(j * p.ldw + 16 * i));
        }
    }
    for &(row, voxel, len) in p.runs {
        let (mut x, mut g) = (p.a.add(row * p.rs), p.dy.add(voxel * p.co));
        for _ in 0..len {
            let mut xv = [_mm512_setzero_ps(); A];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(lanes(i, A - 1, p.mask), x.add(16 * i));
            }
            for (j, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*g.add(j));
                for (a, v) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(*v, b, *a);
                }
            }
            x = x.add(p.rs);
            g = g.add(p.co);
        }
    }
    for (j, row) in acc.iter().enumerate() {
        for (i, a) in row.iter().enumerate() {
            _mm512_mask_storeu_ps(p.dw.add(j * p.ldw + 16 * i), lanes(i, A - 1, p.mask), *a);
        }
    }
}
