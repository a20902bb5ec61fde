//! Compares [`SentencePieceModel`] with the real sentencepiece library (0.2.0) on tiny BPE models
//! trained by `scripts/fixtures/gen_sp_trained_fixtures.py` (see
//! `tests/fixtures/sentencepiece/README.md`): the nmt_nfkc and a custom precompiled charsmap,
//! `remove_extra_whitespaces`, user-defined and control pieces, unknown runs without byte
//! fallback, byte fallback, `add_dummy_prefix = false`, `escape_whitespaces = false`, UNUSED
//! pieces (resegmentation) and a custom `unk_surface`.

mod common;

use std::path::PathBuf;

use common::{assert_no_failures, ids, load, repo};
use cpmv_sentencepiece::{Error, ModelProto, Piece, PieceType, SentencePieceModel};
use serde_json::Value;

const TRAINED: &str = "tests/fixtures/sentencepiece/trained";

fn dir() -> PathBuf {
    repo().join(TRAINED)
}

fn fixture() -> Value {
    load(&format!("{TRAINED}/probes.json"))
}

fn proto(name: &str) -> ModelProto {
    let bytes = std::fs::read(dir().join(format!("{name}.model"))).expect("model file");
    ModelProto::parse(&bytes).expect("model parses")
}

/// The trained model, or a `*-var` variant: the base model with the same `normalizer_spec` edits
/// the generator made.
fn model(fx: &Value, name: &str) -> SentencePieceModel {
    let Some(var) = fx["variants"].get(name) else {
        return SentencePieceModel::from_proto(proto(name)).expect("model loads");
    };
    let mut p = proto(var["base"].as_str().expect("base"));
    for (k, v) in var["normalizer_spec"].as_object().expect("edits") {
        let v = v.as_bool().expect("bool edit");
        match k.as_str() {
            "add_dummy_prefix" => p.normalizer.add_dummy_prefix = v,
            "remove_extra_whitespaces" => p.normalizer.remove_extra_whitespaces = v,
            "escape_whitespaces" => p.normalizer.escape_whitespaces = v,
            other => panic!("unknown normalizer_spec edit {other}"),
        }
    }
    SentencePieceModel::from_proto(p).expect("variant loads")
}

fn model_names(fx: &Value) -> Vec<String> {
    fx["models"]
        .as_object()
        .expect("models")
        .keys()
        .cloned()
        .collect()
}

