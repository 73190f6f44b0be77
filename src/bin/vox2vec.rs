//! vox2vec: tools around CT data and pretrained backbones: preprocess CT into the cache,
//! inspect a checkpoint, export the backbone as a bare FPN3d state_dict for PyTorch.
//! Embedding, probing, fine-tuning and prediction come with the evaluation work.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "vox2vec feature tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print what a weights file is (our checkpoint, a head, a PyTorch .pt / Lightning .ckpt, a
    /// bare state_dict), the model it holds (recorded or inferred), its metadata and tensors.
    Inspect {
        checkpoint: PathBuf,
        /// List every tensor.
        #[arg(long)]
        all: bool,
    },
    /// Write the backbone alone with bare FPN3d keys (loadable by PyTorch's FPN3d.load_state_dict).
    ExportBackbone { checkpoint: PathBuf, out: PathBuf },
    /// Write the backbone of any weights file as a bare FPN3d state_dict in safetensors: our
    /// checkpoints, PyTorch .pt/.pth (torch.save, zip or legacy), Lightning .ckpt (module
    /// prefixes such as backbone. or model.backbone. recognised), safetensors state_dicts.
    Convert { input: PathBuf, out: PathBuf },
    /// Backbone features of a CT (NIfTI or DICOM series: preprocessing, sliding window 128×128×32 with overlap
    /// 0.5 and the reference's central-region stitching; level_<i>.npy as [C, X, Y, Z] in the
    /// preprocessed grid, described by geometry.json) or of an already preprocessed patch
    /// (.npy float32 X×Y×Z: every level of the raw pyramid, eval mode, pyramid_<i>.npy).
    Embed {
        /// A NIfTI CT, a DICOM series (folder or DICOMDIR), a .npy patch, or several CTs: a folder (searched recursively), an
        /// nnU-Net dataset (its imagesTr) or a text file of paths; then each CT goes into
        /// <out>/<name>/, and the next CT is read while this one is embedded.
        input: PathBuf,
        /// Weights: a vox2vec-rs checkpoint, a bare FPN3d state_dict (safetensors or PyTorch
        /// .pt/.pth), or a Lightning .ckpt; the model's size comes from the file.
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        output: EmbedOutput,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Voxel similarity search: the embedding of one voxel of --query (every pyramid level at
    /// that voxel, concatenated and normalised) against every voxel of each --target. Writes
    /// per target <name>_similarity.nii.gz (cosine similarity on the target's own grid),
    /// <name>_match.png (slices through the query point and the best match, heat map over the
    /// CT) and matches.json (the best match in voxel and world coordinates).
    Similar {
        /// Weights (as for embed).
        #[arg(long)]
        weights: PathBuf,
        /// The CT the point is in (NIfTI, or a DICOM series folder).
        #[arg(long)]
        query: PathBuf,
        /// The query point: X,Y,Z voxel indices of the query file (0-based, the file's own
        /// axes, as nibabel or 3D Slicer's IJK show them), or world millimetres with --world.
        #[arg(long, allow_hyphen_values = true)]
        point: String,
        /// --point is in world coordinates (NIfTI's RAS, mm), not voxel indices.
        #[arg(long)]
        world: bool,
        /// CTs to search (NIfTI or DICOM series folders), one or more.
        #[arg(long, num_args = 1.., required = true)]
        target: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Linear or non-linear probing: train a head on the frozen backbone (eval-mode BatchNorm).
    Probe(SegArgs),
    /// Fine-tuning: head first, then backbone and head together after --unfreeze-after steps.
    Finetune {
        #[command(flatten)]
        seg: SegArgs,
        #[arg(long, default_value_t = 200)]
        unfreeze_after: u64,
    },
    /// The same network trained from scratch (random backbone, no --weights needed).
    Scratch(SegArgs),
    /// Segment a CT with a backbone and a trained head: a label map on the input's own grid.
    Predict {
        /// A NIfTI CT or DICOM series, or several: a folder, an nnU-Net dataset (its imagesTr) or a text file
        /// of paths; then --out is a folder of <name>.nii.gz masks (--probabilities <dir>/<name>/),
        /// and the next CT is read while this one is segmented.
        ct: PathBuf,
        #[arg(long)]
        backbone: PathBuf,
        #[arg(long)]
        head: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also write each class's probability (float32 NIfTI on the input's grid) into this folder.
        #[arg(long)]
        probabilities: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Inference speed: patches/s of the eval-mode pyramid (what `embed` and `predict` run per
    /// window) at each window batch and precision, with peak memory, on the chosen device;
    /// `--plan` prices the same passes on an H200 without a GPU (memory and per-kernel floor).
    BenchInfer {
        /// Weights (checkpoint or bare FPN3d) [default: a random backbone of --base-channels x --num-scales].
        #[arg(long)]
        weights: Option<PathBuf>,
        /// FPN3d base width [default: the weights', else 16].
        #[arg(long)]
        base_channels: Option<usize>,
        /// FPN3d scales [default: the weights', else 6].
        #[arg(long)]
        num_scales: Option<usize>,
        /// Window X,Y,Z.
        #[arg(long, default_value = "128,128,32")]
        patch: String,
        /// Windows per pass (sliding-window batch sizes), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batches: Vec<usize>,
        /// Activation storage, comma-separated (bf16 needs a CUDA device; skipped on the CPU).
        #[arg(long, value_delimiter = ',', default_value = "fp32,bf16")]
        precisions: Vec<String>,
        /// Timed passes per configuration (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Untimed passes first (they fill the device's allocator cache).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Compute device: auto, cpu, cuda, cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Run on the plan device instead (nothing executes): peak device memory and the floor
        /// of each configuration on an H200.
        #[arg(long)]
        plan: bool,
        /// Also write the results as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Preprocess CT into the cache (crop to body, resample to 1×1×2 mm, body mask):
    /// multi-threaded and resumable (finished entries are kept; a killed run continues).
    Preprocess {
        /// CTs: a NIfTI file, a DICOM series (a folder of its files, or its DICOMDIR), a folder
        /// of either (searched recursively), an nnU-Net raw dataset folder (imagesTr), or a
        /// text file of such paths, one per line.
        input: PathBuf,
        #[arg(long, default_value = "runs/cache")]
        cache: PathBuf,
        /// Keep going past unusable files (listed at the end); without it they make the exit code non-zero.
        #[arg(long)]
        skip_bad: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
        /// image's minimum and reports how many.
        #[arg(long, default_value = "error", value_name = "POLICY")]
        nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
    },
}

/// Backbone size (used when the weights carry no model_config), sliding-window patch and
/// resampling spacing (by default those the weights or head record: `eval::recorded`).
#[derive(clap::Args, Debug, Clone)]
struct NetArgs {
    /// FPN3d base width [default: the weights' (recorded, or inferred from their tensors), 16
    /// for a random backbone]; a value that contradicts the weights is an error.
    #[arg(long)]
    base_channels: Option<usize>,
    /// FPN3d scales [default: the weights', 6 for a random backbone].
    #[arg(long)]
    num_scales: Option<usize>,
    /// Sliding-window patch X,Y,Z [default: the one the head or weights record, else 128,128,32].
    #[arg(long)]
    patch: Option<String>,
    /// Resampling spacing in mm, X,Y,Z [default: the one the head or weights record, else 1,1,2].
    #[arg(long)]
    spacing: Option<String>,
    /// Use --spacing / --patch, and a backbone other than the head's, even where they
    /// contradict what the head or weights record.
    #[arg(long)]
    override_recorded: bool,
    /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
    /// image's minimum and reports how many.
    #[arg(long, default_value = "error", value_name = "POLICY")]
    nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
    /// Compute device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 weights and accumulation).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Sliding windows per forward pass (MONAI's sw_batch_size) [default: 8 on a CUDA device;
    /// on the CPU as many as make one 128×128×32 window's voxels, at most 8: 1 at the default
    /// patch]. More windows per pass use more memory, not more work.
    #[arg(long)]
    sw_batch: Option<usize>,
}

/// What `embed` writes for a CT.
#[derive(clap::Args, Debug, Clone)]
struct EmbedOutput {
    /// Pyramid levels to write for a CT.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    levels: Vec<usize>,
    /// File formats, comma-separated: npy (level_<i>.npy, [C, X, Y, Z]) and/or nifti
    /// (level_<i>.nii.gz, 4-D float32 with channels on the 4th axis and the grid's affine, for
    /// 3D Slicer, ITK-SNAP, nibabel).
    #[arg(long, value_delimiter = ',', default_value = "npy")]
    format: Vec<String>,
    /// Write float16 instead of float32 (.npy only: NIfTI has no float16 type).
    #[arg(long)]
    f16: bool,
    /// Combine windows with MONAI-style Gaussian weights instead of the reference's
    /// central regions.
    #[arg(long)]
    gaussian: bool,
    /// Also write each level resampled (nearest) onto the input file's own grid and axis
    /// order: level_<i>_original.npy [C, file X, file Y, file Z] / level_<i>_original.nii.gz
    /// with the input's affine.
    #[arg(long)]
    original_grid: bool,
    /// A picture of what the model learned: the first three principal components of the
    /// --rgb-level features inside the body as colours, rgb_level<L>.nii.gz (RGB) and
    /// rgb_level<L>.png (central axial, coronal and sagittal slices under the CT's own).
    #[arg(long)]
    rgb: bool,
    #[arg(long, default_value_t = 0)]
    rgb_level: usize,
}

impl EmbedOutput {
    fn npy(&self) -> bool {
        self.format.iter().any(|f| f == "npy")
    }
    fn nifti(&self) -> bool {
        self.format.iter().any(|f| f == "nifti")
    }
    fn check(&self) -> Result<()> {
        for f in &self.format {
            anyhow::ensure!(f == "npy" || f == "nifti", "--format {f:?}: npy or nifti (comma-separated for both)");
        }
        anyhow::ensure!(
            !(self.f16 && self.nifti()),
            "--f16 with --format nifti: NIfTI has no float16 type (nibabel and ITK cannot store one); write float32 NIfTI, or --f16 with --format npy"
        );
        Ok(())
    }
}

#[derive(clap::Args, Debug, Clone)]
struct SegArgs {
    /// nnU-Net raw dataset folder (imagesTr, labelsTr, dataset.json).
    dataset: PathBuf,
    /// Pretrained backbone (checkpoint or bare FPN3d); without it the backbone is random.
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value = "linear")]
    head: String,
    /// Output folder: results.json, head.safetensors (best), backbone.safetensors when trained.
    #[arg(long)]
    out: PathBuf,
    /// k-fold split: cases i with i % folds == fold validate (cases sorted by name).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 0)]
    fold: usize,
    /// Explicit validation cases (comma-separated names) instead of folds.
    #[arg(long, value_delimiter = ',')]
    val: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    #[arg(long, default_value_t = 7)]
    batch: usize,
    /// Training patch and validation window X,Y,Z [default: the patch --weights records, else 128,128,32].
    #[arg(long)]
    patch: Option<String>,
    /// Adam learning rate [default: 1e-2 for probe, which trains only the head (at the
    /// reference's 3e-4 a probe of 200 steps stays at Dice 0 on OpenKBP); 3e-4 for finetune
    /// and scratch].
    #[arg(long)]
    lr: Option<f64>,
    /// The reference's evaluation recipe (REFERENCE.md §5) where a flag does not say otherwise:
    /// lr 3e-4 for every mode, patch 128,128,32, spacing 1,1,2 (batch 7 is the default anyway).
    #[arg(long)]
    reference_recipe: bool,
    #[arg(long, default_value_t = 100)]
    validate_every: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// FPN3d base width [default: the weights' (recorded, or inferred from their tensors), 16
    /// for a random backbone]; a value that contradicts the weights is an error.
    #[arg(long)]
    base_channels: Option<usize>,
    /// FPN3d scales [default: the weights', 6 for a random backbone].
    #[arg(long)]
    num_scales: Option<usize>,
    /// Resampling spacing in mm (x,y,z) [default: the spacing --weights records, else the
    /// reference's 1,1,2]; coarser for quick CPU runs.
    #[arg(long)]
    spacing: Option<String>,
    /// Use --spacing / --patch even where they contradict what --weights records (finetune
    /// refuses that otherwise; probe warns).
    #[arg(long)]
    override_recorded: bool,
    /// Let the validation cases train too: for a dataset too small to split (one case). The
    /// validation Dice is then optimistic, and results.json says so.
    #[arg(long)]
    train_on_val: bool,
    /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
    /// image's minimum and reports how many.
    #[arg(long, default_value = "error", value_name = "POLICY")]
    nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
    /// Compute device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda, cuda:N.
    /// The backbone, the head, their Adam moments, the loss and validation all run there.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 weights, gradients of weights
    /// and Adam moments).
    #[arg(long, default_value = "fp32")]
    precision: String,
}

/// Move `model` to `device` with `precision` activations and print the first line of a
/// command's output: what runs where, as vox2vec-train's first line.
fn place_model(
    command: &str,
    what: &std::path::Path,
    model: &mut vox2vec::model::Vox2Vec,
    device: vox2vec::tensor::Device,
    precision: vox2vec::tensor::DType,
) -> Result<()> {
    if device != vox2vec::tensor::Device::Cpu {
        model.to_device(device)?;
        model.activation_dtype = precision;
    }
    let f = model.config.fpn;
    eprintln!(
        "vox2vec {command}: {}, FPN3d base {} x {} scales, {}",
        what.display(),
        f.base_channels,
        f.num_scales,
        vox2vec::cuda::describe(device, precision)?
    );
    Ok(())
}

/// The sliding-window patch where neither `--patch` nor the weights say another (the reference's
/// 128×128×32).
const DEFAULT_PATCH: [usize; 3] = [128, 128, 32];

impl NetArgs {
    /// The device and activation dtype asked for (bf16 on the CPU is refused, as by vox2vec-train).
    fn device(&self) -> Result<(vox2vec::tensor::Device, vox2vec::tensor::DType)> {
        vox2vec::cuda::parse_device_and_precision(&self.device, &self.precision)
    }

    /// Windows per forward pass on `device` for windows of `patch` voxels (--sw-batch, else 8 on
    /// a CUDA device; on the CPU as many windows as hold one `DEFAULT_PATCH` window's voxels, 1
    /// to 8: a pass of small windows keeps the coarse levels' volumes from being a few voxels
    /// each — one CT in 32×32×16 windows embeds in 2 min 13 s with 8 per pass against 3 min
    /// 32 s with 1 — and uses no more memory than one window of the default patch).
    fn sw_batch(&self, device: vox2vec::tensor::Device, patch: [usize; 3]) -> Result<usize> {
        let cpu_default =
            || (DEFAULT_PATCH.iter().product::<usize>() / patch.iter().product::<usize>().max(1)).clamp(1, 8);
        let k = self.sw_batch.unwrap_or_else(|| if device == vox2vec::tensor::Device::Cpu { cpu_default() } else { 8 });
        anyhow::ensure!((1..=1024).contains(&k), "--sw-batch must be between 1 and 1024, got {k}");
        Ok(k)
    }

    /// Move `model` to the device asked for and print the first line of the command's output
    /// (what runs where, as vox2vec-train's first line).
    fn place(
        &self,
        command: &str,
        what: &std::path::Path,
        model: &mut vox2vec::model::Vox2Vec,
    ) -> Result<vox2vec::tensor::Device> {
        let (device, precision) = self.device()?;
        place_model(command, what, model, device, precision)?;
        Ok(device)
    }

    /// Preprocessing and window for weights or a head that record `rec`: the flags, checked
    /// against the recorded settings (an error where they contradict, unless
    /// --override-recorded), else the recorded settings, else the reference's.
    fn settings(&self, rec: &Recorded) -> Result<(vox2vec::data::preprocess::PreprocessConfig, [usize; 3])> {
        let on = if self.override_recorded { OnContradiction::Override } else { OnContradiction::Error };
        let (spacing, patch) = resolve_settings(self.spacing.as_deref(), self.patch.as_deref(), rec, on)?;
        Ok((
            vox2vec::data::preprocess::PreprocessConfig { spacing, nonfinite: self.nonfinite, ..Default::default() },
            patch,
        ))
    }
}

/// Spacing and patch for a command that uses a file recording `rec`: each flag checked against
/// the recorded value per `on`, else the recorded value, else the reference's (with a note
/// when the file records neither, as files from before this version do).
fn resolve_settings(
    spacing: Option<&str>,
    patch: Option<&str>,
    rec: &Recorded,
    on: OnContradiction,
) -> Result<([f64; 3], [usize; 3])> {
    use vox2vec::eval::recorded::{choose, xyz};
    rec.check_window()?;
    let (sp, pa) = (spacing.map(parse_spacing).transpose()?, patch.map(parse_patch).transpose()?);
    let reference = vox2vec::data::preprocess::PreprocessConfig::default().spacing;
    let s = choose("spacing", "--spacing", sp, rec.spacing, &rec.file, reference, on, xyz)?;
    let p = choose("patch", "--patch", pa, rec.patch, &rec.file, DEFAULT_PATCH, on, xyz)?;
    if rec.spacing.is_none() && sp.is_none() && rec.is_a_file() {
        eprintln!(
            "note: {} records no spacing (a file from before vox2vec-rs recorded it, or from PyTorch); using {} mm",
            rec.file.display(),
            xyz(&s)
        );
    }
    Ok((s, p))
}

use vox2vec::eval::recorded::{OnContradiction, Recorded};

use vox2vec::data::preprocess::parse_spacing;

fn parse_patch(s: &str) -> Result<[usize; 3]> {
    let p: Vec<usize> = s
        .split(',')
        .map(|t| t.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("patch {s:?}"))?;
    anyhow::ensure!(p.len() == 3, "patch must be X,Y,Z, got {s:?}");
    let p = [p[0], p[1], p[2]];
    vox2vec::model::check_patch(p).with_context(|| format!("patch {s:?}"))?;
    Ok(p)
}

fn segment(a: &SegArgs, mode: vox2vec::eval::segment::Mode) -> Result<()> {
    use vox2vec::eval::recorded::{self as rec, backbone_fingerprint};
    use vox2vec::eval::segment::{Head, HeadKind, Mode, SegConfig, SegEvent, load_dataset, train_segmentation};
    use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
    let kind = match a.head.as_str() {
        "linear" => HeadKind::Linear,
        "nonlinear" | "non-linear" => HeadKind::NonLinear,
        h => anyhow::bail!("--head {h:?}: linear or nonlinear"),
    };
    let (device, precision) = vox2vec::cuda::parse_device_and_precision(&a.device, &a.precision)?;
    let (mut model, recorded) = match (&a.weights, mode) {
        (Some(w), _) => load_backbone(w, a.base_channels, a.num_scales)?,
        (None, Mode::Scratch) | (None, Mode::Probe) => {
            let cfg = ModelConfig {
                fpn: FpnConfig {
                    in_channels: 1,
                    base_channels: a.base_channels.unwrap_or(16),
                    num_scales: a.num_scales.unwrap_or(6),
                },
                ..ModelConfig::default()
            };
            cfg.validate()?;
            (Vox2Vec::new(cfg, a.seed), Recorded::nothing())
        }
        (None, Mode::FineTune { .. }) => {
            anyhow::bail!("finetune needs --weights (use `scratch` for a random backbone)")
        }
    };
    // A probe at a coarser grid than pretraining is a common shortcut (a warning); fine-tuning
    // at another grid than the backbone's is refused unless asked for.
    let on = match (a.override_recorded, mode) {
        (true, _) => OnContradiction::Override,
        (false, Mode::Probe) => OnContradiction::Warn,
        (false, _) => OnContradiction::Error,
    };
    let reference = a.reference_recipe;
    let spacing_flag = a.spacing.clone().or_else(|| reference.then(|| "1,1,2".to_string()));
    let patch_flag = a.patch.clone().or_else(|| reference.then(|| "128,128,32".to_string()));
    let (spacing, patch) = resolve_settings(spacing_flag.as_deref(), patch_flag.as_deref(), &recorded, on)?;
    let lr = a.lr.unwrap_or(if matches!(mode, Mode::Probe) && !reference { 1e-2 } else { 3e-4 });
    anyhow::ensure!(lr.is_finite() && lr > 0.0 && lr <= 1.0, "--lr must be in (0, 1], got {lr}");
    let bar = indicatif::ProgressBar::new_spinner();
    let pre = vox2vec::data::preprocess::PreprocessConfig { spacing, nonfinite: a.nonfinite, ..Default::default() };
    let ds = load_dataset(&a.dataset, &pre, &|c| bar.set_message(format!("preprocessing {c}")))?;
    bar.finish_and_clear();
    let k = ds.classes.len();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, c) in ds.cases.iter().enumerate() {
        let is_val = if a.val.is_empty() { i % a.folds.max(1) == a.fold } else { a.val.contains(&c.name) };
        if is_val {
            val.push(c)
        } else {
            train.push(c)
        }
        if is_val && a.train_on_val {
            train.push(c);
        }
    }
    if let Some(missing) = a.val.iter().find(|v| !ds.cases.iter().any(|c| &c.name == *v)) {
        anyhow::bail!(
            "--val {missing}: no such case in {} (cases: {})",
            a.dataset.display(),
            ds.cases.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if train.is_empty() || val.is_empty() {
        let n = ds.cases.len();
        let first = &ds.cases[0].name;
        if n == 1 {
            anyhow::bail!(
                "{} has 1 labelled case, too few to split into training and validation; pass --val {first} --train-on-val to validate on a case that also trains (an optimistic Dice, labelled so in results.json)",
                a.dataset.display()
            );
        }
        anyhow::bail!(
            "{}: the split gives {} training and {} validation cases of {n}; choose --folds at most {n} and --fold below it, or name validation cases with --val (or add --train-on-val to let them train too)",
            a.dataset.display(),
            train.len(),
            val.len()
        );
    }
    let optimistic = a.train_on_val;
    eprintln!(
        "{}: {} classes, {} training cases, {} validation cases ({}){}; spacing {} mm, patch {}",
        a.dataset.display(),
        k,
        train.len(),
        val.len(),
        val.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
        if optimistic { ", validation cases also train (optimistic Dice)" } else { "" },
        rec::xyz(&spacing),
        rec::xyz(&patch)
    );
    let command = match mode {
        Mode::Probe => "probe",
        Mode::FineTune { .. } => "finetune",
        Mode::Scratch => "scratch",
    };
    place_model(command, &a.dataset, &mut model, device, precision)?;
    let mut head_store = vox2vec::params::ParamStore::new();
    let head = Head::new(kind, &mut head_store, a.seed ^ 0x5eed, model.config.fpn, k);
    let cfg = SegConfig {
        patch,
        batch: a.batch,
        steps: a.steps,
        lr,
        validate_every: a.validate_every,
        seed: a.seed,
        ..SegConfig::default()
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bar = indicatif::ProgressBar::new(a.steps);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}")?);
    let head_path = a.out.join("head.safetensors");
    let backbone_path = a.out.join("backbone.safetensors");
    // What made these files (eval::recorded): predict, embed and finetune read it back.
    let train_config = serde_json::json!({
        "mode": format!("{mode:?}"), "head": a.head, "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
        "weights": a.weights, "train_on_val": optimistic, "device": vox2vec::cuda::describe(device, precision)?,
    });
    let data_sources = serde_json::json!({
        "dataset": a.dataset, "train_cases": train.iter().map(|c| &c.name).collect::<Vec<_>>(), "val_cases": val.iter().map(|c| &c.name).collect::<Vec<_>>(),
    });
    let mut made: Vec<(&str, String)> = rec::preprocessing_metadata(spacing, patch);
    made.extend([
        (rec::COMMAND_LINE, rec::command_line()),
        (rec::DATA_SOURCES, data_sources.to_string()),
        (rec::TRAIN_CONFIG, train_config.to_string()),
    ]);
    let mut head_meta = made.clone();
    head_meta.extend([
        ("head_kind", a.head.clone()),
        ("num_classes", k.to_string()),
        ("classes", serde_json::to_string(&ds.classes)?),
    ]);
    let trains_backbone = !matches!(mode, Mode::Probe);
    // A frozen backbone's fingerprint is the same at every save.
    let frozen_fingerprint = if trains_backbone { None } else { Some(backbone_fingerprint(&model.store)?) };
    let res = train_segmentation(
        &mut model,
        &head,
        &mut head_store,
        &train,
        &val,
        k,
        mode,
        &cfg,
        &|event| match event {
            SegEvent::Step { step, loss } => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}"));
            }
            SegEvent::Validating { case, index, cases, window, windows, .. } => {
                bar.set_message(format!("validating {case} ({}/{cases}): window {window}/{windows}", index + 1))
            }
        },
        &mut |m, hs| {
            let fp = match &frozen_fingerprint {
                Some(f) => f.clone(),
                None => backbone_fingerprint(&m.store)?,
            };
            let mut meta = head_meta.clone();
            meta.push((rec::BACKBONE_FINGERPRINT, fp));
            vox2vec::checkpoint::save(&head_path, &m.config, hs, None, &meta)?;
            if trains_backbone {
                vox2vec::checkpoint::save(&backbone_path, &m.config, &m.store, None, &made)?;
            }
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    let mean = res.best_dice.iter().sum::<f64>() / k as f64;
    println!(
        "best validation Dice at step {} (mean {mean:.4}){}:",
        res.best_step,
        if optimistic { ", on cases that also trained (optimistic)" } else { "" }
    );
    for (name, d) in ds.classes.iter().zip(&res.best_dice) {
        println!("  {name:<16} {d:.4}");
    }
    if mean < 0.01 && matches!(mode, Mode::Probe) {
        let what = if cfg.lr < 1e-2 {
            "a larger --lr (1e-2, the probe default: at 3e-4 a 200-step probe on OpenKBP stays at 0)"
        } else {
            "more --steps, or a pretrained backbone (--weights)"
        };
        println!(
            "hint: the mean Dice is near 0 after {} steps at --lr {}; a probe of a frozen backbone usually needs {what}; see README, Using the features",
            cfg.steps, cfg.lr
        );
    }
    let per_case = |dice: &[Vec<f64>]| -> serde_json::Value {
        val.iter()
            .zip(dice)
            .map(|(c, d)| (c.name.clone(), serde_json::json!(d)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let json = serde_json::json!({
        "mode": format!("{mode:?}"),
        "head": a.head,
        "weights": a.weights,
        "classes": ds.classes,
        "train_cases": train.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "val_cases": val.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "validation_cases_also_train": optimistic,
        "config": {"patch": cfg.patch, "batch": cfg.batch, "steps": cfg.steps, "lr": cfg.lr, "seed": cfg.seed, "spacing_mm": pre.spacing, "device": vox2vec::cuda::describe(device, precision)?, "backbone": {"base_channels": model.config.fpn.base_channels, "num_scales": model.config.fpn.num_scales}},
        "command_line": rec::command_line(),
        "best_step": res.best_step,
        "best_dice": res.best_dice,
        "best_mean_dice": mean,
        "best_dice_per_case": per_case(&res.best_per_case),
        "history": res.history.iter().zip(&res.history_per_case).map(|((s, d), pc)| serde_json::json!({"step": s, "dice": d, "dice_per_case": per_case(pc)})).collect::<Vec<_>>(),
        "losses": res.losses,
    });
    vox2vec::checkpoint::write_atomic(&a.out.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(())
}

fn predict(
    ct: &std::path::Path,
    backbone: &std::path::Path,
    head_path: &std::path::Path,
    out: &std::path::Path,
    probabilities: Option<&std::path::Path>,
    net: &NetArgs,
) -> Result<()> {
    use vox2vec::eval::segment::{Head, HeadKind, predict_case};
    several_inputs(ct)?;
    let (mut model, _) = load_backbone(backbone, net.base_channels, net.num_scales)?;
    net.device()?;
    // The head's kind and classes: what it records (heads of probe / finetune / scratch), else
    // what its tensors show (a PyTorch FPNLinearHead / FPNNonLinearHead state_dict); both must agree.
    let head_file = vox2vec::weights::read(head_path, vox2vec::weights::Naming::Literal)?;
    let inferred = head_file.infer_head();
    let recorded = Recorded::from_metadata(head_path, head_file.metadata.clone())?;
    let meta = &recorded.metadata;
    let kind = match (meta.get("head_kind").map(String::as_str), &inferred) {
        (Some("linear"), _) => HeadKind::Linear,
        (Some("nonlinear") | Some("non-linear"), _) => HeadKind::NonLinear,
        (None, Some((k, _))) => *k,
        (other, _) => anyhow::bail!(
            "{}: not a segmentation head (head kind {other:?}, and no layers.0.weight or final_block.weight); a head written by probe / finetune / scratch, or a PyTorch FPNLinearHead / FPNNonLinearHead state_dict, is needed",
            head_path.display()
        ),
    };
    let k: usize = match (meta.get("num_classes"), &inferred) {
        (Some(v), _) => {
            v.parse().with_context(|| format!("{}: metadata num_classes {v:?} is not a number", head_path.display()))?
        }
        (None, Some((_, k))) => *k,
        (None, None) => anyhow::bail!("{}: no num_classes", head_path.display()),
    };
    if let Some((ik, ic)) = inferred {
        anyhow::ensure!(
            ik == kind && ic == k,
            "{}: records a {kind:?} head of {k} classes, but its tensors are a {ik:?} head of {ic} classes",
            head_path.display()
        );
    }
    let kind_name = match kind {
        HeadKind::Linear => "linear",
        HeadKind::NonLinear => "non-linear",
    };
    check_head_backbone(&recorded, &model, backbone, net.override_recorded)?;
    let (pre, patch) = net.settings(&recorded)?;
    let mut hs = vox2vec::params::ParamStore::new();
    let head = Head::new(kind, &mut hs, 0, model.config.fpn, k);
    let loaded = vox2vec::checkpoint::load_file(head_file, &mut hs, None)?;
    anyhow::ensure!(loaded.missing.is_empty(), "{}: head tensors missing: {:?}", head_path.display(), loaded.missing);
    let device = net.place("predict", ct, &mut model)?;
    eprintln!(
        "predict: {kind_name} head, {k} classes, spacing {} mm, patch {}",
        vox2vec::eval::recorded::xyz(&pre.spacing),
        vox2vec::eval::recorded::xyz(&patch)
    );
    if device != vox2vec::tensor::Device::Cpu {
        hs.to_device(device)?;
    }
    let sw_batch = net.sw_batch(device, patch)?;
    let classes: Vec<String> =
        recorded.classes.clone().unwrap_or_else(|| (1..=k).map(|c| format!("class_{c}")).collect());
    let load = |f: &std::path::Path| -> Result<(vox2vec::data::nifti_io::Volume, vox2vec::data::cache::CachedCt)> {
        Ok((vox2vec::data::nifti_io::read_volume_with(f, net.nonfinite)?, vox2vec::data::cache::build(f, &pre)?))
    };
    let mut one = |vol: vox2vec::data::nifti_io::Volume,
                   e: vox2vec::data::cache::CachedCt,
                   out: &std::path::Path,
                   probabilities: Option<&std::path::Path>|
     -> Result<()> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "predicting {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}  {msg}",
        )?);
        bar.set_message(e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let probs =
            predict_case(&mut model, &head, &mut hs, &e.ct, &e.ct.body_mask(), patch, sw_batch, &|n, total| {
                bar.set_length(total as u64);
                bar.set_position(n as u64);
            })?;
        bar.finish_and_clear();
        // One label per voxel: the most probable class among those above 0.5.
        let labels: Vec<u8> = probs
            .chunks_exact(k)
            .map(|p| {
                p.iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0.5)
                    .fold((0u8, 0.5f32), |best, (c, &v)| if v > best.1 { (c as u8 + 1, v) } else { best })
                    .0
            })
            .collect();
        let on_source = vox2vec::data::preprocess::to_source_grid(&labels, &e.ct, 0u8);
        vox2vec::data::nifti_io::write_volume(out, &on_source, &vol.geometry)?;
        if let Some(dir) = probabilities {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (c, name) in classes.iter().enumerate().take(k) {
                let pc: Vec<f32> = probs.iter().skip(c).step_by(k).copied().collect();
                let file: String = name
                    .chars()
                    .map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' { ch } else { '_' })
                    .collect();
                vox2vec::data::nifti_io::write_volume(
                    &dir.join(format!("{file}.nii.gz")),
                    &vox2vec::data::preprocess::to_source_grid(&pc, &e.ct, 0.0f32),
                    &vol.geometry,
                )?;
            }
        }
        let counts: Vec<usize> = (1..=k).map(|c| on_source.iter().filter(|&&l| l as usize == c).count()).collect();
        println!(
            "wrote {} ({:?} voxels on the input grid; voxels per class {counts:?})",
            out.display(),
            vol.geometry.file_shape
        );
        Ok(())
    };
    let Some(files) = several_inputs(ct)? else {
        let (vol, e) = load(ct)?;
        return one(vol, e, out, probabilities);
    };
    // Several CTs: --out is a folder of <name>.nii.gz masks (probabilities in <dir>/<name>/),
    // and the next CT is read and preprocessed while this one is segmented.
    anyhow::ensure!(
        !vox2vec::data::sources::is_nifti(out),
        "{} holds several CTs: --out must be a folder for their masks, not {}",
        ct.display(),
        out.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("predict: {} CTs from {}, masks into {}/<name>.nii.gz", files.len(), ct.display(), out.display());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    vox2vec::eval::prefetch::pipelined(
        &paths,
        |f| load(f),
        |f, (vol, e)| {
            let name = &files.iter().find(|(p, _)| p == f).expect("one of the inputs").1;
            one(vol, e, &out.join(format!("{name}.nii.gz")), probabilities.map(|d| d.join(name)).as_deref())
        },
    )
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Embed { input, weights, out, output, net } => embed(&input, &weights, &out, &output, &net)?,
        Cmd::Similar { weights, query, point, world, target, out, net } => {
            similar(&weights, &query, &point, world, &target, &out, &net)?
        }
        Cmd::Probe(a) => segment(&a, vox2vec::eval::segment::Mode::Probe)?,
        Cmd::Finetune { seg, unfreeze_after } => {
            segment(&seg, vox2vec::eval::segment::Mode::FineTune { unfreeze_after })?
        }
        Cmd::Scratch(a) => segment(&a, vox2vec::eval::segment::Mode::Scratch)?,
        Cmd::Predict { ct, backbone, head, out, probabilities, net } => {
            predict(&ct, &backbone, &head, &out, probabilities.as_deref(), &net)?
        }
        Cmd::BenchInfer {
            weights,
            base_channels,
            num_scales,
            patch,
            batches,
            precisions,
            iters,
            warmup,
            device,
            plan,
            report,
        } => bench_infer(
            weights.as_deref(),
            base_channels,
            num_scales,
            &patch,
            &batches,
            &precisions,
            iters,
            warmup,
            &device,
            plan,
            report.as_deref(),
        )?,
        Cmd::Preprocess { input, cache, skip_bad, threads, nonfinite } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
            }
            preprocess(&input, &cache, skip_bad, nonfinite)?;
        }
        Cmd::Inspect { checkpoint, all } => inspect(&checkpoint, all)?,
        Cmd::ExportBackbone { checkpoint, out } => convert(&checkpoint, &out)?,
        Cmd::Convert { input, out } => convert(&input, &out)?,
    }
    Ok(())
}

/// `inspect`: what a weights file is (container, Lightning, module prefixes), the model it
/// holds (recorded or inferred), its metadata, and its tensors by group.
fn inspect(path: &std::path::Path, all: bool) -> Result<()> {
    use vox2vec::weights::{ConfigSource, Naming, Values, read};
    // A segmentation head's file (probe / finetune / scratch) has bare keys that are all the
    // head's; elsewhere bare keys are a PyTorch FPN3d's.
    let literal = read(path, Naming::Literal)?;
    let is_head = literal.metadata.contains_key("head_kind");
    let file = if is_head { literal } else { literal.renamed(Naming::Model)? };
    println!("file: {}", file.describe());
    if !is_head {
        match file.backbone_config()? {
            Some((f, source)) => println!(
                "model: FPN3d in {} base {} x {} scales{} ({})",
                f.in_channels,
                f.base_channels,
                f.num_scales,
                file.infer_proj_dim().map(|p| format!(", projection head to {p}")).unwrap_or_default(),
                if source == ConfigSource::Recorded { "recorded in the metadata" } else { "inferred from the tensors" }
            ),
            None => println!("model: no FPN3d backbone (no first_conv.weight)"),
        }
    }
    let mut keys: Vec<_> = file.metadata.keys().collect();
    keys.sort();
    for k in keys {
        println!("{k}: {}", metadata_line(k, &file.metadata[k], all));
    }
    let mut entries: Vec<&vox2vec::weights::Entry> = file.entries.iter().collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for e in entries {
        let group = if e.name.starts_with("optim.") {
            "optim"
        } else if e.name.starts_with(vox2vec::model::HEAD_PREFIX) || is_head {
            "head"
        } else {
            "backbone"
        };
        let g = groups.entry(group).or_default();
        g.0 += 1;
        g.1 += e.shape.iter().product::<usize>();
        if all {
            let dtype = if matches!(e.values, Values::I64(_)) { "int" } else { "float" };
            let renamed =
                if e.name != e.source_name { format!("  (in the file: {})", e.source_name) } else { String::new() };
            println!("  {} {dtype} {:?}{renamed}", e.name, e.shape);
        }
    }
    for (g, (n, v)) in groups {
        println!("{g}: {n} tensors, {v} values");
    }
    if !file.ignored.is_empty() {
        println!(
            "left out: {} tensors outside the model{}",
            file.ignored.len(),
            if all { format!(": {}", file.ignored.join(", ")) } else { " (--all lists them)".to_string() }
        );
    }
    Ok(())
}

/// `convert` and `export-backbone`: the backbone of any weights file `weights::read` takes,
/// written as a bare FPN3d state_dict in safetensors (PyTorch's key names and layouts, loadable
/// by `FPN3d.load_state_dict`), with the model configuration and the source's recorded
/// settings in the metadata.
fn convert(input: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    use vox2vec::weights::{Naming, Values, read, resolve_backbone};
    let file = read(input, Naming::Model)?;
    let fpn = resolve_backbone(&file, None, None)?;
    let backbone: Vec<(String, &vox2vec::weights::Entry)> = file
        .entries
        .iter()
        .filter_map(|e| e.name.strip_prefix(vox2vec::model::BACKBONE_PREFIX).map(|k| (k.to_string(), e)))
        .collect();
    anyhow::ensure!(!backbone.is_empty(), "{}: no backbone tensors", input.display());
    // Check the tensors against the model they claim to be before writing anything.
    let cfg = file.model_config(fpn);
    cfg.validate().with_context(|| format!("{}: model configuration", input.display()))?;
    let mut model = vox2vec::model::Vox2Vec::new(cfg, 0);
    vox2vec::checkpoint::load_file(file.clone(), &mut model.store, None)?;
    let mut views = Vec::with_capacity(backbone.len());
    for (k, e) in &backbone {
        let view = match &e.values {
            Values::F32(v) => TensorView::new(Dtype::F32, e.shape.clone(), bytemuck::cast_slice(v)),
            Values::I64(v) => TensorView::new(Dtype::I64, e.shape.clone(), bytemuck::cast_slice(v)),
        }?;
        views.push((k.clone(), view));
    }
    let mut meta: std::collections::HashMap<String, String> = file
        .metadata
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "format"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("model_config".into(), vox2vec::checkpoint::config_to_json(&model.config));
    meta.insert("converted_from".into(), format!("{} ({})", input.display(), file.describe()));
    let n = views.len();
    let bytes = safetensors::serialize(views, Some(meta))?;
    vox2vec::checkpoint::write_atomic(out, &bytes)?;
    println!(
        "wrote {n} backbone tensors (FPN3d base {} x {} scales) to {}",
        fpn.base_channels,
        fpn.num_scales,
        out.display()
    );
    Ok(())
}

/// A metadata value as `inspect` prints it: long file lists (a pretraining run's data
/// sources) cut to their first entries unless --all.
fn metadata_line(key: &str, value: &str, all: bool) -> String {
    const SHOWN: usize = 3;
    if all || key != vox2vec::eval::recorded::DATA_SOURCES {
        return value.to_string();
    }
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(value) else { return value.to_string() };
    for list in ["files", "train_cases"] {
        if let Some(files) = v.get_mut(list).and_then(|f| f.as_array_mut())
            && files.len() > SHOWN
        {
            let more = files.len() - SHOWN;
            files.truncate(SHOWN);
            files.push(serde_json::json!(format!("... {more} more (--all lists them)")));
        }
    }
    v.to_string()
}

/// The backbone described by (and loaded from) `weights` (any format `weights::read` takes:
/// our checkpoints, bare FPN3d state_dicts, PyTorch .pt/.pth, Lightning .ckpt), and what the
/// file records. The configuration is the file's (recorded, else inferred from its tensors);
/// `--base-channels` / `--num-scales` must agree with it.
fn load_backbone(
    weights: &std::path::Path,
    base: Option<usize>,
    scales: Option<usize>,
) -> Result<(vox2vec::model::Vox2Vec, Recorded)> {
    use vox2vec::model::Vox2Vec;
    use vox2vec::weights::{Naming, read, resolve_backbone};
    let file = read(weights, Naming::Model)?;
    let fpn = resolve_backbone(&file, base, scales)?;
    let cfg = file.model_config(fpn);
    cfg.validate().with_context(|| format!("{}: model configuration", weights.display()))?;
    if file.container != vox2vec::weights::Container::Safetensors
        || !file.ignored.is_empty()
        || file.renamed.iter().any(|(from, _)| !from.is_empty())
    {
        eprintln!(
            "note: {}: {}; FPN3d base {} x {} scales",
            weights.display(),
            file.describe(),
            fpn.base_channels,
            fpn.num_scales
        );
    }
    let mut model = Vox2Vec::new(cfg, 0);
    let loaded = vox2vec::checkpoint::load_file(file, &mut model.store, None)?;
    let missing: Vec<&String> =
        loaded.missing.iter().filter(|k| k.starts_with(vox2vec::model::BACKBONE_PREFIX)).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{}: {} backbone tensors missing (first: {})",
        weights.display(),
        missing.len(),
        missing[0]
    );
    let recorded = Recorded::from_metadata(weights, loaded.metadata)?;
    Ok((model, recorded))
}

/// A head only works on the backbone it was trained on: the same configuration (always
/// checked) and the same weights (the fingerprint the head records; `--override-recorded`
/// lets another backbone through, with a note).
fn check_head_backbone(
    head: &Recorded,
    model: &vox2vec::model::Vox2Vec,
    backbone: &std::path::Path,
    allow_other: bool,
) -> Result<()> {
    let (h, b) = (head.file.display(), backbone.display());
    if let Some(mc) = head.metadata.get("model_config") {
        let v: serde_json::Value = serde_json::from_str(mc).with_context(|| format!("{h}: bad model_config"))?;
        let f = model.config.fpn;
        let theirs = (v["base_channels"].as_u64(), v["num_scales"].as_u64());
        anyhow::ensure!(
            theirs == (Some(f.base_channels as u64), Some(f.num_scales as u64)),
            "{h} was trained on a backbone of base {} x {} scales, but {b} is base {} x {} scales",
            v["base_channels"],
            v["num_scales"],
            f.base_channels,
            f.num_scales
        );
    }
    if let Some(want) = &head.backbone_fingerprint {
        let have = vox2vec::eval::recorded::backbone_fingerprint(&model.store)?;
        if &have != want {
            anyhow::ensure!(
                allow_other,
                "{h} was trained on another backbone than {b} (fingerprints {want} and {have}): its labels would be meaningless. Pass the backbone it was trained with (for finetune and scratch, the backbone.safetensors written beside the head), or --override-recorded"
            );
            eprintln!("note: {b} is not the backbone {h} was trained on (--override-recorded)");
        }
    }
    Ok(())
}

/// What `embed` writes and how: outputs, blending, windows per pass, window.
struct EmbedOptions<'a> {
    output: &'a EmbedOutput,
    blend: vox2vec::eval::embed::Blend,
    sw_batch: usize,
    patch: [usize; 3],
}

