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
    /// CUDA only: how the timed steps' CUDA graph ran (`cuda::graph`; None with graphs off),
    /// and the wall time of steps with every call issued one by one (no graph), ms.
    pub graph: Option<crate::cuda::GraphStats>,
    pub unrecorded_ms: Vec<f64>,
    /// Losses of the timed steps.
    pub losses: Vec<f64>,
    /// Peak bytes held by live device buffers, and reserved from the driver (CUDA only).
    pub peak_in_use: usize,
    pub peak_reserved: usize,
    /// (kernel, ms per step, launches per step), slowest first (CUDA only).
    pub kernels: Vec<(&'static str, f64, f64)>,
    /// The profiled steps' declared costs per step (CUDA only), for the floor table.
    pub costs: Option<crate::cuda::cost::CostLog>,
    /// The card the costs are priced on.
    pub card: &'static str,
}

impl BenchReport {
    pub fn median_ms(&self) -> f64 {
        median(&self.step_ms)
    }

    /// The report as text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let min = self.step_ms.iter().copied().fold(f64::INFINITY, f64::min);
        s += &format!(
            "bench: {} | {:?} activations | {} pairs of {:?}, {} voxels/pair\n",
            self.device, self.activation_dtype, self.shape.pairs, self.shape.patch, self.shape.voxels_per_pair
        );
        s += &format!(
            "bench: {} steps: median {:.1} ms/step, min {:.1} ms\n",
            self.step_ms.len(),
            self.median_ms(),
            min
        );
        if let Some(g) = &self.graph {
            s += &format!(
                "bench: as one CUDA graph per step ({} nodes): {} steps relaunched a kept graph unchanged, {} updated it, {} instantiated one, {} went on unrecorded\n",
                g.nodes, g.relaunched, g.updated, g.instantiated, g.unrecorded
            );
            if let Some(why) = &g.disabled {
                s += &format!(
                    "bench: the CUDA graph could not be built ({why}): the steps above issued their calls one by one\n"
                );
            }
        }
        if !self.unrecorded_ms.is_empty() {
            s += &format!(
                "bench: {} steps with every call issued one by one (no graph): median {:.1} ms/step\n",
                self.unrecorded_ms.len(),
                median(&self.unrecorded_ms)
            );
        }
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
        if let Some(costs) = &self.costs {
            // Measured time per kernel family beside the floor of its declared work.
            let mut measured: Vec<(String, f64)> = Vec::new();
            for (name, ms, _) in &self.kernels {
                let fam = crate::cuda::cost::family(name);
                match measured.iter_mut().find(|m| m.0 == fam) {
                    Some(m) => m.1 += ms,
                    None => measured.push((fam.to_string(), *ms)),
                }
            }
            s += &format!(
                "bench: measured against the estimate of each family's declared work and code on {}:\n",
                self.card
            );
            s += &render_cost_table(costs, &measured);
        }
        s
    }
}

