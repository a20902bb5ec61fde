//! A minimal protobuf reader for SentencePiece's `ModelProto` (`tokenizer.model`).
//!
//! Only the fields the encoder and decoder need are decoded; every other field is skipped by its
//! wire type. Field numbers follow `sentencepiece_model.proto` (sentencepiece 0.1.x/0.2.x).

use crate::Error;

/// The type of one vocabulary piece (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// A normal piece, produced by BPE merges.
    Normal,
    /// The unknown piece (`<unk>`).
    Unknown,
    /// A control piece (`<s>`, `</s>`): never produced from text, decodes to nothing.
    Control,
    /// A user-defined piece: always matched whole in the input, never merged further.
    UserDefined,
    /// A reserved, unused piece: may appear as a merge intermediate but is split back.
    Unused,
    /// A byte-fallback piece `<0xXX>`.
    Byte,
}

impl PieceType {
    /// The type of a `ModelProto.SentencePiece.Type` number (1 normal … 6 byte).
    pub fn from_proto(v: u64) -> Result<Self, Error> {
        Ok(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return Err(Error::Proto(format!("unknown piece type {v}"))),
        })
    }
}

/// One vocabulary entry: its surface string, score (merge priority for BPE) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text, with `▁` (U+2581) standing for a space.
    pub piece: String,
    /// Score; for BPE a higher score merges first.
    pub score: f32,
    /// Piece type.
    pub kind: PieceType,
}

/// `TrainerSpec` fields that change encoding or decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// `model_type`: 1 = UNIGRAM (proto default), 2 = BPE, 3 = WORD, 4 = CHAR.
    pub model_type: u64,
    /// Unknown characters become `<0xXX>` byte pieces instead of `<unk>`.
    pub byte_fallback: bool,
    /// Whitespace is attached as a suffix instead of a prefix.
    pub treat_whitespace_as_suffix: bool,
    /// Text that decoding writes for an `<unk>` piece (default `" ⁇ "`).
    pub unk_surface: String,
    /// Declared ids of the reserved pieces (informational; the piece types are authoritative).
    pub unk_id: i64,
    /// See `unk_id`.
    pub bos_id: i64,
    /// See `unk_id`.
    pub eos_id: i64,
    /// See `unk_id`; -1 when the model has no pad piece.
    pub pad_id: i64,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        TrainerSpec {
            model_type: 1,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_surface: " \u{2047} ".to_string(),
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
        }
    }
}

/// `NormalizerSpec` (also used for `denormalizer_spec`), with the proto defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    /// Rule name (`identity`, `nmt_nfkc`, ...), informational: the compiled `precompiled_charsmap` is what applies.
    pub name: String,
    /// Compiled normalization rules (a darts-clone double array plus replacement strings); empty = identity.
    pub precompiled_charsmap: Vec<u8>,
    /// Prepend `▁` to every non-empty input.
    pub add_dummy_prefix: bool,
    /// Drop leading/trailing spaces and collapse runs of spaces.
    pub remove_extra_whitespaces: bool,
    /// Replace `' '` with `▁`.
    pub escape_whitespaces: bool,
    /// Whether the spec was present in the file at all.
    pub present: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            present: false,
        }
    }
}

