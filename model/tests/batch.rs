//! Batch invariance: a sequence's logits are the same bits whether its chunks run alone or in steps shared
//! with other sequences (prefill chunks and decode tokens mixed), on the reference Yuan checkpoint (LFA's
//! per-sequence memory included) and on a Llama-shaped model, for every kernel family and cache type.
//! The tolerance is zero: the server promises this bit for bit.

mod common;

use std::path::PathBuf;

use model::arch::{argmax, Chunk, Logits, Shard, Solo, State};
use model::arch::{KvType, Model};
use model::kernels::Kernels;
use model::pool::Pool;
use model::weight::Format;

fn golden() -> Option<PathBuf> {
    common::shared("golden/yuan-tiny-a")
}

/// A sequence of the schedule: arrives at step `arrive`, prompt, tokens to generate.
struct Job {
    arrive: usize,
    prompt: Vec<u32>,
    gen: usize,
}

/// Runs the jobs as a continuous-batching server would, `chunk` prompt tokens at a time, and returns
/// every logits row each sequence received, in order. With `alone`, each job runs by itself.
fn run(
    model: &mut Model,
    pool: &Pool,
    jobs: &[Job],
    chunk: usize,
    alone: bool,
) -> Vec<Vec<Vec<f32>>> {
    if alone {
        return jobs
            .iter()
            .map(|j| {
                let one = Job {
                    arrive: 0,
                    prompt: j.prompt.clone(),
                    gen: j.gen,
                };
                run(model, pool, &[one], chunk, false).remove(0)
            })
            .collect();
    }
    let mut states: Vec<State> = jobs
        .iter()
        .map(|j| model.new_state(j.prompt.len() + j.gen + 1))
        .collect();
    let mut fed = vec![0usize; jobs.len()]; // prompt tokens run
    let mut next: Vec<Option<u32>> = vec![None; jobs.len()];
    let mut rows: Vec<Vec<Vec<f32>>> = vec![Vec::new(); jobs.len()];
    let v = model.vocab_range().len();
    for step in 0.. {
        let mut toks: Vec<(usize, Vec<u32>, Logits)> = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            if j.arrive > step || rows[i].len() > j.gen {
                continue;
            }
            if fed[i] < j.prompt.len() {
                let end = (fed[i] + chunk).min(j.prompt.len());
                let last = end == j.prompt.len();
                toks.push((
                    i,
                    j.prompt[fed[i]..end].to_vec(),
                    if last { Logits::Last } else { Logits::None },
                ));
                fed[i] = end;
            } else if let Some(id) = next[i] {
                toks.push((i, vec![id], Logits::Last));
            }
        }
        if toks.is_empty() {
            if jobs.iter().all(|j| j.arrive <= step) {
                break;
            }
            continue;
        }
        // Every other step in reverse: the order of chunks in a step must not matter either.
        if step % 2 == 1 {
            toks.reverse();
        }
        let mut refs: Vec<Option<&mut State>> = states.iter_mut().map(Some).collect();
        let mut chunks: Vec<Chunk> = toks
            .iter()
            .map(|(i, t, l)| Chunk {
                state: refs[*i].take().unwrap(),
                tokens: t,
                logits: *l,
            })
            .collect();
        let logits = model.forward_batch(pool, &mut Solo, &mut chunks).unwrap();
        let mut at = 0;
        for (i, _, l) in &toks {
            if *l == Logits::Last {
                let row = logits[at * v..(at + 1) * v].to_vec();
                next[*i] = Some(argmax(&row) as u32);
                rows[*i].push(row);
                at += 1;
            }
        }
        assert_eq!(at * v, logits.len());
    }
    rows
}

fn jobs() -> Vec<Job> {
    let ids = |n: usize, s: u32| (0..n as u32).map(|i| (i * 37 + s) % 500 + 3).collect();
    vec![
        Job {
            arrive: 0,
            prompt: ids(7, 1),
            gen: 6,
        },
        Job {
            arrive: 0,
            prompt: ids(1, 2),
            gen: 9,
        },
        Job {
            arrive: 2,
            prompt: ids(12, 3),
            gen: 5,
        },
        Job {
            arrive: 3,
            prompt: ids(11, 4),
            gen: 4,
        },
        Job {
            arrive: 3,
            prompt: ids(20, 5),
            gen: 3,
        },
        Job {
            arrive: 9,
            prompt: ids(2, 6),
            gen: 4,
        },
    ]
}

