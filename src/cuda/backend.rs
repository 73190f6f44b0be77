//! The three machines behind a `CudaDevice`: a GPU through the CUDA driver, the CUDA emulator
//! (the kernels compiled for the host, each CUDA thread a fiber; host memory), and the plan
//! device (nothing executes: addresses are invented and launches only checked). Each
//! primitive the front needs — allocate, free, memset, the three copies, launch, SGEMM, a
//! kernel attribute, synchronise — is one `match` here; the front (`device.rs`) keeps what the
//! three share: the caching allocator, the recording of step graphs, the cost log, timing.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, result, sys};

use super::graph::Sgemm;

/// A CUfunction handle (on the emulator, the host function's address). Plain data owned by the
/// module, which lives as long as the device.
#[derive(Clone, Copy)]
pub(super) struct RawFn(pub(super) sys::CUfunction);
// SAFETY: CUfunction handles may be used from any thread once the context is current there.
unsafe impl Send for RawFn {}
unsafe impl Sync for RawFn {}

thread_local! {
    /// The device ordinal whose context is current on this thread (usize::MAX: none).
    static BOUND: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A real device through the CUDA driver.
pub(super) struct Driver {
    pub(super) ordinal: usize,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    /// cuBLAS's workspace, ours so that a stream capture never needs cuBLAS to allocate.
    pub(super) _blas_workspace: u64,
    /// The module's storage must outlive the module: the fatbin image, 8-byte aligned.
    pub(super) _image: Vec<u64>,
}

impl Driver {
    /// Make this device's context current on the calling thread (once per thread).
    pub(super) fn bind(&self) -> Result<()> {
        if BOUND.with(|b| b.get()) != self.ordinal {
            self.ctx.bind_to_thread().context("binding the CUDA context")?;
            BOUND.with(|b| b.set(self.ordinal));
        }
        Ok(())
    }

    /// Note that the opening thread has the context current already.
    pub(super) fn mark_bound(&self) {
        BOUND.with(|b| b.set(self.ordinal));
    }
}

pub(super) enum Backend {
    Driver(Driver),
    /// Feature `cuda-emulator`, `VOX2VEC_CUDA_EMULATOR=1`.
    #[cfg_attr(not(vox2vec_emulator), allow(dead_code))]
    Emulator,
    /// `enable_plan_mode`: `next` is the next invented address.
    Plan {
        next: AtomicU64,
    },
}

impl Backend {
    pub(super) fn plan() -> Backend {
        Backend::Plan { next: AtomicU64::new(1 << 40) }
    }

    pub(super) fn driver(&self) -> Option<&Driver> {
        match self {
            Backend::Driver(d) => Some(d),
            _ => None,
        }
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.driver().map_or(Ok(()), Driver::bind)
    }

    /// The stream every call goes to (null off the driver).
    pub(super) fn stream(&self) -> sys::CUstream {
        self.driver().map_or(std::ptr::null_mut(), |d| d.stream.cu_stream())
    }

    pub(super) fn synchronize(&self) -> Result<()> {
        let Some(d) = self.driver() else { return Ok(()) };
        d.bind()?;
        d.stream.synchronize().context("CUDA stream synchronisation (an earlier kernel may have failed)")
    }

    pub(super) fn malloc(&self, bytes: usize) -> Result<u64> {
        match self {
            // Invented, 256-byte aligned and never reused: nothing dereferences them.
            Backend::Plan { next } => Ok(next.fetch_add(bytes.div_ceil(256) as u64 * 256, Ordering::Relaxed)),
            Backend::Emulator => emulator_malloc(bytes),
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: plain allocation; the pointer is owned by the caller.
                Ok(unsafe { result::malloc_sync(bytes) }?)
            }
        }
    }

    pub(super) fn free(&self, ptr: u64, bytes: usize) -> Result<()> {
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => {
                emulator_free(ptr, bytes);
                Ok(())
            }
            // SAFETY: the block is no longer referenced by any buffer.
            Backend::Driver(_) => unsafe { result::free_sync(ptr) }.context("freeing device memory"),
        }
    }

    pub(super) fn memset(&self, ptr: u64, bytes: usize, value: u8) -> Result<()> {
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => {
                // SAFETY: emulator memory is host memory of at least `bytes` bytes.
                unsafe { std::ptr::write_bytes(ptr as *mut u8, value, bytes) };
                Ok(())
            }
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: ptr points to at least `bytes` bytes of a live allocation.
                unsafe { result::memset_d8_async(ptr, value, bytes, d.stream.cu_stream()) }.context("cuMemsetD8Async")
            }
        }
    }

    /// Host bytes to device memory at `ptr` (queued on the stream; a pageable source is
    /// staged by the driver before the call returns, so `data` may be dropped afterwards).
    pub(super) fn htod(&self, ptr: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => {
                // SAFETY: host memory of at least `data.len()` bytes in the emulator.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr as *mut u8, data.len()) };
                Ok(())
            }
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: the destination holds `data.len()` bytes.
                unsafe { result::memcpy_htod_async(ptr, data, d.stream.cu_stream()) }.context("copying to the device")
            }
        }
    }

    /// Device memory at `ptr` into `out` (queued; the caller synchronises before reading).
    /// The plan device leaves `out` as it is: nothing was computed.
    pub(super) fn dtoh<T: bytemuck::Pod>(&self, ptr: u64, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => {
                // SAFETY: host memory holding out.len() values of T in the emulator.
                unsafe { std::ptr::copy_nonoverlapping(ptr as *const T, out.as_mut_ptr(), out.len()) };
                Ok(())
            }
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: ptr holds out.len() values of T; the caller synchronises before reading.
                unsafe { result::memcpy_dtoh_async(out, ptr, d.stream.cu_stream()) }.context("copying from the device")
            }
        }
    }

    pub(super) fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => {
                // SAFETY: live host allocations in the emulator (possibly the same one).
                unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
                Ok(())
            }
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: both ranges are live allocations of at least `bytes` bytes.
                unsafe { result::memcpy_dtod_async(dst, src, bytes, d.stream.cu_stream()) }
                    .context("device-to-device copy")
            }
        }
    }

    /// Launch `f` (`name` for errors) with `params`, one pointer per kernel parameter. The plan
    /// device only checks the grid.
    pub(super) fn launch(
        &self,
        f: RawFn,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        match self {
            Backend::Plan { .. } => {
                ensure!(
                    grid.0 * grid.1 * grid.2 > 0 && block.0 * block.1 * block.2 > 0,
                    "{name}: empty launch grid {grid:?} block {block:?}"
                );
                Ok(())
            }
            Backend::Emulator => {
                emulator_launch(f, grid, block, shared_bytes, params).with_context(|| format!("emulating {name}"))
            }
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: `params` matches the kernel's parameter list (each launcher passes its
                // kernel's signature in order); the values live until the call returns.
                unsafe { result::launch_kernel(f.0, grid, block, shared_bytes, d.stream.cu_stream(), params) }
                    .with_context(|| format!("launching {name} with grid {grid:?}, block {block:?}"))
            }
        }
    }

    /// Let `f` be launched with up to `bytes` of dynamic shared memory.
    pub(super) fn set_max_dynamic_shared(&self, f: RawFn, name: &str, bytes: u32) -> Result<()> {
        match self {
            Backend::Plan { .. } => Ok(()),
            Backend::Emulator => emulator_set_max_dynamic_shared(f, bytes).with_context(|| name.to_string()),
            Backend::Driver(d) => {
                d.bind()?;
                // SAFETY: a function of our loaded module.
                unsafe {
                    result::function::set_function_attribute(
                        f.0,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                }
                .with_context(|| format!("{name}: allowing {bytes} bytes of dynamic shared memory"))
            }
        }
    }

    /// `CudaDevice::sgemm`'s call, row-major, as cuBLAS's column-major Cᵀ = op(B)ᵀ op(A)ᵀ.
    pub(super) fn sgemm(&self, s: Sgemm) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let Sgemm { trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32 } = s;
        let d = match self {
            Backend::Plan { .. } => return Ok(()),
            Backend::Emulator => {
                emulator_sgemm(s);
                return Ok(());
            }
            Backend::Driver(d) => d,
        };
        d.bind()?;
        // Leading dimensions at least 1 (cuBLAS rejects 0 even when k = 0 makes them unused).
        let (op_b, ldb) = if trans_b { (CUBLAS_OP_T, k.max(1)) } else { (CUBLAS_OP_N, n) };
        let (op_a, lda) = if trans_a { (CUBLAS_OP_T, m) } else { (CUBLAS_OP_N, k.max(1)) };
        let mode = if tf32 {
            blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: a live handle; the mode applies to the calls that follow on it.
        unsafe { blas_sys::cublasSetMathMode(*d.blas.handle(), mode) }.result().context("cublasSetMathMode")?;
        // SAFETY: the pointers hold matrices of the stated shapes; cuBLAS runs on our stream.
        unsafe {
            cudarc::cublas::result::sgemm(
                *d.blas.handle(),
                op_b,
                op_a,
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b as *const f32,
                ldb as i32,
                a as *const f32,
                lda as i32,
                &beta,
                c as *mut f32,
                n as i32,
            )
        }
        .with_context(|| format!("cuBLAS SGEMM {m}x{n}x{k}"))
    }
}

