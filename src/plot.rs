//! Loss-curve pictures: draws one or more (x, y) series as coloured polylines on a white
//! 800x500 PNG with axes, ticks, numeric tick labels, a title and a legend.
//!
//! Drawn by hand on an RGB buffer and encoded with the `png` crate, so that a training run can
//! leave a picture of its loss behind without a plotting library (and without fonts on the
//! machine: text uses a tiny embedded 5x7 bitmap font, upper case only, drawn at 2x).
//! Bad data never makes it fail: non-finite (and absurdly large) values are skipped and break the
//! line, empty input gives empty axes, a single point is drawn as a dot, constant data gets a
//! range around it. The file is written to a temporary name in the same folder and renamed, so a
//! reader (or a crash mid-write) never sees a half-written picture.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

const WIDTH: usize = 800;
const HEIGHT: usize = 500;
/// Plot area, in pixels: room on the left for y labels, below for x labels, above for the title.
const LEFT: i64 = 100;
const RIGHT: i64 = 780;
const TOP: i64 = 40;
const BOTTOM: i64 = 450;
/// Text scale: 5x7 glyphs drawn as 10x14 with a 12-pixel advance.
const SCALE: i64 = 2;
const ADVANCE: i64 = 6 * SCALE;
/// Values beyond this are treated like infinities: they would overflow the range arithmetic.
const MAX_ABS: f64 = 1e100;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [225, 225, 225];
/// Series colours (the matplotlib "tab10" cycle): distinct on white and from each other.
pub const PALETTE: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Writes `series` (name, points) as a line plot to `path` (PNG, 800x500), atomically.
///
/// Points need not be sorted; they are joined in the given order. Non-finite values are skipped
/// and break the line. Errors only come from the file system or the encoder.
pub fn write_curve_png(path: &Path, title: &str, series: &[(&str, &[(f64, f64)])]) -> Result<()> {
    let img = render(title, series);
    write_png_atomic(path, HEIGHT, &img.px)
}

/// One panel of `write_panels_png`: a title and its series.
pub type Panel<'a> = (&'a str, &'a [(&'a str, &'a [(f64, f64)])]);

/// Several line plots stacked top to bottom in one PNG (800 wide, 500 per panel), each drawn
/// as `write_curve_png` draws one, written atomically.
pub fn write_panels_png(path: &Path, panels: &[Panel]) -> Result<()> {
    let mut px = Vec::with_capacity(panels.len() * WIDTH * HEIGHT * 3);
    for (title, series) in panels {
        px.extend_from_slice(&render(title, series).px);
    }
    write_png_atomic(path, HEIGHT * panels.len().max(1), &px)
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { px: vec![255; WIDTH * HEIGHT * 3] }
    }

    #[inline]
    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < HEIGHT {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.max(0)..=y1.min(HEIGHT as i64 - 1) {
            for x in x0.max(0)..=x1.min(WIDTH as i64 - 1) {
                self.set(x, y, c);
            }
        }
    }

    /// A 2-pixel-thick line (Bresenham, each step stamps a 2x2 square), clipped to the plot
    /// area so that nothing a series does can draw over the labels.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (qx, qy) = (x + ox, y + oy);
                if (LEFT..=RIGHT).contains(&qx) && (TOP..=BOTTOM).contains(&qy) {
                    self.set(qx, qy, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y); characters outside the image are clipped.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let ox = x + k as i64 * ADVANCE;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (gx, gy) = (ox + col * SCALE, y + row as i64 * SCALE);
                        self.rect(gx, gy, gx + SCALE - 1, gy + SCALE - 1, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 { 0 } else { n * ADVANCE - SCALE }
}

/// A linear axis: data range [lo, hi] onto pixels [p0, p1].
struct Axis {
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Axis {
    fn map(&self, v: f64) -> i64 {
        let p = self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0);
        // Clamp before the cast: the mapping is inside the plot for data in range, and this keeps
        // Bresenham's loop short even if it is not.
        p.round().clamp(-10_000.0, 10_000.0) as i64
    }

    /// Tick values: multiples of a "nice" step (1, 2 or 5 times a power of ten), about 5 of them.
    fn ticks(&self) -> (Vec<f64>, f64) {
        let step = nice_step((self.hi - self.lo) / 5.0);
        let first = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        for i in 0..25 {
            let v = first + i as f64 * step;
            if v > self.hi + step * 1e-9 {
                break;
            }
            // Snap values like 1e-17 to an exact zero so the label reads "0".
            out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        }
        (out, step)
    }
}

fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// A non-degenerate range around the data: constant data gets +-10 % (at least +-1).
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo > hi.abs().max(lo.abs()) * 1e-9 {
        return (lo, hi);
    }
    let mid = 0.5 * (lo + hi);
    let half = (mid.abs() * 0.1).max(1.0);
    (mid - half, mid + half)
}

