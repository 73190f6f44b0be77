//! The kernel lab (in the spirit of llm.c's `dev/cuda`): the hot kernel families
//! of the pretraining step, each with its versions side by side on the same inputs.
//!
//! - v1 of each family is the first correct version (CUDA cores, unfused, fp32 arithmetic);
//!   later versions are the tensor-core and fused ones. Every version stays callable through
//!   its launcher (the engine's path takes the winner), so a new variant is added here as one
//!   more entry, validated and timed against the others before it may replace one.
//! - Validation: each version against the CPU oracle (`crate::ops`' CPU code, the
//!   composition of primitive ops for fused versions) on small, odd shapes — on a GPU and on
//!   the CUDA emulator alike. At the reference step's shapes (too large for the CPU oracle in
//!   a lab run) each version is also compared with v1 on the device.
//! - Timing (GPU only): CUDA events around every launch of `reps` repetitions after a warm-up;
//!   FLOPs and bytes are those the launchers declare (`Cost`), so TFLOP/s, GB/s and the % of
//!   the device's floor printed beside them come from the same model as `--bench-plan`. Without a
//!   GPU the lab still prints each version's floor (plan mode) and says that timing is owed.
//!
//! `cargo run --release --example kernel_lab [-- FAMILY... --reps N]` prints the table;
//! `cargo bench --bench gpu` times the same variants under criterion.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::autograd::{Graph, Var};
use crate::cuda::ops::conv3d::{self as conv, Fusion};
use crate::cuda::{CudaDevice, cast};
use crate::ops;
use crate::ops::linear::MatmulMath;
use crate::ops::resblock::{ResBlockVars, resblock_train_cuda_with};
use crate::tensor::{DType, Device, Tensor, Vol};

/// The kernel families in the lab, in the order they cost the reference step (plan mode).
pub const FAMILIES: [&str; 4] = ["conv3d_forward", "conv3d_backward_weight", "resblock_train", "infonce"];

/// What one run of a variant produces: its outputs as device tensors.
type Outputs = Vec<Tensor>;
type RunFn = Box<dyn Fn() -> Result<Outputs>>;

/// One version of a kernel family, ready to run on prepared device inputs.
pub struct Variant {
    pub version: &'static str,
    pub what: &'static str,
    pub run: RunFn,
}

/// A family at one shape: its versions, and (for validation shapes) the CPU oracle's outputs.
pub struct Case {
    pub family: &'static str,
    pub shape: String,
    pub variants: Vec<Variant>,
    /// The CPU oracle's outputs, in the variants' output order; `None` at timing shapes.
    pub reference: Option<Vec<Vec<f32>>>,
    /// Largest relative L2 error a version may have against the reference (or against v1).
    pub tol: f64,
}

/// One version's result at one shape.
pub struct Row {
    pub family: &'static str,
    pub shape: String,
    pub version: &'static str,
    pub what: &'static str,
    /// Worst relative L2 error over the outputs and what it was measured against.
    pub error: Option<(f64, &'static str)>,
    pub ok: bool,
    /// Measured ms per run (GPU only).
    pub ms: Option<f64>,
    pub flops: f64,
    pub bytes: f64,
    pub floor_ms: f64,
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0f32) * scale).collect()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Host values and their device tensor (activations cast to bf16 on the device).
fn upload(dev: &Arc<CudaDevice>, shape: &[usize], v: &[f32], dtype: DType) -> Result<Tensor> {
    let t = Tensor::from_f32(shape, v.to_vec()).to_device(Device::Cuda(dev.ordinal()))?;
    if dtype == DType::F32 { Ok(t) } else { cast(&t, dtype) }
}

