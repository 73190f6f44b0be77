//! 3-D convolution launchers: forward, backward input, backward weight (split-K partials
//! reduced in a fixed order) and the bias gradient (column sum of dy). fp32 activations, and
//! channel counts that are not multiples of 16, take the exact CUDA-core kernels
//! (`kernels/conv3d.cu`, the on-GPU oracle); bf16 activations over multiples of 16 channels
//! take the tensor-core kernels (`kernels/conv3d_tc.cu`) for the forward, the input gradient
//! and the weight gradient. The tensor-core kernels also take the ResBlock's fusions
//! ([`Fusion`]): BN -> ReLU applied while loading the input, the residual added and the
//! ReLU backward applied in the epilogue, BatchNorm's statistics or backward sums as per-brick
//! partials (`ops::resblock` composes them).

use anyhow::{Result, ensure};

use crate::cuda::{Arg, Cost, CudaBuf, KernelId, ParamBlock, cast, dev_of, empty, ensure_f32, ensure_float, nbytes};
use crate::tensor::{DType, Tensor, Vol};

const TILE: usize = 64;

fn dims(v: Vol) -> [Arg; 4] {
    [Arg::I32(v.n as i32), Arg::I32(v.x as i32), Arg::I32(v.y as i32), Arg::I32(v.z as i32)]
}

/// Tiles along one grid axis (at least one: the kernels check bounds, and an empty grid is a
/// launch error).
fn tiles(n: usize) -> u32 {
    n.div_ceil(TILE).max(1) as u32
}

/// Whether the tensor-core kernel (`kernels/conv3d_tc.cu`) computes a convolution over `ci`
/// input channels stored as `dtype`: bf16 activations, ci a multiple of 16, unless
/// VOX2VEC_NO_TENSOR_CORES=1 (then every convolution takes the exact CUDA-core kernels).
pub fn tensor_cores_for(dtype: DType, ci: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off =
        *OFF.get_or_init(|| std::env::var_os("VOX2VEC_NO_TENSOR_CORES").is_some_and(|v| v != "0" && !v.is_empty()));
    dtype == DType::BF16 && ci.is_multiple_of(16) && ci > 0 && !off
}

/// The f32 weight [Co, k, k, k, Ci] as the tensor-core forward's bf16 B operand, packed for
/// output tiles of `tile` channels (`conv3d_weight_to_bf16`); flipped and transposed for the
/// input gradient (whose output has Ci channels) when `flip`.
fn weight_bf16(w: &Tensor, co: usize, k: usize, ci: usize, flip: bool, tile: usize) -> Result<CudaBuf> {
    let dev = dev_of(w);
    let (nn, kc) = if flip { (ci, co) } else { (co, ci) };
    let n = nn.div_ceil(tile) * tile * k * k * k * kc;
    ensure!(n < i32::MAX as usize, "conv3d weight of {n} packed values: the bf16 conversion indexes in 32 bits");
    let out = dev.alloc(n * 2)?;
    dev.launch_1d(
        KernelId::Conv3dWeightToBf16,
        n / 16,
        &[
            Arg::Ptr(w.ptr()),
            Arg::Ptr(out.ptr()),
            Arg::I32(co as i32),
            Arg::I32((k * k * k) as i32),
            Arg::I32(ci as i32),
            Arg::I32(flip as i32),
            Arg::I32(tile as i32),
        ],
        Cost::mem(co * k * k * k * ci * 4 + n * 2),
    )?;
    Ok(out)
}

/// What a tensor-core convolution fuses around its GEMM (`kernels/conv3d_tc.cu`); the default
/// fuses nothing. Tables are BatchNorm's f32 [3, C] constants (`batchnorm::affine_table`).
#[derive(Clone, Copy, Default)]
pub struct Fusion<'a> {
    /// The convolution reads relu(bn(x)) with this [3, Ci] table (padding stays zero).
    pub input_bn_relu: Option<&'a CudaBuf>,
    /// Added to the output before it is rounded: the ResBlock's skip connection.
    pub residual: Option<&'a Tensor>,
    /// Added like `residual`, but from the half-resolution grid [N, ⌈X/2⌉.., Co] at (x/2,
    /// y/2, z/2): + upsample2_crop(r), the FPN decoder's merge. Not with `residual`.
    pub upsampled_residual: Option<&'a Tensor>,
    /// The output is zeroed where bn(h) <= 0 (h [.., Co] with its [3, Co] table): the ReLU
    /// backward of relu(bn(h)) applied to an input gradient.
    pub relu_mask: Option<(&'a Tensor, &'a CudaBuf)>,
    /// Per-brick partial sums [bricks, 2 Co] (f32) of the stored output: BatchNorm's
    /// statistics shifted by the bias, or with `relu_mask` its backward sums (Σ g, Σ g (h − mean)).
    pub partials: bool,
}

