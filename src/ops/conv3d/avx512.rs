//! AVX-512 register-tiled micro-kernels of the CPU convolutions: the same three operations, on
//! the same operands and with the same bits, as `avx2.rs` (see its header for the operand
//! layout), with 16-lane zmm registers and twice the register file.
//!
//! - `forward_ztaps`: the shifted 3×3×3 forward, tiles of up to 24 rows × 16 channels or 12
//!   rows × 32 channels; each broadcast input value serves its three z-taps (see
//!   `shifted.rs`), 0.3–0.5 loads per FMA.
//! - `forward_rows` (im2col and channel-split paths): out[i, :] = bias + Σ_t Σ_k a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
//!   (written =). Tiles of up to 14 rows × 16 channels (14 accumulators) or 14 rows × 32
//!   channels (28 accumulators) over the whole reduction: per reduction index, one or two
//!   loads of the weight row and one broadcast per row feed 14 or 28 FMAs, so the FMA ports,
//!   not the loads, bound the loop (oneDNN's direct-convolution blocking for channels-last
//!   data with few channels: rows of output voxels × a 16-wide channel block).
//! - `weight_grad_runs`: dW[o, t·kk + k] += Σ_runs a[(row + offs[t])·rs + k] · dy[voxel·co + o]
//!   (accumulated +=) on `WeightGradPlan`'s tiles: up to 4 vectors of 16 reduction indices × up to 16
//!   output channels (6 to 16 at 4 to 1 vectors), ≤ 24 accumulators.
//!
//! `cop` (padded output channels) is a multiple of 8: a last block of 8 channels runs with
//! masked loads and stores. Callers check AVX-512F support (`available`) and the bounds
//! (`avx2::check_rows`); the kernels are pointer arithmetic over those buffers.

// Register tiles and lanes are indexed by position on purpose: the indices are the tile's
// coordinates, shared across several arrays.
#![allow(clippy::needless_range_loop)]
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::weight_grad_plan::WeightGradPlan;

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

/// `RowGemm`'s product for the rows r0.. of `out` ([nr, g.cols]).
///
/// # Safety
/// AVX-512F and FMA must be available; `avx2::check_rows(g.a.len(), g.row_stride, g.tap_offsets, g.k_per_tap, r0, r0 + nr)`
/// must hold, `g.b_t` must hold tap_offsets.len()·k_per_tap·cols values and `g.bias` cols values.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn forward_rows(g: &super::RowGemm, r0: usize, out: &mut [f32]) {
    let super::RowGemm { a, row_stride: rs, tap_offsets: offs, k_per_tap: kk, b_t: bt, cols: cop, bias } = *g;
    let nr = out.len() / cop;
    debug_assert!(bt.len() >= offs.len() * kk * cop && bias.len() >= cop && cop.is_multiple_of(8));
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
                let args =
                    FwdArgs { xp, ci: rs, offs, kk, bt, cop, bias, r: r0 + i, cb, out: o.add(i * cop), mask, j0, j1 };
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

/// A forward tile's N × V accumulators at the start of a reduction block: the bias in every
/// row for the first block (`first`), else the partial sums the previous block left in `out`
/// (rows of `cop` values, channels cb..).
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn tile_start<const N: usize, const V: usize>(
    first: bool,
    bias: *const f32,
    out: *const f32,
    cop: usize,
    cb: usize,
    mask: u16,
) -> [[__m512; V]; N] {
    let mut acc = [[_mm512_setzero_ps(); V]; N];
    if first {
        for v in 0..V {
            let b = _mm512_maskz_loadu_ps(lanes(v, V - 1, mask), bias.add(cb + 16 * v));
            for a in acc.iter_mut() {
                a[v] = b;
            }
        }
    } else {
        for (i, a) in acc.iter_mut().enumerate() {
            for v in 0..V {
                a[v] = _mm512_maskz_loadu_ps(lanes(v, V - 1, mask), out.add(i * cop + cb + 16 * v));
            }
        }
    }
    acc
}

