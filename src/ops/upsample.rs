//! Nearest-neighbour upsampling ×2 followed by a crop to a target extent (the FPN decoder's
//! `Upsample(scale_factor=2)` then crop to the skip feature's shape), on [N, X, Y, Z, C]:
//!   y[n, x, y, z, :] = in[n, x / 2, y / 2, z / 2, :] for x < X_target (etc.).
//! Backward is a gather-sum: din[n, i, j, l] = Σ of dy over the (up to 8) output voxels that
//! copied it. Outputs are written (=).

use anyhow::{Result, ensure};
use rayon::prelude::*;

use crate::autograd::{Graph, Var};
use crate::tensor::{Tensor, Vol};

pub fn upsample2_crop_forward_cpu(x: &[f32], v: Vol, tx: usize, ty: usize, tz: usize) -> Vec<f32> {
    let c = v.c;
    let row = tz * c;
    crate::cpu::par_build(v.n * tx * ty * tz * c, row, |r, yr| {
        let yi = r % ty;
        let xi = (r / ty) % tx;
        let nb = r / (ty * tx);
        for zi in 0..tz {
            let src = (((nb * v.x + xi / 2) * v.y + yi / 2) * v.z + zi / 2) * c;
            yr[zi * c..(zi + 1) * c].copy_from_slice(&x[src..src + c]);
        }
    })
}

pub fn upsample2_crop_backward_cpu(dy: &[f32], v: Vol, tx: usize, ty: usize, tz: usize) -> Vec<f32> {
    let c = v.c;
    let mut dx = vec![0.0f32; v.voxels() * c];
    let row = v.z * c;
    dx.par_chunks_mut(row.max(1)).enumerate().for_each(|(r, dr)| {
        let yi = r % v.y;
        let xi = (r / v.y) % v.x;
        let nb = r / (v.y * v.x);
        for zi in 0..v.z {
            let d = &mut dr[zi * c..(zi + 1) * c];
            for a in 0..2 {
                let ox = 2 * xi + a;
                if ox >= tx {
                    continue;
                }
                for b in 0..2 {
                    let oy = 2 * yi + b;
                    if oy >= ty {
                        continue;
                    }
                    for cc in 0..2 {
                        let oz = 2 * zi + cc;
                        if oz >= tz {
                            continue;
                        }
                        let src = (((nb * tx + ox) * ty + oy) * tz + oz) * c;
                        for (dv, &g) in d.iter_mut().zip(&dy[src..src + c]) {
                            *dv += g;
                        }
                    }
                }
            }
        }
    });
    dx
}

/// Upsample ×2 (nearest) and crop to `target` = (X, Y, Z); each target extent must be at
/// most twice the input's.
pub fn upsample2_crop(g: &Graph, x: &Var, target: [usize; 3]) -> Result<Var> {
    let v = Vol::of(&x.value);
    let [tx, ty, tz] = target;
    ensure!(
        tx <= 2 * v.x && ty <= 2 * v.y && tz <= 2 * v.z,
        "upsample2_crop: target {target:?} exceeds twice {:?}",
        x.shape()
    );
    if x.value.is_cuda() {
        let y = crate::cuda::ops::upsample::forward(&x.value, v, target)?;
        let dt = x.value.dtype();
        return Ok(g.record("upsample2_crop", y, &[x], move |dy| {
            Ok(vec![Some(crate::cuda::ops::upsample::backward(&dy, v, target, dt)?)])
        }));
    }
    let y = upsample2_crop_forward_cpu(x.value.f32s(), v, tx, ty, tz);
    Ok(g.record("upsample2_crop", Tensor::from_f32(&[v.n, tx, ty, tz, v.c], y), &[x], move |dy| {
        Ok(vec![Some(Tensor::from_f32(&v.shape(), upsample2_crop_backward_cpu(dy.f32s(), v, tx, ty, tz)))])
    }))
}
