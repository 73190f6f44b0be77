//! One CUDA device: a context, one non-default stream that every kernel, copy and cuBLAS
//! call goes to (so stream order is the only synchronisation needed), the fatbin's module
//! loaded once with every kernel resolved into the typed registry, cuBLAS, and the caching
//! allocator. Optional per-kernel timing with CUDA events (`vox2vec-train --bench`).

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaStream, result, sys};

use super::alloc::{Pool, PoolStats, size_class};
use super::cost::{Cost, CostLog, H100, Machine};
use super::graph::{Exec, GraphStats, Node, Recording, Sgemm, StepGraph};
use super::registry::KernelId;

/// A CUfunction handle. Plain data owned by the module, which lives as long as the device.
#[derive(Clone, Copy)]
struct RawFn(sys::CUfunction);
// SAFETY: CUfunction handles may be used from any thread once the context is current there.
unsafe impl Send for RawFn {}
unsafe impl Sync for RawFn {}

/// A kernel argument, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// A device pointer (0 = null).
    Ptr(u64),
}

/// Kernel time accumulated from CUDA events.
struct KernelTimer {
    pending: Vec<(&'static str, sys::CUevent, sys::CUevent)>,
    spare: Vec<sys::CUevent>,
    totals: HashMap<&'static str, (f64, u64)>,
}

/// A real device through the CUDA driver.
struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLAS's workspace, ours so that a stream capture never needs cuBLAS to allocate.
    _blas_workspace: u64,
    /// The module's storage must outlive the module: the fatbin image, 8-byte aligned.
    _image: Vec<u64>,
}

