//! `preprocess`: CTs into the cache, multi-threaded and resumable.

use anyhow::Result;

pub fn preprocess(
    input: &std::path::Path,
    cache: &std::path::Path,
    skip_bad: bool,
    nonfinite: crate::data::preprocess::NonFinitePolicy,
) -> Result<()> {
    use crate::data::preprocess::PreprocessConfig;
    let report = crate::data::sources::prepare_input(
        input,
        cache,
        &PreprocessConfig { nonfinite, ..PreprocessConfig::default() },
        [1, 1, 1],
    )?;
    println!("{}", report.summary(cache));
    anyhow::ensure!(!report.entries.is_empty(), "no usable volume in {}", input.display());
    anyhow::ensure!(report.skipped.is_empty() || skip_bad, "{} unusable files (listed above)", report.skipped.len());
    Ok(())
}
