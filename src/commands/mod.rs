//! The commands of the `vox2vec` tool as library functions: the options each takes (clap
//! argument groups, so that the binary only parses and dispatches) and what it does. Shared
//! here: loading a backbone, the network, device and window options, and input discovery.

mod bench_infer;
mod embed;
mod inspect;
mod predict;
mod preprocess;
pub mod pretrain;
mod segment;
mod similar;
mod values;

pub use bench_infer::{BenchInferArgs, bench_infer};
pub use embed::{EmbedOutput, FeatureFormat, embed};
pub use inspect::{convert, inspect};
pub use predict::predict;
pub use preprocess::preprocess;
pub use segment::{SegArgs, segment};
pub use similar::similar;
pub use values::{Card, DeviceArg, Precision};

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::data::preprocess::parse_spacing;
use crate::eval::recorded::{OnContradiction, Recorded};

/// Backbone size (used when the weights carry no model_config), sliding-window patch and
/// resampling spacing (by default those the weights or head record: `eval::recorded`).
#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// FPN3d base width [default: the weights' (recorded, or inferred from their tensors), 16
    /// for a random backbone]; a value that contradicts the weights is an error.
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// FPN3d scales [default: the weights', 6 for a random backbone].
    #[arg(long)]
    pub num_scales: Option<usize>,
    /// Sliding-window patch X,Y,Z [default: the one the head or weights record, else 128,128,32].
    #[arg(long)]
    pub patch: Option<String>,
    /// Resampling spacing in mm, X,Y,Z [default: the one the head or weights record, else 1,1,2].
    #[arg(long)]
    pub spacing: Option<String>,
    /// Use --spacing / --patch, and a backbone other than the head's, even where they
    /// contradict what the head or weights record.
    #[arg(long)]
    pub override_recorded: bool,
    /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
    /// image's minimum and reports how many.
    #[arg(long, default_value = "error", value_name = "POLICY")]
    pub nonfinite: crate::data::preprocess::NonFinitePolicy,
    /// Compute device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 weights and accumulation).
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: Precision,
    /// Sliding windows per forward pass (MONAI's sw_batch_size) [default: 8 on a CUDA device;
    /// on the CPU as many as make one 128×128×32 window's voxels, at most 8: 1 at the default
    /// patch]. More windows per pass use more memory, not more work.
    #[arg(long)]
    pub sw_batch: Option<usize>,
}

/// Move `model` to `device` with `precision` activations and print the first line of a
/// command's output: what runs where, as vox2vec-train's first line.
pub fn place_model(
    command: &str,
    what: &std::path::Path,
    model: &mut crate::model::Vox2Vec,
    device: crate::tensor::Device,
    precision: crate::tensor::DType,
) -> Result<()> {
    if device != crate::tensor::Device::Cpu {
        model.to_device(device)?;
        model.activation_dtype = precision;
    }
    let f = model.config.fpn;
    eprintln!(
        "vox2vec {command}: {}, FPN3d base {} x {} scales, {}",
        what.display(),
        f.base_channels,
        f.num_scales,
        crate::cuda::describe(device, precision)?
    );
    Ok(())
}

/// The sliding-window patch where neither `--patch` nor the weights say another (the reference's
/// 128×128×32).
pub const DEFAULT_PATCH: [usize; 3] = [128, 128, 32];

impl NetArgs {
    /// The device and activation dtype asked for (bf16 on the CPU is refused, as by vox2vec-train).
    fn device(&self) -> Result<(crate::tensor::Device, crate::tensor::DType)> {
        self.device.with_precision(self.precision)
    }

    /// Windows per forward pass on `device` for windows of `patch` voxels (--sw-batch, else 8 on
    /// a CUDA device; on the CPU as many windows as hold one `DEFAULT_PATCH` window's voxels, 1
    /// to 8: a pass of small windows keeps the coarse levels' volumes from being a few voxels
    /// each, and uses no more memory than one window of the default patch).
    fn sw_batch(&self, device: crate::tensor::Device, patch: [usize; 3]) -> Result<usize> {
        let cpu_default =
            || (DEFAULT_PATCH.iter().product::<usize>() / patch.iter().product::<usize>().max(1)).clamp(1, 8);
        let k = self.sw_batch.unwrap_or_else(|| if device == crate::tensor::Device::Cpu { cpu_default() } else { 8 });
        anyhow::ensure!((1..=1024).contains(&k), "--sw-batch must be between 1 and 1024, got {k}");
        Ok(k)
    }

