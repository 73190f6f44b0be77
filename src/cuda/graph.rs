//! Step graphs: the device work of one training step run as one CUDA graph.
//!
//! A step issues ~1,700 calls, most of them small kernels; issued one by one, each costs the
//! host a driver call and the GPU a gap between kernels. `CudaDevice::graphed(name, f)` runs
//! the host code `f` of a step with the device *recording*: kernel launches, memsets, device
//! copies and cuBLAS calls are kept as [`Node`]s, in order, instead of issued, and every
//! upload goes to an *upload slot* (a device block the named graph keeps from step to step)
//! with its host bytes staged. When `f` returns, the staged bytes are copied into their slots
//! and the nodes run as one graph:
//! - the same nodes as a kept instantiated graph (every kernel, grid, argument and pointer
//!   equal): that graph is launched again as it is;
//! - otherwise the nodes are issued into a stream capture, and the least recently used kept
//!   graph is updated in place to the captured one (`cuGraphExecUpdate`), or one is
//!   instantiated anew (the first steps, or when the update is refused).
//!
//! For the nodes to repeat, their pointers must: during a recording, allocation `k` of the
//! step is handed the block that allocation `k` had two steps back, or else one step back,
//! when that block is free (any free block is safe to hand out, `alloc`), and [`VARIANTS`]
//! graphs are kept, so a step whose blocks alternate with its neighbours' still relaunches.
//!
//! Why this computes what issuing the calls one by one computes: every call goes to the
//! device's one stream, and a captured stream is a chain of nodes in issue order, so the
//! graph keeps the stream's order; the caching allocator's reuse of blocks is host
//! bookkeeping whose safety already rests on that order. The uploads are the one thing that
//! moves: they are written before any node of the step instead of between them. An upload
//! slot is therefore never a block that another buffer of the step uses: slots are held by
//! the graph, not by the pool, a new slot comes from the driver (a cached block may be one
//! that nodes recorded earlier in the step still use), and a slot is written again only when
//! no tensor held it as the step began.
//!
//! What cannot be deferred ends the recording for the rest of the step: a read from the
//! device (a download, a synchronisation) or cached memory given back to the driver first
//! issues the nodes recorded so far one by one, and the step goes on unrecorded (counted in
//! [`GraphStats::unrecorded`], with the reason). Recording is off with per-kernel timing
//! (events around each launch), with `VOX2VEC_EXACT_ALLOC` (its frees cannot wait for
//! deferred work), and with `VOX2VEC_CUDA_GRAPH=0`. The CUDA emulator runs a graph as its
//! list of nodes; the plan device prices each node at `Machine::graph_node_s` instead of a
//! launch.
//!
//! One thread records at a time. While it does, and until its recorded work is issued, the
//! device calls of other threads (which could otherwise be handed a block that a deferred
//! node still uses, or land inside the stream capture) wait.

use std::sync::Arc;

use super::device::{Arg, CudaBuf};
use super::registry::KernelId;

/// One deferred call of a recorded step.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Kernel {
        k: KernelId,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        args: Vec<Arg>,
    },
    /// `bytes` bytes at `ptr` set to `value`.
    Memset {
        ptr: u64,
        bytes: usize,
        value: u8,
    },
    Copy {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    Sgemm(Sgemm),
}

/// The arguments of `CudaDevice::sgemm`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sgemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub b: u64,
    pub beta: f32,
    pub c: u64,
    pub tf32: bool,
}

impl Sgemm {
    /// The cost log's family of the call.
    pub fn family(&self) -> &'static str {
        if self.tf32 { "cublas_sgemm_tf32" } else { "cublas_sgemm" }
    }
}

impl Arg {
    /// The argument as a tag and its bits (floats compared bit for bit, NaN included; a
    /// parameter struct by its bytes).
    fn same(&self, other: &Arg) -> bool {
        let bits = |a: &Arg| match *a {
            Arg::I32(v) => (0u8, v as u32 as u64),
            Arg::I64(v) => (1, v as u64),
            Arg::F32(v) => (2, v.to_bits() as u64),
            Arg::F64(v) => (3, v.to_bits()),
            Arg::Ptr(v) => (4, v),
            Arg::Params(_) => (5, 0),
        };
        match (self, other) {
            (Arg::Params(a), Arg::Params(b)) => a == b,
            _ => bits(self) == bits(other),
        }
    }
}

impl Node {
    /// Whether two nodes make the same call with the same arguments.
    fn same(&self, other: &Node) -> bool {
        match (self, other) {
            (
                Node::Kernel { k, grid, block, shared, args },
                Node::Kernel { k: k2, grid: g2, block: b2, shared: s2, args: a2 },
            ) => {
                k == k2
                    && grid == g2
                    && block == b2
                    && shared == s2
                    && args.len() == a2.len()
                    && args.iter().zip(a2).all(|(a, b)| a.same(b))
            }
            (Node::Memset { ptr, bytes, value }, Node::Memset { ptr: p2, bytes: b2, value: v2 }) => {
                (ptr, bytes, value) == (p2, b2, v2)
            }
            (Node::Copy { dst, src, bytes }, Node::Copy { dst: d2, src: s2, bytes: b2 }) => {
                (dst, src, bytes) == (d2, s2, b2)
            }
            (Node::Sgemm(a), Node::Sgemm(b)) => {
                (a.trans_a, a.trans_b, a.m, a.n, a.k, a.alpha.to_bits(), a.a, a.b, a.beta.to_bits(), a.c, a.tf32)
                    == (b.trans_a, b.trans_b, b.m, b.n, b.k, b.alpha.to_bits(), b.a, b.b, b.beta.to_bits(), b.c, b.tf32)
            }
            _ => false,
        }
    }
}

