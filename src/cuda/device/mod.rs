//! One CUDA device: a context, one non-default stream that every kernel, copy and cuBLAS
//! call goes to (so stream order is the only synchronisation needed), the fatbin's module
//! loaded once with every kernel resolved into the typed registry, cuBLAS, and the caching
//! allocator. Optional per-kernel timing with CUDA events (`vox2vec-train --bench`).

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{CudaContext, result, sys};

use super::alloc::{Pool, PoolStats, size_class};
use super::backend::{Backend, Driver, RawFn};

mod recording;
mod timing;

use super::cost::{Cost, CostLog, H100, Machine};
use super::graph::{Node, Recording, Sgemm, StepGraph};
use super::registry::KernelId;
use timing::KernelTimer;

/// A kernel argument, passed by value.
#[derive(Clone, Debug)]
pub enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A device pointer (0 = null).
    Ptr(u64),
    /// A kernel family's `#[repr(C)]` parameter struct, passed whole (`ParamBlock::arg`);
    /// boxed, so that the scalar arguments stay 16 bytes.
    Params(Box<ParamBlock>),
}

/// The bytes of a `#[repr(C)]` parameter struct of at most 128 bytes, 8-byte aligned, as a
/// kernel argument; the struct mirrors the one the kernel's `.cu` file declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamBlock {
    words: [u64; 16],
    len: usize,
}

impl ParamBlock {
    /// `params` as a kernel argument.
    pub fn arg<T: bytemuck::Pod>(params: &T) -> Arg {
        let bytes = bytemuck::bytes_of(params);
        assert!(
            bytes.len() <= 128 && std::mem::align_of::<T>() <= 8,
            "a kernel parameter struct of {} bytes",
            bytes.len()
        );
        let mut words = [0u64; 16];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Arg::Params(Box::new(ParamBlock { words, len: bytes.len() }))
    }
}

pub struct CudaDevice {
    ordinal: usize,
    name: String,
    /// The machine that runs the calls: the driver, the emulator or the plan device (plan
    /// mode, `enable_plan_mode`: allocations go through the pool's bookkeeping at invented
    /// addresses, launches and copies are only priced; nothing executes).
    backend: Backend,
    functions: Vec<RawFn>,
    pool: Mutex<Pool>,
    /// `VOX2VEC_EXACT_ALLOC=1`: every buffer its own driver allocation of exactly the bytes
    /// asked for, freed when dropped (no size classes, no cache), so that compute-sanitizer's
    /// memcheck sees an access one element past a tensor. Slow; for checking kernels only.
    exact_alloc: bool,
    /// VOX2VEC_DEVICE_MEMORY_LIMIT: the most this process may reserve from the driver.
    memory_limit: Option<usize>,
    timer: Mutex<Option<KernelTimer>>,
    /// The declared cost of every launch since `start_cost_log`, and the GPU it is priced on.
    costs: Mutex<Option<CostLog>>,
    machine: Machine,
    /// The step being recorded by `graphed`, if any (`graph.rs`).
    recording: Mutex<Option<Recording>>,
    /// Signalled when a recording ends (other threads' calls wait for it).
    recording_ended: std::sync::Condvar,
    /// The named step graphs and their upload slots.
    graphs: Mutex<HashMap<&'static str, StepGraph>>,
    /// Whether `graphed` records (`VOX2VEC_CUDA_GRAPH`, `set_step_graphs`).
    graphs_on: std::sync::atomic::AtomicBool,
    /// Plan mode inside `graphed`: launches are priced as graph nodes.
    plan_in_graph: std::sync::atomic::AtomicBool,
}

// SAFETY: the raw event handles in the timer are only touched under its mutex.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

static PLAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, `device(0)` of this process is the plan device: a performance model of a GPU
/// that runs a whole step's host code — every allocation through the real caching allocator's
/// bookkeeping, every launch recorded with its declared cost — without executing anything.
/// Must be called before any device is opened (`vox2vec-train --bench-plan`).
pub fn enable_plan_mode() -> Result<()> {
    enable_plan_mode_for(H100)
}

