//! Sliding-window stitching on the device (`kernels/stitch.cu`): each window's output goes
//! into the whole volume's f32 map where it already lives, so that only finished maps come
//! back to the host. The host oracle is `eval::sliding::Plan::{stitch, blend}`; the per-axis
//! tables come from `Plan::axis_entries`, so both place every value identically.

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, dev_of, ensure_f32, ensure_float, nbytes};
use crate::eval::sliding::Plan;
use crate::tensor::Tensor;

/// One axis of a plan at one level, on the device: every box index's entries
/// (`Plan::axis_entries`) concatenated, with where each box's run starts and its length.
pub struct AxisTable {
    out: CudaBuf,
    window: CudaBuf,
    weight: CudaBuf,
    offset: Vec<usize>,
    count: Vec<usize>,
    /// The window's output extent along this axis.
    window_len: usize,
    /// The map's extent along this axis.
    out_len: usize,
}

impl AxisTable {
    /// The three axes' tables of `plan` at `level` for windows whose output is `window_shape`
    /// and a map of `out_shape`, uploaded to the device of `like`. `owned_only`: the
    /// central-region rule (else every covered voxel, with Gaussian weights).
    pub fn for_plan(
        like: &Tensor,
        plan: &Plan,
        level: u32,
        window_shape: [usize; 3],
        out_shape: [usize; 3],
        owned_only: bool,
    ) -> Result<[AxisTable; 3]> {
        let dev = dev_of(like);
        let one = |a: usize| -> Result<AxisTable> {
            let (mut out, mut window, mut weight, mut offset, mut count) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (which, &start) in plan.axes[a].starts.iter().enumerate() {
                let e = plan.axis_entries(a, which, start, level, window_shape[a], out_shape[a], owned_only);
                offset.push(out.len());
                count.push(e.out.len());
                out.extend(e.out);
                window.extend(e.window);
                weight.extend(e.weight);
            }
            Ok(AxisTable {
                out: dev.upload(&out)?,
                window: dev.upload(&window)?,
                weight: dev.upload(&weight)?,
                offset,
                count,
                window_len: window_shape[a],
                out_len: out_shape[a],
            })
        };
        Ok([one(0)?, one(1)?, one(2)?])
    }

    /// (output coordinates, window coordinates, weights) pointers of box `which` and its count.
    fn run(&self, which: usize) -> (u64, u64, u64, usize) {
        let o = self.offset[which] as u64;
        (self.out.ptr() + 4 * o, self.window.ptr() + 4 * o, self.weight.ptr() + 4 * o, self.count[which])
    }
}

/// Window `b` of a window batch `out` ([K, wx, wy, wz, C], f32 or bf16) and checks against
/// the map [X, Y, Z, C] f32: (pointer to the window's values, C).
fn window_of(out: &Tensor, b: usize, t: &[AxisTable; 3], map: &Tensor) -> Result<(u64, usize)> {
    ensure_float(out, "stitched window")?;
    ensure_f32(map, "stitched map")?;
    let s = out.shape();
    let m = map.shape();
    ensure!(
        s.len() == 5 && b < s[0] && m.len() == 4 && s[4] == m[3],
        "stitch: window batch {s:?} (item {b}) into a map {m:?}"
    );
    ensure!(
        (0..3).all(|a| s[a + 1] == t[a].window_len && m[a] == t[a].out_len),
        "stitch: window {s:?} and map {m:?} do not match the plan's tables"
    );
    let per_window = s[1] * s[2] * s[3] * s[4];
    Ok((out.ptr() + (b * per_window * out.dtype().size_in_bytes()) as u64, s[4]))
}

/// The kernels' arguments after their map pointers: per axis the entries' output and window
/// coordinates (and Gaussian weights when `weights`) and count, then the extents; and the
/// number of threads (entries x channels).
fn entry_args(t: &[AxisTable; 3], which: [usize; 3], c: usize, weights: bool) -> (Vec<Arg>, usize) {
    let mut args = Vec::new();
    let mut n = c;
    for (table, &w) in t.iter().zip(&which) {
        let (out, window, weight, count) = table.run(w);
        args.extend([Arg::Ptr(out), Arg::Ptr(window)]);
        if weights {
            args.push(Arg::Ptr(weight));
        }
        args.push(Arg::I32(count as i32));
        n *= count;
    }
    args.extend([t[1].window_len, t[2].window_len, t[1].out_len, t[2].out_len, c].map(|v| Arg::I32(v as i32)));
    (args, n)
}

/// map[voxels box `which` owns] = window b of `out` (the central-region rule).
pub fn stitch_window(out: &Tensor, b: usize, t: &[AxisTable; 3], which: [usize; 3], map: &Tensor) -> Result<()> {
    let (src, c) = window_of(out, b, t, map)?;
    let (tail, n) = entry_args(t, which, c, false);
    if n == 0 {
        return Ok(());
    }
    let k = KernelId::typed(out.dtype(), KernelId::StitchWindowF32, KernelId::StitchWindowBf16);
    let mut args = vec![Arg::Ptr(src), Arg::Ptr(map.ptr())];
    args.extend(tail);
    dev_of(map).launch_1d(k, n, &args, Cost::mem(n * (out.dtype().size_in_bytes() + 4)))
}

/// acc += w · window b of `out` over every voxel box `which` covers, weight += w (Gaussian).
pub fn blend_window(
    out: &Tensor,
    b: usize,
    t: &[AxisTable; 3],
    which: [usize; 3],
    acc: &Tensor,
    weight: &Tensor,
) -> Result<()> {
    let (src, c) = window_of(out, b, t, acc)?;
    ensure_f32(weight, "blend weights")?;
    ensure!(weight.numel() * c == acc.numel(), "blend: weights {:?} for a map {:?}", weight.shape(), acc.shape());
    let (tail, n) = entry_args(t, which, c, true);
    if n == 0 {
        return Ok(());
    }
    let k = KernelId::typed(out.dtype(), KernelId::BlendWindowF32, KernelId::BlendWindowBf16);
    let mut args = vec![Arg::Ptr(src), Arg::Ptr(acc.ptr()), Arg::Ptr(weight.ptr())];
    args.extend(tail);
    // The window read once; the map's covered voxels read and written, their weights too.
    dev_of(acc).launch_1d(k, n, &args, Cost::mem(n * (out.dtype().size_in_bytes() + 8) + n / c * 8))
}

/// acc[v, c] /= weight[v]: the blended map from the Gaussian sums.
pub fn blend_normalize(acc: &Tensor, weight: &Tensor) -> Result<()> {
    ensure_f32(acc, "blend")?;
    ensure_f32(weight, "blend weights")?;
    let voxels = weight.numel();
    ensure!(
        voxels > 0 && acc.numel().is_multiple_of(voxels),
        "blend: weights {:?} for a map {:?}",
        weight.shape(),
        acc.shape()
    );
    let c = acc.numel() / voxels;
    dev_of(acc).launch_1d(
        KernelId::BlendNormalize,
        acc.numel(),
        &[Arg::Ptr(acc.ptr()), Arg::Ptr(weight.ptr()), Arg::I64(voxels as i64), Arg::I32(c as i32)],
        Cost::mem(2 * nbytes(acc) + nbytes(weight)),
    )
}
