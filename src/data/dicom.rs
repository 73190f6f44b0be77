//! DICOM series in: a folder of DICOM files (or a DICOMDIR beside them) read as one CT volume,
//! wherever a NIfTI is accepted.
//!
//! Files are parsed by dicom-rs (`dicom-object`; pixel data decoded by `dicom-pixeldata`:
//! uncompressed, JPEG baseline / lossless, JPEG 2000, RLE, deflate). The folder's files are
//! grouped by SeriesInstanceUID; localizers (ImageType LOCALIZER) and series of another
//! modality than CT are set aside and named. The CT series' slices are sorted along the slice
//! normal (row direction × column direction of ImageOrientationPatient) by the projection of
//! ImagePositionPatient; duplicated positions, gaps (a missing slice) and uneven spacing are
//! errors naming the files and positions; a gantry tilt (slices not stacked along their
//! normal) is refused, as an oblique NIfTI is; a non-axial (sagittal, coronal) series is read
//! with its own orientation, with a note. Stored values go through RescaleSlope /
//! RescaleIntercept into HU. DICOM's patient coordinates (LPS) become NIfTI's world (RAS) by
//! negating x and y; the volume then follows exactly the NIfTI path (canonical axes, outputs
//! on the series' own grid, written as NIfTI).
//!
//! Voxel (i, j, k) of the file grid is column i, row j of slice k:
//! world_LPS = IPP_0 + i · Δc · X + j · Δr · Y + k · (IPP_last − IPP_0) / (n − 1),
//! with X, Y the row and column direction cosines and (Δr, Δc) = PixelSpacing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::nifti_io::{NonFinitePolicy, Volume};

/// Whether `p` is a DICOM series input: a folder whose files include DICOM files (the
/// `DICM` magic at byte 128), or a DICOMDIR file.
pub fn is_dicom_input(p: &Path) -> bool {
    if p.is_file() {
        return p.file_name().is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"));
    }
    if !p.is_dir() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(p) else { return false };
    entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|f| f.is_file()).take(16).any(|f| has_dicom_magic(&f))
}

fn has_dicom_magic(f: &Path) -> bool {
    use std::io::Read;
    let mut b = [0u8; 132];
    std::fs::File::open(f).and_then(|mut h| h.read_exact(&mut b)).is_ok() && &b[128..132] == b"DICM"
}

/// One slice's header, as needed to build the volume.
struct Slice {
    file: PathBuf,
    series: String,
    description: String,
    modality: String,
    localizer: bool,
    rows: usize,
    cols: usize,
    position: [f64; 3],
    orientation: [f64; 6],
    spacing: [f64; 2],
}

fn text(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<String> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_str().ok()).map(|s| s.trim().to_string())
}

fn floats(obj: &DefaultDicomObject, tag: dicom_object::Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_multi_float64().ok())
}

fn header(file: &Path) -> Result<Slice> {
    let obj = OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(file).map_err(|e| anyhow::anyhow!("{}: not a readable DICOM file: {e}", file.display()))?;
    let need = |what: &str, v: Option<Vec<f64>>, n: usize| -> Result<Vec<f64>> {
        let v = v.with_context(|| format!("{}: no {what}", file.display()))?;
        ensure!(v.len() == n && v.iter().all(|x| x.is_finite()), "{}: {what} {v:?} is not {n} numbers", file.display());
        Ok(v)
    };
    let image_type = obj.element_opt(tags::IMAGE_TYPE).ok().flatten().and_then(|e| e.to_multi_str().ok().map(|s| s.to_vec())).unwrap_or_default();
    let localizer = image_type.iter().any(|t| t.trim().eq_ignore_ascii_case("LOCALIZER"));
    let modality = text(&obj, tags::MODALITY).unwrap_or_default();
    let series = text(&obj, tags::SERIES_INSTANCE_UID).with_context(|| format!("{}: no SeriesInstanceUID", file.display()))?;
    let description = text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default();
    let rows = obj.element(tags::ROWS).ok().and_then(|e| e.to_int::<u32>().ok()).with_context(|| format!("{}: no Rows", file.display()))? as usize;
    let cols = obj.element(tags::COLUMNS).ok().and_then(|e| e.to_int::<u32>().ok()).with_context(|| format!("{}: no Columns", file.display()))? as usize;
    if localizer || modality != "CT" {
        // Set aside; geometry is not needed to report them.
        return Ok(Slice { file: file.into(), series, description, modality, localizer, rows, cols, position: [0.0; 3], orientation: [0.0; 6], spacing: [1.0; 2] });
    }
    let position = need("ImagePositionPatient", floats(&obj, tags::IMAGE_POSITION_PATIENT), 3)?;
    let orientation = need("ImageOrientationPatient", floats(&obj, tags::IMAGE_ORIENTATION_PATIENT), 6)?;
    let spacing = need("PixelSpacing", floats(&obj, tags::PIXEL_SPACING), 2)?;
    ensure!(spacing.iter().all(|s| *s > 0.0), "{}: PixelSpacing {spacing:?} is not positive", file.display());
    Ok(Slice {
        file: file.into(),
        series,
        description,
        modality,
        localizer,
        rows,
        cols,
        position: [position[0], position[1], position[2]],
        orientation: std::array::from_fn(|i| orientation[i]),
        spacing: [spacing[0], spacing[1]],
    })
}

