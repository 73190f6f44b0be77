//! Every CUDA op against its CPU oracle on random inputs of several shapes (odd sizes, batch
//! 1), f32 and bf16 activation storage: forward, and the gradients of its inputs.

use super::*;

pub fn test_elementwise() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    for dt in DTYPES {
        // 16 and 4 channels take the 16-byte kernels (4 only in f32), the others the scalar ones.
        for shape in [[1usize, 3, 5, 7, 3], [2, 4, 4, 4, 16], [1, 1, 1, 1, 1], [1, 3, 5, 7, 4]] {
            let x = rand_tensor(&mut rng, &shape);
            check_op(
                &format!("relu {shape:?} {dt:?}"),
                dt,
                vec![act(x)],
                true,
                &|g, v, _| Ok((ops::relu(g, &v[0])?, vec![])),
                2,
            )?;
            let (a, b) = (rand_tensor(&mut rng, &shape), rand_tensor(&mut rng, &shape));
            check_op(
                &format!("add {shape:?} {dt:?}"),
                dt,
                vec![act(a), act(b)],
                true,
                &|g, v, _| Ok((ops::add(g, &v[0], &v[1])?, vec![])),
                3,
            )?;
        }
    }
    Ok(())
}

pub fn test_conv3d() -> Result<()> {
    assert_eq!(
        vox2vec::cuda::ops::conv3d::weight_splits(2 * 17 * 13 * 11, 5, 27 * 3).0,
        3,
        "the split-K case below must use several splits"
    );
    let mut rng = StdRng::seed_from_u64(4);
    // (n, x, y, z, ci, co, k, bias)
    let cases = [
        (1usize, 5usize, 4usize, 3usize, 3usize, 5usize, 3usize, true),
        (2, 7, 6, 5, 8, 16, 3, true),
        (1, 1, 1, 1, 4, 3, 3, true),
        (2, 9, 3, 2, 17, 20, 3, false),
        (1, 4, 4, 4, 65, 70, 3, true),
        (2, 6, 5, 4, 16, 32, 1, false),
        (1, 3, 3, 3, 5, 1, 3, true),
        (1, 12, 10, 6, 16, 16, 3, true),
        // 4862 voxels: the weight gradient is split over 3 partials (weight_splits), the last short.
        (2, 17, 13, 11, 3, 5, 3, true),
        // One input channel and Co a multiple of 16: the direct kernel (the first conv).
        (2, 5, 3, 6, 1, 16, 3, true),
        (1, 4, 3, 5, 1, 32, 3, false),
        (1, 1, 1, 2, 1, 16, 3, true),
        // Tensor-core path in bf16 (multiples of 16 channels): levels of 4x4x1 and 8x8x2,
        // voxel counts that are no multiple of the 2x4x8 brick, Co beyond one 64-wide tile,
        // Co = 1 (its input gradient falls back), 512 channels, k = 1.
        (1, 4, 4, 1, 32, 16, 3, true),
        (2, 8, 8, 2, 32, 48, 3, true),
        (2, 5, 3, 9, 48, 16, 3, false),
        (1, 3, 5, 7, 16, 1, 3, true),
        (1, 3, 4, 9, 64, 80, 3, true),
        (1, 2, 2, 2, 512, 16, 3, true),
        (2, 3, 5, 6, 32, 16, 1, true),
        // k = 1 with an output channel count that is no multiple of 8 (dy loaded value by value).
        (1, 3, 4, 5, 16, 5, 1, true),
    ];
    for dt in DTYPES {
        for &(n, x, y, z, ci, co, k, bias) in &cases {
            let xs = rand_tensor(&mut rng, &[n, x, y, z, ci]);
            // The tensor-core path multiplies bf16 weights: the oracle gets the same weights.
            let w = rand_tensor(&mut rng, &[co, k, k, k, ci]);
            let w = if dt == DType::BF16 { round_bf16(&w) } else { w };
            let mut inputs = vec![act(xs), param(w)];
            if bias {
                inputs.push(param(rand_tensor(&mut rng, &[co])));
            }
            let name = format!("conv3d k{k} [{n},{x},{y},{z},{ci}]->{co} bias {bias} {dt:?}");
            check_op(&name, dt, inputs, true, &|g, v, _| Ok((ops::conv3d(g, &v[0], &v[1], v.get(2))?, vec![])), 5)?;
        }
    }
    // The bias gradient is the column sum of dy alone (the tensor-core weight-gradient kernel
    // takes it along): with dy exactly bf16 on both devices it must agree to f32 rounding,
    // far inside the bf16 bound above.
    for &(n, x, y, z, ci, co, k, _) in cases.iter().filter(|c| c.4 % 16 == 0) {
        let g = Graph::train();
        let xv = g.leaf(vox2vec::cuda::cast(&rand_tensor(&mut rng, &[n, x, y, z, ci]).to_device(GPU)?, DType::BF16)?);
        let w = g.leaf(round_bf16(&rand_tensor(&mut rng, &[co, k, k, k, ci])).to_device(GPU)?);
        let b = g.leaf(rand_tensor(&mut rng, &[co]).to_device(GPU)?);
        let out = ops::conv3d(&g, &xv, &w, Some(&b))?;
        let dy = round_bf16(&rand_tensor(&mut rng, out.shape()));
        let grads = g.backward_with(&out, dy.to_device(GPU)?)?;
        let want: Vec<f32> =
            (0..co).map(|c| dy.f32s().iter().skip(c).step_by(co).map(|&v| v as f64).sum::<f64>() as f32).collect();
        let db = grads.get(&b).ok_or_else(|| anyhow!("no bias gradient"))?;
        close(
            &format!("conv3d bias gradient [{n},{x},{y},{z},{ci}]->{co} bf16"),
            db,
            &Tensor::from_f32(&[co], want),
            1e-5,
        )?;
    }
    Ok(())
}

