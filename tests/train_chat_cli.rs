//! `train chat` against the PyTorch reference: tests/fixtures/chat (scripts/fixtures/
//! gen_chat_fixtures.py) holds, per version, the official inference prompt of real images and a
//! question, its token ids and image bounds, the slices' pixels (hashes), the first step's logits,
//! the top logits of every step and the greedy continuation of the PyTorch model. The weights are
//! `train init-model` output (its hash is in the fixture).

use std::path::{Path, PathBuf};
use std::process::Command;

use cpmv_shard::fingerprint::sha256_hex as sha256;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("train runs")
}

fn fixture(version: &str) -> Value {
    let path = root().join(format!("tests/fixtures/chat/{version}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture's seeded checkpoint, written by `train init-model` and checked by hash.
fn weights(case: &Value, out: &Path) {
    let w = &case["weights"];
    if !out.exists() {
        let cmd: Vec<String> = w["command"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|a| a.as_str().unwrap().replace("{OUT}", out.to_str().unwrap()))
            .collect();
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let o = train(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    assert_eq!(
        sha256(&bytes),
        w["model_safetensors_sha256"].as_str().unwrap(),
        "init-model no longer writes the fixture's weights"
    );
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The image files of a fixture case.
fn case_images(case: &Value) -> Vec<PathBuf> {
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| root().join(i["path"].as_str().unwrap()))
        .collect()
}

/// A one-question conversation: `text` asked about `images`.
fn question(text: &str, images: &[PathBuf]) -> [cpmv_chat::Turn; 1] {
    [cpmv_chat::Turn {
        role: cpmv_chat::Role::User,
        text: text.to_string(),
        images: images
            .iter()
            .map(|p| cpmv_chat::ChatImage::open(p).unwrap())
            .collect(),
    }]
}

/// Prompt text, ids, image bounds, slice pixels, first-step logits, every step's top logits
/// (through the KV cache) and the greedy continuation equal PyTorch's, for all three versions,
/// one and two images, sliced and unsliced.
#[test]
fn chat_prompt_and_greedy_reply_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    for version in ["v2_0", "v2_5", "v2_6"] {
        let fx = fixture(version);
        let model_dir = tmp.path().join(version);
        for case in fx["cases"].as_array().unwrap() {
            let name = format!("{version}/{}", case["name"].as_str().unwrap());
            weights(case, &model_dir);
            let images = case_images(case);
            let prompt = case["prompt"].as_str().unwrap();

            // Library: prompt, pixels, logits step by step through the cache.
            let model = cpmv_model::MiniCpmV::load(&model_dir, &Default::default()).unwrap();
            let chat = cpmv_chat::Chat::new(&model, &model_dir, None).unwrap();
            let p = chat.prompt(&question(prompt, &images)).unwrap();
            assert_eq!(p.text, case["prompt_text"].as_str().unwrap(), "{name}");
            assert_eq!(p.ids, ids(&case["input_ids"]), "{name}");
            let bounds: Vec<[i32; 2]> =
                serde_json::from_value(case["image_bounds"].clone()).unwrap();
            assert_eq!(p.bounds, bounds, "{name}");
            let want_slices: Vec<&Value> = case["images"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|i| i["slices"].as_array().unwrap())
                .collect();
            assert_eq!(p.slices.len(), want_slices.len(), "{name}");
            for (got, want) in p.slices.iter().zip(&want_slices) {
                assert_eq!(got.width as u64, want["width"].as_u64().unwrap(), "{name}");
                assert_eq!(
                    got.height as u64,
                    want["height"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    sha256(&got.data),
                    want["rgb_sha256"].as_str().unwrap(),
                    "{name}: slice pixels"
                );
            }
            let batch = chat.batch(&p).unwrap();
            let mut cache = cpmv_model::llm::KvCache::default();
            let logits: Vec<f32> = model
                .prefill(&batch, &mut cache)
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = serde_json::from_value(case["step0_logits"].clone()).unwrap();
            assert_eq!(logits.len(), want.len(), "{name}");
            let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            let diff = logits
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{name}: step 0 logits differ by {diff}"
            );
            let mut logits = logits;
            for (k, step) in case["steps"].as_array().unwrap().iter().enumerate() {
                for top in step["top"].as_array().unwrap() {
                    let (id, value) = (top[0].as_u64().unwrap() as usize, top[1].as_f64().unwrap());
                    let d = (logits[id] as f64 - value).abs();
                    assert!(
                        d <= 1e-4 * value.abs().max(1.0),
                        "{name}: step {k}, id {id}: {d}"
                    );
                }
                let token = step["token"].as_u64().unwrap() as u32;
                assert_eq!(
                    cpmv_model::generate::argmax(&logits),
                    token,
                    "{name}: step {k}"
                );
                logits = model.decode(token, &mut cache).unwrap().to_vec1().unwrap();
            }

            // The command: the same prompt and greedy reply, as JSON.
            let n = case["max_new_tokens"].as_u64().unwrap().to_string();
            let mut args = vec![
                "chat",
                "--model",
                model_dir.to_str().unwrap(),
                "--prompt",
                prompt,
                "--max-new-tokens",
                &n,
                "--json",
            ];
            for i in &images {
                args.extend(["--image", i.to_str().unwrap()]);
            }
            let o = train(&args);
            assert!(
                o.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let out: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(out["prompt_ids"], case["input_ids"], "{name}");
            assert_eq!(out["generated_ids"], case["generated_ids"], "{name}");
            assert_eq!(out["stop"], "Length", "{name}");
        }
    }
}

/// Generation ends right after a stop id (included), and sampling is reproducible from its seed.
#[test]
fn chat_stops_at_a_stop_token_and_sampling_follows_the_seed() {
    let fx = fixture("v2_0");
    let case = &fx["cases"][1];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    weights(case, &dir);
    let model = cpmv_model::MiniCpmV::load(&dir, &Default::default()).unwrap();
    let chat = cpmv_chat::Chat::new(&model, &dir, None).unwrap();
    let p = chat
        .prompt(&question(
            case["prompt"].as_str().unwrap(),
            &case_images(case),
        ))
        .unwrap();
    let batch = chat.batch(&p).unwrap();
    let greedy = ids(&case["generated_ids"]);
    // The first id that did not occur before it, used as a stop token.
    let k = (1..greedy.len())
        .find(|&k| !greedy[..k].contains(&greedy[k]))
        .unwrap();
    let g = model
        .generate(&batch, 50, &[greedy[k]], &Default::default(), |_| true)
        .unwrap();
    assert_eq!(g.ids, greedy[..=k], "stops after the stop id");
    assert_eq!(g.stop, cpmv_model::StopReason::StopToken);
    let sampling = cpmv_model::Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed: 7,
    };
    let a = model.generate(&batch, 8, &[], &sampling, |_| true).unwrap();
    let b = model.generate(&batch, 8, &[], &sampling, |_| true).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.ids.len(), 8);
    // ... and from nothing else: another seed draws other tokens.
    let other = cpmv_model::Sampling {
        seed: 8,
        ..sampling
    };
    let c = model.generate(&batch, 8, &[], &other, |_| true).unwrap();
    assert_ne!(a.ids, c.ids, "the seed does not reach the sampler");
    // Bad flags and inputs are refused, naming them.
    for (extra, needle) in [
        (["--top-p", "0.5"], "--top-p"),
        (["--image", "no/such.png"], "no/such.png"),
    ] {
        let mut args = vec!["chat", "--model", dir.to_str().unwrap(), "--prompt", "hi"];
        args.extend(extra);
        let o = train(&args);
        assert!(!o.status.success(), "{extra:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(needle),
            "{extra:?}"
        );
    }
}

/// Without --prompt the conversation goes on over standard input: each reply is part of the next
/// prompt (after the question it answered), the images stay with the first question, and an
/// empty line ends it. The streamed text is the reply's text.
#[test]
fn interactive_chat_keeps_the_conversation_and_streams_the_reply() {
    use std::io::Write;
    let fx = fixture("v2_6");
    let case = &fx["cases"][0];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    weights(case, &dir);
    let image = root().join(case["images"][0]["path"].as_str().unwrap());
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
            .args(args)
            .current_dir(root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let base = [
        "chat",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--max-new-tokens",
        "5",
    ];
    let mut json_args = base.to_vec();
    json_args.push("--json");
    let q1 = case["prompt"].as_str().unwrap();
    let out = run(
        &json_args,
        &format!("{q1}\nSecond question?\n\nnot asked\n"),
    );
    let replies: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), 2, "{out}");
    let (first, second) = (&replies[0], &replies[1]);
    assert_eq!(
        first["prompt_ids"],
        case["input_ids"].clone(),
        "the first turn is the one-shot prompt"
    );
    let p2 = second["prompt_text"].as_str().unwrap();
    let p1 = first["prompt_text"].as_str().unwrap();
    assert!(p2.starts_with(p1.trim_end_matches("<|im_start|>assistant\n")));
    assert!(p2.contains("Second question?"));
    assert_eq!(
        p2.matches("<image>").count(),
        1,
        "images only with the first question"
    );
    assert!(!p2.contains("not asked"));
    // Streaming: the printed text is the reply's text, a line per reply.
    let streamed = run(&base, &format!("{q1}\n\n"));
    assert_eq!(streamed, format!("{}\n", first["text"].as_str().unwrap()));
}
