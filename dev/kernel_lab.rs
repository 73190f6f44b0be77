//! The kernel lab (src/cuda/lab.rs): every version of each hot kernel family, validated
//! against the CPU oracle and, on a GPU, timed with TFLOP/s, GB/s and % of the device's floor.
//!
//!   cargo run --release --example kernel_lab                     # all families
//!   cargo run --release --example kernel_lab -- conv3d_forward --reps 50
//!   VOX2VEC_CUDA_EMULATOR=1 cargo run --release --features cuda-emulator --example kernel_lab
//!
//! On a GPU: validation shapes against the CPU, then the reference step's shapes timed (each
//! version checked against v1 there). On the emulator: validation only. Without either: the
//! plan device prints each version's floor at the reference shapes; nothing is checked or
//! timed, and it says so. Exit status 1 when a version misses its bound.

use std::process::ExitCode;

use anyhow::{Result, bail};
use vox2vec::cuda::lab::{self, FAMILIES};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kernel_lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let mut families: Vec<String> = Vec::new();
    let mut reps = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => {
                reps =
                    args.next().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("--reps needs a number"))?
            }
            "-h" | "--help" => {
                println!("kernel_lab [FAMILY...] [--reps N]; families: {}", FAMILIES.join(", "));
                return Ok(true);
            }
            f if f.starts_with('-') => bail!("unknown option {f}"),
            f => families.push(f.to_string()),
        }
    }
    let families: Vec<&str> =
        if families.is_empty() { FAMILIES.to_vec() } else { families.iter().map(String::as_str).collect() };
    let plan = vox2vec::cuda::unavailable_reason();
    if let Some(why) = &plan {
        println!("kernel_lab: no CUDA device ({why})");
        println!("kernel_lab: plan mode — floors at the reference shapes only; validation and timing are NOT run here");
        vox2vec::cuda::enable_plan_mode()?;
    }
    let dev = vox2vec::cuda::device(0)?;
    println!("kernel_lab: {}", dev.name());
    let mut rows = Vec::new();
    if plan.is_none() {
        for case in lab::validation_cases(&dev, &families)? {
            rows.extend(lab::run_case(&dev, &case, 0)?);
        }
    }
    if dev.is_emulator() {
        println!("kernel_lab: the emulator validates; timing the reference shapes needs a GPU");
    } else {
        for case in lab::timing_cases(&dev, &families)? {
            rows.extend(lab::run_case(&dev, &case, reps)?);
            dev.release_cached()?;
        }
    }
    print!("{}", lab::render(&rows));
    let failed: Vec<String> =
        rows.iter().filter(|r| !r.ok).map(|r| format!("{} {} {}", r.family, r.shape, r.version)).collect();
    if !failed.is_empty() {
        println!("kernel_lab: outside their bounds: {}", failed.join("; "));
    }
    Ok(failed.is_empty())
}
