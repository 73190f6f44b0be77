//! ResBlock3d in training mode on the device as one autograd op that recomputes instead of
//! saving (REFERENCE.md §3):
//!
//!   a1 = relu(bn0(x)),  h1 = conv2(a1),  a3 = relu(bn3(h1)),  y = conv5(a3) + skip(x)
//!
//! The composition of the primitive ops (BatchNorm, ReLU, Conv3d, add: `model::layers`)
//! saves a1, h1 and a3 for the backward besides the block's input and output. This op saves
//! only x (the previous block's output, alive anyway) and h1, plus per-channel statistics:
//! the backward recomputes a3 = relu(bn3(h1)) and a1 = relu(bn0(x)) in one pass each (the
//! batch statistics are kept, so the recomputation is bit-identical to the forward) and
//! frees each as soon as its two consumers (the weight gradient and the ReLU mask) are done.
//! That halves what a ResBlock holds between forward and backward, the bulk of the step's
//! peak memory.
//!
//! The oracle is the composition itself, which the CPU backend (and every eval-mode graph)
//! still runs: `tests/gpu.rs` compares this op on the device with it on the CPU.

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cuda::ops::{batchnorm as bn, conv3d as conv, elementwise as ew};
use crate::ops::batchnorm::{BN_EPS, BN_MOMENTUM, BnUpdate};
use crate::tensor::{Tensor, Vol};

/// The block's parameters as graph variables (BatchNorm γ/β, conv weights [Co, k, k, k, Ci]
/// and biases), and its BatchNorms' running statistics before this forward.
pub struct ResBlockVars<'a> {
    pub gamma0: Var,
    pub beta0: Var,
    pub w2: Var,
    pub b2: Var,
    pub gamma3: Var,
    pub beta3: Var,
    pub w5: Var,
    pub b5: Var,
    /// The 1x1x1 skip convolution (weight, bias) when cin != cout.
    pub skip: Option<(Var, Var)>,
    pub running0: (&'a Tensor, &'a Tensor),
    pub running3: (&'a Tensor, &'a Tensor),
}

/// y = ResBlock3d(x) with batch statistics, for a CUDA tensor x [N, X, Y, Z, Cin]; returns
/// the two BatchNorms' updated running statistics for the caller to store.
pub fn resblock_train_cuda(g: &Graph, x: &Var, p: ResBlockVars) -> Result<(Var, [BnUpdate; 2])> {
    ensure!(x.value.is_cuda(), "resblock_train_cuda needs a device tensor");
    let v = Vol::of(&x.value);
    let (cin, mid, cout, k) = (v.c, p.w2.shape()[0], p.w5.shape()[0], p.w2.shape()[1]);
    ensure!(p.w2.shape()[4] == cin && p.w5.shape()[4] == mid, "resblock: weights {:?}, {:?} do not chain from {cin} channels", p.w2.shape(), p.w5.shape());
    ensure!(v.voxels() > 1, "batch_norm: training needs more than one value per channel, input shape {:?}", x.shape());
    let vm = v.with_c(mid);
    let (st0, rm0, rv0) = bn::train_stats(&x.value, cin, BN_EPS, BN_MOMENTUM, p.running0.0, p.running0.1)?;
    let a1 = bn::apply_relu(&x.value, cin, &st0, &p.gamma0.value, &p.beta0.value)?;
    let h1 = conv::forward(&a1, v, &p.w2.value, Some(&p.b2.value), mid, k)?;
    drop(a1);
    let (st3, rm3, rv3) = bn::train_stats(&h1, mid, BN_EPS, BN_MOMENTUM, p.running3.0, p.running3.1)?;
    let a3 = bn::apply_relu(&h1, mid, &st3, &p.gamma3.value, &p.beta3.value)?;
    let h5 = conv::forward(&a3, vm, &p.w5.value, Some(&p.b5.value), cout, k)?;
    drop(a3);
    let y = match &p.skip {
        Some((w, b)) => ew::add(&h5, &conv::forward(&x.value, v, &w.value, Some(&b.value), cout, 1)?)?,
        None => ew::add(&h5, &x.value)?,
    };
    drop(h5);
    let updates = [BnUpdate { running_mean: rm0, running_var: rv0 }, BnUpdate { running_mean: rm3, running_var: rv3 }];

    let mut inputs: Vec<&Var> = vec![x, &p.gamma0, &p.beta0, &p.w2, &p.b2, &p.gamma3, &p.beta3, &p.w5, &p.b5];
    if let Some((w, b)) = &p.skip {
        inputs.extend([w, b]);
    }
    let need_dx = x.tracked();
    let xs = x.value.clone();
    let (g0, b0, w2, g3, b3, w5) = (p.gamma0.value.clone(), p.beta0.value.clone(), p.w2.value.clone(), p.gamma3.value.clone(), p.beta3.value.clone(), p.w5.value.clone());
    let skip_w = p.skip.as_ref().map(|(w, _)| w.value.clone());
    let out = g.record("resblock", y, &inputs, move |dy| {
        let dt = xs.dtype();
        let dy = crate::cuda::cast(&dy, dt)?;
        // The skip path first: it needs only x and dy.
        let (dx_skip, skip_grads) = match &skip_w {
            Some(w) => {
                let dxs = need_dx.then(|| conv::backward_input(&dy, v.with_c(cout), w, cin, 1, dt)).transpose()?;
                let (dw, db) = conv::backward_weight(&xs, v, &dy, cout, 1)?;
                (dxs, Some((dw, db)))
            }
            None => (need_dx.then(|| dy.clone()), None),
        };
        // Second half: recompute a3, then conv5's gradients, the ReLU mask and bn3's backward.
        let a3 = bn::apply_relu(&h1, mid, &st3, &g3, &b3)?;
        let d_a3 = conv::backward_input(&dy, vm.with_c(cout), &w5, mid, k, dt)?;
        let (dw5, db5) = conv::backward_weight(&a3, vm, &dy, cout, k)?;
        drop(dy);
        let d_h3 = ew::relu_backward(&a3, &d_a3)?;
        drop((a3, d_a3));
        let (d_h1, dg3, db3) = bn::backward(&h1, &d_h3, mid, &st3, &g3, true)?;
        drop(d_h3);
        // First half: recompute a1, then conv2's gradients and bn0's backward.
        let a1 = bn::apply_relu(&xs, cin, &st0, &g0, &b0)?;
        let d_a1 = conv::backward_input(&d_h1, vm, &w2, cin, k, dt)?;
        let (dw2, db2) = conv::backward_weight(&a1, v, &d_h1, mid, k)?;
        drop(d_h1);
        let d_h0 = ew::relu_backward(&a1, &d_a1)?;
        drop((a1, d_a1));
        let (dx_main, dg0, db0) = bn::backward(&xs, &d_h0, cin, &st0, &g0, true)?;
        drop(d_h0);
        let dx = match dx_skip {
            Some(s) => Some(ew::add(&dx_main, &s)?),
            None => None,
        };
        let mut grads = vec![dx, Some(dg0), Some(db0), Some(dw2), Some(db2), Some(dg3), Some(db3), Some(dw5), Some(db5)];
        if let Some((dw, db)) = skip_grads {
            grads.extend([Some(dw), Some(db)]);
        }
        Ok(grads)
    });
    Ok((out, updates))
}
