//! Segmentation on top of the backbone (docs/method.md §5): linear / non-linear probing (frozen
//! backbone, eval-mode BatchNorm), fine-tuning (backbone frozen for the first steps, then
//! trained) and training from scratch, on an nnU-Net raw dataset; sliding-window prediction;
//! Dice per class.
//!
//! Training patches: with p = 0.5 the patch contains a random foreground voxel of a random
//! class (a uniform start when the case has none of that class), else its start is uniform. Multi-label sigmoid outputs (one channel per
//! class), loss = BCE in the body ROI + soft Dice (`ops::segloss`), Adam. Validation: the whole
//! preprocessed volume by sliding window (central-region stitching), probabilities × ROI,
//! threshold 0.5, Dice per class.

use anyhow::{Result, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dice::dice;
use super::embed::{scale_hu, scale_hu_voxel};
use super::sliding::{Blend, MapSpec, slide};
use crate::autograd::{Graph, Var};
use crate::data::nnunet::Case;
use crate::data::preprocess::PreprocessedCt;
use crate::model::Vox2Vec;
use crate::model::seg_heads::{FpnLinearHead, FpnNonLinearHead};
use crate::ops;
use crate::optim::{Adam, AdamConfig};
use crate::params::ParamStore;
use crate::tensor::Tensor;

/// Which parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Frozen backbone (eval-mode BatchNorm), head trained.
    Probe,
    /// Backbone frozen for the first `unfreeze_after` steps, then trained with the head.
    FineTune { unfreeze_after: u64 },
    /// Backbone trained from its (random) initialisation together with the head.
    Scratch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadKind {
    Linear,
    #[value(name = "nonlinear", alias = "non-linear")]
    NonLinear,
}

impl HeadKind {
    /// The name a head file records (`head_kind`) and `--head` takes.
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Linear => "linear",
            HeadKind::NonLinear => "nonlinear",
        }
    }
}

// One head per run: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Head {
    Linear(FpnLinearHead),
    NonLinear(FpnNonLinearHead),
}

