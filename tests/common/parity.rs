//! Parity of our model with a reference fixture, on any device (tests/parity.rs on the CPU,
//! tests/gpu/model_vs_cpu.rs on a CUDA device). Error = ‖a − b‖ / max(‖b‖, floor), floor = 1e-2 × the
//! largest ‖b‖ of the same kind in the file (see ../shared/fixtures/README.md).

use super::{Fixture, norm, rel_err};
use vox2vec::autograd::{Graph, Var};
use vox2vec::model::PairBatch;
use vox2vec::ops;
use vox2vec::tensor::{DType, Device, Tensor, ncxyz_to_nxyzc, nxyzc_to_ncxyz};

/// (name, ours, expected) of one kind; returns the worst error and its name.
pub fn worst(kind: &str, items: &[(String, Vec<f32>, Vec<f32>)]) -> (f64, String) {
    let floor = 1e-2 * items.iter().map(|(_, _, b)| norm(b)).fold(0.0, f64::max);
    let mut w = (0.0, String::new());
    for (name, a, b) in items {
        let e = rel_err(a, b, floor);
        assert!(e.is_finite(), "{kind} {name}: non-finite error");
        if e > w.0 {
            w = (e, name.clone());
        }
    }
    w
}

pub fn to_cl(f: &Fixture, key: &str) -> Tensor {
    let (s, v) = f.f32(key);
    let sp = s[2] * s[3] * s[4];
    Tensor::from_f32(&[s[0], s[2], s[3], s[4], s[1]], ncxyz_to_nxyzc(v, s[0], s[1], sp))
}

fn to_torch(t: &Tensor) -> Vec<f32> {
    let s = t.shape();
    nxyzc_to_ncxyz(&host(t), s[0], s[4], s[1] * s[2] * s[3])
}

/// f32 host values of a tensor wherever it lives.
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().expect("reading a tensor back")
}

/// The model of fixture `f` on `device`, activations stored as `dtype` there.
fn model_on(f: &Fixture, device: Device, dtype: DType) -> vox2vec::model::Vox2Vec {
    let mut m = f.model();
    m.to_device(device).expect("moving the model");
    m.activation_dtype = dtype;
    m
}

/// Worst (forward, gradient) relative errors of our model against fixture `f`, run on
/// `device` with activations stored as `dtype`; prints one `parity` line.
pub fn check_fixture(f: &Fixture, device: Device, dtype: DType) -> (f64, f64) {
    check_fixture_with(f, device, dtype, false)
}

