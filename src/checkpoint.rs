//! Checkpoints in safetensors.
//!
//! Keys: the model's parameters and buffers under their PyTorch state_dict keys with the
//! prefixes `backbone.` and `head.`, in PyTorch layouts (conv weights [Co, Ci, kx, ky, kz],
//! num_batches_tracked int64); Adam's moments as `optim.exp_avg.<key>` and
//! `optim.exp_avg_sq.<key>`. Metadata: `format`, `step` (optimiser steps), `model_config`
//! (JSON) and any caller-provided extras.
//!
//! Loading reads every format `weights::read` accepts: also bare FPN3d state_dicts (safetensors
//! or PyTorch `.pt`) and Lightning checkpoints, whose module prefixes map to `backbone.` / `head.`.
//!
//! Writing is atomic: a temporary file in the same folder, fsync, then rename.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, TensorView};

use crate::model::ModelConfig;
use crate::optim::Adam;
use crate::params::{ParamStore, SlotKind};

pub const FORMAT: &str = "vox2vec-rs/1";

enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Serialize `store` (and optionally the optimiser) to `path`, atomically.
pub fn save(
    path: &Path,
    config: &ModelConfig,
    store: &ParamStore,
    adam: Option<&Adam>,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Data)> = Vec::new();
    for (i, s) in store.slots().iter().enumerate() {
        let shape = store.pytorch_shape(i);
        let data = match s.kind {
            SlotKind::Counter => Data::I64(s.value.i64s().to_vec()),
            // Device tensors are copied to the host here (checkpoints of GPU runs).
            _ if s.value.is_cuda() => Data::F32(store.to_pytorch_f32(i, &s.value.to_f32_vec()?)),
            _ => Data::F32(store.to_pytorch_f32(i, s.value.f32s())),
        };
        owned.push((s.name.clone(), shape, data));
        if let Some(adam) = adam
            && let Some((m, v)) = adam.moments_on_host(i)?
        {
            owned.push((
                format!("optim.exp_avg.{}", s.name),
                store.pytorch_shape(i),
                Data::F32(store.to_pytorch_f32(i, &m)),
            ));
            owned.push((
                format!("optim.exp_avg_sq.{}", s.name),
                store.pytorch_shape(i),
                Data::F32(store.to_pytorch_f32(i, &v)),
            ));
        }
    }
    // A diverged run must not replace a good checkpoint with NaN weights.
    for (name, _, data) in &owned {
        if let Data::F32(v) = data {
            let bad = v.iter().filter(|x| !x.is_finite()).count();
            anyhow::ensure!(
                bad == 0,
                "{name} has {bad} non-finite values (of {}): not writing {} (the previous checkpoint, if any, is kept); the run diverged — lower --lr",
                v.len(),
                path.display()
            );
        }
    }
    let views = owned
        .iter()
        .map(|(name, shape, data)| {
            let view = match data {
                Data::F32(v) => TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v)),
                Data::I64(v) => TensorView::new(Dtype::I64, shape.clone(), bytemuck::cast_slice(v)),
            }?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("model_config".to_string(), config_to_json(config));
    if let Some(a) = adam {
        meta.insert("step".to_string(), a.step.to_string());
    }
    for (k, v) in extra {
        meta.insert(k.to_string(), v.clone());
    }
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp).with_context(|| format!("writing {}", tmp.display()))?;
        sort_metadata_in_place(tmp)
    })
}

/// The safetensors writer emits `__metadata__` in HashMap order, which differs from process to
/// process, so two identical training runs would write checkpoints that differ in their
/// header bytes. Rewrites that object with its keys sorted: the same entries, the same length,
/// so nothing else in the file moves, and identical runs give identical files.
fn sort_metadata_in_place(file: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("reading {}", file.display()))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).with_context(|| format!("reading {}", file.display()))?;
    const KEY: &[u8] = b"\"__metadata__\":";
    let Some(at) = header.windows(KEY.len()).position(|w| w == KEY) else { return Ok(()) };
    let start = at + KEY.len();
    let mut it = serde_json::Deserializer::from_slice(&header[start..])
        .into_iter::<std::collections::BTreeMap<String, String>>();
    let Some(Ok(sorted)) = it.next() else { return Ok(()) };
    let end = start + it.byte_offset();
    let text = serde_json::to_vec(&sorted)?;
    if text.len() != end - start {
        return Ok(()); // not the compact form this was written for: leave it valid as it is
    }
    header[start..end].copy_from_slice(&text);
    f.seek(SeekFrom::Start(8)).and_then(|_| f.write_all(&header)).with_context(|| format!("writing {}", file.display()))
}

/// Write `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// The prefix of every temporary name we create (files and folders), followed by the
/// writing process's id: `remove_stale_temp_files` recognises and removes those of dead
/// processes.
pub const TEMP_PREFIX: &str = ".vox2vec-tmp-";