/// Bricks (2 x 4 x 8 voxels, one weight-gradient block each) of a volume.
fn tc_bricks(v: Vol) -> usize {
    v.n * v.x.div_ceil(2) * v.y.div_ceil(4) * v.z.div_ceil(8)
}

/// Bricks of the forward kernel for output tile `tile`: (2 MT) x 4 x 8 voxels with MT = 4, 2,
/// 1 m-tiles per warp for tiles of 16, 32, 64 channels (`kernels/conv3d_tc.cu`).
fn tc_forward_bricks(v: Vol, tile: usize) -> usize {
    let bx = 2 * (64 / tile);
    v.n * v.x.div_ceil(bx) * v.y.div_ceil(4) * v.z.div_ceil(8)
}

/// The parameters of the `conv3d_tc_forward_*` entries: `ConvTcForwardParams` of
/// kernels/conv3d_tc.cu, field for field (device pointers, 0 for a fusion that is off; then
/// the sizes).
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvTcForwardParams {
    x: u64,
    w: u64,
    bias: u64,
    y: u64,
    in_bn: u64,
    residual: u64,
    mask_h: u64,
    mask_bn: u64,
    part: u64,
    nb: i32,
    x_len: i32,
    y_len: i32,
    z_len: i32,
    ci: i32,
    co: i32,
    k: i32,
    /// The upsampled residual's grid (rX, rY, rZ; 0 without one).
    residual_grid: [i32; 3],
}
const _: () = assert!(std::mem::size_of::<ConvTcForwardParams>() == 112);
// SAFETY: plain integers without padding (asserted size: 9 × 8 + 10 × 4 bytes).
unsafe impl bytemuck::Zeroable for ConvTcForwardParams {}
unsafe impl bytemuck::Pod for ConvTcForwardParams {}

/// The forward kernel for `co` output channels (its tile width), kernel size `k` and `ci` input
/// channels (32-channel chunks when they divide `ci`).
fn tc_forward_kernel(co: usize, k: usize, ci: usize) -> Result<(KernelId, usize)> {
    use KernelId::*;
    let wide = ci.is_multiple_of(32);
    let kern = match (co, k, wide) {
        (0..=16, 1, false) => Conv3dTcForwardCo16K1C16,
        (0..=16, 1, true) => Conv3dTcForwardCo16K1C32,
        (0..=16, 3, false) => Conv3dTcForwardCo16K3C16,
        (0..=16, 3, true) => Conv3dTcForwardCo16K3C32,
        (17..=32, 1, false) => Conv3dTcForwardCo32K1C16,
        (17..=32, 1, true) => Conv3dTcForwardCo32K1C32,
        (17..=32, 3, false) => Conv3dTcForwardCo32K3C16,
        (17..=32, 3, true) => Conv3dTcForwardCo32K3C32,
        (_, 1, false) => Conv3dTcForwardCo64K1C16,
        (_, 1, true) => Conv3dTcForwardCo64K1C32,
        (_, 3, false) => Conv3dTcForwardCo64K3C16,
        (_, 3, true) => Conv3dTcForwardCo64K3C32,
        _ => anyhow::bail!("tensor-core conv3d: kernel size {k} (1 or 3 only)"),
    };
    Ok((
        kern,
        match co {
            0..=16 => 16,
            17..=32 => 32,
            _ => 64,
        },
    ))
}

/// A convolution's f32 weight [co, k, k, k, ci] as a tensor-core forward reads it: as is, or
/// flipped and transposed (the input gradient's operand, whose output has `ci` channels).
struct TcWeight<'a> {
    w: &'a Tensor,
    co: usize,
    ci: usize,
    flip: bool,
}