/// The CTs of a command's input: `None` for one CT (a NIfTI, a .npy, a DICOM series), else every CT of a
/// folder, an nnU-Net dataset or a list file (`data::sources::discover`), each with the
/// name its outputs take (the file name without .nii / .nii.gz; two inputs of one name are
/// an error naming both).
fn several_inputs(input: &std::path::Path) -> Result<Option<Vec<(PathBuf, String)>>> {
    // One CT: a NIfTI, a .npy patch, or a DICOM series (its folder, or a DICOMDIR).
    let single = (input.is_file()
        && (vox2vec::data::sources::is_nifti(input) || input.extension().is_some_and(|e| e == "npy")))
        || vox2vec::data::dicom::is_dicom_input(input);
    if single || !input.exists() {
        anyhow::ensure!(input.exists(), "{}: no such file or folder", input.display());
        return Ok(None);
    }
    let files = vox2vec::data::sources::discover(input)?;
    let mut named: Vec<(PathBuf, String)> = Vec::with_capacity(files.len());
    for f in files {
        let file = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let name = file.strip_suffix(".nii.gz").or_else(|| file.strip_suffix(".nii")).unwrap_or(&file).to_string();
        if let Some((other, _)) = named.iter().find(|(_, n)| *n == name) {
            anyhow::bail!(
                "{} and {} would both write outputs named {name:?}; embed or predict them separately",
                other.display(),
                f.display()
            );
        }
        named.push((f, name));
    }
    Ok(Some(named))
}

