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
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    check_lengths(&bytes).with_context(|| format!("{}: not a readable DICOM file", file.display()))?;
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable DICOM file: {e}", file.display()))?;
    let need = |what: &str, v: Option<Vec<f64>>, n: usize| -> Result<Vec<f64>> {
        let v = v.with_context(|| format!("{}: no {what}", file.display()))?;
        ensure!(v.len() == n && v.iter().all(|x| x.is_finite()), "{}: {what} {v:?} is not {n} numbers", file.display());
        Ok(v)
    };
    let image_type = obj
        .element_opt(tags::IMAGE_TYPE)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_str().ok().map(|s| s.to_vec()))
        .unwrap_or_default();
    let localizer = image_type.iter().any(|t| t.trim().eq_ignore_ascii_case("LOCALIZER"));
    let modality = text(&obj, tags::MODALITY).unwrap_or_default();
    let series =
        text(&obj, tags::SERIES_INSTANCE_UID).with_context(|| format!("{}: no SeriesInstanceUID", file.display()))?;
    let description = text(&obj, tags::SERIES_DESCRIPTION).unwrap_or_default();
    let rows = obj
        .element(tags::ROWS)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .with_context(|| format!("{}: no Rows", file.display()))? as usize;
    let cols = obj
        .element(tags::COLUMNS)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .with_context(|| format!("{}: no Columns", file.display()))? as usize;
    if localizer || modality != "CT" {
        // Set aside; geometry is not needed to report them.
        return Ok(Slice {
            file: file.into(),
            series,
            description,
            modality,
            localizer,
            rows,
            cols,
            position: [0.0; 3],
            orientation: [0.0; 6],
            spacing: [1.0; 2],
        });
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
    let dir =
        if input.is_file() { input.parent().unwrap_or(Path::new(".")).to_path_buf() } else { input.to_path_buf() };
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
    let describe = |uid: &str, v: &[Slice]| {
        format!(
            "{uid} ({} {}, {} files{})",
            v[0].modality,
            if v[0].description.is_empty() { "-" } else { &v[0].description },
            v.len(),
            if v[0].localizer { ", localizer" } else { "" }
        )
    };
    let (ct, other): (Vec<_>, Vec<_>) =
        by_series.into_iter().partition(|(_, v)| v[0].modality == "CT" && !v[0].localizer);
    let set_aside: Vec<String> = other.iter().map(|(u, v)| describe(u, v)).collect();
    let mut ct = match ct.len() {
        0 => bail!(
            "{name}: no CT series (found {})",
            if set_aside.is_empty() { "nothing".to_string() } else { set_aside.join("; ") }
        ),
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
        ensure!(
            s.rows == rows && s.cols == cols,
            "{}: {}x{} pixels, but {} has {rows}x{cols}; a series must have one slice size",
            s.file.display(),
            s.rows,
            s.cols,
            first.file.display()
        );
        ensure!(
            s.orientation.iter().zip(&orient).all(|(a, b)| (a - b).abs() < 1e-4),
            "{}: ImageOrientationPatient differs from {}'s",
            s.file.display(),
            first.file.display()
        );
        ensure!(
            s.spacing.iter().zip(&spacing).all(|(a, b)| (a - b).abs() < 1e-4),
            "{}: PixelSpacing differs from {}'s",
            s.file.display(),
            first.file.display()
        );
    }
    let row_dir = [orient[0], orient[1], orient[2]];
    let col_dir = [orient[3], orient[4], orient[5]];
    let normal = cross(row_dir, col_dir);
    ensure!(
        (dot(normal, normal) - 1.0).abs() < 1e-3,
        "{name}: ImageOrientationPatient {orient:?} is not two orthonormal directions"
    );
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
                if (g / median - (g / median).round()).abs() < 0.05 && g > 1.5 * median {
                    format!(": {} slice(s) missing", (g / median).round() as usize - 1)
                } else {
                    String::new()
                }
            );
        }
        // Slices must stack along their normal: an in-plane drift between them is a gantry tilt.
        let d: [f64; 3] = std::array::from_fn(|a| (ct[n - 1].position[a] - ct[0].position[a]) / (n - 1) as f64);
        let off = (dot(d, d) - dot(d, normal).powi(2)).max(0.0).sqrt();
        ensure!(
            off <= 1e-3 * median.max(1.0) + 1e-4,
            "{name}: the slices are not stacked along their normal (in-plane shift {off:.3} mm per slice): a gantry-tilted series; resample it to an orthogonal grid first"
        );
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
        ensure!(
            v.len() == plane,
            "{}: {} pixel values for {rows}x{cols} (one frame expected)",
            s.file.display(),
            v.len()
        );
        values[k * plane..(k + 1) * plane].copy_from_slice(&v);
    }
    let geometry_name = PathBuf::from(&name);
    super::nifti_io::volume_from_file_values(&geometry_name, values, [cols, rows, n], affine, policy)
}

