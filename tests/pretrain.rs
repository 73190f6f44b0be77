//! The pretraining loop: the loss falls, a resumed run equals an uninterrupted one, and the
//! vox2vec-train binary reports bad input with a non-zero exit.

mod common;

use std::path::PathBuf;
use std::process::Command;

use vox2vec::model::{FpnConfig, ModelConfig, Vox2Vec};
use vox2vec::optim::AdamConfig;
use vox2vec::train::{CHECKPOINT_FILE, LOSS_CURVE_FILE, METRICS_FILE, Resume, Silent, TrainOptions, run_pretraining};

fn opts(dir: &std::path::Path, steps: u64) -> TrainOptions {
    common::tiny_run(dir, steps, 11)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn values(m: &Vox2Vec) -> Vec<Vec<f32>> {
    m.store
        .slots()
        .iter()
        .filter(|s| s.value.dtype() == vox2vec::tensor::DType::F32)
        .map(|s| s.value.f32s().to_vec())
        .collect()
}

#[test]
fn loss_falls_on_synthetic_pairs() {
    let dir = tmpdir("falls");
    run_pretraining(&opts(&dir, 40), &mut Silent).unwrap();
    let l = losses(&dir);
    assert_eq!(l.len(), 40);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().sum::<f64>() / 5.0;
    println!("loss: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(last < first - 0.1, "loss did not fall: {first:.4} -> {last:.4}");
}

#[test]
fn resume_continues_exactly() {
    let straight = tmpdir("straight");
    let a = run_pretraining(&opts(&straight, 6), &mut Silent).unwrap();
    let split = tmpdir("split");
    run_pretraining(&opts(&split, 3), &mut Silent).unwrap();
    let mut o = opts(&split, 6);
    o.resume = Resume::Latest;
    let b = run_pretraining(&o, &mut Silent).unwrap();
    assert!(values(&a) == values(&b), "resumed run differs from the uninterrupted one");
    assert_eq!(losses(&straight), losses(&split));
}

#[test]
fn resume_rejects_another_model() {
    let dir = tmpdir("othermodel");
    run_pretraining(&opts(&dir, 1), &mut Silent).unwrap();
    let mut o = opts(&dir, 2);
    o.model.fpn.base_channels = 8;
    o.resume = Resume::Latest;
    let e = run_pretraining(&o, &mut Silent).unwrap_err();
    assert!(format!("{e:#}").contains(CHECKPOINT_FILE), "{e:#}");
}

fn train_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vox2vec-train"))
}

const TINY: &[&str] = &[
    "--base-channels",
    "4",
    "--num-scales",
    "3",
    "--proj-dim",
    "16",
    "--pairs",
    "2",
    "--patch",
    "16,16,8",
    "--voxels",
    "16",
];

/// The README's first command as a newcomer runs it (`--small`, its default length, on the
/// CPU): the model must be seen learning, and the end-of-run summary must say so.
#[test]
fn first_command_shows_learning() {
    let dir = tmpdir("demo");
    let out = train_bin().args(["--small", "--device", "cpu", "--out"]).arg(&dir).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let steps: Vec<(f64, f64)> =
        metric_lines(&dir).iter().filter_map(|v| Some((v.get("loss")?.as_f64()?, v.get("top1")?.as_f64()?))).collect();
    assert_eq!(steps.len(), 150, "--small runs 150 steps by default");
    let tenth = steps.len() / 10;
    let mean = |s: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
    let (first, last) = (&steps[..tenth], &steps[steps.len() - tenth..]);
    assert!(mean(last, |s| s.0) < mean(first, |s| s.0), "the loss did not fall: {first:?} -> {last:?}");
    assert!(mean(last, |s| s.1) > mean(first, |s| s.1), "the top-1 accuracy did not rise: {first:?} -> {last:?}");
    let summary = stdout.lines().find(|l| l.starts_with("done: 150 steps in ")).unwrap_or_else(|| panic!("{stdout}"));
    let expected = format!("loss {:.2} -> {:.2}", mean(first, |s| s.0), mean(last, |s| s.0));
    assert!(summary.contains(&expected) && summary.contains("first and last 15 steps"), "{summary}");
    assert!(stdout.contains(&dir.join(LOSS_CURVE_FILE).display().to_string()), "{stdout}");
    assert!(dir.join(LOSS_CURVE_FILE).is_file() && dir.join(CHECKPOINT_FILE).is_file());
}

#[test]
fn cli_trains_checkpoints_and_resumes() {
    let dir = tmpdir("cli");
    let out =
        train_bin().args(TINY).args(["--steps", "2", "--checkpoint-every", "1", "--out"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("step      1  loss"), "loss not printed each step:\n{err}");
    assert!(dir.join(CHECKPOINT_FILE).is_file());
    // What a run killed after its checkpoint leaves: metrics of a step past the checkpoint
    // and a line cut mid-write; what a run killed during a write leaves: temporaries of a
    // dead process (a file, and a folder holding the safetensors crate's own temporary).
    let metrics = dir.join(METRICS_FILE);
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\": 3, \"loss\": 99.0}\n{\"step\": 4, \"lo");
    std::fs::write(&metrics, text).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale_file = dir.join(format!(".vox2vec-tmp-{dead}-0.safetensors"));
    let stale_dir = dir.join(format!(".vox2vec-tmp-{dead}-1"));
    std::fs::write(&stale_file, b"partial").unwrap();
    std::fs::create_dir_all(&stale_dir).unwrap();
    std::fs::write(stale_dir.join(".tmpAbC123"), b"partial").unwrap();
    let out = train_bin().args(TINY).args(["--steps", "3", "--resume", "--out"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed from") && err.contains("at step 2"), "{err}");
    assert!(err.contains("removed 2 temporary"), "{err}");
    assert!(!stale_file.exists() && !stale_dir.exists(), "stale temporaries of a dead process were left");
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3], "each step once after a resume");
    assert!(losses(&dir).iter().all(|&l| l != 99.0), "the step past the checkpoint was kept");
    // Nothing of ours is left in the folder after a clean run.
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn cli_bad_input_fails_clearly() {
    let dir = tmpdir("clibad");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    let out = train_bin()
        .args(TINY)
        .args(["--steps", "1", "--resume-from"])
        .arg(&bad)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.safetensors"), "{err}");
    assert!(!dir.join(CHECKPOINT_FILE).exists(), "a failed run left a checkpoint");

    let out = train_bin().args(TINY).args(["--steps", "1", "--device", "cuda", "--out"]).arg(&dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
}

#[test]
fn cli_refuses_out_of_range_flags_without_panicking() {
    let dir = tmpdir("cliflags");
    // Each of these once panicked, aborted on a huge allocation, or trained on nonsense.
    let cases: &[(&[&str], &str)] = &[
        (&["--base-channels", "0"], "--base-channels"),
        (&["--num-scales", "0"], "--num-scales"),
        (&["--num-scales", "12"], "--num-scales"),
        (&["--proj-dim", "0"], "--proj-dim"),
        (&["--base-channels", "1000"], "coarsest level"), // 4000 channels with TINY's 3 scales
        (&["--lr=-1"], "--lr"),
        (&["--lr=1e10"], "--lr"),
        (&["--lr=NaN"], "--lr"),
        (&["--temperature=-1"], "--temperature"),
        (&["--temperature=0"], "--temperature"),
        (&["--patch", "100000,100000,100000"], "--patch"),
        (&["--patch", "1024,1024,1024"], "limit"),
        (&["--precision", "bf16", "--device", "cpu"], "--precision bf16 needs a CUDA device"),
        // Once an abort on a failed allocation: now the estimate, the memory there is, the way out.
        (&["--pairs", "100000", "--device", "cpu"], "GiB available. Lower --pairs"),
    ];
    for (flags, expect) in cases {
        // TINY without the flag under test, then the flag.
        let name = flags[0].split('=').next().unwrap();
        let base: Vec<&str> = TINY.chunks(2).filter(|kv| kv[0] != name).flatten().copied().collect();
        let out = train_bin().args(&base).args(*flags).args(["--steps", "1", "--out"]).arg(&dir).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{flags:?} must fail with exit code 1 (not a panic or an abort):\n{err}"
        );
        assert!(err.contains(expect) && !err.contains("panicked"), "{flags:?}: {err}");
    }
    assert!(!dir.join(CHECKPOINT_FILE).exists(), "a refused run left a checkpoint");
}

#[test]
fn sigterm_finishes_the_step_writes_a_checkpoint_and_fails() {
    use std::io::{BufRead, BufReader};
    let dir = tmpdir("sigterm");
    let mut child = train_bin()
        .args(TINY)
        .args(["--steps", "1000000", "--checkpoint-every", "1000000", "--out"])
        .arg(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    // Wait until two steps are done, then ask it to stop.
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "trainer ended early:\n{text}");
        text.push_str(&line);
        if line.contains("step      2  loss") {
            break;
        }
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    text.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "an interrupted run must fail:\n{text}");
    assert!(text.contains("interrupted by a signal after step"), "{text}");
    let step: u64 = text
        .split("interrupted by a signal after step ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(step >= 2);
    assert!(dir.join(CHECKPOINT_FILE).is_file(), "no checkpoint written on SIGTERM");
    assert_eq!(losses(&dir).len() as u64, step, "metrics of every finished step");
    // It resumes where it stopped.
    let out = train_bin()
        .args(TINY)
        .args(["--steps", &(step + 1).to_string(), "--resume", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && e.contains(&format!("at step {step}")), "{e}");
    assert_eq!(losses(&dir).len() as u64, step + 1);
}

fn metric_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn nonfinite_step_stops_and_keeps_the_last_checkpoint() {
    let dir = tmpdir("nanstop");
    let mut o = opts(&dir, 4);
    o.checkpoint_every = 1;
    o.inject_nan_steps = vec![3];
    let e = format!("{:#}", run_pretraining(&o, &mut Silent).unwrap_err());
    assert!(e.contains("step 3") && e.contains("not applied") && e.contains("--skip-nonfinite"), "{e}");
    let steps: Vec<u64> = metric_lines(&dir).iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2], "metrics after the failed step");
    let mut m = Vox2Vec::new(o.model, 1);
    let mut adam = vox2vec::optim::Adam::new(o.adam, &m.store);
    vox2vec::checkpoint::load(&dir.join(CHECKPOINT_FILE), &mut m.store, Some(&mut adam)).unwrap();
    assert_eq!(adam.step, 2, "the checkpoint is step 2's");
    assert!(values(&m).iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn skip_nonfinite_drops_the_step_entirely() {
    // Step 2 skipped: the model after it equals the model after step 1 (weights, Adam's
    // effect and BatchNorm running statistics), and the log says so.
    let (skip_dir, one_dir) = (tmpdir("nanskip"), tmpdir("nanone"));
    let mut o = opts(&skip_dir, 2);
    o.skip_nonfinite = 1;
    o.inject_nan_steps = vec![2];
    let skipped = run_pretraining(&o, &mut Silent).unwrap();
    let one = run_pretraining(&opts(&one_dir, 1), &mut Silent).unwrap();
    assert!(values(&skipped) == values(&one), "a skipped step changed the model");
    let lines = metric_lines(&skip_dir);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["step"], 2);
    assert_eq!(lines[1]["skipped"], true, "{}", lines[1]);
    // The budget: a second bad step stops the run.
    let dir = tmpdir("nanbudget");
    let mut o = opts(&dir, 4);
    o.skip_nonfinite = 1;
    o.inject_nan_steps = vec![2, 3];
    let e = format!("{:#}", run_pretraining(&o, &mut Silent).unwrap_err());
    assert!(e.contains("step 3") && e.contains("1 earlier step(s) were skipped"), "{e}");
}

#[test]
fn check_finite_names_the_first_op() {
    let dir = tmpdir("checkfinite");
    let out = train_bin()
        .args(TINY)
        .args(["--synthetic-pairs", "--steps", "2", "--inject-nan-step", "1", "--out"])
        .arg(&dir)
        .env("VOX2VEC_CHECK_FINITE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("step 1")
            && err.contains("VOX2VEC_CHECK_FINITE: the first non-finite value comes from op 'conv3d' (forward output"),
        "{err}"
    );
    assert!(!dir.join(CHECKPOINT_FILE).exists(), "a checkpoint was written");
}

/// Temporary files of ours left in `dir`.
fn temporaries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn full_disk_while_writing_stops_cleanly_and_keeps_the_last_checkpoint() {
    // A good run to step 2, then a resumed run whose every write of the named file fails as
    // on a full disk (VOX2VEC_INJECT_WRITE_ERROR, after the temporary was written).
    let base = |dir: &std::path::Path, steps: &str| {
        let mut c = train_bin();
        c.args(TINY).args(["--synthetic-pairs", "--checkpoint-every", "1", "--steps", steps, "--out"]).arg(dir);
        c
    };
    // (file whose writes fail, the step of the checkpoint left): the checkpoint of step 3
    // fails; metrics fail at step 3 before its checkpoint; the plot at the end, after step 4's.
    for (i, (target, ckpt_step)) in
        [(CHECKPOINT_FILE, 2u64), (METRICS_FILE, 2), ("loss.png", 4)].into_iter().enumerate()
    {
        // (The folder's name must not contain the target's.)
        let dir = tmpdir(&format!("fulldisk{i}"));
        let out = base(&dir, "2").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let before = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
        let out = base(&dir, "4").arg("--resume").env("VOX2VEC_INJECT_WRITE_ERROR", target).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{target}: the run succeeded with a full disk:\n{err}");
        assert!(
            err.contains(&dir.join(target).display().to_string()) && err.contains("No space left on device"),
            "{target}: the error does not name the file and the cause:\n{err}"
        );
        assert!(temporaries(&dir).is_empty(), "{target}: temporaries left: {:?}", temporaries(&dir));
        let after = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
        let mut m = Vox2Vec::new(
            ModelConfig {
                fpn: FpnConfig { in_channels: 1, base_channels: 4, num_scales: 3 },
                proj_dim: 16,
                temperature: 0.1,
            },
            1,
        );
        let mut adam = vox2vec::optim::Adam::new(AdamConfig::default(), &m.store);
        vox2vec::checkpoint::load(&dir.join(CHECKPOINT_FILE), &mut m.store, Some(&mut adam)).unwrap();
        assert_eq!(adam.step, ckpt_step, "{target}: the checkpoint left");
        if ckpt_step == 2 {
            assert_eq!(before, after, "{target}: the previous checkpoint changed");
        }
    }
    // Files get the mode a plain create gives under the umask, not the writer's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vox2vec-pretrain-fulldisk0-{}", std::process::id()));
        let mode = std::fs::metadata(dir.join(CHECKPOINT_FILE)).unwrap().permissions().mode() & 0o777;
        let umask = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok()))
        });
        if let Some(u) = umask {
            assert_eq!(mode, 0o666 & !u, "checkpoint mode {mode:o} under umask {u:o}");
        }
    }
    // A real full disk where this machine lets the test mount a 1 MiB tmpfs (root): the first
    // checkpoint (~0.6 MB) fits, the second's temporary does not.
    let mnt = tmpdir("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        println!("real full-disk case not run: cannot mount a tmpfs here (the injected cases above ran)");
        return;
    }
    let dir = mnt.join("run");
    let out = base(&dir, "3").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let left = temporaries(&dir);
    let step1 = std::fs::read(dir.join(CHECKPOINT_FILE)).map(|b| b.len());
    Command::new("umount").arg(&mnt).status().unwrap();
    assert!(!out.status.success(), "a full tmpfs did not stop the run:\n{err}");
    assert!(
        err.contains(&format!("could not write {}", dir.join(CHECKPOINT_FILE).display()))
            && err.contains("No space left on device"),
        "{err}"
    );
    assert!(left.is_empty(), "temporaries left on the full disk: {left:?}");
    assert!(step1.as_ref().is_ok_and(|&n| n > 0), "the step-1 checkpoint is gone: {step1:?}");
}