pub fn test_batchnorm() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    for dt in DTYPES {
        // [.., 24] and [.., 16] in bf16: the 8-channel vectorised backward.
        for shape in [
            vec![2usize, 5, 4, 3, 6],
            vec![1, 3, 3, 3, 17],
            vec![37, 16],
            vec![1, 8, 8, 4, 300],
            vec![2, 3, 4, 5, 24],
            vec![1, 4, 4, 2, 16],
        ] {
            let c = *shape.last().unwrap();
            for train in [true, false] {
                let x = Tensor::from_f32(
                    &shape,
                    rand_vec(&mut rng, shape.iter().product()).into_iter().map(|v| 3.0 * v + 0.5).collect(),
                );
                let gamma = Tensor::from_f32(&[c], (0..c).map(|_| rng.random_range(0.5..1.5f32)).collect());
                let beta = rand_tensor(&mut rng, &[c]);
                let rm = rand_tensor(&mut rng, &[c]);
                let rv = Tensor::from_f32(&[c], (0..c).map(|_| rng.random_range(0.5..2.0f32)).collect());
                // Activations go in as a 1-D [M, C] view when the shape is 2-D.
                let inputs = vec![
                    if dt == DType::BF16 && shape.len() == 2 { param(x) } else { act(x) },
                    param(gamma),
                    param(beta),
                ];
                let op = |g: &Graph, v: &[Var], d: Device| -> Result<(Var, Vec<Tensor>)> {
                    let (y, up) = ops::batch_norm(g, &v[0], &v[1], &v[2], &rm.to_device(d)?, &rv.to_device(d)?)?;
                    Ok((y, up.map(|u| vec![u.running_mean, u.running_var]).unwrap_or_default()))
                };
                check_op(&format!("batch_norm {shape:?} train {train} {dt:?}"), dt, inputs, train, &op, 7)?;
            }
        }
    }
    Ok(())
}

/// A ResBlock case's inputs (x, then γ0, β0, w2, b2, γ3, β3, w5, b5 and the skip conv's w, b
/// when cin != cout) and its BatchNorms' running statistics (rm0, rv0, rm3, rv3).
fn resblock_inputs(rng: &mut StdRng, shape: [usize; 5], cout: usize, k: usize, dt: DType) -> (Vec<Input>, Vec<Tensor>) {
    let cin = shape[4];
    let mid = cin.min(cout);
    let x =
        Tensor::from_f32(&shape, rand_vec(rng, shape.iter().product()).into_iter().map(|v| 2.0 * v + 0.3).collect());
    let pos =
        |rng: &mut StdRng, c: usize| Tensor::from_f32(&[c], (0..c).map(|_| rng.random_range(0.5..1.5f32)).collect());
    // Conv weights as bf16 values in the bf16 run: the tensor-core convolutions round them,
    // and the oracle must multiply the same weights.
    let scaled = |rng: &mut StdRng, sh: &[usize], fan: usize| {
        let t = Tensor::from_f32(
            sh,
            rand_vec(rng, sh.iter().product()).into_iter().map(|v| v / (fan as f32).sqrt()).collect(),
        );
        if dt == DType::BF16 { round_bf16(&t) } else { t }
    };
    let mut inputs = vec![act(x), param(pos(rng, cin)), param(rand_tensor(rng, &[cin]))];
    inputs.push(param(scaled(rng, &[mid, k, k, k, cin], k * k * k * cin)));
    inputs.push(param(rand_tensor(rng, &[mid])));
    inputs.push(param(pos(rng, mid)));
    inputs.push(param(rand_tensor(rng, &[mid])));
    inputs.push(param(scaled(rng, &[cout, k, k, k, mid], k * k * k * mid)));
    inputs.push(param(rand_tensor(rng, &[cout])));
    if cin != cout {
        inputs.push(param(scaled(rng, &[cout, 1, 1, 1, cin], cin)));
        inputs.push(param(rand_tensor(rng, &[cout])));
    }
    let running = [cin, cin, mid, mid].iter().map(|&c| pos(rng, c)).collect();
    (inputs, running)
}

