//! GPU tests: every CUDA op against the CPU oracle on fresh random inputs (several shapes,
//! odd sizes, batch 1; f32 and bf16 activation storage), full-model fixture parity on the
//! GPU, the device optimiser step against the CPU one, and a few training steps on GPU and
//! CPU from the same initial weights.
//!
//! Own harness (`harness = false` in Cargo.toml): without a usable CUDA device every case is
//! reported as SKIPPED, with the reason, and nothing counts as passed. With a device the
//! summary line has libtest's format, so `.ci/run` counts the cases.
//!
//! Bounds (relative L2 error, see `rel`):
//! - f32 ops: 1e-5 (the same arithmetic in another summation order).
//! - bf16 ops: 2e-2, against the CPU run on the same inputs rounded to bf16 (outputs and
//!   activation gradients are stored in bf16: 2^-9 relative rounding per value, plus the
//!   rounding of intermediate activations inside an op's backward).
//! - fixture parity: f32 within the fixture bounds (1e-4 forward, 1e-2 gradients). bf16
//!   against the same fp32 reference results, within 5 × the error that rounding only the two
//!   input views to bf16 causes in an f32 CPU run (the fixtures' tiny, randomly initialised
//!   networks are ill-conditioned: that alone moves embeddings by 2–5 % and some gradients by
//!   75 %, so a fixed elementwise bound would say nothing). Measured on the emulator: 2–3 ×
//!   forward, 0.9–1.6 × gradients.

#[path = "../common/mod.rs"]
mod common;
mod machine;
mod model_vs_cpu;
mod ops_vs_cpu;
mod training;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail, ensure};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vox2vec::autograd::{Graph, Var};
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::ops;
use vox2vec::optim::{Adam, AdamConfig, clip_coefficient, global_norm};
use vox2vec::params::{Layout, ParamStore, SlotKind};
use vox2vec::tensor::{DType, Device, Tensor};
use vox2vec::train::{BatchShape, pretrain_step, synthetic_batch};

const GPU: Device = Device::Cuda(0);
const F32_BOUND: f64 = 1e-5;
const BF16_BOUND: f64 = 2e-2;

/// Multi-step comparisons (several training steps on the GPU and on the CPU from the same
/// weights and batches) are re-based on a yardstick: how far the CPU's own two convolution
/// algorithms, the direct kernels and Winograd F(2, 3) (the same f32 arithmetic rounded in
/// another order), drift apart over the same steps. A GPU rounds differently again — FMA
/// contraction, the device's expf/logf (within 2 ulp, glibc's within 1), other summation
/// orders in its reductions — differences of the same kind and size, which the steps amplify
/// as they amplify the CPU's. The bound at a step is the larger of the like-for-like bound
/// (what the emulator, whose kernels run the CPU's direct arithmetic, is held to) and this
/// factor times the largest CPU drift up to that step.
const DRIFT_FACTOR: f64 = 4.0;

fn rebased(like_for_like: f64, drift_so_far: f64) -> f64 {
    like_for_like.max(DRIFT_FACTOR * drift_so_far)
}

fn bound(dt: DType) -> f64 {
    if dt == DType::BF16 { BF16_BOUND } else { F32_BOUND }
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

fn rand_tensor(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    Tensor::from_f32(shape, rand_vec(rng, shape.iter().product()))
}

fn round_bf16(t: &Tensor) -> Tensor {
    Tensor::from_f32(t.shape(), t.f32s().iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect())
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().expect("reading back")
}

/// ‖a − b‖ / max(‖b‖, 1e-6).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    d / common::norm(b).max(1e-6)
}

fn close(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) -> Result<()> {
    close_scaled(what, gpu, cpu, tol, 0.0)
}

/// `close` with the reference norm floored at `floor`: ‖a − b‖ / max(‖b‖, floor, 1e-6).
fn close_scaled(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64, floor: f64) -> Result<()> {
    ensure!(gpu.shape() == cpu.shape(), "{what}: shape {:?} on the GPU, {:?} on the CPU", gpu.shape(), cpu.shape());
    let (a, b) = (host(gpu), host(cpu));
    let e = rel(&a, &b) * common::norm(&b).max(1e-6) / common::norm(&b).max(floor).max(1e-6);
    println!("    {what}: relative error {e:.2e} (bound {tol:.1e})");
    ensure!(e.is_finite() && e <= tol, "{what}: relative error {e:.3e} exceeds {tol:e}");
    Ok(())
}

