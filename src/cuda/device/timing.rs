//! Per-kernel time from CUDA events around every launch (`vox2vec-train --bench`; the
//! driver only).

use std::collections::HashMap;

use anyhow::{Context, Result};
use cudarc::driver::{result, sys};

use super::CudaDevice;

/// Kernel time accumulated from CUDA events.
pub(super) struct KernelTimer {
    pending: Vec<(&'static str, sys::CUevent, sys::CUevent)>,
    spare: Vec<sys::CUevent>,
    totals: HashMap<&'static str, (f64, u64)>,
}

impl CudaDevice {
    /// Start collecting per-kernel times (CUDA events around every launch).
    pub fn enable_kernel_timing(&self) {
        if self.driver().is_none() {
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

    pub(super) fn collect(t: &mut KernelTimer) -> Result<()> {
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

    pub(super) fn timer_start(&self) -> Result<Option<(sys::CUevent, sys::CUevent)>> {
        let mut guard = self.timer.lock().unwrap();
        let Some(t) = guard.as_mut() else { return Ok(None) };
        if t.pending.len() > 4096 {
            // Bound the events in flight: read (and recycle) the ones recorded so far.
            self.synchronize()?;
            Self::collect(t)?;
        }
        self.timer_start_locked(t)
    }

    pub(super) fn timer_start_locked(&self, t: &mut KernelTimer) -> Result<Option<(sys::CUevent, sys::CUevent)>> {
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

    pub(super) fn timer_end(&self, name: &'static str, timing: Option<(sys::CUevent, sys::CUevent)>) -> Result<()> {
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
