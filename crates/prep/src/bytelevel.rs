//! An exact, faster encoder for the byte-level BPE `tokenizer.json` files of MiniCPM-Llama3-V 2.5
//! (Llama-3) and MiniCPM-V 2.6 (Qwen2), used by `prep` when a tokenizer has their shape.
//!
//! Hugging Face `tokenizers` encodes a text by splitting out added tokens, normalising each
//! remaining piece, splitting it with the pre-tokenizer's regex (fancy-regex's backtracking VM,
//! because of a look-ahead), mapping bytes to the byte-level alphabet and running BPE on each
//! word, building offsets and an `Encoding` along the way. Most of that time is bookkeeping
//! prep does not need. This path does the same steps with the same pieces of the library where
//! the result could differ (its added-token matcher `daachorse` with leftmost-longest matching,
//! its normaliser, its BPE model), and replaces only the regex by a hand-written matcher of the
//! two known patterns and the per-word work by a per-thread memo of word → ids. Anything else
//! (another pre-tokenizer, normalised or stripping added tokens, BPE dropout, other models)
//! keeps the library's own path: [`ByteLevelBpe::detect`] says no.
//!
//! Exactness is tested against the library on generated text with every character class the
//! patterns distinguish, on the example data and on rendered chat templates (`tests` below).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use daachorse::{DoubleArrayAhoCorasick, DoubleArrayAhoCorasickBuilder, MatchKind};
use regex_syntax::hir::{Class, HirKind};
use tokenizers::{Model, NormalizedString, Normalizer};

/// The Split pattern of Llama-3's tokenizer.json (numbers in runs of up to three digits).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Split pattern of Qwen2's tokenizer.json (numbers one digit at a time).
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Words memoised per thread before the memo is cleared, and the longest word memoised (longer
/// ones, e.g. a run of CJK letters, rarely repeat): at most ~40 MB per thread, a few MB in
/// practice.
const MEMO_WORDS: usize = 1 << 17;
const MEMO_WORD_BYTES: usize = 128;

/// Distinguishes encoders in the per-thread memo (two tokenizers never share entries).
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Word → ids of one encoder ([`ByteLevelBpe::owner`]), per thread: no locking between rayon
/// workers, and each thread learns the frequent words of the data quickly.
struct Memo {
    owner: u64,
    words: HashMap<Box<str>, Box<[u32]>>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo { owner: 0, words: HashMap::new() });
}

/// Sorted, disjoint code point ranges of one Unicode class, as the regex engine defines it.
struct Ranges(Vec<(char, char)>);

