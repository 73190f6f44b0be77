//! Elementwise ops: ReLU and addition.
//!
//! relu: y = max(x, 0); backward dx = dy where y > 0 (PyTorch's convention: 0 at x = 0).
//! add: y = a + b (same shapes); backward passes dy to both inputs.
//! Outputs are written (=).

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cpu::{par_map, par_zip};
use crate::cuda;
use crate::tensor::Tensor;

pub fn relu_forward_cpu(x: &[f32]) -> Vec<f32> {
    par_map(x, |v| if v > 0.0 { v } else { 0.0 })
}

pub fn relu_backward_cpu(y: &[f32], dy: &[f32]) -> Vec<f32> {
    par_zip(y, dy, |y, g| if y > 0.0 { g } else { 0.0 })
}

pub fn relu(g: &Graph, x: &Var) -> Result<Var> {
    let y = if x.value.is_cuda() {
        cuda::ops::elementwise::relu_forward(&x.value)?
    } else {
        Tensor::from_f32(
            x.shape(),
            crate::profile::time("relu forward", String::new, || relu_forward_cpu(x.value.f32s())),
        )
    };
    let saved = g.needs_grad(&[x]).then(|| y.clone());
    Ok(g.record("relu", y, &[x], move |dy| {
        let y = saved.expect("saved output");
        if y.is_cuda() {
            return Ok(vec![Some(cuda::ops::elementwise::relu_backward(&y, &dy)?)]);
        }
        Ok(vec![Some(Tensor::from_f32(y.shape(), relu_backward_cpu(y.f32s(), dy.f32s())))])
    }))
}

pub fn add_forward_cpu(a: &[f32], b: &[f32]) -> Vec<f32> {
    par_zip(a, b, |a, b| a + b)
}

pub fn add(g: &Graph, a: &Var, b: &Var) -> Result<Var> {
    ensure!(a.shape() == b.shape(), "add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    let y = add_tensors(&a.value, &b.value)?;
    Ok(g.record("add", y, &[a, b], |dy| Ok(vec![Some(dy.clone()), Some(dy)])))
}

/// a + b on whichever device they live (the autograd's gradient accumulation uses this too).
pub fn add_tensors(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(a.device() == b.device(), "add: operands on {:?} and {:?}", a.device(), b.device());
    if a.is_cuda() {
        return cuda::ops::elementwise::add(a, b);
    }
    Ok(Tensor::from_f32(
        a.shape(),
        crate::profile::time("add forward", String::new, || add_forward_cpu(a.f32s(), b.f32s())),
    ))
}
