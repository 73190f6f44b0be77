//! Gradients reduced in buckets while the backward pass is still running (PyTorch DDP's
//! bucketing): parameters' gradients join the current bucket in the order they become final
//! (`Graph::backward_hooked`), and a bucket goes to the communicator as soon as it holds
//! `BUCKET_BYTES` (the first one `FIRST_BUCKET_BYTES`, so that reduction starts early). The
//! order in which gradients become final is the graph's, the same on every rank, so every
//! rank forms the same buckets.
//!
//! On the host a communication thread reduces the buckets (rank-order sums, the same bits as
//! one all-reduce of everything) while this thread goes on with the backward. On a device the
//! buckets go to the communicator's overlapped device all-reduce (NCCL on its own stream,
//! after an event on the compute stream), and the compute stream waits for them once, before
//! the clip. `VOX2VEC_PROFILE=1` shows the time spent reducing and the time the step waited
//! for reductions after its backward (what the overlap did not hide).

use std::sync::mpsc;

use anyhow::{Context, Result, anyhow};

use super::Communicator;
use crate::autograd::{Graph, Var};
use crate::params::ParamStore;
use crate::tensor::Tensor;

/// DDP's defaults: a 1 MiB first bucket, 25 MiB after.
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;
pub const BUCKET_BYTES: usize = 25 << 20;

/// Sizes at which buckets close, in bytes of f32 gradients.
#[derive(Clone, Copy, Debug)]
pub struct BucketSizes {
    pub first: usize,
    pub rest: usize,
}

impl BucketSizes {
    /// DDP's, or `VOX2VEC_BUCKET_MB` megabytes (> 0) for all but the first (at most 1 MiB).
    pub fn from_env() -> BucketSizes {
        let rest = std::env::var("VOX2VEC_BUCKET_MB")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .map(|mb| (mb * (1 << 20) as f64) as usize)
            .unwrap_or(BUCKET_BYTES);
        BucketSizes { first: FIRST_BUCKET_BYTES.min(rest), rest }
    }
}

/// The backward of `loss`, with the gradients of `store`'s parameters averaged over the ranks
/// of `comm` (bucket by bucket, overlapped with the backward): one per slot, None where a
/// parameter got no gradient.
pub fn backward_averaged(
    g: &Graph,
    loss: &Var,
    store: &ParamStore,
    comm: &mut dyn Communicator,
) -> Result<Vec<Option<Tensor>>> {
    backward_averaged_with(g, loss, store, comm, BucketSizes::from_env())
}

/// `backward_averaged` with explicit bucket sizes.
pub fn backward_averaged_with(
    g: &Graph,
    loss: &Var,
    store: &ParamStore,
    comm: &mut dyn Communicator,
    sizes: BucketSizes,
) -> Result<Vec<Option<Tensor>>> {
    if comm.name() == "single" {
        let grads = crate::profile::time("step: backward", String::new, || g.backward(loss))?;
        return Ok((0..store.len()).map(|s| grads.param(store, s).cloned()).collect());
    }
    if loss.value.is_cuda() {
        return backward_device(g, loss, store, comm, sizes);
    }
    backward_host(g, loss, store, comm, sizes)
}

/// Buckets as they fill: which slots, and the sizes at which they close.
struct Filler {
    store_id: u64,
    cap: usize,
    next_cap: usize,
    current: Vec<(usize, Tensor)>,
    bytes: usize,
}

