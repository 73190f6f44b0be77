//! The performance model: what each launch must compute and move, the floor time that
//! follows on a given GPU, and an estimate that also prices what the kernel's machine code
//! issues.
//!
//! Every launcher declares a [`Cost`] for its kernel from the shapes alone: the FLOPs it must
//! execute, the unit they run on (CUDA cores in fp32, bf16 tensor cores, ...) and the bytes it
//! must move to and from device memory (each input read once, each output written once —
//! compulsory traffic, not what a given kernel happens to re-read). The floor of a launch is
//! `max(flops / unit rate, bytes / bandwidth)`: no kernel doing that work can beat it.
//!
//! The estimate ([`Estimate`]) of a launch is `max(memory, tensor, issue) + launch`:
//! - memory: the declared bytes over the card's achievable bandwidth;
//! - tensor: the declared FLOPs over the rate of the unit that runs them — mma.sync's for
//!   our tensor-core kernels (their SASS has HMMA), the wgmma rate for cuBLAS — scaled down
//!   when the grid has fewer warps than the card has SM sub-partitions;
//! - issue: the warp instructions the kernel's sm_90 code issues (`crate::cuda::sass`) over
//!   the schedulers' rate (one per clock per sub-partition, at most one per warp): the loop
//!   parts that issue the kernel's arithmetic (HMMA, else FFMA) run as often as the declared
//!   FLOPs need, parts that move global memory as often as the declared bytes need, the rest
//!   and straight-line code once per warp ([`issue_instructions`]; a lower bound where a
//!   loop's real trip count exceeds these);
//! - launch: a fixed cost per launch issued on its own, a smaller one per node of a step
//!   graph (`graph.rs`), plus one launch per graph.
//!
//! The device keeps a [`CostLog`] of every launch when asked (`vox2vec-train --bench-plan`
//! runs a whole step in plan mode, where nothing executes, and `--bench N` on a GPU prints the
//! measured time beside each floor).

use std::collections::BTreeMap;

use super::sass::{Kernel, Loop};

/// Where a kernel's arithmetic runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// No arithmetic worth counting (copies, element-wise ops): the floor is the bytes.
    Memory,
    /// fp32 FMAs on CUDA cores (today's exact kernels, fp32 cuBLAS SGEMM).
    Fp32,
    /// bf16 inputs, fp32 accumulation on tensor cores (mma.sync / cuBLAS bf16).
    TensorBf16,
    /// TF32 tensor cores (cuBLAS with TF32 math).
    TensorTf32,
    /// Host <-> device copies: bytes over PCIe.
    Pcie,
}

/// The declared work of one launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
    pub unit: Unit,
}

impl Cost {
    /// A memory-bound kernel moving `bytes`.
    pub fn mem(bytes: usize) -> Cost {
        Cost { flops: 0.0, bytes: bytes as f64, unit: Unit::Memory }
    }
    /// An fp32 CUDA-core kernel.
    pub fn fp32(flops: f64, bytes: usize) -> Cost {
        Cost { flops, bytes: bytes as f64, unit: Unit::Fp32 }
    }
    /// A bf16 tensor-core kernel.
    pub fn tensor_bf16(flops: f64, bytes: usize) -> Cost {
        Cost { flops, bytes: bytes as f64, unit: Unit::TensorBf16 }
    }
    /// A TF32 tensor-core matrix product (cuBLAS with TF32 math).
    pub fn tensor_tf32(flops: f64, bytes: usize) -> Cost {
        Cost { flops, bytes: bytes as f64, unit: Unit::TensorTf32 }
    }
    /// A host <-> device copy.
    pub fn pcie(bytes: usize) -> Cost {
        Cost { flops: 0.0, bytes: bytes as f64, unit: Unit::Pcie }
    }
    /// The floor of this launch on `m`, in seconds.
    pub fn floor_s(&self, m: &Machine) -> f64 {
        let rate = match self.unit {
            Unit::Memory => f64::INFINITY,
            Unit::Fp32 => m.fp32_flops,
            Unit::TensorBf16 => m.bf16_tensor_flops,
            Unit::TensorTf32 => m.tf32_tensor_flops,
            Unit::Pcie => return self.bytes / m.pcie_bytes_per_s,
        };
        (self.flops / rate).max(self.bytes / m.hbm_bytes_per_s)
    }
}

