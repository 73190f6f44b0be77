//! The pieces of `vox2vec-train` around the run loop (`train::run_pretraining`): the data
//! prepared and checked, the model configuration agreed with a resumed checkpoint, the CPU
//! memory check, held-out validation pairs, the online probe, the communicator of a
//! data-parallel rank, and the progress bar.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use crate::data::loader::{CachedVolumes, PhantomVolumes, VolumeSet};
use crate::data::preprocess::PreprocessConfig;
use crate::data::sampler::SamplerConfig;
use crate::data::sources::PrepareReport;
use crate::dist::Communicator;
use crate::model::{FpnConfig, ModelConfig};
use crate::tensor::Device;
use crate::train::{BatchShape, OnlineProbe, Progress, StepStats, Validation};

/// Preprocess (or find in the cache) every input file; report skipped files; fail when none
/// is usable or, unless `skip_bad`, when any file is bad.
pub fn prepare_data(
    input: &Path,
    cache: &Path,
    patch: [usize; 3],
    skip_bad: bool,
    pre: &PreprocessConfig,
    exclude: &[String],
) -> Result<PrepareReport> {
    let report = crate::data::sources::prepare_input_excluding(input, cache, pre, patch, exclude)?;
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

/// What a run's checkpoints record besides the model (`eval::recorded`): its preprocessing,
/// command line, data sources and configuration.
pub fn run_metadata(
    spacing: [f64; 3],
    patch: [usize; 3],
    data_sources: &serde_json::Value,
    train_config: &serde_json::Value,
) -> Vec<(String, String)> {
    use crate::eval::recorded;
    let mut metadata: Vec<(String, String)> =
        recorded::preprocessing_metadata(spacing, patch).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    metadata.push((recorded::COMMAND_LINE.to_string(), recorded::command_line()));
    metadata.push((recorded::DATA_SOURCES.to_string(), data_sources.to_string()));
    metadata.push((recorded::TRAIN_CONFIG.to_string(), train_config.to_string()));
    metadata
}

/// The first line of a run's output: its data, batch, model, device, ranks and output folder.
pub fn run_banner(
    source: &str,
    batch: BatchShape,
    fpn: FpnConfig,
    on: &str,
    comm: &dyn Communicator,
    out: &Path,
) -> String {
    let ranks = if comm.world() > 1 {
        format!(", rank 0 of {} ({} communicator)", comm.world(), comm.name())
    } else {
        String::new()
    };
    format!(
        "vox2vec-train: {source}, {} pairs of {:?}, {} voxels/pair, FPN3d base {} x {} scales, {on}{ranks}, out {}",
        batch.pairs,
        batch.patch,
        batch.voxels_per_pair,
        fpn.base_channels,
        fpn.num_scales,
        out.display()
    )
}

/// Where a run's volumes come from.
pub enum Volumes<'a> {
    /// Generated CT phantoms.
    Phantoms { seed: u64, count: usize },
    /// CT files (`prepare_data`), those whose path contains one of `exclude` left out.
    Files { input: &'a Path, cache: &'a Path, skip_bad: bool, exclude: &'a [String] },
}

impl Volumes<'_> {
    /// The volumes, and what the checkpoint records about them.
    pub fn open(&self, patch: [usize; 3], pre: &PreprocessConfig) -> Result<(Arc<dyn VolumeSet>, serde_json::Value)> {
        Ok(match *self {
            Volumes::Phantoms { seed, count } => {
                (Arc::new(PhantomVolumes::new(seed, count)), serde_json::json!({"phantoms": count, "seed": seed}))
            }
            Volumes::Files { input, cache, skip_bad, exclude } => {
                let report = prepare_data(input, cache, patch, skip_bad, pre, exclude)?;
                let recorded = serde_json::json!({"input": input, "volumes": report.sources.len(), "skipped": report.skipped.len(), "excluded": exclude, "files": report.sources});
                (Arc::new(CachedVolumes::new(report.entries, 4)), recorded)
            }
        })
    }
}