/// The tensor-core convolution: y [N, X, Y, Z, co] bf16 from x (v, bf16) and the f32 weight
/// `w` (packed by `weight_bf16`, flipped when `flip`), with `fu`'s fusions; the partials when
/// asked for.
fn tc_forward(
    x: &Tensor,
    v: Vol,
    w: TcWeight,
    bias: Option<&Tensor>,
    co: usize,
    k: usize,
    fu: Fusion,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = dev_of(x);
    let y = empty(dev, &v.with_c(co).shape(), DType::BF16)?;
    let (kern, tile) = tc_forward_kernel(co, k, v.c)?;
    let wb = weight_bf16(w.w, w.co, k, w.ci, w.flip, tile)?;
    ensure!(
        v.x * v.y * v.z < i32::MAX as usize,
        "tensor-core conv3d: a patch of {} x {} x {} voxels (the kernel indexes a patch's voxels in 32 bits)",
        v.x,
        v.y,
        v.z
    );
    let bricks = tc_forward_bricks(v, tile);
    let part = if fu.partials { Some(empty(dev, &[bricks, 2 * co], DType::F32)?) } else { None };
    ensure!(
        fu.residual.is_none() || fu.upsampled_residual.is_none(),
        "conv3d: a residual and an upsampled residual at once"
    );
    let r_grid = match fu.upsampled_residual {
        Some(r) => {
            let rs = r.shape();
            ensure!(
                rs.len() == 5
                    && rs[0] == v.n
                    && rs[4] == co
                    && r.dtype() == DType::BF16
                    && v.x <= 2 * rs[1]
                    && v.y <= 2 * rs[2]
                    && v.z <= 2 * rs[3],
                "conv3d: upsampled residual {rs:?} ({:?}) does not upsample to [{}, {}, {}, {}, {co}]",
                r.dtype(),
                v.n,
                v.x,
                v.y,
                v.z
            );
            [rs[1], rs[2], rs[3]]
        }
        None => [0; 3],
    };
    // The 1x1x1 kernels take no BN table (kernels/conv3d_tc.cu): their input is relu(bn(x))
    // computed first, the same values the 3x3x3 loader computes.
    let bn_input = match (k, fu.input_bn_relu) {
        (1, Some(tab)) => Some(bn_table_relu(x, v, tab)?),
        _ => None,
    };
    let (x, in_bn) = match &bn_input {
        Some(a) => (a, None),
        None => (x, fu.input_bn_relu),
    };
    let params = ConvTcForwardParams {
        x: x.ptr(),
        w: wb.ptr(),
        bias: bias.map_or(0, |b| b.ptr()),
        y: y.ptr(),
        in_bn: in_bn.map_or(0, |t| t.ptr()),
        residual: fu.residual.or(fu.upsampled_residual).map_or(0, |r| r.ptr()),
        mask_h: fu.relu_mask.map_or(0, |(h, _)| h.ptr()),
        mask_bn: fu.relu_mask.map_or(0, |(_, t)| t.ptr()),
        part: part.as_ref().map_or(0, |p| p.ptr()),
        nb: v.n as i32,
        x_len: v.x as i32,
        y_len: v.y as i32,
        z_len: v.z as i32,
        ci: v.c as i32,
        co: co as i32,
        k: k as i32,
        residual_grid: r_grid.map(|g| g as i32),
    };
    let extra = fu.residual.map_or(0, nbytes)
        + fu.upsampled_residual.map_or(0, nbytes)
        + fu.relu_mask.map_or(0, |(h, _)| nbytes(h))
        + part.as_ref().map_or(0, nbytes);
    let cost = Cost::tensor_bf16(
        2.0 * (v.voxels() * co * k * k * k * v.c) as f64,
        nbytes(x) + co.div_ceil(tile) * tile * k * k * k * v.c * 2 + co * 4 + nbytes(&y) + extra,
    );
    dev.launch(kern, (bricks as u32, co.div_ceil(tile) as u32, 1), (128, 1, 1), 0, &[ParamBlock::arg(&params)], cost)?;
    Ok((y, part))
}

