//! Minimal reverse-mode autograd: a tape of backward closures.
//!
//! Each recorded op pushes one entry: the id of its output, the ids of its tracked inputs and
//! a boxed `FnOnce` that maps the output gradient to one gradient per input. The closure owns
//! the tensors it saved, so running it (which consumes it) frees them. `backward` walks the tape
//! in reverse, removes each output gradient from the map as it is used (freeing it), and
//! accumulates input gradients. Gradients of leaves (parameters, inputs that asked for one)
//! are what remain.
//!
//! A `Graph` built with `Graph::inference()` records nothing: ops compute forward values only
//! and save no tensors (no-grad / eval mode).

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{Result, bail};

use crate::params::ParamStore;
use crate::tensor::Tensor;

pub type VarId = usize;

/// A value in the graph. `id` is `None` when no gradient flows to it.
#[derive(Clone, Debug)]
pub struct Var {
    pub value: Tensor,
    pub id: Option<VarId>,
}

impl Var {
    pub fn constant(value: Tensor) -> Var {
        Var { value, id: None }
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    pub fn tracked(&self) -> bool {
        self.id.is_some()
    }
}

type BackwardFn = Box<dyn FnOnce(Tensor) -> Result<Vec<Option<Tensor>>>>;

struct Entry {
    op: &'static str,
    output: VarId,
    inputs: Vec<Option<VarId>>,
    backward: BackwardFn,
}

#[derive(Default)]
struct Inner {
    next_id: VarId,
    tape: Vec<Entry>,
    /// Leaf var of each (parameter store, slot), so that two forwards through the same
    /// parameter (the two views) accumulate into one gradient.
    param_leaves: HashMap<(u64, usize), VarId>,
}

pub struct Graph {
    inner: RefCell<Inner>,
    recording: bool,
    training: bool,
}

/// Gradients of leaves after `Graph::backward`.
pub struct Gradients {
    grads: HashMap<VarId, Tensor>,
    param_leaves: HashMap<(u64, usize), VarId>,
}

impl Gradients {
    pub fn get(&self, v: &Var) -> Option<&Tensor> {
        v.id.and_then(|id| self.grads.get(&id))
    }
    /// Gradient of the parameter in slot `slot` of `store`, if it was used.
    pub fn param(&self, store: &ParamStore, slot: usize) -> Option<&Tensor> {
        self.param_leaves.get(&(store.id(), slot)).and_then(|id| self.grads.get(id))
    }
}

impl Graph {
    /// Training graph: records backward closures, BatchNorm uses batch statistics.
    pub fn train() -> Graph {
        Graph { inner: RefCell::default(), recording: true, training: true }
    }
    /// Eval-mode graph that still records (gradients through a frozen, eval-mode network).
    pub fn eval_with_grad() -> Graph {
        Graph { inner: RefCell::default(), recording: true, training: false }
    }
    /// No-grad eval graph for inference: nothing is recorded or saved.
    pub fn inference() -> Graph {
        Graph { inner: RefCell::default(), recording: false, training: false }
    }

    pub fn is_training(&self) -> bool {
        self.training
    }
    pub fn is_recording(&self) -> bool {
        self.recording
    }

    fn fresh_id(&self) -> VarId {
        let mut inner = self.inner.borrow_mut();
        inner.next_id += 1;
        inner.next_id
    }

    /// A leaf that receives a gradient (when recording).
    pub fn leaf(&self, value: Tensor) -> Var {
        let id = if self.recording { Some(self.fresh_id()) } else { None };
        Var { value, id }
    }

    /// The leaf for slot `slot` of `store`; the same var every time within this graph.
    pub fn param(&self, store: &ParamStore, slot: usize) -> Var {
        let value = store.get(slot).clone();
        if !self.recording {
            return Var::constant(value);
        }
        let key = (store.id(), slot);
        if let Some(&id) = self.inner.borrow().param_leaves.get(&key) {
            return Var { value, id: Some(id) };
        }
        let id = self.fresh_id();
        self.inner.borrow_mut().param_leaves.insert(key, id);
        Var { value, id: Some(id) }
    }

