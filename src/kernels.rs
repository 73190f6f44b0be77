//! The CUDA kernels compiled by build.rs from `kernels/*.cu`, embedded as one fatbin.
//! Empty when nvcc was not found at build time (the CPU backend still works).

/// The fatbin bytes (empty without nvcc or without kernels).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// True when this binary carries compiled CUDA kernels.
pub fn available() -> bool {
    !FATBIN.is_empty()
}
