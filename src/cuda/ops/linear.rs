//! Fully connected layer on the device: cuBLAS SGEMMs (exact fp32, or TF32 tensor cores with
//! fp32 accumulation when `tf32`), the bias broadcast by `kernels/linear.cu`, the bias
//! gradient by the column sum of `kernels/reduce.cu`.

use anyhow::Result;

use crate::cuda::{Arg, Cost, KernelId, cast, dev_of, empty, ensure_f32};
use crate::tensor::{DType, Tensor};

/// y [n, fout] = x [n, fin] · Wᵀ + b.
pub fn forward(
    x: &Tensor,
    n: usize,
    fin: usize,
    w: &Tensor,
    b: Option<&Tensor>,
    fout: usize,
    tf32: bool,
) -> Result<Tensor> {
    ensure_f32(x, "linear")?;
    let dev = dev_of(x);
    let y = empty(dev, &[n, fout], DType::F32)?;
    let beta = match b {
        Some(b) => {
            dev.launch_1d(
                KernelId::FillRows,
                n * fout,
                &[Arg::Ptr(y.ptr()), Arg::Ptr(b.ptr()), Arg::I64(n as i64), Arg::I64(fout as i64)],
                Cost::mem(n * fout * 4 + fout * 4),
            )?;
            1.0
        }
        None => 0.0,
    };
    dev.sgemm(false, true, n, fout, fin, 1.0, x.ptr(), w.ptr(), beta, y.ptr(), tf32)?;
    Ok(y)
}

/// (dx, dW, db).
pub fn backward(
    x: &Tensor,
    dy: &Tensor,
    n: usize,
    fin: usize,
    w: &Tensor,
    fout: usize,
    tf32: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dy = cast(dy, DType::F32)?;
    let dev = dev_of(x);
    let dx = empty(dev, &[n, fin], DType::F32)?;
    dev.sgemm(false, false, n, fin, fout, 1.0, dy.ptr(), w.ptr(), 0.0, dx.ptr(), tf32)?;
    let dw = empty(dev, &[fout, fin], DType::F32)?;
    dev.sgemm(true, false, fout, fin, n, 1.0, dy.ptr(), x.ptr(), 0.0, dw.ptr(), tf32)?;
    let db = super::reduce::col_sum(&dy, fout)?;
    Ok((dx, dw, db))
}
