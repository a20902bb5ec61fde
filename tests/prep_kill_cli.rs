//! `prep build` killed with SIGKILL at several points: the output directory never looks finished
//! unless it is a complete set (no manifest, and readers refuse it; or, when `--overwrite`
//! replaces a set, the previous set whole), and `--overwrite` rebuilds exactly what an
//! uninterrupted run writes, byte for byte.
//!
//! Kill points are progress the run shows in the directory (a shard file appearing, a name
//! being published, the old manifest disappearing), never a wall-clock delay, and a kill that
//! does not land (the run finished first) fails the test. Kills during the build are certain
//! to land: those runs read one more data file, a FIFO the test holds open without writing,
//! so they block before finishing however fast the machine is. Kills during publishing race
//! with a run that has little left to do: the test polls without sleeping, retries a run the
//! kill missed (checking that it then finished with the exact set) and fails when none of
//! [`ATTEMPTS`] runs was caught.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpmv_shard::ShardDir;

#[path = "common/mod.rs"]
mod common;
use common::{dir_files, prep, root, s, MODELS};

/// Runs of a racing kill point before the test gives up. The kill misses now and then where
/// fsync costs nothing (tmpfs: about one run in four for the narrowest point, on two busy
/// cores); on a disk it lands at the first run.
const ATTEMPTS: usize = 8;

/// SIGKILL's number (9 on every unix).
const SIGKILL: i32 = 9;

/// The arguments of every run but `--out`: the example data twice around a file with one bad
/// sample (so `rejected.jsonl` has a line), one thread, small shards (`shard_mb`) and a small
/// packing window (packs stream to the writer and several shards are closed during the run),
/// Parquet twins, then `extra`.
fn build_args(bad: &Path, shard_mb: &str, extra: &[&str]) -> Vec<String> {
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
        shard_mb,
        "--pack-window",
        "4",
        "--quiet",
    ]
    .iter()
    .chain(extra)
    .map(|a| a.to_string())
    .collect();
    args.push("--out".into());
    args
}

fn assert_same(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: file names differ"
    );
    for (name, bytes) in want {
        assert!(got[name] == *bytes, "{what}: {name} differs");
    }
}

fn assert_same_set(dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_same(&dir_files(dir), reference, what);
}

/// A copy of the set `set` in a new directory `dir`.
fn copy_set(set: &BTreeMap<String, Vec<u8>>, dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    for (name, bytes) in set {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// How a run that was to be killed ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Killed,
    /// It exited on its own before the kill point was seen, or before the kill reached it.
    Exited(Option<i32>),
}

/// How [`kill_when`] waits for its kill point.
#[derive(Clone, Copy)]
enum Poll {
    /// A listing every millisecond: the run cannot finish (it reads from a held FIFO).
    Gently,
    /// As fast as possible (stat calls only): the run is about to finish.
    Busy,
}

/// Runs `prep args... dir --overwrite` and SIGKILLs it as soon as `at(dir)` holds.
fn kill_when(args: &[String], dir: &Path, poll: Poll, at: &dyn Fn(&Path) -> bool) -> Ended {
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
        if let Some(status) = child.try_wait().unwrap() {
            return Ended::Exited(status.code());
        }
        if at(dir) {
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            return match status.signal() {
                Some(SIGKILL) => Ended::Killed,
                _ => Ended::Exited(status.code()),
            };
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "prep neither finished nor reached the kill point"
        );
        if let Poll::Gently = poll {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What a killed run left in its directory.
#[derive(Debug, PartialEq, Eq)]
enum Left {
    /// No manifest: `train`'s reader and `prep stats --shards` refuse the directory as
    /// unfinished (or the directory was never created).
    Unfinished,
    /// A manifest, and beside it exactly the files of `complete` (and, at most, `.partial`
    /// files): a whole set that readers open.
    Complete,
}

/// Checks a directory after a kill: either unfinished (no manifest, refused by the readers)
/// or, when it has a manifest, exactly the complete set `complete` (byte for byte; `.partial`
/// files of the killed run may lie beside it), which the reader opens.
fn check_after_kill(dir: &Path, complete: &BTreeMap<String, Vec<u8>>, what: &str) -> Left {
    if dir.join("manifest.json").exists() {
        let mut published = dir_files(dir);
        published.retain(|name, _| !name.ends_with(".partial"));
        assert_same(
            &published,
            complete,
            &format!("{what}: a manifest over a mix"),
        );
        let set = ShardDir::open(dir).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!set.is_empty(), "{what}");
        return Left::Complete;
    }
    if !dir.exists() {
        return Left::Unfinished; // killed before the output directory was created
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
    Left::Unfinished
}

/// Runs `prep build ... --out dir --overwrite` to the end with exit status `code`.
fn run_to_end(args: &[String], dir: &Path, code: i32, what: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_prep"))
        .current_dir(root())
        .args(args)
        .arg(dir)
        .arg("--overwrite")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Reruns into a killed run's directory: succeeds (exit 3: one sample is rejected), and
/// leaves exactly the reference files.
fn rerun(args: &[String], dir: &Path, reference: &BTreeMap<String, Vec<u8>>, what: &str) {
    run_to_end(args, dir, 3, &format!("{what}, rerun"));
    assert_same_set(dir, reference, &format!("{what}, rerun"));
}

/// A FIFO at `path` (never written: a run reading it blocks until it is killed).
fn make_fifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Holds `fifo` open for writing (and reading, so opening does not block) while it lives: a
/// run reading it never reaches the end of the file.
fn hold(fifo: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo)
        .unwrap()
}

fn exists(dir: &Path, name: &str) -> bool {
    dir.join(name).exists()
}

/// True once `dir` holds a name `f` accepts.
fn any_name(dir: &Path, f: impl Fn(&str) -> bool) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.filter_map(|e| e.ok())
            .any(|e| f(&e.file_name().to_string_lossy()))
    })
}

