//! nnU-Net raw datasets (dataset.json, imagesTr/<case>_0000, labelsTr/<case>): their classes,
//! their cases preprocessed with their label maps, and the split into training and validation.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use crate::data::cache::build;
use crate::data::nifti_io::read_volume;
use crate::data::preprocess::{PreprocessConfig, PreprocessedCt, preprocess_labels};

/// One labelled case, preprocessed.
pub struct Case {
    pub name: String,
    pub image: PathBuf,
    pub ct: PreprocessedCt,
    /// Label map on the preprocessed grid.
    pub labels: Vec<u8>,
    pub mask: Vec<bool>,
    /// Flat indices of each class's voxels (class c at c − 1), for foreground patches.
    pub class_voxels: Vec<Vec<u32>>,
}

/// An nnU-Net raw dataset: class names (without background) and cases.
pub struct Dataset {
    pub classes: Vec<String>,
    pub cases: Vec<Case>,
}

/// Read dataset.json, pair imagesTr/<case>_0000 with labelsTr/<case>, preprocess both.
pub fn load_dataset(dir: &Path, pre: &PreprocessConfig, tick: &dyn Fn(&str)) -> Result<Dataset> {
    let json_path = dir.join("dataset.json");
    let text = std::fs::read(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
    let classes = parse_dataset_json(&json_path, &text)?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("labelsTr"))
        .with_context(|| format!("reading {}/labelsTr", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::data::sources::is_nifti(p))
        .collect();
    names.sort();
    let mut cases = Vec::new();
    for label_path in names {
        let file = label_path.file_name().unwrap().to_string_lossy().into_owned();
        let (case, ext) = if let Some(c) = file.strip_suffix(".nii.gz") {
            (c.to_string(), ".nii.gz")
        } else {
            (file.trim_end_matches(".nii").to_string(), ".nii")
        };
        let image = dir.join("imagesTr").join(format!("{case}_0000{ext}"));
        ensure!(image.is_file(), "{}: no image {} for label {}", dir.display(), image.display(), label_path.display());
        tick(&case);
        let e = build(&image, pre)?;
        let lab = read_volume(&label_path)?;
        ensure!(
            lab.shape == e.ct.source_shape,
            "{}: label grid {:?} differs from the image's {:?}",
            label_path.display(),
            lab.shape,
            e.ct.source_shape
        );
        let raw: Vec<u8> = lab.data.iter().map(|&v| v.round().clamp(0.0, 255.0) as u8).collect();
        if let Some(&bad) = raw.iter().find(|&&v| v as usize > classes.len()) {
            bail!("{}: label {bad} is not in dataset.json", label_path.display());
        }
        let labels = preprocess_labels(&raw, &e.ct)?;
        let mask = e.ct.body_mask();
        let mut class_voxels = vec![Vec::new(); classes.len()];
        for (i, &l) in labels.iter().enumerate() {
            if l > 0 {
                class_voxels[l as usize - 1].push(i as u32);
            }
        }
        cases.push(Case { name: case, image, ct: e.ct, labels, mask, class_voxels });
    }
    ensure!(!cases.is_empty(), "{}: no labelled cases", dir.display());
    Ok(Dataset { classes, cases })
}

/// The foreground class names of an nnU-Net `dataset.json`, in label order 1..K. Accepts
/// nnU-Net v2 labels (`{"background": 0, "liver": 1}`) and v1 labels (`{"0": "background",
/// "1": "liver"}`); anything else is refused with the entry named, never skipped: a dropped
/// class would shift every later label. `file_ending`, when present, must be NIfTI.
/// The fuzz target's entry point (fuzz/fuzz_targets/dataset_json.rs).
pub fn parse_dataset_json(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let p = path.display();
    let text = std::str::from_utf8(bytes).with_context(|| format!("{p}: not UTF-8 text"))?;
    let json: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{p}: not JSON"))?;
    if let Some(end) = json.get("file_ending") {
        ensure!(
            matches!(end.as_str(), Some(".nii.gz") | Some(".nii")),
            "{p}: file_ending {end}; only NIfTI (\".nii.gz\", \".nii\") is supported"
        );
    }
    let labels =
        json.get("labels").and_then(|l| l.as_object()).with_context(|| format!("{p}: no \"labels\" object"))?;
    let mut ids: Vec<(u64, String)> = Vec::with_capacity(labels.len());
    for (k, v) in labels {
        let entry = match (v, k.parse::<u64>()) {
            // v2: name → id (the id must be a whole number, not 1.0 or "1").
            (serde_json::Value::Number(n), _) => (
                n.as_u64().with_context(|| format!("{p}: label {k:?} has id {n}; ids are whole numbers 0..K"))?,
                k.clone(),
            ),
            // v1: "id" → name.
            (serde_json::Value::String(name), Ok(id)) if k.trim() == k && !k.starts_with('+') => (id, name.clone()),
            (serde_json::Value::Array(_), _) | (serde_json::Value::Object(_), _) => {
                bail!("{p}: label {k:?} is region-based ({v}); only one id per class is supported")
            }
            _ => bail!("{p}: label entry {k:?}: {v} is neither name → id (nnU-Net v2) nor \"id\" → name (v1)"),
        };
        ids.push(entry);
    }
    ids.sort();
    for w in ids.windows(2) {
        ensure!(w[0].0 != w[1].0, "{p}: id {} is given to both {:?} and {:?}", w[0].0, w[0].1, w[1].1);
    }
    let fg: Vec<(u64, String)> = ids.into_iter().filter(|(i, _)| *i > 0).collect();
    ensure!(!fg.is_empty(), "{p}: no foreground class (labels with id ≥ 1)");
    ensure!(fg.len() < 256, "{p}: {} classes; at most 255 are supported", fg.len());
    if let Some((j, (i, n))) = fg.iter().enumerate().find(|(j, (i, _))| *i != *j as u64 + 1) {
        bail!("{p}: class ids must be 1..K without gaps; {n:?} has id {i} where {} was expected", j + 1);
    }
    Ok(fg.into_iter().map(|(_, n)| n).collect())
}

/// Which cases validate: those named in `val` (every name must be a case), else case i of the
/// sorted cases when i % folds == fold. `train_on_val` lets the validation cases train too (a
/// dataset too small to split). Returns (training, validation) indices, or an error that says
/// how to choose a split when either would be empty.
pub fn split_cases(
    dataset: &Path,
    names: &[&str],
    folds: usize,
    fold: usize,
    val: &[String],
    train_on_val: bool,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if let Some(missing) = val.iter().find(|v| !names.contains(&v.as_str())) {
        bail!("--val {missing}: no such case in {} (cases: {})", dataset.display(), names.join(", "));
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (i, name) in names.iter().enumerate() {
        let is_val = if val.is_empty() { i % folds.max(1) == fold } else { val.iter().any(|v| v == name) };
        if is_val {
            validation.push(i);
        }
        if !is_val || train_on_val {
            train.push(i);
        }
    }
    if train.is_empty() || validation.is_empty() {
        let n = names.len();
        if n == 1 {
            bail!(
                "{} has 1 labelled case, too few to split into training and validation; pass --val {} --train-on-val to validate on a case that also trains (an optimistic Dice, labelled so in results.json)",
                dataset.display(),
                names[0]
            );
        }
        bail!(
            "{}: the split gives {} training and {} validation cases of {n}; choose --folds at most {n} and --fold below it, or name validation cases with --val (or add --train-on-val to let them train too)",
            dataset.display(),
            train.len(),
            validation.len()
        );
    }
    Ok((train, validation))
}

#[cfg(test)]
mod tests {
    use super::split_cases;
    use std::path::Path;

    #[test]
    fn folds_named_cases_and_training_on_validation() {
        let names = ["a", "b", "c", "d", "e"];
        let ds = Path::new("ds");
        assert_eq!(split_cases(ds, &names, 5, 0, &[], false).unwrap(), (vec![1, 2, 3, 4], vec![0]));
        assert_eq!(split_cases(ds, &names, 2, 1, &[], false).unwrap(), (vec![0, 2, 4], vec![1, 3]));
        let val = ["c".to_string(), "e".to_string()];
        assert_eq!(split_cases(ds, &names, 5, 0, &val, false).unwrap(), (vec![0, 1, 3], vec![2, 4]));
        assert_eq!(split_cases(ds, &names, 5, 0, &val, true).unwrap(), (vec![0, 1, 2, 3, 4], vec![2, 4]));
        let e = split_cases(ds, &names, 5, 0, &["x".to_string()], false).unwrap_err().to_string();
        assert!(e.contains("--val x: no such case") && e.contains("a, b, c, d, e"), "{e}");
        let e = split_cases(ds, &names, 5, 7, &[], false).unwrap_err().to_string();
        assert!(e.contains("0 validation cases of 5"), "{e}");
        let e = split_cases(ds, &["only"], 5, 0, &[], false).unwrap_err().to_string();
        assert!(e.contains("1 labelled case") && e.contains("--val only --train-on-val"), "{e}");
        assert_eq!(split_cases(ds, &["only"], 5, 0, &["only".to_string()], true).unwrap(), (vec![0], vec![0]));
    }
}
