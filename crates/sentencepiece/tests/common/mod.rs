//! Helpers shared by the fixture tests.

use std::path::PathBuf;

use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A JSON fixture, by path from the repository root.
pub fn load(rel: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(rel)).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A JSON list of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("u32 id"))
        .collect()
}

/// Fails listing every mismatch (a test collects them all before failing).
pub fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
