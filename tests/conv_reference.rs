//! conv3d's fast CPU paths (shifted GEMMs, im2col with padding-only taps dropped, 1×1×1 GEMM)
//! against a naive nested-loop convolution in f64, forward and both backward products, on
//! shapes that select each path (odd extents, batch 1, extent-1 axes).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vox2vec::ops::conv3d::{
    CpuKernels, conv3d_backward_input_cpu_onto, conv3d_backward_input_cpu_with, conv3d_backward_weight_cpu_onto,
    conv3d_backward_weight_cpu_with, conv3d_forward_cpu_with, direct_convolutions,
};
use vox2vec::tensor::Vol;

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// y[n,x,y,z,o] = b[o] + Σ w[o,a,b,c,i] · x[n, x+a-p, y+b-p, z+c-p, i]; returns (y, dx, dw) for a cotangent dy.
fn naive(x: &[f32], v: Vol, w: &[f32], b: &[f32], co: usize, k: usize, dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let p = (k / 2) as isize;
    let ci = v.c;
    let mut y = vec![0.0f64; v.voxels() * co];
    let mut dx = vec![0.0f64; x.len()];
    let mut dw = vec![0.0f64; w.len()];
    let idx = |n: usize, xi: usize, yi: usize, zi: usize| ((n * v.x + xi) * v.y + yi) * v.z + zi;
    for n in 0..v.n {
        for xi in 0..v.x {
            for yi in 0..v.y {
                for zi in 0..v.z {
                    let out = idx(n, xi, yi, zi);
                    for o in 0..co {
                        let mut acc = b[o] as f64;
                        for a in 0..k {
                            for bb in 0..k {
                                for c in 0..k {
                                    let (xs, ys, zs) = (
                                        xi as isize + a as isize - p,
                                        yi as isize + bb as isize - p,
                                        zi as isize + c as isize - p,
                                    );
                                    if xs < 0
                                        || ys < 0
                                        || zs < 0
                                        || xs >= v.x as isize
                                        || ys >= v.y as isize
                                        || zs >= v.z as isize
                                    {
                                        continue;
                                    }
                                    let src = idx(n, xs as usize, ys as usize, zs as usize);
                                    for i in 0..ci {
                                        let wi = (((o * k + a) * k + bb) * k + c) * ci + i;
                                        acc += w[wi] as f64 * x[src * ci + i] as f64;
                                        dx[src * ci + i] += w[wi] as f64 * dy[out * co + o] as f64;
                                        dw[wi] += x[src * ci + i] as f64 * dy[out * co + o] as f64;
                                    }
                                }
                            }
                        }
                        y[out * co + o] = acc;
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum::<f64>().sqrt();
    d / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-12)
}

#[test]
fn fast_paths_match_naive_convolution() {
    let mut rng = StdRng::seed_from_u64(42);
    let cases = [
        (Vol { n: 2, x: 7, y: 6, z: 5, c: 3 }, 4, 3),    // shifted GEMMs
        (Vol { n: 1, x: 9, y: 4, z: 11, c: 2 }, 5, 3),   // shifted, batch 1
        (Vol { n: 3, x: 2, y: 2, z: 3, c: 4 }, 3, 3),    // im2col, all taps
        (Vol { n: 2, x: 1, y: 3, z: 2, c: 5 }, 2, 3),    // im2col, x taps dropped
        (Vol { n: 2, x: 1, y: 1, z: 1, c: 6 }, 7, 3),    // centre tap only
        (Vol { n: 2, x: 8, y: 8, z: 4, c: 9 }, 17, 3),   // im2col with all taps, channels 16 + 1
        (Vol { n: 2, x: 5, y: 3, z: 4, c: 6 }, 3, 1),    // 1×1×1
        (Vol { n: 1, x: 33, y: 35, z: 9, c: 1 }, 2, 3),  // several row blocks, one input channel
        (Vol { n: 1, x: 6, y: 5, z: 7, c: 5 }, 20, 3),   // output channels 16 + 4 (padded to 24)
        (Vol { n: 2, x: 4, y: 3, z: 6, c: 2 }, 1, 3),    // one output channel
        (Vol { n: 1, x: 6, y: 5, z: 7, c: 16 }, 32, 3),  // a 32-channel AVX-512 block
        (Vol { n: 1, x: 6, y: 5, z: 7, c: 80 }, 40, 3),  // shifted, a long reduction (9 x 240)
        (Vol { n: 1, x: 4, y: 4, z: 2, c: 80 }, 40, 3),  // im2col, a long reduction (27 x 80)
        (Vol { n: 2, x: 3, y: 4, z: 5, c: 8 }, 40, 3),   // 32 + a masked 8
        (Vol { n: 1, x: 5, y: 5, z: 4, c: 4 }, 48, 3),   // 32 + 16
        (Vol { n: 1, x: 4, y: 4, z: 2, c: 24 }, 64, 1),  // 1×1×1, two 32-channel blocks
        (Vol { n: 1, x: 5, y: 4, z: 6, c: 64 }, 64, 3), // shifted, weight-gradient tiles of 4 vectors × 6 (and 5) channels
        (Vol { n: 2, x: 3, y: 4, z: 2, c: 24 }, 72, 3), // channel split (SIMD): 32 + 32 + 8 channels
        (Vol { n: 1, x: 3, y: 3, z: 1, c: 8 }, 64, 3),  // channel split over the 9 taps that reach a one-slice volume
        (Vol { n: 1, x: 3, y: 4, z: 2, c: 64 }, 16, 3), // input gradient (64 channels) through the channel split
        (Vol { n: 1, x: 3, y: 4, z: 29, c: 16 }, 16, 3), // shifted forward: lines of 29 rows cut into several z-tap tiles
        (Vol { n: 1, x: 3, y: 3, z: 26, c: 5 }, 40, 3),  // z-tap tiles of 2 vectors over 26-row lines, a masked 8
        (Vol { n: 2, x: 4, y: 3, z: 17, c: 33 }, 32, 3), // 32-channel block, reduction blocks cutting tap groups
        (Vol { n: 1, x: 20, y: 5, z: 3, c: 6 }, 24, 3),  // short lines: several planes per task, the last task partial
        (Vol { n: 1, x: 3, y: 8, z: 9, c: 8 }, 16, 3), // training's Winograd F(2, 3): forward and flipped input gradient
        (Vol { n: 2, x: 3, y: 13, z: 4, c: 5 }, 7, 3), // F(2, 3) with a partial last tile, short lines, odd channels both ways
    ];
    for (v, co, k) in cases {
        let x = rand_vec(&mut rng, v.voxels() * v.c);
        let w = rand_vec(&mut rng, co * k * k * k * v.c);
        let b = rand_vec(&mut rng, co);
        let dy = rand_vec(&mut rng, v.voxels() * co);
        let (y_ref, dx_ref, dw_ref) = naive(&x, v, &w, &b, co, k, &dy);
        let db_ref: Vec<f64> = (0..co).map(|o| dy.iter().skip(o).step_by(co).map(|&g| g as f64).sum()).collect();
        // Every kernel set: the portable GEMM and, where the processor has them, AVX2/FMA and
        // AVX-512 (which of them ran is printed: a machine without AVX-512 tests only the rest).
        // The SIMD sets run twice: by default (3×3×3 with X ≥ 2 and Y, Z ≥ 4 outside the
        // channel split by Winograd F(2, 3): forward, input and weight gradients) and on the
        // direct kernels alone (`direct_convolutions`; the per-case comments name the direct
        // paths).
        let mut simd_results: Vec<(CpuKernels, bool, [Vec<f32>; 3])> = Vec::new();
        for (simd, direct) in
            CpuKernels::available().into_iter().flat_map(|s| [(s, false), (s, true)]).filter(|&(s, d)| s.simd() || !d)
        {
            let mut check = || {
                let y = conv3d_forward_cpu_with(&x, v, &w, Some(&b), co, k, simd);
                let dx = conv3d_backward_input_cpu_with(&dy, v.with_c(co), &w, v.c, k, simd);
                let (dw, db) = conv3d_backward_weight_cpu_with(&x, v, &dy, co, k, simd);
                let errs = [rel(&y, &y_ref), rel(&dx, &dx_ref), rel(&dw, &dw_ref), rel(&db, &db_ref)];
                println!(
                    "conv {v:?} co {co} k {k} kernels {simd:?} direct {direct}: rel err y {:.1e} dx {:.1e} dw {:.1e} db {:.1e}",
                    errs[0], errs[1], errs[2], errs[3]
                );
                assert!(
                    errs.iter().all(|&e| e < 1e-5),
                    "{v:?} co {co} k {k} kernels {simd:?} direct {direct}: {errs:?}"
                );
                // Accumulating onto a gradient already held (x's other consumer, w's other view):
                // the bits of adding it afterwards, whichever path ran.
                let (prev_dx, prev_dw) = (rand_vec(&mut rng, dx.len()), rand_vec(&mut rng, dw.len()));
                let dx_onto = conv3d_backward_input_cpu_onto(&dy, v.with_c(co), &w, v.c, k, Some(&prev_dx), simd);
                let dw_onto = conv3d_backward_weight_cpu_onto(&x, v, &dy, co, k, Some(prev_dw.clone()), simd);
                for (name, onto, prev, g) in [("dx", &dx_onto, &prev_dx, &dx), ("dw", &dw_onto, &prev_dw, &dw)] {
                    assert_eq!(onto.len(), g.len());
                    let same =
                        onto.iter().zip(prev.iter().zip(g.iter())).all(|(o, (p, g))| o.to_bits() == (p + g).to_bits());
                    assert!(
                        same,
                        "{v:?} co {co} k {k} kernels {simd:?} direct {direct}: {name} added onto a previous gradient is not prev + {name}"
                    );
                }
                [y, dx, dw]
            };
            let results = if direct { direct_convolutions(check) } else { check() };
            if simd != CpuKernels::Portable {
                simd_results.push((simd, direct, results));
            }
        }
        // AVX2 and AVX-512 take the same FMAs in the same order for every output (whatever
        // their tiles and reduction blocks): the same bits, so results do not depend on the
        // machine's vector width.
        // Winograd ran exactly where it should: other bits than the direct kernels' where it
        // applies (for y and dw on v into co channels, for dx on dy's volume into Ci), the
        // same bits elsewhere.
        #[cfg(target_arch = "x86_64")]
        for simd in CpuKernels::available().into_iter().filter(|s| s.simd()) {
            use vox2vec::ops::conv3d::{channel_split, winograd};
            let applies = |vol: Vol, cout: usize| {
                winograd::transform_for(vol, k, simd).is_some() && !channel_split::applicable(vol, cout, k, simd)
            };
            let expected = [applies(v, co), applies(v.with_c(co), v.c), applies(v, co)];
            let [(_, _, by_default), (_, _, by_direct)] =
                [false, true].map(|d| simd_results.iter().find(|r| r.0 == simd && r.1 == d).unwrap());
            for (((name, a), b), winograd) in ["y", "dx", "dw"].iter().zip(by_default).zip(by_direct).zip(expected) {
                let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert_eq!(
                    same,
                    !winograd,
                    "{v:?} co {co} k {k} kernels {simd:?}: Winograd expected for {name}: {winograd}, but the default and the direct kernels' bits are {}",
                    if same { "the same" } else { "different" }
                );
            }
        }
        for direct in [false, true] {
            if let [(_, _, a), (_, _, b)] = simd_results.iter().filter(|r| r.1 == direct).collect::<Vec<_>>().as_slice()
            {
                for (name, (x, y)) in ["y", "dx", "dw"].iter().zip(a.iter().zip(b)) {
                    assert!(
                        x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{v:?} co {co} k {k} direct {direct}: AVX2 and AVX-512 {name} differ"
                    );
                }
            }
        }
    }
}

/// Winograd F(2, 3) and F(4, 3) along y (the inference forward, `winograd.rs`) against the
/// naive f64 convolution, through BN → ReLU and plus a residual as the inference ResBlock runs
/// it: y extents that are and are not multiples of m, lines of 8 and more z rows, padded and
/// masked channel blocks. Its error is reported beside the direct kernels' on the same case;
/// AVX2 and AVX-512 give the same bits (the z-tap kernel's order, the transforms in scalar code).
#[cfg(target_arch = "x86_64")]
#[test]
fn winograd_matches_naive_convolution() {
    use vox2vec::ops::batchnorm::BnReluEval;
    use vox2vec::ops::conv3d::winograd::{self, F2, F4};
    let mut rng = StdRng::seed_from_u64(7);
    let cases = [
        (Vol { n: 1, x: 4, y: 8, z: 8, c: 16 }, 16),   // F(4, 3), whole tiles
        (Vol { n: 2, x: 3, y: 9, z: 9, c: 5 }, 20),    // a last tile of one row, odd z, 16 + 4 channels
        (Vol { n: 1, x: 2, y: 13, z: 17, c: 33 }, 40), // reduction blocks cutting tap groups, 32 + a masked 8
        (Vol { n: 1, x: 5, y: 6, z: 8, c: 3 }, 1),     // F(2, 3), one output channel
        (Vol { n: 2, x: 3, y: 7, z: 12, c: 8 }, 32),   // an odd y with F(2, 3)
        (Vol { n: 1, x: 3, y: 16, z: 30, c: 64 }, 24), // lines cut into several z-tap tiles
        (Vol { n: 2, x: 3, y: 8, z: 4, c: 12 }, 16),   // short lines: one run per plane, z padding dropped
        (Vol { n: 1, x: 4, y: 11, z: 7, c: 24 }, 40),  // short lines and a partial last tile
    ];
    for (v, co) in cases {
        let x = rand_vec(&mut rng, v.voxels() * v.c);
        let w = rand_vec(&mut rng, co * 27 * v.c);
        let b = rand_vec(&mut rng, co);
        let res = rand_vec(&mut rng, v.voxels() * co);
        let stat =
            |rng: &mut StdRng, lo: f32, hi: f32| (0..v.c).map(|_| rng.random_range(lo..hi)).collect::<Vec<f32>>();
        let bn = BnReluEval::new(
            &stat(&mut rng, -0.2, 0.2),
            &stat(&mut rng, 0.5, 2.0),
            &stat(&mut rng, 0.5, 1.5),
            &stat(&mut rng, -0.3, 0.3),
        );
        let a = bn.apply(&x);
        let (y_ref, _, _) = naive(&a, v, &w, &b, co, 3, &vec![0.0; v.voxels() * co]);
        let y_ref: Vec<f64> = y_ref.iter().zip(&res).map(|(y, &r)| y + r as f64).collect();
        let scale = y_ref.iter().fold(0.0f64, |m, y| m.max(y.abs()));
        let max_err = |y: &[f32]| y.iter().zip(&y_ref).fold(0.0f64, |m, (&p, q)| m.max((p as f64 - q).abs())) / scale;
        let mut by_set: Vec<Vec<f32>> = Vec::new();
        for kernels in CpuKernels::available().into_iter().filter(|k| *k != CpuKernels::Portable) {
            let chosen = winograd::transform_for(v, 3, kernels).expect("every case is one Winograd takes");
            for f in [&F2, &F4] {
                let y = winograd::forward_fused(f, &x, v, &w, Some(&b), co, kernels, Some(&bn), Some(&res));
                let direct = vox2vec::ops::conv3d::shifted::forward_fused(
                    &x,
                    v,
                    &w,
                    Some(&b),
                    co,
                    kernels,
                    Some(&bn),
                    Some(&res),
                );
                let (e, ed) = (max_err(&y), max_err(&direct));
                println!(
                    "winograd F({}, 3) {v:?} co {co} {kernels:?}: max error {e:.1e} of the largest output (direct {ed:.1e}, rel {:.1e})",
                    f.m,
                    rel(&y, &y_ref)
                );
                assert_eq!(y.len(), y_ref.len());
                assert!(
                    e < if f.m == 2 { 2e-6 } else { 1e-5 } && rel(&y, &y_ref) < 1e-5,
                    "F({}, 3) {v:?} co {co} {kernels:?}: error {e:.1e}",
                    f.m
                );
                if std::ptr::eq(f, chosen) {
                    by_set.push(y);
                }
            }
        }
        if let [p, q] = by_set.as_slice() {
            assert!(
                p.iter().zip(q).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{v:?} co {co}: AVX2 and AVX-512 Winograd outputs differ"
            );
        }
        // The primitive op's gradients by both transforms (it takes F(2, 3)): the input
        // gradient (the flipped kernel) and the weight gradient (the dual algorithm).
        let dy = rand_vec(&mut rng, v.voxels() * co);
        let (_, dx_ref, dw_ref) = naive(&x, v, &w, &b, co, 3, &dy);
        for kernels in CpuKernels::available().into_iter().filter(|k| *k != CpuKernels::Portable) {
            for f in [&F2, &F4] {
                let dx = winograd::input_grad(f, &dy, v.with_c(co), &w, v.c, kernels, None);
                let dw = winograd::weight_grad(f, &x, v, &dy, co, kernels);
                let (ex, ew) = (rel(&dx, &dx_ref), rel(&dw, &dw_ref));
                println!("winograd F({}, 3) {v:?} co {co} {kernels:?}: rel err dx {ex:.1e} dw {ew:.1e}", f.m);
                assert!(
                    ex < 1e-5 && ew < 1e-5,
                    "F({}, 3) {v:?} co {co} {kernels:?}: gradient errors dx {ex:.1e} dw {ew:.1e}",
                    f.m
                );
            }
        }
        // Transformed weights are cached between calls: new values in the same buffer (one
        // changed value, far from the sampled ones) must be transformed anew.
        let mut w = w;
        let i = w.len() / 16 + 1;
        w[i] += 0.5;
        let (y_ref2, _, _) = naive(&a, v, &w, &b, co, 3, &vec![0.0; v.voxels() * co]);
        let y_ref2: Vec<f64> = y_ref2.iter().zip(&res).map(|(y, &r)| y + r as f64).collect();
        let kernels = CpuKernels::best();
        let f = winograd::transform_for(v, 3, kernels).unwrap();
        let y2 = winograd::forward_fused(f, &x, v, &w, Some(&b), co, kernels, Some(&bn), Some(&res));
        assert!(
            rel(&y2, &y_ref2) < 1e-5,
            "{v:?} co {co}: weights changed in place gave {:.1e}: a stale transform",
            rel(&y2, &y_ref2)
        );
    }
}
