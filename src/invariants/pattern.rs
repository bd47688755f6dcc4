//! Key patterns: literal text with `*` wildcards, each matching any run of
//! characters (`/` included, the empty run too).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest pattern, in bytes.
pub const PATTERN_BYTES_MAX: usize = 1024;

/// A key pattern such as `account/*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    /// A pattern from its text.
    pub fn new(text: &str) -> Result<Pattern, &'static str> {
        if text.is_empty() {
            return Err("`keys` is empty");
        }
        if text.len() > PATTERN_BYTES_MAX {
            return Err("`keys` is longer than 1024 bytes");
        }
        if text.chars().any(char::is_control) {
            return Err("`keys` contains a control character");
        }
        if text.contains("**") {
            return Err("`keys` contains `**`; one `*` already matches any run of characters");
        }
        Ok(Pattern(text.to_string()))
    }

    /// The pattern's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        let (p, k): (Vec<char>, Vec<char>) = (self.0.chars().collect(), key.chars().collect());
        // Greedy matching with backtracking to the last star: linear in practice.
        let (mut i, mut j) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while j < k.len() {
            if i < p.len() && p[i] == '*' {
                star = Some((i, j));
                i += 1;
            } else if i < p.len() && p[i] == k[j] {
                i += 1;
                j += 1;
            } else if let Some((si, sj)) = star {
                i = si + 1;
                j = sj + 1;
                star = Some((si, sj + 1));
            } else {
                return false;
            }
        }
        p[i..].iter().all(|&c| c == '*')
    }

    /// A key both patterns match, if there is one.
    pub fn overlap_example(&self, other: &Pattern) -> Option<String> {
        let (a, b): (Vec<char>, Vec<char>) = (self.0.chars().collect(), other.0.chars().collect());
        // seen[i][j]: the suffixes a[i..] and b[j..] were found disjoint.
        let mut disjoint = vec![vec![false; b.len() + 1]; a.len() + 1];
        let mut out = String::new();
        if common(&a, &b, 0, 0, &mut disjoint, &mut out) {
            Some(out)
        } else {
            None
        }
    }
}

/// Whether `a[i..]` and `b[j..]` match a common string; if so, appends one
/// (stars matching the empty run where they can) to `out`.
fn common(
    a: &[char],
    b: &[char],
    i: usize,
    j: usize,
    disjoint: &mut Vec<Vec<bool>>,
    out: &mut String,
) -> bool {
    if disjoint[i][j] {
        return false;
    }
    let mark = out.len();
    let found = match (a.get(i), b.get(j)) {
        (None, None) => true,
        (Some('*'), _) if common(a, b, i + 1, j, disjoint, out) => true,
        (_, Some('*')) if common(a, b, i, j + 1, disjoint, out) => true,
        (Some('*'), Some(&c)) => {
            // a's star swallows b's next character (a literal, or b's star
            // standing for nothing, which the branch above already tried).
            c != '*' && {
                out.push(c);
                common(a, b, i, j + 1, disjoint, out)
            }
        }
        (Some(&c), Some('*')) => {
            out.push(c);
            common(a, b, i + 1, j, disjoint, out)
        }
        (Some(&x), Some(&y)) => {
            x == y && {
                out.push(x);
                common(a, b, i + 1, j + 1, disjoint, out)
            }
        }
        _ => false,
    };
    if !found {
        out.truncate(mark);
        disjoint[i][j] = true;
    }
    found
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Pattern {
        Pattern::new(text).unwrap()
    }

    #[test]
    fn a_star_matches_any_run_including_slashes_and_nothing() {
        assert!(p("account/*").matches("account/alice"));
        assert!(p("account/*").matches("account/"));
        assert!(p("account/*").matches("account/a/b"));
        assert!(!p("account/*").matches("accounts/alice"));
        assert!(p("*/balance").matches("user/7/balance"));
        assert!(p("a*b*c").matches("abc"));
        assert!(p("a*b*c").matches("axxbyyc"));
        assert!(!p("a*b*c").matches("axxbyy"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exactly"));
    }

    #[test]
    fn overlapping_patterns_come_with_a_key_both_match() {
        for (a, b) in [
            ("account/*", "account/vip/*"),
            ("*/x", "a/*"),
            ("a*", "*b"),
            ("same", "same"),
            ("*", "anything"),
        ] {
            let example = p(a).overlap_example(&p(b)).unwrap_or_else(|| panic!("{a} / {b}"));
            assert!(p(a).matches(&example) && p(b).matches(&example), "{a} / {b}: {example:?}");
        }
    }

    #[test]
    fn disjoint_patterns_have_no_common_key() {
        for (a, b) in
            [("account/*", "username/*"), ("a*x", "b*"), ("exact", "exactly"), ("*.a", "*.b")]
        {
            assert_eq!(p(a).overlap_example(&p(b)), None, "{a} / {b}");
        }
    }

    #[test]
    fn empty_overlong_control_and_double_star_patterns_are_refused() {
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new(&"k".repeat(PATTERN_BYTES_MAX + 1)).is_err());
        assert!(Pattern::new("a\nb").is_err());
        assert!(Pattern::new("a/**").is_err());
    }
}