/// The most |RescaleSlope| and |RescaleIntercept| a CT slice may carry (scanners write slopes
/// of 1 or a small fraction and intercepts near -1024; anything far larger is a damaged file).
const MAX_RESCALE_SLOPE: f64 = 1e3;
const MAX_RESCALE_INTERCEPT: f64 = 1e5;
/// The HU range every voxel must fall in after rescaling: int16's, the range CT scanners and
/// NIfTI CTs use.
const HU_RANGE: [f64; 2] = [-32768.0, 32767.0];

/// One slice's values in HU (RescaleSlope / RescaleIntercept applied), column fastest, after
/// its pixel module is checked (`check_pixel_module`); `header` has checked its element
/// lengths (`check_lengths`).
fn pixels(file: &Path) -> Result<Vec<f64>> {
    use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
    let obj = dicom_object::open_file(file).map_err(|e| anyhow::anyhow!("not a readable DICOM file: {e}"))?;
    let (slope, intercept) = rescale(&obj)?;
    let module = check_pixel_module(&obj)?;
    let decoded = obj.decode_pixel_data().map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(decoded.samples_per_pixel() == 1, "{} samples per pixel; a CT has 1", decoded.samples_per_pixel());
    ensure!(
        decoded.bits_allocated() == module.bits_allocated && decoded.number_of_frames() == 1,
        "the decoded pixel data has {} bits per sample in {} frame(s), BitsAllocated says {}",
        decoded.bits_allocated(),
        decoded.number_of_frames(),
        module.bits_allocated
    );
    let frame = module.rows * module.cols * (module.bits_allocated as usize / 8);
    ensure!(
        decoded.data().len() == frame,
        "the decoded pixel data has {} bytes, Rows x Columns x BitsAllocated / 8 = {frame}",
        decoded.data().len()
    );
    let raw: Vec<f64> = decoded
        .to_vec_with_options(&ConvertOptions::new().with_modality_lut(ModalityLutOption::None))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hu: Vec<f64> = raw.into_iter().map(|v| v * slope + intercept).collect();
    if let Some(v) = hu.iter().find(|v| !(HU_RANGE[0]..=HU_RANGE[1]).contains(*v)) {
        bail!(
            "RescaleSlope {slope} / RescaleIntercept {intercept} give {v} HU, outside [{}, {}]",
            HU_RANGE[0],
            HU_RANGE[1]
        );
    }
    Ok(hu)
}

/// RescaleSlope and RescaleIntercept (1 and 0 when absent), finite and plausible.
fn rescale(obj: &DefaultDicomObject) -> Result<(f64, f64)> {
    let slope = floats(obj, tags::RESCALE_SLOPE).and_then(|v| v.first().copied()).unwrap_or(1.0);
    let intercept = floats(obj, tags::RESCALE_INTERCEPT).and_then(|v| v.first().copied()).unwrap_or(0.0);
    ensure!(
        slope.is_finite() && slope != 0.0 && slope.abs() <= MAX_RESCALE_SLOPE,
        "RescaleSlope {slope} is not a CT's (finite, non-zero, at most {MAX_RESCALE_SLOPE} in magnitude)"
    );
    ensure!(
        intercept.is_finite() && intercept.abs() <= MAX_RESCALE_INTERCEPT,
        "RescaleIntercept {intercept} is not a CT's (finite, at most {MAX_RESCALE_INTERCEPT} in magnitude)"
    );
    Ok((slope, intercept))
}

