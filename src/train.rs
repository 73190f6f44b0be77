//! The pretraining step (REFERENCE.md §4): forward both views, InfoNCE, backward, clip the
//! global gradient norm to 1.0, Adam. Plus a synthetic batch source for runs without data.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::autograd::Graph;
use crate::dist::Communicator;
use crate::model::{PairBatch, Vox2Vec};
use crate::ops::infonce::Signal;
use crate::optim::{Adam, clip_coefficient, global_norm};
use crate::tensor::{DType, Device, Tensor, Tensor as T};

pub const MAX_GRAD_NORM: f64 = 1.0;

/// The name of the pretraining step's CUDA graph (`CudaDevice::graph_stats`).
pub const PRETRAIN_GRAPH: &str = "pretrain step";

#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    /// The batch's learning signal before the update (top-1 accuracy, positive and negative
    /// similarities: `ops::infonce::Signal`).
    pub signal: Signal,
}

impl StepStats {
    /// Whether the step was applied: a step whose loss or gradient norm is not finite changes
    /// nothing in the model (`pretrain_step`).
    pub fn finite(&self) -> bool {
        self.loss.is_finite() && self.grad_norm.is_finite()
    }
}

/// One optimisation step on `batch`, on the device the model lives on. A step whose loss or
/// gradient norm is not finite is not applied: no weight or Adam moment changes (on the GPU
/// the Adam kernel sees the clip coefficient marked NaN and returns), and the BatchNorm
/// running statistics its forward computed are put back. Adam's step count still advances
/// (the batch was consumed), so a resumed run stays aligned with the batch sequence.
pub fn pretrain_step(model: &mut Vox2Vec, adam: &mut Adam, batch: &PairBatch) -> Result<StepStats> {
    pretrain_step_ranked(model, adam, batch, &mut crate::dist::Single)
}

/// `pretrain_step` as one rank of a data-parallel run (`dist`): rank 0's BatchNorm running
/// statistics copied to this rank first, the gradients averaged over the ranks before the
/// clip and Adam, and the logged loss and signal averaged too (so every rank takes the same
/// skip decision on a non-finite step). With one rank it is `pretrain_step`, bit for bit.
pub fn pretrain_step_ranked(
    model: &mut Vox2Vec,
    adam: &mut Adam,
    batch: &PairBatch,
    comm: &mut dyn Communicator,
) -> Result<StepStats> {
    if comm.world() > 1 {
        broadcast_slots(model, comm, |k| k == crate::params::SlotKind::RunningStat)?;
    }
    let state: Vec<(usize, Tensor)> = model
        .store
        .slots()
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind != crate::params::SlotKind::Trainable)
        .map(|(i, s)| (i, s.value.clone()))
        .collect();
    let stats = pretrain_step_unguarded(model, adam, batch, comm)?;
    if !stats.finite() {
        for (i, t) in state {
            model.store.set(i, t);
        }
    }
    Ok(stats)
}

fn pretrain_step_unguarded(
    model: &mut Vox2Vec,
    adam: &mut Adam,
    batch: &PairBatch,
    comm: &mut dyn Communicator,
) -> Result<StepStats> {
    if let Device::Cuda(ordinal) = model.device() {
        let stats = if comm.name() == "single" {
            // One rank: the step's ~1,700 calls run as one CUDA graph (`cuda::graph`).
            crate::cuda::device(ordinal)?
                .graphed(PRETRAIN_GRAPH, || pretrain_step_cuda_ranked(model, adam, batch, ordinal, comm))?
        } else {
            // NCCL's all-reduces overlap the backward on a second stream (even with one rank):
            // issued one by one.
            pretrain_step_cuda_ranked(model, adam, batch, ordinal, comm)?
        };
        // The one read of the step, once all its work is queued: loss and gradient norm.
        let loss = stats.loss.to_f32_vec()?[0] as f64;
        let norm = crate::cuda::dev_of(&stats.loss).download::<f32>(stats.clip.norm_ptr(), 1)?[0] as f64;
        return average_stats(comm, StepStats { loss, grad_norm: norm, signal: stats.signal.read()? });
    }
    let g = Graph::train();
    let out =
        crate::profile::time("step: forward (both views)", String::new, || model.forward_pairs(&g, batch, false))?;
    let loss = out.loss.value.to_scalar() as f64;
    let signal = crate::profile::time("step: learning signal", String::new, || {
        crate::ops::infonce::signal(&out.embeds_1.value, &out.embeds_2.value)
    })?;
    drop(out.pyramid_1);
    // The gradients, averaged over the ranks bucket by bucket during the backward.
    let per_slot = crate::dist::buckets::backward_averaged(&g, &out.loss, &model.store, comm)?;
    let StepStats { loss, signal, .. } = average_stats(comm, StepStats { loss, grad_norm: 0.0, signal })?;
    // clip_grad_norm_ fused into Adam: the norm here, the scaling inside the update.
    let grad_norm = crate::profile::time("step: gradient norm", String::new, || global_norm(&per_slot));
    if !(loss.is_finite() && grad_norm.is_finite()) {
        adam.step += 1;
        return Ok(StepStats { loss, grad_norm, signal });
    }
    let scale = clip_coefficient(grad_norm, MAX_GRAD_NORM);
    crate::profile::time("step: adam", String::new, || adam.update_scaled(&mut model.store, &per_slot, scale))?;
    Ok(StepStats { loss, grad_norm, signal })
}

