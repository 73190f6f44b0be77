//! Host-side launchers of the CUDA kernels, one module per op (kernels in `kernels/<op>.cu`,
//! CPU oracle and autograd wrapper in `crate::ops::<op>`). Every function queues work on the
//! device's stream and returns at once; none reads device memory back to the host.

pub mod batchnorm;
pub mod conv3d;
pub mod elementwise;
pub mod gather;
pub mod infonce;
pub mod linear;
pub mod normalize;
pub mod pooling;
pub mod probe;
pub mod reduce;
pub mod segloss;
pub mod stitch;
pub mod upsample;