impl Ranges {
    /// The ranges of a one-class pattern (`\p{L}`, `(?i:s)`) from `regex-syntax`, the parser
    /// fancy-regex itself uses, so the Unicode tables are the same.
    fn of(pattern: &str) -> Ranges {
        let hir = regex_syntax::Parser::new()
            .parse(pattern)
            .expect("a valid one-class pattern");
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => {
                Ranges(c.ranges().iter().map(|r| (r.start(), r.end())).collect())
            }
            // Every pattern given here is a class of at least two code points (`(?i:[d])` is
            // [Dd]), which Unicode mode parses to a Unicode class.
            _ => unreachable!("{pattern} is not a Unicode class"),
        }
    }

    fn contains(&self, c: char) -> bool {
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

/// The character classes the two patterns use.
struct Classes {
    letter: Ranges,
    number: Ranges,
    space: Ranges,
    /// Case-insensitive s, t, r, e, v, m, l, d (`(?i:…)` of the contractions).
    fold: [Ranges; 8],
}

const FOLDED: [char; 8] = ['s', 't', 'r', 'e', 'v', 'm', 'l', 'd'];

impl Classes {
    fn new() -> Classes {
        Classes {
            letter: Ranges::of(r"\p{L}"),
            number: Ranges::of(r"\p{N}"),
            space: Ranges::of(r"\s"),
            fold: FOLDED.map(|c| Ranges::of(&format!("(?i:[{c}])"))),
        }
    }

    fn is_letter(&self, c: char) -> bool {
        if c.is_ascii() {
            c.is_ascii_alphabetic()
        } else {
            self.letter.contains(c)
        }
    }

    fn is_number(&self, c: char) -> bool {
        if c.is_ascii() {
            c.is_ascii_digit()
        } else {
            self.number.contains(c)
        }
    }

    fn is_space(&self, c: char) -> bool {
        if c.is_ascii() {
            matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
        } else {
            self.space.contains(c)
        }
    }

    /// `[^\s\p{L}\p{N}]`.
    fn is_other(&self, c: char) -> bool {
        !self.is_space(c) && !self.is_letter(c) && !self.is_number(c)
    }

    /// Whether `c` matches letter `which` of [`FOLDED`] case-insensitively.
    fn folds(&self, c: char, which: char) -> bool {
        let k = FOLDED
            .iter()
            .position(|&f| f == which)
            .expect("a folded letter");
        if c.is_ascii() {
            c.eq_ignore_ascii_case(&which)
        } else {
            self.fold[k].contains(c)
        }
    }
}

fn char_at(s: &str, i: usize) -> Option<(char, usize)> {
    s[i..].chars().next().map(|c| (c, c.len_utf8()))
}

/// The Split pre-tokenizer of the two patterns, written out: [`Splitter::end_of_match`] gives
/// where the regex's leftmost-first match at a position ends.
struct Splitter {
    classes: Classes,
    /// The longest run of `\p{N}` one match takes (3 for Llama-3, 1 for Qwen2).
    max_digits: usize,
}

impl Splitter {
    /// End of the run of characters from `i` that satisfy `keep`, at most `max` of them.
    fn run(&self, s: &str, mut i: usize, max: usize, keep: impl Fn(char) -> bool) -> usize {
        let mut n = 0;
        while n < max {
            match char_at(s, i) {
                Some((c, len)) if keep(c) => {
                    i += len;
                    n += 1;
                }
                _ => break,
            }
        }
        i
    }

    /// End of the match that starts at byte `i` (< `s.len()`). Every position starts a match
    /// (any character is a letter, a number, a space or "other"), so matches tile the text.
    fn end_of_match(&self, s: &str, i: usize) -> usize {
        let k = &self.classes;
        let (c, len) = char_at(s, i).expect("i inside s");
        let j = i + len;
        let next = char_at(s, j);
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' {
            if let Some((d, dl)) = next {
                if ['s', 't', 'm', 'd'].iter().any(|&f| k.folds(d, f)) {
                    return j + dl;
                }
                if let Some((e, el)) = char_at(s, j + dl) {
                    let three = (k.folds(d, 'r') && k.folds(e, 'e'))
                        || (k.folds(d, 'v') && k.folds(e, 'e'))
                        || (k.folds(d, 'l') && k.folds(e, 'l'));
                    if three {
                        return j + dl + el;
                    }
                }
            }
        }
        let letters = |from: usize| self.run(s, from, usize::MAX, |c| k.is_letter(c));
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if k.is_letter(c) {
            return letters(j);
        }
        let crlf = |c: char| c == '\r' || c == '\n';
        if !crlf(c) && !k.is_number(c) {
            if let Some((n, nl)) = next {
                if k.is_letter(n) {
                    return letters(j + nl);
                }
            }
        }
        // \p{N}{1,3} (or \p{N})
        if k.is_number(c) {
            return self.run(s, i, self.max_digits, |c| k.is_number(c));
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let others_then_newlines = |from: usize| {
            let end = self.run(s, from, usize::MAX, |c| k.is_other(c));
            self.run(s, end, usize::MAX, crlf)
        };
        if c == ' ' {
            if let Some((n, _)) = next {
                if k.is_other(n) {
                    return others_then_newlines(j);
                }
            }
        }
        if k.is_other(c) {
            return others_then_newlines(i);
        }
        // `c` is a space: the whitespace run from i, the end of its last \r or \n, and the
        // start of its last character.
        let (mut end, mut last_newline_end, mut last_start, mut chars) = (i, None, i, 0usize);
        while let Some((d, dl)) = char_at(s, end) {
            if !k.is_space(d) {
                break;
            }
            last_start = end;
            end += dl;
            chars += 1;
            if crlf(d) {
                last_newline_end = Some(end);
            }
        }
        // \s*[\r\n]+ : as many spaces as possible, then newlines: up to the last newline.
        if let Some(e) = last_newline_end {
            return e;
        }
        // \s+(?!\S): the whole run at the end of the text, else all but its last character.
        if end == s.len() {
            return end;
        }
        if chars >= 2 {
            return last_start;
        }
        // \s+
        end
    }

    /// The words of `s`, in order.
    fn words<'s>(&'s self, s: &'s str) -> impl Iterator<Item = &'s str> + 's {
        let mut i = 0;
        std::iter::from_fn(move || {
            if i >= s.len() {
                return None;
            }
            let end = self.end_of_match(s, i);
            let word = &s[i..end];
            i = end;
            Some(word)
        })
    }
}

