//! `embed`: the backbone's features of a CT (or of a preprocessed patch) written as arrays,
//! NIfTI, and a PCA picture.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::*;

/// A file format of `embed`'s features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FeatureFormat {
    /// level_<i>.npy, [C, X, Y, Z].
    Npy,
    /// level_<i>.nii.gz, 4-D float32 with channels on the 4th axis and the grid's affine.
    Nifti,
}

/// What `embed` writes for a CT.
#[derive(clap::Args, Debug, Clone)]
pub struct EmbedOutput {
    /// Pyramid levels to write for a CT.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub levels: Vec<usize>,
    /// File formats, comma-separated: npy (level_<i>.npy, [C, X, Y, Z]) and/or nifti
    /// (level_<i>.nii.gz, 4-D float32 with channels on the 4th axis and the grid's affine, for
    /// 3D Slicer, ITK-SNAP, nibabel).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "npy")]
    pub format: Vec<FeatureFormat>,
    /// Write float16 instead of float32 (.npy only: NIfTI has no float16 type).
    #[arg(long)]
    pub f16: bool,
    /// Combine windows with MONAI-style Gaussian weights instead of the reference's
    /// central regions.
    #[arg(long)]
    pub gaussian: bool,
    /// Also write each level resampled (nearest) onto the input file's own grid and axis
    /// order: level_<i>_original.npy [C, file X, file Y, file Z] / level_<i>_original.nii.gz
    /// with the input's affine.
    #[arg(long)]
    pub original_grid: bool,
    /// A picture of what the model learned: the first three principal components of the
    /// --rgb-level features inside the body as colours, rgb_level<L>.nii.gz (RGB) and
    /// rgb_level<L>.png (central axial, coronal and sagittal slices under the CT's own).
    #[arg(long)]
    pub rgb: bool,
    #[arg(long, default_value_t = 0)]
    pub rgb_level: usize,
}

impl EmbedOutput {
    fn npy(&self) -> bool {
        self.format.contains(&FeatureFormat::Npy)
    }
    fn nifti(&self) -> bool {
        self.format.contains(&FeatureFormat::Nifti)
    }
    fn check(&self) -> Result<()> {
        anyhow::ensure!(
            !(self.f16 && self.nifti()),
            "--f16 with --format nifti: NIfTI has no float16 type (nibabel and ITK cannot store one); write float32 NIfTI, or --f16 with --format npy"
        );
        Ok(())
    }
}

/// What `embed` writes and how: outputs, blending, windows per pass, window.
pub struct EmbedOptions<'a> {
    pub output: &'a EmbedOutput,
    pub blend: crate::eval::embed::Blend,
    pub sw_batch: usize,
    pub patch: [usize; 3],
}

/// `embed_into`, with no partial output left behind: an output folder that this run created is
/// removed again when the run fails (for several CTs, only the failing CT's folder, and the
/// output folder when nothing was completed in it).
pub fn embed(
    input: &std::path::Path,
    weights: &std::path::Path,
    out: &std::path::Path,
    output: &EmbedOutput,
    net: &NetArgs,
) -> Result<()> {
    output.check()?;
    let several = several_inputs(input)?.is_some();
    let created = !out.exists();
    let r = embed_into(input, weights, out, output, net);
    if r.is_err() && created {
        let _ = if several { std::fs::remove_dir(out) } else { std::fs::remove_dir_all(out) };
    }
    r
}

