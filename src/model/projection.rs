//! The projection head (docs/method.md §4): Linear(D, D) – BatchNorm1d – ReLU – Linear(D, D) –
//! BatchNorm1d – ReLU – Linear(D, P), then row-wise L2 normalisation. Sequential keys 0, 1, 3, 4, 6.

use anyhow::Result;
use rand::Rng;

use super::layers::{BatchNorm, Linear};
use crate::autograd::{Graph, Var};
use crate::ops;
use crate::ops::linear::MatmulMath;
use crate::params::ParamStore;

pub struct ProjectionHead {
    l0: Linear,
    bn1: BatchNorm,
    l3: Linear,
    bn4: BatchNorm,
    l6: Linear,
}

impl ProjectionHead {
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        prefix: &str,
        dim: usize,
        proj_dim: usize,
    ) -> ProjectionHead {
        ProjectionHead {
            l0: Linear::new(store, rng, &format!("{prefix}0"), dim, dim),
            bn1: BatchNorm::new(store, &format!("{prefix}1"), dim),
            l3: Linear::new(store, rng, &format!("{prefix}3"), dim, dim),
            bn4: BatchNorm::new(store, &format!("{prefix}4"), dim),
            l6: Linear::new(store, rng, &format!("{prefix}6"), dim, proj_dim),
        }
    }

    /// x [P, D] → L2-normalised [P, proj_dim]; the three matrix products on the device as
    /// `math` says.
    pub fn forward(&self, g: &Graph, store: &mut ParamStore, x: &Var, math: MatmulMath) -> Result<Var> {
        let h = self.l0.forward(g, store, x, math)?;
        let h = self.bn1.forward_relu(g, store, &h)?;
        let h = self.l3.forward(g, store, &h, math)?;
        let h = self.bn4.forward_relu(g, store, &h)?;
        let h = self.l6.forward(g, store, &h, math)?;
        ops::l2_normalize_rows(g, &h)
    }
}
