//! `.npy` bytes → `parse_f32`: an accepted array has exactly as many values as its shape says.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((shape, values)) = vox2vec::eval::npy::parse_f32(Path::new("fuzz.npy"), data) {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).expect("accepted a shape whose size overflows");
        assert_eq!(values.len(), n, "{} values for shape {shape:?}", values.len());
    }
});