/// What a device step leaves on the device: the loss [1] and [grad norm, clip coefficient].
pub struct DeviceStepStats {
    pub loss: Tensor,
    pub clip: crate::cuda::optim::ClipStats,
    pub signal: crate::cuda::ops::infonce::DeviceSignal,
}

/// `pretrain_step` on a CUDA device, without reading anything back: forward, backward, the
/// global norm and clip coefficient, and the fused Adam update are all queued on the
/// device's stream. Adam's moments must be on the device (`Adam::to_device`).
pub fn pretrain_step_cuda(
    model: &mut Vox2Vec,
    adam: &mut Adam,
    batch: &PairBatch,
    ordinal: usize,
) -> Result<DeviceStepStats> {
    pretrain_step_cuda_ranked(model, adam, batch, ordinal, &mut crate::dist::Single)
}

/// `pretrain_step_cuda` as one rank: the gradients averaged by the communicator (NCCL) on
/// the device's stream between the backward and the clip.
pub fn pretrain_step_cuda_ranked(
    model: &mut Vox2Vec,
    adam: &mut Adam,
    batch: &PairBatch,
    ordinal: usize,
    comm: &mut dyn Communicator,
) -> Result<DeviceStepStats> {
    use crate::cuda::nvtx_range;
    let dev = crate::cuda::device(ordinal)?;
    anyhow::ensure!(
        adam.device.is_some(),
        "the model is on cuda:{ordinal} but Adam's moments are not (Adam::to_device)"
    );
    let g = Graph::train();
    let range = nvtx_range("forward");
    let out = model.forward_pairs(&g, batch, false)?;
    drop(range);
    let loss = out.loss.value.clone();
    let (n, d) = (out.embeds_1.shape()[0], out.embeds_1.shape()[1]);
    let signal = crate::cuda::ops::infonce::signal(&out.embeds_1.value, &out.embeds_2.value, n, d)?;
    drop(out.pyramid_1);
    let range = nvtx_range("backward");
    // With several ranks, each bucket of final gradients is all-reduced on NCCL's stream while
    // the backward goes on; the compute stream waits for them before the clip.
    let per_slot = crate::dist::buckets::backward_averaged(&g, &out.loss, &model.store, comm)?;
    drop(range);
    let _range = nvtx_range("clip + adam");
    // A non-finite loss or norm marks the clip coefficient NaN, and the Adam kernel skips.
    let clip = crate::cuda::optim::clip_stats(&dev, &per_slot, MAX_GRAD_NORM, Some(&loss))?;
    adam.step += 1;
    let moments = adam.device.as_ref().expect("checked above");
    crate::cuda::optim::adam_update(&model.store, &per_slot, moments, adam.config, adam.step, Some(clip.coef_ptr()))?;
    Ok(DeviceStepStats { loss, clip, signal })
}

/// The ranks' mean loss and learning signal (what the log shows); one rank's as they are.
fn average_stats(comm: &mut dyn Communicator, s: StepStats) -> Result<StepStats> {
    let world = comm.world();
    if world == 1 {
        return Ok(s);
    }
    let mut v = [s.loss as f32, s.signal.top1 as f32, s.signal.pos_sim as f32, s.signal.neg_sim as f32];
    comm.all_reduce_sum(&mut v)?;
    let m = |x: f32| (x / world as f32) as f64;
    Ok(StepStats {
        loss: m(v[0]),
        grad_norm: s.grad_norm,
        signal: Signal { top1: m(v[1]), pos_sim: m(v[2]), neg_sim: m(v[3]) },
    })
}

