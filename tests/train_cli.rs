//! `train` end to end on the CPU: the bundled example data through `prep build` (library) into
//! shards, then the `train` binary on tiny checkpoints written by `train init-model`.

use cpmv_model::{LoadOptions, MiniCpmV};
use cpmv_train::data::{epoch_order, make_batch, Dataset};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(args: &[&str]) -> Output {
    train_env(args, &[])
}

fn train_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.current_dir(root()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("train runs")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "train failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Shared fixtures: shards of the example data for 2.6, 2.5 and 2.0 (no slicing, to keep
/// the CPU runs short) and tiny checkpoints of both.
struct Fx {
    _tmp: tempfile::TempDir,
    shards: PathBuf,
    shards_25: PathBuf,
    shards_20: PathBuf,
    model: PathBuf,
}

fn build_shards(model: &str, out: &Path) {
    let opts = cpmv_prep::config::BuildOptions {
        data: vec![root().join("examples/data/train.json")],
        image_root: None,
        model: root().join(model),
        out: out.to_path_buf(),
        prep: cpmv_prep::config::PrepPreset {
            max_slice_nums: Some(1),
            max_length: Some(1024),
            ..Default::default()
        },
        threads: Some(2),
        overwrite: true,
        progress: false,
    };
    cpmv_prep::build::build(&opts).expect("prep build");
}

fn fx() -> &'static Fx {
    static FX: OnceLock<Fx> = OnceLock::new();
    FX.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let shards = tmp.path().join("shards");
        let shards_25 = tmp.path().join("shards-25");
        build_shards("examples/models/minicpm-v-2_6-tiny", &shards);
        build_shards("examples/models/minicpm-llama3-v-2_5-tiny", &shards_25);
        let shards_20 = tmp.path().join("shards-20");
        build_shards("examples/models/minicpm-v-2-tiny", &shards_20);
        let model = tmp.path().join("model");
        ok(&train(&[
            "init-model",
            "--like",
            "examples/models/minicpm-v-2_6-tiny",
            "--out",
            s(&model),
        ]));
        Fx {
            _tmp: tmp,
            shards,
            shards_25,
            shards_20,
            model,
        }
    })
}

/// Largest absolute element of an f32 tensor.
fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn log_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(run: &Path) -> Vec<(u64, f64)> {
    log_lines(run)
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn full_fine_tune_overfits_the_example_and_writes_a_loadable_checkpoint() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = ok(&train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--eval-shards",
        s(&f.shards),
        "--eval-every",
        "10",
        "--tune-llm",
        "true",
        "--learning-rate",
        "2e-3",
        "--schedule",
        "constant",
        "--max-steps",
        "30",
        "--save-every",
        "10",
        "--keep-last",
        "2",
        "--quiet",
    ]));
    let losses = train_losses(&run);
    assert_eq!(losses.len(), 30);
    let first = losses[0].1;
    let last = losses[losses.len() - 3..].iter().map(|l| l.1).sum::<f64>() / 3.0;
    eprintln!("full fine-tune: loss {first:.3} -> {last:.3} (mean of the last 3); {out}");
    assert!(last < 0.5 * first, "loss did not fall: {first} -> {last}");
    let evals: Vec<f64> = log_lines(&run)
        .iter()
        .filter(|v| v["kind"] == "eval")
        .map(|v| v["eval_loss"].as_f64().or(v["loss"].as_f64()).unwrap())
        .collect();
    assert_eq!(evals.len(), 3, "eval at steps 10, 20, 30");
    assert!(evals[2] < evals[0]);
    // keep-last 2: checkpoints 20 and 30 remain.
    let ck = cpmv_train::checkpoint::checkpoints(&run);
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 30]);
    // The final model: original names and dtype, config with the shards' max_slice_nums,
    // tokenizer files unchanged; loads and has learned.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["slice_config"]["max_slice_nums"], 1);
    assert_eq!(
        std::fs::read(run.join("tokenizer.json")).unwrap(),
        std::fs::read(f.model.join("tokenizer.json")).unwrap()
    );
    let base = cpmv_model::weights::Checkpoint::open(&f.model).unwrap();
    let tuned = cpmv_model::weights::Checkpoint::open(&run).unwrap();
    assert_eq!(
        base.names().collect::<Vec<_>>(),
        tuned.names().collect::<Vec<_>>()
    );
    assert!(run.join("loss.png").exists());
    assert!(std::fs::read_dir(run.join("tb")).unwrap().count() >= 1);
    let model = MiniCpmV::load(&run, &LoadOptions::default()).unwrap();
    let data = Dataset::open(&f.shards).unwrap();
    let (el, _) = cpmv_train::trainer::evaluate(&model, &data).unwrap();
    assert!(
        (el - evals[2]).abs() < 1e-3 * evals[2].max(1.0),
        "{el} vs {}",
        evals[2]
    );
}