impl Head {
    pub fn new(
        kind: HeadKind,
        store: &mut ParamStore,
        seed: u64,
        fpn: crate::model::FpnConfig,
        classes: usize,
    ) -> Head {
        let mut rng = StdRng::seed_from_u64(seed);
        match kind {
            HeadKind::Linear => Head::Linear(FpnLinearHead::new(store, &mut rng, "", fpn, classes)),
            HeadKind::NonLinear => Head::NonLinear(FpnNonLinearHead::new(store, &mut rng, "", fpn, classes)),
        }
    }
    pub fn num_classes(&self) -> usize {
        match self {
            Head::Linear(h) => h.num_classes,
            Head::NonLinear(h) => h.num_classes,
        }
    }
    pub fn forward(&self, g: &Graph, store: &mut ParamStore, pyramid: &[Var]) -> Result<Var> {
        match self {
            Head::Linear(h) => h.forward(g, store, pyramid),
            Head::NonLinear(h) => h.forward(g, store, pyramid),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SegConfig {
    pub patch: [usize; 3],
    pub batch: usize,
    pub steps: u64,
    pub lr: f64,
    pub p_foreground: f64,
    pub validate_every: u64,
    pub seed: u64,
}

impl Default for SegConfig {
    fn default() -> Self {
        SegConfig {
            patch: [128, 128, 32],
            batch: 7,
            steps: 1000,
            lr: 3e-4,
            p_foreground: 0.5,
            validate_every: 100,
            seed: 0,
        }
    }
}

/// Crop of `case` at `start` (zero-padded past the border): (network input, one-hot targets
/// [X, Y, Z, K], ROI).
fn crop(case: &Case, start: [usize; 3], patch: [usize; 3], k: usize) -> (Vec<f32>, Vec<f32>, Vec<bool>) {
    let s = case.ct.shape;
    let n: usize = patch.iter().product();
    let (mut x, mut t, mut roi) = (vec![0.0f32; n], vec![0.0f32; n * k], vec![false; n]);
    for i in 0..patch[0] {
        for j in 0..patch[1] {
            for l in 0..patch[2] {
                let (a, b, c) = (start[0] + i, start[1] + j, start[2] + l);
                if a >= s[0] || b >= s[1] || c >= s[2] {
                    continue;
                }
                let src = (a * s[1] + b) * s[2] + c;
                let dst = (i * patch[1] + j) * patch[2] + l;
                x[dst] = scale_hu_voxel(case.ct.hu[src]);
                roi[dst] = case.mask[src];
                let lab = case.labels[src] as usize;
                if lab > 0 {
                    t[dst * k + lab - 1] = 1.0;
                }
            }
        }
    }
    (x, t, roi)
}

/// A training patch start for `case`: with probability p around a random foreground voxel of a
/// random class (uniform when the case has none of it), else uniform.
fn patch_start(case: &Case, patch: [usize; 3], p_fg: f64, k: usize, rng: &mut StdRng) -> [usize; 3] {
    let s = case.ct.shape;
    let max_start = |a: usize| s[a].saturating_sub(patch[a]);
    if rng.random_bool(p_fg) {
        let voxels = &case.class_voxels[rng.random_range(0..k)];
        if !voxels.is_empty() {
            let v = voxels[rng.random_range(0..voxels.len())] as usize;
            let at = [v / (s[1] * s[2]), (v / s[2]) % s[1], v % s[2]];
            let mut st = [0; 3];
            for a in 0..3 {
                let lo = (at[a] + 1).saturating_sub(patch[a]);
                let hi = at[a].min(max_start(a));
                st[a] = if lo <= hi { rng.random_range(lo..=hi) } else { 0 };
            }
            return st;
        }
    }
    [rng.random_range(0..=max_start(0)), rng.random_range(0..=max_start(1)), rng.random_range(0..=max_start(2))]
}

/// Sigmoid probabilities [X, Y, Z, K] of a whole case by sliding window (`sw_batch` windows
/// per forward pass, the logits stitched where the model runs), × ROI.
/// `progress(done, total)` is called after each batch of windows (for a progress bar).
#[allow(clippy::too_many_arguments)]
pub fn predict_case(
    model: &mut Vox2Vec,
    head: &Head,
    head_store: &mut ParamStore,
    ct: &PreprocessedCt,
    mask: &[bool],
    patch: [usize; 3],
    sw_batch: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<f32>> {
    let x = scale_hu(&ct.hu);
    let k = head.num_classes();
    let device = model.device();
    let maps = slide(
        &x,
        ct.shape,
        patch,
        sw_batch,
        Blend::Central,
        &[MapSpec { level: 0, channels: k }],
        device,
        &mut |input| {
            let g = Graph::inference();
            let pyr = model.pyramid(&g, &Var::constant(model.prepare_input(&input)?))?;
            Ok(vec![head.forward(&g, head_store, &pyr)?.value])
        },
        progress,
    )?;
    // Sigmoid of the stitched logits (stitching copies, so it commutes); zero outside the ROI.
    let mut probs = maps.into_iter().next().expect("one map").values;
    for (v, &inside) in probs.chunks_exact_mut(k).zip(mask) {
        for p in v.iter_mut() {
            *p = if inside { 1.0 / (1.0 + (-*p).exp()) } else { 0.0 };
        }
    }
    Ok(probs)
}

/// Dice per class of thresholded probabilities against a label map.
pub fn case_dice(probs: &[f32], labels: &[u8], k: usize) -> Vec<f64> {
    (0..k)
        .map(|c| {
            let p: Vec<bool> = (0..labels.len()).map(|v| probs[v * k + c] > 0.5).collect();
            let g: Vec<bool> = labels.iter().map(|&l| l as usize == c + 1).collect();
            dice(&p, &g)
        })
        .collect()
}

/// What a run reports.
#[derive(Clone, Debug)]
pub struct SegResult {
    /// (step, mean Dice over validation cases, per class).
    pub history: Vec<(u64, Vec<f64>)>,
    /// Per validation case (in `val` order), per class, at each validation of `history`.
    pub history_per_case: Vec<Vec<Vec<f64>>>,
    pub best_step: u64,
    pub best_dice: Vec<f64>,
    /// Per validation case, per class, at `best_step`.
    pub best_per_case: Vec<Vec<f64>>,
    pub losses: Vec<(u64, f64)>,
}

/// What `train_segmentation` reports while it works (for a progress bar).
#[derive(Clone, Copy, Debug)]
pub enum SegEvent<'a> {
    /// Step `step` done with this loss.
    Step { step: u64, loss: f64 },
    /// Validation after `step`: window `window` of `windows` of validation case `index` of `cases`.
    Validating { step: u64, case: &'a str, index: usize, cases: usize, window: usize, windows: usize },
}

/// Train a head (and, by mode, the backbone) on `train`, validating on `val`. `on_best` is
/// called with the stores whenever the mean validation Dice improves.
#[allow(clippy::too_many_arguments)]
pub fn train_segmentation(
    model: &mut Vox2Vec,
    head: &Head,
    head_store: &mut ParamStore,
    train: &[&Case],
    val: &[&Case],
    k: usize,
    mode: Mode,
    cfg: &SegConfig,
    progress: &dyn Fn(SegEvent),
    on_best: &mut dyn FnMut(&Vox2Vec, &ParamStore) -> Result<()>,
) -> Result<SegResult> {
    ensure!(!train.is_empty() && !val.is_empty(), "need training and validation cases");
    // Everything runs where the backbone lives: on a CUDA device the head, its Adam moments,
    // the batches, the loss and the updates are on the device, and only the loss comes back.
    let device = model.device();
    if head_store.device() != device {
        head_store.to_device(device)?;
    }
    let adam_cfg = AdamConfig { lr: cfg.lr, ..AdamConfig::default() };
    let mut head_adam = Adam::new(adam_cfg, head_store);
    // Moments for the backbone only when it trains (they are as large as the backbone).
    let mut backbone_adam = (!matches!(mode, Mode::Probe)).then(|| Adam::new(adam_cfg, &model.store));
    if device != crate::tensor::Device::Cpu {
        head_adam.to_device(device)?;
        if let Some(a) = backbone_adam.as_mut() {
            a.to_device(device)?;
        }
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut res = SegResult {
        history: Vec::new(),
        history_per_case: Vec::new(),
        best_step: 0,
        best_dice: vec![],
        best_per_case: vec![],
        losses: Vec::new(),
    };
    let mut best = f64::NEG_INFINITY;
    let p = cfg.patch;
    for step in 1..=cfg.steps {
        let train_backbone = match mode {
            Mode::Probe => false,
            Mode::Scratch => true,
            Mode::FineTune { unfreeze_after } => step > unfreeze_after,
        };
        let (mut xs, mut ts, mut rois) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.batch {
            let case = train[rng.random_range(0..train.len())];
            let st = patch_start(case, p, cfg.p_foreground, k, &mut rng);
            let (x, t, r) = crop(case, st, p, k);
            xs.extend(x);
            ts.extend(t);
            rois.extend(r);
        }
        // An all-air batch has nothing to learn from: no update (and no BatchNorm statistics
        // from it), but the step still counts, and still validates when it is due.
        if rois.iter().any(|&r| r) {
            let b = cfg.batch;
            let input = model.prepare_input(&Tensor::from_f32(&[b, p[0], p[1], p[2], 1], xs))?;
            let targets = Tensor::from_f32(&[b, p[0], p[1], p[2], k], ts).to_device(device)?;
            let roi = ops::segloss::roi_tensor(&[b, p[0], p[1], p[2]], &rois).to_device(device)?;
            let g = Graph::train();
            let pyramid = if train_backbone {
                model.pyramid(&g, &Var::constant(input))?
            } else {
                // Frozen: eval-mode BatchNorm, nothing recorded; the pyramid enters as constants.
                model
                    .pyramid(&Graph::inference(), &Var::constant(input))?
                    .into_iter()
                    .map(|v| Var::constant(v.value))
                    .collect()
            };
            let logits = head.forward(&g, head_store, &pyramid)?;
            let loss = ops::segmentation_loss(&g, &logits, &targets, Some(&roi))?;
            let lv = loss.value.to_scalar() as f64;
            let grads = g.backward(&loss)?;
            let hg: Vec<Option<Tensor>> = (0..head_store.len()).map(|s| grads.param(head_store, s).cloned()).collect();
            head_adam.update(head_store, &hg)?;
            if let (true, Some(adam)) = (train_backbone, backbone_adam.as_mut()) {
                let bg: Vec<Option<Tensor>> =
                    (0..model.store.len()).map(|s| grads.param(&model.store, s).cloned()).collect();
                adam.update(&mut model.store, &bg)?;
            }
            res.losses.push((step, lv));
            progress(SegEvent::Step { step, loss: lv });
        }
        if step % cfg.validate_every == 0 || step == cfg.steps {
            let mut per_class = vec![0.0; k];
            let mut per_case = Vec::with_capacity(val.len());
            for (index, c) in val.iter().enumerate() {
                let windows = |window, windows| {
                    progress(SegEvent::Validating { step, case: &c.name, index, cases: val.len(), window, windows })
                };
                let probs = predict_case(model, head, head_store, &c.ct, &c.mask, p, cfg.batch, &windows)?;
                let d = case_dice(&probs, &c.labels, k);
                for (acc, d) in per_class.iter_mut().zip(&d) {
                    *acc += d / val.len() as f64;
                }
                per_case.push(d);
            }
            let mean = per_class.iter().sum::<f64>() / k as f64;
            res.history.push((step, per_class.clone()));
            res.history_per_case.push(per_case.clone());
            if mean > best {
                best = mean;
                res.best_step = step;
                res.best_dice = per_class;
                res.best_per_case = per_case;
                on_best(model, head_store)?;
            }
        }
    }
    Ok(res)
}
