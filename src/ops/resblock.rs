//! ResBlock3d in training mode on the device as one autograd op that recomputes instead of
//! saving (docs/method.md §3):
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
//! On tensor cores (bf16 activations, cin and mid multiples of 16) the op is also fused
//! (`resblock_fused`): BN -> ReLU is applied while each convolution loads its
//! input, so a1 and a3 never exist in memory, not even in the backward; bn3's statistics come
//! from conv2's epilogue and the skip connection is added in conv5's; in the backward each
//! input gradient's epilogue applies the ReLU mask (recomputed from the saved h1 or x) and
//! produces BatchNorm's backward sums, and the skip gradient joins bn0's backward pass.
//! VOX2VEC_NO_FUSION=1 takes the unfused composition of device ops instead.
//!
//! The oracle is the composition itself, which the CPU backend's training graphs (and eval
//! graphs that record, `eval_with_grad`) still run: `tests/gpu/` compares this op on the device with it on the CPU.

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cuda::ops::conv3d::Fusion;
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
/// the two BatchNorms' updated running statistics for the caller to store. Fused where
/// `fusion_for` says so.
pub fn resblock_train_cuda(g: &Graph, x: &Var, p: ResBlockVars) -> Result<(Var, [BnUpdate; 2])> {
    let fused = fusion_for(x.value.dtype(), x.shape().last().copied().unwrap_or(0), p.w2.shape()[0]);
    resblock_train_cuda_with(g, x, p, fused)
}

/// `resblock_train_cuda` on the fused path (an error where it does not apply) or on the
/// composition of device ops (`fused` false; its oracle in tests/gpu/).
pub fn resblock_train_cuda_with(g: &Graph, x: &Var, p: ResBlockVars, fused: bool) -> Result<(Var, [BnUpdate; 2])> {
    ensure!(x.value.is_cuda(), "resblock_train_cuda needs a device tensor");
    let v = Vol::of(&x.value);
    let (cin, mid, cout, k) = (v.c, p.w2.shape()[0], p.w5.shape()[0], p.w2.shape()[1]);
    ensure!(
        p.w2.shape()[4] == cin && p.w5.shape()[4] == mid,
        "resblock: weights {:?}, {:?} do not chain from {cin} channels",
        p.w2.shape(),
        p.w5.shape()
    );
    ensure!(v.voxels() > 1, "batch_norm: training needs more than one value per channel, input shape {:?}", x.shape());
    if fused {
        ensure!(
            conv::tensor_cores_for(x.value.dtype(), cin) && conv::tensor_cores_for(x.value.dtype(), mid),
            "fused resblock needs bf16 activations and multiples of 16 channels ({cin} -> {mid})"
        );
        return resblock_fused(g, x, p, v, mid, cout, k);
    }
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

    let inputs = recorded_inputs(x, &p);
    let need_dx = x.tracked();
    let xs = x.value.clone();
    let (g0, b0, w2, g3, b3, w5) = (
        p.gamma0.value.clone(),
        p.beta0.value.clone(),
        p.w2.value.clone(),
        p.gamma3.value.clone(),
        p.beta3.value.clone(),
        p.w5.value.clone(),
    );
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
        Ok(input_gradients(dx, [dg0, db0, dw2, db2, dg3, db3, dw5, db5], skip_grads))
    });
    Ok((out, updates))
}

/// A ResBlock's parameters and running statistics as plain tensors: what inference needs.
pub struct ResBlockParams<'a> {
    pub gamma0: &'a Tensor,
    pub beta0: &'a Tensor,
    pub w2: &'a Tensor,
    pub b2: &'a Tensor,
    pub gamma3: &'a Tensor,
    pub beta3: &'a Tensor,
    pub w5: &'a Tensor,
    pub b5: &'a Tensor,
    pub skip: Option<(&'a Tensor, &'a Tensor)>,
    pub running0: (&'a Tensor, &'a Tensor),
    pub running3: (&'a Tensor, &'a Tensor),
}

/// y = ResBlock3d(x) in eval mode (BatchNorm with the running statistics) on the device,
/// recording nothing: inference. Fused on tensor cores where `fusion_for` says so; else each
/// BN -> ReLU is one pass. Same values as the composition of the primitive ops (the oracle).
pub fn resblock_eval_cuda(x: &Tensor, p: ResBlockParams) -> Result<Tensor> {
    let fused = fusion_for(x.dtype(), x.shape().last().copied().unwrap_or(0), p.w2.shape()[0]);
    resblock_eval_cuda_with(x, p, fused)
}

