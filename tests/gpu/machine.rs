//! The machine under the kernels: mma fragment layouts, dynamic shared memory limits, and the
//! kernel lab's versions against the CPU.

use super::*;

/// kernels/mma.cuh's fragment mappings against CuTe's layouts for
/// SM80_16x8x16_F32BF16BF16F32_TN (cute/atom/mma_traits_sm80.hpp: ALayout
/// ((4,8),(2,2,2)):((32,1),(16,8,128)) over (M16, K16), BLayout ((4,8),(2,2)):((16,1),(8,64))
/// over (N8, K16), CLayout SM80_16x8_Row ((4,8),(2,2)):((32,1),(16,8)) over (M16, N8), all
/// column-major), then the probe's mma and ldmatrix results: on a GPU they check the mappings
/// against the hardware (on the emulator only against its model, built on the same mappings).
pub fn test_mma_layout() -> Result<()> {
    let dev = vox2vec::cuda::device(0)?;
    let lanes = vox2vec::cuda::ops::probe::mma_layout(&dev)?;
    ensure!(lanes.len() == 32, "probe returned {} lanes", lanes.len());
    for (l, r) in lanes.iter().enumerate() {
        let thr = |stride: [usize; 2]| cute_offset(&[4, 8], &stride, l);
        for e in 0..8 {
            let idx = thr([32, 1]) + cute_offset(&[2, 2, 2], &[16, 8, 128], e);
            ensure!(
                r.a[e] == (idx % 16, idx / 16),
                "lane {l}: A element {e} at (row, col) {:?}, CuTe says {:?}",
                r.a[e],
                (idx % 16, idx / 16)
            );
        }
        for e in 0..4 {
            let idx = thr([16, 1]) + cute_offset(&[2, 2], &[8, 64], e);
            ensure!(
                r.b[e] == (idx / 8, idx % 8),
                "lane {l}: B element {e} at (k, n) {:?}, CuTe says {:?}",
                r.b[e],
                (idx / 8, idx % 8)
            );
            let idx = thr([32, 1]) + cute_offset(&[2, 2], &[16, 8], e);
            ensure!(
                r.c[e] == (idx % 16, idx / 16),
                "lane {l}: C element {e} at (row, col) {:?}, CuTe says {:?}",
                r.c[e],
                (idx % 16, idx / 16)
            );
        }
        // A[m][k] = 16 m + k, B picks columns n and n + 8 (weight 2).
        for e in 0..4 {
            let (m, n) = r.c[e];
            let want = (16 * m + n) as f32 + 2.0 * (16 * m + n + 8) as f32;
            ensure!(r.d[e] == want, "lane {l}: mma D[{m}][{n}] = {}, expected {want}", r.d[e]);
        }
        // PTX ISA, ldmatrix: register q of lane l holds row l / 4, columns 2 (l % 4) and
        // 2 (l % 4) + 1 of matrix q, here A's quadrant (rows 8 (q & 1), cols 8 (q >> 1)); which
        // is A's fragment, element 2 q + h, as the conv kernel relies on.
        for q in 0..4 {
            for h in 0..2 {
                let (row, col) = (8 * (q & 1) + l / 4, 8 * (q >> 1) + 2 * (l % 4) + h);
                let got = r.ldmatrix[2 * q + h];
                ensure!(
                    got == (16 * row + col) as f32,
                    "lane {l}: ldmatrix register {q} half {h} = {got}, expected A[{row}][{col}]"
                );
                let (fr, fc) = r.a[2 * q + h];
                ensure!(
                    got == (16 * fr + fc) as f32,
                    "lane {l}: ldmatrix register {q} half {h} is not A's fragment element {}",
                    2 * q + h
                );
                // .trans: register q of lane l holds the transposed quadrant's row l / 4, i.e.
                // the quadrant's rows 2 (l % 4) and 2 (l % 4) + 1 at column l / 4.
                let (trow, tcol) = (8 * (q & 1) + 2 * (l % 4) + h, 8 * (q >> 1) + l / 4);
                let got = r.ldmatrix_trans[2 * q + h];
                ensure!(
                    got == (16 * trow + tcol) as f32,
                    "lane {l}: ldmatrix.trans register {q} half {h} = {got}, expected A[{trow}][{tcol}]"
                );
            }
        }
    }
    Ok(())
}