/// Whether two recordings make the same calls in the same order.
pub(crate) fn same_nodes(a: &[Node], b: &[Node]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same(y))
}

/// The step being recorded.
pub(crate) struct Recording {
    pub name: &'static str,
    /// The thread whose calls are recorded; other threads' calls wait for the recording to end.
    pub thread: std::thread::ThreadId,
    pub nodes: Vec<Node>,
    /// (slot address, host bytes) of each upload, written before the graph runs.
    pub staged: Vec<(u64, Vec<u8>)>,
    /// The next upload's slot.
    pub next_slot: usize,
    /// The blocks handed to this step's allocations, in order (pointer, size class).
    pub blocks: Vec<(u64, usize)>,
    /// Per kept upload slot: whether no tensor held it when the step began (a slot that one
    /// held then may still be read by this step's nodes, so it must not take new bytes).
    pub free_slots: Vec<bool>,
    /// Set when the rest of the step runs unrecorded, with the reason.
    pub unrecorded: Option<&'static str>,
}

impl Recording {
    pub fn new(name: &'static str, free_slots: Vec<bool>) -> Recording {
        Recording {
            name,
            thread: std::thread::current().id(),
            nodes: Vec::new(),
            staged: Vec::new(),
            next_slot: 0,
            blocks: Vec::new(),
            free_slots,
            unrecorded: None,
        }
    }

    /// The recorded work, taken out; the recording stays (no longer deferring, `why`) so that
    /// other threads keep waiting until the work is issued.
    pub fn take_work(&mut self, why: &'static str) -> Recording {
        let work = Recording {
            name: self.name,
            thread: self.thread,
            nodes: std::mem::take(&mut self.nodes),
            staged: std::mem::take(&mut self.staged),
            next_slot: self.next_slot,
            blocks: std::mem::take(&mut self.blocks),
            free_slots: Vec::new(),
            unrecorded: self.unrecorded,
        };
        self.unrecorded.get_or_insert(why);
        work
    }

    /// Whether calls are deferred now (false once the step went on unrecorded).
    pub fn deferring(&self) -> bool {
        self.unrecorded.is_none()
    }
}

/// How a named graph has run so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Steps run through `graphed`.
    pub steps: u64,
    /// Steps whose nodes equalled the previous run's: the graph launched as it was.
    pub relaunched: u64,
    /// Steps captured again and the instantiated graph updated in place.
    pub updated: u64,
    /// Steps that instantiated a new graph (the first, and any whose shape changed).
    pub instantiated: u64,
    /// Steps that went on unrecorded part of the way, and the last reason.
    pub unrecorded: u64,
    pub last_unrecorded: Option<&'static str>,
    /// Nodes in the last graph run.
    pub nodes: usize,
    /// Why the driver could not build this graph, after which its steps run unrecorded.
    pub disabled: Option<String>,
}

/// An instantiated graph of the driver (a `CUgraphExec`), or the emulator's stand-in: the
/// kept nodes themselves.
pub(crate) enum Exec {
    Driver(cudarc::driver::sys::CUgraphExec),
    Emulated,
}

/// An instantiated graph and the nodes it runs.
pub(crate) struct Variant {
    pub nodes: Vec<Node>,
    pub exec: Exec,
    /// The step that last ran it (for replacing the least recently used).
    pub used: u64,
}

/// Instantiated graphs kept per name: a step's tensors that outlive it (BatchNorm's running
/// statistics, replaced by the next step) make the blocks alternate, so a step's nodes match
/// the step two back, not the one before.
pub(crate) const VARIANTS: usize = 2;

/// What a named graph keeps between steps.
#[derive(Default)]
pub(crate) struct StepGraph {
    pub slots: Vec<Arc<CudaBuf>>,
    pub variants: Vec<Variant>,
    /// The blocks of the last two recordings' allocations, the latest first.
    pub history: [Vec<(u64, usize)>; 2],
    pub stats: GraphStats,
}

// SAFETY: the exec handle is only used under the device's graph mutex, with its context bound.
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Slot `i` for an upload of `class` bytes: the kept one when it has that size class and
    /// no tensor still holds it; None when a new block must take its place.
    pub fn reusable_slot(&self, i: usize, class: usize) -> Option<Arc<CudaBuf>> {
        let s = self.slots.get(i)?;
        (s.class() == class && Arc::strong_count(s) == 1).then(|| s.clone())
    }

    /// The blocks that allocation `k` of a step of class `class` would best get, in order of
    /// preference: that of the step two back (the one whose graph it may match), then the
    /// step before.
    pub fn preferred_blocks(&self, k: usize, class: usize) -> impl Iterator<Item = u64> + '_ {
        [&self.history[1], &self.history[0]]
            .into_iter()
            .filter_map(move |h| h.get(k).filter(|b| b.1 == class).map(|b| b.0))
    }

    pub fn set_slot(&mut self, i: usize, slot: Arc<CudaBuf>) {
        if i < self.slots.len() {
            self.slots[i] = slot;
        } else {
            debug_assert_eq!(i, self.slots.len());
            self.slots.push(slot);
        }
    }
}

/// Whether `VOX2VEC_CUDA_GRAPH` allows step graphs (on unless it is `0`).
pub(crate) fn enabled_by_env() -> bool {
    std::env::var_os("VOX2VEC_CUDA_GRAPH").is_none_or(|v| v != "0")
}
