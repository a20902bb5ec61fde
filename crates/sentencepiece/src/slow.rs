//! The slow (SentencePiece-backed) transformers `LlamaTokenizer` with `legacy=True`, as the
//! MiniCPM-V 2.0 checkpoint loads it (`LlamaTokenizerWrapper`, transformers 4.x).
//!
//! Encoding: the text is cut on added tokens by transformers' `Trie`, the `lstrip`/`rstrip`/
//! `single_word` flags of each added token are applied to its neighbours, and every remaining
//! chunk is encoded on its own by SentencePiece (so each chunk gets its own dummy-prefix `▁`).
//! BOS/EOS are added per `add_bos_token`/`add_eos_token`. Decoding follows
//! `PreTrainedTokenizer._decode` + `LlamaTokenizer.convert_tokens_to_string`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::model::{SentencePieceModel, SPACE_SYMBOL};
use crate::trie::Trie;
use crate::Error;

/// One entry of `added_tokens_decoder` (transformers' `AddedToken`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedToken {
    /// Token text, matched literally in the input.
    pub content: String,
    /// Token id.
    pub id: u32,
    /// Eat whitespace on the left (the end of the previous chunk is right-stripped).
    pub lstrip: bool,
    /// Eat whitespace on the right (the start of the next chunk is left-stripped).
    pub rstrip: bool,
    /// Only match as a whole word (else glued to its neighbour chunk).
    pub single_word: bool,
    /// Kept for completeness; the slow tokenizer only uses it for `do_lower_case`, which Llama lacks.
    pub normalized: bool,
    /// Special token (skipped by `decode(skip_special_tokens=True)` when also listed as special).
    pub special: bool,
}

impl AddedToken {
    /// A special token without strip flags, as transformers creates for a plain-string special token.
    pub fn special(content: &str, id: u32) -> Self {
        AddedToken {
            content: content.to_string(),
            id,
            lstrip: false,
            rstrip: false,
            single_word: false,
            normalized: false,
            special: true,
        }
    }
}

/// Everything of `tokenizer_config.json` the slow Llama tokenizer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowTokenizerConfig {
    /// `added_tokens_decoder`, any order.
    pub added_tokens: Vec<AddedToken>,
    /// `bos_token` (default `<s>`).
    pub bos_token: Option<String>,
    /// `eos_token` (default `</s>`).
    pub eos_token: Option<String>,
    /// `unk_token` (default `<unk>`).
    pub unk_token: Option<String>,
    /// `pad_token` (default none).
    pub pad_token: Option<String>,
    /// `additional_special_tokens`.
    pub additional_special_tokens: Vec<String>,
    /// Prepend BOS when encoding with special tokens (default true).
    pub add_bos_token: bool,
    /// Append EOS when encoding with special tokens (default false).
    pub add_eos_token: bool,
    /// Apply `clean_up_tokenization` after decoding (Llama default false).
    pub clean_up_tokenization_spaces: bool,
    /// `add_prefix_space` (default true): in legacy mode it only affects decoding.
    pub add_prefix_space: bool,
}

impl Default for SlowTokenizerConfig {
    fn default() -> Self {
        SlowTokenizerConfig {
            added_tokens: Vec::new(),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            unk_token: Some("<unk>".into()),
            pad_token: None,
            additional_special_tokens: Vec::new(),
            add_bos_token: true,
            add_eos_token: false,
            clean_up_tokenization_spaces: false,
            add_prefix_space: true,
        }
    }
}

fn token_string(v: &Value, key: &str) -> Result<Option<String>, Error> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Config(format!(
                "{key}: object without a string \"content\""
            ))),
        },
        _ => Err(Error::Config(format!(
            "{key}: expected a string or an AddedToken object"
        ))),
    }
}

fn bool_key(o: &serde_json::Map<String, Value>, key: &str, default: bool) -> Result<bool, Error> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::Config(format!("{key}: expected a boolean"))),
    }
}

