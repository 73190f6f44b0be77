//! The CUDA kernels compiled by build.rs from `kernels/*.cu`, embedded as one fatbin.
//! Empty when nvcc was not found at build time (the CPU backend still works).

/// The fatbin bytes (empty without nvcc or without kernels).
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// True when this binary carries compiled CUDA kernels.
pub fn available() -> bool {
    !FATBIN.is_empty()
}

/// The fatbin's sm_90 machine code summarised per kernel and loop (`crate::cuda::sass`), as
/// build.rs wrote it; empty without nvcc, without sm_90 in the build, or without cuobjdump.
pub static SASS_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/sass_sm90.txt"));

/// The kernels of [`SASS_SM90`], parsed once.
pub fn sass() -> &'static [crate::cuda::sass::Kernel] {
    static TABLE: std::sync::OnceLock<Vec<crate::cuda::sass::Kernel>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| crate::cuda::sass::parse_table(SASS_SM90))
}

/// One kernel's summary, by its symbol.
pub fn sass_of(name: &str) -> Option<&'static crate::cuda::sass::Kernel> {
    sass().iter().find(|k| k.name == name)
}
