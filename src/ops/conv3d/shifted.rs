//! Shifted-GEMM 3×3×3 convolution on the CPU (stride 1, padding 1, channels-last).
//!
//! Algorithm. Zero-pad the input to [N, X+2, Y+2, Z+2, C] and flatten it. Output voxel
//! (n, x, y, z) ↦ virtual row r = ((n·(X+2) + x)·(Y+2) + y)·(Z+2) + z. For kernel offsets
//! (a, b), the three taps along z of row r read the 3·C *contiguous* values starting at
//! x_pad[(r + off_ab)·C], off_ab = a·(Y+2)(Z+2) + b·(Z+2). So the im2col matrix of the (a, b)
//! slice already exists in memory as rows of stride C, and
//!     y_pad[r, :] = bias + Σ_ab Σ_{k<3C} x_pad[(r + off_ab)·C + k] · Wᵀ[(ab, k), :]
//! needs no im2col copy. The SIMD forward and weight gradient visit only the real voxels' rows
//! (line by line, Z consecutive virtual rows each); the portable paths run over every virtual
//! row, those with x ≥ X, y ≥ Y or z ≥ Z computed and dropped (≈10 % extra at 64×64×32, 41 % at
//! 32×32×8); `applicable` keeps the path for volumes where that stays < 3×.
//!
//! Weight gradient: dW[:, (ab, k)] = Σ_r x_pad[(r + off_ab)·C + k] · dy[r, :] over the real
//! voxels' rows only (SIMD: one run per line, see `weight_grad_plan.rs`; portable: dy placed on its
//! virtual rows with zeros elsewhere); rows are split into groups fixed by the problem size
//! and the partials summed in order (deterministic).
//!
//! Kernels. On x86-64 with AVX2+FMA or AVX-512, register-tiled micro-kernels. The forward
//! (`forward_ztaps`) reuses each broadcast input value for its three z-taps: per reduction
//! step (tap group t = (a, b), input channel ci') the tile loads the three weight rows of
//! c = 0, 1, 2 and broadcasts input rows q = 0..N+2 once each, row q feeding output rows q,
//! q − 1 and q − 2; the reduction is cut into L1-sized blocks applied to a whole group of lines
//! before the next (`ztap_tiles`). The weight gradient tiles reduction indices × output
//! channels over blocks of lines (`weight_grad_plan.rs`). The forward pads channel counts to a
//! multiple of 8 inside its packed buffers. Elsewhere a portable path runs the same
//! decomposition through matrixmultiply's GEMM.
//!
//! Outputs are written (=).

// Register tiles and lanes are indexed by position on purpose: the indices are the tile's
// coordinates, shared across several arrays.
#![allow(clippy::needless_range_loop)]

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::CpuKernels;
#[cfg(target_arch = "x86_64")]
use super::avx2;
use crate::cpu::{Mat, SyncPtr, gemm, par_build, par_build_uninit, row_groups, sum_in_order, transpose_padded};
use crate::ops::batchnorm::BnReluEval;
use crate::tensor::Vol;

/// True when this path should run: 3×3×3 kernel, every axis ≥ 2, padding overhead < 3×.
pub fn applicable(v: Vol, k: usize) -> bool {
    k == 3 && v.x >= 2 && v.y >= 2 && v.z >= 2 && virtual_rows(v) <= 3 * v.voxels()
}

/// y [N, X, Y, Z, Co] = conv3×3×3(x) + bias, `w` [Co, 27·Ci] (taps in (a, b, c) order);
/// `kernels` selects the micro-kernels (the caller checked they are available).
pub fn forward(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, kernels: CpuKernels) -> Vec<f32> {
    forward_fused(x, v, w, bias, co, kernels, None, None)
}