/// relu(bn(x)) in bf16 from BatchNorm's [3, v.c] affine table (`bn_table_relu_bf16`).
fn bn_table_relu(x: &Tensor, v: Vol, tab: &CudaBuf) -> Result<Tensor> {
    let dev = dev_of(x);
    let n = x.numel();
    ensure!(n < i32::MAX as usize, "BN -> ReLU of {n} values: the kernel indexes in 32 bits");
    let y = empty(dev, x.shape(), DType::BF16)?;
    dev.launch_1d(
        KernelId::BnTableReluBf16,
        n,
        &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::Ptr(tab.ptr()), Arg::I32((n / v.c) as i32), Arg::I32(v.c as i32)],
        Cost::mem(2 * nbytes(x)),
    )?;
    Ok(y)
}

/// The tensor-core forward with fusions: x bf16 (v), v.c a multiple of 16.
pub fn forward_fused(
    x: &Tensor,
    v: Vol,
    w: &Tensor,
    bias: Option<&Tensor>,
    co: usize,
    k: usize,
    fu: Fusion,
) -> Result<(Tensor, Option<Tensor>)> {
    ensure!(
        tensor_cores_for(x.dtype(), v.c),
        "fused conv3d needs bf16 activations over a multiple of 16 channels, got {:?} x {}",
        x.dtype(),
        v.c
    );
    ensure_f32(w, "conv3d weight")?;
    tc_forward(x, v, TcWeight { w, co, ci: v.c, flip: false }, bias, co, k, fu)
}

/// The tensor-core input gradient with fusions: dx [.., ci] bf16 from bf16 dy (v_out, its
/// channel count a multiple of 16).
pub fn backward_input_fused(
    dy: &Tensor,
    v_out: Vol,
    w: &Tensor,
    ci: usize,
    k: usize,
    fu: Fusion,
) -> Result<(Tensor, Option<Tensor>)> {
    ensure!(
        tensor_cores_for(dy.dtype(), v_out.c),
        "fused conv3d backward needs bf16 gradients over a multiple of 16 channels, got {:?} x {}",
        dy.dtype(),
        v_out.c
    );
    tc_forward(dy, v_out, TcWeight { w, co: v_out.c, ci, flip: true }, None, ci, k, fu)
}

/// y [N, X, Y, Z, Co] in x's dtype; w [Co, k, k, k, Ci] f32, bias [Co] f32.
pub fn forward(x: &Tensor, v: Vol, w: &Tensor, bias: Option<&Tensor>, co: usize, k: usize) -> Result<Tensor> {
    ensure_float(x, "conv3d")?;
    ensure_f32(w, "conv3d weight")?;
    if tensor_cores_for(x.dtype(), v.c) {
        return Ok(tc_forward(x, v, TcWeight { w, co, ci: v.c, flip: false }, bias, co, k, Fusion::default())?.0);
    }
    forward_cuda_cores(x, v, w, bias, co, k)
}

/// `forward` on the CUDA-core kernel (`kernels/conv3d.cu`) whatever the dtype and channels:
/// the fp32 path, the first conv, and version 1 in the kernel lab.
pub fn forward_cuda_cores(
    x: &Tensor,
    v: Vol,
    w: &Tensor,
    bias: Option<&Tensor>,
    co: usize,
    k: usize,
) -> Result<Tensor> {
    ensure_float(x, "conv3d")?;
    ensure_f32(w, "conv3d weight")?;
    let dev = dev_of(x);
    let y = empty(dev, &v.with_c(co).shape(), x.dtype())?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(bias.map_or(0, |b| b.ptr())), Arg::Ptr(y.ptr())];
    args.extend(dims(v));
    // fp32 FMAs on CUDA cores; compulsory bytes: x, w, bias, y once each.
    let cost =
        Cost::fp32(2.0 * (v.voxels() * co * k * k * k * v.c) as f64, nbytes(x) + nbytes(w) + co * 4 + nbytes(&y));
    // One input channel (the first convolution): the direct kernel, see conv3d.cu.
    if k == 3 && v.c == 1 && co.is_multiple_of(16) && v.voxels() < i32::MAX as usize && y.ptr().is_multiple_of(16) {
        args.push(Arg::I32(co as i32));
        let blocks = v.voxels().div_ceil(256) as u32;
        dev.launch(
            KernelId::typed(x.dtype(), KernelId::Conv3dForwardK3C1F32, KernelId::Conv3dForwardK3C1Bf16),
            (blocks, (co / 16) as u32, 1),
            (256, 1, 1),
            0,
            &args,
            cost,
        )?;
        return Ok(y);
    }
    args.extend([Arg::I32(v.c as i32), Arg::I32(co as i32), Arg::I32(k as i32)]);
    dev.launch(
        KernelId::typed(x.dtype(), KernelId::Conv3dForwardF32, KernelId::Conv3dForwardBf16),
        (tiles(v.voxels()), tiles(co), 1),
        (256, 1, 1),
        0,
        &args,
        cost,
    )?;
    Ok(y)
}

