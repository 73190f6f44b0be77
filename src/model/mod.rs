//! The vox2vec model: FPN3d backbone + projection head, one parameter store, and the
//! contrastive forward of a pretraining batch (docs/method.md §3–4).

pub mod fpn;
pub mod layers;
pub mod projection;
pub mod seg_heads;

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::ParamStore;
use crate::tensor::{DType, Device, Tensor};
pub use fpn::{Fpn3d, FpnConfig};
pub use projection::ProjectionHead;

pub const BACKBONE_PREFIX: &str = "backbone.";

/// Upper bounds on a model's sizes and on patches: settings no vox2vec model reaches (the
/// reference is base 16 × 6 scales = 512 channels at the top, projection 128, patches of
/// 128×128×32), below which a typo or a damaged config cannot ask for terabytes.
pub const MAX_SCALES: usize = 8;
pub const MAX_TOP_CHANNELS: usize = 2048;
pub const MAX_PROJ_DIM: usize = 4096;
pub const MAX_PATCH_AXIS: usize = 1024;
pub const MAX_PATCH_VOXELS: usize = 1 << 25;

/// A patch (window) size: every extent in 4..=MAX_PATCH_AXIS, at most MAX_PATCH_VOXELS in all.
pub fn check_patch(patch: [usize; 3]) -> Result<()> {
    ensure!(
        patch.iter().all(|&p| (4..=MAX_PATCH_AXIS).contains(&p)),
        "patch extents must be 4 to {MAX_PATCH_AXIS}, got {patch:?}"
    );
    let n: usize = patch.iter().product();
    ensure!(n <= MAX_PATCH_VOXELS, "patch {patch:?} has {n} voxels, more than the limit of {MAX_PATCH_VOXELS}");
    Ok(())
}
pub const HEAD_PREFIX: &str = "head.";

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub fpn: FpnConfig,
    pub proj_dim: usize,
    pub temperature: f64,
}

impl ModelConfig {
    /// Refuse sizes that cannot make a model (0 channels, 0 scales) or that no model needs
    /// (the limits above), with the flag's name, the value and the limit.
    pub fn validate(&self) -> Result<()> {
        let f = &self.fpn;
        ensure!(f.in_channels >= 1, "in_channels must be at least 1, got 0");
        ensure!(f.base_channels >= 1, "--base-channels must be at least 1, got 0");
        ensure!(
            (1..=MAX_SCALES).contains(&f.num_scales),
            "--num-scales must be 1 to {MAX_SCALES}, got {}",
            f.num_scales
        );
        let top = f.base_channels.saturating_mul(1 << (f.num_scales - 1));
        ensure!(
            top <= MAX_TOP_CHANNELS,
            "--base-channels {} with --num-scales {} gives {top} channels at the coarsest level, more than the limit of {MAX_TOP_CHANNELS}",
            f.base_channels,
            f.num_scales
        );
        ensure!(
            (1..=MAX_PROJ_DIM).contains(&self.proj_dim),
            "--proj-dim must be 1 to {MAX_PROJ_DIM}, got {}",
            self.proj_dim
        );
        ensure!(
            self.temperature.is_finite() && self.temperature > 0.0,
            "--temperature must be positive and finite, got {}",
            self.temperature
        );
        Ok(())
    }
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

    /// The contrastive forward of docs/method.md §4: each view through the backbone in its own
    /// pass (BatchNorm statistics per view), x1 first, then the head, then InfoNCE.
    /// `input_grad` makes view 1 a leaf so that d loss / d x1 is available.
    pub fn forward_pairs(&mut self, g: &Graph, batch: &PairBatch, input_grad: bool) -> Result<PairForward> {
        ensure!(
            batch.x1.shape() == batch.x2.shape(),
            "views of different shapes: {:?} and {:?}",
            batch.x1.shape(),
            batch.x2.shape()
        );
        let n = batch.num_pairs();
        ensure!(
            batch.voxels_1.len() == 3 * n && batch.voxels_2.len() == 3 * n,
            "pair arrays disagree on the number of pairs"
        );
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
        let loss = ops::infonce::infonce_with(g, &embeds_1, &embeds_2, self.config.temperature, math)?;
        Ok(PairForward { input_1, pyramid_1, embeds_1, embeds_2, loss })
    }
}

impl std::fmt::Debug for Vox2Vec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vox2Vec({:?}, {} tensors)", self.config, self.store.len())
    }
}