/// Rank 0's values of the f32 slots of the kinds `which` accepts, copied to every rank.
pub fn broadcast_slots(
    model: &mut Vox2Vec,
    comm: &mut dyn Communicator,
    which: impl Fn(crate::params::SlotKind) -> bool,
) -> Result<()> {
    let slots: Vec<usize> = model
        .store
        .slots()
        .iter()
        .enumerate()
        .filter(|(_, s)| which(s.kind) && s.value.dtype() == crate::tensor::DType::F32)
        .map(|(i, _)| i)
        .collect();
    if model.store.device() != Device::Cpu {
        let bufs: Vec<(u64, usize)> =
            slots.iter().map(|&i| (model.store.get(i).ptr(), model.store.get(i).numel())).collect();
        return comm.broadcast_device(&bufs, 0);
    }
    let mut flat: Vec<f32> = slots.iter().flat_map(|&i| model.store.get(i).f32s().to_vec()).collect();
    comm.broadcast(&mut flat, 0)?;
    let mut at = 0;
    for i in slots {
        let shape = model.store.get(i).shape().to_vec();
        let n = model.store.get(i).numel();
        model.store.set(i, Tensor::from_f32(&shape, flat[at..at + n].to_vec()));
        at += n;
    }
    Ok(())
}

/// Shape of a pretraining batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub pairs: usize,
    pub patch: [usize; 3],
    pub voxels_per_pair: usize,
}

impl Default for BatchShape {
    fn default() -> Self {
        BatchShape { pairs: 10, patch: [128, 128, 32], voxels_per_pair: 1024 }
    }
}

/// What a pretraining step on the CPU backend needs, estimated before a run starts so that a
/// batch the machine cannot hold is refused with the figures instead of aborting on a failed
/// allocation. Fitted to peak RSS of one-step runs on a 2-vCPU, 24 GiB machine (base 16, 6
/// scales, synthetic pairs): 3.02 GB for 1 pair of 128x128x32, 9.01 GB for 4 pairs, 21.9 GB for
/// the reference's 10 pairs (93 s); 1.35 / 1.78 GB for 1 / 2 pairs of 64x64x32 (below the line).
/// So ~0.95 GB fixed (binary, weights, Adam) plus ~2.05 KB per voxel of both views, scaled with
/// the base width; and ~10 s per million view voxels for the step on 2 threads.
#[derive(Clone, Copy, Debug)]
pub struct CpuStepEstimate {
    pub bytes: f64,
    pub seconds: f64,
}

/// Fixed bytes of a CPU pretraining run (see `CpuStepEstimate`).
pub const CPU_FIXED_BYTES: f64 = 0.95e9;

pub fn estimate_cpu_step(batch: BatchShape, fpn: crate::model::FpnConfig, threads: usize) -> CpuStepEstimate {
    let voxels = 2.0 * batch.pairs as f64 * batch.patch.iter().product::<usize>() as f64;
    let width = fpn.base_channels as f64 / 16.0;
    CpuStepEstimate {
        bytes: CPU_FIXED_BYTES + 2050.0 * width * voxels,
        seconds: 10.0 * (voxels / 1e6) * width * 2.0 / threads.max(1) as f64,
    }
}

/// MemAvailable of /proc/meminfo in bytes (None where there is no such file).
pub fn available_memory_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Synthetic two-view batches: a smooth random volume per patch pair, two overlapping crops
/// of it with independent intensity jitter, and positive pairs at the same volume voxel in
/// both crops. The same (seed, index) always gives the same batch. Not CT: a stand-in that
/// exercises the whole step with a loss that can fall.
pub fn synthetic_batch(shape: BatchShape, seed: u64, index: u64) -> PairBatch {
    let mut rng = StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let [px, py, pz] = shape.patch;
    let shift = [px / 4, py / 4, pz / 4];
    let (vx, vy, vz) = (px + shift[0], py + shift[1], pz + shift[2]);
    let b = shape.pairs;
    let sp = px * py * pz;
    let mut x1 = vec![0.0f32; b * sp];
    let mut x2 = vec![0.0f32; b * sp];
    let mut batch_index = Vec::new();
    let mut voxels_1 = Vec::new();
    let mut voxels_2 = Vec::new();
    for p in 0..b {
        // A sum of random blobs, so the volume has structure at several scales.
        let blobs: Vec<[f32; 5]> = (0..12)
            .map(|_| {
                [
                    rng.random_range(0.0..vx as f32),
                    rng.random_range(0.0..vy as f32),
                    rng.random_range(0.0..vz as f32),
                    rng.random_range(2.0..(px as f32 / 3.0).max(3.0)),
                    rng.random_range(-1.0..1.0),
                ]
            })
            .collect();
        let value = |x: usize, y: usize, z: usize| -> f32 {
            let mut s = 0.5;
            for bl in &blobs {
                let d2 = (x as f32 - bl[0]).powi(2) + (y as f32 - bl[1]).powi(2) + (2.0 * (z as f32 - bl[2])).powi(2);
                s += 0.5 * bl[4] * (-d2 / (2.0 * bl[3] * bl[3])).exp();
            }
            s
        };
        let o1: [usize; 3] =
            [rng.random_range(0..=shift[0]), rng.random_range(0..=shift[1]), rng.random_range(0..=shift[2])];
        let o2: [usize; 3] =
            [rng.random_range(0..=shift[0]), rng.random_range(0..=shift[1]), rng.random_range(0..=shift[2])];
        for (dst, o) in [(&mut x1, o1), (&mut x2, o2)] {
            let gain = rng.random_range(0.8..1.2f32);
            for x in 0..px {
                for y in 0..py {
                    for z in 0..pz {
                        let noise = rng.random_range(-0.02..0.02f32);
                        dst[p * sp + (x * py + y) * pz + z] =
                            (value(x + o[0], y + o[1], z + o[2]) * gain + noise).clamp(0.0, 1.0);
                    }
                }
            }
        }
        for _ in 0..shape.voxels_per_pair {
            // A volume voxel inside both crops.
            let w: Vec<usize> =
                (0..3).map(|a| rng.random_range(o1[a].max(o2[a])..(o1[a].min(o2[a]) + shape.patch[a]))).collect();
            batch_index.push(p as i64);
            voxels_1.extend((0..3).map(|a| (w[a] - o1[a]) as i64));
            voxels_2.extend((0..3).map(|a| (w[a] - o2[a]) as i64));
        }
    }
    let s = [b, px, py, pz, 1];
    PairBatch { x1: T::from_f32(&s, x1), x2: T::from_f32(&s, x2), batch_index, voxels_1, voxels_2 }
}

