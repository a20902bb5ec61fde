//! End-to-end tests of `prep stats` and `prep inspect` against `prep build` on the same data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use cpmv_shard::{Row, ShardDir};
use serde_json::Value;

#[path = "common/mod.rs"]
mod common;
use common::{copy_model, dir_files, prep, root, rows, s, MODELS};

fn ok(o: &Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A data set with multi-image, text-only and sliced samples, plus one JPEG whose header is
/// intact but whose pixel data is cut off: stats (header only) measures it, build rejects it.
fn dataset(dir: &Path) -> PathBuf {
    let images = root().join("examples/images");
    let jpeg = std::fs::read(images.join("wide_coffee_1600x900.jpg")).unwrap();
    std::fs::write(dir.join("cut.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    let mut samples: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("examples/data/train.json")).unwrap(),
    )
    .unwrap();
    for v in samples.iter_mut() {
        // Make image paths absolute (the data file moves to a temporary folder).
        match v.get_mut("image") {
            Some(Value::String(p)) => *p = s(&root().join("examples/data").join(&*p)).to_string(),
            Some(Value::Object(m)) => {
                for p in m.values_mut() {
                    let rel = p.as_str().unwrap().to_string();
                    *p = Value::String(s(&root().join("examples/data").join(rel)).to_string());
                }
            }
            _ => {}
        }
    }
    samples.push(serde_json::json!({"id": "cut-pixels", "image": s(&dir.join("cut.jpg")),
        "conversations": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "Coffee."}]}));
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&samples).unwrap()).unwrap();
    path
}

fn per_sample(path: &Path) -> BTreeMap<String, Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn stats_reports_exactly_the_lengths_build_writes() {
    for model in MODELS {
        let tmp = tempfile::tempdir().unwrap();
        let data = dataset(tmp.path());
        let per = tmp.path().join("per.jsonl");
        ok(
            &prep(&[
                "stats",
                "--data",
                s(&data),
                "--model",
                model,
                "--per-sample",
                s(&per),
                "--quiet",
            ]),
            0,
        );
        let measured = per_sample(&per);
        let out = tmp.path().join("o");
        ok(
            &prep(&[
                "build",
                "--data",
                s(&data),
                "--model",
                model,
                "--out",
                s(&out),
                "--quiet",
            ]),
            3,
        );
        let shards = ShardDir::open(&out).unwrap();
        assert_eq!(shards.len(), 11);
        assert_eq!(
            measured.len(),
            12,
            "stats measures the sample with cut pixel data too"
        );
        assert!(measured.contains_key("cut-pixels"));
        let rejected = std::fs::read_to_string(out.join("rejected.jsonl")).unwrap();
        assert!(
            rejected.contains("cut-pixels") && rejected.contains("image_decode"),
            "{rejected}"
        );
        for row in rows(&shards).iter().map(Row::view) {
            let m = &measured[row.id];
            assert_eq!(m["total_tokens"], row.num_tokens, "{model} {}", row.id);
            let image: i32 = row.image_bound.iter().map(|b| b[1] - b[0]).sum();
            assert_eq!(m["image_tokens"], image, "{model} {}", row.id);
            assert_eq!(m["slices"], row.tgt_sizes.len(), "{model} {}", row.id);
            let sup = row.labels.iter().filter(|&&l| l != -100).count();
            assert_eq!(m["supervised_tokens"], sup, "{model} {}", row.id);
        }
        // The same figures from the shards (the cut sample is not there).
        let from_data: Value = serde_json::from_str(&ok(
            &prep(&[
                "stats",
                "--data",
                s(&data),
                "--model",
                model,
                "--json",
                "--quiet",
            ]),
            0,
        ))
        .unwrap();
        let from_shards: Value =
            serde_json::from_str(&ok(&prep(&["stats", "--shards", s(&out), "--json"]), 0)).unwrap();
        assert_eq!(from_data["samples"], 12);
        assert_eq!(from_shards["samples"], 11);
        assert_eq!(
            from_shards["packing"]["packs"],
            shards.manifest.packing.packs
        );
        assert_eq!(from_shards["images_per_sample"]["max"], 2);
        assert_eq!(
            from_shards["slices_per_image"]["max"],
            from_data["slices_per_image"]["max"]
        );
    }
}

