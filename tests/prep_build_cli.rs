//! End-to-end tests of the `prep` binary: real model directories (examples/models), real photos
//! (examples/images), shards read back through the zero-copy reader.

use std::path::Path;

use cpmv_shard::{Row, ShardDir};
use serde_json::Value;

#[path = "common/mod.rs"]
mod common;
use common::{copy_model, dir_files, model_with_json, prep, root, rows, s, MODELS};

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The sorted names in `dir`.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `prep build` of the example data with the 2.6 model into `out`, plus `extra` flags.
fn build_example(out: &Path, extra: &[&str]) -> std::process::Output {
    build_example_with(MODELS[2], out, extra)
}

/// `prep build` of the example data with `model` into `out`, plus `extra` flags.
fn build_example_with(model: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        model,
        "--out",
        s(out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    prep(&args)
}

/// The same files with the same bytes in `a` and `b`, `skip` aside (one and two threads).
fn assert_same_files(a: &Path, b: &Path, skip: &[&str], what: &str) {
    let names: Vec<String> = listing(a)
        .into_iter()
        .filter(|n| !skip.contains(&n.as_str()))
        .collect();
    let other: Vec<String> = listing(b)
        .into_iter()
        .filter(|n| !skip.contains(&n.as_str()))
        .collect();
    assert_eq!(names, other, "{what}: different files");
    for name in names {
        let same = std::fs::read(a.join(&name)).unwrap() == std::fs::read(b.join(&name)).unwrap();
        assert!(same, "{what}: {name} differs between 1 and 2 threads");
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn examples_build_and_read_back_for_every_version() {
    for model in MODELS {
        let out = out_dir();
        let o = build_example_with(model, out.path(), &[]);
        assert_eq!(o.status.code(), Some(0), "{model}: {}", stderr(&o));
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
        for row in rows(&dir).iter().map(Row::view) {
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
        let text_only = dir.find_id("text-0").unwrap().unwrap();
        let text_only = text_only.view();
        assert!(text_only.pixel_values.is_empty() && text_only.image_bound.is_empty());
        let multi = dir.find_id("compare-0").unwrap().unwrap();
        let multi = multi.view();
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
    assert!(listing(a.path()).iter().any(|n| n.ends_with(".parquet")));
    assert_same_files(a.path(), b.path(), &[], "example set");
}

/// Pixels are made after packing: an image whose header reads but whose data does not decode
/// rejects its sample then, and its pack goes out without it (an emptied pack is dropped, the
/// pack numbers stay consecutive); counts add up, per input file too.
#[test]
fn an_image_that_fails_to_decode_after_packing_leaves_its_pack_and_the_counts_add_up() {
    let tmp = out_dir();
    let d = tmp.path();
    let images = root().join("examples/images");
    std::fs::copy(images.join("chelsea.png"), d.join("ok.png")).unwrap();
    let jpeg = std::fs::read(images.join("rocket.jpg")).unwrap();
    std::fs::write(d.join("truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let conv = serde_json::json!([{"role": "user", "content": "What?"}, {"role": "assistant", "content": "This."}]);
    let sample = |id: &str, image: Option<&str>| {
        let mut v = serde_json::json!({"id": id, "conversations": conv});
        if let Some(image) = image {
            v["image"] = image.into();
        }
        v.to_string()
    };
    let lines = [
        sample("a", Some("ok.png")),
        sample("bad-1", Some("truncated.jpg")),
        sample("b", None),
        sample("bad-2", Some("truncated.jpg")),
        sample("c", Some("ok.png")),
    ];
    let data = d.join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    for (name, extra) in [("packed", None), ("unpacked", Some("--no-pack"))] {
        let out = d.join(name);
        let mut args = vec![
            "build",
            "--data",
            s(&data),
            "--model",
            MODELS[2],
            "--out",
            s(&out),
            "--quiet",
        ];
        args.extend(extra);
        let o = prep(&args);
        assert_eq!(o.status.code(), Some(3), "{name}: {o:?}");
        let dir = ShardDir::open(&out).unwrap();
        let m = &dir.manifest;
        assert_eq!(
            (m.counts.read, m.counts.written, m.counts.rejected),
            (5, 3, 2)
        );
        assert_eq!(m.counts.rejected_by_reason.get("image_decode"), Some(&2));
        let input = &m.inputs[0];
        assert_eq!((input.samples, input.written, input.rejected), (5, 3, 2));
        let all = rows(&dir);
        let ids: Vec<&str> = all.iter().map(|r| r.view().id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"], "{name}");
        let mut packs: Vec<u32> = all.iter().map(|r| r.view().pack).collect();
        packs.dedup();
        let want: Vec<u32> = (0..m.packing.packs as u32).collect();
        assert_eq!(packs, want, "{name}: packs numbered without gaps");
        if extra.is_some() {
            assert_eq!(
                m.packing.packs, 3,
                "the rejected samples' packs are dropped"
            );
        }
        let report = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
        let named: Vec<(String, String)> = report
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().into(),
                    v["reason"].as_str().unwrap().into(),
                )
            })
            .collect();
        let bad = |id: &str| (id.to_string(), "image_decode".to_string());
        assert_eq!(named, [bad("bad-1"), bad("bad-2")], "{name}");
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
    let mut lines: Vec<Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 17);
    // Lines come as rejections are found: an image that fails to decode when its pack's
    // pixels are made (after packing), so after later samples' text rejections.
    lines.sort_by_key(|l| l["index"].as_u64());
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
    let all = rows(&dir);
    let ids: Vec<&str> = all.iter().map(|r| r.view().id).collect();
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
    assert_eq!(
        listing(&tmp.path().join("o")),
        Vec::<String>::new(),
        "a stopped run removes every file it wrote, partial ones included"
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
    assert_eq!(dir.manifest.settings.sample.max_slice_nums, 1);
    assert_eq!(dir.manifest.settings.sample.max_length, 4096);
    assert_eq!(
        dir.manifest.packing.packs, 11,
        "pack = false: one sample per pack"
    );
    assert!(rows(&dir)
        .iter()
        .map(Row::view)
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
    let row = dir.find_id("after-image").unwrap().unwrap();
    let row = row.view();
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
    let model = model_with_json(tmp.path(), MODELS[2], "tokenizer.json", |tok| {
        tok["truncation"] = serde_json::json!({"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0});
    });
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
            .map(|r| r.unwrap().view().num_tokens)
            .collect()
    };
    assert_eq!(lens(&a), lens(&b));
}

/// `--out` may not be, contain or lie inside `--model`, may not be or contain a `--data` file or
/// `--image-root` (symlinks resolved): refused before anything is written or deleted.
#[test]
#[cfg(unix)]
fn an_output_overlapping_an_input_is_refused_before_anything_is_touched() {
    let tmp = out_dir();
    let model = copy_model(
        tmp.path(),
        MODELS[2],
        &[
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "preprocessor_config.json",
        ],
    );
    let before = dir_files(&model);
    let link = tmp.path().join("link-to-m");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    let refused = |args: &[&str], out: &Path, what: &str| {
        let mut all = vec!["build", "--out", s(out), "--quiet", "--overwrite"];
        all.extend_from_slice(args);
        let o = prep(&all);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {}",
            out.display(),
            stderr(&o)
        );
        let err = stderr(&o);
        assert!(err.contains(what), "{}: {err}", out.display());
        err
    };
    let with_model = |m: &str| -> Vec<String> {
        vec![
            "--data".into(),
            "examples/data/train.json".into(),
            "--model".into(),
            m.into(),
        ]
    };
    let m_args = with_model(s(&model));
    let m_args: Vec<&str> = m_args.iter().map(String::as_str).collect();
    refused(&m_args, &model, "is --model");
    refused(&m_args, &link, "is --model");
    refused(&m_args, &model.join("shards"), "lies inside --model");
    refused(&m_args, tmp.path(), "contains --model");
    assert!(!model.join("shards").exists());
    assert_eq!(
        dir_files(&model),
        before,
        "the model directory is untouched"
    );

    // A data file inside --out (the folder given through a symlink).
    let data_dir = tmp.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let data = data_dir.join("train.jsonl");
    std::fs::write(
        &data,
        r#"{"id": "t", "conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
    )
    .unwrap();
    let data_link = tmp.path().join("data-link");
    std::os::unix::fs::symlink(&data_dir, &data_link).unwrap();
    let d_args = ["--data", s(&data), "--model", MODELS[2]];
    let err = refused(&d_args, &data_link, "contains --data");
    assert!(err.contains("train.jsonl"), "{err}");
    assert_eq!(listing(&data_dir), vec!["train.jsonl"]);

    // --image-root: refused when --out is or contains it; a folder inside it is fine.
    let images = tmp.path().join("root");
    std::fs::create_dir_all(images.join("data")).unwrap();
    std::os::unix::fs::symlink(root().join("examples/images"), images.join("images")).unwrap();
    let image_root = images.join("data");
    let i_args = [
        "--data",
        "examples/data/train.json",
        "--model",
        MODELS[2],
        "--image-root",
        s(&image_root),
    ];
    refused(&i_args, &image_root, "is --image-root");
    refused(&i_args, &images, "contains --image-root");
    let inside = image_root.join("shards");
    let mut ok_args = vec!["build", "--out", s(&inside), "--quiet"];
    ok_args.extend_from_slice(&i_args);
    let o = prep(&ok_args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// `--overwrite` over a directory that holds anything prep did not write refuses, naming it,
/// and deletes nothing (the previous set stays readable); leftovers of a killed run
/// (`.partial` files) are prep's own and are replaced.
#[test]
fn overwrite_checks_the_whole_directory_before_deleting_anything() {
    let tmp = out_dir();
    let out = tmp.path().join("o");
    let o = build_example(&out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let previous = dir_files(&out);
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    std::fs::write(out.join("shard-00000.arrow.bak"), b"mine").unwrap();
    std::fs::create_dir(out.join("shard-00042.arrow")).unwrap();
    let o = build_example(&out, &["--overwrite"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for name in ["notes.txt", "shard-00000.arrow.bak", "shard-00042.arrow"] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    assert!(err.contains("nothing was deleted"), "{err}");
    let mut after = dir_files(&out);
    after.retain(|n, _| n != "notes.txt" && n != "shard-00000.arrow.bak");
    assert_eq!(after, previous, "the previous set is intact");
    ShardDir::open(&out).unwrap();

    // Leftovers of a killed run are prep's own files: replaced.
    for junk in ["notes.txt", "shard-00000.arrow.bak"] {
        std::fs::remove_file(out.join(junk)).unwrap();
    }
    std::fs::remove_dir(out.join("shard-00042.arrow")).unwrap();
    for leftover in [
        "shard-00007.parquet.partial",
        "shard-00003.arrow.partial",
        "rejected.jsonl.partial",
        "manifest.json.partial",
    ] {
        std::fs::write(out.join(leftover), b"left by a killed run").unwrap();
    }
    let o = build_example(&out, &["--overwrite"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(dir_files(&out), previous);
}

/// An `--overwrite` run that fails (a bad sample with `--on-error fail`, a JSON list broken
/// halfway, both met after the new run has written shards of its own) leaves the previous set
/// exactly as it was: readable, byte for byte, without partial files. A run that succeeds
/// replaces it completely, shards the new set does not have included.
#[test]
fn a_failed_overwrite_leaves_the_previous_set_intact() {
    let tmp = out_dir();
    let out = tmp.path().join("o");
    // The previous set: one sample per pack and per shard (more shards than the runs below).
    let o = build_example(
        &out,
        &["--no-pack", "--shard-size-mb", "0", "--format", "both"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let previous = dir_files(&out);
    let ids = |dir: &Path| -> Vec<String> {
        ShardDir::open(dir)
            .unwrap()
            .samples()
            .map(|r| r.unwrap().view().id.to_string())
            .collect()
    };
    let previous_ids = ids(&out);
    assert_eq!(previous_ids.len(), 11);

    let text = |id: &str, answer: bool| {
        let mut turns = vec![serde_json::json!({"role": "user", "content": "hi"})];
        if answer {
            turns.push(serde_json::json!({"role": "assistant", "content": "hello"}));
        }
        serde_json::json!({"id": id, "conversations": turns}).to_string()
    };
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{}\n", text("fine", true), text("no-answer", false)),
    )
    .unwrap();
    let broken = tmp.path().join("broken.json");
    std::fs::write(
        &broken,
        format!(
            "[{}, {}, {{\"id\": \"cut\", \"conversations\": [",
            text("a", true),
            text("b", true)
        ),
    )
    .unwrap();
    for (data, code, what) in [
        (&bad, 4, "a bad sample with --on-error fail"),
        (&broken, 1, "a JSON list broken halfway"),
    ] {
        let o = prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--data",
            s(data),
            "--model",
            MODELS[2],
            "--out",
            s(&out),
            "--overwrite",
            "--on-error",
            "fail",
            "--pack-window",
            "4",
            "--shard-size-mb",
            "1",
            "--quiet",
        ]);
        assert_eq!(o.status.code(), Some(code), "{what}: {}", stderr(&o));
        assert_eq!(
            dir_files(&out),
            previous,
            "{what}: the previous set is left exactly as it was, without partial files"
        );
        assert_eq!(ids(&out), previous_ids, "{what}");
    }

    // A run that succeeds replaces the whole set: one shard now, none of the old ones left.
    let o = build_example(&out, &["--overwrite"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        listing(&out),
        vec!["manifest.json", "rejected.jsonl", "shard-00000.arrow"]
    );
    assert_eq!(ids(&out).len(), 11);
}

/// `--overwrite` trusts a directory's names only when its `manifest.json` (if any) is a cpmv
/// shard manifest: someone else's manifest (other JSON, or not JSON) beside shard-like files
/// makes the directory foreign, and nothing is deleted. A cpmv manifest of any format
/// version is prep's own.
#[test]
fn overwrite_refuses_a_directory_whose_manifest_is_not_prep_s() {
    let tmp = out_dir();
    for (k, (manifest, found)) in [
        (
            r#"{"format": "their-shards", "shards": ["shard-00000.arrow"]}"#,
            r#"its "format" is "their-shards""#,
        ),
        (r#"{"shards": []}"#, "not JSON with a \"format\" field"),
        ("shard list\n", "not JSON with a \"format\" field"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = tmp.path().join(format!("theirs-{k}"));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("manifest.json"), manifest).unwrap();
        std::fs::write(out.join("shard-00000.arrow"), b"their data").unwrap();
        std::fs::write(out.join("rejected.jsonl"), b"their notes").unwrap();
        let before = dir_files(&out);
        let o = build_example(&out, &["--overwrite"]);
        assert_eq!(o.status.code(), Some(1), "{manifest}: {}", stderr(&o));
        let err = stderr(&o);
        for want in [
            "manifest.json",
            "not a cpmv shard manifest",
            found,
            "\"cpmv-shards\"",
            "nothing was deleted",
        ] {
            assert!(err.contains(want), "{want:?} missing: {err}");
        }
        assert_eq!(dir_files(&out), before, "{manifest}: nothing is touched");
    }

    let out = tmp.path().join("older");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(
        out.join("manifest.json"),
        r#"{"format": "cpmv-shards", "format_version": 0}"#,
    )
    .unwrap();
    std::fs::write(out.join("shard-00003.arrow"), b"an old shard").unwrap();
    let o = build_example(&out, &["--overwrite"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        listing(&out),
        vec!["manifest.json", "rejected.jsonl", "shard-00000.arrow"]
    );
}

/// Failures after every sample was processed (a shard, rejected.jsonl or the manifest cannot
/// be published: here a directory takes the name while the run is under way) stop the run
/// with the error and remove every file it wrote: no manifest, no partial files, no
/// half-published set.
#[test]
fn a_failure_while_publishing_leaves_no_files_behind() {
    for blocker in ["shard-00000.arrow", "rejected.jsonl", "manifest.json"] {
        let tmp = out_dir();
        let out = tmp.path().join("o");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_prep"))
            .current_dir(root())
            .args([
                "build",
                "--data",
                "examples/data/train.json",
                "--data",
                "examples/data/train.json",
                "--model",
                MODELS[2],
                "--out",
                s(&out),
                "--threads",
                "1",
                "--pack-window",
                "4",
                "--quiet",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // As soon as the run writes its first shard, well before it publishes anything.
        let start = std::time::Instant::now();
        while !std::fs::read_dir(&out).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".partial")))
        }) {
            assert!(start.elapsed().as_secs() < 60, "prep wrote nothing");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::fs::create_dir_all(out.join(blocker).join("taken")).unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{blocker}: {}", stderr(&o));
        assert!(stderr(&o).contains(blocker), "{blocker}: {}", stderr(&o));
        assert_eq!(listing(&out), vec![blocker.to_string()], "{blocker}");
    }
}

/// A copy of the 2.6 example model with config.json's vocab_size set to `vocab`.
fn model_with_vocab(dir: &Path, vocab: u64) -> std::path::PathBuf {
    model_with_json(dir, MODELS[2], "config.json", |c| {
        c["vocab_size"] = vocab.into()
    })
}

/// config.json's vocab_size below the ids of tokens every sample contains (here `<|im_end|>`,
/// 4075, and the image placeholders above it): refused at start, naming token, id and
/// vocab_size, before any sample is processed or the output touched.
#[test]
fn a_vocab_size_below_the_template_and_placeholder_tokens_is_refused_up_front() {
    let tmp = out_dir();
    let model = model_with_vocab(tmp.path(), 4075);
    let out = tmp.path().join("o");
    let o = prep(&[
        "build",
        "--data",
        "examples/data/train.json",
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    for want in [
        "config.json",
        "vocab_size is 4075",
        "\"<|im_end|>\" (id 4075",
        "\"<image>\" (id 4076",
        "\"</slice>\" (id 4087",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    assert!(
        !err.contains("\"<|im_start|>\""),
        "4074 is below 4075: {err}"
    );
    assert!(!out.exists(), "nothing is written");
    // `prep stats` refuses the same checkpoint the same way.
    let o = prep(&[
        "stats",
        "--data",
        "examples/data/train.json",
        "--model",
        s(&model),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vocab_size is 4075"), "{}", stderr(&o));
}

/// A sample whose text tokenizes to an id the model has no row for (a literal added token
/// above vocab_size) is rejected as `token_out_of_vocab`, naming the token and its id; the
/// other samples are written and every id in the shards is below vocab_size. A `pad_token`
/// beyond vocab_size (4095 here) does not stop the run: prep never writes it.
#[test]
fn samples_with_tokens_beyond_vocab_size_are_rejected() {
    let tmp = out_dir();
    // The fixed tokens of the 2.6 tiny tokenizer end at </image_id> (4089).
    let model = model_with_vocab(tmp.path(), 4090);
    // A pad token beyond vocab_size does not matter: no sample contains it.
    let config_path = model.join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["pad_token"] = "<|reserved_special_token_5|>".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let data = tmp.path().join("d.jsonl");
    let line = |id: &str, text: &str| {
        serde_json::json!({"id": id, "conversations": [
            {"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]})
        .to_string()
    };
    std::fs::write(
        &data,
        [
            line("fine", "hello"),
            line("beyond", "what is <|reserved_special_token_3|>?"),
            line("at-limit", "and <|reserved_special_token_0|>"),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = tmp.path().join("o");
    let o = prep(&[
        "build",
        "--data",
        s(&data),
        "--model",
        s(&model),
        "--out",
        s(&out),
        "--quiet",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let rejected: Vec<Value> = std::fs::read_to_string(out.join("rejected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    for (r, (id, token, tid)) in rejected.iter().zip([
        ("beyond", "<|reserved_special_token_3|>", 4093),
        ("at-limit", "<|reserved_special_token_0|>", 4090),
    ]) {
        assert_eq!(r["id"], id);
        assert_eq!(r["reason"], "token_out_of_vocab");
        let msg = r["message"].as_str().unwrap();
        assert!(
            msg.contains(token) && msg.contains(&format!("id {tid}")) && msg.contains("4090"),
            "{msg}"
        );
    }
    let dir = ShardDir::open(&out).unwrap();
    assert_eq!(dir.len(), 1);
    assert!(rows(&dir)
        .iter()
        .all(|r| r.view().input_ids.iter().all(|&t| t < 4090)));
    assert_eq!(
        dir.manifest.counts.rejected_by_reason["token_out_of_vocab"],
        2
    );
}

/// `prep build --print-config` prints every `[prep]` setting with its source: a flag beats the
/// preset, the preset beats the checkpoint, the checkpoint beats prep's defaults; it needs no
/// data and writes nothing.
#[test]
fn print_config_shows_each_setting_and_where_it_came_from() {
    let dir = out_dir();
    let preset = dir.path().join("preset.toml");
    std::fs::write(
        &preset,
        "[prep]\nmax_length = 4096\nmax_slice_nums = 4\npack = false\n",
    )
    .unwrap();
    let o = prep(&[
        "build",
        "--model",
        MODELS[2],
        "--config",
        s(&preset),
        "--max-slice-nums",
        "2",
        "--format",
        "both",
        "--print-config",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
            .to_string()
    };
    let preset_src = format!("# preset {}", preset.display());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(MODELS[2]).join("config.json")).unwrap(),
    )
    .unwrap();
    let query_num = config["query_num"].as_u64().unwrap();
    for (key, value, source) in [
        ("max_slice_nums", "2".to_string(), "# flag"),
        ("format", "\"both\"".into(), "# flag"),
        ("max_length", "4096".into(), &preset_src),
        ("pack", "false".into(), &preset_src),
        ("llm_type", "\"qwen\"".into(), "# checkpoint"),
        ("query_num", query_num.to_string(), "# checkpoint"),
        ("truncate", "false".into(), "# default"),
        ("shard_size_mb", "1024".into(), "# default"),
    ] {
        let l = line(key);
        assert!(
            l.starts_with(&format!("{key} = {value} ")) && l.ends_with(source),
            "{key}: {l}\n{text}"
        );
    }
    assert!(text.contains("[prep]"), "{text}");
    // The table (comments aside) is a preset that gives the same resolution.
    let table: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(table["prep"]["max_slice_nums"].as_integer(), Some(2));
    // Settings are checked as a build checks them.
    let o = prep(&[
        "build",
        "--model",
        MODELS[2],
        "--max-slice-nums",
        "0",
        "--print-config",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("max_slice_nums"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// A MiniCPM-V 2.0 checkpoint with `tokenizer.model` is tokenized as the official pipeline does,
/// with the slow SentencePiece tokenizer (legacy), and prep says so; the same checkpoint with
/// only `tokenizer.json` gets other ids for some samples and another tokenizer fingerprint.
#[test]
fn v2_0_with_tokenizer_model_uses_the_slow_sentencepiece_tokenizer() {
    let tmp = out_dir();
    let sp = "tests/fixtures/tokenizers/mistral-sp-minicpmv2";
    let model = model_with_json(tmp.path(), MODELS[0], "config.json", |c| {
        c["vocab_size"] = 32012.into();
    });
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(root().join(sp).join(f), model.join(f)).unwrap();
    }
    let build = |out: &Path| {
        let o = prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            s(&model),
            "--out",
            s(out),
            "--quiet",
            "--no-pack",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        (
            String::from_utf8(o.stdout).unwrap(),
            ShardDir::open(out).unwrap(),
        )
    };
    let (_, fast) = build(&tmp.path().join("fast"));
    assert_eq!(fast.manifest.model.tokenizer, "tokenizer.json");
    std::fs::copy(
        root().join(sp).join("tokenizer.model"),
        model.join("tokenizer.model"),
    )
    .unwrap();
    let (stdout, slow) = build(&tmp.path().join("slow"));
    assert!(
        slow.manifest.model.tokenizer.starts_with("tokenizer.model"),
        "{}",
        slow.manifest.model.tokenizer
    );
    assert!(stdout.contains("tokenizer: tokenizer.model"), "{stdout}");
    assert_ne!(
        slow.manifest.fingerprints.tokenizer,
        fast.manifest.fingerprints.tokenizer
    );
    let differing = rows(&fast)
        .iter()
        .zip(&rows(&slow))
        .filter(|(a, b)| a.view().input_ids != b.view().input_ids)
        .count();
    assert!(differing > 0, "the slow tokenizer changed no sample");
    let o = prep(&["build", "--model", s(&model), "--print-config"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("# tokenizer: tokenizer.model"));
}

/// `--pixels source` stores each distinct image file once and the reader makes the very slices
/// a set of slices holds, for every version, whatever `--max-slice-nums`; every other column is
/// the same; the set is far smaller; one and two threads write the same bytes; a damaged store
/// is named.
#[test]
fn source_pixels_reproduce_the_stored_slices_bit_for_bit() {
    for model in MODELS {
        for slices in ["9", "4"] {
            let (a, b, c) = (out_dir(), out_dir(), out_dir());
            let build = |out: &Path, extra: &[&str]| {
                let mut args = vec!["--max-slice-nums", slices];
                args.extend_from_slice(extra);
                let o = build_example_with(model, out, &args);
                assert_eq!(o.status.code(), Some(0), "{model}: {}", stderr(&o));
            };
            build(a.path(), &[]);
            build(b.path(), &["--pixels", "source", "--threads", "2"]);
            build(c.path(), &["--pixels", "source", "--threads", "1"]);
            let (sl, src) = (
                ShardDir::open(a.path()).unwrap(),
                ShardDir::open(b.path()).unwrap(),
            );
            assert_eq!(src.manifest.pixels, cpmv_shard::PixelMode::Source);
            assert_eq!(sl.manifest.pixels, cpmv_shard::PixelMode::Slices);
            let images = src.manifest.images.as_ref().unwrap();
            assert_eq!(images.count, 7, "7 distinct files among the 11 images");
            assert_eq!(src.len(), sl.len());
            let mut slice_count = 0;
            for (x, y) in rows(&sl).iter().zip(&rows(&src)) {
                let (x, y) = (x.view(), y.view());
                assert_eq!(
                    (x.id, x.input_ids, x.labels, x.pack),
                    (y.id, y.input_ids, y.labels, y.pack)
                );
                assert_eq!(
                    (&x.image_bound, &x.tgt_sizes),
                    (&y.image_bound, &y.tgt_sizes)
                );
                assert!(y.pixel_values.is_empty() && x.image_refs.is_empty());
                y.check().unwrap();
                let (px, py) = (sl.pixels(&x).unwrap(), src.pixels(&y).unwrap());
                assert_eq!(px, py, "{model} {}: slices differ", x.id);
                slice_count += px.len();
            }
            assert!(slice_count > 11, "{model}: {slice_count} slices");
            let size = |d: &Path| -> u64 {
                std::fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().metadata().unwrap().len())
                    .sum()
            };
            assert!(
                size(b.path()) * 5 < size(a.path()),
                "{model}: source {} vs slices {} bytes",
                size(b.path()),
                size(a.path())
            );
            assert_same_files(b.path(), c.path(), &["manifest.json"], model);
        }
    }
    // A store whose bytes were damaged is refused naming the file.
    let out = out_dir();
    let o = build_example(out.path(), &["--pixels", "source"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let summary = String::from_utf8_lossy(&o.stdout);
    assert!(
        summary.contains("pixels: source, 7 distinct image file(s) in images.arrow"),
        "{summary}"
    );
    std::fs::write(out.path().join("images.arrow"), b"not arrow").unwrap();
    let err = ShardDir::open(out.path()).err().unwrap().to_string();
    assert!(err.contains("images.arrow"), "{err}");
    let o = prep(&["inspect", "--shards", s(out.path()), "--index", "0"]);
    assert!(stderr(&o).contains("images.arrow"), "{}", stderr(&o));
}

/// `--compression lz4|zstd` writes the same rows (every column, every pixel) as an uncompressed
/// set, in both pixel modes and for every version; the manifest records it; zstd slices take
/// less room; one and two threads write the same bytes; stats and inspect read the set.
#[test]
fn compressed_shards_hold_the_same_rows() {
    for model in MODELS {
        let build = |out: &Path, extra: &[&str]| {
            let o = build_example_with(model, out, extra);
            assert_eq!(o.status.code(), Some(0), "{model}: {}", stderr(&o));
        };
        let plain = out_dir();
        build(plain.path(), &[]);
        let plain_set = ShardDir::open(plain.path()).unwrap();
        let want = rows(&plain_set);
        let shard_bytes = |d: &ShardDir| d.manifest.shards.iter().map(|e| e.bytes).sum::<u64>();
        for (codec, pixels) in [("lz4", "slices"), ("zstd", "slices"), ("zstd", "source")] {
            let out = out_dir();
            build(
                out.path(),
                &["--compression", codec, "--pixels", pixels, "--threads", "2"],
            );
            let set = ShardDir::open(out.path()).unwrap();
            assert_eq!(set.manifest.compression.name(), codec);
            assert!(set.shards.iter().all(|s| s.compressed()), "{model} {codec}");
            let got = rows(&set);
            assert_eq!(got.len(), want.len());
            for (x, y) in want.iter().zip(&got) {
                let (x, y) = (x.view(), y.view());
                assert_eq!(
                    (
                        x.id,
                        x.input_ids,
                        x.labels,
                        x.pack,
                        &x.image_bound,
                        &x.tgt_sizes
                    ),
                    (
                        y.id,
                        y.input_ids,
                        y.labels,
                        y.pack,
                        &y.image_bound,
                        &y.tgt_sizes
                    ),
                    "{model} {codec} {pixels}"
                );
                y.check().unwrap();
                assert_eq!(
                    plain_set.pixels(&x).unwrap(),
                    set.pixels(&y).unwrap(),
                    "{model} {codec} {pixels} {}: pixels differ",
                    x.id
                );
            }
            if pixels == "slices" {
                assert!(
                    shard_bytes(&set) < shard_bytes(&plain_set),
                    "{model} {codec}: {} vs {} bytes",
                    shard_bytes(&set),
                    shard_bytes(&plain_set)
                );
            }
            if codec == "zstd" && pixels == "slices" {
                let one = out_dir();
                build(one.path(), &["--compression", codec, "--threads", "1"]);
                assert_same_files(out.path(), one.path(), &["manifest.json"], model);
                let stats = |d: &Path| {
                    let o = prep(&["stats", "--shards", s(d), "--json"]);
                    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
                    String::from_utf8(o.stdout).unwrap().replace(s(d), "DIR")
                };
                assert_eq!(stats(out.path()), stats(plain.path()), "{model}");
                let o = prep(&["inspect", "--shards", s(out.path()), "--index", "1"]);
                assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            }
        }
    }
}
