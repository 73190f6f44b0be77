//! Compiles `kernels/*.cu` with nvcc into one fatbin embedded in the binary
//! (`OUT_DIR/kernels.fatbin`). Without nvcc, or with no kernels yet, the fatbin is empty and
//! the crate builds the CPU-only engine; this never fails the build for lack of CUDA.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, the project's pip-installed `.cuda/` folder,
//! then PATH.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        candidates.push(Path::new(&h).join("bin/nvcc"));
    }
    candidates.push(root.join(".cuda/bin/nvcc"));
    if let Some(paths) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&paths).map(|p| p.join("nvcc")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn main() {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=VOX2VEC_PTXAS_VERBOSE");
    println!("cargo:rerun-if-changed=kernels");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let mut sources: Vec<PathBuf> = fs::read_dir(root.join("kernels"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu") | Some("cuh")));
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    let write_empty = || fs::write(&out, []).expect("writing empty fatbin");
    if units.is_empty() {
        write_empty();
        return;
    }
    let Some(nvcc) = find_nvcc(&root) else {
        println!("cargo:warning=nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda.sh): building the CPU-only engine");
        write_empty();
        return;
    };
    // nvcc makes one fatbin from one translation unit: a generated file includes every .cu
    // (kernel names are unique across files; each file includes common.cuh, guarded by
    // #pragma once).
    let unit = PathBuf::from(env::var("OUT_DIR").unwrap()).join("all_kernels.cu");
    let includes: String = units.iter().map(|u| format!("#include \"{}\"\n", u.display())).collect();
    fs::write(&unit, includes).expect("writing the kernels' translation unit");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("--fatbin").arg("-O3").arg("-std=c++17").arg("-o").arg(&out);
    for a in ARCHS {
        cmd.arg(format!("-gencode=arch=compute_{},code={a}", &a[3..]));
    }
    cmd.arg("-gencode=arch=compute_90,code=compute_90");
    if env::var_os("VOX2VEC_PTXAS_VERBOSE").is_some() {
        cmd.arg("-Xptxas=-v");
    }
    cmd.arg(&unit);
    match cmd.output() {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stderr).lines() {
                println!("cargo:warning={line}");
            }
        }
        Ok(o) => panic!("nvcc failed on kernels/*.cu:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            println!("cargo:warning=could not run {}: {e}; building the CPU-only engine", nvcc.display());
            write_empty();
        }
    }
}