type At = Box<dyn Fn(&Path) -> bool>;

/// A kill point that races with the end of the run: up to [`ATTEMPTS`] runs, each in a fresh
/// directory made by `setup`, until one is killed at `at` and leaves `left`; a run the kill
/// missed must have finished with exactly `reference`. Returns the directory of the run that
/// was caught and how many runs it took.
fn catch_racing(
    args: &[String],
    base: &Path,
    setup: &dyn Fn(&Path),
    at: &dyn Fn(&Path) -> bool,
    left: Left,
    reference: &BTreeMap<String, Vec<u8>>,
    what: &str,
) -> (PathBuf, usize) {
    for attempt in 1..=ATTEMPTS {
        let dir = base.join(format!("try-{attempt}"));
        setup(&dir);
        let ended = kill_when(args, &dir, Poll::Busy, at);
        let now = check_after_kill(&dir, reference, what);
        if ended == Ended::Killed && now == left {
            return (dir, attempt);
        }
        // Missed: the run got past the point (or finished) before the kill reached it; what
        // it left must then be the finished set.
        assert_eq!(
            now,
            Left::Complete,
            "{what}: attempt {attempt} ended {ended:?} and left an unfinished directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    panic!("{what}: no kill landed in {ATTEMPTS} runs (each finished first)");
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
    let args = build_args(&bad, "4", &[]);
    // The same run reading a fourth data file, a FIFO held open: it writes every shard of
    // the first three files, then waits forever.
    let fifo = tmp.path().join("held.jsonl");
    make_fifo(&fifo);
    let held_args = build_args(&bad, "4", &["--data", s(&fifo)]);

    let reference_dir = tmp.path().join("reference");
    run_to_end(&args, &reference_dir, 3, "uninterrupted run");
    let reference = dir_files(&reference_dir);
    let shards = reference
        .keys()
        .filter(|n| n.starts_with("shard-") && n.ends_with(".arrow"))
        .count();
    assert!(shards >= 5, "the run must close several shards: {shards}");
    assert!(!reference["rejected.jsonl"].is_empty());
    let mut report = Vec::new();

    // Kills while samples are processed and shards written: certain to land.
    let building: Vec<(&str, At)> = vec![
        (
            "as the first shard file appears",
            Box::new(|d| any_name(d, |x| x.starts_with("shard-") && x.ends_with(".partial"))),
        ),
        (
            "once the first shard is closed",
            Box::new(|d| exists(d, "shard-00001.arrow.partial")),
        ),
        (
            "once the third shard is closed",
            Box::new(|d| exists(d, "shard-00003.parquet.partial")),
        ),
        (
            "once the fourth shard is closed",
            Box::new(|d| exists(d, "shard-00004.arrow.partial")),
        ),
    ];
    for (k, (what, at)) in building.iter().enumerate() {
        let dir = tmp.path().join(format!("build-{k}"));
        let held = hold(&fifo);
        let ended = kill_when(&held_args, &dir, Poll::Gently, at.as_ref());
        drop(held);
        assert_eq!(ended, Ended::Killed, "{what}: the kill did not land");
        let left = check_after_kill(&dir, &reference, what);
        assert_eq!(left, Left::Unfinished, "{what}");
        report.push(format!("{what}: killed, unfinished"));
        rerun(&args, &dir, &reference, what);
    }

    // Kills while the finished set is published: racing with the end of the run.
    let publishing: Vec<(&str, At)> = vec![
        (
            "while shards are published",
            Box::new(|d| exists(d, "shard-00000.arrow")),
        ),
        (
            "after rejected.jsonl is published",
            Box::new(|d| exists(d, "rejected.jsonl")),
        ),
    ];
    for (k, (what, at)) in publishing.iter().enumerate() {
        let base = tmp.path().join(format!("publish-{k}"));
        std::fs::create_dir(&base).unwrap();
        let (dir, runs) = catch_racing(
            &args,
            &base,
            &|_| {},
            at.as_ref(),
            Left::Unfinished,
            &reference,
            what,
        );
        report.push(format!("{what}: killed, unfinished (run {runs})"));
        rerun(&args, &dir, &reference, what);
    }

    // --overwrite over a finished set that differs from the new one (one sample per pack and
    // per shard: more shards, other bytes), so that a mix of the two would show.
    let old_dir = tmp.path().join("old");
    let old_args = build_args(&bad, "0", &["--no-pack"]);
    run_to_end(&old_args, &old_dir, 3, "the previous set");
    let old = dir_files(&old_dir);
    let old_shards = old
        .keys()
        .filter(|n| n.starts_with("shard-") && n.ends_with(".arrow"))
        .count();
    assert!(old_shards > shards, "{old_shards} old shards, {shards} new");

    // Killed while the new set is written: the previous set is still there, whole, beside
    // the new run's partial files.
    for (k, shard) in ["shard-00001.arrow.partial", "shard-00004.arrow.partial"]
        .into_iter()
        .enumerate()
    {
        let what = format!("overwriting a set, once {shard} appears");
        let dir = tmp.path().join(format!("over-{k}"));
        copy_set(&old, &dir);
        let held = hold(&fifo);
        let ended = kill_when(&held_args, &dir, Poll::Gently, &|d| exists(d, shard));
        drop(held);
        assert_eq!(ended, Ended::Killed, "{what}: the kill did not land");
        assert_eq!(
            check_after_kill(&dir, &old, &what),
            Left::Complete,
            "{what}"
        );
        assert!(
            dir_files(&dir).keys().any(|n| n.ends_with(".partial")),
            "{what}: the new run had written files"
        );
        report.push(format!("{what}: killed, previous set whole"));
        rerun(&args, &dir, &reference, &what);
    }

    // Killed as soon as the old manifest is gone (just before the new set is published): what
    // is left of the old set must not look like a finished set.
    let what = "overwriting a set, after the old manifest is gone";
    let base = tmp.path().join("over-publish");
    std::fs::create_dir(&base).unwrap();
    let (dir, runs) = catch_racing(
        &args,
        &base,
        &|d| copy_set(&old, d),
        &|d| !exists(d, "manifest.json"),
        Left::Unfinished,
        &reference,
        what,
    );
    report.push(format!("{what}: killed, unfinished (run {runs})"));
    rerun(&args, &dir, &reference, what);

    eprintln!("{}", report.join("\n"));
    eprintln!("kill test took {:.1} s", t0.elapsed().as_secs_f64());
}
