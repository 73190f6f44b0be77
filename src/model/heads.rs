//! Segmentation heads on the frozen (or fine-tuned) pyramid (REFERENCE.md §5), with the
//! reference's parameter names (`FPNLinearHead`: `layers.{i}`, bias on level 0 only).
//!
//! Linear head: per level a 1×1×1 conv to the classes; from the coarsest level down,
//! x = upsample×2(x) cropped to level i's extent + conv_i(level i).

use anyhow::{Result, ensure};
use rand::Rng;

use super::fpn::FpnConfig;
use super::layers::Conv3d;
use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::ParamStore;

pub struct FpnLinearHead {
    layers: Vec<Conv3d>,
    pub num_classes: usize,
}

impl FpnLinearHead {
    pub fn new(store: &mut ParamStore, rng: &mut impl Rng, prefix: &str, fpn: FpnConfig, num_classes: usize) -> FpnLinearHead {
        let layers = (0..fpn.num_scales).map(|i| Conv3d::with_bias(store, rng, &format!("{prefix}layers.{i}"), fpn.channels(i), num_classes, 1, i == 0)).collect();
        FpnLinearHead { layers, num_classes }
    }

    /// Logits [N, X, Y, Z, classes] at level 0 from the pyramid.
    pub fn forward(&self, g: &Graph, store: &ParamStore, pyramid: &[Var]) -> Result<Var> {
        ensure!(pyramid.len() == self.layers.len(), "linear head: {} levels, expected {}", pyramid.len(), self.layers.len());
        let mut x: Option<Var> = None;
        for (i, (f, layer)) in pyramid.iter().zip(&self.layers).enumerate().rev() {
            let y = layer.forward(g, store, f)?;
            x = Some(match x {
                None => y,
                Some(prev) => {
                    let s = pyramid[i].shape();
                    let up = ops::upsample2_crop(g, &prev, [s[1], s[2], s[3]])?;
                    ops::add(g, &up, &y)?
                }
            });
        }
        x.ok_or_else(|| anyhow::anyhow!("empty pyramid"))
    }
}
