//! The GPU bundle's runner (gpu-bundle/run.sh) without a GPU: its dry run lists the phases
//! in the order and within the limits a short device lease needs, and its summary has the
//! format that is read back from a GPU machine; a run over stand-in binaries shows that every
//! phase's key numbers, failures and skips reach the summary.

use std::path::{Path, PathBuf};
use std::process::Command;

const ESSENTIAL: [&str; 8] =
    ["probe", "tests", "bench-bf16", "plan", "pytorch-bf16", "precision", "bench-fp32", "infer"];
const OPTIONAL: [&str; 4] = ["lab", "sanitize", "train", "nccl"];

fn runner() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-bundle/run.sh")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vox2vec-bundle-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One `phase NAME | STATUS | X s of L s | NUMBERS` line.
struct Phase {
    name: String,
    status: String,
    secs: u64,
    limit: u64,
    numbers: String,
}

fn phases(summary: &str) -> Vec<Phase> {
    summary
        .lines()
        .filter_map(|l| l.strip_prefix("phase "))
        .map(|l| {
            let f: Vec<&str> = l.split(" | ").map(str::trim).collect();
            assert_eq!(f.len(), 4, "phase line with {} fields: {l}", f.len());
            let (secs, limit) = f[2].split_once(" s of ").unwrap_or_else(|| panic!("no 'X s of L s' in {l}"));
            Phase {
                name: f[0].to_string(),
                status: f[1].to_string(),
                secs: secs.trim().parse().unwrap(),
                limit: limit.trim_end_matches(" s").trim().parse().unwrap(),
                numbers: f[3].to_string(),
            }
        })
        .collect()
}

fn run(script: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args).env("OUT", out);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("running bash");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn tar_list(path: &Path) -> String {
    let o = Command::new("tar").arg("tzf").arg(path).output().expect("running tar");
    assert!(o.status.success(), "tar could not read {}", path.display());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn dry_run_lists_the_phases_in_order_within_the_lease() {
    let out = temp_dir("dry");
    let (rc, stdout) = run(&runner(), &out, &["--dry-run"], &[]);
    assert_eq!(rc, 0, "dry run failed:\n{stdout}");
    let summary = std::fs::read_to_string(out.join("summary.txt")).expect("summary.txt written");
    assert!(stdout.trim_end().ends_with(summary.trim_end()), "the summary is not the last lines of stdout:\n{stdout}");
    let mut lines = summary.lines();
    assert!(lines.next().unwrap().starts_with("vox2vec-rs GPU bundle summary (dry run, "), "{summary}");
    for prefix in ["build: ", "gpu: ", "clocks: ", "card priced by the plan: "] {
        assert!(lines.next().is_some_and(|l| l.starts_with(prefix)), "no '{prefix}' line in order:\n{summary}");
    }
    let ps = phases(&summary);
    let names: Vec<&str> = ps.iter().map(|p| p.name.as_str()).collect();
    let want: Vec<&str> = ESSENTIAL.iter().chain(&OPTIONAL).copied().collect();
    assert_eq!(names, want, "phases out of order");
    assert!(ps.iter().all(|p| p.status == "dry-run" && p.secs == 0 && p.limit > 0), "{summary}");
    for p in &ps {
        let kind = if ESSENTIAL.contains(&p.name.as_str()) { "essential" } else { "optional" };
        assert_eq!(p.numbers, kind, "{}: kind", p.name);
    }
    // The essential phases fit 5 minutes; everything fits one 10-minute command with room for
    // the machine's start inside a 15-minute lease.
    let essential: u64 = ps.iter().filter(|p| ESSENTIAL.contains(&p.name.as_str())).map(|p| p.limit).sum();
    let all: u64 = ps.iter().map(|p| p.limit).sum();
    assert!(essential <= 300, "essential phases' limits add up to {essential} s");
    assert!(all <= 540, "all phases' limits add up to {all} s");
    assert!(summary.contains(&format!("essential phases' limits: {essential} s in all")), "{summary}");
    let listed = tar_list(&out.join("bundle-results.tar.gz"));
    for name in want.iter().map(|n| format!("results/{n}.txt")).chain(["results/summary.txt".to_string()]) {
        assert!(listed.lines().any(|l| l == name), "{name} not in the tarball:\n{listed}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn unknown_phases_and_options_are_refused() {
    let out = temp_dir("refuse");
    let (rc, text) = run(&runner(), &out, &["--dry-run", "bench"], &[]);
    assert_eq!(rc, 2, "an unknown phase was accepted:\n{text}");
    assert!(text.contains("unknown phase bench"), "{text}");
    let (rc, text) = run(&runner(), &out, &["--fast"], &[]);
    assert_eq!(rc, 2, "an unknown option was accepted:\n{text}");
    let _ = std::fs::remove_dir_all(&out);
}

/// Stand-ins for gpu-bundle/bin/: each prints what the real binary prints on a GPU (the lines
/// the summary reads), the kernel lab fails, the GPU tests fail one case.
fn stand_ins(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    let scripts = [
        (
            "gpu-tests",
            r#"echo "running 2 GPU tests on cuda:0 (stand-in)"
if [ "$1" = mma_layout_probe ]; then echo "test mma_layout_probe ... ok (0.1 s)"; echo "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 20 filtered out"; exit 0; fi
echo "test ops_conv3d_vs_cpu ... FAILED"; echo "  conv: relative error 1e-2"
echo "test result: FAILED. 21 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"; exit 1"#,
        ),
        (
            "vox2vec-train",
            r#"case " $* " in
*" --bench-plan "*) echo "bench-plan: peak device memory 5.31 GiB in use, 5.50 GiB reserved; largest allocation 80.0 MiB"; echo "bench-plan: 1730 launches; floor 20.20 ms/step" ;;
*" --compare-precisions "*) echo "precision: loss fp32 6.1 bf16 6.2 (rel 1.6e-2)"; echo "precision: gradient norm fp32 1e1 bf16 1e1 (rel 1e-2)" ;;
*" --bench "*) echo "bench: 20 steps: median 42.5 ms/step, min 41.0 ms"; echo "bench: as one CUDA graph per step (1951 nodes): 18 steps relaunched a kept graph unchanged, 2 updated it, 0 instantiated one, 0 went on unrecorded"; echo "bench: 10 steps with every call issued one by one (no graph): median 47.0 ms/step"; echo "bench: peak device memory 5.10 GiB in use, 6.00 GiB reserved by the caching allocator" ;;
esac"#,
        ),
        (
            "vox2vec",
            "echo 'precision   batch    ms / pass   patches/s   ms / patch  peak memory'; echo 'fp32          1        1.50      666.67         1.50  0.1 GiB'; echo 'bf16          8        8.00     1000.00         1.00  0.5 GiB'",
        ),
        ("kernel_lab", "echo 'conv3d_forward v1 FAIL error 1e-1'; exit 1"),
    ];
    for (name, body) in scripts {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    }
    std::fs::write(bin.join("BUILD_INFO"), "commit abc1234\nbuilt 2026-12-07 00:00 UTC\nkernels sm_90\n").unwrap();
}

