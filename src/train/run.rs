//! The pretraining run: settings, resuming, the step loop with its checkpoints, metrics,
//! validation and probes, and a clean stop on a signal.

use anyhow::Result;

use super::metrics::{append_metric, truncate_metrics, write_loss_curve};
use super::{
    BatchShape, CHECKPOINT_FILE, METRICS_FILE, OnlineProbe, StepStats, Validation, broadcast_slots, dump_batch,
    online_probe, pretrain_step_ranked, synthetic_batch, validate,
};
use crate::dist::Communicator;
use crate::model::Vox2Vec;
use crate::optim::Adam;
use crate::tensor::{DType, Device, Tensor};

/// Settings of a pretraining run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub model: crate::model::ModelConfig,
    pub adam: crate::optim::AdamConfig,
    pub data: BatchSource,
    pub steps: u64,
    pub seed: u64,
    /// Folder for `checkpoint.safetensors` and `metrics.jsonl`.
    pub out_dir: std::path::PathBuf,
    /// Write a checkpoint every this many steps (and always at the end); 0 = only at the end.
    pub checkpoint_every: u64,
    pub resume: Resume,
    /// Every `every` steps, a quick linear probe of the current backbone (logged with the loss).
    pub online_probe: Option<OnlineProbe>,
    /// Every `every` steps, the loss and learning signal on fixed pairs from held-out CTs.
    pub validation: Option<Validation>,
    /// Write every step's batch here (`dump_batch`), for the PyTorch trajectory check.
    pub dump_batches: Option<std::path::PathBuf>,
    /// Where the step runs.
    pub device: Device,
    /// Activation storage on a CUDA device (F32 or BF16).
    pub activation_dtype: DType,
    /// Steps with a non-finite loss or gradient norm to skip (logged) before stopping.
    pub skip_nonfinite: u64,
    /// Fault injection for tests: these steps' (1-based) batches get a NaN voxel.
    pub inject_nan_steps: Vec<u64>,
    /// Written into every checkpoint's metadata besides the step, seed and model: what made
    /// the run (`eval::recorded`: preprocessing, command line, data sources, configuration).
    pub metadata: Vec<(String, String)>,
}

/// Where a run's batches come from.
#[derive(Clone)]
pub enum BatchSource {
    /// `synthetic_batch`: smooth random blobs, no CT (tests, benchmarks).
    SyntheticPairs(BatchShape),
    /// Volumes (cached CTs or phantoms) through the sampler and a threaded loader.
    Volumes {
        volumes: std::sync::Arc<dyn crate::data::loader::VolumeSet>,
        sampler: crate::data::sampler::SamplerConfig,
        workers: usize,
    },
}

impl std::fmt::Debug for BatchSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSource::SyntheticPairs(s) => write!(f, "SyntheticPairs({s:?})"),
            BatchSource::Volumes { volumes, sampler, workers } => {
                write!(f, "Volumes({} volumes, {sampler:?}, {workers} workers)", volumes.len())
            }
        }
    }
}

/// Where a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Fresh initialisation from the seed.
    No,
    /// From `out_dir/checkpoint.safetensors`.
    Latest,
    /// From the given checkpoint.
    From(std::path::PathBuf),
}

impl Resume {
    /// `--resume-from FILE` (first) or `--resume`.
    pub fn from_flags(from: Option<std::path::PathBuf>, latest: bool) -> Resume {
        match (from, latest) {
            (Some(p), _) => Resume::From(p),
            (None, true) => Resume::Latest,
            (None, false) => Resume::No,
        }
    }

    /// The checkpoint a run in `out_dir` starts from, if any (`Latest` without one starts fresh).
    pub fn checkpoint(&self, out_dir: &std::path::Path) -> Option<std::path::PathBuf> {
        match self {
            Resume::From(p) => Some(p.clone()),
            Resume::Latest => Some(out_dir.join(CHECKPOINT_FILE)).filter(|p| p.exists()),
            Resume::No => None,
        }
    }
}