impl SlowTokenizerConfig {
    /// Read the relevant keys of a `tokenizer_config.json` text.
    ///
    /// Refuses `legacy: false` (a different encoding, not implemented) and a `tokenizer_class`
    /// that is not a Llama tokenizer (or MiniCPM-V 2.0's `LlamaTokenizerWrapper`).
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| Error::Config("top level is not an object".into()))?;
        if let Some(cls) = o.get("tokenizer_class").and_then(Value::as_str) {
            if !matches!(cls, "LlamaTokenizer" | "LlamaTokenizerWrapper") {
                return Err(Error::Unsupported(format!(
                    "tokenizer_class {cls:?}: only the slow LlamaTokenizer (legacy) is implemented"
                )));
            }
        }
        // transformers 4.x: legacy=None means legacy=True (with a warning)
        match o.get("legacy") {
            None | Some(Value::Null) | Some(Value::Bool(true)) => {}
            Some(Value::Bool(false)) => {
                return Err(Error::Unsupported(
                    "legacy: false (the non-legacy Llama encoding) is not implemented".into(),
                ))
            }
            Some(_) => return Err(Error::Config("legacy: expected a boolean".into())),
        }
        let d = SlowTokenizerConfig::default();
        let tok = |key: &str, default: Option<String>| -> Result<Option<String>, Error> {
            match o.get(key) {
                None => Ok(default),
                Some(v) => token_string(v, key),
            }
        };
        let mut added_tokens = Vec::new();
        if let Some(atd) = o.get("added_tokens_decoder") {
            let atd = atd
                .as_object()
                .ok_or_else(|| Error::Config("added_tokens_decoder is not an object".into()))?;
            for (k, t) in atd {
                let id: u32 = k.parse().map_err(|_| {
                    Error::Config(format!("added_tokens_decoder key {k:?} is not an id"))
                })?;
                let to = t.as_object().ok_or_else(|| {
                    Error::Config(format!("added_tokens_decoder[{k}] is not an object"))
                })?;
                let content = match to.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => {
                        return Err(Error::Config(format!(
                            "added_tokens_decoder[{k}] has no string \"content\""
                        )))
                    }
                };
                added_tokens.push(AddedToken {
                    content,
                    id,
                    lstrip: bool_key(to, "lstrip", false)?,
                    rstrip: bool_key(to, "rstrip", false)?,
                    single_word: bool_key(to, "single_word", false)?,
                    normalized: bool_key(to, "normalized", true)?,
                    special: bool_key(to, "special", false)?,
                });
            }
        }
        let mut additional_special_tokens = Vec::new();
        match o.get("additional_special_tokens") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for t in a {
                    if let Some(s) = token_string(t, "additional_special_tokens")? {
                        additional_special_tokens.push(s);
                    }
                }
            }
            Some(_) => {
                return Err(Error::Config(
                    "additional_special_tokens is not a list".into(),
                ))
            }
        }
        Ok(SlowTokenizerConfig {
            added_tokens,
            bos_token: tok("bos_token", d.bos_token)?,
            eos_token: tok("eos_token", d.eos_token)?,
            unk_token: tok("unk_token", d.unk_token)?,
            pad_token: tok("pad_token", d.pad_token)?,
            additional_special_tokens,
            add_bos_token: bool_key(o, "add_bos_token", d.add_bos_token)?,
            add_eos_token: bool_key(o, "add_eos_token", d.add_eos_token)?,
            clean_up_tokenization_spaces: bool_key(
                o,
                "clean_up_tokenization_spaces",
                d.clean_up_tokenization_spaces,
            )?,
            add_prefix_space: bool_key(o, "add_prefix_space", d.add_prefix_space)?,
        })
    }
}

/// Options of [`LegacyLlamaTokenizer::decode_with`], mirroring `decode(...)`'s keyword arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Drop the special tokens (BOS/EOS/UNK/PAD and `additional_special_tokens`).
    pub skip_special_tokens: bool,
    /// Join the added-token pieces with spaces. transformers 4.x's slow `_decode` defaults to
    /// `true` regardless of the `spaces_between_special_tokens` key of the config.
    pub spaces_between_special_tokens: bool,
    /// Override `clean_up_tokenization_spaces` of the config (`None` = the config's value).
    pub clean_up_tokenization_spaces: Option<bool>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            skip_special_tokens: false,
            spaces_between_special_tokens: true,
            clean_up_tokenization_spaces: None,
        }
    }
}

