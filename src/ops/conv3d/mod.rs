//! 3-D convolution, stride 1, kernel k in {1, 3}, zero padding (k - 1) / 2, optional bias.
//!
//! Layout: x [N, X, Y, Z, Ci] (channels last), w [Co, kx, ky, kz, Ci] ("KRSC"), y [N, X, Y, Z, Co].
//! PyTorch's [Co, Ci, kx, ky, kz] weight is converted at the checkpoint boundary only.
//!
//! CPU algorithms (all implicit GEMMs; this file dispatches):
//! - `shifted.rs`: 3×3×3 on volumes with every axis ≥ 2 and little padding overhead — the
//!   padded input itself serves as the im2col matrix of each (a, b) slice, no copy.
//! - `im2col.rs`: everything else — blocks of im2col rows over the kernel taps that can reach
//!   the volume (`valid_taps`: coarse levels with an axis of extent 1 or 2 skip taps that
//!   only read padding), times the packed weight; a 1×1×1 kernel reads x directly.
//! - `channel_split.rs`: few voxels and many output channels (the coarse levels) on the SIMD
//!   kernels — one im2col of all voxels, threads split the output channels, so each weight
//!   is read once instead of once per row block.
//! - `winograd.rs`: 3×3×3 on volumes with Y, Z ≥ 4 and X ≥ 2 on the SIMD kernels: Winograd F(m, 3)
//!   along y, 13.5 or 18 multiplications per output and input channel instead of 27 — the
//!   forward and input gradient on the shifted path's z-tap kernel, the weight gradient (F(m,
//!   3)'s dual) on its weight-gradient kernel.
//!   The fused inference ResBlock takes F(4, 3) where it fits, the primitive op (training,
//!   and any convolution outside that ResBlock) F(2, 3) (`ConvPurpose`); `VOX2VEC_CPU_WINOGRAD=0` or
//!   `direct_convolutions` leave the direct kernels.
//! - `avx2.rs`, `avx512.rs`: the register-tiled micro-kernels both paths use on x86-64, chosen
//!   at run time by the processor's features (`CpuKernels::best`: AVX-512 where present, else
//!   AVX2/FMA); elsewhere (or `CpuKernels::Portable`) the same decomposition runs through
//!   matrixmultiply's GEMM. Every set is tested against a naive f64 convolution.
//!
//! Backward:
//! - dx = conv(dy, w_flip) with w_flip[ci, a, b, c, co] = w[co, k-1-a, k-1-b, k-1-c, ci]
//!   (stride 1, same padding): the forward code again, with Ci and Co swapped (Winograd's
//!   weight transform reads w's rows in flipped order; the shifted path's kernel likewise).
//! - dw = Σ_rows im2col(x)ᵀ · dy, accumulated per fixed group of row blocks and summed in
//!   order (deterministic); taps never reached get an exact 0; db = Σ_rows dy. Winograd's
//!   dual computes it from transformed x and dy (`winograd::weight_grad`).
//!
//! All outputs are written (=), never accumulated into caller memory.

use std::sync::OnceLock;

use anyhow::{Result, ensure};

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod channel_split;
pub mod im2col;
pub mod shifted;
#[cfg(target_arch = "x86_64")]
pub mod weight_grad_plan;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, par_gemm, sum_rows};
use crate::cuda;
use crate::profile;
use crate::tensor::{Tensor, Vol};

pub use im2col::{pack_weight, valid_taps};

/// Which CPU micro-kernels a convolution runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// matrixmultiply's GEMM on the same decomposition (any processor).
    Portable,
    /// AVX2 + FMA register tiles (`avx2.rs`).
    Avx2,
    /// AVX-512F register tiles (`avx512.rs`).
    Avx512,
}

/// The operands of the CPU micro-kernels' row GEMM:
/// out[i, :] = bias + Σ_t Σ_{k<k_per_tap} a[(r0 + i + tap_offsets[t])·row_stride + k] ·
/// b_t[(t·k_per_tap + k)·cols + :], for the rows of `out` ([nr, cols], cols a multiple of 8).
#[derive(Clone, Copy)]
pub struct RowGemm<'a> {
    /// The input rows (an im2col block, or channels-last voxels read at tap offsets).
    pub a: &'a [f32],
    pub row_stride: usize,
    /// Row offset of each tap.
    pub tap_offsets: &'a [usize],
    /// Values read per row and tap.
    pub k_per_tap: usize,
    /// The transposed weights, [taps · k_per_tap, cols].
    pub b_t: &'a [f32],
    /// Output channels, padded.
    pub cols: usize,
    pub bias: &'a [f32],
}

