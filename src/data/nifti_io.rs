//! NIfTI-1 I/O (`.nii`, `.nii.gz`) through the nifti crate, with canonical orientation.
//!
//! Reading: int16, uint8, int8, uint16, int32, float32 and float64 data; scl_slope /
//! scl_inter applied (a slope of 0 or NaN means no scaling — we read the raw bytes ourselves
//! because the crate turns a NaN slope into all-NaN data). Affine from the sform
//! (sform_code > 0), else the qform (quaternion), else pixdim. 4-D files with a singleton
//! fourth axis are accepted; other 4-D data is an error.
//!
//! Canonical orientation: every array axis must run along one world axis (diagonal or
//! permuted-diagonal affine, within 1e-3 relative); axes are permuted so that array axis i is
//! world axis i and flipped so that indices run in world-increasing order (x, y, z of the
//! RAS+ world). Oblique affines are rejected with a clear error (no silent resampling).
//! The original header and axis mapping are kept (`Geometry`) to write results back onto the
//! original grid. Canonical arrays are row-major [X, Y, Z] (z fastest), like the network's.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use std::io::Read;

use flate2::read::MultiGzDecoder;
use nifti::{Endianness, NiftiHeader, NiftiType};

/// How the canonical array maps onto the file's array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orientation {
    /// Canonical axis i is file axis `perm[i]`.
    pub perm: [usize; 3],
    /// Canonical axis i runs against file axis `perm[i]`.
    pub flip: [bool; 3],
}

/// Everything needed to write a canonical array back onto the file's grid.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub header: NiftiHeader,
    /// The file's 4×4 voxel-to-world affine (rows), as read.
    pub affine: [[f64; 4]; 4],
    /// The file's array shape (first three axes).
    pub file_shape: [usize; 3],
    pub orientation: Orientation,
}

/// A volume in canonical orientation.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Row-major [X, Y, Z] values (HU for CT: scaling applied).
    pub data: Vec<f32>,
    pub shape: [usize; 3],
    /// Voxel size in mm along canonical x, y, z.
    pub spacing: [f64; 3],
    pub geometry: Geometry,
    /// How many NaN / infinite voxels were replaced by the image minimum
    /// (`NonFinitePolicy::ReplaceWithMinimum`; always 0 under `Error`).
    pub replaced_nonfinite: usize,
}

/// What to do with NaN or infinite voxels (after scl_slope / scl_inter). A setting of the
/// preprocessing (`--nonfinite`); part of the cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// Refuse the file, naming it and the count (the default: we never guess values).
    #[default]
    Error,
    /// Replace them by the minimum of the finite voxels (air, for a CT) and report the count.
    ReplaceWithMinimum,
}

impl std::str::FromStr for NonFinitePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(NonFinitePolicy::Error),
            "minimum" => Ok(NonFinitePolicy::ReplaceWithMinimum),
            other => Err(format!(
                "{other:?}: expected \"error\" (refuse such files) or \"minimum\" (replace non-finite voxels by the image minimum)"
            )),
        }
    }
}

impl Geometry {
    /// Canonical shape (the file shape permuted).
    pub fn canonical_shape(&self) -> [usize; 3] {
        let p = self.orientation.perm;
        [self.file_shape[p[0]], self.file_shape[p[1]], self.file_shape[p[2]]]
    }

    /// File linear index (Fortran order, x fastest) of canonical voxel c.
    #[allow(clippy::needless_range_loop)] // i indexes perm, flip and c alike
    fn file_index(&self, c: [usize; 3]) -> usize {
        let mut o = [0usize; 3];
        for i in 0..3 {
            let a = self.orientation.perm[i];
            o[a] = if self.orientation.flip[i] { self.file_shape[a] - 1 - c[i] } else { c[i] };
        }
        o[0] + self.file_shape[0] * (o[1] + self.file_shape[1] * o[2])
    }

    /// The affine of the canonical array: world = A_c · (i, j, k, 1).
    pub fn canonical_affine(&self) -> [[f64; 4]; 4] {
        canonical_affine_of(&self.affine, self.orientation, self.canonical_shape())
    }
}

