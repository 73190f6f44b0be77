//! AVX2 + FMA register-tiled micro-kernels of the CPU convolutions.
//!
//! Both kernels read a row-structured operand `a` in which row r, tap group t, reduction index
//! k is `a[(r + offs[t])·rs + k]`: for the shifted 3×3×3 path `a` is the padded input
//! (rs = C, 9 tap groups of 3·C contiguous values), for the im2col path `a` is an im2col
//! block (rs = K, one group, offs = [0]). Output channels are padded to `cop`, a multiple of 8.
//!
//! - `forward_ztaps`: the shifted 3×3×3 forward over runs of virtual rows of the padded input,
//!   tiles of up to 11 rows × 8 channels, each broadcast input value used for its three z-taps
//!   (see `shifted.rs`); the same FMAs in the same order as `avx512::forward_ztaps`.
//! - `forward_rows` (im2col and channel-split paths): out[i, :] = bias + Σ_t Σ_k a[(r0 + i + offs[t])·rs + k] · bt[(t·kk + k)·cop + :]
//!   (written =), tiles of 6 rows × 16 channels held in 12 ymm registers over the whole
//!   reduction, so each output is stored once.
//! - `weight_grad_runs`: dW[o, t·kk + k] += Σ_runs a[(row + offs[t])·rs + k] · dy[voxel·co + o]
//!   (accumulated +=) on `WeightGradPlan`'s tiles (see `weight_grad_plan.rs`): up to 3 vectors of 8 reduction
//!   indices × up to 8 output channels, ≤ 12 accumulators.
//!
//! Callers check AVX2/FMA support (`available`) and that every index is in bounds; the
//! kernels are pointer arithmetic over those buffers, so per-operation unsafe blocks would
//! only add noise.

// Register tiles and lanes are indexed by position on purpose: the indices are the tile's
// coordinates, shared across several arrays.
#![allow(clippy::needless_range_loop)]
#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;

use super::weight_grad_plan::WeightGradPlan;

/// Rows of the register tile.
const R: usize = 6;

/// Whether these kernels can run on this processor.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Panics unless every read of rows r0..r1 stays inside `a` (len) .
pub fn check_rows(a_len: usize, rs: usize, offs: &[usize], kk: usize, r0: usize, r1: usize) {
    let max_off = offs.iter().copied().max().unwrap_or(0);
    assert!(r1 <= r0 || (r1 - 1 + max_off) * rs + kk <= a_len, "conv kernel: rows {r0}..{r1} read past the operand");
}

