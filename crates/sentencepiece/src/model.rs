//! The SentencePiece processor for BPE models: normalization (`normalizer.cc`), BPE segmentation
//! (`bpe_model.cc`), byte fallback and unknown-run merging (`sentencepiece_processor.cc`,
//! `PopulateSentencePieceText`) and decoding (`SentencePieceProcessor::Decode`).

use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use crate::charsmap::CharsMap;
use crate::proto::{ModelProto, Piece, PieceType};
use crate::Error;

/// `▁` (U+2581), SentencePiece's visible space.
pub const SPACE_SYMBOL: &str = "\u{2581}";

/// A loaded SentencePiece BPE model (`tokenizer.model`), able to encode text to ids exactly as
/// `SentencePieceProcessor::Encode` does and to decode pieces back to text.
///
/// Only what is implemented is accepted: BPE models, whitespace as prefix, no denormalizer.
/// Anything else is refused at load time with [`Error::Unsupported`], never tokenized differently.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    proto: ModelProto,
    /// NORMAL, USER_DEFINED and UNUSED pieces (`pieces_` in sentencepiece).
    pieces: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces (`reserved_id_map_`).
    reserved: HashMap<String, u32>,
    /// User-defined pieces, matched longest-first at every position.
    user_defined: Vec<String>,
    unk_id: u32,
    charsmap: Option<CharsMap>,
}

/// One BPE symbol: a byte range of the normalized string plus its neighbours.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    freeze: bool,
    start: usize,
    len: usize,
}

/// A candidate merge on the agenda; ordered so that `BinaryHeap::pop` yields the highest score,
/// and the leftmost pair among equal scores (sentencepiece's `SymbolPairComparator`).
#[derive(Debug, Clone, Copy)]
struct Pair {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl SentencePieceModel {
    /// Read and validate `tokenizer.model` from disk.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parse and validate a serialized `ModelProto`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        Self::from_proto(ModelProto::parse(bytes)?)
    }