/// The affine of a canonical array of shape `canonical_shape`, from its file's affine and
/// orientation: world = A_c · (i, j, k, 1).
pub fn canonical_affine_of(
    file_affine: &[[f64; 4]; 4],
    orientation: Orientation,
    canonical_shape: [usize; 3],
) -> [[f64; 4]; 4] {
    // file index o = T · c: o[perm[i]] = flip ? n-1-c_i : c_i.
    let mut t = [[0.0f64; 4]; 4];
    t[3][3] = 1.0;
    for i in 0..3 {
        let a = orientation.perm[i];
        if orientation.flip[i] {
            t[a][i] = -1.0;
            t[a][3] = (canonical_shape[i] - 1) as f64;
        } else {
            t[a][i] = 1.0;
        }
    }
    matmul4(file_affine, &t)
}

/// The affine of a regular grid laid over an array whose affine is `base`: grid voxel i sits
/// at array coordinate origin + i · step (per axis).
pub fn grid_affine(base: &[[f64; 4]; 4], origin: [f64; 3], step: [f64; 3]) -> [[f64; 4]; 4] {
    let mut t = [[0.0f64; 4]; 4];
    for a in 0..3 {
        t[a][a] = step[a];
        t[a][3] = origin[a];
    }
    t[3][3] = 1.0;
    matmul4(base, &t)
}

/// Write a multi-channel map as a 4-D float32 NIfTI (channels on the 4th axis), atomically.
/// `values` is [X, Y, Z, C] (channels last, C order) on a grid whose voxel-to-world affine is
/// `affine`; it goes into both sform and qform (scanner coordinates, mm), so that 3D Slicer,
/// ITK-SNAP and nibabel place it in the same world as the CT.
pub fn write_features(
    path: &Path,
    values: &[f32],
    shape: [usize; 3],
    channels: usize,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    let n: usize = shape.iter().product();
    ensure!(
        values.len() == n * channels,
        "{}: {} values for {shape:?} x {channels} channels",
        path.display(),
        values.len()
    );
    let array = ndarray::ArrayView4::from_shape((shape[0], shape[1], shape[2], channels), values)
        .context("feature map shape")?;
    write_features_view(path, array, affine)
}

/// `write_features` for a [c, X, Y, Z] (channels first, C order) array, as `to_file_order` returns.
pub fn write_features_channels_first(
    path: &Path,
    values: &[f32],
    shape: [usize; 3],
    channels: usize,
    affine: &[[f64; 4]; 4],
) -> Result<()> {
    let array = ndarray::ArrayView4::from_shape((channels, shape[0], shape[1], shape[2]), values)
        .context("feature map shape")?;
    // The writer needs standard (C-order) slices: materialise the permuted view.
    let standard = array.permuted_axes([1, 2, 3, 0]).as_standard_layout().into_owned();
    write_features_view(path, standard.view(), affine)
}

/// Write an RGB map ([X, Y, Z] colours, C order) as an RGB24 NIfTI with `affine`, atomically.
pub fn write_rgb(path: &Path, rgb: &[[u8; 3]], shape: [usize; 3], affine: &[[f64; 4]; 4]) -> Result<()> {
    ensure!(rgb.len() == shape.iter().product::<usize>(), "{}: {} colours for {shape:?}", path.display(), rgb.len());
    let array = ndarray::ArrayView3::from_shape((shape[0], shape[1], shape[2]), rgb).context("RGB map shape")?;
    let header = header_for(affine, 0);
    crate::checkpoint::write_atomic_with(path, |tmp| {
        nifti::writer::WriterOptions::new(tmp)
            .reference_header(&header)
            .write_rgb_nifti(&array)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    })
}

/// A header whose sform and qform are `affine` (scanner coordinates, mm).
fn header_for(affine: &[[f64; 4]; 4], intent_code: i16) -> NiftiHeader {
    let m = nalgebra::Matrix4::from_fn(|r, c| affine[r][c]);
    let mut header = NiftiHeader::default();
    header.set_sform(&m, nifti::XForm::ScannerAnat);
    header.set_qform(&m, nifti::XForm::ScannerAnat);
    header.xyzt_units = 2; // mm
    header.intent_code = intent_code;
    header
}

fn write_features_view(path: &Path, array: ndarray::ArrayView4<f32>, affine: &[[f64; 4]; 4]) -> Result<()> {
    let name = path.file_name().context("output path has no file name")?.to_string_lossy().into_owned();
    ensure!(
        name.ends_with(".nii") || name.ends_with(".nii.gz"),
        "{}: output must end in .nii or .nii.gz",
        path.display()
    );
    // No intent code: NIFTI_INTENT_VECTOR would put the channels on the 5th axis, and viewers
    // show a 4th axis as frames, one channel at a time.
    let header = header_for(affine, 0);
    crate::checkpoint::write_atomic_with(path, |tmp| {
        nifti::writer::WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti(&array)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    })
}

