//! The documentation names only what exists. In README.md, CONTRIBUTING.md and docs/*.md:
//! every repository path (in prose, code spans, code blocks and relative links) must exist,
//! every `VOX2VEC_` variable must occur in the code, and every `--flag` must be one our
//! binaries print in `--help`, one our scripts take, or one of an external tool listed below.
//! Conversely every `VOX2VEC_` variable the code reads must be listed in docs/environment.md.
//! All problems are printed (file:line, token, why) before the test fails.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Repository paths start with one of these folders, or are one of these top-level files.
const PREFIXES: &str = "src/ kernels/ tests/ benches/ dev/ docs/ scripts/ fuzz/ gpu-bundle/ examples/ .ci/";
const TOP_FILES: &str = "Cargo.toml Cargo.lock build.rs README.md CONTRIBUTING.md rustfmt.toml clippy.toml justfile";
/// Commands that are not ours: on their lines (up to a standalone `--` or one of our programs)
/// only EXTERNAL_FLAGS are accepted.
const EXTERNAL_COMMANDS: &str =
    "cargo pip pip3 python python3 nvcc git just maturin rustup torchrun srun compute-sanitizer nsys";
const EXTERNAL_FLAGS: &str = concat!(
    // cargo
    "--release --features --test --tests --bin --bins --example --examples --bench --benches --lib ",
    "--no-fail-fast --all-targets --manifest-path --path --check --profile --no-run --locked --offline ",
    "--message-format --target-dir --package --all-features --no-default-features --version --help ",
    // the libtest harness, after `cargo test ... --`
    "--nocapture --test-threads --ignored --include-ignored --exact --list --skip ",
    // pip
    "--target --no-deps --quiet --upgrade ",
    // torchrun, srun, compute-sanitizer
    "--nnodes --nproc-per-node --rdzv-endpoint --no-python --ntasks-per-node --gpus-per-node ",
    "--tool --leak-check --error-exitcode",
);

fn listed(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

struct Problem {
    at: String,
    token: String,
    why: String,
}

/// What the code holds: the flags of our programs and every `VOX2VEC_` name it mentions.
struct Known {
    flags: BTreeSet<String>,
    vars: BTreeSet<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Owner {
    Ours,
    External,
    Unknown,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `--name` tokens in `s` (the name runs over letters, digits and inner dashes).
fn flags_in(s: &str) -> Vec<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    for i in 0..b.len().saturating_sub(2) {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        if boundary && b[i] == b'-' && b[i + 1] == b'-' && b[i + 2].is_ascii_alphabetic() {
            let n = b[i + 2..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'-').count();
            out.push(s[i..i + 2 + n].trim_end_matches('-').to_string());
        }
    }
    out
}

/// `VOX2VEC_NAME` tokens in `s`, with the byte offset of each.
fn vars_in(s: &str) -> Vec<(usize, String)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    for (i, _) in s.match_indices("VOX2VEC_") {
        if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
            continue;
        }
        let n = b[i..].iter().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || **c == b'_').count();
        let name = &s[i..i + n];
        if name.len() > "VOX2VEC_".len() && !name.ends_with('_') {
            out.push((i, name.to_string()));
        }
    }
    out
}

/// Who a command word is: one of our programs or scripts, an external tool, or neither.
fn owner_of(word: &str) -> Option<Owner> {
    let w = word.trim_matches(['"', '\'']).trim_start_matches("./");
    let base = w.rsplit('/').next().unwrap_or(w);
    if matches!(base, "vox2vec" | "vox2vec-train")
        || ["scripts/", "gpu-bundle/", "benches/", "examples/", "dev/"].iter().any(|p| w.starts_with(p))
    {
        Some(Owner::Ours)
    } else if listed(EXTERNAL_COMMANDS, base) {
        Some(Owner::External)
    } else {
        None
    }
}

