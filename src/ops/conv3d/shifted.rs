//! Shifted-GEMM 3×3×3 convolution on the CPU (stride 1, padding 1, channels-last).
//!
//! Algorithm. Zero-pad the input to [N, X+2, Y+2, Z+2, C] and flatten it. Output voxel
//! (n, x, y, z) ↦ virtual row r = ((n·(X+2) + x)·(Y+2) + y)·(Z+2) + z. For kernel offsets
//! (a, b), the three taps along z of row r read the 3·C *contiguous* values starting at
//! x_pad[(r + off_ab)·C], off_ab = a·(Y+2)(Z+2) + b·(Z+2). So the im2col matrix of the (a, b)
//! slice already exists in memory as rows of stride C, and
//!     y_pad[r, :] = bias + Σ_ab Σ_{k<3C} x_pad[(r + off_ab)·C + k] · Wᵀ[(ab, k), :]
//! needs no im2col copy. Virtual rows with x ≥ X, y ≥ Y or z ≥ Z are computed and dropped
//! (≈10 % extra at 64×64×32); `applicable` keeps the path for volumes where that stays < 3×.
//!
//! Weight gradient: dWᵀ[(ab, k), :] = Σ_r x_pad[(r + off_ab)·C + k] · dy_pad[r, :], dy_pad
//! being dy placed on its virtual rows with zeros elsewhere; rows are split into groups fixed
//! by the problem size and the partials summed in order (deterministic).
//!
//! Kernels. On x86-64 with AVX2+FMA, register-tiled micro-kernels: forward tiles 6 rows × 16
//! output channels (12 ymm accumulators) over the whole 27·C reduction, so each output is
//! stored once; the weight gradient tiles 6 reduction indices × 16 output channels over blocks
//! of rows. Channel counts are padded to a multiple of 8 inside the packed buffers. Elsewhere
//! a portable path runs the same decomposition through matrixmultiply's GEMM.
//!
//! Outputs are written (=).

use rayon::prelude::*;

use crate::cpu::{Mat, SyncPtr, gemm, row_groups, sum_in_order};
use crate::tensor::Vol;

/// True when this path should run: 3×3×3 kernel, every axis ≥ 2, padding overhead < 3×.
pub fn applicable(v: Vol, k: usize) -> bool {
    k == 3 && v.x >= 2 && v.y >= 2 && v.z >= 2 && virtual_rows(v) <= 3 * v.voxels()
}

/// Whether the AVX2/FMA micro-kernels can run on this processor.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// y [N, X, Y, Z, Co] = conv3×3×3(x) + bias, `w` [Co, 27·Ci] (taps in (a, b, c) order).
pub fn forward(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize) -> Vec<f32> {
    forward_with(x, v, w, bias, co, simd_available())
}

/// dW [Co, 27·Ci] from x [N, X, Y, Z, Ci] and dy [N, X, Y, Z, Co].
pub fn weight_grad(x: &[f32], v: Vol, dy: &[f32], co: usize) -> Vec<f32> {
    weight_grad_with(x, v, dy, co, simd_available())
}

/// `forward` with the kernel choice explicit (tests compare both).
pub fn forward_with(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, simd: bool) -> Vec<f32> {
    assert!(applicable(v, 3), "shifted conv on {v:?}");
    assert_eq!(w.len(), co * 27 * v.c);
    let xp = pad_volume(x, v);
    let g = Geometry::of(v);
    #[cfg(target_arch = "x86_64")]
    if simd {
        assert!(simd_available(), "AVX2/FMA kernels requested on a processor without them");
        return avx2_forward(&xp, &g, w, bias, co);
    }
    let _ = simd;
    portable_forward(&xp, &g, w, bias, co)
}

