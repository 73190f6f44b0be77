//! Compiles `kernels/*.cu` with nvcc into one fatbin embedded in the binary
//! (`OUT_DIR/kernels.fatbin`). Without nvcc, or with no kernels yet, the fatbin is empty and
//! the crate builds the CPU-only engine; this never fails the build for lack of CUDA.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, the project's pip-installed `.cuda/` folder,
//! then PATH; `NVCC=none` builds the CPU-only engine on purpose.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// The SASS summariser, shared with the crate (std only).
#[allow(dead_code)]
#[path = "src/cuda/sass.rs"]
mod sass;

/// The machine code built by default, plus compute_90 PTX for newer GPUs to JIT.
const ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];

/// The architectures to build: `VOX2VEC_CUDA_ARCHS` (comma-separated, e.g. `sm_90`: machine
/// code for those alone, no PTX; the GPU bundle uses it to stay small) or the default set.
fn archs() -> (Vec<String>, bool) {
    match env::var("VOX2VEC_CUDA_ARCHS") {
        Ok(list) if !list.trim().is_empty() => {
            let archs: Vec<String> = list.split(',').map(|a| a.trim().to_string()).collect();
            for a in &archs {
                let digits = a.strip_prefix("sm_").unwrap_or("");
                if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_alphanumeric()) {
                    panic!("VOX2VEC_CUDA_ARCHS: {a:?} is not an architecture such as sm_90");
                }
            }
            (archs, false)
        }
        _ => (ARCHS.iter().map(|a| a.to_string()).collect(), true),
    }
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if env::var("NVCC").as_deref() == Ok("none") {
        // An explicit CPU-only build (the fuzz targets: no kernels to fuzz, minutes saved).
        return None;
    }
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
    println!("cargo:rerun-if-env-changed=VOX2VEC_CUDA_ARCHS");
    println!("cargo:rerun-if-changed=kernels");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let sass_table = PathBuf::from(env::var("OUT_DIR").unwrap()).join("sass_sm90.txt");
    fs::write(&sass_table, "").expect("writing the SASS table");
    let mut sources: Vec<PathBuf> = fs::read_dir(root.join("kernels"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu") | Some("cuh")));
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
    println!("cargo::rustc-check-cfg=cfg(vox2vec_emulator)");
    if env::var_os("CARGO_FEATURE_CUDA_EMULATOR").is_some() && !units.is_empty() {
        build_emulator(&root, &units);
    }
    let write_empty = || fs::write(&out, []).expect("writing empty fatbin");
    if units.is_empty() {
        write_empty();
        return;
    }
    let Some(nvcc) = find_nvcc(&root) else {
        if env::var("NVCC").as_deref() != Ok("none") {
            println!(
                "cargo:warning=nvcc not found (set NVCC or CUDA_HOME, or run scripts/install-cuda.sh): building the CPU-only engine"
            );
        }
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
    let (archs, with_ptx) = archs();
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{},code={a}", &a[3..]));
    }
    if with_ptx {
        cmd.arg("-gencode=arch=compute_90,code=compute_90");
    }
    if env::var_os("VOX2VEC_PTXAS_VERBOSE").is_some() {
        cmd.arg("-Xptxas=-v");
    }
    cmd.arg(&unit);
    match cmd.output() {
        Ok(o) if o.status.success() => {
            for line in String::from_utf8_lossy(&o.stderr).lines() {
                println!("cargo:warning={line}");
            }
            if archs.iter().any(|a| a == "sm_90") {
                summarise_sass(&nvcc, &out, &sass_table);
            }
        }
        Ok(o) => panic!("nvcc failed on kernels/*.cu:\n{}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            println!("cargo:warning=could not run {}: {e}; building the CPU-only engine", nvcc.display());
            write_empty();
        }
    }
}

/// The sm_90 machine code of the fatbin, summarised per kernel and loop (src/cuda/sass.rs)
/// into `table`, which the crate embeds for the plan's issue time. cuobjdump is looked up
/// beside nvcc, then on PATH; without it the table stays empty (the plan then says so).
fn summarise_sass(nvcc: &Path, fatbin: &Path, table: &Path) {
    let beside = nvcc.parent().map(|d| d.join("cuobjdump")).filter(|p| p.is_file());
    let cuobjdump = beside.unwrap_or_else(|| PathBuf::from("cuobjdump"));
    match Command::new(&cuobjdump).arg("-sass").arg("-arch").arg("sm_90").arg(fatbin).output() {
        Ok(o) if o.status.success() => {
            let kernels = sass::parse_cuobjdump(&String::from_utf8_lossy(&o.stdout));
            let text: String = kernels.iter().map(|k| k.to_line() + "\n").collect();
            fs::write(table, text).expect("writing the SASS table");
        }
        Ok(o) => println!(
            "cargo:warning=cuobjdump -sass failed ({}): the plan will have no issue times",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!(
            "cargo:warning=cuobjdump not found ({e}; scripts/install-cuda.sh installs it): the plan will have no issue times"
        ),
    }
}

/// The `cuda-emulator` feature: compile kernels/*.cu as C++ for the host, with
/// kernels/emulator/shim.h standing in for CUDA's extensions, plus one trampoline per kernel
/// (unpacking cuLaunchKernel-style `void**` arguments) and the fiber runtime; sets the cfg
/// `vox2vec_emulator`. A C++17 compiler is required when the feature is on.
fn build_emulator(root: &Path, units: &[&PathBuf]) {
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut src = String::new();
    let mut table = String::new();
    let mut count = 0;
    // One translation unit (the runtime, which defines EmuKernel, then every kernel file) built
    // with -fno-weak: the __shared__ statics of inline and template functions are then
    // ordinary symbols and may share the "emu_shared" section with the others (shim.h).
    src.push_str(&format!("#include \"{}\"\n", root.join("kernels/emulator/runtime.cpp").display()));
    for u in units {
        src.push_str(&format!("#include \"{}\"\n", u.display()));
    }
    for u in units {
        let text = fs::read_to_string(u).expect("reading a kernel file");
        for (name, params) in kernel_signatures(&text) {
            let args: Vec<String> = params.iter().enumerate().map(|(i, ty)| format!("*({ty}*)a[{i}]")).collect();
            src.push_str(&format!("static void emu_{name}(void** a) {{ {name}({}); }}\n", args.join(", ")));
            table.push_str(&format!("    {{\"{name}\", emu_{name}}},\n"));
            count += 1;
        }
    }
    src.push_str(&format!("extern \"C\" const EmuKernel emu_kernels[] = {{\n{table}}};\nextern \"C\" const int emu_kernel_count = {count};\n"));
    let unit = out_dir.join("emu_kernels.cpp");
    fs::write(&unit, src).expect("writing the emulator's kernel unit");
    let shim = root.join("kernels/emulator/shim.h");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("VOX2VEC_EMULATOR", None)
        .flag("-include")
        .flag(shim.to_str().unwrap())
        .flag("-w")
        .flag("-fno-weak")
        // runtime.cpp switches fibers with _longjmp between stacks, which fortify's check refuses.
        .flag("-U_FORTIFY_SOURCE")
        .include(root.join("kernels"))
        .include(root.join("kernels/emulator"))
        .file(&unit)
        .compile("vox2vec_cuda_emulator");
    println!("cargo:rustc-cfg=vox2vec_emulator");
}

/// (name, parameter types) of every `extern "C" __global__ void` kernel in a .cu file.
fn kernel_signatures(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let marker = "extern \"C\" __global__ void";
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        rest = &rest[i + marker.len()..];
        let head = rest.trim_start();
        let head = match head.strip_prefix("__launch_bounds__(") {
            Some(h) => &h[h.find(')').unwrap() + 1..],
            None => head,
        };
        let open = head.find('(').expect("kernel without parameters");
        let name = head[..open].trim().to_string();
        let close = head[open..].find(')').expect("unclosed parameter list") + open;
        let params = head[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
                let cut = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).expect("parameter without a name");
                p[..=cut].trim().to_string()
            })
            .collect();
        out.push((name, params));
    }
    out
}