/// The device ResBlock op on `v` (as `resblock_inputs` orders them), fused or composed; its
/// output and the updated running statistics.
fn resblock_on_device(g: &Graph, v: &[Var], r: &[Tensor], fused: bool) -> Result<(Var, Vec<Tensor>)> {
    use vox2vec::ops::resblock::{ResBlockVars, resblock_train_cuda_with};
    let vars = ResBlockVars {
        gamma0: v[1].clone(),
        beta0: v[2].clone(),
        w2: v[3].clone(),
        b2: v[4].clone(),
        gamma3: v[5].clone(),
        beta3: v[6].clone(),
        w5: v[7].clone(),
        b5: v[8].clone(),
        skip: (v.len() > 9).then(|| (v[9].clone(), v[10].clone())),
        running0: (&r[0], &r[1]),
        running3: (&r[2], &r[3]),
    };
    let (y, [u0, u3]) = resblock_train_cuda_with(g, &v[0], vars, fused)?;
    Ok((y, vec![u0.running_mean, u0.running_var, u3.running_mean, u3.running_var]))
}

/// Channels that are multiples of 16, which take the fused tensor-core ResBlock in bf16: a
/// 4x4x1 level with batch 1, an 8x8x2 level with a skip conv (16 -> 32), 32 -> 16 over a voxel
/// count that is no multiple of the 2x4x8 brick, and k = 1.
const FUSED_RESBLOCKS: [([usize; 5], usize, usize); 4] =
    [([1, 4, 4, 1, 16], 16, 3), ([2, 8, 8, 2, 16], 32, 3), ([1, 3, 5, 9, 32], 16, 3), ([2, 3, 5, 3, 16], 16, 1)];

/// The device's recomputing ResBlock op (saves x and h1 only) against the composition of the
/// primitive ops on the CPU: output, running statistics, and the gradients of x and of every
/// parameter. Shapes with one voxel along an axis, odd channel counts, cin != cout (skip conv,
/// mid = min(cin, cout)) and k = 1; then FUSED_RESBLOCKS (own random draws, so that the first
/// list keeps its values), which take the fused path in bf16.
pub fn test_resblock() -> Result<()> {
    let lists: [(u64, Vec<([usize; 5], usize, usize)>); 2] = [
        (
            21,
            vec![
                ([2, 5, 4, 3, 4], 4, 3),
                ([1, 4, 4, 1, 3], 5, 3),
                ([2, 3, 2, 2, 6], 3, 3),
                ([1, 6, 5, 4, 16], 16, 3),
                ([2, 3, 3, 2, 5], 7, 1),
            ],
        ),
        (23, FUSED_RESBLOCKS.to_vec()),
    ];
    for (seed, cases) in lists {
        let mut rng = StdRng::seed_from_u64(seed);
        for dt in DTYPES {
            for &(shape, cout, k) in &cases {
                let (inputs, running) = resblock_inputs(&mut rng, shape, cout, k, dt);
                let op = |g: &Graph, v: &[Var], d: Device| -> Result<(Var, Vec<Tensor>)> {
                    let r: Vec<Tensor> = running.iter().map(|t| t.to_device(d)).collect::<Result<_>>()?;
                    if d != Device::Cpu {
                        return resblock_on_device(
                            g,
                            v,
                            &r,
                            vox2vec::ops::resblock::fusion_for(dt, shape[4], shape[4].min(cout)),
                        );
                    }
                    // The oracle: the primitive ops composed, as model::layers::ResBlock3d does.
                    let (h, u0) = ops::batch_norm(g, &v[0], &v[1], &v[2], &r[0], &r[1])?;
                    let h = ops::conv3d(g, &ops::relu(g, &h)?, &v[3], Some(&v[4]))?;
                    let (h, u3) = ops::batch_norm(g, &h, &v[5], &v[6], &r[2], &r[3])?;
                    let h = ops::conv3d(g, &ops::relu(g, &h)?, &v[7], Some(&v[8]))?;
                    let s = if v.len() > 9 { ops::conv3d(g, &v[0], &v[9], Some(&v[10]))? } else { v[0].clone() };
                    let (u0, u3) = (u0.expect("train"), u3.expect("train"));
                    Ok((ops::add(g, &h, &s)?, vec![u0.running_mean, u0.running_var, u3.running_mean, u3.running_var]))
                };
                // bf16: a chain of eight ops that each round to bf16 once (one op alone: 2e-2),
                // and the BatchNorm backwards cancel (mean-subtracted sums). Worst on the
                // emulator: the 16-channel case's bn3 beta gradient at 6.1e-2 (w2 4.9e-2, gamma3
                // 4.7e-2), the same to four digits with VOX2VEC_NO_TENSOR_CORES=1, so rounding
                // and not the kernel: h1 rounded to bf16 moves pre-activations near zero across
                // the ReLU, and each flipped voxel moves a 120-voxel channel sum by a whole term.
                // A wrong kernel is off by O(1); the fused path is held tighter below.
                let tol = if dt == DType::BF16 { 8e-2 } else { F32_BOUND };
                check_op_within(&format!("resblock {shape:?}->{cout} k{k} {dt:?}"), dt, inputs, true, &op, 22, tol)?;
            }
        }
    }
    Ok(())
}

