//! The offloaded optimizer's AdamW update in host memory, per parameter value, side by side:
//!
//! * `cpmv host` — what `--offload-optimizer` and CPU training run (`AdamW::step` on CPU vars:
//!   one in-place pass over master, moments and the bf16 copy, rayon chunks);
//! * `torch` — `torch.optim.AdamW(foreach=True)` on the CPU over fp32 parameters, when
//!   `CPMV_PYTHON` names a Python with torch (what a PyTorch user's offloaded step runs short of
//!   DeepSpeed's compiled CPU Adam).
//!
//! ```text
//! cargo bench --bench host_adamw [-- VALUES]     (default 64M values; threads: RAYON_NUM_THREADS)
//! ```
//!
//! One bf16 parameter of VALUES values with an f32 master; 1 warm-up and 3 timed steps each;
//! prints ns per value and GB/s of optimizer state touched (master and two moments read and
//! written, the bf16 gradient read, the bf16 copy written: 28 bytes per value; PyTorch's fp32
//! parameter, moments and gradient: 28 as well).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use cpmv_optim::{AdamW, AdamWConfig};

const STEPS: usize = 3;

fn grads(var: &Var, seed: f32) -> candle_core::Result<candle_core::backprop::GradStore> {
    let n = var.elem_count();
    let g: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.37 + seed).sin()) * 1e-3)
        .collect();
    // A GradStore holding one gradient: the gradient of Σ var·g is g.
    let loss = (var.as_tensor().to_dtype(DType::F32)? * Tensor::from_vec(g, n, &Device::Cpu)?)?
        .sum_all()?;
    loss.backward()
}

fn time_cpmv(n: usize) -> anyhow::Result<f64> {
    let init = Tensor::randn(0f32, 0.02, n, &Device::Cpu)?.to_dtype(DType::BF16)?;
    let var = Var::from_tensor(&init)?;
    let mut opt = AdamW::new(
        vec![("w".into(), var.clone())],
        AdamWConfig::default(),
        |_| true,
    )?;
    let store = grads(&var, 1.0)?;
    opt.step(&store, 1e-4, 1.0)?;
    let t = Instant::now();
    for _ in 0..STEPS {
        opt.step(&store, 1e-4, 1.0)?;
    }
    Ok(t.elapsed().as_secs_f64() / STEPS as f64)
}

fn time_torch(n: usize) -> Option<f64> {
    let py = std::env::var("CPMV_PYTHON").ok()?;
    let script = format!(
        r#"
import time, torch
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn({n}) * 0.02)
p.grad = torch.randn({n}) * 1e-3
opt = torch.optim.AdamW([p], lr=1e-4, foreach=True)
opt.step()
t = time.perf_counter()
for _ in range({STEPS}):
    opt.step()
print((time.perf_counter() - t) / {STEPS})
"#
    );
    let out = std::process::Command::new(py)
        .args(["-c", &script])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64 << 20);
    let threads = rayon::current_num_threads();
    println!("AdamW step over {n} values ({threads} threads), {STEPS} timed steps after 1 warm-up");
    println!("| implementation | s per step | ns per value | GB/s of state |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, s: f64, bytes: f64| {
        println!(
            "| {name} | {s:.3} | {:.2} | {:.1} |",
            s * 1e9 / n as f64,
            bytes * n as f64 / s / 1e9
        )
    };
    row("cpmv host (bf16 var, f32 master)", time_cpmv(n)?, 28.0);
    match time_torch(n) {
        Some(s) => row("torch AdamW foreach (fp32 param)", s, 28.0),
        None => {
            println!("| torch AdamW foreach | – (set CPMV_PYTHON to a Python with torch) | | |")
        }
    }
    Ok(())
}
