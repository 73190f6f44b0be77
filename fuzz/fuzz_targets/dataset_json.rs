//! nnU-Net `dataset.json` bytes → `parse_dataset_json`: accepted classes are 1..K, named,
//! at most 255.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(classes) = vox2vec::data::nnunet::parse_dataset_json(Path::new("dataset.json"), data) {
        assert!(!classes.is_empty() && classes.len() < 256, "{} classes", classes.len());
    }
});
