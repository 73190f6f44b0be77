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
//! voxels' rows only (SIMD: one run per line, see `wg_plan.rs`; portable: dy placed on its
//! virtual rows with zeros elsewhere); rows are split into groups fixed by the problem size
//! and the partials summed in order (deterministic).
//!
//! Kernels. On x86-64 with AVX2+FMA, register-tiled micro-kernels: forward tiles 6 rows × 16
//! output channels (12 ymm accumulators) over the whole 27·C reduction, so each output is
//! stored once; the weight gradient tiles reduction indices × output channels over blocks of
//! lines (`wg_plan.rs`). The forward pads channel counts to a multiple of 8 inside its packed
//! buffers. Elsewhere a portable path runs the same decomposition through matrixmultiply's GEMM.
//!
//! Outputs are written (=).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use crate::cpu::{Mat, SyncPtr, gemm, row_groups, sum_in_order, transpose_padded};
use super::CpuKernels;
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
pub fn forward_fused(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, kernels: CpuKernels, input: Option<&BnReluEval>, residual: Option<&[f32]>) -> Vec<f32> {
    assert!(applicable(v, 3), "shifted conv on {v:?}");
    assert_eq!(w.len(), co * 27 * v.c);
    assert!(residual.is_none_or(|r| r.len() == v.voxels() * co), "shifted conv: residual size");
    let xp = pad_volume(x, v, input);
    let g = Geometry::of(v);
    #[cfg(target_arch = "x86_64")]
    if kernels.simd() {
        return simd_forward(&xp, &g, w, bias, co, kernels, residual);
    }
    let _ = kernels;
    portable_forward(&xp, &g, w, bias, co, residual)
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
    let mut out = vec![0.0f32; v.n * px * py * pz * c];
    out.par_chunks_mut(py * pz * c).enumerate().for_each(|(plane, dst)| {
        let (nb, xp) = (plane / px, plane % px);
        if xp == 0 || xp == px - 1 {
            return;
        }
        for yi in 0..v.y {
            let src = ((nb * v.x + xp - 1) * v.y + yi) * v.z * c;
            let d = ((yi + 1) * pz + 1) * c;
            match &line_bn {
                None => dst[d..d + v.z * c].copy_from_slice(&x[src..src + v.z * c]),
                Some(bn) => bn.apply_row(&x[src..src + v.z * c], &mut dst[d..d + v.z * c]),
            }
        }
    });
    out
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

fn portable_forward(xp: &[f32], g: &Geometry, w: &[f32], bias: Option<&[f32]>, co: usize, residual: Option<&[f32]>) -> Vec<f32> {
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

// ---- x86-64 SIMD path (AVX2 or AVX-512 micro-kernels) -----------------------------------------------------------------------
#[cfg(target_arch = "x86_64")]
fn simd_forward(xp: &[f32], g: &Geometry, w: &[f32], bias: Option<&[f32]>, co: usize, kernels: CpuKernels, residual: Option<&[f32]>) -> Vec<f32> {
    let ci = g.v.c;
    let cop = co.next_multiple_of(8);
    let bt = transpose_padded(w, co, 27 * ci, 27 * ci, cop); // [27·Ci, cop]
    let mut bias_p = vec![0.0f32; cop];
    if let Some(b) = bias {
        bias_p[..co].copy_from_slice(b);
    }
    avx2::check_rows(xp.len(), ci, &g.offs, 3 * ci, 0, g.rows);
    // Only the real voxels' rows: line (n, x, y) of Z voxels is the run of Z consecutive
    // virtual rows from `line_row`, computed straight into the output (the padding rows, 13 %
    // of the work at 64×64×16 and 41 % at 32×32×8, are never computed, and no gather pass).
    // Short lines (Z < 8: coarse levels) would make register tiles of Z rows, each streaming
    // the whole weight matrix: there a plane's lines are computed as one run of virtual rows
    // (the z padding between lines included) and their real rows copied out.
    let z = g.v.z;
    let mut y = vec![0.0f32; g.lines() * z * cop];
    if z >= 8 {
        let lines_per_task = (ROW_BLOCK / z).min(g.lines().div_ceil(8)).max(1);
        y.par_chunks_mut(lines_per_task * z * cop).enumerate().for_each(|(task, yb)| {
            for (j, out) in yb.chunks_mut(z * cop).enumerate() {
                // SAFETY: AVX2/FMA availability was checked by the caller; the bounds by the
                // assert (every line's rows lie below g.rows).
                unsafe { kernels.forward_rows(xp, ci, &g.offs, 3 * ci, &bt, cop, &bias_p, g.line_row(task * lines_per_task + j), out) }
            }
        });
    } else {
        let (vy, pz) = (g.v.y, z + 2);
        let run = (vy - 1) * pz + z; // virtual rows from a plane's first real row to its last
        y.par_chunks_mut(vy * z * cop).enumerate().for_each_init(
            || vec![0.0f32; run * cop],
            |tmp, (plane, yb)| {
                // SAFETY: as above; the plane's rows lie below g.rows.
                unsafe { kernels.forward_rows(xp, ci, &g.offs, 3 * ci, &bt, cop, &bias_p, g.line_row(plane * vy), tmp) };
                for (yi, dst) in yb.chunks_mut(z * cop).enumerate() {
                    dst.copy_from_slice(&tmp[yi * pz * cop..(yi * pz + z) * cop]);
                }
            },
        );
    }
    if cop == co {
        // The residual added in place (to the rounded output, as the composition's add).
        if let Some(res) = residual {
            y.par_chunks_mut(1 << 16).zip(res.par_chunks(1 << 16)).for_each(|(d, r)| d.iter_mut().zip(r).for_each(|(d, &s)| *d += s));
        }
        return y;
    }
    // Drop the padded channels, add the residual (to the rounded output, as the composition).
    let mut out = vec![0.0f32; g.v.voxels() * co];
    out.par_chunks_mut(z * co).zip(y.par_chunks(z * cop)).enumerate().for_each(|(line, (dst, src))| {
        for (d, s) in dst.chunks_exact_mut(co).zip(src.chunks_exact(cop)) {
            d.copy_from_slice(&s[..co]);
        }
        if let Some(res) = residual {
            dst.iter_mut().zip(&res[line * z * co..(line + 1) * z * co]).for_each(|(d, &s)| *d += s);
        }
    });
    out
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
            let plan = kernels.wg_plan(ci, &g.offs, 3 * ci, co, runs);
            let mut dw = vec![0.0f32; co * kdim];
            kernels.weight_grad_runs(xp, dy, &mut dw, &plan);
            dw
        })
        .collect();
    sum_in_order(partials, co * kdim)
}
