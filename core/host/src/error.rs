//! Host errors. Each names the plugin, file, line or key it is about, on one line.

use std::path::PathBuf;

use rir_sdk::PluginError;

use crate::plugins::registry::{Kind, RegistryError};

/// Everything the host can fail with; `Display` is one line that names the
/// plugin, file, line or key, and typed causes stay reachable by `source()`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// registry.toml cannot be found, read or parsed, or lacks a plugin.
    #[error(transparent)]
    Registry(#[from] RegistryError),

    /// No library file for a plugin in any place looked at.
    #[error("plugin '{plugin}': library not found (tried {}); {build}", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    LibraryMissing {
        /// The plugin's registry name.
        plugin: String,
        /// Every path looked at, in order.
        tried: Vec<PathBuf>,
        /// How to build it (`cargo build …`), or why there is nothing to build.
        build: String,
    },

    /// A library whose digest is not the one registry.toml pins.
    #[error("plugin '{plugin}': sha256 mismatch for {}: expected {expected}, found {found}", path.display())]
    Sha256Mismatch {
        /// The plugin's registry name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// The digest registry.toml pins.
        expected: String,
        /// The digest of the file found.
        found: String,
    },

    /// The dynamic loader refused the library.
    #[error("plugin '{plugin}': cannot load {}: {message}", path.display())]
    Open {
        /// The plugin's registry name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// The dynamic loader's reason.
        message: String,
    },

    /// A library built against another plugin ABI (or no rir plugin at all).
    #[error("plugin '{plugin}': ABI mismatch in {}: {message}", path.display())]
    Abi {
        /// The plugin's registry name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// What differs (version, type layouts, a missing root symbol).
        message: String,
    },

    /// registry.toml claims a kind the library does not export.
    #[error("plugin '{plugin}': registry lists kind '{kind}' but the library provides only {}", join(provides))]
    KindMismatch {
        /// The plugin's registry name.
        plugin: String,
        /// The kind registry.toml claims.
        kind: Kind,
        /// The kinds the library exports.
        provides: Vec<String>,
    },

    /// A plugin asked for as a kind it does not provide.
    #[error("plugin '{plugin}' does not provide a {kind} (it provides {})", join(provides))]
    KindNotProvided {
        /// The plugin's registry name.
        plugin: String,
        /// The kind asked for.
        kind: Kind,
        /// The kinds the library exports.
        provides: Vec<String>,
    },

    /// A plugin call that failed (construction, validation or work).
    #[error("plugin '{plugin}' ({kind}): {source}")]
    Plugin {
        /// The plugin's registry name.
        plugin: String,
        /// The kind of object that failed.
        kind: Kind,
        /// The plugin's own error (a panic inside it arrives as `PluginError::Panic`).
        #[source]
        source: PluginError,
    },

    /// A plugin config that is not a TOML table.
    #[error("plugin '{plugin}': config is not a TOML table: {message}")]
    Config {
        /// The plugin's registry name.
        plugin: String,
        /// The TOML parser's message.
        message: String,
    },

    /// A file or directory that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },

    /// A JSON or JSON-lines file that cannot be written or read (`line` is
    /// 1-based, for JSON lines).
    #[error("{}{}: {source}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line of a JSON-lines file, if one.
        line: Option<usize>,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },

    /// A BEIR dataset that cannot be fetched or read.
    #[error(transparent)]
    Data(#[from] crate::engine::data::DataError),

    /// Results files that cannot be read or compared.
    #[error(transparent)]
    Report(#[from] crate::engine::report::ReportError),

    /// A step of a stage that failed for a typed reason; `source` keeps the
    /// cause chain (what `rir` prints, and what a library caller can walk).
    #[error("{step}: {source}")]
    Step {
        /// The stage and step ("rlrf-data: reward").
        step: String,
        /// The typed cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A pipeline input (data file, stage output, setting) that cannot be
    /// used, with no typed cause behind it.
    #[error("{0}")]
    Input(String),
}

impl HostError {
    /// `source`, as the cause of `step` failing ("rlrf-data: augment").
    pub fn step(step: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        HostError::Step { step: step.into(), source: Box::new(source) }
    }
}

/// An error and its causes on one line, as `rir` prints them (the CLI and
/// the Python package give the same message): a cause whose text the message
/// before it already holds is skipped (our errors print their source
/// inline); secrets are redacted.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    rir_sdk::secret::redact(&out).into_owned()
}

fn join(v: &[String]) -> String {
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn typed_causes_stay_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rows.jsonl");
        std::fs::write(&f, "{\"a\": 1}\n{oops\n").unwrap();
        let e = crate::util::files::read_jsonl::<serde_json::Value>(&f).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{}:2: ", f.display())), "{e}");
        assert!(e.source().unwrap().downcast_ref::<serde_json::Error>().is_some());

        let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
        let e = HostError::step("rlrf-data: augment", io);
        assert_eq!(e.to_string(), "rlrf-data: augment: disk gone");
        assert_eq!(e.source().unwrap().to_string(), "disk gone");
    }
}
