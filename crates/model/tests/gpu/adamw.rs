//! cpmv-optim's AdamW on CUDA parameters (its multi-tensor kernel, `cpmv_kernels::adamw_multi`:
//! all parameters of a dtype in one launch) against the same optimiser on the CPU (whose torch
//! semantics the optim crate's own tests check): five steps of f32 and bf16 parameters (bf16 with
//! an f32 master), with and without decay, a clip scale, one parameter longer than a kernel
//! chunk, and one step where a parameter has no gradient (its own step count then lags, so the
//! parameters of one launch have different bias corrections).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_optim::{AdamW, AdamWConfig};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

const PARAMS: [(&str, usize, DType); 3] = [
    ("a", 1000, DType::F32),
    ("b", 70_001, DType::BF16),
    ("c.bias", 77, DType::BF16),
];
const CFG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

fn init(i: usize, device: &Device) -> Tensor {
    let (_, len, dt) = PARAMS[i];
    Tensor::from_vec(values(len, i as u64 + 1), len, device)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn grad(i: usize, step: u64, device: &Device) -> Option<Tensor> {
    let (name, len, dt) = PARAMS[i];
    if step == 2 && name == "c.bias" {
        return None;
    }
    Some(
        Tensor::from_vec(values(len, 100 + step * 10 + i as u64), len, device)
            .unwrap()
            .to_dtype(dt)
            .unwrap(),
    )
}

fn lr(step: u64) -> f64 {
    1e-3 * (step + 1) as f64
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Five steps of cpmv-optim's AdamW on the parameters placed on `device`.
fn train(device: &Device) -> Vec<(String, Var)> {
    let params: Vec<(String, Var)> = (0..3)
        .map(|i| {
            (
                PARAMS[i].0.to_string(),
                Var::from_tensor(&init(i, device)).unwrap(),
            )
        })
        .collect();
    let mut opt = AdamW::new(params.clone(), CFG, decays).unwrap();
    for step in 0..5 {
        let mut g = GradStore::default();
        for (i, (_, v)) in params.iter().enumerate() {
            if let Some(t) = grad(i, step, device) {
                g.insert(v.as_tensor(), t);
            }
        }
        opt.step(&g, lr(step), 0.7).unwrap();
    }
    params
}

fn decays(name: &str) -> bool {
    !name.ends_with("bias")
}

#[test]
fn fused_adamw_matches_the_cpu_optimiser() {
    let params = train(&Device::Cpu);
    let gparams = train(&Device::new_cuda(0).expect("needs a CUDA GPU"));
    for i in 0..3 {
        let (name, _, dt) = PARAMS[i];
        let p = gparams[i].1.as_tensor();
        let got = host(p);
        let want = host(params[i].1.as_tensor());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("adamw {name} ({dt:?}): max |gpu - cpu| = {worst:.3e}");
        // f32: a few ulps of the f32 math; bf16: the rounded value may differ by one bf16 step.
        let tol = if dt == DType::F32 { 1e-6 } else { 8e-3 };
        assert!(worst <= tol, "{name}: {worst}");
    }
}
