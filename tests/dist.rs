//! Data-parallel pretraining on the CPU: N ranks of an in-process group give, step by step,
//! the parameters of one process that computes the N ranks' gradients itself and averages
//! them; a rank that stops makes the others fail with its name; `vox2vec-train --cpu-ranks 2`
//! runs as two processes over TCP and equals the in-process group bit for bit.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use vox2vec::autograd::Graph;
use vox2vec::dist::local::LocalGroup;
use vox2vec::dist::{Communicator, rank_seed};
use vox2vec::model::{ModelConfig, Vox2Vec};
use vox2vec::optim::{Adam, AdamConfig, clip_coefficient, global_norm};
use vox2vec::params::SlotKind;
use vox2vec::tensor::Tensor;
use vox2vec::train::{
    BatchShape, BatchSource, MAX_GRAD_NORM, Resume, Silent, TrainOptions, run_pretraining_ranked, synthetic_batch,
};

const SHAPE: BatchShape = BatchShape { pairs: 2, patch: [16, 16, 8], voxels_per_pair: 32 };

fn opts(dir: &std::path::Path, steps: u64) -> TrainOptions {
    common::tiny_run(dir, steps, 5)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The group's run: `world` threads, each a rank; returns every rank's final model.
fn group_run(o: &TrainOptions, world: usize) -> Vec<anyhow::Result<Vox2Vec>> {
    let comms = LocalGroup::ranks(world, Duration::from_secs(120));
    std::thread::scope(|s| {
        let hs: Vec<_> =
            comms.into_iter().map(|mut c| s.spawn(move || run_pretraining_ranked(o, &mut Silent, &mut c))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One process doing what the ranks do together: each rank's forward and backward from the
/// same weights and BatchNorm state, its gradients summed in rank order and divided by the
/// rank count, rank 0's running statistics kept, then the clip and Adam.
fn averaging_run(o: &TrainOptions, world: usize) -> Vox2Vec {
    let mut model = Vox2Vec::new(o.model, o.seed);
    let mut adam = Adam::new(o.adam, &model.store);
    let state = |m: &Vox2Vec| -> Vec<(usize, Tensor)> {
        m.store
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind != SlotKind::Trainable)
            .map(|(i, s)| (i, s.value.clone()))
            .collect()
    };
    for step in 0..o.steps {
        let before = state(&model);
        let mut sum: Vec<Option<Vec<f32>>> = vec![None; model.store.len()];
        let mut rank0_state = Vec::new();
        for r in 0..world {
            for (i, t) in &before {
                model.store.set(*i, t.clone());
            }
            let batch = synthetic_batch(SHAPE, rank_seed(o.seed, r), step);
            let g = Graph::train();
            let out = model.forward_pairs(&g, &batch, false).unwrap();
            let grads = g.backward(&out.loss).unwrap();
            for (s, acc) in sum.iter_mut().enumerate() {
                if let Some(gr) = grads.param(&model.store, s) {
                    match acc {
                        None => *acc = Some(gr.f32s().to_vec()),
                        Some(a) => a.iter_mut().zip(gr.f32s()).for_each(|(a, v)| *a += v),
                    }
                }
            }
            if r == 0 {
                rank0_state = state(&model);
            }
        }
        for (i, t) in rank0_state {
            model.store.set(i, t);
        }
        let avg: Vec<Option<Tensor>> = sum
            .into_iter()
            .enumerate()
            .map(|(s, a)| {
                a.map(|a| {
                    Tensor::from_f32(model.store.get(s).shape(), a.into_iter().map(|v| v / world as f32).collect())
                })
            })
            .collect();
        let scale = clip_coefficient(global_norm(&avg), MAX_GRAD_NORM);
        adam.update_scaled(&mut model.store, &avg, scale).unwrap();
    }
    model
}

fn assert_same_params(a: &Vox2Vec, b: &Vox2Vec, what: &str) {
    for (sa, sb) in a.store.slots().iter().zip(b.store.slots()) {
        if sa.value.dtype() != vox2vec::tensor::DType::F32 {
            continue;
        }
        let (x, y) = (sa.value.f32s(), sb.value.f32s());
        let differ = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {} differs in {differ} of {} values", sa.name, x.len());
    }
}

#[test]
fn ranks_equal_one_process_averaging_their_gradients() {
    for world in [2, 3] {
        for steps in [1, 3] {
            let dir = tmpdir(&format!("parity{world}-{steps}"));
            let o = opts(&dir, steps);
            let models: Vec<Vox2Vec> = group_run(&o, world).into_iter().map(|m| m.unwrap()).collect();
            let reference = averaging_run(&o, world);
            for (r, m) in models.iter().enumerate() {
                assert_same_params(
                    m,
                    &reference,
                    &format!("{world} ranks, {steps} steps, rank {r} vs the averaging process"),
                );
            }
            // The ranks really drew different batches: one rank alone ends elsewhere.
            let alone = averaging_run(&o, 1);
            assert!(
                alone.store.slots().iter().zip(reference.store.slots()).any(|(a, b)| a.value.f32s() != b.value.f32s())
            );
            // Rank 0 alone wrote the run's files.
            let lines = std::fs::read_to_string(dir.join(vox2vec::train::METRICS_FILE)).unwrap().lines().count();
            assert_eq!(lines as u64, steps);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn a_rank_that_stops_stops_the_others_with_its_name() {
    let dir = tmpdir("dead");
    let comms = LocalGroup::ranks(2, Duration::from_secs(60));
    let (o3, o1) = (opts(&dir, 3), opts(&dir, 1));
    let t0 = std::time::Instant::now();
    let results: Vec<anyhow::Result<Vox2Vec>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                // Rank 1 leaves after its first step (as a failing rank would).
                let o = if c.rank() == 1 { &o1 } else { &o3 };
                s.spawn(move || run_pretraining_ranked(o, &mut Silent, &mut c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let err = format!("{:#}", results[0].as_ref().expect_err("rank 0 must fail once rank 1 is gone"));
    assert!(err.contains("rank 1 of 2 stopped"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(50), "rank 0 waited {:?} instead of failing at once", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cpu_ranks_as_processes_equal_the_in_process_group() {
    let dir = tmpdir("procs");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
        .args([
            "--cpu-ranks",
            "2",
            "--synthetic-pairs",
            "--small",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&dir)
        .env("VOX2VEC_DIST_TIMEOUT", "120")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 0 of 2 (tcp communicator)"), "{stderr}");
    let metrics = std::fs::read_to_string(dir.join(vox2vec::train::METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    // The same run as two threads: the checkpoint's weights are the group's, bit for bit.
    let mut o = opts(&dir.join("threads"), 2);
    o.model = ModelConfig::default();
    o.adam = AdamConfig::default();
    o.data = BatchSource::SyntheticPairs(BatchShape { pairs: 2, patch: [32, 32, 16], voxels_per_pair: 64 });
    o.seed = 3;
    let group = group_run(&o, 2).remove(0).unwrap();
    let mut from_file = Vox2Vec::new(o.model, 0);
    vox2vec::checkpoint::load(&dir.join(vox2vec::train::CHECKPOINT_FILE), &mut from_file.store, None).unwrap();
    assert_same_params(&from_file, &group, "2 processes over TCP vs 2 threads");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One backward per rank, its gradients averaged in buckets of any size (many of 4 KB, DDP's
/// 1 MiB + 25 MiB, odd sizes): always the bits of summing the ranks' plain gradients in rank
/// order and dividing, as the buckets only decide when each part is sent.
#[test]
fn buckets_of_any_size_give_the_same_average() {
    use vox2vec::dist::buckets::{BucketSizes, backward_averaged_with};
    let o = opts(&tmpdir("buckets"), 1);
    let world = 3;
    let grads_of = |rank: usize| -> (Vox2Vec, Vec<Option<Vec<f32>>>) {
        let mut model = Vox2Vec::new(o.model, o.seed);
        let batch = synthetic_batch(SHAPE, rank_seed(o.seed, rank), 0);
        let g = Graph::train();
        let out = model.forward_pairs(&g, &batch, false).unwrap();
        let grads = g.backward(&out.loss).unwrap();
        let v = (0..model.store.len()).map(|s| grads.param(&model.store, s).map(|t| t.f32s().to_vec())).collect();
        (model, v)
    };
    let mut reference: Vec<Option<Vec<f32>>> = grads_of(0).1;
    for r in 1..world {
        for (acc, g) in reference.iter_mut().zip(grads_of(r).1) {
            if let (Some(a), Some(g)) = (acc.as_mut(), g) {
                a.iter_mut().zip(g).for_each(|(a, v)| *a += v);
            }
        }
    }
    reference.iter_mut().flatten().for_each(|a| a.iter_mut().for_each(|v| *v /= world as f32));
    let total: usize = reference.iter().flatten().map(Vec::len).sum();
    for sizes in [
        BucketSizes { first: 4096, rest: 4096 },
        BucketSizes { first: 1 << 20, rest: 25 << 20 },
        BucketSizes { first: 100, rest: 4 * total / 3 },
    ] {
        let comms = LocalGroup::ranks(world, Duration::from_secs(60));
        let results: Vec<Vec<Option<Tensor>>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let mut model = Vox2Vec::new(o.model, o.seed);
                        let batch = synthetic_batch(SHAPE, rank_seed(o.seed, c.rank()), 0);
                        let g = Graph::train();
                        let out = model.forward_pairs(&g, &batch, false).unwrap();
                        backward_averaged_with(&g, &out.loss, &model.store, &mut c, sizes).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, per_slot) in results.iter().enumerate() {
            for (slot, (got, want)) in per_slot.iter().zip(&reference).enumerate() {
                match (got, want) {
                    (Some(t), Some(w)) => assert!(
                        t.f32s().iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{sizes:?}: rank {r} slot {slot} differs"
                    ),
                    (None, None) => {}
                    _ => panic!("{sizes:?}: rank {r} slot {slot}: gradient present on one side only"),
                }
            }
        }
    }
}

/// Two ranks stopped after 2 steps (checkpoint) and resumed for 2 more end where 4 steps
/// straight end, on every rank, bit for bit.
#[test]
fn a_resumed_group_continues_exactly() {
    let (straight_dir, split_dir) = (tmpdir("straight"), tmpdir("split"));
    let straight: Vec<Vox2Vec> = group_run(&opts(&straight_dir, 4), 2).into_iter().map(|m| m.unwrap()).collect();
    group_run(&opts(&split_dir, 2), 2).into_iter().for_each(|m| drop(m.unwrap()));
    let mut resumed = opts(&split_dir, 4);
    resumed.resume = Resume::Latest;
    let split: Vec<Vox2Vec> = group_run(&resumed, 2).into_iter().map(|m| m.unwrap()).collect();
    for r in 0..2 {
        assert_same_params(&split[r], &straight[r], &format!("rank {r}: 2 + 2 steps vs 4 steps"));
    }
    let lines = std::fs::read_to_string(split_dir.join(vox2vec::train::METRICS_FILE)).unwrap().lines().count();
    assert_eq!(lines, 4);
    let _ = std::fs::remove_dir_all(&straight_dir);
    let _ = std::fs::remove_dir_all(&split_dir);
}