/// y = conv3d(x, w) + b, bf16 activations: v1 the CUDA-core kernel on bf16 storage, v2 the
/// tensor-core kernel.
pub fn conv3d_forward_case(
    dev: &Arc<CudaDevice>,
    shape: [usize; 5],
    co: usize,
    k: usize,
    with_reference: bool,
    seed: u64,
) -> Result<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = Vol { n: shape[0], x: shape[1], y: shape[2], z: shape[3], c: shape[4] };
    let xs = round_bf16(&rand_vec(&mut rng, v.voxels() * v.c, 1.0));
    let ws = round_bf16(&rand_vec(&mut rng, co * k * k * k * v.c, 1.0 / ((k * k * k * v.c) as f32).sqrt()));
    let bs = rand_vec(&mut rng, co, 0.1);
    let reference = with_reference.then(|| vec![ops::conv3d::conv3d_forward_cpu(&xs, v, &ws, Some(&bs), co, k)]);
    let x = upload(dev, &v.shape(), &xs, DType::BF16)?;
    let w = upload(dev, &[co, k, k, k, v.c], &ws, DType::F32)?;
    let b = upload(dev, &[co], &bs, DType::F32)?;
    let (x1, w1, b1) = (x.clone(), w.clone(), b.clone());
    let variants = vec![
        Variant {
            version: "v1",
            what: "CUDA cores, 64x64 tiles, fp32 FMA",
            run: Box::new(move || Ok(vec![conv::forward_cuda_cores(&x1, v, &w1, Some(&b1), co, k)?])),
        },
        Variant {
            version: "v2",
            what: "tensor cores mma.sync bf16, halo brick in smem",
            run: Box::new(move || Ok(vec![conv::forward_fused(&x, v, &w, Some(&b), co, k, Fusion::default())?.0])),
        },
    ];
    Ok(Case { family: "conv3d_forward", shape: format!("{:?}->{co} k{k}", v.shape()), variants, reference, tol: 1e-2 })
}

/// (dw, db) of a convolution from bf16 x and dy: v1 CUDA-core split-K, v2 tensor cores.
pub fn conv3d_backward_weight_case(
    dev: &Arc<CudaDevice>,
    shape: [usize; 5],
    co: usize,
    k: usize,
    with_reference: bool,
    seed: u64,
) -> Result<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    let v = Vol { n: shape[0], x: shape[1], y: shape[2], z: shape[3], c: shape[4] };
    let xs = round_bf16(&rand_vec(&mut rng, v.voxels() * v.c, 1.0));
    let dys = round_bf16(&rand_vec(&mut rng, v.voxels() * co, 1.0));
    let reference = with_reference.then(|| {
        let (dw, db) = ops::conv3d::conv3d_backward_weight_cpu(&xs, v, &dys, co, k);
        vec![dw, db]
    });
    let x = upload(dev, &v.shape(), &xs, DType::BF16)?;
    let dy = upload(dev, &v.with_c(co).shape(), &dys, DType::BF16)?;
    let (x1, dy1) = (x.clone(), dy.clone());
    let variants = vec![
        Variant {
            version: "v1",
            what: "CUDA cores, split-K partials, fp32 FMA",
            run: Box::new(move || {
                let (dw, db) = conv::backward_weight_cuda_cores(&x1, v, &dy1, co, k)?;
                Ok(vec![dw, db])
            }),
        },
        Variant {
            version: "v2",
            what: "tensor cores, voxel-brick splits, bias in the epilogue",
            run: Box::new(move || {
                let (dw, db) = conv::backward_weight_tensor_cores(&x, v, &dy, co, k)?;
                Ok(vec![dw, db])
            }),
        },
    ];
    // f32 accumulation of exact bf16 products on both sides: only the summation order differs.
    Ok(Case {
        family: "conv3d_backward_weight",
        shape: format!("{:?}->{co} k{k}", v.shape()),
        variants,
        reference,
        tol: 1e-4,
    })
}

/// The inputs of a ResBlock (cin = cout = c, k = 3): x, γ0, β0, w2, b2, γ3, β3, w5, b5 and
/// the running statistics, as host values.
struct ResBlockInputs {
    shape: [usize; 5],
    values: Vec<(Vec<usize>, Vec<f32>)>,
    running: Vec<Vec<f32>>,
}

fn resblock_inputs(shape: [usize; 5], seed: u64) -> ResBlockInputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = shape[4];
    let fan = 27.0 * c as f32;
    let voxels: usize = shape[..4].iter().product();
    let pos = |rng: &mut StdRng| (0..c).map(|_| rng.random_range(0.5..1.5f32)).collect::<Vec<_>>();
    let mut values = vec![(shape.to_vec(), round_bf16(&rand_vec(&mut rng, voxels * c, 2.0)))];
    for _ in 0..2 {
        let gamma = pos(&mut rng);
        values.push((vec![c], gamma));
        values.push((vec![c], rand_vec(&mut rng, c, 0.5)));
        values.push((vec![c, 3, 3, 3, c], round_bf16(&rand_vec(&mut rng, c * 27 * c, 1.0 / fan.sqrt()))));
        values.push((vec![c], rand_vec(&mut rng, c, 0.1)));
    }
    // Order as ResBlockVars takes them: γ0, β0, w2, b2, γ3, β3, w5, b5.
    let running = (0..4).map(|i| if i % 2 == 0 { vec![0.0; c] } else { vec![1.0; c] }).collect();
    ResBlockInputs { shape, values, running }
}