    /// Record the output of op `op` (its name, for errors and profiles). `backward` is only kept (and only needs to be built) when some
    /// input is tracked; it returns one gradient per input, in order (`None` = no gradient).
    pub fn record<F>(&self, op: &'static str, output: Tensor, inputs: &[&Var], backward: F) -> Var
    where
        F: FnOnce(Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    {
        if !self.recording || !inputs.iter().any(|v| v.tracked()) {
            return Var::constant(output);
        }
        let id = self.fresh_id();
        let entry = Entry {
            op,
            output: id,
            inputs: inputs.iter().map(|v| v.id).collect(),
            backward: Box::new(backward),
        };
        self.inner.borrow_mut().tape.push(entry);
        Var { value: output, id: Some(id) }
    }

    /// True when an op needs to save tensors for backward.
    pub fn needs_grad(&self, inputs: &[&Var]) -> bool {
        self.recording && inputs.iter().any(|v| v.tracked())
    }

    /// Reverse pass from a scalar. Consumes the tape; the graph is spent afterwards.
    pub fn backward(&self, loss: &Var) -> Result<Gradients> {
        if loss.value.numel() != 1 {
            bail!("backward needs a scalar, found shape {:?}", loss.shape());
        }
        let seed = match loss.value.device() {
            crate::tensor::Device::Cpu => Tensor::full(loss.shape(), 1.0),
            crate::tensor::Device::Cuda(o) => crate::cuda::full(&crate::cuda::device(o)?, loss.shape(), 1.0)?,
        };
        self.backward_with(loss, seed)
    }

    /// Reverse pass seeded with `grad_output` = d L / d `output` for any output shape
    /// (vector-Jacobian product). Consumes the tape.
    pub fn backward_with(&self, output: &Var, grad_output: Tensor) -> Result<Gradients> {
        let Some(loss_id) = output.id else { bail!("backward from a value that does not depend on any tracked input") };
        if grad_output.shape() != output.shape() {
            bail!("backward seed of shape {:?} for an output of shape {:?}", grad_output.shape(), output.shape());
        }
        let (tape, param_leaves) = {
            let mut inner = self.inner.borrow_mut();
            (std::mem::take(&mut inner.tape), std::mem::take(&mut inner.param_leaves))
        };
        let mut grads: HashMap<VarId, Tensor> = HashMap::new();
        grads.insert(loss_id, grad_output);
        for entry in tape.into_iter().rev() {
            let Some(gout) = grads.remove(&entry.output) else { continue };
            let gins = crate::profile::time(entry.op, || "backward".to_string(), || (entry.backward)(gout))?;
            debug_assert_eq!(gins.len(), entry.inputs.len());
            for (input, g) in entry.inputs.into_iter().zip(gins) {
                if let (Some(id), Some(g)) = (input, g) {
                    accumulate(&mut grads, id, g)?;
                }
            }
        }
        Ok(Gradients { grads, param_leaves })
    }
}

fn accumulate(grads: &mut HashMap<VarId, Tensor>, id: VarId, g: Tensor) -> Result<()> {
    match grads.remove(&id) {
        None => {
            grads.insert(id, g);
        }
        Some(prev) if prev.is_cuda() => {
            grads.insert(id, crate::ops::elementwise::add_tensors(&prev, &g)?);
        }
        Some(prev) => {
            use rayon::prelude::*;
            let mut acc = prev.into_f32_vec();
            acc.par_chunks_mut(1 << 14).zip(g.f32s().par_chunks(1 << 14)).for_each(|(a, b)| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += *b;
                }
            });
            grads.insert(id, Tensor::from_f32(g.shape(), acc));
        }
    }
    Ok(())
}