/// The batch of a run: the reference's, or with `small` 2 pairs of 32×32×16 with 64 voxels
/// each; each of `pairs`, `patch`, `voxels` replaces its part.
pub fn batch_shape(
    small: bool,
    pairs: Option<usize>,
    patch: Option<[usize; 3]>,
    voxels: Option<usize>,
) -> Result<BatchShape> {
    let mut batch =
        if small { BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 64 } } else { BatchShape::default() };
    batch.pairs = pairs.unwrap_or(batch.pairs);
    batch.patch = patch.unwrap_or(batch.patch);
    batch.voxels_per_pair = voxels.unwrap_or(batch.voxels_per_pair);
    anyhow::ensure!(batch.pairs >= 1 && batch.voxels_per_pair >= 1, "need at least one pair and one voxel per pair");
    anyhow::ensure!(batch.pairs * batch.voxels_per_pair >= 2, "InfoNCE needs at least 2 positive pairs per batch");
    crate::model::check_patch(batch.patch).context("--patch")?;
    Ok(batch)
}

/// Refuse a batch whose estimated CPU step does not fit in the memory available (it would
/// abort on a failed allocation), naming the figures and the way out; say what a large step
/// costs (the note returned). VOX2VEC_IGNORE_MEMORY_ESTIMATE=1 runs it anyway.
pub fn check_cpu_budget(batch: BatchShape, fpn: FpnConfig) -> Result<Option<String>> {
    let threads = rayon::current_num_threads();
    let e = crate::train::estimate_cpu_step(batch, fpn, threads);
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
    let Some(avail) = crate::train::available_memory_bytes() else { return Ok(note) };
    if e.bytes > avail && std::env::var_os("VOX2VEC_IGNORE_MEMORY_ESTIMATE").is_none_or(|v| v.is_empty() || v == "0") {
        let fixed = crate::train::CPU_FIXED_BYTES;
        let fits = ((avail - fixed) / ((e.bytes - fixed) / batch.pairs as f64)).floor().max(0.0) as usize;
        anyhow::bail!(
            "{what}, but this machine has {:.1} GiB available. Lower --pairs (about {fits} fit) or --patch, use --small, or train on a GPU (--device cuda); VOX2VEC_IGNORE_MEMORY_ESTIMATE=1 tries anyway",
            gib(avail)
        );
    }
    Ok(note)
}

/// The backbone and head sizes a run asks for (`None`: not given).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelFlags {
    pub base_channels: Option<usize>,
    pub num_scales: Option<usize>,
    pub proj_dim: Option<usize>,
    pub temperature: f64,
}

/// The model to train: a resumed checkpoint's configuration (any format `weights::read` takes:
/// our checkpoints, PyTorch .pt, Lightning .ckpt), which the flags must agree with; else the
/// flags, else the reference's.
pub fn model_config(resumed: Option<&Path>, flags: ModelFlags) -> Result<ModelConfig> {
    let ModelFlags { base_channels, num_scales, proj_dim, temperature } = flags;
    let Some(path) = resumed else {
        let fpn = FpnConfig {
            in_channels: 1,
            base_channels: base_channels.unwrap_or(16),
            num_scales: num_scales.unwrap_or(6),
        };
        return Ok(ModelConfig { fpn, proj_dim: proj_dim.unwrap_or(128), temperature });
    };
    use crate::weights::{Naming, read, resolve_backbone};
    let file = read(path, Naming::Model)?;
    let fpn = resolve_backbone(&file, base_channels, num_scales)?;
    let proj_dim = match (proj_dim, file.infer_proj_dim()) {
        (Some(a), Some(b)) if a != b => anyhow::bail!(
            "--proj-dim {a} contradicts {}: its projection head maps to {b}; leave --proj-dim out to use the file's",
            path.display()
        ),
        (a, b) => a.or(b).unwrap_or(128),
    };
    Ok(ModelConfig { fpn, proj_dim, temperature })
}