// The emulator's entry points; without the feature no `Backend::Emulator` is ever made.
#[cfg(vox2vec_emulator)]
fn emulator_malloc(bytes: usize) -> Result<u64> {
    super::emulator::malloc(bytes)
}
#[cfg(vox2vec_emulator)]
fn emulator_free(ptr: u64, bytes: usize) {
    super::emulator::free(ptr, bytes)
}
#[cfg(vox2vec_emulator)]
fn emulator_launch(
    f: RawFn,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    super::emulator::launch(f.0 as *const c_void, grid, block, shared, params)
}
#[cfg(vox2vec_emulator)]
fn emulator_set_max_dynamic_shared(f: RawFn, bytes: u32) -> Result<()> {
    super::emulator::set_max_dynamic_shared(f.0 as *const c_void, bytes)
}
#[cfg(vox2vec_emulator)]
fn emulator_sgemm(s: Sgemm) {
    let Sgemm { trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32 } = s;
    super::emulator::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32)
}

#[cfg(not(vox2vec_emulator))]
fn emulator_malloc(_: usize) -> Result<u64> {
    unreachable!("no emulator in this build")
}
#[cfg(not(vox2vec_emulator))]
fn emulator_free(_: u64, _: usize) {
    unreachable!("no emulator in this build")
}
#[cfg(not(vox2vec_emulator))]
fn emulator_launch(_: RawFn, _: (u32, u32, u32), _: (u32, u32, u32), _: u32, _: &mut [*mut c_void]) -> Result<()> {
    unreachable!("no emulator in this build")
}
#[cfg(not(vox2vec_emulator))]
fn emulator_set_max_dynamic_shared(_: RawFn, _: u32) -> Result<()> {
    unreachable!("no emulator in this build")
}
#[cfg(not(vox2vec_emulator))]
fn emulator_sgemm(_: Sgemm) {
    unreachable!("no emulator in this build")
}
