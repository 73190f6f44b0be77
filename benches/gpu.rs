//! Criterion benches of the GPU kernels: every version of each hot family in the kernel lab
//! (src/cuda/lab.rs) at the reference step's shapes, wall time per run with the stream
//! synchronised (so launch overheads count, as they do in a step). `cargo bench --bench gpu`.
//!
//! Without a CUDA device (or on the emulator, whose timings mean nothing) every bench is
//! SKIPPED with the reason, and nothing is reported as measured. The lab's own table
//! (`cargo run --release --example kernel_lab`) adds GFLOP/s, GB/s and % of floor from CUDA
//! events.

use std::time::{Duration, Instant};

use criterion::Criterion;
use vox2vec::cuda::lab;

fn main() {
    if let Some(why) = vox2vec::cuda::unavailable_reason() {
        println!("gpu benches SKIPPED: no CUDA device ({why})");
        return;
    }
    let dev = vox2vec::cuda::device(0).expect("opening CUDA device 0");
    if dev.is_emulator() {
        println!("gpu benches SKIPPED: the CUDA emulator is not a GPU (timings would mean nothing)");
        return;
    }
    println!("gpu benches on {}", dev.name());
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    for case in lab::timing_cases(&dev, &lab::FAMILIES).expect("preparing the lab's inputs") {
        for var in &case.variants {
            let name = format!("{}/{}/{}", case.family, case.shape, var.version);
            if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
                continue;
            }
            c.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    dev.synchronize().expect("synchronising");
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        drop((var.run)().expect("running a lab variant"));
                    }
                    dev.synchronize().expect("synchronising");
                    t0.elapsed()
                })
            });
        }
        drop(case);
        dev.release_cached().expect("returning cached device memory");
    }
    c.final_summary();
}
