//! Where a training step's time goes on a device, for `CPMV_PROFILE=1` (phases of the step:
//! vision/LLM forward and backward, gradient norm, AdamW) and `CPMV_PROFILE=2` (also the parts
//! of every transformer layer and the recompute/backward split). Each boundary waits for the
//! device, so the figures are the wall time of that work (the waiting itself slows the run
//! slightly); `train bench` reports them per step. Off (the default), nothing waits.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

static TOTALS: Mutex<BTreeMap<&'static str, f64>> = Mutex::new(BTreeMap::new());

/// 0 (off), 1 (phases) or 2 (phases and layer parts), from `CPMV_PROFILE`.
pub fn level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        std::env::var("CPMV_PROFILE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

pub fn enabled() -> bool {
    level() > 0
}

fn add(name: &'static str, secs: f64) {
    *TOTALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name)
        .or_default() += secs;
}

/// Marks phase boundaries on one device (level 1 and up).
pub struct Timer<'a> {
    device: &'a candle_core::Device,
    last: Option<Instant>,
}

impl<'a> Timer<'a> {
    pub fn start(device: &'a candle_core::Device) -> Self {
        let last = enabled().then(|| {
            let _ = device.synchronize();
            Instant::now()
        });
        Timer { device, last }
    }

    /// Ends phase `name` (adds the time since the previous mark).
    pub fn mark(&mut self, name: &'static str) {
        if let Some(last) = self.last {
            let _ = self.device.synchronize();
            let now = Instant::now();
            add(name, (now - last).as_secs_f64());
            self.last = Some(now);
        }
    }
}

/// Runs `f` and, at level 2, adds its time to `name` (a part inside a phase; phases still
/// include it).
pub fn part<T>(device: &candle_core::Device, name: &'static str, f: impl FnOnce() -> T) -> T {
    if level() < 2 {
        return f();
    }
    let _ = device.synchronize();
    let t0 = Instant::now();
    let r = f();
    let _ = device.synchronize();
    add(name, t0.elapsed().as_secs_f64());
    r
}

/// The totals so far, cleared.
pub fn take() -> BTreeMap<&'static str, f64> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|p| p.into_inner()))
}