/// Run `warmup` untimed steps, `steps` timed steps and (on CUDA) `profile_steps` steps with
/// per-kernel events, at the default model size and `shape`, on synthetic batches.
pub fn bench_pretraining(
    device: Device,
    activation_dtype: DType,
    shape: BatchShape,
    steps: usize,
    warmup: usize,
    profile_steps: usize,
    seed: u64,
) -> Result<BenchReport> {
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
    let graph_before = dev.as_ref().and_then(|d| d.graph_stats(crate::train::PRETRAIN_GRAPH));
    let (mut step_ms, mut losses) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let t0 = Instant::now();
        let s = pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
        sync()?;
        step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        ensure!(s.loss.is_finite(), "bench step {}: the loss is {}", i + 1, s.loss);
        losses.push(s.loss);
    }
    let (mut peak_in_use, mut peak_reserved, mut kernels, mut costs) = (0, 0, Vec::new(), None);
    let (mut graph, mut unrecorded_ms) = (None, Vec::new());
    if let Some(d) = &dev {
        let st = d.pool_stats();
        (peak_in_use, peak_reserved) = (st.peak_in_use, st.peak_reserved);
        graph = d.graph_stats(crate::train::PRETRAIN_GRAPH).map(|after| {
            let b = graph_before.unwrap_or_default();
            crate::cuda::GraphStats {
                steps: after.steps - b.steps,
                relaunched: after.relaunched - b.relaunched,
                updated: after.updated - b.updated,
                instantiated: after.instantiated - b.instantiated,
                unrecorded: after.unrecorded - b.unrecorded,
                ..after
            }
        });
        if graph.is_some() {
            // What the graph saves: the same steps with every call issued one by one.
            d.set_step_graphs(false);
            for i in 0..steps.min(10) {
                let t0 = Instant::now();
                pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
                sync()?;
                unrecorded_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            d.set_step_graphs(true);
        }
        if profile_steps > 0 {
            d.enable_kernel_timing();
            d.start_cost_log();
            for i in 0..profile_steps {
                pretrain_step(&mut model, &mut adam, &batches[i % 2])?;
            }
            costs = d.take_cost_log().map(|c| c.per_step(profile_steps));
            let n = profile_steps as f64;
            kernels = d.take_kernel_times()?.into_iter().map(|(k, ms, c)| (k, ms / n, c as f64 / n)).collect();
        }
    }
    let name = match &dev {
        Some(d) => format!("cuda:{} ({})", d.ordinal(), d.name()),
        None => format!("cpu ({} threads)", rayon::current_num_threads()),
    };
    let card = dev.as_ref().map_or("", |d| d.machine().name);
    Ok(BenchReport {
        device: name,
        activation_dtype: if device == Device::Cpu { DType::F32 } else { activation_dtype },
        shape,
        step_ms,
        graph,
        unrecorded_ms,
        losses,
        peak_in_use,
        peak_reserved,
        kernels,
        costs,
        card,
    })
}

/// `vox2vec-train --compare-precisions`: one pretraining step's loss and gradients with bf16
/// activation storage against fp32 storage, on one device, from the same weights and batch
/// (forward and backward only, no optimiser update): what bf16 costs in exactness at the size
/// that is benchmarked, where the GPU tests can only afford small shapes.
#[derive(Clone, Debug)]
pub struct PrecisionReport {
    pub device: String,
    pub shape: BatchShape,
    pub model: ModelConfig,
    /// The loss with fp32 and with bf16 activations.
    pub loss: [f64; 2],
    /// The global gradient norm (every trainable parameter) with fp32 and with bf16 activations.
    pub grad_norm: [f64; 2],
    /// Every trainable parameter in store order: (name, ‖g_bf16 − g_fp32‖ / max(‖g_fp32‖, floor),
    /// ‖g_fp32‖), the floor being 1e-2 of the largest parameter's gradient norm (a conv bias
    /// that feeds a train-mode BatchNorm has an exactly zero gradient in exact arithmetic:
    /// its error is rounding noise on both sides, compared with the gradients that matter).
    pub grads: Vec<(String, f64, f64)>,
}

/// Run the comparison on `device` (a CUDA device: bf16 storage exists there only).
pub fn compare_precisions(
    device: Device,
    model_config: ModelConfig,
    shape: BatchShape,
    seed: u64,
) -> Result<PrecisionReport> {
    ensure!(
        matches!(device, Device::Cuda(_)),
        "--compare-precisions needs a CUDA device (bf16 activation storage exists there only)"
    );
    let batch = synthetic_batch(shape, seed, 0);
    let step = |dt: DType| -> Result<(f64, Vec<(String, Vec<f32>)>)> {
        let mut model = Vox2Vec::new(model_config, seed);
        model.to_device(device)?;
        model.activation_dtype = dt;
        let g = crate::autograd::Graph::train();
        let out = model.forward_pairs(&g, &batch, false)?;
        let loss = out.loss.value.to_f32_vec()?[0] as f64;
        let grads = g.backward(&out.loss)?;
        let mut items = Vec::new();
        for slot in model.store.trainable().collect::<Vec<_>>() {
            let name = model.store.slots()[slot].name.clone();
            let gr = grads.param(&model.store, slot).ok_or_else(|| anyhow::anyhow!("no gradient for {name}"))?;
            items.push((name, gr.to_f32_vec()?));
        }
        Ok((loss, items))
    };
    let (loss_32, g32) = step(DType::F32)?;
    let (loss_16, g16) = step(DType::BF16)?;
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    let global = |gs: &[(String, Vec<f32>)]| gs.iter().map(|(_, v)| norm(v).powi(2)).sum::<f64>().sqrt();
    let floor = 1e-2 * g32.iter().map(|(_, v)| norm(v)).fold(0.0, f64::max);
    let grads = g32
        .iter()
        .zip(&g16)
        .map(|((name, a), (_, b))| {
            let d = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
            (name.clone(), d / norm(a).max(floor).max(1e-30), norm(a))
        })
        .collect();
    let name = match device {
        Device::Cuda(o) => {
            let d = crate::cuda::device(o)?;
            format!("cuda:{o} ({})", d.name())
        }
        Device::Cpu => unreachable!(),
    };
    Ok(PrecisionReport {
        device: name,
        shape,
        model: model_config,
        loss: [loss_32, loss_16],
        grad_norm: [global(&g32), global(&g16)],
        grads,
    })
}

