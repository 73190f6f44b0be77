//! NIfTI bytes (gzip or not) → `read_volume_bytes` (header checks, gzip integrity, vox_offset,
//! decoding, scaling, canonical orientation, the non-finite policy) → for small volumes the
//! whole preprocessing (`preprocess_ct`: crop, resampling-size limits, zoom, body mask).
//! Besides "no panic, no abort, no huge allocation", every accepted volume must be coherent.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vox2vec::data::nifti_io::{NonFinitePolicy, read_volume_bytes};

#[path = "common/accepted.rs"]
mod accepted;

fuzz_target!(|data: &[u8]| {
    let name = Path::new("fuzz.nii");
    let strict = read_volume_bytes(name, data.to_vec(), NonFinitePolicy::Error);
    let vol = match strict {
        Ok(v) => v,
        Err(_) => match read_volume_bytes(name, data.to_vec(), NonFinitePolicy::ReplaceWithMinimum) {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    accepted::check_accepted(&vol, 1 << 18);
});
