//! `registry.toml`: which plugins exist, what they provide, where their
//! libraries are, and optionally the sha256 each library must have.
//!
//! ```toml
//! [plugins.example-hash]
//! kinds = ["retriever"]
//! crate = "rir-plugin-example-hash"   # built in this workspace, or:
//! # library = "path/to/librir_plugin_x.so"   (relative to this file)
//! # sha256 = "…"                      # refuse any other build
//! description = "Feature-hashing retriever"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What can go wrong reading a registry (wrapped by the host's error).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Not valid TOML, or a table that breaks the registry's rules.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        /// The registry file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong there.
        message: String,
    },

    /// The registry file cannot be read.
    #[error("cannot read {}: {message}", path.display())]
    Read {
        /// The registry file.
        path: PathBuf,
        /// What the OS said.
        message: String,
    },

    /// No registry given and none found.
    #[error("no registry.toml found (looked for RIR_REGISTRY, then ./registry.toml and its parent directories); pass --registry PATH")]
    NotFound,

    /// A plugin name the registry does not list.
    #[error("unknown plugin '{name}' in {}{}", registry.display(), suggestion.as_ref().map(|s| format!("; did you mean '{s}'?")).unwrap_or_default())]
    UnknownPlugin {
        /// The name asked for.
        name: String,
        /// The registry file.
        registry: PathBuf,
        /// The nearest listed name, if one is near.
        suggestion: Option<String>,
    },
}

/// The plugin kinds the host knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Encodes queries and passages into vectors.
    Retriever,
    /// Writes text (and scores given continuations).
    Generator,
    /// Scores candidates with the retriever and/or generator in use.
    Reward,
    /// Trains a model from a data file.
    Trainer,
    /// Searches vectors (approximate or exact).
    Index,
    /// Indexes and searches texts itself (BM25 and other lexical models).
    #[serde(rename = "text-retriever")]
    TextRetriever,
}

impl Kind {
    /// Every kind, in the order `rir plugins` lists them.
    pub const ALL: [Kind; 6] = [Kind::Retriever, Kind::Generator, Kind::Reward, Kind::Trainer, Kind::Index, Kind::TextRetriever];
    /// The name registry.toml and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Retriever => "retriever",
            Kind::Generator => "generator",
            Kind::Reward => "reward",
            Kind::Trainer => "trainer",
            Kind::Index => "index",
            Kind::TextRetriever => "text-retriever",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    plugins: BTreeMap<String, Entry>,
}

/// One `[plugins.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// What the library provides.
    pub kinds: Vec<Kind>,
    /// A crate built in this workspace (its library is looked up in the plugin dirs).
    #[serde(rename = "crate")]
    pub crate_name: Option<String>,
    /// An explicit library path, relative to the registry file.
    pub library: Option<PathBuf>,
    /// Pin: the library's sha256 in hex.
    pub sha256: Option<String>,
    /// One line for `rir plugins`.
    #[serde(default)]
    pub description: String,
}

/// A registered plugin with its resolved name.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The `NAME` of `[plugins.NAME]`.
    pub name: String,
    /// Its table.
    pub entry: Entry,
}

/// A parsed registry file.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The file it was read from.
    pub path: PathBuf,
    /// The plugins by name.
    pub plugins: BTreeMap<String, Registered>,
}

impl Registry {
    /// Reads and parses a registry file.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegistryError::Read { path: path.to_owned(), message: e.to_string() })?;
        Self::parse(&text, path)
    }

    /// Parses registry text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RegistryError> {
        let at = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            RegistryError::Syntax { path: path.to_owned(), line, column, message }
        };
        let file: RegistryFile =
            toml::from_str(text).map_err(|e| at(e.span().map_or(0, |s| s.start), e.message().to_string()))?;
        let mut plugins = BTreeMap::new();
        for (name, entry) in file.plugins {
            let header = text.find(&format!("[plugins.{name}]")).unwrap_or(0);
            match (&entry.crate_name, &entry.library) {
                (None, None) => return Err(at(header, format!("plugin '{name}' needs `crate` or `library`"))),
                (Some(_), Some(_)) => {
                    return Err(at(header, format!("plugin '{name}' has both `crate` and `library`; keep one")))
                }
                _ => {}
            }
            if entry.kinds.is_empty() {
                return Err(at(header, format!("plugin '{name}' lists no kinds")));
            }
            if let Some(pin) = &entry.sha256 {
                if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(at(header, format!("plugin '{name}': sha256 must be 64 hex digits")));
                }
            }
            plugins.insert(name.clone(), Registered { name, entry });
        }
        Ok(Registry { path: path.to_owned(), plugins })
    }

    /// The plugin named `name`, or an error that suggests the nearest name.
    pub fn get(&self, name: &str) -> Result<&Registered, RegistryError> {
        self.plugins.get(name).ok_or_else(|| RegistryError::UnknownPlugin {
            name: name.to_owned(),
            registry: self.path.clone(),
            suggestion: crate::util::suggest::nearest(name, self.plugins.keys().map(String::as_str)),
        })
    }

    /// The directory relative library paths are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_owned).unwrap_or_default()
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Finds `registry.toml`: `RIR_REGISTRY`, else the nearest one in the current
/// directory or its parents.
pub fn discover() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RIR_REGISTRY") {
        return Some(PathBuf::from(p));
    }
    let mut dir = std::env::current_dir().ok()?;
    loop {
        let p = dir.join("registry.toml");
        if p.is_file() {
            return Some(p);
        }
        if !dir.pop() {
            return None;
        }
    }
}
