//! rir text-retriever plugin: BM25 as Lucene (and so pyserini) scores it.
//!
//! The index is tantivy's (term dictionary, compressed postings, segments
//! built within a memory budget); the scores are computed here, because
//! tantivy's own BM25 fixes k1 = 1.2, b = 0.75 and quantises lengths in its
//! own way. Lucene's scorer, reproduced exactly:
//!
//! - idf = ln(1 + (N − df + 0.5) / (df + 0.5)), N = documents with the field;
//! - a document's length is its number of indexed terms, stored through
//!   Lucene's one-byte `SmallFloat.intToByte4` (lengths above 24 are rounded
//!   down to 4 significant bits), avgdl is exact;
//! - term score = w − w / (1 + tf · 1/(k1 · (1 − b + b · len/avgdl))), w = boost · idf
//!   (Lucene ≥ 8 has no (k1 + 1) factor), in f32;
//! - a query is Anserini's bag of words: each distinct term once, boosted by
//!   its count; clause scores summed in f64, then rounded to f32;
//! - ties go to the earlier document (Lucene's doc id order).

pub mod analyzer;

use std::collections::BTreeMap;
use std::path::Path;

use analyzer::{Analyzer, Stemmer, Stopwords};
use rir_sdk::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tantivy::postings::Postings;
use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST};
use tantivy::tokenizer::{PreTokenizedString, Token};
use tantivy::{DocSet, Index, IndexReader, TantivyDocument, Term, TERMINATED};

/// Bumped whenever what the index holds changes.
const FORMAT: u32 = 1;
const META: &str = "rir-bm25.json";

fn default_k1() -> f32 {
    0.9
}
fn default_b() -> f32 {
    0.4
}
fn default_stopwords() -> Stopwords {
    Stopwords::Named("lucene".into())
}
fn default_true() -> bool {
    true
}

/// The plugin's config table. Defaults are pyserini's BEIR "flat" settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bm25Config {
    /// Term-frequency saturation (Lucene/pyserini: 0.9).
    #[serde(default = "default_k1")]
    pub k1: f32,
    /// Length normalisation (Lucene/pyserini: 0.4).
    #[serde(default = "default_b")]
    pub b: f32,
    /// `"porter"` or `"none"`.
    #[serde(default = "default_stemmer")]
    pub stemmer: Stemmer,
    /// `"lucene"`, `"none"`, or a list of words.
    #[serde(default = "default_stopwords")]
    pub stopwords: Stopwords,
    /// Lowercase terms (Lucene's LowerCaseFilter).
    #[serde(default = "default_true")]
    pub lowercase: bool,
    /// Index writer memory in MB (tantivy splits it between threads).
    #[serde(default = "default_memory")]
    pub memory_mb: usize,
}

fn default_stemmer() -> Stemmer {
    Stemmer::Porter
}
fn default_memory() -> usize {
    256
}

impl Bm25Config {
    fn check(&self) -> PluginResult<()> {
        if !(self.k1.is_finite() && self.k1 >= 0.0) {
            return Err(PluginError::input(format!("k1 must be a finite number >= 0, got {}", self.k1)));
        }
        if !(0.0..=1.0).contains(&self.b) {
            return Err(PluginError::input(format!("b must be in [0, 1], got {}", self.b)));
        }
        if self.memory_mb < 16 {
            return Err(PluginError::input(format!("memory_mb must be at least 16, got {}", self.memory_mb)));
        }
        Analyzer::new(self.stemmer, &self.stopwords, self.lowercase).map_err(PluginError::input)?;
        Ok(())
    }
}

fn parse(text: &str) -> PluginResult<Bm25Config> {
    let c: Bm25Config = config::parse(text)?;
    c.check()?;
    Ok(c)
}

/// What `build` writes beside tantivy's files.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    /// The analyzer the terms came from (a query must use the same).
    analyzer: String,
    docs: u64,
    /// Documents with at least one term (Lucene's docCount).
    docs_with_terms: u64,
    /// Sum of document lengths (Lucene's sumTotalTermFreq).
    total_terms: u64,
}

/// One tantivy segment, with its docs' corpus positions and length bytes.
struct Segment {
    reader: tantivy::SegmentReader,
    pos: Vec<u32>,
    norm: Vec<u8>,
}

