//! Building blocks with PyTorch parameter names: Conv3d, BatchNorm (1-D and 3-D), Linear,
//! ResBlock3d and a Stack of ResBlocks.

use anyhow::Result;
use rand::Rng;

use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::{Layout, ParamStore, SlotKind, uniform_fan_in};
use crate::tensor::Tensor;

pub struct Conv3d {
    pub weight: usize,
    pub bias: Option<usize>,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
}

impl Conv3d {
    pub fn new(store: &mut ParamStore, rng: &mut impl Rng, name: &str, cin: usize, cout: usize, k: usize) -> Conv3d {
        Conv3d::with_bias(store, rng, name, cin, cout, k, true)
    }

    pub fn with_bias(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        bias: bool,
    ) -> Conv3d {
        let fan_in = cin * k * k * k;
        let w = Tensor::from_f32(&[cout, k, k, k, cin], uniform_fan_in(rng, cout * fan_in, fan_in));
        let weight = store.add(&format!("{name}.weight"), w, SlotKind::Trainable, Layout::ConvChannelsLast);
        let bias = bias.then(|| {
            let b = Tensor::from_f32(&[cout], uniform_fan_in(rng, cout, fan_in));
            store.add(&format!("{name}.bias"), b, SlotKind::Trainable, Layout::Plain)
        });
        Conv3d { weight, bias, cin, cout, k }
    }

    pub fn forward(&self, g: &Graph, store: &ParamStore, x: &Var) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = self.bias.map(|b| g.param(store, b));
        ops::conv3d(g, x, &w, b.as_ref())
    }
}

pub struct Linear {
    pub weight: usize,
    pub bias: usize,
}

impl Linear {
    pub fn new(store: &mut ParamStore, rng: &mut impl Rng, name: &str, fin: usize, fout: usize) -> Linear {
        let w = Tensor::from_f32(&[fout, fin], uniform_fan_in(rng, fout * fin, fin));
        let b = Tensor::from_f32(&[fout], uniform_fan_in(rng, fout, fin));
        Linear {
            weight: store.add(&format!("{name}.weight"), w, SlotKind::Trainable, Layout::Plain),
            bias: store.add(&format!("{name}.bias"), b, SlotKind::Trainable, Layout::Plain),
        }
    }

    pub fn forward(&self, g: &Graph, store: &ParamStore, x: &Var, math: ops::linear::MatmulMath) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = g.param(store, self.bias);
        ops::linear::linear_with(g, x, &w, Some(&b), math)
    }
}

/// BatchNorm over the channel (last) axis; weight 1, bias 0, running mean 0, running var 1.
pub struct BatchNorm {
    pub weight: usize,
    pub bias: usize,
    pub running_mean: usize,
    pub running_var: usize,
    pub num_batches_tracked: usize,
}

impl BatchNorm {
    pub fn new(store: &mut ParamStore, name: &str, c: usize) -> BatchNorm {
        BatchNorm {
            weight: store.add(&format!("{name}.weight"), Tensor::full(&[c], 1.0), SlotKind::Trainable, Layout::Plain),
            bias: store.add(&format!("{name}.bias"), Tensor::zeros(&[c]), SlotKind::Trainable, Layout::Plain),
            running_mean: store.add(
                &format!("{name}.running_mean"),
                Tensor::zeros(&[c]),
                SlotKind::RunningStat,
                Layout::Plain,
            ),
            running_var: store.add(
                &format!("{name}.running_var"),
                Tensor::full(&[c], 1.0),
                SlotKind::RunningStat,
                Layout::Plain,
            ),
            num_batches_tracked: store.add(
                &format!("{name}.num_batches_tracked"),
                Tensor::from_i64(&[], vec![0]),
                SlotKind::Counter,
                Layout::Plain,
            ),
        }
    }

    /// In a training graph this also updates the running statistics in `store`.
    pub fn forward(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = g.param(store, self.bias);
        let (y, update) = ops::batch_norm(g, x, &w, &b, store.get(self.running_mean), store.get(self.running_var))?;
        if let Some(u) = update {
            self.store_update(store, u);
        }
        Ok(y)
    }

