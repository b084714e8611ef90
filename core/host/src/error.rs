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

    /// A pipeline input (data file, stage output) that cannot be used.
    #[error("{0}")]
    Input(String),
}

fn join(v: &[String]) -> String {
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}