fn matmul4(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> [[f64; 4]; 4] {
    let mut c = [[0.0; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            c[i][j] = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

/// The voxel-to-world affine of a header: sform, else qform, else pixdim (NIfTI methods 3, 2, 1).
pub fn header_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let mut a = [[0.0f64; 4]; 4];
    a[3][3] = 1.0;
    if h.sform_code > 0 {
        for (row, src) in a.iter_mut().zip([h.srow_x, h.srow_y, h.srow_z]) {
            for j in 0..4 {
                row[j] = src[j] as f64;
            }
        }
    } else if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a0 = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [a0 * a0 + b * b - c * c - d * d, 2.0 * (b * c - a0 * d), 2.0 * (b * d + a0 * c)],
            [2.0 * (b * c + a0 * d), a0 * a0 + c * c - b * b - d * d, 2.0 * (c * d - a0 * b)],
            [2.0 * (b * d - a0 * c), 2.0 * (c * d + a0 * b), a0 * a0 + d * d - c * c - b * b],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64 * qfac];
        for i in 0..3 {
            for j in 0..3 {
                a[i][j] = r[i][j] * s[j];
            }
        }
        a[0][3] = h.quatern_x as f64;
        a[1][3] = h.quatern_y as f64;
        a[2][3] = h.quatern_z as f64;
    } else {
        for (i, row) in a.iter_mut().take(3).enumerate() {
            row[i] = h.pixdim[i + 1] as f64;
        }
    }
    a
}

/// Axis permutation and flips that make an affine's array axes world-aligned and increasing.
#[allow(clippy::needless_range_loop)] // j is the affine's column, indexing several arrays
pub fn orientation_of(affine: &[[f64; 4]; 4]) -> Result<(Orientation, [f64; 3])> {
    let mut perm = [usize::MAX; 3];
    let mut flip = [false; 3];
    let mut spacing = [0.0; 3];
    for j in 0..3 {
        let col = [affine[0][j], affine[1][j], affine[2][j]];
        let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt();
        ensure!(norm > 0.0 && norm.is_finite(), "array axis {j} has a zero or non-finite voxel size in the affine");
        let (w, main) =
            col.iter().enumerate().map(|(i, v)| (i, v.abs())).fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        let off = col.iter().enumerate().filter(|(i, _)| *i != w).map(|(_, v)| v.abs()).fold(0.0, f64::max);
        if off > 1e-3 * main {
            let deg = (off / main).atan().to_degrees();
            bail!(
                "oblique affine (array axis {j} is rotated by about {deg:.2}° from the world axes); only axis-aligned grids are supported — resample the image to an axis-aligned grid first"
            );
        }
        ensure!(
            perm[w] == usize::MAX,
            "array axes {} and {j} both run along world axis {w}: degenerate affine",
            perm[w]
        );
        perm[w] = j;
        flip[w] = col[w] < 0.0;
        spacing[w] = norm;
    }
    Ok((Orientation { perm, flip }, spacing))
}

/// The largest file we read, decompressed (bytes): far above any CT, below what a damaged
/// gzip stream could make us allocate.
pub const MAX_FILE_BYTES: u64 = 16 << 30;
/// The largest volume we read, in voxels (a 2048 × 2048 × 1024 micro-CT).
pub const MAX_VOXELS: usize = 1 << 32;

/// The whole file, decompressed when it is gzip (by its magic bytes, whatever its name).
/// Every gzip member is read to its end, so its CRC-32 and length (ISIZE) are checked, and
/// bytes after the last member that are not another member are an error: a damaged stream
/// is refused instead of decoding to wrong voxels.
fn read_file_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    gunzip_if_gzip(path, raw)
}

/// `raw` itself, or its gzip decompression (every member to its end: CRC-32 and ISIZE checked).
fn gunzip_if_gzip(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(raw.as_slice()).take(MAX_FILE_BYTES + 1).read_to_end(&mut out).map_err(|e| {
        anyhow::anyhow!("{}: damaged gzip stream ({e}); the file is refused rather than read wrong", path.display())
    })?;
    ensure!(out.len() as u64 <= MAX_FILE_BYTES, "{}: decompresses to more than {MAX_FILE_BYTES} bytes", path.display());
    Ok(out)
}

