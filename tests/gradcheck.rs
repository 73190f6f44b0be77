//! Finite-difference gradient checks for every op, on small shapes including odd extents.
//!
//! For an op f and a random cotangent r, the analytic vector-Jacobian product (the tape's
//! backward seeded with r) must match the central difference of L(x) = Σ r · f(x) for each
//! input coordinate (all of them for small inputs, a random subset of 300 otherwise).
//! Error: ‖analytic − numeric‖ / max(‖numeric‖, 1e-3) over the checked coordinates < 1e-2.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vox2vec::autograd::{Graph, Var};
use vox2vec::ops;
use vox2vec::tensor::Tensor;

const EPS: f32 = 1e-2;
const TOL: f64 = 1e-2;

fn rand_tensor(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(shape, (0..n).map(|_| rng.random_range(lo..hi)).collect())
}

/// Values bounded away from 0 (for ReLU's kink).
fn away_from_zero(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(
        shape,
        (0..n)
            .map(|_| {
                let v = rng.random_range(0.1..1.0f32);
                if rng.random_bool(0.5) { v } else { -v }
            })
            .collect(),
    )
}

/// Distinct values at least 0.05 apart, shuffled (so max-pool winners are stable under ±EPS).
fn distinct(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - n as f32 * 0.025).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
    Tensor::from_f32(shape, v)
}

type Mode = fn() -> Graph;

/// Check d(Σ r·f)/d input for every input in `wrt`.
fn check(name: &str, mode: Mode, inputs: Vec<Tensor>, wrt: &[usize], f: impl Fn(&Graph, &[Var]) -> Var) {
    let mut rng = StdRng::seed_from_u64(7);
    let g = mode();
    let vars: Vec<Var> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| if wrt.contains(&i) { g.leaf(t.clone()) } else { Var::constant(t.clone()) })
        .collect();
    let out = f(&g, &vars);
    let r = rand_tensor(&mut rng, out.shape(), -1.0, 1.0);
    let grads = g.backward_with(&out, r.clone()).unwrap();
    let objective = |xs: &[Tensor]| -> f64 {
        let g = mode();
        let vs: Vec<Var> = xs.iter().map(|t| Var::constant(t.clone())).collect();
        let y = f(&g, &vs);
        y.value.f32s().iter().zip(r.f32s()).map(|(&a, &b)| a as f64 * b as f64).sum()
    };
    for &k in wrt {
        let analytic =
            grads.get(&vars[k]).unwrap_or_else(|| panic!("{name}: no gradient for input {k}")).f32s().to_vec();
        let n = inputs[k].numel();
        let coords: Vec<usize> =
            if n <= 300 { (0..n).collect() } else { (0..300).map(|_| rng.random_range(0..n)).collect() };
        let (mut dn, mut nn) = (0.0f64, 0.0f64);
        for &j in &coords {
            let mut xs = inputs.clone();
            let mut plus = inputs[k].f32s().to_vec();
            plus[j] += EPS;
            xs[k] = Tensor::from_f32(inputs[k].shape(), plus);
            let lp = objective(&xs);
            let mut minus = inputs[k].f32s().to_vec();
            minus[j] -= EPS;
            xs[k] = Tensor::from_f32(inputs[k].shape(), minus);
            let lm = objective(&xs);
            let numeric = (lp - lm) / (2.0 * EPS as f64);
            dn += (analytic[j] as f64 - numeric).powi(2);
            nn += numeric * numeric;
        }
        let err = dn.sqrt() / nn.sqrt().max(1e-3);
        println!("gradcheck {name} input {k}: rel err {err:.2e} over {} coordinates", coords.len());
        assert!(err < TOL, "{name}: input {k} gradient error {err:.3e} ≥ {TOL:e}");
    }
}

#[test]
fn conv3d_k3_gradients() {
    let mut rng = StdRng::seed_from_u64(1);
    for (x, co) in [([2, 5, 4, 3, 3], 4), ([1, 3, 4, 5, 1], 2), ([1, 1, 2, 1, 2], 3), ([2, 2, 1, 3, 2], 2)] {
        let ci = x[4];
        let inputs = vec![
            rand_tensor(&mut rng, &x, -1.0, 1.0),
            rand_tensor(&mut rng, &[co, 3, 3, 3, ci], -0.5, 0.5),
            rand_tensor(&mut rng, &[co], -0.5, 0.5),
        ];
        check("conv3d k3", Graph::train, inputs, &[0, 1, 2], |g, v| ops::conv3d(g, &v[0], &v[1], Some(&v[2])).unwrap());
    }
}

