//! Max pooling 2×2×2, stride 2, ceil mode (PyTorch `MaxPool3d(2, ceil_mode=True)`), on
//! [N, X, Y, Z, C]. Output extent ceil(X / 2) per axis; a window that runs past the border
//! is clipped (ceil mode adds no padding value).
//!
//! Forward scans each window in (x, y, z) order and keeps the first strictly greater value
//! (PyTorch's tie rule); it saves the winning offset (0..8, bits x·4 + y·2 + z) per output.
//! Backward is a gather: each input element lies in exactly one window, and receives that
//! window's dy if it was the winner, else 0. dx is written (=).

use anyhow::Result;
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::tensor::{Tensor, Vol};

pub fn pooled_extent(n: usize) -> usize {
    n.div_ceil(2)
}

/// Returns (y, argmax offsets).
pub fn maxpool2_forward_cpu(x: &[f32], v: Vol) -> (Vec<f32>, Vec<u8>) {
    let o = Vol { x: pooled_extent(v.x), y: pooled_extent(v.y), z: pooled_extent(v.z), ..v };
    let c = v.c;
    let mut y = vec![0.0f32; o.voxels() * c];
    let mut arg = vec![0u8; o.voxels() * c];
    let row = o.z * c;
    y.par_chunks_mut(row).zip(arg.par_chunks_mut(row)).enumerate().for_each(|(r, (yr, ar))| {
        let oy = r % o.y;
        let ox = (r / o.y) % o.x;
        let nb = r / (o.y * o.x);
        for oz in 0..o.z {
            // The window's voxels in (x, y, z) order, then per channel the first strictly
            // greater value (or a NaN) wins: channels innermost, so the loop runs over
            // contiguous rows and vectorises (the same comparisons per channel, same order).
            let (best, besto) = (&mut yr[oz * c..(oz + 1) * c], &mut ar[oz * c..(oz + 1) * c]);
            let mut first = true;
            for a in 0..2 {
                let xi = 2 * ox + a;
                if xi >= v.x {
                    continue;
                }
                for b in 0..2 {
                    let yi = 2 * oy + b;
                    if yi >= v.y {
                        continue;
                    }
                    for cc in 0..2 {
                        let zi = 2 * oz + cc;
                        if zi >= v.z {
                            continue;
                        }
                        let src = &x[(((nb * v.x + xi) * v.y + yi) * v.z + zi) * c..][..c];
                        let off = (a * 4 + b * 2 + cc) as u8;
                        if first {
                            best.copy_from_slice(src);
                            besto.fill(off);
                            first = false;
                        } else {
                            for ((bv, bo), &val) in best.iter_mut().zip(besto.iter_mut()).zip(src) {
                                if val > *bv || val.is_nan() {
                                    *bv = val;
                                    *bo = off;
                                }
                            }
                        }
                    }
                }
            }
        }
    });
    (y, arg)
}

pub fn maxpool2_backward_cpu(dy: &[f32], arg: &[u8], v: Vol) -> Vec<f32> {
    let o = Vol { x: pooled_extent(v.x), y: pooled_extent(v.y), z: pooled_extent(v.z), ..v };
    let c = v.c;
    let mut dx = vec![0.0f32; v.voxels() * c];
    let row = v.z * c;
    dx.par_chunks_mut(row).enumerate().for_each(|(r, dr)| {
        let yi = r % v.y;
        let xi = (r / v.y) % v.x;
        let nb = r / (v.y * v.x);
        for zi in 0..v.z {
            let oi = (((nb * o.x + xi / 2) * o.y + yi / 2) * o.z + zi / 2) * c;
            let off = ((xi % 2) * 4 + (yi % 2) * 2 + zi % 2) as u8;
            for ch in 0..c {
                if arg[oi + ch] == off {
                    dr[zi * c + ch] = dy[oi + ch];
                }
            }
        }
    });
    dx
}

pub fn maxpool2(g: &Graph, x: &Var) -> Result<Var> {
    let v = Vol::of(&x.value);
    if x.value.is_cuda() {
        let (y, arg) = crate::cuda::ops::pooling::forward(&x.value, v)?;
        let dt = x.value.dtype();
        // The pooled tensor's input usually has a second consumer (the FPN's skip branch),
        // whose gradient arrives first: it is added in this backward's kernel.
        return Ok(g.record_accumulating("maxpool2", y, &[x], move |dy, acc| {
            let prev = acc[0].take_if(|a| a.is_cuda() && a.dtype() == dt && a.shape() == v.shape());
            Ok(vec![Some(crate::cuda::ops::pooling::backward(&dy, &arg, v, dt, prev.as_ref())?)])
        }));
    }
    let (y, arg) = maxpool2_forward_cpu(x.value.f32s(), v);
    let shape = [v.n, pooled_extent(v.x), pooled_extent(v.y), pooled_extent(v.z), v.c];
    Ok(g.record("maxpool2", Tensor::from_f32(&shape, y), &[x], move |dy| {
        Ok(vec![Some(Tensor::from_f32(&v.shape(), maxpool2_backward_cpu(dy.f32s(), &arg, v)))])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The forward against the definition, one output element at a time (window in (x, y, z)
    /// order, first strictly greater value or a NaN wins): odd extents (clipped windows),
    /// values drawn from a small set (ties) with NaNs among them; the same bits and offsets.
    #[test]
    fn forward_matches_the_elementwise_definition_with_ties_and_nans() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for v in [
            Vol { n: 2, x: 5, y: 4, z: 3, c: 7 },
            Vol { n: 1, x: 1, y: 3, z: 6, c: 16 },
            Vol { n: 1, x: 4, y: 4, z: 4, c: 1 },
        ] {
            let x: Vec<f32> = (0..v.voxels() * v.c)
                .map(|_| if rng.random_range(0..20) == 0 { f32::NAN } else { rng.random_range(-2..3) as f32 })
                .collect();
            let (y, arg) = maxpool2_forward_cpu(&x, v);
            let o = Vol { x: pooled_extent(v.x), y: pooled_extent(v.y), z: pooled_extent(v.z), ..v };
            for n in 0..v.n {
                for (ox, oy, oz) in (0..o.x).flat_map(|a| (0..o.y).flat_map(move |b| (0..o.z).map(move |c| (a, b, c))))
                {
                    for ch in 0..v.c {
                        let mut best: Option<(f32, u8)> = None;
                        for off in 0..8u8 {
                            let (xi, yi, zi) = (
                                2 * ox + (off as usize >> 2),
                                2 * oy + ((off as usize >> 1) & 1),
                                2 * oz + (off as usize & 1),
                            );
                            if xi >= v.x || yi >= v.y || zi >= v.z {
                                continue;
                            }
                            let val = x[(((n * v.x + xi) * v.y + yi) * v.z + zi) * v.c + ch];
                            if best.is_none_or(|(b, _)| val > b || val.is_nan()) {
                                best = Some((val, off));
                            }
                        }
                        let (b, off) = best.unwrap();
                        let i = (((n * o.x + ox) * o.y + oy) * o.z + oz) * v.c + ch;
                        assert_eq!(
                            (y[i].to_bits(), arg[i]),
                            (b.to_bits(), off),
                            "{v:?} output ({n}, {ox}, {oy}, {oz}, {ch})"
                        );
                    }
                }
            }
        }
    }
}