pub fn embed_into(
    input: &std::path::Path,
    weights: &std::path::Path,
    out: &std::path::Path,
    output: &EmbedOutput,
    net: &NetArgs,
) -> Result<()> {
    use crate::eval::{embed, npy};
    let inputs = several_inputs(input)?;
    let (mut model, recorded) = load_backbone(weights, net.base_channels, net.num_scales)?;
    let device = net.place("embed", input, &mut model)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if input.extension().is_some_and(|e| e == "npy") {
        let (shape, x) = npy::read_f32(input)?;
        anyhow::ensure!(shape.len() == 3, "{}: expected an X×Y×Z array, found shape {shape:?}", input.display());
        let pyr = embed::patch_pyramid(&mut model, &x, [shape[0], shape[1], shape[2]])?;
        for (i, (s, v)) in pyr.iter().enumerate() {
            let path = out.join(format!("pyramid_{i}.npy"));
            if output.f16 { npy::write_f16(&path, s, v)? } else { npy::write_f32(&path, s, v)? }
        }
        println!("wrote {} pyramid levels to {}", pyr.len(), out.display());
        return Ok(());
    }
    let (pre, patch) = net.settings(&recorded)?;
    let sw_batch = net.sw_batch(device, patch)?;
    let blend = if output.gaussian { embed::Blend::Gaussian } else { embed::Blend::Central };
    let opts = EmbedOptions { output, blend, sw_batch, patch };
    let load = |f: &std::path::Path| -> Result<(crate::data::cache::CachedCt, Option<crate::data::nifti_io::Volume>)> {
        let e = crate::data::cache::build(f, &pre)?;
        let source =
            if output.original_grid { Some(crate::data::nifti_io::read_volume_with(f, net.nonfinite)?) } else { None };
        Ok((e, source))
    };
    let Some(files) = inputs else {
        let (e, source) = load(input)?;
        return embed_ct(&mut model, &e, source.as_ref(), out, &opts);
    };
    // Several CTs: the next one is read and preprocessed while this one is embedded.
    eprintln!("embed: {} CTs from {}, each into {}/<name>/", files.len(), input.display(), out.display());
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let mut done = 0;
    crate::eval::prefetch::pipelined(
        &paths,
        |f| load(f),
        |f, (e, source)| {
            let name = &files.iter().find(|(p, _)| p == f).expect("one of the inputs").1;
            let dir = out.join(name);
            let created = !dir.exists();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let r = embed_ct(&mut model, &e, source.as_ref(), &dir, &opts);
            if r.is_err() && created {
                let _ = std::fs::remove_dir_all(&dir);
            }
            done += 1;
            r
        },
    )?;
    println!("embedded {done} CTs into {}", out.display());
    Ok(())
}

/// Embed one preprocessed CT into the folder `out`: level_<i>.npy / .nii.gz (and
/// level_<i>_original.* on the source grid when `source` is given), the PCA picture with
/// --rgb, and geometry.json.
pub fn embed_ct(
    model: &mut crate::model::Vox2Vec,
    e: &crate::data::cache::CachedCt,
    source: Option<&crate::data::nifti_io::Volume>,
    out: &std::path::Path,
    o: &EmbedOptions,
) -> Result<()> {
    use crate::data::nifti_io::{write_features, write_features_channels_first};
    use crate::eval::{embed, npy};
    let oo = o.output;
    let write_npy = |path: &std::path::Path, shape: &[usize], v: &[f32]| {
        if oo.f16 { npy::write_f16(path, shape, v) } else { npy::write_f32(path, shape, v) }
    };
    let ct = &e.ct;
    let x = embed::scale_hu(&ct.hu);
    let mut levels: Vec<usize> = oo.levels.clone();
    if oo.rgb && !levels.contains(&oo.rgb_level) {
        levels.push(oo.rgb_level);
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "embedding {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}  {msg}",
    )?);
    bar.set_message(e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let maps = embed::embed_volume(model, &x, ct.shape, o.patch, &levels, o.blend, o.sw_batch, &|n, total| {
        bar.set_length(total as u64);
        bar.set_position(n as u64);
    })?;
    bar.finish_and_clear();
    for m in maps.iter().filter(|m| oo.levels.contains(&m.level)) {
        let [sx, sy, sz] = m.shape;
        if oo.npy() {
            let v = crate::tensor::nxyzc_to_ncxyz(&m.values, 1, m.channels, m.shape.iter().product());
            write_npy(&out.join(format!("level_{}.npy", m.level)), &[m.channels, sx, sy, sz], &v)?;
        }
        if oo.nifti() {
            write_features(
                &out.join(format!("level_{}.nii.gz", m.level)),
                &m.values,
                m.shape,
                m.channels,
                &embed::level_affine(e, m.level),
            )?;
        }
        if let Some(vol) = source {
            let c = m.channels;
            let src_grid = embed::level_on_source_grid(m, ct);
            let fs = vol.geometry.file_shape;
            let file_order = crate::data::nifti_io::to_file_order(&src_grid, &vol.geometry, c);
            if oo.npy() {
                write_npy(
                    &out.join(format!("level_{}_original.npy", m.level)),
                    &[c, fs[0], fs[1], fs[2]],
                    &file_order,
                )?;
            }
            if oo.nifti() {
                write_features_channels_first(
                    &out.join(format!("level_{}_original.nii.gz", m.level)),
                    &file_order,
                    fs,
                    c,
                    &vol.geometry.affine,
                )?;
            }
        }
    }
    let rgb_note = if oo.rgb { Some(write_rgb_view(e, &maps, oo.rgb_level, out)?) } else { None };
    // The preprocessed grid in world coordinates: canonical index → file grid → world.
    let affines: serde_json::Map<String, serde_json::Value> =
        oo.levels.iter().map(|&l| (l.to_string(), serde_json::json!(embed::level_affine(e, l)))).collect();
    let geo = serde_json::json!({
        "source": e.source,
        "shape": ct.shape,
        "spacing_mm": ct.spacing,
        "crop_box_canonical": ct.crop_box,
        "source_shape_canonical": ct.source_shape,
        "source_spacing_mm": ct.source_spacing,
        "file_affine": e.file_affine,
        "orientation": {"perm": e.orientation.perm, "flip": e.orientation.flip},
        "levels": oo.levels,
        "level_affines": affines,
        "rgb": rgb_note,
        "layout": "level_<i>.npy: [C, X, Y, Z], canonical axes (x, y, z world-increasing), level i = preprocessed grid / 2^i (ceil); level_<i>.nii.gz: the same as X x Y x Z x C with level_affines[i]",
    });
    crate::checkpoint::write_atomic(&out.join("geometry.json"), serde_json::to_string_pretty(&geo)?.as_bytes())?;
    println!(
        "wrote levels {:?} of {} ({:?} voxels at {} mm) to {}",
        oo.levels,
        e.source.display(),
        ct.shape,
        crate::eval::recorded::xyz(&ct.spacing),
        out.display()
    );
    Ok(())
}

