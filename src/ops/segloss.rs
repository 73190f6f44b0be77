//! The segmentation training loss of docs/method.md §5 (the reference's
//! `compute_binary_segmentation_loss`), on logits and one-hot targets [N, X, Y, Z, C] with an
//! optional ROI [N, X, Y, Z]:
//!   bce  = mean over ROI voxels × classes of BCE-with-logits(l, t)
//!   dice = mean over samples n and classes c of 1 − 2 Σ_v p·g / (Σ_v (p² + g²) + 1),
//!          p = sigmoid(l), with p and g zeroed outside the ROI
//!   loss = bce + dice
//! Backward (targets are constants), per ROI element, with I, S the sums of its (n, c):
//!   dl = (p − t) / count − 2 (t (S + 1) − 2 I p) / ((S + 1)² N C) · p (1 − p); 0 outside.
//! Sums in f64. Output written (=).

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::tensor::Tensor;

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// (loss, bce, per-class dice losses averaged over samples, gradient w.r.t. the logits).
pub fn segmentation_loss_cpu(
    logits: &[f32],
    targets: &[f32],
    roi: Option<&[bool]>,
    n: usize,
    c: usize,
) -> (f64, f64, Vec<f64>, Vec<f32>) {
    let vox = logits.len() / (n * c);
    // Every (element index, its (sample, class) index) inside the ROI, in memory order.
    let roi_elements = || {
        (0..n * vox)
            .filter(move |&bv| roi.is_none_or(|r| r[bv]))
            .flat_map(move |bv| (0..c).map(move |k| (bv * c + k, (bv / vox) * c + k)))
    };
    let mut bce = 0.0f64;
    let mut count = 0usize;
    let mut inter = vec![0.0f64; n * c];
    let mut sums = vec![0.0f64; n * c];
    for (i, j) in roi_elements() {
        let (l, t) = (logits[i] as f64, targets[i] as f64);
        bce += l.max(0.0) - l * t + (-l.abs()).exp().ln_1p();
        let p = sigmoid(l);
        inter[j] += p * t;
        sums[j] += p * p + t * t;
        count += 1;
    }
    let bce = if count > 0 { bce / count as f64 } else { f64::NAN };
    let d: Vec<f64> = (0..n * c).map(|j| 1.0 - 2.0 * inter[j] / (sums[j] + 1.0)).collect();
    let per_class: Vec<f64> = (0..c).map(|k| (0..n).map(|b| d[b * c + k]).sum::<f64>() / n as f64).collect();
    let dice = per_class.iter().sum::<f64>() / c as f64;
    let mut grad = vec![0.0f32; logits.len()];
    let nc = (n * c) as f64;
    for (i, j) in roi_elements() {
        let (p, t) = (sigmoid(logits[i] as f64), targets[i] as f64);
        let (ii, s1) = (inter[j], sums[j] + 1.0);
        let ddice = -2.0 * (t * s1 - 2.0 * ii * p) / (s1 * s1 * nc);
        grad[i] = ((p - t) / count as f64 + ddice * p * (1.0 - p)) as f32;
    }
    (bce + dice, bce, per_class, grad)
}

/// The loss as an autograd op (gradient to the logits only); returns [1]. `roi` is an f32
/// [N, X, Y, Z] mask of 0 and 1 on the logits' device (None: every voxel). On a CUDA device the
/// loss and its gradient come from `kernels/segloss.cu` and nothing is read back; an empty ROI
/// is an error on the host and a NaN loss on the device (check the mask where it is made).
pub fn segmentation_loss(g: &Graph, logits: &Var, targets: &Tensor, roi: Option<&Tensor>) -> Result<Var> {
    let s = logits.shape();
    ensure!(
        s.len() == 5 && targets.shape() == s,
        "segmentation_loss: logits {s:?} and targets {:?} must be equal [N, X, Y, Z, C]",
        targets.shape()
    );
    let (n, c) = (s[0], s[4]);
    if let Some(r) = roi {
        ensure!(
            r.numel() == logits.value.numel() / c,
            "segmentation_loss: ROI of {} voxels for {} voxels",
            r.numel(),
            logits.value.numel() / c
        );
    }
    if logits.value.is_cuda() {
        use crate::cuda::ops::segloss as dev;
        let (loss, saved) = dev::forward(&logits.value, targets, roi)?;
        let keep = g.needs_grad(&[logits]).then(|| (logits.value.clone(), targets.clone(), roi.cloned(), saved));
        return Ok(g.record("segmentation_loss", loss, &[logits], move |dl| {
            let (l, t, r, saved) = keep.expect("saved for backward");
            let dl = crate::cuda::cast(&dl.to_device(l.device())?, crate::tensor::DType::F32)?;
            Ok(vec![Some(dev::backward(&l, &t, r.as_ref(), &saved, &dl)?)])
        }));
    }
    let mask: Option<Vec<bool>> = roi.map(|r| r.f32s().iter().map(|&v| v > 0.5).collect());
    if let Some(m) = &mask {
        ensure!(m.iter().any(|&b| b), "segmentation_loss: empty ROI");
    }
    let (loss, _, _, grad) = segmentation_loss_cpu(logits.value.f32s(), targets.f32s(), mask.as_deref(), n, c);
    let shape = s.to_vec();
    Ok(g.record("segmentation_loss", Tensor::from_f32(&[1], vec![loss as f32]), &[logits], move |dl| {
        let k = dl.f32s()[0];
        Ok(vec![Some(Tensor::from_f32(&shape, grad.into_iter().map(|v| v * k).collect()))])
    }))
}

/// An ROI mask as the f32 tensor `segmentation_loss` takes ([N, X, Y, Z] of 0 and 1).
pub fn roi_tensor(shape: &[usize], mask: &[bool]) -> Tensor {
    Tensor::from_f32(shape, mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect())
}
