//! Compiles cuda/block.cu to PTX with nvcc when the `cuda` feature is on. The PTX targets
//! compute_80 by default (`CPMV_BLOCK_PTX_ARCH` overrides), so one build runs on A100 (sm_80),
//! L40S / RTX 4090 (sm_89) and H100 / H200 (sm_90): the driver compiles it for the card on
//! first use.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda/block.cu");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CPMV_BLOCK_PTX_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("block.ptx");
    let arch = std::env::var("CPMV_BLOCK_PTX_ARCH").unwrap_or_else(|_| "compute_80".into());
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch={arch}"))
        .arg("cuda/block.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed ({s}) compiling cuda/block.cu"),
        Err(e) => panic!(
            "cannot run {} ({e}): building with `cuda` needs the CUDA toolkit \
             (source scripts/cuda-env.sh)",
            nvcc.display()
        ),
    }
}
