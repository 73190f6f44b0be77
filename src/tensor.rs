//! Tensors: a shape, a dtype and a reference-counted storage that lives on one device.
//!
//! Tensors are immutable values (cheap to clone: the storage is behind an `Arc`) and always
//! contiguous, row-major. Activations use the channels-last layout `[N, X, Y, Z, C]`
//! (see `docs/DESIGN.md`); PyTorch layouts appear only at the checkpoint boundary.
//!
//! The storage is an enum over devices: host memory, or a block of CUDA device memory from the
//! device's caching pool. Every op dispatches on it (`ops/*.rs`). On the host, tensors hold
//! f32 or i64; on a CUDA device also bf16 (activation storage in the mixed-precision mode).

use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};

/// Element type. `BF16` is GPU activation storage (arithmetic in fp32); on the host a bf16
/// tensor is read back as f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    I64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::I64 => 8,
        }
    }
}

/// Where a tensor's storage lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// Host memory of one tensor.
#[derive(Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Device memory of one tensor.
#[derive(Debug)]
pub struct CudaStorage {
    pub buf: crate::cuda::CudaBuf,
    pub dtype: DType,
}

/// Memory of one tensor on some device.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {:?})", self.dtype(), self.shape, self.device())
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Tensor {
        assert_eq!(numel(shape), data.len(), "shape {shape:?} does not match {} values", data.len());
        Tensor { shape: shape.to_vec(), storage: Arc::new(Storage::Cpu(CpuStorage::F32(data))) }
    }

    pub fn from_i64(shape: &[usize], data: Vec<i64>) -> Tensor {
        assert_eq!(numel(shape), data.len(), "shape {shape:?} does not match {} values", data.len());
        Tensor { shape: shape.to_vec(), storage: Arc::new(Storage::Cpu(CpuStorage::I64(data))) }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_f32(shape, vec![0.0; numel(shape)])
    }

    pub fn full(shape: &[usize], v: f32) -> Tensor {
        Tensor::from_f32(shape, vec![v; numel(shape)])
    }

    pub fn scalar(v: f32) -> Tensor {
        Tensor::from_f32(&[], vec![v])
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(_)) => DType::F32,
            Storage::Cpu(CpuStorage::I64(_)) => DType::I64,
            Storage::Cuda(c) => c.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(c) => Device::Cuda(c.buf.device().ordinal()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(&*self.storage, Storage::Cuda(_))
    }

    /// A tensor over a device buffer holding `numel(shape)` values of `dtype`.
    pub fn from_cuda(shape: &[usize], dtype: DType, buf: crate::cuda::CudaBuf) -> Tensor {
        assert!(buf.bytes() >= numel(shape) * dtype.size_in_bytes(), "device buffer too small for {shape:?} {dtype:?}");
        Tensor { shape: shape.to_vec(), storage: Arc::new(Storage::Cuda(CudaStorage { buf, dtype })) }
    }

    /// The device storage. Panics on host tensors: GPU op code checks devices at its entry.
    pub fn cuda(&self) -> &CudaStorage {
        match &*self.storage {
            Storage::Cuda(c) => c,
            s => panic!("expected a CUDA tensor, found {}", kind(s)),
        }
    }

    /// Device pointer of a CUDA tensor's data.
    pub fn ptr(&self) -> u64 {
        self.cuda().buf.ptr()
    }

    /// Copy to `device` (the same tensor when it is already there). bf16 device tensors come
    /// back to the host as f32.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        match (&*self.storage, device) {
            (Storage::Cpu(_), Device::Cpu) => Ok(self.clone()),
            (Storage::Cuda(c), Device::Cuda(o)) if c.buf.device().ordinal() == o => Ok(self.clone()),
            (Storage::Cpu(h), Device::Cuda(o)) => {
                let dev = crate::cuda::device(o)?;
                let (buf, dt) = match h {
                    CpuStorage::F32(v) => (dev.upload(v)?, DType::F32),
                    CpuStorage::I64(v) => (dev.upload(v)?, DType::I64),
                };
                Ok(Tensor::from_cuda(&self.shape, dt, buf))
            }
            (Storage::Cuda(_), Device::Cpu) => self.to_host(),
            (Storage::Cuda(_), Device::Cuda(_)) => self.to_host()?.to_device(device),
        }
    }

    /// A host copy (waits for the device); f32 for f32 and bf16 data.
    pub fn to_host(&self) -> Result<Tensor> {
        let c = match &*self.storage {
            Storage::Cpu(_) => return Ok(self.clone()),
            Storage::Cuda(c) => c,
        };
        let dev = c.buf.device();
        let n = self.numel();
        Ok(match c.dtype {
            DType::F32 => Tensor::from_f32(&self.shape, dev.download::<f32>(c.buf.ptr(), n)?),
            DType::I64 => Tensor::from_i64(&self.shape, dev.download::<i64>(c.buf.ptr(), n)?),
            DType::BF16 => {
                let raw = dev.download::<u16>(c.buf.ptr(), n)?;
                Tensor::from_f32(&self.shape, raw.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
        })
    }

    /// Host f32 values of any f32 or bf16 tensor (a copy for device tensors).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.to_host()?.into_f32_vec())
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The values as host f32: borrowed when this is already a host f32 tensor, else copied
    /// down (and converted from bf16) from the device.
    pub fn host_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(std::borrow::Cow::Borrowed(v.as_slice())),
            _ => Ok(std::borrow::Cow::Owned(self.to_f32_vec()?)),
        }
    }

    /// Host f32 view. Panics on other dtypes: op code checks dtypes at its entry.
    pub fn f32s(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => v,
            s => panic!("expected a CPU f32 tensor, found {:?}", kind(s)),
        }
    }

    pub fn i64s(&self) -> &[i64] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::I64(v)) => v,
            s => panic!("expected a CPU i64 tensor, found {:?}", kind(s)),
        }
    }

    /// Whether no other tensor shares this one's storage (`into_f32_vec` will not copy).
    pub fn is_sole_owner(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// Owned copy of the f32 values (no copy if this is the only reference).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::Cpu(CpuStorage::F32(v))) => v,
            Ok(s) => panic!("expected a CPU f32 tensor, found {:?}", kind(&s)),
            Err(arc) => match &*arc {
                Storage::Cpu(CpuStorage::F32(v)) => v.clone(),
                s => panic!("expected a CPU f32 tensor, found {:?}", kind(s)),
            },
        }
    }

    /// Same storage, another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            bail!("cannot reshape {:?} to {:?}", self.shape, shape);
        }
        Ok(Tensor { shape: shape.to_vec(), storage: self.storage.clone() })
    }

    /// The single value of a one-element tensor (waits for the device for CUDA tensors).
    pub fn to_scalar(&self) -> f32 {
        assert_eq!(self.numel(), 1, "to_scalar on a tensor of shape {:?}", self.shape);
        match &*self.storage {
            Storage::Cpu(_) => self.f32s()[0],
            Storage::Cuda(_) => self.to_f32_vec().expect("reading a scalar from the device")[0],
        }
    }
}