/// `embed_into`, with no partial output left behind: an output folder that this run created is
/// removed again when the run fails (for several CTs, only the failing CT's folder, and the
/// output folder when nothing was completed in it).
fn embed(
    input: &std::path::Path,
    weights: &std::path::Path,
    out: &std::path::Path,
    output: &EmbedOutput,
    net: &NetArgs,
) -> Result<()> {
    output.check()?;
    let several = several_inputs(input)?.is_some();
    let created = !out.exists();
    let r = embed_into(input, weights, out, output, net);
    if r.is_err() && created {
        let _ = if several { std::fs::remove_dir(out) } else { std::fs::remove_dir_all(out) };
    }
    r
}

fn embed_into(
    input: &std::path::Path,
    weights: &std::path::Path,
    out: &std::path::Path,
    output: &EmbedOutput,
    net: &NetArgs,
) -> Result<()> {
    use vox2vec::eval::{embed, npy};
    let inputs = several_inputs(input)?;
    let (mut model, recorded) = load_backbone(weights, net.base_channels, net.num_scales)?;
    let device = net.place("embed", input, &mut model)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if input.extension().is_some_and(|e| e == "npy") {
        let (shape, x) = npy::read_f32(input)?;
        anyhow::ensure!(shape.len() == 3, "{}: expected an X×Y×Z array, found shape {shape:?}", input.display());
        let pyr = embed::patch_pyramid(&mut model, &x, [shape[0], shape[1], shape[2]])?;
        for (i, (s, v)) in pyr.iter().enumerate() {
            let path = out.join(format!("pyramid_{i}.npy"));
            if output.f16 { npy::write_f16(&path, s, v)? } else { npy::write_f32(&path, s, v)? }
        }
        println!("wrote {} pyramid levels to {}", pyr.len(), out.display());
        return Ok(());
    }
    let (pre, patch) = net.settings(&recorded)?;
    let sw_batch = net.sw_batch(device, patch)?;
    let blend = if output.gaussian { embed::Blend::Gaussian } else { embed::Blend::Central };
    let opts = EmbedOptions { output, blend, sw_batch, patch };
    let load =
        |f: &std::path::Path| -> Result<(vox2vec::data::cache::CachedCt, Option<vox2vec::data::nifti_io::Volume>)> {
            let e = vox2vec::data::cache::build(f, &pre)?;
            let source = if output.original_grid {
                Some(vox2vec::data::nifti_io::read_volume_with(f, net.nonfinite)?)
            } else {
                None
            };
            Ok((e, source))
        };
    let Some(files) = inputs else {
        let (e, source) = load(input)?;
        return embed_ct(&mut model, &e, source.as_ref(), out, &opts);
    };
    // Several CTs: the next one is read and preprocessed while this one is embedded.
    eprintln!("embed: {} CTs from {}, each into {}/<name>/", files.len(), input.display(), out.display());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let mut done = 0;
    vox2vec::eval::prefetch::pipelined(
        &paths,
        |f| load(f),
        |f, (e, source)| {
            let name = &files.iter().find(|(p, _)| p == f).expect("one of the inputs").1;
            let dir = out.join(name);
            let created = !dir.exists();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let r = embed_ct(&mut model, &e, source.as_ref(), &dir, &opts);
            if r.is_err() && created {
                let _ = std::fs::remove_dir_all(&dir);
            }
            done += 1;
            r
        },
    )?;
    println!("embedded {done} CTs into {}", out.display());
    Ok(())
}