/// The fused ResBlock against the composed device ops on the same bf16 inputs and output
/// gradient. Both round the same values to bf16 except y (once instead of twice) and take the
/// BatchNorm sums in a different order (f32 per brick, then f64), so they agree far more
/// closely than either does with the fp32 CPU: a wrong ReLU mask or BatchNorm sum on a few
/// voxels, which the 8e-2 bound against the CPU could hide, fails here.
pub fn test_resblock_fused_vs_composed() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(29);
    for &(shape, cout, k) in &FUSED_RESBLOCKS {
        let name = format!("fused resblock {shape:?}->{cout} k{k}");
        ensure!(
            vox2vec::ops::resblock::fusion_for(DType::BF16, shape[4], shape[4].min(cout)),
            "{name}: the fused path is switched off (VOX2VEC_NO_FUSION)"
        );
        let (inputs, running) = resblock_inputs(&mut rng, shape, cout, k, DType::BF16);
        let run = |fused: bool| -> Result<(Tensor, Vec<Tensor>, Vec<Tensor>)> {
            let g = Graph::train();
            let vars: Vec<Var> = inputs
                .iter()
                .map(|i| -> Result<Var> {
                    let v = i.value.to_device(GPU)?;
                    Ok(g.leaf(if i.activation { vox2vec::cuda::cast(&v, DType::BF16)? } else { v }))
                })
                .collect::<Result<_>>()?;
            let r: Vec<Tensor> = running.iter().map(|t| t.to_device(GPU)).collect::<Result<_>>()?;
            let (y, stats) = resblock_on_device(&g, &vars, &r, fused)?;
            let seed_grad = round_bf16(&rand_tensor(&mut StdRng::seed_from_u64(31), y.shape()));
            let grads = g.backward_with(&y, seed_grad.to_device(GPU)?)?;
            let gs = vars
                .iter()
                .map(|v| grads.get(v).cloned().ok_or_else(|| anyhow!("{name}: no gradient")))
                .collect::<Result<_>>()?;
            Ok((y.value, stats, gs))
        };
        let (fy, fstats, fgrads) = run(true)?;
        let (cy, cstats, cgrads) = run(false)?;
        const TOL: f64 = 1e-2;
        close(&format!("{name} output"), &fy, &cy, TOL)?;
        for (i, (f, c)) in fstats.iter().zip(&cstats).enumerate() {
            close(&format!("{name} running statistic {i}"), f, c, 1e-5)?;
        }
        let scale = cgrads.iter().map(|c| common::norm(&host(c))).fold(0.0f64, f64::max);
        for (i, (f, c)) in fgrads.iter().zip(&cgrads).enumerate() {
            close_scaled(&format!("{name} gradient of input {i}"), f, c, TOL, 1e-2 * scale)?;
        }
    }
    Ok(())
}

