//! Synthetic CT phantom: a seeded, procedurally drawn torso in Hounsfield units, so that
//! pretraining, the sampler and the benchmarks run anywhere with no download and no data
//! licence. It is not meant to be anatomically exact, only to give the network what real CT
//! gives it: air around a body, fat / muscle / organ contrasts of a few tens of HU, lungs near
//! -850 HU with vessels, bright bone, sharp and soft edges, and noise.
//!
//! Conventions are those of a canonical volume (docs/method.md §1): row-major [X, Y, Z] with z
//! fastest, every axis running in world-increasing RAS+ order, so x grows towards the patient's
//! right (liver at high x, spleen at low x), y grows towards anterior (spine and table at low y)
//! and z grows towards superior (lungs at high z, kidneys at low z).
//!
//! Sizes are in millimetres from the voxel spacing. A 350 mm wide adult torso does not fit in a
//! 256 mm field of view, so the whole anatomy is scaled down uniformly (a smaller patient) until
//! the body and the table keep an air margin at the x and y borders; the z axis cuts through
//! the body, as in a real scan. Everything is a cheap implicit shape (ellipses, half-ellipsoids,
//! bands, boxes) evaluated per voxel, with the per-slice geometry precomputed once, so a
//! 256x224x96 volume takes tens of milliseconds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// HU of air; real scanners clip near here, and the minimum we emit is -1024.
const AIR_HU: f64 = -1000.0;
/// Output range of int16 CT in this project (data/README.md: all CT clipped to [-1024, 3071]).
const HU_MIN: f64 = -1024.0;
const HU_MAX: f64 = 3071.0;

/// The spacing the phantom is meant to be generated at: the vox2vec resampling target, so a
/// phantom needs no resampling.
pub fn phantom_spacing() -> [f64; 3] {
    [1.0, 1.0, 2.0]
}

/// A default phantom grid: larger than the (128, 128, 32) patch in every axis, and about the
/// size of a cropped, resampled chest-abdomen CT.
pub fn phantom_shape() -> [usize; 3] {
    [256, 224, 96]
}

/// An ellipse in one axial slice, in absolute millimetres, possibly rotated in-plane.
#[derive(Clone, Copy, Debug)]
struct Ell {
    cx: f64,
    cy: f64,
    inv_rx2: f64,
    inv_ry2: f64,
    cos: f64,
    sin: f64,
}

impl Ell {
    fn new(cx: f64, cy: f64, rx: f64, ry: f64, angle: f64) -> Ell {
        Ell { cx, cy, inv_rx2: 1.0 / (rx * rx), inv_ry2: 1.0 / (ry * ry), cos: angle.cos(), sin: angle.sin() }
    }

    fn circle(cx: f64, cy: f64, r: f64) -> Ell {
        Ell::new(cx, cy, r, r, 0.0)
    }

    /// Squared normalised radius: < 1 inside.
    #[inline]
    fn q(&self, px: f64, py: f64) -> f64 {
        let dx = px - self.cx;
        let dy = py - self.cy;
        let u = dx * self.cos + dy * self.sin;
        let v = -dx * self.sin + dy * self.cos;
        u * u * self.inv_rx2 + v * v * self.inv_ry2
    }
}

/// An organ: an ellipsoid placed relative to the body centre of each slice (so it follows the
/// body's curvature), with separate lower and upper z half-axes so that lung bases can be
/// rounded while the apices taper slowly.
#[derive(Clone, Copy, Debug)]
struct Blob {
    dx: f64,
    dy: f64,
    rx: f64,
    ry: f64,
    angle: f64,
    cz: f64,
    rz_lo: f64,
    rz_hi: f64,
}

impl Blob {
    /// The same ellipsoid scaled by `f` and grown by `d` mm on every half-axis.
    fn grown(&self, f: f64, d: f64) -> Blob {
        Blob { rx: self.rx * f + d, ry: self.ry * f + d, rz_lo: self.rz_lo * f + d, rz_hi: self.rz_hi * f + d, ..*self }
    }

