//! The one error type that crosses the plugin boundary.

use abi_stable::{std_types::RString, StableAbi};

/// What went wrong inside a plugin, as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The plugin's TOML config table was rejected (unknown key, bad value).
    #[error("invalid config: {0}")]
    Config(String),
    /// The input handed to a call was rejected (empty batch, wrong dimension, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// A file, model or library the plugin needs is missing or unreadable.
    #[error("{0}")]
    Resource(String),
    /// The plugin does not provide this kind or operation.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The plugin panicked; the panic was caught at the boundary.
    #[error("plugin panicked: {0}")]
    Panic(String),
    /// The caller asked to stop (Ctrl-C, a cancelled job).
    #[error("cancelled")]
    Cancelled,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl PluginError {
    pub fn config(msg: impl std::fmt::Display) -> Self {
        Self::Config(msg.to_string())
    }
    pub fn input(msg: impl std::fmt::Display) -> Self {
        Self::Input(msg.to_string())
    }
    pub fn resource(msg: impl std::fmt::Display) -> Self {
        Self::Resource(msg.to_string())
    }
    pub fn other(msg: impl std::fmt::Display) -> Self {
        Self::Other(msg.to_string())
    }
}

impl From<std::io::Error> for PluginError {
    fn from(e: std::io::Error) -> Self {
        Self::Resource(e.to_string())
    }
}

/// Result alias used across the SDK.
pub type PluginResult<T> = Result<T, PluginError>;

/// Stable-ABI form of [`PluginError`].
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Config,
    Input,
    Resource,
    Unsupported,
    Panic,
    Cancelled,
    Other,
}

/// Stable-ABI form of [`PluginError`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiError {
    pub kind: ErrorKind,
    pub message: RString,
}

impl From<PluginError> for FfiError {
    fn from(e: PluginError) -> Self {
        let (kind, message) = match e {
            PluginError::Config(m) => (ErrorKind::Config, m),
            PluginError::Input(m) => (ErrorKind::Input, m),
            PluginError::Resource(m) => (ErrorKind::Resource, m),
            PluginError::Unsupported(m) => (ErrorKind::Unsupported, m),
            PluginError::Panic(m) => (ErrorKind::Panic, m),
            PluginError::Cancelled => (ErrorKind::Cancelled, String::new()),
            PluginError::Other(m) => (ErrorKind::Other, m),
        };
        // What crosses to the host (and into its logs and output) never carries a secret.
        FfiError { kind, message: crate::secret::redact(&message).into_owned().into() }
    }
}

impl From<FfiError> for PluginError {
    fn from(e: FfiError) -> Self {
        let m = e.message.into_string();
        match e.kind {
            ErrorKind::Config => PluginError::Config(m),
            ErrorKind::Input => PluginError::Input(m),
            ErrorKind::Resource => PluginError::Resource(m),
            ErrorKind::Unsupported => PluginError::Unsupported(m),
            ErrorKind::Panic => PluginError::Panic(m),
            ErrorKind::Cancelled => PluginError::Cancelled,
            ErrorKind::Other => PluginError::Other(m),
        }
    }
}
