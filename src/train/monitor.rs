//! What a run watches besides its training loss: validation pairs from held-out CTs and an
//! online linear probe of the backbone on a labelled dataset.

use anyhow::Result;

use crate::autograd::Graph;
use crate::model::{PairBatch, Vox2Vec};
use crate::ops::infonce::Signal;

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

/// Online probing: a labelled dataset, its split, and the probe's small training run.
#[derive(Clone)]
pub struct OnlineProbe {
    pub dataset: std::sync::Arc<crate::data::nnunet::Dataset>,
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