#[test]
fn first_logged_loss_equals_the_model_forward_loss() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--max-steps",
        "1",
        "--seed",
        "9",
        "--quiet",
    ]));
    let logged = train_losses(&run)[0].1;
    let data = Dataset::open(&f.shards).unwrap();
    let first = epoch_order(data.packs.len(), 9, 0)[0];
    let model = MiniCpmV::load(&f.model, &LoadOptions::default()).unwrap();
    let (batch, _, _) = make_batch(&data, &[first], 14).unwrap();
    let want = model
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (logged - want).abs() < 1e-6 * want,
        "logged {logged} vs forward {want}"
    );
}

/// N steps straight equals N/2 steps, stop, resume, N/2 steps: bit-identical (LoRA, with
/// dropout, so the generator state is part of what must be restored).
#[test]
fn resume_is_bit_identical() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let common = |run: &Path, steps: &str| {
        vec![
            "--shards".to_string(),
            s(&f.shards).into(),
            "--model".into(),
            s(&f.model).into(),
            "--output".into(),
            s(run).into(),
            "--mode".into(),
            "lora".into(),
            "--lora-r".into(),
            "4".into(),
            "--learning-rate".into(),
            "1e-3".into(),
            "--warmup-steps".into(),
            "3".into(),
            "--save-every".into(),
            "3".into(),
            "--max-steps".into(),
            steps.into(),
            "--quiet".into(),
        ]
    };
    let args = common(&a, "6");
    ok(&train(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let args = common(&b, "3");
    ok(&train(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let mut args = common(&b, "6");
    args.push("--resume".into());
    ok(&train(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    // Every tensor (weights, LoRA, moments) bit-identical. (The optimiser file's metadata
    // is a JSON map whose key order is not fixed, so files are compared tensor by tensor.)
    for file in [
        "trainable.safetensors",
        "optimizer.safetensors",
        "adapter_model.safetensors",
    ] {
        let load = |run: &Path| {
            candle_core::safetensors::load(
                run.join("checkpoint-6").join(file),
                &candle_core::Device::Cpu,
            )
            .unwrap()
        };
        let (ta, tb) = (load(&a), load(&b));
        assert_eq!(ta.len(), tb.len(), "{file}");
        for (k, x) in &ta {
            let y = &tb[k];
            let same = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .eq(y
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits()));
            assert!(same, "{file}: `{k}` differs after resume");
        }
    }
    let la = train_losses(&a);
    let lb = train_losses(&b);
    assert_eq!(
        la, lb,
        "the resumed log must continue the same losses, once each"
    );
}

#[test]
fn lora_adapter_merges_into_a_checkpoint_with_the_same_outputs() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--mode",
        "lora",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--learning-rate",
        "5e-3",
        "--schedule",
        "constant",
        "--max-steps",
        "8",
        "--quiet",
    ]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert!(Path::new(cfg["base_model_name_or_path"].as_str().unwrap()).is_absolute());
    let merged = tmp.path().join("merged");
    ok(&train(&[
        "merge-lora",
        "--model",
        s(&f.model),
        "--adapter",
        s(&run),
        "--out",
        s(&merged),
    ]));
    // A bare PEFT directory (adapter files only) merges into a complete checkpoint: the
    // tokenizer and processor files come from the base.
    let bare = tmp.path().join("bare-adapter");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(run.join(f), bare.join(f)).unwrap();
    }
    let merged_bare = tmp.path().join("merged-bare");
    ok(&train(&[
        "merge-lora",
        "--model",
        s(&f.model),
        "--adapter",
        s(&bare),
        "--out",
        s(&merged_bare),
    ]));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "config.json",
    ] {
        assert!(
            merged_bare.join(f).exists(),
            "merge of a bare adapter lacks {f}"
        );
    }
    let data = Dataset::open(&f.shards).unwrap();
    let adapted =
        cpmv_train::checkpoint::load_with_adapter(&f.model, &run, Default::default()).unwrap();
    let merged_m = MiniCpmV::load(&merged, &LoadOptions::default()).unwrap();
    let base = MiniCpmV::load(&f.model, &LoadOptions::default()).unwrap();
    let (la, _) = cpmv_train::trainer::evaluate(&adapted, &data).unwrap();
    let (lm, _) = cpmv_train::trainer::evaluate(&merged_m, &data).unwrap();
    let (lb, _) = cpmv_train::trainer::evaluate(&base, &data).unwrap();
    eprintln!("LoRA: base {lb:.4}, adapter {la:.4}, merged {lm:.4}");
    assert!((la - lm).abs() < 1e-4 * la, "adapter {la} vs merged {lm}");
    assert!(
        la < lb,
        "the adapter did not lower the training loss: {la} vs base {lb}"
    );
    // train eval: the adapter on its base and the merged checkpoint give the same per-sample
    // losses, lower than the base model's.
    let with_adapter = per_sample(&eval_json(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--adapter",
        s(&run),
    ]));
    let merged_eval = per_sample(&eval_json(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&merged),
    ]));
    let base_eval = per_sample(&eval_json(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
    ]));
    let mut lower = 0;
    for ((a, m), b) in with_adapter.iter().zip(&merged_eval).zip(&base_eval) {
        assert_eq!(a.0, m.0);
        assert!(
            (a.1 - m.1).abs() < 1e-4 * a.1,
            "{}: adapter {} vs merged {}",
            a.0,
            a.1,
            m.1
        );
        lower += usize::from(a.1 < b.1);
    }
    assert!(
        lower * 10 >= with_adapter.len() * 8,
        "the adapter lowered only {lower} samples' loss"
    );

    // PEFT's own loader accepts the adapter, and the merged checkpoint reproduces it. With
    // CPMV_PYTHON set (CI installs torch + peft there) a missing package is a failure; without
    // it, the system python is tried and missing packages skip with a message.
    let (py, strict) = match std::env::var("CPMV_PYTHON") {
        Ok(p) => (p, true),
        Err(_) => ("python3".to_string(), false),
    };
    let mut args = vec![
        "scripts/check_peft.py",
        "--base",
        s(&f.model),
        "--adapter",
        s(&run),
        "--merged",
        s(&merged),
    ];
    if !strict {
        args.push("--allow-skip");
    }
    match Command::new(&py).current_dir(root()).args(&args).output() {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(
                o.status.success(),
                "check_peft.py failed:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            eprintln!("check_peft.py: {}", out.lines().last().unwrap_or(""));
        }
        Err(e) if !strict => eprintln!("SKIP: cannot run {py}: {e}"),
        Err(e) => panic!("cannot run {py}: {e}"),
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_with_less_memory() {
    let f = fx();
    let data = Dataset::open(&f.shards).unwrap();
    // The longest pack: activations dominate.
    let p = (0..data.packs.len())
        .max_by_key(|&i| data.packs[i].tokens)
        .unwrap();
    let (batch, _, _) = make_batch(&data, &[p], 14).unwrap();
    let opts = LoadOptions {
        trainable: cpmv_model::Trainable::ALL,
        lora: None,
        ..Default::default()
    };
    let model = MiniCpmV::load(&f.model, &opts).unwrap();
    let vars = model.params().trainable_vars();
    let mut plain = cpmv_train::trainer::Accum::default();
    let mut ckpt = cpmv_train::trainer::Accum::default();
    let l1 =
        cpmv_train::trainer::micro_step(&model, &batch, 1.0, false, &vars, &mut plain).unwrap();
    let l2 = cpmv_train::trainer::micro_step(&model, &batch, 1.0, true, &vars, &mut ckpt).unwrap();
    assert_eq!(l1, l2);
    let (g1, g2) = (plain.into_store(&vars), ckpt.into_store(&vars));
    for (name, v) in &vars {
        let d =
            max_abs(&(g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap());
        assert!(d <= 1e-6, "{name}: gradients differ by {d}");
    }
    // LoRA with dropout (vision trained whole too): the recomputation replays the same masks,
    // and the generator ends where the plain pass leaves it.
    let lora = LoadOptions {
        trainable: cpmv_model::Trainable {
            vision: true,
            resampler: true,
            llm: false,
            embeddings: true,
        },
        lora: Some(cpmv_model::LoraConfig {
            r: 4,
            dropout: 0.3,
            ..Default::default()
        }),
        seed: 5,
        ..Default::default()
    };
    let m = MiniCpmV::load(&f.model, &lora).unwrap();
    let vars = m.params().trainable_vars();
    let start = m.dropout_state();
    let mut plain = cpmv_train::trainer::Accum::default();
    cpmv_train::trainer::micro_step(&m, &batch, 1.0, false, &vars, &mut plain).unwrap();
    let after_plain = m.dropout_state();
    m.set_dropout_state(start);
    let mut ckpt = cpmv_train::trainer::Accum::default();
    cpmv_train::trainer::micro_step(&m, &batch, 1.0, true, &vars, &mut ckpt).unwrap();
    assert_eq!(m.dropout_state(), after_plain);
    assert_ne!(after_plain, start, "dropout drew nothing");
    let (g1, g2) = (plain.into_store(&vars), ckpt.into_store(&vars));
    for (name, v) in &vars {
        let d =
            max_abs(&(g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap());
        assert!(d <= 1e-6, "LoRA {name}: gradients differ by {d}");
    }
    // Peak memory of whole runs, each in its own process.
    let peak = |ckpt: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let mut args = vec![
            "--shards",
            s(&f.shards),
            "--model",
            s(&f.model),
            "--output",
            s(&run),
            "--tune-llm",
            "true",
            "--max-steps",
            "2",
            "--quiet",
        ];
        if ckpt {
            args.push("--grad-checkpointing");
        }
        ok(&train(&args));
        log_lines(&run).last().unwrap()["peak_mem_bytes"]
            .as_u64()
            .unwrap()
    };
    let (without, with) = (peak(false), peak(true));
    eprintln!(
        "gradient checkpointing: peak memory {:.0} MiB -> {:.0} MiB",
        without as f64 / 1048576.0,
        with as f64 / 1048576.0
    );
    assert!(
        with < without,
        "checkpointing did not lower the peak: {with} vs {without}"
    );
}

#[test]
fn bad_inputs_give_clear_errors_and_no_corrupt_checkpoint() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Shards of another tokenizer (2.5) for a 2.6 model.
    let o = train(&[
        "--shards",
        s(&f.shards_25),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--max-steps",
        "1",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("tokenizer fingerprint"), "{err}");
    // A model directory without its weights.
    let broken = tmp.path().join("noweights");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&f.model).unwrap().flatten() {
        if !e.file_name().to_string_lossy().ends_with(".safetensors") {
            std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
        }
    }
    let o = train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&broken),
        "--output",
        s(&run),
        "--max-steps",
        "1",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    // A corrupt shard.
    let bad = tmp.path().join("bad-shards");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(&f.shards).unwrap().flatten() {
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let arrow = std::fs::read_dir(&bad)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".arrow"))
        .unwrap()
        .path();
    let bytes = std::fs::read(&arrow).unwrap();
    std::fs::write(&arrow, &bytes[..bytes.len() / 2]).unwrap();
    let o = train(&[
        "--shards",
        s(&bad),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--max-steps",
        "1",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(arrow.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    // A full disk while saving the second checkpoint: clear error, the first checkpoint intact,
    // no partial directory left.
    let o = train_env(
        &[
            "--shards",
            s(&f.shards),
            "--model",
            s(&f.model),
            "--output",
            s(&run),
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--quiet",
        ],
        &[("CPMV_FAULT_FULL_DISK_AT_STEP", "4")],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let ck = cpmv_train::checkpoint::checkpoints(&run);
    assert_eq!(ck.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2]);
    assert!(!run.join("checkpoint-4.partial").exists());
    MiniCpmV::load(&ck[0].1, &LoadOptions::default()).unwrap();
    // A LoRA target that matches no module is an error, not a run without adapters.
    let o = train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&tmp.path().join("y")),
        "--mode",
        "lora",
        "--lora-target",
        "q_proj",
        "--max-steps",
        "1",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("matches no module"), "{err}");
    // LoRA with --tune-llm true is refused as the reference refuses it.
    let o = train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&tmp.path().join("x")),
        "--mode",
        "lora",
        "--tune-llm",
        "true",
        "--max-steps",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("refuses"), "{err}");
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["eval", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(&train(&a))).expect("eval --json prints JSON")
}

