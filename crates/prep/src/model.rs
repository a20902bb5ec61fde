//! A Hugging Face MiniCPM-V checkpoint directory, as far as data preparation needs it: the llm
//! type (which template), the slicing and placeholder settings, and the tokenizer with the ids of
//! the special tokens the templates and image bounds rely on.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::tokenizer::TextTokenizer;

use cpmv_image::SliceConfig;

/// The language-model family (shared with the manifest's settings, see `cpmv_shard::settings`).
pub use cpmv_shard::settings::LlmType;

/// Why a model directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{dir}: cannot tell the llm type: {reason}; pass --llm-type minicpm|llama3|qwen")]
    UnknownLlmType { dir: PathBuf, reason: String },
    #[error("{path}: the tokenizer has no token {token:?}, which the {llm} template needs")]
    MissingToken {
        path: PathBuf,
        token: String,
        llm: &'static str,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// Tokens every sample may contain have ids the model has no embedding row for.
    #[error(
        "{path}: vocab_size is {vocab_size}, but tokens that the template, the image \
         placeholders or plain text put into samples have ids at or above it: {tokens}; the \
         model has no embedding for them and training would stop at the first one (\"token id \
         >= vocab size\"). Use the checkpoint's own tokenizer files, or correct vocab_size"
    )]
    TokenOutOfVocab {
        path: PathBuf,
        vocab_size: u64,
        /// The offending tokens, each with its id and what it is for.
        tokens: String,
    },
}

/// Ids of the tokens the templates, placeholders and bounds need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub im_start: u32,
    pub im_end: u32,
    pub slice_start: u32,
    pub slice_end: u32,
    pub unk: u32,
    /// `eos_token` of tokenizer_config.json.
    pub eos: u32,
    /// The label placed after the last supervised token of a turn when the next token is not
    /// supervised: `<|eot_id|>` for llama3 (its tokenizer has `eot_id`), else `eos`.
    pub turn_end_label: u32,
    /// llama3: `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`; qwen: `<|im_start|>`,
    /// `<|im_end|>`. The word token "assistant" for both.
    pub header_start: Option<u32>,
    pub header_end: Option<u32>,
    pub turn_end: Option<u32>,
    pub assistant: Option<u32>,
}

/// The strings of the special tokens (placeholders are built as text, as the reference does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStrings {
    pub unk: String,
    pub eos: String,
    pub bos: Option<String>,
    /// `pad_token` of tokenizer_config.json. No sample contains it (prep never pads; the
    /// trainer pads its batches with id 0), so it is not a
    /// [`fixed token`](ModelDir::fixed_tokens) and its id is not checked against `vocab_size`.
    pub pad: Option<String>,
}

/// A token id that samples contain whatever their text (template pieces, placeholders,
/// special tokens), with what it is for; see [`ModelDir::fixed_tokens`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedToken {
    pub token: String,
    pub id: u32,
    pub role: &'static str,
}

/// Everything `prep` reads from a checkpoint directory.
pub struct ModelDir {
    pub dir: PathBuf,
    pub llm_type: LlmType,
    /// Slicing settings from config.json (falling back to preprocessor_config.json).
    pub slice: SliceConfig,
    /// Placeholder tokens per image or slice.
    pub query_num: u32,
    /// Whether the checkpoint's vision tower takes patch strips (2.5, 2.6).
    pub batch_vision: bool,
    /// The text tokenizer the reference uses for this directory.
    pub tokenizer: TextTokenizer,
    pub tokens: SpecialTokens,
    pub strings: TokenStrings,
    /// The checkpoint's own chat template (tokenizer_config.json), if any.
    pub chat_template: Option<String>,
    /// The tokenizer's fingerprint (`cpmv_shard::fingerprint::tokenizer_fingerprint`).
    pub tokenizer_sha256: String,
    /// The language model's vocabulary size from config.json (top level, else its
    /// `text_config` or `llm_config`): every token id must be below it. `None` when the config
    /// does not say (prep needs no weights; the check is then left to the trainer).
    pub vocab_size: Option<u64>,
    /// Settings the directory did not give, so built-in defaults filled them (`max_slice_nums`,
    /// `scale_resolution`, `patch_size`, `query_num`): `prep build --print-config` says so.
    pub defaulted: Vec<&'static str>,
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Detects the llm type from config.json: its `version` (2.0 / 2.5 / 2.6), else the MiniCPM
/// LLM's `scale_emb` (V2.0's config has no version). Anything else is an error, never a guess.
pub fn detect_llm_type(dir: &Path, config: &Value) -> Result<LlmType, ModelError> {
    let unknown = |reason: String| ModelError::UnknownLlmType {
        dir: dir.to_path_buf(),
        reason,
    };
    if let Some(v) = config.get("version") {
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => return Err(unknown(format!("config.json has version {other}"))),
        };
        return match text.trim() {
            "2" | "2.0" => Ok(LlmType::Minicpm),
            "2.5" => Ok(LlmType::Llama3),
            "2.6" => Ok(LlmType::Qwen),
            other => Err(unknown(format!(
                "config.json has version {other}; supported: 2.0, 2.5, 2.6"
            ))),
        };
    }
    if config.get("scale_emb").is_some() && config.get("dim_model_base").is_some() {
        return Ok(LlmType::Minicpm);
    }
    Err(unknown(
        "config.json has no `version` and is not a MiniCPM-V 2.0 config (no scale_emb)".into(),
    ))
}

