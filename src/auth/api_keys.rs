//! API keys: `NAME SHA256-HEX` lines (from `keys_file` and `keys_env`), and the lookup of a
//! presented key by its SHA-256, compared with every stored hash in constant time.

use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use subtle::ConstantTimeEq;

/// One key: its name and the SHA-256 of the key.
pub type Entry = (Arc<str>, [u8; 32]);

/// `auth.api_keys`, validated with its keys loaded.
#[derive(Clone, PartialEq)]
pub struct ApiKeys {
    /// The request header carrying the key.
    pub header: HeaderName,
    /// Remove the key header before forwarding (`hide_credentials`).
    pub hide: bool,
    entries: Vec<Entry>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("header", &self.header)
            .field(
                "keys",
                &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One line that is not `NAME SHA256-HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong (never the line's text: it may hold a key pasted by mistake).
    pub message: String,
}

impl ApiKeys {
    /// Keys from already parsed entries; names and hashes must be unique (see `parse`).
    pub fn new(header: HeaderName, hide: bool, entries: Vec<Entry>) -> Self {
        Self {
            header,
            hide,
            entries,
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is configured (every request is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the key whose hash is SHA-256(`presented`). Every stored hash is compared,
    /// each in constant time, so the time taken says nothing about which one matched or how
    /// close a guess came.
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<str>> {
        let digest = ring::digest::digest(&ring::digest::SHA256, presented);
        let mut found = None;
        for (name, hash) in &self.entries {
            let eq: bool = hash.ct_eq(digest.as_ref()).into();
            if eq && found.is_none() {
                found = Some(name);
            }
        }
        found
    }
}

/// The line a keys file holds for `key`: its SHA-256 in lower-case hex (what
/// `printf %s KEY | sha256sum` prints), for tools and tests that write keys files.
pub fn sha256_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses `NAME SHA256-HEX` lines: blank lines and `#` comments (whole line or trailing) are
/// skipped; names are unique, as are hashes.
pub fn parse(text: &str) -> Result<Vec<Entry>, Vec<LineError>> {
    let mut out: Vec<Entry> = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut err = |message: String| {
            errors.push(LineError {
                line: i + 1,
                message,
            })
        };
        let mut parts = line.split_whitespace();
        let (Some(name), Some(hex), None) = (parts.next(), parts.next(), parts.next()) else {
            err("expected `NAME SHA256-HEX` (two fields)".into());
            continue;
        };
        let Some(hash) = parse_hex(hex) else {
            err(format!(
                "key {name:?}: the second field must be 64 hex digits (the SHA-256 of the key, e.g. from `printf %s KEY | sha256sum`)"
            ));
            continue;
        };
        if out.iter().any(|(n, _)| &**n == name) {
            err(format!("key name {name:?} appears twice"));
            continue;
        }
        if out.iter().any(|(_, h)| *h == hash) {
            err(format!("key {name:?} has the same hash as an earlier key"));
            continue;
        }
        out.push((name.into(), hash));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE_HASH: &str = "4c3b7d3f2d9a2f6ffcfd3e3bd1b8e0e7d9d7e3c2b1a0f9e8d7c6b5a4f3e2d1c0";

    use super::sha256_hex as sha_hex;

    #[test]
    fn parses_lines_comments_and_finds_by_hash() {
        let text = format!(
            "# team keys\n\nalice {}  # trailing comment\nbob {}\n",
            sha_hex("alice-secret"),
            sha_hex("bob-secret").to_uppercase()
        );
        let keys = ApiKeys::new(
            HeaderName::from_static("x-api-key"),
            false,
            parse(&text).unwrap(),
        );
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.find(b"alice-secret").map(|n| &**n), Some("alice"));
        assert_eq!(keys.find(b"bob-secret").map(|n| &**n), Some("bob"));
        assert_eq!(keys.find(b"alice-secreT"), None);
        assert_eq!(keys.find(b""), None);
    }

    #[test]
    fn bad_lines_are_reported_with_numbers_and_no_text() {
        let text = format!(
            "ok {ALICE_HASH}\njust-a-key\nshort abc\nok {}\ndup {ALICE_HASH}\nx y z\n",
            sha_hex("b")
        );
        let errs = parse(&text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6]);
        assert!(errs.iter().all(|e| !e.message.contains("just-a-key")));
    }
}
