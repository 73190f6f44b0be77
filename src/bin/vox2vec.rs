//! vox2vec: tools around pretrained backbones. Today: inspect a checkpoint and export the
//! backbone as a bare FPN3d state_dict for PyTorch. Embedding, probing, fine-tuning and
//! prediction come with the data and evaluation work.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use safetensors::tensor::SafeTensors;

#[derive(Parser)]
#[command(version, about = "vox2vec feature tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a checkpoint's metadata, parameter counts and tensors.
    Inspect {
        checkpoint: PathBuf,
        /// List every tensor.
        #[arg(long)]
        all: bool,
    },
    /// Write the backbone alone with bare FPN3d keys (loadable by PyTorch's FPN3d.load_state_dict).
    ExportBackbone { checkpoint: PathBuf, out: PathBuf },
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Inspect { checkpoint, all } => {
            let bytes = read(&checkpoint)?;
            let (_, header) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: not a safetensors file", checkpoint.display()))?;
            let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", checkpoint.display()))?;
            if let Some(meta) = header.metadata() {
                let mut keys: Vec<_> = meta.keys().collect();
                keys.sort();
                for k in keys {
                    println!("{k}: {}", meta[k]);
                }
            }
            let mut names = st.names();
            names.sort();
            let mut groups: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
            for n in &names {
                let t = st.tensor(n)?;
                let group = if n.starts_with("optim.") { "optim" } else if n.starts_with("head.") { "head" } else { "backbone" };
                let e = groups.entry(group.to_string()).or_default();
                e.0 += 1;
                e.1 += t.shape().iter().product::<usize>();
                if all {
                    println!("  {n} {:?} {:?}", t.dtype(), t.shape());
                }
            }
            for (g, (n, v)) in groups {
                println!("{g}: {n} tensors, {v} values");
            }
        }
        Cmd::ExportBackbone { checkpoint, out } => {
            let bytes = read(&checkpoint)?;
            let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", checkpoint.display()))?;
            let mut views = Vec::new();
            for (name, view) in st.tensors() {
                if let Some(k) = name.strip_prefix(vox2vec::model::BACKBONE_PREFIX) {
                    views.push((k.to_string(), view));
                }
            }
            anyhow::ensure!(!views.is_empty(), "{}: no backbone tensors", checkpoint.display());
            let n = views.len();
            let bytes = safetensors::serialize(views, None)?;
            vox2vec::checkpoint::write_atomic(&out, &bytes)?;
            println!("wrote {n} backbone tensors to {}", out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
