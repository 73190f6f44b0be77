//! The FPN decoder's lateral merge (docs/method.md §3, `model::fpn`):
//!
//!   y = skip_conv(f) + upsample2_crop(up, extent of f)
//!
//! f [N, X, Y, Z, C] is the encoder's feature at this level, `skip_conv` its 1×1×1
//! convolution (weight [C', 1, 1, 1, C], bias [C']), up [N, X', Y', Z', C'] the up block's
//! output one level coarser (X ≤ 2 X', …). The composition of primitive ops writes the
//! upsampled tensor and then adds it: two full passes over the fine level and a third for the
//! sum. On tensor cores (bf16, C a multiple of 16) this op is one convolution whose epilogue
//! adds up at (x/2, y/2, z/2) before rounding (`conv3d::Fusion::upsampled_residual`), so
//! neither the upsampled tensor nor the add exist. The backward is the
//! composition's: the conv's input and weight gradients of dy, and upsample2_crop's gather-sum
//! of dy for up (the add's backward is the identity on both sides).
//!
//! Elsewhere (CPU, fp32, other channel counts, VOX2VEC_NO_FUSION=1) it is the composition,
//! which is also the fused op's oracle (tests/gpu/, `ops_fpn_merge_vs_cpu`). CPU inference
//! (nothing recorded) adds the upsampled input onto the convolution's output in place
//! (`merge_inference_cpu`): the composition's values bit for bit, without the upsampled
//! tensor and the add's extra passes.

use anyhow::{Result, ensure};

use crate::autograd::{Graph, Var};
use crate::cuda;
use crate::ops;
use crate::tensor::{Tensor, Vol};

/// Whether the fused merge applies to a feature f stored as `dtype` with `c` channels.
pub fn fused_for(dtype: crate::tensor::DType, c: usize) -> bool {
    ops::resblock::fusion_for(dtype, c, c)
}

/// y = conv1x1(f, w, b) + upsample2_crop(up, f's extent).
pub fn fpn_merge(g: &Graph, f: &Var, w: &Var, b: &Var, up: &Var) -> Result<Var> {
    let v = Vol::of(&f.value);
    let ws = w.shape();
    ensure!(
        ws.len() == 5 && ws[1] == 1 && ws[2] == 1 && ws[3] == 1 && ws[4] == v.c,
        "fpn_merge: skip weight {ws:?} is not a 1x1x1 convolution of {} channels",
        v.c
    );
    let co = ws[0];
    let us = up.shape().to_vec();
    ensure!(
        us.len() == 5 && us[0] == v.n && us[4] == co,
        "fpn_merge: up block output {us:?} does not match the skip feature {:?} -> {co} channels",
        f.shape()
    );
    // fused_for implies the tensor-core path (bf16, C a multiple of 16).
    let fused = f.value.is_cuda() && up.value.dtype() == f.value.dtype() && fused_for(f.value.dtype(), v.c);
    if !fused && !g.is_recording() && !f.value.is_cuda() && !up.value.is_cuda() {
        ensure!(
            v.x <= 2 * us[1] && v.y <= 2 * us[2] && v.z <= 2 * us[3],
            "fpn_merge: {:?} does not upsample to {:?}",
            up.shape(),
            f.shape()
        );
        let vu = Vol { n: us[0], x: us[1], y: us[2], z: us[3], c: co };
        return Ok(Var::constant(Tensor::from_f32(
            &v.with_c(co).shape(),
            merge_inference_cpu(f.value.f32s(), v, w.value.f32s(), b.value.f32s(), up.value.f32s(), vu),
        )));
    }
    if !fused {
        let up = ops::upsample2_crop(g, up, [v.x, v.y, v.z])?;
        let sk = ops::conv3d(g, f, w, Some(b))?;
        return ops::add(g, &up, &sk);
    }
    ensure!(
        v.x <= 2 * us[1] && v.y <= 2 * us[2] && v.z <= 2 * us[3],
        "fpn_merge: {:?} does not upsample to {:?}",
        up.shape(),
        f.shape()
    );
    use cuda::ops::conv3d::{self as conv, Fusion};
    let fu = Fusion { upsampled_residual: Some(&up.value), ..Fusion::default() };
    let (y, _) = conv::forward_fused(&f.value, v, &w.value, Some(&b.value), co, 1, fu)?;
    let (xs, wt, dt) = (f.value.clone(), w.value.clone(), f.value.dtype());
    let vu = Vol { n: us[0], x: us[1], y: us[2], z: us[3], c: co };
    let (need_df, need_dw, need_dup) = (f.tracked(), w.tracked() || b.tracked(), up.tracked());
    // The skip conv's gradients fold in what f, w and b already have (conv3d's accumulating
    // backward); up has one consumer.
    Ok(g.record_accumulating("fpn_merge", y, &[f, w, b, up], move |dy, acc| {
        let (df, dw, db) = ops::conv3d::conv3d_backward_cuda(&xs, v, &wt, co, 1, &dy, &mut acc[..3], need_df, need_dw)?;
        let dup = need_dup.then(|| cuda::ops::upsample::backward(&dy, vu, [v.x, v.y, v.z], dt)).transpose()?;
        Ok(vec![df, dw, db, dup])
    }))
}

/// conv1x1(f) + upsample2_crop(up) on the CPU, with nothing saved: the convolution's output,
/// then each line gets its upsampled source line added in place (up + conv, the composition's
/// add: the same bits).
pub fn merge_inference_cpu(f: &[f32], v: Vol, w: &[f32], b: &[f32], up: &[f32], vu: Vol) -> Vec<f32> {
    use rayon::prelude::*;
    let co = vu.c;
    let mut y = crate::profile::time(
        "conv3d forward",
        || format!("k1 {}x{}x{}x{} {}->{}", v.n, v.x, v.y, v.z, v.c, co),
        || ops::conv3d::conv3d_forward_cpu(f, v, w, Some(b), co, 1),
    );
    crate::profile::time("fpn merge add (upsampled, in place)", String::new, || {
        y.par_chunks_mut(v.z * co).enumerate().for_each(|(r, line)| {
            let (yi, xi, nb) = (r % v.y, (r / v.y) % v.x, r / (v.y * v.x));
            let src = &up[((nb * vu.x + xi / 2) * vu.y + yi / 2) * vu.z * co..][..vu.z * co];
            for (zi, d) in line.chunks_exact_mut(co).enumerate() {
                d.iter_mut().zip(&src[(zi / 2) * co..(zi / 2 + 1) * co]).for_each(|(d, &u)| *d += u);
            }
        })
    });
    y
}
