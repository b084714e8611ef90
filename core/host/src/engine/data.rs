//! BEIR datasets: the manifest of fetchable sets, fetching (download with md5
//! check, or copy from a local mirror) into the cache, and loading with
//! BEIR's semantics (documents are `title + " " + text`, stripped).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest shipped in the binary (data/datasets.toml).
const MANIFEST: &str = include_str!("../../../../data/datasets.toml");

/// What fetching or reading a BEIR dataset can fail with; each names the
/// file (and line) or dataset it is about.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A corpus, queries or qrels line that cannot be read.
    #[error("{}:{line}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A name that is neither a known BEIR dataset nor a directory.
    #[error("unknown dataset '{name}' (known: {known}){}", suggestion.as_ref().map(|s| format!("; did you mean '{s}'?")).unwrap_or_default())]
    Unknown {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        known: String,
        /// The nearest known name, if one is near.
        suggestion: Option<String>,
    },
    /// A known dataset that is not in the cache, when fetching is off.
    #[error("dataset '{name}' is not in the cache ({}); fetch it with `rir data fetch {name}` (add `--mirror DIR` to copy from a local mirror)", path.display())]
    NotFetched {
        /// The dataset.
        name: String,
        /// Where the cache expected it.
        path: PathBuf,
    },
    /// A mirror without the dataset.
    #[error("mirror {} has no dataset '{name}' (expected {})", mirror.display(), expected.display())]
    NotInMirror {
        /// The dataset.
        name: String,
        /// The mirror directory.
        mirror: PathBuf,
        /// The directory looked for.
        expected: PathBuf,
    },
    /// A download that failed.
    #[error("download of {url} failed: {reason}")]
    Download {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// A download whose md5 is not BEIR's.
    #[error("{url}: md5 mismatch: expected {expected}, found {found}; the download was discarded")]
    Checksum {
        /// What was fetched.
        url: String,
        /// BEIR's md5.
        expected: String,
        /// The download's md5.
        found: String,
    },
    /// No qrels file for the split asked for.
    #[error("{}: no qrels for split '{split}': expected {} (qrels found: {})", dir.display(), dir.join("qrels").join(format!("{split}.tsv")).display(), if have.is_empty() { "none" } else { have.as_str() })]
    NoSplit {
        /// The dataset directory.
        dir: PathBuf,
        /// The split asked for.
        split: String,
        /// The splits there are, comma-separated.
        have: String,
    },
    /// A dataset name that cannot be a file name (it names cache folders and output files).
    #[error("{0}")]
    BadName(String),
    /// Nothing to evaluate: an empty corpus, or no query with judgments.
    #[error("{}: {what}", path.display())]
    Empty {
        /// The file or directory.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_owned(), source }
}

/// One dataset of data/datasets.toml: where BEIR publishes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// BEIR's zip.
    pub url: String,
    /// Its md5, as BEIR publishes it.
    pub md5: String,
    /// The split tables report (test, or dev for MS MARCO).
    pub eval_split: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    beir: BTreeMap<String, ManifestEntry>,
}

const BEIR_BASE: &str = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets";

/// The BEIR datasets rir knows by name. `RIR_BEIR_URL` replaces the archive
/// server's base URL (a mirror of it; the md5s still apply).
pub fn manifest() -> BTreeMap<String, ManifestEntry> {
    let mut m = toml::from_str::<Manifest>(MANIFEST).expect("data/datasets.toml is valid").beir;
    if let Ok(base) = std::env::var("RIR_BEIR_URL") {
        for e in m.values_mut() {
            e.url = e.url.replacen(BEIR_BASE, base.trim_end_matches('/'), 1);
        }
    }
    m
}

/// The manifest entry of a known dataset, or an error that suggests the nearest name.
pub fn manifest_entry(name: &str) -> Result<ManifestEntry, DataError> {
    let m = manifest();
    m.get(name).cloned().ok_or_else(|| DataError::Unknown {
        name: name.to_owned(),
        known: m.keys().cloned().collect::<Vec<_>>().join(", "),
        suggestion: crate::util::suggest::nearest(name, m.keys().map(String::as_str)),
    })
}

/// Where fetched datasets live: `<cache>/datasets/beir/<name>`.
pub fn cache_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join("datasets/beir").join(name)
}

