//! `prep build` killed with SIGKILL at several points: the output directory never looks finished
//! (no manifest, readers refuse it), and `--overwrite` rebuilds exactly what an uninterrupted
//! run writes, byte for byte.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpmv_shard::ShardDir;

#[path = "common/mod.rs"]
mod common;
use common::{prep, root, s, MODELS};

/// The arguments of every run but `--out`: the example data twice around a file with one bad
/// sample (so `rejected.jsonl` has a line), one thread, small shards and a small packing window
/// (packs stream to the writer and several shards are closed during the run), Parquet twins.
fn build_args(bad: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "build",
        "--data",
        "examples/data/train.json",
        "--data",
        s(bad),
        "--data",
        "examples/data/train.json",
        "--model",
        MODELS[2],
        "--threads",
        "1",
        "--format",
        "both",
        "--shard-size-mb",
        "4",
        "--pack-window",
        "4",
        "--quiet",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push("--out".into());
    args
}

/// Every file of `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn assert_same_set(dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    let got = files(dir);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>(),
        "{what}: file names differ from the uninterrupted run"
    );
    for (name, bytes) in reference {
        assert!(got[name] == *bytes, "{what}: {name} differs");
    }
}

/// Runs `prep build ... --out dir` and SIGKILLs it as soon as `now(names in dir, elapsed)`
/// holds (polled every millisecond). Returns whether the kill ended it (false: it finished
/// first).
fn kill_when(args: &[String], dir: &Path, now: &dyn Fn(&[String], Duration) -> bool) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prep"))
        .current_dir(root())
        .args(args)
        .arg(dir)
        .arg("--overwrite")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prep starts");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if now(&names(dir), start.elapsed()) {
            child.kill().unwrap(); // SIGKILL
            return child.wait().unwrap().signal() == Some(SIGKILL);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "prep neither finished nor reached the kill point"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILL's number (9 on every unix).
const SIGKILL: i32 = 9;

/// After a kill: either the run got no further than writing files (no manifest, and `train`'s
/// reader and `prep stats --shards` refuse the directory as unfinished), or — only possible at
/// the very end — it had already published the complete set. Returns whether it was unfinished.
fn check_after_kill(dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) -> bool {
    if dir.join("manifest.json").exists() {
        assert_same_set(dir, reference, what);
        return false;
    }
    if !dir.exists() {
        return true; // killed before the output directory was created
    }
    let err = ShardDir::open(dir)
        .err()
        .expect("an unfinished set is refused");
    assert!(
        err.to_string().contains("not a finished shard set"),
        "{what}: {err}"
    );
    let stats = prep(&["stats", "--shards", s(dir)]);
    assert_eq!(stats.status.code(), Some(1), "{what}");
    assert!(
        String::from_utf8_lossy(&stats.stderr).contains("not a finished shard set"),
        "{what}: {}",
        String::from_utf8_lossy(&stats.stderr)
    );
    true
}

/// Runs `prep build ... --out dir --overwrite` to the end (exit 3: one sample is rejected).
fn run_to_end(args: &[String], dir: &Path, what: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_prep"))
        .current_dir(root())
        .args(args)
        .arg(dir)
        .arg("--overwrite")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Reruns into a killed run's directory: succeeds, and writes exactly the reference files.
fn rerun(args: &[String], dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    run_to_end(args, dir, &format!("{what}, rerun"));
    assert_same_set(dir, reference, &format!("{what}, rerun"));
}

type Point = (&'static str, bool, Box<dyn Fn(&[String], Duration) -> bool>);

fn has(names: &[String], f: impl Fn(&str) -> bool) -> bool {
    names.iter().any(|n| f(n))
}

#[test]
fn killed_builds_never_look_finished_and_overwrite_rebuilds_them_exactly() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"no-answer\", \"conversations\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\
         {\"id\": \"text\", \"conversations\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let args = build_args(&bad);

    let reference_dir = tmp.path().join("reference");
    run_to_end(&args, &reference_dir, "uninterrupted run");
    let reference = files(&reference_dir);
    let shards = reference
        .keys()
        .filter(|n| n.starts_with("shard-") && n.ends_with(".arrow"))
        .count();
    assert!(shards >= 3, "the run must close several shards: {shards}");
    assert!(!reference["rejected.jsonl"].is_empty());

    // (name, must the kill land before the run finished, when to kill)
    let points: Vec<Point> = vec![
        (
            "as the first shard file appears",
            true,
            Box::new(|n, _| has(n, |x| x.starts_with("shard-") && x.ends_with(".partial"))),
        ),
        (
            "once the first shard is closed",
            true,
            Box::new(|n, _| has(n, |x| x == "shard-00001.arrow.partial")),
        ),
        (
            "while shards are published",
            false,
            Box::new(|n, _| has(n, |x| x.starts_with("shard-") && !x.ends_with(".partial"))),
        ),
        (
            "after rejected.jsonl is published",
            false,
            Box::new(|n, _| has(n, |x| x == "rejected.jsonl")),
        ),
        (
            "after 150 ms",
            false,
            Box::new(|_, t| t >= Duration::from_millis(150)),
        ),
        (
            "after 700 ms",
            true,
            Box::new(|_, t| t >= Duration::from_millis(700)),
        ),
    ];
    let mut report = Vec::new();
    for (k, (what, required, now)) in points.iter().enumerate() {
        let dir = tmp.path().join(format!("out-{k}"));
        let killed = kill_when(&args, &dir, now.as_ref());
        let unfinished = check_after_kill(&dir, &reference, what);
        assert!(
            !required || (killed && unfinished),
            "{what}: the kill did not land during the run (killed {killed}, unfinished {unfinished})"
        );
        report.push(format!("{what}: killed {killed}, unfinished {unfinished}"));
        rerun(&args, &dir, &reference, what);
    }

    // An --overwrite run over a finished set, killed as soon as it has removed the old
    // manifest: the old shards still there must not look like a finished set.
    let dir = tmp.path().join("over");
    std::fs::create_dir(&dir).unwrap();
    for (name, bytes) in &reference {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let what = "overwriting a finished set, after the old manifest is gone";
    let killed = kill_when(&args, &dir, &|n, _| !has(n, |x| x == "manifest.json"));
    let unfinished = check_after_kill(&dir, &reference, what);
    assert!(killed && unfinished, "{what}: killed {killed}");
    rerun(&args, &dir, &reference, what);

    eprintln!("{}", report.join("\n"));
    eprintln!("kill test took {:.1} s", t0.elapsed().as_secs_f64());
}
