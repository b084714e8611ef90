//! First-stage rankings from a text retriever (BM25 and other lexical
//! plugins): the corpus index cached on disk per corpus and retriever
//! fingerprint, queries searched in batches with progress.

use std::path::{Path, PathBuf};

use rir_sdk::{Hits, TextRetriever};
use sha2::{Digest, Sha256};

use crate::error::HostError;
use crate::plugins::registry::Kind;
use crate::stages::train::BarSink;

/// Query2doc (Wang et al. 2023) for a lexical retriever: the query repeated
/// this many times, then the generator's text, so the query's own terms
/// keep their weight next to a longer augmentation.
pub const QUERY2DOC_REPEATS: usize = 5;

/// A key for a corpus: sha256 over its texts, each length-prefixed.
pub fn corpus_key(texts: &[String]) -> String {
    let mut h = Sha256::new();
    h.update((texts.len() as u64).to_le_bytes());
    for t in texts {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    }
    format!("{:x}", h.finalize())[..16].to_owned()
}

/// Where the index of `texts` for `retriever` lives under the cache root.
pub fn index_dir(cache_root: &Path, retriever: &dyn TextRetriever, texts: &[String]) -> PathBuf {
    cache_root.join("indexes").join(crate::util::paths::sanitize(&retriever.info().fingerprint)).join(corpus_key(texts))
}

fn plugin_err(plugin: &str) -> impl Fn(rir_sdk::PluginError) -> HostError + '_ {
    move |source| HostError::Plugin { plugin: plugin.to_owned(), kind: Kind::TextRetriever, source }
}

/// Opens the cached index of `texts`, or builds it (into a partial
/// directory renamed into place, so an interrupted build is never taken
/// for a finished one). Without a cache root the index is built in a
/// temporary directory kept for the process's life. Returns whether it
/// came from the cache.
pub fn open_or_build(plugin: &str, retriever: &mut dyn TextRetriever, texts: &[String], cache_root: Option<&Path>) -> Result<bool, HostError> {
    let err = plugin_err(plugin);
    let Some(root) = cache_root else {
        let dir = tempfile::tempdir().map_err(|e| HostError::Input(format!("temporary index directory: {e}")))?;
        // The plugin may keep files of the index open (mmap): leak the
        // directory rather than delete it under the plugin; it lives in the OS's temp.
        let path = dir.keep();
        retriever.build(&path, texts, &BarSink::new()).map_err(&err)?;
        return Ok(false);
    };
    let dir = index_dir(root, retriever, texts);
    if dir.is_dir() {
        return retriever.open(&dir).map(|_| true).map_err(|e| {
            HostError::Input(format!("{}: cached index cannot be opened ({e}); delete the directory to rebuild it", dir.display()))
        });
    }
    let partial = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let io = |p: &Path, e: std::io::Error| HostError::Input(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
    log::info!("indexing {} documents with {} into {}", texts.len(), retriever.info().model, dir.display());
    retriever.build(&partial, texts, &BarSink::new()).map_err(&err)?;
    match std::fs::rename(&partial, &dir) {
        Ok(()) => {}
        // Another process finished the same index first: use theirs.
        Err(_) if dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&partial);
        }
        Err(e) => return Err(io(&dir, e)),
    }
    // Reopen from the final place: the plugin may hold paths into the partial one.
    retriever.open(&dir).map_err(err)?;
    Ok(false)
}

/// Loads `plugin`'s text retriever with `config` and opens (or builds) its
/// index of `ds`'s corpus: what a stage that mines with it needs.
pub fn load_for(
    host: &crate::plugins::PluginHost,
    plugin: &str,
    config: &str,
    ds: &crate::engine::data::Dataset,
    cache_root: Option<&Path>,
) -> Result<Box<dyn TextRetriever>, HostError> {
    let mut tr = host.load(plugin)?.text_retriever(config)?;
    let texts: Vec<String> = ds.corpus.iter().map(crate::engine::data::Doc::encoder_text).collect();
    open_or_build(plugin, tr.as_mut(), &texts, cache_root)?;
    Ok(tr)
}

/// Searches `queries` in batches of `batch` with a progress bar.
pub fn search(plugin: &str, retriever: &dyn TextRetriever, queries: &[String], k: usize, batch: usize) -> Result<Hits, HostError> {
    let k = k.min(retriever.len()).max(1);
    let mut out = Hits { queries: 0, k, ids: Vec::with_capacity(queries.len() * k), scores: Vec::with_capacity(queries.len() * k) };
    let bar = crate::util::progress::bar(queries.len(), "search", "queries");
    for chunk in queries.chunks(batch.max(1)) {
        let h = retriever.search(chunk, k).map_err(plugin_err(plugin))?;
        if h.queries != chunk.len() || h.k != k || h.ids.len() != chunk.len() * k || h.scores.len() != h.ids.len() {
            return Err(HostError::Plugin {
                plugin: plugin.to_owned(),
                kind: Kind::TextRetriever,
                source: rir_sdk::PluginError::Other(format!(
                    "search of {} queries at k={k} returned {} queries × {} slots ({} ids, {} scores)",
                    chunk.len(), h.queries, h.k, h.ids.len(), h.scores.len()
                )),
            });
        }
        let docs = retriever.len() as i64;
        if let Some(bad) = h.ids.iter().find(|&&id| id < -1 || id >= docs) {
            return Err(HostError::Plugin {
                plugin: plugin.to_owned(),
                kind: Kind::TextRetriever,
                source: rir_sdk::PluginError::Other(format!("search returned document {bad}, the index holds {docs}")),
            });
        }
        out.queries += h.queries;
        out.ids.extend(h.ids);
        out.scores.extend(h.scores);
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    Ok(out)
}

/// Query2doc's lexical query: the query [`QUERY2DOC_REPEATS`] times, then the augmentation.
pub fn query2doc(query: &str, augmentation: &str) -> String {
    let mut s = String::with_capacity((query.len() + 1) * QUERY2DOC_REPEATS + augmentation.len());
    for _ in 0..QUERY2DOC_REPEATS {
        s.push_str(query);
        s.push(' ');
    }
    s.push_str(augmentation);
    s
}
