//! vox2vec pretraining on CT (a NIfTI file or folder, an nnU-Net raw dataset, a list of
//! paths) or, with no data, on generated CT phantoms, on a CUDA GPU when one is present
//! (`--device`) or on the CPU. `--bench N` times N steps at the reference size instead.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Arc;
use vox2vec::model::{FpnConfig, ModelConfig};
use vox2vec::optim::AdamConfig;

use vox2vec::data::loader::{CachedVolumes, PhantomVolumes, VolumeSet};
use vox2vec::data::preprocess::PreprocessConfig;
use vox2vec::data::sampler::SamplerConfig;
use vox2vec::train::{BatchShape, BatchSource, Progress, Resume, StepStats, TrainOptions};

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
    #[arg(long, default_value = "2,2,4")]
    probe_spacing: String,
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
    /// benches/trajectory.py, which trains PyTorch's reference step on the same batches.
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
    device: String,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 arithmetic and weights).
    #[arg(long, default_value = "fp32")]
    precision: String,
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
    #[arg(long, default_value = "h100", value_parser = ["h100", "h200"])]
    card: String,
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

/// Preprocess (or find in the cache) every input file; report skipped files; fail when none
/// is usable or, without --skip-bad, when any file is bad.
fn prepare_data(
    input: &std::path::Path,
    cache: &std::path::Path,
    patch: [usize; 3],
    skip_bad: bool,
    pre: &PreprocessConfig,
    exclude: &[String],
) -> anyhow::Result<vox2vec::data::sources::PrepareReport> {
    let report = vox2vec::data::sources::prepare_input_excluding(input, cache, pre, patch, exclude)?;
    eprintln!("data: {}", report.summary(cache));
    if !report.skipped.is_empty() && !skip_bad {
        anyhow::bail!(
            "{} of {} input files are unusable (listed above); fix them or pass --skip-bad",
            report.skipped.len(),
            report.files
        );
    }
    anyhow::ensure!(!report.entries.is_empty(), "no usable volume in {}", input.display());
    Ok(report)
}

fn parse_spacing(s: &str) -> Result<[f64; 3], String> {
    vox2vec::data::preprocess::parse_spacing(s).map_err(|e| e.to_string())
}

/// Refuse a batch whose estimated CPU step does not fit in the memory available (it would
/// abort on a failed allocation), naming the figures and the way out; say what a large step
/// costs (the note returned). VOX2VEC_IGNORE_MEMORY_ESTIMATE=1 runs it anyway.
fn check_cpu_budget(batch: BatchShape, fpn: FpnConfig) -> anyhow::Result<Option<String>> {
    let threads = rayon::current_num_threads();
    let e = vox2vec::train::estimate_cpu_step(batch, fpn, threads);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let what = format!(
        "a step of {} pairs of {:?} at base {} on the CPU needs about {:.1} GiB and {:.0} s on {threads} threads (estimated)",
        batch.pairs,
        batch.patch,
        fpn.base_channels,
        gib(e.bytes),
        e.seconds
    );
    let note = (e.seconds > 10.0).then(|| format!("note: {what}"));
    let Some(avail) = vox2vec::train::available_memory_bytes() else { return Ok(note) };
    if e.bytes > avail && std::env::var_os("VOX2VEC_IGNORE_MEMORY_ESTIMATE").is_none_or(|v| v.is_empty() || v == "0") {
        let fixed = vox2vec::train::CPU_FIXED_BYTES;
        let fits = ((avail - fixed) / ((e.bytes - fixed) / batch.pairs as f64)).floor().max(0.0) as usize;
        anyhow::bail!(
            "{what}, but this machine has {:.1} GiB available. Lower --pairs (about {fits} fit) or --patch, use --small, or train on a GPU (--device cuda); VOX2VEC_IGNORE_MEMORY_ESTIMATE=1 tries anyway",
            gib(avail)
        );
    }
    Ok(note)
}

fn parse_xyz(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> =
        s.split(',').map(|t| t.trim().parse::<usize>().map_err(|e| format!("{t:?}: {e}"))).collect::<Result<_, _>>()?;
    <[usize; 3]>::try_from(v).map_err(|v| format!("expected X,Y,Z, got {} values", v.len()))
}

struct Bar {
    bar: ProgressBar,
}

impl Progress for Bar {
    fn start(&mut self, first: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(first);
        self.bar.reset_eta();
    }
    fn step(&mut self, step: u64, s: &StepStats) {
        self.message(&format!("step {step:>6}  loss {:.5}  grad-norm {:.4}", s.loss, s.grad_norm));
        self.bar.set_message(format!("loss {:.4}", s.loss));
        self.bar.set_position(step);
    }
    fn message(&mut self, msg: &str) {
        // A hidden bar (stderr is not a terminal) swallows println: write the line directly.
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }
    fn finish(&mut self) {
        self.bar.finish();
    }
}

