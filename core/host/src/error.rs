//! Host errors. Each names the plugin, file, line or key it is about, on one line.

use std::path::PathBuf;

use rir_sdk::PluginError;

use crate::plugins::registry::{Kind, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error("plugin '{plugin}': library not found (tried {}); {build}", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    LibraryMissing { plugin: String, tried: Vec<PathBuf>, build: String },

    #[error("plugin '{plugin}': sha256 mismatch for {}: expected {expected}, found {found}", path.display())]
    Sha256Mismatch { plugin: String, path: PathBuf, expected: String, found: String },

    #[error("plugin '{plugin}': cannot load {}: {message}", path.display())]
    Open { plugin: String, path: PathBuf, message: String },

    #[error("plugin '{plugin}': ABI mismatch in {}: {message}", path.display())]
    Abi { plugin: String, path: PathBuf, message: String },

    #[error("plugin '{plugin}': registry lists kind '{kind}' but the library provides only {}", join(provides))]
    KindMismatch { plugin: String, kind: Kind, provides: Vec<String> },

    #[error("plugin '{plugin}' does not provide a {kind} (it provides {})", join(provides))]
    KindNotProvided { plugin: String, kind: Kind, provides: Vec<String> },

    #[error("plugin '{plugin}' ({kind}): {source}")]
    Plugin {
        plugin: String,
        kind: Kind,
        #[source]
        source: PluginError,
    },

    #[error("plugin '{plugin}': config is not a TOML table: {message}")]
    Config { plugin: String, message: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON or JSON-lines file that cannot be written or read (`line` is
    /// 1-based, for JSON lines).
    #[error("{}{}: {source}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        path: PathBuf,
        line: Option<usize>,
        #[source]
        source: serde_json::Error,
    },

    #[error(transparent)]
    Data(#[from] crate::engine::data::DataError),

    #[error(transparent)]
    Report(#[from] crate::engine::report::ReportError),

    /// A step of a stage that failed for a typed reason; `source` keeps the
    /// cause chain (what `rir` prints, and what a library caller can walk).
    #[error("{step}: {source}")]
    Step {
        step: String,
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
        let dir = std::env::temp_dir().join(format!("rir-error-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("rows.jsonl");
        std::fs::write(&f, "{\"a\": 1}\n{oops\n").unwrap();
        let e = crate::util::files::read_jsonl::<serde_json::Value>(&f).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{}:2: ", f.display())), "{e}");
        assert!(e.source().unwrap().downcast_ref::<serde_json::Error>().is_some());

        let io = std::io::Error::new(std::io::ErrorKind::Other, "disk gone");
        let e = HostError::step("rlrf-data: augment", io);
        assert_eq!(e.to_string(), "rlrf-data: augment: disk gone");
        assert_eq!(e.source().unwrap().to_string(), "disk gone");
        std::fs::remove_dir_all(&dir).ok();
    }
}
