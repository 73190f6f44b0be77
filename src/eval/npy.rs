//! Minimal NumPy `.npy` (format 1.0/2.0) reading of little-endian float32 C-order arrays and
//! writing of float32 / float16 arrays — enough to exchange patches and feature maps with
//! Python. Writes are atomic.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// (shape, values) of a `<f4` C-order array.
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_f32(path, &b)
}

/// `read_f32` on a file's bytes (`path` only names it in errors; the fuzz target's entry point).
pub fn parse_f32(path: &Path, b: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    ensure!(b.len() >= 10 && &b[..6] == b"\x93NUMPY", "{}: not a .npy file", path.display());
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            ensure!(b.len() >= 12, "{}: truncated header", path.display());
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => bail!("{}: unsupported .npy version {v}", path.display()),
    };
    ensure!(b.len() >= start + hlen, "{}: truncated header", path.display());
    let header = std::str::from_utf8(&b[start..start + hlen])
        .with_context(|| format!("{}: header is not text", path.display()))?;
    let field = |k: &str| -> Option<&str> { header.split(&format!("'{k}':")).nth(1).map(str::trim) };
    let descr = field("descr").unwrap_or("");
    ensure!(
        descr.starts_with("'<f4'") || descr.starts_with("'float32'"),
        "{}: dtype {descr:?}; expected little-endian float32 ('<f4')",
        path.display()
    );
    ensure!(
        field("fortran_order").is_some_and(|f| f.starts_with("False")),
        "{}: Fortran-ordered arrays are not supported",
        path.display()
    );
    let shape_txt = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("{}: no shape in header", path.display()))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: bad shape {shape_txt:?}", path.display()))?;
    // Checked: a wrapped product could match a short file and be read as a huge array.
    let n = shape
        .iter()
        .try_fold(4usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("{}: shape {shape:?} is too large", path.display()))?
        / 4;
    let data = &b[start + hlen..];
    ensure!(data.len() == 4 * n, "{}: {} data bytes for shape {shape:?}", path.display(), data.len());
    Ok((shape, bytemuck::pod_collect_to_vec(data)))
}

fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out
}

/// Write a float32 array.
pub fn write_f32(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    ensure!(
        shape.iter().product::<usize>() == values.len(),
        "{}: {} values for shape {shape:?}",
        path.display(),
        values.len()
    );
    let mut out = header("<f4", shape);
    out.extend_from_slice(bytemuck::cast_slice(values));
    crate::checkpoint::write_atomic(path, &out)
}

/// Write a float16 array (values rounded to nearest).
pub fn write_f16(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    ensure!(
        shape.iter().product::<usize>() == values.len(),
        "{}: {} values for shape {shape:?}",
        path.display(),
        values.len()
    );
    let mut out = header("<f2", shape);
    for &v in values {
        out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    crate::checkpoint::write_atomic(path, &out)
}

/// Write an int64 array (index tables for PyTorch: `dev/trajectory.py` reads the pairs).
pub fn write_i64(path: &Path, shape: &[usize], values: &[i64]) -> Result<()> {
    ensure!(
        shape.iter().product::<usize>() == values.len(),
        "{}: {} values for shape {shape:?}",
        path.display(),
        values.len()
    );
    let mut out = header("<i8", shape);
    out.extend_from_slice(bytemuck::cast_slice(values));
    crate::checkpoint::write_atomic(path, &out)
}
