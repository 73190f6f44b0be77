//! Tests on the real CT of ../shared/data (found through $VOX2VEC_DATA or the relative path;
//! on a machine without it each test prints that it was skipped): orientation and affine round
//! trip, image/label alignment through preprocessing, HU ranges, body-mask sanity, sampler
//! invariants and loader determinism.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use nifti::{NiftiObject, ReaderOptions};
use rand::SeedableRng;
use rand::rngs::StdRng;
use vox2vec::data::cache::build;
use vox2vec::data::loader::{CachedVolumes, Loader, Prepared, VolumeSet};
use vox2vec::data::nifti_io::{read_volume, write_volume};
use vox2vec::data::preprocess::{PreprocessConfig, preprocess_labels};
use vox2vec::data::sampler::{AugmentConfig, SampleSource, SamplerConfig, sample_batch_with_boxes};
use vox2vec::data::sources::{Verdict, discover, prepare_all};

fn data_dir() -> Option<PathBuf> {
    common::shared_data_dir()
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-real-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn orientation_and_affine_round_trip_on_real_files() {
    let Some(d) = data_dir() else { return };
    let dir = tmpdir("roundtrip");
    for (rel, flips) in [
        ("Dataset001_OpenKBP/labelsTr/pt_4.nii.gz", [true, true, true]),
        ("Dataset002_TotalSegAbdomen/labelsTr/abdomen.nii.gz", [false, false, false]),
        ("pretrain/lung1.nii.gz", [true, true, false]),
    ] {
        let path = d.join(rel);
        let v = read_volume(&path).unwrap();
        assert_eq!(v.geometry.orientation.flip, flips, "{rel}: axcodes");
        assert_eq!(v.geometry.orientation.perm, [0, 1, 2], "{rel}");
        let out = dir.join("back.nii.gz");
        if rel.contains("labelsTr") {
            let labels: Vec<u8> = v.data.iter().map(|&x| x as u8).collect();
            write_volume(&out, &labels, &v.geometry).unwrap();
        } else {
            let hu: Vec<i16> = v.data.iter().map(|&x| x as i16).collect();
            write_volume(&out, &hu, &v.geometry).unwrap();
        }
        let a = ReaderOptions::new().read_file(&path).unwrap();
        let b = ReaderOptions::new().read_file(&out).unwrap();
        assert_eq!(a.volume().raw_data(), b.volume().raw_data(), "{rel}: voxels moved");
        for (x, y) in [
            (a.header().srow_x, b.header().srow_x),
            (a.header().srow_y, b.header().srow_y),
            (a.header().srow_z, b.header().srow_z),
        ] {
            assert_eq!(x, y, "{rel}: affine changed");
        }
        assert_eq!(a.header().quatern_d, b.header().quatern_d);
    }
}

#[test]
fn image_and_labels_stay_aligned_through_preprocessing() {
    let Some(d) = data_dir() else { return };
    let cfg = PreprocessConfig::default();
    for case in ["pt_4", "pt_31"] {
        let img = d.join(format!("Dataset001_OpenKBP/imagesTr/{case}_0000.nii.gz"));
        let lab = read_volume(&d.join(format!("Dataset001_OpenKBP/labelsTr/{case}.nii.gz"))).unwrap();
        let e = build(&img, &cfg).unwrap();
        let labels: Vec<u8> = lab.data.iter().map(|&x| x as u8).collect();
        let pl = preprocess_labels(&labels, &e.ct).unwrap();
        assert_eq!(pl.len(), e.ct.hu.len());
        let mask = e.ct.body_mask();
        // The mandible (7) is bone and the parotids (3, 4) soft tissue: if labels and image
        // were shifted or flipped against each other these means would not hold.
        let mean = |c: u8| {
            let v: Vec<f64> = pl.iter().zip(&e.ct.hu).filter(|(l, _)| **l == c).map(|(_, &h)| h as f64).collect();
            assert!(!v.is_empty(), "{case}: label {c} vanished in resampling");
            v.iter().sum::<f64>() / v.len() as f64
        };
        let (mandible, parotid) = (mean(7), (mean(3) + mean(4)) / 2.0);
        println!("{case}: mean HU mandible {mandible:.0}, parotids {parotid:.0}");
        assert!(mandible > 300.0, "{case}: mandible mean {mandible}");
        assert!((-150.0..150.0).contains(&parotid), "{case}: parotid mean {parotid}");
        // Solid organs lie inside the body. (Larynx and esophagus hold air that the mouth and
        // nose connect to the outside, which the reference's flood fill calls outside.)
        for c in [1u8, 2, 3, 4, 7] {
            let inside = pl.iter().zip(&mask).filter(|(l, m)| **l == c && **m).count();
            let total = pl.iter().filter(|l| **l == c).count();
            assert!(inside as f64 > 0.99 * total as f64, "{case}: label {c}: {inside} of {total} voxels in the body");
        }
        // Resampling to 1 × 1 × 2 mm: the extent in mm is kept (up to a voxel).
        for a in 0..3 {
            let mm_src = (e.ct.crop_box[a][1] - e.ct.crop_box[a][0]) as f64 * e.ct.source_spacing[a];
            let mm_new = e.ct.shape[a] as f64 * e.ct.spacing[a];
            assert!((mm_src - mm_new).abs() <= e.ct.spacing[a], "{case} axis {a}: {mm_src} mm vs {mm_new} mm");
        }
    }
}

#[test]
fn hu_ranges_and_body_masks_are_sane() {
    let Some(d) = data_dir() else { return };
    let cfg = PreprocessConfig::default();
    for rel in ["pretrain/lung1.nii.gz", "pretrain/thorax_itkelastix.nii.gz", "pretrain/totalseg_abdomen.nii.gz"] {
        let e = build(&d.join(rel), &cfg).unwrap();
        let ct = &e.ct;
        let (lo, hi) = (*ct.hu.iter().min().unwrap(), *ct.hu.iter().max().unwrap());
        assert!(lo >= -1024 && hi <= 3071 && hi > 500, "{rel}: HU {lo}..{hi}");
        let mask = ct.body_mask();
        let s = ct.shape;
        let at = |x: usize, y: usize, z: usize| (x * s[1] + y) * s[2] + z;
        // Outside air is not body: the corners of every slice.
        for z in 0..s[2] {
            for (x, y) in [(0, 0), (s[0] - 1, 0), (0, s[1] - 1), (s[0] - 1, s[1] - 1)] {
                if ct.hu[at(x, y, z)] < -500 {
                    assert!(!mask[at(x, y, z)], "{rel}: outside air at ({x}, {y}, {z}) marked body");
                }
            }
        }
        // Air inside the body (lungs, bowel gas) is body.
        let inner_air = ct.hu.iter().zip(&mask).filter(|(h, m)| **h < -500 && **m).count();
        let body = ct.body.len();
        println!("{rel}: shape {s:?}, HU {lo}..{hi}, body {body} voxels, air inside the body {inner_air}");
        if rel.contains("lung") || rel.contains("thorax") {
            assert!(
                inner_air as f64 > 0.05 * body as f64,
                "{rel}: lungs are not inside the body ({inner_air} of {body})"
            );
        }
        // The body mask contains all the tissue.
        let tissue = ct.hu.iter().filter(|h| **h >= -500).count();
        let tissue_in = ct.hu.iter().zip(&mask).filter(|(h, m)| **h >= -500 && **m).count();
        assert_eq!(tissue, tissue_in, "{rel}: tissue outside the body mask");
    }
}

#[test]
fn sampler_pairs_are_the_same_voxel_in_both_views() {
    let Some(d) = data_dir() else { return };
    let e = build(&d.join("pretrain/lung1.nii.gz"), &PreprocessConfig::default()).unwrap();
    let p = Prepared::new(e.ct, "lung1".into());
    let src = SampleSource { ct: &p.ct, mask: &p.mask };
    let cfg = SamplerConfig::default();
    let (batch, boxes) = sample_batch_with_boxes(&src, &cfg, &mut StdRng::seed_from_u64(3)).unwrap();
    let s = p.ct.shape;
    assert_eq!(batch.x1.shape(), &[10, 128, 128, 32, 1]);
    let mut per_pair = vec![0usize; cfg.pairs];
    for (i, &b) in batch.batch_index.iter().enumerate() {
        per_pair[b as usize] += 1;
        let [s1, s2] = boxes[b as usize];
        let mut w = [0usize; 3];
        for a in 0..3 {
            let (v1, v2) = (batch.voxels_1[3 * i + a] as usize, batch.voxels_2[3 * i + a] as usize);
            assert!(v1 < cfg.patch[a] && v2 < cfg.patch[a]);
            assert_eq!(v1 + s1[a], v2 + s2[a], "pair {i}: not the same voxel");
            w[a] = v1 + s1[a];
        }
        assert!(p.mask[(w[0] * s[1] + w[1]) * s[2] + w[2]], "pair {i} is not a body voxel");
    }
    assert!(per_pair.iter().all(|&n| n <= 1024), "{per_pair:?}");
    assert!(per_pair.contains(&1024), "no pair reached 1024 voxels on a large chest CT: {per_pair:?}");
    // Same seed, same batch; another seed, another batch.
    let (again, _) = sample_batch_with_boxes(&src, &cfg, &mut StdRng::seed_from_u64(3)).unwrap();
    assert_eq!(batch.x1.f32s(), again.x1.f32s());
    assert_eq!(batch.voxels_2, again.voxels_2);
    let (other, _) = sample_batch_with_boxes(&src, &cfg, &mut StdRng::seed_from_u64(4)).unwrap();
    assert_ne!(batch.voxels_1, other.voxels_1);
    // Without augmentation, view 1 is the fixed-window crop of the volume at its box.
    let plain = SamplerConfig {
        augment: AugmentConfig {
            p_blur_or_sharpen: 0.0,
            p_noise: 0.0,
            p_random_window: 0.0,
            ..AugmentConfig::default()
        },
        pairs: 2,
        ..cfg
    };
    let (b, boxes) = sample_batch_with_boxes(&src, &plain, &mut StdRng::seed_from_u64(5)).unwrap();
    let pp = plain.patch;
    for (pair, pair_boxes) in boxes.iter().enumerate().take(2) {
        let st = pair_boxes[0];
        for (x, y, z) in [(0, 0, 0), (5, 77, 31), (127, 127, 31), (64, 3, 9)] {
            let h = p.ct.hu[((st[0] + x) * s[1] + st[1] + y) * s[2] + st[2] + z] as f32;
            let want = ((h + 1350.0) / 2350.0).clamp(0.0, 1.0);
            let got = b.x1.f32s()[pair * pp[0] * pp[1] * pp[2] + (x * pp[1] + y) * pp[2] + z];
            assert!((got - want).abs() < 1e-6, "pair {pair} ({x}, {y}, {z}): {got} vs {want}");
        }
    }
}

#[test]
fn loader_sequence_is_independent_of_worker_count() {
    let Some(d) = data_dir() else { return };
    let cache = tmpdir("loader");
    let files = discover(&d.join("Dataset001_OpenKBP")).unwrap();
    assert_eq!(files.len(), 16, "nnU-Net imagesTr");
    let files = &files[..3];
    let cfg = SamplerConfig { pairs: 2, patch: [64, 64, 16], max_voxels: 64, ..SamplerConfig::default() };
    let verdicts = prepare_all(files, &cache, &PreprocessConfig::default(), cfg.patch, &|_| {});
    let entries: Vec<PathBuf> = verdicts
        .into_iter()
        .filter_map(|(_, v)| if let Verdict::Ready { entry, .. } = v { Some(entry) } else { None })
        .collect();
    assert_eq!(entries.len(), 3);
    // The second preparation finds everything in the cache.
    let again = prepare_all(files, &cache, &PreprocessConfig::default(), cfg.patch, &|_| {});
    assert!(again.iter().all(|(_, v)| matches!(v, Verdict::Ready { cached: true, .. })));
    let run = |workers: usize, start: u64| {
        let vols: Arc<dyn VolumeSet> = Arc::new(CachedVolumes::new(entries.clone(), 2));
        let mut l = Loader::new(vols, cfg, 9, start, workers, 2).unwrap();
        (0..4).map(|_| l.next_batch().unwrap()).map(|b| (b.x1.f32s().to_vec(), b.voxels_1)).collect::<Vec<_>>()
    };
    let one = run(1, 0);
    assert_eq!(one, run(3, 0), "batches depend on the number of workers");
    assert_eq!(&one[2..], &run(2, 2)[..2], "a loader started at batch 2 does not continue the sequence");
}

/// A linear probe on OpenKBP at a small CPU configuration (3 mm grid, 32×32×16 patches, batch
/// 4, 300 steps, lr 3e-2, a random full-width backbone, validation on pt_4 and pt_22) finds
/// the mandible: measured Dice 0.33 on the development machine.
#[test]
fn linear_probe_on_openkbp_finds_the_mandible() {
    use vox2vec::data::nnunet::load_dataset;
    use vox2vec::eval::segment::{Head, HeadKind, Mode, SegConfig, train_segmentation};
    use vox2vec::model::{ModelConfig, Vox2Vec};
    let Some(d) = data_dir() else { return };
    let pre = PreprocessConfig { spacing: [3.0, 3.0, 3.0], ..PreprocessConfig::default() };
    let ds = load_dataset(&d.join("Dataset001_OpenKBP"), &pre, &|_| {}).unwrap();
    assert_eq!(ds.classes.len(), 7);
    let (val, train): (Vec<_>, Vec<_>) = ds.cases.iter().partition(|c| c.name == "pt_4" || c.name == "pt_22");
    let mut model = Vox2Vec::new(ModelConfig::default(), 0);
    let mut store = vox2vec::params::ParamStore::new();
    let head = Head::new(HeadKind::Linear, &mut store, 0x5eed, model.config.fpn, 7);
    let cfg = SegConfig {
        patch: [32, 32, 16],
        batch: 4,
        steps: 300,
        lr: 3e-2,
        validate_every: 300,
        seed: 0,
        ..SegConfig::default()
    };
    let res =
        train_segmentation(&mut model, &head, &mut store, &train, &val, 7, Mode::Probe, &cfg, &|_| {}, &mut |_, _| {
            Ok(())
        })
        .unwrap();
    let mandible = res.best_dice[6];
    println!("OpenKBP linear probe (random backbone): Dice per class {:?}", res.best_dice);
    assert!(mandible > 0.1, "mandible Dice {mandible}");
}
