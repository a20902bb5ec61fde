//! SentencePiece's `precompiled_charsmap`: a darts-clone double-array trie over UTF-8 byte
//! sequences whose values point into a table of NUL-terminated replacement strings.
//!
//! Layout (little endian): `u32 trie_size`, `trie_size` bytes of double-array units (`u32` each),
//! then the replacement strings. Matching is a common-prefix search keeping the longest match, as
//! `Normalizer::NormalizePrefix` does.

use crate::Error;

/// A decoded precompiled character map.
#[derive(Debug, Clone)]
pub(crate) struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    /// Decode the blob; errors as `DecodePrecompiledCharsMap` does on a broken blob.
    pub(crate) fn parse(blob: &[u8]) -> Result<Self, Error> {
        if blob.len() <= 4 {
            return Err(Error::Proto("precompiled_charsmap: blob is broken".into()));
        }
        let size = u32::from_le_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        if size >= blob.len() || size % 4 != 0 || 4 + size > blob.len() {
            return Err(Error::Proto(
                "precompiled_charsmap: trie size exceeds the blob".into(),
            ));
        }
        let units = blob[4..4 + size]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>();
        if units.is_empty() {
            return Err(Error::Proto("precompiled_charsmap: empty trie".into()));
        }
        Ok(CharsMap {
            units,
            normalized: blob[4 + size..].to_vec(),
        })
    }

    /// Longest rule matching a prefix of `input`: `(matched byte length, replacement)`.
    pub(crate) fn longest_prefix(&self, input: &[u8]) -> Option<(usize, &str)> {
        let mut best: Option<(usize, u32)> = None;
        let mut node: usize = 0;
        let unit = *self.units.first()?;
        node ^= offset(unit);
        for (i, &b) in input.iter().enumerate() {
            node ^= usize::from(b);
            // darts-clone arrays come in blocks of 256 units, so a valid trie never leaves them;
            // a truncated one ends the search with what was found so far
            let Some(&u) = self.units.get(node) else {
                break;
            };
            if label(u) != u32::from(b) {
                break;
            }
            node ^= offset(u);
            if has_leaf(u) {
                let Some(&leaf) = self.units.get(node) else {
                    break;
                };
                let v = leaf & 0x7fff_ffff;
                if best.is_none_or(|(len, _)| i + 1 > len) {
                    best = Some((i + 1, v));
                }
            }
        }
        let (len, v) = best?;
        let start = v as usize;
        let tail = self.normalized.get(start..)?;
        let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
        // A replacement that is not valid UTF-8 would be a broken model: treat as no rule.
        let s = std::str::from_utf8(&tail[..end]).ok()?;
        Some((len, s))
    }
}

fn has_leaf(u: u32) -> bool {
    (u >> 8) & 1 == 1
}

fn label(u: u32) -> u32 {
    u & ((1 << 31) | 0xff)
}

fn offset(u: u32) -> usize {
    ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize
}
