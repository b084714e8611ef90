//! Keeping secrets out of logs and error messages.
//!
//! A plugin that reads a secret (an API key from the environment) registers
//! it with [`register`]; every log record the plugin forwards to the host and
//! every error it returns passes through [`redact`], which replaces registered
//! secrets and anything shaped like a credential (`Bearer …`, `api_key = "…"`,
//! `sk-…`) with `[redacted]`. Wire-level trace records of HTTP and TLS crates
//! (which dump raw request bytes, headers included, split across lines where
//! no pattern can find them) are dropped instead: see [`is_wire_trace`].
//!
//! Each library has its own copy of these globals, as of `log`'s: the host
//! redacts its own records and errors the same way.

use std::borrow::Cow;
use std::sync::RwLock;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `secret` so that it is redacted from this library's logs and
/// errors. Values shorter than 4 characters are not registered (redacting
/// them would mangle ordinary text and hides nothing worth hiding).
pub fn register(secret: &str) {
    let s = secret.trim();
    if s.chars().count() < 4 {
        return;
    }
    let mut all = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !all.iter().any(|x| x == s) {
        all.push(s.to_owned());
        // Longest first, so a secret containing another is replaced whole.
        all.sort_by_key(|x| std::cmp::Reverse(x.len()));
    }
}

/// Log targets whose TRACE records are raw wire bytes (ureq documents its
/// trace level as "wire level debug. NOT REDACTED!").
const WIRE_TARGETS: &[&str] = &["ureq", "ureq_proto", "rustls", "hyper", "hyper_util", "h2", "reqwest", "tiny_http", "http"];

/// Whether a record is a wire-level dump that must not be logged at all.
pub fn is_wire_trace(level: log::Level, target: &str) -> bool {
    level == log::Level::Trace
        && WIRE_TARGETS.iter().any(|t| target == *t || target.strip_prefix(t).is_some_and(|r| r.starts_with("::")))
}

/// Key names whose value is a credential (matched case-insensitively, as a
/// whole identifier: `api_key_env` is not one of them, it holds a *name*).
const KEYS: &[&str] = &[
    "api_key", "api-key", "apikey", "x-api-key", "access_token", "auth_token", "refresh_token", "token",
    "password", "passwd", "secret", "client_secret", "secret_key", "authorization", "proxy-authorization",
];

/// `text` with every registered secret and credential-shaped value replaced
/// by [`REDACTED`]. Borrowed when nothing matched.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let all = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        for s in all.iter() {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
    }
    let spans = credential_spans(&out);
    if spans.is_empty() {
        return out;
    }
    let mut s = String::with_capacity(out.len());
    let mut at = 0;
    for (a, b) in spans {
        s.push_str(&out[at..a]);
        s.push_str(REDACTED);
        at = b;
    }
    s.push_str(&out[at..]);
    Cow::Owned(s)
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Where a token value ends: at white space, a quote or a separator.
fn token_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && !b[i].is_ascii_whitespace() && !b"\"'`,;&}])>".contains(&b[i]) {
        i += 1;
    }
    i
}

/// Byte ranges of credential values, sorted and disjoint.
fn credential_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let lower = text.to_ascii_lowercase();
    let lb = lower.as_bytes();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let push = |a: usize, e: usize, spans: &mut Vec<(usize, usize)>| {
        if e > a && &text[a..e] != REDACTED {
            spans.push((a, e));
        }
    };
    // `Bearer X` / `Basic X`
    for scheme in ["bearer ", "basic "] {
        let mut from = 0;
        while let Some(p) = lower[from..].find(scheme) {
            let start = from + p;
            from = start + scheme.len();
            if start > 0 && is_ident(lb[start - 1]) {
                continue;
            }
            let v = from + (b[from..].iter().take_while(|c| **c == b' ').count());
            let e = token_end(b, v);
            // A bare word after "basic" in prose ("basic setup") is no credential.
            if scheme == "basic " && e - v < 8 {
                continue;
            }
            push(v, e, &mut spans);
        }
    }
    // `key = "value"`, `key: value`, `"key": "value"`, `key=value`
    for key in KEYS {
        let mut from = 0;
        while let Some(p) = lower[from..].find(key) {
            let start = from + p;
            let mut i = start + key.len();
            from = i;
            if (start > 0 && is_ident(lb[start - 1])) || (i < b.len() && is_ident(lb[i])) {
                continue;
            }
            if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
                i += 1;
            }
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
            if i >= b.len() || (b[i] != b'=' && b[i] != b':') {
                continue;
            }
            i += 1;
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
            let quote = (i < b.len() && (b[i] == b'"' || b[i] == b'\'')).then(|| b[i]);
            if quote.is_some() {
                i += 1;
            }
            // `Authorization: Bearer X`: the scheme rule above has the token.
            let low = &lower[i..];
            if low.starts_with("bearer ") || low.starts_with("basic ") {
                continue;
            }
            let e = match quote {
                Some(q) => i + b[i..].iter().position(|c| *c == q).unwrap_or(b.len() - i),
                None => token_end(b, i),
            };
            push(i, e, &mut spans);
        }
    }
    // OpenAI-style keys anywhere: sk-… with at least 8 more key characters.
    let mut from = 0;
    while let Some(p) = text[from..].find("sk-") {
        let start = from + p;
        from = start + 3;
        if start > 0 && is_ident(b[start - 1]) {
            continue;
        }
        let e = start + 3 + b[start + 3..].iter().take_while(|c| is_ident(**c)).count();
        if e - start - 3 >= 8 {
            push(start, e, &mut spans);
        }
    }
    spans.sort();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (a, e) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((a, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_and_credential_shapes_are_redacted() {
        register("hunter2-very-secret");
        assert_eq!(redact("key hunter2-very-secret here"), "key [redacted] here");
        assert_eq!(redact("Authorization: Bearer abc.def-123"), "Authorization: Bearer [redacted]");
        assert_eq!(redact("authorization: \"Bearer abc\""), "authorization: \"Bearer [redacted]\"");
        assert_eq!(redact(r#"unknown field: api_key = "sk-SECRET-123""#), r#"unknown field: api_key = "[redacted]""#);
        assert_eq!(redact(r#"{"api_key": "x1y2z3", "n": 2}"#), r#"{"api_key": "[redacted]", "n": 2}"#);
        assert_eq!(redact("password=pa55word&user=me"), "password=[redacted]&user=me");
        assert_eq!(redact("got sk-abcdefgh12345 back"), "got [redacted] back");
        assert_eq!(redact("X-Api-Key: k123456"), "X-Api-Key: [redacted]");
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for s in [
            "api_key_env = \"MY_KEY\"",
            "max_tokens = 300, tokens: 12",
            "the basic setup",
            "task-specific skills",
            "risk-free",
            "token count 5",
            "secretary: Ann",
        ] {
            assert!(matches!(redact(s), Cow::Borrowed(_)), "{s} -> {}", redact(s));
        }
    }

    #[test]
    fn wire_traces_are_recognised_by_target() {
        assert!(is_wire_trace(log::Level::Trace, "ureq_proto::client"));
        assert!(is_wire_trace(log::Level::Trace, "ureq"));
        assert!(!is_wire_trace(log::Level::Debug, "ureq::run"));
        assert!(!is_wire_trace(log::Level::Trace, "ureqx"));
        assert!(!is_wire_trace(log::Level::Trace, "rir::plugin"));
    }
}