fn tick_label(v: f64, step: f64, mag: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&mag) {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

fn usable(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_ABS
}

fn render(title: &str, series: &[(&str, &[(f64, f64)])]) -> Canvas {
    let mut cv = Canvas::new();

    // Data range over all usable points.
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (_, pts) in series {
        for &(x, y) in pts.iter() {
            if usable(x) && usable(y) {
                xlo = xlo.min(x);
                xhi = xhi.max(x);
                ylo = ylo.min(y);
                yhi = yhi.max(y);
            }
        }
    }
    if xlo > xhi {
        (xlo, xhi, ylo, yhi) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xlo, xhi) = widen(xlo, xhi);
    let (ylo, yhi) = widen(ylo, yhi);
    // A little headroom in y so the curve does not run along the frame.
    let pad = 0.05 * (yhi - ylo);
    let xa = Axis { lo: xlo, hi: xhi, p0: LEFT as f64, p1: RIGHT as f64 };
    let ya = Axis { lo: ylo - pad, hi: yhi + pad, p0: BOTTOM as f64, p1: TOP as f64 };

    // Grid, ticks and labels.
    let (xt, xstep) = xa.ticks();
    let xmag = xa.lo.abs().max(xa.hi.abs());
    for &v in &xt {
        let p = xa.map(v);
        cv.rect(p, TOP, p, BOTTOM - 1, GRID);
        cv.rect(p, BOTTOM, p, BOTTOM + 5, BLACK);
        let s = tick_label(v, xstep, xmag);
        let w = text_width(&s);
        cv.text((p - w / 2).clamp(0, WIDTH as i64 - w), BOTTOM + 10, &s, BLACK);
    }
    let (yt, ystep) = ya.ticks();
    let ymag = ya.lo.abs().max(ya.hi.abs());
    for &v in &yt {
        let p = ya.map(v);
        cv.rect(LEFT + 1, p, RIGHT, p, GRID);
        cv.rect(LEFT - 5, p, LEFT, p, BLACK);
        let s = tick_label(v, ystep, ymag);
        let w = text_width(&s);
        cv.text((LEFT - 9 - w).max(0), p - 7, &s, BLACK);
    }
    // Axes on top of the grid.
    cv.rect(LEFT, TOP, LEFT, BOTTOM, BLACK);
    cv.rect(LEFT, BOTTOM, RIGHT, BOTTOM, BLACK);

    // Series: polylines broken at unusable points; isolated points become dots.
    for (k, (_, pts)) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let mut prev: Option<(i64, i64)> = None;
        let mut run = 0usize;
        for i in 0..=pts.len() {
            let cur = pts.get(i).filter(|(x, y)| usable(*x) && usable(*y)).map(|&(x, y)| (xa.map(x), ya.map(y)));
            match (prev, cur) {
                (Some(a), Some(b)) => {
                    cv.line(a, b, c);
                    run += 1;
                }
                (Some(a), None) => {
                    if run == 0 {
                        // A lone point: a 5x5 dot so it is visible.
                        for oy in -2..=2 {
                            cv.line((a.0 - 2, a.1 + oy), (a.0 + 2, a.1 + oy), c);
                        }
                    }
                    run = 0;
                }
                _ => run = 0,
            }
            prev = cur;
        }
    }

    // Title, centred above the plot.
    let tw = text_width(title);
    cv.text(((WIDTH as i64 - tw) / 2).max(0), 12, title, BLACK);

    // Legend, top right inside the plot: as many entries as fit, names cut to 28 characters.
    let names: Vec<String> = series.iter().map(|(n, _)| n.chars().take(28).collect()).collect();
    if !names.is_empty() {
        let row_h = 20;
        let max_rows = ((BOTTOM - TOP - 20) / row_h).max(1) as usize;
        let rows = names.len().min(max_rows);
        let lw = names.iter().map(|n| text_width(n)).max().unwrap_or(0) + 44;
        let (x0, y0) = (RIGHT - lw - 10, TOP + 10);
        let (x1, y1) = (RIGHT - 10, y0 + rows as i64 * row_h + 8);
        cv.rect(x0, y0, x1, y1, WHITE);
        cv.rect(x0, y0, x1, y0, BLACK);
        cv.rect(x0, y1, x1, y1, BLACK);
        cv.rect(x0, y0, x0, y1, BLACK);
        cv.rect(x1, y0, x1, y1, BLACK);
        for (k, name) in names.iter().take(rows).enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let ry = y0 + 6 + k as i64 * row_h;
            cv.rect(x0 + 8, ry + 6, x0 + 32, ry + 8, c);
            cv.text(x0 + 38, ry, name, BLACK);
        }
    }
    cv
}

