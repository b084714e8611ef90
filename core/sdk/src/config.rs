//! Reading a plugin's TOML config table.

use serde::de::DeserializeOwned;

use crate::error::{PluginError, PluginResult};

/// Parses the config table the host hands a constructor. Give `T`
/// `#[serde(deny_unknown_fields)]` so a misspelt key is an error that names it.
pub fn parse<T: DeserializeOwned>(text: &str) -> PluginResult<T> {
    toml::from_str(text).map_err(|e| PluginError::Config(one_line(&e.to_string())))
}

/// toml's messages span several lines (a source excerpt); keep them on one.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|')).collect::<Vec<_>>().join(": ")
}
