//! The optimiser step on the device (`kernels/optim.cu`): the global gradient norm and the
//! clip coefficient are computed into a device buffer that the fused Adam kernel reads, so
//! clipping and the update need no host round trip.

use std::sync::Arc;

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, CudaDevice, KernelId, dev_of, ensure_f32};
use crate::optim::AdamConfig;
use crate::params::ParamStore;
use crate::tensor::Tensor;

/// Values per block of the sum of squares (fixes the order of the norm's partial sums).
const SUMSQ_BLOCK: usize = 16384;
/// Values per block of the Adam update.
const ADAM_BLOCK: usize = 8192;

/// One tensor of a multi-tensor launch (`MultiTensorEntry` in kernels/optim.cu): its pointers,
/// length and the index of its first block in each kernel's grid.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MultiTensorEntry {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    n: i64,
    first_sumsq: i64,
    first_adam: i64,
    unused: i64,
}

// SAFETY: repr(C), eight 8-byte integer fields: no padding, every bit pattern valid.
unsafe impl bytemuck::Zeroable for MultiTensorEntry {}
unsafe impl bytemuck::Pod for MultiTensorEntry {}

/// Number the blocks of each kernel tensor after tensor; returns the total blocks
/// (sum of squares, Adam).
fn number_blocks(table: &mut [MultiTensorEntry]) -> (usize, usize) {
    let (mut sq, mut adam) = (0usize, 0usize);
    for e in table {
        e.first_sumsq = sq as i64;
        e.first_adam = adam as i64;
        sq += (e.n as usize).div_ceil(SUMSQ_BLOCK).max(1);
        adam += (e.n as usize).div_ceil(ADAM_BLOCK).max(1);
    }
    (sq, adam)
}

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

/// `clip_grad_norm_(grads, max_norm)`'s norm and coefficient, computed on the device: one
/// launch for the sums of squares of every gradient, one for the norm.
pub fn clip_stats(
    dev: &Arc<CudaDevice>,
    grads: &[Option<Tensor>],
    max_norm: f64,
    loss: Option<&Tensor>,
) -> Result<ClipStats> {
    if let Some(l) = loss {
        ensure_f32(l, "loss")?;
    }
    let mut table = Vec::new();
    for g in grads.iter().flatten() {
        ensure_f32(g, "gradient")?;
        table.push(MultiTensorEntry { g: g.ptr(), n: g.numel() as i64, ..Default::default() });
    }
    let stats = dev.alloc(8)?;
    let (blocks, _) = number_blocks(&mut table);
    let part = dev.alloc(blocks.max(1) * 8)?;
    if table.is_empty() {
        dev.memset_zero(part.ptr(), 8)?;
    } else {
        let elems: usize = table.iter().map(|e| e.n as usize).sum();
        let t = dev.upload(&table)?;
        dev.launch(
            KernelId::MultiSumsq,
            (blocks as u32, 1, 1),
            (256, 1, 1),
            0,
            &[Arg::Ptr(t.ptr()), Arg::I32(table.len() as i32), Arg::I64(SUMSQ_BLOCK as i64), Arg::Ptr(part.ptr())],
            Cost::mem(elems * 4 + blocks * 8 + std::mem::size_of_val(table.as_slice())),
        )?;
    }
    dev.launch(
        KernelId::ClipFinalize,
        (1, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(part.ptr()),
            Arg::I64(blocks.max(1) as i64),
            Arg::F64(max_norm),
            Arg::Ptr(loss.map_or(0, |l| l.ptr())),
            Arg::Ptr(stats.ptr()),
        ],
        Cost::mem(blocks * 8 + 8),
    )?;
    Ok(ClipStats { buf: stats })
}

/// Adam's moments on the device, per store slot (None for slots that are not trained).
pub struct DeviceMoments {
    pub exp_avg: Vec<Option<Tensor>>,
    pub exp_avg_sq: Vec<Option<Tensor>>,
}

/// One fused Adam update (PyTorch semantics) of every slot with a gradient, at step `step`
/// (1-based), with every gradient scaled by `coef[0]` first (a device f32; None = 1): one
/// launch for all slots.
pub fn adam_update(
    store: &ParamStore,
    grads: &[Option<Tensor>],
    moments: &DeviceMoments,
    c: AdamConfig,
    step: u64,
    coef: Option<u64>,
) -> Result<()> {
    let t = step as i32;
    let step_size = (c.lr / (1.0 - c.beta1.powi(t))) as f32;
    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
    let mut table = Vec::new();
    let mut dev = None;
    for (slot, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let (Some(m), Some(v)) = (&moments.exp_avg[slot], &moments.exp_avg_sq[slot]) else { continue };
        let p = store.get(slot);
        let name = &store.slots()[slot].name;
        ensure!(
            g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
            "gradient of {name} has {} values, parameter has {}",
            g.numel(),
            p.numel()
        );
        ensure_f32(g, "gradient")?;
        ensure_f32(p, "parameter")?;
        dev.get_or_insert_with(|| dev_of(p).clone());
        table.push(MultiTensorEntry {
            p: p.ptr(),
            g: g.ptr(),
            m: m.ptr(),
            v: v.ptr(),
            n: p.numel() as i64,
            ..Default::default()
        });
    }
    let Some(dev) = dev else { return Ok(()) };
    let (_, blocks) = number_blocks(&mut table);
    let elems: usize = table.iter().map(|e| e.n as usize).sum();
    let tb = dev.upload(&table)?;
    // The step's scalars travel in device memory, so that a step graph's kernel arguments
    // are the same from step to step.
    let schedule = dev.upload(&[step_size, bc2_sqrt])?;
    dev.launch(
        KernelId::MultiAdam,
        (blocks as u32, 1, 1),
        (256, 1, 1),
        0,
        &[
            Arg::Ptr(tb.ptr()),
            Arg::I32(table.len() as i32),
            Arg::I64(ADAM_BLOCK as i64),
            Arg::Ptr(schedule.ptr()),
            Arg::F32(c.beta1 as f32),
            Arg::F32(c.beta2 as f32),
            Arg::F32(c.eps as f32),
            Arg::Ptr(coef.unwrap_or(0)),
        ],
        // p, g, m, v read; p, m, v written.
        Cost::mem(7 * elems * 4 + std::mem::size_of_val(table.as_slice())),
    )
}