fn per_sample(v: &serde_json::Value) -> Vec<(String, f64, f64, u64)> {
    v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["loss"].as_f64().unwrap_or(f64::NAN),
                s["loss_sum"].as_f64().unwrap(),
                s["n_tokens"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `train eval` agrees with the model crate's forward loss (per sample) and with the first
/// logged training loss (the same pack, evaluated with --pack).
#[test]
fn eval_agrees_with_the_forward_loss_and_the_first_training_step() {
    let f = fx();
    let v = eval_json(&["--shards", s(&f.shards), "--model", s(&f.model)]);
    let rows = per_sample(&v);
    let data = Dataset::open(&f.shards).unwrap();
    assert_eq!(rows.len(), data.samples());
    // Sample 0 alone through the model crate.
    let model = MiniCpmV::load(&f.model, &LoadOptions::default()).unwrap();
    let s0 = data.shards.sample(0).unwrap();
    let single = cpmv_train::data::Pack {
        rows: vec![0],
        tokens: s0.input_ids.len(),
    };
    let one = Dataset {
        shards: cpmv_shard::reader::ShardDir::open(&f.shards).unwrap(),
        packs: vec![single],
    };
    let (batch, _, _) = make_batch(&one, &[0], 14).unwrap();
    let want = model
        .loss(&batch, false)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert_eq!(rows[0].0, s0.id);
    assert!(
        (rows[0].1 - want).abs() < 1e-5 * want,
        "{} vs {want}",
        rows[0].1
    );
    // The first training step's pack, evaluated as trained.
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    ok(&train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--output",
        s(&run),
        "--max-steps",
        "1",
        "--seed",
        "9",
        "--quiet",
    ]));
    let logged = train_losses(&run)[0].1;
    let packed = per_sample(&eval_json(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&f.model),
        "--pack",
    ]));
    let first = epoch_order(data.packs.len(), 9, 0)[0];
    assert!(
        data.packs[first].rows.len() > 1,
        "the pack must hold several samples"
    );
    let (mut sum, mut n) = (0.0, 0);
    for &r in &data.packs[first].rows {
        sum += packed[r].2;
        n += packed[r].3;
    }
    let pack_loss = sum / n as f64;
    assert!(
        (pack_loss - logged).abs() < 1e-5 * logged,
        "eval --pack {pack_loss} vs logged {logged}"
    );
    // The JSON follows its schema (checked from Python in CI); the keys are there.
    for k in [
        "mean_loss",
        "token_mean_loss",
        "model",
        "adapter",
        "shards",
        "packed",
    ] {
        assert!(v.get(k).is_some(), "no `{k}`");
    }
}