fn kind(s: &Storage) -> &'static str {
    match s {
        Storage::Cpu(CpuStorage::F32(_)) => "cpu f32",
        Storage::Cpu(CpuStorage::I64(_)) => "cpu i64",
        Storage::Cuda(_) => "cuda",
    }
}

/// Channels-last activation shape `[N, X, Y, Z, C]`, unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vol {
    pub n: usize,
    pub x: usize,
    pub y: usize,
    pub z: usize,
    pub c: usize,
}

impl Vol {
    pub fn of(t: &Tensor) -> Vol {
        let s = t.shape();
        assert_eq!(s.len(), 5, "expected an [N, X, Y, Z, C] activation, found shape {s:?}");
        Vol { n: s[0], x: s[1], y: s[2], z: s[3], c: s[4] }
    }
    pub fn shape(&self) -> [usize; 5] {
        [self.n, self.x, self.y, self.z, self.c]
    }
    pub fn voxels(&self) -> usize {
        self.n * self.x * self.y * self.z
    }
    pub fn with_c(self, c: usize) -> Vol {
        Vol { c, ..self }
    }
}

/// PyTorch NCXYZ → channels-last NXYZC.
pub fn ncxyz_to_nxyzc(data: &[f32], n: usize, c: usize, sp: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for b in 0..n {
        for ch in 0..c {
            let src = &data[(b * c + ch) * sp..(b * c + ch + 1) * sp];
            for (v, &val) in src.iter().enumerate() {
                out[(b * sp + v) * c + ch] = val;
            }
        }
    }
    out
}

/// Channels-last NXYZC → PyTorch NCXYZ.
pub fn nxyzc_to_ncxyz(data: &[f32], n: usize, c: usize, sp: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for b in 0..n {
        for v in 0..sp {
            for ch in 0..c {
                out[(b * c + ch) * sp + v] = data[(b * sp + v) * c + ch];
            }
        }
    }
    out
}
