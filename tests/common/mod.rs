//! Shared helpers for the integration tests: fixture discovery and loading, error metrics.
#![allow(dead_code)]

pub mod blocks;
pub mod parity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};

/// Every `*.safetensors` fixture in the repository's test data and in $VOX2VEC_FIXTURES.
/// The repository folder is found from the build's source tree or, for test binaries copied
/// to another machine (scripts/gpu-bundle.sh), from the working directory.
pub fn fixture_files() -> Vec<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures");
    let repo = if built.is_dir() { built } else { PathBuf::from("tests/data/fixtures") };
    let mut dirs = vec![repo];
    if let Some(extra) = std::env::var_os("VOX2VEC_FIXTURES") {
        dirs.push(PathBuf::from(extra));
    }
    let mut files = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(&d) else {
            panic!("fixture folder {} cannot be read", d.display());
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        found.sort();
        files.extend(found);
    }
    files
}

pub enum Value {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

pub struct Fixture {
    pub name: String,
    pub meta: HashMap<String, String>,
    pub tensors: HashMap<String, (Vec<usize>, Value)>,
}

impl Fixture {
    pub fn load(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (k, v) in st.tensors() {
            let val = match v.dtype() {
                Dtype::F32 => Value::F32(bytemuck::pod_collect_to_vec(v.data())),
                Dtype::I64 => Value::I64(bytemuck::pod_collect_to_vec(v.data())),
                d => panic!("{k}: unexpected dtype {d:?}"),
            };
            tensors.insert(k, (v.shape().to_vec(), val));
        }
        Fixture { name: path.file_name().unwrap().to_string_lossy().into_owned(), meta, tensors }
    }

    pub fn meta_usize(&self, k: &str) -> usize {
        self.meta.get(k).unwrap_or_else(|| panic!("{}: metadata {k} missing", self.name)).parse().unwrap()
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            fpn: FpnConfig {
                in_channels: self.meta_usize("in_channels"),
                base_channels: self.meta_usize("base_channels"),
                num_scales: self.meta_usize("num_scales"),
            },
            proj_dim: self.meta_usize("proj_dim"),
            temperature: self.meta.get("temperature").map(|t| t.parse().unwrap()).unwrap_or(0.1),
        }
    }

    pub fn f32(&self, k: &str) -> (&[usize], &[f32]) {
        match self.tensors.get(k) {
            Some((s, Value::F32(v))) => (s, v),
            _ => panic!("{}: f32 tensor {k} missing", self.name),
        }
    }

    pub fn i64(&self, k: &str) -> (&[usize], &[i64]) {
        match self.tensors.get(k) {
            Some((s, Value::I64(v))) => (s, v),
            _ => panic!("{}: i64 tensor {k} missing", self.name),
        }
    }

    pub fn keys_with_prefix(&self, p: &str) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().filter(|k| k.starts_with(p)).cloned().collect();
        k.sort();
        k
    }

    /// A model with the fixture's configuration and parameters.
    pub fn model(&self) -> Vox2Vec {
        let mut m = Vox2Vec::new(self.config(), 12345);
        for key in self.keys_with_prefix("param.") {
            let name = &key["param.".len()..];
            let slot = m.store.find(name).unwrap_or_else(|| panic!("{}: {name} is not a model key", self.name));
            let (shape, val) = &self.tensors[&key];
            match val {
                Value::F32(v) => m.store.load_pytorch(slot, shape, Some(v), None).unwrap(),
                Value::I64(v) => m.store.load_pytorch(slot, shape, None, Some(v)).unwrap(),
            }
        }
        m
    }
}

pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// ‖a − b‖ / max(‖b‖, floor).
pub fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    d / norm(b).max(floor).max(f64::MIN_POSITIVE)
}

/// ../shared/data (or $VOX2VEC_DATA) when it holds the pretraining CTs; None, with a line
/// saying the test is skipped, where it does not.
pub fn shared_data_dir() -> Option<PathBuf> {
    let d = std::env::var_os("VOX2VEC_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    if d.join("pretrain").is_dir() {
        Some(d)
    } else {
        println!("skipped: no shared data at {} (set VOX2VEC_DATA)", d.display());
        None
    }
}

/// Write canonical `hu` ([X, Y, Z]) as a NIfTI whose file affine is `affine` (its orientation
/// decides the file's axis order and flips); returns the file's shape.
pub fn write_ct_with_affine(path: &Path, hu: &[i16], shape: [usize; 3], affine: [[f64; 4]; 4]) -> [usize; 3] {
    use vox2vec::data::nifti_io::{Geometry, orientation_of, write_volume};
    let (orientation, _) = orientation_of(&affine).unwrap();
    let zoom = |j: usize| (0..3).map(|r| affine[r][j] * affine[r][j]).sum::<f64>().sqrt() as f32;
    let header = nifti::NiftiHeader {
        sform_code: 1,
        srow_x: affine[0].map(|v| v as f32),
        srow_y: affine[1].map(|v| v as f32),
        srow_z: affine[2].map(|v| v as f32),
        pixdim: [1.0, zoom(0), zoom(1), zoom(2), 1.0, 0.0, 0.0, 0.0],
        ..nifti::NiftiHeader::default()
    };
    let mut file_shape = [0; 3];
    for i in 0..3 {
        file_shape[orientation.perm[i]] = shape[i];
    }
    let g = Geometry { header, affine, file_shape, orientation };
    assert_eq!(g.canonical_shape(), shape);
    write_volume(path, hu, &g).unwrap();
    file_shape
}

/// A tiny pretraining run on the CPU (base 4, 3 scales, 2 synthetic pairs of 16×16×8, 32
/// voxels per pair), nothing optional: what the loop tests start from.
pub fn tiny_run(dir: &Path, steps: u64, seed: u64) -> vox2vec::train::TrainOptions {
    use vox2vec::train::{BatchShape, BatchSource, Resume, TrainOptions};
    TrainOptions {
        model: ModelConfig {
            fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
            proj_dim: 16,
            temperature: 0.1,
        },
        adam: vox2vec::optim::AdamConfig { lr: 1e-3, ..vox2vec::optim::AdamConfig::default() },
        data: BatchSource::SyntheticPairs(BatchShape { pairs: 2, patch: [16, 16, 8], voxels_per_pair: 32 }),
        steps,
        seed,
        out_dir: dir.to_path_buf(),
        checkpoint_every: 0,
        resume: Resume::No,
        online_probe: None,
        validation: None,
        dump_batches: None,
        device: vox2vec::tensor::Device::Cpu,
        activation_dtype: vox2vec::tensor::DType::F32,
        skip_nonfinite: 0,
        inject_nan_steps: Vec::new(),
        metadata: Vec::new(),
    }
}
