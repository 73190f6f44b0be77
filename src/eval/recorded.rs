//! What a weights file records about how it was made, and how commands use it.
//!
//! A segmentation head only works on features computed as they were while it trained: the same
//! resampling spacing, sliding-window patch, intensity window and backbone weights. A head
//! applied at the reference's 1x1x2 mm after training at 4x4x4 mm runs without complaint and
//! gives a Dice of 0.01 instead of 0.05: a silent misuse. So heads (`probe`, `finetune`,
//! `scratch`) and checkpoints (`vox2vec-train`) record these settings in their safetensors
//! metadata, with the command line and data sources that made them, and the commands that
//! read them (`predict`, `embed`, `finetune`, `probe`) take the recorded values by default. A
//! flag that contradicts a recorded value is an error that names both (a warning for `probe`,
//! where a coarser grid is a common way to save time), unless `--override-recorded` is given.
//! Files from before this record nothing; their settings fall back to the flags' defaults,
//! with a note.
//!
//! Metadata keys (values are JSON):
//!   spacing_mm [x, y, z], patch [x, y, z], intensity_window_hu [lo, hi],
//!   backbone_fingerprint (a head's: `backbone_fingerprint` of the backbone it was trained on),
//!   command_line, data_sources, train_config; heads also head_kind, num_classes, classes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::SafeTensors;

use crate::model::BACKBONE_PREFIX;
use crate::params::{ParamStore, SlotKind};

pub const SPACING: &str = "spacing_mm";
pub const PATCH: &str = "patch";
pub const WINDOW: &str = "intensity_window_hu";
pub const BACKBONE_FINGERPRINT: &str = "backbone_fingerprint";
pub const COMMAND_LINE: &str = "command_line";
pub const DATA_SOURCES: &str = "data_sources";
pub const TRAIN_CONFIG: &str = "train_config";

/// The settings a weights file records (None: not recorded).
#[derive(Clone, Debug)]
pub struct Recorded {
    pub file: PathBuf,
    pub spacing: Option<[f64; 3]>,
    pub patch: Option<[usize; 3]>,
    pub window: Option<[f32; 2]>,
    pub classes: Option<Vec<String>>,
    pub backbone_fingerprint: Option<String>,
    pub metadata: HashMap<String, String>,
}

impl Recorded {
    /// No file, nothing recorded (a random backbone): every setting from the flags or defaults.
    pub fn nothing() -> Recorded {
        Recorded {
            file: PathBuf::new(),
            spacing: None,
            patch: None,
            window: None,
            classes: None,
            backbone_fingerprint: None,
            metadata: HashMap::new(),
        }
    }

    /// Whether these settings come from a file (not `nothing`).
    pub fn is_a_file(&self) -> bool {
        !self.file.as_os_str().is_empty()
    }

    /// The recorded settings of the safetensors file `path` (its header only).
    pub fn read(path: &Path) -> Result<Recorded> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        Recorded::from_metadata(path, header.metadata().clone().unwrap_or_default())
    }

    /// Parse the recorded settings out of `path`'s metadata; a key that is present but
    /// malformed is an error naming the file and the key (never read as absent).
    pub fn from_metadata(path: &Path, metadata: HashMap<String, String>) -> Result<Recorded> {
        fn get<T: serde::de::DeserializeOwned>(
            path: &Path,
            m: &HashMap<String, String>,
            key: &str,
        ) -> Result<Option<T>> {
            m.get(key)
                .map(|v| {
                    serde_json::from_str(v)
                        .with_context(|| format!("{}: metadata {key} = {v:?} is malformed", path.display()))
                })
                .transpose()
        }
        let spacing: Option<[f64; 3]> = get(path, &metadata, SPACING)?;
        if let Some(s) = spacing {
            ensure!(
                s.iter().all(|v| v.is_finite() && *v > 0.0),
                "{}: metadata {SPACING} {s:?} is not a spacing in mm",
                path.display()
            );
        }
        let patch: Option<[usize; 3]> = get(path, &metadata, PATCH)?;
        if let Some(p) = patch {
            crate::model::check_patch(p).with_context(|| format!("{}: metadata {PATCH}", path.display()))?;
        }
        let window: Option<[f32; 2]> = get(path, &metadata, WINDOW)?;
        let classes: Option<Vec<String>> = get(path, &metadata, "classes")?;
        let backbone_fingerprint = metadata.get(BACKBONE_FINGERPRINT).cloned();
        Ok(Recorded { file: path.to_path_buf(), spacing, patch, window, classes, backbone_fingerprint, metadata })
    }

    /// Refuse a file whose features were scaled with another intensity window than the one
    /// this build applies (`embed::INFERENCE_WINDOW`): its head or backbone would see other inputs.
    pub fn check_window(&self) -> Result<()> {
        let (lo, hi) = super::embed::INFERENCE_WINDOW;
        if let Some(w) = self.window {
            ensure!(
                w == [lo, hi],
                "{}: trained with the intensity window {:?} HU, but this version scales CT by {:?} HU",
                self.file.display(),
                w,
                [lo, hi]
            );
        }
        Ok(())
    }
}

/// The metadata entries that describe preprocessing: spacing, patch and intensity window.
pub fn preprocessing_metadata(spacing: [f64; 3], patch: [usize; 3]) -> Vec<(&'static str, String)> {
    let (lo, hi) = super::embed::INFERENCE_WINDOW;
    vec![
        (SPACING, serde_json::json!(spacing).to_string()),
        (PATCH, serde_json::json!(patch).to_string()),
        (WINDOW, serde_json::json!([lo, hi]).to_string()),
    ]
}