/// Settings of a pretraining run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub model: crate::model::ModelConfig,
    pub adam: crate::optim::AdamConfig,
    pub data: BatchSource,
    pub steps: u64,
    pub seed: u64,
    /// Folder for `checkpoint.safetensors` and `metrics.jsonl`.
    pub out_dir: std::path::PathBuf,
    /// Write a checkpoint every this many steps (and always at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    pub resume: Resume,
    /// Every `every` steps, a quick linear probe of the current backbone (logged with the loss).
    pub online_probe: Option<OnlineProbe>,
    /// Every `every` steps, the loss and learning signal on fixed pairs from held-out CTs.
    pub validation: Option<Validation>,
    /// Write every step's batch here (`dump_batch`), for the PyTorch trajectory check.
    pub dump_batches: Option<std::path::PathBuf>,
    /// Where the step runs.
    pub device: Device,
    /// Activation storage on a CUDA device (F32 or BF16).
    pub activation_dtype: DType,
    /// Steps with a non-finite loss or gradient norm to skip (logged) before stopping.
    pub skip_nonfinite: u64,
    /// Fault injection for tests: these steps' (1-based) batches get a NaN voxel.
    pub inject_nan_steps: Vec<u64>,
    /// Written into every checkpoint's metadata besides the step, seed and model: what made
    /// the run (`eval::recorded`: preprocessing, command line, data sources, configuration).
    pub metadata: Vec<(String, String)>,
}

/// Validation pairs: batches drawn once from CTs held out of training, evaluated every
/// `every` steps in eval mode (BatchNorm with the running statistics, nothing recorded).
#[derive(Clone)]
pub struct Validation {
    pub batches: std::sync::Arc<Vec<PairBatch>>,
    pub every: u64,
}

impl std::fmt::Debug for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Validation({} batches, every {} steps)", self.batches.len(), self.every)
    }
}

/// The batches' mean loss and learning signal with the model as it is (eval mode; the model is
/// not changed).
pub fn validate(model: &mut Vox2Vec, batches: &[PairBatch]) -> Result<(f64, Signal)> {
    anyhow::ensure!(!batches.is_empty(), "no validation batches");
    let (mut loss, mut top1, mut pos, mut neg) = (0.0, 0.0, 0.0, 0.0);
    for b in batches {
        let g = Graph::inference();
        let out = model.forward_pairs(&g, b, false)?;
        let s = crate::ops::infonce::signal(&out.embeds_1.value, &out.embeds_2.value)?;
        loss += out.loss.value.to_scalar() as f64;
        (top1, pos, neg) = (top1 + s.top1, pos + s.pos_sim, neg + s.neg_sim);
    }
    let k = batches.len() as f64;
    Ok((loss / k, Signal { top1: top1 / k, pos_sim: pos / k, neg_sim: neg / k }))
}

