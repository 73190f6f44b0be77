//! Ranks on GPUs: gradients averaged by NCCL (through cudarc, the library loaded at run time
//! like the other CUDA libraries), on a side stream ordered by events with the device's
//! stream (`dist::buckets`), so the average is queued after the backward kernels and before
//! the clip and Adam with no host synchronisation. The NCCL
//! unique id goes from rank 0 to the others over the rendezvous; the same TCP links carry the
//! few host-side values (the logged loss, the stop flag).

use std::sync::Arc;

use anyhow::{Result, anyhow, bail, ensure};
use cudarc::nccl::{result, sys};

use super::Communicator;
use super::tcp::TcpComm;
use crate::cuda::CudaDevice;

pub struct NcclComm {
    host: TcpComm,
    comm: sys::ncclComm_t,
    dev: Arc<CudaDevice>,
    /// The stream overlapped reductions run on, beside the device's compute stream.
    side: cudarc::driver::sys::CUstream,
    /// Whether reductions were queued on `side` since the compute stream last waited for it.
    side_busy: bool,
}

// SAFETY: the NCCL communicator is used by one thread at a time (`&mut self`), as NCCL requires.
unsafe impl Send for NcclComm {}

/// Why NCCL cannot be used here, if it cannot.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only looks for the shared library.
    if unsafe { sys::is_culib_present() } {
        None
    } else {
        Some("NCCL was not found: libnccl.so must be on LD_LIBRARY_PATH (the system's libnccl2 package, or the nvidia-nccl pip package's lib folder, which ships libnccl.so.2: link it as libnccl.so)".into())
    }
}

fn nccl<T>(what: &str, r: Result<T, result::NcclError>) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

impl NcclComm {
    /// Joins the ranks at `addr:port` on device `dev`: rank 0 makes the NCCL id and hands it
    /// out; every rank then initialises its communicator (which waits for all of them).
    pub fn connect(
        addr: &str,
        port: u16,
        rank: usize,
        world: usize,
        dev: Arc<CudaDevice>,
        timeout: std::time::Duration,
    ) -> Result<NcclComm> {
        ensure!(!dev.is_emulator() && !dev.is_plan(), "NCCL needs a real GPU, not the emulator or the plan device");
        if let Some(why) = unavailable_reason() {
            bail!(why);
        }
        dev.bind()?;
        let id: Vec<u8> = if rank == 0 {
            nccl("ncclGetUniqueId", result::get_uniqueid())?.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let (host, payload) = TcpComm::connect(addr, port, rank, world, &id, timeout)?;
        ensure!(payload.len() == 128, "rank {rank}: rank 0 sent an NCCL id of {} bytes", payload.len());
        let mut internal = [0 as std::ffi::c_char; 128];
        internal.iter_mut().zip(&payload).for_each(|(d, &s)| *d = s as std::ffi::c_char);
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id is rank 0's.
        nccl("ncclCommInitRank", unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world as i32, sys::ncclUniqueId { internal }, rank as i32)
        })?;
        let side = cudarc::driver::result::stream::create(cudarc::driver::result::stream::StreamKind::NonBlocking)
            .map_err(|e| anyhow!("creating the gradient reduction stream: {e:?}"))?;
        // SAFETY: initialised by the successful call above.
        Ok(NcclComm { host, comm: unsafe { comm.assume_init() }, dev, side, side_busy: false })
    }

    fn stream(&self) -> sys::cudaStream_t {
        self.dev.cu_stream() as sys::cudaStream_t
    }

    /// `to` waits (on the device) for the work queued on `from` so far.
    fn order(from: cudarc::driver::sys::CUstream, to: cudarc::driver::sys::CUstream) -> Result<()> {
        use cudarc::driver::{result, sys as drv};
        let ev = result::event::create(drv::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| anyhow!("cuEventCreate: {e:?}"))?;
        // SAFETY: both streams belong to this device's context; an event may be destroyed once
        // recorded and waited on (its resources go when it completes).
        unsafe {
            let r = result::event::record(ev, from)
                .and_then(|_| result::stream::wait_event(to, ev, drv::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT));
            let _ = result::event::destroy(ev);
            r.map_err(|e| anyhow!("ordering the reduction stream: {e:?}"))
        }
    }

    fn all_reduce_avg_on(&mut self, bufs: &[(u64, usize)], stream: sys::cudaStream_t) -> Result<()> {
        nccl("ncclGroupStart", result::group_start())?;
        for &(ptr, n) in bufs {
            // SAFETY: each buffer holds n f32 values on this communicator's device.
            let r = unsafe {
                result::all_reduce(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    sys::ncclRedOp_t::ncclAvg,
                    self.comm,
                    stream,
                )
            };
            if let Err(e) = r {
                let _ = result::group_end();
                return nccl("ncclAllReduce", Err(e));
            }
        }
        nccl("ncclGroupEnd", result::group_end()).map(|_| ())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn world(&self) -> usize {
        self.host.world()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.host.all_reduce_sum(buf)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.host.broadcast(buf, root)
    }
    /// One NCCL group of in-place ncclAvg all-reduces, queued on the device's stream.
    fn all_reduce_mean_device(&mut self, bufs: &[(u64, usize)]) -> Result<()> {
        self.all_reduce_avg_on(bufs, self.stream())
    }
    /// The same on the side stream, after the compute stream's work so far: the kernels queued
    /// next on the compute stream (the rest of the backward) run beside it.
    fn all_reduce_mean_device_overlapped(&mut self, bufs: &[(u64, usize)]) -> Result<()> {
        Self::order(self.dev.cu_stream(), self.side)?;
        self.all_reduce_avg_on(bufs, self.side as sys::cudaStream_t)?;
        self.side_busy = true;
        Ok(())
    }
    fn wait_device(&mut self) -> Result<()> {
        if std::mem::take(&mut self.side_busy) {
            Self::order(self.side, self.dev.cu_stream())?;
        }
        Ok(())
    }
    fn broadcast_device(&mut self, bufs: &[(u64, usize)], root: usize) -> Result<()> {
        nccl("ncclGroupStart", result::group_start())?;
        for &(ptr, n) in bufs {
            // SAFETY: each buffer holds n f32 values on this communicator's device.
            let r = unsafe {
                result::broadcast(
                    ptr as *const _,
                    ptr as *mut _,
                    n,
                    sys::ncclDataType_t::ncclFloat32,
                    root as i32,
                    self.comm,
                    self.stream(),
                )
            };
            if let Err(e) = r {
                let _ = result::group_end();
                return nccl("ncclBroadcast", Err(e));
            }
        }
        nccl("ncclGroupEnd", result::group_end()).map(|_| ())
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and no longer used. Aborting (not destroying) when
        // unwinding: a peer may be gone, and destroy would wait for it.
        unsafe {
            let _ =
                if std::thread::panicking() { result::comm_abort(self.comm) } else { result::comm_destroy(self.comm) };
            let _ = cudarc::driver::result::stream::synchronize(self.side);
            let _ = cudarc::driver::result::stream::destroy(self.side);
        }
    }
}