/// Header, file bytes, and where in them the voxels start (`vox_offset`, checked) of a
/// single-file NIfTI-1 image.
fn read_header_and_data(path: &Path) -> Result<(NiftiHeader, Vec<u8>, usize)> {
    header_and_data(path, read_file_bytes(path)?)
}

/// `read_header_and_data` on a file's bytes, decompressed (`path` only names it in errors).
fn header_and_data(path: &Path, bytes: Vec<u8>) -> Result<(NiftiHeader, Vec<u8>, usize)> {
    let ctx = || path.display().to_string();
    ensure!(
        bytes.len() >= 348,
        "{}: not a NIfTI-1 file: {} bytes, shorter than the 348-byte header",
        ctx(),
        bytes.len()
    );
    let h = NiftiHeader::from_reader(std::io::Cursor::new(&bytes)).map_err(|e| {
        // The crate's I/O variant prints as a Debug structure: say it as a sentence.
        let why = match e {
            nifti::NiftiError::Io(io) => io.to_string(),
            other => other.to_string(),
        };
        anyhow::anyhow!("{}: cannot read as NIfTI: {why}", ctx())
    })?;
    ensure!(
        &h.magic == nifti::header::MAGIC_CODE_NIP1,
        "{}: the header says its voxels are in a separate .img file (magic \"ni1\"); only single-file .nii / .nii.gz is supported",
        ctx()
    );
    let off = h.vox_offset;
    ensure!(
        off.is_finite() && off >= 352.0 && off.fract() == 0.0,
        "{}: vox_offset {off} is invalid (a single-file NIfTI-1 has its voxels at byte 352 or later)",
        ctx()
    );
    let off = off as usize;
    ensure!(off <= bytes.len(), "{}: vox_offset {off} is past the end of the file ({} bytes)", ctx(), bytes.len());
    Ok((h, bytes, off))
}

/// Read a volume into canonical orientation, with scaling applied (values as f32). Refused,
/// with the file named: damaged gzip, a bad vox_offset, too few voxel bytes, non-finite
/// voxels (after scaling) or a non-finite affine.
pub fn read_volume(path: &Path) -> Result<Volume> {
    read_volume_with(path, NonFinitePolicy::Error)
}

/// `read_volume`, with non-finite voxels handled by `policy`. A folder of DICOM files (or a
/// DICOMDIR) is read as its CT series (`data::dicom`).
pub fn read_volume_with(path: &Path, policy: NonFinitePolicy) -> Result<Volume> {
    if super::dicom::is_dicom_input(path) {
        return super::dicom::read_series(path, policy);
    }
    volume_from_header_and_data(path, read_header_and_data(path)?, policy)
}

/// `read_volume_with` on a file's bytes as stored (gzip or not); `name` only names it in
/// errors. The fuzz target's entry point (fuzz/fuzz_targets/nifti.rs).
pub fn read_volume_bytes(name: &Path, file: Vec<u8>, policy: NonFinitePolicy) -> Result<Volume> {
    volume_from_header_and_data(name, header_and_data(name, gunzip_if_gzip(name, file)?)?, policy)
}