/// Fixed validation pairs from held-out CTs: `batches` batches of `sampler` drawn once from
/// `input` (the same whatever the training run does, resumed or not), checked every `every`
/// steps; with what the checkpoint records about them.
pub fn validation(
    input: &Path,
    cache: &Path,
    sampler: SamplerConfig,
    skip_bad: bool,
    pre: &PreprocessConfig,
    (every, batches, seed): (u64, usize, u64),
) -> Result<(Validation, serde_json::Value)> {
    anyhow::ensure!(every >= 1 && batches >= 1, "--val-every and --val-batches must be at least 1");
    let report = prepare_data(input, cache, sampler.patch, skip_bad, pre, &[])?;
    let vols = CachedVolumes::new(report.entries, 4);
    let fixed = (0..batches as u64)
        .map(|i| crate::data::loader::make_batch(&vols, &sampler, seed ^ 0x7A11_DA7A, i))
        .collect::<Result<Vec<_>>>()?;
    let recorded = serde_json::json!({"input": input, "files": report.sources, "batches": batches});
    Ok((Validation { batches: Arc::new(fixed), every }, recorded))
}

/// The online probe of a run: the nnU-Net dataset `dir` preprocessed at `pre`, every
/// `folds`-th case validating, a linear probe trained with `config` every `every` steps.
pub fn online_probe(
    dir: &Path,
    pre: &PreprocessConfig,
    folds: usize,
    every: u64,
    config: crate::eval::segment::SegConfig,
) -> Result<OnlineProbe> {
    let ds = crate::data::nnunet::load_dataset(dir, pre, &|c| eprintln!("online probe: preprocessing {c}"))?;
    let n = ds.cases.len();
    let folds = folds.max(2);
    let val: Vec<usize> = (0..n).filter(|i| i % folds == 0).collect();
    anyhow::ensure!(val.len() < n, "online probe: {} cases are too few to split", n);
    Ok(OnlineProbe { dataset: Arc::new(ds), val, every, config })
}

/// The communicator of this process: one rank alone, or (with a rank environment) TCP between
/// CPU ranks or NCCL between GPUs.
pub fn communicator(rank_env: Option<&crate::dist::launch::RankEnv>, device: Device) -> Result<Box<dyn Communicator>> {
    let Some(e) = rank_env else { return Ok(Box::new(crate::dist::Single)) };
    let timeout = crate::dist::timeout();
    Ok(match device {
        Device::Cpu => Box::new(
            crate::dist::tcp::TcpComm::connect(&e.master_addr, e.master_port, e.rank, e.world, b"", timeout)?.0,
        ),
        Device::Cuda(k) => Box::new(crate::dist::nccl::NcclComm::connect(
            &e.master_addr,
            e.master_port,
            e.rank,
            e.world,
            crate::cuda::device(k)?,
            timeout,
        )?),
    })
}

/// A run's progress on the terminal: a bar with rate and ETA, and a line per step.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(steps: u64) -> Result<Bar> {
        let bar = ProgressBar::new(steps);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
        )?);
        Ok(Bar { bar })
    }
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

#[cfg(test)]
mod tests {
    use super::batch_shape;

    #[test]
    fn batch_shape_defaults_and_refusals() {
        let s = batch_shape(true, None, None, None).unwrap();
        assert_eq!((s.pairs, s.patch, s.voxels_per_pair), (2, [32, 32, 16], 64));
        let r = batch_shape(false, Some(3), None, Some(8)).unwrap();
        assert_eq!((r.pairs, r.patch, r.voxels_per_pair), (3, [128, 128, 32], 8));
        assert!(batch_shape(true, Some(1), None, Some(1)).unwrap_err().to_string().contains("at least 2 positive"));
        assert!(batch_shape(true, Some(0), None, None).is_err());
        assert!(batch_shape(true, None, Some([2, 32, 16]), None).unwrap_err().to_string().contains("--patch"));
    }
}
