//! Seed corpus for the fuzz targets (fuzz/), made from the shared data so that nothing of it is
//! committed: `cargo run --release --example fuzz_seeds -- ../shared/data fuzz/corpus`.
//!
//! - nifti/: each shared CT and label map cut down to a small block (its own 348-byte header,
//!   dims patched, voxels copied from the middle of the volume in the file's datatype), as
//!   `.nii` and as `.nii.gz`, plus a copy with an extension gap (vox_offset 1024).
//! - checkpoint/: checkpoints of the tiny model the target loads (with and without Adam).
//! - npy/: small float32 arrays, format 1.0 and 2.0.
//! - dataset_json/: the shared datasets' dataset.json, and a v1-style and a region-based one.
//! - torch_weights/: the small PyTorch files of tests/data/weights.
//! - dicom/: 1, 2 and 4 slices of the test series (tests/data/dicom), joined by the dicom
//!   target's separator.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

fn gunzip(raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw.as_slice()).read_to_end(&mut out)?;
    Ok(out)
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes)?;
    Ok(e.finish()?)
}

/// A `block`-sized NIfTI cut from the middle of `file` (a little-endian single-file NIfTI-1),
/// with its voxels starting at `offset` (≥ 352).
fn small_nifti(file: &[u8], block: [usize; 3], offset: usize) -> Result<Vec<u8>> {
    ensure!(file.len() >= 352 && i32::from_le_bytes(file[0..4].try_into()?) == 348, "not a little-endian NIfTI-1");
    let dim = |i: usize| i16::from_le_bytes([file[40 + 2 * i], file[41 + 2 * i]]) as usize;
    let shape = [dim(1), dim(2), dim(3)];
    let bytes_per = (i16::from_le_bytes([file[72], file[73]]) as usize / 8).max(1);
    let start = f32::from_le_bytes(file[108..112].try_into()?) as usize;
    let b = [block[0].min(shape[0]), block[1].min(shape[1]), block[2].min(shape[2])];
    let lo = [(shape[0] - b[0]) / 2, (shape[1] - b[1]) / 2, (shape[2] - b[2]) / 2];
    let mut out = file[..348].to_vec();
    for (i, &n) in b.iter().enumerate() {
        out[42 + 2 * i..44 + 2 * i].copy_from_slice(&(n as i16).to_le_bytes());
    }
    out[108..112].copy_from_slice(&(offset as f32).to_le_bytes());
    out.resize(offset, 0);
    for z in 0..b[2] {
        for y in 0..b[1] {
            for x in 0..b[0] {
                let i = (lo[0] + x) + shape[0] * ((lo[1] + y) + shape[1] * (lo[2] + z));
                out.extend_from_slice(
                    file.get(start + i * bytes_per..start + (i + 1) * bytes_per).context("voxel past the end")?,
                );
            }
        }
    }
    Ok(out)
}