fn volume_from_header_and_data(
    path: &Path,
    (h, bytes, data_start): (NiftiHeader, Vec<u8>, usize),
    policy: NonFinitePolicy,
) -> Result<Volume> {
    let raw = &bytes[data_start..];
    let ctx = || path.display().to_string();
    // dim is int16 on disk; the nifti crate reads it as u16, so a negative size would read
    // as a size near 65536.
    let ndim = (h.dim[0] as usize).min(7);
    if let Some(&d) = h.dim[1..=ndim].iter().find(|&&d| d > i16::MAX as u16) {
        bail!("{}: invalid dimensions: negative size {} in dim {:?}", ctx(), d as i16, h.dim.map(|d| d as i16));
    }
    let dim = h.dim().map_err(|e| anyhow::anyhow!("{}: invalid dimensions: {e}", ctx()))?.to_vec();
    ensure!(dim.len() >= 3, "{}: {}-D image; a 3-D volume is needed", ctx(), dim.len());
    if dim.len() > 3 {
        let extra: usize = dim[3..].iter().map(|&d| d as usize).product();
        ensure!(
            extra == 1,
            "{}: {}-D image with {extra} volumes along the extra axes; only 3-D (or 4-D with one volume) is supported",
            ctx(),
            dim.len()
        );
    }
    let file_shape = [dim[0] as usize, dim[1] as usize, dim[2] as usize];
    ensure!(file_shape.iter().all(|&n| n > 0), "{}: empty axis in shape {file_shape:?}", ctx());
    let n: usize = file_shape.iter().product();
    ensure!(n <= MAX_VOXELS, "{}: shape {file_shape:?} has {n} voxels, more than the limit of {MAX_VOXELS}", ctx());
    let affine = header_affine(&h);
    ensure!(
        affine.iter().flatten().all(|v| v.is_finite()),
        "{}: the voxel-to-world affine (from the {}) has non-finite entries: {affine:?}",
        ctx(),
        if h.sform_code > 0 {
            "sform"
        } else if h.qform_code > 0 {
            "qform"
        } else {
            "pixdim"
        }
    );
    let dtype = h.data_type().map_err(|e| anyhow::anyhow!("{}: unknown data type {}: {e}", ctx(), h.datatype))?;
    let mut values = decode(raw, dtype, h.endianness, n).with_context(ctx)?;
    let (slope, inter) = (h.scl_slope as f64, h.scl_inter as f64);
    // nibabel's rules: a slope of 0, NaN or ±inf means no scaling; with a valid slope a NaN
    // intercept is 0 and an infinite one is an error (every voxel would be infinite).
    let scale = slope != 0.0 && slope.is_finite();
    ensure!(
        !(scale && inter.is_infinite()),
        "{}: scl_inter is {inter} with scl_slope {slope}: every voxel would be infinite",
        ctx()
    );
    let inter = if inter.is_finite() { inter } else { 0.0 };
    if scale {
        values.iter_mut().for_each(|v| *v = *v * slope + inter);
    }
    volume_from_values(path, h, values, file_shape, affine, policy)
}

/// A volume from voxel values in file order (Fortran: axis 0 fastest) on a grid of
/// `file_shape` with the voxel-to-world `affine` (NIfTI's RAS): the DICOM reader's way in.
/// Outputs on this grid are written as NIfTI with that affine.
pub fn volume_from_file_values(
    path: &Path,
    values: Vec<f64>,
    file_shape: [usize; 3],
    affine: [[f64; 4]; 4],
    policy: NonFinitePolicy,
) -> Result<Volume> {
    ensure!(
        values.len() == file_shape.iter().product::<usize>(),
        "{}: {} values for {file_shape:?}",
        path.display(),
        values.len()
    );
    ensure!(
        affine.iter().flatten().all(|v| v.is_finite()),
        "{}: the voxel-to-world affine has non-finite entries: {affine:?}",
        path.display()
    );
    let mut header = header_for(&affine, 0);
    header.dim = [3, file_shape[0] as u16, file_shape[1] as u16, file_shape[2] as u16, 1, 1, 1, 1];
    volume_from_values(path, header, values, file_shape, affine, policy)
}

fn volume_from_values(
    path: &Path,
    h: NiftiHeader,
    values: Vec<f64>,
    file_shape: [usize; 3],
    affine: [[f64; 4]; 4],
    policy: NonFinitePolicy,
) -> Result<Volume> {
    let ctx = || path.display().to_string();
    let n = values.len();
    let (orientation, spacing) = orientation_of(&affine).with_context(ctx)?;
    let geometry = Geometry { header: h, affine, file_shape, orientation };
    let shape = geometry.canonical_shape();
    let mut data = vec![0.0f32; n];
    let mut idx = 0;
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                data[idx] = values[geometry.file_index([x, y, z])] as f32;
                idx += 1;
            }
        }
    }
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        ensure!(
            policy == NonFinitePolicy::ReplaceWithMinimum,
            "{}: {bad} of {n} voxels are NaN or infinite (after scl_slope / scl_inter); refusing to guess their values (--nonfinite minimum replaces them by the image minimum)",
            ctx()
        );
        let min = data.iter().copied().filter(|v| v.is_finite()).fold(f32::INFINITY, f32::min);
        ensure!(min.is_finite(), "{}: all {n} voxels are NaN or infinite (after scl_slope / scl_inter)", ctx());
        for v in data.iter_mut().filter(|v| !v.is_finite()) {
            *v = min;
        }
    }
    Ok(Volume { data, shape, spacing, geometry, replaced_nonfinite: bad })
}

