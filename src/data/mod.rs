//! Real CT in: NIfTI I/O with canonical orientation, DICOM series, vox2vec preprocessing and its cache,
//! the two-view sampler with the reference augmentations, a multi-threaded loader, input
//! discovery, and a synthetic CT phantom for runs without data (docs/method.md §1–2).

pub mod cache;
pub mod dicom;
pub mod loader;
pub mod nifti_io;
pub mod nnunet;
pub mod phantom;
pub mod preprocess;
pub mod sampler;
pub mod sources;
