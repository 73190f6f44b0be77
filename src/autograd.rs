//! Minimal reverse-mode autograd: a tape of backward closures.
//!
//! Each recorded op pushes one entry: the id of its output, the ids of its tracked inputs and
//! a boxed `FnOnce` that maps the output gradient to one gradient per input. The closure owns
//! the tensors it saved, so running it (which consumes it) frees them. `backward` walks the tape
//! in reverse, removes each output gradient from the map as it is used (freeing it), and
//! accumulates input gradients. Gradients of leaves (parameters, inputs that asked for one)
//! are what remain.
//!
//! An op may instead record an *accumulating* backward (`Graph::record_accumulating`): it is
//! handed the gradient its inputs have accumulated so far and may fold it into the gradient it
//! writes (a device kernel's epilogue adds it), which saves the separate add pass over a
//! tensor that two consumers feed. What it does not take is accumulated as usual.
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

/// A backward closure: the output gradient to one gradient per input. The accumulating kind
/// also gets, per input, the gradient accumulated so far (`Some` where there is one, for the
/// first occurrence of each input); it `take`s those it includes in its results.
/// The gradients of an op's inputs (None for an input that gets none).
type InputGrads = Result<Vec<Option<Tensor>>>;

enum BackwardFn {
    Plain(Box<dyn FnOnce(Tensor) -> InputGrads>),
    Accumulating(Box<dyn FnOnce(Tensor, &mut [Option<Tensor>]) -> InputGrads>),
}

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
    /// With VOX2VEC_CHECK_FINITE: the first recorded op whose output was not finite.
    first_nonfinite: Option<String>,
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
        self.push(op, output, inputs, BackwardFn::Plain(Box::new(backward)))
    }

    /// `record` with an accumulating backward (see the module comment): `backward(dy, acc)`
    /// gets in `acc[i]` the gradient input i has accumulated so far, if any, and must return
    /// for input i a gradient that includes `acc[i]` when it took it (`acc[i].take()`).
    pub fn record_accumulating<F>(&self, op: &'static str, output: Tensor, inputs: &[&Var], backward: F) -> Var
    where
        F: FnOnce(Tensor, &mut [Option<Tensor>]) -> Result<Vec<Option<Tensor>>> + 'static,
    {
        if !self.recording || !inputs.iter().any(|v| v.tracked()) {
            return Var::constant(output);
        }
        self.push(op, output, inputs, BackwardFn::Accumulating(Box::new(backward)))
    }

    fn push(&self, op: &'static str, output: Tensor, inputs: &[&Var], backward: BackwardFn) -> Var {
        if check_finite_enabled()
            && self.inner.borrow().first_nonfinite.is_none()
            && let Some(e) = nonfinite(op, "forward output", &output)
        {
            self.inner.borrow_mut().first_nonfinite = Some(e);
        }
        let id = self.fresh_id();
        let entry = Entry { op, output: id, inputs: inputs.iter().map(|v| v.id).collect(), backward };
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

    /// `backward`, calling `ready` as soon as each parameter's gradient is final (every op
    /// that uses the parameter has added its part; both views' uses, for instance), in the
    /// order they become final: what a data-parallel step needs to start reducing gradients
    /// while the rest of the backward runs. Parameters that get no gradient are never ready.
    pub fn backward_hooked(&self, loss: &Var, ready: &mut ParamReady<'_>) -> Result<Gradients> {
        if loss.value.numel() != 1 {
            bail!("backward needs a scalar, found shape {:?}", loss.shape());
        }
        let seed = match loss.value.device() {
            crate::tensor::Device::Cpu => Tensor::full(loss.shape(), 1.0),
            crate::tensor::Device::Cuda(o) => crate::cuda::full(&crate::cuda::device(o)?, loss.shape(), 1.0)?,
        };
        self.reverse(loss, seed, Some(ready))
    }

    /// Reverse pass seeded with `grad_output` = d L / d `output` for any output shape
    /// (vector-Jacobian product). Consumes the tape.
    pub fn backward_with(&self, output: &Var, grad_output: Tensor) -> Result<Gradients> {
        self.reverse(output, grad_output, None)
    }

    fn reverse(&self, output: &Var, grad_output: Tensor, mut ready: Option<&mut ParamReady<'_>>) -> Result<Gradients> {
        let Some(loss_id) = output.id else { bail!("backward from a value that does not depend on any tracked input") };
        if grad_output.shape() != output.shape() {
            bail!("backward seed of shape {:?} for an output of shape {:?}", grad_output.shape(), output.shape());
        }
        if let Some(e) = self.inner.borrow_mut().first_nonfinite.take() {
            bail!("{e}");
        }
        let (tape, param_leaves) = {
            let mut inner = self.inner.borrow_mut();
            (std::mem::take(&mut inner.tape), std::mem::take(&mut inner.param_leaves))
        };
        // Where each parameter's gradient becomes final: after the backward of its first
        // consumer in tape order (the last one the reverse pass reaches).
        let mut final_after: HashMap<usize, Vec<(VarId, (u64, usize))>> = HashMap::new();
        if ready.is_some() {
            let key_of: HashMap<VarId, (u64, usize)> = param_leaves.iter().map(|(k, id)| (*id, *k)).collect();
            let mut seen: std::collections::HashSet<VarId> = std::collections::HashSet::new();
            for (i, entry) in tape.iter().enumerate() {
                for id in entry.inputs.iter().flatten() {
                    if let Some(key) = key_of.get(id).filter(|_| seen.insert(*id)) {
                        final_after.entry(i).or_default().push((*id, *key));
                    }
                }
            }
        }
        let mut grads: HashMap<VarId, Tensor> = HashMap::new();
        grads.insert(loss_id, grad_output);
        for (index, entry) in tape.into_iter().enumerate().rev() {
            let done = final_after.remove(&index).unwrap_or_default();
            self.reverse_entry(entry, &mut grads)?;
            if let Some(ready) = ready.as_mut() {
                for (id, key) in done {
                    if let Some(g) = grads.get(&id) {
                        ready(key, g)?;
                    }
                }
            }
        }
        Ok(Gradients { grads, param_leaves })
    }

    /// One tape entry's backward: its output gradient to its inputs' (accumulated).
    fn reverse_entry(&self, entry: Entry, grads: &mut HashMap<VarId, Tensor>) -> Result<()> {
        let Some(gout) = grads.remove(&entry.output) else { return Ok(()) };
        let (gins, mut leftover) = match entry.backward {
            BackwardFn::Plain(f) => {
                (crate::profile::time(entry.op, || "backward".to_string(), || f(gout))?, Vec::new())
            }
            BackwardFn::Accumulating(f) => {
                // Each input's gradient so far, at its first position only.
                let mut acc: Vec<Option<Tensor>> =
                    entry.inputs.iter().map(|id| id.and_then(|id| grads.remove(&id))).collect();
                let gins = crate::profile::time(entry.op, || "backward".to_string(), || f(gout, &mut acc))?;
                (gins, acc)
            }
        };
        debug_assert_eq!(gins.len(), entry.inputs.len());
        if check_finite_enabled() {
            for (i, g) in gins.iter().enumerate() {
                if let Some(e) =
                    g.as_ref().and_then(|g| nonfinite(entry.op, &format!("backward, gradient of input {i}"), g))
                {
                    bail!("{e}");
                }
            }
        }
        for (i, (input, g)) in entry.inputs.iter().zip(gins).enumerate() {
            let Some(id) = *input else { continue };
            // What the op did not fold in goes back first, so sums keep their order.
            if let Some(prev) = leftover.get_mut(i).and_then(Option::take) {
                accumulate(grads, id, prev)?;
            }
            if let Some(g) = g {
                accumulate(grads, id, g)?;
            }
        }
        Ok(())
    }
}

/// `Graph::backward_hooked`'s callback: (parameter store id, slot) and the final gradient.
pub type ParamReady<'a> = dyn FnMut((u64, usize), &Tensor) -> Result<()> + 'a;

/// VOX2VEC_CHECK_FINITE=1: every recorded op's output and every gradient a backward returns
/// is read back and checked, and the first non-finite one is reported by op (slow: a
/// diagnosis mode for a run that stopped on a non-finite loss).
fn check_finite_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VOX2VEC_CHECK_FINITE").is_some_and(|v| v != "0" && !v.is_empty()))
}