    /// Validate a decoded `ModelProto` as sentencepiece's `InitializePieces` does (empty or
    /// duplicate pieces, no or two unk pieces, byte pieces that are not exactly `<0xXX>` or
    /// present without `byte_fallback`, `byte_fallback` without all 256 byte pieces: all
    /// [`Error::Proto`]), and refuse what this crate does not implement ([`Error::Unsupported`]),
    /// including control pieces that BPE can produce, on which sentencepiece's encoder fails.
    pub fn from_proto(proto: ModelProto) -> Result<Self, Error> {
        let t = &proto.trainer;
        let model_type = match t.model_type {
            1 => Some("UNIGRAM"),
            2 => None,
            3 => Some("WORD"),
            4 => Some("CHAR"),
            _ => Some("unknown"),
        };
        if let Some(name) = model_type {
            return Err(Error::Unsupported(format!(
                "model_type {name} ({}): only BPE models are implemented",
                t.model_type
            )));
        }
        if t.treat_whitespace_as_suffix {
            return Err(Error::Unsupported(
                "treat_whitespace_as_suffix = true is not implemented".into(),
            ));
        }
        if !proto.denormalizer.precompiled_charsmap.is_empty() {
            return Err(Error::Unsupported(
                "a denormalizer (denormalizer_spec.precompiled_charsmap) is not implemented".into(),
            ));
        }
        let charsmap = if proto.normalizer.precompiled_charsmap.is_empty() {
            None
        } else {
            Some(CharsMap::parse(&proto.normalizer.precompiled_charsmap)?)
        };
        if proto.pieces.len() > u32::MAX as usize {
            return Err(Error::Proto("too many pieces".into()));
        }
        let mut pieces = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut unk_id = None;
        let mut byte_found = [false; 256];
        for (i, p) in proto.pieces.iter().enumerate() {
            let id = i as u32;
            if p.piece.is_empty() {
                return Err(Error::Proto(format!("piece {id} is empty")));
            }
            let normal = matches!(
                p.kind,
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            );
            let map = if normal { &mut pieces } else { &mut reserved };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(Error::Proto(format!(
                    "piece {:?} is defined twice",
                    p.piece
                )));
            }
            match p.kind {
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown => {
                    if unk_id.is_some() {
                        return Err(Error::Proto("unk is defined twice".into()));
                    }
                    unk_id = Some(id);
                }
                PieceType::Byte => {
                    if !t.byte_fallback {
                        return Err(Error::Proto(format!(
                            "byte piece {:?} found although byte_fallback is false",
                            p.piece
                        )));
                    }
                    match piece_to_byte(&p.piece) {
                        Some(b) => byte_found[usize::from(b)] = true,
                        None => {
                            return Err(Error::Proto(format!(
                                "byte piece {:?} is not of the form <0xXX> (upper-case hex)",
                                p.piece
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        let unk_id = unk_id.ok_or_else(|| Error::Proto("unk piece is not defined".into()))?;
        // sentencepiece refuses a byte-fallback model that cannot spell every byte
        if t.byte_fallback {
            if let Some(b) = byte_found.iter().position(|&f| !f) {
                return Err(Error::Proto(format!(
                    "byte_fallback is true but there are not 256 byte pieces (<0x{b:02X}> is missing)"
                )));
            }
        }
        // BPE yields pieces of `pieces` and single characters, and `PieceToId` looks reserved
        // pieces up first: a control piece spelled like one of those would be emitted, which
        // sentencepiece's encoder fails on ("all normalized characters are not consumed"; the
        // python binding then returns no ids at all). Refused rather than encoded differently.
        for p in &proto.pieces {
            if p.kind == PieceType::Control
                && (pieces.contains_key(&p.piece) || p.piece.chars().count() == 1)
            {
                return Err(Error::Unsupported(format!(
                    "control piece {:?} can be produced by BPE (a single character or also a \
                     normal piece): sentencepiece fails to encode text containing it",
                    p.piece
                )));
            }
        }
        // longest first, so the first prefix hit is the longest match
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Ok(SentencePieceModel {
            proto,
            pieces,
            reserved,
            user_defined,
            unk_id,
            charsmap,
        })
    }

    /// The decoded model file.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// Number of pieces (the sentencepiece vocabulary size, without transformers' added tokens).
    pub fn piece_size(&self) -> usize {
        self.proto.pieces.len()
    }

    /// Id of the unknown piece.
    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The piece with this id, or `None` when out of range.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.proto.pieces.get(id as usize).map(|p| p.piece.as_str())
    }

    /// The full vocabulary entry with this id.
    pub fn piece(&self, id: u32) -> Option<&Piece> {
        self.proto.pieces.get(id as usize)
    }

    /// `PieceToId`: reserved pieces first, then normal ones, else the unknown id.
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.lookup(piece).unwrap_or(self.unk_id)
    }

    /// Exact lookup without the unknown fallback.
    pub fn lookup(&self, piece: &str) -> Option<u32> {
        self.reserved
            .get(piece)
            .or_else(|| self.pieces.get(piece))
            .copied()
    }

    fn kind(&self, id: u32) -> Option<PieceType> {
        self.proto.pieces.get(id as usize).map(|p| p.kind)
    }

    /// Longest user-defined piece that prefixes `s` (`PrefixMatcher::PrefixMatch`).
    fn user_prefix(&self, s: &str) -> Option<usize> {
        self.user_defined
            .iter()
            .find(|u| s.starts_with(u.as_str()))
            .map(|u| u.len())
    }

    /// `Normalizer::NormalizePrefix`: the normalized text of the next unit and the input bytes it consumes.
    fn normalize_prefix<'a>(&'a self, input: &'a str) -> (&'a str, usize) {
        if let Some(n) = self.user_prefix(input) {
            return (&input[..n], n);
        }
        if let Some(cm) = &self.charsmap {
            if let Some((len, rep)) = cm.longest_prefix(input.as_bytes()) {
                // rules are over whole characters; a rule ending inside a character would be a
                // broken map: then copy the character as is
                if input.is_char_boundary(len) {
                    return (rep, len);
                }
            }
        }
        let n = input.chars().next().map_or(0, char::len_utf8);
        (&input[..n], n)
    }

    /// `Normalizer::Normalize`: the string the BPE model segments.
    pub fn normalize(&self, input: &str) -> String {
        let spec = &self.proto.normalizer;
        let mut input = input;
        let mut out = String::new();
        if input.is_empty() {
            return out;
        }
        if spec.remove_extra_whitespaces {
            while !input.is_empty() {
                let (p, n) = self.normalize_prefix(input);
                if p != " " {
                    break;
                }
                input = &input[n..];
            }
        }
        if input.is_empty() {
            return out;
        }
        let ws = if spec.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        if spec.add_dummy_prefix {
            out.push_str(ws);
        }
        let mut is_prev_space = spec.remove_extra_whitespaces;
        while !input.is_empty() {
            let (p, n) = self.normalize_prefix(input);
            let mut sp = p;
            if is_prev_space {
                sp = sp.trim_start_matches(' ');
            }
            if !sp.is_empty() {
                for c in sp.chars() {
                    if spec.escape_whitespaces && c == ' ' {
                        out.push_str(SPACE_SYMBOL);
                    } else {
                        out.push(c);
                    }
                }
                is_prev_space = sp.ends_with(' ');
            }
            input = &input[n..];
            if !spec.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if spec.remove_extra_whitespaces {
            while let Some(rest) = out.strip_suffix(ws) {
                let l = rest.len();
                out.truncate(l);
            }
        }
        out
    }

    /// `bpe::Model::Encode` on already normalized text: `(piece, id)` pairs, where an id equal to
    /// [`Self::unk_id`] marks a piece missing from the vocabulary.
    pub fn bpe<'a>(&self, normalized: &'a str) -> Vec<(&'a str, u32)> {
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut pos = 0;
        while pos < normalized.len() {
            let rest = &normalized[pos..];
            let (len, freeze) = match self.user_prefix(rest) {
                Some(n) => (n, true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let idx = symbols.len();
            symbols.push(Symbol {
                prev: idx.checked_sub(1),
                next: if pos + len < normalized.len() {
                    Some(idx + 1)
                } else {
                    None
                },
                freeze,
                start: pos,
                len,
            });
            pos += len;
        }
        if symbols.is_empty() {
            return Vec::new();
        }
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<&'a str, (&'a str, &'a str)> = HashMap::new();
        let text = normalized;
        let add_pair =
            |left: Option<usize>,
             right: Option<usize>,
             symbols: &[Symbol],
             agenda: &mut BinaryHeap<Pair>,
             rev_merge: &mut HashMap<&'a str, (&'a str, &'a str)>| {
                let (Some(l), Some(r)) = (left, right) else {
                    return;
                };
                let (sl, sr) = (symbols[l], symbols[r]);
                if sl.freeze || sr.freeze {
                    return;
                }
                let merged = &text[sl.start..sl.start + sl.len + sr.len];
                let Some(&id) = self.pieces.get(merged) else {
                    return;
                };
                let piece = &self.proto.pieces[id as usize];
                agenda.push(Pair {
                    left: l,
                    right: r,
                    score: piece.score,
                    size: merged.len(),
                });
                if piece.kind == PieceType::Unused {
                    rev_merge.insert(
                        merged,
                        (
                            &text[sl.start..sl.start + sl.len],
                            &text[sr.start..sr.start + sr.len],
                        ),
                    );
                }
            };
        for i in 1..symbols.len() {
            add_pair(Some(i - 1), Some(i), &symbols, &mut agenda, &mut rev_merge);
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (top.left, top.right);
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != top.size
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            symbols[r].len = 0;
            let prev = symbols[l].prev;
            let next = symbols[l].next;
            add_pair(prev, Some(l), &symbols, &mut agenda, &mut rev_merge);
            add_pair(Some(l), next, &symbols, &mut agenda, &mut rev_merge);
        }
        let mut out = Vec::new();
        let mut index = Some(0);
        while let Some(i) = index {
            let s = symbols[i];
            self.resegment(&text[s.start..s.start + s.len], &rev_merge, &mut out, 0);
            index = s.next;
        }
        out
    }

    fn resegment<'a>(
        &self,
        w: &'a str,
        rev_merge: &HashMap<&'a str, (&'a str, &'a str)>,
        out: &mut Vec<(&'a str, u32)>,
        depth: usize,
    ) {
        let id = self.piece_to_id(w);
        let unused = self.kind(id) == Some(PieceType::Unused);
        // depth guard: each level splits a strictly shorter string, so depth <= w.len() anyway
        if !unused || depth > w.len() {
            out.push((w, id));
            return;
        }
        match rev_merge.get(w) {
            Some(&(a, b)) => {
                self.resegment(a, rev_merge, out, depth + 1);
                self.resegment(b, rev_merge, out, depth + 1);
            }
            None => out.push((w, id)),
        }
    }

    /// `SentencePieceProcessor::Encode(text)`: normalize, BPE, then byte fallback for unknown
    /// pieces (or, without byte fallback, merge runs of unknown pieces into one). Returns the
    /// `(piece, id)` pairs that `EncodeAsPieces` / `EncodeAsIds` give.
    pub fn encode_pieces(&self, text: &str) -> Vec<(String, u32)> {
        let normalized = self.normalize(text);
        let result = self.bpe(&normalized);
        let byte_fallback = self.proto.trainer.byte_fallback;
        let mut out: Vec<(String, u32)> = Vec::with_capacity(result.len());
        let mut prev_unk = false;
        for (w, id) in result {
            let is_unk = self.kind(id) == Some(PieceType::Unknown);
            if is_unk && byte_fallback {
                for b in w.bytes() {
                    let p = byte_to_piece(b);
                    let bid = self.piece_to_id(&p);
                    out.push((p, bid));
                }
            } else if is_unk && prev_unk {
                if let Some(last) = out.last_mut() {
                    last.0.push_str(w);
                }
            } else {
                out.push((w.to_string(), id));
            }
            prev_unk = is_unk;
        }
        out
    }

    /// `SentencePieceProcessor::EncodeAsIds(text)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_pieces(text)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// `SentencePieceProcessor::Decode(pieces)` (what python's `sp.decode(list_of_str)` calls):
    /// control pieces vanish, `<unk>` becomes the unk surface, runs of byte pieces are decoded as
    /// UTF-8 (invalid bytes become U+FFFD), `▁` becomes a space, and the first piece loses one
    /// leading `▁` when the model adds a dummy prefix.
    pub fn decode_pieces<S: AsRef<str>>(&self, pieces: &[S]) -> String {
        let spec = &self.proto.normalizer;
        let mut text = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for p in pieces {
            let piece = p.as_ref();
            let id = self.piece_to_id(piece);
            let kind = self.kind(id);
            if kind == Some(PieceType::Byte) {
                // PieceToByte on a byte piece always succeeds (validated at load)
                if let Some(b) = piece_to_byte(piece) {
                    bytes.push(b);
                }
                continue;
            }
            flush_bytes(&mut text, &mut bytes);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            let (decoded, seen) = match kind {
                Some(PieceType::Control) => (String::new(), false),
                Some(PieceType::Unknown) => {
                    if self.id_to_piece(id) == Some(piece) {
                        (self.proto.trainer.unk_surface.clone(), false)
                    } else {
                        (piece.to_string(), false)
                    }
                }
                _ => {
                    let mut w = piece;
                    let mut has_bos_ws = false;
                    if is_bos_ws && (spec.add_dummy_prefix || spec.remove_extra_whitespaces) {
                        if let Some(rest) = w.strip_prefix(SPACE_SYMBOL) {
                            w = rest;
                            has_bos_ws = true;
                        }
                        if spec.remove_extra_whitespaces {
                            has_bos_ws = false;
                        }
                    }
                    (w.replace(SPACE_SYMBOL, " "), has_bos_ws)
                }
            };
            bos_ws_seen = seen;
            text.push_str(&decoded);
        }
        flush_bytes(&mut text, &mut bytes);
        text
    }

    /// Decode ids (`SentencePieceProcessor::DecodeIds`); `None` if an id is out of range.
    pub fn decode_ids(&self, ids: &[u32]) -> Option<String> {
        let pieces = ids
            .iter()
            .map(|&i| self.id_to_piece(i))
            .collect::<Option<Vec<_>>>()?;
        Some(self.decode_pieces(&pieces))
    }
}

/// Decode a run of byte-fallback bytes: each structurally invalid byte becomes one U+FFFD
/// (`ProcessBytePieces`, which consumes exactly one byte per invalid position).
fn flush_bytes(text: &mut String, bytes: &mut Vec<u8>) {
    let mut rest: &[u8] = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let good = e.valid_up_to();
                // the prefix is valid by construction
                text.push_str(std::str::from_utf8(&rest[..good]).unwrap_or_default());
                text.push('\u{FFFD}');
                rest = &rest[good + 1..];
            }
        }
    }
    bytes.clear();
}

/// `<0xXX>` (upper-case hex) for a byte, as `ByteToPiece` writes it.
pub fn byte_to_piece(b: u8) -> String {
    format!("<0x{b:02X}>")
}

/// The byte of a `<0xXX>` piece: exactly the strings [`byte_to_piece`] writes (two upper-case hex
/// digits), as sentencepiece's `PieceToByte` only knows those (`<0xab>` or `<0x+1>` are not byte
/// pieces).
pub fn piece_to_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?.as_bytes();
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    match hex {
        [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
        _ => None,
    }
}