/// Per-sample losses match the PyTorch model (strictly loaded from the same checkpoint files)
/// to 1e-4 relative, for the three versions' tiny checkpoints.
#[test]
fn eval_matches_pytorch_per_sample() {
    let (py, strict) = match std::env::var("CPMV_PYTHON") {
        Ok(p) => (p, true),
        Err(_) => ("python3".to_string(), false),
    };
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("examples/models/minicpm-v-2_6-tiny", f.shards.clone()),
        (
            "examples/models/minicpm-llama3-v-2_5-tiny",
            f.shards_25.clone(),
        ),
        ("examples/models/minicpm-v-2-tiny", f.shards_20.clone()),
    ];
    for (like, shards) in cases {
        let model = tmp.path().join(like.rsplit('/').next().unwrap());
        ok(&train(&[
            "init-model",
            "--like",
            like,
            "--seed",
            "3",
            "--out",
            s(&model),
        ]));
        let ours = per_sample(&eval_json(&["--shards", s(&shards), "--model", s(&model)]));
        let out = tmp.path().join("ref.json");
        let mut args = vec![
            "scripts/reference_eval.py",
            "--shards",
            s(&shards),
            "--model",
            s(&model),
            "--out",
            s(&out),
        ];
        if !strict {
            args.push("--allow-skip");
        }
        let o = match Command::new(&py).current_dir(root()).args(&args).output() {
            Ok(o) => o,
            Err(e) if !strict => {
                eprintln!("SKIP: cannot run {py}: {e}");
                return;
            }
            Err(e) => panic!("cannot run {py}: {e}"),
        };
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "reference_eval.py failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        if stdout.contains("SKIP") {
            eprintln!("{}", stdout.trim());
            return;
        }
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let theirs = per_sample(&reference);
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.3, b.3, "{}: supervised token counts differ", a.0);
            assert!(
                (a.1 - b.1).abs() <= 1e-4 * b.1.abs(),
                "{like} {}: {} vs PyTorch {}",
                a.0,
                a.1,
                b.1
            );
        }
        eprintln!("{like}: {} per-sample losses match PyTorch", ours.len());
    }
}