/// `RowGemm`'s product for the rows r0.. of `out` ([nr, g.cols]).
///
/// # Safety
/// AVX2 and FMA must be available; `avx2::check_rows(g.a.len(), g.row_stride, g.tap_offsets, g.k_per_tap, r0, r0 + nr)`
/// must hold, `g.b_t` must hold tap_offsets.len()·k_per_tap·cols values and `g.bias` cols values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn forward_rows(g: &super::RowGemm, r0: usize, out: &mut [f32]) {
    let super::RowGemm { a, row_stride: rs, tap_offsets: offs, k_per_tap: kk, b_t: bt, cols: cop, bias } = *g;
    let nr = out.len() / cop;
    debug_assert!(bt.len() >= offs.len() * kk * cop && bias.len() >= cop && cop.is_multiple_of(8));
    let (xp, ci) = (a, rs);
    let (xp, bt, bias, o) = (xp.as_ptr(), bt.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
    let mut cb = 0;
    while cb < cop {
        let two = cop - cb >= 16;
        let mut i = 0;
        while i < nr {
            // Balanced tiles (a run of 16 rows as 8 + 8, not 14 + 2): each row's sum is the same.
            let rows = (nr - i).div_ceil((nr - i).div_ceil(R));
            let args = (xp, ci, offs, kk, bt, cop, bias, r0 + i, cb, o.add(i * cop));
            macro_rules! tile {
                ($($n:literal),*) => {
                    match (rows, two) {
                        $(($n, true) => fwd_tile::<$n, 2>(args), ($n, false) => fwd_tile::<$n, 1>(args),)*
                        _ => unreachable!(),
                    }
                };
            }
            tile!(1, 2, 3, 4, 5, 6);
            i += rows;
        }
        cb += if two { 16 } else { 8 };
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile<const N: usize, const V: usize>(
    args: (*const f32, usize, &[usize], usize, *const f32, usize, *const f32, usize, usize, *mut f32),
) {
    let (xp, ci, offs, kk, bt, cop, bias, r, cb, out) = args;
    let mut acc = [[_mm256_setzero_ps(); V]; N];
    for v in 0..V {
        let b = _mm256_loadu_ps(bias.add(cb + 8 * v));
        for a in acc.iter_mut() {
            a[v] = b;
        }
    }
    for (t, &off) in offs.iter().enumerate() {
        let a_base = xp.add((r + off) * ci);
        let b_base = bt.add(t * kk * cop + cb);
        for k in 0..kk {
            let mut bv = [_mm256_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm256_loadu_ps(b_base.add(k * cop + 8 * v));
            }
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a_base.add(i * ci + k));
                for v in 0..V {
                    a[v] = _mm256_fmadd_ps(x, bv[v], a[v]);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for v in 0..V {
            _mm256_storeu_ps(out.add(i * cop + cb + 8 * v), a[v]);
        }
    }
}

/// The most output channels a tile of 1, 2, 3 vectors holds (A·B accumulators + A + 1 of the
/// 16 ymm registers).
pub const WG_MAX_B: [usize; 3] = [8, 6, 4];

/// dw[o·ldw + t·kk + k] += Σ_{(row, voxel, len) ∈ runs} Σ_{j < len} a[(row + j + offs[t])·rs + k] ·
/// dy[(voxel + j)·co + o] (accumulated +=), ldw = offs.len()·kk: `WeightGradPlan`'s tiles (built with
/// 8 lanes and `WG_MAX_B`), each a register tile over a block of runs.
///
/// # Safety
/// AVX2 and FMA must be available and `plan.check(a.len(), dy.len(), dw.len())` must hold.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weight_grad_runs(a: &[f32], dy: &[f32], dw: &mut [f32], plan: &WeightGradPlan) {
    let (ap, dyp, dwp) = (a.as_ptr(), dy.as_ptr(), dw.as_mut_ptr());
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for tile in plan.tiles(8) {
        let args = WgArgs {
            a: ap.add(tile.a),
            rs: plan.rs,
            runs: tile.runs,
            dy: dyp.add(tile.dy),
            co: plan.co,
            dw: dwp.add(tile.dw),
            ldw: plan.ldw(),
            tail: tile.tail,
            mask: _mm256_cmpgt_epi32(_mm256_set1_epi32(tile.tail as i32), lane),
        };
        macro_rules! tile {
            ($($a:literal => [$($b:literal),*]),*) => {
                match (tile.vectors, tile.channels) {
                    $($(($a, $b) => wg_tile::<$a, $b>(&args),)*)*
                    (a, b) => unreachable!("weight-gradient tile {a}x{b}"),
                }
            };
        }
        tile!(1 => [1, 2, 3, 4, 5, 6, 7, 8], 2 => [1, 2, 3, 4, 5, 6], 3 => [1, 2, 3, 4]);
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
    /// Valid lanes of the last vector, and their mask.
    tail: usize,
    mask: __m256i,
}

/// Load 8 values at `p`, only the masked lanes when `i` is the tile's last vector and it is
/// partial (the others read as 0 and are never touched in memory).
#[inline(always)]
unsafe fn load(p: *const f32, last: bool, args: &WgArgs) -> __m256 {
    if last && args.tail < 8 { _mm256_maskload_ps(p, args.mask) } else { _mm256_loadu_ps(p) }
}

/// dw[j·ldw + 8·i + :8] += Σ_runs Σ_l a[(row + l)·rs + 8·i + :8] · dy[(voxel + l)·co + j]
/// for i < A, j < B: A·B accumulators, A loads and B broadcasts per row.
#[target_feature(enable = "avx2,fma")]
unsafe fn wg_tile<const A: usize, const B: usize>(p: &WgArgs) {
    let mut acc = [[_mm256_setzero_ps(); A]; B];
    for (j, row) in acc.iter_mut().enumerate() {
        for (i, a) in row.iter_mut().enumerate() {
            *a = load(p.dw.add(j * p.ldw + 8 * i), i + 1 == A, p);
        }
    }
    for &(row, voxel, len) in p.runs {
        let (mut x, mut g) = (p.a.add(row * p.rs), p.dy.add(voxel * p.co));
        for _ in 0..len {
            let mut xv = [_mm256_setzero_ps(); A];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = load(x.add(8 * i), i + 1 == A, p);
            }
            for (j, row) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*g.add(j));
                for (a, v) in row.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(*v, b, *a);
                }
            }
            x = x.add(p.rs);
            g = g.add(p.co);
        }
    }
    for (j, row) in acc.iter().enumerate() {
        for (i, a) in row.iter().enumerate() {
            let d = p.dw.add(j * p.ldw + 8 * i);
            if i + 1 == A && p.tail < 8 {
                _mm256_maskstore_ps(d, p.mask, *a);
            } else {
                _mm256_storeu_ps(d, *a);
            }
        }
    }
}

