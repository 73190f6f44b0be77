//! `bench-infer`: patches per second of the eval-mode pyramid, or its plan without a GPU.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::*;

/// What `bench-infer` measures and where.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchInferArgs {
    /// Weights (checkpoint or bare FPN3d) [default: a random backbone of --base-channels x --num-scales].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// FPN3d base width [default: the weights', else 16].
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// FPN3d scales [default: the weights', else 6].
    #[arg(long)]
    pub num_scales: Option<usize>,
    /// Window X,Y,Z.
    #[arg(long, default_value = "128,128,32")]
    pub patch: String,
    /// Windows per pass (sliding-window batch sizes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batches: Vec<usize>,
    /// Activation storage, comma-separated (bf16 needs a CUDA device; skipped on the CPU).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fp32,bf16")]
    pub precisions: Vec<super::Precision>,
    /// Timed passes per configuration (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed passes first (they fill the device's allocator cache).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Compute device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: super::DeviceArg,
    /// Run on the plan device instead (nothing executes): peak device memory and the floor
    /// of each configuration on an H100.
    #[arg(long)]
    pub plan: bool,
    /// Also write the results as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn bench_infer(a: &BenchInferArgs) -> Result<()> {
    let BenchInferArgs {
        weights,
        base_channels: base,
        num_scales: scales,
        patch,
        batches,
        precisions,
        iters,
        warmup,
        device,
        plan,
        report,
    } = a;
    let (weights, report, iters, warmup, plan, base, scales) =
        (weights.as_deref(), report.as_deref(), *iters, *warmup, *plan, *base, *scales);
    use crate::bench::{bench_inference, plan_inference, render_cost_table};
    use crate::model::{FpnConfig, ModelConfig, Vox2Vec};
    use crate::tensor::{DType, Device};
    let patch = parse_patch(patch)?;
    anyhow::ensure!(
        !batches.is_empty() && batches.iter().all(|&b| (1..=1024).contains(&b)),
        "--batches must be between 1 and 1024"
    );
    let dts: Vec<DType> = precisions.iter().map(|p| p.dtype()).collect();
    let mut json = Vec::new();
    if plan {
        crate::cuda::enable_plan_mode()?;
        let cfg = match weights {
            Some(w) => load_backbone(w, base, scales)?.0.config,
            None => ModelConfig {
                fpn: FpnConfig { in_channels: 1, base_channels: base.unwrap_or(16), num_scales: scales.unwrap_or(6) },
                ..ModelConfig::default()
            },
        };
        cfg.validate()?;
        println!(
            "bench-infer --plan: eval pyramid of {} windows, FPN3d base {} x {} scales, priced on {} (nothing executes; a floor is not a time)",
            crate::eval::recorded::xyz(&patch),
            cfg.fpn.base_channels,
            cfg.fpn.num_scales,
            crate::cuda::device(0)?.machine().name
        );
        for &dt in &dts {
            for &b in batches {
                let r = plan_inference(cfg, dt, b, patch)?;
                let floor = r.floor_ms();
                println!(
                    "\n{dt:?}, {b} windows per pass: peak device memory {:.2} GiB in use ({:.2} GiB reserved), {} launches, floor {floor:.2} ms per pass = at most {:.0} patches/s; estimate {:.2} ms = about {:.0} patches/s",
                    r.peak_in_use as f64 / (1u64 << 30) as f64,
                    r.peak_reserved as f64 / (1u64 << 30) as f64,
                    r.costs.launches(),
                    b as f64 / (floor / 1e3),
                    r.estimate_ms(),
                    b as f64 / (r.estimate_ms() / 1e3)
                );
                print!("{}", render_cost_table(&r.costs, &[]));
                let mut j = r.to_json();
                j["batch"] = serde_json::json!(b);
                j["patches_per_s_at_floor"] = serde_json::json!(b as f64 / (floor / 1e3));
                json.push(j);
            }
        }
    } else {
        let device = device.resolve().context("--device")?;
        let mut model = match weights {
            Some(w) => load_backbone(w, base, scales)?.0,
            None => {
                let cfg = ModelConfig {
                    fpn: FpnConfig {
                        in_channels: 1,
                        base_channels: base.unwrap_or(16),
                        num_scales: scales.unwrap_or(6),
                    },
                    ..ModelConfig::default()
                };
                cfg.validate()?;
                Vox2Vec::new(cfg, 0)
            }
        };
        if device != Device::Cpu {
            model.to_device(device)?;
        }
        let f = model.config.fpn;
        eprintln!(
            "vox2vec bench-infer: eval pyramid of {} windows, FPN3d base {} x {} scales, {}",
            crate::eval::recorded::xyz(&patch),
            f.base_channels,
            f.num_scales,
            crate::cuda::describe(device, DType::F32)?
        );
        println!(
            "{:<8} {:>7} {:>12} {:>11} {:>12}  peak memory",
            "precision", "batch", "ms / pass", "patches/s", "ms / patch"
        );
        for &dt in &dts {
            if device == Device::Cpu && dt == DType::BF16 {
                println!(
                    "{:<8} skipped: bf16 activations need a CUDA device (the CPU computes and stores fp32)",
                    "bf16"
                );
                continue;
            }
            for &b in batches {
                let r = bench_inference(&mut model, dt, b, patch, iters, warmup)?;
                println!(
                    "{:<8} {:>7} {:>12.1} {:>11.2} {:>12.1}  {:.2} GiB ({})",
                    if dt == DType::BF16 { "bf16" } else { "fp32" },
                    b,
                    r.median_ms(),
                    r.patches_per_s(),
                    r.median_ms() / b as f64,
                    r.peak_bytes as f64 / (1u64 << 30) as f64,
                    r.peak_kind
                );
                json.push(r.to_json());
            }
        }
        println!(
            "({} timed passes per row after {} warm-up; median; a pass = input copied in, the whole eval pyramid, the device synchronised)",
            iters, warmup
        );
    }
    if let Some(path) = report {
        crate::checkpoint::write_atomic(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"plan": plan, "results": json}))?.as_bytes(),
        )?;
    }
    Ok(())
}