#[test]
fn a_run_brings_every_phases_numbers_into_the_summary() {
    let root = temp_dir("run");
    std::fs::create_dir_all(root.join("gpu-bundle")).unwrap();
    std::fs::copy(runner(), root.join("gpu-bundle/run.sh")).unwrap();
    stand_ins(&root.join("gpu-bundle/bin"));
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // A budget that holds no optional phase: they are skipped, and said so.
    let (rc, stdout) = run(&root.join("gpu-bundle/run.sh"), &out, &[], &[("BUNDLE_BUDGET_S", "20")]);
    let summary = std::fs::read_to_string(out.join("summary.txt")).expect("summary.txt written");
    assert_eq!(rc, 1, "a run with failed phases exited {rc}:\n{stdout}");
    assert!(summary.contains("build: commit abc1234 built 2026-12-07 00:00 UTC kernels sm_90"), "{summary}");
    let ps = phases(&summary);
    let get = |n: &str| ps.iter().find(|p| p.name == n).unwrap_or_else(|| panic!("no phase {n}:\n{summary}"));
    assert_eq!(get("probe").status, "ok");
    assert!(get("probe").numbers.contains("2 passed; 0 failed"), "{summary}");
    assert_eq!(get("tests").status, "FAILED (rc 1)");
    assert!(
        get("tests").numbers.contains("1 failed") && get("tests").numbers.contains("failed: ops_conv3d_vs_cpu"),
        "{summary}"
    );
    assert_eq!(get("bench-bf16").status, "ok");
    assert!(
        get("bench-bf16").numbers.contains("median 42.5 ms/step")
            && get("bench-bf16").numbers.contains("5.10 GiB in use"),
        "{summary}"
    );
    assert!(
        get("bench-bf16").numbers.contains("18 steps relaunched")
            && get("bench-bf16").numbers.contains("one by one: median 47.0 ms/step"),
        "{summary}"
    );
    assert!(get("plan").numbers.contains("floor 20.20 ms/step"), "{summary}");
    assert!(get("precision").numbers.contains("loss fp32 6.1 bf16 6.2"), "{summary}");
    assert!(get("infer").numbers.contains("bf16 b8 1000.00/s"), "{summary}");
    for n in OPTIONAL {
        assert_eq!(get(n).status, "skipped", "{n}: {summary}");
        assert!(get(n).numbers.contains("of the 20 s budget left"), "{n}: {summary}");
    }
    // PyTorch is absent here (or without CUDA): skipped with the reason, not failed.
    let py = get("pytorch-bf16");
    if py.status == "skipped" {
        assert!(py.numbers.contains("torch"), "{summary}");
    }
    assert!(summary.contains("phases ok ") && summary.contains("failed 1,"), "{summary}");
    let listed = tar_list(&out.join("bundle-results.tar.gz"));
    assert!(listed.contains("results/bench-bf16.txt") && listed.contains("results/summary.txt"), "{listed}");
    // An optional phase named on the command line runs within the default budget.
    let (rc, _) = run(&root.join("gpu-bundle/run.sh"), &out, &["lab"], &[]);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert_eq!(rc, 1, "{summary}");
    let ps = phases(&summary);
    assert_eq!(ps.len(), 1, "{summary}");
    assert_eq!((ps[0].name.as_str(), ps[0].status.as_str()), ("lab", "FAILED (rc 1)"), "{summary}");
    assert!(ps[0].numbers.contains("lines with FAIL: 1"), "{summary}");
    let _ = std::fs::remove_dir_all(&root);
}
