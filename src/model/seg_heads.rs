//! Segmentation heads on the frozen (or fine-tuned) pyramid (docs/method.md §5), with the
//! reference's parameter names (`FPNLinearHead`: `layers.{i}`, bias on level 0 only).
//!
//! Linear head: per level a 1×1×1 conv to the classes; from the coarsest level down,
//! x = upsample×2(x) cropped to level i's extent + conv_i(level i).
//! Non-linear head (`FPNNonLinearHead`): the FPN decoder again with 1×1×1 ResBlocks —
//! bottom_block on the coarsest level, then per finer level up (1×1×1 conv 2c → c, ×2,
//! crop) + skip (1×1×1 conv c → c) → right block, and a final 1×1×1 conv to the classes.

use anyhow::{Result, ensure};
use rand::Rng;

use super::fpn::FpnConfig;
use super::layers::{Conv3d, ResBlock3d};
use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::ParamStore;

pub struct FpnLinearHead {
    layers: Vec<Conv3d>,
    pub num_classes: usize,
}

impl FpnLinearHead {
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        prefix: &str,
        fpn: FpnConfig,
        num_classes: usize,
    ) -> FpnLinearHead {
        let layers = (0..fpn.num_scales)
            .map(|i| {
                Conv3d::with_bias(store, rng, &format!("{prefix}layers.{i}"), fpn.channels(i), num_classes, 1, i == 0)
            })
            .collect();
        FpnLinearHead { layers, num_classes }
    }

    /// Logits [N, X, Y, Z, classes] at level 0 from the pyramid.
    pub fn forward(&self, g: &Graph, store: &ParamStore, pyramid: &[Var]) -> Result<Var> {
        ensure!(
            pyramid.len() == self.layers.len(),
            "linear head: {} levels, expected {}",
            pyramid.len(),
            self.layers.len()
        );
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

pub struct FpnNonLinearHead {
    bottom_block: ResBlock3d,
    up_blocks: Vec<Conv3d>,
    skip_blocks: Vec<Conv3d>,
    right_blocks: Vec<ResBlock3d>,
    final_block: Conv3d,
    pub num_classes: usize,
}

impl FpnNonLinearHead {
    pub fn new(
        store: &mut ParamStore,
        rng: &mut impl Rng,
        prefix: &str,
        fpn: FpnConfig,
        num_classes: usize,
    ) -> FpnNonLinearHead {
        let s = fpn.num_scales;
        let c = |i| fpn.channels(i);
        // Registration order follows PyTorch's module order: up, skip, right lists, then
        // bottom and final blocks are separate attributes (order of keys does not matter for
        // loading by name).
        let bottom_block = ResBlock3d::new(store, rng, &format!("{prefix}bottom_block"), c(s - 1), c(s - 1), 1);
        let up_blocks = (0..s - 1)
            .map(|j| Conv3d::new(store, rng, &format!("{prefix}up_blocks.{j}.0"), c(s - 1 - j), c(s - 2 - j), 1))
            .collect();
        let skip_blocks = (0..s - 1)
            .map(|j| Conv3d::new(store, rng, &format!("{prefix}skip_blocks.{j}"), c(s - 2 - j), c(s - 2 - j), 1))
            .collect();
        let right_blocks = (0..s - 1)
            .map(|j| ResBlock3d::new(store, rng, &format!("{prefix}right_blocks.{j}"), c(s - 2 - j), c(s - 2 - j), 1))
            .collect();
        let final_block = Conv3d::new(store, rng, &format!("{prefix}final_block"), c(0), num_classes, 1);
        FpnNonLinearHead { bottom_block, up_blocks, skip_blocks, right_blocks, final_block, num_classes }
    }

    /// Logits [N, X, Y, Z, classes] at level 0. BatchNorms follow the graph's mode.
    pub fn forward(&self, g: &Graph, store: &mut ParamStore, pyramid: &[Var]) -> Result<Var> {
        let s = self.up_blocks.len() + 1;
        ensure!(pyramid.len() == s, "non-linear head: {} levels, expected {s}", pyramid.len());
        let mut x = self.bottom_block.forward(g, store, &pyramid[s - 1])?;
        for j in 0..s - 1 {
            let f = &pyramid[s - 2 - j];
            let fs = f.shape();
            let up = self.up_blocks[j].forward(g, store, &x)?;
            let up = ops::upsample2_crop(g, &up, [fs[1], fs[2], fs[3]])?;
            let sk = self.skip_blocks[j].forward(g, store, f)?;
            x = self.right_blocks[j].forward(g, store, &ops::add(g, &up, &sk)?)?;
        }
        self.final_block.forward(g, store, &x)
    }
}