/// A ResBlock's inputs on one device (x in bf16 on the GPU), its running statistics and
/// the output gradient: prepared once, so that a timed run only launches kernels.
struct Prepared {
    device: Device,
    values: Vec<Tensor>,
    running: Vec<Tensor>,
    dy: Tensor,
}

fn prepare(inp: &ResBlockInputs, device: Device, seed_grad: &[f32]) -> Result<Prepared> {
    let gpu = device != Device::Cpu;
    let values = inp
        .values
        .iter()
        .enumerate()
        .map(|(i, (s, v))| -> Result<Tensor> {
            let t = Tensor::from_f32(s, v.clone()).to_device(device)?;
            if i == 0 && gpu { cast(&t, DType::BF16) } else { Ok(t) }
        })
        .collect::<Result<_>>()?;
    let running =
        inp.running.iter().map(|v| Tensor::from_f32(&[v.len()], v.clone()).to_device(device)).collect::<Result<_>>()?;
    let dy = Tensor::from_f32(&inp.shape, seed_grad.to_vec()).to_device(device)?;
    let dy = if gpu { cast(&dy, DType::BF16)? } else { dy };
    Ok(Prepared { device, values, running, dy })
}

/// One ResBlock forward and backward (the prepared output gradient); returns y, the input
/// gradient and every parameter gradient. `fused` picks the device version; the CPU runs the
/// composition of primitive ops (the oracle).
fn resblock_run(p: &Prepared, fused: bool) -> Result<Outputs> {
    let g = Graph::train();
    let vars: Vec<Var> = p.values.iter().map(|t| g.leaf(t.clone())).collect();
    let r = &p.running;
    let y = if p.device == Device::Cpu {
        let (h, _) = ops::batch_norm(&g, &vars[0], &vars[1], &vars[2], &r[0], &r[1])?;
        let h = ops::conv3d(&g, &ops::relu(&g, &h)?, &vars[3], Some(&vars[4]))?;
        let (h, _) = ops::batch_norm(&g, &h, &vars[5], &vars[6], &r[2], &r[3])?;
        let h = ops::conv3d(&g, &ops::relu(&g, &h)?, &vars[7], Some(&vars[8]))?;
        ops::add(&g, &h, &vars[0])?
    } else {
        let pv = ResBlockVars {
            gamma0: vars[1].clone(),
            beta0: vars[2].clone(),
            w2: vars[3].clone(),
            b2: vars[4].clone(),
            gamma3: vars[5].clone(),
            beta3: vars[6].clone(),
            w5: vars[7].clone(),
            b5: vars[8].clone(),
            skip: None,
            running0: (&r[0], &r[1]),
            running3: (&r[2], &r[3]),
        };
        resblock_train_cuda_with(&g, &vars[0], pv, fused)?.0
    };
    let grads = g.backward_with(&y, p.dy.clone())?;
    let mut out = vec![y.value.clone()];
    for v in &vars {
        out.push(grads.get(v).cloned().ok_or_else(|| anyhow!("resblock: an input got no gradient"))?);
    }
    Ok(out)
}

/// A ResBlock's training forward + backward in bf16: v1 the composition of device ops (BN,
/// ReLU, tensor-core convs, add; recomputing), v2 the fused op.
pub fn resblock_case(dev: &Arc<CudaDevice>, shape: [usize; 5], with_reference: bool, seed: u64) -> Result<Case> {
    let inp = resblock_inputs(shape, seed);
    let voxels: usize = shape.iter().product();
    let seed_grad = round_bf16(&rand_vec(&mut StdRng::seed_from_u64(seed ^ 0x5EED), voxels, 1.0));
    let reference = if with_reference {
        Some(
            resblock_run(&prepare(&inp, Device::Cpu, &seed_grad)?, false)?
                .iter()
                .map(|t| t.to_f32_vec())
                .collect::<Result<_>>()?,
        )
    } else {
        None
    };
    let p1 = Arc::new(prepare(&inp, Device::Cuda(dev.ordinal()), &seed_grad)?);
    let p2 = p1.clone();
    let variants = vec![
        Variant {
            version: "v1",
            what: "composed device ops (BN, ReLU, convs, add), recomputing",
            run: Box::new(move || resblock_run(&p1, false)),
        },
        Variant {
            version: "v2",
            what: "fused: BN+ReLU in conv loads, stats/mask/sums in epilogues",
            run: Box::new(move || resblock_run(&p2, true)),
        },
    ];
    // The CPU computes in f32 what the device stores in bf16 (tests/gpu/: 8e-2 for the
    // ResBlock op); at timing shapes v2 is held to v1 at the fused-vs-composed test's 1e-2.
    Ok(Case {
        family: "resblock_train",
        shape: format!("{shape:?}"),
        variants,
        reference,
        tol: if with_reference { 8e-2 } else { 1e-2 },
    })
}