/// Batch `step` (1-based) as files PyTorch reads (`benches/trajectory.py`): `step_<n>.npz`-like
/// folder `<dir>/step_<n>/` with x1.npy, x2.npy ([B, 1, X, Y, Z] float32, PyTorch's layout) and
/// pairs.npy ([N, 7] int64: patch index, view-1 x, y, z, view-2 x, y, z).
pub fn dump_batch(dir: &std::path::Path, step: u64, b: &PairBatch) -> Result<()> {
    use anyhow::Context;
    let d = dir.join(format!("step_{step:06}"));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let s = b.x1.shape();
    let ncxyz = [s[0], 1, s[1], s[2], s[3]];
    crate::eval::npy::write_f32(&d.join("x1.npy"), &ncxyz, &b.x1.to_f32_vec()?)?;
    crate::eval::npy::write_f32(&d.join("x2.npy"), &ncxyz, &b.x2.to_f32_vec()?)?;
    let n = b.num_pairs();
    let mut pairs = Vec::with_capacity(n * 7);
    for i in 0..n {
        pairs.push(b.batch_index[i]);
        pairs.extend_from_slice(&b.voxels_1[3 * i..3 * i + 3]);
        pairs.extend_from_slice(&b.voxels_2[3 * i..3 * i + 3]);
    }
    crate::eval::npy::write_i64(&d.join("pairs.npy"), &[n, 7], &pairs)
}

/// Online probing: a labelled dataset, its split, and the probe's small training run.
#[derive(Clone)]
pub struct OnlineProbe {
    pub dataset: std::sync::Arc<crate::eval::segment::Dataset>,
    /// Indices of the validation cases; the others train the probe.
    pub val: Vec<usize>,
    pub every: u64,
    pub config: crate::eval::segment::SegConfig,
}

impl std::fmt::Debug for OnlineProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OnlineProbe({} cases, every {} steps, {:?})", self.dataset.cases.len(), self.every, self.config)
    }
}

/// A linear probe of `model`'s backbone as it is now (the backbone is not modified):
/// mean validation Dice per class.
pub fn online_probe(model: &mut Vox2Vec, p: &OnlineProbe, step: u64) -> Result<Vec<f64>> {
    use crate::eval::segment::{Head, HeadKind, Mode, train_segmentation};
    let k = p.dataset.classes.len();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, c) in p.dataset.cases.iter().enumerate() {
        if p.val.contains(&i) { val.push(c) } else { train.push(c) }
    }
    let mut store = crate::params::ParamStore::new();
    let head = Head::new(HeadKind::Linear, &mut store, step, model.config.fpn, k);
    let cfg = crate::eval::segment::SegConfig { validate_every: p.config.steps, ..p.config.clone() };
    let res =
        train_segmentation(model, &head, &mut store, &train, &val, k, Mode::Probe, &cfg, &|_| {}, &mut |_, _| Ok(()))?;
    Ok(res.best_dice)
}

/// Where a run's batches come from.
#[derive(Clone)]
pub enum BatchSource {
    /// `synthetic_batch`: smooth random blobs, no CT (tests, benchmarks).
    SyntheticPairs(BatchShape),
    /// Volumes (cached CTs or phantoms) through the sampler and a threaded loader.
    Volumes {
        volumes: std::sync::Arc<dyn crate::data::loader::VolumeSet>,
        sampler: crate::data::sampler::SamplerConfig,
        workers: usize,
    },
}

impl std::fmt::Debug for BatchSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSource::SyntheticPairs(s) => write!(f, "SyntheticPairs({s:?})"),
            BatchSource::Volumes { volumes, sampler, workers } => {
                write!(f, "Volumes({} volumes, {sampler:?}, {workers} workers)", volumes.len())
            }
        }
    }
}

/// Where a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Fresh initialisation from the seed.
    No,
    /// From `out_dir/checkpoint.safetensors`.
    Latest,
    /// From the given checkpoint.
    From(std::path::PathBuf),
}

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_CURVE_FILE: &str = "loss.png";

/// Keep only the lines of a metrics file whose step is at most `through` (dropping lines that
/// do not parse, such as one cut by a kill); rewritten atomically, and only when something is
/// dropped. A missing file is left missing.
pub fn truncate_metrics(path: &std::path::Path, through: u64) -> Result<()> {
    use anyhow::Context;
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= through)
        })
        .collect();
    if keep.len() == text.lines().count() && (text.is_empty() || text.ends_with('\n')) {
        return Ok(());
    }
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::checkpoint::write_atomic(path, out.as_bytes())
        .with_context(|| format!("truncating {} to step {through}", path.display()))
}

