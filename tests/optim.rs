//! Adam and gradient clipping against values computed by hand (PyTorch's formulas).

use vox2vec::optim::{Adam, AdamConfig, clip_grad_norm};
use vox2vec::params::{Layout, ParamStore, SlotKind};
use vox2vec::tensor::Tensor;

fn close(a: f32, b: f64, tol: f64) -> bool {
    (a as f64 - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn adam_two_steps_match_hand_computation() {
    let mut store = ParamStore::new();
    let p = store.add("p", Tensor::from_f32(&[2], vec![1.0, -2.0]), SlotKind::Trainable, Layout::Plain);
    store.add("stat", Tensor::from_f32(&[1], vec![5.0]), SlotKind::RunningStat, Layout::Plain);
    let mut adam = Adam::new(AdamConfig::default(), &store);
    // Step 1: m̂ = g, v̂ = g², so p -= lr · g / (|g| + eps).
    adam.update(&mut store, &[Some(Tensor::from_f32(&[2], vec![0.5, -0.1])), None]).unwrap();
    let v = store.get(p).f32s().to_vec();
    assert!(close(v[0], 0.999_700_000_006, 1e-7), "{v:?}");
    assert!(close(v[1], -1.999_700_000_03, 1e-7), "{v:?}");
    // Step 2 with g = (0.25, 0.3):
    // m = (0.07, 0.021), v = (3.1225e-4, 9.999e-5), m̂ = m / 0.19, v̂ = v / 0.001999.
    adam.update(&mut store, &[Some(Tensor::from_f32(&[2], vec![0.25, 0.3])), None]).unwrap();
    let v = store.get(p).f32s().to_vec();
    assert!(close(v[0], 0.999_420_346_1, 3e-7), "{v:?}");
    assert!(close(v[1], -1.999_848_257, 3e-7), "{v:?}");
    assert_eq!(adam.step, 2);
    // Buffers are never touched by the optimiser.
    assert_eq!(store.get(1).f32s(), &[5.0]);
}

#[test]
fn clipping_scales_to_unit_norm_only_when_above() {
    let mut g = vec![Some(Tensor::from_f32(&[2], vec![3.0, 4.0])), None, Some(Tensor::from_f32(&[1], vec![12.0]))];
    let total = clip_grad_norm(&mut g, 1.0);
    assert!((total - 13.0).abs() < 1e-9);
    let k = 1.0 / (13.0 + 1e-6);
    let a = g[0].as_ref().unwrap().f32s();
    assert!(close(a[0], 3.0 * k, 1e-6) && close(a[1], 4.0 * k, 1e-6), "{a:?}");
    assert!(close(g[2].as_ref().unwrap().f32s()[0], 12.0 * k, 1e-6));
    let mut small = vec![Some(Tensor::from_f32(&[2], vec![0.3, 0.4]))];
    let total = clip_grad_norm(&mut small, 1.0);
    assert!((total - 0.5).abs() < 1e-7);
    assert_eq!(small[0].as_ref().unwrap().f32s(), &[0.3, 0.4]);
}

/// Clipping fused into Adam (the training step's path) equals clip_grad_norm then Adam.
#[test]
fn fused_clip_equals_clip_then_update() {
    use vox2vec::optim::{clip_coefficient, global_norm};
    let make = || {
        let mut s = ParamStore::new();
        s.add("a", Tensor::from_f32(&[3], vec![0.3, -1.2, 2.0]), SlotKind::Trainable, Layout::Plain);
        s.add("b", Tensor::from_f32(&[2], vec![5.0, 0.1]), SlotKind::Trainable, Layout::Plain);
        s
    };
    let grads =
        || vec![Some(Tensor::from_f32(&[3], vec![3.0, -0.5, 7.0])), Some(Tensor::from_f32(&[2], vec![-2.0, 1.5]))];
    let (mut s1, mut s2) = (make(), make());
    let (mut a1, mut a2) = (Adam::new(AdamConfig::default(), &s1), Adam::new(AdamConfig::default(), &s2));
    for _ in 0..3 {
        let mut g = grads();
        clip_grad_norm(&mut g, 1.0);
        a1.update(&mut s1, &g).unwrap();
        let g = grads();
        let coef = clip_coefficient(global_norm(&g), 1.0);
        assert!(coef < 1.0);
        a2.update_scaled(&mut s2, &g, coef).unwrap();
    }
    for slot in 0..2 {
        assert_eq!(s1.get(slot).f32s(), s2.get(slot).f32s());
    }
}

/// Adam leaves runs whose gradient is zero and whose moments are still zero unread (the
/// coarse levels' padding-only taps): the result must be the plain per-element update's, bit
/// for bit, including runs that turn non-zero later, ±0 gradients and a clipping scale.
#[test]
fn idle_runs_update_as_every_element() {
    let n = 3000; // runs of 256: several idle, one partly non-zero, a short last one
    let mut store = ParamStore::new();
    let init: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
    store.add("w", Tensor::from_f32(&[n], init.clone()), SlotKind::Trainable, Layout::Plain);
    let mut adam = Adam::new(AdamConfig::default(), &store);
    let c = AdamConfig::default();
    let (mut p, mut m, mut v) = (init, vec![0.0f32; n], vec![0.0f32; n]);
    for step in 1..=4 {
        // Non-zero in [300, 700) for two steps (then zero with moments that are not), and
        // from step 3 on at 2999; -0.0 in run [1024, 1280).
        let g: Vec<f32> = (0..n)
            .map(|i| match i {
                300..700 if step <= 2 => ((i + step) as f32).sin(),
                1024..1280 => -0.0,
                2999 if step >= 3 => 0.25,
                _ => 0.0,
            })
            .collect();
        let scale = if step == 2 { 0.5f32 } else { 1.0 };
        adam.update_scaled(&mut store, &[Some(Tensor::from_f32(&[n], g.clone()))], scale).unwrap();
        let t = step as i32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let step_size = (c.lr / (1.0 - c.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        for i in 0..n {
            let g = if scale == 1.0 { g[i] } else { g[i] * scale };
            m[i] += (1.0 - b1) * (g - m[i]);
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
        }
        let got = store.get(0).f32s();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(got, &p), "step {step}: parameters differ from the per-element update");
        assert!(
            same(adam.exp_avg[0].as_ref().unwrap(), &m) && same(adam.exp_avg_sq[0].as_ref().unwrap(), &v),
            "step {step}: moments differ"
        );
    }
}