/// The model to train: a resumed checkpoint's configuration (any format `weights::read` takes:
/// our checkpoints, PyTorch .pt, Lightning .ckpt), which the flags must agree with; else the
/// flags, else the reference's.
fn model_config(args: &Args) -> anyhow::Result<ModelConfig> {
    let resumed = match (&args.resume_from, args.resume) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(args.out.join(vox2vec::train::CHECKPOINT_FILE)).filter(|p| p.exists()),
        (None, false) => None,
    };
    let Some(path) = resumed else {
        let fpn = FpnConfig {
            in_channels: 1,
            base_channels: args.base_channels.unwrap_or(16),
            num_scales: args.num_scales.unwrap_or(6),
        };
        return Ok(ModelConfig { fpn, proj_dim: args.proj_dim.unwrap_or(128), temperature: args.temperature });
    };
    use vox2vec::weights::{Naming, read, resolve_backbone};
    let file = read(&path, Naming::Model)?;
    let fpn = resolve_backbone(&file, args.base_channels, args.num_scales)?;
    let proj_dim = match (args.proj_dim, file.infer_proj_dim()) {
        (Some(a), Some(b)) if a != b => anyhow::bail!(
            "--proj-dim {a} contradicts {}: its projection head maps to {b}; leave --proj-dim out to use the file's",
            path.display()
        ),
        (a, b) => a.or(b).unwrap_or(128),
    };
    Ok(ModelConfig { fpn, proj_dim, temperature: args.temperature })
}