/// The image pixel module as this reader needs it.
struct PixelModule {
    rows: usize,
    cols: usize,
    bits_allocated: u16,
}

/// The image pixel module of a CT slice, checked before a voxel is used: one sample per pixel,
/// MONOCHROME2 (MONOCHROME1 is refused: it asks for an inverted display, and a CT written so
/// is rare enough that guessing is worse than saying), BitsAllocated 8, 16 or 32, BitsStored
/// within it and HighBit = BitsStored - 1, PixelRepresentation 0 or 1, one frame, and for an
/// uncompressed transfer syntax pixel data of exactly Rows x Columns x BitsAllocated / 8 bytes
/// (one byte of padding to an even length allowed). Each error names the tag.
fn check_pixel_module(obj: &DefaultDicomObject) -> Result<PixelModule> {
    let int = |tag: dicom_object::Tag, name: &str| -> Result<i64> {
        let e = obj
            .element_opt(tag)
            .ok()
            .flatten()
            .with_context(|| format!("no {name} (a required tag of the image pixel module)"))?;
        e.to_int::<i64>().map_err(|_| anyhow::anyhow!("{name} {:?} is not an integer", e.to_str().unwrap_or_default()))
    };
    let spp = int(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?;
    ensure!(spp == 1, "SamplesPerPixel {spp}: a CT has 1 sample per pixel");
    let pi = text(obj, tags::PHOTOMETRIC_INTERPRETATION)
        .context("no PhotometricInterpretation (a required tag of the image pixel module)")?;
    match pi.as_str() {
        "MONOCHROME2" => {}
        "MONOCHROME1" => bail!(
            "PhotometricInterpretation MONOCHROME1 (inverted grey scale) is not read; convert the series to MONOCHROME2"
        ),
        other => bail!("PhotometricInterpretation {other}: a CT is MONOCHROME2"),
    }
    let (rows, cols) = (int(tags::ROWS, "Rows")?, int(tags::COLUMNS, "Columns")?);
    ensure!(rows > 0 && cols > 0, "Rows {rows} x Columns {cols} is not an image");
    let ba = int(tags::BITS_ALLOCATED, "BitsAllocated")?;
    ensure!(matches!(ba, 8 | 16 | 32), "BitsAllocated {ba}: a CT has 8, 16 or 32");
    let bs = int(tags::BITS_STORED, "BitsStored")?;
    ensure!((1..=ba).contains(&bs), "BitsStored {bs} with BitsAllocated {ba}");
    let hb = int(tags::HIGH_BIT, "HighBit")?;
    ensure!(hb == bs - 1, "HighBit {hb} with BitsStored {bs} (the standard has HighBit = BitsStored - 1)");
    let pr = int(tags::PIXEL_REPRESENTATION, "PixelRepresentation")?;
    ensure!(pr == 0 || pr == 1, "PixelRepresentation {pr}: 0 (unsigned) or 1 (two's complement)");
    if let Some(e) = obj.element_opt(tags::NUMBER_OF_FRAMES).ok().flatten() {
        let n = e
            .to_int::<i64>()
            .map_err(|_| anyhow::anyhow!("NumberOfFrames {:?} is not an integer", e.to_str().unwrap_or_default()))?;
        ensure!(
            n == 1,
            "NumberOfFrames {n}: multi-frame (enhanced) CT objects are not read; export the series as one slice per file"
        );
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let pixel_data = obj.element_opt(tags::PIXEL_DATA).ok().flatten().context("no PixelData")?;
    if let dicom_core::value::Value::Primitive(p) = pixel_data.value() {
        let expected = rows * cols * (ba as usize / 8);
        let got = p.to_bytes().len();
        ensure!(
            got == expected || got == expected + 1,
            "PixelData holds {got} bytes, but Rows {rows} x Columns {cols} x BitsAllocated {ba} / 8 = {expected}: the pixel module does not describe the pixel data"
        );
    }
    if obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']) == RLE_LOSSLESS {
        let fragment =
            pixel_data.value().fragments().and_then(|f| f.first()).context("RLE pixel data without a fragment")?;
        check_rle(fragment, rows * cols, ba as usize / 8)?;
    }
    Ok(PixelModule { rows, cols, bits_allocated: ba as u16 })
}

/// The RLE Lossless transfer syntax.
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// An RLE Lossless frame (DICOM PS3.5 Annex G) that decodes to what the pixel module says:
/// a 64-byte header with one segment per byte of a sample (BitsAllocated / 8, one sample),
/// increasing offsets inside the fragment, and each segment's PackBits runs giving at least
/// Rows x Columns bytes. dicom-rs's decoder indexes past a short segment and panics, so a
/// damaged frame is refused here first.
fn check_rle(fragment: &[u8], pixels: usize, segments: usize) -> Result<()> {
    let word = |i: usize| -> Result<usize> {
        let b: [u8; 4] =
            fragment.get(4 * i..4 * i + 4).context("RLE frame shorter than its 64-byte header")?.try_into()?;
        Ok(u32::from_le_bytes(b) as usize)
    };
    let n = word(0)?;
    ensure!(n == segments, "RLE frame with {n} segments, BitsAllocated asks for {segments}");
    for s in 0..n {
        let start = word(1 + s)?;
        let end = if s + 1 < n { word(2 + s)? } else { fragment.len() };
        ensure!(
            64 <= start && start <= end && end <= fragment.len(),
            "RLE segment {s} at bytes {start}..{end} of a {}-byte frame",
            fragment.len()
        );
        let (mut at, mut out) = (start, 0usize);
        while out < pixels && at < end {
            let h = fragment[at] as i8;
            at += 1;
            match h {
                0..=127 => {
                    let k = h as usize + 1;
                    at += k;
                    out += k;
                }
                -127..=-1 => {
                    at += 1;
                    out += (1 - h as isize) as usize;
                }
                _ => {}
            }
        }
        ensure!(out >= pixels && at <= end, "RLE segment {s} decodes to {out} bytes of the {pixels} a frame needs");
    }
    Ok(())
}

/// Every element's declared length fits in what is left of the file. dicom-rs sizes a value's
/// buffer by its declared length before reading it, so a damaged length field of 3 GB in a
/// 5 KB slice would cost 3 GB of memory; this walk refuses such a file first. It follows the
/// file meta group (explicit VR little endian) and a data set in explicit or implicit VR
/// little endian or explicit big endian, descending into sequences, items and encapsulated
/// pixel data; a deflated data set is left to dicom-rs (its lengths are those of the inflated
/// stream). In implicit VR a sequence of defined length is stepped over, not entered.
fn check_lengths(bytes: &[u8]) -> Result<()> {
    ensure!(bytes.len() >= 132 && &bytes[128..132] == b"DICM", "no DICM magic at byte 128");
    // The VRs with a 2-byte length (PS3.5 7.1.2); every other VR, an unknown one included (which
    // dicom-rs reads as UN), has 2 reserved bytes and a 4-byte length.
    let short_vr = |vr: &[u8]| {
        matches!(
            vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        )
    };
    let (mut p, mut explicit, mut big) = (132usize, true, false);
    let mut in_meta = true;
    let mut fragments = false;
    let mut syntax = String::new();
    while p < bytes.len() {
        let u16_at = |q: usize, be: bool| -> Result<u16> {
            let b: [u8; 2] = bytes.get(q..q + 2).context("the file ends inside an element's header")?.try_into()?;
            Ok(if be { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
        };
        let u32_at = |q: usize, be: bool| -> Result<u32> {
            let b: [u8; 4] = bytes.get(q..q + 4).context("the file ends inside an element's header")?.try_into()?;
            Ok(if be { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
        };
        let group_le = u16_at(p, false)?;
        if in_meta && group_le != 0x0002 {
            // The data set begins: its encoding is the transfer syntax's.
            in_meta = false;
            match syntax.trim_end_matches(['\0', ' ']) {
                "1.2.840.10008.1.2" => explicit = false,
                "1.2.840.10008.1.2.2" => big = true,
                "1.2.840.10008.1.2.1.99" => return Ok(()),
                _ => {}
            }
        }
        let (group, elem) = (u16_at(p, big)?, u16_at(p + 2, big)?);
        let tag = format!("({group:04X},{elem:04X})");
        if group == 0xFFFE {
            // Item, item delimiter or sequence delimiter: a 4-byte length, no VR.
            let len = u32_at(p + 4, big)?;
            p += 8;
            if elem == 0xE0DD {
                fragments = false;
            } else if elem == 0xE000 && len != u32::MAX {
                ensure!(
                    len as usize <= bytes.len() - p,
                    "item {tag} at byte {} declares {len} bytes, the file has {} left",
                    p - 8,
                    bytes.len() - p
                );
                if fragments {
                    p += len as usize;
                }
            }
            continue;
        }
        // Inside encapsulated pixel data only items and the delimiter may stand: dicom-rs reads
        // whatever stands there as an item and sizes a fragment by its 4 bytes after the tag.
        ensure!(
            !fragments,
            "encapsulated pixel data: {tag} at byte {p}, where a fragment item (FFFE,E000) or the sequence delimiter (FFFE,E0DD) must be"
        );
        let (len, vr_sq, header) = if explicit {
            let vr = bytes.get(p + 4..p + 6).context("the file ends inside an element's header")?;
            let (len, sq, header) = if short_vr(vr) {
                (u16_at(p + 6, big)? as u32, false, 8)
            } else {
                (u32_at(p + 8, big)?, vr == b"SQ", 12)
            };
            // A binary VR's length must hold whole values: dicom-rs reads len / size values and
            // leaves the rest unread, so the next header would start inside this value.
            let size = match vr {
                b"SS" | b"US" | b"OW" => 2,
                b"AT" | b"FL" | b"SL" | b"UL" | b"OF" | b"OL" => 4,
                b"FD" | b"OD" | b"OV" | b"SV" | b"UV" => 8,
                _ => 1,
            };
            ensure!(
                len == u32::MAX || len.is_multiple_of(size),
                "element {tag} at byte {p} has VR {} and a length of {len} bytes, not a whole number of {size}-byte values",
                String::from_utf8_lossy(vr)
            );
            (len, sq, header)
        } else {
            (u32_at(p + 4, big)?, false, 8)
        };
        p += header;
        if len == u32::MAX {
            // Undefined length: a sequence, or encapsulated pixel data (fragments follow).
            fragments = (group, elem) == (0x7FE0, 0x0010);
            continue;
        }
        ensure!(
            len as usize <= bytes.len() - p,
            "element {tag} at byte {} declares {len} bytes, the file has {} left",
            p - header,
            bytes.len() - p
        );
        if in_meta && (group, elem) == (0x0002, 0x0010) {
            syntax = String::from_utf8_lossy(&bytes[p..p + len as usize]).into_owned();
        }
        if !vr_sq {
            p += len as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_lengths;

    #[test]
    fn the_test_series_pass_the_length_walk_and_a_damaged_length_is_refused() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom");
        let mut n = 0;
        for kind in ["series", "rle", "with_localizer", "mr"] {
            for f in std::fs::read_dir(root.join(kind)).unwrap() {
                let f = f.unwrap().path();
                let bytes = std::fs::read(&f).unwrap();
                check_lengths(&bytes).unwrap_or_else(|e| panic!("{}: {e:#}", f.display()));
                n += 1;
                // The pixel data's length (4 bytes before its value, in explicit VR LE) made
                // to claim 3 GB: refused, not allocated.
                let at = bytes.windows(4).rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00]).unwrap();
                let mut bad = bytes.clone();
                bad[at + 8..at + 12].copy_from_slice(&0xC000_0000u32.to_le_bytes());
                let e = format!("{:#}", check_lengths(&bad).unwrap_err());
                assert!(e.contains("(7FE0,0010)") && e.contains("3221225472"), "{}: {e}", f.display());
            }
        }
        assert!(n >= 20, "{n} files");
    }

    /// The dicom fuzz target's find: an element with an unknown VR ("@S" in RescaleSlope's
    /// place) is read by dicom-rs as UN, with a 4-byte length; the walk took its 2-byte one, so
    /// a length of 2 GB made of the next bytes went through to dicom-rs, which allocated it.
    #[test]
    fn an_unknown_vr_has_a_four_byte_length_and_is_refused_when_too_long() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom/series");
        let f = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(&f).unwrap();
        // (0028,1053) RescaleSlope, explicit VR LE: tag, "DS", a 2-byte length, the value.
        let at = bytes.windows(6).position(|w| w == [0x28, 0x00, 0x53, 0x10, b'D', b'S']).unwrap();
        let mut bad = bytes.clone();
        bad[at + 4..at + 6].copy_from_slice(b"@S");
        // As dicom-rs reads it: 2 reserved bytes (the old length), then 4 length bytes made of
        // the value and what follows; made to claim 2 GB here.
        bad[at + 8..at + 12].copy_from_slice(&0x7FE0_2031u32.to_le_bytes());
        let e = format!("{:#}", check_lengths(&bad).unwrap_err());
        assert!(e.contains("(0028,1053)") && e.contains("2145394737"), "{e}");
    }

    /// The dicom fuzz target's second find: RescaleSlope as an AT of 2 bytes. dicom-rs reads
    /// len / 4 tags and leaves 2 bytes unread, so the pixel data's header is read 2 bytes early
    /// as an unknown VR with a 4 GB length, which it allocated.
    #[test]
    fn a_binary_value_of_partial_length_is_refused() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom/series");
        let f = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(&f).unwrap();
        let at = bytes.windows(6).position(|w| w == [0x28, 0x00, 0x53, 0x10, b'D', b'S']).unwrap();
        let len = u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]);
        assert!(!len.is_multiple_of(4), "the test slice's RescaleSlope has {len} bytes");
        let mut bad = bytes.clone();
        bad[at + 4..at + 6].copy_from_slice(b"AT");
        let e = format!("{:#}", check_lengths(&bad).unwrap_err());
        assert!(e.contains("(0028,1053)") && e.contains("VR AT") && e.contains("4-byte values"), "{e}");
    }

    /// Inside encapsulated pixel data dicom-rs reads any header as an item and sizes a fragment
    /// by it: an element tag where an item must be is refused first.
    #[test]
    fn only_items_stand_inside_encapsulated_pixel_data() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom/rle");
        let f = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(&f).unwrap();
        check_lengths(&bytes).unwrap();
        // The first item after the pixel data's header (the offset table) and the one after it.
        let pd = bytes.windows(4).rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00]).unwrap();
        let first = pd + 12;
        assert_eq!(bytes[first..first + 4], [0xFE, 0xFF, 0x00, 0xE0]);
        let table = u32::from_le_bytes(bytes[first + 4..first + 8].try_into().unwrap()) as usize;
        let second = first + 8 + table;
        let mut bad = bytes.clone();
        bad[second..second + 4].copy_from_slice(&[0x00, 0x00, 0x00, 0x00]);
        let e = format!("{:#}", check_lengths(&bad).unwrap_err());
        assert!(e.contains("encapsulated pixel data: (0000,0000)"), "{e}");
    }

    /// The dicom fuzz target's find: an RLE segment that decodes to fewer bytes than a frame
    /// needs made dicom-rs panic (index out of bounds); it is refused with the reason.
    #[test]
    fn a_short_rle_segment_is_refused_not_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom/rle");
        let f = std::fs::read_dir(&root).unwrap().next().unwrap().unwrap().path();
        let obj = dicom_object::open_file(&f).unwrap();
        let pd = obj.element(dicom_dictionary_std::tags::PIXEL_DATA).unwrap();
        let frame = pd.value().fragments().unwrap()[0].clone();
        let (rows, cols) = (
            obj.element(dicom_dictionary_std::tags::ROWS).unwrap().to_int::<usize>().unwrap(),
            obj.element(dicom_dictionary_std::tags::COLUMNS).unwrap().to_int::<usize>().unwrap(),
        );
        super::check_rle(&frame, rows * cols, 2).unwrap();
        // The last segment cut short, and a header claiming one segment for 16-bit data.
        let short = &frame[..frame.len() - frame.len() / 8];
        let e = format!("{:#}", super::check_rle(short, rows * cols, 2).unwrap_err());
        assert!(e.contains("decodes to"), "{e}");
        let mut one = frame.clone();
        one[0..4].copy_from_slice(&1u32.to_le_bytes());
        assert!(format!("{:#}", super::check_rle(&one, rows * cols, 2).unwrap_err()).contains("1 segments"));
    }
}
