//! The CUDA backend: the device (context, stream, cuBLAS, caching allocator, typed kernel
//! registry) and one host-side launcher module per op in `ops/`, each beside its kernel file
//! `kernels/<op>.cu`. The CPU code in `crate::ops` is the oracle these are tested against
//! (`tests/gpu/`).
//!
//! Activations may be stored as f32 or bf16 (`DType::BF16`: mixed precision, every kernel
//! computes in f32 or f64); parameters, their gradients, embeddings and the loss are f32.
//! Every backward returns gradients in the dtype of the value they belong to.

pub mod alloc;
mod backend;
pub mod cost;
pub mod device;
#[cfg(vox2vec_emulator)]
pub mod emulator;
pub mod graph;
pub mod lab;
pub mod ops;
pub mod optim;
pub mod registry;
pub mod sass;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};

pub use cost::{Cost, Unit};
pub use device::{
    Arg, CudaBuf, CudaDevice, ParamBlock, device, device_count, emulated, enable_plan_mode, enable_plan_mode_for,
    nvtx_range, planned, unavailable_reason,
};
pub use graph::GraphStats;
pub use registry::KernelId;

use crate::tensor::{DType, Tensor, numel};

/// For an accumulating backward (`Graph::record_accumulating`): takes the gradient
/// accumulated so far out of `slot` when it is a device tensor of this shape and dtype (one a
/// kernel can add in its epilogue); leaves anything else for autograd's own add.
pub fn take_accumulated(slot: &mut Option<Tensor>, shape: &[usize], dtype: DType) -> Option<Tensor> {
    slot.take_if(|t| t.is_cuda() && t.shape() == shape && t.dtype() == dtype)
}

/// The device a CUDA tensor lives on.
pub fn dev_of(t: &Tensor) -> &Arc<CudaDevice> {
    t.cuda().buf.device()
}

/// An uninitialised device tensor.
pub fn empty(dev: &Arc<CudaDevice>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_cuda(shape, dtype, dev.alloc(numel(shape) * dtype.size_in_bytes())?))
}

/// A device tensor of zeros.
pub fn zeros(dev: &Arc<CudaDevice>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(Tensor::from_cuda(shape, dtype, dev.alloc_zeroed(numel(shape) * dtype.size_in_bytes())?))
}

/// A device f32 tensor filled with `value`.
pub fn full(dev: &Arc<CudaDevice>, shape: &[usize], value: f32) -> Result<Tensor> {
    let t = empty(dev, shape, DType::F32)?;
    let n = t.numel();
    dev.launch_1d(KernelId::FillF32, n, &[Arg::Ptr(t.ptr()), Arg::F32(value), Arg::I64(n as i64)], Cost::mem(n * 4))?;
    Ok(t)
}

/// `t` converted to `dtype` (f32 <-> bf16); the same tensor when it already has that dtype.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    let dev = dev_of(t);
    let out = empty(dev, t.shape(), dtype)?;
    let n = t.numel();
    let k = match (t.dtype(), dtype) {
        (DType::F32, DType::BF16) => KernelId::CastF32ToBf16,
        (DType::BF16, DType::F32) => KernelId::CastBf16ToF32,
        (a, b) => anyhow::bail!("no device conversion from {a:?} to {b:?}"),
    };
    dev.launch_1d(
        k,
        n,
        &[Arg::Ptr(t.ptr()), Arg::Ptr(out.ptr()), Arg::I64(n as i64)],
        Cost::mem(nbytes(t) + nbytes(&out)),
    )?;
    Ok(out)
}

/// Elements a 16-byte access of `dtype` holds (4 f32, 8 bf16).
pub fn vec_lanes(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// The 16-byte-access kernel (`[f32x4, bf16x8]`, by `dtype`) and its lane count when every
/// pointer is 16-byte aligned and `unit` (the channel count, or the element count of a flat
/// op) is a multiple of the lanes; else the scalar kernel (`[f32, bf16]`) and 1.
pub fn vec_or_scalar(
    dtype: DType,
    scalar: [KernelId; 2],
    vector: [KernelId; 2],
    ptrs: &[u64],
    unit: usize,
) -> (KernelId, usize) {
    let lanes = vec_lanes(dtype);
    if unit.is_multiple_of(lanes) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
        (KernelId::typed(dtype, vector[0], vector[1]), lanes)
    } else {
        (KernelId::typed(dtype, scalar[0], scalar[1]), 1)
    }
}