/// SIGINT / SIGTERM for a training program: the first finishes the current step, writes a
/// checkpoint and ends the run with an error (`STOP_REQUESTED`); a second exits at once (status
/// 130), the last checkpoint intact.
pub fn stop_on_signal(program: &'static str) {
    use std::sync::atomic::Ordering;
    let r = ctrlc::set_handler(move || {
        if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\n{program}: second signal, exiting now (the last checkpoint is intact)");
            std::process::exit(130);
        }
        eprintln!(
            "\n{program}: signal received: finishing this step and writing a checkpoint (send it again to exit at once)"
        );
    });
    if let Err(e) = r {
        eprintln!("{program}: warning: no signal handler ({e}); an interrupt ends the run without a checkpoint");
    }
}

/// Observer of a run's progress (the CLI draws a bar; tests ignore it).
pub trait Progress {
    fn start(&mut self, first_step: u64, total: u64);
    fn step(&mut self, step: u64, stats: &StepStats);
    fn message(&mut self, msg: &str);
    fn finish(&mut self);
}

pub struct Silent;
impl Progress for Silent {
    fn start(&mut self, _: u64, _: u64) {}
    fn step(&mut self, _: u64, _: &StepStats) {}
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Set (by `vox2vec-train`'s SIGINT/SIGTERM handler) to ask the training loop to stop after
/// the current step, write a checkpoint and return an error saying so.
pub static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pretrain on `opts.data` (volumes through the sampler and loader, or synthetic pairs):
/// steps `start..opts.steps`, where `start` is 0 or the resumed checkpoint's step. Batch `i`
/// depends only on (seed, i), so a resumed run continues exactly where the first stopped.
pub fn run_pretraining(opts: &TrainOptions, progress: &mut dyn Progress) -> Result<Vox2Vec> {
    run_pretraining_ranked(opts, progress, &mut crate::dist::Single)
}

/// `run_pretraining` as one rank of a data-parallel run (`dist`): batches drawn with
/// `dist::rank_seed`, every rank starting from rank 0's weights, gradients averaged every
/// step; rank 0 alone writes the checkpoint, metrics and pictures into `out_dir`, and a stop
/// signal on any rank stops all of them after the same step.
pub fn run_pretraining_ranked(
    opts: &TrainOptions,
    progress: &mut dyn Progress,
    comm: &mut dyn Communicator,
) -> Result<Vox2Vec> {
    use crate::checkpoint;
    use anyhow::{Context, bail};
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let data_seed = crate::dist::rank_seed(opts.seed, rank);

    let mut model = Vox2Vec::new(opts.model, opts.seed);
    let mut adam = Adam::new(opts.adam, &model.store);
    let ckpt_path = opts.out_dir.join(CHECKPOINT_FILE);
    let resume_path = match &opts.resume {
        Resume::No => None,
        Resume::Latest => Some(ckpt_path.clone()),
        Resume::From(p) => Some(p.clone()),
    };
    if let Some(path) = resume_path {
        let loaded = checkpoint::load(&path, &mut model.store, Some(&mut adam))?;
        if let Some(cfg) = loaded.metadata.get("model_config") {
            let want = checkpoint::config_to_json(&opts.model);
            let a: serde_json::Value =
                serde_json::from_str(cfg).with_context(|| format!("{}: bad model_config", path.display()))?;
            let b: serde_json::Value = serde_json::from_str(&want)?;
            if a != b {
                bail!("{}: checkpoint model {a} differs from the requested model {b}", path.display());
            }
        }
        // Resuming with another preprocessing would train one backbone on two kinds of input.
        for key in [crate::eval::recorded::SPACING, crate::eval::recorded::WINDOW] {
            let want = opts.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            if let (Some(had), Some(want)) = (loaded.metadata.get(key), want)
                && had != want
            {
                bail!(
                    "{}: checkpoint was trained with {key} {had}, this run asks for {want}; resume with the same setting or start a new run in another --out",
                    path.display()
                );
            }
        }
        // A published backbone alone (a PyTorch FPN3d state_dict, no step): pretraining goes on
        // from it with a new projection head, as the reference's head is discarded after training.
        let backbone_only = loaded.step.is_none()
            && !loaded.missing.is_empty()
            && loaded.missing.iter().all(|k| k.starts_with(crate::model::HEAD_PREFIX));
        if backbone_only {
            progress.message(&format!("initialised the backbone from {}; its projection head is not in the file and starts from random weights (seed {}), Adam from step 0", path.display(), opts.seed));
        } else if !loaded.missing.is_empty() {
            bail!(
                "{}: checkpoint lacks {} model tensors (first: {})",
                path.display(),
                loaded.missing.len(),
                loaded.missing[0]
            );
        } else if loaded.step.is_none() {
            progress.message(&format!(
                "initialised the model from {} (a file without optimiser state): Adam from step 0",
                path.display()
            ));
        } else {
            progress.message(&format!("resumed from {} at step {}", path.display(), adam.step));
        }
    }
    // Loaded on the host (checkpoints are host data), then moved.
    if opts.device != Device::Cpu {
        model.to_device(opts.device)?;
        adam.to_device(opts.device)?;
        model.activation_dtype = opts.activation_dtype;
    }
    if world > 1 {
        // Every rank resumes from the same step (the checkpoint must be on a file system all
        // ranks see) and holds rank 0's weights, as DDP broadcasts them at the start.
        let mut steps = [adam.step as f32];
        comm.all_reduce_sum(&mut steps).context("comparing the ranks' starting steps")?;
        if steps[0] != adam.step as f32 * world as f32 {
            bail!(
                "rank {rank} starts at step {} but the ranks' steps sum to {}: every rank must see the same checkpoint in {} (a shared file system) or none",
                adam.step,
                steps[0],
                opts.out_dir.display()
            );
        }
        broadcast_slots(&mut model, comm, |_| true).context("copying rank 0's weights to every rank")?;
    }
    let mut metrics = None;
    if lead {
        std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
        let stale = checkpoint::remove_stale_temp_files(&opts.out_dir)?;
        if stale > 0 {
            progress.message(&format!(
                "removed {stale} temporary file(s) left in {} by an interrupted run",
                opts.out_dir.display()
            ));
        }
        // The metrics of steps after the checkpoint (a run killed after its last checkpoint) are
        // dropped, so that no step appears twice once this run writes them again.
        truncate_metrics(&opts.out_dir.join(METRICS_FILE), adam.step)?;
        metrics = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(opts.out_dir.join(METRICS_FILE))
                .with_context(|| format!("opening {}", opts.out_dir.join(METRICS_FILE).display()))?,
        );
    }
    let start = adam.step;
    if let Some(dir) = opts.dump_batches.as_ref().filter(|_| lead) {
        // The weights the dumped batches start from (PyTorch state_dict keys and layouts).
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        checkpoint::save(
            &dir.join(format!("weights_step_{start:06}.safetensors")),
            &model.config,
            &model.store,
            Some(&adam),
            &[],
        )?;
    }
    let mut skipped = 0u64;
    progress.start(start, opts.steps);
    let mut meta: Vec<(&str, String)> = vec![("seed", opts.seed.to_string())];
    meta.extend(opts.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let save = |model: &Vox2Vec, adam: &Adam| {
        if lead { checkpoint::save(&ckpt_path, &model.config, &model.store, Some(adam), &meta) } else { Ok(()) }
    };
    let mut loader = match &opts.data {
        BatchSource::Volumes { volumes, sampler, workers } => {
            Some(crate::data::loader::Loader::new(volumes.clone(), *sampler, data_seed, start, *workers, 2 * workers)?)
        }
        BatchSource::SyntheticPairs(_) => None,
    };
    for step in start..opts.steps {
        let batch = match (&opts.data, loader.as_mut()) {
            (BatchSource::SyntheticPairs(shape), _) => synthetic_batch(*shape, data_seed, step),
            (_, Some(l)) => l.next_batch().with_context(|| format!("making batch {}", step + 1))?,
            _ => unreachable!("a volume source always has a loader"),
        };
        let mut batch = batch;
        if opts.inject_nan_steps.contains(&(step + 1)) {
            let mut x = batch.x1.to_f32_vec()?;
            x[0] = f32::NAN;
            batch.x1 = Tensor::from_f32(batch.x1.shape(), x);
        }
        if let Some(dir) = opts.dump_batches.as_ref().filter(|_| lead) {
            dump_batch(dir, step + 1, &batch)?;
        }
        let t0 = std::time::Instant::now();
        let stats =
            pretrain_step_ranked(&mut model, &mut adam, &batch, comm).with_context(|| format!("step {}", step + 1))?;
        if stats.finite() {
            let line = serde_json::json!({
                "step": step + 1,
                "loss": stats.loss,
                "grad_norm": stats.grad_norm,
                "top1": stats.signal.top1,
                "pos_sim": stats.signal.pos_sim,
                "neg_sim": stats.signal.neg_sim,
                "step_ms": t0.elapsed().as_secs_f64() * 1e3,
            });
            append_metric(&mut metrics, &opts.out_dir, &line)?;
            progress.step(step + 1, &stats);
        } else if skipped < opts.skip_nonfinite {
            skipped += 1;
            let why = format!("loss {} and gradient norm {}", stats.loss, stats.grad_norm);
            let line = serde_json::json!({"step": step + 1, "skipped": true, "reason": why});
            append_metric(&mut metrics, &opts.out_dir, &line)?;
            progress.message(&format!(
                "step {}: {why}: update skipped ({skipped} of --skip-nonfinite {})",
                step + 1,
                opts.skip_nonfinite
            ));
        } else {
            bail!(
                "step {}: the loss is {} and the gradient norm {}: the update was not applied and nothing was written; the last checkpoint ({}) is kept. {}Lower --lr, check the data, or pass --skip-nonfinite K to skip up to K such steps (VOX2VEC_CHECK_FINITE=1 names the first op that produced a non-finite value)",
                step + 1,
                stats.loss,
                stats.grad_norm,
                ckpt_path.display(),
                if skipped > 0 { format!("{skipped} earlier step(s) were skipped already. ") } else { String::new() }
            );
        }
        if let Some(v) = opts
            .validation
            .as_ref()
            .filter(|v| lead && v.every > 0 && ((step + 1) % v.every == 0 || step + 1 == opts.steps))
        {
            let (loss, sig) =
                validate(&mut model, &v.batches).with_context(|| format!("validation after step {}", step + 1))?;
            append_metric(
                &mut metrics,
                &opts.out_dir,
                &serde_json::json!({"step": step + 1, "val_loss": loss, "val_top1": sig.top1, "val_pos_sim": sig.pos_sim, "val_neg_sim": sig.neg_sim}),
            )?;
            progress.message(&format!(
                "step {:>6}  validation: loss {loss:.5}  top-1 {:.3}  similarity pos {:.3} neg {:.3}",
                step + 1,
                sig.top1,
                sig.pos_sim,
                sig.neg_sim
            ));
        }
        if let Some(p) = opts.online_probe.as_ref().filter(|p| lead && p.every > 0 && (step + 1) % p.every == 0) {
            // The probe runs where the backbone is (on a CUDA device: head, loss, Adam and
            // validation there too), reading the backbone without copying or changing it.
            let dice = online_probe(&mut model, p, step + 1)?;
            let mean = dice.iter().sum::<f64>() / dice.len().max(1) as f64;
            append_metric(
                &mut metrics,
                &opts.out_dir,
                &serde_json::json!({"step": step + 1, "probe_mean_dice": mean, "probe_dice": dice, "probe_classes": p.dataset.classes}),
            )?;
            progress.message(&format!("step {:>6}  online linear probe: mean Dice {mean:.4}", step + 1));
        }
        let mut stop = [f32::from(u8::from(STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)))];
        if world > 1 {
            // Any rank's signal stops every rank after this same step.
            comm.all_reduce_sum(&mut stop)?;
        }
        if stop[0] > 0.0 && step + 1 < opts.steps {
            drop(metrics);
            if world > 1 {
                broadcast_slots(&mut model, comm, |k| k == crate::params::SlotKind::RunningStat)?;
            }
            save(&model, &adam)?;
            if lead {
                write_loss_curve(&opts.out_dir)?;
            }
            bail!(
                "interrupted by a signal after step {}: checkpoint written to {}; continue with --resume",
                step + 1,
                ckpt_path.display()
            );
        }
        if opts.checkpoint_every > 0 && (step + 1) % opts.checkpoint_every == 0 && step + 1 < opts.steps {
            save(&model, &adam)?;
        }
    }
    if world > 1 {
        // Each rank's last forward moved its own running statistics: all end with rank 0's
        // (the checkpoint's), as they would at the next step.
        broadcast_slots(&mut model, comm, |k| k == crate::params::SlotKind::RunningStat)?;
    }
    save(&model, &adam)?;
    if lead {
        write_loss_curve(&opts.out_dir)?;
    }
    progress.finish();
    Ok(model)
}