/// Store a forward tile's accumulators to its rows of `out` (the last vector masked).
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn tile_store<const N: usize, const V: usize>(
    acc: &[[__m512; V]; N],
    out: *mut f32,
    cop: usize,
    cb: usize,
    mask: u16,
) {
    for (i, a) in acc.iter().enumerate() {
        for v in 0..V {
            _mm512_mask_storeu_ps(out.add(i * cop + cb + 16 * v), lanes(v, V - 1, mask), a[v]);
        }
    }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn fwd_tile<const N: usize, const V: usize>(p: &FwdArgs) {
    let mut acc = tile_start::<N, V>(p.j0 == 0, p.bias, p.out, p.cop, p.cb, p.mask);
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
    tile_store(&acc, p.out, p.cop, p.cb, p.mask);
}

/// The most output channels a tile of 1, 2, 3, 4 vectors holds (≤ 24 accumulators + A + 1 of
/// the 32 zmm registers).
pub const WG_MAX_B: [usize; 4] = [16, 12, 8, 6];

/// dw[o·ldw + t·kk + k] += Σ_{(row, voxel, len) ∈ runs} Σ_{j < len} a[(row + j + offs[t])·rs + k] ·
/// dy[(voxel + j)·co + o] (accumulated +=), ldw = offs.len()·kk: `WeightGradPlan`'s tiles (built with
/// 16 lanes and `WG_MAX_B`), each a register tile over a block of runs.
///
/// # Safety
/// AVX-512F and FMA must be available and `plan.check(a.len(), dy.len(), dw.len())` must hold.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn weight_grad_runs(a: &[f32], dy: &[f32], dw: &mut [f32], plan: &WeightGradPlan) {
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

/// Rows of the shifted forward's register tile with 1 or 2 zmm per row: N·V accumulators,
/// 3·V weight registers and the broadcast input value within the 32 zmm registers.
pub const ZT_ROWS: [usize; 2] = [24, 12];

/// The shifted 3×3×3 forward with z-tap reuse over `runs` of consecutive virtual rows (see
/// `shifted::ztap_tiles` for the order): out[o, :] = bias + Σ_t Σ_ci Σ_c
/// xp[(r + c + offs[t])·ci + ci'] · bt[(t·3ci + c·ci + ci')·cop + :] (written =), out holding
/// the runs' rows one after another ([Σ len, cop], cop a multiple of 8; every element is
/// written, so `out` may start uninitialised).
///
/// # Safety
/// AVX-512F and FMA must be available; for every run, `avx2::check_rows(xp.len(), ci, offs,
/// 3·ci, row, row + len)` must hold; `bt` must hold offs.len()·3·ci·cop values (one [3·ci,
/// cop] block per tap group t: 9 for the shifted forward, 3 for the Winograd one), `bias` cop
/// values and `out` Σ len · cop.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn forward_ztaps(
    xp: &[f32],
    ci: usize,
    offs: &[usize],
    bt: &[f32],
    cop: usize,
    bias: &[f32],
    runs: &[(usize, usize)],
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    debug_assert!(bt.len() >= offs.len() * 3 * ci * cop && bias.len() >= cop && cop.is_multiple_of(8));
    debug_assert!(out.len() >= runs.iter().map(|r| r.1).sum::<usize>() * cop);
    let (xp, bt, bias, o) = (xp.as_ptr(), bt.as_ptr(), bias.as_ptr(), out.as_mut_ptr().cast::<f32>());
    // The tiles depend on the block's width only (1 or 2 vectors): planned once per width.
    let mut plans: [Option<Vec<super::shifted::ZtapTile>>; 2] = [None, None];
    for (cb, v, mask) in channel_blocks(cop) {
        for &tile in plans[v - 1]
            .get_or_insert_with(|| super::shifted::ztap_tiles(runs, offs.len(), ci, 16 * v, ZT_ROWS[v - 1]))
            .iter()
        {
            let args = ZtArgs {
                xp,
                ci,
                offs,
                bt,
                cop,
                bias,
                r: tile.row,
                cb,
                out: o.add(tile.out_row * cop),
                mask,
                u0: tile.u0,
                u1: tile.u1,
            };
            macro_rules! tile {
                ([$($one:literal),*], [$($two:literal),*]) => {
                    match (tile.rows, v) {
                        $(($one, 1) => zt_tile::<$one, 1>(&args),)*
                        $(($two, 2) => zt_tile::<$two, 2>(&args),)*
                        (n, v) => unreachable!("z-tap tile of {n} rows x {v} vectors"),
                    }
                };
            }
            tile!(
                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
            );
        }
    }
}

struct ZtArgs<'a> {
    xp: *const f32,
    ci: usize,
    offs: &'a [usize],
    bt: *const f32,
    cop: usize,
    bias: *const f32,
    /// First virtual row of the tile.
    r: usize,
    cb: usize,
    out: *mut f32,
    mask: u16,
    /// Reduction steps u0..u1 (u = t·ci + ci'); the first starts from the bias, later ones
    /// from the partial sums in `out`.
    u0: usize,
    u1: usize,
}

/// N rows × V vectors: per reduction step (t, ci'), the 3·V weight vectors of the z-taps
/// c = 0, 1, 2 and N + 2 broadcasts; input row q feeds output rows q, q − 1, q − 2. That is
/// 0.3–0.5 loads per FMA, against 1.1 for a tile broadcasting each (row, tap) value once per
/// use.
#[target_feature(enable = "avx512f,fma")]
unsafe fn zt_tile<const N: usize, const V: usize>(p: &ZtArgs) {
    let mut acc = tile_start::<N, V>(p.u0 == 0, p.bias, p.out, p.cop, p.cb, p.mask);
    let ci = p.ci;
    let mut u = p.u0;
    while u < p.u1 {
        let t = u / ci;
        let k1 = ci.min(u - t * ci + (p.u1 - u));
        let a_base = p.xp.add((p.r + p.offs[t]) * ci);
        let b_base = p.bt.add(t * 3 * ci * p.cop + p.cb);
        for k in u - t * ci..k1 {
            let mut w = [[_mm512_setzero_ps(); V]; 3];
            for (c, wc) in w.iter_mut().enumerate() {
                for v in 0..V {
                    wc[v] = _mm512_maskz_loadu_ps(lanes(v, V - 1, p.mask), b_base.add((c * ci + k) * p.cop + 16 * v));
                }
            }
            let a = a_base.add(k);
            // Input rows q = 0..N + 2, unrolled by hand: a loop of N + 2 (up to 26) steps is
            // past LLVM's full-unroll threshold, and a rolled loop keeps `acc` in memory.
            macro_rules! row {
                ($($q:literal)*) => {$(
                    if $q < N + 2 {
                        let x = _mm512_set1_ps(*a.add($q * ci));
                        for (c, wc) in w.iter().enumerate() {
                            if $q >= c && $q - c < N {
                                for v in 0..V {
                                    acc[$q - c][v] = _mm512_fmadd_ps(x, wc[v], acc[$q - c][v]);
                                }
                            }
                        }
                    }
                )*};
            }
            row!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25);
        }
        u += k1 - (u - t * ci);
    }
    tile_store(&acc, p.out, p.cop, p.cb, p.mask);
}