impl<'a> RowGemm<'a> {
    /// One tap: out = bias + a[rows, k] · b_t[k, cols] (an im2col block or matrix).
    pub fn dense(a: &'a [f32], k: usize, b_t: &'a [f32], cols: usize, bias: &'a [f32]) -> RowGemm<'a> {
        RowGemm { a, row_stride: k, tap_offsets: &[0], k_per_tap: k, b_t, cols, bias }
    }
}

impl CpuKernels {
    /// The sets this processor can run, portable first.
    pub fn available() -> Vec<CpuKernels> {
        let mut v = vec![CpuKernels::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                v.push(CpuKernels::Avx2);
            }
            if avx512::available() {
                v.push(CpuKernels::Avx512);
            }
        }
        v
    }

    /// The fastest available set (detected once); `VOX2VEC_CPU_KERNELS=portable|avx2|avx512`
    /// picks another available one (for comparisons).
    pub fn best() -> CpuKernels {
        static BEST: OnceLock<CpuKernels> = OnceLock::new();
        *BEST.get_or_init(|| {
            let avail = CpuKernels::available();
            let wanted =
                std::env::var("VOX2VEC_CPU_KERNELS").ok().and_then(|v| match v.to_ascii_lowercase().as_str() {
                    "portable" => Some(CpuKernels::Portable),
                    "avx2" => Some(CpuKernels::Avx2),
                    "avx512" => Some(CpuKernels::Avx512),
                    _ => None,
                });
            wanted.filter(|w| avail.contains(w)).unwrap_or(*avail.last().expect("portable is always available"))
        })
    }

    /// Whether this set uses the x86-64 micro-kernels (padded channel layouts).
    pub fn simd(self) -> bool {
        self != CpuKernels::Portable
    }

    /// `avx2::forward_rows` / `avx512::forward_rows` of this set.
    ///
    /// # Safety
    /// As the chosen kernel's: the set must be available and the operands in bounds.
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn forward_rows(self, g: &RowGemm, r0: usize, out: &mut [f32]) {
        // SAFETY: the caller's contract is the kernels'.
        unsafe {
            match self {
                CpuKernels::Avx512 => avx512::forward_rows(g, r0, out),
                _ => avx2::forward_rows(g, r0, out),
            }
        }
    }

    /// `avx2::forward_ztaps` / `avx512::forward_ztaps` of this set (the shifted forward).
    ///
    /// # Safety
    /// As the chosen kernel's: the set must be available and the operands in bounds.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn forward_ztaps(
        self,
        xp: &[f32],
        ci: usize,
        offs: &[usize],
        bt: &[f32],
        cop: usize,
        bias: &[f32],
        runs: &[(usize, usize)],
        out: &mut [std::mem::MaybeUninit<f32>],
    ) {
        // SAFETY: the caller's contract is the kernels'.
        unsafe {
            match self {
                CpuKernels::Avx512 => avx512::forward_ztaps(xp, ci, offs, bt, cop, bias, runs, out),
                _ => avx2::forward_ztaps(xp, ci, offs, bt, cop, bias, runs, out),
            }
        }
    }

    /// The weight-gradient plan this set's kernels take (lanes and tile sizes).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn weight_grad_plan(
        self,
        rs: usize,
        offs: &[usize],
        kk: usize,
        co: usize,
        runs: Vec<(usize, usize, usize)>,
    ) -> weight_grad_plan::WeightGradPlan {
        match self {
            CpuKernels::Avx512 => weight_grad_plan::WeightGradPlan::new(16, &avx512::WG_MAX_B, rs, offs, kk, co, runs),
            _ => weight_grad_plan::WeightGradPlan::new(8, &avx2::WG_MAX_B, rs, offs, kk, co, runs),
        }
    }

    /// dw [co, offs.len()·kk] += the plan's weight gradient, with `avx2::weight_grad_runs` or
    /// `avx512::weight_grad_runs`. Panics when a SIMD set is not available or an operand is too
    /// short for the plan.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn weight_grad_runs(
        self,
        a: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        plan: &weight_grad_plan::WeightGradPlan,
    ) {
        check_kernels(self);
        assert!(self.simd(), "weight_grad_runs: the portable set has no micro-kernels");
        plan.check(a.len(), dy.len(), dw.len());
        // SAFETY: the set is available (check_kernels) and every access is in bounds (plan.check).
        unsafe {
            match self {
                CpuKernels::Avx512 => avx512::weight_grad_runs(a, dy, dw, plan),
                _ => avx2::weight_grad_runs(a, dy, dw, plan),
            }
        }
    }
}

