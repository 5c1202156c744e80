//! Pure path rules: longest-prefix matching on segment boundaries, the rewrite chain, dot-segment
//! removal and escaped-slash handling. Functions of their input only; the data plane applies them.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, Ordering};

/// One path rewrite step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// Remove the prefix when the path starts with it on a segment boundary.
    StripPrefix(String),
    /// Put the prefix in front.
    AddPrefix(String),
    /// Replace prefix `from` (on a segment boundary) with `to`.
    ReplacePrefix {
        /// Prefix to look for.
        from: String,
        /// Its replacement.
        to: String,
    },
}

impl Rewrite {
    fn apply(&self, path: &str) -> Option<String> {
        match self {
            Rewrite::StripPrefix(p) => strip_segment_prefix(path, p).map(|rest| {
                if rest.is_empty() {
                    "/".to_owned()
                } else {
                    rest.to_owned()
                }
            }),
            Rewrite::AddPrefix(p) if p == "/" => None,
            Rewrite::AddPrefix(p) => Some(if path == "/" {
                p.clone()
            } else {
                format!("{p}{path}")
            }),
            Rewrite::ReplacePrefix { from, to } => {
                strip_segment_prefix(path, from).map(|rest| match (to.as_str(), rest) {
                    ("/", "") => "/".to_owned(),
                    ("/", rest) => rest.to_owned(),
                    (to, rest) => format!("{to}{rest}"),
                })
            }
        }
    }
}

/// Applies the rewrite chain in order; steps that do not match leave the path as it is.
/// Percent-escapes are never decoded or re-encoded.
pub fn rewrite_path(path: &str, chain: &[Rewrite]) -> String {
    let mut current: Option<String> = None;
    for step in chain {
        if let Some(next) = step.apply(current.as_deref().unwrap_or(path)) {
            current = Some(next);
        }
    }
    current.unwrap_or_else(|| path.to_owned())
}

/// The rest of `path` after `prefix` when `prefix` ends on a segment boundary of `path`
/// (`/api` matches `/api` and `/api/x`, never `/apix`). The root prefix matches everything.
pub fn strip_segment_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Canonical form of a configured prefix: `/x/*` and `/x/` mean `/x`; the root stays `/`.
pub fn normalise_prefix(p: &str) -> String {
    let p = p.strip_suffix('*').unwrap_or(p);
    let p = p.trim_end_matches('/');
    if p.is_empty() {
        "/".to_owned()
    } else {
        p.to_owned()
    }
}

/// Removes `.` and `..` segments (RFC 3986 section 5.2.4) so a path can never climb out of a
/// prefix. Percent-encoded dots (`%2e`) count as dots, since upstreams may decode them.
/// Returns `None` when the path has no dot segment (the common case, no allocation).
pub fn remove_dot_segments(path: &str) -> Option<String> {
    let is_dot = |s: &str| s == "." || s.eq_ignore_ascii_case("%2e");
    let is_dotdot = |s: &str| {
        s == ".."
            || [".%2e", "%2e.", "%2e%2e"]
                .iter()
                .any(|d| s.eq_ignore_ascii_case(d))
    };
    if !path.split('/').any(|s| is_dot(s) || is_dotdot(s)) {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        if is_dot(seg) {
            trailing_slash = i == last;
        } else if is_dotdot(seg) {
            out.pop();
            trailing_slash = i == last;
        } else {
            out.push(seg);
            trailing_slash = false;
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    Some(s)
}

/// What to do with `%2F`, `%5C` and `\` in a request path (`server.escaped_slashes`), as
/// Envoy's `path_with_escaped_slashes_action`: an upstream that decodes them would otherwise
/// see separators, and dot segments, that routing never saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashes {
    /// Forward them as they are (the default, and the behaviour before the setting existed).
    #[default]
    Keep,
    /// Refuse the request with 400.
    Reject,
    /// Turn each of them into `/`, then remove dot segments, before routing and forwarding.
    Unescape,
}

/// How request paths are normalised before routing: `server.escaped_slashes` and
/// `server.merge_slashes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathRules {
    /// `%2F`, `%5C` and `\`.
    pub escaped_slashes: EscapedSlashes,
    /// Collapse runs of `/` into one.
    pub merge_slashes: bool,
}

/// The [`PathRules`] in force, in one atomic byte: read on every request without a lock,
/// replaced by a reload.
#[derive(Debug, Default)]
pub struct LivePathRules(AtomicU8);

impl LivePathRules {
    /// Holds `rules`.
    pub fn new(rules: PathRules) -> Self {
        Self(AtomicU8::new(Self::encode(rules)))
    }

    /// The rules in force.
    pub fn load(&self) -> PathRules {
        let bits = self.0.load(Ordering::Relaxed);
        PathRules {
            escaped_slashes: match bits & 0b11 {
                1 => EscapedSlashes::Reject,
                2 => EscapedSlashes::Unescape,
                _ => EscapedSlashes::Keep,
            },
            merge_slashes: bits & 0b100 != 0,
        }
    }

