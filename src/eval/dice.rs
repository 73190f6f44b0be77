//! Dice score for reporting (docs/method.md §5): per class, on binarised masks,
//! (2·Σ p·g + 1e-5) / (Σ (p² + g²) + 1e-5). Both empty → 1.

/// Dice of one binary mask against one reference mask (equal lengths).
pub fn dice(pred: &[bool], truth: &[bool]) -> f64 {
    assert_eq!(pred.len(), truth.len(), "dice: masks of different sizes");
    let (mut inter, mut sum) = (0u64, 0u64);
    for (&p, &g) in pred.iter().zip(truth) {
        inter += (p && g) as u64;
        sum += p as u64 + g as u64;
    }
    (2.0 * inter as f64 + 1e-5) / (sum as f64 + 1e-5)
}

/// Dice per class 1..=classes of two label maps (0 = background).
pub fn dice_per_class(pred: &[u8], truth: &[u8], classes: u8) -> Vec<f64> {
    (1..=classes)
        .map(|c| {
            let p: Vec<bool> = pred.iter().map(|&v| v == c).collect();
            let g: Vec<bool> = truth.iter().map(|&v| v == c).collect();
            dice(&p, &g)
        })
        .collect()
}
