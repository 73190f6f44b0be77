//! The parameter store: every parameter and buffer of a model in one flat list of named
//! slots. Modules hold slot indices; the autograd graph makes one leaf per slot; the optimiser
//! and checkpoints walk the list.
//!
//! Names are the PyTorch state_dict keys (prefixed `backbone.` / `head.`). Each slot records
//! its internal layout so that conversion to PyTorch's layout happens only at the
//! checkpoint boundary (conv weights: internal [Co, kx, ky, kz, Ci], PyTorch [Co, Ci, kx, ky, kz]).

use std::collections::HashMap;

use anyhow::{Result, bail, ensure};
use rand::Rng;

use crate::tensor::{Tensor, ncxyz_to_nxyzc, numel, nxyzc_to_ncxyz};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Trained by the optimiser.
    Trainable,
    /// BatchNorm running mean / variance: state, not trained.
    RunningStat,
    /// BatchNorm num_batches_tracked (int64 scalar).
    Counter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Plain,
    /// A convolution weight stored channels-last: [Co, k, k, k, Ci].
    ConvChannelsLast,
}

pub struct Slot {
    pub name: String,
    pub value: Tensor,
    pub kind: SlotKind,
    pub layout: Layout,
}

pub struct ParamStore {
    /// Unique per store, so that a graph can hold parameters of several stores (a backbone's
    /// and a head's) without their slot numbers colliding.
    id: u64,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
}

impl Default for ParamStore {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ParamStore {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            slots: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl ParamStore {
    pub fn new() -> ParamStore {
        ParamStore::default()
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn add(&mut self, name: &str, value: Tensor, kind: SlotKind, layout: Layout) -> usize {
        assert!(!self.index.contains_key(name), "parameter {name} registered twice");
        let slot = self.slots.len();
        self.slots.push(Slot { name: name.to_string(), value, kind, layout });
        self.index.insert(name.to_string(), slot);
        slot
    }

    pub fn get(&self, slot: usize) -> &Tensor {
        &self.slots[slot].value
    }

    pub fn set(&mut self, slot: usize, value: Tensor) {
        let s = &mut self.slots[slot];
        assert_eq!(s.value.shape(), value.shape(), "shape change of {}", s.name);
        s.value = value;
    }

    /// Modify an f32 slot in place (no copy when nothing else holds the tensor).
    pub fn update_f32(&mut self, slot: usize, f: impl FnOnce(&mut [f32])) {
        let s = &mut self.slots[slot];
        let shape = s.value.shape().to_vec();
        let mut v = std::mem::replace(&mut s.value, Tensor::zeros(&[0])).into_f32_vec();
        f(&mut v);
        s.value = Tensor::from_f32(&shape, v);
    }

    /// Move every f32 slot (parameters and running statistics) to `device`; the int64
    /// counters stay on the host, where the forward pass increments them.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        for s in &mut self.slots {
            if s.kind != SlotKind::Counter {
                s.value = s.value.to_device(device)?;
            }
        }
        Ok(())
    }

    /// Where the parameters live (the device of the first f32 slot; the host if none).
    pub fn device(&self) -> crate::tensor::Device {
        self.slots.iter().find(|s| s.kind != SlotKind::Counter).map_or(crate::tensor::Device::Cpu, |s| s.value.device())
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Slots the optimiser updates, in registration order.
    pub fn trainable(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&i| self.slots[i].kind == SlotKind::Trainable)
    }

    /// Number of trainable values whose name starts with `prefix`.
    pub fn count_trainable(&self, prefix: &str) -> usize {
        self.slots
            .iter()
            .filter(|s| s.kind == SlotKind::Trainable && s.name.starts_with(prefix))
            .map(|s| s.value.numel())
            .sum()
    }

    /// The slot's shape as PyTorch sees it.
    pub fn pytorch_shape(&self, slot: usize) -> Vec<usize> {
        let s = &self.slots[slot];
        let sh = s.value.shape();
        match s.layout {
            Layout::Plain => sh.to_vec(),
            Layout::ConvChannelsLast => vec![sh[0], sh[4], sh[1], sh[2], sh[3]],
        }
    }

    /// f32 values of a tensor in the slot's internal layout, converted to PyTorch layout.
    pub fn to_pytorch_f32(&self, slot: usize, values: &[f32]) -> Vec<f32> {
        let s = &self.slots[slot];
        match s.layout {
            Layout::Plain => values.to_vec(),
            Layout::ConvChannelsLast => {
                let sh = s.value.shape();
                nxyzc_to_ncxyz(values, sh[0], sh[4], sh[1] * sh[2] * sh[3])
            }
        }
    }

    /// Internal-layout values from PyTorch-layout values.
    pub fn from_pytorch_f32(&self, slot: usize, values: &[f32]) -> Vec<f32> {
        let s = &self.slots[slot];
        match s.layout {
            Layout::Plain => values.to_vec(),
            Layout::ConvChannelsLast => {
                let sh = s.value.shape();
                ncxyz_to_nxyzc(values, sh[0], sh[4], sh[1] * sh[2] * sh[3])
            }
        }
    }

    /// Replace a slot's value from PyTorch-layout data, checking the shape.
    pub fn load_pytorch(
        &mut self,
        slot: usize,
        shape: &[usize],
        f32s: Option<&[f32]>,
        i64s: Option<&[i64]>,
    ) -> Result<()> {
        let expect = self.pytorch_shape(slot);
        let name = &self.slots[slot].name;
        ensure!(
            shape == expect.as_slice() || (numel(shape) == 1 && numel(&expect) == 1),
            "{name}: shape {shape:?}, this model expects {expect:?}"
        );
        let kind = self.slots[slot].kind;
        let internal = self.slots[slot].value.shape().to_vec();
        let value = match (kind, f32s, i64s) {
            (SlotKind::Counter, _, Some(v)) => Tensor::from_i64(&internal, v.to_vec()),
            (SlotKind::Counter, Some(v), _) => Tensor::from_i64(&internal, v.iter().map(|&x| x as i64).collect()),
            (_, Some(v), _) => Tensor::from_f32(&internal, self.from_pytorch_f32(slot, v)),
            _ => bail!("{name}: expected floating-point data"),
        };
        self.slots[slot].value = value;
        Ok(())
    }
}

/// PyTorch's default init for conv / linear: weight ~ U(±1/√fan_in) (Kaiming-uniform, a = √5),
/// bias ~ U(±1/√fan_in).
pub fn uniform_fan_in(rng: &mut impl Rng, n: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
}