/// The flags of a command line with the owner each belongs to; `owner` carries over a `\`
/// continuation (None: the line starts a command).
fn command_flags(line: &str, mut owner: Option<Owner>) -> (Vec<(String, Owner)>, Option<Owner>) {
    let mut out = Vec::new();
    let mut prev = "";
    for w in line.split_whitespace() {
        let after_value_flag = matches!(prev, "--bin" | "--example" | "--test" | "-p" | "--package");
        if w.starts_with('#') {
            owner = Some(Owner::Unknown); // a comment: prose
        } else if matches!(w, "|" | "&&" | "||" | ";") {
            owner = None;
        } else if w == "--" {
            owner = Some(Owner::Unknown);
        } else if !flags_in(w).is_empty() {
            out.extend(flags_in(w).into_iter().map(|f| (f, owner.unwrap_or(Owner::Unknown))));
        } else if let (Some(o), false) = (owner_of(w), after_value_flag) {
            if owner.is_none() || o == Owner::Ours {
                owner = Some(o);
            }
        } else if owner.is_none() && !w.contains('=') && !matches!(w, "$" | "bash" | "env" | "sudo" | "time") {
            owner = Some(Owner::Unknown);
        }
        prev = w;
    }
    (out, if line.trim_end().ends_with('\\') { owner } else { None })
}

/// The code spans of a prose line (between single backticks).
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// Targets of Markdown links and images, `[text](target)`, and of `[label]: target` lines.
fn link_targets(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some((label, target)) = line.trim_start().split_once("]: ")
        && label.starts_with('[')
    {
        out.push(target.split_whitespace().next().unwrap_or(""));
    }
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        out.push(rest[..end].split_whitespace().next().unwrap_or(""));
        rest = &rest[end..];
    }
    out
}

/// The repository path a word names, if it names one: `:line`, `:function` or `#anchor` cut off, and
/// everything from the first placeholder component (`{a,b}`, `$X`, `…`) on.
fn repo_path(word: &str) -> Option<String> {
    let w = word.trim_start_matches(['*', '_']).trim_start_matches("./");
    let w = w.split([':', '#']).next().unwrap().trim_end_matches(['.', ',', ';', '!', '?', '*']);
    let w = w.strip_suffix("_").unwrap_or(w);
    let is_repo = PREFIXES.split_whitespace().any(|p| w.starts_with(p)) || listed(TOP_FILES, w);
    if !is_repo {
        return None;
    }
    let keep: Vec<&str> =
        w.split('/').take_while(|c| !c.contains(['{', '$', '…', '[', '=']) && !c.contains("...")).collect();
    Some(keep.join("/"))
}

/// Whether `pattern` (with `*` wildcards) matches `name`.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.starts_with(head)
                && (0..=name.len() - head.len())
                    .any(|i| name.is_char_boundary(head.len() + i) && glob_match(tail, &name[head.len() + i..]))
        }
    }
}

/// Whether the path (relative to `base`, `*` allowed in any component) matches a file or folder.
fn exists(base: &Path, path: &str) -> bool {
    let mut found = vec![base.to_path_buf()];
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        found = found
            .iter()
            .flat_map(|dir| -> Vec<PathBuf> {
                if !comp.contains('*') {
                    // `examples/cpu_bench` names dev/cpu_bench.rs.
                    let named = [dir.join(comp), dir.join(format!("{comp}.rs"))];
                    return named.into_iter().filter(|p| p.exists()).take(1).collect();
                }
                let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
                entries.filter(|e| glob_match(comp, &e.file_name().to_string_lossy())).map(|e| e.path()).collect()
            })
            .collect();
    }
    !found.is_empty()
}

/// Paths of the root .gitignore (build outputs such as gpu-bundle/bin): documented, not committed.
fn ignored(path: &str) -> bool {
    static LIST: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let list = LIST.get_or_init(|| {
        let text = std::fs::read_to_string(root().join(".gitignore")).unwrap_or_default();
        text.lines().filter_map(|l| l.strip_prefix('/')).map(|p| p.trim_end_matches('/').to_string()).collect()
    });
    list.iter().any(|p| path == p || path.starts_with(&format!("{p}/")))
}

/// `dir/target` with `.` and `..` resolved; None when it leaves the repository.
fn normalise(dir: &Path, target: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in dir.join(target).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => drop(parts.pop()?),
            _ => {}
        }
    }
    Some(parts.join("/"))
}

