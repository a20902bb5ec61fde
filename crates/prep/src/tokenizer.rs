//! The text tokenizer of a checkpoint directory: `tokenizer.json`, or for MiniCPM-V 2.0 the
//! slow SentencePiece tokenizer the official pipeline uses (the two differ after special tokens
//! and on leading spaces; see `cpmv_shard::fingerprint::tokenizer_kind` for the choice).

use std::path::Path;

use crate::bytelevel::ByteLevelBpe;
use cpmv_sentencepiece::{LegacyLlamaTokenizer, SentencePieceModel, SlowTokenizerConfig};
pub use cpmv_shard::fingerprint::TokenizerKind;
use cpmv_shard::fingerprint::{read_tokenizer_files, tokenizer_digest, tokenizer_files};

/// One of the two tokenizer implementations behind the operations prep and chat need.
pub enum TextTokenizer {
    Json(Box<JsonTokenizer>),
    SentencePiece(Box<LegacyLlamaTokenizer>),
}

/// A `tokenizer.json` tokenizer, with the exact fast encoder when it is a byte-level BPE of the
/// Llama-3 / Qwen2 shape ([`ByteLevelBpe`]).
pub struct JsonTokenizer {
    pub hf: tokenizers::Tokenizer,
    pub fast: Option<ByteLevelBpe>,
}

impl TextTokenizer {
    /// Loads the tokenizer of `kind` from `dir`, reading each of its files once, and returns it
    /// with its fingerprint (`cpmv_shard::fingerprint::tokenizer_digest` of the same bytes). The
    /// error says which file and why.
    pub fn load(
        dir: &Path,
        kind: TokenizerKind,
    ) -> Result<(TextTokenizer, String), (String, String)> {
        let names = tokenizer_files(kind);
        let files = read_tokenizer_files(dir, kind).map_err(|e| match e {
            cpmv_shard::ShardError::Io { path, source } => (path, source.to_string()),
            other => (dir.display().to_string(), other.to_string()),
        })?;
        let parts: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
        let digest = tokenizer_digest(&parts);
        // The error names the file (index k of `names`).
        let at = |k: usize, e: String| (dir.join(names[k]).display().to_string(), e);
        let tokenizer = match kind {
            TokenizerKind::Json => {
                let mut t = tokenizers::Tokenizer::from_bytes(&files[0])
                    .map_err(|e| at(0, e.to_string()))?;
                // A tokenizer.json may carry truncation or padding settings; the reference's
                // encode calls use neither (lengths are handled by --max-length).
                t.with_truncation(None).map_err(|e| at(0, e.to_string()))?;
                t.with_padding(None);
                let config: serde_json::Value =
                    serde_json::from_slice(&files[0]).map_err(|e| at(0, e.to_string()))?;
                let fast = ByteLevelBpe::detect(&config, &t);
                TextTokenizer::Json(Box::new(JsonTokenizer { hf: t, fast }))
            }
            TokenizerKind::SentencePieceLegacy => {
                let sp =
                    SentencePieceModel::from_bytes(&files[0]).map_err(|e| at(0, e.to_string()))?;
                let config = std::str::from_utf8(&files[1])
                    .map_err(|e| e.to_string())
                    .and_then(|t| SlowTokenizerConfig::from_json(t).map_err(|e| e.to_string()))
                    .map_err(|e| at(1, e))?;
                let t = LegacyLlamaTokenizer::new(sp, config).map_err(|e| at(0, e.to_string()))?;
                TextTokenizer::SentencePiece(Box::new(t))
            }
        };
        Ok((tokenizer, digest))
    }

    pub fn kind(&self) -> TokenizerKind {
        match self {
            TextTokenizer::Json(_) => TokenizerKind::Json,
            TextTokenizer::SentencePiece(_) => TokenizerKind::SentencePieceLegacy,
        }
    }

    /// Ids of `text`; `special` adds what the tokenizer adds around a text (BOS for Llama-style
    /// tokenizers).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        match self {
            TextTokenizer::Json(t) => match &t.fast {
                // add_special_tokens = false: the post-processor adds nothing, which is all the
                // fast path leaves out.
                Some(fast) if !special => fast.encode(&t.hf, text),
                _ => {
                    t.hf.encode_fast(text, special)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| e.to_string())
                }
            },
            TextTokenizer::SentencePiece(t) => Ok(t.encode(text, special)),
        }
    }

    /// The id of a token string, if the vocabulary (or the added tokens) has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            TextTokenizer::Json(t) => t.hf.token_to_id(token),
            TextTokenizer::SentencePiece(t) => {
                let id = t.token_to_id(token);
                (t.id_to_piece(id) == Some(token)).then_some(id)
            }
        }
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            TextTokenizer::Json(t) => t.hf.id_to_token(id),
            TextTokenizer::SentencePiece(t) => t.id_to_piece(id).map(str::to_string),
        }
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, String> {
        match self {
            TextTokenizer::Json(t) => t.hf.decode(ids, skip_special).map_err(|e| e.to_string()),
            TextTokenizer::SentencePiece(t) => {
                t.decode(ids, skip_special).map_err(|e| e.to_string())
            }
        }
    }

    /// The token with the highest id of the ordinary vocabulary (added tokens aside).
    pub fn highest_ordinary(&self) -> Option<(String, u32)> {
        match self {
            TextTokenizer::Json(t) => t.hf.get_vocab(false).into_iter().max_by_key(|&(_, id)| id),
            TextTokenizer::SentencePiece(t) => {
                let n = t.vocab_size().checked_sub(1)? as u32;
                Some((t.id_to_piece(n)?.to_string(), n))
            }
        }
    }
}
