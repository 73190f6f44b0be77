//! The preprocessing cache: one safetensors file per source volume, holding the int16 HU
//! volume on the target grid ("hu"), its body mask packed 8 voxels per byte ("body_bits",
//! uint8, most significant bit first, flat [X, Y, Z] order — the body-voxel coordinates at
//! 1/16 of the volume's size) and metadata (source path, file affine and orientation, crop box, spacings, settings).
//!
//! Key: FNV-1a of (format version, absolute source path, file size, modification time,
//! preprocessing settings). Editing a file or changing a setting changes the key, so a stale
//! entry is never used. Entries are written atomically (temporary file, rename): a run killed
//! midway leaves either a whole entry or none, and a rerun continues where it stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::nifti_io::{Orientation, read_volume_with};
use super::preprocess::{PreprocessConfig, PreprocessedCt, preprocess_ct};

const CACHE_FORMAT: &str = "vox2vec-rs-cache/2";

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The cache file name for `source` under `settings`.
pub fn cache_key(source: &Path, cfg: &PreprocessConfig) -> Result<String> {
    let abs = std::fs::canonicalize(source).with_context(|| format!("{}: cannot resolve path", source.display()))?;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    h = fnv1a(CACHE_FORMAT.as_bytes(), h);
    h = fnv1a(abs.to_string_lossy().as_bytes(), h);
    // A file by its size and time; a DICOM folder by every DICOM file's name, size and time.
    let files = if abs.is_dir() { super::dicom::files_of(&abs)?.1 } else { vec![abs.clone()] };
    for f in &files {
        let meta = std::fs::metadata(f).with_context(|| format!("{}: cannot stat", f.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        if abs.is_dir() {
            h = fnv1a(f.to_string_lossy().as_bytes(), h);
        }
        h = fnv1a(&meta.len().to_le_bytes(), h);
        h = fnv1a(&mtime.to_le_bytes(), h);
    }
    // The settings as they were before the non-finite policy existed, so that entries made
    // under the default stay valid; another policy makes another key.
    h = fnv1a(
        format!("PreprocessConfig {{ body_threshold_hu: {:?}, spacing: {:?} }}", cfg.body_threshold_hu, cfg.spacing)
            .as_bytes(),
        h,
    );
    if cfg.nonfinite != super::nifti_io::NonFinitePolicy::Error {
        h = fnv1a(format!("{:?}", cfg.nonfinite).as_bytes(), h);
    }
    let stem =
        abs.file_name().map(|n| n.to_string_lossy().replace(".nii.gz", "").replace(".nii", "")).unwrap_or_default();
    let stem: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    Ok(format!("{stem}-{h:016x}.safetensors"))
}

/// A cached, preprocessed CT and where it came from.
#[derive(Clone, Debug)]
pub struct CachedCt {
    pub ct: PreprocessedCt,
    pub source: PathBuf,
    pub file_affine: [[f64; 4]; 4],
    pub orientation: Orientation,
    /// Non-finite voxels of the source replaced by its minimum (`--nonfinite minimum`).
    pub replaced_nonfinite: usize,
}

/// Preprocess `source` into `dir`, or return the existing entry.
/// Returns (entry, whether it was already cached).
pub fn get_or_build(source: &Path, dir: &Path, cfg: &PreprocessConfig) -> Result<(CachedCt, bool)> {
    let path = dir.join(cache_key(source, cfg)?);
    if path.is_file() {
        match load_entry(&path) {
            Ok(e) => return Ok((e, true)),
            Err(_) => {
                // A damaged entry (e.g. from another tool or a full disk): rebuild it.
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let entry = build(source, cfg)?;
    let saved = std::fs::create_dir_all(dir)
        .with_context(|| format!("creating cache folder {}", dir.display()))
        .and_then(|()| save_entry(&path, &entry));
    saved.map_err(|e| anyhow::Error::new(CacheWriteError(format!("{e:#}"))))?;
    Ok((entry, false))
}

/// Writing the cache failed (full disk, read-only folder): a problem of the cache folder, not
/// of the input file, so callers stop the run instead of skipping the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the preprocessing cache: {0}")]
pub struct CacheWriteError(pub String);

/// Read and preprocess one source file (no cache).
pub fn build(source: &Path, cfg: &PreprocessConfig) -> Result<CachedCt> {
    let v = read_volume_with(source, cfg.nonfinite)?;
    let ct = preprocess_ct(&v.data, v.shape, v.spacing, cfg).with_context(|| source.display().to_string())?;
    Ok(CachedCt {
        ct,
        source: source.to_path_buf(),
        file_affine: v.geometry.affine,
        orientation: v.geometry.orientation,
        replaced_nonfinite: v.replaced_nonfinite,
    })
}

fn save_entry(path: &Path, e: &CachedCt) -> Result<()> {
    let ct = &e.ct;
    let meta: HashMap<String, String> = [
        ("format", CACHE_FORMAT.to_string()),
        ("source", e.source.to_string_lossy().into_owned()),
        ("file_affine", serde_json::to_string(&e.file_affine)?),
        ("orientation", serde_json::json!({"perm": e.orientation.perm, "flip": e.orientation.flip}).to_string()),
        ("crop_box", serde_json::to_string(&ct.crop_box)?),
        ("source_shape", serde_json::to_string(&ct.source_shape)?),
        ("source_spacing", serde_json::to_string(&ct.source_spacing)?),
        ("spacing", serde_json::to_string(&ct.spacing)?),
        ("replaced_nonfinite", e.replaced_nonfinite.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let hu = TensorView::new(Dtype::I16, ct.shape.to_vec(), bytemuck::cast_slice(&ct.hu))?;
    let n: usize = ct.shape.iter().product();
    let mut bits = vec![0u8; n.div_ceil(8)];
    for &i in &ct.body {
        bits[i as usize / 8] |= 0x80 >> (i % 8);
    }
    let body = TensorView::new(Dtype::U8, vec![bits.len()], &bits)?;
    crate::checkpoint::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(vec![("hu", hu), ("body_bits", body)], Some(meta), tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Load one cache entry.
pub fn load_entry(path: &Path) -> Result<CachedCt> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: not a cache entry", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    ensure!(
        meta.get("format").map(String::as_str) == Some(CACHE_FORMAT),
        "{}: not a {CACHE_FORMAT} entry",
        path.display()
    );
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: damaged cache entry", path.display()))?;
    let hu_v = st.tensor("hu")?;
    let body_v = st.tensor("body_bits")?;
    ensure!(
        hu_v.dtype() == Dtype::I16 && body_v.dtype() == Dtype::U8 && hu_v.shape().len() == 3,
        "{}: unexpected tensors",
        path.display()
    );
    let shape = [hu_v.shape()[0], hu_v.shape()[1], hu_v.shape()[2]];
    let n: usize = shape.iter().product();
    ensure!(body_v.data().len() == n.div_ceil(8), "{}: body mask of the wrong size", path.display());
    let get = |k: &str| meta.get(k).with_context(|| format!("{}: metadata {k} missing", path.display()));
    let orient: serde_json::Value = serde_json::from_str(get("orientation")?)?;
    let perm: [usize; 3] = serde_json::from_value(orient["perm"].clone())?;
    let flip: [bool; 3] = serde_json::from_value(orient["flip"].clone())?;
    let bits = body_v.data();
    let body: Vec<u32> = (0..n as u32).filter(|&i| bits[i as usize / 8] & (0x80 >> (i % 8)) != 0).collect();
    if body.is_empty() {
        bail!("{}: empty body mask", path.display());
    }
    Ok(CachedCt {
        ct: PreprocessedCt {
            hu: bytemuck::pod_collect_to_vec(hu_v.data()),
            shape,
            body,
            crop_box: serde_json::from_str(get("crop_box")?)?,
            source_shape: serde_json::from_str(get("source_shape")?)?,
            source_spacing: serde_json::from_str(get("source_spacing")?)?,
            spacing: serde_json::from_str(get("spacing")?)?,
        },
        source: PathBuf::from(get("source")?),
        file_affine: serde_json::from_str(get("file_affine")?)?,
        orientation: Orientation { perm, flip },
        // Absent in entries written before the setting existed (none were replaced then).
        replaced_nonfinite: match meta.get("replaced_nonfinite") {
            Some(v) => v
                .parse()
                .with_context(|| format!("{}: metadata replaced_nonfinite {v:?} is not a count", path.display()))?,
            None => 0,
        },
    })
}