/// `forward` of relu(bn(x)) (eval-mode BatchNorm constants `input`) plus `residual`
/// [N, X, Y, Z, Co]: BN → ReLU is applied while the input is copied into its padded buffer
/// (which the algorithm makes anyway) and the residual added while the output rows are copied
/// out, so neither costs a pass of its own. Bit-identical to the composition for the input;
/// the residual is added to the rounded convolution output, as the composition's add.
#[allow(clippy::too_many_arguments)]
pub fn forward_fused(
    x: &[f32],
    v: Vol,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    kernels: CpuKernels,
    input: Option<&BnReluEval>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    assert!(applicable(v, 3), "shifted conv on {v:?}");
    assert_eq!(w.len(), co * 27 * v.c);
    assert!(residual.is_none_or(|r| r.len() == v.voxels() * co), "shifted conv: residual size");
    let xp = pad_volume(x, v, input);
    let g = Geometry::of(v);
    #[cfg(target_arch = "x86_64")]
    if kernels.simd() {
        let bt = transpose_padded(w, co, 27 * v.c, 27 * v.c, co.next_multiple_of(8)); // [27·Ci, cop]
        return simd_forward(&xp, &g, &bt, bias, co, kernels, residual);
    }
    let _ = kernels;
    portable_forward(&xp, &g, w, bias, co, residual)
}

/// The input gradient dx [N, X, Y, Z, Ci] = conv(dy, w_flip) of the convolution with weight `w`
/// [Co, 27·Ci], from dy [N, X, Y, Z, Co] (v_out.c = Co). On the SIMD path the kernels' [27·Co,
/// Ci] operand, w_flip transposed, is w's rows in flipped tap order: built by copies, without
/// the flipped kernel. With `prev` (x's gradient so far, [N, X, Y, Z, Ci]) it returns prev + dx,
/// prev added as the output rows are written.
pub fn input_grad(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, kernels: CpuKernels, prev: Option<&[f32]>) -> Vec<f32> {
    assert!(applicable(v_out, 3), "shifted conv on {v_out:?}");
    let co = v_out.c;
    assert_eq!(w.len(), co * 27 * ci, "conv3d backward: weight size");
    #[cfg(target_arch = "x86_64")]
    if kernels.simd() {
        // bt[(t·Co + o)·cip + i] = w_flip[i, t, o] = w[o, 26 − t, i]: the channel split's
        // flipped columns over all 27 taps, every output channel.
        let all_taps: Vec<usize> = (0..27).collect();
        let bt = super::channel_split::Weight::Flipped(w).transposed_columns(
            &all_taps,
            27,
            co,
            0,
            ci,
            ci.next_multiple_of(8),
        );
        return simd_forward(&pad_volume(dy, v_out, None), &Geometry::of(v_out), &bt, None, ci, kernels, prev);
    }
    let wp = super::pack_weight(w, co, ci, 3, &(0..27).collect::<Vec<_>>(), true);
    forward_fused(dy, v_out, &wp, None, ci, kernels, None, prev)
}

/// dW [Co, 27·Ci] from x [N, X, Y, Z, Ci] and dy [N, X, Y, Z, Co].
pub fn weight_grad(x: &[f32], v: Vol, dy: &[f32], co: usize, kernels: CpuKernels) -> Vec<f32> {
    assert!(applicable(v, 3), "shifted conv on {v:?}");
    assert_eq!(dy.len(), v.voxels() * co);
    let xp = pad_volume(x, v, None);
    let g = Geometry::of(v);
    #[cfg(target_arch = "x86_64")]
    if kernels.simd() {
        return simd_weight_grad(&xp, &g, dy, co, kernels);
    }
    let _ = kernels;
    portable_weight_grad(&xp, &g, dy, co)
}

/// Sizes of the padded, flattened problem.
struct Geometry {
    v: Vol,
    /// Virtual rows: one past the row of the last real voxel.
    rows: usize,
    /// Row offsets of the 9 (a, b) slices.
    offs: [usize; 9],
}

impl Geometry {
    fn of(v: Vol) -> Geometry {
        let (py, pz) = (v.y + 2, v.z + 2);
        let mut offs = [0; 9];
        for a in 0..3 {
            for b in 0..3 {
                offs[a * 3 + b] = a * py * pz + b * pz;
            }
        }
        Geometry { v, rows: virtual_rows(v), offs }
    }

    /// Virtual row of the first voxel of line `line` (lines of Z voxels, in (n, x, y) order).
    fn line_row(&self, line: usize) -> usize {
        let v = self.v;
        let y = line % v.y;
        let x = (line / v.y) % v.x;
        let n = line / (v.y * v.x);
        ((n * (v.x + 2) + x) * (v.y + 2) + y) * (v.z + 2)
    }

