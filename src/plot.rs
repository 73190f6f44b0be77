//! Pictures: line plots (loss, learning signal, Dice against steps) and grids of images with
//! captions (the PCA view of features, similarity maps), as PNG.
//!
//! Drawn with plotters into an RGB buffer (text in DejaVu Sans, embedded through the `dejavu`
//! crate: no fonts needed on the machine) and encoded with the `png` crate. Bad data never
//! makes a plot fail: non-finite (and absurdly large) values are skipped and break the line,
//! empty input gives empty axes, a single point is drawn as a dot, constant data gets a range
//! around it. Files are written to a temporary name in the same folder and renamed, so a
//! reader (or a crash mid-write) never sees a half-written picture.

use anyhow::{Context, Result};
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;

const WIDTH: usize = 800;
const HEIGHT: usize = 500;
/// Values beyond this are treated like infinities: they would overflow the range arithmetic.
const MAX_ABS: f64 = 1e100;
const FONT: &str = "sans-serif";

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

fn colour(c: Rgb) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// DejaVu Sans as plotters' "sans-serif", registered once per process.
fn fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is valid; a failure would only leave text undrawn.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Writes `series` (name, points) as a line plot to `path` (PNG, 800x500), atomically.
///
/// Points need not be sorted; they are joined in the given order. Non-finite values are skipped
/// and break the line. Errors only come from the file system or the encoder.
pub fn write_curve_png(path: &Path, title: &str, series: &[(&str, &[(f64, f64)])]) -> Result<()> {
    write_panels_png(path, &[(title, series)])
}

/// One panel of `write_panels_png`: a title and its series.
pub type Panel<'a> = (&'a str, &'a [(&'a str, &'a [(f64, f64)])]);

/// Several line plots stacked top to bottom in one PNG (800 wide, 500 per panel), each drawn
/// as `write_curve_png` draws one, written atomically.
pub fn write_panels_png(path: &Path, panels: &[Panel]) -> Result<()> {
    fonts();
    let height = HEIGHT * panels.len().max(1);
    let mut px = vec![255u8; WIDTH * height * 3];
    {
        let root = BitMapBackend::with_buffer(&mut px, (WIDTH as u32, height as u32)).into_drawing_area();
        if !panels.is_empty() {
            for (area, (title, series)) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
                draw_panel(area, title, series)?;
            }
        }
        root.present().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    write_rgb_png(path, WIDTH, height, &px)
}

/// One line plot into `area`.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[(&str, &[(f64, f64)])],
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the plot {title:?}: {e}");
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
    let (ylo, yhi) = (ylo - pad, yhi + pad);
    let title: String = title.chars().take(90).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(&title, (FONT, 20).into_font().color(&BLACK.to_rgba()))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(xlo..xhi, ylo..yhi)
        .map_err(err)?;
    let (xstep, ystep) = (nice_step((xhi - xlo) / 8.0), nice_step((yhi - ylo) / 8.0));
    let (xmag, ymag) = (xlo.abs().max(xhi.abs()), ylo.abs().max(yhi.abs()));
    let xfmt = |v: &f64| tick_label(*v, xstep, xmag);
    let yfmt = |v: &f64| tick_label(*v, ystep, ymag);
    chart
        .configure_mesh()
        .light_line_style(colour(WHITE))
        .bold_line_style(colour(GRID))
        .axis_style(BLACK.to_rgba())
        .label_style((FONT, 14))
        .x_labels(9)
        .y_labels(9)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .draw()
        .map_err(err)?;
    // Series: polylines broken at unusable points; isolated points become dots.
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = colour(PALETTE[k % PALETTE.len()]);
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for &(x, y) in pts.iter() {
            if usable(x) && usable(y) {
                runs.last_mut().expect("one run at least").push((x, y));
            } else if !runs.last().expect("one run at least").is_empty() {
                runs.push(Vec::new());
            }
        }
        let mut labelled = false;
        for run in runs.into_iter().filter(|r| !r.is_empty()) {
            let drawn = if run.len() == 1 {
                chart.draw_series(std::iter::once(Circle::new(run[0], 3, c.filled()))).map_err(err)?
            } else {
                // Wide polylines get mitred spikes at sharp turns (plotters joins segments with
                // miters): long, noisy series are drawn 1 pixel wide.
                let width = if run.len() > 100 { 1 } else { 2 };
                chart.draw_series(LineSeries::new(run, c.stroke_width(width))).map_err(err)?
            };
            if !labelled {
                let name: String = name.chars().take(28).collect();
                drawn.label(name).legend(move |(x, y)| Rectangle::new([(x, y - 2), (x + 22, y + 1)], c.filled()));
                labelled = true;
            }
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.to_rgba())
            .border_style(BLACK.to_rgba())
            .label_font((FONT, 14))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

trait ToRgba {
    fn to_rgba(&self) -> RGBAColor;
}

impl ToRgba for Rgb {
    fn to_rgba(&self) -> RGBAColor {
        colour(*self).to_rgba()
    }
}

