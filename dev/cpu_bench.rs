//! Our side of dev/cpu_side_by_side.py: times one benchmark row on the CPU backend and
//! prints `<row> <median ms> <min ms>` (after one warm-up run, `--reps` timed runs).
//!
//!   cargo run --release --example cpu_bench -- ROW [--reps N] [--kernels portable|avx2|avx512]
//!
//! Rows (shapes as PyTorch's N, C, X, Y, Z):
//!   conv_fwd:N,C,X,Y,Z         conv3d 3x3x3 C -> C with bias, forward
//!                              (the three conv_fwd* rows take N,C,X,Y,Z,CO[,K] for C -> CO, K in {1, 3})
//!   conv_fwd_bwd:N,C,X,Y,Z     forward + backward (input, weight and bias gradients)
//!   conv_fwd_bwd_w:N,C,X,Y,Z   forward + backward (weight and bias gradients only: a first layer)
//!                              (the three conv_fwd* rows change the weights before every call, as
//!                              training does, so the Winograd weight transform is paid each time)
//!   conv_wgrad:N,C,X,Y,Z       the weight gradient alone (`conv3d_backward_weight_cpu`)
//!   conv_fwd_fused:N,C,X,Y,Z   the eval ResBlock's conv: BN -> ReLU fused into the padding, + residual
//!   resblock_eval:N,C,X,Y,Z    the inference ResBlock C -> C (both convolutions, BN -> ReLU, skip)
//!   linear_fwd_bwd:N,IN,OUT    linear layer forward + backward (x, weight and bias gradients)
//!   step_small                 pretraining step: 2 pairs of 32x32x16, base 16, 6 scales, 64 voxels/pair
//!   eval_pyramid               the eval-mode pyramid of one 128x128x32 window (base 16, 6 scales)
//! `--kernels` sets VOX2VEC_CPU_KERNELS for the run (which micro-kernels the convolutions use).

use std::time::Instant;

// As the binaries: mimalloc, keeping freed memory (`cpu::retain_freed_memory`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vox2vec::autograd::{Graph, Var};
use vox2vec::model::{ModelConfig, Vox2Vec};
use vox2vec::ops;
use vox2vec::optim::{Adam, AdamConfig};
use vox2vec::tensor::Tensor;
use vox2vec::train::{BatchShape, pretrain_step, synthetic_batch};

fn random(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::from_f32(shape, (0..shape.iter().product::<usize>()).map(|_| rng.random_range(-1.0..1.0f32)).collect())
}

/// A row's N,C,X,Y,Z (PyTorch's order) as our volume.
fn conv_shape(name: &str, d: &[usize]) -> Result<vox2vec::tensor::Vol> {
    anyhow::ensure!(d.len() == 5, "{name}: N,C,X,Y,Z");
    Ok(vox2vec::tensor::Vol { n: d[0], c: d[1], x: d[2], y: d[3], z: d[4] })
}

/// The conv rows' N,C,X,Y,Z[,CO[,K]] (CO defaults to C, K to 3).
fn conv_problem(name: &str, d: &[usize]) -> Result<(vox2vec::tensor::Vol, usize, usize)> {
    anyhow::ensure!((5..=7).contains(&d.len()), "{name}: N,C,X,Y,Z[,CO[,K]]");
    let (co, k) = (d.get(5).copied().unwrap_or(d[1]), d.get(6).copied().unwrap_or(3));
    anyhow::ensure!(k == 1 || k == 3, "{name}: K is 1 or 3");
    Ok((conv_shape(name, &d[..5])?, co, k))
}

