//! Voxel gathers for the embeddings and concatenation along the channel axis.
//!
//! gather_voxels: out[p, :] = f[b_p, x_p >> s, y_p >> s, z_p >> s, :] for pyramid level s
//! (floor(v / 2^s) of non-negative coordinates). Backward scatter-adds dy into zeros of f's
//! shape (sequentially: pairs may share a voxel; on the device, pairs grouped by voxel and
//! summed in pair order, without atomics).
//! concat_channels: [P, C0] ‖ [P, C1] ‖ … → [P, ΣC]; backward splits dy.
//! Outputs are written (=).

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::tensor::{Tensor, Vol};

/// Flat voxel index of each pair at level `shift`, checked against the volume.
fn voxel_offsets(v: Vol, batch: &[i64], voxels: &[i64], shift: u32) -> Result<Vec<usize>> {
    ensure!(
        voxels.len() == 3 * batch.len(),
        "gather_voxels: {} batch indices but {} coordinates",
        batch.len(),
        voxels.len()
    );
    let mut out = Vec::with_capacity(batch.len());
    for (p, &b) in batch.iter().enumerate() {
        let c = &voxels[3 * p..3 * p + 3];
        ensure!(b >= 0 && (b as usize) < v.n, "gather_voxels: pair {p} has patch index {b}, batch is {}", v.n);
        ensure!(c.iter().all(|&q| q >= 0), "gather_voxels: pair {p} has a negative coordinate {c:?}");
        let (x, y, z) = ((c[0] >> shift) as usize, (c[1] >> shift) as usize, (c[2] >> shift) as usize);
        ensure!(
            x < v.x && y < v.y && z < v.z,
            "gather_voxels: pair {p} at {c:?} lies outside level {shift} of extent ({}, {}, {})",
            v.x,
            v.y,
            v.z
        );
        out.push(((b as usize * v.x + x) * v.y + y) * v.z + z);
    }
    Ok(out)
}

pub fn gather_voxels(g: &Graph, f: &Var, batch: &[i64], voxels: &[i64], shift: u32) -> Result<Var> {
    let v = Vol::of(&f.value);
    let offs = voxel_offsets(v, batch, voxels, shift)?;
    let c = v.c;
    if f.value.is_cuda() {
        use crate::cuda::ops::gather as gpu;
        let dev = crate::cuda::dev_of(&f.value).clone();
        let offs_host = offs;
        let offs: Vec<i64> = offs_host.iter().map(|&o| o as i64).collect();
        let offs = dev.upload(&offs)?;
        let p = batch.len();
        let out = gpu::gather_rows(&f.value, &offs, p, c)?;
        let dt = f.value.dtype();
        let seg =
            g.needs_grad(&[f]).then(|| gpu::segments(&dev, &offs_host, batch.len().min(v.voxels()))).transpose()?;
        return Ok(g.record("gather_voxels", out, &[f], move |dy| {
            let seg = seg.expect("segments kept for backward");
            Ok(vec![Some(gpu::scatter_segments(&crate::cuda::cast(&dy, crate::tensor::DType::F32)?, &seg, v, dt)?)])
        }));
    }
    let src = f.value.f32s();
    let mut out = vec![0.0f32; offs.len() * c];
    for (p, &o) in offs.iter().enumerate() {
        out[p * c..(p + 1) * c].copy_from_slice(&src[o * c..(o + 1) * c]);
    }
    let p = offs.len();
    Ok(g.record("gather_voxels", Tensor::from_f32(&[p, c], out), &[f], move |dy| {
        let mut df = vec![0.0f32; v.voxels() * c];
        let d = dy.f32s();
        for (p, &o) in offs.iter().enumerate() {
            for (a, &b) in df[o * c..(o + 1) * c].iter_mut().zip(&d[p * c..(p + 1) * c]) {
                *a += b;
            }
        }
        Ok(vec![Some(Tensor::from_f32(&v.shape(), df))])
    }))
}

pub fn concat_channels(g: &Graph, parts: &[Var]) -> Result<Var> {
    ensure!(!parts.is_empty(), "concat_channels: nothing to concatenate");
    let p = parts[0].shape()[0];
    ensure!(
        parts.iter().all(|v| v.shape().len() == 2 && v.shape()[0] == p),
        "concat_channels: parts must be [P, C] with one P"
    );
    let widths: Vec<usize> = parts.iter().map(|v| v.shape()[1]).collect();
    let total: usize = widths.iter().sum();
    if parts[0].value.is_cuda() {
        use crate::cuda::ops::gather as gpu;
        let out = gpu::concat(&parts.iter().map(|v| &v.value).collect::<Vec<_>>())?;
        let refs: Vec<&Var> = parts.iter().collect();
        return Ok(g.record("concat_channels", out, &refs, move |dy| {
            Ok(gpu::split(&dy, &widths)?.into_iter().map(Some).collect())
        }));
    }
    let mut out = vec![0.0f32; p * total];
    let mut off = 0;
    for (part, &w) in parts.iter().zip(&widths) {
        let s = part.value.f32s();
        for r in 0..p {
            out[r * total + off..r * total + off + w].copy_from_slice(&s[r * w..(r + 1) * w]);
        }
        off += w;
    }
    let refs: Vec<&Var> = parts.iter().collect();
    Ok(g.record("concat_channels", Tensor::from_f32(&[p, total], out), &refs, move |dy| {
        let d = dy.f32s();
        let mut off = 0;
        let mut grads = Vec::with_capacity(widths.len());
        for &w in &widths {
            let mut gpart = vec![0.0f32; p * w];
            for r in 0..p {
                gpart[r * w..(r + 1) * w].copy_from_slice(&d[r * total + off..r * total + off + w]);
            }
            grads.push(Some(Tensor::from_f32(&[p, w], gpart)));
            off += w;
        }
        Ok(grads)
    }))
}