/// A synthetic text-only set of 4000 samples with a known spread of lengths.
fn synthetic(dir: &Path) -> PathBuf {
    let mut text = String::new();
    let mut x: u64 = 12345;
    for i in 0..4000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let words = 5 + (x >> 33) % 400;
        let line = serde_json::json!({"id": format!("s{i}"), "conversations": [
            {"role": "user", "content": "word ".repeat(words as usize)},
            {"role": "assistant", "content": "ok"}]});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let p = dir.join("synthetic.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn sampling_is_reproducible_and_within_its_stated_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synthetic(tmp.path());
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "stats",
            "--data",
            s(&data),
            "--model",
            MODELS[2],
            "--json",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&prep(&args), 0)).unwrap()
    };
    let exact = run(&[]);
    let a = run(&["--sample", "400", "--seed", "7"]);
    let b = run(&["--sample", "400", "--seed", "7", "--threads", "1"]);
    let c = run(&["--sample", "400", "--seed", "8"]);
    assert_eq!(a, b, "same seed, same figures");
    assert_ne!(
        a["total_tokens"], c["total_tokens"],
        "another seed, another sample"
    );
    assert_eq!(a["samples"], 400);
    assert_eq!(a["samples_read"], 4000);
    assert_eq!(exact["samples"], 4000);
    assert!(exact["total_tokens_ci95"].is_null());
    for sampled in [&a, &c] {
        let ci = &sampled["total_tokens_ci95"];
        let within = |key: &str, ci_key: &str| {
            let v = exact["total_tokens"][key].as_f64().unwrap();
            let lo = ci[ci_key][0].as_f64().unwrap();
            let hi = ci[ci_key][1].as_f64().unwrap();
            assert!(lo <= v && v <= hi, "{key}: exact {v} outside [{lo}, {hi}]");
        };
        within("mean", "mean");
        within("p50", "p50");
        within("p90", "p90");
    }
}

#[test]
fn stats_json_has_the_documented_keys_and_the_plot_is_a_png() {
    let tmp = tempfile::tempdir().unwrap();
    let plot = tmp.path().join("h.png");
    let v: Value = serde_json::from_str(&ok(
        &prep(&[
            "stats",
            "--data",
            "examples/data/train.json",
            "--model",
            MODELS[1],
            "--json",
            "--quiet",
            "--plot",
            s(&plot),
            "--max-length",
            "512",
        ]),
        0,
    ))
    .unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/stats.schema.json")).unwrap(),
    )
    .unwrap();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted_required = required.clone();
    sorted_required.sort();
    assert_eq!(keys, sorted_required, "exactly the documented keys");
    for d in ["total_tokens", "text_tokens", "image_tokens"] {
        for k in ["min", "mean", "p50", "p90", "p95", "p99", "max"] {
            assert!(v[d][k].is_number(), "{d}.{k}");
        }
    }
    let loss = v["length_loss"].as_array().unwrap();
    assert!(loss.iter().any(|l| l["max_length"] == 512));
    let budgets: Vec<f64> = v["image_tokens_by_max_slice_nums"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["mean_image_tokens_per_sample"].as_f64().unwrap())
        .collect();
    assert!(
        budgets[0] < budgets[1] && budgets[1] <= budgets[2],
        "{budgets:?}"
    );
    assert_eq!(
        v["suggested_max_length"]["keep_all"].as_u64().unwrap() % 128,
        0
    );
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (1000, 560));
}

