//! The optimiser step on the device (`kernels/optim.cu`): the global gradient norm and the
//! clip coefficient are computed into a device buffer that the fused Adam kernel reads, so
//! clipping and the update need no host round trip.

use std::sync::Arc;

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, CudaDevice, K, dev_of, ensure_f32};
use crate::optim::AdamConfig;
use crate::params::ParamStore;
use crate::tensor::Tensor;

/// Values per block of the sum of squares.
const SUMSQ_BLOCK: usize = 16384;

/// `clip_grad_norm_`'s results on the device: [norm, coefficient] (f32).
pub struct ClipStats {
    pub buf: CudaBuf,
}

impl ClipStats {
    /// The global gradient norm (before clipping).
    pub fn norm_ptr(&self) -> u64 {
        self.buf.ptr()
    }
    /// The factor the gradients are multiplied by, min(1, max_norm / (norm + 1e-6)).
    pub fn coef_ptr(&self) -> u64 {
        self.buf.ptr() + 4
    }
}

/// `clip_grad_norm_(grads, max_norm)`'s norm and coefficient, computed on the device.
pub fn clip_stats(dev: &Arc<CudaDevice>, grads: &[Option<Tensor>], max_norm: f64) -> Result<ClipStats> {
    let blocks: Vec<usize> = grads.iter().flatten().map(|g| g.numel().div_ceil(SUMSQ_BLOCK).max(1)).collect();
    let total: usize = blocks.iter().sum();
    let part = dev.alloc_zeroed(total.max(1) * 8)?;
    let mut off = 0;
    for (g, &b) in grads.iter().flatten().zip(&blocks) {
        ensure_f32(g, "gradient")?;
        dev.launch(
            K::SumsqBlocks,
            (b as u32, 1, 1),
            (256, 1, 1),
            0,
            &[Arg::Ptr(g.ptr()), Arg::I64(g.numel() as i64), Arg::I64(SUMSQ_BLOCK as i64), Arg::Ptr(part.ptr() + (off * 8) as u64)],
            Cost::mem(g.numel() * 4 + b * 8),
        )?;
        off += b;
    }
    let stats = dev.alloc(8)?;
    dev.launch(K::ClipFinalize, (1, 1, 1), (256, 1, 1), 0, &[Arg::Ptr(part.ptr()), Arg::I64(total as i64), Arg::F64(max_norm), Arg::Ptr(stats.ptr())], Cost::mem(total * 8 + 8))?;
    Ok(ClipStats { buf: stats })
}

/// Adam's moments on the device, per store slot (None for slots that are not trained).
pub struct DeviceMoments {
    pub exp_avg: Vec<Option<Tensor>>,
    pub exp_avg_sq: Vec<Option<Tensor>>,
}

/// One fused Adam update (PyTorch semantics) of every slot with a gradient, at step `step`
/// (1-based), with every gradient scaled by `coef[0]` first (a device f32; None = 1).
pub fn adam_update(store: &ParamStore, grads: &[Option<Tensor>], moments: &DeviceMoments, c: AdamConfig, step: u64, coef: Option<u64>) -> Result<()> {
    let t = step as i32;
    let step_size = (c.lr / (1.0 - c.beta1.powi(t))) as f32;
    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
    for (slot, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let (Some(m), Some(v)) = (&moments.exp_avg[slot], &moments.exp_avg_sq[slot]) else { continue };
        let p = store.get(slot);
        let name = &store.slots()[slot].name;
        ensure!(g.numel() == p.numel() && m.numel() == p.numel(), "gradient of {name} has {} values, parameter has {}", g.numel(), p.numel());
        ensure_f32(g, "gradient")?;
        ensure_f32(p, "parameter")?;
        let n = p.numel();
        dev_of(p).launch_1d(
            K::AdamUpdate,
            n,
            &[
                Arg::Ptr(p.ptr()),
                Arg::Ptr(g.ptr()),
                Arg::Ptr(m.ptr()),
                Arg::Ptr(v.ptr()),
                Arg::I64(n as i64),
                Arg::F32(step_size),
                Arg::F32(c.beta1 as f32),
                Arg::F32(c.beta2 as f32),
                Arg::F32(c.eps as f32),
                Arg::F32(bc2_sqrt),
                Arg::Ptr(coef.unwrap_or(0)),
            ],
            // p, g, m, v read; p, m, v written.
            Cost::mem(7 * n * 4),
        )?;
    }
    Ok(())
}
