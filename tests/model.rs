//! Model structure: parameter count and names at the reference size, pyramid shapes, init.

use vox2vec::autograd::{Graph, Var};
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::params::SlotKind;
use vox2vec::tensor::Tensor;

#[test]
fn reference_size_backbone_has_the_published_parameter_count() {
    let m = Vox2Vec::new(ModelConfig::default(), 0);
    assert_eq!(m.store.count_trainable("backbone."), 47_624_448);
    assert_eq!(m.config.fpn.embedding_dim(), 1008);
    for key in [
        "backbone.first_conv.weight",
        "backbone.left_blocks.4.layers.1.layers.5.bias",
        "backbone.down_blocks.0.1.weight",
        "backbone.bottom_block.layers.0.layers.0.running_var",
        "backbone.up_blocks.0.0.weight",
        "backbone.skip_blocks.4.bias",
        "backbone.right_blocks.4.layers.1.layers.3.num_batches_tracked",
        "head.0.weight",
        "head.4.running_mean",
        "head.6.bias",
    ] {
        assert!(m.store.find(key).is_some(), "missing {key}");
    }
    // up_blocks.0 maps level 5 (512) to level 4 (256); PyTorch layout [Co, Ci, k, k, k].
    let s = m.store.find("backbone.up_blocks.0.0.weight").unwrap();
    assert_eq!(m.store.pytorch_shape(s), vec![256, 512, 1, 1, 1]);
    assert_eq!(m.store.pytorch_shape(m.store.find("head.6.weight").unwrap()), vec![128, 1008]);
}

#[test]
fn init_follows_pytorch_defaults() {
    let m = Vox2Vec::new(ModelConfig::default(), 0);
    let get = |k: &str| m.store.get(m.store.find(k).unwrap()).clone();
    // Conv 16 -> 16, k = 3: fan_in 432, bound 1/sqrt(432).
    let w = get("backbone.left_blocks.0.layers.0.layers.2.weight");
    let bound = 1.0 / 432f32.sqrt();
    let v = w.f32s();
    assert!(v.iter().all(|x| x.abs() <= bound));
    let max = v.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(max > 0.95 * bound, "weights do not fill U(±1/sqrt(fan_in)): max {max}, bound {bound}");
    let var = v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64;
    assert!((var - (bound * bound / 3.0) as f64).abs() < 0.05 * (bound * bound / 3.0) as f64, "variance {var}");
    assert!(get("backbone.left_blocks.0.layers.0.layers.0.weight").f32s().iter().all(|&x| x == 1.0));
    assert!(get("head.1.bias").f32s().iter().all(|&x| x == 0.0));
    assert!(get("head.1.running_var").f32s().iter().all(|&x| x == 1.0));
    let kinds = m.store.slots().iter().filter(|s| s.kind == SlotKind::Counter).count();
    // 11 stacks x 2 ResBlocks x 2 BatchNorms, plus the head's 2.
    assert_eq!(kinds, 11 * 2 * 2 + 2, "one num_batches_tracked per BatchNorm");
}

#[test]
fn pyramid_levels_have_ceil_shapes() {
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 4 },
        proj_dim: 4,
        temperature: 0.1,
    };
    let mut m = Vox2Vec::new(cfg, 1);
    let pyr = m.pyramid(&Graph::inference(), &Var::constant(Tensor::full(&[1, 13, 11, 9, 1], 0.5))).unwrap();
    let shapes: Vec<Vec<usize>> = pyr.iter().map(|p| p.shape().to_vec()).collect();
    assert_eq!(shapes, vec![vec![1, 13, 11, 9, 2], vec![1, 7, 6, 5, 4], vec![1, 4, 3, 3, 8], vec![1, 2, 2, 2, 16]]);
    // Wrong channel count is an error, not a panic.
    assert!(m.pyramid(&Graph::inference(), &Var::constant(Tensor::zeros(&[1, 4, 4, 4, 2]))).is_err());
}

#[test]
fn segmentation_heads_have_reference_names_and_sizes() {
    use rand::SeedableRng;
    use vox2vec::model::seg_heads::{FpnLinearHead, FpnNonLinearHead};
    use vox2vec::params::ParamStore;
    let fpn = FpnConfig::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut store = ParamStore::new();
    FpnLinearHead::new(&mut store, &mut rng, "", fpn, 13);
    assert!(
        store.find("layers.0.bias").is_some()
            && store.find("layers.1.bias").is_none()
            && store.find("layers.5.weight").is_some()
    );
    assert_eq!(store.pytorch_shape(store.find("layers.5.weight").unwrap()), vec![13, 512, 1, 1, 1]);
    assert_eq!(store.count_trainable(""), 1008 * 13 + 13);
    let mut ns = ParamStore::new();
    FpnNonLinearHead::new(&mut ns, &mut rng, "", fpn, 13);
    for key in [
        "bottom_block.layers.0.weight",
        "bottom_block.layers.5.bias",
        "up_blocks.0.0.weight",
        "skip_blocks.4.weight",
        "right_blocks.4.layers.3.running_var",
        "final_block.weight",
    ] {
        assert!(ns.find(key).is_some(), "missing {key}");
    }
    let n = ns.count_trainable("");
    println!("non-linear head: {n} parameters");
    assert!((500_000..2_000_000).contains(&n), "the reference's non-linear head has about 1 M parameters, got {n}");

    // Both produce level-0 logits for a pyramid.
    let cfg = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 3 },
        proj_dim: 4,
        temperature: 0.1,
    };
    let mut m = Vox2Vec::new(cfg, 1);
    let g = Graph::inference();
    let pyr = m.pyramid(&g, &Var::constant(Tensor::full(&[1, 9, 7, 5, 1], 0.3))).unwrap();
    let mut hs = ParamStore::new();
    let lin = FpnLinearHead::new(&mut hs, &mut rng, "", cfg.fpn, 3);
    assert_eq!(lin.forward(&g, &hs, &pyr).unwrap().shape(), &[1, 9, 7, 5, 3]);
    let mut hs2 = ParamStore::new();
    let nl = FpnNonLinearHead::new(&mut hs2, &mut rng, "", cfg.fpn, 3);
    assert_eq!(nl.forward(&g, &mut hs2, &pyr).unwrap().shape(), &[1, 9, 7, 5, 3]);
}

