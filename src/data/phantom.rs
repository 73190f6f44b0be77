//! Synthetic CT phantom (placeholder; being written).
