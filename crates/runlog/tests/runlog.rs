//! End-to-end: a 50-step run with 3 evals, read back through an independent TFRecord/protobuf
//! decoder (its own bitwise CRC32C, checked against the standard test vector), a resume, and the
//! loss-curve PNG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cpmv_runlog::{loss_curve_png, LogError, RunLog, StepRecord};

// ---------- an independent decoder ----------

/// Bitwise (not table-driven) CRC32C, so the test does not trust the crate's table.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c_bitwise(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8) // (c >> 15) | (c << 17)
}

fn read_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

/// Splits an event file into record payloads, checking every length and both CRCs.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        assert!(pos + 12 <= bytes.len(), "truncated header at {pos}");
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(
            read_u32(&bytes[pos + 8..pos + 12]),
            masked(len_bytes),
            "length crc at {pos}"
        );
        let data_at = pos + 12;
        assert!(data_at + len + 4 <= bytes.len(), "truncated data at {pos}");
        let data = &bytes[data_at..data_at + len];
        assert_eq!(
            read_u32(&bytes[data_at + len..data_at + len + 4]),
            masked(data),
            "data crc at {pos}"
        );
        out.push(data.to_vec());
        pos = data_at + len + 4;
    }
    assert_eq!(pos, bytes.len());
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*pos];
        *pos += 1;
        v |= ((byte & 0x7F) as u64) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

/// Decodes one protobuf message into (field number, value) pairs, in order.
fn fields(b: &[u8]) -> Vec<(u32, Field)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos);
        let (num, wt) = ((key >> 3) as u32, key & 7);
        let f = match wt {
            0 => Field::Varint(varint(b, &mut pos)),
            1 => {
                let f = Field::Fixed64(b[pos..pos + 8].try_into().unwrap());
                pos += 8;
                f
            }
            2 => {
                let n = varint(b, &mut pos) as usize;
                let f = Field::Bytes(b[pos..pos + n].to_vec());
                pos += n;
                f
            }
            5 => {
                let f = Field::Fixed32(b[pos..pos + 4].try_into().unwrap());
                pos += 4;
                f
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((num, f));
    }
    assert_eq!(pos, b.len());
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
    session_start: bool,
}

fn decode_event(b: &[u8]) -> Event {
    let mut ev = Event::default();
    for (num, f) in fields(b) {
        match (num, f) {
            (1, Field::Fixed64(x)) => ev.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(x)) => ev.step = x as i64,
            (3, Field::Bytes(s)) => ev.file_version = Some(String::from_utf8(s).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (n, v) in fields(&summary) {
                    let (1, Field::Bytes(value)) = (n, v) else {
                        panic!("Summary field {n}")
                    };
                    let mut tag = None;
                    let mut simple = None;
                    for (vn, vf) in fields(&value) {
                        match (vn, vf) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t).unwrap()),
                            (2, Field::Fixed32(x)) => simple = Some(f32::from_le_bytes(x)),
                            other => panic!("Value field {other:?}"),
                        }
                    }
                    ev.scalars.push((tag.unwrap(), simple.unwrap()));
                }
            }
            (7, Field::Bytes(log)) => {
                assert_eq!(fields(&log), vec![(1, Field::Varint(1))]);
                ev.session_start = true;
            }
            other => panic!("Event field {other:?}"),
        }
    }
    ev
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn decode_file(path: &Path) -> Vec<Event> {
    records(&std::fs::read(path).unwrap())
        .iter()
        .map(|r| decode_event(r))
        .collect()
}

// ---------- the run ----------

fn record(step: u64) -> StepRecord {
    let s = step as f64;
    StepRecord {
        step,
        epoch: s / 50.0,
        loss: 3.0 * (-s / 20.0).exp() + 0.5 + 0.1 * (s * 1.7).sin(),
        lr: 1e-4 * (1.0 - s / 100.0),
        grad_norm: 1.0 + 0.01 * s,
        tokens: step * 4096,
        samples: step * 8,
        tokens_per_s: 12_000.0 + s,
        samples_per_s: 23.5,
        elapsed_s: 0.34 * s,
        peak_mem_bytes: (3u64 << 30) + step * (1 << 20),
        eval_loss: None,
        skipped_nonfinite: (step == 7).then_some(2),
    }
}