/// dx [N, X, Y, Z, Ci] in `dtype` from dy [N, X, Y, Z, Co] (v_out) and w.
pub fn backward_input(dy: &Tensor, v_out: Vol, w: &Tensor, ci: usize, k: usize, dtype: DType) -> Result<Tensor> {
    let dy = cast(dy, dtype)?;
    if tensor_cores_for(dtype, v_out.c) {
        // The forward kernel with the flipped, transposed weight: Co input channels, Ci out.
        return Ok(tc_forward(
            &dy,
            v_out,
            TcWeight { w, co: v_out.c, ci, flip: true },
            None,
            ci,
            k,
            Fusion::default(),
        )?
        .0);
    }
    let dev = dev_of(&dy);
    let dx = empty(dev, &v_out.with_c(ci).shape(), dtype)?;
    let mut args = vec![Arg::Ptr(dy.ptr()), Arg::Ptr(w.ptr()), Arg::Ptr(dx.ptr())];
    args.extend(dims(v_out));
    args.extend([Arg::I32(ci as i32), Arg::I32(v_out.c as i32), Arg::I32(k as i32)]);
    let cost =
        Cost::fp32(2.0 * (v_out.voxels() * ci * k * k * k * v_out.c) as f64, nbytes(&dy) + nbytes(w) + nbytes(&dx));
    dev.launch(
        KernelId::typed(dtype, KernelId::Conv3dBackwardInputF32, KernelId::Conv3dBackwardInputBf16),
        (tiles(v_out.voxels()), tiles(ci), 1),
        (256, 1, 1),
        0,
        &args,
        cost,
    )?;
    Ok(dx)
}

/// Number of split-K partials for a weight gradient over `voxels` rows of a [co, kdim]
/// result: about 2048 voxels per split, at most 256 splits and 64 Mi partial values.
pub fn weight_splits(voxels: usize, co: usize, kdim: usize) -> (usize, usize) {
    let budget = ((64usize << 20) / (co * kdim).max(1)).max(1);
    let splits = voxels.div_ceil(2048).clamp(1, 256).min(budget);
    let chunk = voxels.div_ceil(splits).div_ceil(16) * 16;
    (voxels.div_ceil(chunk.max(1)).max(1), chunk.max(16))
}

/// Splits of the tensor-core weight gradient over `bricks` bricks for `tiles` channel tiles:
/// (splits, bricks per split). About 2048 blocks in all, partials at most 32 MiB (unless one
/// split alone is more), every split non-empty.
pub fn tc_weight_splits(bricks: usize, tiles: usize, weight_len: usize) -> (usize, usize) {
    let budget = ((8usize << 20) / weight_len.max(1)).max(1);
    let splits = bricks.min((2048 / tiles.max(1)).max(1)).min(budget).max(1);
    let per = bricks.div_ceil(splits).max(1);
    (bricks.div_ceil(per).max(1), per)
}

