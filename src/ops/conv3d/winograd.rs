//! Winograd F(m, 3) along y: 3×3×3 convolutions (stride 1, padding 1, channels-last) on the
//! shifted path's SIMD z-tap kernel, with fewer multiplications: inference's forward (F(4, 3)
//! where it fits) and the primitive op's (training's) forward and input gradient (F(2, 3);
//! `super::ConvPurpose`), and its weight gradient by the dual algorithm (`weight_grad`) on the direct
//! path's weight-gradient kernel.
//!
//! Algorithm (Lavin & Gray 2016, "Fast algorithms for convolutional neural networks"). A 3-tap
//! correlation y[s] = Σ_b g[b]·d[s + b], s < m, from α = m + 2 inputs d is
//!     y = Aᵀ [(G g) ⊙ (Bᵀ d)]
//! α products instead of 3m. Along the y axis of the 3-D convolution, x and z left direct:
//!     T_i[n, x', j, z', :]  = Σ_k Bᵀ[i][k] · x_pad[n, x', m·j + k, z', :]      (input transform)
//!     U_i[o, a, c, :]       = Σ_b G[i][b] · w[o, a, b, c, :]                    (weights, in f64)
//!     M_i[n, x, j, z, o]    = Σ_{a, c, ci} T_i[n, x + a, j, z + c, ci] · U_i[o, a, c, ci]
//!     y[n, x, m·j + s, z, o] = (Σ_i Aᵀ[s][i] · M_i[n, x, j, z, o]) + bias[o] (+ residual)
//! x_pad is the input padded by one voxel on every side (and past Y + 1 up to the last tile's
//! end), J = ⌈Y / m⌉ tiles. Each M_i is a 3×1×3 convolution of T_i, which is exactly the shifted
//! path's z-tap kernel (`forward_ztaps`, each broadcast input reused by its 3 z-taps) with 3 tap
//! groups (the x offsets a) instead of 9. FMAs per output: α·9·Ci / m instead of 27·Ci, i.e.
//! 18·Ci with F(2, 3) and 13.5·Ci with F(4, 3) (half); the transforms are O(α) adds per input
//! and output value, done in cache.
//!
//! Layout. T holds, for each padded x-plane (n, x') in order, α blocks [J, Z + 2, Ci] (z padding
//! rows zero): virtual row (((n·(X+2) + x')·α + i)·J + j)·(Z+2) + z', so the x-tap offsets are
//! a·α·J·(Z+2) rows and line (n, x, j) of transform i is Z consecutive rows. Tasks are runs of
//! output x-planes, cut into chunks of ~1024 output rows: for each chunk the task transforms
//! the T planes it reads that are not built yet (just before use, so in cache; a task builds
//! its planes + 2, the 2 also built by the next task), puts the α products M_i of the chunk's
//! lines in a scratch [α][lines·Z, cop] and writes the chunk's y lines from it (the output
//! transform, adding bias and residual). No pass over memory besides reading x and writing y.
//! Lines shorter than 8 (4 ≤ Z < 8) are computed as one run per (plane, i) block, the z padding
//! rows between lines computed and dropped, as the shifted path does.
//!
//! Accuracy. Not the bits of the direct convolution: the transforms round (inputs combined with
//! weights up to 5 before the products, outputs with weights up to 8 after). Measured against a
//! float64 convolution on random data, largest error relative to the largest output
//! (tests/conv_reference.rs, 8 shapes): 0.9–8e-7 with F(2, 3), as the direct kernels (1.3e-7 to
//! 1.1e-6); 2.5e-7–3.2e-6 with F(4, 3), about 3× theirs, which is why the primitive op
//! (training) takes F(2, 3) only. Its backward is the convolution's exact gradient up to such
//! rounding: the input gradient as this path's convolution of dy with the flipped kernel, the
//! weight gradient by the dual of the same algorithm (the direct kernels' error again,
//! tests/conv_reference.rs). `VOX2VEC_CPU_WINOGRAD=0` turns it off for a process,
//! `conv3d::direct_convolutions` for a thread.
//!
//! Outputs are written (=).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::CpuKernels;
use crate::cpu::par_build_uninit;
use crate::ops::batchnorm::BnReluEval;
use crate::tensor::Vol;

/// One F(m, 3) algorithm: α = m + 2 points, Bᵀ [α][α], G [α][3], Aᵀ [m][α].
#[derive(Debug)]
pub struct Transform {
    pub m: usize,
    bt: &'static [&'static [f32]],
    g: &'static [[f64; 3]],
    at: &'static [&'static [f32]],
}

