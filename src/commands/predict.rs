//! `predict`: label maps (and class probabilities) of CTs from a backbone and a trained head,
//! on each input's own grid.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::*;

pub fn predict(
    ct: &std::path::Path,
    backbone: &std::path::Path,
    head_path: &std::path::Path,
    out: &std::path::Path,
    probabilities: Option<&std::path::Path>,
    net: &NetArgs,
) -> Result<()> {
    use crate::eval::segment::{Head, HeadKind, predict_case};
    several_inputs(ct)?;
    let (mut model, _) = load_backbone(backbone, net.base_channels, net.num_scales)?;
    net.device()?;
    // The head's kind and classes: what it records (heads of probe / finetune / scratch), else
    // what its tensors show (a PyTorch FPNLinearHead / FPNNonLinearHead state_dict); both must agree.
    let head_file = crate::weights::read(head_path, crate::weights::Naming::Literal)?;
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
    let mut hs = crate::params::ParamStore::new();
    let head = Head::new(kind, &mut hs, 0, model.config.fpn, k);
    let loaded = crate::checkpoint::load_file(head_file, &mut hs, None)?;
    anyhow::ensure!(loaded.missing.is_empty(), "{}: head tensors missing: {:?}", head_path.display(), loaded.missing);
    let device = net.place("predict", ct, &mut model)?;
    eprintln!(
        "predict: {kind_name} head, {k} classes, spacing {} mm, patch {}",
        crate::eval::recorded::xyz(&pre.spacing),
        crate::eval::recorded::xyz(&patch)
    );
    if device != crate::tensor::Device::Cpu {
        hs.to_device(device)?;
    }
    let sw_batch = net.sw_batch(device, patch)?;
    let classes: Vec<String> =
        recorded.classes.clone().unwrap_or_else(|| (1..=k).map(|c| format!("class_{c}")).collect());
    let load = |f: &std::path::Path| -> Result<(crate::data::nifti_io::Volume, crate::data::cache::CachedCt)> {
        Ok((crate::data::nifti_io::read_volume_with(f, net.nonfinite)?, crate::data::cache::build(f, &pre)?))
    };
    let mut one = |vol: crate::data::nifti_io::Volume,
                   e: crate::data::cache::CachedCt,
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
        let on_source = crate::data::preprocess::to_source_grid(&labels, &e.ct, 0u8);
        crate::data::nifti_io::write_volume(out, &on_source, &vol.geometry)?;
        if let Some(dir) = probabilities {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (c, name) in classes.iter().enumerate().take(k) {
                let pc: Vec<f32> = probs.iter().skip(c).step_by(k).copied().collect();
                let file: String = name
                    .chars()
                    .map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' { ch } else { '_' })
                    .collect();
                crate::data::nifti_io::write_volume(
                    &dir.join(format!("{file}.nii.gz")),
                    &crate::data::preprocess::to_source_grid(&pc, &e.ct, 0.0f32),
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
        !crate::data::sources::is_nifti(out),
        "{} holds several CTs: --out must be a folder for their masks, not {}",
        ct.display(),
        out.display()
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("predict: {} CTs from {}, masks into {}/<name>.nii.gz", files.len(), ct.display(), out.display());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    crate::eval::prefetch::pipelined(
        &paths,
        |f| load(f),
        |f, (vol, e)| {
            let name = &files.iter().find(|(p, _)| p == f).expect("one of the inputs").1;
            one(vol, e, &out.join(format!("{name}.nii.gz")), probabilities.map(|d| d.join(name)).as_deref())
        },
    )
}
