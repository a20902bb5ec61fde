//! Writes a small synthetic run (50 steps, evals at 10/30/50, then a resume at step 30 that
//! writes steps 31..=40) and its loss-curve PNG into the directory given as the only argument.
//! Used to check the event files with TensorBoard's own reader:
//!
//!     cargo run -p cpmv-runlog --example demo_run -- /tmp/demo-run
//!     python scripts/check_tfevents.py /tmp/demo-run

use std::path::PathBuf;

use cpmv_runlog::{loss_curve_png, LogError, RunLog, StepRecord};

fn record(step: u64) -> StepRecord {
    let s = step as f64;
    StepRecord {
        step,
        epoch: s / 50.0,
        loss: 3.0 * (-s / 20.0).exp() + 0.5 + 0.1 * (s * 1.7).sin(),
        lr: 1e-4 * (1.0 - s / 100.0),
        grad_norm: 1.0 + 0.01 * s,
        tokens: step * 4096,
        samples: step * 8,
        tokens_per_s: 12_000.0 + s,
        samples_per_s: 23.5,
        elapsed_s: 0.34 * s,
        peak_mem_bytes: (3u64 << 30) + step * (1 << 20),
        eval_loss: None,
        skipped_nonfinite: None,
    }
}

fn write(log: &mut RunLog, from: u64, to: u64) -> Result<(), LogError> {
    for step in from..=to {
        log.train_step(&record(step))?;
        if step % 20 == 10 {
            log.eval(step, 2.5 * (-(step as f64) / 25.0).exp() + 0.7, 1000 * step)?;
        }
    }
    log.flush()
}

fn main() -> Result<(), LogError> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: demo_run DIR");
        std::process::exit(2);
    };
    write(&mut RunLog::create(&dir, None)?, 1, 50)?;
    write(&mut RunLog::create(&dir, Some(30))?, 31, 40)?;
    loss_curve_png(&dir, &dir.join("loss.png"), "demo run: loss")?;
    println!("{}", dir.display());
    Ok(())
}
