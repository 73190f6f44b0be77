//! Fully connected layer, y[N, out] = x[N, in] · Wᵀ + b, W [out, in] as in PyTorch.
//! Backward: dx = dy · W, dW = dyᵀ · x, db = Σ_rows dy. All GEMMs multi-threaded; outputs
//! written (=).

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cpu::{Mat, par_gemm, sum_rows};
use crate::cuda;
use crate::tensor::Tensor;

pub fn linear_forward_cpu(x: &[f32], n: usize, fin: usize, w: &[f32], b: Option<&[f32]>, fout: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * fout];
    let beta = crate::cpu::fill_rows(&mut y, fout, b);
    par_gemm(n, fin, fout, Mat::rows(x, fin), Mat::rows_t(w, fin), beta, &mut y);
    y
}

/// (dx, dW, db).
pub fn linear_backward_cpu(
    x: &[f32],
    dy: &[f32],
    n: usize,
    fin: usize,
    w: &[f32],
    fout: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0f32; n * fin];
    par_gemm(n, fout, fin, Mat::rows(dy, fout), Mat::rows(w, fin), 0.0, &mut dx);
    let mut dw = vec![0.0f32; fout * fin];
    par_gemm(fout, n, fin, Mat::rows_t(dy, fout), Mat::rows(x, fin), 0.0, &mut dw);
    (dx, dw, sum_rows(dy, fout))
}

/// How a device matrix product multiplies: exact fp32, or TF32 tensor cores (inputs rounded
/// to 10 mantissa bits, fp32 accumulation; what `--precision bf16` uses for the head). The
/// CPU always multiplies in exact fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulMath {
    Fp32,
    Tf32,
}

/// y = x Wᵀ + b in exact fp32.
pub fn linear(g: &Graph, x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    linear_with(g, x, w, b, MatmulMath::Fp32)
}

/// y = x Wᵀ + b, multiplied on the device as `math` says.
pub fn linear_with(g: &Graph, x: &Var, w: &Var, b: Option<&Var>, math: MatmulMath) -> Result<Var> {
    let (xs, ws) = (x.shape(), w.shape());
    ensure!(xs.len() == 2 && ws.len() == 2 && xs[1] == ws[1], "linear: input {xs:?} and weight {ws:?} do not match");
    let (n, fin, fout) = (xs[0], xs[1], ws[0]);
    if let Some(b) = b {
        ensure!(b.shape() == [fout], "linear: bias {:?}, expected [{fout}]", b.shape());
    }
    let mut inputs = vec![x, w];
    if let Some(b) = b {
        inputs.push(b);
    }
    let (xv, wv, has_bias) = (x.value.clone(), w.value.clone(), b.is_some());
    if x.value.is_cuda() {
        let tf32 = math == MatmulMath::Tf32;
        let y = cuda::ops::linear::forward(&x.value, n, fin, &w.value, b.map(|b| &b.value), fout, tf32)?;
        return Ok(g.record("linear", y, &inputs, move |dy| {
            let (dx, dw, db) = cuda::ops::linear::backward(&xv, &dy, n, fin, &wv, fout, tf32)?;
            Ok(if has_bias { vec![Some(dx), Some(dw), Some(db)] } else { vec![Some(dx), Some(dw)] })
        }));
    }
    let y = linear_forward_cpu(x.value.f32s(), n, fin, w.value.f32s(), b.map(|b| b.value.f32s()), fout);
    Ok(g.record("linear", Tensor::from_f32(&[n, fout], y), &inputs, move |dy| {
        let (dx, dw, db) = linear_backward_cpu(xv.f32s(), dy.f32s(), n, fin, wv.f32s(), fout);
        let mut grads = vec![Some(Tensor::from_f32(&[n, fin], dx)), Some(Tensor::from_f32(&[fout, fin], dw))];
        if has_bias {
            grads.push(Some(Tensor::from_f32(&[fout], db)));
        }
        Ok(grads)
    }))
}