/// A NaN weight: the run stops at step 1 naming the batch's samples; with --skip-nonfinite it
/// skips, counts, and gives up after a bounded number of consecutive bad steps.
#[test]
fn non_finite_loss_stops_or_is_skipped() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("nan-model");
    ok(&train(&[
        "init-model",
        "--like",
        "examples/models/minicpm-v-2_6-tiny",
        "--out",
        s(&model),
    ]));
    let ck = cpmv_model::weights::Checkpoint::open(&model).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = ck
        .names()
        .map(|n| {
            (
                n.to_string(),
                ck.load(n, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap(),
            )
        })
        .collect();
    drop(ck);
    for (n, t) in &mut tensors {
        if n == "llm.model.norm.weight" {
            *t = (t.ones_like().unwrap() * f64::NAN).unwrap();
        }
    }
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    cpmv_model::weights::save_tensors(&model, &tensors, None).unwrap();
    let run = tmp.path().join("run");
    let o = train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&model),
        "--output",
        s(&run),
        "--max-steps",
        "2",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite loss at step 1; samples of the batch:"),
        "{err}"
    );
    let data = Dataset::open(&f.shards).unwrap();
    let first = epoch_order(data.packs.len(), 42, 0)[0];
    let id = data
        .shards
        .sample(data.packs[first].rows[0])
        .unwrap()
        .id
        .to_string();
    assert!(err.contains(&id), "{err} should name {id}");
    let o = train(&[
        "--shards",
        s(&f.shards),
        "--model",
        s(&model),
        "--output",
        s(&tmp.path().join("run2")),
        "--max-steps",
        "2",
        "--skip-nonfinite",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("20 consecutive steps"), "{err}");
}