/// `weight_grad` with the kernel choice explicit.
pub fn weight_grad_with(x: &[f32], v: Vol, dy: &[f32], co: usize, simd: bool) -> Vec<f32> {
    assert!(applicable(v, 3), "shifted conv on {v:?}");
    assert_eq!(dy.len(), v.voxels() * co);
    let xp = pad_volume(x, v);
    let g = Geometry::of(v);
    #[cfg(target_arch = "x86_64")]
    if simd {
        assert!(simd_available(), "AVX2/FMA kernels requested on a processor without them");
        return avx2_weight_grad(&xp, &g, dy, co);
    }
    let _ = simd;
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

/// The input zero-padded by one voxel on each side of X, Y and Z.
fn pad_volume(x: &[f32], v: Vol) -> Vec<f32> {
    let (px, py, pz, c) = (v.x + 2, v.y + 2, v.z + 2, v.c);
    let mut out = vec![0.0f32; v.n * px * py * pz * c];
    out.par_chunks_mut(py * pz * c).enumerate().for_each(|(plane, dst)| {
        let (nb, xp) = (plane / px, plane % px);
        if xp == 0 || xp == px - 1 {
            return;
        }
        for yi in 0..v.y {
            let src = ((nb * v.x + xp - 1) * v.y + yi) * v.z * c;
            let d = ((yi + 1) * pz + 1) * c;
            dst[d..d + v.z * c].copy_from_slice(&x[src..src + v.z * c]);
        }
    });
    out
}

/// Copy the real voxels' rows out of a [rows, width] virtual-row buffer (first `c` columns).
fn gather_rows(g: &Geometry, ypad: &[f32], width: usize, c: usize) -> Vec<f32> {
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

fn portable_forward(xp: &[f32], g: &Geometry, w: &[f32], bias: Option<&[f32]>, co: usize) -> Vec<f32> {
    let ci = g.v.c;
    let mut ypad = vec![0.0f32; g.rows * co];
    ypad.par_chunks_mut(ROW_BLOCK * co).enumerate().for_each(|(bi, yb)| {
        let r0 = bi * ROW_BLOCK;
        let nr = yb.len() / co;
        let mut beta = 0.0;
        if let Some(b) = bias {
            for row in yb.chunks_exact_mut(co) {
                row.copy_from_slice(b);
            }
            beta = 1.0;
        }
        for (ab, off) in g.offs.iter().enumerate() {
            let am = Mat { data: &xp[(r0 + off) * ci..], rs: ci, cs: 1 };
            let bm = Mat { data: &w[ab * 3 * ci..], rs: 1, cs: 27 * ci };
            gemm(nr, 3 * ci, co, am, bm, beta, yb, co);
            beta = 1.0;
        }
    });
    gather_rows(g, &ypad, co, co)
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

// ---- AVX2 + FMA path -----------------------------------------------------------------------

/// Transpose a [rows, cols] matrix into [cols, width] with zero columns rows..width.
fn transpose_padded(w: &[f32], rows: usize, cols: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; cols * width];
    out.par_chunks_mut(width).enumerate().for_each(|(k, dst)| {
        for (j, d) in dst[..rows].iter_mut().enumerate() {
            *d = w[j * cols + k];
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
fn avx2_forward(xp: &[f32], g: &Geometry, w: &[f32], bias: Option<&[f32]>, co: usize) -> Vec<f32> {
    let ci = g.v.c;
    let cop = co.next_multiple_of(8);
    let bt = transpose_padded(w, co, 27 * ci, cop); // [27·Ci, cop]
    let mut bias_p = vec![0.0f32; cop];
    if let Some(b) = bias {
        bias_p[..co].copy_from_slice(b);
    }
    // Every read of row r touches x_pad[(r + offs[8])·C + 3C − 1] at most.
    assert!(g.rows == 0 || (g.rows - 1 + g.offs[8]) * ci + 3 * ci <= xp.len());
    let mut ypad = vec![0.0f32; g.rows * cop];
    ypad.par_chunks_mut(ROW_BLOCK * cop).enumerate().for_each(|(bi, yb)| {
        // SAFETY: AVX2/FMA availability was checked by the caller; the bounds by the assert.
        unsafe { avx2::forward_rows(xp, ci, &g.offs, &bt, cop, &bias_p, bi * ROW_BLOCK, yb) }
    });
    gather_rows(g, &ypad, cop, co)
}

#[cfg(target_arch = "x86_64")]
fn avx2_weight_grad(xp: &[f32], g: &Geometry, dy: &[f32], co: usize) -> Vec<f32> {
    let ci = g.v.c;
    let cop = co.next_multiple_of(8);
    let kdim = 27 * ci;
    let dyp = scatter_rows(g, dy, co, cop);
    assert!(g.rows == 0 || (g.rows - 1 + g.offs[8]) * ci + 3 * ci <= xp.len());
    let partials: Vec<Vec<f32>> = row_groups(g.rows.div_ceil(ROW_BLOCK), 1)
        .into_par_iter()
        .map(|group| {
            let mut dwt = vec![0.0f32; kdim * cop];
            let (r0, r1) = (group.start * ROW_BLOCK, (group.end * ROW_BLOCK).min(g.rows));
            // SAFETY: AVX2/FMA checked by the caller; rows r0..r1 are in bounds (assert above).
            unsafe { avx2::weight_grad_rows(xp, ci, &g.offs, &dyp, cop, r0, r1, &mut dwt) };
            dwt
        })
        .collect();
    let dwt = sum_in_order(partials, kdim * cop);
    // dW[o, k] = dWᵀ[k, o]
    let mut dw = vec![0.0f32; co * kdim];
    dw.par_chunks_mut(kdim).enumerate().for_each(|(o, row)| {
        for (k, d) in row.iter_mut().enumerate() {
            *d = dwt[k * cop + o];
        }
    });
    dw
}

// The micro-kernels are pointer arithmetic over buffers whose bounds the safe callers check
// once; per-operation unsafe blocks would only add noise.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_op_in_unsafe_fn)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows of the register tile.
    const R: usize = 6;

    /// out[i, :] = bias + Σ_ab Σ_{k<3C} x_pad[(r0 + i + offs[ab])·C + k] · bt[(ab·3C + k)·cop + :]
    /// for the rows of `out` ([nr, cop], cop a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_rows(xp: &[f32], ci: usize, offs: &[usize; 9], bt: &[f32], cop: usize, bias: &[f32], r0: usize, out: &mut [f32]) {
        let nr = out.len() / cop;
        let (xp, bt, bias, o) = (xp.as_ptr(), bt.as_ptr(), bias.as_ptr(), out.as_mut_ptr());
        let mut cb = 0;
        while cb < cop {
            let two = cop - cb >= 16;
            let mut i = 0;
            while i < nr {
                let rows = (nr - i).min(R);
                let args = (xp, ci, offs, bt, cop, bias, r0 + i, cb, o.add(i * cop));
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
    unsafe fn fwd_tile<const N: usize, const V: usize>(args: (*const f32, usize, &[usize; 9], *const f32, usize, *const f32, usize, usize, *mut f32)) {
        let (xp, ci, offs, bt, cop, bias, r, cb, out) = args;
        let kk = 3 * ci;
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

    /// Rows per cache block of the weight-gradient loop.
    const WG_ROWS: usize = 256;

    /// dwt[(ab·3C + k)·cop + :] += Σ_{r0 ≤ r < r1} x_pad[(r + offs[ab])·C + k] · dyp[r·cop + :].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weight_grad_rows(xp: &[f32], ci: usize, offs: &[usize; 9], dyp: &[f32], cop: usize, r0: usize, r1: usize, dwt: &mut [f32]) {
        let kk = 3 * ci;
        let (xp, dy, d) = (xp.as_ptr(), dyp.as_ptr(), dwt.as_mut_ptr());
        let mut rs = r0;
        while rs < r1 {
            let re = (rs + WG_ROWS).min(r1);
            let mut cb = 0;
            while cb < cop {
                let two = cop - cb >= 16;
                for (t, &off) in offs.iter().enumerate() {
                    let mut k = 0;
                    while k < kk {
                        let n = (kk - k).min(R);
                        let args = (xp.add(off * ci + k), ci, dy.add(cb), cop, rs, re, d.add((t * kk + k) * cop + cb));
                        macro_rules! tile {
                            ($($n:literal),*) => {
                                match (n, two) {
                                    $(($n, true) => wg_tile::<$n, 2>(args), ($n, false) => wg_tile::<$n, 1>(args),)*
                                    _ => unreachable!(),
                                }
                            };
                        }
                        tile!(1, 2, 3, 4, 5, 6);
                        k += n;
                    }
                }
                cb += if two { 16 } else { 8 };
            }
            rs = re;
        }
    }

    /// acc[i, :] += Σ_r xa[r·C + i] · dy[r·cop + :] for r in rs..re, i < N; acc rows at stride cop.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wg_tile<const N: usize, const V: usize>(args: (*const f32, usize, *const f32, usize, usize, usize, *mut f32)) {
        let (xa, ci, dy, cop, rs, re, acc_ptr) = args;
        let mut acc = [[_mm256_setzero_ps(); V]; N];
        for (i, a) in acc.iter_mut().enumerate() {
            for v in 0..V {
                a[v] = _mm256_loadu_ps(acc_ptr.add(i * cop + 8 * v));
            }
        }
        for r in rs..re {
            let mut g = [_mm256_setzero_ps(); V];
            for v in 0..V {
                g[v] = _mm256_loadu_ps(dy.add(r * cop + 8 * v));
            }
            let xr = xa.add(r * ci);
            for (i, a) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*xr.add(i));
                for v in 0..V {
                    a[v] = _mm256_fmadd_ps(x, g[v], a[v]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for v in 0..V {
                _mm256_storeu_ps(acc_ptr.add(i * cop + 8 * v), a[v]);
            }
        }
    }
}
