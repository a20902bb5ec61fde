//! Parity with torch and transformers: fixtures written by
//! `scripts/fixtures/gen_optim_fixtures.py` into `tests/fixtures/optim/`.

use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use cpmv_optim::clip::{clip_factor, global_norm};
use cpmv_optim::{AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/optim")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/fixtures/gen_optim_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Deserialize)]
struct Arr {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Arr {
    fn tensor(&self) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(data, self.shape.as_slice(), &Device::Cpu)
    }
}

/// Largest |got − want| / |want| over `want` (entries where want is 0 must match exactly).
fn max_rel_err(got: &Tensor, want: &Arr) -> candle_core::Result<f64> {
    assert_eq!(got.dims(), want.shape.as_slice());
    let got = got.flatten_all()?.to_vec1::<f32>()?;
    Ok(got
        .iter()
        .zip(&want.data)
        .map(|(&g, &w)| {
            let err = (g as f64 - w).abs();
            if w == 0.0 {
                if err == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                err / w.abs()
            }
        })
        .fold(0.0, f64::max))
}

#[derive(Deserialize)]
struct AdamWFixture {
    config: AdamWConfig,
    init: Params,
    steps: Vec<Step>,
    variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct Params {
    weight: Arr,
    bias: Arr,
}

#[derive(Deserialize)]
struct Step {
    lr: f64,
    grad_scale: f64,
    grads: Params,
}

#[derive(Deserialize)]
struct Variant {
    name: String,
    bias_decay: bool,
    params_after: Vec<Params>,
}

#[test]
fn adamw_matches_torch() -> TestResult {
    let fx: AdamWFixture = fixture("adamw.json");
    assert_eq!(
        fx.config,
        AdamWConfig::default(),
        "fixture uses the reference defaults"
    );
    for variant in &fx.variants {
        let weight = Var::from_tensor(&fx.init.weight.tensor()?)?;
        let bias = Var::from_tensor(&fx.init.bias.tensor()?)?;
        let params = vec![
            ("weight".to_string(), weight.clone()),
            ("bias".to_string(), bias.clone()),
        ];
        let bias_decay = variant.bias_decay;
        let mut opt = AdamW::new(params, fx.config.clone(), |n| bias_decay || n != "bias")?;
        for (k, (step, want)) in fx.steps.iter().zip(&variant.params_after).enumerate() {
            let mut grads = GradStore::default();
            grads.insert(weight.as_tensor(), step.grads.weight.tensor()?);
            grads.insert(bias.as_tensor(), step.grads.bias.tensor()?);
            opt.step(&grads, step.lr, step.grad_scale)?;
            let ew = max_rel_err(weight.as_tensor(), &want.weight)?;
            let eb = max_rel_err(bias.as_tensor(), &want.bias)?;
            println!(
                "{} step {}: max rel err weight {ew:.2e} bias {eb:.2e}",
                variant.name,
                k + 1
            );
            assert!(
                ew <= 1e-6 && eb <= 1e-6,
                "{} step {}: weight {ew:e}, bias {eb:e}",
                variant.name,
                k + 1
            );
        }
        assert_eq!(opt.steps(), fx.steps.len() as u64);
    }
    Ok(())
}

#[derive(Deserialize)]
struct SchedulesFixture {
    cases: Vec<ScheduleCase>,
    warmup_from_ratio: Vec<RatioCase>,
}

#[derive(Deserialize)]
struct ScheduleCase {
    kind: ScheduleKind,
    max_lr: f64,
    warmup_steps: u64,
    total_steps: u64,
    lrs: Vec<f64>,
}

#[derive(Deserialize)]
struct RatioCase {
    ratio: f64,
    total: u64,
    warmup: u64,
}

#[test]
fn schedules_match_transformers_and_deepspeed() {
    let fx: SchedulesFixture = fixture("schedules.json");
    assert_eq!(fx.cases.len(), 5);
    for case in &fx.cases {
        let sched = LrSchedule {
            kind: case.kind,
            max_lr: case.max_lr,
            warmup_steps: case.warmup_steps,
            total_steps: case.total_steps,
        };
        let mut exact = 0;
        for (i, &want) in case.lrs.iter().enumerate() {
            let k = i as u64 + 1;
            let got = sched.lr_at(k);
            exact += usize::from(got == want);
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{:?} warmup {} step {k}: got {got:e}, want {want:e}",
                case.kind,
                case.warmup_steps
            );
        }
        println!(
            "{:?} warmup {}: {exact}/{} bit-exact",
            case.kind,
            case.warmup_steps,
            case.lrs.len()
        );
    }
    for c in &fx.warmup_from_ratio {
        assert_eq!(
            LrSchedule::warmup_from_ratio(c.ratio, c.total),
            c.warmup,
            "ratio {} total {}",
            c.ratio,
            c.total
        );
    }
}

#[derive(Deserialize)]
struct ClipFixture {
    cases: Vec<ClipCase>,
}

#[derive(Deserialize)]
struct ClipCase {
    name: String,
    max_norm: f64,
    grads: ClipPair,
    norm: f64,
    clipped: ClipPair,
}

#[derive(Deserialize)]
struct ClipPair {
    a: Arr,
    b: Arr,
}

#[test]
fn clipping_matches_torch() -> TestResult {
    let fx: ClipFixture = fixture("clip.json");
    for case in &fx.cases {
        let a = Var::zeros(
            case.grads.a.shape.as_slice(),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        let b = Var::zeros(
            case.grads.b.shape.as_slice(),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let (ga, gb) = (case.grads.a.tensor()?, case.grads.b.tensor()?);
        let mut grads = GradStore::default();
        grads.insert(a.as_tensor(), ga.clone());
        grads.insert(b.as_tensor(), gb.clone());

        let norm = global_norm(&grads, &params)?;
        let rel = (norm - case.norm).abs() / case.norm;
        assert!(
            rel <= 1e-6,
            "{}: norm {norm} vs torch {}",
            case.name,
            case.norm
        );
        let factor = clip_factor(norm, case.max_norm);
        if case.norm < case.max_norm {
            assert_eq!(factor, 1.0, "{}", case.name);
        }
        // The factor reaches the gradients as AdamW's grad_scale, i.e. an f32 multiply.
        let ea = max_rel_err(&ga.affine(factor, 0.0)?, &case.clipped.a)?;
        let eb = max_rel_err(&gb.affine(factor, 0.0)?, &case.clipped.b)?;
        println!(
            "{}: norm rel err {rel:.2e}, clipped max rel err {:.2e}",
            case.name,
            ea.max(eb)
        );
        assert!(
            ea <= 1e-6 && eb <= 1e-6,
            "{}: clipped values {ea:e} {eb:e}",
            case.name
        );
    }
    Ok(())
}