#[test]
fn kill_9_at_several_moments_then_resume_is_bit_identical() {
    use std::io::{BufRead, BufReader};
    let run = |dir: &std::path::Path, resume: bool| {
        let mut c = train_bin();
        c.args(TINY).args(["--synthetic-pairs", "--steps", "6", "--checkpoint-every", "1", "--out"]).arg(dir);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let straight = tmpdir("kill-straight");
    let out = run(&straight, false).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tmpdir("kill-split");
    // Moment 1: right after step 2 is reported (its metrics line written, its checkpoint being
    // written or just written).
    let mut child = run(&dir, false).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "the trainer ended before step 2");
        if line.contains("step      2  loss") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Moment 2: inside a checkpoint write (temporary complete, not yet renamed).
    let mut child = run(&dir, true)
        .env("VOX2VEC_PAUSE_WRITE", CHECKPOINT_FILE)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (t0, mine) = (std::time::Instant::now(), format!(".vox2vec-tmp-{}-", child.id()));
    let in_write = loop {
        // This process's temporary folder of a checkpoint (one left by the first kill is
        // removed at start; a metrics truncation at start uses one too, with file.jsonl).
        let tmp = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(&mine));
        let checkpoint_inside = |p: &std::path::Path| {
            std::fs::read_dir(p).is_ok_and(|d| {
                d.filter_map(|e| e.ok()).any(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.ends_with(".safetensors") || n.starts_with(".tmp")
                })
            })
        };
        if let Some(t) = tmp
            && checkpoint_inside(&t.path())
        {
            break true;
        }
        if t0.elapsed().as_secs() > 60 {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(in_write, "the resumed run never started a checkpoint write");
    assert!(!temporaries(&dir).is_empty(), "the kill inside the write left no temporary (was it inside?)");
    // What is on disk is a whole checkpoint of an earlier step.
    let out =
        Command::new(env!("CARGO_BIN_EXE_vox2vec")).arg("inspect").arg(dir.join(CHECKPOINT_FILE)).output().unwrap();
    assert!(
        out.status.success(),
        "the checkpoint left by the kill does not load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Resume to the end: the stale temporary is removed, and the result is the straight run's.
    let out = run(&dir, true).output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && e.contains("removed 1 temporary"), "{e}");
    assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
    assert_eq!(losses(&dir), losses(&straight), "losses after two kills and resumes");
    let steps: Vec<u64> = metric_lines(&dir).iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    assert_same_checkpoint(&dir.join(CHECKPOINT_FILE), &straight.join(CHECKPOINT_FILE));
}

