//! Reading a plugin's TOML config table.

use serde::de::DeserializeOwned;

use crate::error::{PluginError, PluginResult};

/// Parses the config table the host hands a constructor. Give `T`
/// `#[serde(deny_unknown_fields)]` so a misspelt key is an error that names it.
pub fn parse<T: DeserializeOwned>(text: &str) -> PluginResult<T> {
    toml::from_str(text).map_err(|e| {
        // serde's "invalid type: string \"x\", expected usize" names no key:
        // take it from the text at the error's position.
        let key = e.span().and_then(|s| key_at(text, s.start)).filter(|k| !e.message().contains(&format!("`{k}`")));
        let msg = one_line(&e.to_string());
        PluginError::Config(match key {
            Some(k) => format!("{k}: {msg}"),
            None => msg,
        })
    })
}

/// The innermost key whose value holds byte `offset` of a TOML text (what a
/// deserialisation error's span points at), from toml's spanned parse.
pub fn key_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    // (span length, key) of every value that holds the offset; the shortest wins.
    fn walk(t: &DeTable<'_>, offset: usize, best: &mut Option<(usize, String)>) {
        for (k, v) in t.iter() {
            let span = v.span();
            if span.contains(&offset) && best.as_ref().is_none_or(|(len, _)| span.len() < *len) {
                *best = Some((span.len(), k.get_ref().to_string()));
            }
            inner(v.get_ref(), offset, best);
        }
    }
    fn inner(v: &DeValue<'_>, offset: usize, best: &mut Option<(usize, String)>) {
        match v {
            DeValue::Table(t) => walk(t, offset, best),
            DeValue::Array(a) => a.iter().for_each(|x| inner(x.get_ref(), offset, best)),
            _ => {}
        }
    }
    let root = DeTable::parse(text).ok()?;
    let mut best = None;
    walk(root.get_ref(), offset, &mut best);
    best.map(|(_, k)| k)
}

/// Where `path` (table names, then a key; an array's element by its index,
/// as in `["variants", "2", "round"]`) is written in a TOML text: the byte
/// offset of its deepest part that is there, `None` when not even the first is.
pub fn key_offset(text: &str, path: &[&str]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    fn find(t: &DeTable<'_>, path: &[&str]) -> Option<usize> {
        let (name, rest) = path.split_first()?;
        let (k, v) = t.iter().find(|(k, _)| k.get_ref().as_ref() == *name)?;
        Some(descend(v.get_ref(), rest).unwrap_or(k.span().start))
    }
    fn descend(v: &DeValue<'_>, rest: &[&str]) -> Option<usize> {
        match v {
            DeValue::Table(t) => find(t, rest),
            DeValue::Array(a) => {
                let (i, rest) = rest.split_first()?;
                let e = a.get(i.parse::<usize>().ok()?)?;
                Some(descend(e.get_ref(), rest).unwrap_or(e.span().start))
            }
            _ => None,
        }
    }
    find(DeTable::parse(text).ok()?.get_ref(), path)
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
        let t = "a = { b = 1, c_d = \"x\" }\n[s.t]\nk = [1, 2]\n";
        assert_eq!(super::key_at(t, t.find("\"x\"").unwrap()).as_deref(), Some("c_d"));
        assert_eq!(super::key_at(t, t.find("2]").unwrap()).as_deref(), Some("k"));
        assert_eq!(super::key_offset(t, &["s", "t", "k"]), t.find("k ="));
        assert_eq!(super::key_offset(t, &["s", "t", "nope"]), t.find("t]"), "the deepest key found");
        assert_eq!(super::key_offset(t, &["zzz"]), None);
        let v = "[[v]]\nname = \"a\"\n[[v]]\nname = \"b\"\nround = 3\n";
        assert_eq!(super::key_offset(v, &["v", "1", "round"]), v.find("round"));
        assert_eq!(super::key_offset(v, &["v", "1", "name"]), v.find("name = \"b\""));
    }
}
