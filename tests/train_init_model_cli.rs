//! `train init-model`: seeded checkpoints in the real layout for each version, loadable by the
//! model crate, deterministic, and clear errors for bad arguments.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("train runs")
}

const MODELS: [(&str, &str); 3] = [
    ("examples/models/minicpm-v-2-tiny", "2.0"),
    ("examples/models/minicpm-llama3-v-2_5-tiny", "2.5"),
    ("examples/models/minicpm-v-2_6-tiny", "2.6"),
];

#[test]
fn init_model_writes_loadable_deterministic_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    for (like, version) in MODELS {
        let a = tmp.path().join(format!("{version}-a"));
        let b = tmp.path().join(format!("{version}-b"));
        for out in [&a, &b] {
            let o = train(&[
                "init-model",
                "--like",
                like,
                "--size",
                "tiny",
                "--seed",
                "5",
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(stdout.contains(&format!("MiniCPM-V {version}")), "{stdout}");
        }
        // Same seed, same bytes.
        assert_eq!(
            std::fs::read(a.join("model.safetensors")).unwrap(),
            std::fs::read(b.join("model.safetensors")).unwrap()
        );
        let model = cpmv_model::MiniCpmV::load(&a, &Default::default()).unwrap();
        assert_eq!(model.config().version.as_str(), version);
        assert_eq!(model.config().llm.num_layers, 2);
    }
}

#[test]
fn init_model_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user data").unwrap();
    let o = train(&[
        "init-model",
        "--like",
        MODELS[2].0,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "user data"
    );

    let o = train(&[
        "init-model",
        "--like",
        "examples/data",
        "--out",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("config.json"), "{err}");
}

/// `train bench` of the tiny sizes of `like` on the CPU, one warm-up and one timed step of 512
/// tokens, with `extra` flags.
fn tiny_bench(like: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "bench",
        "--like",
        like,
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--seq",
        "512",
        "--slices",
        "1",
        "--slice-px",
        "28",
        "--warmup",
        "1",
        "--steps",
        "1",
    ];
    args.extend_from_slice(extra);
    train(&args)
}

/// `train bench` on the CPU with the tiny sizes: one JSON line (stdout and --out) with the
/// throughput, the FLOP count and finite losses; LoRA trains a fraction of the parameters.
#[test]
fn bench_prints_a_json_line_per_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bench.jsonl");
    let mut lines = Vec::new();
    for (like, version) in MODELS {
        for mode in ["full", "lora"] {
            let o = tiny_bench(like, &["--mode", mode, "--out", out.to_str().unwrap()]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value =
                serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
            assert_eq!(v["impl"], "cpmv");
            assert_eq!(v["version"], version);
            assert_eq!(v["mode"], mode);
            // CPU f32: the transformer layers run on the block path.
            assert_eq!(v["path"], "blocks");
            assert!(v["loss_first"].as_f64().unwrap().is_finite());
            assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
            // MFU is the counted FLOPs over the measured step time at 989 TFLOP/s.
            let flops = v["flops_per_step"].as_f64().unwrap();
            let mfu = flops / v["step_s"].as_f64().unwrap() / 989e12;
            assert!(flops > 0.0 && (v["mfu"].as_f64().unwrap() - mfu).abs() <= 1e-9 * mfu);
            assert!(v["flops"]["vision"].as_f64().unwrap() > 0.0);
            let (t, n) = (
                v["trainable_params"].as_u64().unwrap(),
                v["total_params"].as_u64().unwrap(),
            );
            if mode == "full" {
                // Everything but V2.0's fixed query position table (never trained).
                let frozen = if version == "2.0" { 64 * 256 } else { 0 };
                assert_eq!(t + frozen, n, "{version}");
            } else {
                assert!(t < n, "LoRA trains {t} of {n}");
            }
            lines.push(v);
        }
    }
    let written: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written, lines);
    // The offloaded optimizer (state in host memory): on the CPU the same steps, bit for bit.
    let o = tiny_bench(MODELS[0].0, &["--offload-optimizer"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(v["offload_optimizer"], true);
    assert_eq!(lines[0]["offload_optimizer"], false);
    assert_eq!(v["loss_first"], lines[0]["loss_first"]);
    assert_eq!(v["loss_last"], lines[0]["loss_last"]);
    // A CPU-only build says how to get CUDA.
    if !cfg!(feature = "cuda") {
        let o = train(&[
            "bench",
            "--like",
            MODELS[0].0,
            "--size",
            "tiny",
            "--device",
            "cuda",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--features cuda"),
            "{err}"
        );
    }
}
