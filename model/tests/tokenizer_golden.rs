//! The Yuan tokenizer against the official recipe's ids and decoded text (../shared/tokenizer/golden_a.json).

mod common;

use std::path::PathBuf;

use model::tokenizer::{StreamDecoder, Tokenizer, Yuan};

fn dir() -> Option<PathBuf> {
    common::shared("tokenizer")
}

#[test]
fn every_golden_case_encodes_and_decodes_exactly() {
    let Some(dir) = dir() else { return };
    let tok = Yuan::load(&dir).unwrap();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden_a.json")).unwrap()).unwrap();
    for (name, id) in g["added_tokens"].as_object().unwrap() {
        assert_eq!(
            tok.special(name),
            Some(id.as_u64().unwrap() as u32),
            "{name}"
        );
    }
    assert_eq!(tok.eod() as u64, g["eod"].as_u64().unwrap());
    for case in g["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text), want, "encode {text:?}");
        assert_eq!(
            tok.decode(&want).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
    }
}

#[test]
fn streaming_never_splits_a_character_or_leaks_the_space_symbol() {
    let Some(dir) = dir() else { return };
    let tok = Tokenizer::Yuan(Yuan::load(&dir).unwrap());
    let text = "emoji 🚀🙂 and 数字 𝔘𝔫𝔦 with   spaces";
    let ids = tok.encode(text);
    let mut s = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = s.push(&tok, id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}') && !piece.contains('\u{2581}'),
            "{piece:?}"
        );
        out.push_str(&piece);
    }
    out.push_str(&s.finish(&tok).unwrap());
    assert_eq!(out, tok.decode(&ids).unwrap());
    assert!(
        tok.decode(&[tok.vocab() as u32]).is_err(),
        "ids outside the vocabulary are errors"
    );
}