    /// Replaces the rules; requests that already started keep the ones they read.
    pub fn store(&self, rules: PathRules) {
        self.0.store(Self::encode(rules), Ordering::Relaxed);
    }

    fn encode(rules: PathRules) -> u8 {
        let escaped = match rules.escaped_slashes {
            EscapedSlashes::Keep => 0,
            EscapedSlashes::Reject => 1,
            EscapedSlashes::Unescape => 2,
        };
        escaped | if rules.merge_slashes { 0b100 } else { 0 }
    }
}

/// Why a request path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F`, `%5C` or `\` in the path while `server.escaped_slashes` is `reject`.
    #[error("the path holds an escaped slash or a backslash")]
    EscapedSlash,
}

/// The path routing and the upstream see: escaped slashes handled as `escaped_slashes` says
/// (decoded first with `Unescape`, so dot segments hidden behind them are removed), dot
/// segments removed ([`remove_dot_segments`]), then runs of `/` merged when `merge_slashes`.
/// Borrows `raw` when nothing changes (the common case, no allocation).
pub fn normalise_path(
    raw: &str,
    escaped_slashes: EscapedSlashes,
    merge_slashes: bool,
) -> Result<Cow<'_, str>, PathError> {
    let mut path = Cow::Borrowed(raw);
    if has_escaped_slash(raw) {
        match escaped_slashes {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
            EscapedSlashes::Unescape => path = Cow::Owned(unescape_slashes(raw)),
        }
    }
    if let Some(p) = remove_dot_segments(&path) {
        path = Cow::Owned(p);
    }
    if merge_slashes && path.contains("//") {
        let mut merged = String::with_capacity(path.len());
        for c in path.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        path = Cow::Owned(merged);
    }
    Ok(path)
}

/// Length of the escaped separator (`%2F`, `%5C` in either case, or `\`) at `i`, or 0.
fn escaped_slash_at(b: &[u8], i: usize) -> usize {
    match b.get(i..) {
        Some([b'\\', ..]) => 1,
        Some([b'%', b'2', b'f' | b'F', ..] | [b'%', b'5', b'c' | b'C', ..]) => 3,
        _ => 0,
    }
}

fn has_escaped_slash(path: &str) -> bool {
    let b = path.as_bytes();
    (0..b.len()).any(|i| escaped_slash_at(b, i) > 0)
}