/// `embed --rgb`: the PCA colours of level `level` inside the body as rgb_level<L>.nii.gz
/// (RGB24 on the level's grid and affine) and rgb_level<L>.png (the CT's central axial,
/// coronal and sagittal slices above the same slices in PCA colours). Returns what the
/// components explain, for geometry.json.
pub fn write_rgb_view(
    e: &crate::data::cache::CachedCt,
    maps: &[crate::eval::sliding::LevelMap],
    level: usize,
    out: &std::path::Path,
) -> Result<serde_json::Value> {
    use crate::eval::pca::{grey, level_mask, orthogonal_slices, pca_rgb};
    let ct = &e.ct;
    let m = maps
        .iter()
        .find(|m| m.level == level)
        .with_context(|| format!("--rgb-level {level}: the model has no such level"))?;
    let (body, shape) = level_mask(&ct.body_mask(), ct.shape, level);
    anyhow::ensure!(shape == m.shape, "level {level}: body mask {shape:?} and features {:?} differ", m.shape);
    let pca = pca_rgb(&m.values, m.shape, m.channels, &body)
        .with_context(|| format!("{}: PCA of level {level}", e.source.display()))?;
    let affine = crate::eval::embed::level_affine(e, level);
    let rgb_path = out.join(format!("rgb_level{level}.nii.gz"));
    crate::data::nifti_io::write_rgb(&rgb_path, &pca.rgb, m.shape, &affine)?;
    let s0 = ct.shape;
    let centre = [s0[0] / 2, s0[1] / 2, s0[2] / 2];
    let f = 1usize << level;
    let hu = |x: usize, y: usize, z: usize| ct.hu[(x * s0[1] + y) * s0[2] + z] as f32;
    let colour = |x: usize, y: usize, z: usize| pca.rgb[((x / f) * m.shape[1] + y / f) * m.shape[2] + z / f];
    let window = (-160.0, 240.0);
    let mut tiles = Vec::new();
    for (name, w, h, img) in orthogonal_slices(s0, ct.spacing, centre, &|x, y, z| grey(hu(x, y, z), window)) {
        tiles.push(crate::plot::Tile { caption: format!("CT, {name} (W400 L40)"), width: w, height: h, rgb: img });
    }
    for (name, w, h, img) in orthogonal_slices(s0, ct.spacing, centre, &colour) {
        tiles.push(crate::plot::Tile { caption: format!("level {level} PCA, {name}"), width: w, height: h, rgb: img });
    }
    let ex = pca.explained;
    let name = e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let title = format!(
        "{name}: level-{level} features, first 3 principal components as RGB ({:.0}%, {:.0}%, {:.0}% of the variance)",
        ex[0] * 100.0,
        ex[1] * 100.0,
        ex[2] * 100.0
    );
    crate::plot::write_image_grid_png(&out.join(format!("rgb_level{level}.png")), &title, &tiles, 3)?;
    Ok(
        serde_json::json!({"level": level, "explained_variance": ex, "files": [format!("rgb_level{level}.nii.gz"), format!("rgb_level{level}.png")]}),
    )
}