/// The files of a series input: every regular file below the folder (a DICOMDIR file stands
/// for its folder), the DICOMDIR itself and non-DICOM files left out.
pub fn files_of(input: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let dir = if input.is_file() { input.parent().unwrap_or(Path::new(".")).to_path_buf() } else { input.to_path_buf() };
    let mut out = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading folder {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.file_name().is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR")) && has_dicom_magic(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    ensure!(!out.is_empty(), "{}: no DICOM files (files with the DICM marker at byte 128)", dir.display());
    Ok((dir, out))
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Read the CT series of a DICOM folder (or of a DICOMDIR's folder) into a volume in canonical
/// orientation, values in HU.
pub fn read_series(input: &Path, policy: NonFinitePolicy) -> Result<Volume> {
    let (dir, files) = files_of(input)?;
    let name = dir.display().to_string();
    let slices: Vec<Slice> = files.iter().map(|f| header(f)).collect::<Result<_>>()?;
    let mut by_series: BTreeMap<String, Vec<Slice>> = BTreeMap::new();
    for s in slices {
        by_series.entry(s.series.clone()).or_default().push(s);
    }
    let describe = |uid: &str, v: &[Slice]| format!("{uid} ({} {}, {} files{})", v[0].modality, if v[0].description.is_empty() { "-" } else { &v[0].description }, v.len(), if v[0].localizer { ", localizer" } else { "" });
    let (ct, other): (Vec<_>, Vec<_>) = by_series.into_iter().partition(|(_, v)| v[0].modality == "CT" && !v[0].localizer);
    let set_aside: Vec<String> = other.iter().map(|(u, v)| describe(u, v)).collect();
    let mut ct = match ct.len() {
        0 => bail!("{name}: no CT series (found {})", if set_aside.is_empty() { "nothing".to_string() } else { set_aside.join("; ") }),
        1 => ct.into_iter().next().expect("one series").1,
        _ => bail!(
            "{name}: {} CT series in one folder: {}; put each series in its own folder (or pass the folder of the one you want)",
            ct.len(),
            ct.iter().map(|(u, v)| describe(u, v)).collect::<Vec<_>>().join("; ")
        ),
    };
    if !set_aside.is_empty() {
        eprintln!("note: {name}: set aside {}", set_aside.join("; "));
    }
    let first = &ct[0];
    let (rows, cols, orient, spacing) = (first.rows, first.cols, first.orientation, first.spacing);
    for s in &ct {
        ensure!(s.rows == rows && s.cols == cols, "{}: {}x{} pixels, but {} has {rows}x{cols}; a series must have one slice size", s.file.display(), s.rows, s.cols, first.file.display());
        ensure!(s.orientation.iter().zip(&orient).all(|(a, b)| (a - b).abs() < 1e-4), "{}: ImageOrientationPatient differs from {}'s", s.file.display(), first.file.display());
        ensure!(s.spacing.iter().zip(&spacing).all(|(a, b)| (a - b).abs() < 1e-4), "{}: PixelSpacing differs from {}'s", s.file.display(), first.file.display());
    }
    let row_dir = [orient[0], orient[1], orient[2]];
    let col_dir = [orient[3], orient[4], orient[5]];
    let normal = cross(row_dir, col_dir);
    ensure!((dot(normal, normal) - 1.0).abs() < 1e-3, "{name}: ImageOrientationPatient {orient:?} is not two orthonormal directions");
    if normal[2].abs() < 0.9 {
        // Sagittal or coronal slices: an axis-aligned grid all the same, read with its own orientation.
        let plane = if normal[0].abs() > normal[1].abs() { "sagittal" } else { "coronal" };
        eprintln!("note: {name}: a non-axial ({plane}) series; read with its own orientation");
    }
    ct.sort_by(|a, b| dot(a.position, normal).total_cmp(&dot(b.position, normal)));
    let n = ct.len();
    let along: Vec<f64> = ct.iter().map(|s| dot(s.position, normal)).collect();
    for w in 0..n.saturating_sub(1) {
        ensure!(
            along[w + 1] - along[w] > 1e-3,
            "{name}: {} and {} are at the same position along the slice normal ({:.3} mm): duplicate slices",
            ct[w].file.display(),
            ct[w + 1].file.display(),
            along[w]
        );
    }
    let step = if n > 1 {
        let mut gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_by(f64::total_cmp);
        let median = gaps[gaps.len() / 2];
        for w in 0..n - 1 {
            let g = along[w + 1] - along[w];
            ensure!(
                (g - median).abs() <= 0.01 * median + 1e-3,
                "{name}: slices are {median:.3} mm apart, but {g:.3} mm separate {} and {} (at {:.2} and {:.2} mm){}; the series is not evenly spaced",
                ct[w].file.display(),
                ct[w + 1].file.display(),
                along[w],
                along[w + 1],
                if (g / median - (g / median).round()).abs() < 0.05 && g > 1.5 * median { format!(": {} slice(s) missing", (g / median).round() as usize - 1) } else { String::new() }
            );
        }
        // Slices must stack along their normal: an in-plane drift between them is a gantry tilt.
        let d: [f64; 3] = std::array::from_fn(|a| (ct[n - 1].position[a] - ct[0].position[a]) / (n - 1) as f64);
        let off = (dot(d, d) - dot(d, normal).powi(2)).max(0.0).sqrt();
        ensure!(off <= 1e-3 * median.max(1.0) + 1e-4, "{name}: the slices are not stacked along their normal (in-plane shift {off:.3} mm per slice): a gantry-tilted series; resample it to an orthogonal grid first");
        d
    } else {
        std::array::from_fn(|a| normal[a])
    };
    // Voxel (col i, row j, slice k) → LPS → RAS (x and y negated).
    let p0 = ct[0].position;
    let mut affine = [[0.0f64; 4]; 4];
    for r in 0..3 {
        let sign = if r < 2 { -1.0 } else { 1.0 };
        affine[r] = [sign * row_dir[r] * spacing[1], sign * col_dir[r] * spacing[0], sign * step[r], sign * p0[r]];
    }
    affine[3][3] = 1.0;
    let plane = rows * cols;
    let mut values = vec![0.0f64; plane * n];
    for (k, s) in ct.iter().enumerate() {
        let v = pixels(&s.file).with_context(|| format!("{}: decoding the pixel data", s.file.display()))?;
        ensure!(v.len() == plane, "{}: {} pixel values for {rows}x{cols} (one frame expected)", s.file.display(), v.len());
        values[k * plane..(k + 1) * plane].copy_from_slice(&v);
    }
    let geometry_name = PathBuf::from(&name);
    super::nifti_io::volume_from_file_values(&geometry_name, values, [cols, rows, n], affine, policy)
}

/// One slice's values in HU (RescaleSlope / RescaleIntercept applied), column fastest.
fn pixels(file: &Path) -> Result<Vec<f64>> {
    use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
    let obj = dicom_object::open_file(file).map_err(|e| anyhow::anyhow!("not a readable DICOM file: {e}"))?;
    let slope = floats(&obj, tags::RESCALE_SLOPE).and_then(|v| v.first().copied()).unwrap_or(1.0);
    let intercept = floats(&obj, tags::RESCALE_INTERCEPT).and_then(|v| v.first().copied()).unwrap_or(0.0);
    ensure!(slope.is_finite() && slope != 0.0 && intercept.is_finite(), "RescaleSlope {slope} / RescaleIntercept {intercept} cannot give HU");
    let decoded = obj.decode_pixel_data().map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(decoded.samples_per_pixel() == 1, "{} samples per pixel; a CT has 1", decoded.samples_per_pixel());
    let raw: Vec<f64> = decoded.to_vec_with_options(&ConvertOptions::new().with_modality_lut(ModalityLutOption::None)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(raw.into_iter().map(|v| v * slope + intercept).collect())
}