    fn section(&self, zz: f64, bcx: f64, bcy: f64) -> Option<Ell> {
        let t = if zz < self.cz { (self.cz - zz) / self.rz_lo } else { (zz - self.cz) / self.rz_hi };
        // `!(t < 1)` also rejects NaN from a zero half-axis.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(t < 1.0) {
            return None;
        }
        let k = (1.0 - t * t).sqrt();
        let (rx, ry) = (self.rx * k, self.ry * k);
        if rx < 1e-3 || ry < 1e-3 {
            return None;
        }
        Some(Ell::new(bcx + self.dx, bcy + self.dy, rx, ry, self.angle))
    }
}

/// A lung vessel: a straight oblique tube, in coordinates normalised to the lung's full
/// in-plane radii, so it stays inside the lung as the lung section changes.
#[derive(Clone, Copy, Debug)]
struct Vessel {
    u: f64,
    v: f64,
    du_dz: f64,
    dv_dz: f64,
    r: f64,
}

/// Everything that is constant over the volume.
struct Global {
    s: f64,
    // Body wall thicknesses (mm).
    skin: f64,
    fat: f64,
    muscle: f64,
    rib_thick: f64,
    rib_period: f64,
    rib_width: f64,
    rib_slope: f64,
    rib_phase: f64,
    // Tissue HU, jittered per seed so that no two phantoms share exact intensities.
    hu_soft: f64,
    hu_fat: f64,
    hu_muscle: f64,
    hu_lung: f64,
    hu_vessel: f64,
    hu_cancellous: f64,
    hu_cortical: f64,
    hu_disc: f64,
    fat_threshold: f64,
    // Table (a flat slab under the body, fixed in space).
    table_cx: f64,
    table_hw: f64,
    table_top: f64,
    table_bottom: f64,
    table_shell: f64,
}

/// The geometry of one axial slice.
struct Slice {
    bcx: f64,
    bcy: f64,
    a: f64,
    b_ant: f64,
    b_post: f64,
    thorax: bool,
    zz: f64,
    disc: bool,
    vert: Ell,
    vert_rim_q: f64,
    canal: Ell,
    arch: Ell,
    canal_cx: f64,
    canal_cy: f64,
    /// Organs by decreasing priority, with their HU.
    organs: Vec<(Ell, f64)>,
    lungs: Vec<(Ell, f64, Vec<Ell>)>,
}

impl Slice {
    /// Squared normalised radius of the body outline shrunk inwards by `d` mm. The body is two
    /// half-ellipses (the back is flatter than the front, as on a table) sharing the x axis.
    #[inline]
    fn layer_q(&self, px: f64, py: f64, d: f64) -> f64 {
        let dx = px - self.bcx;
        let dy = py - self.bcy;
        let b = if dy >= 0.0 { self.b_ant } else { self.b_post };
        let (ra, rb) = ((self.a - d).max(1e-3), (b - d).max(1e-3));
        (dx / ra) * (dx / ra) + (dy / rb) * (dy / rb)
    }
}

/// A small, fast, deterministic generator for the per-voxel noise (SplitMix64); the anatomy
/// itself uses `StdRng`. One generator per x-plane keeps the result independent of threading.
struct Noise(u64);

impl Noise {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately standard normal: the sum of four 16-bit uniforms (Irwin-Hall), centred and
    /// scaled to unit variance. No exp/log/sqrt per voxel.
    #[inline]
    fn gauss(&mut self) -> f64 {
        let r = self.next();
        let sum = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        (sum as f64 / 65535.0 - 2.0) * 1.732_050_807_568_877_2
    }
}

