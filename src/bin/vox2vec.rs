//! vox2vec: tools around CT data and pretrained backbones: preprocess CT into the cache,
//! inspect a checkpoint, export the backbone as a bare FPN3d state_dict for PyTorch.
//! Embedding, probing, fine-tuning and prediction come with the evaluation work.

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
    /// Backbone features of a CT (NIfTI: preprocessing, sliding window 128×128×32 with overlap
    /// 0.5 and the reference's central-region stitching; level_<i>.npy as [C, X, Y, Z] in the
    /// preprocessed grid, described by geometry.json) or of an already preprocessed patch
    /// (.npy float32 X×Y×Z: every level of the raw pyramid, eval mode, pyramid_<i>.npy).
    Embed {
        input: PathBuf,
        /// A vox2vec-rs checkpoint or a bare FPN3d state_dict in safetensors.
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Pyramid levels to write for a CT.
        #[arg(long, value_delimiter = ',', default_value = "0")]
        levels: Vec<usize>,
        /// Write float16 instead of float32.
        #[arg(long)]
        f16: bool,
        /// Backbone size when the weights carry no model_config.
        #[arg(long, default_value_t = 16)]
        base_channels: usize,
        #[arg(long, default_value_t = 6)]
        num_scales: usize,
        /// Sliding-window patch X,Y,Z.
        #[arg(long, default_value = "128,128,32")]
        patch: String,
    },
    /// Preprocess CT into the cache (crop to body, resample to 1×1×2 mm, body mask):
    /// multi-threaded and resumable (finished entries are kept; a killed run continues).
    Preprocess {
        /// A NIfTI file, a folder of them, an nnU-Net raw dataset folder, or a text file of paths.
        input: PathBuf,
        #[arg(long, default_value = "runs/cache")]
        cache: PathBuf,
        /// Keep going past unusable files (listed at the end); without it they make the exit code non-zero.
        #[arg(long)]
        skip_bad: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Embed { input, weights, out, levels, f16, base_channels, num_scales, patch } => {
            embed(&input, &weights, &out, &levels, f16, base_channels, num_scales, &patch)?;
        }
        Cmd::Preprocess { input, cache, skip_bad, threads } => {
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
            }
            preprocess(&input, &cache, skip_bad)?;
        }
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

/// The backbone described by (and loaded from) `weights`.
fn load_backbone(weights: &std::path::Path, base: usize, scales: usize) -> Result<vox2vec::model::Vox2Vec> {
    use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
    let bytes = std::fs::read(weights).with_context(|| format!("reading {}", weights.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{}: not a safetensors file", weights.display()))?;
    let mut cfg = ModelConfig { fpn: FpnConfig { in_channels: 1, base_channels: base, num_scales: scales }, ..ModelConfig::default() };
    if let Some(mc) = header.metadata().as_ref().and_then(|m| m.get("model_config")) {
        let v: serde_json::Value = serde_json::from_str(mc).with_context(|| format!("{}: bad model_config", weights.display()))?;
        let get = |k: &str| v[k].as_u64().map(|x| x as usize).with_context(|| format!("{}: model_config lacks {k}", weights.display()));
        cfg.fpn = FpnConfig { in_channels: get("in_channels")?, base_channels: get("base_channels")?, num_scales: get("num_scales")? };
        cfg.proj_dim = get("proj_dim")?;
    }
    let mut model = Vox2Vec::new(cfg, 0);
    let loaded = vox2vec::checkpoint::load(weights, &mut model.store, None)?;
    let missing: Vec<&String> = loaded.missing.iter().filter(|k| k.starts_with(vox2vec::model::BACKBONE_PREFIX)).collect();
    anyhow::ensure!(missing.is_empty(), "{}: {} backbone tensors missing (first: {}); wrong --base-channels / --num-scales?", weights.display(), missing.len(), missing[0]);
    Ok(model)
}

#[allow(clippy::too_many_arguments)]
fn embed(input: &std::path::Path, weights: &std::path::Path, out: &std::path::Path, levels: &[usize], f16: bool, base: usize, scales: usize, patch: &str) -> Result<()> {
    use vox2vec::eval::{embed, npy};
    let mut model = load_backbone(weights, base, scales)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |path: &std::path::Path, shape: &[usize], v: &[f32]| if f16 { npy::write_f16(path, shape, v) } else { npy::write_f32(path, shape, v) };
    if input.extension().is_some_and(|e| e == "npy") {
        let (shape, x) = npy::read_f32(input)?;
        anyhow::ensure!(shape.len() == 3, "{}: expected an X×Y×Z array, found shape {shape:?}", input.display());
        let pyr = embed::patch_pyramid(&mut model, &x, [shape[0], shape[1], shape[2]])?;
        for (i, (s, v)) in pyr.iter().enumerate() {
            write(&out.join(format!("pyramid_{i}.npy")), s, v)?;
        }
        println!("wrote {} pyramid levels to {}", pyr.len(), out.display());
        return Ok(());
    }
    let p: Vec<usize> = patch.split(',').map(|t| t.trim().parse()).collect::<Result<_, _>>().with_context(|| format!("--patch {patch:?}"))?;
    anyhow::ensure!(p.len() == 3, "--patch needs X,Y,Z");
    let e = vox2vec::data::cache::build(input, &vox2vec::data::preprocess::PreprocessConfig::default())?;
    let ct = &e.ct;
    let x = embed::scale_hu(&ct.hu);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("embedding {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}")?);
    let maps = embed::embed_volume(&mut model, &x, ct.shape, [p[0], p[1], p[2]], levels, &|n, total| {
        bar.set_length(total as u64);
        bar.set_position(n as u64);
    })?;
    bar.finish_and_clear();
    for m in &maps {
        let v = vox2vec::tensor::nxyzc_to_ncxyz(&m.values, 1, m.channels, m.shape.iter().product());
        write(&out.join(format!("level_{}.npy", m.level)), &[m.channels, m.shape[0], m.shape[1], m.shape[2]], &v)?;
    }
    // The preprocessed grid in world coordinates: canonical index → file grid → world.
    let geo = serde_json::json!({
        "source": e.source,
        "shape": ct.shape,
        "spacing_mm": ct.spacing,
        "crop_box_canonical": ct.crop_box,
        "source_shape_canonical": ct.source_shape,
        "source_spacing_mm": ct.source_spacing,
        "file_affine": e.file_affine,
        "orientation": {"perm": e.orientation.perm, "flip": e.orientation.flip},
        "levels": levels,
        "layout": "level_<i>.npy: [C, X, Y, Z], canonical axes (x, y, z world-increasing), level i = preprocessed grid / 2^i (ceil)",
    });
    vox2vec::checkpoint::write_atomic(&out.join("geometry.json"), serde_json::to_string_pretty(&geo)?.as_bytes())?;
    println!("wrote levels {levels:?} of {} ({:?} voxels at 1x1x2 mm) to {}", input.display(), ct.shape, out.display());
    Ok(())
}

fn preprocess(input: &std::path::Path, cache: &std::path::Path, skip_bad: bool) -> Result<()> {
    use vox2vec::data::preprocess::PreprocessConfig;
    let report = vox2vec::data::sources::prepare_input(input, cache, &PreprocessConfig::default(), [1, 1, 1])?;
    println!("{}", report.summary(cache));
    anyhow::ensure!(!report.entries.is_empty(), "no usable volume in {}", input.display());
    anyhow::ensure!(report.skipped.is_empty() || skip_bad, "{} unusable files (listed above)", report.skipped.len());
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
