//! The CUDA emulator (cargo feature `cuda-emulator`, chosen at run time with
//! `VOX2VEC_CUDA_EMULATOR=1`): the kernels of `kernels/*.cu` compiled as C++ for the host
//! (`kernels/emulator/`), each CUDA thread a fiber, device memory plain host memory, cuBLAS
//! replaced by a host SGEMM. It runs `tests/gpu/` without a GPU, checking every kernel's
//! logic and every launcher's argument list against the CPU oracle. It is slow and it is not
//! a GPU: timings and device limits mean nothing here.

use std::ffi::{CString, c_void};

use anyhow::{Result, bail};

unsafe extern "C" {
    fn vox2vec_emu_lookup(name: *const std::ffi::c_char) -> *const c_void;
    fn vox2vec_emu_launch(
        kernel: *const c_void,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        shared_bytes: u32,
        args: *mut *mut c_void,
    ) -> i32;
    fn vox2vec_emu_set_max_dynamic_shared(kernel: *const c_void, bytes: u32) -> i32;
}

/// Whether this process should use the emulator instead of a driver.
pub fn requested() -> bool {
    std::env::var_os("VOX2VEC_CUDA_EMULATOR").is_some_and(|v| v != "0" && !v.is_empty())
}

/// The trampoline of kernel `name`.
pub fn lookup(name: &str) -> Option<*const c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the table is static.
    let f = unsafe { vox2vec_emu_lookup(c.as_ptr()) };
    (!f.is_null()).then_some(f)
}

/// The largest dynamic shared memory a kernel may be launched with, without opting in and
/// with (sm_90's limits, which the emulator enforces).
pub const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;
pub const MAX_DYNAMIC_SHARED: u32 = 227 * 1024;

/// Run a launch to completion on this thread.
pub(crate) fn launch(
    kernel: *const c_void,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    // One launch at a time, as on the device's one stream: the fiber scheduler is not
    // reentrant, and two host threads may launch at once.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `kernel` comes from `lookup`; `params` point to the kernel's arguments in order.
    let rc = unsafe {
        vox2vec_emu_launch(kernel, grid.0, grid.1, grid.2, block.0, block.1, block.2, shared_bytes, params.as_mut_ptr())
    };
    match rc {
        0 => {}
        2 => bail!(
            "barrier divergence (some threads of a block wait at a barrier the others never reach), grid {grid:?} block {block:?}"
        ),
        3 => bail!(
            "{shared_bytes} bytes of dynamic shared memory exceed the kernel's limit ({DEFAULT_DYNAMIC_SHARED} without opting in, at most {MAX_DYNAMIC_SHARED})"
        ),
        4 => bail!("a block wrote past the end of its {shared_bytes} bytes of dynamic shared memory"),
        _ => bail!("invalid launch configuration grid {grid:?} block {block:?}"),
    }
    Ok(())
}

/// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) for the emulator.
pub(crate) fn set_max_dynamic_shared(kernel: *const c_void, bytes: u32) -> Result<()> {
    // SAFETY: `kernel` comes from `lookup`.
    let rc = unsafe { vox2vec_emu_set_max_dynamic_shared(kernel, bytes) };
    anyhow::ensure!(rc == 0, "{bytes} bytes of dynamic shared memory exceed the device's limit ({MAX_DYNAMIC_SHARED})");
    Ok(())
}

/// Host memory standing in for device memory (256-byte aligned, as cuMemAlloc's).
pub fn malloc(bytes: usize) -> Result<u64> {
    let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256)?;
    // SAFETY: non-zero size.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        bail!("out of host memory allocating {bytes} bytes for the emulator");
    }
    Ok(p as u64)
}

pub fn free(ptr: u64, bytes: usize) {
    let layout = std::alloc::Layout::from_size_align(bytes.max(1), 256).expect("layout");
    // SAFETY: allocated by `malloc` with this size.
    unsafe { std::alloc::dealloc(ptr as *mut u8, layout) }
}

/// Row-major C[m, n] = alpha op(A) op(B) + beta C (the `CudaDevice::sgemm` contract). With
/// `tf32` the inputs are first rounded to TF32 (10 explicit mantissa bits, to nearest), as
/// tensor cores read them.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
    tf32: bool,
) {
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let rounded = |p: u64, len: usize| -> Vec<f32> {
        // SAFETY: `p` holds `len` f32 (host memory in the emulator).
        let v = unsafe { std::slice::from_raw_parts(p as *const f32, len) };
        v.iter().map(|&x| if x.is_finite() { f32::from_bits((x.to_bits() + 0x1000) & !0x1fff) } else { x }).collect()
    };
    let (ta, tb) = if tf32 { (rounded(a, m * k), rounded(b, k * n)) } else { (Vec::new(), Vec::new()) };
    let (a, b) = if tf32 { (ta.as_ptr() as u64, tb.as_ptr() as u64) } else { (a, b) };
    // SAFETY: the pointers hold matrices of the stated shapes (host memory in the emulator).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a as *const f32,
            rsa,
            csa,
            b as *const f32,
            rsb,
            csb,
            beta,
            c as *mut f32,
            n as isize,
            1,
        )
    }
}
