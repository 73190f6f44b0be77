//! Adam (PyTorch semantics, no weight decay) and clipping to a global L2 norm
//! (`torch.nn.utils.clip_grad_norm_` semantics).
//!
//! Adam, per element, at step t (1-based):
//!   m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²
//!   p ← p - (lr / (1-β1^t)) · m / (√v / √(1-β2^t) + ε)
//! clip: total = ‖(‖g_1‖, …, ‖g_k‖)‖; coef = max_norm / (total + 1e-6); if coef < 1, g ← g·coef.

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::params::ParamStore;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Per-slot moments; `step` counts completed updates.
pub struct Adam {
    pub config: AdamConfig,
    pub step: u64,
    /// Indexed by store slot; `None` for slots that are not trained.
    pub exp_avg: Vec<Option<Vec<f32>>>,
    pub exp_avg_sq: Vec<Option<Vec<f32>>>,
    /// The moments on a CUDA device, when training runs there (`to_device`); the host
    /// vectors above are then stale, and `moments_on_host` reads the device copies.
    pub device: Option<crate::cuda::optim::DeviceMoments>,
}

impl Adam {
    pub fn new(config: AdamConfig, store: &ParamStore) -> Adam {
        let mut exp_avg = vec![None; store.len()];
        let mut exp_avg_sq = vec![None; store.len()];
        for s in store.trainable() {
            exp_avg[s] = Some(vec![0.0; store.get(s).numel()]);
            exp_avg_sq[s] = Some(vec![0.0; store.get(s).numel()]);
        }
        Adam { config, step: 0, exp_avg, exp_avg_sq, device: None }
    }

    /// Move the moments to `device` (a CUDA device: training updates them there).
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        if device == crate::tensor::Device::Cpu {
            for slot in 0..self.exp_avg.len() {
                if let Some((m, v)) = self.moments_on_host(slot)? {
                    self.exp_avg[slot] = Some(m);
                    self.exp_avg_sq[slot] = Some(v);
                }
            }
            self.device = None;
            return Ok(());
        }
        let up = |m: &Option<Vec<f32>>| -> Result<Option<Tensor>> {
            m.as_ref().map(|m| Tensor::from_f32(&[m.len()], m.clone()).to_device(device)).transpose()
        };
        let exp_avg = self.exp_avg.iter().map(up).collect::<Result<Vec<_>>>()?;
        let exp_avg_sq = self.exp_avg_sq.iter().map(up).collect::<Result<Vec<_>>>()?;
        self.device = Some(crate::cuda::optim::DeviceMoments { exp_avg, exp_avg_sq });
        Ok(())
    }

    /// (exp_avg, exp_avg_sq) of `slot` as host values, wherever they live.
    pub fn moments_on_host(&self, slot: usize) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        if let Some(d) = &self.device {
            return Ok(match (&d.exp_avg[slot], &d.exp_avg_sq[slot]) {
                (Some(m), Some(v)) => Some((m.to_f32_vec()?, v.to_f32_vec()?)),
                _ => None,
            });
        }
        Ok(match (&self.exp_avg[slot], &self.exp_avg_sq[slot]) {
            (Some(m), Some(v)) => Some((m.clone(), v.clone())),
            _ => None,
        })
    }

    /// One update of every slot that has a gradient; `grads[slot]`. Where the moments are on a
    /// CUDA device (`to_device`) the parameters and gradients must be there too, and the
    /// update is one fused kernel queued on the device (`cuda::optim::adam_update`).
    pub fn update(&mut self, store: &mut ParamStore, grads: &[Option<Tensor>]) -> Result<()> {
        if let Some(moments) = &self.device {
            self.step += 1;
            return crate::cuda::optim::adam_update(store, grads, moments, self.config, self.step, None);
        }
        self.update_scaled(store, grads, 1.0)
    }

    /// `update` with every gradient multiplied by `grad_scale` first (in f32, as
    /// `clip_grad_norm_` scales them): clipping fused into the update, one pass less over
    /// the gradients.
    pub fn update_scaled(&mut self, store: &mut ParamStore, grads: &[Option<Tensor>], grad_scale: f32) -> Result<()> {
        ensure!(self.device.is_none(), "Adam's moments are on a CUDA device: use the device update");
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let step_size = c.lr / (1.0 - c.beta1.powi(t));
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (slot, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let (Some(m), Some(v)) = (self.exp_avg[slot].as_mut(), self.exp_avg_sq[slot].as_mut()) else { continue };
            let name = &store.slots()[slot].name;
            ensure!(g.numel() == m.len(), "gradient of {name} has {} values, parameter has {}", g.numel(), m.len());
            // f32 arithmetic, as PyTorch's Adam on f32 tensors (and vectorisable).
            let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
            let (step_size, bc2_sqrt) = (step_size as f32, bc2_sqrt as f32);
            let skip_idle = grad_scale.is_finite();
            store.update_f32(slot, |p| {
                p.par_chunks_mut(4096)
                    .zip(m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)))
                    .zip(g.f32s().par_chunks(4096))
                    .for_each(|((p, (m, v)), g)| {
                        for (((p, m), v), g) in p
                            .chunks_mut(IDLE_RUN)
                            .zip(m.chunks_mut(IDLE_RUN))
                            .zip(v.chunks_mut(IDLE_RUN))
                            .zip(g.chunks(IDLE_RUN))
                        {
                            if skip_idle && idle(g, m, v) {
                                continue;
                            }
                            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                                let g = if grad_scale == 1.0 { g } else { g * grad_scale };
                                *m += (1.0 - b1) * (g - *m);
                                *v = b2 * *v + (1.0 - b2) * g * g;
                                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                            }
                        }
                    });
            });
        }
        Ok(())
    }
}

