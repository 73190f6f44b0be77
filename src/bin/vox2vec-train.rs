//! vox2vec pretraining on CT (a NIfTI file or folder, an nnU-Net raw dataset, a list of
//! paths) or, with no data, on generated CT phantoms, on a CUDA GPU when one is present
//! (`--device`) or on the CPU. `--bench N` times N steps at the reference size instead.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use vox2vec::optim::AdamConfig;

use vox2vec::commands::{Card, DeviceArg, Precision};
use vox2vec::data::preprocess::PreprocessConfig;
use vox2vec::data::sampler::SamplerConfig;
use vox2vec::train::{BatchSource, Resume, TrainOptions};

#[derive(Parser, Debug)]
#[command(version, about = "Pretrain a vox2vec FPN3d backbone (contrastive, voxel-level)")]
struct Args {
    /// CT data: a NIfTI file, a DICOM series (a folder of its files, or its DICOMDIR), a folder
    /// of either (searched recursively), an nnU-Net raw dataset folder (imagesTr), or a text
    /// file of such paths. Without it: generated CT phantoms.
    data: Option<PathBuf>,
    /// Preprocessing cache folder (reused across runs; entries are keyed by file and settings).
    #[arg(long, default_value = "runs/cache")]
    cache: PathBuf,
    /// Skip unreadable or unusable files with a warning instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Resampling spacing of the CT in mm (x,y,z): the reference's 1,1,2, or coarser for
    /// quick CPU runs. Recorded in the checkpoint, so that `vox2vec embed` and the heads
    /// trained on this backbone resample the same way.
    #[arg(long, default_value = "1,1,2", value_parser = parse_spacing)]
    spacing: [f64; 3],
    /// Number of distinct phantoms when no data is given.
    #[arg(long, default_value_t = 8)]
    phantoms: usize,
    /// Loader worker threads.
    #[arg(long, default_value_t = 1)]
    loader_workers: usize,
    /// Blobs instead of CT: synthetic pairs without the sampler (for benchmarking the step).
    #[arg(long)]
    synthetic_pairs: bool,
    /// Online probing: an nnU-Net raw dataset to linear-probe the backbone on every --probe-every steps.
    #[arg(long)]
    probe_dataset: Option<PathBuf>,
    #[arg(long, default_value_t = 500)]
    probe_every: u64,
    /// Probe training steps, patch, batch, learning rate and resampling spacing (mm).
    #[arg(long, default_value_t = 200)]
    probe_steps: u64,
    #[arg(long, default_value = "64,64,16", value_parser = parse_xyz)]
    probe_patch: [usize; 3],
    #[arg(long, default_value_t = 4)]
    probe_batch: usize,
    #[arg(long, default_value_t = 1e-2)]
    probe_lr: f64,
    #[arg(long, default_value = "2,2,4", value_parser = parse_spacing)]
    probe_spacing: [f64; 3],
    /// Validation cases of the probe: every --probe-folds-th case.
    #[arg(long, default_value_t = 4)]
    probe_folds: usize,
    /// Validation pairs: CTs held out of training (as for the data: NIfTI, DICOM series, folder,
    /// nnU-Net dataset or list),
    /// from which --val-batches fixed batches are drawn once; every --val-every steps (and at
    /// the end) their loss, top-1 accuracy and similarities (eval mode) go into metrics.jsonl.
    #[arg(long, value_name = "DATA")]
    val_data: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    val_every: u64,
    #[arg(long, default_value_t = 4)]
    val_batches: usize,
    /// Leave out of the training data every input file whose path contains one of these
    /// (comma-separated) texts: e.g. the patients a probe evaluates on.
    #[arg(long, value_delimiter = ',', value_name = "TEXT")]
    exclude: Vec<String>,
    /// Write each step's batch into this folder (step_<n>/x1.npy, x2.npy, pairs.npy) for
    /// dev/trajectory.py, which trains PyTorch's reference step on the same batches.
    #[arg(long, value_name = "DIR")]
    dump_batches: Option<PathBuf>,
    /// Total optimisation steps (a resumed run continues up to this number) [default: 150 with
    /// --small, enough to see the loss fall and the top-1 accuracy rise; else 100].
    #[arg(long)]
    steps: Option<u64>,
    /// Small CPU-friendly configuration: 2 pairs of 32x32x16, 64 voxels per pair, base 16, 6
    /// scales, 150 steps (about a minute on 2 cores).
    #[arg(long)]
    small: bool,
    /// View pairs per batch.
    #[arg(long)]
    pairs: Option<usize>,
    /// Patch size X,Y,Z (default 128,128,32).
    #[arg(long, value_parser = parse_xyz)]
    patch: Option<[usize; 3]>,
    /// Positive voxel pairs per view pair (at most).
    #[arg(long)]
    voxels: Option<usize>,
    /// FPN3d base width [default: the resumed checkpoint's (recorded, or inferred from its
    /// tensors), else 16]; a value that contradicts the checkpoint is an error.
    #[arg(long)]
    base_channels: Option<usize>,
    /// FPN3d scales [default: the resumed checkpoint's, else 6].
    #[arg(long)]
    num_scales: Option<usize>,
    /// Projection head width [default: the resumed checkpoint's, else 128].
    #[arg(long)]
    proj_dim: Option<usize>,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: checkpoint.safetensors and metrics.jsonl.
    #[arg(long, default_value = "runs/pretrain")]
    out: PathBuf,
    /// Checkpoint every K steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Skip up to this many steps whose loss or gradient norm is not finite (their update, and
    /// their BatchNorm statistics, are dropped and the step logged) instead of stopping at the
    /// first. VOX2VEC_CHECK_FINITE=1 names the first op that produced a non-finite value.
    #[arg(long, default_value_t = 0, value_name = "K")]
    skip_nonfinite: u64,
    /// Testing hook: give step N's batch a NaN voxel (repeatable).
    #[arg(long, value_name = "N", hide = true)]
    inject_nan_step: Vec<u64>,
    /// Resume from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Resume from this checkpoint file (results still go to --out).
    #[arg(long, value_name = "CHECKPOINT")]
    resume_from: Option<PathBuf>,
    /// Data-parallel on N GPUs of this machine: starts N ranks (processes) of this command,
    /// rank r on cuda:r, gradients averaged by NCCL every step (each rank draws its own
    /// batches: N × --pairs pairs per step). Multi-node runs start one process per GPU with
    /// torchrun's or SLURM's variables instead (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    /// MASTER_PORT, or SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID).
    #[arg(long, value_name = "N", conflicts_with = "cpu_ranks")]
    gpus: Option<usize>,
    /// Data-parallel on the CPU: N ranks (processes) averaging gradients over TCP (for trying
    /// and testing a data-parallel setup without GPUs).
    #[arg(long, value_name = "N")]
    cpu_ranks: Option<usize>,
    /// Compute device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 arithmetic and weights).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Benchmark instead of training: N timed steps on synthetic pairs at the batch size given
    /// (default the reference 10 pairs of 128x128x32, 1024 voxels each) and the default model;
    /// prints the median ms/step, peak device memory and a per-kernel time table.
    #[arg(long, value_name = "N")]
    bench: Option<usize>,
    /// Performance model without a GPU: run one step of the configured batch and model on the
    /// plan device (every allocation through the caching allocator's bookkeeping, every
    /// launch recorded with its declared FLOPs and bytes, nothing executed) and print the peak
    /// memory and a per-kernel-family table of floors and estimates (memory, tensor, issue
    /// from the kernels' SASS, launch) on the --card.
    #[arg(long)]
    bench_plan: bool,
    /// With --bench-plan: the card whose rates price the plan (h100 or h200).
    #[arg(long, value_enum, default_value = "h100")]
    card: Card,
    /// Exactness of bf16 at the benchmarked size: one step's forward and backward with bf16
    /// activations against fp32 on the same device, weights and batch (no update); prints the
    /// loss, the gradient norm and the gradients' relative errors.
    #[arg(long, conflicts_with_all = ["bench", "bench_plan"])]
    compare_precisions: bool,
    /// With --bench-plan or --compare-precisions: also write the report as JSON to this file.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
    /// image's minimum and reports how many.
    #[arg(long, default_value = "error", value_name = "POLICY")]
    nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
}