/// The eval-mode ResBlock on the device (inference: running statistics, nothing recorded)
/// against the CPU's composition of the primitive ops in eval mode, f32 and bf16: the unfused
/// device path (BN -> ReLU in one pass) everywhere, and on FUSED_RESBLOCKS in bf16 the fused
/// one (BN -> ReLU in the convolutions' loads, the skip in conv5's epilogue), which is also
/// held to 1e-2 of the unfused device path on the same inputs (it rounds y once instead of
/// twice). bf16 against the CPU: 3e-2, three roundings to bf16 in a row.
pub fn test_resblock_eval() -> Result<()> {
    use vox2vec::ops::resblock::{ResBlockParams, fusion_for, resblock_eval_cuda_with};
    let mut rng = StdRng::seed_from_u64(37);
    let mut cases = vec![([2usize, 5, 4, 3, 4], 4usize, 3usize), ([1, 4, 4, 1, 3], 5, 3), ([2, 3, 3, 2, 5], 7, 1)];
    cases.extend(FUSED_RESBLOCKS);
    for dt in DTYPES {
        for &(shape, cout, k) in &cases {
            let (mut inputs, running) = resblock_inputs(&mut rng, shape, cout, k, dt);
            if dt == DType::BF16 {
                inputs[0].value = round_bf16(&inputs[0].value);
            }
            let v: Vec<&Tensor> = inputs.iter().map(|i| &i.value).collect();
            // The oracle: the composition on the CPU, eval mode.
            let g = Graph::inference();
            let c = |t: &Tensor| Var::constant(t.clone());
            let (h, _) = ops::batch_norm(&g, &c(v[0]), &c(v[1]), &c(v[2]), &running[0], &running[1])?;
            let h = ops::conv3d(&g, &ops::relu(&g, &h)?, &c(v[3]), Some(&c(v[4])))?;
            let (h, _) = ops::batch_norm(&g, &h, &c(v[5]), &c(v[6]), &running[2], &running[3])?;
            let h = ops::conv3d(&g, &ops::relu(&g, &h)?, &c(v[7]), Some(&c(v[8])))?;
            let s = if v.len() > 9 { ops::conv3d(&g, &c(v[0]), &c(v[9]), Some(&c(v[10])))? } else { c(v[0]) };
            let want = ops::add(&g, &h, &s)?.value;
            let d: Vec<Tensor> = v.iter().map(|t| t.to_device(GPU)).collect::<Result<_>>()?;
            let r: Vec<Tensor> = running.iter().map(|t| t.to_device(GPU)).collect::<Result<_>>()?;
            let x = vox2vec::cuda::cast(&d[0], dt)?;
            let run = |fused: bool| {
                let p = ResBlockParams {
                    gamma0: &d[1],
                    beta0: &d[2],
                    w2: &d[3],
                    b2: &d[4],
                    gamma3: &d[5],
                    beta3: &d[6],
                    w5: &d[7],
                    b5: &d[8],
                    skip: (d.len() > 9).then(|| (&d[9], &d[10])),
                    running0: (&r[0], &r[1]),
                    running3: (&r[2], &r[3]),
                };
                resblock_eval_cuda_with(&x, p, fused)
            };
            let name = format!("eval resblock {shape:?}->{cout} k{k} {dt:?}");
            let unfused = run(false)?;
            let tol = if dt == DType::BF16 { 3e-2 } else { F32_BOUND };
            close(&format!("{name} unfused"), &unfused, &want, tol)?;
            if fusion_for(dt, shape[4], shape[4].min(cout)) {
                let fused = run(true)?;
                close(&format!("{name} fused"), &fused, &want, tol)?;
                close(&format!("{name} fused vs unfused"), &fused, &unfused, 1e-2)?;
            }
        }
    }
    Ok(())
}

/// The FPN decoder's merge skip_conv(f) + upsample2_crop(up) (one tensor-core convolution
/// with the upsampled residual in its epilogue in bf16; the composition in f32) against the
/// CPU's composition: even and odd extents (the crop), batch 1, 16 and 32 channels, and an
/// up grid larger than half of f's on one axis.
pub fn test_fpn_merge() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(41);
    // (f shape, up grid)
    let cases = [
        ([2usize, 8, 6, 4, 16], [4usize, 3, 2]),
        ([1, 5, 3, 7, 32], [3, 2, 4]),
        ([1, 4, 4, 1, 16], [2, 2, 1]),
        ([2, 3, 5, 9, 16], [2, 3, 5]),
    ];
    for dt in DTYPES {
        for &(fs, ug) in &cases {
            let c = fs[4];
            let w = rand_tensor(&mut rng, &[c, 1, 1, 1, c]);
            let w = if dt == DType::BF16 { round_bf16(&w) } else { w };
            let inputs = vec![
                act(rand_tensor(&mut rng, &fs)),
                param(w),
                param(rand_tensor(&mut rng, &[c])),
                act(rand_tensor(&mut rng, &[fs[0], ug[0], ug[1], ug[2], c])),
            ];
            let name = format!("fpn_merge {fs:?} + up {ug:?} {dt:?}");
            if dt == DType::BF16 {
                ensure!(
                    ops::fpn_merge::fused_for(dt, c),
                    "{name}: the fused merge is switched off (VOX2VEC_NO_FUSION)"
                );
            }
            check_op(
                &name,
                dt,
                inputs,
                true,
                &|g, v, _| Ok((ops::fpn_merge(g, &v[0], &v[1], &v[2], &v[3])?, vec![])),
                43,
            )?;
        }
    }
    Ok(())
}

