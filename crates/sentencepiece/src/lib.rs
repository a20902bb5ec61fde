//! SentencePiece `tokenizer.model` reading and encoding, and the slow transformers
//! `LlamaTokenizer` (`legacy=True`) on top of it.
//!
//! MiniCPM-V 2.0 ships no fast tokenizer: its `tokenizer_config.json` maps `AutoTokenizer` to
//! `LlamaTokenizerWrapper`, a subclass of the slow, SentencePiece-backed `LlamaTokenizer` with
//! `legacy: true`. That tokenizer cuts the text on added tokens and encodes every remaining chunk
//! with SentencePiece separately, so each chunk gets its own dummy-prefix `▁` (also right after
//! a special token), which a `tokenizer.json` conversion does not reproduce. Training ids must
//! match it id for id, hence this crate:
//!
//! * [`ModelProto`]: a small hand-written protobuf reader for the fields that matter;
//! * [`SentencePieceModel`]: sentencepiece's normalizer, BPE (`bpe_model.cc`), byte fallback and
//!   decoder, refusing (never approximating) what is not implemented (Unigram/Word/Char models,
//!   whitespace-as-suffix, denormalizers);
//! * [`LegacyLlamaTokenizer`]: transformers 4.x's added-token `Trie` split, AddedToken strip
//!   flags, BOS/EOS, and `decode` as `PreTrainedTokenizer._decode` does it.
//!
//! ```no_run
//! let tok = cpmv_sentencepiece::LegacyLlamaTokenizer::from_dir("MiniCPM-V-2")?;
//! // the reference's training encoding of one piece: encode with BOS, drop the BOS
//! let ids = &tok.encode("<用户>", true)[1..];
//! # let _ = ids;
//! # Ok::<(), cpmv_sentencepiece::Error>(())
//! ```

use std::path::PathBuf;

mod charsmap;
mod model;
mod proto;
mod slow;
mod trie;

pub use model::{byte_to_piece, piece_to_byte, SentencePieceModel, SPACE_SYMBOL};
pub use proto::{ModelProto, NormalizerSpec, Piece, PieceType, TrainerSpec};
pub use slow::{
    clean_up_tokenization, AddedToken, DecodeOptions, LegacyLlamaTokenizer, SlowTokenizerConfig,
};

/// Everything that can go wrong loading or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `tokenizer.model` is not a valid SentencePiece `ModelProto`.
    #[error("malformed SentencePiece model: {0}")]
    Proto(String),
    /// The model or config asks for behaviour this crate does not implement; refused rather than
    /// tokenized differently.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    /// `tokenizer_config.json` is malformed or inconsistent.
    #[error("invalid tokenizer config: {0}")]
    Config(String),
    /// A token id outside the vocabulary was given to `decode`.
    #[error("token id {0} is outside the vocabulary")]
    InvalidId(u32),
}