/// FLOPs of one warp-wide HMMA.16816 (m16n8k16: 16 x 8 x 16 multiply-adds).
pub const HMMA_FLOPS: f64 = 2.0 * 16.0 * 8.0 * 16.0;
/// FLOPs of one warp-wide FFMA (32 lanes, one multiply-add each).
pub const FFMA_FLOPS: f64 = 2.0 * 32.0;

/// Warp instructions a launch of `k` issues for the declared work `c` with `warps` warps in
/// its grid (the model of the module doc), over the own parts of its loops (`Kernel::own_part`:
/// each instruction counted once): the parts that issue the kernel's arithmetic (HMMA, else
/// FFMA) pass together as often as the declared FLOPs need, the parts that move global
/// memory together as often as the declared bytes need, every other part and the straight-line
/// code once per warp.
pub fn issue_instructions(k: &Kernel, c: &Cost, warps: u64) -> f64 {
    let warps = warps as f64;
    let (ops_of, total_ops): (fn(&Loop) -> u32, f64) = if k.hmma > 0 {
        (|l| l.hmma, c.flops / HMMA_FLOPS)
    } else if k.ffma > 0 && c.flops > 0.0 {
        (|l| l.ffma, c.flops / FFMA_FLOPS)
    } else {
        (|_| 0, 0.0)
    };
    let (hot, rest): (Vec<&Loop>, Vec<&Loop>) = k.own_parts().iter().partition(|l| ops_of(l) > 0);
    let mut n = warps * k.straight as f64;
    let per_pass_ops: u32 = hot.iter().map(|l| ops_of(l)).sum();
    if per_pass_ops > 0 {
        let per_pass: u32 = hot.iter().map(|l| l.instructions).sum();
        n += (total_ops / per_pass_ops as f64).max(warps) * per_pass as f64;
    }
    let bytes_per_pass: u32 = rest.iter().map(|l| l.global_bytes).sum();
    for l in rest {
        let passes = if l.global_bytes > 0 { (c.bytes / bytes_per_pass as f64).max(warps) } else { warps };
        n += passes * l.instructions as f64;
    }
    n
}

/// One launch priced on a card: the parts of [`Estimate::seconds`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    pub memory_s: f64,
    pub tensor_s: f64,
    pub issue_s: f64,
    pub launch_s: f64,
    /// Warp instructions issued (0 without the kernel's SASS).
    pub instructions: f64,
}

impl Estimate {
    /// `max(memory, tensor, issue) + launch`.
    pub fn seconds(&self) -> f64 {
        self.memory_s.max(self.tensor_s).max(self.issue_s) + self.launch_s
    }
}

/// The estimate of one launch of `code` (None: no SASS, e.g. cuBLAS) over `warps` warps (None:
/// unknown, e.g. cuBLAS) doing the declared work `c` on `m`.
pub fn estimate(c: &Cost, m: &Machine, code: Option<&Kernel>, warps: Option<u64>) -> Estimate {
    let slots = 4.0 * m.sms as f64;
    let occupancy = warps.map_or(1.0, |w| (w as f64 / slots).min(1.0));
    let memory_s = match c.unit {
        Unit::Pcie => c.bytes / m.pcie_bytes_per_s,
        _ => c.bytes / m.hbm_bytes_per_s,
    };
    let rate = match c.unit {
        Unit::Memory | Unit::Pcie => f64::INFINITY,
        Unit::Fp32 => m.fp32_flops,
        Unit::TensorBf16 if code.is_some_and(|k| k.hmma > 0) => m.mma_sync_flops,
        Unit::TensorBf16 => m.bf16_tensor_flops,
        Unit::TensorTf32 => m.tf32_tensor_flops,
    };
    let tensor_s = c.flops / (rate * occupancy);
    let (instructions, issue_s) = match (code, warps) {
        (Some(k), Some(w)) if w > 0 => {
            let n = issue_instructions(k, c, w);
            (n, n / ((w as f64).min(slots) * m.clock_hz))
        }
        _ => (0.0, 0.0),
    };
    let launch_s = if c.unit == Unit::Pcie { 0.0 } else { m.launch_s };
    Estimate { memory_s, tensor_s, issue_s, launch_s, instructions }
}