/// How a cached dataset got there (written next to its files).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// The dataset.
    pub name: String,
    /// The URL or mirror directory it came from.
    pub source: String,
    /// Whether the md5 was checked (a mirror copy is not).
    pub md5_checked: bool,
    /// When, in seconds since the Unix epoch.
    pub fetched_unix: u64,
}

const PROVENANCE: &str = "rir-source.json";

/// Fetches `name` into the cache (from `mirror` when given) and returns its
/// directory. Already-cached datasets are left alone unless `force`.
pub fn fetch(name: &str, cache: &Path, mirror: Option<&Path>, force: bool) -> Result<PathBuf, DataError> {
    // The name is a folder of the cache and of the mirror: never `../x`.
    crate::util::paths::check_name("dataset", name).map_err(DataError::BadName)?;
    let entry = manifest_entry(name);
    let dest = cache_dir(cache, name);
    if dest.join(PROVENANCE).is_file() && !force {
        return Ok(dest);
    }
    // Build in a staging sibling and move it into place: an interrupted fetch leaves no half dataset.
    let tmp = rir_models::staging_dir(&dest).map_err(io(&dest))?;
    let provenance = match mirror {
        Some(m) => {
            let src = m.join("beir").join(name);
            if !src.join("corpus.jsonl").is_file() {
                return Err(DataError::NotInMirror { name: name.into(), mirror: m.into(), expected: src });
            }
            copy_tree(&src, &tmp)?;
            Provenance { name: name.into(), source: format!("mirror:{}", src.display()), md5_checked: false, fetched_unix: now() }
        }
        None => {
            let entry = entry?;
            let bytes = rir_models::download(&entry.url)
                .map_err(|reason| DataError::Download { url: entry.url.clone(), reason })?;
            let found = format!("{:x}", <md5::Md5 as md5::Digest>::digest(&bytes));
            if found != entry.md5 {
                return Err(DataError::Checksum { url: entry.url, expected: entry.md5, found });
            }
            // BEIR zips hold `<name>/corpus.jsonl` etc.: drop the top folder.
            rir_models::unzip(&bytes, &tmp, 1)
                .map_err(|reason| DataError::Download { url: entry.url.clone(), reason })?;
            Provenance { name: name.into(), source: entry.url, md5_checked: true, fetched_unix: now() }
        }
    };
    let p = tmp.join(PROVENANCE);
    std::fs::write(&p, serde_json::to_vec_pretty(&provenance).expect("serialisable")).map_err(io(&p))?;
    rir_models::install_dir(&tmp, &dest, PROVENANCE, force).map_err(io(&dest))?;
    Ok(dest)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for e in std::fs::read_dir(src).map_err(io(src))? {
        let e = e.map_err(io(src))?;
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to).map_err(io(&to))?;
        }
    }
    Ok(())
}

/// A cached dataset: name, directory, provenance.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The dataset.
    pub name: String,
    /// Its directory in the cache.
    pub dir: PathBuf,
    /// How it got there, when recorded.
    pub provenance: Option<Provenance>,
}

/// Datasets in the cache.
pub fn list_cached(cache: &Path) -> Vec<Cached> {
    let root = cache.join("datasets/beir");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().join("corpus.jsonl").is_file() {
                continue;
            }
            let provenance =
                std::fs::read(e.path().join(PROVENANCE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            out.push(Cached { name, dir: e.path(), provenance });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One corpus document.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// `_id`.
    pub id: String,
    /// `title` (may be empty).
    pub title: String,
    /// `text`.
    pub text: String,
}

impl Doc {
    /// What the encoder sees, as BEIR builds it: `title + " " + text`, stripped.
    pub fn encoder_text(&self) -> String {
        format!("{} {}", self.title, self.text).trim().to_owned()
    }
}

/// qrels: query id → doc id → relevance grade.
pub type Qrels = BTreeMap<String, BTreeMap<String, i32>>;

/// What loading found that a researcher should know about.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Documents whose id was already seen (the first is kept).
    pub duplicate_doc_ids: usize,
    /// Queries whose id was already seen (the first is kept).
    pub duplicate_query_ids: usize,
    /// Judgments of queries not in queries.jsonl (dropped).
    pub qrels_unknown_query: usize,
    /// Judgments of documents not in the corpus (kept, never retrievable).
    pub qrels_unknown_doc: usize,
    /// Repeated (query, document) judgments (the last is kept).
    pub qrels_duplicate: usize,
}

impl LoadReport {
    /// One line per non-zero count, for the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let mut add = |n: usize, what: &str| {
            if n > 0 {
                w.push(format!("{n} {what}"))
            }
        };
        add(self.duplicate_doc_ids, "duplicate document ids (first kept)");
        add(self.duplicate_query_ids, "duplicate query ids (first kept)");
        add(self.qrels_unknown_query, "judgments name queries not in queries.jsonl (dropped)");
        add(self.qrels_unknown_doc, "judgments name documents not in corpus.jsonl (kept, never retrievable)");
        add(self.qrels_duplicate, "repeated judgments for the same query and document (last kept)");
        w
    }
}