/// A CuTe layout mode: sizes and strides of its sub-modes; index i is split colexicographically
/// (first sub-mode fastest) and mapped to Σ coordinate × stride.
fn cute_offset(shape: &[usize], stride: &[usize], mut i: usize) -> usize {
    let mut off = 0;
    for (&s, &d) in shape.iter().zip(stride) {
        off += (i % s) * d;
        i /= s;
    }
    off
}

/// Dynamic shared memory's launch limits, which hold on the GPU and which the emulator
/// models: up to 48 KiB without opting in, more after `set_max_dynamic_shared`, never more
/// than the device allows (227 KiB on sm_90, 163 KiB on sm_80). On the emulator also: a block
/// writing past the end of its dynamic shared memory fails the launch (on a GPU that is
/// undefined behaviour, compute-sanitizer's job, so it is not launched there).
pub fn test_dynamic_shared_limits() -> Result<()> {
    use vox2vec::cuda::KernelId;
    use vox2vec::cuda::ops::probe::{PROBE_SHARED_BYTES, mma_layout_with_shared};
    let dev = vox2vec::cuda::device(0)?;
    let reference = mma_layout_with_shared(&dev, PROBE_SHARED_BYTES)?;
    ensure!(mma_layout_with_shared(&dev, 48 * 1024).is_ok(), "a launch with 48 KiB of dynamic shared memory failed");
    let over = mma_layout_with_shared(&dev, 48 * 1024 + 16);
    ensure!(over.is_err(), "a launch with 48 KiB + 16 bytes of dynamic shared memory succeeded without opting in");
    dev.set_max_dynamic_shared(KernelId::MmaLayoutProbe, 96 * 1024)?;
    let big = mma_layout_with_shared(&dev, 96 * 1024)?;
    ensure!(
        big.iter().zip(&reference).all(|(a, b)| a.d == b.d && a.ldmatrix == b.ldmatrix),
        "the probe's results changed with 96 KiB of dynamic shared memory"
    );
    ensure!(
        mma_layout_with_shared(&dev, 96 * 1024 + 16).is_err(),
        "a launch above the kernel's opted-in 96 KiB succeeded"
    );
    ensure!(
        dev.set_max_dynamic_shared(KernelId::MmaLayoutProbe, 228 * 1024).is_err(),
        "opting in to 228 KiB of dynamic shared memory succeeded (no NVIDIA GPU has that much per block)"
    );
    dev.set_max_dynamic_shared(KernelId::MmaLayoutProbe, 48 * 1024)?;
    if dev.is_emulator() {
        let e = mma_layout_with_shared(&dev, PROBE_SHARED_BYTES - 64)
            .err()
            .ok_or_else(|| anyhow!("a block writing 64 bytes past its dynamic shared memory went unnoticed"))?;
        ensure!(format!("{e:#}").contains("past the end"), "unexpected error for an overrun: {e:#}");
    } else {
        println!("  (the overrun case runs on the emulator only)");
    }
    Ok(())
}

/// The kernel lab's validation shapes (src/cuda/lab.rs): every version of every hot family
/// against the CPU oracle within its bound — the versions not on the engine's path (the
/// CUDA-core convolutions on bf16 storage, the composed ResBlock) stay correct too.
pub fn test_kernel_lab() -> Result<()> {
    use vox2vec::cuda::lab;
    let dev = vox2vec::cuda::device(0)?;
    let mut bad = Vec::new();
    let mut checked = 0;
    for case in lab::validation_cases(&dev, &lab::FAMILIES)? {
        for r in lab::run_case(&dev, &case, 0)? {
            let (e, against) = r.error.ok_or_else(|| anyhow!("{} {} {}: not checked", r.family, r.shape, r.version))?;
            ensure!(against == "CPU", "{} {}: checked against {against}, not the CPU", r.family, r.shape);
            checked += 1;
            if !r.ok {
                bad.push(format!("{} {} {}: error {e:.3e} above {:.1e}", r.family, r.shape, r.version, case.tol));
            }
        }
    }
    ensure!(checked >= 2 * lab::FAMILIES.len(), "only {checked} lab versions checked");
    ensure!(bad.is_empty(), "kernel lab versions outside their bounds:\n{}", bad.join("\n"));
    Ok(())
}