/// Embed one preprocessed CT into the folder `out`: level_<i>.npy / .nii.gz (and
/// level_<i>_original.* on the source grid when `source` is given), the PCA picture with
/// --rgb, and geometry.json.
fn embed_ct(
    model: &mut vox2vec::model::Vox2Vec,
    e: &vox2vec::data::cache::CachedCt,
    source: Option<&vox2vec::data::nifti_io::Volume>,
    out: &std::path::Path,
    o: &EmbedOptions,
) -> Result<()> {
    use vox2vec::data::nifti_io::{write_features, write_features_channels_first};
    use vox2vec::eval::{embed, npy};
    let oo = o.output;
    let write_npy = |path: &std::path::Path, shape: &[usize], v: &[f32]| {
        if oo.f16 { npy::write_f16(path, shape, v) } else { npy::write_f32(path, shape, v) }
    };
    let ct = &e.ct;
    let x = embed::scale_hu(&ct.hu);
    let mut levels: Vec<usize> = oo.levels.clone();
    if oo.rgb && !levels.contains(&oo.rgb_level) {
        levels.push(oo.rgb_level);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "embedding {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}  {msg}",
    )?);
    bar.set_message(e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let maps = embed::embed_volume(model, &x, ct.shape, o.patch, &levels, o.blend, o.sw_batch, &|n, total| {
        bar.set_length(total as u64);
        bar.set_position(n as u64);
    })?;
    bar.finish_and_clear();
    for m in maps.iter().filter(|m| oo.levels.contains(&m.level)) {
        let [sx, sy, sz] = m.shape;
        if oo.npy() {
            let v = vox2vec::tensor::nxyzc_to_ncxyz(&m.values, 1, m.channels, m.shape.iter().product());
            write_npy(&out.join(format!("level_{}.npy", m.level)), &[m.channels, sx, sy, sz], &v)?;
        }
        if oo.nifti() {
            write_features(
                &out.join(format!("level_{}.nii.gz", m.level)),
                &m.values,
                m.shape,
                m.channels,
                &embed::level_affine(e, m.level),
            )?;
        }
        if let Some(vol) = source {
            // Level i → the level-0 preprocessed grid (nearest) → the canonical source grid → file order.
            let f = 1usize << m.level;
            let s0 = ct.shape;
            let c = m.channels;
            let mut up = vec![0.0f32; s0.iter().product::<usize>() * c];
            for a in 0..s0[0] {
                for b in 0..s0[1] {
                    for z in 0..s0[2] {
                        let src = (((a / f) * m.shape[1] + b / f) * m.shape[2] + z / f) * c;
                        let dst = ((a * s0[1] + b) * s0[2] + z) * c;
                        up[dst..dst + c].copy_from_slice(&m.values[src..src + c]);
                    }
                }
            }
            let mut src_grid = vec![0.0f32; ct.source_shape.iter().product::<usize>() * c];
            for ch in 0..c {
                let one: Vec<f32> = up.iter().skip(ch).step_by(c).copied().collect();
                for (i, v) in vox2vec::data::preprocess::to_source_grid(&one, ct, 0.0f32).into_iter().enumerate() {
                    src_grid[i * c + ch] = v;
                }
            }
            let fs = vol.geometry.file_shape;
            let file_order = vox2vec::data::nifti_io::to_file_order(&src_grid, &vol.geometry, c);
            if oo.npy() {
                write_npy(
                    &out.join(format!("level_{}_original.npy", m.level)),
                    &[c, fs[0], fs[1], fs[2]],
                    &file_order,
                )?;
            }
            if oo.nifti() {
                write_features_channels_first(
                    &out.join(format!("level_{}_original.nii.gz", m.level)),
                    &file_order,
                    fs,
                    c,
                    &vol.geometry.affine,
                )?;
            }
        }
    }
    let rgb_note = if oo.rgb { Some(write_rgb_view(e, &maps, oo.rgb_level, out)?) } else { None };
    // The preprocessed grid in world coordinates: canonical index → file grid → world.
    let affines: serde_json::Map<String, serde_json::Value> =
        oo.levels.iter().map(|&l| (l.to_string(), serde_json::json!(embed::level_affine(e, l)))).collect();
    let geo = serde_json::json!({
        "source": e.source,
        "shape": ct.shape,
        "spacing_mm": ct.spacing,
        "crop_box_canonical": ct.crop_box,
        "source_shape_canonical": ct.source_shape,
        "source_spacing_mm": ct.source_spacing,
        "file_affine": e.file_affine,
        "orientation": {"perm": e.orientation.perm, "flip": e.orientation.flip},
        "levels": oo.levels,
        "level_affines": affines,
        "rgb": rgb_note,
        "layout": "level_<i>.npy: [C, X, Y, Z], canonical axes (x, y, z world-increasing), level i = preprocessed grid / 2^i (ceil); level_<i>.nii.gz: the same as X x Y x Z x C with level_affines[i]",
    });
    vox2vec::checkpoint::write_atomic(&out.join("geometry.json"), serde_json::to_string_pretty(&geo)?.as_bytes())?;
    println!(
        "wrote levels {:?} of {} ({:?} voxels at {} mm) to {}",
        oo.levels,
        e.source.display(),
        ct.shape,
        vox2vec::eval::recorded::xyz(&ct.spacing),
        out.display()
    );
    Ok(())
}

