//! The performance model: what each launch must compute and move, and the floor time that
//! follows on a given GPU.
//!
//! Every launcher declares a [`Cost`] for its kernel from the shapes alone: the FLOPs it must
//! execute, the unit they run on (CUDA cores in fp32, bf16 tensor cores, ...) and the bytes it
//! must move to and from device memory (each input read once, each output written once —
//! compulsory traffic, not what a given kernel happens to re-read). The floor of a launch is
//! `max(flops / unit rate, bytes / bandwidth)`: no kernel doing that work can beat it.
//!
//! The device keeps a [`CostLog`] of every launch when asked (`vox2vec-train --bench-plan`
//! runs a whole step in plan mode, where nothing executes, and `--bench N` on a GPU prints the
//! measured time beside each floor).

use std::collections::BTreeMap;

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

/// Sustained rates of one GPU.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    pub name: &'static str,
    pub hbm_bytes_per_s: f64,
    pub fp32_flops: f64,
    pub bf16_tensor_flops: f64,
    pub tf32_tensor_flops: f64,
    pub pcie_bytes_per_s: f64,
}

/// One H200 SXM at about 80 % of its data-sheet rates (4.8 TB/s HBM3e, 989 TFLOP/s dense
/// bf16, 494 TF32, 67 fp32 on CUDA cores; PCIe 5 x16 at 64 GB/s): the sustained figures
/// (~4.3 TB/s, ~790 TFLOP/s bf16) that the step's targets are stated against.
pub const H200: Machine = Machine {
    name: "H200 SXM (sustained: 4.3 TB/s, 790 TFLOP/s bf16, 395 TF32, 54 fp32)",
    hbm_bytes_per_s: 4.3e12,
    fp32_flops: 54e12,
    bf16_tensor_flops: 790e12,
    tf32_tensor_flops: 395e12,
    pcie_bytes_per_s: 50e9,
};

/// Per kernel family: launches and summed costs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FamilyCost {
    pub launches: u64,
    pub flops: f64,
    pub bytes: f64,
    pub floor_s: f64,
    /// The floor if every FLOP ran on bf16 tensor cores (the target engine's floor).
    pub tensor_floor_s: f64,
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
    kernel.strip_suffix("_f32").or_else(|| kernel.strip_suffix("_bf16")).unwrap_or(kernel)
}

impl CostLog {
    pub fn record(&mut self, kernel: &str, c: Cost, m: &Machine) {
        let f = self.families.entry(family(kernel).to_string()).or_default();
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

    /// The log scaled by 1 / n (per step, over n steps).
    pub fn per_step(&self, n: usize) -> CostLog {
        let k = 1.0 / n.max(1) as f64;
        let families = self
            .families
            .iter()
            .map(|(name, f)| {
                let g = FamilyCost { launches: f.launches / n.max(1) as u64, flops: f.flops * k, bytes: f.bytes * k, floor_s: f.floor_s * k, tensor_floor_s: f.tensor_floor_s * k };
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
