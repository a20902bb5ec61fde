//! End-to-end tests of the `prep` binary: real model directories (examples/models), real photos
//! (examples/images), shards read back through the zero-copy reader.

use std::path::Path;

use cpmv_shard::ShardDir;
use serde_json::Value;

#[path = "common/mod.rs"]
mod common;
use common::{copy_model, prep, root, s, MODELS};

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn examples_build_and_read_back_for_every_version() {
    for model in MODELS {
        let out = out_dir();
        let o = prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            model,
            "--out",
            s(out.path()),
            "--quiet",
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{model}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let dir = ShardDir::open(out.path()).unwrap();
        let m = &dir.manifest;
        assert_eq!(m.counts.read, 11);
        assert_eq!(m.counts.written + m.counts.rejected, m.counts.read);
        assert_eq!(dir.len(), 11);
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(root().join(model).join("config.json")).unwrap(),
        )
        .unwrap();
        let q = config["query_num"].as_i64().unwrap() as i32;
        let mut pack_tokens = std::collections::BTreeMap::<u32, i64>::new();
        let mut last_pack = None;
        let mut finished_packs = std::collections::BTreeSet::new();
        for row in dir.samples() {
            assert_eq!(row.input_ids.len(), row.labels.len(), "{}", row.id);
            assert_eq!(row.num_tokens as usize, row.input_ids.len());
            assert!(
                row.labels.iter().any(|&l| l != -100),
                "{}: no supervision",
                row.id
            );
            assert_eq!(*row.labels.last().unwrap(), -100);
            assert_eq!(row.image_bound.len(), row.tgt_sizes.len(), "{}", row.id);
            assert_eq!(row.pixel_values.len(), row.tgt_sizes.len());
            for b in &row.image_bound {
                assert_eq!(b[1] - b[0], q, "{}: bound {b:?}", row.id);
                assert!(row.input_ids[b[0] as usize..b[1] as usize]
                    .iter()
                    .all(|&t| t == row.input_ids[b[0] as usize]));
            }
            for (px, ts) in row.pixel_values.iter().zip(&row.tgt_sizes) {
                assert_eq!(px.len(), (ts[0] * 14 * ts[1] * 14 * 3) as usize);
            }
            // Rows of a pack are consecutive.
            if last_pack != Some(row.pack) {
                assert!(finished_packs.insert(row.pack), "pack {} split", row.pack);
                last_pack = Some(row.pack);
            }
            *pack_tokens.entry(row.pack).or_default() += row.num_tokens as i64;
        }
        assert!(pack_tokens.values().all(|&t| t <= 2048));
        assert_eq!(pack_tokens.len() as u64, m.packing.packs);
        assert!(
            m.packing.fill_ratio > 0.5,
            "{model}: fill {}",
            m.packing.fill_ratio
        );
        let text_only = dir.find_id("text-0").unwrap();
        assert!(text_only.pixel_values.is_empty() && text_only.image_bound.is_empty());
        let multi = dir.find_id("compare-0").unwrap();
        assert_eq!(
            multi.tgt_sizes.len(),
            4,
            "two images, one sliced into 2 + overview"
        );
    }
}

#[test]
fn one_and_two_threads_write_identical_files() {
    let (a, b) = (out_dir(), out_dir());
    for (dir, threads) in [(&a, "1"), (&b, "2")] {
        let o = prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            MODELS[2],
            "--out",
            s(dir.path()),
            "--threads",
            threads,
            "--format",
            "both",
            "--quiet",
            "--pack-window",
            "4",
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut names: Vec<_> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names
        .iter()
        .any(|n| n.to_string_lossy().ends_with(".parquet")));
    for n in names {
        let x = std::fs::read(a.path().join(&n)).unwrap();
        let y = std::fs::read(b.path().join(&n)).unwrap();
        assert!(x == y, "{n:?} differs between 1 and 2 threads");
    }
}

