//! The vox2vec model: FPN3d backbone + projection head, one parameter store, and the
//! contrastive forward of a pretraining batch (REFERENCE.md §3–4).

pub mod fpn;
pub mod head;
pub mod heads;
pub mod layers;

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::ParamStore;
use crate::tensor::{DType, Device, Tensor};
pub use fpn::{Fpn3d, FpnConfig};
pub use head::ProjectionHead;

pub const BACKBONE_PREFIX: &str = "backbone.";
pub const HEAD_PREFIX: &str = "head.";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub fpn: FpnConfig,
    pub proj_dim: usize,
    pub temperature: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { fpn: FpnConfig::default(), proj_dim: 128, temperature: ops::infonce::DEFAULT_TEMPERATURE }
    }
}

pub struct Vox2Vec {
    pub config: ModelConfig,
    pub backbone: Fpn3d,
    pub head: ProjectionHead,
    pub store: ParamStore,
    /// How activations are stored on a CUDA device: F32, or BF16 (mixed precision: bf16
    /// storage, f32 arithmetic, f32 parameters and gradients). The CPU always uses F32.
    pub activation_dtype: DType,
}

/// One pretraining batch: two views of `B` patches and N positive pairs.
#[derive(Clone, Debug)]
pub struct PairBatch {
    /// View 1 and view 2, [B, X, Y, Z, 1] channels-last, values in [0, 1].
    pub x1: Tensor,
    pub x2: Tensor,
    /// [N] patch index of each pair.
    pub batch_index: Vec<i64>,
    /// [N * 3] (x, y, z) of each pair in view 1 and in view 2.
    pub voxels_1: Vec<i64>,
    pub voxels_2: Vec<i64>,
}

impl PairBatch {
    pub fn num_pairs(&self) -> usize {
        self.batch_index.len()
    }
}

/// Everything one training forward produces (kept for tests and logging).
pub struct PairForward {
    pub input_1: Var,
    pub pyramid_1: Vec<Var>,
    pub embeds_1: Var,
    pub embeds_2: Var,
    pub loss: Var,
}

impl Vox2Vec {
    pub fn new(config: ModelConfig, seed: u64) -> Vox2Vec {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut store = ParamStore::new();
        let backbone = Fpn3d::new(&mut store, &mut rng, BACKBONE_PREFIX, config.fpn);
        let head = ProjectionHead::new(&mut store, &mut rng, HEAD_PREFIX, config.fpn.embedding_dim(), config.proj_dim);
        Vox2Vec { config, backbone, head, store, activation_dtype: DType::F32 }
    }

    /// Where the parameters live.
    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// Move the parameters and running statistics to `device`.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        self.store.to_device(device)
    }

    /// An input on the model's device, in its activation dtype.
    pub fn prepare_input(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_device(self.device())?;
        if x.is_cuda() { crate::cuda::cast(&x, self.activation_dtype) } else { Ok(x) }
    }

    /// How the head multiplies on the device: TF32 tensor cores when the activations are
    /// bf16 (its inputs carry bf16 precision already), exact fp32 otherwise.
    pub fn head_math(&self) -> ops::linear::MatmulMath {
        if self.activation_dtype == DType::BF16 { ops::linear::MatmulMath::Tf32 } else { ops::linear::MatmulMath::Fp32 }
    }

    /// Backbone pyramid of x [B, X, Y, Z, C] (train or eval according to the graph).
    pub fn pyramid(&mut self, g: &Graph, x: &Var) -> Result<Vec<Var>> {
        self.backbone.forward(g, &mut self.store, x)
    }

    /// Voxel embeddings [N, D]: pyramid level i read at floor(v / 2^i), levels concatenated.
    pub fn voxel_embeddings(g: &Graph, pyramid: &[Var], batch_index: &[i64], voxels: &[i64]) -> Result<Var> {
        let parts = pyramid
            .iter()
            .enumerate()
            .map(|(i, f)| ops::gather_voxels(g, f, batch_index, voxels, i as u32))
            .collect::<Result<Vec<_>>>()?;
        ops::concat_channels(g, &parts)
    }

    /// The contrastive forward of REFERENCE.md §4: each view through the backbone in its own
    /// pass (BatchNorm statistics per view), x1 first, then the head, then InfoNCE.
    /// `input_grad` makes view 1 a leaf so that d loss / d x1 is available.
    pub fn forward_pairs(&mut self, g: &Graph, batch: &PairBatch, input_grad: bool) -> Result<PairForward> {
        ensure!(batch.x1.shape() == batch.x2.shape(), "views of different shapes: {:?} and {:?}", batch.x1.shape(), batch.x2.shape());
        let n = batch.num_pairs();
        ensure!(batch.voxels_1.len() == 3 * n && batch.voxels_2.len() == 3 * n, "pair arrays disagree on the number of pairs");
        let x1 = self.prepare_input(&batch.x1)?;
        let input_1 = if input_grad { g.leaf(x1) } else { Var::constant(x1) };
        let pyramid_1 = self.pyramid(g, &input_1)?;
        let f1 = Self::voxel_embeddings(g, &pyramid_1, &batch.batch_index, &batch.voxels_1)?;
        let math = self.head_math();
        let embeds_1 = self.head.forward(g, &mut self.store, &f1, math)?;
        let pyramid_2 = self.pyramid(g, &Var::constant(self.prepare_input(&batch.x2)?))?;
        let f2 = Self::voxel_embeddings(g, &pyramid_2, &batch.batch_index, &batch.voxels_2)?;
        drop(pyramid_2);
        let embeds_2 = self.head.forward(g, &mut self.store, &f2, math)?;
        let loss = ops::infonce(g, &embeds_1, &embeds_2, self.config.temperature)?;
        Ok(PairForward { input_1, pyramid_1, embeds_1, embeds_2, loss })
    }
}

impl std::fmt::Debug for Vox2Vec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vox2Vec({:?}, {} tensors)", self.config, self.store.len())
    }
}
