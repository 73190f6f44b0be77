//! Every op of the engine: one module per op, each holding the op's CPU forward and backward
//! (the oracle that GPU kernels are tested against) and its autograd wrapper.

pub mod batchnorm;
pub mod conv3d;
pub mod elementwise;
pub mod fpn_merge;
pub mod gather;
pub mod infonce;
pub mod linear;
pub mod normalize;
pub mod pooling;
pub mod resblock;
pub mod segloss;
pub mod upsample;

pub use batchnorm::batch_norm;
pub use conv3d::conv3d;
pub use elementwise::{add, relu};
pub use fpn_merge::fpn_merge;
pub use gather::{concat_channels, gather_voxels};
pub use infonce::infonce;
pub use linear::linear;
pub use normalize::l2_normalize_rows;
pub use pooling::maxpool2;
pub use segloss::segmentation_loss;
pub use upsample::upsample2_crop;
