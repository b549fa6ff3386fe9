//! Dotted version numbers as the agent compares them (`3.0.196.0`, `1.2.677.0`).

use std::cmp::Ordering;

/// Compares two dotted numeric versions, padding the shorter with zeros. `None` when
/// either is not a dotted list of numbers.
pub(crate) fn compare(a: &str, b: &str) -> Option<Ordering> {
    let parse = |s: &str| -> Option<Vec<u64>> {
        s.trim()
            .split('.')
            .map(|p| p.parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()
    };
    let (mut x, mut y) = (parse(a)?, parse(b)?);
    let n = x.len().max(y.len());
    x.resize(n, 0);
    y.resize(n, 0);
    Some(x.cmp(&y))
}

/// `a > b`; false when either does not parse.
pub(crate) fn greater(a: &str, b: &str) -> bool {
    compare(a, b) == Some(Ordering::Greater)
}

/// `a >= b`; false when either does not parse.
pub(crate) fn at_least(a: &str, b: &str) -> bool {
    matches!(compare(a, b), Some(Ordering::Greater | Ordering::Equal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_like_the_agent() {
        assert!(greater("3.3.987.0", "3.0.196.0"));
        assert!(!greater("3.0.196.0", "3.0.196.0"));
        assert!(!greater("2.3.0.0", "3.0.196.0"));
        assert!(at_least("1.2.677.0", "1.1.70"));
        assert!(!at_least("1.1.69.0", "1.1.70"));
        assert!(!at_least("garbage", "1.1.70"));
    }
}