#[test]
fn inspect_shows_placeholders_supervision_bounds_and_slices() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    ok(
        &prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            MODELS[2],
            "--out",
            s(&out),
            "--quiet",
        ]),
        0,
    );
    let dump = tmp.path().join("png");
    let text = ok(
        &prep(&[
            "inspect",
            "--shards",
            s(&out),
            "--id",
            "coffee-0",
            "--dump-images",
            s(&dump),
            "--no-color",
        ]),
        0,
    );
    assert!(text.contains("<image>[64 × <unk>]</image>"), "{text}");
    assert!(text.contains("<slice>[64 × <unk>]</slice>"), "{text}");
    // The assistant's answer is supervised, the user's question is not.
    assert!(text.contains("[[A cup of coffee"), "{text}");
    assert!(!text.contains("[[Describe"), "{text}");
    // 2.6's extra target: the <|im_end|> position also learns eos.
    assert!(text.contains("{→<|im_end|>}"), "{text}");
    let dir = ShardDir::open(&out).unwrap();
    let row = dir.find_id("coffee-0").unwrap().unwrap();
    let row = row.view();
    assert!(text.contains(&format!(
        "slice  0: tokens [{}, {})",
        row.image_bound[0][0], row.image_bound[0][1]
    )));
    for (k, t) in row.tgt_sizes.iter().enumerate() {
        let img = image::open(dump.join(format!("coffee-0-slice-{k:02}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(
            (img.height() as i32, img.width() as i32),
            (t[0] * 14, t[1] * 14)
        );
        assert_eq!(
            img.as_raw().as_slice(),
            row.pixel_values[k],
            "PNG holds the shard's pixels"
        );
    }
    let by_index = ok(
        &prep(&["inspect", "--shards", s(&out), "--index", "0", "--no-color"]),
        0,
    );
    assert!(by_index.starts_with(&format!("id {}", dir.sample(0).unwrap().unwrap().view().id)));
    let missing = prep(&["inspect", "--shards", s(&out), "--id", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn exif_transpose_sizes_agree_between_stats_and_build() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = root().join("tests/fixtures/decode");
    let line = |id: &str, img: &str| {
        serde_json::json!({"id": id, "image": s(&fx.join(img)), "conversations": [
            {"role": "user", "content": "Which way is up?"}, {"role": "assistant", "content": "This way."}]})
        .to_string()
    };
    let data = tmp.path().join("d.jsonl");
    std::fs::write(
        &data,
        [
            line("jpeg-6", "jpeg_exif_orientation_6.jpg"),
            line("png-6", "png_exif_orientation_6.png"),
        ]
        .join("\n"),
    )
    .unwrap();
    for flag in ["--exif-transpose", "--no-exif-transpose"] {
        let per = tmp.path().join("per.jsonl");
        let out = tmp.path().join("o");
        ok(
            &prep(&[
                "stats",
                "--data",
                s(&data),
                "--model",
                MODELS[2],
                "--per-sample",
                s(&per),
                "--quiet",
                flag,
            ]),
            0,
        );
        ok(
            &prep(&[
                "build",
                "--data",
                s(&data),
                "--model",
                MODELS[2],
                "--out",
                s(&out),
                "--quiet",
                "--overwrite",
                flag,
            ]),
            0,
        );
        let measured = per_sample(&per);
        for row in rows(&ShardDir::open(&out).unwrap()).iter().map(Row::view) {
            assert_eq!(
                measured[row.id]["total_tokens"], row.num_tokens,
                "{flag} {}",
                row.id
            );
        }
    }
}

/// A `--format parquet` set has no Arrow shards: `prep stats --shards` and `prep inspect` refuse
/// it and say how to get Arrow shards, instead of reporting a set without samples.
#[test]
fn parquet_only_sets_are_refused_with_how_to_get_arrow_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    ok(
        &prep(&[
            "build",
            "--data",
            "examples/data/train.json",
            "--model",
            MODELS[2],
            "--out",
            s(&out),
            "--format",
            "parquet",
            "--quiet",
        ]),
        0,
    );
    let readers: [&[&str]; 3] = [
        &["stats", "--shards", s(&out)],
        &["stats", "--shards", s(&out), "--json"],
        &["inspect", "--shards", s(&out), "--index", "0"],
    ];
    for args in readers {
        let o = prep(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("Parquet files only")
                && err.contains("--format arrow")
                && err.contains("--format both"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("no samples"), "{err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing is reported");
    }
}

/// `prep stats --per-sample FILE` / `--plot FILE` are refused before any file is created when
/// FILE is a `--data` file (also through a symlink) or lies inside `--model` or `--shards`
/// (or the model directory the manifest names); `prep inspect --dump-images DIR` when DIR is
/// or lies inside `--shards`. The error names both flags; the inputs are left untouched.
#[test]
#[cfg(unix)]
fn outputs_over_their_own_inputs_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(tmp.path());
    let before = std::fs::read(&data).unwrap();
    let link = tmp.path().join("link.json");
    std::os::unix::fs::symlink(&data, &link).unwrap();
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
    let refused = |args: &[&str], wants: &[&str]| {
        let o = prep(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for want in wants {
            assert!(err.contains(want), "{args:?}: {want:?} missing: {err}");
        }
    };
    let stats = |more: &[&str]| -> Vec<String> {
        ["stats", "--data", s(&data), "--model", s(&model), "--quiet"]
            .iter()
            .chain(more)
            .map(|a| a.to_string())
            .collect()
    };
    let refused_stats = |v: Vec<String>, wants: &[&str]| {
        let args: Vec<&str> = v.iter().map(String::as_str).collect();
        refused(&args, wants);
    };
    for flag in ["--per-sample", "--plot"] {
        for out in [&data, &link] {
            refused_stats(stats(&[flag, s(out)]), &[flag, "is --data"]);
            assert_eq!(
                std::fs::read(&data).unwrap(),
                before,
                "{flag} {}: the data file is unchanged",
                out.display()
            );
        }
        let inside = model.join("lengths.out");
        refused_stats(stats(&[flag, s(&inside)]), &[flag, "lies inside --model"]);
        assert!(!inside.exists());
    }
    let same = tmp.path().join("same.out");
    refused_stats(
        stats(&["--per-sample", s(&same), "--plot", s(&same)]),
        &["--per-sample and --plot name the same file"],
    );
    assert!(!same.exists());

    // A shard set built from the same data (the cut JPEG is rejected: exit 3).
    let shards = tmp.path().join("shards");
    ok(
        &prep(&[
            "build",
            "--data",
            s(&data),
            "--model",
            s(&model),
            "--out",
            s(&shards),
            "--quiet",
        ]),
        3,
    );
    let set_before = dir_files(&shards);
    let plot_in_set = shards.join("hist.png");
    refused(
        &["stats", "--shards", s(&shards), "--plot", s(&plot_in_set)],
        &["--plot", "lies inside --shards"],
    );
    refused(
        &[
            "stats",
            "--shards",
            s(&shards),
            "--plot",
            s(&model.join("hist.png")),
        ],
        &[
            "--plot",
            "lies inside --model (named by the manifest of --shards)",
        ],
    );
    assert!(!model.join("hist.png").exists());
    let inspect = |dump: &Path| {
        prep(&[
            "inspect",
            "--shards",
            s(&shards),
            "--id",
            "coffee-0",
            "--no-color",
            "--dump-images",
            s(dump),
        ])
    };
    for (dump, relation) in [
        (shards.clone(), "is --shards"),
        (shards.join("png"), "lies inside --shards"),
    ] {
        let o = inspect(&dump);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--dump-images") && err.contains(relation),
            "{err}"
        );
    }
    assert!(
        dir_files(&shards) == set_before,
        "the shard set is untouched"
    );
    ShardDir::open(&shards).unwrap();

    // Outputs next to the inputs are fine, a folder that contains the shard set included.
    ok(&inspect(tmp.path()), 0);
    assert!(tmp.path().join("coffee-0-slice-00.png").exists());
    let per_sample_file = tmp.path().join("lengths.jsonl");
    ok(
        &prep(
            &stats(&["--per-sample", s(&per_sample_file)])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        0,
    );
    assert_eq!(per_sample(&per_sample_file).len(), 12);
}
