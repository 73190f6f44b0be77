//! Parity with the reference PyTorch model on every fixture (tests/data/fixtures and
//! $VOX2VEC_FIXTURES): eval and train pyramids, embeddings, loss, input and parameter
//! gradients, running statistics after both forwards, and the standalone InfoNCE case.
//! Error = ‖a − b‖ / max(‖b‖, floor), floor = 1e-2 × the largest ‖b‖ of the same kind in the
//! file (see ../shared/fixtures/README.md). Bounds: 1e-4 forward, 1e-2 gradients.

mod common;

use common::parity::check_fixture;
use common::{Fixture, fixture_files};
use vox2vec::tensor::{DType, Device};

const FWD_BOUND: f64 = 1e-4;
const GRAD_BOUND: f64 = 1e-2;

#[test]
fn parity_with_reference_fixtures() {
    let files = fixture_files();
    assert!(!files.is_empty(), "no fixture found");
    let mut failures = Vec::new();
    for path in &files {
        let f = Fixture::load(path);
        let (ef, eg) = check_fixture(&f, Device::Cpu, DType::F32);
        if !(ef < FWD_BOUND && eg < GRAD_BOUND) {
            failures
                .push(format!("{}: fwd {ef:.3e} (bound {FWD_BOUND:e}), grad {eg:.3e} (bound {GRAD_BOUND:e})", f.name));
        }
    }
    assert!(failures.is_empty(), "parity bounds missed:\n{}", failures.join("\n"));
}
