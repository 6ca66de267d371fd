//! Prefix reuse, rank 0's side: which prompt beginnings the ranks keep a copy of (their caches and Yuan's
//! LFA memory at that point), so that a request that starts the same way (a system prompt, a few-shot
//! header, a chat's history) starts after it instead of running it again.
//!
//! A beginning is stored only where a prompt chunk ends, at a multiple of `--prefill-chunk` tokens, and a
//! request starts only from such a beginning: its remaining chunks then fall where they would without
//! reuse, so its numbers are the same bits either way (see [`model::arch::State::prefix`]). The copies
//! take cache positions from the same budget as the running sequences and give way to them, least
//! recently used first.

use std::collections::HashMap;

/// The stored beginnings, keyed by their tokens.
pub struct Prefixes {
    chunk: usize,
    map: HashMap<Vec<u32>, Entry>,
    next_id: u32,
    clock: u64,
    /// Cache positions the stored copies take.
    pub positions: usize,
    /// Copies to drop, for the next plan.
    pub forget: Vec<u32>,
}

struct Entry {
    id: u32,
    last_use: u64,
    /// Admitted sequences that will start from it and have not yet.
    pins: usize,
}

impl Prefixes {
    pub fn new(chunk: usize) -> Prefixes {
        Prefixes {
            chunk: chunk.max(1),
            map: HashMap::new(),
            next_id: 0,
            clock: 0,
            positions: 0,
            forget: Vec::new(),
        }
    }

    /// The longest stored beginning of `ids` that leaves a token to run (its logits are the answer's
    /// first): its number and length, kept until [`Prefixes::started`].
    pub fn lookup(&mut self, ids: &[u32]) -> Option<(u32, usize)> {
        self.clock += 1;
        let top = (ids.len().saturating_sub(1) / self.chunk) * self.chunk;
        for len in (self.chunk..=top).rev().step_by(self.chunk) {
            if let Some(e) = self.map.get_mut(&ids[..len]) {
                e.last_use = self.clock;
                e.pins += 1;
                return Some((e.id, len));
            }
        }
        None
    }

    /// A sequence that started from `ids[..len]` no longer needs it kept.
    pub fn started(&mut self, ids: &[u32], len: usize) {
        if let Some(e) = self.map.get_mut(&ids[..len]) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Whether to store `ids[..end]` once a chunk ends there: a number for the copy when `end` is a whole
    /// number of chunks, not stored yet, and fits the `room` left.
    pub fn keep(&mut self, ids: &[u32], end: usize, room: usize) -> Option<u32> {
        if end == 0
            || !end.is_multiple_of(self.chunk)
            || end > room
            || self.map.contains_key(&ids[..end])
        {
            return None;
        }
        self.clock += 1;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.map.insert(
            ids[..end].to_vec(),
            Entry {
                id,
                last_use: self.clock,
                pins: 0,
            },
        );
        self.positions += end;
        Some(id)
    }

    /// Drops the least recently used copies that no admitted sequence waits for until `want` positions
    /// are freed or none is left; the ranks drop them with the next plan.
    pub fn evict(&mut self, want: usize) {
        let mut freed = 0;
        while freed < want {
            let victim = self
                .map
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k.clone());
            let Some(k) = victim else { break };
            let e = self.map.remove(&k).expect("the key was just found");
            freed += k.len();
            self.positions -= k.len();
            self.forget.push(e.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beginnings_are_found_kept_and_given_up_in_order() {
        let mut p = Prefixes::new(4);
        let a: Vec<u32> = (0..13).collect();
        assert_eq!(p.keep(&a, 6, 100), None, "not a whole number of chunks");
        assert_eq!(p.keep(&a, 4, 100), Some(0));
        assert_eq!(p.keep(&a, 4, 100), None, "stored already");
        assert_eq!(p.keep(&a, 8, 7), None, "no room");
        assert_eq!(p.keep(&a, 8, 100), Some(1));
        assert_eq!(p.positions, 12);
        // The longest that leaves a token: 8 of 13; a prompt of exactly 8 gets the 4.
        assert_eq!(p.lookup(&a), Some((1, 8)));
        assert_eq!(p.lookup(&a[..8]), Some((0, 4)));
        let mut b = a.clone();
        b[2] = 99;
        assert_eq!(p.lookup(&b), None);
        // Both are pinned: nothing to evict until they start.
        p.evict(100);
        assert!(p.forget.is_empty());
        p.started(&a, 8);
        p.evict(1);
        assert_eq!((p.forget.clone(), p.positions), (vec![1], 4));
        p.started(&a, 4);
        p.evict(100);
        assert_eq!((p.forget.clone(), p.positions), (vec![1, 0], 0));
        assert_eq!(p.lookup(&a), None);
    }
}
