//! What the model's test binaries share: where the fixtures are and which device to run on.
//! Included by path (`#[path = "common/mod.rs"]`), so the GPU test binary, which includes the
//! test files as modules, finds it too.

use candle_core::Device;
use std::path::PathBuf;

/// `tests/fixtures/model/<v>` of the repository (`CPMV_REPO` overrides the root, for a test
/// binary carried to another machine).
pub fn fixture_dir(v: &str) -> PathBuf {
    let root = std::env::var_os("CPMV_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    root.join("tests/fixtures/model").join(v)
}

/// Where the tests run: the CPU by default; `CPMV_TEST_DEVICE=cuda` (a build with
/// `--features cuda`, on a GPU machine) runs the same checks on the GPU.
pub fn device() -> Device {
    match std::env::var("CPMV_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("CPMV_TEST_DEVICE=cuda needs a CUDA build and GPU")
        }
        _ => Device::Cpu,
    }
}