fn check(model: &mut Model, what: &str) {
    for threads in [1, 2] {
        let pool = Pool::new(threads, None);
        let jobs = jobs();
        let alone = run(model, &pool, &jobs, 5, true);
        let together = run(model, &pool, &jobs, 5, false);
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.len(), jobs[i].gen + 1, "{what}: sequence {i}'s rows");
            assert_eq!(a.len(), b.len(), "{what}: sequence {i}'s rows");
            for (s, (x, y)) in a.iter().zip(b).enumerate() {
                let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(
                    same,
                    "{what}, {threads} threads: sequence {i}, step {s} differs in a batch"
                );
            }
        }
    }
}

#[test]
fn yuan_sequences_get_the_same_bits_in_a_batch() {
    let Some(dir) = golden() else { return };
    for (mut m, what) in common::yuan_variants(&dir) {
        check(&mut m, &what);
    }
}

#[test]
fn llama_sequences_get_the_same_bits_in_a_batch() {
    for k in common::kernel_families() {
        let c = common::tiny_llama();
        let mut m = Model::random(c, Shard::WHOLE, Format::Nf4, Format::Nf4, k, 5).unwrap();
        m.kv_cache = KvType::F16;
        check(&mut m, &format!("llama nf4 {}", k.describe()));
    }
}

/// A state copied at a chunk boundary (`State::prefix`, the server's prefix reuse) continues with the same
/// bits as the original: caches, Yuan's LFA memory and the document mask all carried over.
fn prefix_copy_continues(model: &mut Model, what: &str) {
    let pool = Pool::new(2, None);
    let prompt: Vec<u32> = (0..12u32).map(|i| (i * 53 + 7) % 400 + 3).collect();
    let run = |model: &mut Model, state: &mut State, tokens: &[u32]| {
        let mut c = [Chunk {
            state,
            tokens,
            logits: Logits::Last,
        }];
        model.forward_batch(&pool, &mut Solo, &mut c).unwrap()
    };
    let mut a = model.new_state(20);
    run(model, &mut a, &prompt[..8]);
    let snap = a.prefix(model, 8, 8).unwrap();
    let mut b = snap.prefix(model, 8, 20).unwrap();
    assert_eq!(b.pos, 8);
    let (mut la, mut lb) = (
        run(model, &mut a, &prompt[8..]),
        run(model, &mut b, &prompt[8..]),
    );
    for step in 0..5 {
        assert!(
            la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: step {step} differs after the copy"
        );
        let next = [argmax(&la) as u32];
        (la, lb) = (run(model, &mut a, &next), run(model, &mut b, &next));
    }
    // Past the state's own position, or (with LFA) short of it, there is nothing to copy.
    assert!(a.prefix(model, a.pos + 1, 40).is_err());
}

#[test]
fn a_prefix_copy_continues_as_the_original() {
    if let Some(dir) = golden() {
        let k = Kernels::from_choice_or_env(None).unwrap();
        for kv in [KvType::F32, KvType::F16, KvType::Q8] {
            let mut m = Model::load(&dir, Shard::WHOLE, Format::Nf4, Format::Bf16, k).unwrap();
            m.kv_cache = kv;
            prefix_copy_continues(&mut m, &format!("yuan {kv}"));
            assert!(m.new_state(9).prefix(&m, 0, 9).is_ok());
        }
    }
    let k = Kernels::from_choice_or_env(None).unwrap();
    let mut m = Model::random(
        common::tiny_llama(),
        Shard::WHOLE,
        Format::Nf4,
        Format::Nf4,
        k,
        5,
    )
    .unwrap();
    m.kv_cache = KvType::Q8;
    prefix_copy_continues(&mut m, "llama q8");
}