/// Forward on the CPU: returns y [N, X, Y, Z, Co].
pub fn conv3d_forward_cpu(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize) -> Vec<f32> {
    conv3d_forward_cpu_with(x, v, w, bias, co, k, CpuKernels::best())
}

/// dx [N, X, Y, Z, Ci] from dy [N, X, Y, Z, Co]: the forward with the flipped, transposed weight.
pub fn conv3d_backward_input_cpu(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize) -> Vec<f32> {
    conv3d_backward_input_cpu_with(dy, v_out, w, ci, k, CpuKernels::best())
}

/// (dw [Co, k, k, k, Ci], db [Co]) from the input x and dy.
pub fn conv3d_backward_weight_cpu(x: &[f32], v: Vol, dy: &[f32], co: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    conv3d_backward_weight_cpu_with(x, v, dy, co, k, CpuKernels::best())
}

pub(super) fn check_kernels(kernels: CpuKernels) {
    // Detected once: this runs before every kernel call.
    static AVAILABLE: OnceLock<Vec<CpuKernels>> = OnceLock::new();
    assert!(
        AVAILABLE.get_or_init(CpuKernels::available).contains(&kernels),
        "{kernels:?} kernels requested on a processor without them"
    );
}

/// `conv3d_forward_cpu` with the kernel set explicit.
pub fn conv3d_forward_cpu_with(
    x: &[f32],
    v: Vol,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    k: usize,
    kernels: CpuKernels,
) -> Vec<f32> {
    check_kernels(kernels);
    assert_eq!(x.len(), v.voxels() * v.c, "conv3d: input size");
    assert_eq!(w.len(), co * k * k * k * v.c, "conv3d: weight size");
    #[cfg(target_arch = "x86_64")]
    if channel_split::applicable(v, co, k, kernels) {
        return channel_split::forward(x, v, w, bias, co, k, kernels);
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = winograd_for(v, co, k, kernels, ConvPurpose::Primitive) {
        return winograd::forward_fused(f, x, v, w, bias, co, kernels, None, None);
    }
    if shifted::applicable(v, k) {
        return shifted::forward(x, v, w, bias, co, kernels);
    }
    let taps = valid_taps(v, k);
    if taps.len() == k * k * k {
        im2col::forward(x, v, w, &taps, bias, co, k, kernels)
    } else {
        im2col::forward(x, v, &pack_weight(w, co, v.c, k, &taps, false), &taps, bias, co, k, kernels)
    }
}

thread_local! {
    /// Set inside `direct_convolutions`.
    static DIRECT_CONVOLUTIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f()` with this thread's CPU convolutions on the direct kernels instead of Winograd: the
/// bits of the primitive ops' composition without Winograd, for the tests that compare the
/// fused inference ops with it bit for bit. (`VOX2VEC_CPU_WINOGRAD=0` does so for a process.)
/// The flag is restored when `f` returns or panics.
pub fn direct_convolutions<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DIRECT_CONVOLUTIONS.set(self.0);
        }
    }
    let _restore = Restore(DIRECT_CONVOLUTIONS.replace(true));
    f()
}

/// Where a CPU convolution's result goes, which decides how far from the direct kernels'
/// values it may be.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConvPurpose {
    /// The fused inference ResBlock (`conv3d_forward_cpu_fused`): Winograd F(4, 3) where it fits.
    Inference,
    /// The primitive op, `conv3d_forward_cpu*` and its gradients (training, and any convolution
    /// outside the fused inference ResBlock): F(2, 3) only, whose error is the direct kernels'
    /// (F(4, 3)'s is about 3× that, too far for training: docs/performance.md, Winograd).
    Primitive,
}

/// The Winograd transform a 3×3×3 convolution of `v` into `co` channels runs with on these
/// kernels, if any (`winograd::transform_for`; F(2, 3) instead of F(4, 3) for the primitive
/// op): not where the channel split takes the shape (the coarse levels, where it measured no
/// slower), nor when Winograd is turned off.
#[cfg(target_arch = "x86_64")]
fn winograd_for(
    v: Vol,
    co: usize,
    k: usize,
    kernels: CpuKernels,
    purpose: ConvPurpose,
) -> Option<&'static winograd::Transform> {
    let f = winograd::transform_for(v, k, kernels)
        .filter(|_| winograd::enabled() && !channel_split::applicable(v, co, k, kernels))?;
    Some(if purpose == ConvPurpose::Primitive { &winograd::F2 } else { f })
}

/// conv(relu(bn(x))) + residual on the CPU, BatchNorm in eval mode (`input`'s constants): the
/// inference ResBlock's convolutions. On the shifted path BN → ReLU happens while the input is
/// padded and the residual is added while the output is copied out (no pass of their own);
/// elsewhere (coarse levels, 1×1×1) they are separate passes over small tensors. Equal to the
/// composition bn → relu → conv → add (the oracle, `tests/conv_reference.rs`), except where
/// Winograd F(m, 3) runs (`winograd.rs`: 3×3×3 on volumes with Z ≥ 4 and Y ≥ 4, SIMD kernels;
/// the same values up to ~1e-6 of the largest output, fewer multiplications).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_forward_cpu_fused(
    x: &[f32],
    v: Vol,
    w: &[f32],
    bias: Option<&[f32]>,
    co: usize,
    k: usize,
    input: Option<&crate::ops::batchnorm::BnReluEval>,
    residual: Option<&[f32]>,
    kernels: CpuKernels,
) -> Vec<f32> {
    check_kernels(kernels);
    assert!(residual.is_none_or(|r| r.len() == v.voxels() * co), "conv3d: residual size");
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = winograd_for(v, co, k, kernels, ConvPurpose::Inference) {
        return winograd::forward_fused(f, x, v, w, bias, co, kernels, input, residual);
    }
    if shifted::applicable(v, k) && !channel_split::applicable(v, co, k, kernels) {
        return shifted::forward_fused(x, v, w, bias, co, kernels, input, residual);
    }
    let activated;
    let x = match input {
        Some(bn) => {
            activated = bn.apply(x);
            &activated[..]
        }
        None => x,
    };
    let mut y = conv3d_forward_cpu_with(x, v, w, bias, co, k, kernels);
    if let Some(r) = residual {
        y.iter_mut().zip(r).for_each(|(y, &r)| *y += r);
    }
    y
}

/// `conv3d_backward_input_cpu` with the kernel choice explicit.
pub fn conv3d_backward_input_cpu_with(
    dy: &[f32],
    v_out: Vol,
    w: &[f32],
    ci: usize,
    k: usize,
    kernels: CpuKernels,
) -> Vec<f32> {
    conv3d_backward_input_cpu_onto(dy, v_out, w, ci, k, None, kernels)
}

/// The input gradient added onto `prev`, the gradient x already holds (x's other consumer:
/// a ResBlock's skip): prev + dx, the bits of autograd's accumulation. On the shifted path prev
/// is added while each task's rows are written (in cache); elsewhere in one pass after.
pub fn conv3d_backward_input_cpu_onto(
    dy: &[f32],
    v_out: Vol,
    w: &[f32],
    ci: usize,
    k: usize,
    prev: Option<&[f32]>,
    kernels: CpuKernels,
) -> Vec<f32> {
    check_kernels(kernels);
    let co = v_out.c;
    assert_eq!(w.len(), co * k * k * k * ci, "conv3d backward: weight size");
    assert!(prev.is_none_or(|p| p.len() == v_out.voxels() * ci), "conv3d backward: accumulated gradient size");
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = winograd_for(v_out, ci, k, kernels, ConvPurpose::Primitive) {
        return winograd::input_grad(f, dy, v_out, w, ci, kernels, prev);
    }
    if shifted::applicable(v_out, k) && !channel_split::applicable(v_out, ci, k, kernels) {
        return shifted::input_grad(dy, v_out, w, ci, kernels, prev);
    }
    let mut dx = input_grad_off_shifted(dy, v_out, w, ci, k, kernels);
    if let Some(p) = prev {
        crate::cpu::add_onto(&mut dx, p);
    }
    dx
}

/// The input gradient on the paths other than the shifted one: 1×1×1 GEMM, channel split,
/// im2col with the flipped weight.
fn input_grad_off_shifted(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize, kernels: CpuKernels) -> Vec<f32> {
    let co = v_out.c;
    if k == 1 {
        // 1×1×1: dx = dy · w, with w [Co, Ci] read as the [K = Co, N = Ci] matrix directly.
        let mut dx = vec![0.0f32; v_out.voxels() * ci];
        par_gemm(v_out.voxels(), co, ci, Mat::rows(dy, co), Mat::rows(w, ci), 0.0, &mut dx);
        return dx;
    }
    #[cfg(target_arch = "x86_64")]
    if channel_split::applicable(v_out, ci, k, kernels) {
        return channel_split::input_grad(dy, v_out, w, ci, k, kernels);
    }
    let taps = valid_taps(v_out, k);
    let wp = pack_weight(w, co, ci, k, &taps, true);
    im2col::forward(dy, v_out, &wp, &taps, None, ci, k, kernels)
}

/// `conv3d_backward_weight_cpu` with the kernel choice explicit.
pub fn conv3d_backward_weight_cpu_with(
    x: &[f32],
    v: Vol,
    dy: &[f32],
    co: usize,
    k: usize,
    kernels: CpuKernels,
) -> (Vec<f32>, Vec<f32>) {
    (conv3d_backward_weight_cpu_onto(x, v, dy, co, k, None, kernels), sum_rows(dy, co))
}

/// The weight gradient dw [Co, k, k, k, Ci] added onto `prev`, the gradient w already holds
/// (the other view's pass): prev + dw, the bits of autograd's accumulation. Taps that only
/// ever see padding (all but the centre at 1×1×1) are zero in dw and left as they are in
/// prev, so the coarse levels' large, mostly-zero weight gradients are written once per step.
pub fn conv3d_backward_weight_cpu_onto(
    x: &[f32],
    v: Vol,
    dy: &[f32],
    co: usize,
    k: usize,
    prev: Option<Vec<f32>>,
    kernels: CpuKernels,
) -> Vec<f32> {
    check_kernels(kernels);
    assert_eq!(dy.len(), v.voxels() * co, "conv3d backward: dy size");
    assert!(
        prev.as_ref().is_none_or(|p| p.len() == co * k * k * k * v.c),
        "conv3d backward: accumulated weight gradient size"
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = winograd_for(v, co, k, kernels, ConvPurpose::Primitive) {
        return crate::cpu::added_onto(prev, winograd::weight_grad(f, x, v, dy, co, kernels));
    }
    if !shifted::applicable(v, k) {
        return im2col::weight_grad(x, v, dy, co, k, kernels, prev);
    }
    crate::cpu::added_onto(prev, shifted::weight_grad(x, v, dy, co, kernels))
}

/// Autograd op. `w` is [Co, k, k, k, Ci].
pub fn conv3d(g: &Graph, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let v = Vol::of(&x.value);
    let ws = w.shape();
    ensure!(
        ws.len() == 5 && ws[1] == ws[2] && ws[2] == ws[3],
        "conv3d: weight must be [Co, k, k, k, Ci], found {ws:?}"
    );
    let (co, k) = (ws[0], ws[1]);
    ensure!(k == 1 || k == 3, "conv3d: kernel {k} is not supported (1 or 3)");
    ensure!(ws[4] == v.c, "conv3d: weight expects {} input channels, input has {}", ws[4], v.c);
    if let Some(b) = b {
        ensure!(b.shape() == [co], "conv3d: bias shape {:?}, expected [{co}]", b.shape());
    }
    let detail = move || format!("k{k} {}x{}x{}x{} {}->{}", v.n, v.x, v.y, v.z, v.c, co);
    let out = if x.value.is_cuda() {
        cuda::ops::conv3d::forward(&x.value, v, &w.value, b.map(|b| &b.value), co, k)?
    } else {
        let y = profile::time("conv3d forward", detail, || {
            conv3d_forward_cpu(x.value.f32s(), v, w.value.f32s(), b.map(|b| b.value.f32s()), co, k)
        });
        Tensor::from_f32(&v.with_c(co).shape(), y)
    };
    let mut inputs = vec![x, w];
    if let Some(b) = b {
        inputs.push(b);
    }
    let (xs, ws_t, has_bias) = (x.value.clone(), w.value.clone(), b.is_some());
    let (need_dx, need_dw) = (x.tracked(), w.tracked() || b.is_some_and(|b| b.tracked()));
    if x.value.is_cuda() {
        // Accumulating: a gradient x, w or b already has (x's other consumer, the other
        // view's pass) is added by this backward's kernels instead of an add pass.
        return Ok(g.record_accumulating("conv3d", out, &inputs, move |dy, acc| {
            let (dx, dw, db) = conv3d_backward_cuda(&xs, v, &ws_t, co, k, &dy, acc, need_dx, need_dw)?;
            let mut grads = vec![dx, dw];
            if has_bias {
                grads.push(db);
            }
            Ok(grads)
        }));
    }
    // Accumulating: the gradients x and w already hold (x's other consumer, the other view's
    // pass) are added by the backward as it writes (`_onto`) instead of in a pass of their own.
    Ok(g.record_accumulating("conv3d", out, &inputs, move |dy, acc| {
        let (vo, kernels) = (v.with_c(co), CpuKernels::best());
        let dx = need_dx.then(|| {
            let prev = acc[0].take();
            let dx = profile::time("conv3d backward input", detail, || {
                conv3d_backward_input_cpu_onto(
                    dy.f32s(),
                    vo,
                    ws_t.f32s(),
                    v.c,
                    k,
                    prev.as_ref().map(|p| p.f32s()),
                    kernels,
                )
            });
            Tensor::from_f32(&v.shape(), dx)
        });
        let (dw, db) = if need_dw {
            let prev = acc[1].take().map(Tensor::into_f32_vec);
            let dw = profile::time("conv3d backward weight", detail, || {
                conv3d_backward_weight_cpu_onto(xs.f32s(), v, dy.f32s(), co, k, prev, kernels)
            });
            (Some(Tensor::from_f32(ws_t.shape(), dw)), Some(Tensor::from_f32(&[co], sum_rows(dy.f32s(), co))))
        } else {
            (None, None)
        };
        let mut grads = vec![dx, dw];
        if has_bias {
            grads.push(db);
        }
        Ok(grads)
    }))
}

/// A device convolution's backward, folding in the gradients `acc` = [x, w, b] already hold:
/// x's through the tensor-core input-gradient epilogue (bf16, Co a multiple of 16), w's and
/// b's through the reductions that finish them. What cannot be folded stays in `acc`.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_backward_cuda(
    xs: &Tensor,
    v: Vol,
    w: &Tensor,
    co: usize,
    k: usize,
    dy: &Tensor,
    acc: &mut [Option<Tensor>],
    need_dx: bool,
    need_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    use crate::cuda::ops::conv3d::{self as conv, Fusion, WeightAcc, tensor_cores_for};
    use crate::cuda::take_accumulated as take;
    use crate::tensor::DType;
    let (vo, dt) = (v.with_c(co), xs.dtype());
    let dx = if !need_dx {
        None
    } else if let Some(prev) = tensor_cores_for(dt, co).then(|| take(&mut acc[0], &v.shape(), DType::BF16)).flatten() {
        let dy = cuda::cast(dy, DType::BF16)?;
        Some(conv::backward_input_fused(&dy, vo, w, v.c, k, Fusion { residual: Some(&prev), ..Fusion::default() })?.0)
    } else {
        Some(conv::backward_input(dy, vo, w, v.c, k, dt)?)
    };
    if !need_dw {
        return Ok((dx, None, None));
    }
    let aw = take(&mut acc[1], w.shape(), DType::F32);
    let ab = match acc.get_mut(2) {
        Some(slot) => take(slot, &[co], DType::F32),
        None => None,
    };
    let (dw, db) = conv::backward_weight_acc(xs, v, dy, co, k, WeightAcc { w: aw.as_ref(), b: ab.as_ref() })?;
    Ok((dx, Some(dw), Some(db)))
}