/// Rows of the shifted forward's register tile: 11 accumulators, 3 weight registers and the
/// broadcast input value within the 16 ymm registers.
pub const ZT_ROWS: usize = 11;

/// The shifted 3×3×3 forward with z-tap reuse over `runs` of consecutive virtual rows, in
/// 8-channel blocks: the same operation, FMAs and order as `avx512::forward_ztaps` (see its
/// contract), so the same bits.
///
/// # Safety
/// As `avx512::forward_ztaps`, with AVX2 and FMA instead of AVX-512F.
#[target_feature(enable = "avx2,fma")]
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
    let tiles = super::shifted::ztap_tiles(runs, offs.len(), ci, 8, ZT_ROWS); // every block is 8 wide
    for cb in (0..cop).step_by(8) {
        for &tile in &tiles {
            let args = (xp, ci, offs, bt, cop, bias, tile.row, cb, o.add(tile.out_row * cop), tile.u0, tile.u1);
            macro_rules! tile {
                ($($n:literal),*) => {
                    match tile.rows {
                        $($n => zt_tile::<$n>(args),)*
                        n => unreachable!("z-tap tile of {n} rows"),
                    }
                };
            }
            tile!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
        }
    }
}

/// N rows × 8 channels: per reduction step (t, ci'), the 3 weight vectors of the z-taps and
/// N + 2 broadcasts; input row q feeds output rows q, q − 1, q − 2 (as `avx512::zt_tile`).
#[allow(clippy::type_complexity)]
#[target_feature(enable = "avx2,fma")]
unsafe fn zt_tile<const N: usize>(
    args: (*const f32, usize, &[usize], *const f32, usize, *const f32, usize, usize, *mut f32, usize, usize),
) {
    let (xp, ci, offs, bt, cop, bias, r, cb, out, u0, u1) = args;
    let mut acc = [_mm256_setzero_ps(); N];
    if u0 == 0 {
        let b = _mm256_loadu_ps(bias.add(cb));
        acc = [b; N];
    } else {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_loadu_ps(out.add(i * cop + cb));
        }
    }
    let mut u = u0;
    while u < u1 {
        let t = u / ci;
        let k1 = ci.min(u - t * ci + (u1 - u));
        let a_base = xp.add((r + offs[t]) * ci);
        let b_base = bt.add(t * 3 * ci * cop + cb);
        for k in u - t * ci..k1 {
            let w = [0, 1, 2].map(|c| _mm256_loadu_ps(b_base.add((c * ci + k) * cop)));
            let a = a_base.add(k);
            // Input rows q = 0..N + 2, unrolled by hand (as `avx512::zt_tile`).
            macro_rules! row {
                ($($q:literal)*) => {$(
                    if $q < N + 2 {
                        let x = _mm256_broadcast_ss(&*a.add($q * ci));
                        for (c, wc) in w.iter().enumerate() {
                            if $q >= c && $q - c < N {
                                acc[$q - c] = _mm256_fmadd_ps(x, *wc, acc[$q - c]);
                            }
                        }
                    }
                )*};
            }
            row!(0 1 2 3 4 5 6 7 8 9 10 11 12);
        }
        u += k1 - (u - t * ci);
    }
    for (i, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(i * cop + cb), *a);
    }
}