#[test]
fn conv3d_k1_gradients() {
    let mut rng = StdRng::seed_from_u64(2);
    let inputs = vec![
        rand_tensor(&mut rng, &[2, 3, 2, 5, 4], -1.0, 1.0),
        rand_tensor(&mut rng, &[3, 1, 1, 1, 4], -0.5, 0.5),
        rand_tensor(&mut rng, &[3], -0.5, 0.5),
    ];
    check("conv3d k1", Graph::train, inputs.clone(), &[0, 1, 2], |g, v| {
        ops::conv3d(g, &v[0], &v[1], Some(&v[2])).unwrap()
    });
    check("conv3d k1 no bias", Graph::train, inputs[..2].to_vec(), &[0, 1], |g, v| {
        ops::conv3d(g, &v[0], &v[1], None).unwrap()
    });
}

fn bn(g: &Graph, v: &[Var]) -> Var {
    let c = *v[0].shape().last().unwrap();
    let rm = Tensor::from_f32(&[c], (0..c).map(|i| 0.1 * i as f32).collect());
    let rv = Tensor::from_f32(&[c], (0..c).map(|i| 0.5 + 0.2 * i as f32).collect());
    ops::batch_norm(g, &v[0], &v[1], &v[2], &rm, &rv).unwrap().0
}

#[test]
fn batchnorm_gradients() {
    let mut rng = StdRng::seed_from_u64(3);
    for shape in [vec![2, 3, 4, 2, 5], vec![7, 6], vec![1, 3, 1, 1, 2]] {
        let c = *shape.last().unwrap();
        let inputs = vec![
            rand_tensor(&mut rng, &shape, -2.0, 2.0),
            rand_tensor(&mut rng, &[c], 0.5, 1.5),
            rand_tensor(&mut rng, &[c], -0.5, 0.5),
        ];
        check("batchnorm train", Graph::train, inputs.clone(), &[0, 1, 2], bn);
        check("batchnorm eval", Graph::eval_with_grad, inputs, &[0, 1, 2], bn);
    }
}

fn bn_relu(g: &Graph, v: &[Var]) -> Var {
    let c = *v[0].shape().last().unwrap();
    let rm = Tensor::from_f32(&[c], (0..c).map(|i| 0.1 * i as f32).collect());
    let rv = Tensor::from_f32(&[c], (0..c).map(|i| 0.5 + 0.2 * i as f32).collect());
    ops::batchnorm::batch_norm_relu(g, &v[0], &v[1], &v[2], &rm, &rv).unwrap().0
}

/// The fused relu(batch_norm(x)) against its oracle, the composition of the two ops: the same
/// bits forward and backward (train and eval), and finite differences.
#[test]
fn batchnorm_relu_is_the_composition() {
    let mut rng = StdRng::seed_from_u64(5);
    for shape in [vec![2, 3, 4, 2, 5], vec![7, 6], vec![300, 3]] {
        let c = *shape.last().unwrap();
        let inputs = [
            rand_tensor(&mut rng, &shape, -2.0, 2.0),
            rand_tensor(&mut rng, &[c], 0.5, 1.5),
            rand_tensor(&mut rng, &[c], -0.5, 0.5),
        ];
        let dy = rand_tensor(&mut rng, &shape, -1.0, 1.0);
        for make in [Graph::train as fn() -> Graph, Graph::eval_with_grad] {
            let run = |f: fn(&Graph, &[Var]) -> Var| {
                let g = make();
                let vars: Vec<Var> = inputs.iter().map(|t| g.leaf(t.clone())).collect();
                let y = f(&g, &vars);
                let grads = g.backward_with(&y, dy.clone()).unwrap();
                let mut out = vec![y.value.f32s().to_vec()];
                out.extend(vars.iter().map(|v| grads.get(v).unwrap().f32s().to_vec()));
                out
            };
            let fused = run(bn_relu);
            let composed = run(|g, v| ops::relu(g, &bn(g, v)).unwrap());
            for (name, (a, b)) in ["y", "dx", "dgamma", "dbeta"].iter().zip(fused.iter().zip(&composed)) {
                assert!(
                    a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{shape:?} {name}: fused and composed differ"
                );
            }
        }
    }
    // Finite differences where no BatchNorm output is near ReLU's kink (β ≥ 3.5 > 1.5 · |x̂|):
    // a step across the kink makes the quotient meaningless. The masked side is the
    // composition's bits above, and relu's own finite differences below.
    for shape in [vec![2, 3, 4, 2, 5], vec![7, 6]] {
        let c = *shape.last().unwrap();
        let inputs = vec![
            rand_tensor(&mut rng, &shape, -2.0, 2.0),
            rand_tensor(&mut rng, &[c], 0.5, 1.5),
            rand_tensor(&mut rng, &[c], 3.5, 4.0),
        ];
        check("batchnorm_relu train", Graph::train, inputs, &[0, 1, 2], bn_relu);
    }
}