/// One image of `write_image_grid_png`: a caption and `width` x `height` RGB pixels (row-major).
pub struct Tile {
    pub caption: String,
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// Images in a grid of `columns`, each under its caption, with a title on top: a PNG written
/// atomically (the PCA view of features, similarity maps beside the CT).
pub fn write_image_grid_png(path: &Path, title: &str, tiles: &[Tile], columns: usize) -> Result<()> {
    fonts();
    let columns = columns.max(1);
    let rows = tiles.len().div_ceil(columns).max(1);
    let (gap, caption_h, title_h) = (8usize, 22usize, 34usize);
    let col_w: Vec<usize> =
        (0..columns).map(|c| tiles.iter().skip(c).step_by(columns).map(|t| t.width).max().unwrap_or(0)).collect();
    let row_h: Vec<usize> =
        (0..rows).map(|r| tiles.iter().skip(r * columns).take(columns).map(|t| t.height).max().unwrap_or(0)).collect();
    // Wide enough for the title (DejaVu Sans at 18 px: about 9 px a character).
    let width =
        (col_w.iter().sum::<usize>() + gap * (columns + 1)).max(title.chars().take(120).count() * 9 + 2 * gap).max(200);
    let height = title_h + row_h.iter().map(|h| h + caption_h + gap).sum::<usize>() + gap;
    let mut px = vec![255u8; width * height * 3];
    let mut origins = Vec::with_capacity(tiles.len());
    for (i, t) in tiles.iter().enumerate() {
        anyhow::ensure!(
            t.rgb.len() == t.width * t.height * 3,
            "image {:?}: {} bytes for {}x{} RGB",
            t.caption,
            t.rgb.len(),
            t.width,
            t.height
        );
        let (r, c) = (i / columns, i % columns);
        let x0 = gap + col_w[..c].iter().map(|w| w + gap).sum::<usize>();
        let y0 = title_h + row_h[..r].iter().map(|h| h + caption_h + gap).sum::<usize>() + caption_h;
        origins.push((x0, y0));
    }
    {
        let root = BitMapBackend::with_buffer(&mut px, (width as u32, height as u32)).into_drawing_area();
        let text = |s: &str, x: usize, y: usize, size: u32| {
            root.draw(&Text::new(s.to_string(), (x as i32, y as i32), (FONT, size).into_font().color(&BLACK.to_rgba())))
        };
        text(&title.chars().take(120).collect::<String>(), gap, 8, 18)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
        for (t, &(x0, y0)) in tiles.iter().zip(&origins) {
            text(&t.caption.chars().take(60).collect::<String>(), x0, y0 - caption_h + 3, 14)
                .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    }
    for (t, &(x0, y0)) in tiles.iter().zip(&origins) {
        for y in 0..t.height {
            let dst = ((y0 + y) * width + x0) * 3;
            px[dst..dst + t.width * 3].copy_from_slice(&t.rgb[y * t.width * 3..(y + 1) * t.width * 3]);
        }
    }
    write_rgb_png(path, width, height, &px)
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

/// An RGB picture written through `checkpoint::write_atomic_with`: a temporary in a recognisable
/// folder beside `path` (removed on error, and by `remove_stale_temp_files` after a kill),
/// synced and renamed over `path`. The folder must exist (a run's): it is not created.
pub fn write_rgb_png(path: &Path, width: usize, height: usize, px: &[u8]) -> Result<()> {
    anyhow::ensure!(
        px.len() == width * height * 3,
        "{}: {} bytes for a {width}x{height} RGB picture",
        path.display(),
        px.len()
    );
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    anyhow::ensure!(dir.is_dir(), "cannot write {}: the folder {} does not exist", path.display(), dir.display());
    crate::checkpoint::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        {
            let mut enc = png::Encoder::new(&mut w, width as u32, height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer =
                enc.write_header().with_context(|| format!("writing the PNG header of {}", path.display()))?;
            writer.write_image_data(px).with_context(|| format!("writing {}", path.display()))?;
            writer.finish().with_context(|| format!("writing {}", path.display()))?;
        }
        w.flush().with_context(|| format!("writing {}", path.display()))
    })
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
        let val: Vec<(f64, f64)> =
            (0..10).map(|i| (i as f64 * 50.0, 6.5 * (-(i as f64) * 50.0 / 140.0).exp() + 0.5)).collect();
        write_curve_png(&path, "vox2vec pretraining loss", &[("train", &train), ("val", &val)]).unwrap();
        let (w, h, ct, rgb) = read_png(&path);
        assert_eq!((w, h, ct), (800, 500, png::ColorType::Rgb));
        assert_eq!(rgb.len(), 800 * 500 * 3);
        let non_white = rgb.chunks_exact(3).filter(|p| p != &WHITE).count();
        assert!(non_white > 5_000, "non-white pixels: {non_white}");
        let c0 = count_colour(&rgb, PALETTE[0]);
        let c1 = count_colour(&rgb, PALETTE[1]);
        assert!(c0 > 500, "series 0 pixels: {c0}"); // 500 points, drawn 1 px wide across ~680 px
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
        // (The right-hand columns stop short of the legend, whose swatch has the series colour.)
        assert!(mean_row(102, 170) + 100.0 < mean_row(560, 650));
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
            (
                "nan and inf",
                vec![vec![(0.0, 1.0), (1.0, nan), (2.0, inf), (nan, 0.5), (4.0, 0.4), (5.0, 0.3), (6.0, -inf)]],
            ),
            ("all nan", vec![vec![(nan, nan), (inf, -inf)]]),
            ("huge", vec![vec![(0.0, 1e300), (1.0, -1e300), (2.0, 1e90), (3.0, -1e90)]]),
            ("tiny", vec![vec![(0.0, 1e-12), (1e-9, 3e-12)]]),
            ("unsorted", vec![vec![(5.0, 1.0), (1.0, 3.0), (3.0, -2.0)]]),
            ("many", (0..12).map(|k| vec![(0.0, k as f64), (1.0, k as f64 * 0.5)]).collect()),
        ];
        for (k, (title, data)) in cases.iter().enumerate() {
            let names: Vec<String> =
                (0..data.len()).map(|i| format!("series {i} with a rather long name ~{{}}")).collect();
            let series: Vec<(&str, &[(f64, f64)])> =
                names.iter().map(|n| n.as_str()).zip(data.iter().map(|d| d.as_slice())).collect();
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