/// Sustained rates of one GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    pub name: &'static str,
    /// `--card` name.
    pub card: &'static str,
    pub hbm_bytes_per_s: f64,
    pub fp32_flops: f64,
    /// bf16 tensor-core rate of cuBLAS (wgmma on Hopper).
    pub bf16_tensor_flops: f64,
    /// bf16 rate of mma.sync m16n8k16 (our tensor-core kernels).
    pub mma_sync_flops: f64,
    pub tf32_tensor_flops: f64,
    pub pcie_bytes_per_s: f64,
    pub sms: u32,
    /// SM clock under load.
    pub clock_hz: f64,
    /// The cost of one kernel launch in a stream (no CUDA graph).
    pub launch_s: f64,
    /// The cost of one kernel node of a launched CUDA graph (the gap between dependent
    /// kernels, with no host call per kernel).
    pub graph_node_s: f64,
}

/// One H100 SXM: HBM3 at the ~3.0 TB/s a device-to-device copy reaches (read + written),
/// cuBLAS bf16 at the ~790 TFLOP/s measured on such a machine here, mma.sync at ~550 (its
/// sustained rate on Hopper, below wgmma's), fp32 at 80 % of 67 TFLOP/s, 132 SMs at
/// 1.755 GHz, 2.5 µs per launch and 1 µs per graph node (assumed, to be measured:
/// `gpu-bundle` times the step with and without graphs).
pub const H100: Machine = Machine {
    name: "H100 SXM (sustained: 3.0 TB/s, 790 TFLOP/s bf16 cuBLAS, 550 mma.sync, 395 TF32, 54 fp32; 132 SMs at 1.755 GHz, 2.5 us per launch, 1 us per graph node)",
    card: "h100",
    hbm_bytes_per_s: 3.0e12,
    fp32_flops: 54e12,
    bf16_tensor_flops: 790e12,
    mma_sync_flops: 550e12,
    tf32_tensor_flops: 395e12,
    pcie_bytes_per_s: 50e9,
    sms: 132,
    clock_hz: 1.755e9,
    launch_s: 2.5e-6,
    graph_node_s: 1.0e-6,
};

/// One H200 SXM at about 80 % of its data-sheet rates (4.8 TB/s HBM3e, 989 TFLOP/s dense
/// bf16, 494 TF32, 67 fp32 on CUDA cores; PCIe 5 x16 at 64 GB/s): ~4.3 TB/s (what a copy
/// reaches here), ~790 TFLOP/s bf16 through cuBLAS; the same chip as the H100 otherwise.
pub const H200: Machine = Machine {
    name: "H200 SXM (sustained: 4.3 TB/s, 790 TFLOP/s bf16 cuBLAS, 550 mma.sync, 395 TF32, 54 fp32; 132 SMs at 1.755 GHz, 2.5 us per launch, 1 us per graph node)",
    card: "h200",
    hbm_bytes_per_s: 4.3e12,
    ..H100
};

/// The card of a `--card` name.
pub fn card(name: &str) -> Option<Machine> {
    [H100, H200].into_iter().find(|m| m.card.eq_ignore_ascii_case(name))
}

/// The card that prices a real GPU's measurements, from its name (H100 unless it says H200).
pub fn card_of_gpu(name: &str) -> Machine {
    if name.contains("H200") { H200 } else { H100 }
}

/// Per kernel family: launches and summed costs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FamilyCost {
    pub launches: u64,
    pub flops: f64,
    pub bytes: f64,
    pub floor_s: f64,
    /// The floor if every FLOP ran on bf16 tensor cores (the target engine's floor).
    pub tensor_floor_s: f64,
    /// The estimate's parts, summed over the launches, and its total.
    pub estimate: Estimate,
    pub estimate_s: f64,
    /// Whether the family's kernel had SASS to price its issue time.
    pub has_sass: bool,
}

impl FamilyCost {
    /// What bounds the family: the largest of its summed memory, tensor, issue and launch times.
    pub fn bound(&self) -> &'static str {
        let e = &self.estimate;
        [("memory", e.memory_s), ("tensor", e.tensor_s), ("issue", e.issue_s), ("launch", e.launch_s)]
            .into_iter()
            .fold(("memory", -1.0), |a, b| if b.1 > a.1 { b } else { a })
            .0
    }
}

/// Every launch's cost since logging began, by kernel family.
#[derive(Clone, Debug, Default)]
pub struct CostLog {
    pub families: BTreeMap<String, FamilyCost>,
}

/// A kernel's family: its symbol without the activation-type suffix (`relu_forward_bf16` ->
/// `relu_forward`); the two conversions `cast_f32_to_bf16` and `cast_bf16_to_f32` are `cast`.
pub fn family(kernel: &str) -> &str {
    if kernel.starts_with("cast_") {
        return "cast";
    }
    ["_f32x4", "_bf16x8", "_f32", "_bf16"].iter().find_map(|s| kernel.strip_suffix(s)).unwrap_or(kernel)
}