/// `embed --rgb`: the PCA colours of level `level` inside the body as rgb_level<L>.nii.gz
/// (RGB24 on the level's grid and affine) and rgb_level<L>.png (the CT's central axial,
/// coronal and sagittal slices above the same slices in PCA colours). Returns what the
/// components explain, for geometry.json.
fn write_rgb_view(
    e: &vox2vec::data::cache::CachedCt,
    maps: &[vox2vec::eval::sliding::LevelMap],
    level: usize,
    out: &std::path::Path,
) -> Result<serde_json::Value> {
    use vox2vec::eval::pca::{grey, level_mask, orthogonal_slices, pca_rgb};
    let ct = &e.ct;
    let m = maps
        .iter()
        .find(|m| m.level == level)
        .with_context(|| format!("--rgb-level {level}: the model has no such level"))?;
    let (body, shape) = level_mask(&ct.body_mask(), ct.shape, level);
    anyhow::ensure!(shape == m.shape, "level {level}: body mask {shape:?} and features {:?} differ", m.shape);
    let pca = pca_rgb(&m.values, m.shape, m.channels, &body)
        .with_context(|| format!("{}: PCA of level {level}", e.source.display()))?;
    let affine = vox2vec::eval::embed::level_affine(e, level);
    let rgb_path = out.join(format!("rgb_level{level}.nii.gz"));
    vox2vec::data::nifti_io::write_rgb(&rgb_path, &pca.rgb, m.shape, &affine)?;
    let s0 = ct.shape;
    let centre = [s0[0] / 2, s0[1] / 2, s0[2] / 2];
    let f = 1usize << level;
    let hu = |x: usize, y: usize, z: usize| ct.hu[(x * s0[1] + y) * s0[2] + z] as f32;
    let colour = |x: usize, y: usize, z: usize| pca.rgb[((x / f) * m.shape[1] + y / f) * m.shape[2] + z / f];
    let window = (-160.0, 240.0);
    let mut tiles = Vec::new();
    for (name, w, h, img) in orthogonal_slices(s0, ct.spacing, centre, &|x, y, z| grey(hu(x, y, z), window)) {
        tiles.push(vox2vec::plot::Tile { caption: format!("CT, {name} (W400 L40)"), width: w, height: h, rgb: img });
    }
    for (name, w, h, img) in orthogonal_slices(s0, ct.spacing, centre, &colour) {
        tiles.push(vox2vec::plot::Tile {
            caption: format!("level {level} PCA, {name}"),
            width: w,
            height: h,
            rgb: img,
        });
    }
    let ex = pca.explained;
    let name = e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let title = format!(
        "{name}: level-{level} features, first 3 principal components as RGB ({:.0}%, {:.0}%, {:.0}% of the variance)",
        ex[0] * 100.0,
        ex[1] * 100.0,
        ex[2] * 100.0
    );
    vox2vec::plot::write_image_grid_png(&out.join(format!("rgb_level{level}.png")), &title, &tiles, 3)?;
    Ok(
        serde_json::json!({"level": level, "explained_variance": ex, "files": [format!("rgb_level{level}.nii.gz"), format!("rgb_level{level}.png")]}),
    )
}

