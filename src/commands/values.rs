//! Typed values of the flags both binaries share: `--device`, `--precision`, `--card`.

use anyhow::Result;

use crate::tensor::{DType, Device};

/// `--device`: where a command computes. `auto` is a CUDA GPU when one can be used, else the
/// CPU; resolving it (`resolve`) checks that the device exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let spec = s.trim().to_ascii_lowercase();
        match spec.as_str() {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: use cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Auto => write!(f, "auto"),
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The device, checked: a CUDA device must be usable and present.
    pub fn resolve(self) -> Result<Device> {
        crate::cuda::parse_device(&self.to_string())
    }

    /// The device with activations of `precision`: bf16 on the CPU is refused, naming both flags.
    pub fn with_precision(self, precision: Precision) -> Result<(Device, DType)> {
        crate::cuda::parse_device_and_precision(&self.to_string(), precision.name())
    }
}

/// `--precision`: how activations are stored on a CUDA device (arithmetic, weights and their
/// gradients stay fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    #[value(alias = "f32", alias = "float32")]
    Fp32,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// `--card`: the GPU whose rates price a plan (`cuda::cost`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Card {
    H100,
    H200,
}

impl Card {
    pub fn name(self) -> &'static str {
        match self {
            Card::H100 => "h100",
            Card::H200 => "h200",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DeviceArg;

    #[test]
    fn device_values_parse_and_print_back() {
        for (s, d) in [
            ("auto", DeviceArg::Auto),
            ("CPU", DeviceArg::Cpu),
            ("gpu", DeviceArg::Cuda(0)),
            ("cuda:3", DeviceArg::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceArg>().unwrap(), d);
            assert_eq!(d.to_string().parse::<DeviceArg>().unwrap(), d);
        }
        for bad in ["tpu", "cuda:", "cuda:-1", "cuda:x"] {
            assert!(bad.parse::<DeviceArg>().unwrap_err().contains("unknown device"), "{bad}");
        }
    }
}