/// `vocab_size` of config.json: at the top level (MiniCPM-V 2.0, 2.5 and 2.6 configs are their
/// LLM's config), else in a nested `text_config` / `llm_config`.
pub fn config_vocab_size(config: &Value) -> Option<u64> {
    [
        Some(config),
        config.get("text_config"),
        config.get("llm_config"),
    ]
    .into_iter()
    .flatten()
    .find_map(|c| c.get("vocab_size").and_then(Value::as_u64))
}

fn get_u32(v: Option<&Value>, key: &str) -> Option<u32> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_u64)
        .map(|x| x as u32)
}

impl ModelDir {
    /// Reads `dir`; `llm_override` replaces the detected llm type.
    pub fn load(dir: &Path, llm_override: Option<LlmType>) -> Result<ModelDir, ModelError> {
        let config = read_json(&dir.join("config.json"))?;
        let preproc = read_json_opt(&dir.join("preprocessor_config.json"))?;
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json(&tok_config_path)?;
        let llm_type = match llm_override {
            Some(t) => t,
            None => detect_llm_type(dir, &config)?,
        };

        // Slicing: config.json's slice_config (2.5/2.6), its top-level keys (2.0), then
        // preprocessor_config.json, then the reference's defaults.
        let slice_cfg = config.get("slice_config");
        let mut defaulted = Vec::new();
        let mut pick = |key: &'static str, default: u32| {
            get_u32(slice_cfg, key)
                .or_else(|| get_u32(Some(&config), key))
                .or_else(|| get_u32(preproc.as_ref(), key))
                .unwrap_or_else(|| {
                    defaulted.push(key);
                    default
                })
        };
        let slice = SliceConfig {
            max_slice_nums: pick("max_slice_nums", 9),
            scale_resolution: pick("scale_resolution", 448),
            patch_size: pick("patch_size", 14),
        };
        let query_num = get_u32(Some(&config), "query_num")
            .or_else(|| get_u32(preproc.as_ref(), "image_feature_size"))
            .unwrap_or_else(|| {
                defaulted.push("query_num");
                64
            });
        let batch_vision = config
            .get("batch_vision_input")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        let kind = cpmv_shard::fingerprint::tokenizer_kind(dir, llm_type, &tok_config);
        let tok_path = dir.join(cpmv_shard::fingerprint::tokenizer_files(kind)[0]);
        let (tokenizer, tokenizer_sha256) =
            TextTokenizer::load(dir, kind).map_err(|(path, message)| ModelError::Tokenizer {
                path: PathBuf::from(path),
                message,
            })?;

        let field = |key: &str| tok_config.get(key).and_then(token_string);
        let unk = field("unk_token").ok_or_else(|| ModelError::Invalid {
            path: tok_config_path.clone(),
            message: "no unk_token (the image placeholder is made of it)".into(),
        })?;
        let eos = field("eos_token").ok_or_else(|| ModelError::Invalid {
            path: tok_config_path.clone(),
            message: "no eos_token".into(),
        })?;
        let bos = field("bos_token");
        let pad = field("pad_token");
        let chat_template = cpmv_shard::fingerprint::checkpoint_chat_template(&tok_config);

