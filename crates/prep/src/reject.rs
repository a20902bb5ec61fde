//! Why a sample was not written. Every input sample ends up either in a shard or, with one of
//! these reasons, in `rejected.jsonl` (documented in `schemas/rejected.schema.json`).

use serde::Serialize;

/// Machine-readable rejection reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// The element or line is not valid JSON.
    InvalidJson,
    /// The sample is not a JSON object.
    NotAnObject,
    /// `conversations` missing, not a list, too short, or a message is malformed.
    InvalidConversations,
    /// A role other than user/assistant, the first not `user`, or no assistant turn.
    InvalidRoles,
    /// An assistant message with empty (or whitespace-only) content: the reference would
    /// silently supervise the following turn instead.
    EmptyAssistant,
    /// `image` is neither a path nor a `{"<image_NN>": path}` object.
    InvalidImageField,
    /// A literal `<image>` outside the first message (single-image samples), or in a
    /// multi-image or text-only sample.
    MisplacedImageTag,
    /// `<image>` twice in the first message, or one `<image_NN>` tag used twice.
    DuplicateImageTag,
    /// An `<image_NN>` tag with no image of that name.
    UnknownImageTag,
    /// An image of the `image` object whose tag never appears in the text.
    UnusedImage,
    /// The text contains a token the placeholders or the template rely on (e.g. `</image>`,
    /// `<slice>`, `<|im_start|>`), which would corrupt image bounds or supervision.
    ReservedToken,
    /// The text tokenizes to a token whose id is not below config.json's `vocab_size` (e.g. a
    /// literal added token such as `<|reserved_special_token_3|>` that the checkpoint's
    /// embedding does not cover): the trainer would stop at it.
    TokenOutOfVocab,
    /// The image file cannot be read.
    ImageNotFound,
    /// The image file cannot be decoded (corrupt, truncated, unsupported format).
    ImageDecode,
    /// More pixels than Pillow opens (its decompression-bomb limit, 178,956,970), so the
    /// reference drops it too; decoding it would take gigabytes.
    ImageTooLarge,
    /// More tokens than `--max-length` (and `--truncate` not given or not applicable).
    TooLong,
    /// No token carries a label (e.g. all supervision cut by truncation).
    NoSupervision,
    /// A bug in cpmv met this sample (a panic was caught); please report it with the sample.
    InternalError,
}

impl RejectKind {
    /// Every kind, in documentation order.
    pub const ALL: [RejectKind; 18] = [
        RejectKind::InvalidJson,
        RejectKind::NotAnObject,
        RejectKind::InvalidConversations,
        RejectKind::InvalidRoles,
        RejectKind::EmptyAssistant,
        RejectKind::InvalidImageField,
        RejectKind::MisplacedImageTag,
        RejectKind::DuplicateImageTag,
        RejectKind::UnknownImageTag,
        RejectKind::UnusedImage,
        RejectKind::ReservedToken,
        RejectKind::TokenOutOfVocab,
        RejectKind::ImageNotFound,
        RejectKind::ImageDecode,
        RejectKind::ImageTooLarge,
        RejectKind::TooLong,
        RejectKind::NoSupervision,
        RejectKind::InternalError,
    ];

    /// The snake_case name used in files and summaries.
    pub fn name(self) -> &'static str {
        match self {
            RejectKind::InvalidJson => "invalid_json",
            RejectKind::NotAnObject => "not_an_object",
            RejectKind::InvalidConversations => "invalid_conversations",
            RejectKind::InvalidRoles => "invalid_roles",
            RejectKind::EmptyAssistant => "empty_assistant",
            RejectKind::InvalidImageField => "invalid_image_field",
            RejectKind::MisplacedImageTag => "misplaced_image_tag",
            RejectKind::DuplicateImageTag => "duplicate_image_tag",
            RejectKind::UnknownImageTag => "unknown_image_tag",
            RejectKind::UnusedImage => "unused_image",
            RejectKind::ReservedToken => "reserved_token",
            RejectKind::TokenOutOfVocab => "token_out_of_vocab",
            RejectKind::ImageNotFound => "image_not_found",
            RejectKind::ImageDecode => "image_decode",
            RejectKind::ImageTooLarge => "image_too_large",
            RejectKind::TooLong => "too_long",
            RejectKind::NoSupervision => "no_supervision",
            RejectKind::InternalError => "internal_error",
        }
    }
}

/// A rejected sample's reason: the kind and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectKind,
    pub message: String,
}

impl Rejection {
    pub fn new(kind: RejectKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// One line of `rejected.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct RejectionRecord {
    pub file: String,
    pub index: u64,
    /// `line N` (JSONL) or `byte N` (JSON list).
    pub location: String,
    pub id: String,
    pub reason: RejectKind,
    pub message: String,
}