/// Raw voxel values as f64 (exact for every supported type but large int64 values).
fn decode(raw: &[u8], dtype: NiftiType, endian: Endianness, n: usize) -> Result<Vec<f64>> {
    let size = match dtype {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Float32 => 4,
        NiftiType::Float64 => 8,
        other => bail!(
            "unsupported data type {other:?} (supported: uint8, int8, int16, uint16, int32, uint32, float32, float64)"
        ),
    };
    ensure!(raw.len() >= n * size, "truncated data: {} bytes for {n} voxels of {size} bytes", raw.len());
    let little = matches!(endian, Endianness::Little);
    let get = |i: usize| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(&raw[i * size..(i + 1) * size]);
        if !little {
            b[..size].reverse();
        }
        b
    };
    Ok((0..n)
        .map(|i| {
            let b = get(i);
            match dtype {
                NiftiType::Uint8 => b[0] as f64,
                NiftiType::Int8 => b[0] as i8 as f64,
                NiftiType::Int16 => i16::from_le_bytes([b[0], b[1]]) as f64,
                NiftiType::Uint16 => u16::from_le_bytes([b[0], b[1]]) as f64,
                NiftiType::Int32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                NiftiType::Uint32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                NiftiType::Float32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                _ => f64::from_le_bytes(b),
            }
        })
        .collect())
}

/// A canonical [X, Y, Z, c] array (channels last) rearranged into the file's own axis order,
/// returned as C-order [c, file X, file Y, file Z] (for .npy files that overlay the input).
pub fn to_file_order<T: Copy + Default>(canonical: &[T], geometry: &Geometry, c: usize) -> Vec<T> {
    let shape = geometry.canonical_shape();
    let fs = geometry.file_shape;
    let n: usize = fs.iter().product();
    let mut out = vec![T::default(); n * c];
    let mut idx = 0;
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let f = geometry.file_index([x, y, z]); // Fortran: o0 + n0·(o1 + n1·o2)
                let (o0, r) = (f % fs[0], f / fs[0]);
                let (o1, o2) = (r % fs[1], r / fs[1]);
                let cidx = (o0 * fs[1] + o1) * fs[2] + o2;
                for ch in 0..c {
                    out[ch * n + cidx] = canonical[idx * c + ch];
                }
                idx += 1;
            }
        }
    }
    out
}

/// Element types that can be written.
pub trait WriteElement: nifti::DataElement + bytemuck::Pod + Copy + Default {
    const TYPE: NiftiType;
}
impl WriteElement for u8 {
    const TYPE: NiftiType = NiftiType::Uint8;
}
impl WriteElement for i16 {
    const TYPE: NiftiType = NiftiType::Int16;
}
impl WriteElement for f32 {
    const TYPE: NiftiType = NiftiType::Float32;
}

/// Write a canonical array back onto the file grid of `geometry` (same shape, same affine,
/// sform and qform), atomically (temporary file, then rename).
pub fn write_volume<T: WriteElement>(path: &Path, data: &[T], geometry: &Geometry) -> Result<()> {
    let shape = geometry.canonical_shape();
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "{}: {} values for shape {shape:?}",
        path.display(),
        data.len()
    );
    let fs = geometry.file_shape;
    let mut file = ndarray::Array3::<T>::default((fs[0], fs[1], fs[2]));
    let mut idx = 0;
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                let f = geometry.file_index([x, y, z]);
                let (o0, rest) = (f % fs[0], f / fs[0]);
                file[[o0, rest % fs[1], rest / fs[1]]] = data[idx];
                idx += 1;
            }
        }
    }
    let mut header = geometry.header.clone();
    header.dim = [3, fs[0] as u16, fs[1] as u16, fs[2] as u16, 1, 1, 1, 1];
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    let name = path.file_name().context("output path has no file name")?.to_string_lossy().into_owned();
    ensure!(
        name.ends_with(".nii") || name.ends_with(".nii.gz"),
        "{}: output must end in .nii or .nii.gz",
        path.display()
    );
    crate::checkpoint::write_atomic_with(path, |tmp| {
        nifti::writer::WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti_with_type(&file, T::TYPE)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    })
}
