//! Optimiser state: bit-identical resume, fp32 masters for bf16 vars, parameters without
//! gradients, and the errors of `load_state`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_optim::{AdamW, AdamWConfig, OptimError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Deterministic, step-dependent values of `shape` (no RNG needed).
fn wave(shape: &[usize], seed: f32) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 + 1.0) * 0.7 + seed * 1.3).sin() * (1.0 + seed * 0.1))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

fn bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    // f32 holds bf16 exactly, so comparing f32 bytes compares the bf16 values too.
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

const SHAPES: [(&str, &[usize], DType); 3] = [
    ("w", &[3, 4], DType::F32),
    ("norm.bias", &[4], DType::F32),
    ("h", &[2, 3], DType::BF16),
];

fn fresh_params(values: Option<&[Tensor]>) -> candle_core::Result<Vec<(String, Var)>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, shape, dtype))| {
            let init = match values {
                Some(v) => v[i].clone(),
                None => wave(shape, 100.0 + i as f32)?.to_dtype(*dtype)?,
            };
            // a fresh Var with its own storage, as a checkpoint load would give
            Ok((name.to_string(), Var::from_tensor(&init.copy()?)?))
        })
        .collect()
}

fn run_steps(opt: &mut AdamW, params: &[(String, Var)], steps: std::ops::Range<u32>) -> TestResult {
    for k in steps {
        let mut grads = GradStore::default();
        for (i, (_, var)) in params.iter().enumerate() {
            let g = wave(var.dims(), k as f32 + 10.0 * i as f32)?.to_dtype(var.dtype())?;
            grads.insert(var.as_tensor(), g);
        }
        let lr = 1e-2 * (1.0 + k as f64);
        let scale = if k % 2 == 0 { 0.5 } else { 1.0 };
        opt.step(&grads, lr, scale)?;
    }
    Ok(())
}

fn no_decay_bias(name: &str) -> bool {
    !name.ends_with(".bias")
}

#[test]
fn resume_is_bit_identical() -> TestResult {
    let dir = tempfile::tempdir()?;

    let straight = fresh_params(None)?;
    let mut opt = AdamW::new(straight.clone(), AdamWConfig::default(), no_decay_bias)?;
    run_steps(&mut opt, &straight, 0..6)?;
    let straight_state = dir.path().join("straight.safetensors");
    opt.save_state(&straight_state)?;

    let first = fresh_params(None)?;
    let mut opt = AdamW::new(first.clone(), AdamWConfig::default(), no_decay_bias)?;
    run_steps(&mut opt, &first, 0..3)?;
    let mid_state = dir.path().join("mid.safetensors");
    opt.save_state(&mid_state)?;
    let saved: Vec<Tensor> = first
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<Result<_, _>>()?;
    drop(opt);

    let resumed = fresh_params(Some(&saved))?;
    let mut opt = AdamW::new(resumed.clone(), AdamWConfig::default(), no_decay_bias)?;
    opt.load_state(&mid_state)?;
    assert_eq!(opt.steps(), 3);
    run_steps(&mut opt, &resumed, 3..6)?;
    assert_eq!(opt.steps(), 6);

    for ((name, a), (_, b)) in straight.iter().zip(&resumed) {
        assert_eq!(
            bytes(a.as_tensor())?,
            bytes(b.as_tensor())?,
            "{name} differs after resume"
        );
    }
    // moments and masters too
    let resumed_state = dir.path().join("resumed.safetensors");
    opt.save_state(&resumed_state)?;
    let a = candle_core::safetensors::load(&straight_state, &Device::Cpu)?;
    let b = candle_core::safetensors::load(&resumed_state, &Device::Cpu)?;
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "h.exp_avg",
            "h.exp_avg_sq",
            "h.master",
            "norm.bias.exp_avg",
            "norm.bias.exp_avg_sq",
            "w.exp_avg",
            "w.exp_avg_sq"
        ]
    );
    for (name, t) in &a {
        assert_eq!(bytes(t)?, bytes(&b[name])?, "{name} differs after resume");
    }
    Ok(())
}

#[test]
fn bf16_var_accumulates_in_fp32_master() -> TestResult {
    let dev = Device::Cpu;
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let half = Var::from_tensor(&Tensor::ones(2, DType::BF16, &dev)?)?;
    let full = Var::from_tensor(&Tensor::ones(2, DType::F32, &dev)?)?; // the same run in f32
    let params = vec![
        ("half".to_string(), half.clone()),
        ("full".to_string(), full.clone()),
    ];
    let mut opt = AdamW::new(params, cfg, |_| true)?;
    assert_eq!(opt.state_bytes(), 2 * 4 * 3 + 2 * 4 * 2);

    // One update is ≈ lr = 1e-4 relative: far below bf16's resolution at 1.0 (2⁻⁸ below it), so a
    // bf16 parameter updated in place would never move.
    let lr = 1e-4;
    let in_place = (Tensor::ones(2, DType::BF16, &dev)? - lr)?;
    assert_eq!(in_place.to_dtype(DType::F32)?.to_vec1::<f32>()?, [1.0, 1.0]);

    let mut first_change = None;
    for k in 1..=30 {
        let mut grads = GradStore::default();
        grads.insert(half.as_tensor(), Tensor::ones(2, DType::BF16, &dev)?);
        grads.insert(full.as_tensor(), Tensor::ones(2, DType::F32, &dev)?);
        opt.step(&grads, lr, 1.0)?;
        let h = half.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let f = full.as_tensor().to_vec1::<f32>()?;
        // The bf16 var is the f32 run rounded: its master follows the f32 run exactly.
        let rounded = full
            .as_tensor()
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        assert_eq!(h, rounded, "step {k}");
        assert!(
            f[0] < 1.0 - (k as f32 - 0.5) * 1e-4,
            "step {k}: the master moves every step ({})",
            f[0]
        );
        if h[0] != 1.0 && first_change.is_none() {
            first_change = Some(k);
        }
    }
    // 1 − 2⁻⁹ is the rounding midpoint: reached after ≈ 20 updates of 1e-4.
    assert_eq!(first_change, Some(20));
    assert_eq!(
        half.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?,
        [0.99609375; 2]
    );

    // The saved master is the f32 run bit for bit.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.safetensors");
    opt.save_state(&path)?;
    let st = candle_core::safetensors::load(&path, &dev)?;
    assert_eq!(bytes(&st["half.master"])?, bytes(full.as_tensor())?);
    assert!(
        !st.contains_key("full.master"),
        "f32 vars are their own master"
    );
    Ok(())
}