impl PrecisionReport {
    fn rel(a: f64, b: f64) -> f64 {
        (b - a).abs() / a.abs().max(1e-30)
    }

    /// The largest relative gradient error and its parameter.
    pub fn worst(&self) -> (&str, f64) {
        self.grads
            .iter()
            .map(|(n, e, _)| (n.as_str(), *e))
            .fold(("", 0.0), |w, x| if x.1 > w.1 || x.1.is_nan() { x } else { w })
    }

    /// The median relative gradient error over the parameters.
    pub fn median(&self) -> f64 {
        let mut e: Vec<f64> = self.grads.iter().map(|g| g.1).collect();
        e.sort_by(f64::total_cmp);
        if e.is_empty() { f64::NAN } else { e[e.len() / 2] }
    }

    /// A few parameters worth naming: the first layer, the middle one and the last.
    pub fn samples(&self) -> Vec<&(String, f64, f64)> {
        let n = self.grads.len();
        let mut idx = vec![0, n / 2, n.saturating_sub(1)];
        idx.dedup();
        idx.into_iter().filter_map(|i| self.grads.get(i)).collect()
    }

    /// Lines starting `precision: ` (the GPU bundle's summary collects them).
    pub fn render(&self) -> String {
        let mut s = format!(
            "precision: {} | {} pairs of {:?}, {} voxels/pair | FPN3d base {} x {} scales | one step's forward and backward, same weights and batch\n",
            self.device,
            self.shape.pairs,
            self.shape.patch,
            self.shape.voxels_per_pair,
            self.model.fpn.base_channels,
            self.model.fpn.num_scales
        );
        s += &format!(
            "precision: loss fp32 {:.6} bf16 {:.6} (rel {:.2e})\n",
            self.loss[0],
            self.loss[1],
            Self::rel(self.loss[0], self.loss[1])
        );
        s += &format!(
            "precision: gradient norm fp32 {:.6e} bf16 {:.6e} (rel {:.2e})\n",
            self.grad_norm[0],
            self.grad_norm[1],
            Self::rel(self.grad_norm[0], self.grad_norm[1])
        );
        let (wn, we) = self.worst();
        s += &format!(
            "precision: gradient rel err over {} parameters: median {:.2e}, largest {:.2e} ({wn})\n",
            self.grads.len(),
            self.median(),
            we
        );
        for (name, e, n) in self.samples() {
            s += &format!("precision: gradient of {name}: rel err {e:.2e} (norm {n:.3e})\n");
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let grads: Vec<serde_json::Value> =
            self.grads.iter().map(|(n, e, g)| serde_json::json!({"name": n, "rel_err": e, "fp32_norm": g})).collect();
        serde_json::json!({
            "device": self.device,
            "pairs": self.shape.pairs,
            "patch": self.shape.patch,
            "voxels_per_pair": self.shape.voxels_per_pair,
            "base_channels": self.model.fpn.base_channels,
            "num_scales": self.model.fpn.num_scales,
            "loss_fp32": self.loss[0],
            "loss_bf16": self.loss[1],
            "grad_norm_fp32": self.grad_norm[0],
            "grad_norm_bf16": self.grad_norm[1],
            "grad_rel_err_median": self.median(),
            "grad_rel_err_max": self.worst().1,
            "grads": grads,
        })
    }
}

/// `vox2vec-train --bench-plan`: one pretraining step run on the plan device (nothing
/// executes): the peak device memory the caching allocator would see and every launch with
/// its declared cost, priced on the plan's card (`--card`, H100 by default).
#[derive(Clone, Debug)]
pub struct PlanReport {
    pub device: String,
    pub activation_dtype: DType,
    pub shape: BatchShape,
    pub model: ModelConfig,
    pub peak_in_use: usize,
    pub peak_reserved: usize,
    pub largest_allocation: usize,
    /// The step's launches by kernel family.
    pub costs: crate::cuda::cost::CostLog,
    /// The card the plan is priced on.
    pub card: &'static str,
}

/// Run `warmup` steps (they fill the allocator's cache as on a GPU), then one step whose
/// memory peaks and launch costs are reported. Must run in a process where
/// `crate::cuda::enable_plan_mode` was called first.
pub fn plan_pretraining(
    model_config: ModelConfig,
    activation_dtype: DType,
    shape: BatchShape,
    seed: u64,
) -> Result<PlanReport> {
    ensure!(crate::cuda::planned(), "plan_pretraining needs the plan device (crate::cuda::enable_plan_mode)");
    let device = Device::Cuda(0);
    let dev = crate::cuda::device(0)?;
    let mut model = Vox2Vec::new(model_config, seed);
    let mut adam = Adam::new(AdamConfig::default(), &model.store);
    model.to_device(device)?;
    adam.to_device(device)?;
    model.activation_dtype = activation_dtype;
    let batch = synthetic_batch(shape, seed, 0);
    pretrain_step(&mut model, &mut adam, &batch)?;
    dev.reset_peak_memory();
    dev.start_cost_log();
    pretrain_step(&mut model, &mut adam, &batch)?;
    let costs = dev.take_cost_log().unwrap_or_default();
    let st = dev.pool_stats();
    Ok(PlanReport {
        device: dev.name().to_string(),
        activation_dtype,
        shape,
        model: model_config,
        peak_in_use: st.peak_in_use,
        peak_reserved: st.peak_reserved,
        largest_allocation: st.largest_alloc,
        costs,
        card: dev.machine().name,
    })
}

const GIB: f64 = (1u64 << 30) as f64;

/// The per-family table of a cost log: launches, GFLOP, GB, floor ms, the estimate's parts
/// (memory, tensor, issue, launch ms), the estimate, its share and what bounds it, the
/// kernel's instructions per HMMA in its innermost HMMA loop, and, when `measured` has the
/// family (ms per step from CUDA events), the measured ms and measured / estimate.
pub fn render_cost_table(costs: &crate::cuda::cost::CostLog, measured: &[(String, f64)]) -> String {
    let total = costs.estimate_s().max(1e-15);
    let mut rows: Vec<_> = costs.families.iter().collect();
    rows.sort_by(|a, b| b.1.estimate_s.total_cmp(&a.1.estimate_s));
    let with_measured = !measured.is_empty();
    let mut s = format!(
        "  {:<30} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6} {:>7} {:>7}",
        "kernel family",
        "launches",
        "GFLOP",
        "GB",
        "floor ms",
        "memory",
        "tensor",
        "issue",
        "launch",
        "estimate",
        "share",
        "bound",
        "ins/mma"
    );
    if with_measured {
        s += &format!(" {:>11} {:>7}", "measured ms", "x est.");
    }
    s += "\n";
    let ms = |v: f64| v * 1e3;
    let line = |name: &str, f: &crate::cuda::cost::FamilyCost, bound: &str, meas: Option<f64>| {
        let e = &f.estimate;
        let ipm =
            family_sass(name).and_then(|k| k.instructions_per_hmma()).map_or("-".to_string(), |v| format!("{v:.1}"));
        let issue = if f.has_sass || name == "total" { format!("{:.3}", ms(e.issue_s)) } else { "n/a".to_string() };
        let mut l = format!(
            "  {:<30} {:>8} {:>9.2} {:>8.3} {:>9.3} {:>9.3} {:>9.3} {:>9} {:>9.3} {:>10.3} {:>5.1}% {:>7} {:>7}",
            name,
            f.launches,
            f.flops / 1e9,
            f.bytes / 1e9,
            ms(f.floor_s),
            ms(e.memory_s),
            ms(e.tensor_s),
            issue,
            ms(e.launch_s),
            ms(f.estimate_s),
            100.0 * f.estimate_s / total,
            bound,
            ipm
        );
        if with_measured {
            match meas {
                Some(m) => l += &format!(" {:>11.3} {:>7.1}", m, m / ms(f.estimate_s).max(1e-12)),
                None => l += &format!(" {:>11} {:>7}", "-", "-"),
            }
        }
        l + "\n"
    };
    for (name, f) in rows {
        let meas = measured.iter().find(|(n, _)| n == name).map(|m| m.1);
        s += &line(name, f, f.bound(), meas);
    }
    let mut sum = crate::cuda::cost::FamilyCost::default();
    for f in costs.families.values() {
        sum.launches += f.launches;
        sum.flops += f.flops;
        sum.bytes += f.bytes;
        sum.floor_s += f.floor_s;
        sum.estimate.memory_s += f.estimate.memory_s;
        sum.estimate.tensor_s += f.estimate.tensor_s;
        sum.estimate.issue_s += f.estimate.issue_s;
        sum.estimate.launch_s += f.estimate.launch_s;
        sum.estimate_s += f.estimate_s;
    }
    let meas_total = with_measured.then(|| measured.iter().map(|m| m.1).sum());
    s += &line("total", &sum, "", meas_total);
    s
}

/// The SASS summary of a kernel family's kernel (the family name, or its bf16 or f32 variant).
pub fn family_sass(family: &str) -> Option<&'static crate::cuda::sass::Kernel> {
    [family.to_string(), format!("{family}_bf16"), format!("{family}_f32")]
        .iter()
        .find_map(|n| crate::kernels::sass_of(n))
}

