//! Helpers shared by the end-to-end CLI tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (tests run from the prep crate's folder).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny checkpoint directories of the three versions, relative to the root.
pub const MODELS: [&str; 3] = [
    "examples/models/minicpm-v-2-tiny",
    "examples/models/minicpm-llama3-v-2_5-tiny",
    "examples/models/minicpm-v-2_6-tiny",
];

/// Runs the `prep` binary in the repository root.
pub fn prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prep"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("prep runs")
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A new checkpoint directory `dir/m` holding `files` copied from the example model `from`
/// (tests then add or alter the remaining files).
pub fn copy_model(dir: &Path, from: &str, files: &[&str]) -> PathBuf {
    let model = dir.join("m");
    std::fs::create_dir(&model).unwrap();
    for f in files {
        std::fs::copy(root().join(from).join(f), model.join(f)).unwrap();
    }
    model
}
