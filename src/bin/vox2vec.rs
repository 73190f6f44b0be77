//! vox2vec: the tools around CT data and pretrained backbones (preprocess, inspect, convert,
//! embed, similar, probe / finetune / scratch, predict, bench-infer). Argument parsing and
//! dispatch only: each command's work is in `vox2vec::commands`.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use vox2vec::commands::{
    EmbedOutput, NetArgs, SegArgs, convert, embed, inspect, predict, preprocess, segment, similar,
};

#[derive(Parser)]
#[command(version, about = "vox2vec feature tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print what a weights file is (our checkpoint, a head, a PyTorch .pt / Lightning .ckpt, a
    /// bare state_dict), the model it holds (recorded or inferred), its metadata and tensors.
    Inspect {
        checkpoint: PathBuf,
        /// List every tensor.
        #[arg(long)]
        all: bool,
    },
    /// Write the backbone alone with bare FPN3d keys (loadable by PyTorch's FPN3d.load_state_dict).
    ExportBackbone { checkpoint: PathBuf, out: PathBuf },
    /// Write the backbone of any weights file as a bare FPN3d state_dict in safetensors: our
    /// checkpoints, PyTorch .pt/.pth (torch.save, zip or legacy), Lightning .ckpt (module
    /// prefixes such as backbone. or model.backbone. recognised), safetensors state_dicts.
    Convert { input: PathBuf, out: PathBuf },
    /// Backbone features of a CT (NIfTI or DICOM series: preprocessing, sliding window 128×128×32 with overlap
    /// 0.5 and the reference's central-region stitching; level_<i>.npy as [C, X, Y, Z] in the
    /// preprocessed grid, described by geometry.json) or of an already preprocessed patch
    /// (.npy float32 X×Y×Z: every level of the raw pyramid, eval mode, pyramid_<i>.npy).
    Embed {
        /// A NIfTI CT, a DICOM series (folder or DICOMDIR), a .npy patch, or several CTs: a folder (searched recursively), an
        /// nnU-Net dataset (its imagesTr) or a text file of paths; then each CT goes into
        /// <out>/<name>/, and the next CT is read while this one is embedded.
        input: PathBuf,
        /// Weights: a vox2vec-rs checkpoint, a bare FPN3d state_dict (safetensors or PyTorch
        /// .pt/.pth), or a Lightning .ckpt; the model's size comes from the file.
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        output: EmbedOutput,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Voxel similarity search: the embedding of one voxel of --query (every pyramid level at
    /// that voxel, concatenated and normalised) against every voxel of each --target. Writes
    /// per target <name>_similarity.nii.gz (cosine similarity on the target's own grid),
    /// <name>_match.png (slices through the query point and the best match, heat map over the
    /// CT) and matches.json (the best match in voxel and world coordinates).
    Similar {
        /// Weights (as for embed).
        #[arg(long)]
        weights: PathBuf,
        /// The CT the point is in (NIfTI, or a DICOM series folder).
        #[arg(long)]
        query: PathBuf,
        /// The query point: X,Y,Z voxel indices of the query file (0-based, the file's own
        /// axes, as nibabel or 3D Slicer's IJK show them), or world millimetres with --world.
        #[arg(long, allow_hyphen_values = true)]
        point: String,
        /// --point is in world coordinates (NIfTI's RAS, mm), not voxel indices.
        #[arg(long)]
        world: bool,
        /// CTs to search (NIfTI or DICOM series folders), one or more.
        #[arg(long, num_args = 1.., required = true)]
        target: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Linear or non-linear probing: train a head on the frozen backbone (eval-mode BatchNorm).
    Probe(SegArgs),
    /// Fine-tuning: head first, then backbone and head together after --unfreeze-after steps.
    Finetune {
        #[command(flatten)]
        seg: SegArgs,
        #[arg(long, default_value_t = 200)]
        unfreeze_after: u64,
    },
    /// The same network trained from scratch (random backbone, no --weights needed).
    Scratch(SegArgs),
    /// Segment a CT with a backbone and a trained head: a label map on the input's own grid.
    Predict {
        /// A NIfTI CT or DICOM series, or several: a folder, an nnU-Net dataset (its imagesTr) or a text file
        /// of paths; then --out is a folder of <name>.nii.gz masks (--probabilities <dir>/<name>/),
        /// and the next CT is read while this one is segmented.
        ct: PathBuf,
        #[arg(long)]
        backbone: PathBuf,
        #[arg(long)]
        head: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also write each class's probability (float32 NIfTI on the input's grid) into this folder.
        #[arg(long)]
        probabilities: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Inference speed: patches/s of the eval-mode pyramid (what `embed` and `predict` run per
    /// window) at each window batch and precision, with peak memory, on the chosen device;
    /// `--plan` prices the same passes on an H100 without a GPU (memory and per-kernel floor).
    BenchInfer(vox2vec::commands::BenchInferArgs),
    /// Preprocess CT into the cache (crop to body, resample to 1×1×2 mm, body mask):
    /// multi-threaded and resumable (finished entries are kept; a killed run continues).
    Preprocess {
        /// CTs: a NIfTI file, a DICOM series (a folder of its files, or its DICOMDIR), a folder
        /// of either (searched recursively), an nnU-Net raw dataset folder (imagesTr), or a
        /// text file of such paths, one per line.
        input: PathBuf,
        #[arg(long, default_value = "runs/cache")]
        cache: PathBuf,
        /// Keep going past unusable files (listed at the end); without it they make the exit code non-zero.
        #[arg(long)]
        skip_bad: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// NaN or infinite voxels in a CT: "error" refuses the file, "minimum" replaces them by the
        /// image's minimum and reports how many.
        #[arg(long, default_value = "error", value_name = "POLICY")]
        nonfinite: vox2vec::data::preprocess::NonFinitePolicy,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Embed { input, weights, out, output, net } => embed(&input, &weights, &out, &output, &net)?,
        Cmd::Similar { weights, query, point, world, target, out, net } => {
            similar(&weights, &query, &point, world, &target, &out, &net)?
        }
        Cmd::Probe(a) => segment(&a, vox2vec::eval::segment::Mode::Probe)?,
        Cmd::Finetune { seg, unfreeze_after } => {
            segment(&seg, vox2vec::eval::segment::Mode::FineTune { unfreeze_after })?
        }
        Cmd::Scratch(a) => segment(&a, vox2vec::eval::segment::Mode::Scratch)?,
        Cmd::Predict { ct, backbone, head, out, probabilities, net } => {
            predict(&ct, &backbone, &head, &out, probabilities.as_deref(), &net)?
        }
        Cmd::BenchInfer(a) => vox2vec::commands::bench_infer(&a)?,
        Cmd::Preprocess { input, cache, skip_bad, threads, nonfinite } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
            }
            preprocess(&input, &cache, skip_bad, nonfinite)?;
        }
        Cmd::Inspect { checkpoint, all } => inspect(&checkpoint, all)?,
        Cmd::ExportBackbone { checkpoint, out } => convert(&checkpoint, &out)?,
        Cmd::Convert { input, out } => convert(&input, &out)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`vox2vec inspect --all | head`) as other Unix tools do,
    // instead of panicking inside println!.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Sliding windows free and re-allocate the same large buffers window after window.
    vox2vec::cpu::retain_freed_memory();
    let r = run(Cli::parse());
    // VOX2VEC_PROFILE=1: time per op and shape on the CPU backend (empty otherwise).
    eprint!("{}", vox2vec::profile::report());
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
