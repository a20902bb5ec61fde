//! The fused CUDA AdamW kernel against cpmv-optim's AdamW on the CPU (whose torch semantics
//! the optim crate's own tests check): five steps of f32 and bf16 parameters (bf16 with an f32
//! master), with and without decay, a clip scale, and one step where a parameter has no
//! gradient. The GPU side drives `cpmv_kernels::adamw_step` the way cpmv-optim's CUDA path does.

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
    ("b", 4099, DType::BF16),
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
    if step == 2 && name == "a" {
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

#[test]
fn fused_adamw_matches_the_cpu_optimiser() {
    let cpu = Device::Cpu;
    let params: Vec<(String, Var)> = (0..3)
        .map(|i| {
            (
                PARAMS[i].0.to_string(),
                Var::from_tensor(&init(i, &cpu)).unwrap(),
            )
        })
        .collect();
    let decays = |n: &str| !n.ends_with("bias");
    let mut opt = AdamW::new(params.clone(), CFG, decays).unwrap();
    for step in 0..5 {
        let mut g = GradStore::default();
        for (i, (_, v)) in params.iter().enumerate() {
            if let Some(t) = grad(i, step, &cpu) {
                g.insert(v.as_tensor(), t);
            }
        }
        opt.step(&g, lr(step), 0.7).unwrap();
    }

    let gpu = Device::new_cuda(0).expect("needs a CUDA GPU");
    for i in 0..3 {
        let (name, len, dt) = PARAMS[i];
        let p = init(i, &gpu);
        let master = (dt != DType::F32).then(|| p.to_dtype(DType::F32).unwrap());
        let m = Tensor::zeros(len, DType::F32, &gpu).unwrap();
        let v = Tensor::zeros(len, DType::F32, &gpu).unwrap();
        let mut t = 0u64;
        for step in 0..5 {
            let Some(g) = grad(i, step, &gpu) else {
                continue;
            };
            t += 1;
            let l = lr(step);
            let tf = t as f64;
            cpmv_kernels::adamw_step(
                &p,
                master.as_ref(),
                &m,
                &v,
                &g,
                cpmv_kernels::AdamWStep {
                    decay_factor: if decays(name) {
                        (1.0 - l * CFG.weight_decay) as f32
                    } else {
                        1.0
                    },
                    one_minus_beta1: (1.0 - CFG.beta1) as f32,
                    beta2: CFG.beta2 as f32,
                    one_minus_beta2: (1.0 - CFG.beta2) as f32,
                    eps: CFG.eps as f32,
                    step_size: (l / (1.0 - CFG.beta1.powf(tf))) as f32,
                    bc2_sqrt: (1.0 - CFG.beta2.powf(tf)).sqrt() as f32,
                    grad_scale: 0.7,
                },
            )
            .unwrap();
        }
        let got = host(&p);
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