/// Atomic replacement of `path`: `write` fills a file inside a private temporary folder
/// beside `path` (so that whatever temporary files the writer makes itself, such as the
/// safetensors crate's `.tmpXXXXXX`, carry our recognisable name too), which is synced to disk
/// and renamed over `path`; on any error the temporary folder is removed and `path` is
/// untouched.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?.to_string_lossy();
    // The temporary name keeps the extension (writers such as NIfTI's choose gzip from it and
    // rewrite names with extra dots) and is unique per process and call.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let ext = if name.ends_with(".nii.gz") {
        ".nii.gz".to_string()
    } else {
        path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default()
    };
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp_dir = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
    fs::create_dir(&tmp_dir)
        .with_context(|| format!("creating temporary folder {} (is {} writable?)", tmp_dir.display(), dir.display()))?;
    let tmp = tmp_dir.join(format!("file{ext}"));
    let result = (|| -> Result<()> {
        write(&tmp)?;
        injected_write_error(path)?;
        // Writers such as the safetensors crate create their files 0600; the result gets
        // what a plain create would give under this process's umask.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666 & !process_umask()))
                .with_context(|| format!("setting the permissions of {}", tmp.display()))?;
        }
        let f = fs::File::open(&tmp).with_context(|| format!("opening {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
        paused_write(path);
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp_dir);
    result.with_context(|| format!("could not write {} (any previous version of it is unchanged)", path.display()))
}

/// This process's umask, from /proc/self/status (Linux 4.7+; 022 elsewhere): reading it
/// there, unlike umask(2), does not change it under other threads.
#[cfg(unix)]
fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok()))
        })
        .unwrap_or(0o022)
}

/// Testing hook for full disks: with `VOX2VEC_INJECT_WRITE_ERROR=<text>`, every write of a
/// file whose path contains <text> fails as the disk being full would (ENOSPC), after the
/// temporary file was written, so that the clean-up and the error paths run for real.
pub fn injected_write_error(path: &Path) -> Result<()> {
    match std::env::var_os("VOX2VEC_INJECT_WRITE_ERROR") {
        Some(t) if !t.is_empty() && path.to_string_lossy().contains(&*t.to_string_lossy()) => {
            Err(std::io::Error::from_raw_os_error(28))
                .with_context(|| format!("writing {} (injected by VOX2VEC_INJECT_WRITE_ERROR)", path.display()))
        }
        _ => Ok(()),
    }
}

/// Testing hook for kills during a write: with `VOX2VEC_PAUSE_WRITE=<text>`, a write of a file
/// whose path contains <text> waits 10 s with its temporary complete and synced, before the
/// rename, so that a test can kill the process inside the write.
fn paused_write(path: &Path) {
    if let Some(t) = std::env::var_os("VOX2VEC_PAUSE_WRITE")
        && !t.is_empty()
        && path.to_string_lossy().contains(&*t.to_string_lossy())
    {
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
}

/// Whether process `pid` is running (Linux: /proc; elsewhere every process counts as alive,
/// so nothing is removed).
fn process_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Remove, in `dir`, the temporary files and folders that processes which have died (killed
/// while writing) left behind: names `TEMP_PREFIX<pid>-…` whose pid is not running. Returns
/// how many were removed. A missing folder has none.
pub fn remove_stale_temp_files(dir: &Path) -> Result<usize> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TEMP_PREFIX) else { continue };
        let Some(pid) = rest.split(['-', '.']).next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        r.with_context(|| format!("removing the stale temporary {}", p.display()))?;
        removed += 1;
    }
    Ok(removed)
}

pub fn config_to_json(c: &ModelConfig) -> String {
    serde_json::json!({
        "in_channels": c.fpn.in_channels,
        "base_channels": c.fpn.base_channels,
        "num_scales": c.fpn.num_scales,
        "proj_dim": c.proj_dim,
        "temperature": c.temperature,
    })
    .to_string()
}

/// What `load` found in a file.
#[derive(Debug)]
pub struct Loaded {
    pub metadata: HashMap<String, String>,
    pub step: Option<u64>,
    pub loaded_keys: usize,
    /// Model slots the file did not contain (e.g. the head in a backbone-only file).
    pub missing: Vec<String>,
}

/// Load parameters (and the optimiser state, if `adam` is given and the file has it) into
/// `store`. Unknown keys and shape mismatches are errors naming the file and key; nothing is
/// modified unless the whole file is valid.
pub fn load(path: &Path, store: &mut ParamStore, adam: Option<&mut Adam>) -> Result<Loaded> {
    load_impl(path, store, adam, true)
}

/// `load` for stores whose keys are taken literally (segmentation heads: `layers.0.weight`, …).
pub fn load_exact(path: &Path, store: &mut ParamStore) -> Result<Loaded> {
    load_impl(path, store, None, false)
}