impl Transform {
    pub fn alpha(&self) -> usize {
        self.m + 2
    }
}

/// F(2, 3), points 0, ±1, ∞.
pub const F2: Transform = Transform {
    m: 2,
    bt: &[&[1.0, 0.0, -1.0, 0.0], &[0.0, 1.0, 1.0, 0.0], &[0.0, -1.0, 1.0, 0.0], &[0.0, 1.0, 0.0, -1.0]],
    g: &[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]],
    at: &[&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]],
};

/// F(4, 3), points 0, ±1, ±2, ∞.
pub const F4: Transform = Transform {
    m: 4,
    bt: &[
        &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: &[
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: &[
        &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// Whether CPU convolutions may use this path: not when `VOX2VEC_CPU_WINOGRAD=0` (read
/// once) nor inside `super::direct_convolutions` on this thread.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("VOX2VEC_CPU_WINOGRAD").map_or(true, |v| v.trim() != "0"))
        && !super::DIRECT_CONVOLUTIONS.get()
}

/// The transform this shape runs with, if any: the SIMD kernels, a 3×3×3 kernel, lines of at
/// least 4 voxels along z (shorter ones make z-tap tiles of mostly padding), at least 2 along
/// x, and a y extent whose last tile wastes little: F(4, 3) where Y ≥ 8 and at most 1/8 of the
/// tiles' rows are padding, else F(2, 3) where Y ≥ 4.
pub fn transform_for(v: Vol, k: usize, kernels: CpuKernels) -> Option<&'static Transform> {
    if !kernels.simd() || k != 3 || v.z < 4 || v.x < 2 || v.voxels() == 0 {
        return None;
    }
    if v.y >= 8 && v.y.next_multiple_of(4) * 8 <= v.y * 9 {
        Some(&F4)
    } else if v.y >= 4 {
        Some(&F2)
    } else {
        None
    }
}

/// Output tiles' rows per parallel task (as the shifted forward's).
const ROW_BLOCK: usize = 1024;

thread_local! {
    /// Per worker thread, kept between tasks and calls (see `Scratch`).
    static SCRATCH: std::cell::Cell<Scratch> = const { std::cell::Cell::new(Scratch { t: Vec::new(), act: Vec::new(), d: Vec::new() }) };
}

/// A worker thread's buffers: initialised memory, grown (and zeroed) only when a larger level
/// needs more, every value a task reads written by that task first.
#[derive(Default)]
struct Scratch {
    /// The task's T planes (`TaskPlanes`).
    t: Vec<f32>,
    /// One activated input plane (inference's BN → ReLU).
    act: Vec<f32>,
    /// The weight gradient's D lines of a chunk.
    d: Vec<f32>,
}

/// The T planes of one task (padded x-planes pp0.., layout in the module comment), built in
/// order just before the first chunk that reads them, so in cache.
struct TaskPlanes {
    pp0: usize,
    built: usize,
    plane_len: usize,
}

impl TaskPlanes {
    /// A task reading padded planes pp0..pp1; grows `t` to hold them.
    fn new(pp0: usize, pp1: usize, plane_len: usize, t: &mut Vec<f32>) -> TaskPlanes {
        if t.len() < (pp1 - pp0) * plane_len {
            t.resize((pp1 - pp0) * plane_len, 0.0); // zeroed once per thread and size
        }
        TaskPlanes { pp0, built: pp0, plane_len }
    }

    /// Builds the planes before `upto` not built yet (from x through relu(bn(·)) with
    /// `line_bn`); returns every plane built so far.
    #[allow(clippy::too_many_arguments)]
    fn build_to<'t>(
        &mut self,
        upto: usize,
        kernels: CpuKernels,
        f: &Transform,
        x: &[f32],
        v: Vol,
        line_bn: Option<&BnReluEval>,
        t: &'t mut [f32],
        act: &mut Vec<f32>,
    ) -> &'t [f32] {
        for pp in self.built..upto {
            transform_plane_simd(
                kernels,
                f,
                x,
                v,
                line_bn,
                pp,
                &mut t[(pp - self.pp0) * self.plane_len..][..self.plane_len],
                act,
            );
        }
        self.built = self.built.max(upto);
        &t[..(self.built - self.pp0) * self.plane_len]
    }
}

