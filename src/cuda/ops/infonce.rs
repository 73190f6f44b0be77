//! InfoNCE on the device (`kernels/infonce.cu`): the four similarity products and the two
//! gradient products are cuBLAS SGEMMs; softmaxes, the loss and the gradient matrices are
//! our kernels. The loss stays on the device as a one-element f32 tensor.

use anyhow::Result;

use crate::cuda::{Arg, Cost, K, dev_of, empty, ensure_f32};
use crate::tensor::{DType, Tensor};

/// (loss [1], de1, de2) for e1, e2 [n, d] at temperature t.
pub fn infonce(e1: &Tensor, e2: &Tensor, n: usize, d: usize, t: f64) -> Result<(Tensor, Tensor, Tensor)> {
    ensure_f32(e1, "infonce")?;
    ensure_f32(e2, "infonce")?;
    let dev = dev_of(e1);
    let gram = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        let s = empty(dev, &[n, n], DType::F32)?;
        dev.sgemm(false, true, n, n, d, 1.0, a.ptr(), b.ptr(), 0.0, s.ptr())?;
        Ok(s)
    };
    let (s11, s12, s21, s22) = (gram(e1, e1)?, gram(e1, e2)?, gram(e2, e1)?, gram(e2, e2)?);
    let lse1 = dev.alloc(n * 8)?;
    let lse2 = dev.alloc(n * 8)?;
    let diag = dev.alloc(n * 8)?;
    let rows = |l: &Tensor, r: &Tensor, ml: i32, mr: i32, lse: u64, dg: u64| {
        dev.launch(
            K::InfonceSoftmaxRows,
            (n as u32, 1, 1),
            (256, 1, 1),
            0,
            &[Arg::Ptr(l.ptr()), Arg::Ptr(r.ptr()), Arg::I32(n as i32), Arg::F64(t), Arg::I32(ml), Arg::I32(mr), Arg::Ptr(lse), Arg::Ptr(dg)],
            Cost::fp32(4.0 * (n * n) as f64, 2 * n * n * 4 + 16 * n),
        )
    };
    // Rows of [l11 ‖ l12] (diagonal of l11 masked; records diag(l12)), then of [l21 ‖ l22].
    rows(&s11, &s12, 1, 0, lse1.ptr(), diag.ptr())?;
    rows(&s21, &s22, 0, 1, lse2.ptr(), 0)?;
    let loss = empty(dev, &[1], DType::F32)?;
    dev.launch(K::InfonceLoss, (1, 1, 1), (256, 1, 1), 0, &[Arg::Ptr(lse1.ptr()), Arg::Ptr(lse2.ptr()), Arg::Ptr(diag.ptr()), Arg::I32(n as i32), Arg::Ptr(loss.ptr())], Cost::mem(24 * n))?;
    let nf = n as f64;
    let k = (1.0 / (2.0 * nf * t)) as f32;
    let diag_term = (1.0 / (nf * t)) as f32;
    let (g11, g12, g22) = (empty(dev, &[n, n], DType::F32)?, empty(dev, &[n, n], DType::F32)?, empty(dev, &[n, n], DType::F32)?);
    dev.launch_1d(
        K::InfonceGradMatrices,
        n * n,
        &[
            Arg::Ptr(s11.ptr()),
            Arg::Ptr(s12.ptr()),
            Arg::Ptr(s21.ptr()),
            Arg::Ptr(s22.ptr()),
            Arg::Ptr(g11.ptr()),
            Arg::Ptr(g12.ptr()),
            Arg::Ptr(g22.ptr()),
            Arg::I32(n as i32),
            Arg::F32(k),
            Arg::F32(diag_term),
        ],
        Cost::fp32(8.0 * (n * n) as f64, 7 * n * n * 4),
    )?;
    drop((s11, s12, s21, s22));
    let de1 = empty(dev, &[n, d], DType::F32)?;
    dev.sgemm(false, false, n, d, n, 1.0, g11.ptr(), e1.ptr(), 0.0, de1.ptr())?;
    dev.sgemm(false, false, n, d, n, 1.0, g12.ptr(), e2.ptr(), 1.0, de1.ptr())?;
    let de2 = empty(dev, &[n, d], DType::F32)?;
    dev.sgemm(false, false, n, d, n, 1.0, g22.ptr(), e2.ptr(), 0.0, de2.ptr())?;
    dev.sgemm(true, false, n, d, n, 1.0, g12.ptr(), e1.ptr(), 1.0, de2.ptr())?;
    Ok((loss, de1, de2))
}