fn eval_loss(step: u64) -> f64 {
    2.5 * (-(step as f64) / 25.0).exp() + 0.7
}

/// Steps `from..=to` with an eval every 10 steps at 10, 30, 50 (those in range).
fn write_steps(log: &mut RunLog, from: u64, to: u64) {
    for step in from..=to {
        log.train_step(&record(step)).unwrap();
        if [10, 30, 50].contains(&step) {
            log.eval(step, eval_loss(step), 1000 * step).unwrap();
        }
    }
}

const TRAIN_TAGS: [&str; 5] = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/peak_mem_gib",
];

fn expected_value(tag: &str, step: u64) -> f32 {
    let r = record(step);
    match tag {
        "train/loss" => r.loss as f32,
        "train/lr" => r.lr as f32,
        "train/grad_norm" => r.grad_norm as f32,
        "train/tokens_per_s" => r.tokens_per_s as f32,
        "train/peak_mem_gib" => (r.peak_mem_bytes as f64 / 1073741824.0) as f32,
        "train/skipped_nonfinite" => 2.0,
        "eval/loss" => eval_loss(step) as f32,
        t => panic!("unexpected tag {t}"),
    }
}

#[test]
fn decoder_crc_matches_test_vector() {
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    assert_eq!(cpmv_runlog::tfevents::crc32c(b"123456789"), 0xE306_9283);
    let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    assert_eq!(cpmv_runlog::tfevents::crc32c(&data), crc32c_bitwise(&data));
}

#[test]
fn fifty_steps_three_evals_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let mut log = RunLog::create(&dir, None).unwrap();
    write_steps(&mut log, 1, 50);
    log.flush().unwrap();
    let event_file = log.event_file().to_path_buf();
    drop(log);

    // The event file name.
    let files = event_files(&dir);
    assert_eq!(files, vec![event_file.clone()]);
    let name = event_file.file_name().unwrap().to_str().unwrap();
    let parts: Vec<&str> = name.split('.').collect();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    assert!(name.ends_with(".cpmv"), "{name}");
    assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000, "{name}");

    // The records.
    let events = decode_file(&event_file);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].scalars.is_empty());
    assert!(events[0].wall_time > 1.6e9);
    let mut by_tag: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for ev in &events[1..] {
        assert!(ev.file_version.is_none() && !ev.session_start);
        assert!(ev.wall_time >= events[0].wall_time);
        assert!(!ev.scalars.is_empty());
        for (tag, v) in &ev.scalars {
            by_tag.entry(tag.clone()).or_default().push((ev.step, *v));
        }
    }
    assert_eq!(events.len(), 1 + 50 + 3);
    for tag in TRAIN_TAGS {
        let got = &by_tag[tag];
        assert_eq!(got.len(), 50, "{tag}");
        for (i, &(step, v)) in got.iter().enumerate() {
            assert_eq!(step, i as i64 + 1, "{tag}");
            assert_eq!(v, expected_value(tag, step as u64), "{tag} step {step}");
        }
    }
    assert_eq!(
        by_tag["eval/loss"],
        [10, 30, 50]
            .iter()
            .map(|&s| (s as i64, eval_loss(s) as f32))
            .collect::<Vec<_>>()
    );
    assert_eq!(by_tag["train/skipped_nonfinite"], vec![(7, 2.0)]);
    assert_eq!(by_tag.len(), 7);

    // log.jsonl.
    let lines = RunLog::read(&dir).unwrap();
    assert_eq!(lines.len(), 53);
    let train: Vec<StepRecord> = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| serde_json::from_value(l.clone()).unwrap())
        .collect();
    assert_eq!(train, (1..=50).map(record).collect::<Vec<_>>());
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(evals.len(), 3);
    assert_eq!(evals[1]["step"], 30);
    assert_eq!(evals[1]["eval_loss"].as_f64().unwrap(), eval_loss(30));
    assert_eq!(evals[1]["n_tokens"], 30_000);
    // Optional fields are absent, not null.
    assert!(lines[0].get("eval_loss").is_none());
    assert!(lines[0].get("skipped_nonfinite").is_none());
    assert_eq!(lines[6]["skipped_nonfinite"], 2);
}

