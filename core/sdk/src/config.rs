//! Reading a plugin's TOML config table.

use serde::de::DeserializeOwned;

use crate::error::{PluginError, PluginResult};

/// Parses the config table the host hands a constructor. Give `T`
/// `#[serde(deny_unknown_fields)]` so a misspelt key is an error that names it.
pub fn parse<T: DeserializeOwned>(text: &str) -> PluginResult<T> {
    toml::from_str(text).map_err(|e| PluginError::Config(one_line(&e.to_string())))
}

/// toml's messages span several lines with a source excerpt (`3 | api_key =
/// "…"`, a caret line): keep the message on one line and drop the excerpt,
/// which may quote a secret; what remains is redacted as well.
fn one_line(s: &str) -> String {
    let excerpt = |l: &str| {
        let rest = l.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        rest.starts_with('|')
    };
    let text = s.lines().map(str::trim).filter(|l| !l.is_empty() && !excerpt(l)).collect::<Vec<_>>().join(": ");
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
}