/// This process's command line, shell-quoted where needed: what made a file.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a command does when a flag contradicts a recorded setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnContradiction {
    /// Refuse, naming both values and `--override-recorded`.
    Error,
    /// Use the flag, with a warning naming both values.
    Warn,
    /// Use the flag (`--override-recorded`), with a note.
    Override,
}

/// A setting's value and where it came from: the flag when given (checked against the
/// recorded value per `on`), else the recorded value, else `default` (with a note when a
/// file was given but recorded nothing). `show` prints a value as the flag takes it.
#[allow(clippy::too_many_arguments)]
pub fn choose<T: PartialEq + Copy>(
    setting: &str,
    flag_name: &str,
    flag: Option<T>,
    recorded: Option<T>,
    file: &Path,
    default: T,
    on: OnContradiction,
    show: impl Fn(&T) -> String,
) -> Result<T> {
    match (flag, recorded) {
        (Some(f), Some(r)) if f != r => match on {
            OnContradiction::Error => bail!(
                "{flag_name} {} contradicts {}, which records {setting} {}; drop {flag_name} to use the recorded value, or pass --override-recorded to use {} anyway",
                show(&f),
                file.display(),
                show(&r),
                show(&f)
            ),
            OnContradiction::Warn => {
                eprintln!(
                    "warning: {flag_name} {} differs from the {setting} {} recorded in {}",
                    show(&f),
                    show(&r),
                    file.display()
                );
                Ok(f)
            }
            OnContradiction::Override => {
                eprintln!(
                    "note: {flag_name} {} overrides the {setting} {} recorded in {} (--override-recorded)",
                    show(&f),
                    show(&r),
                    file.display()
                );
                Ok(f)
            }
        },
        (Some(f), _) => Ok(f),
        (None, Some(r)) => Ok(r),
        (None, None) => Ok(default),
    }
}

/// `choose`'s `show` for X,Y,Z triples as the flags take them ("1,1,2").
pub fn xyz<T: std::fmt::Display>(v: &[T; 3]) -> String {
    format!("{},{},{}", v[0], v[1], v[2])
}

/// A fingerprint of a backbone's weights and BatchNorm statistics (the `backbone.` slots'
/// names and f32 values, in slot order; num_batches_tracked, which no output depends on, left
/// out): CRC-32 plus the value count, e.g. `crc32:1a2b3c4d/5234016`. The same weights give the
/// same fingerprint whichever file format they were read from.
pub fn backbone_fingerprint(store: &ParamStore) -> Result<String> {
    let mut h = crc32fast::Hasher::new();
    let mut n = 0usize;
    for s in store.slots().iter().filter(|s| s.name.starts_with(BACKBONE_PREFIX) && s.kind != SlotKind::Counter) {
        h.update(s.name.as_bytes());
        let v = if s.value.is_cuda() { s.value.to_f32_vec()? } else { s.value.f32s().to_vec() };
        h.update(bytemuck::cast_slice(&v));
        n += v.len();
    }
    ensure!(n > 0, "no backbone parameters to fingerprint");
    Ok(format!("crc32:{:08x}/{n}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contradicting_flag_is_refused_with_both_values() {
        let f = Path::new("head.safetensors");
        let e = choose(
            "spacing",
            "--spacing",
            Some([1.0, 1.0, 2.0]),
            Some([4.0, 4.0, 4.0]),
            f,
            [1.0, 1.0, 2.0],
            OnContradiction::Error,
            xyz,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--spacing 1,1,2")
                && e.contains("spacing 4,4,4")
                && e.contains("head.safetensors")
                && e.contains("--override-recorded"),
            "{e}"
        );
        // Agreement, absence and override are not errors.
        assert_eq!(
            choose("spacing", "--spacing", Some([4.0; 3]), Some([4.0; 3]), f, [1.0; 3], OnContradiction::Error, xyz)
                .unwrap(),
            [4.0; 3]
        );
        assert_eq!(
            choose("spacing", "--spacing", None, Some([4.0; 3]), f, [1.0; 3], OnContradiction::Error, xyz).unwrap(),
            [4.0; 3]
        );
        assert_eq!(
            choose("spacing", "--spacing", None, None, f, [1.0; 3], OnContradiction::Error, xyz).unwrap(),
            [1.0; 3]
        );
        assert_eq!(
            choose("spacing", "--spacing", Some([2.0; 3]), Some([4.0; 3]), f, [1.0; 3], OnContradiction::Override, xyz)
                .unwrap(),
            [2.0; 3]
        );
    }

    #[test]
    fn malformed_recorded_settings_are_errors_not_absent() {
        let f = Path::new("x.safetensors");
        let meta = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        for (k, v) in [
            (SPACING, "[1,1]"),
            (SPACING, "[0,1,2]"),
            (PATCH, "[128,128]"),
            (PATCH, "[0,128,32]"),
            (WINDOW, "\"wide\""),
            ("classes", "3"),
        ] {
            let e = Recorded::from_metadata(f, meta(k, v)).unwrap_err();
            assert!(format!("{e:#}").contains("x.safetensors"), "{k}={v}: {e:#}");
        }
        let r = Recorded::from_metadata(f, meta(SPACING, "[4.0,4.0,4.0]")).unwrap();
        assert_eq!(r.spacing, Some([4.0; 3]));
        assert!(r.patch.is_none() && r.window.is_none());
        let other = Recorded::from_metadata(f, meta(WINDOW, "[-1000.0,1000.0]")).unwrap();
        assert!(other.check_window().is_err());
        let ours = Recorded::from_metadata(
            f,
            preprocessing_metadata([1.0, 1.0, 2.0], [128, 128, 32])
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
        .unwrap();
        ours.check_window().unwrap();
        assert_eq!((ours.spacing, ours.patch), (Some([1.0, 1.0, 2.0]), Some([128, 128, 32])));
    }
}