#[test]
fn param_without_grad_is_untouched() -> TestResult {
    let a = Var::from_tensor(&wave(&[4], 1.0)?)?;
    let b = Var::from_tensor(&wave(&[3], 2.0)?)?;
    let b_before = bytes(b.as_tensor())?;
    let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut opt = AdamW::new(params, AdamWConfig::default(), |_| true)?; // decay on: still untouched
    for k in 0..3 {
        let mut grads = GradStore::default();
        grads.insert(a.as_tensor(), wave(&[4], k as f32)?);
        opt.step(&grads, 0.1, 1.0)?;
    }
    assert_eq!(bytes(b.as_tensor())?, b_before);
    assert_ne!(bytes(a.as_tensor())?, bytes(&wave(&[4], 1.0)?)?);
    assert_eq!(opt.steps(), 3);

    // Its moments did not advance: its first real update is a first update (bias correction t = 1),
    // exactly what a fresh optimiser does.
    let gb = wave(&[3], 7.0)?;
    let mut grads = GradStore::default();
    grads.insert(b.as_tensor(), gb.clone());
    opt.step(&grads, 0.1, 1.0)?;
    let b2 = Var::from_tensor(&wave(&[3], 2.0)?)?;
    let mut fresh = AdamW::new(
        vec![("b".to_string(), b2.clone())],
        AdamWConfig::default(),
        |_| true,
    )?;
    let mut grads = GradStore::default();
    grads.insert(b2.as_tensor(), gb);
    fresh.step(&grads, 0.1, 1.0)?;
    assert_eq!(bytes(b.as_tensor())?, bytes(b2.as_tensor())?);
    Ok(())
}

#[test]
fn load_state_names_what_does_not_fit() -> TestResult {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state.safetensors");
    let x = Var::zeros((2, 2), DType::F32, &dev)?;
    let y = Var::zeros(3, DType::BF16, &dev)?;
    let opt = AdamW::new(
        vec![("x".to_string(), x), ("y".to_string(), y)],
        AdamWConfig::default(),
        |_| true,
    )?;
    opt.save_state(&path)?;
    assert!(!dir.path().join("state.safetensors.tmp").exists());

    let err = |params: Vec<(String, Var)>| -> Result<String, OptimError> {
        let mut o = AdamW::new(params, AdamWConfig::default(), |_| true)?;
        Ok(o.load_state(&path).expect_err("load must fail").to_string())
    };
    let z = |shape: &[usize], dtype| Var::zeros(shape, dtype, &dev);

    let msg = err(vec![
        ("x".into(), z(&[2, 2], DType::F32)?),
        ("y".into(), z(&[3], DType::BF16)?),
        ("q".into(), z(&[1], DType::F32)?),
    ])?;
    assert!(msg.contains("\"q.exp_avg\""), "{msg}");
    let msg = err(vec![
        ("x".into(), z(&[4], DType::F32)?),
        ("y".into(), z(&[3], DType::BF16)?),
    ])?;
    assert!(
        msg.contains("\"x.exp_avg\"") && msg.contains("[2, 2]"),
        "{msg}"
    );
    let msg = err(vec![("x".into(), z(&[2, 2], DType::F32)?)])?;
    assert!(msg.contains("\"y."), "{msg}");
    let msg = err(vec![
        ("x".into(), z(&[2, 2], DType::F32)?),
        ("y".into(), z(&[3], DType::F32)?),
    ])?;
    assert!(msg.contains("\"y.master\""), "{msg}");

    // a failed load changes nothing
    let v = Var::ones(4, DType::F32, &dev)?;
    let mut o = AdamW::new(
        vec![("x".into(), v.clone())],
        AdamWConfig::default(),
        |_| true,
    )?;
    assert!(o.load_state(&path).is_err());
    assert_eq!(o.steps(), 0);
    assert_eq!(v.as_tensor().to_vec1::<f32>()?, [1.0; 4]);

    let dup = vec![
        ("x".to_string(), z(&[1], DType::F32)?),
        ("x".to_string(), z(&[1], DType::F32)?),
    ];
    assert!(
        matches!(AdamW::new(dup, AdamWConfig::default(), |_| true), Err(OptimError::DuplicateParam(n)) if n == "x")
    );
    let int = vec![("i".to_string(), z(&[1], DType::U32)?)];
    assert!(matches!(
        AdamW::new(int, AdamWConfig::default(), |_| true),
        Err(OptimError::UnsupportedDtype { .. })
    ));
    Ok(())
}