/// The decoded parts of a `ModelProto`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelProto {
    /// Vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// Trainer settings.
    pub trainer: TrainerSpec,
    /// Input normalization.
    pub normalizer: NormalizerSpec,
    /// Output denormalization (rarely present).
    pub denormalizer: NormalizerSpec,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| Error::Proto("truncated varint".into()))?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(Error::Proto("varint longer than 10 bytes".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| Error::Proto("field runs past the end of its message".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next `(field number, value)`, or `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let v = match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let _ = u64::from_le_bytes(a);
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?)
                    .map_err(|_| Error::Proto("length does not fit in memory".into()))?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                let mut a = [0u8; 4];
                a.copy_from_slice(b);
                Value::Fixed32(u32::from_le_bytes(a))
            }
            w => {
                return Err(Error::Proto(format!(
                    "unsupported wire type {w} (field {num})"
                )))
            }
        };
        Ok(Some((num, v)))
    }
}

fn as_bytes<'a>(v: &Value<'a>, what: &str) -> Result<&'a [u8], Error> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(Error::Proto(format!(
            "{what}: expected a length-delimited field"
        ))),
    }
}

fn as_string(v: &Value<'_>, what: &str) -> Result<String, Error> {
    String::from_utf8(as_bytes(v, what)?.to_vec())
        .map_err(|_| Error::Proto(format!("{what}: not valid UTF-8")))
}

fn as_varint(v: &Value<'_>, what: &str) -> Result<u64, Error> {
    match v {
        Value::Varint(x) => Ok(*x),
        _ => Err(Error::Proto(format!("{what}: expected a varint field"))),
    }
}

/// proto `int32` fields are sign-extended to 64 bits on the wire.
fn as_i32(v: &Value<'_>, what: &str) -> Result<i64, Error> {
    Ok(i64::from(as_varint(v, what)? as i32))
}

fn as_f32(v: &Value<'_>, what: &str) -> Result<f32, Error> {
    match v {
        Value::Fixed32(x) => Ok(f32::from_bits(*x)),
        _ => Err(Error::Proto(format!("{what}: expected a 32-bit float"))),
    }
}

fn parse_piece(buf: &[u8]) -> Result<Piece, Error> {
    let mut r = Reader::new(buf);
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((num, v)) = r.field()? {
        match num {
            1 => p.piece = as_string(&v, "piece")?,
            2 => p.score = as_f32(&v, "score")?,
            3 => p.kind = PieceType::from_proto(as_varint(&v, "type")?)?,
            _ => {}
        }
    }
    Ok(p)
}

fn parse_trainer(buf: &[u8]) -> Result<TrainerSpec, Error> {
    let mut r = Reader::new(buf);
    let mut t = TrainerSpec::default();
    while let Some((num, v)) = r.field()? {
        match num {
            3 => t.model_type = as_varint(&v, "model_type")?,
            24 => t.treat_whitespace_as_suffix = as_varint(&v, "treat_whitespace_as_suffix")? != 0,
            35 => t.byte_fallback = as_varint(&v, "byte_fallback")? != 0,
            40 => t.unk_id = as_i32(&v, "unk_id")?,
            41 => t.bos_id = as_i32(&v, "bos_id")?,
            42 => t.eos_id = as_i32(&v, "eos_id")?,
            43 => t.pad_id = as_i32(&v, "pad_id")?,
            44 => t.unk_surface = as_string(&v, "unk_surface")?,
            _ => {}
        }
    }
    Ok(t)
}

fn parse_normalizer(buf: &[u8]) -> Result<NormalizerSpec, Error> {
    let mut r = Reader::new(buf);
    let mut n = NormalizerSpec {
        present: true,
        ..NormalizerSpec::default()
    };
    while let Some((num, v)) = r.field()? {
        match num {
            1 => n.name = as_string(&v, "normalizer name")?,
            2 => n.precompiled_charsmap = as_bytes(&v, "precompiled_charsmap")?.to_vec(),
            3 => n.add_dummy_prefix = as_varint(&v, "add_dummy_prefix")? != 0,
            4 => n.remove_extra_whitespaces = as_varint(&v, "remove_extra_whitespaces")? != 0,
            5 => n.escape_whitespaces = as_varint(&v, "escape_whitespaces")? != 0,
            _ => {}
        }
    }
    Ok(n)
}

impl ModelProto {
    /// Decode a serialized `ModelProto` (the bytes of `tokenizer.model`).
    pub fn parse(buf: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(buf);
        let mut m = ModelProto::default();
        while let Some((num, v)) = r.field()? {
            match num {
                1 => m.pieces.push(parse_piece(as_bytes(&v, "pieces")?)?),
                2 => m.trainer = parse_trainer(as_bytes(&v, "trainer_spec")?)?,
                3 => m.normalizer = parse_normalizer(as_bytes(&v, "normalizer_spec")?)?,
                5 => m.denormalizer = parse_normalizer(as_bytes(&v, "denormalizer_spec")?)?,
                _ => {}
            }
        }
        Ok(m)
    }
}