/// transformers' slow `LlamaTokenizer(legacy=True)` over a SentencePiece BPE model: the tokenizer
/// MiniCPM-V 2.0 trains with. See the module docs for the algorithm.
#[derive(Debug, Clone)]
pub struct LegacyLlamaTokenizer {
    sp: SentencePieceModel,
    added_encoder: HashMap<String, u32>,
    added_decoder: HashMap<u32, AddedToken>,
    trie: Trie,
    special_tokens: Vec<String>,
    special_token_set: HashSet<String>,
    special_ids: HashSet<u32>,
    /// Added tokens decoded as separate sub-texts (`legacy_added_tokens` of `_decode`).
    legacy_added: HashSet<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    config: SlowTokenizerConfig,
}

impl LegacyLlamaTokenizer {
    /// Load `tokenizer.model` and `tokenizer_config.json` from a checkpoint directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let sp = SentencePieceModel::from_file(dir.join("tokenizer.model"))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
            path: cfg_path.clone(),
            source,
        })?;
        Self::new(sp, SlowTokenizerConfig::from_json(&text)?)
    }

    /// Build the tokenizer as `LlamaTokenizer.__init__` + `PreTrainedTokenizer.__init__` do:
    /// `added_tokens_decoder` first, then every special token not yet known is added (with its
    /// SentencePiece id when the piece exists, else a new id after the vocabulary).
    pub fn new(sp: SentencePieceModel, config: SlowTokenizerConfig) -> Result<Self, Error> {
        let mut added_encoder: HashMap<String, u32> = HashMap::new();
        let mut added_decoder: HashMap<u32, AddedToken> = HashMap::new();
        let mut sorted = config.added_tokens.clone();
        sorted.sort_by_key(|t| t.id);
        for t in sorted {
            if t.content.is_empty() {
                return Err(Error::Config(format!(
                    "added token {} has empty content",
                    t.id
                )));
            }
            added_encoder.insert(t.content.clone(), t.id);
            added_decoder.insert(t.id, t);
        }
        let mut special_tokens: Vec<String> = Vec::new();
        for t in [
            &config.bos_token,
            &config.eos_token,
            &config.unk_token,
            &config.pad_token,
        ]
        .into_iter()
        .flatten()
        .chain(config.additional_special_tokens.iter())
        {
            if !t.is_empty() && !special_tokens.contains(t) {
                special_tokens.push(t.clone());
            }
        }
        // `_add_tokens(special tokens not in the added encoder, special_tokens=True)`
        for t in &special_tokens {
            if added_encoder.contains_key(t) {
                continue;
            }
            let id = match sp.lookup(t) {
                Some(id) => id,
                None => {
                    // len(get_vocab()) : sp pieces plus added contents that are not pieces
                    let extra = added_encoder
                        .keys()
                        .filter(|k| sp.lookup(k).is_none())
                        .count();
                    u32::try_from(sp.piece_size() + extra)
                        .map_err(|_| Error::Config("vocabulary too large".into()))?
                }
            };
            added_encoder.insert(t.clone(), id);
            added_decoder.insert(id, AddedToken::special(t, id));
        }
        let mut trie = Trie::new();
        let mut ids: Vec<&u32> = added_decoder.keys().collect();
        ids.sort();
        for id in ids {
            trie.add(&added_decoder[id].content);
        }
        let convert = |t: &str| -> u32 {
            added_encoder
                .get(t)
                .copied()
                .unwrap_or_else(|| sp.piece_to_id(t))
        };
        let special_ids: HashSet<u32> = special_tokens.iter().map(|t| convert(t)).collect();
        let special_token_set: HashSet<String> = special_tokens.iter().cloned().collect();
        let vocab_size = sp.piece_size();
        let mut legacy_added: HashSet<String> = added_encoder
            .keys()
            .filter(|k| !special_token_set.contains(*k))
            .cloned()
            .collect();
        for t in &config.additional_special_tokens {
            if convert(t) as usize >= vocab_size {
                legacy_added.insert(t.clone());
            }
        }
        let bos_id = config.bos_token.as_deref().map(convert);
        let eos_id = config.eos_token.as_deref().map(convert);
        if config.add_bos_token && bos_id.is_none() {
            return Err(Error::Config(
                "add_bos_token is set but there is no bos_token".into(),
            ));
        }
        if config.add_eos_token && eos_id.is_none() {
            return Err(Error::Config(
                "add_eos_token is set but there is no eos_token".into(),
            ));
        }
        Ok(LegacyLlamaTokenizer {
            sp,
            added_encoder,
            added_decoder,
            trie,
            special_tokens,
            special_token_set,
            special_ids,
            legacy_added,
            bos_id,
            eos_id,
            config,
        })
    }

    /// The SentencePiece model underneath.
    pub fn sp_model(&self) -> &SentencePieceModel {
        &self.sp
    }

    /// The configuration this tokenizer was built from.
    pub fn config(&self) -> &SlowTokenizerConfig {
        &self.config
    }

    /// `vocab_size`: the SentencePiece piece count (added tokens not included).
    pub fn vocab_size(&self) -> usize {
        self.sp.piece_size()
    }

    /// `len(tokenizer)`: one past the largest id that can be produced or decoded.
    pub fn len(&self) -> usize {
        let max_added = self
            .added_decoder
            .keys()
            .max()
            .map_or(0, |&m| m as usize + 1);
        self.sp.piece_size().max(max_added)
    }

    /// Never true for a loaded model (there is always `<unk>`); present for `len`'s sake.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// BOS id (`<s>`), if a BOS token is configured.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// EOS id (`</s>`), if an EOS token is configured.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// `all_special_tokens`: BOS, EOS, UNK, PAD and `additional_special_tokens`, deduplicated.
    pub fn special_tokens(&self) -> &[String] {
        &self.special_tokens
    }

    /// Whether `id` is one of `all_special_ids` (what `skip_special_tokens` drops).
    pub fn is_special_id(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// `convert_tokens_to_ids(token)`: added tokens first, then SentencePiece (`<unk>` id if unknown).
    pub fn token_to_id(&self, token: &str) -> u32 {
        self.added_encoder
            .get(token)
            .copied()
            .unwrap_or_else(|| self.sp.piece_to_id(token))
    }

    /// `convert_ids_to_tokens(id)`: the added token's content or the SentencePiece piece;
    /// `None` for an id outside the vocabulary.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        match self.added_decoder.get(&id) {
            Some(t) => Some(t.content.as_str()),
            None => self.sp.id_to_piece(id),
        }
    }

    /// `tokenize(text)`: the token strings (added tokens and SentencePiece pieces), no BOS/EOS.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let mut chunks = self.trie.split(text);
        // strip / single_word handling of `PreTrainedTokenizer.tokenize`
        for i in 0..chunks.len() {
            let Some(&id) = self.added_encoder.get(&chunks[i]) else {
                continue;
            };
            let Some(t) = self.added_decoder.get(&id) else {
                continue;
            };
            // python reads `left`/`right` before stripping and tests them for truthiness
            let left: Option<String> = (i > 0)
                .then(|| chunks[i - 1].clone())
                .filter(|s| !s.is_empty());
            let right: Option<String> = (i + 1 < chunks.len())
                .then(|| chunks[i + 1].clone())
                .filter(|s| !s.is_empty());
            if t.rstrip {
                if let Some(r) = &right {
                    chunks[i + 1] = py_lstrip(r).to_string();
                }
            }
            if t.lstrip {
                if let Some(l) = &left {
                    chunks[i - 1] = py_rstrip(l).to_string();
                }
            }
            let left_glue = left.as_deref().is_some_and(|l| !l.ends_with(' '));
            let right_glue = right.as_deref().is_some_and(|r| !r.starts_with(' '));
            if t.single_word && left_glue {
                let tok = std::mem::take(&mut chunks[i]);
                chunks[i - 1].push_str(&tok);
            } else if t.single_word && right_glue {
                let tok = std::mem::take(&mut chunks[i]);
                chunks[i + 1] = tok + &chunks[i + 1];
            }
        }
        let mut out = Vec::new();
        for c in chunks {
            if c.is_empty() {
                continue;
            }
            if self.added_encoder.contains_key(&c) {
                out.push(c);
            } else {
                out.extend(self.sp.encode_pieces(&c).into_iter().map(|(p, _)| p));
            }
        }
        out
    }

    /// `encode(text, add_special_tokens)`: ids as the slow tokenizer returns them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if add_special_tokens && self.config.add_bos_token {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend(self.tokenize(text).iter().map(|t| self.token_to_id(t)));
        if add_special_tokens && self.config.add_eos_token {
            if let Some(e) = self.eos_id {
                ids.push(e);
            }
        }
        ids
    }

    /// `decode(ids, skip_special_tokens=...)` with transformers' defaults for the other options.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, Error> {
        self.decode_with(
            ids,
            DecodeOptions {
                skip_special_tokens,
                ..DecodeOptions::default()
            },
        )
    }

    /// `decode` with every option; an id outside the vocabulary is an error (python raises too).
    pub fn decode_with(&self, ids: &[u32], opts: DecodeOptions) -> Result<String, Error> {
        let mut tokens: Vec<&str> = Vec::with_capacity(ids.len());
        for &id in ids {
            if opts.skip_special_tokens && self.special_ids.contains(&id) {
                continue;
            }
            tokens.push(self.id_to_piece(id).ok_or(Error::InvalidId(id))?);
        }
        let mut sub_texts: Vec<String> = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        for t in tokens {
            if self.legacy_added.contains(t) {
                if !current.is_empty() {
                    let s = self.convert_tokens_to_string(&current);
                    if !s.is_empty() {
                        sub_texts.push(s);
                    }
                    current.clear();
                }
                sub_texts.push(t.to_string());
            } else {
                current.push(t);
            }
        }
        if !current.is_empty() {
            sub_texts.push(self.convert_tokens_to_string(&current));
        }
        let text = sub_texts.join(if opts.spaces_between_special_tokens {
            " "
        } else {
            ""
        });
        let clean = opts
            .clean_up_tokenization_spaces
            .unwrap_or(self.config.clean_up_tokenization_spaces);
        Ok(if clean {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// `LlamaTokenizer.convert_tokens_to_string` (legacy): special tokens are not passed through
    /// SentencePiece; a space is inserted before a special token that follows normal text.
    fn convert_tokens_to_string(&self, tokens: &[&str]) -> String {
        let mut tokens: Vec<&str> = tokens.to_vec();
        if self.config.add_prefix_space {
            if let Some(first) = tokens.first_mut() {
                if let Some(rest) = first.strip_prefix(SPACE_SYMBOL) {
                    *first = rest;
                }
            }
        }
        let mut out = String::new();
        let mut current: Vec<&str> = Vec::new();
        let mut prev_is_special = false;
        for (i, &t) in tokens.iter().enumerate() {
            if self.special_token_set.contains(t) {
                if !prev_is_special && i != 0 {
                    out.push(' ');
                }
                out.push_str(&self.sp.decode_pieces(&current));
                out.push_str(t);
                prev_is_special = true;
                current.clear();
            } else {
                if prev_is_special
                    && i == 1
                    && self.config.add_prefix_space
                    && !t.starts_with(SPACE_SYMBOL)
                {
                    out.push(' ');
                }
                current.push(t);
                prev_is_special = false;
            }
        }
        out.push_str(&self.sp.decode_pieces(&current));
        out
    }
}

/// Python's `str.lstrip()` (Unicode whitespace).
fn py_lstrip(s: &str) -> &str {
    s.trim_start_matches(is_py_space)
}

/// Python's `str.rstrip()` (Unicode whitespace).
fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// `str.isspace()` per character: Unicode White_Space plus the ASCII separators 0x1C..0x1F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
pub fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
