//! Step graphs on the device's side: `graphed` records a step's calls instead of issuing
//! them, then relaunches a kept graph that makes the same calls, updates one, or captures a
//! new one (`cuda::graph` holds the recording and the graphs); a read inside the step issues
//! what was recorded and lets the rest run unrecorded.

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::sys;

use super::{CudaBuf, CudaDevice};
use crate::cuda::alloc::size_class;
use crate::cuda::cost::Cost;
use crate::cuda::graph::{Exec, GraphStats, Node, Recording, StepGraph};

impl CudaDevice {
    /// Run `f`, the host code of one step, with its device work recorded and then run as the
    /// step graph `name` (`graph.rs`): the same results as running `f` unrecorded. Without
    /// step graphs here (timing, `VOX2VEC_EXACT_ALLOC`, `VOX2VEC_CUDA_GRAPH=0`, inside another
    /// recording) `f` runs as it is; on the plan device its launches are priced as nodes.
    pub fn graphed<R>(self: &Arc<Self>, name: &'static str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.is_plan() {
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
    pub(super) fn wait_for_other_recording(&self) -> std::sync::MutexGuard<'_, Option<Recording>> {
        let me = std::thread::current().id();
        let mut rec = self.recording.lock().unwrap();
        while rec.as_ref().is_some_and(|r| r.thread != me) {
            rec = self.recording_ended.wait(rec).unwrap();
        }
        rec
    }

    /// Keep `node` in the recording instead of issuing it; false when nothing is recorded.
    pub(super) fn defer(&self, node: impl FnOnce() -> Node) -> bool {
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
    pub(super) fn upload_to_slot(self: &Arc<Self>, data: &[u8]) -> Result<Option<CudaBuf>> {
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
    pub(super) fn stop_deferring(&self, why: &'static str) -> Result<()> {
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
    pub(super) fn issue_now(&self, work: &Recording) -> Result<()> {
        self.write_staged(&work.staged)?;
        work.nodes.iter().try_for_each(|n| self.issue(n))
    }

    pub(super) fn write_staged(&self, staged: &[(u64, Vec<u8>)]) -> Result<()> {
        for (ptr, data) in staged {
            self.backend.htod(*ptr, data)?;
        }
        Ok(())
    }

    /// Issue one recorded call now.
    pub(super) fn issue(&self, n: &Node) -> Result<()> {
        match n {
            Node::Kernel { k, grid, block, shared, args } => self.issue_kernel(*k, *grid, *block, *shared, args),
            Node::Memset { ptr, bytes, value } => self.issue_memset(*ptr, *bytes, *value),
            Node::Copy { dst, src, bytes } => self.issue_copy(*dst, *src, *bytes),
            Node::Sgemm(s) => self.issue_sgemm(*s),
        }
    }

    /// The end of a recording: the staged uploads written, then the nodes run as the graph.
    pub(super) fn run_recording(&self, rec: Recording) -> Result<()> {
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
        let i = match g.variants.iter().position(|v| crate::cuda::graph::same_nodes(&v.nodes, &rec.nodes)) {
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
    pub(super) fn capture_into(&self, g: &mut StepGraph, nodes: &[Node]) -> Result<usize> {
        let lru = g.variants.iter().enumerate().min_by_key(|(_, v)| v.used).map(|(i, _)| i);
        let reuse = lru.filter(|_| g.variants.len() >= crate::cuda::graph::VARIANTS);
        let Some(_) = self.driver() else {
            let v = crate::cuda::graph::Variant { nodes: nodes.to_vec(), exec: Exec::Emulated, used: 0 };
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
                g.variants.push(crate::cuda::graph::Variant {
                    nodes: nodes.to_vec(),
                    exec: Exec::Driver(exec),
                    used: 0,
                });
                g.variants.len() - 1
            }
        };
        // SAFETY: the exec holds what it needs; the graph itself is no longer used.
        unsafe { sys::cuGraphDestroy(graph) }.result().context("destroying a captured graph")?;
        Ok(i)
    }
}
