//! CPU backend benchmarks (criterion). Reference points, PyTorch 2.x on the CPU with 2 threads
//! on a 2-core machine like the development one (medians, from the issue): conv3d forward
//! 46 ms, forward + backward 91 ms, small pretraining step 1.03 s.
//!
//! `cargo bench --bench cpu` (add `-- conv3d` to filter).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::ops::conv3d::{conv3d_backward_input_cpu, conv3d_backward_weight_cpu, conv3d_forward_cpu};
use vox2vec::optim::{Adam, AdamConfig};
use vox2vec::tensor::Vol;
use vox2vec::train::{BatchShape, pretrain_step, synthetic_batch};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// conv3d 3×3×3, 16 → 16 channels, batch 2, 64×64×32 (channels-last), with bias.
fn conv3d(c: &mut Criterion) {
    vox2vec::cpu::retain_freed_memory();
    let v = Vol { n: 2, x: 64, y: 64, z: 32, c: 16 };
    let co = 16;
    let x = random(v.voxels() * v.c, 1);
    let w = random(co * 27 * v.c, 2);
    let b = random(co, 3);
    let dy = random(v.voxels() * co, 4);
    let mut g = c.benchmark_group("conv3d_b2_c16_64x64x32");
    g.sample_size(20).measurement_time(Duration::from_secs(8));
    g.bench_function("forward", |bch| bch.iter(|| black_box(conv3d_forward_cpu(&x, v, &w, Some(&b), co, 3))));
    // PyTorch's forward + backward when the input needs no gradient (a first layer).
    g.bench_function("forward_backward_weights", |bch| {
        bch.iter(|| {
            let y = conv3d_forward_cpu(&x, v, &w, Some(&b), co, 3);
            let dwb = conv3d_backward_weight_cpu(&x, v, &dy, co, 3);
            black_box((y, dwb))
        })
    });
    // Forward + backward with the input gradient too (every inner layer).
    g.bench_function("forward_backward_full", |bch| {
        bch.iter(|| {
            let y = conv3d_forward_cpu(&x, v, &w, Some(&b), co, 3);
            let dx = conv3d_backward_input_cpu(&dy, v.with_c(co), &w, v.c, 3);
            let dwb = conv3d_backward_weight_cpu(&x, v, &dy, co, 3);
            black_box((y, dx, dwb))
        })
    });
    g.finish();
}

/// A whole pretraining step: 2 pairs of 32×32×16, base 16, 6 scales, 64 voxels per pair.
fn pretrain_step_small(c: &mut Criterion) {
    vox2vec::cpu::retain_freed_memory();
    let cfg =
        ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: 16, num_scales: 6 }, ..ModelConfig::default() };
    let shape = BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 64 };
    let mut model = Vox2Vec::new(cfg, 0);
    let mut adam = Adam::new(AdamConfig::default(), &model.store);
    let batch = synthetic_batch(shape, 0, 0);
    let mut g = c.benchmark_group("pretrain_step");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("small_2x32x32x16_base16_6scales", |bch| {
        bch.iter(|| black_box(pretrain_step(&mut model, &mut adam, &batch).unwrap()))
    });
    g.finish();
}

/// The level-0 convolution of the small pretraining step (2×32×32×16, 16 → 16).
fn conv3d_small(c: &mut Criterion) {
    let v = Vol { n: 2, x: 32, y: 32, z: 16, c: 16 };
    let x = random(v.voxels() * v.c, 1);
    let w = random(16 * 27 * v.c, 2);
    let dy = random(v.voxels() * 16, 4);
    let mut g = c.benchmark_group("conv3d_b2_c16_32x32x16");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    g.bench_function("forward", |bch| bch.iter(|| black_box(conv3d_forward_cpu(&x, v, &w, None, 16, 3))));
    g.bench_function("backward_input", |bch| bch.iter(|| black_box(conv3d_backward_input_cpu(&dy, v, &w, 16, 3))));
    g.bench_function("backward_weight", |bch| bch.iter(|| black_box(conv3d_backward_weight_cpu(&x, v, &dy, 16, 3))));
    g.finish();
}

/// One reference-size batch (10 pairs of 128×128×32, up to 1024 voxels per pair, all
/// augmentations) from a preprocessed CT phantom, on one core: what one loader worker makes.
fn loader_batch_reference(c: &mut Criterion) {
    use vox2vec::data::loader::{PhantomVolumes, VolumeSet, make_batch};
    use vox2vec::data::sampler::SamplerConfig;
    let volumes = PhantomVolumes::new(0, 2);
    volumes.get(0).unwrap();
    volumes.get(1).unwrap();
    let cfg = SamplerConfig::default();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut g = c.benchmark_group("loader");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    let mut i = 0u64;
    g.bench_function("batch_10x128x128x32_one_core", |bch| {
        bch.iter(|| {
            i += 1;
            black_box(pool.install(|| make_batch(&volumes, &cfg, 0, i).unwrap()))
        })
    });
    g.finish();
}

criterion_group!(benches, conv3d, conv3d_small, pretrain_step_small, loader_batch_reference);
criterion_main!(benches);