/// The byte-level alphabet of GPT-2 style tokenizers: printable bytes stand for themselves, the
/// others for code points from 256 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        *slot = if printable {
            char::from(b as u8)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("a valid code point")
        };
    }
    table
}

/// The fast path for one byte-level BPE tokenizer (see the module documentation).
pub struct ByteLevelBpe {
    added: Option<DoubleArrayAhoCorasick<u32>>,
    splitter: Splitter,
    byte_chars: [char; 256],
    /// The normaliser, when it is a Unicode normal form: a piece its quick check (the same
    /// crate and tables the library normalises with) says is already normalised skips it.
    form: Option<NormalForm>,
    owner: u64,
}

/// The Unicode normal forms `tokenizers` offers as normalisers.
#[derive(Clone, Copy)]
enum NormalForm {
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
}

impl NormalForm {
    /// True when `s` is certainly in this form already (normalising it changes nothing).
    fn holds(self, s: &str) -> bool {
        use unicode_normalization_alignments as un;
        if s.is_ascii() {
            return true;
        }
        let chars = s.chars();
        un::IsNormalized::Yes
            == match self {
                NormalForm::Nfc => un::is_nfc_quick(chars),
                NormalForm::Nfd => un::is_nfd_quick(chars),
                NormalForm::Nfkc => un::is_nfkc_quick(chars),
                NormalForm::Nfkd => un::is_nfkd_quick(chars),
            }
    }
}