/// InfoNCE loss and gradients of unit rows e1, e2 [n, d]: v1 exact fp32 on CUDA cores, v2
/// bf16x3 on tensor cores.
pub fn infonce_case(dev: &Arc<CudaDevice>, n: usize, d: usize, with_reference: bool, seed: u64) -> Result<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    let unit = |rng: &mut StdRng| -> Vec<f32> {
        let mut v = rand_vec(rng, n * d, 1.0);
        for row in v.chunks_mut(d) {
            let s = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= s);
        }
        v
    };
    let (e1s, e2s) = (unit(&mut rng), unit(&mut rng));
    let t = 0.1;
    let reference = with_reference.then(|| {
        let (loss, g1, g2) = ops::infonce::infonce_cpu(&e1s, &e2s, n, d, t);
        vec![vec![loss as f32], g1, g2]
    });
    let e1 = upload(dev, &[n, d], &e1s, DType::F32)?;
    let e2 = upload(dev, &[n, d], &e2s, DType::F32)?;
    let run = move |math: MatmulMath| -> Result<Outputs> {
        let g = Graph::train();
        let (v1, v2) = (g.leaf(e1.clone()), g.leaf(e2.clone()));
        let loss = ops::infonce::infonce_with(&g, &v1, &v2, t, math)?;
        let gr = g.backward(&loss)?;
        Ok(vec![
            loss.value.clone(),
            gr.get(&v1).cloned().ok_or_else(|| anyhow!("no gradient"))?,
            gr.get(&v2).cloned().ok_or_else(|| anyhow!("no gradient"))?,
        ])
    };
    let run2 = run.clone();
    let variants = vec![
        Variant {
            version: "v1",
            what: "CUDA cores fp32, flash-style row LSE + recomputing backward",
            run: Box::new(move || run(MatmulMath::Fp32)),
        },
        Variant {
            version: "v2",
            what: "tensor cores bf16x3 split products, same tiling",
            run: Box::new(move || run2(MatmulMath::Tf32)),
        },
    ];
    Ok(Case { family: "infonce", shape: format!("N={n} d={d}"), variants, reference, tol: 1e-4 })
}

/// Small, odd shapes for validation against the CPU (quick on the emulator too).
pub fn validation_cases(dev: &Arc<CudaDevice>, families: &[&str]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &f in families {
        match f {
            "conv3d_forward" => {
                cases.push(conv3d_forward_case(dev, [1, 5, 7, 9, 16], 16, 3, true, 1)?);
                cases.push(conv3d_forward_case(dev, [2, 3, 5, 4, 64], 64, 3, true, 2)?);
            }
            "conv3d_backward_weight" => {
                cases.push(conv3d_backward_weight_case(dev, [1, 5, 7, 9, 16], 16, 3, true, 3)?);
                cases.push(conv3d_backward_weight_case(dev, [2, 3, 5, 4, 32], 64, 3, true, 4)?);
            }
            "resblock_train" => cases.push(resblock_case(dev, [1, 6, 5, 4, 16], true, 5)?),
            "infonce" => cases.push(infonce_case(dev, 300, 32, true, 6)?),
            other => return Err(anyhow!("unknown kernel family {other:?} (the lab has {FAMILIES:?})")),
        }
    }
    Ok(cases)
}

/// The reference step's shapes (20 patches of 128x128x32; levels 0, 2 and 4; N = 10240).
pub fn timing_cases(dev: &Arc<CudaDevice>, families: &[&str]) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    for &f in families {
        match f {
            "conv3d_forward" => {
                cases.push(conv3d_forward_case(dev, [20, 128, 128, 32, 16], 16, 3, false, 11)?);
                cases.push(conv3d_forward_case(dev, [20, 32, 32, 8, 64], 64, 3, false, 12)?);
                cases.push(conv3d_forward_case(dev, [20, 8, 8, 2, 256], 256, 3, false, 13)?);
            }
            "conv3d_backward_weight" => {
                cases.push(conv3d_backward_weight_case(dev, [20, 128, 128, 32, 16], 16, 3, false, 14)?);
                cases.push(conv3d_backward_weight_case(dev, [20, 32, 32, 8, 64], 64, 3, false, 15)?);
            }
            "resblock_train" => cases.push(resblock_case(dev, [20, 128, 128, 32, 16], false, 16)?),
            "infonce" => cases.push(infonce_case(dev, 10240, 128, false, 17)?),
            other => return Err(anyhow!("unknown kernel family {other:?} (the lab has {FAMILIES:?})")),
        }
    }
    Ok(cases)
}

