//! SentencePiece BPE models (the `tokenizer.model` protobuf), encoded and decoded as the reference C++
//! library does for Llama-style models: identity normalization, a dummy "▁" prefix, spaces escaped as "▁",
//! merges by piece score (highest first, leftmost on ties), byte fallback for characters outside the vocabulary.

use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};

/// Piece types of sentencepiece_model.proto.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// The unknown token.
    Unknown,
    /// Control symbols (<s>, </s>): never produced from text, decoded to nothing.
    Control,
    /// Matched as a whole in the input.
    UserDefined,
    /// Not used.
    Unused,
    /// One byte, `<0xNN>`.
    Byte,
}

/// A parsed model.
#[derive(Debug)]
pub struct SpModel {
    pieces: Vec<(String, f32, PieceType)>,
    by_piece: HashMap<String, u32>,
    byte_ids: [u32; 256],
    unk: u32,
    add_dummy_prefix: bool,
    byte_fallback: bool,
}

/// The space symbol, U+2581.
pub const SPACE: char = '\u{2581}';

/// Minimal protobuf reading: (field, wire type, payload) triples.
struct Fields<'a> {
    b: &'a [u8],
    i: usize,
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
    Fixed64,
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .b
                .get(self.i)
                .ok_or_else(|| Error::Format("truncated varint".into()))?;
            self.i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(Error::Format("varint too long".into()))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .i
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::Format("truncated field".into()))?;
        let s = &self.b[self.i..end];
        self.i = end;
        Ok(s)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>> {
        if self.i >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let v = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap())),
            w => return Err(Error::Format(format!("unsupported protobuf wire type {w}"))),
        };
        Ok(Some((key >> 3, v)))
    }
}

fn fields(b: &[u8]) -> Fields<'_> {
    Fields { b, i: 0 }
}