fn main() -> Result<()> {
    vox2vec::cpu::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let row = args.first().context("usage: cpu_bench ROW [--reps N] [--kernels SET]")?.clone();
    let mut reps = 5;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--reps" => reps = args.get(i + 1).context("--reps N")?.parse()?,
            // SAFETY (set_var): single-threaded here, before any kernel choice is made.
            "--kernels" => unsafe {
                std::env::set_var("VOX2VEC_CPU_KERNELS", args.get(i + 1).context("--kernels SET")?)
            },
            a => bail!("unknown argument {a}"),
        }
        i += 2;
    }
    let mut rng = StdRng::seed_from_u64(1);
    let (name, dims) = row.split_once(':').unwrap_or((row.as_str(), ""));
    let d: Vec<usize> = if dims.is_empty() {
        Vec::new()
    } else {
        dims.split(',').map(|t| t.parse()).collect::<Result<_, _>>().context("shape")?
    };
    let mut run: Box<dyn FnMut() -> Result<()>> = match name {
        "conv_fwd" | "conv_fwd_bwd" | "conv_fwd_bwd_w" => {
            let (vox2vec::tensor::Vol { n, x, y, z, c }, co, k) = conv_problem(name, &d)?;
            let xs = random(&[n, x, y, z, c], &mut rng);
            let mut w = Some(random(&[co, k, k, k, c], &mut rng));
            let b = random(&[co], &mut rng);
            let dy = random(&[n, x, y, z, co], &mut rng);
            let name = name.to_string();
            Box::new(move || {
                // New weights every call, as after each optimiser step: one value moved to the
                // next float (in place), so nothing computed from the last call's weights (the
                // Winograd weight transform's cache) can be reused, as it could not in training.
                let mut data = w.take().expect("the weights are put back after each call").into_f32_vec();
                data[0] = f32::from_bits(data[0].to_bits() + 1);
                let w = w.insert(Tensor::from_f32(&[co, k, k, k, c], data));
                if name == "conv_fwd" {
                    let g = Graph::inference();
                    std::hint::black_box(ops::conv3d(
                        &g,
                        &Var::constant(xs.clone()),
                        &Var::constant(w.clone()),
                        Some(&Var::constant(b.clone())),
                    )?);
                    return Ok(());
                }
                let g = Graph::train();
                let xv = if name == "conv_fwd_bwd" { g.leaf(xs.clone()) } else { Var::constant(xs.clone()) };
                let (wv, bv) = (g.leaf(w.clone()), g.leaf(b.clone()));
                let y = ops::conv3d(&g, &xv, &wv, Some(&bv))?;
                std::hint::black_box(g.backward_with(&y, dy.clone())?);
                Ok(())
            })
        }
        "conv_wgrad" => {
            let v = conv_shape(name, &d)?;
            let vox2vec::tensor::Vol { n, x, y, z, c } = v;
            let xs = random(&[n, x, y, z, c], &mut rng);
            let dy = random(&[n, x, y, z, c], &mut rng);
            Box::new(move || {
                std::hint::black_box(ops::conv3d::conv3d_backward_weight_cpu(xs.f32s(), v, dy.f32s(), c, 3));
                Ok(())
            })
        }
        "conv_fwd_fused" => {
            // The eval-mode ResBlock's second convolution: relu(bn(x)) fused into the padding,
            // the residual added on the way out (`conv3d_forward_cpu_fused`).
            let v = conv_shape(name, &d)?;
            let vox2vec::tensor::Vol { n, x, y, z, c } = v;
            let xs = random(&[n, x, y, z, c], &mut rng);
            let w = random(&[c, 3, 3, 3, c], &mut rng);
            let b = random(&[c], &mut rng);
            let res = random(&[n, x, y, z, c], &mut rng);
            let ones = vec![1.0f32; c];
            let zeros = vec![0.0f32; c];
            let bn = ops::batchnorm::BnReluEval::new(&zeros, &ones, &ones, &zeros);
            let kernels = ops::conv3d::CpuKernels::best();
            Box::new(move || {
                std::hint::black_box(ops::conv3d::conv3d_forward_cpu_fused(
                    xs.f32s(),
                    v,
                    w.f32s(),
                    Some(b.f32s()),
                    c,
                    3,
                    Some(&bn),
                    Some(res.f32s()),
                    kernels,
                ));
                Ok(())
            })
        }
        "resblock_eval" => {
            // The inference ResBlock C -> C (two convolutions, BN -> ReLU before each, the skip).
            let (v, _, _) = conv_problem(name, &d)?;
            let mut store = vox2vec::params::ParamStore::new();
            let block = vox2vec::model::layers::ResBlock3d::new(&mut store, &mut rng, "b", v.c, v.c, 3);
            let xs = random(&v.shape(), &mut rng);
            Box::new(move || {
                std::hint::black_box(block.forward(&Graph::inference(), &mut store, &Var::constant(xs.clone()))?);
                Ok(())
            })
        }
        "linear_fwd_bwd" => {
            // The projection head's layers: x [N, in] · Wᵀ + b and its three gradients.
            let [n, fin, fout] = d[..] else { bail!("linear_fwd_bwd:N,IN,OUT") };
            let (xs, w, b, dy) = (
                random(&[n, fin], &mut rng),
                random(&[fout, fin], &mut rng),
                random(&[fout], &mut rng),
                random(&[n, fout], &mut rng),
            );
            Box::new(move || {
                let g = Graph::train();
                let (xv, wv, bv) = (g.leaf(xs.clone()), g.leaf(w.clone()), g.leaf(b.clone()));
                let y = ops::linear(&g, &xv, &wv, Some(&bv))?;
                std::hint::black_box(g.backward_with(&y, dy.clone())?);
                Ok(())
            })
        }
        "step_small" => {
            let mut model = Vox2Vec::new(ModelConfig::default(), 0);
            let mut adam = Adam::new(AdamConfig::default(), &model.store);
            let batch = synthetic_batch(BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 64 }, 0, 0);
            Box::new(move || {
                pretrain_step(&mut model, &mut adam, &batch)?;
                Ok(())
            })
        }
        "eval_pyramid" => {
            let mut model = Vox2Vec::new(ModelConfig::default(), 0);
            let x = Tensor::from_f32(&[1, 128, 128, 32, 1], (0..128 * 128 * 32).map(|_| rng.random::<f32>()).collect());
            Box::new(move || {
                let g = Graph::inference();
                std::hint::black_box(model.pyramid(&g, &Var::constant(x.clone()))?);
                Ok(())
            })
        }
        _ => bail!("unknown row {row:?}"),
    };
    run()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        run()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!("{row} {:.2} {:.2}", ms[ms.len() / 2], ms[0]);
    // VOX2VEC_PROFILE=1: where the time went, per op and shape (all runs, warm-up included).
    if std::env::var_os("VOX2VEC_PROFILE").is_some_and(|v| v != "0") {
        eprint!("{}", vox2vec::profile::report());
    }
    Ok(())
}
