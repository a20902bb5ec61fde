//! The fingerprints that tie a shard set to a checkpoint directory: the sha256 of its tokenizer
//! files and of the chat template the training samples were made with. `prep build`
//! writes them into the manifest; `train` and `train eval` compute them from the model
//! directory they are given and refuse shards made for another tokenizer or template.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::settings::LlmType;
use crate::ShardError;

/// The Llama-3 *training* template of the reference (spec §4.2): BOS, then per message a header
/// and the whitespace-stripped content closed by `<|eot_id|>`; no generation prompt. Kept apart
/// from the checkpoint's own (inference) template, which is never modified.
pub const LLAMA3_TRAINING_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}";

/// A description of the MiniCPM (V2.0) scheme, fingerprinted in place of a template.
pub const MINICPM_TRAINING_SCHEME: &str =
    "minicpm: per message encode('<用户>'|'<AI>') + encode(content [+ eos on the last]), no BOS";

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The checkpoint's own chat template from `tokenizer_config.json`: a string, or the entry
/// named `default` of a list of named templates.
pub fn checkpoint_chat_template(tokenizer_config: &Value) -> Option<String> {
    match tokenizer_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// The chat template text training samples of `llm` are made with: the reference's fixed
/// training template for MiniCPM and Llama-3, the checkpoint's own for Qwen (empty if none).
pub fn training_chat_template(llm: LlmType, checkpoint_template: Option<&str>) -> String {
    match llm {
        LlmType::Minicpm => MINICPM_TRAINING_SCHEME.to_string(),
        LlmType::Llama3 => LLAMA3_TRAINING_TEMPLATE.to_string(),
        LlmType::Qwen => checkpoint_template.unwrap_or_default().to_string(),
    }
}

/// Which tokenizer a checkpoint directory's text is encoded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `tokenizer.json` (Hugging Face tokenizers; what the fast classes load).
    Json,
    /// `tokenizer.model` read by the slow SentencePiece `LlamaTokenizer` with `legacy: true`:
    /// what the official pipeline uses for MiniCPM-V 2.0, whose `tokenizer_config.json` maps
    /// `AutoTokenizer` to `LlamaTokenizerWrapper` and has no fast class.
    SentencePieceLegacy,
}

impl TokenizerKind {
    /// How `prep` reports it.
    pub fn describe(self) -> &'static str {
        match self {
            TokenizerKind::Json => "tokenizer.json",
            TokenizerKind::SentencePieceLegacy => {
                "tokenizer.model (slow SentencePiece LlamaTokenizer, legacy)"
            }
        }
    }
}

/// The tokenizer the reference would load from `dir` for `llm`: the slow SentencePiece one for
/// MiniCPM (V2.0) when `tokenizer.model` is there and `tokenizer_config.json` names a slow
/// Llama class (`LlamaTokenizer`, `LlamaTokenizerWrapper`); `tokenizer.json` otherwise.
pub fn tokenizer_kind(dir: &Path, llm: LlmType, tokenizer_config: &Value) -> TokenizerKind {
    let class = tokenizer_config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("");
    let slow_class = matches!(class, "LlamaTokenizer" | "LlamaTokenizerWrapper");
    if llm == LlmType::Minicpm && slow_class && dir.join("tokenizer.model").is_file() {
        TokenizerKind::SentencePieceLegacy
    } else {
        TokenizerKind::Json
    }
}

/// The files a tokenizer of `kind` is read from, in the order its fingerprint hashes them:
/// `tokenizer.json`, or `tokenizer.model` then `tokenizer_config.json` (the slow tokenizer's
/// added tokens and flags live there).
pub fn tokenizer_files(kind: TokenizerKind) -> &'static [&'static str] {
    match kind {
        TokenizerKind::Json => &["tokenizer.json"],
        TokenizerKind::SentencePieceLegacy => &["tokenizer.model", "tokenizer_config.json"],
    }
}

/// The fingerprint of a tokenizer from the bytes of its [`tokenizer_files`], in order: the
/// sha256 of their concatenation (for `tokenizer.json` alone, the file's sha256).
pub fn tokenizer_digest(files: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f);
    }
    hex::encode(h.finalize())
}

/// The bytes of the [`tokenizer_files`] of `kind` in `dir`, in order.
pub fn read_tokenizer_files(dir: &Path, kind: TokenizerKind) -> Result<Vec<Vec<u8>>, ShardError> {
    tokenizer_files(kind)
        .iter()
        .map(|name| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| ShardError::io(&path, e))
        })
        .collect()
}

/// The fingerprint of the tokenizer of `kind` in `dir` (see [`tokenizer_digest`]).
pub fn tokenizer_fingerprint(dir: &Path, kind: TokenizerKind) -> Result<String, ShardError> {
    let files = read_tokenizer_files(dir, kind)?;
    let parts: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    Ok(tokenizer_digest(&parts))
}

/// The tokenizer and chat-template fingerprints of a model directory for `llm`, as `prep build`
/// writes them into a manifest.
pub fn model_fingerprints(dir: &Path, llm: LlmType) -> Result<(String, String), ShardError> {
    let cfg_path = dir.join("tokenizer_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ShardError::io(&cfg_path, e))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| ShardError::ModelFile {
        path: cfg_path.display().to_string(),
        reason: format!("invalid JSON: {e}"),
    })?;
    let template = training_chat_template(llm, checkpoint_chat_template(&cfg).as_deref());
    let tok = tokenizer_fingerprint(dir, tokenizer_kind(dir, llm, &cfg))?;
    Ok((tok, sha256_hex(template.as_bytes())))
}