/// The tensor-core weight gradient: split-K partials of dw [Co, T, Ci] from bf16 x (v) and dy;
/// with `input_bn_relu` (a [3, Ci] table) the input is relu(bn(x)), recomputed in the halo.
/// The bias gradient's per-split sums [splits, co] (f64) come with it.
fn tc_backward_weight(
    x: &Tensor,
    v: Vol,
    dy: &Tensor,
    co: usize,
    k: usize,
    input_bn_relu: Option<&CudaBuf>,
) -> Result<(CudaBuf, usize, CudaBuf)> {
    let dev = dev_of(x);
    let kdim = k * k * k * v.c;
    ensure!(
        5 * v.y * v.z * v.c < i32::MAX as usize && 64 * v.c.max(co) < i32::MAX as usize,
        "tensor-core conv3d weight gradient: {} x {} voxels of {} channels per x-plane, {co} output channels (the kernel's offsets are 32-bit)",
        v.y,
        v.z,
        v.c
    );
    // k = 1: runs of 64 voxels, and relu(bn(x)) computed first (kernels/conv3d_tc.cu).
    let bn_input = match (k, input_bn_relu) {
        (1, Some(tab)) => Some(bn_table_relu(x, v, tab)?),
        _ => None,
    };
    let (x, input_bn_relu) = match &bn_input {
        Some(a) => (a, None),
        None => (x, input_bn_relu),
    };
    let bricks = if k == 1 { v.voxels().div_ceil(64) } else { tc_bricks(v) };
    let (co_tiles, ci_tiles) = (co.div_ceil(16), v.c / 16);
    let (splits, per) = tc_weight_splits(bricks, co_tiles * ci_tiles, co * kdim);
    let part = dev.alloc(splits * co * kdim * 4)?;
    let db_part = dev.alloc(splits * co * 8)?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(part.ptr())];
    args.extend(dims(v));
    args.extend([
        Arg::I32(v.c as i32),
        Arg::I32(co as i32),
        Arg::I32(k as i32),
        Arg::I64(per as i64),
        Arg::Ptr(input_bn_relu.map_or(0, |t| t.ptr())),
        Arg::Ptr(db_part.ptr()),
    ]);
    // x once per output-channel tile, dy once per input-channel tile, the partials written.
    let cost = Cost::tensor_bf16(
        2.0 * (v.voxels() * co * kdim) as f64,
        co_tiles * nbytes(x) + ci_tiles * nbytes(dy) + splits * co * (kdim * 4 + 8),
    );
    // dy as 16-byte pieces where its channel count allows.
    let kern = match (k, co.is_multiple_of(8)) {
        (1, true) => KernelId::Conv3dTcBackwardWeightK1,
        (3, true) => KernelId::Conv3dTcBackwardWeightK3,
        (3, false) => KernelId::Conv3dTcBackwardWeightK3Any,
        (1, false) => anyhow::bail!(
            "tensor-core conv3d weight gradient: k = 1 needs a multiple of 8 output channels (tc_weight_gradient pads dy)"
        ),
        _ => anyhow::bail!("tensor-core conv3d weight gradient: kernel size {k} (1 or 3 only)"),
    };
    dev.launch(kern, (splits as u32, co_tiles as u32, ci_tiles as u32), (128, 1, 1), 0, &args, cost)?;
    Ok((part, splits, db_part))
}

/// Gradients already accumulated for a convolution's weight [Co, k, k, k, Ci] and bias [Co]
/// (f32; from the other view's pass through the same layer): the reductions that finish dw
/// and db add them (acc + new, the order autograd's add would take), so no add pass follows.
#[derive(Clone, Copy, Default)]
pub struct WeightAcc<'a> {
    pub w: Option<&'a Tensor>,
    pub b: Option<&'a Tensor>,
}

impl WeightAcc<'_> {
    fn check(&self, co: usize, k: usize, ci: usize) -> Result<()> {
        if let Some(w) = self.w {
            ensure!(
                w.shape() == [co, k, k, k, ci] && w.dtype() == DType::F32 && w.is_cuda(),
                "conv3d: accumulated weight gradient {:?} {:?}, expected [{co}, {k}, {k}, {k}, {ci}] f32",
                w.shape(),
                w.dtype()
            );
        }
        if let Some(b) = self.b {
            ensure!(
                b.shape() == [co] && b.dtype() == DType::F32 && b.is_cuda(),
                "conv3d: accumulated bias gradient {:?} {:?}, expected [{co}] f32",
                b.shape(),
                b.dtype()
            );
        }
        Ok(())
    }
}

