//! Strictness of the small readers that the fuzz targets also drive: nnU-Net dataset.json
//! (both label conventions, nothing dropped silently), `.npy` shapes (no wrapped sizes) and
//! checkpoints (non-finite values and misplaced optimiser moments refused, nothing changed).

use std::path::Path;

use vox2vec::data::nnunet::parse_dataset_json;
use vox2vec::eval::npy::parse_f32;

fn classes(json: &str) -> Result<Vec<String>, String> {
    parse_dataset_json(Path::new("dataset.json"), json.as_bytes()).map_err(|e| format!("{e:#}"))
}

#[test]
fn dataset_json_label_conventions() {
    let v2 = classes(r#"{"labels": {"background": 0, "spleen": 1, "liver": 2}, "file_ending": ".nii.gz"}"#).unwrap();
    assert_eq!(v2, ["spleen", "liver"]);
    let v1 = classes(r#"{"labels": {"0": "background", "2": "liver", "1": "spleen"}}"#).unwrap();
    assert_eq!(v1, ["spleen", "liver"]);
    for (json, why) in [
        (r#"{"labels": {"background": 0, "spleen": 1, "liver": 2.0}}"#, "liver"),
        (r#"{"labels": {"background": 0, "spleen": 1, "liver": "2"}}"#, "liver"),
        (r#"{"labels": {"background": 0, "organ": [1, 2], "spleen": 1}}"#, "region-based"),
        (r#"{"labels": {"background": 0, "spleen": 1, "liver": 1}}"#, "both"),
        (r#"{"labels": {"background": 0, "spleen": 1, "liver": 3}}"#, "without gaps"),
        (r#"{"labels": {"background": 0, "spleen": -1}}"#, "spleen"),
        (r#"{"labels": {"background": 0}}"#, "no foreground"),
        (r#"{"labels": {"background": 0, "a": 1}, "file_ending": ".mha"}"#, "file_ending"),
        (r#"{"labels": [1, 2]}"#, "labels"),
        (r#"{"labels": {"0": "background", " 1": "spleen"}}"#, " 1"),
        ("{\"labels\": {\"a\": 1}", "not JSON"),
    ] {
        let e = classes(json).expect_err(json);
        assert!(e.contains(why) && e.contains("dataset.json"), "{json}: {e}");
    }
    assert!(parse_dataset_json(Path::new("d.json"), &[0xff, 0xfe]).unwrap_err().to_string().contains("UTF-8"));
}

/// A format-1.0 `.npy` with this header text (unpadded: readers must not rely on alignment).
fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    [b"\x93NUMPY\x01\x00".as_slice(), &(header.len() as u16 + 1).to_le_bytes(), header.as_bytes(), b"\n", data].concat()
}

#[test]
fn npy_shapes_whose_size_overflows_are_refused() {
    let ok = npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }", &[0, 0, 128, 63, 0, 0, 0, 64]);
    assert_eq!(parse_f32(Path::new("a.npy"), &ok).unwrap(), (vec![2, 1], vec![1.0, 2.0]));
    // 2^62 · 4 values: the element count times 4 bytes wraps to 0 in 64 bits, so an empty data
    // section used to "match" and the array was accepted with a shape it does not have.
    for shape in ["(4611686018427387904, 4)", "(18446744073709551615, 18446744073709551615)", "(4611686018427387904,)"]
    {
        let b = npy(&format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"), &[]);
        let e = parse_f32(Path::new("big.npy"), &b).unwrap_err().to_string();
        assert!(e.contains("big.npy") && (e.contains("too large") || e.contains("data bytes")), "{shape}: {e}");
    }
}

#[test]
fn checkpoints_with_non_finite_values_or_misplaced_moments_are_refused_untouched() {
    use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
    use vox2vec::optim::{Adam, AdamConfig};
    let config = ModelConfig {
        fpn: FpnConfig { in_channels: 1, base_channels: 2, num_scales: 2 },
        proj_dim: 4,
        ..ModelConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("vox2vec-readers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let donor = Vox2Vec::new(config, 1);
    let good = dir.join("good.safetensors");
    vox2vec::checkpoint::save(&good, &config, &donor.store, None, &[]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let conv = st
        .names()
        .into_iter()
        .find(|n| n.ends_with("weight") && st.tensor(n).unwrap().shape().len() == 5)
        .unwrap()
        .to_string();
    let mean = st.names().into_iter().find(|n| n.ends_with("running_mean")).unwrap().to_string();
    // Rewrite the file with one tensor replaced or one added.
    // (name, shape, values) of the tensors written in place of one.
    type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;
    let rewrite = |name: &str, f: &dyn Fn(&str, Vec<f32>) -> Tensors| {
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
        for n in st.names() {
            let t = st.tensor(n).unwrap();
            if t.dtype() == safetensors::Dtype::F32 {
                for (k, shape, v) in f(n, bytemuck::pod_collect_to_vec(t.data())) {
                    owned.push((k, shape.clone(), bytemuck::cast_slice(&v).to_vec(), safetensors::Dtype::F32));
                }
            } else {
                owned.push((n.to_string(), t.shape().to_vec(), t.data().to_vec(), t.dtype()));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = owned
            .iter()
            .map(|(k, s, d, t)| (k.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap()))
            .collect();
        let p = dir.join(name);
        safetensors::serialize_to_file(views, None, &p).unwrap();
        p
    };
    let shape_of = |n: &str| st.tensor(n).unwrap().shape().to_vec();
    let nan = rewrite("nan.safetensors", &|n, mut v| {
        if n == conv {
            v[3] = f32::NAN;
        }
        vec![(n.to_string(), shape_of(n), v)]
    });
    let moment = rewrite("moment.safetensors", &|n, v| {
        let mut out = vec![(n.to_string(), shape_of(n), v.clone())];
        if n == mean {
            out.push((format!("optim.exp_avg.{n}"), shape_of(n), v));
        }
        out
    });
    for (path, why) in [(&nan, "non-finite"), (&moment, "not trained")] {
        let mut model = Vox2Vec::new(config, 2);
        let mut adam = Adam::new(AdamConfig::default(), &model.store);
        let before: Vec<Vec<f32>> = model
            .store
            .slots()
            .iter()
            .filter(|s| s.value.dtype() == vox2vec::tensor::DType::F32)
            .map(|s| s.value.f32s().to_vec())
            .collect();
        let e = vox2vec::checkpoint::load(path, &mut model.store, Some(&mut adam)).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains(&path.display().to_string()), "{e}");
        let after: Vec<Vec<f32>> = model
            .store
            .slots()
            .iter()
            .filter(|s| s.value.dtype() == vox2vec::tensor::DType::F32)
            .map(|s| s.value.f32s().to_vec())
            .collect();
        assert!(before == after, "a refused checkpoint changed the model");
    }
    let mut model = Vox2Vec::new(config, 2);
    vox2vec::checkpoint::load(&good, &mut model.store, None).unwrap();
}

/// The input with which `cargo fuzz run npy` found the wrapped-size bug (in 18 s, 676 k
/// executions, with the size check reverted to the old wrapping product): a 20-axis shape
/// whose size overflows 64 bits before its zero axis.
#[test]
fn fuzz_regression_npy_wrapped_shape_size() {
    let input: &[u8] = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order':False, 'shape': (1, 54222, 3,1, 3423, 3,1, 5425423423, 3,1, 5423, 54223, 3,0,2, 3,1, ";
    let e = parse_f32(Path::new("crash.npy"), input).unwrap_err().to_string();
    assert!(e.contains("too large"), "{e}");
}