struct Open {
    _reader: IndexReader,
    field: Field,
    segments: Vec<Segment>,
    meta: Meta,
    /// 1 / (k1 · (1 − b + b · LENGTH[i] / avgdl)) for each length byte.
    norm_inverse: [f32; 256],
    docs: usize,
}

pub struct Bm25 {
    cfg: Bm25Config,
    analyzer: Analyzer,
    open: Option<Open>,
}

fn schema() -> (Schema, Field, Field, Field) {
    let mut b = Schema::builder();
    let indexing = TextFieldIndexing::default().set_index_option(IndexRecordOption::WithFreqs).set_fieldnorms(false);
    let text = b.add_text_field("text", TextOptions::default().set_indexing_options(indexing));
    let pos = b.add_u64_field("pos", FAST);
    let len = b.add_u64_field("len", FAST);
    (b.build(), text, pos, len)
}

fn tantivy_err(what: &str) -> impl Fn(tantivy::TantivyError) -> PluginError + '_ {
    move |e| PluginError::Other(format!("{what}: {e}"))
}

impl Bm25 {
    pub fn new(text: &str) -> PluginResult<Self> {
        let cfg = parse(text)?;
        let analyzer = Analyzer::new(cfg.stemmer, &cfg.stopwords, cfg.lowercase).map_err(PluginError::input)?;
        Ok(Self { cfg, analyzer, open: None })
    }

    fn open_dir(&self, dir: &Path) -> PluginResult<Open> {
        let meta_path = dir.join(META);
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).map_err(|e| {
            PluginError::input(format!("{}: {e} (not an index this plugin built)", meta_path.display()))
        })?)
        .map_err(|e| PluginError::input(format!("{}: {e}", meta_path.display())))?;
        if meta.format != FORMAT || meta.analyzer != self.analyzer.describe() {
            return Err(PluginError::input(format!(
                "{}: index format {} with analyzer {}, this plugin needs format {FORMAT} with {} (rebuild it)",
                dir.display(),
                meta.format,
                meta.analyzer,
                self.analyzer.describe()
            )));
        }
        let index = Index::open_in_dir(dir).map_err(tantivy_err("opening the index"))?;
        let reader = index.reader().map_err(tantivy_err("opening the index"))?;
        let searcher = reader.searcher();
        let mut segments = Vec::new();
        let mut docs = 0usize;
        for seg in searcher.segment_readers() {
            let col = |name: &str| seg.fast_fields().u64(name).map_err(tantivy_err("reading the index"));
            let (pos_col, len_col) = (col("pos")?, col("len")?);
            let n = seg.max_doc();
            let pos: Vec<u32> = (0..n).map(|d| pos_col.first(d).unwrap_or(0) as u32).collect();
            let norm: Vec<u8> = (0..n).map(|d| int_to_byte4(len_col.first(d).unwrap_or(0).min(i32::MAX as u64) as i32)).collect();
            docs += n as usize;
            segments.push(Segment { reader: seg.clone(), pos, norm });
        }
        // Lucene: avgdl = sumTotalTermFreq / docCount, as f32.
        let avgdl = if meta.docs_with_terms == 0 { 1.0 } else { (meta.total_terms as f64 / meta.docs_with_terms as f64) as f32 };
        let mut norm_inverse = [0f32; 256];
        for (i, v) in norm_inverse.iter_mut().enumerate() {
            *v = 1.0 / (self.cfg.k1 * ((1.0 - self.cfg.b) + self.cfg.b * byte4_to_int(i as u8) as f32 / avgdl));
        }
        Ok(Open { _reader: reader, field: schema().1, segments, meta, norm_inverse, docs })
    }

    /// One query's top k as (corpus position, score). `acc` is the
    /// caller's per-thread accumulator (all NaN, as long as the largest
    /// segment); it is left all NaN again, so no query allocates one.
    fn search_one(&self, o: &Open, query: &str, k: usize, acc: &mut [f64]) -> PluginResult<Vec<(u32, f32)>> {
        let field = o.field;
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for t in self.analyzer.analyze(query) {
            *counts.entry(t).or_default() += 1;
        }
        let n = o.meta.docs_with_terms as f64;
        let inverted: Vec<_> = o.segments.iter().map(|s| s.reader.inverted_index(field)).collect::<tantivy::Result<_>>().map_err(tantivy_err("reading the index"))?;
        let io = |e: std::io::Error| PluginError::Other(format!("reading postings: {e}"));
        // Each distinct term once, weighted by its count and its idf over the whole index.
        let mut terms: Vec<(Term, f32)> = Vec::new();
        for (term, &count) in &counts {
            let t = Term::from_field_text(field, term);
            let mut df = 0u64;
            for inv in &inverted {
                df += inv.doc_freq(&t).map_err(io)? as u64;
            }
            if df > 0 {
                let idf = (1.0 + (n - df as f64 + 0.5) / (df as f64 + 0.5)).ln() as f32;
                terms.push((t, count as f32 * idf));
            }
        }
        let mut best: Vec<(u32, f32)> = Vec::new();
        for (seg, inv) in o.segments.iter().zip(&inverted) {
            let mut touched: Vec<u32> = Vec::new();
            for (t, w) in &terms {
                let w = *w;
                let Some(mut postings) = inv.read_postings(t, IndexRecordOption::WithFreqs).map_err(io)? else { continue };
                let mut d = postings.doc();
                while d != TERMINATED {
                    let tf = postings.term_freq() as f32;
                    let s = w - w / (1.0 + tf * o.norm_inverse[seg.norm[d as usize] as usize]);
                    let a = &mut acc[d as usize];
                    if a.is_nan() {
                        *a = 0.0;
                        touched.push(d);
                    }
                    *a += s as f64;
                    d = postings.advance();
                }
            }
            for d in touched {
                best.push((seg.pos[d as usize], acc[d as usize] as f32));
                acc[d as usize] = f64::NAN;
            }
        }
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if best.len() > k {
            best.select_nth_unstable_by(k - 1, order);
            best.truncate(k);
        }
        best.sort_unstable_by(order);
        Ok(best)
    }
}

