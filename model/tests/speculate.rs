//! Speculative decoding's exactness: a verify step (several drafted tokens run as one chunk with
//! `Logits::Verify`) gives every row the bits a one-token decode step gives it, and `State::rewind` takes
//! the rejected positions back so completely (keys and values, Yuan's LFA memory, the document mask) that
//! what follows is again the same bits. The tolerance is zero: speculation promises the same output.

mod common;

use model::arch::{argmax, Chunk, Logits, Shard, Solo, State};
use model::arch::{KvType, Model};
use model::pool::Pool;
use model::weight::Format;

fn step(model: &mut Model, pool: &Pool, state: &mut State, tokens: &[u32], l: Logits) -> Vec<f32> {
    let mut c = [Chunk {
        state,
        tokens,
        logits: l,
    }];
    model.forward_batch(pool, &mut Solo, &mut c).unwrap()
}

/// Plain greedy decoding: the logits row of every generated position and the ids.
fn plain(model: &mut Model, pool: &Pool, prompt: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut s = model.new_state(prompt.len() + n + 16);
    let mut row = step(model, pool, &mut s, prompt, Logits::Last);
    let (mut rows, mut ids) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let id = argmax(&row) as u32;
        rows.push(row);
        ids.push(id);
        row = step(model, pool, &mut s, &[id], Logits::Last);
    }
    (rows, ids)
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Speculative greedy decoding with drafts that are right for `good` tokens and then wrong (the eod
/// token among the wrong guesses, so that the document mask must be taken back too): every verified row
/// must equal plain decoding's, and so must the ids.
fn check(model: &mut Model, what: &str) {
    let n = 24;
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 61 + 11) % 400 + 7).collect();
    let eod = model.config.eod;
    for threads in [1, 2] {
        let pool = Pool::new(threads, None);
        let (rows, ids) = plain(model, &pool, &prompt, n);
        let mut s = model.new_state(prompt.len() + n + 16);
        let first = step(model, &pool, &mut s, &prompt, Logits::Last);
        assert!(same(&first, &rows[0]), "{what}: the prompt's logits");
        let mut out = vec![ids[0]];
        let mut round = 0;
        while out.len() < n {
            // Round r drafts k = 1 + r % 5 tokens, the first r % 3 of them right.
            let k = 1 + round % 5;
            let good = round % 3;
            let at = out.len();
            let draft: Vec<u32> = (0..k)
                .map(|i| match ids.get(at + i) {
                    Some(&id) if i < good => id,
                    Some(&id) if i % 2 == 0 => (id + 1) % 400 + 7,
                    _ => eod,
                })
                .collect();
            let mut tokens = vec![*out.last().unwrap()];
            tokens.extend(&draft);
            let start = s.pos;
            s.mark();
            let v = step(model, &pool, &mut s, &tokens, Logits::Verify);
            let width = v.len() / tokens.len();
            let mut kept = 0;
            for (i, row) in v.chunks_exact(width).enumerate() {
                let p = at + i;
                if p >= n {
                    break;
                }
                assert!(
                    same(row, &rows[p]),
                    "{what}, {threads} threads: position {p}"
                );
                let id = argmax(row) as u32;
                out.push(id);
                kept = i + 1;
                if draft.get(i) != Some(&id) {
                    break;
                }
            }
            s.rewind(start + kept).unwrap();
            round += 1;
        }
        out.truncate(n);
        assert_eq!(out, ids, "{what}, {threads} threads: the ids");
        // Before the mark, or past the sequence's end, there is nothing to go back to.
        assert!(s.rewind(s.pos + 1).is_err());
        s.mark();
        assert!(s.rewind(s.pos - 1).is_err());
        s.unmark();
        assert!(s.rewind(s.pos).is_err());
    }
}

#[test]
fn yuan_verify_steps_give_decode_bits_and_rewind_exactly() {
    let Some(dir) = common::shared("golden/yuan-tiny-a") else {
        return;
    };
    for (mut m, what) in common::yuan_variants(&dir) {
        check(&mut m, &what);
    }
}

#[test]
fn llama_verify_steps_give_decode_bits_and_rewind_exactly() {
    for k in common::kernel_families() {
        for kv in [KvType::F16, KvType::Q8] {
            let c = common::tiny_llama();
            let mut m = Model::random(c, Shard::WHOLE, Format::Nf4, Format::Nf4, k, 5).unwrap();
            m.kv_cache = kv;
            check(&mut m, &format!("llama nf4 {kv} {}", k.describe()));
        }
    }
}