impl CostLog {
    /// Record a launch without its grid or code (cuBLAS, copies): floor, memory, tensor and
    /// launch times only.
    pub fn record(&mut self, kernel: &str, c: Cost, m: &Machine) {
        self.record_launch(kernel, c, m, None, None)
    }

    /// Record one launch of `kernel` with `warps` warps in its grid and `code` its SASS summary.
    pub fn record_launch(&mut self, kernel: &str, c: Cost, m: &Machine, warps: Option<u64>, code: Option<&Kernel>) {
        let e = estimate(&c, m, code, warps);
        let f = self.families.entry(family(kernel).to_string()).or_default();
        f.estimate.memory_s += e.memory_s;
        f.estimate.tensor_s += e.tensor_s;
        f.estimate.issue_s += e.issue_s;
        f.estimate.launch_s += e.launch_s;
        f.estimate.instructions += e.instructions;
        f.estimate_s += e.seconds();
        f.has_sass |= code.is_some();
        f.launches += 1;
        f.flops += c.flops;
        f.bytes += c.bytes;
        f.floor_s += c.floor_s(m);
        let tensor = match c.unit {
            Unit::Fp32 | Unit::TensorTf32 => Cost { unit: Unit::TensorBf16, ..c },
            _ => c,
        };
        f.tensor_floor_s += tensor.floor_s(m);
    }

    pub fn launches(&self) -> u64 {
        self.families.values().map(|f| f.launches).sum()
    }

    pub fn floor_s(&self) -> f64 {
        self.families.values().map(|f| f.floor_s).sum()
    }

    /// The estimate of the whole log (each launch's `max(memory, tensor, issue) + launch`).
    pub fn estimate_s(&self) -> f64 {
        self.families.values().map(|f| f.estimate_s).sum()
    }

    /// The log scaled by 1 / n (per step, over n steps).
    pub fn per_step(&self, n: usize) -> CostLog {
        let k = 1.0 / n.max(1) as f64;
        let families = self
            .families
            .iter()
            .map(|(name, f)| {
                let e = &f.estimate;
                let estimate = Estimate {
                    memory_s: e.memory_s * k,
                    tensor_s: e.tensor_s * k,
                    issue_s: e.issue_s * k,
                    launch_s: e.launch_s * k,
                    instructions: e.instructions * k,
                };
                let g = FamilyCost {
                    launches: f.launches / n.max(1) as u64,
                    flops: f.flops * k,
                    bytes: f.bytes * k,
                    floor_s: f.floor_s * k,
                    tensor_floor_s: f.tensor_floor_s * k,
                    estimate,
                    estimate_s: f.estimate_s * k,
                    has_sass: f.has_sass,
                };
                (name.clone(), g)
            })
            .collect();
        CostLog { families }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_is_the_slower_of_math_and_memory() {
        let m = H200;
        // 1 GB of traffic and no math: bytes / bandwidth.
        assert!((Cost::mem(1 << 30).floor_s(&m) - (1u64 << 30) as f64 / 4.3e12).abs() < 1e-12);
        // 1 TFLOP on bf16 tensor cores with 1 MB: math-bound.
        assert!((Cost::tensor_bf16(1e12, 1 << 20).floor_s(&m) - 1e12 / 790e12).abs() < 1e-12);
        // The same FLOPs on CUDA cores take longer.
        assert!(Cost::fp32(1e12, 1 << 20).floor_s(&m) > 10.0 * Cost::tensor_bf16(1e12, 1 << 20).floor_s(&m));
    }

    #[test]
    fn families_merge_dtype_variants() {
        let mut log = CostLog::default();
        log.record("relu_forward_f32", Cost::mem(100), &H200);
        log.record("relu_forward_bf16", Cost::mem(50), &H200);
        log.record("cublas_sgemm", Cost::fp32(2e9, 1000), &H200);
        log.record("cast_f32_to_bf16", Cost::mem(6), &H200);
        assert_eq!(family("cast_bf16_to_f32"), "cast");
        assert_eq!(log.families.len(), 3);
        let r = &log.families["relu_forward"];
        assert_eq!((r.launches, r.bytes), (2, 150.0));
        assert_eq!(log.launches(), 4);
        let g = &log.families["cublas_sgemm"];
        assert!(g.tensor_floor_s < g.floor_s);
    }
}