/// `$name(kernels, args)`: `$body(args)` compiled for the kernels' vector width. The transforms
/// are plain loops that LLVM vectorises, which in code built for baseline x86-64 means SSE2 (4
/// lanes): there they cost as much as the z-tap kernel at 16 channels. `$body` must be
/// `#[inline(always)]`, so that the wrappers' target features apply to it. No FMA contraction
/// either way (Rust never contracts), so the bits do not depend on the set.
macro_rules! vectorised {
    ($name:ident => $body:ident($($p:ident: $t:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name(kernels: CpuKernels, $($p: $t),*) {
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn wide($($p: $t),*) { $body($($p),*) }
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            fn avx2($($p: $t),*) { $body($($p),*) }
            super::check_kernels(kernels);
            // SAFETY: the set's features are present on this processor (check_kernels).
            match kernels {
                CpuKernels::Avx512 => unsafe { wide($($p),*) },
                CpuKernels::Avx2 => unsafe { avx2($($p),*) },
                CpuKernels::Portable => panic!("{}: Winograd runs on the SIMD kernel sets only", stringify!($name)),
            }
        }
    };
}

vectorised!(transform_plane_simd => transform_plane(f: &Transform, x: &[f32], v: Vol, line_bn: Option<&BnReluEval>, pp: usize, dst: &mut [f32], act: &mut Vec<f32>));
vectorised!(weight_transform_simd => weight_transform(f: &Transform, w: &[f32], co: usize, ci: usize, flipped: bool, u: &mut Vec<f32>));
vectorised!(dy_transform_simd => dy_transform(f: &Transform, dy_plane: &[f32], v: Vol, co: usize, d: &mut [f32], dblock: usize));
vectorised!(output_transform_simd => output_transform(f: &Transform, mk: &[f32], block: usize, v: Vol, rows: (usize, usize), co: usize, cop: usize, bias: Option<&[f32]>, residual: Option<&[f32]>, yb: &mut [MaybeUninit<f32>]));

/// y [N, X, Y, Z, Co] = conv3×3×3(relu(bn(x)) with `input`, else x) + bias (+ `residual`) by
/// F(m, 3) along y; `w` [Co, 27·Ci] (taps in (a, b, c) order). BN → ReLU is applied while the
/// input is transformed; the residual is added to the rounded convolution output, as the
/// composition's add.
#[allow(clippy::too_many_arguments)]
pub fn forward_fused(
    f: &Transform,
    x: &[f32],
    v: Vol,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    kernels: CpuKernels,
    input: Option<&BnReluEval>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    assert!(kernels.simd(), "winograd conv with {kernels:?}");
    assert_eq!(w.len(), co * 27 * v.c, "winograd conv: weight size");
    let u = transformed_weights(f, w, co, v.c, false, kernels);
    convolve(f, x, v, &u, bias, co, kernels, input, residual)
}

/// dx [N, X, Y, Z, Ci] (+ `prev`, the gradient x already holds, added to the rounded dx as
/// autograd's accumulation) = conv(dy, w_flip) by F(m, 3) along y, from dy [N, X, Y, Z, Co]
/// (`v_out`) and the forward's weight w [Co, 27·Ci]: w_flip[ci, a, b, c, co] = w[co, 2 − a,
/// 2 − b, 2 − c, ci] is read in place by the weight transform, never built.
pub fn input_grad(
    f: &Transform,
    dy: &[f32],
    v_out: Vol,
    w: &[f32],
    ci: usize,
    kernels: CpuKernels,
    prev: Option<&[f32]>,
) -> Vec<f32> {
    assert!(kernels.simd(), "winograd input gradient with {kernels:?}");
    assert_eq!(w.len(), v_out.c * 27 * ci, "winograd input gradient: weight size");
    let u = transformed_weights(f, w, v_out.c, ci, true, kernels);
    convolve(f, dy, v_out, &u, None, ci, kernels, None, prev)
}

/// The convolution of x [N, X, Y, Z, Ci] with transformed weights `u` (`weight_transform`'s
/// layout, `co` output channels): `forward_fused` without the weight transform.
#[allow(clippy::too_many_arguments)]
fn convolve(
    f: &Transform,
    x: &[f32],
    v: Vol,
    u: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    kernels: CpuKernels,
    input: Option<&BnReluEval>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    super::check_kernels(kernels); // the vectorised transforms and the kernels need the set
    assert!(kernels.simd() && v.z >= 1 && v.x >= 1 && v.y >= 1, "winograd conv on {v:?} with {kernels:?}");
    assert_eq!(x.len(), v.voxels() * v.c, "winograd conv: input size");
    assert!(residual.is_none_or(|r| r.len() == v.voxels() * co), "winograd conv: residual size");
    assert!(bias.is_none_or(|b| b.len() == co), "winograd conv: bias size");
    let (ci, cop, alpha, m) = (v.c, co.next_multiple_of(8), f.alpha(), f.m);
    assert_eq!(u.len(), alpha * 9 * ci * cop, "winograd conv: transformed weight size");
    let (jt, pz) = (v.y.div_ceil(m), v.z + 2);
    let plane_rows = alpha * jt * pz; // T rows per padded x-plane
    let line_bn = input.map(|bn| bn.tiled(v.z));
    let offs = [0, plane_rows, 2 * plane_rows];
    let zero_bias = vec![0.0f32; cop];
    let planes = v.n * v.x;
    // M rows per plane and transform: a run of Z rows per line (n, x, j), or, for short lines
    // (Z < 8, which would make register tiles of Z rows), one run over the plane's J lines with
    // the z padding between them computed and dropped.
    let (plane_run, line_stride) = if v.z >= 8 { (jt * v.z, v.z) } else { (jt * pz - 2, pz) };
    // Output planes per kernel call (about ROW_BLOCK rows, so that a reduction block's weights
    // serve many tiles) and per task (at least that, and 16 tasks where there are planes for
    // them: each task's T is built plane by plane just before the chunk that first reads it,
    // so a task transforms its planes + 2; longer tasks recompute fewer).
    let chunk_planes = (ROW_BLOCK / plane_run).clamp(1, planes.div_ceil(8).max(1));
    let planes_per_task = planes.div_ceil(16).max(chunk_planes);
    let plane_out = v.y * v.z * co;
    let padded = |p: usize| (p / v.x) * (v.x + 2) + p % v.x; // output plane (n, x) ↦ padded (n, x)
    let plane_len = plane_rows * ci;
    // SAFETY: a chunk's M blocks are written in full by the kernel (its runs are the chunk's
    // lines, one after another) before they are read; the kernel reads only T planes already
    // built for this task (check_rows on them); the output transform writes every value of the
    // chunk's planes, and the chunks cover the task.
    unsafe {
        par_build_uninit(planes * plane_out, planes_per_task * plane_out, |task, yb| {
            let first = task * planes_per_task;
            let task_planes = yb.len() / plane_out;
            // T of the padded planes the task's outputs read (a task crossing into the next
            // batch item also builds the two zero planes between them), in cache.
            let (pp0, pp1) = (padded(first), padded(first + task_planes - 1) + 3);
            let mut scratch = SCRATCH.take();
            let mut task_t = TaskPlanes::new(pp0, pp1, plane_len, &mut scratch.t);
            let mut mbuf: Vec<MaybeUninit<f32>> = Vec::with_capacity(alpha * chunk_planes * plane_run * cop);
            for q0 in (0..task_planes).step_by(chunk_planes) {
                let cp = chunk_planes.min(task_planes - q0);
                let (c0, c1) = (first + q0, first + q0 + cp);
                let tb = task_t.build_to(
                    padded(c1 - 1) + 3,
                    kernels,
                    f,
                    x,
                    v,
                    line_bn.as_ref(),
                    &mut scratch.t,
                    &mut scratch.act,
                );
                let block = cp * plane_run * cop;
                mbuf.set_len(alpha * block);
                for (i, mi) in mbuf.chunks_mut(block).enumerate() {
                    let block_row = |p: usize| ((padded(p) - pp0) * alpha + i) * jt * pz; // T block i of plane p
                    let runs: Vec<(usize, usize)> = match v.z >= 8 {
                        true => (c0..c1).flat_map(|p| (0..jt).map(move |j| (block_row(p) + j * pz, v.z))).collect(),
                        false => (c0..c1).map(|p| (block_row(p), plane_run)).collect(),
                    };
                    for &(row, len) in &runs {
                        super::avx2::check_rows(tb.len(), ci, &offs, 3 * ci, row, row + len);
                    }
                    kernels.forward_ztaps(
                        tb,
                        ci,
                        &offs,
                        &u[i * 9 * ci * cop..(i + 1) * 9 * ci * cop],
                        cop,
                        &zero_bias,
                        &runs,
                        mi,
                    );
                }
                // SAFETY: initialised above; MaybeUninit<f32> has f32's layout.
                let mk = &*(&mbuf[..] as *const [MaybeUninit<f32>] as *const [f32]);
                let yc = &mut yb[q0 * plane_out..(q0 + cp) * plane_out];
                let res = residual.map(|r| &r[c0 * plane_out..c1 * plane_out]);
                output_transform_simd(kernels, f, mk, block, v, (plane_run, line_stride), co, cop, bias, res, yc);
            }
            SCRATCH.set(scratch);
        })
    }
}

/// The weight gradient of y = conv3×3×3(x, w) (no BN, no residual), dw [Co, 27·Ci], from x
/// [N, X, Y, Z, Ci] and dy [N, X, Y, Z, Co] by F(m, 3)'s dual along y. The forward computes
/// y = Aᵀ[(G g) ⊙ (Bᵀ d)] per tile, so for the weight row g of each (o, a, c, k):
///     dU_i[o, a, c, k] = Σ_{n, x, j, z} D_i[n, x, j, z, o] · T_i[n, x + a, j, z + c, k],
///     D_i = Σ_s Aᵀ[s][i] · dy[n, x, m·j + s, z, :]            (rows past Y: dy is zero there)
///     dw[o, a, b, c, k] = Σ_i G[i][b] · dU_i[o, a, c, k]       (in f64, rounded once)
/// with T the forward's input transform (same layout). Each dU_i is a weight gradient with 3
/// tap groups (a) of 3·Ci (c, k) over rows (n, x, j, z): the direct path's kernel
/// (`weight_grad_runs`) on T and D_i, α·9·Ci·Co / m multiply-adds per voxel instead of 27·Ci·Co
/// (F(2, 3): 18 instead of 27). Tasks are fixed runs of output x-planes (at most 16 tasks), each
/// building its T planes and its D lines chunk by chunk just before use, in thread-local
/// scratch (as the forward: neither is a pass over memory); their partial dU (α·Co·9·Ci each)
/// are added in task order, so the bits do not depend on the thread count. Written (=).
pub fn weight_grad(f: &Transform, x: &[f32], v: Vol, dy: &[f32], co: usize, kernels: CpuKernels) -> Vec<f32> {
    super::check_kernels(kernels); // the vectorised transforms and the kernels need the set
    assert!(kernels.simd() && v.voxels() > 0, "winograd weight gradient on {v:?} with {kernels:?}");
    assert_eq!(x.len(), v.voxels() * v.c, "winograd weight gradient: input size");
    assert_eq!(dy.len(), v.voxels() * co, "winograd weight gradient: dy size");
    let (ci, alpha, m) = (v.c, f.alpha(), f.m);
    let (jt, pz) = (v.y.div_ceil(m), v.z + 2);
    let plane_rows = alpha * jt * pz; // T rows per padded x-plane
    let plane_len = plane_rows * ci;
    let (planes, plane_d) = (v.n * v.x, jt * v.z * co); // D values per output plane and i
    // At least 8 planes per task: a task transforms its planes + 2, so fewer per task spend
    // their time on the overlap (docs/performance.md, CPU kernel choices).
    let planes_per_task = planes.div_ceil(16).max(8);
    let chunk_planes = (ROW_BLOCK / (jt * v.z)).clamp(1, planes_per_task);
    let padded = |p: usize| (p / v.x) * (v.x + 2) + p % v.x; // output plane (n, x) ↦ padded (n, x)
    let (kdim, offs) = (9 * ci, [0, plane_rows, 2 * plane_rows]); // dU_i rows: (a, c, k)
    let partials: Vec<Vec<f32>> = (0..planes.div_ceil(planes_per_task))
        .into_par_iter()
        .map(|task| {
            let (first, last) = (task * planes_per_task, ((task + 1) * planes_per_task).min(planes));
            let (pp0, pp1) = (padded(first), padded(last - 1) + 3);
            let mut scratch = SCRATCH.take();
            let mut task_t = TaskPlanes::new(pp0, pp1, plane_len, &mut scratch.t);
            let d = &mut scratch.d;
            let mut du = vec![0.0f32; alpha * co * kdim];
            for c0 in (first..last).step_by(chunk_planes) {
                let c1 = (c0 + chunk_planes).min(last);
                let tb = task_t.build_to(padded(c1 - 1) + 3, kernels, f, x, v, None, &mut scratch.t, &mut scratch.act);
                let dblock = (c1 - c0) * plane_d; // D_i of the chunk: [(c1 − c0)·J·Z, Co]
                if d.len() < alpha * dblock {
                    d.resize(alpha * dblock, 0.0);
                }
                for p in c0..c1 {
                    dy_transform_simd(
                        kernels,
                        f,
                        &dy[p * v.y * v.z * co..][..v.y * v.z * co],
                        v,
                        co,
                        &mut d[(p - c0) * plane_d..],
                        dblock,
                    );
                }
                for (i, dui) in du.chunks_exact_mut(co * kdim).enumerate() {
                    let runs = (c0..c1)
                        .flat_map(|p| {
                            (0..jt).map(move |j| {
                                ((((padded(p) - pp0) * alpha + i) * jt + j) * pz, ((p - c0) * jt + j) * v.z, v.z)
                            })
                        })
                        .collect();
                    let plan = kernels.weight_grad_plan(ci, &offs, 3 * ci, co, runs);
                    kernels.weight_grad_runs(tb, &d[i * dblock..(i + 1) * dblock], dui, &plan);
                }
            }
            SCRATCH.set(scratch);
            du
        })
        .collect();
    let du = crate::cpu::sum_in_order(partials, alpha * co * kdim);
    // dw[o, a, b, c, k] = Σ_i G[i][b] · dU_i[o, a, c, k].
    let mut dw = vec![0.0f32; co * 27 * ci];
    dw.par_chunks_mut(27 * ci).enumerate().for_each(|(o, dwo)| {
        for a in 0..3 {
            for b in 0..3 {
                let dst = &mut dwo[(a * 3 + b) * 3 * ci..][..3 * ci];
                for (e, dv) in dst.iter_mut().enumerate() {
                    let at = o * kdim + a * 3 * ci + e; // e = (c, k)
                    *dv = f.g.iter().enumerate().map(|(i, g)| g[b] * du[i * co * kdim + at] as f64).sum::<f64>() as f32;
                }
            }
        }
    });
    dw
}

/// D_i's lines of one (n, x) plane from `dy_plane` [Y, Z, Co]: block i of `d` (at i·`dblock`)
/// starts with [J, Z, Co] = Σ_s Aᵀ[s][i] · dy_plane[m·j + s] (rows m·j + s ≥ Y are zero).
/// Writes every value of those lines.
#[inline(always)]
fn dy_transform(f: &Transform, dy_plane: &[f32], v: Vol, co: usize, d: &mut [f32], dblock: usize) {
    let (line, jt) = (v.z * co, v.y.div_ceil(f.m));
    for i in 0..f.alpha() {
        for (j, out) in d[i * dblock..][..jt * line].chunks_exact_mut(line).enumerate() {
            out.fill(0.0);
            for (s, at) in f.at.iter().enumerate() {
                let (coef, yi) = (at[i], f.m * j + s);
                if coef != 0.0 && yi < v.y {
                    out.iter_mut().zip(&dy_plane[yi * line..(yi + 1) * line]).for_each(|(d, &g)| *d += coef * g);
                }
            }
        }
    }
}

/// Padded x-plane `pp` (= n·(X + 2) + x') of T (layout in the module comment), α blocks [J,
/// Z + 2, Ci], from x through relu(bn(·)) with `line_bn` (constants tiled over a line of Z
/// voxels; `act` is scratch for the activated plane). Writes every value of `dst`: border
/// planes and z-padding rows zero, each block's Z·Ci values from its first term, or zero when
/// every input line it combines is padding.
#[inline(always)]
fn transform_plane(
    f: &Transform,
    x: &[f32],
    v: Vol,
    line_bn: Option<&BnReluEval>,
    pp: usize,
    dst: &mut [f32],
    act: &mut Vec<f32>,
) {
    let (c, m) = (v.c, f.m);
    let (jt, pz, line, px) = (v.y.div_ceil(m), v.z + 2, v.z * v.c, v.x + 2);
    let (n, xp) = (pp / px, pp % px);
    if xp == 0 || xp == px - 1 {
        dst.fill(0.0);
        return;
    }
    let src_plane = &x[(n * v.x + xp - 1) * v.y * line..][..v.y * line];
    let src_plane = match line_bn {
        None => src_plane,
        Some(bn) => {
            act.resize(src_plane.len(), 0.0); // zeroed only where it grows (thread-local scratch)
            for (d, s) in act.chunks_exact_mut(line).zip(src_plane.chunks_exact(line)) {
                bn.apply_row(s, d);
            }
            &act[..]
        }
    };
    // Padded y index yp reads real line yp − 1 when 1 ≤ yp ≤ Y, else zeros.
    let src = |yp: usize| (yp >= 1 && yp <= v.y).then(|| &src_plane[(yp - 1) * line..yp * line]);
    for (i, bt) in f.bt.iter().enumerate() {
        for j in 0..jt {
            let blk = &mut dst[((i * jt + j) * pz) * c..((i * jt + j + 1) * pz) * c];
            blk[..c].fill(0.0);
            blk[(pz - 1) * c..].fill(0.0);
            let body = &mut blk[c..(pz - 1) * c];
            let mut first = true;
            for (k, &coef) in bt.iter().enumerate() {
                let Some(s) = (coef != 0.0).then(|| src(m * j + k)).flatten() else { continue };
                if first {
                    body.iter_mut().zip(s).for_each(|(d, &s)| *d = coef * s);
                    first = false;
                } else {
                    body.iter_mut().zip(s).for_each(|(d, &s)| *d += coef * s);
                }
            }
            if first {
                body.fill(0.0);
            }
        }
    }
}

/// Transformed weights of recent calls, most recent last. Inference runs the same layers once
/// per sliding window (7,920 times for one CT in 32×32×16 windows), and a training step runs
/// each layer's forward for both views (its input gradient too): transforming a 64-channel
/// kernel costs about a tenth of its 32×32×8 convolution.
static WEIGHT_CACHE: std::sync::Mutex<Vec<CachedWeights>> = std::sync::Mutex::new(Vec::new());

/// Entries kept: a training pyramid's Winograd convolutions at levels 0–2 (forward and input
/// gradient) with room; at most ~2 MB each at 64 channels.
const WEIGHT_CACHE_ENTRIES: usize = 64;

struct CachedWeights {
    m: usize,
    /// The forward weight's output channels (Co of w [Co, 27·Ci]).
    co: usize,
    /// Transformed for the input gradient (flipped taps, channels swapped).
    flipped: bool,
    /// A few of w's values and its length: a cheap first test before comparing all of it.
    fingerprint: [u32; 9],
    /// The weights it was computed from, compared bit for bit before it is reused, so a reused
    /// buffer with other weights in it can never get a stale transform.
    w: Vec<f32>,
    u: std::sync::Arc<Vec<f32>>,
}

fn fingerprint(w: &[f32]) -> [u32; 9] {
    let mut fp = [w.len() as u32; 9];
    for (i, f) in fp.iter_mut().enumerate().skip(1) {
        *f = w.get((i - 1) * w.len() / 8).map_or(0, |v| v.to_bits());
    }
    fp
}

/// `weight_transform`, from the cache when these exact weights (bit for bit) were transformed
/// by the same algorithm, for the same direction, recently.
fn transformed_weights(
    f: &Transform,
    w: &[f32],
    co: usize,
    ci: usize,
    flipped: bool,
    kernels: CpuKernels,
) -> std::sync::Arc<Vec<f32>> {
    let fp = fingerprint(w);
    let same = |e: &CachedWeights| {
        e.m == f.m
            && e.co == co
            && e.flipped == flipped
            && e.fingerprint == fp
            && bytemuck::cast_slice::<f32, u32>(&e.w) == bytemuck::cast_slice::<f32, u32>(w)
    };
    let evicted = {
        let mut cache = WEIGHT_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = cache.iter().position(same) {
            let e = cache.remove(pos);
            let u = e.u.clone();
            cache.push(e);
            return u;
        }
        (cache.len() >= WEIGHT_CACHE_ENTRIES).then(|| cache.remove(0))
    };
    // The evicted entry's buffers hold the new one: in training every step's weights are new,
    // and fresh buffers each time were a page fault per 4 KiB.
    let (mut kept, mut u) =
        evicted.map_or((Vec::new(), Vec::new()), |e| (e.w, std::sync::Arc::try_unwrap(e.u).unwrap_or_default()));
    let label = || format!("F({}, 3) {ci}->{co}{}", f.m, if flipped { " flipped" } else { "" });
    crate::profile::time("winograd weight transform", label, || {
        weight_transform_simd(kernels, f, w, co, ci, flipped, &mut u)
    });
    let u = std::sync::Arc::new(u);
    kept.clear();
    kept.extend_from_slice(w);
    let mut cache = WEIGHT_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= WEIGHT_CACHE_ENTRIES {
        cache.remove(0); // another thread filled it meanwhile
    }
    cache.push(CachedWeights { m: f.m, co, flipped, fingerprint: fp, w: kept, u: u.clone() });
    u
}

/// U_i as the z-tap kernel's operand from w [Co, 3, 3, 3, Ci]: α blocks [9·K, P] with row
/// (a·3 + c)·K + k, column o (columns past O zero), each value Σ_b G[i][b]·g[o, a, b, c, k]
/// computed in f64 from the convolution's kernel g: the forward's (g = w; K = Ci reduced, O =
/// Co out) or, `flipped`, the input gradient's (g[ci, a, b, c, co] = w[co, 2 − a, 2 − b,
/// 2 − c, ci]; K = Co, O = Ci); P = O rounded up to 8. Rows are built whole over o: the
/// flipped kernel's rows are w's rows as they lie, the forward's come from one transpose of w.
/// Built into `u` (resized); compiled for the kernels' width (`weight_transform_simd`), where
/// it vectorises over o in f64.
#[inline(always)]
fn weight_transform(f: &Transform, w: &[f32], co: usize, ci: usize, flipped: bool, u: &mut Vec<f32>) {
    let (kin, kout) = if flipped { (co, ci) } else { (ci, co) };
    let cop = kout.next_multiple_of(8);
    // g's row (tap, k) over o, tap = a·9 + b·3 + c.
    let wt: Vec<f32> = if flipped {
        Vec::new()
    } else {
        // [27·Ci, Co], written row by row: a row gathers one value from each of w's Co rows,
        // and the next rows read the same cache lines (column by column, each store would go
        // to another line).
        let mut t = vec![0.0f32; w.len()];
        for (tk, row) in t.chunks_exact_mut(co).enumerate() {
            for (o, d) in row.iter_mut().enumerate() {
                *d = w[o * 27 * ci + tk];
            }
        }
        t
    };
    let row = |tap: usize, k: usize| -> &[f32] {
        match flipped {
            true => &w[(k * 27 + 26 - tap) * ci..][..ci],
            false => &wt[(tap * ci + k) * co..][..co],
        }
    };
    u.clear();
    u.resize(f.alpha() * 9 * kin * cop, 0.0);
    for a in 0..3 {
        for c in 0..3 {
            for k in 0..kin {
                let (t0, t1, t2) = (row(a * 9 + c, k), row(a * 9 + 3 + c, k), row(a * 9 + 6 + c, k));
                for (i, g) in f.g.iter().enumerate() {
                    let dst = &mut u[((i * 9 + a * 3 + c) * kin + k) * cop..][..kout];
                    for (o, d) in dst.iter_mut().enumerate() {
                        *d = (g[0] * t0[o] as f64 + g[1] * t1[o] as f64 + g[2] * t2[o] as f64) as f32;
                    }
                }
            }
        }
    }
}

/// The chunk's output planes from its products: `mk` holds α blocks of `block` values, block i
/// [planes · plane_run, cop], line (plane, j) from row plane·plane_run + j·line_stride (`rows`);
/// `yb` the chunk's planes [planes, Y, Z, Co] (written in full), `residual` the same part of
/// the residual. y = ((Σ_i Aᵀ[s][i]·M_i) + bias) + residual, terms in i order (zero weights
/// skipped): the residual added to the rounded convolution output as the composition's add,
/// here while the line is in cache. Whole lines at a time when no channel is padded (cop =
/// Co), else row by row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_transform(
    f: &Transform,
    mk: &[f32],
    block: usize,
    v: Vol,
    rows: (usize, usize),
    co: usize,
    cop: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    yb: &mut [MaybeUninit<f32>],
) {
    let (plane_run, line_stride) = rows;
    let (m, line_out) = (f.m, v.z * co);
    let bias_line = bias.map(|b| b.iter().copied().cycle().take(line_out).collect::<Vec<f32>>());
    for (p, yp) in yb.chunks_exact_mut(v.y * line_out).enumerate() {
        for (yi, line) in yp.chunks_exact_mut(line_out).enumerate() {
            let (j, s) = (yi / m, yi % m);
            let mrow = (p * plane_run + j * line_stride) * cop; // line (plane, j)'s first M value, in each block
            let mut terms = f.at[s].iter().enumerate().filter(|t| *t.1 != 0.0);
            let (i0, &c0) = terms.next().expect("every output row combines some product");
            let src = |i: usize| &mk[i * block + mrow..][..v.z * cop];
            // The first term writes every value of the line; the others add.
            if cop == co {
                line.iter_mut().zip(src(i0)).for_each(|(d, &m)| _ = d.write(c0 * m));
            } else {
                for (z, d) in line.chunks_exact_mut(co).enumerate() {
                    d.iter_mut().zip(&src(i0)[z * cop..]).for_each(|(d, &m)| _ = d.write(c0 * m));
                }
            }
            // SAFETY: initialised just above; MaybeUninit<f32> has f32's layout.
            let dst = unsafe { &mut *(line as *mut [MaybeUninit<f32>] as *mut [f32]) };
            if cop == co {
                for (i, &c) in terms {
                    dst.iter_mut().zip(src(i)).for_each(|(d, &m)| *d += c * m);
                }
            } else {
                for (i, &c) in terms {
                    for (z, d) in dst.chunks_exact_mut(co).enumerate() {
                        d.iter_mut().zip(&src(i)[z * cop..]).for_each(|(d, &m)| *d += c * m);
                    }
                }
            }
            if let Some(b) = &bias_line {
                dst.iter_mut().zip(b).for_each(|(d, &b)| *d += b);
            }
            if let Some(r) = residual {
                let at = (p * v.y + yi) * line_out;
                dst.iter_mut().zip(&r[at..at + line_out]).for_each(|(d, &r)| *d += r);
            }
        }
    }
}