    fn lines(&self) -> usize {
        self.v.n * self.v.x * self.v.y
    }
}

fn virtual_rows(v: Vol) -> usize {
    if v.voxels() == 0 {
        return 0;
    }
    ((((v.n - 1) * (v.x + 2) + v.x - 1) * (v.y + 2) + v.y - 1) * (v.z + 2)) + v.z
}

/// The input zero-padded by one voxel on each side of X, Y and Z; relu(bn(x)) with `input`
/// (the padding stays zero, as the composition's padding of relu(bn(x)) is).
fn pad_volume(x: &[f32], v: Vol, input: Option<&BnReluEval>) -> Vec<f32> {
    let (px, py, pz, c) = (v.x + 2, v.y + 2, v.z + 2, v.c);
    // BN → ReLU a whole line of Z voxels at a time (constants tiled along the line).
    let line_bn = input.map(|bn| bn.tiled(v.z));
    let zero = |d: &mut [MaybeUninit<f32>]| d.iter_mut().for_each(|e| _ = e.write(0.0));
    // SAFETY: each plane is written in full: border planes zeroed, in the others the border
    // lines (y = 0, Y + 1) and cells (z = 0, Z + 1) zeroed and every line's Z·C values written.
    unsafe {
        par_build_uninit(v.n * px * py * pz * c, py * pz * c, |plane, dst| {
            let (nb, xp) = (plane / px, plane % px);
            if xp == 0 || xp == px - 1 {
                return zero(dst);
            }
            zero(&mut dst[..pz * c]);
            zero(&mut dst[(py - 1) * pz * c..]);
            for yi in 0..v.y {
                let src = &x[((nb * v.x + xp - 1) * v.y + yi) * v.z * c..][..v.z * c];
                let line = &mut dst[(yi + 1) * pz * c..(yi + 2) * pz * c];
                zero(&mut line[..c]);
                zero(&mut line[(pz - 1) * c..]);
                let d = &mut line[c..(pz - 1) * c];
                match &line_bn {
                    None => d.iter_mut().zip(src).for_each(|(d, &s)| _ = d.write(s)),
                    Some(bn) => {
                        zero(d);
                        // SAFETY: just initialised; MaybeUninit<f32> has f32's layout.
                        bn.apply_row(src, &mut *(d as *mut [MaybeUninit<f32>] as *mut [f32]))
                    }
                }
            }
        })
    }
}

/// Copy the real voxels' rows out of a [rows, width] virtual-row buffer (first `c` columns),
/// plus `residual` ([voxels, c]) when given.
fn gather_rows(g: &Geometry, ypad: &[f32], width: usize, c: usize, residual: Option<&[f32]>) -> Vec<f32> {
    let z = g.v.z;
    let mut y = vec![0.0f32; g.v.voxels() * c];
    y.par_chunks_mut(z * c).enumerate().for_each(|(line, dst)| {
        let r = g.line_row(line);
        if width == c {
            dst.copy_from_slice(&ypad[r * c..(r + z) * c]);
        } else {
            for (d, s) in dst.chunks_exact_mut(c).zip(ypad[r * width..(r + z) * width].chunks_exact(width)) {
                d.copy_from_slice(&s[..c]);
            }
        }
        if let Some(res) = residual {
            dst.iter_mut().zip(&res[line * z * c..(line + 1) * z * c]).for_each(|(d, &s)| *d += s);
        }
    });
    y
}

/// dy on its virtual rows, zero elsewhere, `width` ≥ c columns (extra columns zero).
fn scatter_rows(g: &Geometry, dy: &[f32], c: usize, width: usize) -> Vec<f32> {
    let z = g.v.z;
    let mut out = vec![0.0f32; g.rows * width];
    let ptr = SyncPtr(out.as_mut_ptr());
    (0..g.lines()).into_par_iter().for_each(|line| {
        let r = g.line_row(line);
        // SAFETY: distinct lines own the disjoint row ranges [r, r + Z) of `out`.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(r * width), z * width) };
        for (d, s) in dst.chunks_exact_mut(width).zip(dy[line * z * c..(line + 1) * z * c].chunks_exact(c)) {
            d[..c].copy_from_slice(s);
        }
    });
    out
}