fn load_impl(
    path: &Path,
    store: &mut ParamStore,
    adam: Option<&mut Adam>,
    bare_keys_are_backbone: bool,
) -> Result<Loaded> {
    let file = crate::weights::read(path, naming(bare_keys_are_backbone))?;
    load_file(file, store, adam)
}

fn naming(bare_keys_are_backbone: bool) -> crate::weights::Naming {
    if bare_keys_are_backbone { crate::weights::Naming::Model } else { crate::weights::Naming::Literal }
}

/// `load` (`bare_keys_are_backbone`) or `load_exact` on a safetensors file's bytes; `path` only
/// names it in errors. The fuzz target's entry point (fuzz/fuzz_targets/checkpoint.rs).
pub fn load_bytes(
    path: &Path,
    bytes: &[u8],
    store: &mut ParamStore,
    adam: Option<&mut Adam>,
    bare_keys_are_backbone: bool,
) -> Result<Loaded> {
    let file = crate::weights::from_safetensors(path, bytes, naming(bare_keys_are_backbone))?;
    load_file(file, store, adam)
}

/// Load an already read weights file (any format `weights::read` accepts) into `store`.
pub fn load_file(file: crate::weights::WeightsFile, store: &mut ParamStore, adam: Option<&mut Adam>) -> Result<Loaded> {
    use crate::weights::Values;
    let path = file.path.as_path();
    let metadata = file.metadata;
    // Validate and convert everything first, then commit.
    let mut params: Vec<(usize, Vec<usize>, Option<Vec<f32>>, Option<Vec<i64>>)> = Vec::new();
    let mut moments: Vec<(bool, usize, Vec<f32>)> = Vec::new();
    for e in file.entries {
        let key = &e.source_name;
        let (is_moment, first, name) = if let Some(k) = e.name.strip_prefix("optim.exp_avg_sq.") {
            (true, false, k.to_string())
        } else if let Some(k) = e.name.strip_prefix("optim.exp_avg.") {
            (true, true, k.to_string())
        } else {
            (false, false, e.name.clone())
        };
        let Some(slot) = store.find(&name) else {
            bail!(
                "{}: key {key} does not belong to this model (configuration {:?})",
                path.display(),
                metadata.get("model_config")
            );
        };
        let shape = e.shape;
        let (f, i) = match e.values {
            Values::F32(v) => (Some(v), None),
            Values::I64(v) => (None, Some(v)),
        };
        if let Some(bad) = f.as_ref().and_then(|v| v.iter().position(|x| !x.is_finite())) {
            // A diverged run's weights: loading them would only train or predict NaN.
            bail!(
                "{}: {key} holds a non-finite value ({} at element {bad}); the checkpoint is refused",
                path.display(),
                f.as_ref().unwrap()[bad]
            );
        }
        if is_moment {
            if store.slots()[slot].kind != SlotKind::Trainable {
                bail!("{}: {key} is an optimiser moment of {name}, which is not trained", path.display());
            }
            let expect = store.pytorch_shape(slot);
            if shape != expect {
                bail!("{}: {key} has shape {shape:?}, expected {expect:?}", path.display());
            }
            let Some(f) = f else { bail!("{}: {key} must be floating point", path.display()) };
            moments.push((first, slot, store.from_pytorch_f32(slot, &f)));
        } else {
            params.push((slot, shape, f, i));
        }
    }
    let mut seen = vec![false; store.len()];
    for (slot, shape, f, _) in &params {
        // Check shape and dtype before touching the store.
        let expect = store.pytorch_shape(*slot);
        if shape != &expect && !(shape.iter().product::<usize>() == 1 && expect.iter().product::<usize>() == 1) {
            bail!(
                "{}: {} has shape {shape:?}, this model expects {expect:?}",
                path.display(),
                store.slots()[*slot].name
            );
        }
        if f.is_none() && store.slots()[*slot].kind != SlotKind::Counter {
            bail!("{}: {} must be floating point", path.display(), store.slots()[*slot].name);
        }
        seen[*slot] = true;
    }
    let loaded_keys = params.len();
    for (slot, shape, f, i) in params {
        store
            .load_pytorch(slot, &shape, f.as_deref(), i.as_deref())
            .with_context(|| format!("loading {}", path.display()))?;
    }
    let step = metadata.get("step").and_then(|s| s.parse().ok());
    if let Some(adam) = adam {
        for (first, slot, v) in moments {
            if first { adam.exp_avg[slot] = Some(v) } else { adam.exp_avg_sq[slot] = Some(v) }
        }
        if let Some(s) = step {
            adam.step = s;
        }
    }
    let missing = store.slots().iter().zip(&seen).filter(|(_, s)| !**s).map(|(s, _)| s.name.clone()).collect();
    Ok(Loaded { metadata, step, loaded_keys, missing })
}