/// A loaded BEIR dataset, restricted to the queries judged in one split.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The dataset's name (the directory's, for a path).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// The qrels split loaded.
    pub split: String,
    /// Every document, in corpus.jsonl order.
    pub corpus: Vec<Doc>,
    /// The queries of the split, in queries.jsonl order: (id, text).
    pub queries: Vec<(String, String)>,
    /// The split's judgments.
    pub qrels: Qrels,
    /// What loading found.
    pub report: LoadReport,
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "_id")]
    id: serde_json::Value,
    #[serde(default)]
    title: Option<String>,
    text: String,
}

#[derive(Deserialize)]
struct RawQuery {
    #[serde(rename = "_id")]
    id: serde_json::Value,
    text: String,
}

/// `_id` may be written as a string or a number; BEIR treats it as a string.
fn id_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The lines of a text file, numbered from 1; a line that is not UTF-8 is
/// an error naming the file, the line and the byte (std's message names neither).
fn text_lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, String), DataError>> + '_, DataError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    Ok(BufReader::new(f).split(b'\n').enumerate().map(move |(i, bytes)| {
        crate::util::files::utf8_line(bytes.map_err(io(path))?)
            .map(|l| (i + 1, l))
            .map_err(|reason| DataError::Malformed { path: path.to_owned(), line: i + 1, reason })
    }))
}

fn read_jsonl<T: serde::de::DeserializeOwned>(
    path: &Path,
    mut each: impl FnMut(usize, T) -> Result<(), DataError>,
) -> Result<(), DataError> {
    for line in text_lines(path)? {
        let (n, line) = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: T = serde_json::from_str(&line).map_err(|e| DataError::Malformed { path: path.to_owned(), line: n, reason: e.to_string() })?;
        each(n, v)?;
    }
    Ok(())
}

/// Loads a BEIR folder; `split` picks `qrels/SPLIT.tsv` and the queries it judges.
pub fn load_dir(name: &str, dir: &Path, split: &str) -> Result<Dataset, DataError> {
    let mut report = LoadReport::default();
    let qrels_path = dir.join("qrels").join(format!("{split}.tsv"));
    if !qrels_path.is_file() {
        let have = std::fs::read_dir(dir.join("qrels"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".tsv").map(str::to_owned))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        return Err(DataError::NoSplit { dir: dir.to_owned(), split: split.into(), have });
    }

    let corpus_path = dir.join("corpus.jsonl");
    let mut corpus = Vec::new();
    let mut seen = HashSet::new();
    read_jsonl(&corpus_path, |line, d: RawDoc| {
        let id = id_string(&d.id).ok_or_else(|| DataError::Malformed {
            path: corpus_path.clone(),
            line,
            reason: "`_id` must be a string or number".into(),
        })?;
        if seen.insert(id.clone()) {
            corpus.push(Doc { id, title: d.title.unwrap_or_default(), text: d.text });
        } else {
            report.duplicate_doc_ids += 1;
        }
        Ok(())
    })?;

    let queries_path = dir.join("queries.jsonl");
    let mut all_queries: Vec<(String, String)> = Vec::new();
    let mut qseen = HashSet::new();
    read_jsonl(&queries_path, |line, q: RawQuery| {
        let id = id_string(&q.id).ok_or_else(|| DataError::Malformed {
            path: queries_path.clone(),
            line,
            reason: "`_id` must be a string or number".into(),
        })?;
        if qseen.insert(id.clone()) {
            all_queries.push((id, q.text));
        } else {
            report.duplicate_query_ids += 1;
        }
        Ok(())
    })?;

    if corpus.is_empty() {
        return Err(DataError::Empty { path: corpus_path, what: "the corpus has no documents".into() });
    }
    let qrels = read_qrels(&qrels_path, &mut report, Some((&qseen, &seen)))?;
    let queries: Vec<(String, String)> = all_queries.into_iter().filter(|(id, _)| qrels.contains_key(id)).collect();
    if queries.is_empty() {
        return Err(DataError::Empty {
            path: queries_path,
            what: format!("no query has judgments in {} ({} queries read)", qrels_path.display(), qseen.len()),
        });
    }
    Ok(Dataset { name: name.into(), dir: dir.into(), split: split.into(), corpus, queries, qrels, report })
}