/// Rows per parallel task.
const ROW_BLOCK: usize = 1024;

// ---- portable path (matrixmultiply) ------------------------------------------------------

fn portable_forward(
    xp: &[f32],
    g: &Geometry,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let ci = g.v.c;
    let mut ypad = vec![0.0f32; g.rows * co];
    ypad.par_chunks_mut(ROW_BLOCK * co).enumerate().for_each(|(bi, yb)| {
        let r0 = bi * ROW_BLOCK;
        let nr = yb.len() / co;
        let mut beta = crate::cpu::fill_rows(yb, co, bias);
        for (ab, off) in g.offs.iter().enumerate() {
            let am = Mat { data: &xp[(r0 + off) * ci..], rs: ci, cs: 1 };
            let bm = Mat { data: &w[ab * 3 * ci..], rs: 1, cs: 27 * ci };
            gemm(nr, 3 * ci, co, am, bm, beta, yb, co);
            beta = 1.0;
        }
    });
    gather_rows(g, &ypad, co, co, residual)
}

fn portable_weight_grad(xp: &[f32], g: &Geometry, dy: &[f32], co: usize) -> Vec<f32> {
    let ci = g.v.c;
    let dyp = scatter_rows(g, dy, co, co);
    let kdim = 27 * ci;
    let partials: Vec<Vec<f32>> = row_groups(g.rows.div_ceil(ROW_BLOCK), 1)
        .into_par_iter()
        .map(|group| {
            let mut dw = vec![0.0f32; co * kdim];
            for bi in group {
                let r0 = bi * ROW_BLOCK;
                let nr = ROW_BLOCK.min(g.rows - r0);
                let dyt = Mat::rows_t(&dyp[r0 * co..], co);
                for (ab, off) in g.offs.iter().enumerate() {
                    let am = Mat { data: &xp[(r0 + off) * ci..], rs: ci, cs: 1 };
                    gemm(co, nr, 3 * ci, dyt, am, 1.0, &mut dw[ab * 3 * ci..], kdim);
                }
            }
            dw
        })
        .collect();
    sum_in_order(partials, co * kdim)
}

/// One register tile of the SIMD forward (`forward_ztaps`): `rows` consecutive virtual rows
/// from `row`, written to rows `out_row`.. of the runs' output, reduction steps u0..u1.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ZtapTile {
    pub row: usize,
    pub out_row: usize,
    pub rows: usize,
    pub u0: usize,
    pub u1: usize,
}

/// Bytes of weight rows one reduction block of the SIMD forward reads: an L1-resident block.
#[cfg(target_arch = "x86_64")]
const ZTAP_BLOCK_BYTES: usize = 24 << 10;

/// The tiles of the SIMD forward over `runs` ((first virtual row, rows)) for one block of
/// `width` output channels, in execution order. The reduction, u = t·ci + ci' (groups·ci steps,
/// each the three z-taps c of input channel ci' in tap group t: 9 (a, b) groups here, 3 x-offsets
/// in the Winograd forward), is cut into balanced blocks whose
/// weight rows (3·width values per step) stay in L1; each block is applied to every tile of
/// every run before the next, tiles keeping their partial sums in the output between blocks.
/// Runs are cut into balanced tiles of at most `max_rows` rows. Each output takes its FMAs in
/// the order (t, ci', c) whatever the tiling and block sizes, so the AVX2 and AVX-512 kernels,
/// which tile differently, give the same bits.
#[cfg(target_arch = "x86_64")]
pub(super) fn ztap_tiles(
    runs: &[(usize, usize)],
    groups: usize,
    ci: usize,
    width: usize,
    max_rows: usize,
) -> Vec<ZtapTile> {
    let total = groups * ci;
    let blocks = total.div_ceil((ZTAP_BLOCK_BYTES / (3 * width * 4)).max(1));
    let mut tiles = Vec::new();
    for b in 0..blocks {
        let (u0, u1) = (b * total / blocks, (b + 1) * total / blocks);
        let mut out_row = 0;
        for &(row, len) in runs {
            let mut i = 0;
            while i < len {
                // Balanced: a run of 26 rows as 13 + 13, not 24 + 2.
                let rows = (len - i).div_ceil((len - i).div_ceil(max_rows));
                tiles.push(ZtapTile { row: row + i, out_row: out_row + i, rows, u0, u1 });
                i += rows;
            }
            out_row += len;
        }
    }
    tiles
}