    /// relu(self.forward(x)), as one op (`ops::batchnorm::batch_norm_relu`).
    pub fn forward_relu(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Var> {
        let w = g.param(store, self.weight);
        let b = g.param(store, self.bias);
        let (y, update) =
            ops::batchnorm::batch_norm_relu(g, x, &w, &b, store.get(self.running_mean), store.get(self.running_var))?;
        if let Some(u) = update {
            self.store_update(store, u);
        }
        Ok(y)
    }

    /// Store a training forward's running statistics and count the batch.
    pub fn store_update(&self, store: &mut ParamStore, u: crate::ops::batchnorm::BnUpdate) {
        store.set(self.running_mean, u.running_mean);
        store.set(self.running_var, u.running_var);
        let n = store.get(self.num_batches_tracked).i64s()[0];
        store.set(self.num_batches_tracked, Tensor::from_i64(&[], vec![n + 1]));
    }
}

/// y = conv(relu(bn(conv(relu(bn(x)))))) + skip(x); Sequential indices 0 bn, 2 conv, 3 bn, 5 conv.
pub struct ResBlock3d {
    bn0: BatchNorm,
    conv2: Conv3d,
    bn3: BatchNorm,
    conv5: Conv3d,
    skip: Option<Conv3d>,
}

impl ResBlock3d {
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
    ) -> ResBlock3d {
        let mid = cin.min(cout);
        let bn0 = BatchNorm::new(store, &format!("{name}.layers.0"), cin);
        let conv2 = Conv3d::new(store, rng, &format!("{name}.layers.2"), cin, mid, k);
        let bn3 = BatchNorm::new(store, &format!("{name}.layers.3"), mid);
        let conv5 = Conv3d::new(store, rng, &format!("{name}.layers.5"), mid, cout, k);
        let skip = (cin != cout).then(|| Conv3d::new(store, rng, &format!("{name}.skip"), cin, cout, 1));
        ResBlock3d { bn0, conv2, bn3, conv5, skip }
    }

    pub fn forward(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Var> {
        if g.is_training() && g.is_recording() && x.value.is_cuda() {
            return self.forward_recomputing(g, store, x);
        }
        if !g.is_recording() && !g.is_training() {
            return Ok(Var::constant(if x.value.is_cuda() {
                self.forward_eval_cuda(store, &x.value)?
            } else {
                self.forward_eval_cpu(store, &x.value)?
            }));
        }
        let h = self.bn0.forward_relu(g, store, x)?;
        let h = self.conv2.forward(g, store, &h)?;
        let h = self.bn3.forward_relu(g, store, &h)?;
        let h = self.conv5.forward(g, store, &h)?;
        let s = match &self.skip {
            Some(c) => c.forward(g, store, x)?,
            None => x.clone(),
        };
        ops::add(g, &h, &s)
    }
}

impl ResBlock3d {
    /// Inference on the device (eval mode, nothing recorded): one op, fused on tensor cores
    /// (`ops::resblock::resblock_eval_cuda`).
    fn forward_eval_cuda(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        let p = crate::ops::resblock::ResBlockParams {
            gamma0: store.get(self.bn0.weight),
            beta0: store.get(self.bn0.bias),
            w2: store.get(self.conv2.weight),
            b2: store.get(self.conv2.bias.expect("ResBlock convs have a bias")),
            gamma3: store.get(self.bn3.weight),
            beta3: store.get(self.bn3.bias),
            w5: store.get(self.conv5.weight),
            b5: store.get(self.conv5.bias.expect("ResBlock convs have a bias")),
            skip: self.skip.as_ref().map(|c| (store.get(c.weight), store.get(c.bias.expect("skip conv has a bias")))),
            running0: (store.get(self.bn0.running_mean), store.get(self.bn0.running_var)),
            running3: (store.get(self.bn3.running_mean), store.get(self.bn3.running_var)),
        };
        crate::ops::resblock::resblock_eval_cuda(x, p)
    }

