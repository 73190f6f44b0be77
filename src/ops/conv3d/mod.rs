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
//! - `avx2.rs`: the register-tiled AVX2/FMA micro-kernels both paths use on x86-64; elsewhere
//!   (or with `simd = false`) they run through matrixmultiply's GEMM.
//!
//! Backward:
//! - dx = conv(dy, w_flip) with w_flip[ci, a, b, c, co] = w[co, k-1-a, k-1-b, k-1-c, ci]
//!   (stride 1, same padding): the forward code again, with Ci and Co swapped.
//! - dw = Σ_rows im2col(x)ᵀ · dy, accumulated per fixed group of row blocks and summed in
//!   order (deterministic); taps never reached get an exact 0; db = Σ_rows dy.
//!
//! All outputs are written (=), never accumulated into caller memory.

use std::sync::OnceLock;

use anyhow::{Result, ensure};

#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod im2col;
pub mod shifted;

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, par_gemm, sum_rows};
use crate::cuda;
use crate::profile;
use crate::tensor::{Tensor, Vol};

pub use im2col::{pack_weight, valid_taps};

/// Whether the AVX2/FMA micro-kernels can run here (checked once).
pub fn simd_available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx2::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Forward on the CPU: returns y [N, X, Y, Z, Co].
pub fn conv3d_forward_cpu(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize) -> Vec<f32> {
    conv3d_forward_cpu_with(x, v, w, bias, co, k, simd_available())
}

/// dx [N, X, Y, Z, Ci] from dy [N, X, Y, Z, Co]: the forward with the flipped, transposed weight.
pub fn conv3d_backward_input_cpu(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize) -> Vec<f32> {
    conv3d_backward_input_cpu_with(dy, v_out, w, ci, k, simd_available())
}

/// (dw [Co, k, k, k, Ci], db [Co]) from the input x and dy.
pub fn conv3d_backward_weight_cpu(x: &[f32], v: Vol, dy: &[f32], co: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    conv3d_backward_weight_cpu_with(x, v, dy, co, k, simd_available())
}

fn check_simd(simd: bool) {
    assert!(!simd || simd_available(), "AVX2/FMA kernels requested on a processor without them");
}

/// `conv3d_forward_cpu` with the kernel choice explicit (`simd = false`: portable GEMM).
pub fn conv3d_forward_cpu_with(x: &[f32], v: Vol, w: &[f32], bias: Option<&[f32]>, co: usize, k: usize, simd: bool) -> Vec<f32> {
    check_simd(simd);
    assert_eq!(x.len(), v.voxels() * v.c, "conv3d: input size");
    assert_eq!(w.len(), co * k * k * k * v.c, "conv3d: weight size");
    if shifted::applicable(v, k) {
        return shifted::forward(x, v, w, bias, co, simd);
    }
    let taps = valid_taps(v, k);
    if taps.len() == k * k * k {
        im2col::forward(x, v, w, &taps, bias, co, k, simd)
    } else {
        im2col::forward(x, v, &pack_weight(w, co, v.c, k, &taps, false), &taps, bias, co, k, simd)
    }
}

/// `conv3d_backward_input_cpu` with the kernel choice explicit.
pub fn conv3d_backward_input_cpu_with(dy: &[f32], v_out: Vol, w: &[f32], ci: usize, k: usize, simd: bool) -> Vec<f32> {
    check_simd(simd);
    let co = v_out.c;
    assert_eq!(w.len(), co * k * k * k * ci, "conv3d backward: weight size");
    if k == 1 {
        // 1×1×1: dx = dy · w, with w [Co, Ci] read as the [K = Co, N = Ci] matrix directly.
        let mut dx = vec![0.0f32; v_out.voxels() * ci];
        par_gemm(v_out.voxels(), co, ci, Mat::rows(dy, co), Mat::rows(w, ci), 0.0, &mut dx);
        return dx;
    }
    let taps = valid_taps(v_out, k);
    let wp = pack_weight(w, co, ci, k, &taps, true);
    if shifted::applicable(v_out, k) {
        return shifted::forward(dy, v_out, &wp, None, ci, simd);
    }
    im2col::forward(dy, v_out, &wp, &taps, None, ci, k, simd)
}

/// `conv3d_backward_weight_cpu` with the kernel choice explicit.
pub fn conv3d_backward_weight_cpu_with(x: &[f32], v: Vol, dy: &[f32], co: usize, k: usize, simd: bool) -> (Vec<f32>, Vec<f32>) {
    check_simd(simd);
    assert_eq!(dy.len(), v.voxels() * co, "conv3d backward: dy size");
    let dw = if shifted::applicable(v, k) { shifted::weight_grad(x, v, dy, co, simd) } else { im2col::weight_grad(x, v, dy, co, k, simd) };
    (dw, sum_rows(dy, co))
}

/// Autograd op. `w` is [Co, k, k, k, Ci].
pub fn conv3d(g: &Graph, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let v = Vol::of(&x.value);
    let ws = w.shape();
    ensure!(ws.len() == 5 && ws[1] == ws[2] && ws[2] == ws[3], "conv3d: weight must be [Co, k, k, k, Ci], found {ws:?}");
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
        let y = profile::time("conv3d forward", detail, || conv3d_forward_cpu(x.value.f32s(), v, w.value.f32s(), b.map(|b| b.value.f32s()), co, k));
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
    Ok(g.record("conv3d", out, &inputs, move |dy| {
        let vo = v.with_c(co);
        let dx = need_dx.then(|| {
            let dx = profile::time("conv3d backward input", detail, || conv3d_backward_input_cpu(dy.f32s(), vo, ws_t.f32s(), v.c, k));
            Tensor::from_f32(&v.shape(), dx)
        });
        let (dw, db) = if need_dw {
            let (dw, db) = profile::time("conv3d backward weight", detail, || conv3d_backward_weight_cpu(xs.f32s(), v, dy.f32s(), co, k));
            (Some(Tensor::from_f32(ws_t.shape(), dw)), Some(Tensor::from_f32(&[co], db)))
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
pub fn conv3d_backward_cuda(xs: &Tensor, v: Vol, w: &Tensor, co: usize, k: usize, dy: &Tensor, acc: &mut [Option<Tensor>], need_dx: bool, need_dw: bool) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