// ---- x86-64 SIMD path (AVX2 or AVX-512 micro-kernels) -----------------------------------------------------------------------
/// The SIMD forward with the transposed weight `bt` [27·Ci, cop] (cop = Co rounded up to 8,
/// padded columns zero).
#[cfg(target_arch = "x86_64")]
fn simd_forward(
    xp: &[f32],
    g: &Geometry,
    bt: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    kernels: CpuKernels,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let ci = g.v.c;
    let cop = co.next_multiple_of(8);
    assert_eq!(bt.len(), 27 * ci * cop, "shifted conv: transposed weight size");
    let mut bias_p = vec![0.0f32; cop];
    if let Some(b) = bias {
        bias_p[..co].copy_from_slice(b);
    }
    avx2::check_rows(xp.len(), ci, &g.offs, 3 * ci, 0, g.rows);
    // Only the real voxels' rows: line (n, x, y) of Z voxels is the run of Z consecutive
    // virtual rows from `line_row`, computed straight into the output (the padding rows, 13 %
    // of the work at 64×64×16 and 41 % at 32×32×8, are never computed, and no gather pass).
    // Each task takes a group of lines, so a reduction block's weights serve all their tiles.
    // Short lines (Z < 8: coarse levels) would make register tiles of Z rows: there a plane's
    // lines are computed as one run of virtual rows (the z padding between lines included)
    // and their real rows copied out.
    let z = g.v.z;
    // The residual is added to each task's rows right after the kernel wrote them (in cache;
    // to the rounded output, as the composition's add), unless padded channels are dropped
    // first (below).
    let add_residual = |first_voxel: usize, yb: &mut [MaybeUninit<f32>]| {
        if let (Some(res), true) = (residual, cop == co) {
            // SAFETY: the kernel initialised the whole chunk; same layout.
            let yb = unsafe { &mut *(yb as *mut [MaybeUninit<f32>] as *mut [f32]) };
            yb.iter_mut().zip(&res[first_voxel * co..]).for_each(|(d, &s)| *d += s);
        }
    };
    let n = g.lines() * z * cop;
    // SAFETY (both branches): the kernels are available (caller); every line's rows lie below
    // g.rows (assert above); `forward_ztaps` writes every row of its runs, which are exactly
    // the task's chunk (z ≥ 8), or the copy below writes every real row of the task's planes.
    let y = if z >= 8 {
        let lines_per_task = (ROW_BLOCK / z).min(g.lines().div_ceil(8)).max(1);
        unsafe {
            par_build_uninit(n, lines_per_task * z * cop, |task, yb| {
                let first = task * lines_per_task;
                let runs: Vec<(usize, usize)> =
                    (first..first + yb.len() / (z * cop)).map(|l| (g.line_row(l), z)).collect();
                kernels.forward_ztaps(xp, ci, &g.offs, bt, cop, &bias_p, &runs, yb);
                add_residual(first * z, yb);
            })
        }
    } else {
        let (vy, pz) = (g.v.y, z + 2);
        let run = (vy - 1) * pz + z; // virtual rows from a plane's first real row to its last
        let planes = g.v.n * g.v.x;
        let planes_per_task = (ROW_BLOCK / run).min(planes.div_ceil(8)).max(1);
        unsafe {
            par_build_uninit(n, planes_per_task * vy * z * cop, |task, yb| {
                let first = task * planes_per_task;
                let runs: Vec<(usize, usize)> =
                    (first..first + yb.len() / (vy * z * cop)).map(|p| (g.line_row(p * vy), run)).collect();
                let mut tmp = Vec::with_capacity(runs.len() * run * cop);
                kernels.forward_ztaps(xp, ci, &g.offs, bt, cop, &bias_p, &runs, tmp.spare_capacity_mut());
                tmp.set_len(runs.len() * run * cop);
                for (p, yp) in yb.chunks_mut(vy * z * cop).enumerate() {
                    for (yi, dst) in yp.chunks_mut(z * cop).enumerate() {
                        let s = (p * run + yi * pz) * cop;
                        dst.iter_mut().zip(&tmp[s..s + z * cop]).for_each(|(d, &s)| _ = d.write(s));
                    }
                }
                add_residual(first * vy * z, yb);
            })
        }
    };
    if cop == co {
        return y;
    }
    // Drop the padded channels, add the residual (to the rounded output, as the composition).
    par_build(g.v.voxels() * co, z * co, |line, dst| {
        for (d, s) in dst.chunks_exact_mut(co).zip(y[line * z * cop..].chunks_exact(cop)) {
            d.copy_from_slice(&s[..co]);
        }
        if let Some(res) = residual {
            dst.iter_mut().zip(&res[line * z * co..(line + 1) * z * co]).for_each(|(d, &s)| *d += s);
        }
    })
}

