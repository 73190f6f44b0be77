//! A picture of what the model learned: the first three principal components of a feature
//! map, inside the body, as colours.
//!
//! Voxels with similar features get similar colours, so organs that the backbone tells apart
//! show as regions of their own. The PCA is fitted on (at most `MAX_FIT` evenly strided) body
//! voxels of one pyramid level: mean, covariance in f64, eigenvectors by nalgebra's symmetric
//! eigensolver, each component's sign fixed so that its largest coefficient is positive (the
//! same features always give the same colours). Each component is mapped to 0..255 between its
//! 1st and 99th percentiles over the body; voxels outside the body are black.

use anyhow::{Result, ensure};

/// Body voxels used to fit the PCA, at most.
pub const MAX_FIT: usize = 200_000;

/// The RGB view of one feature map.
pub struct RgbMap {
    /// The map's grid [X, Y, Z].
    pub shape: [usize; 3],
    /// One colour per voxel, C order.
    pub rgb: Vec<[u8; 3]>,
    /// Share of the body's feature variance each component explains.
    pub explained: [f64; 3],
}

/// PCA → RGB of `values` ([X, Y, Z, C], channels last) over the voxels where `body` is true.
pub fn pca_rgb(values: &[f32], shape: [usize; 3], channels: usize, body: &[bool]) -> Result<RgbMap> {
    let n: usize = shape.iter().product();
    ensure!(
        values.len() == n * channels && body.len() == n,
        "PCA: {} values and {} mask voxels for {shape:?} x {channels}",
        values.len(),
        body.len()
    );
    let inside: Vec<usize> = (0..n).filter(|&i| body[i]).collect();
    ensure!(inside.len() >= 2, "PCA: {} body voxels, too few to fit", inside.len());
    let c = channels;
    let stride = inside.len().div_ceil(MAX_FIT);
    let fit: Vec<usize> = inside.iter().step_by(stride).copied().collect();
    let mut mean = vec![0.0f64; c];
    for &i in &fit {
        for (m, &v) in mean.iter_mut().zip(&values[i * c..(i + 1) * c]) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= fit.len() as f64);
    let mut cov = nalgebra::DMatrix::<f64>::zeros(c, c);
    let mut d = vec![0.0f64; c];
    for &i in &fit {
        for (k, dk) in d.iter_mut().enumerate() {
            *dk = values[i * c + k] as f64 - mean[k];
        }
        for a in 0..c {
            for b in a..c {
                cov[(a, b)] += d[a] * d[b];
            }
        }
    }
    for a in 0..c {
        for b in a..c {
            let v = cov[(a, b)] / (fit.len() - 1) as f64;
            cov[(a, b)] = v;
            cov[(b, a)] = v;
        }
    }
    let eig = nalgebra::SymmetricEigen::new(cov);
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum();
    let mut axes = [vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]];
    let mut explained = [0.0f64; 3];
    for (k, axis) in axes.iter_mut().enumerate() {
        let Some(&j) = order.get(k) else { break };
        let v = eig.eigenvectors.column(j);
        let big = v.iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap_or(1.0);
        let sign = if big < 0.0 { -1.0 } else { 1.0 };
        for (a, x) in axis.iter_mut().zip(v.iter()) {
            *a = sign * x;
        }
        explained[k] = if total > 0.0 { eig.eigenvalues[j].max(0.0) / total } else { 0.0 };
    }
    // Project the body, then scale each component between its 1st and 99th percentiles.
    let project =
        |i: usize, axis: &[f64]| -> f64 { (0..c).map(|k| (values[i * c + k] as f64 - mean[k]) * axis[k]).sum() };
    let comps: Vec<Vec<f64>> = axes.iter().map(|axis| inside.iter().map(|&i| project(i, axis)).collect()).collect();
    let mut rgb = vec![[0u8; 3]; n];
    for (k, comp) in comps.iter().enumerate() {
        let mut sorted: Vec<f64> = comp.iter().copied().step_by(stride).collect();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        let (lo, hi) = (q(0.01), q(0.99));
        let span = if hi > lo { hi - lo } else { 1.0 };
        for (&i, &v) in inside.iter().zip(comp) {
            rgb[i][k] = (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Ok(RgbMap { shape, rgb, explained })
}

/// The body mask of pyramid level `level` (a voxel is body when any level-0 voxel it covers
/// is), from the level-0 mask of shape `shape0`.
pub fn level_mask(body0: &[bool], shape0: [usize; 3], level: usize) -> (Vec<bool>, [usize; 3]) {
    let f = 1usize << level;
    let s = [shape0[0].div_ceil(f), shape0[1].div_ceil(f), shape0[2].div_ceil(f)];
    let mut out = vec![false; s.iter().product()];
    for x in 0..shape0[0] {
        for y in 0..shape0[1] {
            for z in 0..shape0[2] {
                if body0[(x * shape0[1] + y) * shape0[2] + z] {
                    out[((x / f) * s[1] + y / f) * s[2] + z / f] = true;
                }
            }
        }
    }
    (out, s)
}

/// The three orthogonal slices through `centre` of a volume of `shape` on a grid of `spacing`
/// mm in canonical axes (NIfTI's RAS world: +x towards the patient's right, +y anterior, +z
/// superior), shown as radiologists do, with square pixels of the finest spacing: axial
/// (z = centre; anterior up, the patient's right on the image's left), coronal (y = centre;
/// superior up, right on the left) and sagittal (x = centre; superior up, anterior on the
/// left). `pixel(x, y, z)` gives each voxel's colour.
pub fn orthogonal_slices(
    shape: [usize; 3],
    spacing: [f64; 3],
    centre: [usize; 3],
    pixel: &dyn Fn(usize, usize, usize) -> [u8; 3],
) -> Vec<(String, usize, usize, Vec<u8>)> {
    // Square pixels of the finest spacing, magnified so that the longest side of the volume
    // spans about `DISPLAY` pixels (3 mm grids would otherwise give thumbnails).
    const DISPLAY: f64 = 320.0;
    let finest = spacing.iter().copied().fold(f64::INFINITY, f64::min).max(1e-6);
    let longest = (0..3).map(|a| shape[a] as f64 * spacing[a] / finest).fold(1.0, f64::max);
    let px = finest / (DISPLAY / longest).floor().max(1.0);
    let len = |a: usize| ((shape[a] as f64 * spacing[a] / px).round() as usize).max(1);
    let idx = |a: usize, p: usize, n: usize| ((p as f64 + 0.5) * shape[a] as f64 / n as f64) as usize;
    // (name, image column axis, row axis, fixed axis); columns and rows run against the axis
    // (RAS: image left = patient's right = +x; image top = anterior (+y) or superior (+z)).
    let views = [("axial", 0usize, 1usize, 2usize), ("coronal", 0, 2, 1), ("sagittal", 1, 2, 0)];
    views
        .iter()
        .map(|&(name, ca, ra, fa)| {
            let (w, h) = (len(ca), len(ra));
            let mut img = vec![0u8; w * h * 3];
            for r in 0..h {
                for col in 0..w {
                    let mut v = [0usize; 3];
                    v[ca] = shape[ca] - 1 - idx(ca, col, w).min(shape[ca] - 1);
                    v[ra] = shape[ra] - 1 - idx(ra, r, h).min(shape[ra] - 1);
                    v[fa] = centre[fa].min(shape[fa] - 1);
                    let c = pixel(v[0], v[1], v[2]);
                    img[(r * w + col) * 3..(r * w + col) * 3 + 3].copy_from_slice(&c);
                }
            }
            (name.to_string(), w, h, img)
        })
        .collect()
}

/// A CT value (HU) as grey in a display window (lo, hi).
pub fn grey(hu: f32, window: (f32, f32)) -> [u8; 3] {
    let g = (((hu - window.0) / (window.1 - window.0)).clamp(0.0, 1.0) * 255.0).round() as u8;
    [g, g, g]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features that vary along one direction (strongly) and another (weakly): the first
    /// component follows the strong one, explains most variance, and colours the ends of the
    /// volume apart; voxels outside the body stay black.
    #[test]
    fn first_component_follows_the_strongest_variation() {
        let shape = [20, 6, 4];
        let c = 5;
        let n = 480;
        let mut v = vec![0.0f32; n * c];
        let mut body = vec![true; n];
        for x in 0..20 {
            for y in 0..6 {
                for z in 0..4 {
                    let i = (x * 6 + y) * 4 + z;
                    // Strong: along x, in channels 0 and 3; weak: along y, channel 1.
                    v[i * c] = x as f32;
                    v[i * c + 3] = -(x as f32);
                    v[i * c + 1] = 0.1 * y as f32;
                    v[i * c + 2] = 1.0;
                    body[i] = z != 3;
                }
            }
        }
        let m = pca_rgb(&v, shape, c, &body).unwrap();
        assert!(m.explained[0] > 0.99, "{:?}", m.explained);
        let red = |x: usize, y: usize| m.rgb[(x * 6 + y) * 4][0];
        // The ends of the x ramp at the two ends of the colour scale, monotonic in between
        // (which end is red depends on the sign convention, not on x).
        let (a, b) = (red(0, 0) as i32, red(19, 0) as i32);
        assert!((a - b).abs() > 235, "{a} {b}");
        let r: Vec<i32> = [5, 10, 15].iter().map(|&x| red(x, 0) as i32 * (b - a).signum()).collect();
        assert!(r[0] < r[1] && r[1] < r[2], "{r:?}");
        assert_eq!(m.rgb[3], [0, 0, 0], "outside the body");
        // The second component is the weak direction (y).
        let green = |y: usize| m.rgb[(10 * 6 + y) * 4][1];
        assert!(green(0) != green(5));
        // Deterministic: the same input gives the same colours.
        assert_eq!(pca_rgb(&v, shape, c, &body).unwrap().rgb, m.rgb);
    }

    #[test]
    fn level_masks_cover_their_blocks() {
        let mut b = vec![false; 5 * 3 * 2];
        b[(4 * 3 + 2) * 2 + 1] = true;
        let (m, s) = level_mask(&b, [5, 3, 2], 1);
        assert_eq!(s, [3, 2, 1]);
        assert_eq!(m.iter().filter(|&&x| x).count(), 1);
        assert!(m[2 * 2 + 1]);
    }

    #[test]
    fn slices_are_shown_as_radiologists_do() {
        // A marker at high x (the patient's right), high y (anterior), high z (superior).
        let shape = [10, 8, 6];
        let mark = |x: usize, y: usize, z: usize| if x == 9 && y == 7 && z >= 5 { [255, 0, 0] } else { [0, 0, 0] };
        let v = orthogonal_slices(shape, [1.0, 1.0, 2.0], [9, 7, 5], &mark);
        let (_, w, h, axial) = &v[0];
        let k = *w / 10; // magnification: the longest side (z, 12 mm) near 320 pixels
        assert_eq!((k, *w, *h), (26, 10 * k, 8 * k));
        // Axial: the patient's right (largest x) in column 0, anterior (largest y) in row 0.
        assert_eq!(axial[0], 255);
        let (_, w, h, coronal) = &v[1];
        // Coronal keeps physical proportions: z spacing 2 mm -> 12 rows of 1 mm.
        assert_eq!((*w, *h), (10 * k, 12 * k));
        assert_eq!(coronal[0], 255, "superior on top, +x on the left");
    }
}