/// `enable_plan_mode`, pricing the plan on `card` (`cost::H100`, `cost::H200`).
pub fn enable_plan_mode_for(card: Machine) -> Result<()> {
    ensure!(DEVICES.lock().unwrap().is_empty(), "plan mode must be chosen before a CUDA device is opened");
    *PLAN_CARD.lock().unwrap() = card;
    PLAN.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// The card the plan device prices its launches on.
static PLAN_CARD: Mutex<Machine> = Mutex::new(H100);

/// Whether the plan device stands in for a GPU in this process.
pub fn planned() -> bool {
    PLAN.load(std::sync::atomic::Ordering::SeqCst)
}

/// Number of CUDA devices this process can use: 0 without the driver library, without a
/// device, or when this binary carries no kernels (built without nvcc).
pub fn device_count() -> usize {
    if emulated() || planned() {
        return 1;
    }
    if unavailable_reason().is_some() {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

fn driver_present() -> bool {
    // SAFETY: only probes for the library.
    unsafe { sys::is_culib_present() }
}

/// Why no CUDA device can be opened here, in words (None when one can).
pub fn unavailable_reason() -> Option<String> {
    if emulated() || planned() {
        return None;
    }
    if !crate::kernels::available() {
        return Some("this binary was built without CUDA kernels (nvcc was not found at build time: run scripts/install-cuda.sh and rebuild)".into());
    }
    if !driver_present() {
        return Some("the CUDA driver library (libcuda.so) was not found".into());
    }
    // SAFETY: only probes for the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Some("the cuBLAS library (libcublas.so.13 or .12) was not found: add its folder to LD_LIBRARY_PATH (pip wheels keep it in site-packages/nvidia/cu13/lib or nvidia/cublas/lib)".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no device".into()),
        Err(e) => Some(format!("the CUDA driver could not be initialised: {e}")),
    }
}

/// Whether the CUDA emulator stands in for a device in this process.
pub fn emulated() -> bool {
    #[cfg(vox2vec_emulator)]
    {
        super::emulator::requested()
    }
    #[cfg(not(vox2vec_emulator))]
    {
        false
    }
}

static DEVICES: Mutex<Vec<Option<Arc<CudaDevice>>>> = Mutex::new(Vec::new());

/// The device with this ordinal, opened once per process.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let mut devs = DEVICES.lock().unwrap();
    if let Some(Some(d)) = devs.get(ordinal) {
        return Ok(d.clone());
    }
    if let Some(why) = unavailable_reason() {
        bail!("cannot use CUDA device {ordinal}: {why}");
    }
    let mut d = if planned() {
        CudaDevice::open_plan(ordinal)?
    } else if emulated() {
        CudaDevice::open_emulator(ordinal)?
    } else {
        CudaDevice::open(ordinal)?
    };
    d.memory_limit = memory_limit_from_env()?;
    let d = Arc::new(d);
    if devs.len() <= ordinal {
        devs.resize(ordinal + 1, None);
    }
    devs[ordinal] = Some(d.clone());
    Ok(d)
}

/// `VOX2VEC_DEVICE_MEMORY_LIMIT` (bytes, or with a KiB/MiB/GiB suffix): the most device
/// memory this process may reserve, as if the GPU were that small. With `--bench-plan` it
/// answers "does this setting fit on a 24 GiB card?"; on a GPU it leaves room to others.
fn memory_limit_from_env() -> Result<Option<usize>> {
    let Some(v) = std::env::var_os("VOX2VEC_DEVICE_MEMORY_LIMIT") else { return Ok(None) };
    let s = v.to_string_lossy().trim().to_string();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s.as_str(), ""),
    };
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("VOX2VEC_DEVICE_MEMORY_LIMIT={s}: unknown unit {unit:?} (use bytes, KiB, MiB or GiB)"),
    };
    let n: f64 =
        num.trim().parse().map_err(|_| anyhow::anyhow!("VOX2VEC_DEVICE_MEMORY_LIMIT={s}: not a number of bytes"))?;
    ensure!(n.is_finite() && n > 0.0, "VOX2VEC_DEVICE_MEMORY_LIMIT={s}: must be positive");
    Ok(Some((n * scale) as usize))
}

const MIB: f64 = (1u64 << 20) as f64;