/// Two checkpoints hold the same tensors, bit for bit, and the same metadata but for the
/// command line that wrote them (a resumed run's has --resume and its own --out).
fn assert_same_checkpoint(a: &std::path::Path, b: &std::path::Path) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (sa, sb) =
        (safetensors::SafeTensors::deserialize(&ba).unwrap(), safetensors::SafeTensors::deserialize(&bb).unwrap());
    let (mut na, mut nb) = (sa.names(), sb.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "different tensors");
    for n in na {
        assert!(
            sa.tensor(n).unwrap().data() == sb.tensor(n).unwrap().data(),
            "{n} differs from the uninterrupted run's"
        );
    }
    let meta = |bytes: &[u8]| {
        let mut m = safetensors::SafeTensors::read_metadata(bytes).unwrap().1.metadata().clone().unwrap_or_default();
        assert!(m.remove("command_line").is_some(), "no command line recorded");
        m
    };
    assert_eq!(meta(&ba), meta(&bb), "metadata differs from the uninterrupted run's");
}

/// Every step logs the learning signal (top-1 accuracy, positive and negative similarities);
/// --val-data logs the same on fixed held-out pairs every --val-every steps and at the end;
/// loss.png has the three panels; --dump-batches writes the initial weights and each batch in
/// PyTorch's layouts; --exclude leaves matching inputs out of training.
#[test]
fn learning_signal_validation_dumps_and_exclusion() {
    let dir = tmpdir("signal");
    let data = dir.join("cts");
    std::fs::create_dir_all(&data).unwrap();
    for (name, shift) in [("a", 0), ("b", 5)] {
        common::blocks::write_case(
            &data.join(format!("{name}.nii.gz")),
            &dir.join(format!("{name}_label.nii.gz")),
            shift,
        );
    }
    let out = dir.join("run");
    let res = train_bin()
        .arg(&data)
        .args(TINY)
        .args(["--steps", "4", "--val-every", "2", "--val-batches", "2", "--exclude", "b.nii", "--val-data"])
        .arg(data.join("b.nii.gz"))
        .arg("--cache")
        .arg(dir.join("cache"))
        .arg("--dump-batches")
        .arg(dir.join("dump"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("validation: loss"), "{err}");
    let lines = metric_lines(&out);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for v in &steps {
        let (t, p, n) = (v["top1"].as_f64().unwrap(), v["pos_sim"].as_f64().unwrap(), v["neg_sim"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&t) && (-1.0..=1.0).contains(&p) && (-1.0..=1.0).contains(&n), "{v}");
    }
    let val: Vec<u64> =
        lines.iter().filter(|v| v.get("val_loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(val, vec![2, 4], "validation after steps 2 and 4");
    let v = lines.iter().find(|v| v.get("val_loss").is_some()).unwrap();
    assert!(
        v["val_loss"].as_f64().unwrap().is_finite() && (0.0..=1.0).contains(&v["val_top1"].as_f64().unwrap()),
        "{v}"
    );
    // loss.png: 800 wide, three 500-pixel panels.
    let png = std::fs::read(out.join(vox2vec::train::LOSS_CURVE_FILE)).unwrap();
    assert_eq!(
        (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap())),
        (800, 1500)
    );
    // The dump: initial weights, and per step the views [2, 1, 16, 16, 8] and [N, 7] pairs.
    assert!(dir.join("dump/weights_step_000000.safetensors").is_file());
    let (shape, _) = vox2vec::eval::npy::read_f32(&dir.join("dump/step_000001/x1.npy")).unwrap();
    assert_eq!(shape, vec![2, 1, 16, 16, 8]);
    let pairs = std::fs::read(dir.join("dump/step_000004/pairs.npy")).unwrap();
    let header =
        String::from_utf8_lossy(&pairs[10..10 + u16::from_le_bytes([pairs[8], pairs[9]]) as usize]).to_string();
    assert!(header.contains("'<i8'") && header.contains(", 7)"), "{header}");
    // b was excluded from training (and is the validation CT).
    let meta = vox2vec::eval::recorded::Recorded::read(&out.join(CHECKPOINT_FILE)).unwrap().metadata;
    let sources: serde_json::Value = serde_json::from_str(&meta[vox2vec::eval::recorded::DATA_SOURCES]).unwrap();
    let files: Vec<String> =
        sources["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert!(files.len() == 1 && files[0].ends_with("a.nii.gz"), "{sources}");
    assert!(sources["validation"]["files"][0].as_str().unwrap().ends_with("b.nii.gz"), "{sources}");
}