impl PlanReport {
    pub fn floor_ms(&self) -> f64 {
        self.costs.floor_s() * 1e3
    }

    /// The floor if every FLOP ran on bf16 tensor cores (bytes unchanged).
    pub fn tensor_floor_ms(&self) -> f64 {
        self.costs.families.values().map(|f| f.tensor_floor_s).sum::<f64>() * 1e3
    }

    /// The estimate: every launch's `max(memory, tensor, issue) + launch` (cuda::cost).
    pub fn estimate_ms(&self) -> f64 {
        self.costs.estimate_s() * 1e3
    }

    pub fn render(&self) -> String {
        let mut s = format!("bench-plan: {}\n", self.device);
        s += &format!(
            "bench-plan: {:?} activations | {} pairs of {:?}, {} voxels/pair | FPN3d base {} x {} scales, projection {}\n",
            self.activation_dtype,
            self.shape.pairs,
            self.shape.patch,
            self.shape.voxels_per_pair,
            self.model.fpn.base_channels,
            self.model.fpn.num_scales,
            self.model.proj_dim
        );
        s += &format!(
            "bench-plan: peak device memory {:.2} GiB in use, {:.2} GiB reserved; largest allocation {:.1} MiB\n",
            self.peak_in_use as f64 / GIB,
            self.peak_reserved as f64 / GIB,
            self.largest_allocation as f64 / (1u64 << 20) as f64
        );
        s += &format!(
            "bench-plan: {} launches; floor {:.2} ms/step with today's kernels' units ({:.2} ms if every FLOP ran on bf16 tensor cores)\n",
            self.costs.launches(),
            self.floor_ms(),
            self.tensor_floor_ms()
        );
        let sass = if crate::kernels::sass().is_empty() {
            " (no SASS in this build: issue times not counted; scripts/install-cuda.sh installs cuobjdump)"
        } else {
            ""
        };
        s += &format!(
            "bench-plan: estimate {:.2} ms/step on {} with issue time and launches counted{sass} (an estimate, not a measurement)\n",
            self.estimate_ms(),
            self.card
        );
        s += &render_cost_table(&self.costs, &[]);
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let kernels: Vec<serde_json::Value> = self
            .costs
            .families
            .iter()
            .map(|(name, f)| {
                let code = family_sass(name);
                serde_json::json!({
                    "name": name,
                    "launches": f.launches,
                    "flops": f.flops,
                    "bytes": f.bytes,
                    "floor_ms": f.floor_s * 1e3,
                    "tensor_core_floor_ms": f.tensor_floor_s * 1e3,
                    "memory_ms": f.estimate.memory_s * 1e3,
                    "tensor_ms": f.estimate.tensor_s * 1e3,
                    "issue_ms": if f.has_sass { serde_json::json!(f.estimate.issue_s * 1e3) } else { serde_json::Value::Null },
                    "launch_ms": f.estimate.launch_s * 1e3,
                    "estimate_ms": f.estimate_s * 1e3,
                    "bound": f.bound(),
                    "instructions_issued": f.estimate.instructions,
                    "instructions_per_hmma": code.and_then(|k| k.instructions_per_hmma()),
                    "nest_instructions_per_hmma": code.and_then(|k| k.nest_instructions_per_hmma()),
                    "local_memory_instructions": code.map(|k| k.local),
                })
            })
            .collect();
        serde_json::json!({
            "device": self.device,
            "precision": match self.activation_dtype { DType::BF16 => "bf16", _ => "fp32" },
            "pairs": self.shape.pairs,
            "patch": self.shape.patch,
            "voxels_per_pair": self.shape.voxels_per_pair,
            "base_channels": self.model.fpn.base_channels,
            "num_scales": self.model.fpn.num_scales,
            "proj_dim": self.model.proj_dim,
            "peak_in_use_bytes": self.peak_in_use,
            "peak_reserved_bytes": self.peak_reserved,
            "largest_allocation_bytes": self.largest_allocation,
            "card": self.card,
            "floor_ms": self.floor_ms(),
            "tensor_core_floor_ms": self.tensor_floor_ms(),
            "estimate_ms": self.estimate_ms(),
            "sass_available": !crate::kernels::sass().is_empty(),
            "launches": self.costs.launches(),
            "kernels": kernels,
        })
    }
}