/// For a kernel with one work item per voxel and 16-byte channel group (pooling, upsampling:
/// a 32-bit group index): the vector kernel and the number of groups over `voxels` voxels of
/// `c` channels, or None when the scalar kernel (one item per element) must run.
pub fn vec_groups(
    dtype: DType,
    vector: [KernelId; 2],
    ptrs: &[u64],
    c: usize,
    voxels: usize,
) -> Option<(KernelId, usize)> {
    let lanes = vec_lanes(dtype);
    let groups = voxels * c / lanes;
    let fits = c.is_multiple_of(lanes) && ptrs.iter().all(|p| p.is_multiple_of(16)) && groups < u32::MAX as usize;
    fits.then(|| (KernelId::typed(dtype, vector[0], vector[1]), groups))
}

/// Bytes of a tensor's values (the compulsory traffic of reading or writing it once).
pub fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.dtype().size_in_bytes()
}

/// Checks that `t` holds activations a kernel can read (f32 or bf16).
pub fn ensure_float(t: &Tensor, what: &str) -> Result<()> {
    ensure!(
        matches!(t.dtype(), DType::F32 | DType::BF16),
        "{what}: expected f32 or bf16 device data, found {:?}",
        t.dtype()
    );
    Ok(())
}

/// Checks that `t` is f32 device data.
pub fn ensure_f32(t: &Tensor, what: &str) -> Result<()> {
    ensure!(t.dtype() == DType::F32, "{what}: expected f32 device data, found {:?}", t.dtype());
    Ok(())
}

/// A `--device` value: `cpu`, `cuda`, `cuda:N`, or `auto` (the first CUDA device when one
/// can be used, else the CPU). Naming a CUDA device that cannot be used is an error that says why.
pub fn parse_device(spec: &str) -> Result<crate::tensor::Device> {
    use crate::tensor::Device;
    let spec = spec.trim().to_ascii_lowercase();
    let ordinal = match spec.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "auto" => return Ok(if device_count() > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cuda" | "gpu" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => anyhow::bail!("unknown device {spec:?}: use cpu, cuda, cuda:N or auto"),
        },
    };
    if let Some(why) = unavailable_reason() {
        anyhow::bail!("device {spec:?} cannot be used: {why}");
    }
    let n = device_count();
    ensure!(ordinal < n, "device {spec:?} requested but only {n} CUDA device(s) are present");
    Ok(Device::Cuda(ordinal))
}

/// A `--precision` value: `fp32` or `bf16` (activation storage on a CUDA device).
/// `--device` and `--precision` together: bf16 activations on the CPU are refused (the CPU
/// computes and stores fp32), naming both flags.
pub fn parse_device_and_precision(device: &str, precision: &str) -> Result<(crate::tensor::Device, DType)> {
    let d = parse_device(device).context("--device")?;
    let p = parse_precision(precision).context("--precision")?;
    anyhow::ensure!(
        !(d == crate::tensor::Device::Cpu && p == DType::BF16),
        "--precision bf16 needs a CUDA device, and --device {device} runs on the CPU, which computes and stores in fp32; drop --precision or choose --device cuda"
    );
    Ok((d, p))
}

/// Where a command runs, as the first line of its output says it: "cpu, 2 threads" or
/// "cuda:0 (NVIDIA H200), BF16 activations".
pub fn describe(device: crate::tensor::Device, precision: DType) -> Result<String> {
    Ok(match device {
        crate::tensor::Device::Cpu => format!("cpu, {} threads", rayon::current_num_threads()),
        crate::tensor::Device::Cuda(o) => format!("cuda:{o} ({}), {precision:?} activations", self::device(o)?.name()),
    })
}

pub fn parse_precision(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "fp32" | "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        s => anyhow::bail!("unknown precision {s:?}: use fp32 or bf16"),
    }
}
