//! Collective algorithms, written against the [`Transport`](crate::transport::Transport) mailboxes.
//!
//! Every allreduce sums the ranks' inputs in rank order (x0 + x1 + ... + xn-1) for every element, whichever
//! algorithm runs: results are bitwise identical on all ranks and independent of the algorithm chosen, so
//! tensor-parallel ranks can never drift apart.

pub mod basic;
pub mod one_shot;
pub mod two_shot;

/// A peer's publication for `op`, which must be exactly `len` bytes: any other length means the ranks are
/// not running the same collective (a caller's bug, or a rank that abandoned a sequence of operations), and
/// reading on would mix unrelated data.
pub(crate) fn inbox_exact<'a>(
    t: &'a dyn crate::transport::Transport,
    peer: usize,
    op: crate::transport::Op,
    len: usize,
    what: &str,
) -> crate::error::Result<&'a [u8]> {
    let data = t.inbox(peer, op);
    if data.len() != len {
        return Err(crate::error::Error::Mismatch(format!(
            "{what}: rank {peer} published {} bytes where {len} were expected; the ranks are not running \
             the same collective operation",
            data.len()
        )));
    }
    Ok(data)
}

/// Views a byte slice published by a peer as f32 values. Outboxes are page aligned and the algorithms only
/// publish whole f32 values at f32-aligned offsets.
pub(crate) fn as_f32(bytes: &[u8]) -> &[f32] {
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(4) && bytes.len().is_multiple_of(4),
        "misaligned f32 mailbox"
    );
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4) }
}

pub(crate) fn as_f32_mut(bytes: &mut [u8]) -> &mut [f32] {
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(4) && bytes.len().is_multiple_of(4),
        "misaligned f32 mailbox"
    );
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut f32, bytes.len() / 4) }
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The f32 values of received bytes of any alignment (a partial last value is dropped).
pub(crate) fn f32_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// dst = a + b, element by element.
#[inline]
pub(crate) fn sum_into(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = *x + *y;
    }
}

/// dst += src, element by element.
#[inline]
pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// The range of elements rank `p` of `n` owns in a chunk of `count`, cut at multiples of 16 f32 (one cache
/// line) so two ranks never write the same line.
pub(crate) fn piece(count: usize, n: usize, p: usize) -> std::ops::Range<usize> {
    let at = |i: usize| {
        if i == n {
            count
        } else {
            ((count * i / n) / 16 * 16).min(count)
        }
    };
    at(p)..at(p + 1)
}

#[cfg(test)]
mod tests {
    use super::piece;

    #[test]
    fn pieces_cover_the_chunk_once() {
        for count in [0, 1, 15, 16, 17, 1000, 4097] {
            for n in 1..=5 {
                let mut next = 0;
                for p in 0..n {
                    let r = piece(count, n, p);
                    assert_eq!(r.start, next);
                    assert!(r.end >= r.start);
                    next = r.end;
                }
                assert_eq!(next, count);
            }
        }
    }
}