#[test]
fn resume_drops_later_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = RunLog::create(dir, None).unwrap();
    write_steps(&mut log, 1, 50);
    drop(log);
    // A crash mid-write leaves a torn line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("log.jsonl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"kind\":\"train\",\"st"))
        .unwrap();
    assert_eq!(RunLog::read(dir).unwrap().len(), 53);

    let mut log = RunLog::create(dir, Some(30)).unwrap();
    write_steps(&mut log, 31, 40);
    drop(log);

    let lines = RunLog::read(dir).unwrap();
    let train_steps: Vec<u64> = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, (1..=40).collect::<Vec<_>>());
    let eval_steps: Vec<u64> = lines
        .iter()
        .filter(|l| l["kind"] == "eval")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, vec![10, 30]);

    // A second event file, sorting after the first, opened with START at step 31.
    let files = event_files(dir);
    assert_eq!(files.len(), 2);
    let second = decode_file(&files[1]);
    assert_eq!(second[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(second[1].session_start);
    assert_eq!(second[1].step, 31);
    let steps: Vec<i64> = second[2..].iter().map(|e| e.step).collect();
    assert_eq!(steps, (31..=40).collect::<Vec<_>>());

    // Resuming where nothing is to drop leaves the file as it is; a fresh create truncates.
    let before = std::fs::read(dir.join("log.jsonl")).unwrap();
    drop(RunLog::create(dir, Some(40)).unwrap());
    assert_eq!(std::fs::read(dir.join("log.jsonl")).unwrap(), before);
    drop(RunLog::create(dir, None).unwrap());
    assert!(RunLog::read(dir).unwrap().is_empty());
}

#[test]
fn loss_curve_png_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = RunLog::create(dir, None).unwrap();
    write_steps(&mut log, 1, 50);
    let mut nan = record(51);
    nan.loss = f64::NAN;
    log.train_step(&nan).unwrap();
    drop(log);
    assert!(RunLog::read(dir).unwrap()[53]["loss"].is_null());

    let png = dir.join("loss.png");
    loss_curve_png(dir, &png, "test run: loss").unwrap();
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 560));
    let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(non_white > 5_000, "{non_white} non-white pixels");
    // The three series' colours are all present.
    for colour in [[160u8, 195, 230], [31, 90, 160], [225, 105, 30]] {
        let n = img.pixels().filter(|p| p.0 == colour).count();
        assert!(n > 50, "{colour:?}: {n} pixels");
    }
    if let Ok(keep) = std::env::var("RUNLOG_KEEP_PNG") {
        std::fs::copy(&png, keep).unwrap();
    }
}

#[test]
fn errors_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = RunLog::read(&missing).unwrap_err();
    assert!(matches!(err, LogError::Io { .. }));
    assert!(err.to_string().contains("nope/log.jsonl"), "{err}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = RunLog::create(&file.join("run"), None).err().unwrap();
    assert!(err.to_string().contains("a-file/run"), "{err}");

    std::fs::write(
        tmp.path().join("log.jsonl"),
        b"{\"step\":1}\nnot json\n{}\n",
    )
    .unwrap();
    let err = RunLog::read(tmp.path()).unwrap_err();
    assert!(matches!(err, LogError::Json { line: 2, .. }), "{err}");
    assert!(err.to_string().contains("log.jsonl line 2"), "{err}");

    std::fs::write(tmp.path().join("log.jsonl"), b"").unwrap();
    let err = loss_curve_png(tmp.path(), &tmp.path().join("x.png"), "t").unwrap_err();
    assert!(matches!(err, LogError::NoData { .. }), "{err}");
}