/// One input of an op under test: its value and whether it is an activation (stored in the
/// activation dtype on the GPU; parameters stay f32) and tracked (receives a gradient).
struct Input {
    value: Tensor,
    activation: bool,
    tracked: bool,
}

fn act(t: Tensor) -> Input {
    Input { value: t, activation: true, tracked: true }
}
fn param(t: Tensor) -> Input {
    Input { value: t, activation: false, tracked: true }
}

/// The op under test: builds its output on a graph from vars on `device`; may return extra
/// tensors to compare (BatchNorm's running statistics).
type OpFn<'a> = &'a dyn Fn(&Graph, &[Var], Device) -> Result<(Var, Vec<Tensor>)>;

/// Run `op` forward and backward (a random output gradient) on the CPU and on the GPU with
/// activations stored as `dt`, and compare the output, the extra tensors and every gradient.
fn check_op(name: &str, dt: DType, inputs: Vec<Input>, train: bool, op: OpFn, seed: u64) -> Result<()> {
    check_op_within(name, dt, inputs, train, op, seed, bound(dt))
}

/// `check_op` with an explicit bound.
fn check_op_within(
    name: &str,
    dt: DType,
    inputs: Vec<Input>,
    train: bool,
    op: OpFn,
    seed: u64,
    tol: f64,
) -> Result<()> {
    let inputs: Vec<Input> = inputs
        .into_iter()
        .map(|i| if dt == DType::BF16 && i.activation { Input { value: round_bf16(&i.value), ..i } } else { i })
        .collect();
    let graph = || if train { Graph::train() } else { Graph::eval_with_grad() };
    let run = |device: Device| -> Result<(Tensor, Vec<Tensor>, Vec<Option<Tensor>>)> {
        let g = graph();
        let vars: Vec<Var> = inputs
            .iter()
            .map(|i| -> Result<Var> {
                let mut v = i.value.to_device(device)?;
                if device != Device::Cpu && i.activation {
                    v = vox2vec::cuda::cast(&v, dt)?;
                }
                Ok(if i.tracked { g.leaf(v) } else { Var::constant(v) })
            })
            .collect::<Result<_>>()?;
        let (out, extra) = op(&g, &vars, device)?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xD1CE);
        let seed_grad = rand_tensor(&mut rng, out.shape());
        // The same output gradient on both devices: rounded to bf16 where the GPU stores it so.
        let seed_grad = if dt == DType::BF16 && out.shape().len() == 5 { round_bf16(&seed_grad) } else { seed_grad };
        let grads = g.backward_with(&out, seed_grad.to_device(device)?)?;
        let gs = vars.iter().map(|v| grads.get(v).cloned()).collect();
        Ok((out.value, extra, gs))
    };
    let (cy, cextra, cgrads) = run(Device::Cpu)?;
    let (gy, gextra, ggrads) = run(GPU)?;
    if inputs.iter().any(|i| i.activation) && cy.shape().len() == 5 {
        ensure!(gy.dtype() == dt, "{name}: output stored as {:?}, expected {dt:?}", gy.dtype());
    }
    close(&format!("{name} output"), &gy, &cy, tol)?;
    for (i, (g, c)) in gextra.iter().zip(&cextra).enumerate() {
        close(&format!("{name} extra output {i}"), g, c, tol)?;
    }
    // A gradient that vanishes in exact arithmetic (a conv bias feeding a train-mode
    // BatchNorm) is rounding noise on both devices: it is measured against the op's gradient
    // scale (1e-2 of its largest gradient), not against its own norm.
    let scale = cgrads.iter().flatten().map(|c| common::norm(&host(c))).fold(0.0f64, f64::max);
    for (i, (g, c)) in ggrads.iter().zip(&cgrads).enumerate() {
        match (g, c) {
            (Some(g), Some(c)) => close_scaled(&format!("{name} gradient of input {i}"), g, c, tol, 1e-2 * scale)?,
            (None, None) => {}
            _ => bail!("{name}: input {i} has a gradient on one device only"),
        }
    }
    Ok(())
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// A named GPU test.
type Case = (&'static str, fn() -> Result<()>);

fn main() -> ExitCode {
    let cases: Vec<Case> = vec![
        // First: if the fragment mappings are wrong, every tensor-core result below is too.
        ("mma_layout_probe", machine::test_mma_layout),
        ("dynamic_shared_memory_limits", machine::test_dynamic_shared_limits),
        ("ops_elementwise_vs_cpu", ops_vs_cpu::test_elementwise),
        ("ops_conv3d_vs_cpu", ops_vs_cpu::test_conv3d),
        ("ops_batchnorm_vs_cpu", ops_vs_cpu::test_batchnorm),
        ("ops_resblock_recompute_vs_cpu", ops_vs_cpu::test_resblock),
        ("ops_resblock_fused_vs_composed", ops_vs_cpu::test_resblock_fused_vs_composed),
        ("ops_resblock_eval_vs_cpu", ops_vs_cpu::test_resblock_eval),
        ("ops_pool_upsample_vs_cpu", ops_vs_cpu::test_pool_upsample),
        ("ops_fpn_merge_vs_cpu", ops_vs_cpu::test_fpn_merge),
        ("ops_accumulated_gradients_vs_cpu", ops_vs_cpu::test_accumulated_gradients),
        ("ops_gather_concat_vs_cpu", ops_vs_cpu::test_gather_concat),
        ("ops_head_and_infonce_vs_cpu", ops_vs_cpu::test_head_ops),
        ("ops_segmentation_loss_vs_cpu", ops_vs_cpu::test_segloss),
        ("ops_learning_signal_vs_cpu", ops_vs_cpu::test_learning_signal),
        ("optim_clip_and_adam_vs_cpu", training::test_clip_and_adam),
        ("fixture_parity_on_gpu", model_vs_cpu::test_fixture_parity),
        ("inference_embed_and_head_on_gpu_vs_cpu", model_vs_cpu::test_inference_on_gpu),
        ("segmentation_training_on_gpu_vs_cpu", model_vs_cpu::test_segmentation_on_gpu),
        ("training_steps_gpu_vs_cpu", training::test_training_steps),
        ("step_graph_vs_unrecorded_steps", training::test_step_graph_vs_unrecorded),
        ("bf16_fused_step_vs_cpu_f32", training::test_bf16_fused_step),
        ("precision_report_bf16_vs_fp32", training::test_precision_report),
        ("kernel_lab_versions_vs_cpu", machine::test_kernel_lab),
    ];
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<_> =
        cases.iter().filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str()))).collect();
    let filtered_out = cases.len() - selected.len();
    if let Some(why) = vox2vec::cuda::unavailable_reason() {
        println!("\nrunning {} GPU tests", selected.len());
        for (name, _) in &selected {
            println!("test {name} ... SKIPPED (no CUDA device)");
        }
        println!("GPU tests SKIPPED for lack of a CUDA device: {why}");
        println!(
            "gpu test result: skipped. 0 passed; 0 failed; {} skipped; {filtered_out} filtered out\n",
            selected.len()
        );
        return ExitCode::SUCCESS;
    }
    let dev = vox2vec::cuda::device(0).expect("opening CUDA device 0");
    println!("\nrunning {} GPU tests on cuda:0 ({})", selected.len(), dev.name());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in &selected {
        let t0 = std::time::Instant::now();
        let r = catch_unwind(AssertUnwindSafe(f));
        let outcome = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(p) => Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
            ),
        };
        match outcome {
            None => {
                println!("test {name} ... ok ({:.1} s)", t0.elapsed().as_secs_f64());
                passed += 1;
            }
            Some(e) => {
                println!("test {name} ... FAILED\n  {e}");
                failed.push(*name);
            }
        }
    }
    let st = dev.pool_stats();
    println!(
        "device memory: peak {:.1} MiB in use, {} driver allocations",
        st.peak_in_use as f64 / (1 << 20) as f64,
        st.driver_allocs
    );
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out\n",
        failed.len()
    );
    if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