/// Every escaped separator becomes `/`. Only ASCII sequences are replaced by ASCII, so the
/// result is valid UTF-8 whenever `path` is.
fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match escaped_slash_at(b, i) {
            0 => {
                out.push(c);
                i += 1;
            }
            n => {
                out.push(b'/');
                i += n;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_removed() {
        let cases = [
            ("/a/b/c", None),
            ("/api/v1/users/../../admin", Some("/api/admin")),
            ("/api/v1/users/../../../../admin", Some("/admin")),
            ("/a/./b/.", Some("/a/b/")),
            ("/a/b/..", Some("/a/")),
            ("/a/%2e%2e/b", Some("/b")),
            ("/a/%2E./b", Some("/b")),
            ("/a/.%2e", Some("/")),
            ("/..", Some("/")),
            ("/a/..b/c", None),
            ("/a/%2e%2f/c", None),
        ];
        for (input, want) in cases {
            assert_eq!(remove_dot_segments(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert_eq!(
            strip_segment_prefix("/api/v1/users", "/api/v1/users"),
            Some("")
        );
        assert_eq!(
            strip_segment_prefix("/api/v1/users/7", "/api/v1/users"),
            Some("/7")
        );
        assert_eq!(
            strip_segment_prefix("/api/v1/usersx", "/api/v1/users"),
            None
        );
        assert_eq!(strip_segment_prefix("/anything", "/"), Some("/anything"));
        assert_eq!(normalise_prefix("/api/v1/users/*"), "/api/v1/users");
        assert_eq!(normalise_prefix("/api/"), "/api");
        assert_eq!(normalise_prefix("/*"), "/");
        assert_eq!(normalise_prefix("/"), "/");
    }

    #[test]
    fn rewrite_chain_applies_in_order() {
        let chain = [
            Rewrite::StripPrefix("/api/v1".into()),
            Rewrite::ReplacePrefix {
                from: "/users".into(),
                to: "/people".into(),
            },
            Rewrite::AddPrefix("/internal".into()),
        ];
        assert_eq!(
            rewrite_path("/api/v1/users/7", &chain),
            "/internal/people/7"
        );
        assert_eq!(rewrite_path("/api/v1/users", &chain), "/internal/people");
        assert_eq!(rewrite_path("/api/v1", &chain[..1]), "/");
        // Non-matching steps leave the path alone; escapes stay as they are.
        assert_eq!(
            rewrite_path("/other/a%2Fb", &chain),
            "/internal/other/a%2Fb"
        );
        assert_eq!(rewrite_path("/api/v1x", &chain[..1]), "/api/v1x");
        assert_eq!(
            rewrite_path(
                "/a/b",
                &[Rewrite::ReplacePrefix {
                    from: "/a".into(),
                    to: "/".into()
                }]
            ),
            "/b"
        );
        assert_eq!(rewrite_path("/", &[Rewrite::AddPrefix("/x".into())]), "/x");
    }

    #[test]
    fn escaped_slashes_are_kept_refused_or_decoded() {
        use EscapedSlashes::*;
        let cases = [
            // (input, keep, unescape); reject refuses exactly the inputs whose keep and
            // unescape results differ because of an escaped separator.
            ("/api/users", "/api/users", "/api/users"),
            ("/api/a%2Fb", "/api/a%2Fb", "/api/a/b"),
            ("/api/a%2fb", "/api/a%2fb", "/api/a/b"),
            ("/api/a%5Cb", "/api/a%5Cb", "/api/a/b"),
            ("/api/a%5cb", "/api/a%5cb", "/api/a/b"),
            ("/api/a\\b", "/api/a\\b", "/api/a/b"),
            ("/api/..%2Fadmin", "/api/..%2Fadmin", "/admin"),
            ("/api/..%5cadmin", "/api/..%5cadmin", "/admin"),
            ("/api/..\\admin", "/api/..\\admin", "/admin"),
            (
                "/api/v1%2F..%2F..%2Fadmin",
                "/api/v1%2F..%2F..%2Fadmin",
                "/admin",
            ),
            ("/api/%2e%2e%2fadmin", "/api/%2e%2e%2fadmin", "/admin"),
            ("/api/%252F", "/api/%252F", "/api/%252F"),
            ("/api/%2", "/api/%2", "/api/%2"),
            ("/a/../b", "/b", "/b"),
        ];
        for (input, keep, unescape) in cases {
            assert_eq!(normalise_path(input, Keep, false).unwrap(), keep, "{input}");
            assert_eq!(
                normalise_path(input, Unescape, false).unwrap(),
                unescape,
                "{input}"
            );
            let escaped = input.contains('\\')
                || input.to_ascii_lowercase().contains("%2f")
                || input.to_ascii_lowercase().contains("%5c");
            assert_eq!(
                normalise_path(input, Reject, false),
                if escaped {
                    Err(PathError::EscapedSlash)
                } else {
                    Ok(keep.into())
                },
                "{input}"
            );
        }
        assert!(matches!(
            normalise_path("/a/b", Unescape, true).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn slashes_merge_after_decoding_and_dot_removal() {
        use EscapedSlashes::*;
        assert_eq!(
            normalise_path("//api///x//", Keep, true).unwrap(),
            "/api/x/"
        );
        assert_eq!(
            normalise_path("//api///x", Keep, false).unwrap(),
            "//api///x"
        );
        assert_eq!(
            normalise_path("/api%2F%2Fx", Unescape, true).unwrap(),
            "/api/x"
        );
        // Dot segments first (Envoy's order), so `//..` climbs out of the empty segment only.
        assert_eq!(normalise_path("/a//../b", Keep, true).unwrap(), "/a/b");
        assert_eq!(normalise_path("/", Keep, true).unwrap(), "/");
        assert_eq!(normalise_path("", Unescape, true).unwrap(), "");
    }

    #[test]
    fn live_path_rules_round_trip() {
        let live = LivePathRules::default();
        assert_eq!(live.load(), PathRules::default());
        for escaped_slashes in [
            EscapedSlashes::Keep,
            EscapedSlashes::Reject,
            EscapedSlashes::Unescape,
        ] {
            for merge_slashes in [false, true] {
                let rules = PathRules {
                    escaped_slashes,
                    merge_slashes,
                };
                live.store(rules);
                assert_eq!(live.load(), rules);
            }
        }
    }

    #[test]
    fn normalising_any_path_never_panics_and_is_stable() {
        let pieces = [
            "/", "%2F", "%5c", "\\", "..", ".", "%2e", "a", "é", "%", "%2", "//",
        ];
        let mut path = String::new();
        for i in 0..4000usize {
            path.clear();
            let mut n = i;
            for _ in 0..5 {
                path.push_str(pieces[n % pieces.len()]);
                n /= pieces.len();
            }
            for mode in [
                EscapedSlashes::Keep,
                EscapedSlashes::Reject,
                EscapedSlashes::Unescape,
            ] {
                for merge in [false, true] {
                    if let Ok(once) = normalise_path(&path, mode, merge) {
                        let twice = normalise_path(&once, mode, merge).unwrap();
                        if path.starts_with('/') {
                            assert_eq!(once, twice, "{path:?} {mode:?} {merge}");
                        }
                    }
                }
            }
        }
    }
}