/// One sample per rejection class, next to good samples: nothing panics, each bad sample is
/// named with its reason, and the counts add up.
#[test]
fn every_rejection_class_is_reported_and_counts_add_up() {
    let tmp = out_dir();
    let d = tmp.path();
    let images = root().join("examples/images");
    std::fs::copy(images.join("chelsea.png"), d.join("ok.png")).unwrap();
    let jpeg = std::fs::read(images.join("rocket.jpg")).unwrap();
    std::fs::write(d.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(
        d.join("garbage.jpg"),
        b"\xFF\xD8\xFF\xE0 this is not a jpeg",
    )
    .unwrap();
    std::fs::write(d.join("notes.txt"), b"plain text, not an image").unwrap();
    // A 13-byte GIF announcing a 65535 x 65535 screen: refused before any pixel is allocated.
    std::fs::write(d.join("bomb.gif"), b"GIF89a\xFF\xFF\xFF\xFF\x00\x00\x00").unwrap();
    let conv = |u: &str, a: &str| serde_json::json!([{"role": "user", "content": u}, {"role": "assistant", "content": a}]);
    let long = "word ".repeat(3000);
    let cases: Vec<(Value, Option<&str>)> = vec![
        (
            serde_json::json!({"id": "good-image", "image": "ok.png", "conversations": conv("What?", "A cat.")}),
            None,
        ),
        (
            serde_json::json!({"id": "good-text", "conversations": conv("Hi", "Hello")}),
            None,
        ),
        (Value::String("__INVALID__".into()), Some("invalid_json")),
        (serde_json::json!([1, 2]), Some("not_an_object")),
        (
            serde_json::json!({"id": "no-conv", "image": "ok.png"}),
            Some("invalid_conversations"),
        ),
        (
            serde_json::json!({"id": "roles", "conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}),
            Some("invalid_roles"),
        ),
        (
            serde_json::json!({"id": "empty", "conversations": conv("q", " ")}),
            Some("empty_assistant"),
        ),
        (
            serde_json::json!({"id": "bad-image-field", "image": ["ok.png"], "conversations": conv("q", "a")}),
            Some("invalid_image_field"),
        ),
        (
            serde_json::json!({"id": "late-tag", "image": "ok.png", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "b"}]}),
            Some("misplaced_image_tag"),
        ),
        (
            serde_json::json!({"id": "dup-tag", "image": {"<image_00>": "ok.png"}, "conversations": conv("<image_00> <image_00>", "a")}),
            Some("duplicate_image_tag"),
        ),
        (
            serde_json::json!({"id": "unknown-tag", "image": {"<image_00>": "ok.png"}, "conversations": conv("<image_00> <image_01>", "a")}),
            Some("unknown_image_tag"),
        ),
        (
            serde_json::json!({"id": "unused", "image": {"<image_00>": "ok.png", "<image_01>": "ok.png"}, "conversations": conv("<image_01>", "a")}),
            Some("unused_image"),
        ),
        (
            serde_json::json!({"id": "reserved", "conversations": conv("a <|im_start|> b", "a")}),
            Some("reserved_token"),
        ),
        (
            serde_json::json!({"id": "missing", "image": "nope.png", "conversations": conv("q", "a")}),
            Some("image_not_found"),
        ),
        (
            serde_json::json!({"id": "truncated-jpeg", "image": "truncated.jpg", "conversations": conv("q", "a")}),
            Some("image_decode"),
        ),
        (
            serde_json::json!({"id": "garbage-jpeg", "image": "garbage.jpg", "conversations": conv("q", "a")}),
            Some("image_decode"),
        ),
        (
            serde_json::json!({"id": "not-an-image", "image": "notes.txt", "conversations": conv("q", "a")}),
            Some("image_decode"),
        ),
        (
            serde_json::json!({"id": "too-long", "conversations": conv(&long, "a")}),
            Some("too_long"),
        ),
        (
            serde_json::json!({"id": "bomb", "image": "bomb.gif", "conversations": conv("q", "a")}),
            Some("image_too_large"),
        ),
    ];
    let mut text = String::new();
    for (v, _) in &cases {
        match v {
            Value::String(x) if x == "__INVALID__" => {
                text.push_str("{\"id\": \"broken\", \"conversations\": [\n")
            }
            other => {
                text.push_str(&other.to_string());
                text.push('\n');
            }
        }
    }
    std::fs::write(d.join("data.jsonl"), text).unwrap();
    let out = d.join("out");
    let o = prep(&[
        "build",
        "--data",
        s(&d.join("data.jsonl")),
        "--model",
        MODELS[2],
        "--out",
        s(&out),
        "--quiet",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(3),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("19 samples: 2 written, 17 rejected"),
        "{stdout}"
    );

    let dir = ShardDir::open(&out).unwrap();
    let m = &dir.manifest;
    assert_eq!(
        (m.counts.read, m.counts.written, m.counts.rejected),
        (19, 2, 17)
    );
    assert_eq!(m.counts.rejected_by_reason.values().sum::<u64>(), 17);
    assert_eq!(m.inputs[0].samples, 19);
    let report = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    let lines: Vec<Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 17);
    let bad: Vec<_> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| c.1.is_some())
        .collect();
    for ((index, (_, reason)), line) in bad.iter().zip(&lines) {
        assert_eq!(line["index"].as_u64(), Some(*index as u64));
        assert_eq!(line["reason"].as_str(), *reason, "{line}");
        assert_eq!(
            line["location"].as_str().unwrap(),
            format!("line {}", index + 1)
        );
        assert!(!line["message"].as_str().unwrap().is_empty());
        assert!(line["file"].as_str().unwrap().ends_with("data.jsonl"));
    }
    assert_eq!(
        lines[0]["id"], "data:2",
        "a sample without readable id is named <stem>:<index>"
    );
    assert!(lines.iter().any(|l| l["message"]
        .as_str()
        .unwrap()
        .contains("tokens > max length 2048")));
    let ids: Vec<&str> = dir.samples().map(|r| r.id).collect();
    assert_eq!(ids.len(), 2);
}

