//! Opt-in per-op timing for the CPU backend: set `VOX2VEC_PROFILE=1` and `vox2vec-train`
//! prints, at the end, the total wall time per (op, shape) — the CPU counterpart of the
//! per-kernel table `vox2vec-train --bench` prints on a GPU. Off by default: one relaxed atomic load
//! per op.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VOX2VEC_PROFILE").is_some_and(|v| v != "0"))
}

type Table = HashMap<(&'static str, String), (u64, Duration)>;

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// Times `f` under `op` / `detail` (the detail string is only built when profiling).
pub fn time<T>(op: &'static str, detail: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed();
    let mut t = table().lock().unwrap();
    let e = t.entry((op, detail())).or_default();
    e.0 += 1;
    e.1 += dt;
    out
}

/// The table, largest total first, as text (empty when profiling is off).
pub fn report() -> String {
    if !enabled() {
        return String::new();
    }
    let t = table().lock().unwrap();
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    let total: Duration = rows.iter().map(|r| r.1.1).sum();
    let mut s = format!("{:<28} {:<34} {:>7} {:>10} {:>6}\n", "op", "shape", "calls", "total ms", "%");
    for ((op, detail), (n, d)) in rows {
        s += &format!(
            "{:<28} {:<34} {:>7} {:>10.1} {:>6.1}\n",
            op,
            detail,
            n,
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-12)
        );
    }
    s
}