/// ‖a − b‖ / max(‖b‖, floor).
fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let d = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|&y| y as f64 * y as f64).sum::<f64>().sqrt();
    d / nb.max(floor).max(f64::MIN_POSITIVE)
}

/// Worst error of `outs` against `want` over the outputs; an output whose exact value is
/// (nearly) zero, such as a conv bias gradient before a train-mode BatchNorm, is measured
/// against 1e-2 of the largest output norm.
fn worst_error(outs: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    let scale = want.iter().map(|b| b.iter().map(|&y| y as f64 * y as f64).sum::<f64>().sqrt()).fold(0.0, f64::max);
    // Not f64::max, which drops a NaN: a NaN output (poisoned memory read back) must show.
    outs.iter()
        .zip(want)
        .map(|(a, b)| rel_err(a, b, 1e-2 * scale))
        .fold(0.0, |w, e| if e > w || e.is_nan() { e } else { w })
}

/// Run every variant of `case`: check it (against the CPU reference, else against v1) and,
/// on a GPU, time it over `reps` runs after a warm-up. In plan mode only the floors.
pub fn run_case(dev: &Arc<CudaDevice>, case: &Case, reps: usize) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut first: Option<Vec<Vec<f32>>> = None;
    let timed = !dev.is_plan() && !dev.is_emulator() && reps > 0;
    for var in &case.variants {
        dev.start_cost_log();
        let outs = (var.run)()?;
        let log = dev.take_cost_log().unwrap_or_default();
        let error = if dev.is_plan() {
            None
        } else {
            let host: Vec<Vec<f32>> = outs.iter().map(|t| t.to_f32_vec()).collect::<Result<_>>()?;
            let e = match (&case.reference, &first) {
                (Some(r), _) => Some((worst_error(&host, r), "CPU")),
                (None, Some(f)) => Some((worst_error(&host, f), "v1")),
                (None, None) => None,
            };
            if first.is_none() {
                first = Some(host);
            }
            e
        };
        drop(outs);
        let ms = if timed {
            dev.enable_kernel_timing();
            for _ in 0..reps {
                drop((var.run)()?);
            }
            let times = dev.take_kernel_times()?;
            Some(times.iter().map(|t| t.1).sum::<f64>() / reps as f64)
        } else {
            None
        };
        let (flops, bytes): (f64, f64) = log.families.values().fold((0.0, 0.0), |a, f| (a.0 + f.flops, a.1 + f.bytes));
        rows.push(Row {
            family: case.family,
            shape: case.shape.clone(),
            version: var.version,
            what: var.what,
            ok: error.is_none_or(|(e, _)| e.is_finite() && e <= case.tol),
            error,
            ms,
            flops,
            bytes,
            floor_ms: log.floor_s() * 1e3,
        });
    }
    Ok(rows)
}

/// The lab's table: one line per version and shape.
pub fn render(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<23} {:<30} {:<4} {:>12} {:>9} {:>8} {:>8} {:>9} {:>7}  {}\n",
        "family", "shape", "ver", "error", "ms", "TFLOP/s", "GB/s", "floor ms", "%floor", "what"
    );
    for r in rows {
        let err = match r.error {
            Some((e, against)) => format!("{e:.1e}/{against}{}", if r.ok { "" } else { "!" }),
            None => "-".into(),
        };
        let (ms, tf, gb, pct) = match r.ms {
            Some(ms) if ms > 0.0 => (
                format!("{ms:.3}"),
                format!("{:.1}", r.flops / ms / 1e9),
                format!("{:.0}", r.bytes / ms / 1e6),
                format!("{:.0}%", 100.0 * r.floor_ms / ms),
            ),
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        s += &format!(
            "{:<23} {:<30} {:<4} {:>12} {:>9} {:>8} {:>8} {:>9.3} {:>7}  {}\n",
            r.family, r.shape, r.version, err, ms, tf, gb, r.floor_ms, pct, r.what
        );
    }
    s
}
