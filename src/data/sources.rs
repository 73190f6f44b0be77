//! Which files a run reads: a NIfTI file, a DICOM series (a folder of DICOM files, or a
//! DICOMDIR: one CT), a folder of NIfTI files or series (searched recursively), an
//! nnU-Net raw dataset folder (its imagesTr), or a text file with one path per line
//! (relative paths are relative to the text file; blank lines and # comments ignored).
//! Then preprocessing into the cache, in parallel, with a per-file verdict.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use super::cache::{cache_key, get_or_build};
use super::preprocess::PreprocessConfig;

pub fn is_nifti(p: &Path) -> bool {
    let n = p.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// An nnU-Net raw dataset folder: dataset.json beside imagesTr. Only its imagesTr holds CTs
/// (labelsTr holds label maps, imagesTs may be unlabelled test cases of another split).
fn is_nnunet_dataset(dir: &Path) -> bool {
    dir.join("imagesTr").is_dir() && dir.join("dataset.json").is_file()
}

/// The NIfTI files below `dir`, sorted; inside an nnU-Net dataset (at any depth) only imagesTr.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if is_nnunet_dataset(dir) {
        return walk_all(&dir.join("imagesTr"), out);
    }
    walk_all(dir, out)
}

fn walk_all(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    // A folder of DICOM files is one CT (its series), not a folder to search.
    if super::dicom::is_dicom_input(dir) {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_nifti(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// The NIfTI files named by `input`.
pub fn discover(input: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if input.is_dir() {
        walk(input, &mut out)?;
    } else if input.is_file() {
        if is_nifti(input) {
            out.push(input.to_path_buf());
        } else if super::dicom::is_dicom_input(input) {
            // A DICOMDIR: its folder's series.
            out.push(input.parent().unwrap_or(Path::new(".")).to_path_buf());
        } else {
            let text = std::fs::read_to_string(input).with_context(|| format!("reading list {}", input.display()))?;
            let base = input.parent().unwrap_or(Path::new("."));
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let p = Path::new(line);
                out.push(if p.is_absolute() { p.to_path_buf() } else { base.join(p) });
            }
        }
    } else {
        bail!("{}: no such file or folder", input.display());
    }
    if out.is_empty() {
        bail!("{}: no CT found (NIfTI files .nii / .nii.gz, or DICOM series folders)", input.display());
    }
    Ok(out)
}

/// What happened to one file.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// Preprocessed now, or found in the cache.
    Ready {
        entry: PathBuf,
        cached: bool,
        shape: [usize; 3],
        replaced_nonfinite: usize,
    },
    Skipped {
        reason: String,
    },
    /// Its cache entry could not be written (the cache's problem, not the file's).
    CacheFailed {
        reason: String,
    },
}

/// Preprocess every file into `cache` (multi-threaded). `min_shape`: volumes smaller than this
/// after resampling are skipped (the patch size, for pretraining). `tick` is called once per
/// file (for a progress bar). Per-file failures are verdicts, never panics.
pub fn prepare_all(
    files: &[PathBuf],
    cache: &Path,
    cfg: &PreprocessConfig,
    min_shape: [usize; 3],
    tick: &(dyn Fn(&Path) + Sync),
) -> Vec<(PathBuf, Verdict)> {
    files
        .par_iter()
        .map(|f| {
            let verdict = match get_or_build(f, cache, cfg) {
                Ok((e, cached)) => {
                    let s = e.ct.shape;
                    if s.iter().zip(&min_shape).any(|(a, b)| a < b) {
                        Verdict::Skipped {
                            reason: format!("smaller than the patch after resampling: {s:?} < {min_shape:?}"),
                        }
                    } else {
                        Verdict::Ready {
                            entry: cache.join(cache_key(f, cfg).unwrap_or_default()),
                            cached,
                            shape: s,
                            replaced_nonfinite: e.replaced_nonfinite,
                        }
                    }
                }
                Err(e) if e.downcast_ref::<super::cache::CacheWriteError>().is_some() => {
                    Verdict::CacheFailed { reason: format!("{e:#}") }
                }
                Err(e) => {
                    // The verdict is reported beside the file name: drop a leading copy of it.
                    let msg = format!("{e:#}");
                    let prefix = format!("{}: ", f.display());
                    Verdict::Skipped { reason: msg.strip_prefix(&prefix).map(str::to_string).unwrap_or(msg) }
                }
            };
            tick(f);
            (f.clone(), verdict)
        })
        .collect()
}

/// The outcome of preparing an input for a run.
pub struct PrepareReport {
    pub files: usize,
    /// Cache entries of the usable volumes, in input order.
    pub entries: Vec<PathBuf>,
    /// The input files of those entries, in the same order (what a checkpoint records as its data).
    pub sources: Vec<PathBuf>,
    /// Preprocessed now / found in the cache.
    pub fresh: usize,
    pub cached: usize,
    /// Every unusable file and why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Usable files whose non-finite voxels were replaced by the image minimum, and how many.
    pub repaired: Vec<(PathBuf, usize)>,
}

impl PrepareReport {
    /// The closing summary: counts, then one line per skipped file.
    pub fn summary(&self, cache: &Path) -> String {
        let mut s = format!(
            "{} files: {} usable ({} preprocessed now, {} already in {}), {} unusable",
            self.files,
            self.entries.len(),
            self.fresh,
            self.cached,
            cache.display(),
            self.skipped.len()
        );
        for (f, n) in &self.repaired {
            s += &format!(
                "\n  repaired {}: {n} NaN or infinite voxels replaced by the image minimum (--nonfinite minimum)",
                f.display()
            );
        }
        for (f, why) in &self.skipped {
            s += &format!("\n  unusable {}: {why}", f.display());
        }
        s
    }
}

/// `discover` + `prepare_all` with a progress bar (rate and ETA) on standard error.
pub fn prepare_input(
    input: &Path,
    cache: &Path,
    cfg: &PreprocessConfig,
    min_shape: [usize; 3],
) -> Result<PrepareReport> {
    prepare_input_excluding(input, cache, cfg, min_shape, &[])
}

/// `prepare_input` without the files whose path contains one of `exclude` (held-out CTs: the
/// patients a probe evaluates on must not be pretrained on). Excluding everything is an error.
pub fn prepare_input_excluding(
    input: &Path,
    cache: &Path,
    cfg: &PreprocessConfig,
    min_shape: [usize; 3],
    exclude: &[String],
) -> Result<PrepareReport> {
    use indicatif::{ProgressBar, ProgressStyle};
    let mut files = discover(input)?;
    let before = files.len();
    files.retain(|f| !exclude.iter().any(|x| !x.is_empty() && f.to_string_lossy().contains(x.as_str())));
    anyhow::ensure!(!files.is_empty(), "{}: all {before} files are excluded ({})", input.display(), exclude.join(", "));
    let stale = crate::checkpoint::remove_stale_temp_files(cache)
        .with_context(|| format!("cache folder {}", cache.display()))?;
    if stale > 0 {
        eprintln!("removed {stale} temporary file(s) left in {} by an interrupted run", cache.display());
    }
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(ProgressStyle::with_template(
        "preprocessing {bar:30} {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
    )?);
    let verdicts = prepare_all(&files, cache, cfg, min_shape, &|f: &Path| {
        bar.set_message(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        bar.inc(1);
    });
    bar.finish_and_clear();
    let mut r = PrepareReport {
        files: files.len(),
        entries: Vec::new(),
        sources: Vec::new(),
        fresh: 0,
        cached: 0,
        skipped: Vec::new(),
        repaired: Vec::new(),
    };
    for (f, v) in verdicts {
        match v {
            Verdict::Ready { entry, cached, replaced_nonfinite, .. } => {
                if cached {
                    r.cached += 1
                } else {
                    r.fresh += 1
                }
                if replaced_nonfinite > 0 {
                    r.repaired.push((f.clone(), replaced_nonfinite));
                }
                r.entries.push(entry);
                r.sources.push(f);
            }
            Verdict::Skipped { reason } => r.skipped.push((f, reason)),
            Verdict::CacheFailed { reason } => bail!(
                "{reason} (while preprocessing {}; free space or choose another folder with --cache)",
                f.display()
            ),
        }
    }
    Ok(r)
}