/// `similar`: see the subcommand's help. Nothing is left in `out` when it fails.
fn similar(
    weights: &std::path::Path,
    query: &std::path::Path,
    point: &str,
    world: bool,
    targets: &[PathBuf],
    out: &std::path::Path,
    net: &NetArgs,
) -> Result<()> {
    let created = !out.exists();
    let r = similar_into(weights, query, point, world, targets, out, net);
    if r.is_err() && created {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn similar_into(
    weights: &std::path::Path,
    query: &std::path::Path,
    point: &str,
    world: bool,
    targets: &[PathBuf],
    out: &std::path::Path,
    net: &NetArgs,
) -> Result<()> {
    use vox2vec::eval::embed::{Blend, embed_volume, scale_hu};
    use vox2vec::eval::similar::{apply, best, embedding_at, invert, level0_to_world, similarity_map, world_to_level0};
    let p: Vec<f64> = point
        .split(',')
        .map(|t| t.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--point {point:?}: expected X,Y,Z numbers"))?;
    anyhow::ensure!(p.len() == 3 && p.iter().all(|v| v.is_finite()), "--point {point:?}: expected X,Y,Z numbers");
    let p = [p[0], p[1], p[2]];
    let mut names: Vec<String> = Vec::new();
    for t in targets {
        anyhow::ensure!(
            t.is_file() || vox2vec::data::dicom::is_dicom_input(t),
            "--target {}: no such file (a NIfTI, or a DICOM series folder)",
            t.display()
        );
        let file = t.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let name = file.strip_suffix(".nii.gz").or_else(|| file.strip_suffix(".nii")).unwrap_or(&file).to_string();
        anyhow::ensure!(
            !names.contains(&name),
            "two targets are named {name:?}: their outputs would collide; search them separately"
        );
        names.push(name);
    }
    let (mut model, recorded) = load_backbone(weights, net.base_channels, net.num_scales)?;
    let device = net.place("similar", query, &mut model)?;
    let (pre, patch) = net.settings(&recorded)?;
    let sw_batch = net.sw_batch(device, patch)?;
    let levels: Vec<usize> = (0..model.config.fpn.num_scales).collect();
    let mut embed_all = |e: &vox2vec::data::cache::CachedCt| -> Result<Vec<vox2vec::eval::sliding::LevelMap>> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "embedding {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}  {msg}",
        )?);
        bar.set_message(e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let maps = embed_volume(
            &mut model,
            &scale_hu(&e.ct.hu),
            e.ct.shape,
            patch,
            &levels,
            Blend::Central,
            sw_batch,
            &|n, total| {
                bar.set_length(total as u64);
                bar.set_position(n as u64);
            },
        )?;
        bar.finish_and_clear();
        Ok(maps)
    };
    let q = vox2vec::data::cache::build(query, &pre)?;
    let q_world = if world { p } else { apply(&q.file_affine, p) };
    let qi = world_to_level0(&q, q_world).with_context(|| {
        format!("{}: the point {} ({} mm in the world) lies outside the part of the CT that is embedded (the body's bounding box)", query.display(), fmt3(&p), fmt3(&q_world))
    })?;
    let q_maps = embed_all(&q)?;
    let qv = embedding_at(&q_maps, qi)?;
    drop(q_maps);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let q_file = apply(&invert(&q.file_affine).context("the query's affine is singular")?, q_world);
    eprintln!(
        "query: {} voxel {} = world {} mm (the preprocessed voxel nearest to it)",
        query.display(),
        fmt3(&q_file),
        fmt3(&q_world)
    );
    let mut matches = Vec::new();
    for (t, name) in targets.iter().zip(&names) {
        let e = vox2vec::data::cache::build(t, &pre)?;
        let vol = vox2vec::data::nifti_io::read_volume_with(t, net.nonfinite)?;
        let maps = embed_all(&e)?;
        let sim = similarity_map(&maps, &qv)?;
        drop(maps);
        let body = e.ct.body_mask();
        let (b, score) =
            best(&sim, &body, e.ct.shape).with_context(|| format!("{}: no body voxel to match", t.display()))?;
        let b_world = level0_to_world(&e, b);
        let b_file =
            apply(&invert(&e.file_affine).context("the target's affine is singular")?, b_world).map(|v| v.round());
        // The map on the target's own grid; voxels outside the embedded box get -1 (no match).
        let on_source = vox2vec::data::preprocess::to_source_grid(&sim, &e.ct, -1.0f32);
        vox2vec::data::nifti_io::write_volume(
            &out.join(format!("{name}_similarity.nii.gz")),
            &on_source,
            &vol.geometry,
        )?;
        write_match_png(&out.join(format!("{name}_match.png")), &q, qi, &e, b, &sim, &body, score)?;
        println!(
            "{}: best match voxel {} = world {} mm, similarity {score:.4}",
            t.display(),
            fmt3(&b_file),
            fmt3(&b_world)
        );
        matches.push(serde_json::json!({"target": t, "best_voxel": b_file, "best_world_mm": b_world, "similarity": score, "files": [format!("{name}_similarity.nii.gz"), format!("{name}_match.png")]}));
    }
    let json = serde_json::json!({
        "query": query, "point": p, "point_is_world": world, "query_voxel": q_file, "query_world_mm": q_world,
        "weights": weights, "spacing_mm": pre.spacing, "patch": patch, "matches": matches,
        "note": "voxels are the files' own 0-based indices; world is NIfTI's RAS in mm",
    });
    vox2vec::checkpoint::write_atomic(&out.join("matches.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(())
}

fn fmt3(v: &[f64; 3]) -> String {
    format!("({:.1}, {:.1}, {:.1})", v[0], v[1], v[2])
}

/// The picture of one match: the query CT's three slices through the query point (a green
/// cross) above the target's slices through its best match, the similarity as a heat map over
/// the target's CT (from its 90th percentile in the body, transparent, to the best, opaque).
#[allow(clippy::too_many_arguments)]
fn write_match_png(
    path: &std::path::Path,
    q: &vox2vec::data::cache::CachedCt,
    qi: [usize; 3],
    t: &vox2vec::data::cache::CachedCt,
    ti: [usize; 3],
    sim: &[f32],
    body: &[bool],
    score: f32,
) -> Result<()> {
    use vox2vec::eval::pca::{grey, orthogonal_slices};
    let window = (-160.0f32, 240.0f32);
    let cross = |v: [usize; 3], m: [usize; 3]| {
        let d: Vec<usize> = (0..3).map(|a| v[a].abs_diff(m[a])).collect();
        d.iter().filter(|&&x| x == 0).count() == 2 && d.iter().any(|&x| (2..=5).contains(&x))
    };
    let mut inside: Vec<f32> = sim.iter().zip(body).filter(|(_, b)| **b).map(|(s, _)| *s).collect();
    inside.sort_by(f32::total_cmp);
    let lo = inside.get(inside.len() * 9 / 10).copied().unwrap_or(0.0);
    let span = (score - lo).max(1e-6);
    let hot = |u: f32| -> [f32; 3] {
        [(3.0 * u).clamp(0.0, 1.0), (3.0 * u - 1.0).clamp(0.0, 1.0), (3.0 * u - 2.0).clamp(0.0, 1.0)]
    };
    let mut tiles = Vec::new();
    let (qs, ts) = (q.ct.shape, t.ct.shape);
    let q_px = |x: usize, y: usize, z: usize| {
        if cross([x, y, z], qi) { [0, 255, 0] } else { grey(q.ct.hu[(x * qs[1] + y) * qs[2] + z] as f32, window) }
    };
    let t_px = |x: usize, y: usize, z: usize| {
        if cross([x, y, z], ti) {
            return [0, 255, 0];
        }
        let i = (x * ts[1] + y) * ts[2] + z;
        let g = grey(t.ct.hu[i] as f32, window);
        let u = ((sim[i] - lo) / span).clamp(0.0, 1.0);
        if u <= 0.0 || !body[i] {
            return g;
        }
        let (h, a) = (hot(0.35 + 0.65 * u), 0.25 + 0.6 * u);
        std::array::from_fn(|k| (g[k] as f32 * (1.0 - a) + h[k] * 255.0 * a).round() as u8)
    };
    let name = |e: &vox2vec::data::cache::CachedCt| {
        e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    };
    for (view, w, h, img) in orthogonal_slices(qs, q.ct.spacing, qi, &q_px) {
        tiles.push(vox2vec::plot::Tile {
            caption: format!("query {}, {view}", name(q)),
            width: w,
            height: h,
            rgb: img,
        });
    }
    for (view, w, h, img) in orthogonal_slices(ts, t.ct.spacing, ti, &t_px) {
        tiles.push(vox2vec::plot::Tile {
            caption: format!("{} similarity, {view}", name(t)),
            width: w,
            height: h,
            rgb: img,
        });
    }
    let title = format!(
        "best match in {}: cosine similarity {score:.3} (heat: from the body's 90th percentile {lo:.3} up)",
        name(t)
    );
    vox2vec::plot::write_image_grid_png(path, &title, &tiles, 3)
}

#[allow(clippy::too_many_arguments)]
fn bench_infer(
    weights: Option<&std::path::Path>,
    base: Option<usize>,
    scales: Option<usize>,
    patch: &str,
    batches: &[usize],
    precisions: &[String],
    iters: usize,
    warmup: usize,
    device: &str,
    plan: bool,
    report: Option<&std::path::Path>,
) -> Result<()> {
    use vox2vec::bench::{bench_inference, plan_inference, render_cost_table};
    use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
    use vox2vec::tensor::{DType, Device};
    let patch = parse_patch(patch)?;
    anyhow::ensure!(
        !batches.is_empty() && batches.iter().all(|&b| (1..=1024).contains(&b)),
        "--batches must be between 1 and 1024"
    );
    let dts: Vec<DType> =
        precisions.iter().map(|p| vox2vec::cuda::parse_precision(p).context("--precisions")).collect::<Result<_>>()?;
    let mut json = Vec::new();
    if plan {
        vox2vec::cuda::enable_plan_mode()?;
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
            vox2vec::eval::recorded::xyz(&patch),
            cfg.fpn.base_channels,
            cfg.fpn.num_scales,
            vox2vec::cuda::device(0)?.machine().name
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
        let device = vox2vec::cuda::parse_device(device).context("--device")?;
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
            vox2vec::eval::recorded::xyz(&patch),
            f.base_channels,
            f.num_scales,
            vox2vec::cuda::describe(device, DType::F32)?
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
        vox2vec::checkpoint::write_atomic(
            path,
            serde_json::to_string_pretty(&serde_json::json!({"plan": plan, "results": json}))?.as_bytes(),
        )?;
    }
    Ok(())
}

fn preprocess(
    input: &std::path::Path,
    cache: &std::path::Path,
    skip_bad: bool,
    nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
) -> Result<()> {
    use vox2vec::data::preprocess::PreprocessConfig;
    let report = vox2vec::data::sources::prepare_input(
        input,
        cache,
        &PreprocessConfig { nonfinite, ..PreprocessConfig::default() },
        [1, 1, 1],
    )?;
    println!("{}", report.summary(cache));
    anyhow::ensure!(!report.entries.is_empty(), "no usable volume in {}", input.display());
    anyhow::ensure!(report.skipped.is_empty() || skip_bad, "{} unusable files (listed above)", report.skipped.len());
    Ok(())
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`vox2vec inspect --all | head`) as other Unix tools do,
    // instead of panicking inside println!.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Sliding windows free and re-allocate the same large buffers window after window.
    vox2vec::cpu::retain_freed_memory();
    let r = run(Cli::parse());
    // VOX2VEC_PROFILE=1: time per op and shape on the CPU backend (empty otherwise).
    eprint!("{}", vox2vec::profile::report());
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