/// One configuration of `vox2vec bench-infer`: the eval-mode pyramid of `batch` windows per
/// pass, as `embed` runs it (input copied to the device and cast, every level computed, the
/// device synchronised by reading the coarsest level back).
#[derive(Clone, Debug)]
pub struct InferReport {
    pub device: String,
    pub activation_dtype: DType,
    pub batch: usize,
    pub patch: [usize; 3],
    /// Wall time of each timed pass, ms.
    pub pass_ms: Vec<f64>,
    /// Peak device memory in use (CUDA: the caching allocator's, weights included), or the
    /// process's peak resident memory during the passes (CPU: VmHWM, reset before them).
    pub peak_bytes: usize,
    /// What `peak_bytes` is.
    pub peak_kind: &'static str,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl InferReport {
    pub fn median_ms(&self) -> f64 {
        median(&self.pass_ms)
    }
    pub fn patches_per_s(&self) -> f64 {
        self.batch as f64 / (self.median_ms() / 1e3)
    }
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "device": self.device, "precision": precision_name(self.activation_dtype), "batch": self.batch, "patch": self.patch,
            "median_ms_per_pass": self.median_ms(), "pass_ms": self.pass_ms, "patches_per_s": self.patches_per_s(),
            "peak_bytes": self.peak_bytes, "peak_kind": self.peak_kind,
        })
    }
}