/// Values per idleness check in Adam's update: a run of a 3×3×3 weight's taps at 256 or 512
/// input channels (the coarse levels, whose volumes of 1×1×1 and 2×2×1 voxels leave 26 and 18
/// of the 27 taps a zero gradient forever).
const IDLE_RUN: usize = 256;

/// Whether Adam's update of a run is the identity: every gradient ±0 and both moments +0 (as
/// they start). Then m' = 0 + (1-β1)·(±0 - 0) = +0, v' = β2·0 + (1-β2)·0 = +0 and p moves by
/// step·0 / (0 + ε) = 0 (with a finite gradient scale): the run is left as it is, unread and
/// unwritten past this check. Written as OR-reductions so that it vectorises.
fn idle(g: &[f32], m: &[f32], v: &[f32]) -> bool {
    let or = |x: &[f32], mask: u32| x.iter().fold(0u32, |a, &x| a | (x.to_bits() & mask));
    or(g, 0x7fff_ffff) == 0 && or(m, u32::MAX) == 0 && or(v, u32::MAX) == 0
}

/// Global L2 norm of all gradients (norm of the per-tensor norms). Squares are summed in
/// f32 lanes over blocks of 4096 values and the block sums in f64, in a fixed order.
pub fn global_norm(grads: &[Option<Tensor>]) -> f64 {
    const BLOCK: usize = 4096;
    grads
        .iter()
        .flatten()
        .map(|g| {
            let x = g.f32s();
            crate::cpu::par_reduce_rows(x.len().div_ceil(BLOCK), 1, |r, acc| {
                for block in x[r.start * BLOCK..(r.end * BLOCK).min(x.len())].chunks(BLOCK) {
                    let mut lanes = [0.0f32; 16];
                    let mut it = block.chunks_exact(16);
                    for c in &mut it {
                        for (l, &v) in lanes.iter_mut().zip(c) {
                            *l += v * v;
                        }
                    }
                    let tail: f64 = it.remainder().iter().map(|&v| v as f64 * v as f64).sum();
                    acc[0] += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail;
                }
            })[0]
        })
        .sum::<f64>()
        .sqrt()
}

/// The factor `clip_grad_norm_` multiplies gradients by: min(1, max_norm / (total + 1e-6)),
/// as f32 (PyTorch multiplies f32 gradients by an f32 tensor).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f32 {
    (max_norm / (total_norm + 1e-6)).min(1.0) as f32
}

/// Scales the gradients in place so that their global norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> f64 {
    let total = global_norm(grads);
    let coef = clip_coefficient(total, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            let shape = g.shape().to_vec();
            let mut v = std::mem::replace(g, Tensor::scalar(0.0)).into_f32_vec();
            v.par_chunks_mut(4096).for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
            *g = Tensor::from_f32(&shape, v);
        }
    }
    total
}
