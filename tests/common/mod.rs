//! Helpers shared by the end-to-end CLI tests.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
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

/// A copy of the example model `from` in `dir/m` whose JSON file `file` is changed by `edit`
/// (the other checkpoint files copied unchanged).
pub fn model_with_json(
    dir: &Path,
    from: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let others: Vec<&str> = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ]
    .into_iter()
    .filter(|f| *f != file)
    .collect();
    let model = copy_model(dir, from, &others);
    let text = std::fs::read_to_string(root().join(from).join(file)).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    std::fs::write(model.join(file), v.to_string()).unwrap();
    model
}

/// Every file of `dir` (not recursive) with its bytes, by name.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// Every row of a shard set, in order (a row that does not decode fails the test).
pub fn rows(dir: &cpmv_shard::ShardDir) -> Vec<cpmv_shard::Row> {
    dir.samples().map(|r| r.expect("row decodes")).collect()
}