/// Inference on the CPU runs each ResBlock as one fused op (BN → ReLU while the convolution
/// pads its input, the skip added while it writes its output); a graph that records
/// (`eval_with_grad`) runs the composition of the primitive ops. On the direct kernels
/// (`direct_convolutions`) the two must agree bit for bit: the same f32 operations in the same
/// order. Checked on a whole pyramid (levels on the shifted and the im2col paths) and on
/// ResBlocks with a skip convolution, k = 3 and k = 1, with non-trivial running statistics.
/// By default level 0 runs Winograd F(2, 3) (SIMD kernels) in both, fused or not (at Y = 10
/// the fused op does not take F(4, 3) either): they agree bit for bit with each other too, and
/// with the direct kernels' values to ~1e-6.
#[test]
fn fused_eval_resblocks_equal_the_composition_bit_for_bit() {
    use rand::{Rng, SeedableRng};
    use vox2vec::model::layers::ResBlock3d;
    use vox2vec::ops::conv3d::direct_convolutions;
    use vox2vec::params::ParamStore;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut m = Vox2Vec::new(
        ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 4 }, ..ModelConfig::default() },
        3,
    );
    // Running statistics away from (0, 1), as after training.
    for slot in 0..m.store.len() {
        let name = m.store.slots()[slot].name.clone();
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            let n = m.store.get(slot).numel();
            let v: Vec<f32> = (0..n)
                .map(|_| if name.ends_with("mean") { rng.random_range(-0.5..0.5) } else { rng.random_range(0.3..2.0) })
                .collect();
            m.store.set(slot, Tensor::from_f32(&[n], v));
        }
    }
    let x = Tensor::from_f32(&[2, 13, 10, 9, 1], (0..2 * 13 * 10 * 9).map(|_| rng.random::<f32>()).collect());
    let fused = direct_convolutions(|| m.pyramid(&Graph::inference(), &Var::constant(x.clone()))).unwrap();
    let winograd = m.pyramid(&Graph::inference(), &Var::constant(x.clone())).unwrap();
    let composed = direct_convolutions(|| m.pyramid(&Graph::eval_with_grad(), &Var::constant(x.clone()))).unwrap();
    let composed_winograd = m.pyramid(&Graph::eval_with_grad(), &Var::constant(x)).unwrap();
    for (i, (((a, w), b), cw)) in fused.iter().zip(&winograd).zip(&composed).zip(&composed_winograd).enumerate() {
        assert_eq!(
            a.value.f32s(),
            b.value.f32s(),
            "pyramid level {i} differs between the fused and the composed eval ResBlocks"
        );
        assert_eq!(
            w.value.f32s(),
            cw.value.f32s(),
            "pyramid level {i} differs between the fused and the composed eval ResBlocks with Winograd"
        );
        let (w, b) = (w.value.f32s(), b.value.f32s());
        let d = w.iter().zip(b).map(|(&p, &q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let norm = b.iter().map(|&q| (q as f64).powi(2)).sum::<f64>().sqrt();
        println!(
            "pyramid level {i}: default inference (Winograd where it applies) vs composition: rel err {:.1e}",
            d / norm
        );
        assert!(d <= 1e-5 * norm, "pyramid level {i}: default inference is {:.1e} from the composition", d / norm);
    }
    for (cin, cout, k, shape) in
        [(6usize, 10usize, 3usize, [1usize, 7, 6, 5]), (8, 8, 1, [2, 5, 4, 3]), (5, 3, 3, [1, 2, 1, 3])]
    {
        let mut store = ParamStore::new();
        let block = ResBlock3d::new(&mut store, &mut rng, "b", cin, cout, k);
        for slot in 0..store.len() {
            let name = store.slots()[slot].name.clone();
            if name.ends_with("running_var") {
                let n = store.get(slot).numel();
                store.set(slot, Tensor::from_f32(&[n], (0..n).map(|_| rng.random_range(0.3..2.0)).collect()));
            }
        }
        let x = Tensor::from_f32(
            &[shape[0], shape[1], shape[2], shape[3], cin],
            (0..shape.iter().product::<usize>() * cin).map(|_| rng.random_range(-1.0..1.0f32)).collect(),
        );
        let a =
            direct_convolutions(|| block.forward(&Graph::inference(), &mut store, &Var::constant(x.clone()))).unwrap();
        let b = direct_convolutions(|| block.forward(&Graph::eval_with_grad(), &mut store, &Var::constant(x))).unwrap();
        assert_eq!(a.value.f32s(), b.value.f32s(), "ResBlock {cin}->{cout} k{k} on {shape:?}");
    }
}