/// The PNG written through `checkpoint::write_atomic_with`: a temporary in a recognisable
/// folder beside `path` (removed on error, and by `remove_stale_temp_files` after a kill),
/// synced and renamed over `path`.
fn write_png_atomic(path: &Path, height: usize, px: &[u8]) -> Result<()> {
    // No panel: one blank picture rather than an empty one.
    let blank;
    let px = if px.is_empty() {
        blank = vec![255u8; WIDTH * HEIGHT * 3];
        &blank[..]
    } else {
        px
    };
    // A plot goes into an existing folder (a run's): a missing one is an error, not created.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    anyhow::ensure!(dir.is_dir(), "cannot write {}: the folder {} does not exist", path.display(), dir.display());
    crate::checkpoint::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        {
            let mut enc = png::Encoder::new(&mut w, WIDTH as u32, height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().with_context(|| format!("writing the PNG header of {}", path.display()))?;
            writer.write_image_data(px).with_context(|| format!("writing {}", path.display()))?;
            writer.finish().with_context(|| format!("writing {}", path.display()))?;
        }
        w.flush().with_context(|| format!("writing {}", path.display()))
    })
}

/// 5x7 glyphs, one byte per row, bit 4 = leftmost column. Lower case maps to upper case;
/// anything else unknown is drawn as '?'.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        ' ' => [0x00; 7],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vox2vec-plot-{}-{}", std::process::id(), name));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read_png(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    fn count_colour(rgb: &[u8], c: Rgb) -> usize {
        rgb.chunks_exact(3).filter(|p| p == &c).count()
    }

    #[test]
    fn falling_curve_round_trips() {
        let dir = temp_dir("falling");
        let path = dir.join("loss.png");
        let train: Vec<(f64, f64)> = (0..500).map(|i| (i as f64, 6.0 * (-(i as f64) / 120.0).exp() + 0.3)).collect();
        let val: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 50.0, 6.5 * (-(i as f64) * 50.0 / 140.0).exp() + 0.5)).collect();
        write_curve_png(&path, "vox2vec pretraining loss", &[("train", &train), ("val", &val)]).unwrap();
        let (w, h, ct, rgb) = read_png(&path);
        assert_eq!((w, h, ct), (800, 500, png::ColorType::Rgb));
        assert_eq!(rgb.len(), 800 * 500 * 3);
        let non_white = rgb.chunks_exact(3).filter(|p| p != &WHITE).count();
        assert!(non_white > 5_000, "non-white pixels: {non_white}");
        let c0 = count_colour(&rgb, PALETTE[0]);
        let c1 = count_colour(&rgb, PALETTE[1]);
        assert!(c0 > 1_000, "series 0 pixels: {c0}");
        assert!(c1 > 500, "series 1 pixels: {c1}");
        // The curve falls: series-0 pixels in the left tenth of the plot sit higher (smaller
        // row) than those in the right tenth.
        let mean_row = |x0: usize, x1: usize| {
            let (mut sum, mut n) = (0usize, 0usize);
            for y in 0..500 {
                for x in x0..x1 {
                    let i = (y * 800 + x) * 3;
                    if rgb[i..i + 3] == PALETTE[0] {
                        sum += y;
                        n += 1;
                    }
                }
            }
            sum as f64 / n.max(1) as f64
        };
        assert!(mean_row(102, 170) + 100.0 < mean_row(710, 775));
        // No temporary files left next to it.
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Overwriting an existing picture works too.
        write_curve_png(&path, "again", &[("train", &train[..100])]).unwrap();
        assert_eq!(read_png(&path).0, 800);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let dir = temp_dir("edges");
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let cases: Vec<(&str, Vec<Vec<(f64, f64)>>)> = vec![
            ("no series", vec![]),
            ("empty series", vec![vec![]]),
            ("single point", vec![vec![(3.0, 2.5)]]),
            ("constant y", vec![(0..50).map(|i| (i as f64, 1.0)).collect()]),
            ("constant zero", vec![vec![(0.0, 0.0), (0.0, 0.0)]]),
            ("nan and inf", vec![vec![(0.0, 1.0), (1.0, nan), (2.0, inf), (nan, 0.5), (4.0, 0.4), (5.0, 0.3), (6.0, -inf)]]),
            ("all nan", vec![vec![(nan, nan), (inf, -inf)]]),
            ("huge", vec![vec![(0.0, 1e300), (1.0, -1e300), (2.0, 1e90), (3.0, -1e90)]]),
            ("tiny", vec![vec![(0.0, 1e-12), (1e-9, 3e-12)]]),
            ("unsorted", vec![vec![(5.0, 1.0), (1.0, 3.0), (3.0, -2.0)]]),
            ("many", (0..12).map(|k| vec![(0.0, k as f64), (1.0, k as f64 * 0.5)]).collect()),
        ];
        for (k, (title, data)) in cases.iter().enumerate() {
            let names: Vec<String> = (0..data.len()).map(|i| format!("series {i} with a rather long name ~{{}}")).collect();
            let series: Vec<(&str, &[(f64, f64)])> = names.iter().map(|n| n.as_str()).zip(data.iter().map(|d| d.as_slice())).collect();
            let path = dir.join(format!("case{k}.png"));
            write_curve_png(&path, title, &series).unwrap();
            let (w, h, _, rgb) = read_png(&path);
            assert_eq!((w, h), (800, 500));
            // The axes are always there.
            assert!(count_colour(&rgb, BLACK) > 1_000, "{title}");
        }
        // A single point is visible as a dot of the series colour.
        let (_, _, _, rgb) = read_png(&dir.join("case2.png"));
        assert!(count_colour(&rgb, PALETTE[0]) > 15);
        // A very long title and a non-ASCII one are clipped or replaced, not a panic.
        write_curve_png(&dir.join("long.png"), &"x".repeat(500), &[("ü€", &[(0.0, 1.0), (1.0, 0.0)])]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_paths_are_errors() {
        let dir = temp_dir("badpath");
        let pts = [(0.0, 1.0), (1.0, 0.5)];
        assert!(write_curve_png(&dir.join("missing/sub/loss.png"), "t", &[("a", &pts)]).is_err());
        assert!(write_curve_png(Path::new("/"), "t", &[("a", &pts)]).is_err());
        // Nothing left behind in the existing folder.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tick_labels_read_well() {
        assert_eq!(tick_label(0.0, 0.5, 3.0), "0");
        assert_eq!(tick_label(2.5, 0.5, 3.0), "2.5");
        assert_eq!(tick_label(200.0, 100.0, 1000.0), "200");
        assert_eq!(tick_label(0.002, 0.001, 0.004), "0.002");
        assert_eq!(tick_label(2e6, 1e6, 5e6), "2.0e6");
        assert_eq!(nice_step(0.23), 0.2);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
    }
}