#[test]
fn relu_and_add_gradients() {
    let mut rng = StdRng::seed_from_u64(4);
    let x = away_from_zero(&mut rng, &[3, 7]);
    check("relu", Graph::train, vec![x], &[0], |g, v| ops::relu(g, &v[0]).unwrap());
    let inputs =
        vec![rand_tensor(&mut rng, &[2, 3, 1, 2, 4], -1.0, 1.0), rand_tensor(&mut rng, &[2, 3, 1, 2, 4], -1.0, 1.0)];
    check("add", Graph::train, inputs, &[0, 1], |g, v| ops::add(g, &v[0], &v[1]).unwrap());
}

#[test]
fn maxpool_gradients() {
    let mut rng = StdRng::seed_from_u64(5);
    for shape in [[2, 5, 4, 3, 2], [1, 2, 2, 2, 3], [1, 3, 1, 5, 1]] {
        check("maxpool2", Graph::train, vec![distinct(&mut rng, &shape)], &[0], |g, v| {
            ops::maxpool2(g, &v[0]).unwrap()
        });
    }
}

#[test]
fn upsample_crop_gradients() {
    let mut rng = StdRng::seed_from_u64(6);
    for target in [[5, 4, 6], [6, 3, 5], [1, 1, 1]] {
        let x = rand_tensor(&mut rng, &[2, 3, 2, 3, 2], -1.0, 1.0);
        check("upsample2_crop", Graph::train, vec![x], &[0], move |g, v| {
            ops::upsample2_crop(g, &v[0], target).unwrap()
        });
    }
}

#[test]
fn linear_gradients() {
    let mut rng = StdRng::seed_from_u64(8);
    let inputs = vec![
        rand_tensor(&mut rng, &[5, 7], -1.0, 1.0),
        rand_tensor(&mut rng, &[4, 7], -1.0, 1.0),
        rand_tensor(&mut rng, &[4], -1.0, 1.0),
    ];
    check("linear", Graph::train, inputs, &[0, 1, 2], |g, v| ops::linear(g, &v[0], &v[1], Some(&v[2])).unwrap());
}

#[test]
fn l2_normalize_gradients() {
    let mut rng = StdRng::seed_from_u64(9);
    let x = rand_tensor(&mut rng, &[6, 5], -1.0, 1.0);
    check("l2_normalize_rows", Graph::train, vec![x], &[0], |g, v| ops::l2_normalize_rows(g, &v[0]).unwrap());
}

#[test]
fn gather_and_concat_gradients() {
    let mut rng = StdRng::seed_from_u64(10);
    let f = rand_tensor(&mut rng, &[2, 4, 3, 5, 3], -1.0, 1.0);
    // Pairs repeat voxels on purpose (scatter-add must accumulate).
    let batch = vec![0, 1, 1, 0, 1, 1, 0];
    let vox = vec![0, 0, 0, 3, 2, 4, 3, 2, 4, 1, 1, 1, 2, 0, 3, 3, 2, 4, 0, 2, 1];
    for shift in [0u32, 1] {
        let (b, v) = (batch.clone(), vox.clone());
        let f2 = if shift == 0 { f.clone() } else { rand_tensor(&mut rng, &[2, 2, 2, 3, 3], -1.0, 1.0) };
        check("gather_voxels", Graph::train, vec![f2], &[0], move |g, x| {
            ops::gather_voxels(g, &x[0], &b, &v, shift).unwrap()
        });
    }
    let inputs = vec![rand_tensor(&mut rng, &[4, 2], -1.0, 1.0), rand_tensor(&mut rng, &[4, 3], -1.0, 1.0)];
    check("concat_channels", Graph::train, inputs, &[0, 1], |g, v| ops::concat_channels(g, v).unwrap());
}

