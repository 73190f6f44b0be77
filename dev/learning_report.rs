//! The table and the plot of the learning experiment (scripts/does-it-learn.sh): reads the
//! `results.json` of several `vox2vec probe / finetune / scratch` runs on the same split and
//! writes a Markdown table of the best validation Dice per class (one column per run, the mean
//! last) and a PNG of the mean validation Dice against the training steps of each run.
//!
//!   cargo run --release --example learning_report -- OUT_DIR [--pretrain RUN_DIR] LABEL=RESULTS.json [LABEL=RESULTS.json ...]
//!
//! Writes OUT_DIR/table.md and OUT_DIR/dice_vs_steps.png; with --pretrain, also redraws the
//! pretraining run's loss.png from its metrics.jsonl and copies it to OUT_DIR/pretraining.png.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

struct Run {
    label: String,
    classes: Vec<String>,
    best: Vec<f64>,
    best_step: u64,
    /// (step, mean Dice over classes) at each validation.
    curve: Vec<(f64, f64)>,
}

fn read(label: &str, path: &PathBuf) -> Result<Run> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let floats = |x: &serde_json::Value| -> Vec<f64> {
        x.as_array().map(|a| a.iter().filter_map(|d| d.as_f64()).collect()).unwrap_or_default()
    };
    let classes: Vec<String> = v["classes"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let best = floats(&v["best_dice"]);
    ensure!(!classes.is_empty() && best.len() == classes.len(), "{}: no classes or best_dice", path.display());
    let curve = v["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| {
                    let d = floats(&e["dice"]);
                    Some((e["step"].as_f64()?, d.iter().sum::<f64>() / d.len().max(1) as f64))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Run { label: label.to_string(), classes, best, best_step: v["best_step"].as_u64().unwrap_or(0), curve })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: learning_report OUT_DIR LABEL=RESULTS.json [LABEL=RESULTS.json ...]");
    }
    let out = PathBuf::from(&args[0]);
    let mut rest = &args[1..];
    let mut pretrain = None;
    if rest.first().map(String::as_str) == Some("--pretrain") {
        pretrain = Some(PathBuf::from(rest.get(1).context("--pretrain needs a run folder")?));
        rest = &rest[2..];
    }
    let mut runs = Vec::new();
    for a in rest {
        let (label, path) = a.split_once('=').with_context(|| format!("{a:?}: expected LABEL=RESULTS.json"))?;
        runs.push(read(label, &PathBuf::from(path))?);
    }
    let classes = runs[0].classes.clone();
    for r in &runs {
        ensure!(
            r.classes == classes,
            "{} has classes {:?}, {} has {:?}: not the same dataset",
            r.label,
            r.classes,
            runs[0].label,
            classes
        );
    }
    let mut md = format!(
        "| class | {} |\n|---|{}\n",
        runs.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(runs.len())
    );
    for (c, name) in classes.iter().enumerate() {
        md += &format!(
            "| {name} | {} |\n",
            runs.iter().map(|r| format!("{:.3}", r.best[c])).collect::<Vec<_>>().join(" | ")
        );
    }
    let mean = |r: &Run| r.best.iter().sum::<f64>() / r.best.len() as f64;
    md += &format!(
        "| **mean** | {} |\n",
        runs.iter().map(|r| format!("**{:.3}**", mean(r))).collect::<Vec<_>>().join(" | ")
    );
    md += &format!(
        "| best at step | {} |\n",
        runs.iter().map(|r| r.best_step.to_string()).collect::<Vec<_>>().join(" | ")
    );
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("table.md"), &md).with_context(|| format!("writing {}", out.join("table.md").display()))?;
    let series: Vec<(&str, &[(f64, f64)])> = runs.iter().map(|r| (r.label.as_str(), r.curve.as_slice())).collect();
    vox2vec::plot::write_curve_png(&out.join("dice_vs_steps.png"), "mean validation Dice vs training steps", &series)?;
    if let Some(dir) = &pretrain {
        vox2vec::train::write_loss_curve(dir).with_context(|| format!("drawing {}'s loss curve", dir.display()))?;
        std::fs::copy(dir.join(vox2vec::train::LOSS_CURVE_FILE), out.join("pretraining.png"))
            .with_context(|| format!("copying {}'s loss curve", dir.display()))?;
    }
    print!("{md}");
    println!("wrote {} and {}", out.join("table.md").display(), out.join("dice_vs_steps.png").display());
    Ok(())
}