impl Filler {
    fn new(store: &ParamStore, sizes: BucketSizes) -> Filler {
        Filler {
            store_id: store.id(),
            cap: sizes.first.max(1),
            next_cap: sizes.rest.max(1),
            current: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a final gradient; returns the bucket when it is full.
    fn add(&mut self, key: (u64, usize), g: &Tensor) -> Option<Vec<(usize, Tensor)>> {
        if key.0 != self.store_id {
            return None;
        }
        self.current.push((key.1, g.clone()));
        self.bytes += 4 * g.numel();
        (self.bytes >= self.cap).then(|| self.take())
    }

    fn take(&mut self) -> Vec<(usize, Tensor)> {
        self.cap = self.next_cap;
        self.bytes = 0;
        std::mem::take(&mut self.current)
    }
}

fn backward_host(
    g: &Graph,
    loss: &Var,
    store: &ParamStore,
    comm: &mut dyn Communicator,
    sizes: BucketSizes,
) -> Result<Vec<Option<Tensor>>> {
    let world = comm.world() as f32;
    let mut per_slot: Vec<Option<Tensor>> = vec![None; store.len()];
    std::thread::scope(|s| -> Result<()> {
        let (jobs, queue) = mpsc::channel::<Vec<f32>>();
        let (done, results) = mpsc::channel::<Result<Vec<f32>>>();
        let worker = s.spawn(move || {
            for mut buf in queue {
                let r = crate::profile::time("step: gradient all-reduce (communication thread)", String::new, || {
                    comm.all_reduce_sum(&mut buf)
                })
                .map(|_| buf);
                let failed = r.is_err();
                if done.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut filler = Filler::new(store, sizes);
        let mut buckets: Vec<Vec<(usize, Vec<usize>)>> = Vec::new();
        let outcome = {
            let mut submit = |bucket: Vec<(usize, Tensor)>| -> Result<()> {
                let mut flat = Vec::with_capacity(bucket.iter().map(|(_, t)| t.numel()).sum());
                for (_, t) in &bucket {
                    flat.extend_from_slice(t.f32s());
                }
                buckets.push(bucket.iter().map(|(slot, t)| (*slot, t.shape().to_vec())).collect());
                jobs.send(flat).map_err(|_| anyhow!("the gradient communication thread stopped"))
            };
            let grads = crate::profile::time("step: backward", String::new, || {
                g.backward_hooked(loss, &mut |key, t| match filler.add(key, t) {
                    Some(bucket) => submit(bucket),
                    None => Ok(()),
                })
            });
            grads.and_then(|_| {
                let rest = filler.take();
                if rest.is_empty() { Ok(()) } else { submit(rest) }
            })
        };
        drop(jobs);
        // The reductions still running once the backward is done: what the overlap did not hide.
        let collected =
            crate::profile::time("step: waiting for all-reduce after backward", String::new, || -> Result<()> {
                outcome?;
                for (i, slots) in buckets.iter().enumerate() {
                    let buf = results
                        .recv()
                        .map_err(|_| anyhow!("the gradient communication thread stopped"))?
                        .with_context(|| format!("all-reduce of gradient bucket {}", i + 1))?;
                    let mut at = 0;
                    for (slot, shape) in slots {
                        let n = crate::tensor::numel(shape);
                        per_slot[*slot] =
                            Some(Tensor::from_f32(shape, buf[at..at + n].iter().map(|v| v / world).collect()));
                        at += n;
                    }
                }
                Ok(())
            });
        // On failure the worker may still hold a bucket: its result is dropped with `results`.
        drop(results);
        worker.join().map_err(|_| anyhow!("the gradient communication thread panicked"))?;
        collected
    })?;
    Ok(per_slot)
}

fn backward_device(
    g: &Graph,
    loss: &Var,
    store: &ParamStore,
    comm: &mut dyn Communicator,
    sizes: BucketSizes,
) -> Result<Vec<Option<Tensor>>> {
    let mut filler = Filler::new(store, sizes);
    let reduce = |bucket: Vec<(usize, Tensor)>, comm: &mut dyn Communicator| -> Result<()> {
        let mut bufs = Vec::with_capacity(bucket.len());
        for (_, t) in &bucket {
            anyhow::ensure!(
                t.is_cuda() && t.dtype() == crate::tensor::DType::F32,
                "data-parallel step: a {:?} gradient on {:?} (all must be f32 on the device)",
                t.dtype(),
                t.device()
            );
            bufs.push((t.ptr(), t.numel()));
        }
        comm.all_reduce_mean_device_overlapped(&bufs)
    };
    let grads = {
        let comm_ref = &mut *comm;
        g.backward_hooked(loss, &mut |key, t| match filler.add(key, t) {
            Some(bucket) => reduce(bucket, comm_ref),
            None => Ok(()),
        })?
    };
    let rest = filler.take();
    if !rest.is_empty() {
        reduce(rest, comm)?;
    }
    comm.wait_device()?;
    Ok((0..store.len()).map(|s| grads.param(store, s).cloned()).collect())
}
