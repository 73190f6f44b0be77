//! Loss-curve pictures (placeholder; being written).