/// Gradients that two consumers feed (autograd's accumulating backwards): x read by two
/// convolutions and a max-pool, and one weight and bias used twice (as by the two views).
/// The later consumers' kernels add what the earlier ones left (the tensor-core input
/// gradient's epilogue, the weight-gradient reductions, the pooling backward) instead of an
/// add pass; the CPU composes plain ops.
pub fn test_accumulated_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(47);
    for dt in DTYPES {
        for shape in [[1usize, 5, 4, 6, 16], [2, 4, 3, 3, 32]] {
            let c = shape[4];
            let w = rand_tensor(&mut rng, &[c, 3, 3, 3, c]);
            let w1 = rand_tensor(&mut rng, &[c, 1, 1, 1, c]);
            let (w, w1) = if dt == DType::BF16 { (round_bf16(&w), round_bf16(&w1)) } else { (w, w1) };
            let inputs = vec![
                act(rand_tensor(&mut rng, &shape)),
                param(w),
                param(rand_tensor(&mut rng, &[c])),
                param(w1),
                param(rand_tensor(&mut rng, &[c])),
            ];
            let name = format!("accumulated gradients {shape:?} {dt:?}");
            check_op(
                &name,
                dt,
                inputs,
                true,
                &|g, v, _| {
                    let a = ops::conv3d(g, &v[0], &v[1], Some(&v[2]))?;
                    let b = ops::conv3d(g, &v[0], &v[3], Some(&v[4]))?;
                    let c2 = ops::conv3d(g, &a, &v[1], Some(&v[2]))?;
                    let p = ops::upsample2_crop(
                        g,
                        &ops::maxpool2(g, &v[0])?,
                        [v[0].shape()[1], v[0].shape()[2], v[0].shape()[3]],
                    )?;
                    Ok((ops::add(g, &ops::add(g, &c2, &b)?, &p)?, vec![]))
                },
                48,
            )?;
        }
    }
    Ok(())
}

pub fn test_pool_upsample() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    for dt in DTYPES {
        // Odd extents with 8 and 12 channels: the 16-byte kernels over clipped windows (12
        // only in f32).
        for shape in [
            [1usize, 5, 4, 3, 3],
            [2, 8, 8, 4, 16],
            [1, 1, 1, 1, 2],
            [1, 7, 1, 2, 5],
            [1, 5, 3, 7, 8],
            [2, 3, 5, 1, 12],
        ] {
            let x = rand_tensor(&mut rng, &shape);
            check_op(
                &format!("maxpool2 {shape:?} {dt:?}"),
                dt,
                vec![act(x)],
                true,
                &|g, v, _| Ok((ops::maxpool2(g, &v[0])?, vec![])),
                9,
            )?;
        }
        // Ties: small integers repeat within windows; the first maximum in scan order wins.
        for shape in [[2usize, 6, 5, 4, 3], [1, 3, 3, 3, 8]] {
            let x = Tensor::from_f32(
                &shape,
                (0..shape.iter().product::<usize>()).map(|_| rng.random_range(0..3) as f32).collect(),
            );
            check_op(
                &format!("maxpool2 with ties {shape:?} {dt:?}"),
                dt,
                vec![act(x)],
                true,
                &|g, v, _| Ok((ops::maxpool2(g, &v[0])?, vec![])),
                19,
            )?;
        }
        for (shape, target) in [
            ([1usize, 3, 2, 2, 3], [5usize, 4, 3]),
            ([2, 4, 4, 2, 8], [8, 8, 4]),
            ([1, 1, 1, 1, 4], [1, 2, 1]),
            ([1, 3, 5, 2, 7], [6, 9, 4]),
            ([1, 3, 5, 3, 16], [5, 10, 6]),
            ([2, 3, 2, 3, 12], [6, 3, 5]),
        ] {
            let x = rand_tensor(&mut rng, &shape);
            check_op(
                &format!("upsample2_crop {shape:?}->{target:?} {dt:?}"),
                dt,
                vec![act(x)],
                true,
                &|g, v, _| Ok((ops::upsample2_crop(g, &v[0], target)?, vec![])),
                10,
            )?;
        }
    }
    Ok(())
}

pub fn test_gather_concat() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(11);
    for dt in DTYPES {
        for (shape, shift, pairs) in
            [([2usize, 4, 4, 2, 5], 1u32, 40usize), ([1, 3, 5, 7, 3], 0, 9), ([3, 1, 1, 1, 16], 3, 12)]
        {
            let f = rand_tensor(&mut rng, &shape);
            let mut batch = Vec::new();
            let mut voxels = Vec::new();
            for p in 0..pairs {
                // Repeat some voxels so the scatter-add sees collisions.
                let (b, cx, cy, cz) = if p % 4 == 3 {
                    let q = p - 1;
                    (batch[q], voxels[3 * q], voxels[3 * q + 1], voxels[3 * q + 2])
                } else {
                    (
                        rng.random_range(0..shape[0]) as i64,
                        rng.random_range(0..(shape[1] << shift)) as i64,
                        rng.random_range(0..(shape[2] << shift)) as i64,
                        rng.random_range(0..(shape[3] << shift)) as i64,
                    )
                };
                batch.push(b);
                voxels.extend([cx, cy, cz]);
            }
            let op =
                |g: &Graph, v: &[Var], _: Device| Ok((ops::gather_voxels(g, &v[0], &batch, &voxels, shift)?, vec![]));
            check_op(&format!("gather_voxels {shape:?} shift {shift} {dt:?}"), dt, vec![act(f)], true, &op, 12)?;
        }
    }
    let parts = vec![
        param(rand_tensor(&mut rng, &[7, 3])),
        param(rand_tensor(&mut rng, &[7, 5])),
        param(rand_tensor(&mut rng, &[7, 1])),
    ];
    check_op(
        "concat_channels [7,3|5|1]",
        DType::F32,
        parts,
        true,
        &|g, v, _| Ok((ops::concat_channels(g, v)?, vec![])),
        13,
    )
}