/// Two packs as one micro-batch, or as two accumulated micro-batches weighted by their token
/// share (`--loss-norm tokens`): the same objective, so the same loss and gradients. The
/// logged loss of such a run equals the big batch's loss too.
#[test]
fn gradient_accumulation_with_token_normalisation_equals_one_big_batch() {
    use cpmv_train::trainer::{micro_step, Accum};
    let f = fx();
    let data = Dataset::open(&f.shards).unwrap();
    assert!(data.packs.len() >= 2);
    let opts = LoadOptions {
        trainable: cpmv_model::Trainable::ALL,
        ..Default::default()
    };
    let model = MiniCpmV::load(&f.model, &opts).unwrap();
    let vars = model.params().trainable_vars();
    let (big, _, _) = make_batch(&data, &[0, 1], 14).unwrap();
    let mut one = Accum::default();
    let l_big = micro_step(&model, &big, 1.0, false, &vars, &mut one).unwrap();
    let parts: Vec<_> = [0usize, 1]
        .iter()
        .map(|&p| make_batch(&data, &[p], 14).unwrap().0)
        .collect();
    let total: usize = parts.iter().map(|b| b.supervised()).sum();
    let mut acc = Accum::default();
    let mut l_acc = 0.0;
    for b in &parts {
        let w = b.supervised() as f64 / total as f64;
        l_acc += w * micro_step(&model, b, w, false, &vars, &mut acc).unwrap();
    }
    assert!(
        (l_big - l_acc).abs() < 1e-5 * l_big,
        "loss {l_big} vs accumulated {l_acc}"
    );
    let (g1, g2) = (one.into_store(&vars), acc.into_store(&vars));
    for (name, v) in &vars {
        let (a, b) = (
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        let scale = max_abs(a);
        let d = max_abs(&(a - b).unwrap());
        assert!(d <= 1e-4 * scale.max(1e-6), "{name}: {d} (max |g| {scale})");
    }
}

/// 2.0 and 2.5 train too (MiniCPM scalings, the 2.5 per-sample vision batches) and their
/// adapters load with PEFT and merge.
#[test]
fn v2_0_and_v2_5_train_lora_and_write_peft_adapters() {
    let f = fx();
    let tmp = tempfile::tempdir().unwrap();
    let python = std::env::var("CPMV_PYTHON").ok();
    for (like, shards) in [
        ("examples/models/minicpm-v-2-tiny", &f.shards_20),
        ("examples/models/minicpm-llama3-v-2_5-tiny", &f.shards_25),
    ] {
        let name = like.rsplit('/').next().unwrap();
        let model = tmp.path().join(format!("{name}-model"));
        let run = tmp.path().join(format!("{name}-run"));
        ok(&train(&["init-model", "--like", like, "--out", s(&model)]));
        ok(&train(&[
            "--shards",
            s(shards),
            "--model",
            s(&model),
            "--output",
            s(&run),
            "--mode",
            "lora",
            "--lora-r",
            "4",
            "--learning-rate",
            "1e-2",
            "--schedule",
            "constant",
            "--max-steps",
            "4",
            "--quiet",
        ]));
        let losses = train_losses(&run);
        assert_eq!(losses.len(), 4, "{name}");
        assert!(losses.iter().all(|l| l.1.is_finite()), "{name}: {losses:?}");
        let merged = tmp.path().join(format!("{name}-merged"));
        ok(&train(&[
            "merge-lora",
            "--model",
            s(&model),
            "--adapter",
            s(&run),
            "--out",
            s(&merged),
        ]));
        if let Some(py) = &python {
            let o = Command::new(py)
                .current_dir(root())
                .args([
                    "scripts/check_peft.py",
                    "--base",
                    s(&model),
                    "--adapter",
                    s(&run),
                    "--merged",
                    s(&merged),
                ])
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(
                o.status.success(),
                "{name}: check_peft.py failed:\n{out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
            eprintln!("{name}: check_peft.py {}", out.lines().last().unwrap_or(""));
        }
    }
}