/// `check_fixture`, optionally with the two input views rounded to bf16 first: run on the CPU
/// in f32, this measures how sensitive the fixture's outputs are to bf16-sized perturbations
/// (the yardstick for the bf16 storage mode).
pub fn check_fixture_with(f: &Fixture, device: Device, dtype: DType, round_inputs: bool) -> (f64, f64) {
    let input = |key: &str| {
        let t = to_cl(f, key);
        if round_inputs {
            Tensor::from_f32(t.shape(), t.f32s().iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect())
        } else {
            t
        }
    };
    let levels = f.config().fpn.num_scales;
    let mut fwd: Vec<(f64, String)> = Vec::new();
    let mut grad: Vec<(f64, String)> = Vec::new();

    // Eval pyramid (running statistics), nothing recorded.
    {
        let mut m = model_on(f, device, dtype);
        let g = Graph::inference();
        let x1 = m.prepare_input(&input("input.x1")).unwrap();
        let pyr = m.pyramid(&g, &Var::constant(x1)).unwrap();
        let items: Vec<_> = (0..levels)
            .map(|i| {
                (
                    format!("eval.pyramid.{i}"),
                    to_torch(&pyr[i].value),
                    f.f32(&format!("expect.eval.pyramid.{i}")).1.to_vec(),
                )
            })
            .collect();
        fwd.push(worst("eval pyramid", &items));
    }

    // Training step: forward both views, loss, backward.
    let mut m = model_on(f, device, dtype);
    let batch = PairBatch {
        x1: input("input.x1"),
        x2: input("input.x2"),
        batch_index: f.i64("input.batch_index").1.to_vec(),
        voxels_1: f.i64("input.voxels_1").1.to_vec(),
        voxels_2: f.i64("input.voxels_2").1.to_vec(),
    };
    let g = Graph::train();
    let out = m.forward_pairs(&g, &batch, true).unwrap();
    let items: Vec<_> = (0..levels)
        .map(|i| {
            (
                format!("train.pyramid.{i}"),
                to_torch(&out.pyramid_1[i].value),
                f.f32(&format!("expect.train.pyramid.{i}")).1.to_vec(),
            )
        })
        .collect();
    fwd.push(worst("train pyramid", &items));
    for (name, v) in [("embeds_1", &out.embeds_1), ("embeds_2", &out.embeds_2), ("loss", &out.loss)] {
        let items = vec![(format!("train.{name}"), host(&v.value), f.f32(&format!("expect.train.{name}")).1.to_vec())];
        fwd.push(worst(name, &items));
    }
    // Running statistics after both forwards.
    let mut stats = Vec::new();
    for key in f.keys_with_prefix("expect.train.after.") {
        let name = &key["expect.train.after.".len()..];
        let slot = m.store.find(name).unwrap_or_else(|| panic!("{name} not in model"));
        let ours: Vec<f32> = match m.store.get(slot).dtype() {
            vox2vec::tensor::DType::I64 => m.store.get(slot).i64s().iter().map(|&v| v as f32).collect(),
            _ => host(m.store.get(slot)),
        };
        let expect: Vec<f32> = match f.tensors.get(&key) {
            Some((_, super::Value::I64(v))) => v.iter().map(|&v| v as f32).collect(),
            _ => f.f32(&key).1.to_vec(),
        };
        stats.push((format!("after.{name}"), ours, expect));
    }
    assert!(!stats.is_empty(), "{}: no running statistics to check", f.name);
    for s in &stats {
        fwd.push(worst("running stats", std::slice::from_ref(s)));
    }

    let grads = g.backward(&out.loss).unwrap();
    let mut items = vec![(
        "grad.input_1".to_string(),
        to_torch(grads.get(&out.input_1).expect("input gradient")),
        f.f32("expect.train.grad.input_1").1.to_vec(),
    )];
    let gkeys = f.keys_with_prefix("expect.train.grad.");
    let mut nparam = 0;
    for key in &gkeys {
        let name = &key["expect.train.grad.".len()..];
        if name == "input_1" {
            continue;
        }
        let slot = m.store.find(name).unwrap_or_else(|| panic!("{name} not in model"));
        let ours = grads.param(&m.store, slot).unwrap_or_else(|| panic!("no gradient for {name}"));
        items.push((format!("grad.{name}"), m.store.to_pytorch_f32(slot, &host(ours)), f.f32(key).1.to_vec()));
        nparam += 1;
    }
    let trainable = m.store.trainable().count();
    assert_eq!(
        nparam, trainable,
        "{}: fixture has {nparam} parameter gradients, model has {trainable} trainable tensors",
        f.name
    );
    grad.push(worst("gradients", &items));

    // Standalone InfoNCE.
    if f.tensors.contains_key("input.infonce.e1") {
        let (s, e1) = f.f32("input.infonce.e1");
        let (_, e2) = f.f32("input.infonce.e2");
        let g = Graph::train();
        let v1 = g.leaf(Tensor::from_f32(s, e1.to_vec()).to_device(device).unwrap());
        let v2 = g.leaf(Tensor::from_f32(s, e2.to_vec()).to_device(device).unwrap());
        let loss = ops::infonce(&g, &v1, &v2, f.config().temperature).unwrap();
        fwd.push(worst(
            "infonce loss",
            &[("infonce.loss".into(), host(&loss.value), f.f32("expect.infonce.loss").1.to_vec())],
        ));
        let gr = g.backward(&loss).unwrap();
        let items = vec![
            ("infonce.grad.e1".to_string(), host(gr.get(&v1).unwrap()), f.f32("expect.infonce.grad.e1").1.to_vec()),
            ("infonce.grad.e2".to_string(), host(gr.get(&v2).unwrap()), f.f32("expect.infonce.grad.e2").1.to_vec()),
        ];
        grad.push(worst("infonce gradients", &items));
    }

    let wf = fwd.iter().cloned().fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    let wg = grad.iter().cloned().fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    let on = match (device, dtype) {
        (Device::Cpu, _) => String::new(),
        (Device::Cuda(o), dt) => format!(" [cuda:{o} {dt:?}]"),
    } + if round_inputs { " [inputs rounded to bf16]" } else { "" };
    println!("parity {}{on}: max rel err fwd {:.3e} grad {:.3e}   (worst: {} / {})", f.name, wf.0, wg.0, wf.1, wg.1);
    (wf.0, wg.0)
}