pub fn test_head_ops() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(14);
    for (n, d) in [(9usize, 16usize), (5, 128), (1, 3)] {
        let mut x = rand_vec(&mut rng, n * d);
        x[..d].iter_mut().for_each(|v| *v = 0.0); // a zero row: the eps branch
        let x = Tensor::from_f32(&[n, d], x);
        check_op(
            &format!("l2_normalize_rows [{n},{d}]"),
            DType::F32,
            vec![param(x)],
            true,
            &|g, v, _| Ok((ops::l2_normalize_rows(g, &v[0])?, vec![])),
            15,
        )?;
    }
    for (n, fin, fout, bias) in [(7usize, 5usize, 3usize, true), (33, 128, 128, true), (1, 4, 9, false)] {
        let mut inputs = vec![param(rand_tensor(&mut rng, &[n, fin])), param(rand_tensor(&mut rng, &[fout, fin]))];
        if bias {
            inputs.push(param(rand_tensor(&mut rng, &[fout])));
        }
        check_op(
            &format!("linear [{n},{fin}]->{fout} bias {bias}"),
            DType::F32,
            inputs,
            true,
            &|g, v, _| Ok((ops::linear(g, &v[0], &v[1], v.get(2))?, vec![])),
            16,
        )?;
    }
    // TF32 (the head under --precision bf16): inputs rounded to 10 mantissa bits (2^-11
    // relative), fp32 sums; the emulator rounds the same way. Bound 5e-3: a few roundings
    // of 5e-4, the products' errors adding in quadrature.
    for (n, fin, fout) in [(33usize, 128usize, 128usize), (1, 4, 9), (70, 1008, 128)] {
        let inputs = vec![
            param(rand_tensor(&mut rng, &[n, fin])),
            param(rand_tensor(&mut rng, &[fout, fin])),
            param(rand_tensor(&mut rng, &[fout])),
        ];
        let op = |g: &Graph, v: &[Var], _: Device| {
            Ok((ops::linear::linear_with(g, &v[0], &v[1], v.get(2), ops::linear::MatmulMath::Tf32)?, vec![]))
        };
        check_op_within(&format!("linear tf32 [{n},{fin}]->{fout}"), DType::F32, inputs, true, &op, 16, 5e-3)?;
    }
    // Row and column tiles of 32 x 64: counts that are not multiples, d beyond one 32-wide
    // chunk and beyond 128 (the d <= 512 backward variant).
    for (n, d) in [(6usize, 8usize), (37, 16), (2, 128), (300, 32), (2, 1), (97, 128), (65, 130), (130, 64)] {
        let unit = |rng: &mut StdRng| {
            let v = rand_vec(rng, n * d);
            let mut out = v.clone();
            for (o, r) in out.chunks_mut(d).zip(v.chunks(d)) {
                let s = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                o.iter_mut().for_each(|x| *x /= s);
            }
            Tensor::from_f32(&[n, d], out)
        };
        let (e1, e2) = (unit(&mut rng), unit(&mut rng));
        let op = |g: &Graph, v: &[Var], _: Device| Ok((ops::infonce(g, &v[0], &v[1], 0.1)?, vec![]));
        check_op(&format!("infonce [{n},{d}]"), DType::F32, vec![param(e1), param(e2)], true, &op, 17)?;
        // The tensor-core kernels (bf16x3 products, blocks of 64 rows and 64-column tiles)
        // where d allows them: the same bound as fp32 but for the ~2^-16 relative error of the
        // split products (1e-5 of a logit at t = 0.1, summed over the tiles): 1e-4.
        if vox2vec::cuda::ops::infonce::tensor_cores_for(d) {
            let (e1, e2) = (unit(&mut rng), unit(&mut rng));
            let op = |g: &Graph, v: &[Var], _: Device| {
                Ok((ops::infonce::infonce_with(g, &v[0], &v[1], 0.1, ops::linear::MatmulMath::Tf32)?, vec![]))
            };
            check_op_within(
                &format!("infonce tensor cores [{n},{d}]"),
                DType::F32,
                vec![param(e1), param(e2)],
                true,
                &op,
                17,
                1e-4,
            )?;
        }
    }
    Ok(())
}