    /// Move `model` to the device asked for and print the first line of the command's output
    /// (what runs where, as vox2vec-train's first line).
    fn place(
        &self,
        command: &str,
        what: &std::path::Path,
        model: &mut crate::model::Vox2Vec,
    ) -> Result<crate::tensor::Device> {
        let (device, precision) = self.device()?;
        place_model(command, what, model, device, precision)?;
        Ok(device)
    }

    /// Preprocessing and window for weights or a head that record `rec`: the flags, checked
    /// against the recorded settings (an error where they contradict, unless
    /// --override-recorded), else the recorded settings, else the reference's.
    fn settings(&self, rec: &Recorded) -> Result<(crate::data::preprocess::PreprocessConfig, [usize; 3])> {
        let on = if self.override_recorded { OnContradiction::Override } else { OnContradiction::Error };
        let (spacing, patch) = resolve_settings(self.spacing.as_deref(), self.patch.as_deref(), rec, on)?;
        Ok((
            crate::data::preprocess::PreprocessConfig { spacing, nonfinite: self.nonfinite, ..Default::default() },
            patch,
        ))
    }
}

/// Spacing and patch for a command that uses a file recording `rec`: each flag checked against
/// the recorded value per `on`, else the recorded value, else the reference's (with a note
/// when the file records neither, as files from before this version do).
pub fn resolve_settings(
    spacing: Option<&str>,
    patch: Option<&str>,
    rec: &Recorded,
    on: OnContradiction,
) -> Result<([f64; 3], [usize; 3])> {
    use crate::eval::recorded::{choose, xyz};
    rec.check_window()?;
    let (sp, pa) = (spacing.map(parse_spacing).transpose()?, patch.map(parse_patch).transpose()?);
    let reference = crate::data::preprocess::PreprocessConfig::default().spacing;
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

pub fn parse_patch(s: &str) -> Result<[usize; 3]> {
    let p: Vec<usize> = s
        .split(',')
        .map(|t| t.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("patch {s:?}"))?;
    anyhow::ensure!(p.len() == 3, "patch must be X,Y,Z, got {s:?}");
    let p = [p[0], p[1], p[2]];
    crate::model::check_patch(p).with_context(|| format!("patch {s:?}"))?;
    Ok(p)
}

/// The backbone described by (and loaded from) `weights` (any format `weights::read` takes:
/// our checkpoints, bare FPN3d state_dicts, PyTorch .pt/.pth, Lightning .ckpt), and what the
/// file records. The configuration is the file's (recorded, else inferred from its tensors);
/// `--base-channels` / `--num-scales` must agree with it.
pub fn load_backbone(
    weights: &std::path::Path,
    base: Option<usize>,
    scales: Option<usize>,
) -> Result<(crate::model::Vox2Vec, Recorded)> {
    use crate::model::Vox2Vec;
    use crate::weights::{Naming, read, resolve_backbone};
    let file = read(weights, Naming::Model)?;
    let fpn = resolve_backbone(&file, base, scales)?;
    let cfg = file.model_config(fpn);
    cfg.validate().with_context(|| format!("{}: model configuration", weights.display()))?;
    if file.container != crate::weights::Container::Safetensors
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
    let loaded = crate::checkpoint::load_file(file, &mut model.store, None)?;
    let missing: Vec<&String> =
        loaded.missing.iter().filter(|k| k.starts_with(crate::model::BACKBONE_PREFIX)).collect();
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
pub fn check_head_backbone(
    head: &Recorded,
    model: &crate::model::Vox2Vec,
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
        let have = crate::eval::recorded::backbone_fingerprint(&model.store)?;
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

/// The CTs of a command's input: `None` for one CT (a NIfTI, a .npy, a DICOM series), else every CT of a
/// folder, an nnU-Net dataset or a list file (`data::sources::discover`), each with the
/// name its outputs take (the file name without .nii / .nii.gz; two inputs of one name are
/// an error naming both).
pub fn several_inputs(input: &std::path::Path) -> Result<Option<Vec<(PathBuf, String)>>> {
    // One CT: a NIfTI, a .npy patch, or a DICOM series (its folder, or a DICOMDIR).
    let single = (input.is_file()
        && (crate::data::sources::is_nifti(input) || input.extension().is_some_and(|e| e == "npy")))
        || crate::data::dicom::is_dicom_input(input);
    if single || !input.exists() {
        anyhow::ensure!(input.exists(), "{}: no such file or folder", input.display());
        return Ok(None);
    }
    let files = crate::data::sources::discover(input)?;
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

pub fn fmt3(v: &[f64; 3]) -> String {
    format!("({:.1}, {:.1}, {:.1})", v[0], v[1], v[2])
}
