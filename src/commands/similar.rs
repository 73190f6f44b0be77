//! `similar`: one voxel's embedding searched in other CTs; similarity maps, pictures and the
//! best matches.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::*;

/// `similar`: see the subcommand's help. Nothing is left in `out` when it fails.
pub fn similar(
    weights: &std::path::Path,
    query: &std::path::Path,
    point: &str,
    world: bool,
    targets: &[PathBuf],
    out: &std::path::Path,
    net: &NetArgs,
) -> Result<()> {
    let created = !out.exists();
    let r = similar_into(weights, query, point, world, targets, out, net);
    if r.is_err() && created {
        let _ = std::fs::remove_dir_all(out);
    }
    r
}

#[allow(clippy::too_many_arguments)]
pub fn similar_into(
    weights: &std::path::Path,
    query: &std::path::Path,
    point: &str,
    world: bool,
    targets: &[PathBuf],
    out: &std::path::Path,
    net: &NetArgs,
) -> Result<()> {
    use crate::eval::embed::{Blend, embed_volume, scale_hu};
    use crate::eval::similar::{apply, best, embedding_at, invert, level0_to_world, similarity_map, world_to_level0};
    let p: Vec<f64> = point
        .split(',')
        .map(|t| t.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--point {point:?}: expected X,Y,Z numbers"))?;
    anyhow::ensure!(p.len() == 3 && p.iter().all(|v| v.is_finite()), "--point {point:?}: expected X,Y,Z numbers");
    let p = [p[0], p[1], p[2]];
    let mut names: Vec<String> = Vec::new();
    for t in targets {
        anyhow::ensure!(
            t.is_file() || crate::data::dicom::is_dicom_input(t),
            "--target {}: no such file (a NIfTI, or a DICOM series folder)",
            t.display()
        );
        let file = t.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let name = file.strip_suffix(".nii.gz").or_else(|| file.strip_suffix(".nii")).unwrap_or(&file).to_string();
        anyhow::ensure!(
            !names.contains(&name),
            "two targets are named {name:?}: their outputs would collide; search them separately"
        );
        names.push(name);
    }
    let (mut model, recorded) = load_backbone(weights, net.base_channels, net.num_scales)?;
    let device = net.place("similar", query, &mut model)?;
    let (pre, patch) = net.settings(&recorded)?;
    let sw_batch = net.sw_batch(device, patch)?;
    let levels: Vec<usize> = (0..model.config.fpn.num_scales).collect();
    let mut embed_all = |e: &crate::data::cache::CachedCt| -> Result<Vec<crate::eval::sliding::LevelMap>> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "embedding {bar:30} {pos}/{len} windows  {per_sec}  ETA {eta}  {msg}",
        )?);
        bar.set_message(e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let maps = embed_volume(
            &mut model,
            &scale_hu(&e.ct.hu),
            e.ct.shape,
            patch,
            &levels,
            Blend::Central,
            sw_batch,
            &|n, total| {
                bar.set_length(total as u64);
                bar.set_position(n as u64);
            },
        )?;
        bar.finish_and_clear();
        Ok(maps)
    };
    let q = crate::data::cache::build(query, &pre)?;
    let q_world = if world { p } else { apply(&q.file_affine, p) };
    // The file's own voxel grid: a point off it is a typo or the wrong file, not a query.
    let mut file_shape = [0usize; 3];
    for (a, &n) in q.ct.source_shape.iter().enumerate() {
        file_shape[q.orientation.perm[a]] = n;
    }
    let q_file = apply(&invert(&q.file_affine).context("the query's affine is singular")?, q_world);
    anyhow::ensure!(
        q_file.iter().zip(file_shape).all(|(&v, n)| v > -0.5 && v < n as f64 - 0.5),
        "{}: the point {} (voxel {} of the file, {} mm in the world) is outside the image, whose voxels are 0..{} x 0..{} x 0..{}",
        query.display(),
        fmt3(&p),
        fmt3(&q_file),
        fmt3(&q_world),
        file_shape[0],
        file_shape[1],
        file_shape[2]
    );
    let qi = world_to_level0(&q, q_world).with_context(|| {
        format!("{}: the point {} ({} mm in the world) lies outside the part of the CT that is embedded (the body's bounding box): pick a point inside the body", query.display(), fmt3(&p), fmt3(&q_world))
    })?;
    // Air around the body carries no anatomy: its best match would mean nothing.
    let s0 = q.ct.shape;
    anyhow::ensure!(
        q.ct.body_mask()[(qi[0] * s0[1] + qi[1]) * s0[2] + qi[2]],
        "{}: the point {} ({} mm in the world) is in the air outside the body (below -500 HU and connected to the outside, docs/method.md §1.6): pick a point inside the body",
        query.display(),
        fmt3(&p),
        fmt3(&q_world)
    );
    let q_maps = embed_all(&q)?;
    let qv = embedding_at(&q_maps, qi)?;
    drop(q_maps);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "query: {} voxel {} = world {} mm (the preprocessed voxel nearest to it)",
        query.display(),
        fmt3(&q_file),
        fmt3(&q_world)
    );
    let mut matches = Vec::new();
    for (t, name) in targets.iter().zip(&names) {
        let e = crate::data::cache::build(t, &pre)?;
        let vol = crate::data::nifti_io::read_volume_with(t, net.nonfinite)?;
        let maps = embed_all(&e)?;
        let sim = similarity_map(&maps, &qv)?;
        drop(maps);
        let body = e.ct.body_mask();
        let (b, score) =
            best(&sim, &body, e.ct.shape).with_context(|| format!("{}: no body voxel to match", t.display()))?;
        let b_world = level0_to_world(&e, b);
        let b_file =
            apply(&invert(&e.file_affine).context("the target's affine is singular")?, b_world).map(|v| v.round());
        // The map on the target's own grid; voxels outside the embedded box get -1 (no match).
        let on_source = crate::data::preprocess::to_source_grid(&sim, &e.ct, -1.0f32);
        crate::data::nifti_io::write_volume(&out.join(format!("{name}_similarity.nii.gz")), &on_source, &vol.geometry)?;
        write_match_png(&out.join(format!("{name}_match.png")), &q, qi, &e, b, &sim, &body, score)?;
        println!(
            "{}: best match voxel {} = world {} mm, similarity {score:.4}",
            t.display(),
            fmt3(&b_file),
            fmt3(&b_world)
        );
        matches.push(serde_json::json!({"target": t, "best_voxel": b_file, "best_world_mm": b_world, "similarity": score, "files": [format!("{name}_similarity.nii.gz"), format!("{name}_match.png")]}));
    }
    let json = serde_json::json!({
        "query": query, "point": p, "point_is_world": world, "query_voxel": q_file, "query_world_mm": q_world,
        "weights": weights, "spacing_mm": pre.spacing, "patch": patch, "matches": matches,
        "note": "voxels are the files' own 0-based indices; world is NIfTI's RAS in mm",
    });
    crate::checkpoint::write_atomic(&out.join("matches.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok(())
}

/// The picture of one match: the query CT's three slices through the query point (a green
/// cross) above the target's slices through its best match, the similarity as a heat map over
/// the target's CT (from its 90th percentile in the body, transparent, to the best, opaque).
#[allow(clippy::too_many_arguments)]
pub fn write_match_png(
    path: &std::path::Path,
    q: &crate::data::cache::CachedCt,
    qi: [usize; 3],
    t: &crate::data::cache::CachedCt,
    ti: [usize; 3],
    sim: &[f32],
    body: &[bool],
    score: f32,
) -> Result<()> {
    use crate::eval::pca::{grey, orthogonal_slices};
    let window = (-160.0f32, 240.0f32);
    let cross = |v: [usize; 3], m: [usize; 3]| {
        let d: Vec<usize> = (0..3).map(|a| v[a].abs_diff(m[a])).collect();
        d.iter().filter(|&&x| x == 0).count() == 2 && d.iter().any(|&x| (2..=5).contains(&x))
    };
    let mut inside: Vec<f32> = sim.iter().zip(body).filter(|(_, b)| **b).map(|(s, _)| *s).collect();
    inside.sort_by(f32::total_cmp);
    let lo = inside.get(inside.len() * 9 / 10).copied().unwrap_or(0.0);
    let span = (score - lo).max(1e-6);
    let hot = |u: f32| -> [f32; 3] {
        [(3.0 * u).clamp(0.0, 1.0), (3.0 * u - 1.0).clamp(0.0, 1.0), (3.0 * u - 2.0).clamp(0.0, 1.0)]
    };
    let mut tiles = Vec::new();
    let (qs, ts) = (q.ct.shape, t.ct.shape);
    let q_px = |x: usize, y: usize, z: usize| {
        if cross([x, y, z], qi) { [0, 255, 0] } else { grey(q.ct.hu[(x * qs[1] + y) * qs[2] + z] as f32, window) }
    };
    let t_px = |x: usize, y: usize, z: usize| {
        if cross([x, y, z], ti) {
            return [0, 255, 0];
        }
        let i = (x * ts[1] + y) * ts[2] + z;
        let g = grey(t.ct.hu[i] as f32, window);
        let u = ((sim[i] - lo) / span).clamp(0.0, 1.0);
        if u <= 0.0 || !body[i] {
            return g;
        }
        let (h, a) = (hot(0.35 + 0.65 * u), 0.25 + 0.6 * u);
        std::array::from_fn(|k| (g[k] as f32 * (1.0 - a) + h[k] * 255.0 * a).round() as u8)
    };
    let name = |e: &crate::data::cache::CachedCt| {
        e.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    };
    for (view, w, h, img) in orthogonal_slices(qs, q.ct.spacing, qi, &q_px) {
        tiles.push(crate::plot::Tile { caption: format!("query {}, {view}", name(q)), width: w, height: h, rgb: img });
    }
    for (view, w, h, img) in orthogonal_slices(ts, t.ct.spacing, ti, &t_px) {
        tiles.push(crate::plot::Tile {
            caption: format!("{} similarity, {view}", name(t)),
            width: w,
            height: h,
            rgb: img,
        });
    }
    let title = format!(
        "best match in {}: cosine similarity {score:.3} (heat: from the body's 90th percentile {lo:.3} up)",
        name(t)
    );
    crate::plot::write_image_grid_png(path, &title, &tiles, 3)
}
