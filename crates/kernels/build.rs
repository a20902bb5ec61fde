//! Compiles cuda/cpmv.cu to PTX with nvcc when the `cuda` feature is on (the PTX is embedded in
//! the library and JIT-compiled by the driver on first use).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda/cpmv.cu");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("cpmv.ptx");
    // PTX for compute capability 8.0 by default: the driver compiles it for any newer card
    // (A100, L40S, H100/H200) on first use.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("cuda/cpmv.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed ({s}) compiling cuda/cpmv.cu"),
        Err(e) => panic!(
            "cannot run {} ({e}): building with `cuda` needs the CUDA toolkit \
             (source scripts/cuda-env.sh)",
            nvcc.display()
        ),
    }
}