    /// Inference on the CPU (eval mode, nothing recorded): BN → ReLU applied while each
    /// convolution pads its input and the skip added while conv5 writes its output
    /// (`conv3d_forward_cpu_fused`): a1, a3 and the sum are never separate passes. The same
    /// values as the composition above.
    fn forward_eval_cpu(&self, store: &ParamStore, x: &Tensor) -> Result<Tensor> {
        use crate::ops::batchnorm::BnReluEval;
        use crate::ops::conv3d::{CpuKernels, conv3d_forward_cpu_fused};
        use crate::tensor::Vol;
        let v = Vol::of(x);
        let bn = |b: &BatchNorm| {
            BnReluEval::new(
                store.get(b.running_mean).f32s(),
                store.get(b.running_var).f32s(),
                store.get(b.weight).f32s(),
                store.get(b.bias).f32s(),
            )
        };
        let (w2, w5) = (store.get(self.conv2.weight), store.get(self.conv5.weight));
        let (mid, cout, k) = (w2.shape()[0], w5.shape()[0], w2.shape()[1]);
        let bias = |c: &Conv3d| c.bias.map(|b| store.get(b).f32s());
        let kernels = CpuKernels::best();
        let detail = || format!("{}x{}x{}x{} {}->{}", v.n, v.x, v.y, v.z, v.c, cout);
        crate::profile::time("resblock eval (fused)", detail, || {
            let h1 = conv3d_forward_cpu_fused(
                x.f32s(),
                v,
                w2.f32s(),
                bias(&self.conv2),
                mid,
                k,
                Some(&bn(&self.bn0)),
                None,
                kernels,
            );
            let skip = self.skip.as_ref().map(|c| {
                crate::ops::conv3d::conv3d_forward_cpu_with(
                    x.f32s(),
                    v,
                    store.get(c.weight).f32s(),
                    bias(c),
                    cout,
                    1,
                    kernels,
                )
            });
            let residual = skip.as_deref().unwrap_or(x.f32s());
            let y = conv3d_forward_cpu_fused(
                &h1,
                v.with_c(mid),
                w5.f32s(),
                bias(&self.conv5),
                cout,
                k,
                Some(&bn(&self.bn3)),
                Some(residual),
                kernels,
            );
            Ok(Tensor::from_f32(&v.with_c(cout).shape(), y))
        })
    }

    /// The training forward on the device as one op that saves x and the first conv's output
    /// only (`ops::resblock`); the same values and gradients as the composition above.
    fn forward_recomputing(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Var> {
        let vars = crate::ops::resblock::ResBlockVars {
            gamma0: g.param(store, self.bn0.weight),
            beta0: g.param(store, self.bn0.bias),
            w2: g.param(store, self.conv2.weight),
            b2: g.param(store, self.conv2.bias.expect("ResBlock convs have a bias")),
            gamma3: g.param(store, self.bn3.weight),
            beta3: g.param(store, self.bn3.bias),
            w5: g.param(store, self.conv5.weight),
            b5: g.param(store, self.conv5.bias.expect("ResBlock convs have a bias")),
            skip: self
                .skip
                .as_ref()
                .map(|c| (g.param(store, c.weight), g.param(store, c.bias.expect("skip conv has a bias")))),
            running0: (store.get(self.bn0.running_mean), store.get(self.bn0.running_var)),
            running3: (store.get(self.bn3.running_mean), store.get(self.bn3.running_var)),
        };
        let (y, [u0, u3]) = crate::ops::resblock::resblock_train_cuda(g, x, vars)?;
        self.bn0.store_update(store, u0);
        self.bn3.store_update(store, u3);
        Ok(y)
    }
}

/// Two ResBlocks c → c (`layers.0`, `layers.1`).
pub struct Stack {
    blocks: Vec<ResBlock3d>,
}

impl Stack {
    pub fn new(store: &mut ParamStore, rng: &mut impl Rng, name: &str, c: usize) -> Stack {
        let blocks = (0..2).map(|j| ResBlock3d::new(store, rng, &format!("{name}.layers.{j}"), c, c, 3)).collect();
        Stack { blocks }
    }

    pub fn forward(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for b in &self.blocks {
            h = b.forward(g, store, &h)?;
        }
        Ok(h)
    }
}