impl TextRetriever for Bm25 {
    fn info(&self) -> TextRetrieverInfo {
        let settings = format!("bm25/format={FORMAT}/k1={}/b={}/{}", self.cfg.k1, self.cfg.b, self.analyzer.describe());
        let mut h = Sha256::new();
        h.update(settings.as_bytes());
        TextRetrieverInfo {
            model: format!("BM25 k1={} b={} ({})", self.cfg.k1, self.cfg.b, self.analyzer.describe()),
            fingerprint: format!("{:x}", h.finalize())[..16].to_owned(),
        }
    }

    fn build(&mut self, dir: &Path, texts: &[String], progress: &dyn ProgressSink) -> PluginResult<()> {
        let (schema, text_f, pos_f, len_f) = schema();
        std::fs::create_dir_all(dir)?;
        let index = Index::create_in_dir(dir, schema).map_err(tantivy_err("creating the index"))?;
        let threads = host().threads.clamp(1, 8);
        let mut writer = index
            .writer_with_num_threads::<TantivyDocument>(threads, self.cfg.memory_mb << 20)
            .map_err(tantivy_err("creating the index writer"))?;
        let total = texts.len() as u64;
        let (mut with_terms, mut total_terms) = (0u64, 0u64);
        let analyzer = &self.analyzer;
        // Analysis is the costly part: run it on the host's threads, a block at a time.
        for (block_no, block) in texts.chunks(4096).enumerate() {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            let per = block.len().div_ceil(threads).max(1);
            let analyzed: Vec<Vec<String>> = std::thread::scope(|s| {
                let handles: Vec<_> = block.chunks(per).map(|c| s.spawn(move || c.iter().map(|t| analyzer.analyze(t)).collect::<Vec<_>>())).collect();
                handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
            });
            for (i, terms) in analyzed.into_iter().enumerate() {
                let pos = (block_no * 4096 + i) as u64;
                let len = terms.len() as u64;
                with_terms += (len > 0) as u64;
                total_terms += len;
                let tokens: Vec<Token> = terms.into_iter().enumerate().map(|(p, text)| Token { position: p, text, ..Token::default() }).collect();
                let mut doc = TantivyDocument::new();
                doc.add_pre_tokenized_text(text_f, PreTokenizedString { text: String::new(), tokens });
                doc.add_u64(pos_f, pos);
                doc.add_u64(len_f, len);
                writer.add_document(doc).map_err(tantivy_err("indexing"))?;
            }
            let done = ((block_no + 1) * 4096).min(texts.len()) as u64;
            progress.report(&Progress { stage: "index".into(), done, total, loss: None, message: String::new() });
        }
        writer.commit().map_err(tantivy_err("committing the index"))?;
        writer.wait_merging_threads().map_err(tantivy_err("merging segments"))?;
        let meta = Meta { format: FORMAT, analyzer: analyzer.describe(), docs: total, docs_with_terms: with_terms, total_terms };
        std::fs::write(dir.join(META), serde_json::to_vec_pretty(&meta).map_err(|e| PluginError::Other(e.to_string()))?)?;
        self.open = Some(self.open_dir(dir)?);
        Ok(())
    }