fn precision_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        _ => "fp32",
    }
}

/// Linux: forget the process's peak resident memory so far (`/proc/self/clear_refs` 5), so
/// that VmHWM measures from now on. False where that is not possible.
pub fn reset_host_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory (VmHWM of /proc/self/status), bytes.
pub fn host_peak_memory() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kb| kb * 1024)
}

/// A fixed input batch of `batch` windows (smooth, in [0, 1]: a CT-like range).
fn infer_input(batch: usize, patch: [usize; 3], seed: u64) -> crate::tensor::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = batch * patch.iter().product::<usize>();
    crate::tensor::Tensor::from_f32(
        &[batch, patch[0], patch[1], patch[2], 1],
        (0..n).map(|_| rng.random::<f32>()).collect(),
    )
}

/// One eval-mode pyramid pass over `input`; returns once its results exist on the host side
/// (on a device: the coarsest level read back, which waits for the stream).
fn infer_pass(model: &mut Vox2Vec, input: &crate::tensor::Tensor) -> Result<()> {
    let g = crate::autograd::Graph::inference();
    let pyr = model.pyramid(&g, &crate::autograd::Var::constant(model.prepare_input(input)?))?;
    if let Some(last) = pyr.last() {
        last.value.to_host()?;
    }
    Ok(())
}

