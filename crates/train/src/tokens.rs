//! Token ids of a checkpoint's special tokens, read from its `tokenizer.json` (the trainer
//! needs a few ids, not a tokenizer).

use serde_json::Value;
use std::path::Path;

use crate::error::{io, TrainError};

/// The ids of `tokens` in `dir/tokenizer.json` (read and parsed once): each an added token,
/// else an entry of the model's vocabulary (a map for BPE/WordPiece, a list of
/// `[piece, score]` for Unigram).
pub fn token_ids<const N: usize>(dir: &Path, tokens: [&str; N]) -> Result<[u32; N], TrainError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Mismatch(format!("{}: invalid JSON: {e}", path.display())))?;
    let mut ids = [0u32; N];
    for (id, token) in ids.iter_mut().zip(tokens) {
        *id = lookup(&v, token).ok_or_else(|| {
            TrainError::Mismatch(format!(
                "{}: no token {token:?} (a MiniCPM-V tokenizer has it)",
                path.display()
            ))
        })?;
    }
    Ok(ids)
}

fn lookup(v: &Value, token: &str) -> Option<u32> {
    let as_id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    let added = v
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|t| t.get("content").and_then(Value::as_str) == Some(token))
        .and_then(|t| t.get("id").and_then(as_id));
    if added.is_some() {
        return added;
    }
    match v.pointer("/model/vocab")? {
        Value::Object(map) => map.get(token).and_then(as_id),
        Value::Array(list) => list
            .iter()
            .position(|e| e.get(0).and_then(Value::as_str) == Some(token))
            .and_then(|i| u32::try_from(i).ok()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_tokens_then_the_vocabulary_of_either_kind() {
        let bpe = serde_json::json!({
            "added_tokens": [{"id": 7, "content": "<image>"}],
            "model": {"type": "BPE", "vocab": {"a": 0, "<slice>": 5}}
        });
        assert_eq!(lookup(&bpe, "<image>"), Some(7));
        assert_eq!(lookup(&bpe, "<slice>"), Some(5));
        assert_eq!(lookup(&bpe, "</slice>"), None);
        let unigram = serde_json::json!({
            "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["</slice>", -1.0]]}
        });
        assert_eq!(lookup(&unigram, "</slice>"), Some(1));
    }

    /// The bundled checkpoints' ids agree with what `prep` resolves through the tokenizer.
    #[test]
    fn ids_match_the_tokenizer_of_every_bundled_checkpoint() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/models");
        for name in [
            "minicpm-v-2-tiny",
            "minicpm-llama3-v-2_5-tiny",
            "minicpm-v-2_6-tiny",
        ] {
            let dir = root.join(name);
            let md = cpmv_prep::model::ModelDir::load(&dir, None).unwrap();
            let ids = token_ids(&dir, ["<image>", "<slice>", "</slice>"]).unwrap();
            let want = [
                md.tokens.im_start,
                md.tokens.slice_start,
                md.tokens.slice_end,
            ];
            assert_eq!(ids, want, "{name}");
            assert!(token_ids(&dir, ["<no such token>"]).is_err(), "{name}");
        }
    }
}