fn nifti_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            nifti_files(&p, out)?;
        } else if vox2vec::data::sources::is_nifti(&p) {
            out.push(p);
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    ensure!(args.len() == 3, "usage: fuzz_seeds SHARED_DATA_DIR CORPUS_DIR");
    let (data, corpus) = (Path::new(&args[1]), Path::new(&args[2]));
    let dir = |t: &str| -> Result<PathBuf> {
        let d = corpus.join(t);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };

    let nifti = dir("nifti")?;
    let mut files = Vec::new();
    nifti_files(data, &mut files)?;
    let mut n = 0;
    for f in &files {
        // The large pretraining CTs only add decompression time; their headers are like the rest.
        if std::fs::metadata(f)?.len() > 4 << 20 {
            continue;
        }
        let file = gunzip(std::fs::read(f)?).with_context(|| f.display().to_string())?;
        let stem = f.file_name().unwrap().to_string_lossy().replace(".nii.gz", "").replace(".nii", "");
        for (tag, block, offset) in [("a", [6, 5, 4], 352), ("b", [3, 4, 2], 352), ("gap", [4, 4, 3], 1024)] {
            let small = small_nifti(&file, block, offset).with_context(|| f.display().to_string())?;
            std::fs::write(nifti.join(format!("{stem}-{tag}.nii")), &small)?;
            if tag == "a" {
                std::fs::write(nifti.join(format!("{stem}-{tag}.nii.gz")), gzip(&small)?)?;
            }
            n += 1;
        }
    }

    let ckpt = dir("checkpoint")?;
    let config = vox2vec::model::ModelConfig {
        fpn: vox2vec::model::FpnConfig { in_channels: 1, base_channels: 2, num_scales: 2 },
        proj_dim: 4,
        ..Default::default()
    };
    let model = vox2vec::model::Vox2Vec::new(config, 1);
    let adam = vox2vec::optim::Adam::new(vox2vec::optim::AdamConfig::default(), &model.store);
    vox2vec::checkpoint::save(
        &ckpt.join("with-adam.safetensors"),
        &config,
        &model.store,
        Some(&adam),
        &[("step", "3".into())],
    )?;
    vox2vec::checkpoint::save(&ckpt.join("weights.safetensors"), &config, &model.store, None, &[])?;

    let npy = dir("npy")?;
    vox2vec::eval::npy::write_f32(
        &npy.join("a.npy"),
        &[2, 3, 4],
        &(0..24).map(|i| i as f32 * 0.5 - 3.0).collect::<Vec<_>>(),
    )?;
    vox2vec::eval::npy::write_f32(&npy.join("one.npy"), &[1], &[1.0])?;
    let v1 = std::fs::read(npy.join("a.npy"))?;
    // The same array in format 2.0 (4-byte header length).
    let hlen = u16::from_le_bytes([v1[8], v1[9]]) as usize;
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&(hlen as u32).to_le_bytes());
    v2.extend_from_slice(&v1[10..]);
    std::fs::write(npy.join("a-v2.npy"), v2)?;

    let json = dir("dataset_json")?;
    for ds in std::fs::read_dir(data)?.filter_map(|e| e.ok().map(|e| e.path())) {
        let p = ds.join("dataset.json");
        if p.is_file() {
            std::fs::copy(&p, json.join(format!("{}.json", ds.file_name().unwrap().to_string_lossy())))?;
        }
    }
    std::fs::write(
        json.join("v1.json"),
        r#"{"labels": {"0": "background", "1": "liver", "2": "spleen"}, "modality": {"0": "CT"}, "numTraining": 2}"#,
    )?;
    std::fs::write(
        json.join("regions.json"),
        r#"{"labels": {"background": 0, "organ": [1, 2], "tumour": 2}, "file_ending": ".nii.gz"}"#,
    )?;
    // PyTorch files as published (tests/data/weights: zip, legacy and Lightning), the small ones.
    let torch = dir("torch_weights")?;
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/weights");
    for f in std::fs::read_dir(&weights)
        .with_context(|| weights.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
    {
        if f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fpn_tiny")) {
            std::fs::copy(&f, torch.join(f.file_name().unwrap()))?;
        }
    }
    // DICOM series (tests/data/dicom): 1, 2 and 4 neighbouring slices, uncompressed and RLE,
    // joined by the separator the dicom target cuts at.
    let dicom = dir("dicom")?;
    let series_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom");
    for (kind, counts) in [("series", &[1usize, 2, 4][..]), ("rle", &[2][..])] {
        let mut slices: Vec<PathBuf> =
            std::fs::read_dir(series_dir.join(kind))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        slices.sort();
        for &k in counts {
            let mut seed = Vec::new();
            for (i, f) in slices.iter().take(k).enumerate() {
                if i > 0 {
                    seed.extend_from_slice(b"--VOX2VEC-SLICE--");
                }
                seed.extend(std::fs::read(f)?);
            }
            std::fs::write(dicom.join(format!("{kind}-{k}.bin")), seed)?;
        }
    }
    println!(
        "seeds in {}: {n} NIfTI blocks from {} files, 2 checkpoints, 3 .npy, dataset.json files, PyTorch weights, 4 DICOM series",
        corpus.display(),
        files.len()
    );
    Ok(())
}