    fn open(&mut self, dir: &Path) -> PluginResult<()> {
        self.open = Some(self.open_dir(dir)?);
        Ok(())
    }

    fn len(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.docs)
    }

    fn search(&self, queries: &[String], k: usize) -> PluginResult<Hits> {
        let o = self.open.as_ref().ok_or_else(|| PluginError::input("search before build or open: no index is open"))?;
        let mut hits = Hits { queries: queries.len(), k, ids: vec![-1; queries.len() * k], scores: vec![f32::NEG_INFINITY; queries.len() * k] };
        if k == 0 || queries.is_empty() {
            return Ok(hits);
        }
        let threads = host().threads.max(1);
        let per = queries.len().div_ceil(threads);
        let rows: Vec<PluginResult<Vec<(u32, f32)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = queries
                .chunks(per)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = vec![f64::NAN; o.segments.iter().map(|g| g.pos.len()).max().unwrap_or(0)];
                        c.iter().map(|q| self.search_one(o, q, k, &mut acc)).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        for (qi, row) in rows.into_iter().enumerate() {
            for (slot, (pos, score)) in row?.into_iter().enumerate() {
                hits.ids[qi * k + slot] = pos as i64;
                hits.scores[qi * k + slot] = score;
            }
        }
        Ok(hits)
    }
}

// ---- Lucene's SmallFloat, for document lengths --------------------------

fn long_to_int4(i: i64) -> i32 {
    let num_bits = 64 - i.leading_zeros() as i32;
    if num_bits < 4 {
        i as i32
    } else {
        let shift = num_bits - 4;
        let encoded = ((i >> shift) as i32) & 0x07;
        encoded | ((shift + 1) << 3)
    }
}

fn int4_to_long(i: i32) -> i64 {
    let bits = (i & 0x07) as i64;
    let shift = (i >> 3) - 1;
    if shift == -1 {
        bits
    } else {
        (bits | 0x08) << shift
    }
}

/// 255 − longToInt4(Integer.MAX_VALUE) = 24 lengths are stored exactly.
const NUM_FREE_VALUES: i32 = 24;

/// `SmallFloat.intToByte4`.
pub fn int_to_byte4(i: i32) -> u8 {
    if i < NUM_FREE_VALUES {
        i as u8
    } else {
        (NUM_FREE_VALUES + long_to_int4((i - NUM_FREE_VALUES) as i64)) as u8
    }
}

/// `SmallFloat.byte4ToInt`.
pub fn byte4_to_int(b: u8) -> i32 {
    let i = b as i32;
    if i < NUM_FREE_VALUES {
        i
    } else {
        (NUM_FREE_VALUES as i64 + int4_to_long(i - NUM_FREE_VALUES)) as i32
    }
}

rir_sdk::export_plugin! {
    name: "bm25",
    description: "BM25 (Lucene's scoring, pyserini's English analyzer) over a tantivy index",
    text_retriever: Bm25::new,
    validate: |what, text| match what {
        ConfigOf::TextRetriever => parse(text).map(|_| ()),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_float_matches_lucene() {
        // Values from Lucene's TestSmallFloat: lengths below 24 are exact,
        // the rest round down to 4 significant bits above 24.
        assert_eq!(long_to_int4(i32::MAX as i64), 231);
        for i in 0..24 {
            assert_eq!(byte4_to_int(int_to_byte4(i)), i);
        }
        assert_eq!(byte4_to_int(int_to_byte4(24)), 24);
        assert_eq!(byte4_to_int(int_to_byte4(100)), 24 + 72);
        assert_eq!(int_to_byte4(i32::MAX), 255);
        let mut last = -1;
        for b in 0..=255u8 {
            let v = byte4_to_int(b);
            assert!(v > last, "lengths grow with the byte");
            assert_eq!(int_to_byte4(v), b);
            last = v;
        }
    }
}