pub struct CudaDevice {
    ordinal: usize,
    name: String,
    /// None: the CUDA emulator (feature `cuda-emulator`, `VOX2VEC_CUDA_EMULATOR=1`) or the
    /// plan device.
    driver: Option<Driver>,
    /// Plan mode (`enable_plan_mode`): allocations go through the pool's bookkeeping at
    /// invented addresses, launches and copies are only recorded; nothing executes.
    plan: bool,
    /// The next invented address of the plan device.
    plan_next: std::sync::atomic::AtomicU64,
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

thread_local! {
    /// The device ordinal whose context is current on this thread (usize::MAX: none).
    static BOUND: Cell<usize> = const { Cell::new(usize::MAX) };
}

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
        let driver = Some(Driver { ctx, stream, blas, _blas_workspace: blas_workspace, _image: image });
        let dev = CudaDevice::assemble(ordinal, name, driver, false, functions);
        BOUND.with(|b| b.set(ordinal));
        Ok(dev)
    }

    fn assemble(ordinal: usize, name: String, driver: Option<Driver>, plan: bool, functions: Vec<RawFn>) -> CudaDevice {
        let machine = if plan { *PLAN_CARD.lock().unwrap() } else { super::cost::card_of_gpu(&name) };
        CudaDevice {
            ordinal,
            name,
            driver,
            plan,
            plan_next: std::sync::atomic::AtomicU64::new(1 << 40),
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
        // No function handles: a plan launch is only recorded.
        Ok(CudaDevice::assemble(ordinal, name, None, true, Vec::new()))
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
        Ok(CudaDevice::assemble(ordinal, name, None, false, functions))
    }

    #[cfg(not(vox2vec_emulator))]
    fn open_emulator(_: usize) -> Result<CudaDevice> {
        bail!("this build has no CUDA emulator (cargo feature cuda-emulator)")
    }

    fn driver(&self) -> Option<&Driver> {
        self.driver.as_ref()
    }

    /// True for the emulator (host memory, host execution).
    pub fn is_emulator(&self) -> bool {
        self.driver.is_none() && !self.plan
    }

    /// True for the plan device (nothing executes; `enable_plan_mode`).
    pub fn is_plan(&self) -> bool {
        self.plan
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
        let Some(d) = self.driver() else { return Ok(()) };
        if BOUND.with(|b| b.get()) != self.ordinal {
            d.ctx.bind_to_thread().context("binding the CUDA context")?;
            BOUND.with(|b| b.set(self.ordinal));
        }
        Ok(())
    }

    pub(crate) fn cu_stream(&self) -> sys::CUstream {
        self.driver().map_or(std::ptr::null_mut(), |d| d.stream.cu_stream())
    }

    /// Wait until every queued kernel and copy has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stop_deferring("a synchronisation")?;
        let Some(d) = self.driver() else { return Ok(()) };
        self.bind()?;
        d.stream.synchronize().context("CUDA stream synchronisation (an earlier kernel may have failed)")
    }

    fn raw_malloc(&self, bytes: usize) -> Result<u64> {
        if let Some(limit) = self.memory_limit
            && self.pool_stats().reserved + bytes > limit
        {
            bail!("VOX2VEC_DEVICE_MEMORY_LIMIT of {:.1} MiB reached", limit as f64 / MIB);
        }
        if self.plan {
            // Invented, 256-byte aligned and never reused: nothing dereferences them.
            return Ok(self
                .plan_next
                .fetch_add(bytes.div_ceil(256) as u64 * 256, std::sync::atomic::Ordering::Relaxed));
        }
        if self.is_emulator() {
            #[cfg(vox2vec_emulator)]
            return super::emulator::malloc(bytes);
        }
        self.bind()?;
        // SAFETY: plain allocation; the pointer is owned by the caller.
        Ok(unsafe { result::malloc_sync(bytes) }?)
    }

    fn raw_free(&self, ptr: u64, bytes: usize) -> Result<()> {
        if self.plan {
            return Ok(());
        }
        if self.is_emulator() {
            #[cfg(vox2vec_emulator)]
            super::emulator::free(ptr, bytes);
            return Ok(());
        }
        let _ = bytes;
        // SAFETY: the block is no longer referenced by any buffer.
        unsafe { result::free_sync(ptr) }.context("freeing device memory")
    }

    /// Allocate `bytes` (contents undefined) from the caching pool. On the emulator the
    /// whole block is filled with 0xff bytes (NaN as f32 and as bf16), new or reused, so a
    /// kernel that reads what nothing wrote fails its test instead of reading zeros.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaBuf> {
        let b = self.alloc_undefined(bytes)?;
        if self.is_emulator() && !self.plan && !self.defer(|| Node::Memset { ptr: b.ptr, bytes: b.class, value: 0xff })
        {
            // SAFETY: emulator memory is host memory of `class` bytes.
            unsafe { std::ptr::write_bytes(b.ptr as *mut u8, 0xff, b.class) };
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
        if self.plan || self.defer(|| Node::Memset { ptr, bytes, value: 0 }) {
            return Ok(());
        }
        self.issue_memset(ptr, bytes, 0)
    }

    fn issue_memset(&self, ptr: u64, bytes: usize, value: u8) -> Result<()> {
        if self.is_emulator() {
            // SAFETY: emulator memory is host memory of at least `bytes` bytes.
            unsafe { std::ptr::write_bytes(ptr as *mut u8, value, bytes) };
            return Ok(());
        }
        self.bind()?;
        // SAFETY: ptr points to at least `bytes` bytes of a live allocation.
        unsafe { result::memset_d8_async(ptr, value, bytes, self.cu_stream()) }.context("cuMemsetD8Async")
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
        if self.plan {
            return Ok(buf);
        }
        if bytes > 0 && self.is_emulator() {
            // SAFETY: host memory of `bytes` bytes in the emulator.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, buf.ptr as *mut u8, bytes) };
        } else if bytes > 0 {
            self.bind()?;
            // SAFETY: the destination holds `bytes`; a pageable source is staged by the driver
            // before the call returns, so `data` may be dropped afterwards.
            unsafe { result::memcpy_htod_async(buf.ptr, data, self.cu_stream()) }.context("copying to the device")?;
        }
        Ok(buf)
    }

    /// Copy `n` values of type T from device memory at `ptr` to the host (waits for the stream).
    pub fn download<T: bytemuck::Pod + Default>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.stop_deferring("a read from the device")?;
        if self.plan {
            // Nothing was computed: zeros (the plan only needs the host code to go on).
            return Ok(out);
        }
        if n > 0 && self.is_emulator() {
            // SAFETY: host memory holding n values of T in the emulator.
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const T, out.as_mut_ptr(), n) };
        } else if n > 0 {
            self.bind()?;
            // SAFETY: ptr holds n values of T; the stream is synchronised before `out` is read.
            unsafe { result::memcpy_dtoh_async(&mut out, ptr, self.cu_stream()) }.context("copying from the device")?;
        }
        self.synchronize()?;
        Ok(out)
    }

    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.note_cost("memcpy_dtod", Cost::mem(2 * bytes));
        if self.plan || self.defer(|| Node::Copy { dst, src, bytes }) {
            return Ok(());
        }
        self.issue_copy(dst, src, bytes)
    }

    fn issue_copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if self.is_emulator() {
            // SAFETY: distinct live host allocations in the emulator.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are live allocations of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cu_stream()) }.context("device-to-device copy")
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
        if self.plan {
            ensure!(
                grid.0 * grid.1 * grid.2 > 0 && block.0 * block.1 * block.2 > 0,
                "{}: empty launch grid {grid:?} block {block:?}",
                k.name()
            );
            return Ok(());
        }
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
        self.bind()?;
        let mut vals: Vec<Arg> = args.to_vec();
        let mut params: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
                Arg::F64(v) => v as *mut f64 as *mut c_void,
                Arg::Ptr(v) => v as *mut u64 as *mut c_void,
            })
            .collect();
        if self.is_emulator() {
            #[cfg(vox2vec_emulator)]
            return super::emulator::launch(
                self.functions[k as usize].0 as *const c_void,
                grid,
                block,
                shared_bytes,
                &mut params,
            )
            .with_context(|| format!("emulating {}", k.name()));
        }
        let timing = self.timer_start()?;
        // SAFETY: `params` matches the kernel's parameter list (each launcher passes its
        // kernel's signature in order); the values live until the call returns.
        unsafe {
            result::launch_kernel(
                self.functions[k as usize].0,
                grid,
                block,
                shared_bytes,
                self.cu_stream(),
                &mut params,
            )
        }
        .with_context(|| format!("launching {} with grid {grid:?}, block {block:?}", k.name()))?;
        self.timer_end(k.name(), timing)
    }

    /// Let kernel `k` be launched with up to `bytes` of dynamic shared memory (needed above
    /// 48 KiB; the device's limit is 227 KiB on sm_90, less on some sm_8x). Call once, when
    /// setting a kernel up, not per launch.
    pub fn set_max_dynamic_shared(&self, k: KernelId, bytes: u32) -> Result<()> {
        if self.plan {
            return Ok(());
        }
        if self.is_emulator() {
            #[cfg(vox2vec_emulator)]
            return super::emulator::set_max_dynamic_shared(self.functions[k as usize].0 as *const c_void, bytes)
                .with_context(|| k.name().to_string());
        }
        self.bind()?;
        // SAFETY: a function of our loaded module.
        unsafe {
            result::function::set_function_attribute(
                self.functions[k as usize].0,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .with_context(|| format!("{}: allowing {bytes} bytes of dynamic shared memory", k.name()))
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
        if self.plan || self.defer(|| Node::Sgemm(call)) {
            return Ok(());
        }
        self.issue_sgemm(call)
    }

    fn issue_sgemm(&self, s: Sgemm) -> Result<()> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let family = s.family();
        let Sgemm { trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32 } = s;
        if self.is_emulator() {
            #[cfg(vox2vec_emulator)]
            super::emulator::sgemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c, tf32);
            return Ok(());
        }
        let Some(d) = self.driver() else { unreachable!("checked above") };
        self.bind()?;
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
        let timing = self.timer_start()?;
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
        .with_context(|| format!("cuBLAS SGEMM {m}x{n}x{k}"))?;
        self.timer_end(family, timing)
    }

    /// Run `f`, the host code of one step, with its device work recorded and then run as the
    /// step graph `name` (`graph.rs`): the same results as running `f` unrecorded. Without
    /// step graphs here (timing, `VOX2VEC_EXACT_ALLOC`, `VOX2VEC_CUDA_GRAPH=0`, inside another
    /// recording) `f` runs as it is; on the plan device its launches are priced as nodes.
    pub fn graphed<R>(self: &Arc<Self>, name: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.plan {
            if !self.graphs_on.load(Relaxed) || self.plan_in_graph.load(Relaxed) {
                return f();
            }
            self.note_cost("cuda_graph_launch", Cost::mem(0));
            self.plan_in_graph.store(true, Relaxed);
            let r = f();
            self.plan_in_graph.store(false, Relaxed);
            return r;
        }
        let timing = self.timer.lock().unwrap().is_some();
        if timing || self.exact_alloc || !self.graphs_on.load(Relaxed) {
            return f();
        }
        if self.graphs.lock().unwrap().get(name).is_some_and(|g| g.stats.disabled.is_some()) {
            return f();
        }
        {
            let mut rec = self.wait_for_other_recording();
            if rec.is_some() {
                drop(rec);
                return f();
            }
            // Slots no tensor holds now; only these may take this step's uploads.
            let free = self
                .graphs
                .lock()
                .unwrap()
                .get(name)
                .map_or(Vec::new(), |g| g.slots.iter().map(|s| Arc::strong_count(s) == 1).collect());
            *rec = Some(Recording::new(name, free));
        }
        // Ends the recording however `f` returns. After a panic, what was recorded is issued
        // (as it would have been, unrecorded) before other threads go on.
        struct End<'a>(&'a CudaDevice);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                let mut r = self.0.recording.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(rec) = r.as_mut().filter(|r| r.deferring()) {
                    let work = rec.take_work("a panic");
                    drop(r);
                    let _ = self.0.issue_now(&work);
                    r = self.0.recording.lock().unwrap_or_else(|e| e.into_inner());
                }
                r.take();
                drop(r);
                self.0.recording_ended.notify_all();
            }
        }
        let end = End(self);
        let r = f();
        // The recorded work, taken out while the recording stays in place (no longer deferring),
        // so that other threads wait until it is issued.
        let work = self
            .recording
            .lock()
            .unwrap()
            .as_mut()
            .expect("the recording began above")
            .take_work("the end of the step");
        // What `f` queued runs even when it failed part of the way, as unrecorded calls would have.
        let ran = self.run_recording(work);
        drop(end);
        let r = r?;
        ran?;
        Ok(r)
    }

    /// Turn step graphs on or off (on unless `VOX2VEC_CUDA_GRAPH=0`): off, `graphed` runs its
    /// step's calls one by one.
    pub fn set_step_graphs(&self, on: bool) {
        self.graphs_on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// How the step graph `name` has run so far (None before its first step).
    pub fn graph_stats(&self, name: &str) -> Option<GraphStats> {
        self.graphs.lock().unwrap().get(name).map(|g| g.stats.clone())
    }

    /// The recording lock, once no other thread records (this thread's recording, if any).
    fn wait_for_other_recording(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        let me = std::thread::current().id();
        let mut rec = self.recording.lock().unwrap();
        while rec.as_ref().is_some_and(|r| r.thread != me) {
            rec = self.recording_ended.wait(rec).unwrap();
        }
        rec
    }

    /// Keep `node` in the recording instead of issuing it; false when nothing is recorded.
    fn defer(&self, node: impl FnOnce() -> Node) -> bool {
        let mut rec = self.wait_for_other_recording();
        match rec.as_mut() {
            Some(r) if r.deferring() => {
                r.nodes.push(node());
                true
            }
            _ => false,
        }
    }

    /// During a recording: `data` staged for the next upload slot, and a view of that slot.
    fn upload_to_slot(self: &Arc<Self>, data: &[u8]) -> Result<Option<CudaBuf>> {
        let (name, i) = {
            let mut rec = self.wait_for_other_recording();
            let Some(r) = rec.as_mut().filter(|r| r.deferring()) else { return Ok(None) };
            r.next_slot += 1;
            (r.name, r.next_slot - 1)
        };
        let class = size_class(data.len());
        let mut graphs = self.graphs.lock().unwrap();
        let g = graphs.entry(name).or_default();
        let free_at_start =
            self.recording.lock().unwrap().as_ref().is_some_and(|r| r.free_slots.get(i).copied().unwrap_or(false));
        let slot = match g.reusable_slot(i, class).filter(|_| free_at_start) {
            Some(s) => s,
            None => {
                // Not from the cache: a cached block may be one that nodes recorded earlier
                // in this step still use, and they run after the staged bytes are written.
                let s = Arc::new(self.alloc_block(data.len(), false)?);
                g.set_slot(i, s.clone());
                s
            }
        };
        drop(graphs);
        let mut rec = self.recording.lock().unwrap();
        let Some(r) = rec.as_mut().filter(|r| r.deferring()) else {
            // The allocation ended the recording (memory given back to the driver): write now.
            drop(rec);
            self.write_staged(&[(slot.ptr, data.to_vec())])?;
            return Ok(Some(CudaBuf {
                ptr: slot.ptr,
                class: slot.class,
                bytes: data.len(),
                dev: self.clone(),
                owner: Some(slot),
            }));
        };
        r.staged.push((slot.ptr, data.to_vec()));
        Ok(Some(CudaBuf { ptr: slot.ptr, class: slot.class, bytes: data.len(), dev: self.clone(), owner: Some(slot) }))
    }

    /// During a recording: issue what was recorded so far, one call at a time, and let the
    /// rest of the step run unrecorded (`why` is kept in the graph's stats).
    fn stop_deferring(&self, why: &'static str) -> Result<()> {
        let work = {
            let mut rec = self.wait_for_other_recording();
            let Some(r) = rec.as_mut().filter(|r| r.deferring()) else { return Ok(()) };
            let mut work = r.take_work(why);
            // The step's allocations go on being noted for the next step's preferences.
            r.blocks = std::mem::take(&mut work.blocks);
            work
        };
        self.issue_now(&work)
    }

    /// Recorded work issued now, one call at a time: its staged uploads, then its nodes.
    fn issue_now(&self, work: &Recording) -> Result<()> {
        self.write_staged(&work.staged)?;
        work.nodes.iter().try_for_each(|n| self.issue(n))
    }

    fn write_staged(&self, staged: &[(u64, Vec<u8>)]) -> Result<()> {
        for (ptr, data) in staged.iter().filter(|(_, d)| !d.is_empty()) {
            if self.is_emulator() {
                // SAFETY: the slot is host memory of at least `data.len()` bytes in the emulator.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), *ptr as *mut u8, data.len()) };
            } else {
                self.bind()?;
                // SAFETY: the slot holds `data.len()` bytes; a pageable source is staged by the
                // driver before the call returns.
                unsafe { result::memcpy_htod_async(*ptr, data.as_slice(), self.cu_stream()) }
                    .context("copying to the device")?;
            }
        }
        Ok(())
    }

    /// Issue one recorded call now.
    fn issue(&self, n: &Node) -> Result<()> {
        match n {
            Node::Kernel { k, grid, block, shared, args } => self.issue_kernel(*k, *grid, *block, *shared, args),
            Node::Memset { ptr, bytes, value } => self.issue_memset(*ptr, *bytes, *value),
            Node::Copy { dst, src, bytes } => self.issue_copy(*dst, *src, *bytes),
            Node::Sgemm(s) => self.issue_sgemm(*s),
        }
    }

    /// The end of a recording: the staged uploads written, then the nodes run as the graph.
    fn run_recording(&self, rec: Recording) -> Result<()> {
        self.write_staged(&rec.staged)?;
        let mut graphs = self.graphs.lock().unwrap();
        let g = graphs.entry(rec.name).or_default();
        g.stats.steps += 1;
        let step = g.stats.steps;
        g.history.swap(0, 1);
        g.history[0] = rec.blocks;
        if let Some(why) = rec.unrecorded {
            g.stats.unrecorded += 1;
            g.stats.last_unrecorded = Some(why);
            // The nodes before the stop were issued then, and the rest of the step unrecorded.
            return Ok(());
        }
        g.stats.nodes = rec.nodes.len();
        let i = match g.variants.iter().position(|v| super::graph::same_nodes(&v.nodes, &rec.nodes)) {
            Some(i) => {
                g.stats.relaunched += 1;
                i
            }
            None => match self.capture_into(g, &rec.nodes) {
                Ok(i) => i,
                Err(e) => {
                    // A driver that cannot capture or instantiate this graph costs the run
                    // nothing: the calls run one by one, now and in later steps.
                    eprintln!(
                        "warning: the step graph {:?} could not be built ({e:#}); its calls are issued one by one from now on",
                        rec.name
                    );
                    g.stats.disabled = Some(format!("{e:#}"));
                    for v in g.variants.drain(..) {
                        if let Exec::Driver(exec) = v.exec {
                            // SAFETY: ours; an exec still running is freed when it completes.
                            unsafe { sys::cuGraphExecDestroy(exec) }.result().ok();
                        }
                    }
                    return rec.nodes.iter().try_for_each(|n| self.issue(n));
                }
            },
        };
        let v = &mut g.variants[i];
        v.used = step;
        match v.exec {
            // The emulator's graph is its node list, kept from the step that captured it.
            Exec::Emulated => v.nodes.iter().try_for_each(|n| self.issue(n)),
            Exec::Driver(exec) => {
                self.bind()?;
                // SAFETY: an instantiated graph of this context, launched on our stream.
                unsafe { sys::cuGraphLaunch(exec, self.cu_stream()) }
                    .result()
                    .with_context(|| format!("launching the step graph {} ({} nodes)", rec.name, v.nodes.len()))
            }
        }
    }

    /// Make a kept graph run `nodes`: the least recently used one updated in place when there
    /// are `VARIANTS` already and the driver accepts the update, a new one otherwise. Returns
    /// its index in `g.variants`.
    fn capture_into(&self, g: &mut StepGraph, nodes: &[Node]) -> Result<usize> {
        let lru = g.variants.iter().enumerate().min_by_key(|(_, v)| v.used).map(|(i, _)| i);
        let reuse = lru.filter(|_| g.variants.len() >= super::graph::VARIANTS);
        let Some(_) = self.driver() else {
            let v = super::graph::Variant { nodes: nodes.to_vec(), exec: Exec::Emulated, used: 0 };
            return Ok(match reuse {
                Some(i) => {
                    g.stats.updated += 1;
                    g.variants[i] = v;
                    i
                }
                None => {
                    g.stats.instantiated += 1;
                    g.variants.push(v);
                    g.variants.len() - 1
                }
            });
        };
        self.bind()?;
        let stream = self.cu_stream();
        // SAFETY: our stream, not capturing; relaxed mode, as nothing between begin and end
        // allocates or synchronises (the nodes are launches, memsets, copies and cuBLAS calls).
        unsafe { sys::cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .result()
            .context("beginning a stream capture")?;
        let issued = nodes.iter().try_for_each(|n| self.issue(n));
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above (also after a failed call, to leave the stream usable).
        let ended = unsafe { sys::cuStreamEndCapture(stream, &mut graph) }.result();
        if issued.is_err() && ended.is_ok() {
            // SAFETY: the graph just captured, not instantiated.
            unsafe { sys::cuGraphDestroy(graph) }.result().ok();
        }
        issued.context("issuing the step's calls into a stream capture")?;
        ended.context("ending the stream capture")?;
        let mut slot = None;
        if let Some(i) = reuse
            && let Exec::Driver(exec) = g.variants[i].exec
        {
            // SAFETY: zeroed result info is a valid out-parameter.
            let mut info: sys::CUgraphExecUpdateResultInfo = unsafe { std::mem::zeroed() };
            // SAFETY: a live exec and the graph just captured; launches in flight keep what
            // they were launched with.
            if unsafe { sys::cuGraphExecUpdate_v2(exec, graph, &mut info) }.result().is_ok() {
                g.stats.updated += 1;
                g.variants[i].nodes = nodes.to_vec();
                slot = Some(i);
            } else {
                // SAFETY: ours; an exec still running is freed when it completes.
                unsafe { sys::cuGraphExecDestroy(exec) }.result().ok();
                g.variants.swap_remove(i);
            }
        }
        let i = match slot {
            Some(i) => i,
            None => {
                let mut exec: sys::CUgraphExec = std::ptr::null_mut();
                // SAFETY: a complete captured graph.
                let inst = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result();
                if let Err(e) = inst {
                    // SAFETY: ours.
                    unsafe { sys::cuGraphDestroy(graph) }.result().ok();
                    return Err(e).context("instantiating the step graph");
                }
                g.stats.instantiated += 1;
                g.variants.push(super::graph::Variant { nodes: nodes.to_vec(), exec: Exec::Driver(exec), used: 0 });
                g.variants.len() - 1
            }
        };
        // SAFETY: the exec holds what it needs; the graph itself is no longer used.
        unsafe { sys::cuGraphDestroy(graph) }.result().context("destroying a captured graph")?;
        Ok(i)
    }

    /// Start collecting per-kernel times (CUDA events around every launch).
    pub fn enable_kernel_timing(&self) {
        if self.driver.is_none() {
            return;
        }
        let mut t = self.timer.lock().unwrap();
        if t.is_none() {
            *t = Some(KernelTimer { pending: Vec::new(), spare: Vec::new(), totals: HashMap::new() });
        }
    }

    /// Stop timing; returns (kernel, total ms, launches), slowest first.
    pub fn take_kernel_times(&self) -> Result<Vec<(&'static str, f64, u64)>> {
        self.synchronize()?;
        let Some(mut t) = self.timer.lock().unwrap().take() else { return Ok(vec![]) };
        Self::collect(&mut t)?;
        for e in t.spare.drain(..) {
            // SAFETY: the events are ours and no longer recorded anywhere.
            unsafe { result::event::destroy(e) }.ok();
        }
        let mut rows: Vec<_> = t.totals.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(rows)
    }

    fn collect(t: &mut KernelTimer) -> Result<()> {
        for (name, a, b) in t.pending.drain(..) {
            // SAFETY: both events were recorded on our stream, which has been synchronised.
            let ms = unsafe { result::event::elapsed(a, b) }.context("reading a CUDA event")?;
            let e = t.totals.entry(name).or_default();
            e.0 += ms as f64;
            e.1 += 1;
            t.spare.push(a);
            t.spare.push(b);
        }
        Ok(())
    }

    fn timer_start(&self) -> Result<Option<(sys::CUevent, sys::CUevent)>> {
        let mut guard = self.timer.lock().unwrap();
        let Some(t) = guard.as_mut() else { return Ok(None) };
        if t.pending.len() > 4096 {
            // Bound the events in flight: read (and recycle) the ones recorded so far.
            self.synchronize()?;
            Self::collect(t)?;
        }
        self.timer_start_locked(t)
    }

    fn timer_start_locked(&self, t: &mut KernelTimer) -> Result<Option<(sys::CUevent, sys::CUevent)>> {
        let mut ev = || -> Result<sys::CUevent> {
            match t.spare.pop() {
                Some(e) => Ok(e),
                None => Ok(result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?),
            }
        };
        let (a, b) = (ev()?, ev()?);
        // SAFETY: a fresh or spare event, recorded on our stream.
        unsafe { result::event::record(a, self.cu_stream()) }?;
        Ok(Some((a, b)))
    }

    fn timer_end(&self, name: &'static str, timing: Option<(sys::CUevent, sys::CUevent)>) -> Result<()> {
        if let Some((a, b)) = timing {
            // SAFETY: as above.
            unsafe { result::event::record(b, self.cu_stream()) }?;
            if let Some(t) = self.timer.lock().unwrap().as_mut() {
                t.pending.push((name, a, b));
            }
        }
        Ok(())
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