impl ByteLevelBpe {
    /// The fast path for `tokenizer` (loaded from the JSON `config`), or `None` when the
    /// tokenizer is not of the shape this path reproduces exactly.
    pub fn detect(config: &serde_json::Value, tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let form = match config["normalizer"]["type"].as_str() {
            Some("NFC") => Some(NormalForm::Nfc),
            Some("NFD") => Some(NormalForm::Nfd),
            Some("NFKC") => Some(NormalForm::Nfkc),
            Some("NFKD") => Some(NormalForm::Nfkd),
            _ => None,
        };
        let pre = &config["pre_tokenizer"];
        let steps = pre["pretokenizers"].as_array()?;
        if pre["type"] != "Sequence" || steps.len() != 2 {
            return None;
        }
        let (split, bytes) = (&steps[0], &steps[1]);
        let max_digits = match split["pattern"]["Regex"].as_str()? {
            LLAMA3_PATTERN => 3,
            QWEN2_PATTERN => 1,
            _ => return None,
        };
        let split_ok =
            split["type"] == "Split" && split["behavior"] == "Isolated" && split["invert"] == false;
        let bytes_ok = bytes["type"] == "ByteLevel"
            && bytes["add_prefix_space"] == false
            && bytes["use_regex"] == false;
        let model = &config["model"];
        let model_ok = model["type"] == "BPE" && model["dropout"].is_null();
        // With add_special_tokens = false these leave the ids alone.
        let post_ok = match config["post_processor"]["type"].as_str() {
            None => config["post_processor"].is_null(),
            Some(t) => matches!(t, "ByteLevel" | "TemplateProcessing"),
        };
        if !(split_ok && bytes_ok && model_ok && post_ok) {
            return None;
        }
        let added = tokenizer.get_added_tokens_decoder();
        if added
            .values()
            .any(|t| t.normalized || t.lstrip || t.rstrip || t.single_word)
        {
            return None;
        }
        let patterns: Vec<(&str, u32)> = added
            .iter()
            .map(|(&id, t)| (t.content.as_str(), id))
            .collect();
        let added = if patterns.is_empty() {
            None
        } else {
            Some(
                DoubleArrayAhoCorasickBuilder::new()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build_with_values(patterns)
                    .ok()?,
            )
        };
        Some(ByteLevelBpe {
            added,
            splitter: Splitter {
                classes: Classes::new(),
                max_digits,
            },
            byte_chars: byte_chars(),
            form,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The ids `tokenizer.encode_fast(text, false)` gives.
    pub fn encode(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
    ) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut start = 0;
        if let Some(added) = &self.added {
            for m in added.leftmost_find_iter(text) {
                if m.start() > start {
                    self.encode_piece(tokenizer, &text[start..m.start()], &mut ids)?;
                }
                ids.push(m.value());
                start = m.end();
            }
        }
        if start < text.len() {
            self.encode_piece(tokenizer, &text[start..], &mut ids)?;
        }
        Ok(ids)
    }

    /// A piece between added tokens: normalised, split into words, each word through BPE.
    fn encode_piece(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        piece: &str,
        ids: &mut Vec<u32>,
    ) -> Result<(), String> {
        let normalized: Cow<str> = match tokenizer.get_normalizer() {
            Some(n) if !self.form.is_some_and(|f| f.holds(piece)) => {
                let mut s = NormalizedString::from(piece);
                n.normalize(&mut s).map_err(|e| e.to_string())?;
                Cow::Owned(s.get().to_string())
            }
            _ => Cow::Borrowed(piece),
        };
        MEMO.with(|memo| {
            let mut memo = memo.borrow_mut();
            if memo.owner != self.owner || memo.words.len() >= MEMO_WORDS {
                memo.owner = self.owner;
                memo.words.clear();
            }
            let mut mapped = String::new();
            for word in self.splitter.words(&normalized) {
                if let Some(known) = memo.words.get(word) {
                    ids.extend_from_slice(known);
                    continue;
                }
                mapped.clear();
                mapped.extend(word.bytes().map(|b| self.byte_chars[b as usize]));
                let tokens = tokenizer
                    .get_model()
                    .tokenize(&mapped)
                    .map_err(|e| e.to_string())?;
                let word_ids: Box<[u32]> = tokens.iter().map(|t| t.id).collect();
                ids.extend_from_slice(&word_ids);
                if word.len() <= MEMO_WORD_BYTES {
                    memo.words.insert(word.into(), word_ids);
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// (tokenizer, its JSON) of `dir` (relative to the repository).
    fn load(dir: &str) -> (tokenizers::Tokenizer, serde_json::Value) {
        let path = root().join(dir).join("tokenizer.json");
        let bytes = std::fs::read(&path).unwrap();
        (
            tokenizers::Tokenizer::from_bytes(&bytes).unwrap(),
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    /// The byte-level tokenizers tested: the example models' (small vocabularies with real
    /// merges), Qwen2's real one (committed, Apache-2.0), and Llama-3's real one where it has been
    /// built locally (its licence keeps it out of the repository: see its NOTICE.txt).
    fn byte_level_tokenizers() -> Vec<&'static str> {
        let mut dirs = vec![
            "examples/models/minicpm-llama3-v-2_5-tiny",
            "examples/models/minicpm-v-2_6-tiny",
            "tests/fixtures/tokenizers/qwen2-minicpmv26",
        ];
        let llama3 = "tests/fixtures/tokenizers/llama3-minicpmv25";
        if root().join(llama3).join("tokenizer.json").exists() {
            dirs.push(llama3);
        }
        dirs
    }

    /// Pieces the patterns treat differently, and the tokens the templates use.
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "word",
        "Hello",
        "é",
        "e\u{301}",
        "ſ",
        "S",
        "'",
        "’",
        "'s",
        "'S",
        "'ſ",
        "'re",
        "'RE",
        "'ve",
        "'ll",
        "'Ll",
        "'d",
        "'m",
        "'t",
        "'x",
        " ",
        "  ",
        "   ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\n\n",
        " \n",
        "\u{a0}",
        "\u{3000}",
        "\u{85}",
        "\u{2028}",
        "\u{200b}",
        "\u{feff}",
        "0",
        "7",
        "12345",
        "٣",
        "²",
        "Ⅻ",
        "½",
        "!",
        "...",
        "?!",
        "(",
        ")",
        "-",
        "_",
        "\"",
        "#",
        "猫",
        "图片",
        "咖啡杯",
        "🙂",
        "👍🏽",
        "\u{212a}",
        "ﬀ",
        "ǅ",
        "\u{212b}",
        "\u{c5}",
        "A\u{30a}",
        "\u{1e0a}\u{323}",
        "\u{1100}\u{1161}",
        "\u{ac00}\u{11a8}",
        "\u{301}",
        "<image>",
        "<unk>",
        "</image>",
        "<slice>",
        "<|im_start|>",
        "<|im_end|>",
        "<|start_header_id|>",
        "<|eot_id|>",
        "<im",
        "age>",
        "<",
        ">",
        "|",
    ];

    /// Seeded text from [`PIECES`]: `n` strings of 1 to 24 pieces.
    fn generated(n: usize, seed: u64) -> Vec<String> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as usize
        };
        (0..n)
            .map(|_| {
                let k = 1 + next() % 24;
                (0..k).map(|_| PIECES[next() % PIECES.len()]).collect()
            })
            .collect()
    }

    /// Texts of the example data set, plus templates rendered the way prep renders them.
    fn real_texts() -> Vec<String> {
        let data: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root().join("examples/data/train.json")).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        for s in data.as_array().unwrap() {
            for m in s["conversations"].as_array().unwrap() {
                let content = m["content"].as_str().unwrap().to_string();
                out.push(format!(
                    "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n"
                ));
                out.push(format!(
                    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                    content.trim()
                ));
                out.push(format!("<image>{}</image>\n{content}", "<unk>".repeat(64)));
                out.push(content);
            }
        }
        out
    }

    #[test]
    fn the_splitter_cuts_where_the_library_s_pre_tokenizer_does() {
        for model in byte_level_tokenizers() {
            let (tok, config) = load(model);
            let fast = ByteLevelBpe::detect(&config, &tok).expect("a byte-level BPE tokenizer");
            let pre = tok.get_pre_tokenizer().unwrap();
            for text in generated(20_000, 7).into_iter().chain(real_texts()) {
                let mut p = PreTokenizedString::from(text.as_str());
                pre.pre_tokenize(&mut p).unwrap();
                let want: Vec<(usize, usize)> = p
                    .get_splits(OffsetReferential::Original, OffsetType::Byte)
                    .into_iter()
                    .map(|(_, o, _)| o)
                    .collect();
                let mut got = Vec::new();
                let mut at = 0;
                for w in fast.splitter.words(&text) {
                    got.push((at, at + w.len()));
                    at += w.len();
                }
                assert_eq!(got, want, "{model}: {text:?}");
            }
        }
    }

    #[test]
    fn encodes_exactly_as_the_library() {
        for model in byte_level_tokenizers() {
            let (tok, config) = load(model);
            let fast = ByteLevelBpe::detect(&config, &tok).unwrap();
            // Twice: the second pass hits the per-thread memo.
            for pass in 0..2 {
                for text in generated(20_000, 11).into_iter().chain(real_texts()) {
                    let want = tok.encode_fast(text.as_str(), false).unwrap();
                    let got = fast.encode(&tok, &text).unwrap();
                    assert_eq!(got, want.get_ids(), "{model} pass {pass}: {text:?}");
                }
            }
            assert_eq!(fast.encode(&tok, "").unwrap(), Vec::<u32>::new());
        }
    }

    #[test]
    fn other_tokenizer_shapes_keep_the_library_s_path() {
        // MiniCPM-V 2.0's tokenizer.json: Metaspace pre-tokenizer, SentencePiece-style BPE.
        let (tok, config) = load("examples/models/minicpm-v-2-tiny");
        assert!(ByteLevelBpe::detect(&config, &tok).is_none());
        let (tok, config) = load("examples/models/minicpm-v-2_6-tiny");
        let mut changed = config.clone();
        changed["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\s+".into();
        assert!(ByteLevelBpe::detect(&changed, &tok).is_none());
        let mut changed = config.clone();
        changed["model"]["dropout"] = 0.1.into();
        assert!(ByteLevelBpe::detect(&changed, &tok).is_none());
        let mut changed = config;
        changed["added_tokens"][0]["normalized"] = true.into();
        let bytes = serde_json::to_vec(&changed).unwrap();
        let retok = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
        assert!(ByteLevelBpe::detect(&changed, &retok).is_none());
    }
}