/// Draw `out_dir/loss.png` from the run's whole `metrics.jsonl` (resumed parts included),
/// three panels: the InfoNCE loss per step and its moving average over 20 steps; the
/// contrastive top-1 accuracy; the mean positive and negative similarities; each with the
/// validation pairs' values where the run has them (`val_*` lines).
pub fn write_loss_curve(out_dir: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(out_dir.join(METRICS_FILE)).context("reading metrics")?;
    let lines: Vec<serde_json::Value> =
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        lines.iter().filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?))).collect()
    };
    let moving = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        (0..pts.len())
            .map(|i| {
                let w = &pts[i.saturating_sub(19)..=i];
                (pts[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
            })
            .collect()
    };
    let (loss, top1, pos, neg) = (series("loss"), series("top1"), series("pos_sim"), series("neg_sim"));
    let (vloss, vtop1, vpos, vneg) =
        (series("val_loss"), series("val_top1"), series("val_pos_sim"), series("val_neg_sim"));
    let (loss_avg, top1_avg) = (moving(&loss), moving(&top1));
    let mut p_loss: Vec<(&str, &[(f64, f64)])> = vec![("loss", &loss), ("mean of 20", &loss_avg)];
    let mut p_top1: Vec<(&str, &[(f64, f64)])> = vec![("top-1", &top1), ("mean of 20", &top1_avg)];
    let mut p_sim: Vec<(&str, &[(f64, f64)])> = vec![("positive", &pos), ("negative", &neg)];
    if !vloss.is_empty() {
        p_loss.push(("validation", &vloss));
        p_top1.push(("validation", &vtop1));
        p_sim.extend([("val positive", &vpos[..]), ("val negative", &vneg[..])]);
    }
    crate::plot::write_panels_png(
        &out_dir.join(LOSS_CURVE_FILE),
        &[
            ("InfoNCE loss", &p_loss),
            ("contrastive top-1 accuracy", &p_top1),
            ("mean cosine similarity of pairs", &p_sim),
        ],
    )
}

/// One line of `metrics.jsonl` (appended and flushed; a failed write names the file).
/// Appends `line` to metrics.jsonl (rank 0; other ranks hold no file and log nothing).
fn append_metric(
    metrics: &mut Option<std::fs::File>,
    out_dir: &std::path::Path,
    line: &serde_json::Value,
) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let Some(metrics) = metrics else { return Ok(()) };
    let path = out_dir.join(METRICS_FILE);
    crate::checkpoint::injected_write_error(&path)?;
    writeln!(metrics, "{line}").and_then(|_| metrics.flush()).with_context(|| format!("writing {}", path.display()))
}

/// Observer of a run's progress (the CLI draws a bar; tests ignore it).
pub trait Progress {
    fn start(&mut self, first_step: u64, total: u64);
    fn step(&mut self, step: u64, stats: &StepStats);
    fn message(&mut self, msg: &str);
    fn finish(&mut self);
}