/// The learning signal on the device (`infonce_signal_hits` / `_finalize`) against
/// `signal_cpu`: anchor counts below, at and above SIGNAL_ANCHORS (1024) and not multiples of
/// the 32-row blocks, d across the 32-wide chunks; e2 a noisy copy of e1 so that top-1 is
/// neither 0 nor 1. Top-1 within 2 anchors of the CPU (other summation orders may flip a
/// near-tie), similarities within 1e-6.
pub fn test_learning_signal() -> Result<()> {
    use vox2vec::ops::infonce::{SIGNAL_ANCHORS, signal, signal_cpu};
    let mut rng = StdRng::seed_from_u64(19);
    for (n, d) in [(6usize, 8usize), (37, 16), (300, 33), (1100, 128), (2, 1)] {
        let unit = |rng: &mut StdRng, base: Option<&[f32]>| {
            let mut v: Vec<f32> =
                (0..n * d).map(|k| base.map_or(0.0, |b| b[k]) + 0.6 * rng.random_range(-1.0..1.0f32)).collect();
            for r in v.chunks_mut(d) {
                let s = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter_mut().for_each(|x| *x /= s);
            }
            v
        };
        let e1 = unit(&mut rng, None);
        let e2 = unit(&mut rng, Some(&e1));
        let want = signal_cpu(&e1, &e2, n, d);
        let got =
            signal(&Tensor::from_f32(&[n, d], e1).to_device(GPU)?, &Tensor::from_f32(&[n, d], e2).to_device(GPU)?)?;
        let anchors = 2 * n.min(SIGNAL_ANCHORS);
        ensure!(
            (got.top1 - want.top1).abs() * anchors as f64 <= 2.0 + 1e-9,
            "[{n},{d}]: top-1 {} on the GPU, {} on the CPU",
            got.top1,
            want.top1
        );
        println!(
            "    learning signal [{n},{d}]: top-1 {:.4} vs {:.4}, positive similarity off by {:.1e}, negative by {:.1e}",
            got.top1,
            want.top1,
            (got.pos_sim - want.pos_sim).abs(),
            (got.neg_sim - want.neg_sim).abs()
        );
        ensure!(
            (got.pos_sim - want.pos_sim).abs() < 1e-6 && (got.neg_sim - want.neg_sim).abs() < 1e-6,
            "[{n},{d}]: {got:?} on the GPU, {want:?} on the CPU"
        );
    }
    Ok(())
}

/// The segmentation loss (BCE in the ROI + soft Dice, `kernels/segloss.cu`) against the CPU:
/// one class and many (260: more than one 256-wide class pass), volumes that are not a
/// multiple of the 256-voxel chunk (several chunks per sample), batch 1 and 2, with an ROI
/// that leaves voxels out and without one; logits stored as f32 and bf16. An empty ROI gives a
/// NaN loss on the device (the host refuses it before).
pub fn test_segloss() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(21);
    for dt in DTYPES {
        for (shape, with_roi) in [
            ([1usize, 3, 5, 7, 1], true),
            ([2, 4, 4, 4, 3], false),
            ([1, 17, 9, 5, 20], true),
            ([2, 2, 3, 2, 260], true),
        ] {
            let logits: Vec<f32> =
                (0..shape.iter().product::<usize>()).map(|_| rng.random_range(-4.0..4.0f32)).collect();
            let logits = Tensor::from_f32(&shape, logits);
            let targets = Tensor::from_f32(
                &shape,
                (0..logits.numel()).map(|_| if rng.random_bool(0.3) { 1.0 } else { 0.0 }).collect(),
            );
            let voxels = logits.numel() / shape[4];
            let roi = with_roi.then(|| {
                vox2vec::ops::segloss::roi_tensor(&shape[..4], &(0..voxels).map(|i| i % 7 != 3).collect::<Vec<_>>())
            });
            let op = |g: &Graph, v: &[Var], device: Device| {
                let t = targets.to_device(device)?;
                let r = roi.as_ref().map(|r| r.to_device(device)).transpose()?;
                Ok((ops::segmentation_loss(g, &v[0], &t, r.as_ref())?, vec![]))
            };
            check_op(
                &format!("segmentation_loss {shape:?} roi {with_roi} {dt:?}"),
                dt,
                vec![act(logits)],
                true,
                &op,
                22,
            )?;
        }
    }
    let shape = [1usize, 2, 2, 2, 2];
    let logits = Var::constant(Tensor::zeros(&shape).to_device(GPU)?);
    let empty = vox2vec::ops::segloss::roi_tensor(&shape[..4], &[false; 8]).to_device(GPU)?;
    let loss = ops::segmentation_loss(&Graph::train(), &logits, &Tensor::zeros(&shape).to_device(GPU)?, Some(&empty))?;
    ensure!(
        loss.value.to_scalar().is_nan(),
        "an empty ROI gave the loss {} on the device, expected NaN",
        loss.value.to_scalar()
    );
    Ok(())
}
