//! `probe`, `finetune` and `scratch`: a segmentation head trained on a labelled nnU-Net
//! dataset over the backbone (frozen, fine-tuned or random), validated on a fold.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::*;

#[derive(clap::Args, Debug, Clone)]
pub struct SegArgs {
    /// nnU-Net raw dataset folder (imagesTr, labelsTr, dataset.json).
    pub dataset: PathBuf,
    /// Pretrained backbone (checkpoint or bare FPN3d); without it the backbone is random.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// The head: linear (one 1×1×1 convolution per level, summed) or nonlinear.
    #[arg(long, value_enum, default_value = "linear")]
    pub head: crate::eval::segment::HeadKind,
    /// Output folder: results.json, head.safetensors (best), backbone.safetensors when trained.
    #[arg(long)]
    pub out: PathBuf,
    /// k-fold split: cases i with i % folds == fold validate (cases sorted by name).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    #[arg(long, default_value_t = 0)]
    pub fold: usize,
    /// Explicit validation cases (comma-separated names) instead of folds.
    #[arg(long, value_delimiter = ',')]
    pub val: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 7)]
    pub batch: usize,
    /// Training patch and validation window X,Y,Z [default: the patch --weights records, else 128,128,32].
    #[arg(long)]
    pub patch: Option<String>,
    /// Adam learning rate [default: 1e-2 for probe, which trains only the head (at the
    /// reference's 3e-4 a probe of 200 steps stays at Dice 0 on OpenKBP); 3e-4 for finetune
    /// and scratch].
    #[arg(long)]
    pub lr: Option<f64>,
    /// The reference's evaluation recipe (docs/method.md §5) where a flag does not say otherwise:
    /// lr 3e-4 for every mode, patch 128,128,32, spacing 1,1,2 (batch 7 is the default anyway).
    #[arg(long)]
    pub reference_recipe: bool,
    #[arg(long, default_value_t = 100)]
    pub validate_every: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// FPN3d base width [default: the weights' (recorded, or inferred from their tensors), 16
    /// for a random backbone]; a value that contradicts the weights is an error.
    #[arg(long)]
    pub base_channels: Option<usize>,
    /// FPN3d scales [default: the weights', 6 for a random backbone].
    #[arg(long)]
    pub num_scales: Option<usize>,
    /// Resampling spacing in mm (x,y,z) [default: the spacing --weights records, else the
    /// reference's 1,1,2]; coarser for quick CPU runs.
    #[arg(long)]
    pub spacing: Option<String>,
    /// Use --spacing / --patch even where they contradict what --weights records (finetune
    /// refuses that otherwise; probe warns).
    #[arg(long)]
    pub override_recorded: bool,
    /// Let the validation cases train too: for a dataset too small to split (one case). The
    /// validation Dice is then optimistic, and results.json says so.
    #[arg(long)]
    pub train_on_val: bool,
    /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
    /// image's minimum and reports how many.
    #[arg(long, default_value = "error", value_name = "POLICY")]
    pub nonfinite: crate::data::preprocess::NonFinitePolicy,
    /// Compute device: auto (a CUDA GPU when one is present, else the CPU), cpu, cuda, cuda:N.
    /// The backbone, the head, their Adam moments, the loss and validation all run there.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Activation storage on a CUDA device: fp32, or bf16 (fp32 weights, gradients of weights
    /// and Adam moments).
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: Precision,
}

pub fn segment(a: &SegArgs, mode: crate::eval::segment::Mode) -> Result<()> {
    use crate::data::nnunet::{Case, load_dataset, split_cases};
    use crate::eval::recorded::{self as rec, backbone_fingerprint};
    use crate::eval::segment::{Head, Mode, SegConfig, SegEvent, train_segmentation};
    use crate::model::{FpnConfig, ModelConfig, Vox2Vec};
    let kind = a.head;
    let (device, precision) = a.device.with_precision(a.precision)?;
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
    let pre = crate::data::preprocess::PreprocessConfig { spacing, nonfinite: a.nonfinite, ..Default::default() };
    let ds = load_dataset(&a.dataset, &pre, &|c| bar.set_message(format!("preprocessing {c}")))?;
    bar.finish_and_clear();
    let k = ds.classes.len();
    let names: Vec<&str> = ds.cases.iter().map(|c| c.name.as_str()).collect();
    let (train, val) = split_cases(&a.dataset, &names, a.folds, a.fold, &a.val, a.train_on_val)?;
    let (train, val): (Vec<&Case>, Vec<&Case>) =
        (train.iter().map(|&i| &ds.cases[i]).collect(), val.iter().map(|&i| &ds.cases[i]).collect());
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
    let mut head_store = crate::params::ParamStore::new();
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
        "mode": format!("{mode:?}"), "head": kind.name(), "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr, "seed": cfg.seed,
        "weights": a.weights, "train_on_val": optimistic, "device": crate::cuda::describe(device, precision)?,
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
        ("head_kind", kind.name().to_string()),
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
            crate::checkpoint::save(&head_path, &m.config, hs, None, &meta)?;
            if trains_backbone {
                crate::checkpoint::save(&backbone_path, &m.config, &m.store, None, &made)?;
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
        "head": kind.name(),
        "weights": a.weights,
        "classes": ds.classes,
        "train_cases": train.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "val_cases": val.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "validation_cases_also_train": optimistic,
        "config": {"patch": cfg.patch, "batch": cfg.batch, "steps": cfg.steps, "lr": cfg.lr, "seed": cfg.seed, "spacing_mm": pre.spacing, "device": crate::cuda::describe(device, precision)?, "backbone": {"base_channels": model.config.fpn.base_channels, "num_scales": model.config.fpn.num_scales}},
        "command_line": rec::command_line(),
        "best_step": res.best_step,
        "best_dice": res.best_dice,
        "best_mean_dice": mean,
        "best_dice_per_case": per_case(&res.best_per_case),
        "history": res.history.iter().zip(&res.history_per_case).map(|((s, d), pc)| serde_json::json!({"step": s, "dice": d, "dice_per_case": per_case(pc)})).collect::<Vec<_>>(),
        "losses": res.losses,
    });
    crate::checkpoint::write_atomic(&a.out.join("results.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(())
}