        let id = |token: &str| -> Result<u32, ModelError> {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| ModelError::MissingToken {
                    path: tok_path.clone(),
                    token: token.to_string(),
                    llm: llm_type.name(),
                })
        };
        let eos_id = id(&eos)?;
        let (header_start, header_end, turn_end, assistant, turn_end_label) = match llm_type {
            LlmType::Minicpm => (None, None, None, None, eos_id),
            LlmType::Llama3 => {
                let eot = id("<|eot_id|>")?;
                (
                    Some(id("<|start_header_id|>")?),
                    Some(id("<|end_header_id|>")?),
                    Some(eot),
                    Some(id("assistant")?),
                    eot,
                )
            }
            LlmType::Qwen => (
                Some(id("<|im_start|>")?),
                None,
                Some(id("<|im_end|>")?),
                Some(id("assistant")?),
                eos_id,
            ),
        };
        if llm_type == LlmType::Qwen {
            id("<image_id>")?;
            id("</image_id>")?;
            if chat_template.is_none() {
                return Err(ModelError::Invalid {
                    path: tok_config_path,
                    message: "no chat_template (the qwen path renders the checkpoint's own)".into(),
                });
            }
        }
        if llm_type == LlmType::Llama3 && bos.is_none() {
            return Err(ModelError::Invalid {
                path: tok_config_path,
                message: "no bos_token (the llama3 training template starts with it)".into(),
            });
        }
        let tokens = SpecialTokens {
            im_start: id("<image>")?,
            im_end: id("</image>")?,
            slice_start: id("<slice>")?,
            slice_end: id("</slice>")?,
            unk: id(&unk)?,
            eos: eos_id,
            turn_end_label,
            header_start,
            header_end,
            turn_end,
            assistant,
        };
        Ok(ModelDir {
            dir: dir.to_path_buf(),
            llm_type,
            slice,
            query_num,
            batch_vision,
            tokenizer,
            tokens,
            strings: TokenStrings { unk, eos, bos, pad },
            chat_template,
            tokenizer_sha256,
            vocab_size: config_vocab_size(&config),
            defaulted,
        })
    }

    /// Every token id a sample contains whatever its text says: bos/eos/unk, the
    /// template's own tokens (role headers, turn ends, MiniCPM's `<用户>`/`<AI>`), the
    /// placeholders' tokens, and the highest id of the tokenizer's ordinary vocabulary (any
    /// text may produce it).
    pub fn fixed_tokens(&self) -> Vec<FixedToken> {
        let t = &self.tokens;
        let mut out = Vec::new();
        let mut push = |token: &str, id: u32, role: &'static str| {
            out.push(FixedToken {
                token: token.to_string(),
                id,
                role,
            })
        };
        let named = [
            (self.strings.bos.as_deref(), "bos_token"),
            (Some(self.strings.eos.as_str()), "eos_token"),
            (
                Some(self.strings.unk.as_str()),
                "unk_token, the image placeholder",
            ),
        ];
        for (token, role) in named {
            if let Some((tok, id)) =
                token.and_then(|tok| Some((tok, self.tokenizer.token_to_id(tok)?)))
            {
                push(tok, id, role);
            }
        }
        let placeholders = [
            ("<image>", Some(t.im_start)),
            ("</image>", Some(t.im_end)),
            ("<slice>", Some(t.slice_start)),
            ("</slice>", Some(t.slice_end)),
            ("<image_id>", self.tokenizer.token_to_id("<image_id>")),
            ("</image_id>", self.tokenizer.token_to_id("</image_id>")),
        ];
        for (token, id) in placeholders {
            if let Some(id) = id {
                push(token, id, "image placeholder");
            }
        }
        let template = [
            (t.header_start, "template: role header start"),
            (t.header_end, "template: role header end"),
            (t.turn_end, "template: end of turn"),
            (t.assistant, "template: assistant role"),
        ];
        for (id, role) in template {
            if let Some(id) = id {
                push(&self.token_name(id), id, role);
            }
        }
        if self.llm_type == LlmType::Minicpm {
            for piece in ["<用户>", "<AI>"] {
                let ids = self.tokenizer.encode(piece, false).unwrap_or_default();
                for id in ids {
                    push(&self.token_name(id), id, "template: minicpm role piece");
                }
            }
        }
        if let Some((token, id)) = self.tokenizer.highest_ordinary() {
            push(&token, id, "highest id of the ordinary vocabulary");
        }
        out
    }

    /// The tokenizer's string for `id` (or `<id N>` when it has none).
    pub fn token_name(&self, id: u32) -> String {
        self.tokenizer
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    /// Refuses a checkpoint whose config.json `vocab_size` does not cover every
    /// [`fixed token`](ModelDir::fixed_tokens): the trainer would stop at the first sample with
    /// "token id >= vocab size", after all the preparation work. Names each offending token with
    /// its id and role.
    pub fn check_vocab(&self) -> Result<(), ModelError> {
        let Some(vocab_size) = self.vocab_size else {
            return Ok(());
        };
        // Offending ids in order, each with its token and every role it plays.
        let mut bad: std::collections::BTreeMap<u32, (String, Vec<&str>)> = Default::default();
        for f in self.fixed_tokens() {
            if u64::from(f.id) >= vocab_size {
                let (_, roles) = bad.entry(f.id).or_insert((f.token, Vec::new()));
                if !roles.contains(&f.role) {
                    roles.push(f.role);
                }
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        let tokens = bad
            .iter()
            .map(|(id, (token, roles))| format!("{token:?} (id {id}: {})", roles.join("; ")))
            .collect::<Vec<_>>()
            .join(", ");
        Err(ModelError::TokenOutOfVocab {
            path: self.dir.join("config.json"),
            vocab_size,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_size_is_read_at_the_top_level_then_from_the_llm_config() {
        let top = serde_json::json!({"vocab_size": 151666, "text_config": {"vocab_size": 1}});
        assert_eq!(config_vocab_size(&top), Some(151666));
        let nested = serde_json::json!({"text_config": {"vocab_size": 128256}});
        assert_eq!(config_vocab_size(&nested), Some(128256));
        let llm = serde_json::json!({"llm_config": {"vocab_size": 122753}});
        assert_eq!(config_vocab_size(&llm), Some(122753));
        assert_eq!(
            config_vocab_size(&serde_json::json!({"version": 2.6})),
            None
        );
    }

    #[test]
    fn fixed_tokens_cover_template_placeholders_and_the_vocabulary() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models");
        for (dir, template) in [
            ("minicpm-v-2-tiny", vec!["<用户>"]),
            (
                "minicpm-llama3-v-2_5-tiny",
                vec!["<|eot_id|>", "<|start_header_id|>"],
            ),
            (
                "minicpm-v-2_6-tiny",
                vec!["<|im_start|>", "<|im_end|>", "<image_id>"],
            ),
        ] {
            let mut m = ModelDir::load(&root.join(dir), None).unwrap();
            let fixed = m.fixed_tokens();
            let has = |tok: &str| {
                fixed
                    .iter()
                    .any(|f| f.token == tok || f.token.contains(tok))
            };
            for tok in ["<image>", "</image>", "<slice>", "</slice>", "<unk>"]
                .into_iter()
                .chain(template)
            {
                assert!(has(tok), "{dir}: {tok} missing from {fixed:?}");
            }
            let max = fixed.iter().map(|f| f.id).max().unwrap();
            assert!(fixed
                .iter()
                .any(|f| f.role == "highest id of the ordinary vocabulary"));
            // The example checkpoints are consistent; one id less is refused, naming the token.
            m.check_vocab().unwrap();
            m.vocab_size = Some(u64::from(max));
            let err = m.check_vocab().unwrap_err().to_string();
            assert!(err.contains(&format!("(id {max}")), "{dir}: {err}");
        }
    }

    /// prep never writes the pad token into a sample: a pad id at or above vocab_size is no
    /// reason to refuse the checkpoint (tokens a sample does contain still are).
    #[test]
    fn the_pad_token_is_not_checked_against_vocab_size() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models");
        let mut m = ModelDir::load(&root.join("minicpm-v-2_6-tiny"), None).unwrap();
        // The fixed tokens of this tokenizer end at </image_id> (4089).
        m.vocab_size = Some(4090);
        m.check_vocab().unwrap();
        m.strings.pad = Some("<|reserved_special_token_5|>".into());
        assert_eq!(
            m.tokenizer.token_to_id("<|reserved_special_token_5|>"),
            Some(4095)
        );
        assert!(m.fixed_tokens().iter().all(|f| f.id < 4090));
        m.check_vocab().unwrap();
        m.vocab_size = Some(4089);
        let err = m.check_vocab().unwrap_err().to_string();
        assert!(
            err.contains("</image_id>") && !err.contains("reserved"),
            "{err}"
        );
    }
}
