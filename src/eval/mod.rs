//! Using the features (docs/method.md §5): Dice, sliding-window inference over whole volumes,
//! `.npy` I/O for feature maps, the PCA picture of features, voxel similarity search.

pub mod dice;
pub mod embed;
pub mod npy;
pub mod pca;
pub mod prefetch;
pub mod recorded;
pub mod segment;
pub mod similar;
pub mod sliding;
