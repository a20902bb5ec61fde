//! The documents in schemas/ and the presets in pipelines/ agree with the code.

use std::path::{Path, PathBuf};

use arrow_schema::DataType;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(rel)).unwrap()).unwrap()
}

/// pyarrow's spelling of a type (what scripts/check_shards.py compares).
fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "string".into(),
        DataType::Int32 => "int32".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::LargeBinary => "large_binary".into(),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        DataType::FixedSizeList(f, n) => {
            format!("fixed_size_list<{}>[{n}]", type_name(f.data_type()))
        }
        other => panic!("undocumented type {other}"),
    }
}

#[test]
fn shard_schema_document_matches_the_writer() {
    let doc = json("schemas/shard.schema.json");
    let documented: Vec<(String, String)> = doc["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["arrow_type"].as_str().unwrap().into(),
            )
        })
        .collect();
    let actual: Vec<(String, String)> = cpmv_shard::shard_schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), type_name(f.data_type())))
        .collect();
    assert_eq!(documented, actual);
    assert_eq!(doc["format_version"], cpmv_shard::manifest::FORMAT_VERSION);
}

#[test]
fn rejection_reasons_are_all_documented() {
    let doc = json("schemas/rejected.schema.json");
    let documented: Vec<&str> = doc["properties"]["reason"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(documented, cpmv_prep::build::all_reject_kinds());
}

#[test]
fn presets_parse_and_name_their_llm_type() {
    for (file, llm) in [
        ("minicpm-v-2.toml", "minicpm"),
        ("minicpm-llama3-v-2_5.toml", "llama3"),
        ("minicpm-v-2_6.toml", "qwen"),
    ] {
        let p = cpmv_prep::PrepPreset::load(&root().join("pipelines").join(file)).unwrap();
        assert_eq!(p.llm_type.map(|t| t.name()), Some(llm), "{file}");
        assert_eq!(p.max_length, Some(2048));
    }
}