fn probes(fx: &Value) -> Vec<&str> {
    fx["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .map(|t| t.as_str().expect("probe text"))
        .collect()
}

#[test]
fn encode_and_normalize_match_sentencepiece() {
    let fx = fixture();
    let texts = probes(&fx);
    assert!(texts.len() >= 80);
    let names = model_names(&fx);
    assert_eq!(names.len(), 5);
    let mut failures = Vec::new();
    for name in &names {
        let m = model(&fx, name);
        let mf = &fx["models"][name.as_str()];
        assert_eq!(
            m.piece_size() as u64,
            mf["piece_size"].as_u64().expect("size")
        );
        let all_ids = mf["ids"].as_array().expect("ids");
        let all_norm = mf["normalized"].as_array().expect("normalized");
        assert_eq!(all_ids.len(), texts.len());
        for (i, text) in texts.iter().enumerate() {
            let want = ids(&all_ids[i]);
            let want_norm = match all_norm[i].as_str() {
                Some(s) => s.to_string(),
                None => want
                    .iter()
                    .map(|&id| m.id_to_piece(id).expect("piece"))
                    .collect(),
            };
            let got = m.encode(text);
            let got_norm = m.normalize(text);
            if got != want || got_norm != want_norm {
                let pieces = |v: &[u32]| -> Vec<String> {
                    v.iter()
                        .map(|&id| m.id_to_piece(id).unwrap_or("?").to_string())
                        .collect()
                };
                failures.push(format!(
                    "[{name}] {text:?}\n  want {want:?} {:?} norm {want_norm:?}\n  got  {got:?} {:?} norm {got_norm:?}",
                    pieces(&want),
                    pieces(&got)
                ));
            }
        }
    }
    assert_no_failures(&failures);
}

#[test]
fn decode_matches_sentencepiece() {
    let fx = fixture();
    let texts = probes(&fx);
    let mut failures = Vec::new();
    for name in &model_names(&fx) {
        let m = model(&fx, name);
        let mf = &fx["models"][name.as_str()];
        let mut check = |i: &[u32], want: &str| {
            let got = m.decode_ids(i).expect("ids in range");
            if got != want {
                failures.push(format!("[{name}] {i:?}: want {want:?}, got {got:?}"));
            }
        };
        let all_ids = mf["ids"].as_array().expect("ids");
        let decoded = mf["decoded"].as_array().expect("decoded");
        for (k, text) in texts.iter().enumerate() {
            check(&ids(&all_ids[k]), decoded[k].as_str().unwrap_or(text));
        }
        let n = u32::try_from(m.piece_size()).expect("size");
        check(
            &(0..n).collect::<Vec<_>>(),
            mf["decode_all"].as_str().expect("decode_all"),
        );
        for c in mf["decode"].as_array().expect("decode cases") {
            check(&ids(&c["ids"]), c["text"].as_str().expect("text"));
        }
    }
    // DecodePieces: strings outside the vocabulary stay as they are, `<unk>` gives unk_surface
    let cases = fx["decode_pieces"].as_array().expect("decode_pieces");
    assert!(cases.len() >= 12);
    for c in cases {
        let name = c["model"].as_str().expect("model");
        let m = model(&fx, name);
        let pieces: Vec<&str> = c["pieces"]
            .as_array()
            .expect("pieces")
            .iter()
            .map(|p| p.as_str().expect("piece"))
            .collect();
        let want = c["text"].as_str().expect("text");
        let got = m.decode_pieces(&pieces);
        if got != want {
            failures.push(format!("[{name}] {pieces:?}: want {want:?}, got {got:?}"));
        }
    }
    assert_no_failures(&failures);
}

/// The fixtures really exercise the paths they are meant for.
#[test]
fn trained_models_cover_the_intended_paths() {
    let fx = fixture();
    let kinds = |name: &str| -> Vec<PieceType> {
        proto(name)
            .pieces
            .iter()
            .map(|p| p.kind)
            .collect::<Vec<_>>()
    };
    let nfkc = proto("nfkc-unk");
    assert_eq!(nfkc.normalizer.name, "nmt_nfkc");
    assert!(!nfkc.normalizer.precompiled_charsmap.is_empty());
    assert!(nfkc.normalizer.remove_extra_whitespaces && !nfkc.trainer.byte_fallback);
    assert!(kinds("nfkc-unk").contains(&PieceType::UserDefined));

    let ident = proto("identity-user-bytes");
    assert!(ident.normalizer.precompiled_charsmap.is_empty());
    assert!(!ident.normalizer.add_dummy_prefix && ident.trainer.byte_fallback);
    let k = kinds("identity-user-bytes");
    assert!(k.contains(&PieceType::UserDefined) && k.contains(&PieceType::Byte));
    assert!(k.iter().filter(|&&t| t == PieceType::Control).count() >= 3);

    let custom = proto("custom-unused");
    assert!(!custom.normalizer.precompiled_charsmap.is_empty());
    assert_eq!(custom.trainer.unk_surface, "<?>");
    assert!(kinds("custom-unused").contains(&PieceType::Unused));

    // some probe's ids merge an unknown run, and some contain an UNUSED piece
    let texts = probes(&fx);
    let m = model(&fx, "nfkc-unk");
    let unk_runs = texts
        .iter()
        .filter(|t| {
            m.encode_pieces(t)
                .iter()
                .any(|(p, id)| *id == m.unk_id() && p.chars().count() > 1)
        })
        .count();
    assert!(unk_runs > 0);
    let m = model(&fx, "custom-unused");
    let unused = texts
        .iter()
        .filter(|t| {
            m.encode(t)
                .iter()
                .any(|&id| m.piece(id).map(|p| p.kind) == Some(PieceType::Unused))
        })
        .count();
    assert!(unused > 0);
}

/// The same edits as the generator's `edit()`.
fn edited(base: &str, edits: &Value) -> ModelProto {
    let mut p = proto(base);
    let index = |p: &ModelProto, s: &str| {
        p.pieces
            .iter()
            .position(|x| x.piece == s)
            .unwrap_or_else(|| panic!("piece {s:?}"))
    };
    let kind = |v: &Value| PieceType::from_proto(v.as_u64().expect("type")).expect("piece type");
    for e in edits.as_array().expect("edits") {
        let (op, arg) = e.as_object().expect("edit").iter().next().expect("one op");
        let s = |i: usize| arg[i].as_str().expect("string arg");
        match op.as_str() {
            "byte_fallback" => p.trainer.byte_fallback = arg.as_bool().expect("bool"),
            "set_piece" => {
                let i = index(&p, s(0));
                p.pieces[i].piece = s(1).to_string();
            }
            "set_type" => {
                let i = index(&p, s(0));
                p.pieces[i].kind = kind(&arg[1]);
            }
            "swap" => {
                let (a, b) = (index(&p, s(0)), index(&p, s(1)));
                let tmp = p.pieces[a].piece.clone();
                p.pieces[a].piece = std::mem::replace(&mut p.pieces[b].piece, tmp);
            }
            "add" => p.pieces.push(Piece {
                piece: s(0).to_string(),
                score: 0.0,
                kind: kind(&arg[1]),
            }),
            other => panic!("unknown edit {other}"),
        }
    }
    p
}

/// What sentencepiece refuses at load time (`InitializePieces`) is refused, what it loads is
/// loaded and encodes the same; where its encoder fails on a loadable model, the crate refuses the
/// model instead.
#[test]
fn load_checks_match_sentencepiece() {
    let fx = fixture();
    let texts: Vec<&str> = fx["load_check_texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("text"))
        .collect();
    let checks = fx["load_checks"].as_array().expect("load checks");
    assert!(checks.len() >= 10);
    let mut failures = Vec::new();
    for c in checks {
        let name = c["name"].as_str().expect("name");
        let p = edited(c["base"].as_str().expect("base"), &c["edits"]);
        let got = SentencePieceModel::from_proto(p);
        let encode_fails = c["encode_fails"].as_bool().unwrap_or(false);
        match (c["error"].as_str(), got) {
            (Some(_), Err(Error::Proto(_))) => {}
            (None, Err(Error::Unsupported(_))) if encode_fails => {}
            (None, Ok(m)) if !encode_fails => {
                for (t, want) in texts.iter().zip(c["ids"].as_array().expect("ids")) {
                    let got = m.encode(t);
                    if got != ids(want) {
                        failures.push(format!("{name}: {t:?} want {want}, got {got:?}"));
                    }
                }
            }
            (want, got) => failures.push(format!(
                "{name}: sentencepiece {:?} (encode fails: {encode_fails}), crate {:?}",
                want.unwrap_or("loads"),
                got.map(|_| "loads")
            )),
        }
    }
    assert_no_failures(&failures);
}