/// Parallel groups of lines of the SIMD weight gradient: fixed by the shape (never by the
/// thread count), so the partial sums, and the result, are the same on every machine.
fn line_groups(g: &Geometry) -> Vec<std::ops::Range<usize>> {
    let lines = g.lines();
    let n = (lines * g.v.z / 2048).clamp(1, 16).min(lines.max(1));
    (0..n).map(|i| (i * lines / n)..((i + 1) * lines / n)).collect()
}

#[cfg(target_arch = "x86_64")]
fn simd_weight_grad(xp: &[f32], g: &Geometry, dy: &[f32], co: usize, kernels: CpuKernels) -> Vec<f32> {
    let (ci, z) = (g.v.c, g.v.z);
    let kdim = 27 * ci;
    // Only the real voxels' rows: one run per line of Z voxels, dy read in place.
    let partials: Vec<Vec<f32>> = line_groups(g)
        .into_par_iter()
        .map(|lines| {
            let runs = lines.map(|l| (g.line_row(l), l * z, z)).collect();
            let plan = kernels.weight_grad_plan(ci, &g.offs, 3 * ci, co, runs);
            let mut dw = vec![0.0f32; co * kdim];
            kernels.weight_grad_runs(xp, dy, &mut dw, &plan);
            dw
        })
        .collect();
    sum_in_order(partials, co * kdim)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every (output row, reduction step) is covered by exactly one tile, and an output row's
    /// steps come in increasing order (the summation order the bits depend on); tiles respect
    /// the row limit, stay inside their run and read the virtual rows their run maps them to.
    #[test]
    fn ztap_tiles_cover_each_output_and_step_once_in_order() {
        for (runs, groups, ci, width, max_rows) in [
            (vec![(0, 32), (40, 32)], 9, 16, 16, 24),
            (vec![(5, 26)], 9, 64, 32, 12),
            (vec![(3, 7), (20, 1), (30, 13)], 9, 33, 8, 11),
            (vec![(0, 1)], 9, 1, 16, 24),
            (vec![(0, 32), (34, 32)], 3, 64, 16, 24),
        ] {
            let tiles = ztap_tiles(&runs, groups, ci, width, max_rows);
            let starts: Vec<usize> = runs
                .iter()
                .scan(0, |o, r| {
                    let s = *o;
                    *o += r.1;
                    Some(s)
                })
                .collect();
            let total_rows: usize = runs.iter().map(|r| r.1).sum();
            let mut next_u = vec![0usize; total_rows];
            for t in &tiles {
                assert!(t.rows >= 1 && t.rows <= max_rows && t.u0 < t.u1, "{t:?}");
                let r = starts.iter().rposition(|&s| s <= t.out_row).unwrap();
                let ((row0, len), start) = (runs[r], starts[r]);
                assert_eq!(t.row, row0 + t.out_row - start, "{t:?}");
                assert!(t.out_row + t.rows <= start + len, "{t:?} crosses its run's end");
                for o in t.out_row..t.out_row + t.rows {
                    assert_eq!(next_u[o], t.u0, "row {o}: steps out of order at {t:?}");
                    next_u[o] = t.u1;
                }
            }
            assert!(next_u.iter().all(|&u| u == groups * ci), "{runs:?}: every row takes all groups·ci steps");
        }
    }
}
