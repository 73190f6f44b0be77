//! The pretraining data pipeline: a set of volumes (cached CTs or generated phantoms) and a
//! loader whose worker threads fill a bounded queue ahead of the training loop.
//!
//! Batch i is a function of (seed, i) alone: its generator is seeded from both, picks the
//! volume, then samples the pairs. Worker w makes batches w, w + W, w + 2W, …; the consumer
//! reorders them, so the sequence is the same for any number of workers, and a resumed run
//! (starting at batch = its step) continues the exact sequence.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Result, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cache::load_entry;
use super::phantom;
use super::preprocess::{PreprocessConfig, PreprocessedCt, preprocess_ct};
use super::sampler::{SampleSource, SamplerConfig, sample_batch};
use crate::model::PairBatch;

/// A preprocessed CT with its body mask as booleans.
pub struct Prepared {
    pub ct: PreprocessedCt,
    pub mask: Vec<bool>,
    pub name: String,
}

impl Prepared {
    pub fn new(ct: PreprocessedCt, name: String) -> Prepared {
        let mask = ct.body_mask();
        Prepared { ct, mask, name }
    }
}

/// Where batches' volumes come from.
pub trait VolumeSet: Send + Sync {
    fn len(&self) -> usize;
    fn get(&self, i: usize) -> Result<Arc<Prepared>>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cache entries on disk, loaded on demand, the most recent few kept in memory.
pub struct CachedVolumes {
    paths: Vec<PathBuf>,
    memory: Mutex<(HashMap<usize, Arc<Prepared>>, Vec<usize>)>,
    keep: usize,
}

impl CachedVolumes {
    pub fn new(paths: Vec<PathBuf>, keep: usize) -> CachedVolumes {
        CachedVolumes { paths, memory: Mutex::new((HashMap::new(), Vec::new())), keep: keep.max(1) }
    }
}

impl VolumeSet for CachedVolumes {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn get(&self, i: usize) -> Result<Arc<Prepared>> {
        if let Some(p) = self.memory.lock().unwrap().0.get(&i) {
            return Ok(p.clone());
        }
        let e = load_entry(&self.paths[i])?;
        let p = Arc::new(Prepared::new(e.ct, e.source.display().to_string()));
        let mut m = self.memory.lock().unwrap();
        if m.0.len() >= self.keep {
            let old = m.1.remove(0);
            m.0.remove(&old);
        }
        m.0.insert(i, p.clone());
        m.1.push(i);
        Ok(p)
    }
}

/// `count` synthetic CT phantoms (seeds seed..seed+count), generated on first use.
pub struct PhantomVolumes {
    seed: u64,
    count: usize,
    made: Mutex<HashMap<usize, Arc<Prepared>>>,
}

impl PhantomVolumes {
    pub fn new(seed: u64, count: usize) -> PhantomVolumes {
        PhantomVolumes { seed, count: count.max(1), made: Mutex::new(HashMap::new()) }
    }
}

impl VolumeSet for PhantomVolumes {
    fn len(&self) -> usize {
        self.count
    }
    fn get(&self, i: usize) -> Result<Arc<Prepared>> {
        if let Some(p) = self.made.lock().unwrap().get(&i) {
            return Ok(p.clone());
        }
        let shape = phantom::phantom_shape();
        let spacing = phantom::phantom_spacing();
        let hu: Vec<f32> =
            phantom::phantom_ct(self.seed + i as u64, shape, spacing).into_iter().map(|v| v as f32).collect();
        let ct = preprocess_ct(&hu, shape, spacing, &PreprocessConfig::default())?;
        let p = Arc::new(Prepared::new(ct, format!("phantom {}", self.seed + i as u64)));
        self.made.lock().unwrap().insert(i, p.clone());
        Ok(p)
    }
}

/// The generator of batch `index` for a run seeded with `seed`.
pub fn batch_rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ index.wrapping_add(0x632B_E59B_D9B4_E019).wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// Batch `index`: a volume chosen uniformly, then the sampler.
pub fn make_batch(volumes: &dyn VolumeSet, cfg: &SamplerConfig, seed: u64, index: u64) -> Result<PairBatch> {
    let mut rng = batch_rng(seed, index);
    let v = rng.random_range(0..volumes.len());
    let p = volumes.get(v)?;
    sample_batch(&SampleSource { ct: &p.ct, mask: &p.mask }, cfg, &mut rng).map_err(|e| anyhow!("{}: {e:#}", p.name))
}

/// Worker threads producing batches start, start + 1, … into a bounded queue.
pub struct Loader {
    rx: Receiver<(u64, Result<PairBatch>)>,
    pending: BTreeMap<u64, Result<PairBatch>>,
    next: u64,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Loader {
    pub fn new(
        volumes: Arc<dyn VolumeSet>,
        cfg: SamplerConfig,
        seed: u64,
        start: u64,
        workers: usize,
        queue: usize,
    ) -> Result<Loader> {
        if volumes.is_empty() {
            return Err(anyhow!("no usable volume to sample from"));
        }
        let workers = workers.max(1);
        let (tx, rx) = sync_channel(queue.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..workers as u64)
            .map(|w| {
                let (tx, volumes, stop) = (tx.clone(), volumes.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("vox2vec-loader-{w}"))
                    .spawn(move || {
                        let mut i = start + w;
                        while !stop.load(Ordering::Relaxed) {
                            let b = make_batch(volumes.as_ref(), &cfg, seed, i);
                            if tx.send((i, b)).is_err() {
                                break;
                            }
                            i += workers as u64;
                        }
                    })
                    .expect("spawning a loader thread")
            })
            .collect();
        Ok(Loader { rx, pending: BTreeMap::new(), next: start, stop, workers: handles })
    }

    /// The next batch in sequence.
    pub fn next_batch(&mut self) -> Result<PairBatch> {
        loop {
            if let Some(b) = self.pending.remove(&self.next) {
                self.next += 1;
                return b;
            }
            let (i, b) = self.rx.recv().map_err(|_| anyhow!("the loader threads stopped"))?;
            self.pending.insert(i, b);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblock workers waiting on a full queue, then join them.
        while self.rx.try_recv().is_ok() {}
        for h in self.workers.drain(..) {
            while !h.is_finished() {
                while self.rx.try_recv().is_ok() {}
                std::thread::yield_now();
            }
            let _ = h.join();
        }
    }
}