#[test]
fn infonce_gradients() {
    let mut rng = StdRng::seed_from_u64(11);
    for n in [2, 9] {
        let inputs = vec![rand_tensor(&mut rng, &[n, 5], -0.5, 0.5), rand_tensor(&mut rng, &[n, 5], -0.5, 0.5)];
        check("infonce", Graph::train, inputs, &[0, 1], |g, v| ops::infonce(g, &v[0], &v[1], 0.1).unwrap());
    }
}

#[test]
fn gather_rejects_out_of_range_voxels() {
    let g = Graph::train();
    let f = Var::constant(Tensor::zeros(&[1, 2, 2, 2, 1]));
    let err = ops::gather_voxels(&g, &f, &[0], &[0, 2, 0], 0).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(ops::gather_voxels(&g, &f, &[1], &[0, 0, 0], 0).is_err());
}

/// The CPU oracle must not depend on the thread count (fixed reduction groups). This shape
/// runs Winograd F(2, 3) on the SIMD kernels (3 tasks of x-planes in the weight gradient).
#[test]
fn conv_backward_is_thread_count_independent() {
    use vox2vec::ops::conv3d::{conv3d_backward_input_cpu, conv3d_backward_weight_cpu, conv3d_forward_cpu};
    use vox2vec::tensor::Vol;
    let mut rng = StdRng::seed_from_u64(12);
    let v = Vol { n: 2, x: 9, y: 7, z: 5, c: 3 };
    let x = rand_tensor(&mut rng, &v.shape(), -1.0, 1.0);
    let w = rand_tensor(&mut rng, &[4, 3, 3, 3, 3], -1.0, 1.0);
    let dy = rand_tensor(&mut rng, &[2, 9, 7, 5, 4], -1.0, 1.0);
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            (
                conv3d_forward_cpu(x.f32s(), v, w.f32s(), None, 4, 3),
                conv3d_backward_weight_cpu(x.f32s(), v, dy.f32s(), 4, 3),
                conv3d_backward_input_cpu(dy.f32s(), v.with_c(4), w.f32s(), 3, 3),
            )
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn segmentation_loss_gradients_and_values() {
    let mut rng = StdRng::seed_from_u64(13);
    let shape = [2, 3, 2, 2, 3];
    let logits = rand_tensor(&mut rng, &shape, -2.0, 2.0);
    let targets = Tensor::from_f32(&shape, (0..72).map(|_| if rng.random_bool(0.3) { 1.0 } else { 0.0 }).collect());
    let roi: Vec<bool> = (0..24).map(|i| i % 5 != 0).collect();
    let (t1, r1) = (targets.clone(), ops::segloss::roi_tensor(&shape[..4], &roi));
    check("segmentation_loss", Graph::train, vec![logits.clone()], &[0], move |g, v| {
        ops::segmentation_loss(g, &v[0], &t1, Some(&r1)).unwrap()
    });
    let t2 = targets.clone();
    check("segmentation_loss no roi", Graph::train, vec![logits.clone()], &[0], move |g, v| {
        ops::segmentation_loss(g, &v[0], &t2, None).unwrap()
    });
    // Perfect, confident predictions: BCE ~ 0 and Dice loss ~ 1 − 2G/(2G + 1) per (n, c).
    let confident: Vec<f32> = targets.f32s().iter().map(|&t| if t > 0.5 { 30.0 } else { -30.0 }).collect();
    let (_, bce, per_class, _) = ops::segloss::segmentation_loss_cpu(&confident, targets.f32s(), None, 2, 3);
    assert!(bce < 1e-10, "{bce}");
    for (k, d) in per_class.iter().enumerate() {
        let want: f64 = (0..2)
            .map(|b| {
                let gsum: f64 = (0..12).map(|v| targets.f32s()[(b * 12 + v) * 3 + k] as f64).sum();
                1.0 - 2.0 * gsum / (2.0 * gsum + 1.0)
            })
            .sum::<f64>()
            / 2.0;
        assert!((d - want).abs() < 1e-9, "class {k}: {d} vs {want}");
    }
    assert!(
        ops::segmentation_loss(
            &Graph::train(),
            &Var::constant(logits),
            &targets,
            Some(&ops::segloss::roi_tensor(&shape[..4], &[false; 24]))
        )
        .is_err(),
        "empty ROI must be an error"
    );
}
