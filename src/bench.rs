//! `vox2vec-train --bench N`: time N pretraining steps at a given batch shape on synthetic
//! data and report the median ms/step, peak device memory and (on CUDA) a per-kernel time
//! table from CUDA events — the profile to use where nsys cannot run.

use std::time::Instant;

use anyhow::{Result, ensure};

use crate::model::{ModelConfig, Vox2Vec};
use crate::optim::{Adam, AdamConfig};
use crate::tensor::{DType, Device};
use crate::train::{BatchShape, pretrain_step, synthetic_batch};

/// What a benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub device: String,
    pub activation_dtype: DType,
    pub shape: BatchShape,
    /// Wall time of each timed step (the device synchronised at its end), ms.
    pub step_ms: Vec<f64>,
    /// Losses of the timed steps.
    pub losses: Vec<f64>,
    /// Peak bytes held by live device buffers, and reserved from the driver (CUDA only).
    pub peak_in_use: usize,
    pub peak_reserved: usize,
    /// (kernel, ms per step, launches per step), slowest first (CUDA only).
    pub kernels: Vec<(&'static str, f64, f64)>,
}

impl BenchReport {
    pub fn median_ms(&self) -> f64 {
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let min = self.step_ms.iter().copied().fold(f64::INFINITY, f64::min);
        s += &format!(
            "bench: {} | {:?} activations | {} pairs of {:?}, {} voxels/pair\n",
            self.device, self.activation_dtype, self.shape.pairs, self.shape.patch, self.shape.voxels_per_pair
        );
        s += &format!("bench: {} steps: median {:.1} ms/step, min {:.1} ms\n", self.step_ms.len(), self.median_ms(), min);
        if self.peak_reserved > 0 {
            s += &format!(
                "bench: peak device memory {:.2} GiB in use, {:.2} GiB reserved by the caching allocator\n",
                self.peak_in_use as f64 / (1u64 << 30) as f64,
                self.peak_reserved as f64 / (1u64 << 30) as f64
            );
        }
        if let (Some(a), Some(b)) = (self.losses.first(), self.losses.last()) {
            s += &format!("bench: loss {a:.4} (first timed step) -> {b:.4} (last)\n");
        }
        if !self.kernels.is_empty() {
            let total: f64 = self.kernels.iter().map(|k| k.1).sum();
            s += &format!("bench: kernel time per step from CUDA events ({total:.1} ms in kernels and cuBLAS):\n");
            s += &format!("  {:<32} {:>10} {:>8} {:>7}\n", "kernel", "ms/step", "calls", "share");
            for (name, ms, calls) in &self.kernels {
                s += &format!("  {:<32} {:>10.3} {:>8.0} {:>6.1}%\n", name, ms, calls, 100.0 * ms / total.max(1e-12));
            }
        }
        s
    }
}

/// Run `warmup` untimed steps, `steps` timed steps and (on CUDA) `profile_steps` steps with
/// per-kernel events, at the default model size and `shape`, on synthetic batches.
pub fn bench_pretraining(device: Device, activation_dtype: DType, shape: BatchShape, steps: usize, warmup: usize, profile_steps: usize, seed: u64) -> Result<BenchReport> {
    ensure!(steps >= 1, "--bench needs at least one step");
    let mut model = Vox2Vec::new(ModelConfig::default(), seed);
    let mut adam = Adam::new(AdamConfig::default(), &model.store);
    let dev = match device {
        Device::Cuda(o) => Some(crate::cuda::device(o)?),
        Device::Cpu => None,
    };
    if device != Device::Cpu {
        model.to_device(device)?;
        adam.to_device(device)?;
        model.activation_dtype = activation_dtype;
    }
    // Two batches, alternated: making one at the reference size takes about a second of CPU.
    let batches = [synthetic_batch(shape, seed, 0), synthetic_batch(shape, seed, 1)];
    let sync = || -> Result<()> { dev.as_ref().map_or(Ok(()), |d| d.synchronize()) };
    for i in 0..warmup {
        pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
    }
    sync()?;
    if let Some(d) = &dev {
        d.reset_peak_memory();
    }
    let (mut step_ms, mut losses) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let t0 = Instant::now();
        let s = pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
        sync()?;
        step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        ensure!(s.loss.is_finite(), "bench step {}: the loss is {}", i + 1, s.loss);
        losses.push(s.loss);
    }
    let (mut peak_in_use, mut peak_reserved, mut kernels) = (0, 0, Vec::new());
    if let Some(d) = &dev {
        let st = d.pool_stats();
        (peak_in_use, peak_reserved) = (st.peak_in_use, st.peak_reserved);
        if profile_steps > 0 {
            d.enable_kernel_timing();
            for i in 0..profile_steps {
                pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
            }
            let n = profile_steps as f64;
            kernels = d.take_kernel_times()?.into_iter().map(|(k, ms, c)| (k, ms / n, c as f64 / n)).collect();
        }
    }
    let name = match &dev {
        Some(d) => format!("cuda:{} ({})", d.ordinal(), d.name()),
        None => format!("cpu ({} threads)", rayon::current_num_threads()),
    };
    Ok(BenchReport { device: name, activation_dtype: if device == Device::Cpu { DType::F32 } else { activation_dtype }, shape, step_ms, losses, peak_in_use, peak_reserved, kernels })
}