impl CudaDevice {
    /// The out-of-memory error: what was asked, what this process holds, and what to lower.
    fn out_of_memory(&self, class: usize, cause: &str) -> anyhow::Error {
        let s = self.pool_stats();
        anyhow::anyhow!(
            "CUDA out of memory on {}: an allocation of {:.1} MiB failed ({cause}) with {:.1} MiB in use and {:.1} MiB reserved by this process (peak {:.1} MiB). \
             Lower the batch (--pairs, --patch), use --precision bf16 (half the activation memory), or free the GPU of other processes; \
             `vox2vec-train --bench-plan` with the same flags shows what a step needs without a GPU",
            self.name,
            class as f64 / MIB,
            s.in_use as f64 / MIB,
            s.reserved as f64 / MIB,
            s.peak_in_use as f64 / MIB
        )
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let count = CudaContext::device_count().context("counting CUDA devices")? as usize;
        ensure!(ordinal < count, "CUDA device {ordinal} requested, the driver reports {count}");
        let ctx = CudaContext::new(ordinal).with_context(|| format!("creating a context on CUDA device {ordinal}"))?;
        ctx.bind_to_thread().context("binding the CUDA context")?;
        // One stream and raw pointers: cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        let blas = CudaBlas::new(stream.clone()).context("initialising cuBLAS")?;
        const BLAS_WORKSPACE: usize = 32 << 20;
        // SAFETY: plain allocation, kept for the device's lifetime; the handle uses it on our stream.
        let blas_workspace = unsafe { result::malloc_sync(BLAS_WORKSPACE) }.context("allocating cuBLAS's workspace")?;
        // SAFETY: a live handle and a live allocation of that size.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), blas_workspace as *mut c_void, BLAS_WORKSPACE) }
            .result()
            .context("cublasSetWorkspace")?;
        let fatbin = crate::kernels::FATBIN;
        let mut image = vec![0u64; fatbin.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..fatbin.len()].copy_from_slice(fatbin);
        // SAFETY: the image is a fatbin produced by build.rs and outlives the module.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.with_context(|| {
            format!("loading the kernels on {name} (the fatbin has sm_80/86/89/90 code and compute_90 PTX)")
        })?;
        let mut functions = Vec::with_capacity(KernelId::ALL.len());
        for &k in KernelId::ALL {
            let cname = CString::new(k.name()).unwrap();
            // SAFETY: the module is loaded and the name is NUL-terminated.
            let f = unsafe { result::module::get_function(module, cname) }
                .with_context(|| format!("kernel {} is missing from the fatbin", k.name()))?;
            functions.push(RawFn(f));
        }
        let driver = Driver { ordinal, ctx, stream, blas, _blas_workspace: blas_workspace, _image: image };
        driver.mark_bound();
        Ok(CudaDevice::assemble(ordinal, name, Backend::Driver(driver), functions))
    }

    fn assemble(ordinal: usize, name: String, backend: Backend, functions: Vec<RawFn>) -> CudaDevice {
        let plan = matches!(backend, Backend::Plan { .. });
        let machine = if plan { *PLAN_CARD.lock().unwrap() } else { super::cost::card_of_gpu(&name) };
        CudaDevice {
            ordinal,
            name,
            backend,
            functions,
            pool: Mutex::default(),
            exact_alloc: !plan && std::env::var_os("VOX2VEC_EXACT_ALLOC").is_some_and(|v| v != "0" && !v.is_empty()),
            memory_limit: None,
            timer: Mutex::new(None),
            costs: Mutex::new(None),
            machine,
            recording: Mutex::new(None),
            recording_ended: std::sync::Condvar::new(),
            graphs: Mutex::default(),
            graphs_on: std::sync::atomic::AtomicBool::new(super::graph::enabled_by_env()),
            plan_in_graph: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn open_plan(ordinal: usize) -> Result<CudaDevice> {
        ensure!(ordinal == 0, "the plan device is cuda:0, cuda:{ordinal} requested");
        let name = format!("plan mode: nothing executes; costs priced on {}", PLAN_CARD.lock().unwrap().name);
        // Null function handles: a plan launch is only priced.
        let functions = vec![RawFn(std::ptr::null_mut()); KernelId::ALL.len()];
        Ok(CudaDevice::assemble(ordinal, name, Backend::plan(), functions))
    }

    #[cfg(vox2vec_emulator)]
    fn open_emulator(ordinal: usize) -> Result<CudaDevice> {
        ensure!(ordinal == 0, "the CUDA emulator has one device (cuda:0), cuda:{ordinal} requested");
        let mut functions = Vec::with_capacity(KernelId::ALL.len());
        for &k in KernelId::ALL {
            let f = super::emulator::lookup(k.name())
                .with_context(|| format!("kernel {} is missing from the emulator build", k.name()))?;
            functions.push(RawFn(f as sys::CUfunction));
        }
        let name = "CUDA emulator (CPU fibers; not a GPU)".to_string();
        Ok(CudaDevice::assemble(ordinal, name, Backend::Emulator, functions))
    }

    #[cfg(not(vox2vec_emulator))]
    fn open_emulator(_: usize) -> Result<CudaDevice> {
        bail!("this build has no CUDA emulator (cargo feature cuda-emulator)")
    }

    fn driver(&self) -> Option<&Driver> {
        self.backend.driver()
    }

    /// True for the emulator (host memory, host execution).
    pub fn is_emulator(&self) -> bool {
        matches!(self.backend, Backend::Emulator)
    }

    /// True for the plan device (nothing executes; `enable_plan_mode`).
    pub fn is_plan(&self) -> bool {
        matches!(self.backend, Backend::Plan { .. })
    }

    /// Start recording the declared cost of every launch (replacing an earlier log).
    pub fn start_cost_log(&self) {
        *self.costs.lock().unwrap() = Some(CostLog::default());
    }

    /// Stop recording; the launches' costs since `start_cost_log`.
    pub fn take_cost_log(&self) -> Option<CostLog> {
        self.costs.lock().unwrap().take()
    }

    /// The GPU whose rates price the cost log.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    fn note_cost(&self, kernel: &str, cost: Cost) {
        self.note_launch(kernel, cost, None, None);
    }

    /// Record a launch in the cost log; `warps` (the grid's) and `code` (the kernel's SASS
    /// summary) let the estimate price its issue time.
    fn note_launch(&self, kernel: &str, cost: Cost, warps: Option<u64>, code: Option<&super::sass::Kernel>) {
        static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *TRACE.get_or_init(|| std::env::var_os("VOX2VEC_TRACE_LAUNCHES").is_some_and(|v| v != "0" && !v.is_empty()))
        {
            // One line per launch (kernel, declared bytes and FLOPs): where a family's bytes go.
            eprintln!("launch {kernel} bytes {} flops {}", cost.bytes, cost.flops);
        }
        if let Some(log) = self.costs.lock().unwrap().as_mut() {
            if self.plan_in_graph.load(std::sync::atomic::Ordering::Relaxed) {
                let node = Machine { launch_s: self.machine.graph_node_s, ..self.machine };
                log.record_launch(kernel, cost, &node, warps, code);
            } else {
                log.record_launch(kernel, cost, &self.machine, warps, code);
            }
        }
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Make this device's context current on the calling thread (once per thread).
    pub fn bind(&self) -> Result<()> {
        self.backend.bind()
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.backend.stream()
    }

    /// Wait until every queued kernel and copy has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stop_deferring("a synchronisation")?;
        self.backend.synchronize()
    }

    fn raw_malloc(&self, bytes: usize) -> Result<u64> {
        if let Some(limit) = self.memory_limit
            && self.pool_stats().reserved + bytes > limit
        {
            bail!("VOX2VEC_DEVICE_MEMORY_LIMIT of {:.1} MiB reached", limit as f64 / MIB);
        }
        self.backend.malloc(bytes)
    }

    fn raw_free(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.backend.free(ptr, bytes)
    }

    /// Allocate `bytes` (contents undefined) from the caching pool. On the emulator the
    /// whole block is filled with 0xff bytes (NaN as f32 and as bf16), new or reused, so a
    /// kernel that reads what nothing wrote fails its test instead of reading zeros.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaBuf> {
        let b = self.alloc_undefined(bytes)?;
        if self.is_emulator() && !self.defer(|| Node::Memset { ptr: b.ptr, bytes: b.class, value: 0xff }) {
            self.backend.memset(b.ptr, b.class, 0xff)?;
        }
        Ok(b)
    }

    fn alloc_undefined(self: &Arc<Self>, bytes: usize) -> Result<CudaBuf> {
        self.alloc_block(bytes, true)
    }

    /// A block for `bytes`: from the cache when `cached` allows and one is free, else from
    /// the driver (a block no buffer has used: what an upload slot needs, `graph.rs`).
    fn alloc_block(self: &Arc<Self>, bytes: usize, cached: bool) -> Result<CudaBuf> {
        let class = if self.exact_alloc { bytes.max(1) } else { size_class(bytes) };
        self.pool.lock().unwrap().note_request(class);
        if !self.exact_alloc && cached {
            // Held across the take: a block that another thread's recording freed while its
            // deferred nodes still use it must not be handed out before those nodes are issued.
            let mut rec = self.wait_for_other_recording();
            if let Some(ptr) = self.take_cached(rec.as_mut(), class) {
                return Ok(CudaBuf { ptr, class, bytes, dev: self.clone(), owner: None });
            }
        }
        let ptr = match self.raw_malloc(class) {
            Ok(p) => p,
            Err(_) => {
                // Out of memory: give the cached blocks back to the driver and try once more.
                self.stop_deferring("memory given back to the driver")?;
                self.synchronize()?;
                self.release_cached()?;
                self.raw_malloc(class).map_err(|e| self.out_of_memory(class, &format!("{e:#}")))?
            }
        };
        self.pool.lock().unwrap().note_driver_alloc(class);
        if cached
            && let Some(r) = self
                .recording
                .lock()
                .unwrap()
                .as_mut()
                .filter(|r| r.deferring() && r.thread == std::thread::current().id())
        {
            // Keeps allocation k of a step the same allocation from step to step.
            r.blocks.push((ptr, class));
        }
        Ok(CudaBuf { ptr, class, bytes, dev: self.clone(), owner: None })
    }

    /// A free cached block of `class`. During a recording, the block this allocation had in
    /// earlier steps when it is free (so that the step's nodes repeat, `graph.rs`); every
    /// block handed out is noted in the recording.
    fn take_cached(&self, rec: Option<&mut Recording>, class: usize) -> Option<u64> {
        let Some(r) = rec.filter(|r| r.deferring()) else {
            return self.pool.lock().unwrap().take(class);
        };
        let k = r.blocks.len();
        let preferred: Vec<u64> =
            self.graphs.lock().unwrap().get(r.name).map_or(Vec::new(), |g| g.preferred_blocks(k, class).collect());
        let mut pool = self.pool.lock().unwrap();
        let ptr = preferred.into_iter().find(|&p| pool.take_exact(p, class)).or_else(|| pool.take(class))?;
        r.blocks.push((ptr, class));
        Some(ptr)
    }

    /// An allocation filled with zero bytes.
    pub fn alloc_zeroed(self: &Arc<Self>, bytes: usize) -> Result<CudaBuf> {
        let b = self.alloc(bytes)?;
        self.memset_zero(b.ptr, bytes)?;
        Ok(b)
    }

    /// Return every cached (free) block to the driver.
    pub fn release_cached(&self) -> Result<()> {
        self.stop_deferring("memory given back to the driver")?;
        let blocks = self.pool.lock().unwrap().drain();
        for (p, class) in blocks {
            self.raw_free(p, class)?;
        }
        Ok(())
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().unwrap().stats
    }

    pub fn reset_peak_memory(&self) {
        self.pool.lock().unwrap().reset_peak();
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.note_cost("memset", Cost::mem(bytes));
        if self.defer(|| Node::Memset { ptr, bytes, value: 0 }) {
            return Ok(());
        }
        self.issue_memset(ptr, bytes, 0)
    }

    fn issue_memset(&self, ptr: u64, bytes: usize, value: u8) -> Result<()> {
        self.backend.memset(ptr, bytes, value)
    }

    /// Copy host values into a new device buffer.
    pub fn upload<T: bytemuck::Pod>(self: &Arc<Self>, data: &[T]) -> Result<CudaBuf> {
        let bytes = std::mem::size_of_val(data);
        if let Some(buf) = self.upload_to_slot(bytemuck::cast_slice(data))? {
            self.note_cost("memcpy_htod", Cost::pcie(bytes));
            return Ok(buf);
        }
        let buf = self.alloc(bytes)?;
        self.note_cost("memcpy_htod", Cost::pcie(bytes));
        self.backend.htod(buf.ptr, bytemuck::cast_slice(data))?;
        Ok(buf)
    }

    /// Copy `n` values of type T from device memory at `ptr` to the host (waits for the stream).
    pub fn download<T: bytemuck::Pod + Default>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.stop_deferring("a read from the device")?;
        // The plan device leaves zeros: nothing was computed, the host code only needs to go on.
        self.backend.dtoh(ptr, &mut out)?;
        self.synchronize()?;
        Ok(out)
    }

    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.note_cost("memcpy_dtod", Cost::mem(2 * bytes));
        if self.defer(|| Node::Copy { dst, src, bytes }) {
            return Ok(());
        }
        self.issue_copy(dst, src, bytes)
    }

    fn issue_copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.backend.dtod(dst, src, bytes)
    }

    /// Launch kernel `k` on the device's stream. `cost` is the work the kernel must do (its
    /// FLOPs and compulsory bytes, from the shapes): recorded in the cost log, the only thing
    /// a launch does on the plan device.
    pub fn launch(
        &self,
        k: KernelId,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[Arg],
        cost: Cost,
    ) -> Result<()> {
        let warps = (grid.0 as u64 * grid.1 as u64 * grid.2 as u64)
            * (block.0 as u64 * block.1 as u64 * block.2 as u64).div_ceil(32);
        self.note_launch(k.name(), cost, Some(warps), k.sass());
        if self.defer(|| Node::Kernel { k, grid, block, shared: shared_bytes, args: args.to_vec() }) {
            return Ok(());
        }
        self.issue_kernel(k, grid, block, shared_bytes, args)
    }

    fn issue_kernel(
        &self,
        k: KernelId,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[Arg],
    ) -> Result<()> {
        let mut vals: Vec<Arg> = args.to_vec();
        let mut params: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
                Arg::F64(v) => v as *mut f64 as *mut c_void,
                Arg::Ptr(v) => v as *mut u64 as *mut c_void,
                Arg::Params(p) => p.words.as_mut_ptr() as *mut c_void,
            })
            .collect();
        // Bound before the timer's events are recorded on the stream.
        self.bind()?;
        let timing = self.timer_start()?;
        self.backend.launch(self.functions[k as usize], k.name(), grid, block, shared_bytes, &mut params)?;
        self.timer_end(k.name(), timing)
    }

    /// Let kernel `k` be launched with up to `bytes` of dynamic shared memory (needed above
    /// 48 KiB; the device's limit is 227 KiB on sm_90, less on some sm_8x). Call once, when
    /// setting a kernel up, not per launch.
    pub fn set_max_dynamic_shared(&self, k: KernelId, bytes: u32) -> Result<()> {
        self.backend.set_max_dynamic_shared(self.functions[k as usize], k.name(), bytes)
    }

    /// Launch a grid-stride kernel over `n` elements (256 threads per block).
    pub fn launch_1d(&self, k: KernelId, n: usize, args: &[Arg], cost: Cost) -> Result<()> {
        let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
        self.launch(k, (blocks, 1, 1), (256, 1, 1), 0, args, cost)
    }

    /// Row-major SGEMM: C[m, n] = alpha op(A) op(B) + beta C, where A is stored [m, k]
    /// ([k, m] when `trans_a`) and B is stored [k, n] ([n, k] when `trans_b`), all
    /// contiguous. cuBLAS is column-major, so this computes Cᵀ = op(B)ᵀ op(A)ᵀ.
    #[allow(clippy::too_many_arguments)]
    ///
    /// `tf32`: let cuBLAS round the inputs to TF32 and use tensor cores (fp32 accumulation);
    /// otherwise exact fp32 on CUDA cores.
    pub fn sgemm(
        &self,
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
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let c_bytes = if beta == 0.0 { m * n * 4 } else { 2 * m * n * 4 };
        let (flops, bytes) = (2.0 * (m * n * k) as f64, 4 * (m * k + k * n) + c_bytes);
        let call = Sgemm { trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32 };
        let cost = if tf32 { Cost::tensor_tf32(flops, bytes) } else { Cost::fp32(flops, bytes) };
        self.note_cost(call.family(), cost);
        if self.defer(|| Node::Sgemm(call)) {
            return Ok(());
        }
        self.issue_sgemm(call)
    }

    fn issue_sgemm(&self, s: Sgemm) -> Result<()> {
        self.bind()?;
        let timing = self.timer_start()?;
        self.backend.sgemm(s)?;
        self.timer_end(s.family(), timing)
    }
}

/// A block of device memory from the caching pool; returned to the pool on drop.
pub struct CudaBuf {
    ptr: u64,
    class: usize,
    bytes: usize,
    dev: Arc<CudaDevice>,
    /// A step graph's upload slot that this buffer is a view of (the slot holds the block).
    owner: Option<Arc<CudaBuf>>,
}

impl CudaBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Bytes requested (the block may be larger).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The block's size class.
    pub(crate) fn class(&self) -> usize {
        self.class
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            // A view of an upload slot: the slot gives the block back.
            return;
        }
        if self.dev.exact_alloc {
            if let Ok(mut p) = self.dev.pool.lock() {
                p.note_driver_free(self.class);
            }
            // The driver's free waits for queued work that may still read the block.
            let _ = self.dev.raw_free(self.ptr, self.class);
        } else if let Ok(mut p) = self.dev.pool.lock() {
            p.give_back(self.ptr, self.class);
        }
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} bytes on cuda:{})", self.bytes, self.dev.ordinal)
    }
}

/// An NVTX range for nsys (None when the NVTX library is not installed).
pub fn nvtx_range(name: &str) -> Option<cudarc::nvtx::Range> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only probes for the library.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() });
    present.then(|| cudarc::nvtx::scoped_range(name))
}