/// `resblock_eval_cuda` fused (an error where that does not apply) or not. Fused: BN -> ReLU
/// applied while conv2 and conv5 load their inputs (a1 and a3 never stored) and the skip
/// added in conv5's epilogue before its one rounding; unfused: BN -> ReLU in one pass before
/// each convolution and the skip added by a separate pass.
pub fn resblock_eval_cuda_with(x: &Tensor, p: ResBlockParams, fused: bool) -> Result<Tensor> {
    ensure!(x.is_cuda(), "resblock_eval_cuda needs a device tensor");
    let v = Vol::of(x);
    let (cin, mid, cout, k) = (v.c, p.w2.shape()[0], p.w5.shape()[0], p.w2.shape()[1]);
    ensure!(
        p.w2.shape()[4] == cin && p.w5.shape()[4] == mid,
        "resblock: weights {:?}, {:?} do not chain from {cin} channels",
        p.w2.shape(),
        p.w5.shape()
    );
    let vm = v.with_c(mid);
    let st0 = bn::eval_stats(p.running0.0, p.running0.1, BN_EPS)?;
    let st3 = bn::eval_stats(p.running3.0, p.running3.1, BN_EPS)?;
    let skip_out = match p.skip {
        Some((w, b)) => Some(conv::forward(x, v, w, Some(b), cout, 1)?),
        None => None,
    };
    let residual = skip_out.as_ref().unwrap_or(x);
    if fused {
        ensure!(
            conv::tensor_cores_for(x.dtype(), cin) && conv::tensor_cores_for(x.dtype(), mid),
            "fused resblock needs bf16 activations and multiples of 16 channels ({cin} -> {mid})"
        );
        let t0 = bn::affine_table(&st0, p.gamma0, p.beta0, cin)?;
        let (h1, _) = conv::forward_fused(
            x,
            v,
            p.w2,
            Some(p.b2),
            mid,
            k,
            Fusion { input_bn_relu: Some(&t0), ..Fusion::default() },
        )?;
        let t3 = bn::affine_table(&st3, p.gamma3, p.beta3, mid)?;
        let (y, _) = conv::forward_fused(
            &h1,
            vm,
            p.w5,
            Some(p.b5),
            cout,
            k,
            Fusion { input_bn_relu: Some(&t3), residual: Some(residual), ..Fusion::default() },
        )?;
        return Ok(y);
    }
    let a1 = bn::apply_relu(x, cin, &st0, p.gamma0, p.beta0)?;
    let h1 = conv::forward(&a1, v, p.w2, Some(p.b2), mid, k)?;
    drop(a1);
    let a3 = bn::apply_relu(&h1, mid, &st3, p.gamma3, p.beta3)?;
    drop(h1);
    let h5 = conv::forward(&a3, vm, p.w5, Some(p.b5), cout, k)?;
    drop(a3);
    ew::add(&h5, residual)
}

/// The op's recorded inputs, in the order its backward returns their gradients: x, γ0, β0,
/// w2, b2, γ3, β3, w5, b5, then the skip conv's weight and bias when there is one.
fn recorded_inputs<'v>(x: &'v Var, p: &'v ResBlockVars) -> Vec<&'v Var> {
    let mut inputs = vec![x, &p.gamma0, &p.beta0, &p.w2, &p.b2, &p.gamma3, &p.beta3, &p.w5, &p.b5];
    if let Some((w, b)) = &p.skip {
        inputs.extend([w, b]);
    }
    inputs
}

/// The gradients in `recorded_inputs` order.
fn input_gradients(dx: Option<Tensor>, params: [Tensor; 8], skip: Option<(Tensor, Tensor)>) -> Vec<Option<Tensor>> {
    let mut grads = vec![dx];
    grads.extend(params.into_iter().map(Some));
    if let Some((dw, db)) = skip {
        grads.extend([Some(dw), Some(db)]);
    }
    grads
}

/// Whether the fused tensor-core ResBlock applies: both convolutions on tensor cores (bf16,
/// cin and mid multiples of 16), unless VOX2VEC_NO_FUSION=1.
pub fn fusion_for(dtype: crate::tensor::DType, cin: usize, mid: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var_os("VOX2VEC_NO_FUSION").is_some_and(|v| v != "0" && !v.is_empty()));
    !off && conv::tensor_cores_for(dtype, cin) && conv::tensor_cores_for(dtype, mid)
}