/// The report for `t` (what op produced, `what` it was) if it holds a non-finite value.
fn nonfinite(op: &str, what: &str, t: &Tensor) -> Option<String> {
    if t.dtype() == crate::tensor::DType::I64 {
        return None;
    }
    let v = match t.to_f32_vec() {
        Ok(v) => v,
        Err(e) => return Some(format!("VOX2VEC_CHECK_FINITE: could not read op '{op}' {what}: {e:#}")),
    };
    let i = v.iter().position(|x| !x.is_finite())?;
    let count = v.iter().filter(|x| !x.is_finite()).count();
    Some(format!(
        "VOX2VEC_CHECK_FINITE: the first non-finite value comes from op '{op}' ({what}, shape {:?}): {count} of {} values are not finite, the first {} at element {i}",
        t.shape(),
        v.len(),
        v[i]
    ))
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
            // prev + g, added onto whichever of the two is held here alone (no copy): an add's
            // backward hands the same dy to both its inputs.
            let shape = g.shape().to_vec();
            let (base, other) = if prev.is_sole_owner() || !g.is_sole_owner() { (prev, g) } else { (g, prev) };
            let mut acc = base.into_f32_vec();
            crate::cpu::add_onto(&mut acc, other.f32s());
            grads.insert(id, Tensor::from_f32(&shape, acc));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_f32(&[v.len()], v.to_vec())
    }

    /// y = a * x as an op whose backward reports what it was handed in `acc` and, when `fold`,
    /// takes it and returns the sum itself.
    fn scale(g: &Graph, x: &Var, a: f32, fold: bool, seen: std::rc::Rc<RefCell<Vec<Option<Vec<f32>>>>>) -> Var {
        let y = t(&x.value.f32s().iter().map(|v| a * v).collect::<Vec<_>>());
        g.record_accumulating("scale", y, &[x], move |dy, acc| {
            seen.borrow_mut().push(acc[0].as_ref().map(|p| p.f32s().to_vec()));
            let mut d: Vec<f32> = dy.f32s().iter().map(|v| a * v).collect();
            if fold && let Some(prev) = acc[0].take() {
                d.iter_mut().zip(prev.f32s()).for_each(|(d, p)| *d += p);
            }
            Ok(vec![Some(t(&d))])
        })
    }

    #[test]
    fn accumulating_backward_sees_the_gradient_so_far_and_leftovers_are_added() {
        for fold in [false, true] {
            let g = Graph::train();
            let x = g.leaf(t(&[1.0, 2.0]));
            let seen = std::rc::Rc::new(RefCell::new(Vec::new()));
            // Two consumers of x: s1 recorded first, so its backward runs last and is handed
            // s2's contribution.
            let s1 = scale(&g, &x, 3.0, fold, seen.clone());
            let s2 = scale(&g, &x, 5.0, fold, seen.clone());
            let sum = crate::ops::add(&g, &s1, &s2).unwrap();
            let grads = g.backward_with(&sum, t(&[1.0, 10.0])).unwrap();
            // d/dx = 3 dy + 5 dy whether the op folded the sum in or left it to autograd.
            assert_eq!(grads.get(&x).unwrap().f32s(), &[8.0, 80.0], "fold {fold}");
            assert_eq!(*seen.borrow(), vec![None, Some(vec![5.0, 50.0])], "fold {fold}");
        }
    }

    /// A parameter is ready once, after its last contribution (here: two uses), with the final
    /// gradient; one used only near the loss is ready first.
    #[test]
    fn parameters_are_ready_after_their_last_use() {
        use crate::params::{Layout, ParamStore, SlotKind};
        let mut store = ParamStore::new();
        let a = store.add("a", t(&[2.0]), SlotKind::Trainable, Layout::Plain);
        let b = store.add("b", t(&[3.0]), SlotKind::Trainable, Layout::Plain);
        let g = Graph::train();
        let x = g.leaf(t(&[5.0]));
        let (pa, pb) = (g.param(&store, a), g.param(&store, b));
        let mul = |g: &Graph, p: &Var, q: &Var| {
            let (pv, qv) = (p.value.clone(), q.value.clone());
            let y = Tensor::from_f32(&[1], vec![p.value.f32s()[0] * q.value.f32s()[0]]);
            g.record("mul", y, &[p, q], move |d| {
                let d = d.f32s()[0];
                Ok(vec![
                    Some(Tensor::from_f32(&[1], vec![d * qv.f32s()[0]])),
                    Some(Tensor::from_f32(&[1], vec![d * pv.f32s()[0]])),
                ])
            })
        };
        // y = b · (a · x) · a: a is used twice (first and last), b once in between.
        let h = mul(&g, &pa, &x);
        let h = mul(&g, &pb, &h);
        let y = mul(&g, &h, &pa);
        let mut seen: Vec<(usize, f32)> = Vec::new();
        let grads = g
            .backward_hooked(&y, &mut |key, grad| {
                seen.push((key.1, grad.f32s()[0]));
                Ok(())
            })
            .unwrap();
        // dy/db = a²x = 20, dy/da = 2abx = 60: b is final before a's first use is reached.
        assert_eq!(seen, vec![(b, 20.0), (a, 60.0)]);
        assert_eq!(grads.param(&store, a).unwrap().f32s(), &[60.0]);
    }
}