#[test]
fn on_error_fail_stops_at_the_first_bad_sample_and_names_it() {
    let tmp = out_dir();
    let data = tmp.path().join("d.json");
    std::fs::write(
        &data,
        r#"[{"id": "fine", "conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"id": "bad-one", "conversations": [{"role": "user", "content": "a"}]}]"#,
    )
    .unwrap();
    let o = prep(&[
        "build",
        "--data",
        s(&data),
        "--model",
        MODELS[0],
        "--out",
        s(&tmp.path().join("o")),
        "--on-error",
        "fail",
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("d.json sample 1")
            && err.contains("bad-one")
            && err.contains("invalid_conversations"),
        "{err}"
    );
    assert!(
        !tmp.path().join("o/manifest.json").exists(),
        "a stopped run must not look finished"
    );
}

#[test]
fn broken_json_list_is_a_file_error_with_its_offset() {
    let tmp = out_dir();
    let data = tmp.path().join("d.json");
    std::fs::write(&data, r#"[{"id": "x", "conversations": [}"#).unwrap();
    let o = prep(&[
        "build",
        "--data",
        s(&data),
        "--model",
        MODELS[0],
        "--out",
        s(&tmp.path().join("o")),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("d.json") && err.contains("byte"), "{err}");
    assert!(!tmp.path().join("o/manifest.json").exists());
}

#[test]
fn existing_output_is_kept_unless_overwrite_and_presets_apply() {
    let tmp = out_dir();
    let out = tmp.path().join("o");
    let args = [
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        MODELS[1],
        "--out",
        s(&out),
        "--quiet",
    ];
    assert_eq!(prep(&args).status.code(), Some(0));
    let again = prep(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    // A preset with a smaller slice budget, overridden back by a flag for max_length.
    let preset = tmp.path().join("p.toml");
    std::fs::write(
        &preset,
        "[prep]\nmax_slice_nums = 1\nmax_length = 1024\npack = false\n\n[train]\nlr = 1e-5\n",
    )
    .unwrap();
    let mut with = args.to_vec();
    with.extend([
        "--overwrite",
        "--config",
        s(&preset),
        "--max-length",
        "4096",
    ]);
    let o = prep(&with);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = ShardDir::open(&out).unwrap();
    assert_eq!(dir.manifest.settings["sample"]["max_slice_nums"], 1);
    assert_eq!(dir.manifest.settings["sample"]["max_length"], 4096);
    assert_eq!(
        dir.manifest.packing.packs, 11,
        "pack = false: one sample per pack"
    );
    assert!(dir
        .samples()
        .all(|r| r.tgt_sizes.len() == r.image_bound.len() && r.tgt_sizes.len() <= 2));
}

#[test]
fn unknown_llm_type_is_an_error_not_a_fallback() {
    let tmp = out_dir();
    let model = copy_model(
        tmp.path(),
        MODELS[2],
        &["tokenizer.json", "tokenizer_config.json"],
    );
    std::fs::write(
        model.join("config.json"),
        r#"{"model_type": "minicpmv", "version": 4.0}"#,
    )
    .unwrap();
    let o = prep(&[
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        s(&model),
        "--out",
        s(&tmp.path().join("o")),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("version 4") && err.contains("--llm-type"),
        "{err}"
    );
    let o = prep(&[
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        s(&model),
        "--out",
        s(&tmp.path().join("o")),
        "--quiet",
        "--llm-type",
        "qwen",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn truncate_cuts_text_after_the_last_image_only() {
    let tmp = out_dir();
    let data = tmp.path().join("d.jsonl");
    let long = "lorem ipsum ".repeat(400);
    let img = root().join("examples/images/chelsea.png");
    let line = |id: &str, user: &str| {
        serde_json::json!({"id": id, "image": s(&img), "conversations": [
            {"role": "user", "content": user}, {"role": "assistant", "content": format!("answer {long}")}]})
        .to_string()
    };
    std::fs::write(
        &data,
        format!(
            "{}\n{}\n",
            line("after-image", "<image> short"),
            line("image-late", &format!("{long} <image>"))
        ),
    )
    .unwrap();
    let out = tmp.path().join("o");
    let o = prep(&[
        "build",
        "--data",
        s(&data),
        "--model",
        MODELS[2],
        "--out",
        s(&out),
        "--truncate",
        "--max-length",
        "512",
        "--quiet",
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = ShardDir::open(&out).unwrap();
    let row = dir.find_id("after-image").unwrap();
    assert_eq!(row.input_ids.len(), 512);
    assert!(dir.manifest.tokens.truncated > 0, "cut tokens are reported");
    assert_eq!(row.image_bound.len(), 1);
    let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
    assert!(
        rejected.contains("image-late") && rejected.contains("too_long"),
        "{rejected}"
    );
}

#[test]
fn a_checkpoint_that_cannot_encode_samples_is_refused_at_start() {
    let tmp = out_dir();
    let model = copy_model(tmp.path(), MODELS[2], &["config.json", "tokenizer.json"]);
    let mut cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(MODELS[2]).join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg["chat_template"] = Value::String("{{ raise_exception('roles must alternate') }}".into());
    std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let o = prep(&[
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        s(&model),
        "--out",
        s(&tmp.path().join("o")),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot encode a sample") && err.contains("roles must alternate"),
        "{err}"
    );
}

#[test]
fn truncation_settings_in_tokenizer_json_are_ignored() {
    // A tokenizer.json may carry `truncation`; the reference's encode calls do not truncate, so
    // lengths must not change.
    let tmp = out_dir();
    let model = copy_model(
        tmp.path(),
        MODELS[2],
        &[
            "config.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
        ],
    );
    let mut tok: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(MODELS[2]).join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    tok["truncation"] = serde_json::json!({"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for (m, out) in [(s(&model), &a), (MODELS[2], &b)] {
        let o = prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            m,
            "--out",
            s(out),
            "--quiet",
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let lens = |d: &Path| -> Vec<i32> {
        ShardDir::open(d)
            .unwrap()
            .samples()
            .map(|r| r.num_tokens)
            .collect()
    };
    assert_eq!(lens(&a), lens(&b));
}
