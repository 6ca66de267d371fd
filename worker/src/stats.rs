//! Order statistics of the benchmarks' timings.

/// The `qs`-quantiles of `v`, each the value at rank round((n - 1)·q) of the sorted values (one sort for
/// all of them); None when `v` is empty.
pub fn quantiles<const N: usize>(v: &[f64], qs: [f64; N]) -> Option<[f64; N]> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(qs.map(|q| s[((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_rounded_rank() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0, 40.0, 6.0, 7.0, 8.0, 9.0];
        // Ranks round(9 · q): 0.5 → 5 (4.5 rounds away from zero), 0.9 → 8, 1.0 → 9.
        assert_eq!(
            quantiles(&v, [0.0, 0.5, 0.9, 1.0]),
            Some([1.0, 6.0, 9.0, 40.0])
        );
        assert_eq!(quantiles(&[3.0], [0.5, 0.99]), Some([3.0, 3.0]));
        assert_eq!(quantiles(&[], [0.5]), None);
    }
}
