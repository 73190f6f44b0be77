//! The pretraining step (docs/method.md §4): forward both views, InfoNCE, backward, clip the
//! global gradient norm to 1.0, Adam; on the CPU or as one CUDA graph on a device, alone or as
//! one rank of a data-parallel run.

use anyhow::Result;

use crate::autograd::Graph;
use crate::dist::Communicator;
use crate::model::{PairBatch, Vox2Vec};
use crate::ops::infonce::Signal;
use crate::optim::{Adam, clip_coefficient, global_norm};
use crate::tensor::{Device, Tensor};

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
