//! vox2vec-rs: self-supervised voxel-level representation learning for CT (vox2vec, MICCAI
//! 2023) with a multi-threaded CPU backend (the oracle) and a CUDA backend.
//!
//! Map of the crate:
//! - `tensor`: tensors, dtypes, devices and storage; channels-last activation layout.
//! - `autograd`: the tape of backward closures.
//! - `cpu`: GEMM and deterministic parallel reductions used by the CPU ops.
//! - `ops::*`: one module per op, with its CPU forward, backward and autograd wrapper.
//! - `model`: FPN3d, ResBlock3d, the projection head, the contrastive forward.
//! - `params`: the named parameter store; `checkpoint`: safetensors I/O; `weights`: every
//!   weights format read into one form (PyTorch .pt / Lightning .ckpt, config inference);
//!   `optim`: Adam, clipping.
//! - `dist`: data-parallel ranks (communicators: in-process, TCP, NCCL; rendezvous; launch).
//! - `train`: the pretraining step and synthetic batches; `bench`: `vox2vec-train --bench`.
//! - `kernels`: the embedded CUDA fatbin; `cuda`: the device, allocator, kernel registry and
//!   the host-side launcher of every kernel (`cuda::ops::*`).

pub mod autograd;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod eval;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plot;
pub mod profile;
pub mod tensor;
pub mod train;
pub mod weights;