/// Every problem of one Markdown file (`name` relative to `base`, the repository root).
fn check_markdown(name: &str, text: &str, base: &Path, known: &Known) -> Vec<Problem> {
    let mut problems = Vec::new();
    let dir = Path::new(name).parent().unwrap_or(Path::new(""));
    let (mut in_block, mut carried) = (false, None);
    for (n, line) in text.lines().enumerate() {
        let at = format!("{name}:{}", n + 1);
        let mut report = |token: &str, why: &str| {
            if !problems.iter().any(|p: &Problem| p.at == at && p.token == token) {
                problems.push(Problem { at: at.clone(), token: token.to_string(), why: why.to_string() });
            }
        };
        let fence = line.trim_start().starts_with("```") || line.trim_start().starts_with("~~~");
        if fence {
            in_block = !in_block;
            continue;
        }
        for target in link_targets(line) {
            let t = target.split('#').next().unwrap();
            if t.is_empty() || t.contains("://") || t.starts_with("mailto:") {
                continue;
            }
            match normalise(dir, t) {
                Some(p) if !ignored(&p) && !exists(base, &p) => report(target, "link target does not exist"),
                _ => {}
            }
        }
        for word in line.split(|c: char| c.is_whitespace() || "()[]<>\"'`,;|".contains(c)) {
            if let Some(p) = repo_path(word)
                && !ignored(&p)
                && !exists(base, &p)
            {
                report(&p, "no such file or folder in the repository");
            }
        }
        for (_, v) in vars_in(line) {
            if !known.vars.contains(&v) {
                report(&v, "variable not found in the code");
            }
        }
        let mut flags = Vec::new();
        if in_block {
            (flags, carried) = command_flags(line, carried);
        } else {
            for span in code_spans(line) {
                flags.extend(command_flags(span, None).0);
            }
            let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
            flags.extend(flags_in(&prose).into_iter().map(|f| (f, Owner::Unknown)));
        }
        for (flag, owner) in flags {
            let ours = known.flags.contains(&flag);
            let external = listed(EXTERNAL_FLAGS, &flag);
            match owner {
                Owner::Ours if !ours => report(&flag, "not a flag of our programs or scripts"),
                Owner::External if !external => report(&flag, "not in the external tools' flag list"),
                Owner::Unknown if !ours && !external => report(&flag, "not a flag of ours or of a listed tool"),
                _ => {}
            }
        }
    }
    problems
}

/// `--name` flags defined in a clap help text (option lines only, not the prose).
fn help_flags(help: &str) -> Vec<String> {
    let option_line = |l: &&str| l.trim_start().starts_with('-') && l.len() - l.trim_start().len() <= 6;
    help.lines().filter(option_line).flat_map(|l| flags_in(l.split("  ").find(|s| !s.is_empty()).unwrap())).collect()
}

fn help(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().expect("running --help");
    assert!(out.status.success(), "{bin} {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Text files of the code: no build outputs, no test data, and not this file, whose examples
/// of bogus names are not code.
fn code_files() -> Vec<PathBuf> {
    let dirs = ["src", "build.rs", "tests", "scripts", "gpu-bundle", "fuzz", "examples", "dev", "benches", ".ci"];
    let mut todo: Vec<PathBuf> = dirs.iter().map(|p| root().join(p)).collect();
    let mut files = Vec::new();
    while let Some(p) = todo.pop() {
        let rel = p.strip_prefix(root()).unwrap().to_string_lossy().into_owned();
        if ignored(&rel) || rel == "tests/data" || rel == file!() {
            continue;
        }
        let ext = p.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        if p.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if p.is_file() && ["rs", "sh", "py", "toml", "cu", "cuh", "h", "cpp", ""].contains(&ext.as_str()) {
            files.push(p);
        }
    }
    files
}

fn known() -> Known {
    let (tool, train) = (env!("CARGO_BIN_EXE_vox2vec"), env!("CARGO_BIN_EXE_vox2vec-train"));
    let mut flags: BTreeSet<String> = help_flags(&help(train, &[])).into_iter().collect();
    let top = help(tool, &[]);
    flags.extend(help_flags(&top));
    let commands = top.lines().skip_while(|l| !l.starts_with("Commands:")).skip(1).take_while(|l| !l.trim().is_empty());
    for sub in commands.filter_map(|l| l.split_whitespace().next()).filter(|s| *s != "help") {
        flags.extend(help_flags(&help(tool, &[sub])));
    }
    let mut vars = BTreeSet::new();
    for f in code_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        vars.extend(vars_in(&text).into_iter().map(|(_, v)| v));
        let ext = f.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        for line in text.lines() {
            // Scripts' options: `case` arms (`--device)`, `-h | --help)`); argparse and the
            // examples' hand-parsed options: "--name" literals.
            let t = line.trim_start();
            if ext == "sh" && t.starts_with('-') && t.contains(')') {
                flags.extend(flags_in(t.split(')').next().unwrap()));
            }
            if ext == "py" || (ext == "rs" && f.starts_with(root().join("examples"))) {
                let literals = line.split('"').skip(1).step_by(2);
                flags.extend(literals.filter(|s| flags_in(s).first().is_some_and(|f| f == s)).map(String::from));
            }
        }
    }
    assert!(flags.contains("--steps") && flags.contains("--weights") && flags.contains("--dry-run"), "{flags:?}");
    Known { flags, vars }
}

/// `VOX2VEC_` variables the code reads: `var("…")`, `var_os("…")`, `get("…")`, `env!("…")`,
/// `rerun-if-env-changed=…` and `$…` / `${…` in scripts.
fn variables_read() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in code_files() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let rel = f.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            for (i, v) in vars_in(line) {
                let before = &line[..i];
                let read = [r#"var(""#, r#"var_os(""#, r#"get(""#, r#"env!(""#, "rerun-if-env-changed=", "$", "${"];
                if read.iter().any(|r| before.ends_with(r)) {
                    out.push((format!("{rel}:{}", n + 1), v));
                }
            }
        }
    }
    out
}