/// The fused ResBlock (see the module comment): the same values as the unfused op up to where
/// it rounds (y once instead of twice; the BatchNorm sums in f32 per brick, then f64).
fn resblock_fused(
    g: &Graph,
    x: &Var,
    p: ResBlockVars,
    v: Vol,
    mid: usize,
    cout: usize,
    k: usize,
) -> Result<(Var, [BnUpdate; 2])> {
    let (cin, vm) = (v.c, v.with_c(mid));
    let (st0, rm0, rv0) = bn::train_stats(&x.value, cin, BN_EPS, BN_MOMENTUM, p.running0.0, p.running0.1)?;
    let t0 = bn::affine_table(&st0, &p.gamma0.value, &p.beta0.value, cin)?;
    let moments = Fusion { input_bn_relu: Some(&t0), partials: true, ..Fusion::default() };
    let (h1, part1) = conv::forward_fused(&x.value, v, &p.w2.value, Some(&p.b2.value), mid, k, moments)?;
    let part1 = part1.expect("asked for partials");
    let (st3, rm3, rv3) = bn::train_stats_from_partials(
        &part1,
        mid,
        v.voxels(),
        Some(&p.b2.value),
        BN_EPS,
        BN_MOMENTUM,
        p.running3.0,
        p.running3.1,
    )?;
    drop(part1);
    let t3 = bn::affine_table(&st3, &p.gamma3.value, &p.beta3.value, mid)?;
    let skip_out = match &p.skip {
        Some((w, b)) => Some(conv::forward(&x.value, v, &w.value, Some(&b.value), cout, 1)?),
        None => None,
    };
    let residual = skip_out.as_ref().unwrap_or(&x.value);
    let (y, _) = conv::forward_fused(
        &h1,
        vm,
        &p.w5.value,
        Some(&p.b5.value),
        cout,
        k,
        Fusion { input_bn_relu: Some(&t3), residual: Some(residual), ..Fusion::default() },
    )?;
    drop(skip_out);
    let updates = [BnUpdate { running_mean: rm0, running_var: rv0 }, BnUpdate { running_mean: rm3, running_var: rv3 }];

    let inputs = recorded_inputs(x, &p);
    let xs = x.value.clone();
    let (g0, g3, w2, w5) = (p.gamma0.value.clone(), p.gamma3.value.clone(), p.w2.value.clone(), p.w5.value.clone());
    let skip_w = p.skip.as_ref().map(|(w, _)| w.value.clone());
    // Accumulating: the convolutions' weight and bias gradients add what the other view's
    // pass left (acc[3], [4], [7], [8], [9], [10]) in their final reductions.
    let out = g.record_accumulating("resblock", y, &inputs, move |dy, acc| {
        use crate::cuda::take_accumulated as take;
        use crate::tensor::DType::F32;
        let dy = crate::cuda::cast(&dy, xs.dtype())?;
        let (aw2, ab2) = (take(&mut acc[3], w2.shape(), F32), take(&mut acc[4], &[mid], F32));
        let (aw5, ab5) = (take(&mut acc[7], w5.shape(), F32), take(&mut acc[8], &[cout], F32));
        // The skip path: its input gradient joins bn0's backward at the end.
        let (dx_skip, skip_grads) = match &skip_w {
            Some(w) => {
                let dxs = conv::backward_input(&dy, vm.with_c(cout), w, cin, 1, xs.dtype())?;
                let (aw, ab) = (take(&mut acc[9], w.shape(), F32), take(&mut acc[10], &[cout], F32));
                (
                    Some(dxs),
                    Some(conv::backward_weight_acc(
                        &xs,
                        v,
                        &dy,
                        cout,
                        1,
                        conv::WeightAcc { w: aw.as_ref(), b: ab.as_ref() },
                    )?),
                )
            }
            None => (None, None),
        };
        // conv5: d_h3 = relu'(bn3(h1)) (dy * w5) with bn3's backward sums, and dw5 from
        // a3 = relu(bn3(h1)) recomputed in the halo.
        let mask3 = Fusion { relu_mask: Some((&h1, &t3)), partials: true, ..Fusion::default() };
        let (d_h3, sums3) = conv::backward_input_fused(&dy, vm.with_c(cout), &w5, mid, k, mask3)?;
        let (dw5, db5) = conv::backward_weight_bn_relu(
            &h1,
            vm,
            &t3,
            &dy,
            cout,
            k,
            conv::WeightAcc { w: aw5.as_ref(), b: ab5.as_ref() },
        )?;
        let (d_h1, dg3, db3) =
            bn::backward_from_partials(&h1, &d_h3, &sums3.expect("asked for partials"), mid, &st3, &g3, None)?;
        drop(d_h3);
        // conv2, then bn0's backward with the skip gradient (dy itself for an identity skip).
        let mask0 = Fusion { relu_mask: Some((&xs, &t0)), partials: true, ..Fusion::default() };
        let (d_h0, sums0) = conv::backward_input_fused(&d_h1, vm, &w2, cin, k, mask0)?;
        let (dw2, db2) = conv::backward_weight_bn_relu(
            &xs,
            v,
            &t0,
            &d_h1,
            mid,
            k,
            conv::WeightAcc { w: aw2.as_ref(), b: ab2.as_ref() },
        )?;
        drop(d_h1);
        let skip_grad = dx_skip.as_ref().unwrap_or(&dy);
        let (dx, dg0, db0) = bn::backward_from_partials(
            &xs,
            &d_h0,
            &sums0.expect("asked for partials"),
            cin,
            &st0,
            &g0,
            Some(skip_grad),
        )?;
        Ok(input_gradients(Some(dx), [dg0, db0, dw2, db2, dg3, db3, dw5, db5], skip_grads))
    });
    Ok((out, updates))
}
