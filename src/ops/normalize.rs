//! Row-wise L2 normalisation (PyTorch `F.normalize(x, dim=1)`): y = x / max(‖x‖, 1e-12).
//! Backward: dx = (dy - y · (y · dy)) / ‖x‖ where ‖x‖ > 1e-12, else dy / 1e-12.
//! Outputs are written (=).

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::tensor::Tensor;

pub const NORMALIZE_EPS: f64 = 1e-12;

pub fn l2_normalize_forward_cpu(x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        let n = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(NORMALIZE_EPS);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v as f64 / n) as f32;
        }
    });
    y
}

pub fn l2_normalize_backward_cpu(x: &[f32], dy: &[f32], d: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(dr, (xr, gr))| {
        let norm = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if norm > NORMALIZE_EPS {
            let dot: f64 = xr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / norm;
            for ((o, &xv), &g) in dr.iter_mut().zip(xr).zip(gr) {
                let y = xv as f64 / norm;
                *o = ((g as f64 - y * dot) / norm) as f32;
            }
        } else {
            for (o, &g) in dr.iter_mut().zip(gr) {
                *o = (g as f64 / NORMALIZE_EPS) as f32;
            }
        }
    });
    dx
}

pub fn l2_normalize_rows(g: &Graph, x: &Var) -> Result<Var> {
    ensure!(x.shape().len() == 2, "l2_normalize_rows: expected [N, D], found {:?}", x.shape());
    let d = x.shape()[1];
    if x.value.is_cuda() {
        let y = crate::cuda::ops::normalize::forward(&x.value, d)?;
        let xv = x.value.clone();
        return Ok(g.record("l2_normalize_rows", y, &[x], move |dy| {
            Ok(vec![Some(crate::cuda::ops::normalize::backward(&xv, &dy, d)?)])
        }));
    }
    let y = Tensor::from_f32(x.shape(), l2_normalize_forward_cpu(x.value.f32s(), d));
    let xv = x.value.clone();
    Ok(g.record("l2_normalize_rows", y, &[x], move |dy| {
        Ok(vec![Some(Tensor::from_f32(xv.shape(), l2_normalize_backward_cpu(xv.f32s(), dy.f32s(), d)))])
    }))
}