/// (dw [Co, k, k, k, Ci] f32, db [Co] f32) from x (v) and dy.
pub fn backward_weight(x: &Tensor, v: Vol, dy: &Tensor, co: usize, k: usize) -> Result<(Tensor, Tensor)> {
    backward_weight_acc(x, v, dy, co, k, WeightAcc::default())
}

/// `backward_weight` plus `acc` (added by the final reductions).
pub fn backward_weight_acc(
    x: &Tensor,
    v: Vol,
    dy: &Tensor,
    co: usize,
    k: usize,
    acc: WeightAcc,
) -> Result<(Tensor, Tensor)> {
    acc.check(co, k, v.c)?;
    let dy = cast(dy, x.dtype())?;
    if tensor_cores_for(x.dtype(), v.c) {
        return tc_weight_gradient(x, v, &dy, co, k, None, acc);
    }
    cuda_core_weight_gradient(x, v, &dy, co, k, acc)
}

/// `backward_weight` on the tensor cores (x and dy bf16, v.c a multiple of 16): version 2 in
/// the kernel lab.
pub fn backward_weight_tensor_cores(x: &Tensor, v: Vol, dy: &Tensor, co: usize, k: usize) -> Result<(Tensor, Tensor)> {
    ensure!(
        x.dtype() == DType::BF16 && v.c.is_multiple_of(16),
        "tensor-core conv3d weight gradient needs bf16 activations over a multiple of 16 channels, got {:?} x {}",
        x.dtype(),
        v.c
    );
    tc_weight_gradient(x, v, &cast(dy, DType::BF16)?, co, k, None, WeightAcc::default())
}

/// `backward_weight` on the CUDA-core split-K kernel (dy in x's dtype): the fp32 path and
/// version 1 in the kernel lab.
pub fn backward_weight_cuda_cores(x: &Tensor, v: Vol, dy: &Tensor, co: usize, k: usize) -> Result<(Tensor, Tensor)> {
    cuda_core_weight_gradient(x, v, dy, co, k, WeightAcc::default())
}

fn cuda_core_weight_gradient(
    x: &Tensor,
    v: Vol,
    dy: &Tensor,
    co: usize,
    k: usize,
    acc: WeightAcc,
) -> Result<(Tensor, Tensor)> {
    let dy = cast(dy, x.dtype())?;
    let dev = dev_of(x);
    let kdim = k * k * k * v.c;
    let (splits, chunk) = weight_splits(v.voxels(), co, kdim);
    let part = dev.alloc(splits * co * kdim * 4)?;
    let mut args = vec![Arg::Ptr(x.ptr()), Arg::Ptr(dy.ptr()), Arg::Ptr(part.ptr())];
    args.extend(dims(v));
    args.extend([Arg::I32(v.c as i32), Arg::I32(co as i32), Arg::I32(k as i32), Arg::I64(chunk as i64)]);
    // x and dy once each, plus this kernel's split-K partials written.
    let cost = Cost::fp32(2.0 * (v.voxels() * co * kdim) as f64, nbytes(x) + nbytes(&dy) + splits * co * kdim * 4);
    dev.launch(
        KernelId::typed(x.dtype(), KernelId::Conv3dBackwardWeightF32, KernelId::Conv3dBackwardWeightBf16),
        (tiles(kdim), tiles(co), splits as u32),
        (256, 1, 1),
        0,
        &args,
        cost,
    )?;
    finish_weight_gradient(&part, splits, &dy, co, k, v.c, acc)
}

/// (dw, db) of a convolution whose input is relu(bn(x)) (`table` [3, Ci]), on tensor cores,
/// without that input: the halo loader recomputes it. x and dy bf16, v.c a multiple of 16.
pub fn backward_weight_bn_relu(
    x: &Tensor,
    v: Vol,
    table: &CudaBuf,
    dy: &Tensor,
    co: usize,
    k: usize,
    acc: WeightAcc,
) -> Result<(Tensor, Tensor)> {
    ensure!(
        tensor_cores_for(x.dtype(), v.c),
        "fused conv3d weight gradient needs bf16 activations over a multiple of 16 channels, got {:?} x {}",
        x.dtype(),
        v.c
    );
    acc.check(co, k, v.c)?;
    tc_weight_gradient(x, v, &cast(dy, x.dtype())?, co, k, Some(table), acc)
}

