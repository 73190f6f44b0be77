//! A run's record: metrics.jsonl (one JSON line per step, validation or probe), its loss
//! picture, and the summary line printed at the end of a run.

use anyhow::Result;

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_CURVE_FILE: &str = "loss.png";

/// Keep only the lines of a metrics file whose step is at most `through` (dropping lines that
/// do not parse, such as one cut by a kill); rewritten atomically, and only when something is
/// dropped. A missing file is left missing.
pub fn truncate_metrics(path: &std::path::Path, through: u64) -> Result<()> {
    use anyhow::Context;
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= through)
        })
        .collect();
    if keep.len() == text.lines().count() && (text.is_empty() || text.ends_with('\n')) {
        return Ok(());
    }
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::checkpoint::write_atomic(path, out.as_bytes())
        .with_context(|| format!("truncating {} to step {through}", path.display()))
}

/// Draw `out_dir/loss.png` from the run's whole `metrics.jsonl` (resumed parts included),
/// three panels: the InfoNCE loss per step and its moving average over 20 steps; the
/// contrastive top-1 accuracy; the mean positive and negative similarities; each with the
/// validation pairs' values where the run has them (`val_*` lines).
pub fn write_loss_curve(out_dir: &std::path::Path) -> Result<()> {
    use anyhow::Context;
    let text = std::fs::read_to_string(out_dir.join(METRICS_FILE)).context("reading metrics")?;
    let lines: Vec<serde_json::Value> =
        text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        lines.iter().filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?))).collect()
    };
    let moving = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        (0..pts.len())
            .map(|i| {
                let w = &pts[i.saturating_sub(19)..=i];
                (pts[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
            })
            .collect()
    };
    let (loss, top1, pos, neg) = (series("loss"), series("top1"), series("pos_sim"), series("neg_sim"));
    let (vloss, vtop1, vpos, vneg) =
        (series("val_loss"), series("val_top1"), series("val_pos_sim"), series("val_neg_sim"));
    let (loss_avg, top1_avg) = (moving(&loss), moving(&top1));
    let mut p_loss: Vec<(&str, &[(f64, f64)])> = vec![("loss", &loss), ("mean of 20", &loss_avg)];
    let mut p_top1: Vec<(&str, &[(f64, f64)])> = vec![("top-1", &top1), ("mean of 20", &top1_avg)];
    let mut p_sim: Vec<(&str, &[(f64, f64)])> = vec![("positive", &pos), ("negative", &neg)];
    if !vloss.is_empty() {
        p_loss.push(("validation", &vloss));
        p_top1.push(("validation", &vtop1));
        p_sim.extend([("val positive", &vpos[..]), ("val negative", &vneg[..])]);
    }
    crate::plot::write_panels_png(
        &out_dir.join(LOSS_CURVE_FILE),
        &[
            ("InfoNCE loss", &p_loss),
            ("contrastive top-1 accuracy", &p_top1),
            ("mean cosine similarity of pairs", &p_sim),
        ],
    )
}

/// One line of `metrics.jsonl` (appended and flushed; a failed write names the file).
/// Appends `line` to metrics.jsonl (rank 0; other ranks hold no file and log nothing).
pub(super) fn append_metric(
    metrics: &mut Option<std::fs::File>,
    out_dir: &std::path::Path,
    line: &serde_json::Value,
) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let Some(metrics) = metrics else { return Ok(()) };
    let path = out_dir.join(METRICS_FILE);
    crate::checkpoint::injected_write_error(&path)?;
    writeln!(metrics, "{line}").and_then(|_| metrics.flush()).with_context(|| format!("writing {}", path.display()))
}

/// A run's learning at a glance, from its whole metrics file (resumed parts included): the
/// mean loss and contrastive top-1 accuracy of its first and of its last tenth of steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunSummary {
    /// Steps with a logged loss (skipped steps left out).
    pub steps: usize,
    /// Steps in each mean: a tenth of the steps, at least one.
    pub window: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub first_top1: f64,
    pub last_top1: f64,
}

impl RunSummary {
    /// The summary of `out_dir/metrics.jsonl`; `None` when it logs no step.
    pub fn read(out_dir: &std::path::Path) -> Result<Option<RunSummary>> {
        use anyhow::Context;
        let path = out_dir.join(METRICS_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let steps: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v.get("loss")?.as_f64()?, v.get("top1")?.as_f64()?)))
            .collect();
        Ok(Self::of(&steps))
    }

    /// The summary of (loss, top-1) per step, in step order.
    pub fn of(steps: &[(f64, f64)]) -> Option<RunSummary> {
        if steps.is_empty() {
            return None;
        }
        let window = (steps.len() / 10).max(1);
        let mean = |s: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
        let (first, last) = (&steps[..window], &steps[steps.len() - window..]);
        Some(RunSummary {
            steps: steps.len(),
            window,
            first_loss: mean(first, |s| s.0),
            last_loss: mean(last, |s| s.0),
            first_top1: mean(first, |s| s.1),
            last_top1: mean(last, |s| s.1),
        })
    }

    /// One line: steps, wall time, loss and top-1 from the first to the last tenth.
    pub fn line(&self, wall: std::time::Duration) -> String {
        format!(
            "done: {} steps in {:.0} s; loss {:.2} -> {:.2}, top-1 {:.2} -> {:.2} (means of the first and last {} steps)",
            self.steps,
            wall.as_secs_f64(),
            self.first_loss,
            self.last_loss,
            self.first_top1,
            self.last_top1,
            self.window
        )
    }
}

#[cfg(test)]
mod tests {
    use super::RunSummary;

    #[test]
    fn summary_means_the_first_and_last_tenth() {
        let steps: Vec<(f64, f64)> = (0..25).map(|i| (10.0 - i as f64, i as f64 / 100.0)).collect();
        let s = RunSummary::of(&steps).unwrap();
        assert_eq!((s.steps, s.window), (25, 2));
        assert_eq!((s.first_loss, s.last_loss), (9.5, -13.5));
        assert!((s.first_top1 - 0.005).abs() < 1e-12 && (s.last_top1 - 0.235).abs() < 1e-12);
        assert_eq!(RunSummary::of(&[(1.0, 0.5)]).unwrap().window, 1);
        assert!(RunSummary::of(&[]).is_none());
    }
}