fn run(args: Args) -> anyhow::Result<()> {
    use vox2vec::dist::{Communicator, Single, launch};
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
                let have = vox2vec::cuda::device_count();
                anyhow::ensure!(
                    have >= n,
                    "--gpus {n}, but this machine has {have} CUDA device(s){}",
                    vox2vec::cuda::unavailable_reason().map(|r| format!(" ({r})")).unwrap_or_default()
                );
                if let Some(why) = vox2vec::dist::nccl::unavailable_reason() {
                    anyhow::bail!("--gpus {n}: {why}");
                }
            }
            eprintln!(
                "vox2vec-train: starting {n} ranks (processes) on this machine; rank 0 writes {}",
                args.out.display()
            );
            return launch::run_local_ranks(n, &std::env::args_os().skip(1).collect::<Vec<_>>());
        }
    }
    if args.bench_plan {
        let card = vox2vec::cuda::cost::card(&args.card)
            .ok_or_else(|| anyhow::anyhow!("--card {}: h100 or h200", args.card))?;
        vox2vec::cuda::enable_plan_mode_for(card)?;
    }
    let (device, precision) = vox2vec::cuda::parse_device_and_precision(
        if args.bench_plan { "cuda" } else { &args.device },
        &args.precision,
    )?;
    // A rank takes its own GPU (LOCAL_RANK), or the CPU with --cpu-ranks / --device cpu.
    let device = match &rank_env {
        Some(e) if args.cpu_ranks.is_none() && device != vox2vec::tensor::Device::Cpu => {
            vox2vec::tensor::Device::Cuda(e.local_rank)
        }
        Some(_) if args.cpu_ranks.is_some() => vox2vec::tensor::Device::Cpu,
        _ => device,
    };
    let mut comm: Box<dyn Communicator> = match &rank_env {
        None => Box::new(Single),
        Some(e) => {
            let timeout = vox2vec::dist::timeout();
            match device {
                vox2vec::tensor::Device::Cpu => Box::new(
                    vox2vec::dist::tcp::TcpComm::connect(&e.master_addr, e.master_port, e.rank, e.world, b"", timeout)?
                        .0,
                ),
                vox2vec::tensor::Device::Cuda(k) => Box::new(vox2vec::dist::nccl::NcclComm::connect(
                    &e.master_addr,
                    e.master_port,
                    e.rank,
                    e.world,
                    vox2vec::cuda::device(k)?,
                    timeout,
                )?),
            }
        }
    };
    let lead = comm.rank() == 0;
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
    }
    let mut batch = if args.small {
        BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 64 }
    } else {
        BatchShape::default()
    };
    if let Some(p) = args.pairs {
        batch.pairs = p;
    }
    if let Some(p) = args.patch {
        batch.patch = p;
    }
    if let Some(v) = args.voxels {
        batch.voxels_per_pair = v;
    }
    anyhow::ensure!(batch.pairs >= 1 && batch.voxels_per_pair >= 1, "need at least one pair and one voxel per pair");
    anyhow::ensure!(batch.pairs * batch.voxels_per_pair >= 2, "InfoNCE needs at least 2 positive pairs per batch");
    let steps = args.steps.unwrap_or(if args.small { 150 } else { 100 });
    let model = model_config(&args)?;
    model.validate()?;
    vox2vec::model::check_patch(batch.patch).context("--patch")?;
    anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0 && args.lr <= 1.0, "--lr must be in (0, 1], got {}", args.lr);
    anyhow::ensure!(
        args.probe_lr.is_finite() && args.probe_lr > 0.0 && args.probe_lr <= 1.0,
        "--probe-lr must be in (0, 1], got {}",
        args.probe_lr
    );
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
    let cpu_note = if device == vox2vec::tensor::Device::Cpu { check_cpu_budget(batch, model.fpn)? } else { None };
    if let Some(steps) = args.bench {
        // 6 warm-up steps: a step graph's blocks settle within about five (`cuda::graph`).
        let report = vox2vec::bench::bench_pretraining(device, precision, batch, steps, 6, 2, args.seed)?;
        print!("{}", report.render());
        return Ok(());
    }
    let pre = PreprocessConfig { spacing: args.spacing, nonfinite: args.nonfinite, ..PreprocessConfig::default() };
    let mut data_sources = serde_json::json!({"synthetic_pairs": true});
    let data = if args.synthetic_pairs {
        BatchSource::SyntheticPairs(batch)
    } else {
        let sampler = SamplerConfig {
            pairs: batch.pairs,
            patch: batch.patch,
            max_voxels: batch.voxels_per_pair,
            ..SamplerConfig::default()
        };
        let volumes: Arc<dyn VolumeSet> = match &args.data {
            None => {
                data_sources = serde_json::json!({"phantoms": args.phantoms, "seed": args.seed});
                Arc::new(PhantomVolumes::new(args.seed, args.phantoms))
            }
            Some(input) => {
                let report = prepare_data(input, &args.cache, batch.patch, args.skip_bad, &pre, &args.exclude)?;
                data_sources = serde_json::json!({"input": input, "volumes": report.sources.len(), "skipped": report.skipped.len(), "excluded": args.exclude, "files": report.sources});
                Arc::new(CachedVolumes::new(report.entries, 4))
            }
        };
        BatchSource::Volumes { volumes, sampler, workers: args.loader_workers }
    };
    let validation = match &args.val_data {
        None => None,
        Some(input) => {
            anyhow::ensure!(
                args.val_every >= 1 && args.val_batches >= 1,
                "--val-every and --val-batches must be at least 1"
            );
            let report = prepare_data(input, &args.cache, batch.patch, args.skip_bad, &pre, &[])?;
            let sampler = SamplerConfig {
                pairs: batch.pairs,
                patch: batch.patch,
                max_voxels: batch.voxels_per_pair,
                ..SamplerConfig::default()
            };
            let vols = CachedVolumes::new(report.entries, 4);
            // Fixed pairs: the same whatever the training run does, resumed or not.
            let batches = (0..args.val_batches as u64)
                .map(|i| vox2vec::data::loader::make_batch(&vols, &sampler, args.seed ^ 0x7A11_DA7A, i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            data_sources["validation"] =
                serde_json::json!({"input": input, "files": report.sources, "batches": args.val_batches});
            Some(vox2vec::train::Validation { batches: Arc::new(batches), every: args.val_every })
        }
    };
    use vox2vec::eval::recorded;
    let mut metadata: Vec<(String, String)> = recorded::preprocessing_metadata(args.spacing, batch.patch)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let train_config = serde_json::json!({
        "pairs": batch.pairs, "patch": batch.patch, "voxels_per_pair": batch.voxels_per_pair, "steps": steps, "lr": args.lr,
        "seed": args.seed, "device": args.device, "precision": args.precision, "nonfinite": format!("{:?}", args.nonfinite),
        "probe_dataset": args.probe_dataset, "probe_every": args.probe_every, "val_data": args.val_data, "val_every": args.val_every,
        "base_channels": model.fpn.base_channels, "num_scales": model.fpn.num_scales,
    });
    metadata.push((recorded::COMMAND_LINE.to_string(), recorded::command_line()));
    metadata.push((recorded::DATA_SOURCES.to_string(), data_sources.to_string()));
    metadata.push((recorded::TRAIN_CONFIG.to_string(), train_config.to_string()));
    let online_probe = match &args.probe_dataset {
        None => None,
        Some(dir) => {
            let sp: Vec<f64> = args
                .probe_spacing
                .split(',')
                .map(|t| t.trim().parse())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--probe-spacing: {e}"))?;
            anyhow::ensure!(sp.len() == 3 && sp.iter().all(|v| *v > 0.0), "--probe-spacing must be X,Y,Z in mm");
            let pre = PreprocessConfig {
                spacing: [sp[0], sp[1], sp[2]],
                nonfinite: args.nonfinite,
                ..PreprocessConfig::default()
            };
            let ds =
                vox2vec::eval::segment::load_dataset(dir, &pre, &|c| eprintln!("online probe: preprocessing {c}"))?;
            let n = ds.cases.len();
            let folds = args.probe_folds.max(2);
            let val: Vec<usize> = (0..n).filter(|i| i % folds == 0).collect();
            anyhow::ensure!(val.len() < n, "online probe: {} cases are too few to split", n);
            Some(vox2vec::train::OnlineProbe {
                dataset: Arc::new(ds),
                val,
                every: args.probe_every,
                config: vox2vec::eval::segment::SegConfig {
                    patch: args.probe_patch,
                    batch: args.probe_batch,
                    steps: args.probe_steps,
                    lr: args.probe_lr,
                    seed: args.seed,
                    ..Default::default()
                },
            })
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
        resume: match (&args.resume_from, args.resume) {
            (Some(p), _) => Resume::From(p.clone()),
            (None, true) => Resume::Latest,
            (None, false) => Resume::No,
        },
        online_probe,
        validation,
        dump_batches: args.dump_batches.clone(),
        device,
        activation_dtype: precision,
        skip_nonfinite: args.skip_nonfinite,
        inject_nan_steps: args.inject_nan_step.clone(),
        metadata,
    };
    let source = match (&args.data, args.synthetic_pairs) {
        (_, true) => "synthetic pairs".to_string(),
        (Some(d), _) => d.display().to_string(),
        (None, _) => format!("{} CT phantoms", args.phantoms),
    };
    let on = vox2vec::cuda::describe(device, precision)?;
    if !lead {
        // The other ranks train quietly; rank 0 reports for the run.
        vox2vec::train::run_pretraining_ranked(&opts, &mut vox2vec::train::Silent, comm.as_mut())
            .with_context(|| format!("rank {}", comm.rank()))?;
        return Ok(());
    }
    let ranks = if comm.world() > 1 {
        format!(", rank 0 of {} ({} communicator)", comm.world(), comm.name())
    } else {
        String::new()
    };
    eprintln!(
        "vox2vec-train: {source}, {} pairs of {:?}, {} voxels/pair, FPN3d base {} x {} scales, {on}{ranks}, out {}",
        batch.pairs,
        batch.patch,
        batch.voxels_per_pair,
        model.fpn.base_channels,
        model.fpn.num_scales,
        args.out.display()
    );
    if let Some(note) = cpu_note {
        eprintln!("{note}");
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}")?);
    let mut progress = Bar { bar };
    let started = std::time::Instant::now();
    vox2vec::train::run_pretraining_ranked(&opts, &mut progress, comm.as_mut())?;
    eprint!("{}", vox2vec::profile::report());
    if let Some(summary) = vox2vec::train::RunSummary::read(&args.out)? {
        println!("{}", summary.line(started.elapsed()));
    }
    let at = |f: &str| args.out.join(f).display().to_string();
    use vox2vec::train::{CHECKPOINT_FILE, LOSS_CURVE_FILE, METRICS_FILE};
    println!("wrote {}, {} and {}", at(CHECKPOINT_FILE), at(METRICS_FILE), at(LOSS_CURVE_FILE));
    Ok(())
}

/// SIGINT / SIGTERM: the first finishes the current step, writes a checkpoint and exits with
/// a message (status 1); a second exits at once (status 130), the last checkpoint intact.
fn install_signal_handler() {
    use std::sync::atomic::Ordering;
    let r = ctrlc::set_handler(|| {
        if vox2vec::train::STOP_REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nvox2vec-train: second signal, exiting now (the last checkpoint is intact)");
            std::process::exit(130);
        }
        eprintln!(
            "\nvox2vec-train: signal received: finishing this step and writing a checkpoint (send it again to exit at once)"
        );
    });
    if let Err(e) = r {
        eprintln!("vox2vec-train: warning: no signal handler ({e}); an interrupt ends the run without a checkpoint");
    }
}

fn main() -> ExitCode {
    install_signal_handler();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