impl SpModel {
    /// Parses a serialized ModelProto.
    pub fn parse(bytes: &[u8]) -> Result<SpModel> {
        let mut pieces = Vec::new();
        let mut model_type = 1u64; // UNIGRAM unless the trainer spec says otherwise
        let mut byte_fallback = false;
        let mut add_dummy_prefix = true;
        let mut f = fields(bytes);
        while let Some((field, v)) = f.next_field()? {
            match (field, v) {
                (1, Value::Bytes(p)) => {
                    let (mut piece, mut score, mut ty) = (String::new(), 0f32, 1u64);
                    let mut g = fields(p);
                    while let Some((pf, pv)) = g.next_field()? {
                        match (pf, pv) {
                            (1, Value::Bytes(s)) => {
                                piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| Error::Format("piece is not UTF-8".into()))?
                            }
                            (2, Value::Fixed32(s)) => score = f32::from_bits(s),
                            (3, Value::Varint(t)) => ty = t,
                            _ => {}
                        }
                    }
                    let ty = match ty {
                        1 => PieceType::Normal,
                        2 => PieceType::Unknown,
                        3 => PieceType::Control,
                        4 => PieceType::UserDefined,
                        5 => PieceType::Unused,
                        6 => PieceType::Byte,
                        t => return Err(Error::Format(format!("unknown piece type {t}"))),
                    };
                    pieces.push((piece, score, ty));
                }
                (2, Value::Bytes(t)) => {
                    let mut g = fields(t);
                    while let Some((tf, tv)) = g.next_field()? {
                        match (tf, tv) {
                            (3, Value::Varint(m)) => model_type = m,
                            (35, Value::Varint(b)) => byte_fallback = b != 0,
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(n)) => {
                    let mut g = fields(n);
                    while let Some((nf, nv)) = g.next_field()? {
                        match (nf, nv) {
                            (1, Value::Bytes(name)) if name != b"identity" => {
                                return Err(Error::Format(format!(
                                    "normalization rule {:?} is not supported (identity is)",
                                    String::from_utf8_lossy(name)
                                )))
                            }
                            (3, Value::Varint(a)) => add_dummy_prefix = a != 0,
                            (4, Value::Varint(r)) if r != 0 => {
                                return Err(Error::Format(
                                    "remove_extra_whitespaces is not supported".into(),
                                ))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model_type != 2 {
            return Err(Error::Format(format!(
                "SentencePiece model type {model_type} is not supported (BPE is)"
            )));
        }
        if pieces.is_empty() {
            return Err(Error::Format("the model has no pieces".into()));
        }
        let mut by_piece = HashMap::with_capacity(pieces.len());
        let mut byte_ids = [u32::MAX; 256];
        let mut unk = 0;
        for (id, (p, _, ty)) in pieces.iter().enumerate() {
            match ty {
                PieceType::Byte => {
                    let hex = p.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                    if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        byte_ids[b as usize] = id as u32;
                    }
                }
                PieceType::Unknown => unk = id as u32,
                _ => {}
            }
            by_piece.entry(p.clone()).or_insert(id as u32);
        }
        if byte_fallback && byte_ids.contains(&u32::MAX) {
            return Err(Error::Format(
                "byte_fallback is on but the model lacks byte pieces".into(),
            ));
        }
        Ok(SpModel {
            pieces,
            by_piece,
            byte_ids,
            unk,
            add_dummy_prefix,
            byte_fallback,
        })
    }

    /// Number of pieces (the model's vocabulary size).
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the model has no pieces (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The piece string of an id.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.0.as_str())
    }

    /// The id of a piece string.
    pub fn id(&self, piece: &str) -> Option<u32> {
        self.by_piece.get(piece).copied()
    }

    fn mergeable(&self, s: &str) -> Option<(u32, f32)> {
        let &id = self.by_piece.get(s)?;
        let (_, score, ty) = &self.pieces[id as usize];
        matches!(ty, PieceType::Normal | PieceType::UserDefined).then_some((id, *score))
    }

    /// Encodes one text segment (SentencePiece's `encode(text)`): ▁-escaped, with the dummy prefix.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut norm = String::with_capacity(text.len() + 3);
        if self.add_dummy_prefix {
            norm.push(SPACE);
        }
        for c in text.chars() {
            norm.push(if c == ' ' { SPACE } else { c });
        }
        // Symbols: byte ranges into `norm`, as a doubly linked list.
        let chars: Vec<(usize, usize)> = norm
            .char_indices()
            .map(|(i, c)| (i, i + c.len_utf8()))
            .collect();
        let n = chars.len();
        let start: Vec<usize> = chars.iter().map(|c| c.0).collect();
        let mut end: Vec<usize> = chars.iter().map(|c| c.1).collect();
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (0..n as isize)
            .map(|i| if i + 1 < n as isize { i + 1 } else { -1 })
            .collect();
        let mut alive = vec![true; n];

        // Candidate merges: highest score first, then leftmost (SentencePiece's bpe_model.cc agenda).
        #[derive(PartialEq)]
        struct Pair {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Pair {}
        impl PartialOrd for Pair {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Pair {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        let mut agenda = BinaryHeap::new();
        let try_pair =
            |agenda: &mut BinaryHeap<Pair>, l: usize, r: usize, start: &[usize], end: &[usize]| {
                if let Some((_, score)) = self.mergeable(&norm[start[l]..end[r]]) {
                    agenda.push(Pair {
                        score,
                        left: l,
                        right: r,
                        len: end[r] - start[l],
                    });
                }
            };
        for i in 0..n.saturating_sub(1) {
            try_pair(&mut agenda, i, i + 1, &start, &end);
        }
        while let Some(p) = agenda.pop() {
            // Skip stale entries: a side already merged away or changed.
            if !alive[p.left]
                || !alive[p.right]
                || next[p.left] != p.right as isize
                || end[p.right] - start[p.left] != p.len
            {
                continue;
            }
            end[p.left] = end[p.right];
            alive[p.right] = false;
            next[p.left] = next[p.right];
            if next[p.left] >= 0 {
                prev[next[p.left] as usize] = p.left as isize;
            }
            if prev[p.left] >= 0 {
                try_pair(&mut agenda, prev[p.left] as usize, p.left, &start, &end);
            }
            if next[p.left] >= 0 {
                try_pair(&mut agenda, p.left, next[p.left] as usize, &start, &end);
            }
        }
        let mut ids = Vec::with_capacity(n);
        let mut i = 0isize;
        while i >= 0 {
            let s = &norm[start[i as usize]..end[i as usize]];
            match self.by_piece.get(s) {
                Some(&id)
                    if !matches!(
                        self.pieces[id as usize].2,
                        PieceType::Unused | PieceType::Control
                    ) =>
                {
                    ids.push(id)
                }
                _ if self.byte_fallback => ids.extend(s.bytes().map(|b| self.byte_ids[b as usize])),
                _ => ids.push(self.unk),
            }
            i = next[i as usize];
        }
        ids
    }

    /// Decodes pieces as SentencePiece's `decode(pieces)` does: "▁" becomes a space, the first leading "▁"
    /// of the text is dropped (the dummy prefix), byte pieces are gathered into UTF-8 (invalid bytes become
    /// U+FFFD), control pieces vanish. `pieces` may hold strings that are not in the vocabulary (kept as is).
    pub fn decode_pieces(&self, pieces: &[&str]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut at_start = true;
        for &p in pieces {
            let id = self.by_piece.get(p).copied();
            let ty = id.map(|i| self.pieces[i as usize].2);
            if ty == Some(PieceType::Byte) {
                bytes.push(self.byte_of(id.unwrap()));
                continue;
            }
            if !bytes.is_empty() {
                out.push_str(&String::from_utf8_lossy(&bytes));
                bytes.clear();
                at_start = false;
            }
            if ty == Some(PieceType::Control) {
                continue;
            }
            let mut piece = p;
            if at_start && self.add_dummy_prefix {
                piece = piece.strip_prefix(SPACE).unwrap_or(piece);
            }
            out.extend(piece.chars().map(|c| if c == SPACE { ' ' } else { c }));
            if !out.is_empty() {
                at_start = false;
            }
        }
        if !bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&bytes));
        }
        out
    }

    fn byte_of(&self, id: u32) -> u8 {
        self.byte_ids.iter().position(|&b| b == id).unwrap_or(0) as u8
    }
}
