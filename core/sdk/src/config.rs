//! Reading a plugin's TOML config table.

use serde::de::DeserializeOwned;

use crate::error::{PluginError, PluginResult};

/// Parses the config table the host hands a constructor. Give `T`
/// `#[serde(deny_unknown_fields)]` so a misspelt key is an error that names it.
pub fn parse<T: DeserializeOwned>(text: &str) -> PluginResult<T> {
    toml::from_str(text).map_err(|e| {
        // serde's "invalid type: string \"x\", expected usize" names no key:
        // take it from the text at the error's position.
        let key = e.span().and_then(|s| key_before(text, s.start)).filter(|k| !e.message().contains(&format!("`{k}`")));
        let msg = one_line(&e.to_string());
        PluginError::Config(match key {
            Some(k) => format!("{k}: {msg}"),
            None => msg,
        })
    })
}

/// The key whose value starts at (or contains) byte `offset` of a TOML
/// text: the name before the nearest `=` on that line (inline tables too).
pub fn key_before(text: &str, offset: usize) -> Option<String> {
    let head = text.get(..offset.min(text.len()))?;
    let line = head.rsplit('\n').next().unwrap_or(head);
    let (before, _) = line.rsplit_once('=')?;
    let key: String = before.trim_end().chars().rev().take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '"')).collect::<Vec<_>>().into_iter().rev().collect();
    let key = key.trim_matches('"').to_owned();
    (!key.is_empty()).then_some(key)
}

/// Parses `text` as `T` and drops it: what a plugin's `validate` does for a
/// table whose every check is in its type.
pub fn check<T: DeserializeOwned>(text: &str) -> PluginResult<()> {
    parse::<T>(text).map(drop)
}

/// toml's messages span several lines with a source excerpt (`3 | api_key =
/// "…"`, a caret line): keep the message on one line and drop the excerpt,
/// which may quote a secret; what remains is redacted as well.
fn one_line(s: &str) -> String {
    let excerpt = |l: &str| {
        let rest = l.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        rest.starts_with('|')
    };
    // "TOML parse error at line 1, column 1" points into the text the host
    // re-serialised, not the user's file: the host names the real line.
    let position = |l: &str| l.starts_with("TOML parse error at line");
    let text = s.lines().map(str::trim).filter(|l| !l.is_empty() && !excerpt(l) && !position(l)).collect::<Vec<_>>().join(": ");
    crate::secret::redact(&text).into_owned()
}

#[cfg(test)]
mod tests {
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct C {
        model: String,
    }

    #[test]
    fn errors_do_not_quote_the_offending_line() {
        let e = super::parse::<C>("model = \"m\"\napi_key = \"sk-SECRET-1234567\"\n").unwrap_err().to_string();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("unknown field `api_key`"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let e = super::parse::<C>("model = 3\n").unwrap_err().to_string();
        assert!(e.contains("model: ") && e.contains("invalid type"), "{e}");
        assert_eq!(super::key_before("a = { b = 1, c_d = \"x\" }", 21).as_deref(), Some("c_d"));
    }
}