pub struct Silent;
impl Progress for Silent {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: u64, _: &StepStats) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Set (by `vox2vec-train`'s SIGINT/SIGTERM handler) to ask the training loop to stop after
/// the current step, write a checkpoint and return an error saying so.
pub static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pretrain on synthetic batches (the data pipeline for real CT comes with the loader):
/// steps `start..opts.steps`, where `start` is 0 or the resumed checkpoint's step. Batch `i`
/// depends only on (seed, i), so a resumed run continues exactly where the first stopped.
pub fn run_pretraining(opts: &TrainOptions, progress: &mut dyn Progress) -> Result<Vox2Vec> {
    run_pretraining_ranked(opts, progress, &mut crate::dist::Single)
}

/// `run_pretraining` as one rank of a data-parallel run (`dist`): batches drawn with
/// `dist::rank_seed`, every rank starting from rank 0's weights, gradients averaged every
/// step; rank 0 alone writes the checkpoint, metrics and pictures into `out_dir`, and a stop
/// signal on any rank stops all of them after the same step.
pub fn run_pretraining_ranked(
    opts: &TrainOptions,
    progress: &mut dyn Progress,
    comm: &mut dyn Communicator,
) -> Result<Vox2Vec> {
    use crate::checkpoint;
    use anyhow::{Context, bail};
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let data_seed = crate::dist::rank_seed(opts.seed, rank);

    let mut model = Vox2Vec::new(opts.model, opts.seed);
    let mut adam = Adam::new(opts.adam, &model.store);
    let ckpt_path = opts.out_dir.join(CHECKPOINT_FILE);
    let resume_path = match &opts.resume {
        Resume::No => None,
        Resume::Latest => Some(ckpt_path.clone()),
        Resume::From(p) => Some(p.clone()),
    };
    if let Some(path) = resume_path {
        let loaded = checkpoint::load(&path, &mut model.store, Some(&mut adam))?;
        if let Some(cfg) = loaded.metadata.get("model_config") {
            let want = checkpoint::config_to_json(&opts.model);
            let a: serde_json::Value =
                serde_json::from_str(cfg).with_context(|| format!("{}: bad model_config", path.display()))?;
            let b: serde_json::Value = serde_json::from_str(&want)?;
            if a != b {
                bail!("{}: checkpoint model {a} differs from the requested model {b}", path.display());
            }
        }
        // Resuming with another preprocessing would train one backbone on two kinds of input.
        for key in [crate::eval::recorded::SPACING, crate::eval::recorded::WINDOW] {
            let want = opts.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            if let (Some(had), Some(want)) = (loaded.metadata.get(key), want)
                && had != want
            {
                bail!(
                    "{}: checkpoint was trained with {key} {had}, this run asks for {want}; resume with the same setting or start a new run in another --out",
                    path.display()
                );
            }
        }
        // A published backbone alone (a PyTorch FPN3d state_dict, no step): pretraining goes on
        // from it with a new projection head, as the reference's head is discarded after training.
        let backbone_only = loaded.step.is_none()
            && !loaded.missing.is_empty()
            && loaded.missing.iter().all(|k| k.starts_with(crate::model::HEAD_PREFIX));
        if backbone_only {
            progress.message(&format!("initialised the backbone from {}; its projection head is not in the file and starts from random weights (seed {}), Adam from step 0", path.display(), opts.seed));
        } else if !loaded.missing.is_empty() {
            bail!(
                "{}: checkpoint lacks {} model tensors (first: {})",
                path.display(),
                loaded.missing.len(),
                loaded.missing[0]
            );
        } else if loaded.step.is_none() {
            progress.message(&format!(
                "initialised the model from {} (a file without optimiser state): Adam from step 0",
                path.display()
            ));
        } else {
            progress.message(&format!("resumed from {} at step {}", path.display(), adam.step));
        }
    }
    // Loaded on the host (checkpoints are host data), then moved.
    if opts.device != Device::Cpu {
        model.to_device(opts.device)?;
        adam.to_device(opts.device)?;
        model.activation_dtype = opts.activation_dtype;
    }
    if world > 1 {
        // Every rank resumes from the same step (the checkpoint must be on a file system all
        // ranks see) and holds rank 0's weights, as DDP broadcasts them at the start.
        let mut steps = [adam.step as f32];
        comm.all_reduce_sum(&mut steps).context("comparing the ranks' starting steps")?;
        if steps[0] != adam.step as f32 * world as f32 {
            bail!(
                "rank {rank} starts at step {} but the ranks' steps sum to {}: every rank must see the same checkpoint in {} (a shared file system) or none",
                adam.step,
                steps[0],
                opts.out_dir.display()
            );
        }
        broadcast_slots(&mut model, comm, |_| true).context("copying rank 0's weights to every rank")?;
    }
    let mut metrics = None;
    if lead {
        std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
        let stale = checkpoint::remove_stale_temp_files(&opts.out_dir)?;
        if stale > 0 {
            progress.message(&format!(
                "removed {stale} temporary file(s) left in {} by an interrupted run",
                opts.out_dir.display()
            ));
        }
        // The metrics of steps after the checkpoint (a run killed after its last checkpoint) are
        // dropped, so that no step appears twice once this run writes them again.
        truncate_metrics(&opts.out_dir.join(METRICS_FILE), adam.step)?;
        metrics = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(opts.out_dir.join(METRICS_FILE))
                .with_context(|| format!("opening {}", opts.out_dir.join(METRICS_FILE).display()))?,
        );
    }
    let start = adam.step;
    if let Some(dir) = opts.dump_batches.as_ref().filter(|_| lead) {
        // The weights the dumped batches start from (PyTorch state_dict keys and layouts).
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        checkpoint::save(
            &dir.join(format!("weights_step_{start:06}.safetensors")),
            &model.config,
            &model.store,
            Some(&adam),
            &[],
        )?;
    }
    let mut skipped = 0u64;
    progress.start(start, opts.steps);
    let mut meta: Vec<(&str, String)> = vec![("seed", opts.seed.to_string())];
    meta.extend(opts.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let save = |model: &Vox2Vec, adam: &Adam| {
        if lead { checkpoint::save(&ckpt_path, &model.config, &model.store, Some(adam), &meta) } else { Ok(()) }
    };
    let mut loader = match &opts.data {
        BatchSource::Volumes { volumes, sampler, workers } => {
            Some(crate::data::loader::Loader::new(volumes.clone(), *sampler, data_seed, start, *workers, 2 * workers)?)
        }
        BatchSource::SyntheticPairs(_) => None,
    };
    for step in start..opts.steps {
        let batch = match (&opts.data, loader.as_mut()) {
            (BatchSource::SyntheticPairs(shape), _) => synthetic_batch(*shape, data_seed, step),
            (_, Some(l)) => l.next_batch().with_context(|| format!("making batch {}", step + 1))?,
            _ => unreachable!("a volume source always has a loader"),
        };
        let mut batch = batch;
        if opts.inject_nan_steps.contains(&(step + 1)) {
            let mut x = batch.x1.to_f32_vec()?;
            x[0] = f32::NAN;
            batch.x1 = Tensor::from_f32(batch.x1.shape(), x);
        }
        if let Some(dir) = opts.dump_batches.as_ref().filter(|_| lead) {
            dump_batch(dir, step + 1, &batch)?;
        }
        let t0 = std::time::Instant::now();
        let stats =
            pretrain_step_ranked(&mut model, &mut adam, &batch, comm).with_context(|| format!("step {}", step + 1))?;
        if stats.finite() {
            let line = serde_json::json!({
                "step": step + 1,
                "loss": stats.loss,
                "grad_norm": stats.grad_norm,
                "top1": stats.signal.top1,
                "pos_sim": stats.signal.pos_sim,
                "neg_sim": stats.signal.neg_sim,
                "step_ms": t0.elapsed().as_secs_f64() * 1e3,
            });
            append_metric(&mut metrics, &opts.out_dir, &line)?;
            progress.step(step + 1, &stats);
        } else if skipped < opts.skip_nonfinite {
            skipped += 1;
            let why = format!("loss {} and gradient norm {}", stats.loss, stats.grad_norm);
            let line = serde_json::json!({"step": step + 1, "skipped": true, "reason": why});
            append_metric(&mut metrics, &opts.out_dir, &line)?;
            progress.message(&format!(
                "step {}: {why}: update skipped ({skipped} of --skip-nonfinite {})",
                step + 1,
                opts.skip_nonfinite
            ));
        } else {
            bail!(
                "step {}: the loss is {} and the gradient norm {}: the update was not applied and nothing was written; the last checkpoint ({}) is kept. {}Lower --lr, check the data, or pass --skip-nonfinite K to skip up to K such steps (VOX2VEC_CHECK_FINITE=1 names the first op that produced a non-finite value)",
                step + 1,
                stats.loss,
                stats.grad_norm,
                ckpt_path.display(),
                if skipped > 0 { format!("{skipped} earlier step(s) were skipped already. ") } else { String::new() }
            );
        }
        if let Some(v) = opts
            .validation
            .as_ref()
            .filter(|v| lead && v.every > 0 && ((step + 1) % v.every == 0 || step + 1 == opts.steps))
        {
            let (loss, sig) =
                validate(&mut model, &v.batches).with_context(|| format!("validation after step {}", step + 1))?;
            append_metric(
                &mut metrics,
                &opts.out_dir,
                &serde_json::json!({"step": step + 1, "val_loss": loss, "val_top1": sig.top1, "val_pos_sim": sig.pos_sim, "val_neg_sim": sig.neg_sim}),
            )?;
            progress.message(&format!(
                "step {:>6}  validation: loss {loss:.5}  top-1 {:.3}  similarity pos {:.3} neg {:.3}",
                step + 1,
                sig.top1,
                sig.pos_sim,
                sig.neg_sim
            ));
        }
        if let Some(p) = opts.online_probe.as_ref().filter(|p| lead && p.every > 0 && (step + 1) % p.every == 0) {
            // The probe runs where the backbone is (on a CUDA device: head, loss, Adam and
            // validation there too), reading the backbone without copying or changing it.
            let dice = online_probe(&mut model, p, step + 1)?;
            let mean = dice.iter().sum::<f64>() / dice.len().max(1) as f64;
            append_metric(
                &mut metrics,
                &opts.out_dir,
                &serde_json::json!({"step": step + 1, "probe_mean_dice": mean, "probe_dice": dice, "probe_classes": p.dataset.classes}),
            )?;
            progress.message(&format!("step {:>6}  online linear probe: mean Dice {mean:.4}", step + 1));
        }
        let mut stop = [f32::from(u8::from(STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)))];
        if world > 1 {
            // Any rank's signal stops every rank after this same step.
            comm.all_reduce_sum(&mut stop)?;
        }
        if stop[0] > 0.0 && step + 1 < opts.steps {
            drop(metrics);
            if world > 1 {
                broadcast_slots(&mut model, comm, |k| k == crate::params::SlotKind::RunningStat)?;
            }
            save(&model, &adam)?;
            if lead {
                write_loss_curve(&opts.out_dir)?;
            }
            bail!(
                "interrupted by a signal after step {}: checkpoint written to {}; continue with --resume",
                step + 1,
                ckpt_path.display()
            );
        }
        if opts.checkpoint_every > 0 && (step + 1) % opts.checkpoint_every == 0 && step + 1 < opts.steps {
            save(&model, &adam)?;
        }
    }
    if world > 1 {
        // Each rank's last forward moved its own running statistics: all end with rank 0's
        // (the checkpoint's), as they would at the next step.
        broadcast_slots(&mut model, comm, |k| k == crate::params::SlotKind::RunningStat)?;
    }
    save(&model, &adam)?;
    if lead {
        write_loss_curve(&opts.out_dir)?;
    }
    progress.finish();
    Ok(model)
}
