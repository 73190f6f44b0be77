//! DICOM series: the fuzzer's bytes cut at `SEPARATOR` into 1–4 files, written to a folder and
//! read as a series (`read_volume`: grouping by series, localizers and modality, slice
//! geometry and spacing, the pixel module, decoding, rescale to HU, then the NIfTI path's
//! canonical orientation and non-finite policy) → for small volumes the preprocessing. Every
//! accepted volume must pass the same checks as the nifti target's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vox2vec::data::nifti_io::read_volume;

#[path = "common/accepted.rs"]
mod accepted;

/// Between two files of a series in the fuzzer's input (the seeds, dev/fuzz_seeds.rs, use it).
const SEPARATOR: &[u8] = b"--VOX2VEC-SLICE--";

fuzz_target!(|data: &[u8]| {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < 3 {
        match rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    // One folder per process, emptied for each input.
    let dir = std::env::temp_dir().join(format!("vox2vec-fuzz-dicom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    for (i, p) in parts.iter().enumerate() {
        std::fs::write(dir.join(format!("slice{i}.dcm")), p).expect("writing a slice");
    }
    if let Ok(vol) = read_volume(&dir) {
        // The test series' 5 mm pixels resample to ~10^5 voxels per slice, seconds under
        // AddressSanitizer: only small grids are preprocessed, so the reader gets the time.
        accepted::check_accepted(&vol, 1 << 14);
    }
});