/// A synthetic torso CT in HU, row-major [X, Y, Z] (z fastest), canonical RAS+ axis order.
///
/// Deterministic for a given `seed`, `shape` and `spacing_mm`. Spacings that are not finite and
/// positive are taken as 1 mm (this function has no error path, and a phantom is still useful).
/// A shape whose voxel count overflows `usize` gives an empty vector; a volume too small to hold
/// a body gives air only.
pub fn phantom_ct(seed: u64, shape: [usize; 3], spacing_mm: [f64; 3]) -> Vec<i16> {
    let [nx, ny, nz] = shape;
    let Some(n) = nx.checked_mul(ny).and_then(|v| v.checked_mul(nz)) else {
        return Vec::new();
    };
    if n == 0 {
        return Vec::new();
    }
    let sp = spacing_mm.map(|v| if v.is_finite() && v > 0.0 { v } else { 1.0 });
    let mut rng = StdRng::seed_from_u64(seed);

    let fov_x = nx as f64 * sp[0];
    let fov_y = ny as f64 * sp[1];
    let len_z = nz as f64 * sp[2];

    // Nominal adult anatomy (mm), then one uniform scale factor to fit the field of view.
    let a_nom = rng.random_range(155.0f64..185.0);
    let b_ant_nom = rng.random_range(100.0f64..125.0);
    let b_post_nom = rng.random_range(92.0f64..112.0);
    let w_amp = rng.random_range(0.0f64..0.04);
    let w_period = rng.random_range(250.0f64..450.0);
    let w_phase = rng.random_range(0.0f64..std::f64::consts::TAU);
    let curve_x = rng.random_range(-6.0f64..6.0);
    let curve_y = rng.random_range(-4.0f64..4.0);
    let off_x = rng.random_range(-8.0f64..8.0);
    let table_gap_nom = 2.0;
    let table_thick_nom = 8.0;

    // Keep at least 3 voxels (or 4 % of the field of view) of air at each x and y border.
    let margin_x = (3.0 * sp[0]).max(0.04 * fov_x);
    let margin_y = (3.0 * sp[1]).max(0.04 * fov_y);
    let need_x = a_nom * (1.0 + w_amp) + off_x.abs() + curve_x.abs();
    let need_y = (b_ant_nom + b_post_nom) * (1.0 + w_amp) + 2.0 * curve_y.abs() + table_gap_nom + table_thick_nom;
    let s = ((fov_x / 2.0 - margin_x) / need_x).min((fov_y - 2.0 * margin_y) / need_y).min(1.0);
    let air_only = !(s * a_nom > 2.0 * sp[0] && s * b_post_nom > 2.0 * sp[1]);

    let a = a_nom * s;
    let b_ant = b_ant_nom * s;
    let b_post = b_post_nom * s;
    let bcx0 = fov_x / 2.0 + off_x * s;
    // Stack table + gap + body along y, and place the stack randomly within the spare room.
    let below = (table_thick_nom + table_gap_nom + b_post_nom * (1.0 + w_amp) + curve_y.abs()) * s;
    let slack = (fov_y - 2.0 * margin_y - need_y * s).max(0.0);
    let bcy0 = margin_y + below + slack * rng.random_range(0.3f64..0.7);
    let table_top = bcy0 - (b_post_nom * (1.0 + w_amp) + curve_y.abs() + table_gap_nom) * s;

    let g = Global {
        s,
        skin: 2.0 * s,
        fat: rng.random_range(8.0f64..22.0) * s,
        muscle: rng.random_range(8.0f64..14.0) * s,
        rib_thick: rng.random_range(8.0f64..11.0) * s,
        rib_period: rng.random_range(26.0f64..32.0) * s,
        rib_width: rng.random_range(8.0f64..11.0) * s,
        rib_slope: rng.random_range(15.0f64..25.0) * s,
        rib_phase: rng.random_range(0.0f64..30.0),
        hu_soft: rng.random_range(30.0f64..45.0),
        hu_fat: rng.random_range(-110.0f64..-90.0),
        hu_muscle: rng.random_range(45.0f64..58.0),
        hu_lung: rng.random_range(-875.0f64..-840.0),
        hu_vessel: rng.random_range(35.0f64..50.0),
        hu_cancellous: rng.random_range(280.0f64..420.0),
        hu_cortical: rng.random_range(900.0f64..1200.0),
        hu_disc: rng.random_range(70.0f64..100.0),
        fat_threshold: rng.random_range(0.3f64..0.6),
        table_cx: fov_x / 2.0,
        table_hw: (a * 1.1).min(fov_x / 2.0 - margin_x),
        table_top,
        table_bottom: table_top - table_thick_nom * s,
        table_shell: 2.0 * s,
    };

    // z landmarks: the left diaphragm dome somewhere in the middle of the scan, the right one
    // higher (the liver pushes it up).
    let zd = len_z * rng.random_range(0.45f64..0.62);
    let zd_r = zd + rng.random_range(8.0f64..20.0) * s;
    let jit = |rng: &mut StdRng, v: f64, f: f64| v * rng.random_range(1.0 - f..1.0 + f);

    // Organs (nominal mm relative to the body centre, then scaled): liver on the patient's
    // right (+x), spleen left-posterior, heart anterior-left above the diaphragm, kidneys
    // posterior either side of the spine with the right one lower.
    let blob = |rng: &mut StdRng, dx: f64, dy: f64, rx: f64, ry: f64, angle: f64, cz: f64, lo: f64, hi: f64| Blob {
        dx: jit(rng, dx, 0.1) * s,
        dy: (dy + rng.random_range(-5.0f64..5.0)) * s,
        rx: jit(rng, rx, 0.12) * s,
        ry: jit(rng, ry, 0.12) * s,
        angle: angle + rng.random_range(-0.2f64..0.2),
        cz,
        rz_lo: jit(rng, lo, 0.1) * s,
        rz_hi: jit(rng, hi, 0.1) * s,
    };
    let liver = blob(&mut rng, 55.0, 5.0, 82.0, 80.0, 0.0, zd_r - 70.0 * s, 90.0, 80.0);
    let heart = blob(&mut rng, -22.0, 35.0, 62.0, 50.0, -0.5, zd + 45.0 * s, 55.0, 55.0);
    let spleen = blob(&mut rng, -90.0, -30.0, 30.0, 50.0, 0.5, zd - 45.0 * s, 50.0, 50.0);
    let kid_r = blob(&mut rng, 58.0, -52.0, 26.0, 38.0, -0.5, zd - 125.0 * s, 55.0, 55.0);
    let kid_l = blob(&mut rng, -58.0, -52.0, 26.0, 38.0, 0.5, zd - 110.0 * s, 55.0, 55.0);
    let lung_r = blob(&mut rng, 68.0, 5.0, 70.0, 90.0, 0.0, zd_r + 45.0 * s, 50.0, 210.0);
    let lung_l = blob(&mut rng, -70.0, 0.0, 62.0, 88.0, 0.0, zd + 45.0 * s, 50.0, 210.0);
    let hu_liver = rng.random_range(55.0f64..66.0);
    let hu_heart = rng.random_range(35.0f64..45.0);
    let hu_spleen = rng.random_range(45.0f64..52.0);
    let hu_kidney = rng.random_range(25.0f64..35.0);

    // Lung vessels: oblique tubes, thicker near the lung centre (towards the hilum).
    let vessels = |rng: &mut StdRng| -> Vec<Vessel> {
        (0..28)
            .map(|_| {
                let rho = rng.random_range(0.0f64..0.85).sqrt();
                let phi = rng.random_range(0.0f64..std::f64::consts::TAU);
                Vessel {
                    u: rho * phi.cos(),
                    v: rho * phi.sin(),
                    du_dz: rng.random_range(-0.003f64..0.003) / s.max(1e-3),
                    dv_dz: rng.random_range(-0.003f64..0.003) / s.max(1e-3),
                    r: (0.8 + 2.6 * (1.0 - rho)) * rng.random_range(0.7f64..1.2) * s,
                }
            })
            .collect()
    };
    let vess_r = vessels(&mut rng);
    let vess_l = vessels(&mut rng);

    // Spine: vertebral bodies separated by discs, with a canal and a posterior arch.
    let vert_rx = rng.random_range(19.0f64..24.0) * s;
    let vert_ry = rng.random_range(15.0f64..19.0) * s;
    let vert_depth = rng.random_range(68.0f64..80.0) * s; // from the back skin to the body centre
    let vert_period = rng.random_range(26.0f64..32.0) * s;
    let disc_width = rng.random_range(5.0f64..8.0) * s;
    let vert_phase = rng.random_range(0.0f64..30.0);
    let aorta_r = rng.random_range(10.0f64..13.0) * s;
    let ivc_r = rng.random_range(9.0f64..12.0) * s;

    // Texture that breaks the abdomen into fat and soft tissue (mesentery, bowel loops): four
    // in-plane fields, each a sum of three plane waves of random direction and wavelength,
    // modulated along z by cos/sin pairs. Precomputed per (x, y) and per z, so the per-voxel
    // cost is four multiply-adds and the blobs are not aligned with the grid.
    let mut fields: Vec<Vec<f32>> = Vec::with_capacity(4);
    for _ in 0..4 {
        let waves: Vec<(f64, f64, f64)> = (0..3)
            .map(|_| {
                let k = std::f64::consts::TAU / (rng.random_range(25.0f64..60.0) * s.max(0.05));
                let dir = rng.random_range(0.0f64..std::f64::consts::PI);
                (k * dir.cos(), k * dir.sin(), rng.random_range(0.0f64..std::f64::consts::TAU))
            })
            .collect();
        let mut f = Vec::with_capacity(nx * ny);
        for x in 0..nx {
            let px = (x as f64 + 0.5) * sp[0];
            for y in 0..ny {
                let py = (y as f64 + 0.5) * sp[1];
                let sum: f64 = waves.iter().map(|(kx, ky, ph)| (kx * px + ky * py + ph).sin()).sum();
                // Sum of three unit sines has variance 1.5; scale to 1.
                f.push((sum * 0.816_496_580_927_726) as f32);
            }
        }
        fields.push(f);
    }
    let mut zmod: Vec<[f64; 4]> = Vec::with_capacity(nz);
    let kz = [0, 1].map(|_| std::f64::consts::TAU / (rng.random_range(30.0f64..70.0) * s.max(0.05)));
    let phz = rng.random_range(0.0f64..std::f64::consts::TAU);
    for z in 0..nz {
        let zz = (z as f64 + 0.5) * sp[2];
        let (a0, a1) = (kz[0] * zz + phz, kz[1] * zz);
        // Two cos/sin pairs, each of unit total variance; / sqrt(2) for a unit-variance sum.
        let r = std::f64::consts::FRAC_1_SQRT_2;
        zmod.push([a0.cos() * r, a0.sin() * r, a1.cos() * r, a1.sin() * r]);
    }
    let noise_seed = rng.random::<u64>();

    // Per-slice geometry, computed once.
    let slices: Vec<Slice> = (0..nz)
        .map(|k| {
            let zz = (k as f64 + 0.5) * sp[2];
            let t = 2.0 * zz / len_z - 1.0;
            let bcx = bcx0 + curve_x * s * t * t;
            let bcy = bcy0 + curve_y * s * t * t;
            let w = 1.0 + w_amp * (std::f64::consts::TAU * zz / w_period + w_phase).sin();
            let (sa, sb_ant, sb_post) = (a * w, b_ant * w, b_post * w);
            let vert_cy = bcy - sb_post + vert_depth;
            let disc = (zz - vert_phase).rem_euclid(vert_period.max(1e-3)) < disc_width;
            let vert = Ell::new(bcx, vert_cy, vert_rx, vert_ry, 0.0);
            let rim = 2.5 * s;
            let vert_rim_q = (1.0 - rim / vert_ry.max(1e-3)).max(0.0).powi(2);
            let canal_cy = vert_cy - vert_ry - 8.0 * s;
            let canal = Ell::circle(bcx, canal_cy, 7.0 * s);
            let arch = Ell::circle(bcx, canal_cy, 12.0 * s);

            let mut organs = Vec::new();
            if zz > zd - 10.0 * s {
                // Sternum: just inside the anterior chest wall.
                let y = bcy + sb_ant - g.skin - g.fat - g.muscle - 5.0 * s;
                organs.push((Ell::new(bcx, y, 14.0 * s, 6.0 * s, 0.0), g.hu_cancellous));
            }
            let aorta_cy = vert_cy + vert_ry + aorta_r + 2.0 * s;
            organs.push((Ell::circle(bcx - 16.0 * s, aorta_cy, aorta_r), g.hu_vessel));
            if zz < zd + 10.0 * s {
                organs.push((Ell::circle(bcx + 22.0 * s, aorta_cy + 2.0 * s, ivc_r), g.hu_vessel));
            }
            // Kidneys sit in perirenal fat, which is what makes them visible next to bowel of
            // almost the same density; the fat capsules come after the kidneys (lower priority).
            for (b, hu) in [
                (heart, hu_heart),
                (liver, hu_liver),
                (spleen, hu_spleen),
                (kid_r, hu_kidney),
                (kid_l, hu_kidney),
                (kid_r.grown(1.3, 4.0 * s), g.hu_fat),
                (kid_l.grown(1.3, 4.0 * s), g.hu_fat),
            ] {
                if let Some(e) = b.section(zz, bcx, bcy) {
                    organs.push((e, hu));
                }
            }
            let mut lungs = Vec::new();
            for (b, vs) in [(&lung_r, &vess_r), (&lung_l, &vess_l)] {
                if let Some(e) = b.section(zz, bcx, bcy) {
                    let (lcx, lcy) = (bcx + b.dx, bcy + b.dy);
                    let tubes = vs
                        .iter()
                        .map(|v| {
                            let dz = zz - b.cz;
                            Ell::circle(lcx + (v.u + v.du_dz * dz) * b.rx, lcy + (v.v + v.dv_dz * dz) * b.ry, v.r)
                        })
                        .collect();
                    // Dependent (posterior) lung is denser: a gradient along y.
                    lungs.push((e, 35.0 / b.ry.max(1e-3), tubes));
                }
            }
            Slice {
                bcx,
                bcy,
                a: sa,
                b_ant: sb_ant,
                b_post: sb_post,
                thorax: zz > zd - 60.0 * s,
                zz,
                disc,
                vert,
                vert_rim_q,
                canal,
                arch,
                canal_cx: bcx,
                canal_cy,
                organs,
                lungs,
            }
        })
        .collect();

    let mut out = vec![0i16; n];
    out.par_chunks_mut(ny * nz).enumerate().for_each(|(x, plane)| {
        let mut noise = Noise(noise_seed ^ (x as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let px = (x as f64 + 0.5) * sp[0];
        for y in 0..ny {
            let py = (y as f64 + 0.5) * sp[1];
            let i = x * ny + y;
            let f = [fields[0][i] as f64, fields[1][i] as f64, fields[2][i] as f64, fields[3][i] as f64];
            for (z, sl) in slices.iter().enumerate() {
                let (hu, sigma) = if air_only {
                    (AIR_HU, 6.0)
                } else {
                    let m = &zmod[z];
                    let texture = f[0] * m[0] + f[1] * m[1] + f[2] * m[2] + f[3] * m[3];
                    voxel(&g, sl, px, py, texture)
                };
                let v = hu + sigma * noise.gauss();
                plane[y * nz + z] = v.round().clamp(HU_MIN, HU_MAX) as i16;
            }
        }
    });
    out
}

/// HU (before noise) and noise sigma of one voxel at absolute position (px, py) mm.
#[inline]
fn voxel(g: &Global, sl: &Slice, px: f64, py: f64, texture: f64) -> (f64, f64) {
    let s = g.s;
    if sl.layer_q(px, py, 0.0) >= 1.0 {
        // Outside the body: the table or air.
        if py <= g.table_top && py >= g.table_bottom && (px - g.table_cx).abs() <= g.table_hw {
            let shell = py > g.table_top - g.table_shell || py < g.table_bottom + g.table_shell;
            return if shell { (250.0, 15.0) } else { (-850.0, 10.0) };
        }
        return (AIR_HU, 6.0);
    }
    if sl.layer_q(px, py, g.skin) >= 1.0 {
        return (g.hu_muscle - 10.0, 12.0);
    }
    let d_fat = g.skin + g.fat;
    if sl.layer_q(px, py, d_fat) >= 1.0 {
        return (g.hu_fat, 12.0);
    }
    if sl.thorax
        && let Some(hu) = rib(g, sl, px, py, d_fat + 0.5 * g.muscle)
    {
        return (hu, 20.0);
    }
    if sl.layer_q(px, py, d_fat + g.muscle) >= 1.0 {
        return (g.hu_muscle, 12.0);
    }

    // Spine first: bone wins over everything it touches.
    let qv = sl.vert.q(px, py);
    if qv < 1.0 {
        return if sl.disc {
            (g.hu_disc, 12.0)
        } else if qv > sl.vert_rim_q {
            (g.hu_cortical, 25.0)
        } else {
            (g.hu_cancellous, 25.0)
        };
    }
    if !sl.disc {
        if sl.canal.q(px, py) < 1.0 {
            return (15.0, 12.0);
        }
        let dx = px - sl.canal_cx;
        let dy = py - sl.canal_cy;
        let spinous = dx.abs() < 3.5 * s && dy < -8.0 * s && dy > -32.0 * s;
        let transverse = dy.abs() < 4.0 * s && dx.abs() < 30.0 * s;
        if sl.arch.q(px, py) < 1.0 || spinous || transverse {
            return (0.55 * g.hu_cortical, 25.0);
        }
    } else if sl.canal.q(px, py) < 1.0 {
        return (15.0, 12.0);
    }

    for (e, hu) in &sl.organs {
        if e.q(px, py) < 1.0 {
            return (*hu, 12.0);
        }
    }
    for (e, grad, tubes) in &sl.lungs {
        if e.q(px, py) < 1.0 {
            if tubes.iter().any(|t| t.q(px, py) < 1.0) {
                return (g.hu_vessel, 14.0);
            }
            return (g.hu_lung - (py - e.cy) * grad, 14.0);
        }
    }
    if texture > g.fat_threshold { (g.hu_fat + 10.0, 12.0) } else { (g.hu_soft, 12.0) }
}

/// Rib bone at (px, py) if any: ribs run in a band just inside the chest wall, descend towards
/// the front (so one slice shows arcs, not rings), stop short of the sternum and of the back
/// muscles, and have an oval cross-section with a bright cortex and darker marrow.
#[inline]
fn rib(g: &Global, sl: &Slice, px: f64, py: f64, d_outer: f64) -> Option<f64> {
    let q = sl.layer_q(px, py, d_outer);
    if q >= 1.0 {
        return None;
    }
    // Cheap reject of the interior before any sqrt/atan2.
    let inner = (sl.a.min(sl.b_ant).min(sl.b_post) - d_outer).max(1e-3);
    let rho_min = (1.0 - 2.0 * g.rib_thick / inner).max(0.0);
    if q < rho_min * rho_min {
        return None;
    }
    let dx = px - sl.bcx;
    let dy = py - sl.bcy;
    let rho = q.sqrt();
    // Distance inwards from the outer edge of the band, along the ray from the body centre.
    let depth = (dx * dx + dy * dy).sqrt() * (1.0 / rho.max(1e-6) - 1.0);
    let rb = depth / g.rib_thick;
    if rb >= 1.0 {
        return None;
    }
    let b = if dy >= 0.0 { sl.b_ant } else { sl.b_post };
    let theta = (dy / b).atan2(dx / sl.a);
    // Angular distance from straight posterior (-pi/2), in [0, pi].
    let mut d = (theta + std::f64::consts::FRAC_PI_2).abs();
    if d > std::f64::consts::PI {
        d = std::f64::consts::TAU - d;
    }
    if !(0.35..=std::f64::consts::PI - 0.45).contains(&d) {
        return None;
    }
    let zb = (sl.zz + g.rib_slope * d - g.rib_phase).rem_euclid(g.rib_period.max(1e-3)) / g.rib_width.max(1e-3);
    if zb >= 1.0 {
        return None;
    }
    let e = (2.0 * rb - 1.0).powi(2) + (2.0 * zb - 1.0).powi(2);
    if e >= 1.0 {
        None
    } else if e > 0.45 {
        Some(g.hu_cortical)
    } else {
        Some(g.hu_cancellous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(shape: [usize; 3], x: usize, y: usize, z: usize) -> usize {
        (x * shape[1] + y) * shape[2] + z
    }

    #[test]
    fn deterministic_per_seed_and_seeds_differ() {
        let shape = [96, 80, 40];
        let sp = [2.5, 2.5, 4.0];
        let a = phantom_ct(7, shape, sp);
        let b = phantom_ct(7, shape, sp);
        let c = phantom_ct(8, shape, sp);
        assert_eq!(a.len(), 96 * 80 * 40);
        assert_eq!(a, b);
        let differing = a.iter().zip(&c).filter(|(p, q)| (**p as i32 - **q as i32).abs() > 100).count();
        assert!(differing > a.len() / 50, "seeds 7 and 8 differ in only {differing} voxels");
    }

    #[test]
    fn default_phantom_is_plausible_ct() {
        let shape = phantom_shape();
        let sp = phantom_spacing();
        for seed in [0u64, 1, 12345] {
            let t0 = std::time::Instant::now();
            let v = phantom_ct(seed, shape, sp);
            let dt = t0.elapsed();
            assert_eq!(v.len(), shape.iter().product::<usize>());
            // Generous bound: debug-ish or loaded CI machines; release takes tens of ms.
            assert!(dt.as_secs_f64() < 5.0, "phantom took {dt:?}");

            let min = *v.iter().min().unwrap();
            let max = *v.iter().max().unwrap();
            assert!(min >= -1100, "min {min}");
            assert!(max <= 3071, "max {max}");
            let air = v.iter().filter(|&&h| h < -900).count() as f64 / v.len() as f64;
            assert!(air > 0.25 && air < 0.9, "air fraction {air}");

            // Body bounding box = voxels >= -500 HU (docs/method.md §1.3), over x and y.
            let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
            for x in 0..shape[0] {
                for y in 0..shape[1] {
                    for z in 0..shape[2] {
                        if v[idx(shape, x, y, z)] >= -500 {
                            x0 = x0.min(x);
                            x1 = x1.max(x);
                            y0 = y0.min(y);
                            y1 = y1.max(y);
                        }
                    }
                }
            }
            assert!(x0 < x1 && y0 < y1);
            // A torso: well over 150 mm wide at these scales.
            assert!((x1 - x0) as f64 * sp[0] > 150.0, "body width {}", x1 - x0);
            let mut lung = 0usize;
            for x in x0..=x1 {
                for y in y0..=y1 {
                    for z in 0..shape[2] {
                        let h = v[idx(shape, x, y, z)];
                        if (-950..=-700).contains(&h) {
                            lung += 1;
                        }
                    }
                }
            }
            assert!(lung > 20_000, "lung voxels in the body box: {lung}");
            let bone = v.iter().filter(|&&h| h > 250).count();
            assert!(bone > 5_000, "bone voxels: {bone}");
            let dense = v.iter().filter(|&&h| h > 800).count();
            assert!(dense > 200, "cortical bone voxels: {dense}");
            // Soft tissue and fat both present.
            let soft = v.iter().filter(|&&h| (0..=80).contains(&h)).count();
            let fat = v.iter().filter(|&&h| (-150..=-60).contains(&h)).count();
            assert!(soft > v.len() / 10 && fat > v.len() / 50, "soft {soft}, fat {fat}");
        }
    }

    #[test]
    fn body_is_surrounded_by_air_at_the_border() {
        for (seed, shape, sp) in [
            (3u64, phantom_shape(), phantom_spacing()),
            (4, [128, 128, 32], [1.0, 1.0, 2.0]),
            (5, [200, 300, 20], [3.0, 0.8, 5.0]),
        ] {
            let v = phantom_ct(seed, shape, sp);
            for x in 0..shape[0] {
                for y in 0..shape[1] {
                    if x == 0 || y == 0 || x == shape[0] - 1 || y == shape[1] - 1 {
                        for z in 0..shape[2] {
                            let h = v[idx(shape, x, y, z)];
                            assert!(h < -900, "seed {seed}: border voxel ({x},{y},{z}) = {h}");
                        }
                    }
                }
            }
            // And there is a body in the middle.
            let c = v[idx(shape, shape[0] / 2, shape[1] / 2, shape[2] / 2)];
            assert!(c > -1000 + 100, "seed {seed}: centre voxel {c}");
        }
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        assert!(phantom_ct(1, [0, 10, 10], [1.0, 1.0, 1.0]).is_empty());
        assert!(phantom_ct(1, [usize::MAX, 2, 2], [1.0, 1.0, 1.0]).is_empty());
        let tiny = phantom_ct(1, [2, 3, 1], [1.0, 1.0, 2.0]);
        assert_eq!(tiny.len(), 6);
        assert!(tiny.iter().all(|&h| h < -900));
        let odd = phantom_ct(1, [16, 16, 4], [f64::NAN, -1.0, 0.0]);
        assert_eq!(odd.len(), 16 * 16 * 4);
        let v = phantom_ct(2, [64, 64, 8], [1e6, 1e6, 1e6]);
        assert!(v.iter().all(|&h| (-1024..=3071).contains(&h)));
    }
}