/// Time `iters` eval-mode pyramid passes of `batch` windows of `patch` (after `warmup`
/// untimed ones) with `model` where it lives, its activations stored as `activation_dtype`.
pub fn bench_inference(
    model: &mut Vox2Vec,
    activation_dtype: DType,
    batch: usize,
    patch: [usize; 3],
    iters: usize,
    warmup: usize,
) -> Result<InferReport> {
    ensure!(iters >= 1 && batch >= 1, "bench-infer needs at least one pass of at least one window");
    let device = model.device();
    let dev = match device {
        Device::Cuda(o) => Some(crate::cuda::device(o)?),
        Device::Cpu => None,
    };
    ensure!(dev.is_some() || activation_dtype == DType::F32, "bf16 activations need a CUDA device");
    model.activation_dtype = activation_dtype;
    let input = infer_input(batch, patch, 17);
    if let Some(d) = &dev {
        d.synchronize()?;
        d.release_cached()?;
    }
    for _ in 0..warmup {
        infer_pass(model, &input)?;
    }
    let host_reset = dev.is_none() && reset_host_peak_memory();
    if let Some(d) = &dev {
        d.synchronize()?;
        d.reset_peak_memory();
    }
    let mut pass_ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        infer_pass(model, &input)?;
        pass_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (peak_bytes, peak_kind) = match &dev {
        Some(d) => (d.pool_stats().peak_in_use, "device memory in use (weights included)"),
        None => (
            host_peak_memory().unwrap_or(0),
            if host_reset {
                "peak resident memory of the process during the passes"
            } else {
                "peak resident memory of the process since it started"
            },
        ),
    };
    let name = match &dev {
        Some(d) => format!("cuda:{} ({})", d.ordinal(), d.name()),
        None => format!("cpu ({} threads)", rayon::current_num_threads()),
    };
    Ok(InferReport { device: name, activation_dtype, batch, patch, pass_ms, peak_bytes, peak_kind })
}

/// `bench-infer --plan`: one eval-mode pyramid pass of `batch` windows on the plan device
/// (nothing executes): peak device memory and every launch's declared cost, priced on the
/// plan's card. Needs `crate::cuda::enable_plan_mode` first.
pub fn plan_inference(
    model_config: ModelConfig,
    activation_dtype: DType,
    batch: usize,
    patch: [usize; 3],
) -> Result<PlanReport> {
    ensure!(crate::cuda::planned(), "plan_inference needs the plan device (crate::cuda::enable_plan_mode)");
    let dev = crate::cuda::device(0)?;
    let mut model = Vox2Vec::new(model_config, 0);
    model.to_device(Device::Cuda(0))?;
    model.activation_dtype = activation_dtype;
    let input = infer_input(batch, patch, 17);
    // Each configuration from an empty cache, so that what it reserves is its own.
    dev.release_cached()?;
    infer_pass(&mut model, &input)?;
    dev.reset_peak_memory();
    dev.start_cost_log();
    infer_pass(&mut model, &input)?;
    let costs = dev.take_cost_log().unwrap_or_default();
    let st = dev.pool_stats();
    Ok(PlanReport {
        device: dev.name().to_string(),
        activation_dtype,
        shape: BatchShape { pairs: batch, patch, voxels_per_pair: 0 },
        model: model_config,
        peak_in_use: st.peak_in_use,
        peak_reserved: st.peak_reserved,
        largest_allocation: st.largest_alloc,
        costs,
        card: dev.machine().name,
    })
}