#[test]
fn docs_name_only_what_exists() {
    let known = known();
    let mut docs = vec!["README.md".to_string(), "CONTRIBUTING.md".to_string()];
    let mut in_docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| format!("docs/{}", e.file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".md"))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    let mut problems = Vec::new();
    for d in &docs {
        let text = std::fs::read_to_string(root().join(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        problems.extend(check_markdown(d, &text, root(), &known));
    }
    let env_doc = std::fs::read_to_string(root().join("docs/environment.md")).unwrap_or_default();
    let documented: BTreeSet<String> = vars_in(&env_doc).into_iter().map(|(_, v)| v).collect();
    for (at, v) in variables_read() {
        if !documented.contains(&v) && !problems.iter().any(|p| p.token == v && p.why.contains("environment")) {
            problems.push(Problem { at, token: v, why: "read by the code but not in docs/environment.md".into() });
        }
    }
    for p in &problems {
        eprintln!("{}: `{}`: {}", p.at, p.token, p.why);
    }
    assert!(problems.is_empty(), "{} problem(s) in the documentation (listed above)", problems.len());
}

#[test]
fn checker_reports_bogus_names() {
    let known = Known {
        flags: ["--steps", "--small"].iter().map(|s| s.to_string()).collect(),
        vars: ["VOX2VEC_PROFILE"].iter().map(|s| s.to_string()).collect(),
    };
    let md = "See `src/lib.rs:12`, `kernels/*.cu`, src/no_such_file.rs and `kernels/*.nope`.\n\
              Set `VOX2VEC_PROFILE=1`, not VOX2VEC_NO_SUCH_VAR; try `--steps 3` or --no-such-flag.\n\
              [ok](environment.md), [gone](missing.md#part), [web](https://example.com/x.md)\n\
              [ref]: ../nowhere/x.md\n\
              ```bash\n\
              cargo run --release --bin vox2vec-train -- --small   # --steps in a comment\n\
              cargo build --small\n\
              vox2vec-train --release \\\n    --steps 2 --bogus-flag\n\
              ```\n";
    let got: Vec<(String, String)> =
        check_markdown("docs/fake.md", md, root(), &known).into_iter().map(|p| (p.at, p.token)).collect();
    let want = [
        ("docs/fake.md:1", "src/no_such_file.rs"),
        ("docs/fake.md:1", "kernels/*.nope"),
        ("docs/fake.md:2", "VOX2VEC_NO_SUCH_VAR"),
        ("docs/fake.md:2", "--no-such-flag"),
        ("docs/fake.md:3", "missing.md#part"),
        ("docs/fake.md:4", "../nowhere/x.md"),
        ("docs/fake.md:7", "--small"),
        ("docs/fake.md:8", "--release"),
        ("docs/fake.md:9", "--bogus-flag"),
    ];
    let want: Vec<(String, String)> = want.iter().map(|(a, t)| (a.to_string(), t.to_string())).collect();
    assert_eq!(got, want);
}