/// Reads a qrels file on its own: BEIR's TSV (`query-id corpus-id score`,
/// header optional) or TREC qrels (`qid 0 docid rel`, tabs or spaces), every
/// judgment kept (`rir.load_qrels`, `rir.evaluate` in Python).
pub fn read_qrels_file(path: &Path) -> Result<Qrels, DataError> {
    read_qrels(path, &mut LoadReport::default(), None)
}

/// Reads a qrels TSV (`query-id corpus-id score`, header optional); with
/// `known` (the queries and documents loaded), judgments of unknown queries
/// are dropped and counted.
fn read_qrels(
    path: &Path,
    report: &mut LoadReport,
    known: Option<(&HashSet<String>, &HashSet<String>)>,
) -> Result<Qrels, DataError> {
    let mut qrels = Qrels::new();
    for line in text_lines(path)? {
        let (n, line) = line?;
        let bad = |reason: String| DataError::Malformed { path: path.to_owned(), line: n, reason };
        if line.trim().is_empty() || (n == 1 && line.starts_with("query-id")) {
            continue;
        }
        let mut cols: Vec<&str> = line.split('\t').collect();
        if cols.len() == 1 {
            // TREC qrels as trec_eval writes them: space-separated.
            cols = line.split_whitespace().collect();
        }
        // BEIR's TSV has three columns; TREC qrels have four (qid 0 docid rel).
        let (q, d, r) = match cols.as_slice() {
            [q, d, r] => (*q, *d, *r),
            [q, _, d, r] => (*q, *d, *r),
            _ => return Err(bad(format!("expected 3 columns (query-id corpus-id score) or 4 (qid 0 docid rel), found {}", cols.len()))),
        };
        let rel: i32 = r.trim().parse().map_err(|_| bad(format!("relevance {r:?} is not an integer")))?;
        if let Some((queries, docs)) = known {
            if !queries.contains(q) {
                report.qrels_unknown_query += 1;
                continue;
            }
            if !docs.contains(d) {
                report.qrels_unknown_doc += 1;
            }
        }
        if qrels.entry(q.to_owned()).or_default().insert(d.to_owned(), rel).is_some() {
            report.qrels_duplicate += 1;
        }
    }
    Ok(qrels)
}

/// Resolves `--dataset`: a directory in BEIR layout, or a name fetched into
/// the cache (fetching from `mirror` first when one is given).
pub fn open(spec: &str, split: Option<&str>, cache: &Path, mirror: Option<&Path>) -> Result<Dataset, DataError> {
    let as_path = Path::new(spec);
    if as_path.join("corpus.jsonl").is_file() {
        // The folder's own name (`..` or `.` resolved first) names output files.
        let folder = match as_path.file_name() {
            Some(n) => n.to_owned(),
            None => as_path.canonicalize().map_err(io(as_path))?.file_name().unwrap_or_default().to_owned(),
        };
        let name = crate::util::paths::sanitize(&folder.to_string_lossy());
        return load_dir(&name, as_path, split.unwrap_or("test"));
    }
    let entry = manifest_entry(spec)?;
    let dir = match mirror {
        Some(_) => fetch(spec, cache, mirror, false)?,
        None => {
            let d = cache_dir(cache, spec);
            if !d.join("corpus.jsonl").is_file() {
                return Err(DataError::NotFetched { name: spec.into(), path: d });
            }
            d
        }
    };
    load_dir(spec, &dir, split.unwrap_or(&entry.eval_split))
}

/// Counts for `rir data list`.
pub fn quick_counts(dir: &Path) -> (usize, usize) {
    let count = |p: PathBuf| {
        std::fs::File::open(p).map(|f| BufReader::new(f).lines().filter(|l| l.as_ref().is_ok_and(|l| !l.trim().is_empty())).count()).unwrap_or(0)
    };
    (count(dir.join("corpus.jsonl")), count(dir.join("queries.jsonl")))
}