/// (dw, db) on tensor cores: dw from the kernel's split partials, db from its per-split dy sums.
fn tc_weight_gradient(
    x: &Tensor,
    v: Vol,
    dy: &Tensor,
    co: usize,
    k: usize,
    input_bn_relu: Option<&CudaBuf>,
    acc: WeightAcc,
) -> Result<(Tensor, Tensor)> {
    let dev = dev_of(dy);
    if k == 1 && !co.is_multiple_of(8) {
        // The 1x1x1 kernel reads dy as 16-byte pieces: dy padded with zero channels to a
        // multiple of 8 gives the same sums for the real channels, whose rows lead the padded
        // gradient [co8, Ci]. db is the column sum of dy itself.
        let co8 = co.next_multiple_of(8);
        let dy8 = super::gather::pad_channels_bf16(dy, co, co8)?;
        let (part, splits, _) = tc_backward_weight(x, v, &dy8, co8, k, input_bn_relu)?;
        let dw = reduce_weight_splits(&part, splits, co8 * v.c, dy, co, k, v.c, acc.w)?;
        return Ok((dw, super::reduce::col_sum_acc(dy, co, acc.b)?));
    }
    let (part, splits, db_part) = tc_backward_weight(x, v, dy, co, k, input_bn_relu)?;
    let dw = reduce_weight_splits(&part, splits, co * k * k * k * v.c, dy, co, k, v.c, acc.w)?;
    let db = empty(dev, &[co], DType::F32)?;
    super::reduce::reduce_chunks_acc(dev, &db_part, splits, co, 1.0, None, Some(db.ptr()), acc.b)?;
    Ok((dw, db))
}

/// dw [Co, k, k, k, Ci] = acc + the split-K partials (`splits` of `stride` values, dw's the first
/// Co k^3 Ci of each) summed in a fixed order.
#[allow(clippy::too_many_arguments)]
fn reduce_weight_splits(
    part: &CudaBuf,
    splits: usize,
    stride: usize,
    dy: &Tensor,
    co: usize,
    k: usize,
    ci: usize,
    acc: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = dev_of(dy);
    let dw = empty(dev, &[co, k, k, k, ci], DType::F32)?;
    let n = co * k * k * k * ci;
    let args = [
        Arg::Ptr(part.ptr()),
        Arg::Ptr(acc.map_or(0, |a| a.ptr())),
        Arg::Ptr(dw.ptr()),
        Arg::I32(splits as i32),
        Arg::I64(n as i64),
        Arg::I64(stride as i64),
    ];
    // Slices of the splits per output (conv3d_reduce_splits): up to 8, 32 outputs per block at
    // least.
    let slices = splits.next_power_of_two().clamp(1, 8);
    let width = 256 / slices;
    let vector = n.is_multiple_of(4)
        && stride.is_multiple_of(4)
        && [part.ptr(), acc.map_or(0, |a| a.ptr()), dw.ptr()].iter().all(|p| p.is_multiple_of(16));
    let (kern, per_thread) =
        if vector { (KernelId::Conv3dReduceSplitsF32x4, 4) } else { (KernelId::Conv3dReduceSplits, 1) };
    dev.launch(
        kern,
        (n.div_ceil(width * per_thread) as u32, 1, 1),
        (width as u32, slices as u32, 1),
        0,
        &args,
        Cost::mem((splits + 1 + acc.is_some() as usize) * n * 4),
    )?;
    Ok(dw)
}

/// dw from its split-K partials [splits, Co, k^3 Ci] (summed in a fixed order), and db = the
/// column sum of dy, each plus its accumulated gradient in `acc`.
fn finish_weight_gradient(
    part: &CudaBuf,
    splits: usize,
    dy: &Tensor,
    co: usize,
    k: usize,
    ci: usize,
    acc: WeightAcc,
) -> Result<(Tensor, Tensor)> {
    let dw = reduce_weight_splits(part, splits, co * k * k * k * ci, dy, co, k, ci, acc.w)?;
    let db = super::reduce::col_sum_acc(dy, co, acc.b)?;
    Ok((dw, db))
}
