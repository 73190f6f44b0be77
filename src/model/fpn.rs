//! FPN3d (docs/method.md §3): the vox2vec backbone, a 3-D feature pyramid network.
//!
//! Encoder level i (0 ≤ i < S-1, c = base·2^i): left_blocks[i] = Stack(c), its output is the
//! skip feature f_i; down_blocks[i] = maxpool 2 (ceil) then conv 1×1×1 c → 2c.
//! bottom_block = Stack(base·2^(S-1)): pyramid level S-1.
//! Decoder, list index j = 0.. for level i = S-2-j: up_blocks[j] = conv 1×1×1 2c → c then
//! nearest ×2 cropped to f_i's extent; x = up + skip_blocks[j](f_i); right_blocks[j] = Stack(c).

use anyhow::{Result, ensure};
use rand::Rng;

use super::layers::{Conv3d, Stack};
use crate::autograd::{Graph, Var};
use crate::ops;
use crate::params::ParamStore;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpnConfig {
    pub in_channels: usize,
    pub base_channels: usize,
    pub num_scales: usize,
}

impl Default for FpnConfig {
    fn default() -> Self {
        FpnConfig { in_channels: 1, base_channels: 16, num_scales: 6 }
    }
}

impl FpnConfig {
    pub fn channels(&self, level: usize) -> usize {
        self.base_channels << level
    }
    /// Width of a voxel embedding: channels summed over all levels.
    pub fn embedding_dim(&self) -> usize {
        (0..self.num_scales).map(|i| self.channels(i)).sum()
    }
}

pub struct Fpn3d {
    pub config: FpnConfig,
    first_conv: Conv3d,
    left_blocks: Vec<Stack>,
    down_blocks: Vec<Conv3d>,
    bottom_block: Stack,
    up_blocks: Vec<Conv3d>,
    skip_blocks: Vec<Conv3d>,
    right_blocks: Vec<Stack>,
}

impl Fpn3d {
    /// Registers every parameter under `prefix` (e.g. "backbone.") in PyTorch's order.
    pub fn new(store: &mut ParamStore, rng: &mut impl Rng, prefix: &str, config: FpnConfig) -> Fpn3d {
        assert!(
            config.num_scales >= 1 && config.base_channels >= 1 && config.in_channels >= 1,
            "invalid FPN config {config:?}"
        );
        let s = config.num_scales;
        let c = |i| config.channels(i);
        let first_conv = Conv3d::new(store, rng, &format!("{prefix}first_conv"), config.in_channels, c(0), 3);
        let left_blocks =
            (0..s - 1).map(|i| Stack::new(store, rng, &format!("{prefix}left_blocks.{i}"), c(i))).collect();
        let down_blocks = (0..s - 1)
            .map(|i| Conv3d::new(store, rng, &format!("{prefix}down_blocks.{i}.1"), c(i), c(i + 1), 1))
            .collect();
        let bottom_block = Stack::new(store, rng, &format!("{prefix}bottom_block"), c(s - 1));
        let up_blocks = (0..s - 1)
            .map(|j| Conv3d::new(store, rng, &format!("{prefix}up_blocks.{j}.0"), c(s - 1 - j), c(s - 2 - j), 1))
            .collect();
        let skip_blocks = (0..s - 1)
            .map(|j| Conv3d::new(store, rng, &format!("{prefix}skip_blocks.{j}"), c(s - 2 - j), c(s - 2 - j), 1))
            .collect();
        let right_blocks =
            (0..s - 1).map(|j| Stack::new(store, rng, &format!("{prefix}right_blocks.{j}"), c(s - 2 - j))).collect();
        Fpn3d { config, first_conv, left_blocks, down_blocks, bottom_block, up_blocks, skip_blocks, right_blocks }
    }

    /// x [N, X, Y, Z, in_channels] → pyramid levels 0..S, level i [N, ⌈X/2^i⌉, …, base·2^i].
    pub fn forward(&self, g: &Graph, store: &mut ParamStore, x: &Var) -> Result<Vec<Var>> {
        let sh = x.shape();
        ensure!(
            sh.len() == 5 && sh[4] == self.config.in_channels,
            "FPN3d input must be [N, X, Y, Z, {}], found {sh:?}",
            self.config.in_channels
        );
        ensure!(sh[1] > 0 && sh[2] > 0 && sh[3] > 0 && sh[0] > 0, "FPN3d input has an empty axis: {sh:?}");
        let s = self.config.num_scales;
        let mut h = self.first_conv.forward(g, store, x)?;
        let mut skips = Vec::with_capacity(s - 1);
        for i in 0..s - 1 {
            h = self.left_blocks[i].forward(g, store, &h)?;
            skips.push(h.clone());
            let p = ops::maxpool2(g, &h)?;
            h = self.down_blocks[i].forward(g, store, &p)?;
        }
        h = self.bottom_block.forward(g, store, &h)?;
        let mut pyramid: Vec<Option<Var>> = vec![None; s];
        pyramid[s - 1] = Some(h.clone());
        for j in 0..s - 1 {
            let i = s - 2 - j;
            let f = &skips[i];
            let up = self.up_blocks[j].forward(g, store, &h)?;
            // skip_blocks[j](f) + upsample2_crop(up, f's extent), fused on tensor cores.
            let sb = &self.skip_blocks[j];
            let bias = sb.bias.expect("skip convolutions have a bias");
            let sum = ops::fpn_merge(g, f, &g.param(store, sb.weight), &g.param(store, bias), &up)?;
            h = self.right_blocks[j].forward(g, store, &sum)?;
            pyramid[i] = Some(h.clone());
        }
        Ok(pyramid.into_iter().map(|v| v.expect("every level set")).collect())
    }
}
