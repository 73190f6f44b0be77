//! The plan's view of the kernels' machine code (the sm_90 SASS summarised at build time,
//! src/cuda/sass.rs) against hand counts of `cuobjdump -sass` for the pinned nvcc 13.0, and
//! the tensor-core kernels' issue budget: instructions per HMMA in the innermost HMMA loop
//! and local memory.
//!
//! Needs the SASS table, which a build with nvcc and cuobjdump writes (scripts/install-cuda.sh
//! installs both; CI runs it): without kernels the tests say so and check nothing else.

use vox2vec::cuda::cost::{Cost, H100, issue_instructions};
use vox2vec::cuda::sass::Kernel;

fn table() -> Option<&'static [Kernel]> {
    if !vox2vec::kernels::available() {
        eprintln!("no kernels in this build (no nvcc): nothing to check");
        return None;
    }
    let t = vox2vec::kernels::sass();
    assert!(
        !t.is_empty(),
        "the kernels were compiled but no SASS table was written (cuobjdump missing at build time?)"
    );
    Some(t)
}

fn kernel(name: &str) -> &'static Kernel {
    vox2vec::kernels::sass_of(name).unwrap_or_else(|| panic!("{name} is not in the SASS table"))
}

/// `fill_f32` (a grid-stride loop of i64 indices), read by hand from `cuobjdump -sass -arch
/// sm_90`: 179 instructions up to the trap after its 64-bit division subroutine (NOPs after it
/// are padding); a remainder loop 0x450-0x500 (12 instructions, one 4-byte STG: 128 bytes per
/// warp) and the 4-way unrolled loop 0x580-0x6a0 (19 instructions, four STG: 512 bytes);
/// 148 instructions outside both.
#[test]
fn fill_f32_matches_its_hand_count() {
    if table().is_none() {
        return;
    }
    let k = kernel("fill_f32");
    assert_eq!((k.instructions, k.hmma, k.ffma, k.local, k.straight), (179, 0, 0, 0, 148), "{k:?}");
    let loops: Vec<(u32, u32, u32, u32)> =
        k.loops.iter().map(|l| (l.start, l.end, l.instructions, l.global_bytes)).collect();
    assert_eq!(loops, vec![(0x450, 0x500, 12, 128), (0x580, 0x6a0, 19, 512)]);
    // 8 warps filling 6400 bytes: straight-line code once per warp (8 x 148), the two memory
    // loops together as often as the bytes need (6400 / 640 = 10 passes, at least one per
    // warp) at 12 + 19 instructions a pass.
    let c = Cost::mem(6400);
    assert_eq!(issue_instructions(k, &c, 8), (8 * 148 + 10 * 31) as f64);
    // More warps than passes: each warp passes once.
    assert_eq!(issue_instructions(k, &c, 20), (20 * 148 + 20 * 31) as f64);
    // The estimate of that launch on an H100: the issue time is the instructions over one
    // scheduler per warp at the SM clock.
    let e = vox2vec::cuda::cost::estimate(&c, &H100, Some(k), Some(8));
    assert!((e.issue_s - (8 * 148 + 10 * 31) as f64 / (8.0 * H100.clock_hz)).abs() < 1e-15);
    assert_eq!(e.launch_s, H100.launch_s);
}

/// The tensor-core kernels' innermost HMMA loops, per kernel: instructions per HMMA at most
/// 8 and no local memory, except the kernels listed with their current figures (a kernel that
/// gets better must leave the list; one that gets worse fails).
#[test]
fn tensor_core_kernels_issue_budget() {
    if table().is_none() {
        return;
    }
    // (kernel, instructions per HMMA now, local-memory instructions now) of those not yet
    // within budget.
    const NOT_YET: [(&str, f64, u32); 0] = [];
    let tc: Vec<&Kernel> =
        vox2vec::kernels::sass().iter().filter(|k| k.hmma > 0 && k.name != "mma_layout_probe").collect();
    assert!(tc.len() >= 6, "only {} tensor-core kernels in the table", tc.len());
    let mut report = Vec::new();
    for k in tc {
        let ipm = k.instructions_per_hmma().unwrap_or(f64::INFINITY);
        report.push(format!("{}: {ipm:.2} instructions per HMMA, {} local", k.name, k.local));
        match NOT_YET.iter().find(|n| n.0 == k.name) {
            Some(&(_, was, local)) => {
                assert!(
                    ipm <= was + 0.01 && k.local <= local,
                    "{} got worse: {ipm:.3} per HMMA (was {was}), {} local (was {local})",
                    k.name,
                    k.local
                );
                assert!(
                    ipm > 8.0 || k.local > 0,
                    "{} is within budget now ({ipm:.2} per HMMA, no local memory): take it off the list",
                    k.name
                );
            }
            None => assert!(
                ipm <= 8.0 && k.local == 0,
                "{}: {ipm:.2} instructions per HMMA, {} local-memory instructions",
                k.name,
                k.local
            ),
        }
    }
    println!("{}", report.join("\n"));
}