fn parse_spacing(s: &str) -> Result<[f64; 3], String> {
    vox2vec::data::preprocess::parse_spacing(s).map_err(|e| e.to_string())
}

fn parse_xyz(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> =
        s.split(',').map(|t| t.trim().parse::<usize>().map_err(|e| format!("{t:?}: {e}"))).collect::<Result<_, _>>()?;
    <[usize; 3]>::try_from(v).map_err(|v| format!("expected X,Y,Z, got {} values", v.len()))
}

fn run(args: Args) -> anyhow::Result<()> {
    use vox2vec::commands::pretrain::{self as setup, ModelFlags};
    use vox2vec::dist::launch;
    use vox2vec::tensor::Device;
    vox2vec::cpu::retain_freed_memory();
    // RANK=0 WORLD_SIZE=1 still makes a one-rank group (its collectives run): the GPU
    // bundle's check of the NCCL path.
    let rank_env = launch::RankEnv::from_env()?;
    if rank_env.is_none() {
        let n = args.gpus.or(args.cpu_ranks).unwrap_or(1);
        if n > 1 {
            anyhow::ensure!(
                args.bench.is_none() && !args.bench_plan,
                "--bench times one device; run it without --gpus / --cpu-ranks"
            );
            if args.gpus.is_some() {
                launch::check_gpus(n)?;
            }
            eprintln!(
                "vox2vec-train: starting {n} ranks (processes) on this machine; rank 0 writes {}",
                args.out.display()
            );
            return launch::run_local_ranks(n, &std::env::args_os().skip(1).collect::<Vec<_>>());
        }
    }
    if args.bench_plan {
        let card = vox2vec::cuda::cost::card(args.card.name()).expect("every --card value has its rates");
        vox2vec::cuda::enable_plan_mode_for(card)?;
    }
    // The plan prices a CUDA device's work whatever --device says.
    let device_arg = if args.bench_plan { DeviceArg::Cuda(0) } else { args.device };
    let (device, precision) = device_arg.with_precision(args.precision)?;
    // A rank takes its own GPU (LOCAL_RANK), or the CPU with --cpu-ranks / --device cpu.
    let device = match &rank_env {
        Some(e) if args.cpu_ranks.is_none() && device != Device::Cpu => Device::Cuda(e.local_rank),
        Some(_) if args.cpu_ranks.is_some() => Device::Cpu,
        _ => device,
    };
    let mut comm = setup::communicator(rank_env.as_ref(), device)?;
    let lead = comm.rank() == 0;
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    let batch = setup::batch_shape(args.small, args.pairs, args.patch, args.voxels)?;
    let steps = args.steps.unwrap_or(if args.small { 150 } else { 100 });
    let resume = Resume::from_flags(args.resume_from.clone(), args.resume);
    let resumed = resume.checkpoint(&args.out);
    let flags = ModelFlags {
        base_channels: args.base_channels,
        num_scales: args.num_scales,
        proj_dim: args.proj_dim,
        temperature: args.temperature,
    };
    let model = setup::model_config(resumed.as_deref(), flags)?;
    model.validate()?;
    for (flag, lr) in [("--lr", args.lr), ("--probe-lr", args.probe_lr)] {
        anyhow::ensure!(lr.is_finite() && lr > 0.0 && lr <= 1.0, "{flag} must be in (0, 1], got {lr}");
    }
    anyhow::ensure!(
        args.probe_every >= 1 && args.probe_folds >= 1 && args.probe_batch >= 1,
        "--probe-every, --probe-folds and --probe-batch must be at least 1"
    );
    // A report printed, and written as JSON to --report when given.
    let emit = |what: &str, text: String, json: serde_json::Value| -> anyhow::Result<()> {
        print!("{text}");
        if let Some(path) = &args.report {
            vox2vec::checkpoint::write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
            eprintln!("{what}: report written to {}", path.display());
        }
        Ok(())
    };
    if args.bench_plan {
        let report = vox2vec::bench::plan_pretraining(model, precision, batch, args.seed)?;
        return emit("bench-plan", report.render(), report.to_json());
    }
    if args.compare_precisions {
        let report = vox2vec::bench::compare_precisions(device, model, batch, args.seed)?;
        return emit("compare-precisions", report.render(), report.to_json());
    }
    anyhow::ensure!(
        args.report.is_none() || args.bench_plan,
        "--report goes with --bench-plan or --compare-precisions"
    );
    let cpu_note = if device == Device::Cpu { setup::check_cpu_budget(batch, model.fpn)? } else { None };
    if let Some(steps) = args.bench {
        // 6 warm-up steps: a step graph's blocks settle within about five (`cuda::graph`).
        let report = vox2vec::bench::bench_pretraining(device, precision, batch, steps, 6, 2, args.seed)?;
        print!("{}", report.render());
        return Ok(());
    }
    let pre = PreprocessConfig { spacing: args.spacing, nonfinite: args.nonfinite, ..PreprocessConfig::default() };
    let sampler = SamplerConfig {
        pairs: batch.pairs,
        patch: batch.patch,
        max_voxels: batch.voxels_per_pair,
        ..Default::default()
    };
    let (data, mut data_sources) = if args.synthetic_pairs {
        (BatchSource::SyntheticPairs(batch), serde_json::json!({"synthetic_pairs": true}))
    } else {
        let source = match &args.data {
            None => setup::Volumes::Phantoms { seed: args.seed, count: args.phantoms },
            Some(input) => {
                setup::Volumes::Files { input, cache: &args.cache, skip_bad: args.skip_bad, exclude: &args.exclude }
            }
        };
        let (volumes, recorded) = source.open(batch.patch, &pre)?;
        (BatchSource::Volumes { volumes, sampler, workers: args.loader_workers }, recorded)
    };
    let validation = match &args.val_data {
        None => None,
        Some(input) => {
            let schedule = (args.val_every, args.val_batches, args.seed);
            let (v, recorded) = setup::validation(input, &args.cache, sampler, args.skip_bad, &pre, schedule)?;
            data_sources["validation"] = recorded;
            Some(v)
        }
    };
    let train_config = serde_json::json!({
        "pairs": batch.pairs, "patch": batch.patch, "voxels_per_pair": batch.voxels_per_pair, "steps": steps, "lr": args.lr,
        "seed": args.seed, "device": args.device.to_string(), "precision": args.precision.name(), "nonfinite": format!("{:?}", args.nonfinite),
        "probe_dataset": args.probe_dataset, "probe_every": args.probe_every, "val_data": args.val_data, "val_every": args.val_every,
        "base_channels": model.fpn.base_channels, "num_scales": model.fpn.num_scales,
    });
    let metadata = setup::run_metadata(args.spacing, batch.patch, &data_sources, &train_config);
    let online_probe = match &args.probe_dataset {
        None => None,
        Some(dir) => {
            let pre = PreprocessConfig { spacing: args.probe_spacing, nonfinite: args.nonfinite, ..Default::default() };
            let config = vox2vec::eval::segment::SegConfig {
                patch: args.probe_patch,
                batch: args.probe_batch,
                steps: args.probe_steps,
                lr: args.probe_lr,
                seed: args.seed,
                ..Default::default()
            };
            Some(setup::online_probe(dir, &pre, args.probe_folds, args.probe_every, config)?)
        }
    };
    let opts = TrainOptions {
        model,
        adam: AdamConfig { lr: args.lr, ..AdamConfig::default() },
        data,
        steps,
        seed: args.seed,
        out_dir: args.out.clone(),
        checkpoint_every: args.checkpoint_every,
        resume,
        online_probe,
        validation,
        dump_batches: args.dump_batches.clone(),
        device,
        activation_dtype: precision,
        skip_nonfinite: args.skip_nonfinite,
        inject_nan_steps: args.inject_nan_step.clone(),
        metadata,
    };
    if !lead {
        // The other ranks train quietly; rank 0 reports for the run.
        vox2vec::train::run_pretraining_ranked(&opts, &mut vox2vec::train::Silent, comm.as_mut())
            .with_context(|| format!("rank {}", comm.rank()))?;
        return Ok(());
    }
    let source = match (&args.data, args.synthetic_pairs) {
        (_, true) => "synthetic pairs".to_string(),
        (Some(d), _) => d.display().to_string(),
        (None, _) => format!("{} CT phantoms", args.phantoms),
    };
    let on = vox2vec::cuda::describe(device, precision)?;
    eprintln!("{}", setup::run_banner(&source, batch, model.fpn, &on, comm.as_ref(), &args.out));
    if let Some(note) = cpu_note {
        eprintln!("{note}");
    }
    let started = std::time::Instant::now();
    vox2vec::train::run_pretraining_ranked(&opts, &mut setup::Bar::new(steps)?, comm.as_mut())?;
    eprint!("{}", vox2vec::profile::report());
    if let Some(summary) = vox2vec::train::RunSummary::read(&args.out)? {
        println!("{}", summary.line(started.elapsed()));
    }
    let at = |f: &str| args.out.join(f).display().to_string();
    use vox2vec::train::{CHECKPOINT_FILE, LOSS_CURVE_FILE, METRICS_FILE};
    println!("wrote {}, {} and {}", at(CHECKPOINT_FILE), at(METRICS_FILE), at(LOSS_CURVE_FILE));
    Ok(())
}

fn main() -> ExitCode {
    vox2vec::train::stop_on_signal("vox2vec-train");
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
