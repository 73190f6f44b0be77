//! `inspect` (what a weights file holds) and `convert` / `export-backbone` (its backbone as a
//! bare FPN3d state_dict).

use anyhow::{Context, Result};

/// `inspect`: what a weights file is (container, Lightning, module prefixes), the model it
/// holds (recorded or inferred), its metadata, and its tensors by group.
pub fn inspect(path: &std::path::Path, all: bool) -> Result<()> {
    use crate::weights::{ConfigSource, Naming, Values, read};
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
    let mut entries: Vec<&crate::weights::Entry> = file.entries.iter().collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut groups: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for e in entries {
        let group = if e.name.starts_with("optim.") {
            "optim"
        } else if e.name.starts_with(crate::model::HEAD_PREFIX) || is_head {
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
pub fn convert(input: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use crate::weights::{Naming, Values, read, resolve_backbone};
    use safetensors::tensor::{Dtype, TensorView};
    let file = read(input, Naming::Model)?;
    let fpn = resolve_backbone(&file, None, None)?;
    let backbone: Vec<(String, &crate::weights::Entry)> = file
        .entries
        .iter()
        .filter_map(|e| e.name.strip_prefix(crate::model::BACKBONE_PREFIX).map(|k| (k.to_string(), e)))
        .collect();
    anyhow::ensure!(!backbone.is_empty(), "{}: no backbone tensors", input.display());
    // Check the tensors against the model they claim to be before writing anything.
    let cfg = file.model_config(fpn);
    cfg.validate().with_context(|| format!("{}: model configuration", input.display()))?;
    let mut model = crate::model::Vox2Vec::new(cfg, 0);
    crate::checkpoint::load_file(file.clone(), &mut model.store, None)?;
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
    meta.insert("model_config".into(), crate::checkpoint::config_to_json(&model.config));
    meta.insert("converted_from".into(), format!("{} ({})", input.display(), file.describe()));
    let n = views.len();
    let bytes = safetensors::serialize(views, Some(meta))?;
    crate::checkpoint::write_atomic(out, &bytes)?;
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
pub fn metadata_line(key: &str, value: &str, all: bool) -> String {
    const SHOWN: usize = 3;
    if all || key != crate::eval::recorded::DATA_SOURCES {
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
