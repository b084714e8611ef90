//! `rir rerank`: the top `depth` results of any run (a run file, or an
//! experiment variant's) scored again by a reranker and evaluated like any
//! run, so `rir table` compares it with the first stage it reranked.
//!
//! The reranker is a Reward plugin: it already scores a query's candidate
//! passages, which is what a reranker does. `generator-reward` is the
//! generator's pointwise score (`mode = "query_likelihood"`: UPR's
//! log p(query | passage), Sachan et al. 2022; `mode = "yes_no"`: the
//! probability of "Yes" to a relevance question), through the host's
//! generation cache so a rerun does not score again. As BEIR's reranking
//! does, the reranked run holds the top `depth` only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use rir_sdk::{Generator, Reward, RewardContext, RewardItem};
use serde_json::json;

use crate::engine::generate::{Cached, GenerationCache};
use crate::engine::metrics::{trec_order, Run};
use crate::engine::{data, runfile};
use crate::plugins::PluginHost;
use crate::stages::eval::{EvalError, EvalOutput, Judging};

/// What one reranking needs.
#[derive(Debug, Clone)]
pub struct RerankOptions {
    /// The run whose top `depth` is reranked.
    pub run: PathBuf,
    /// Results reranked (and kept) per query.
    pub depth: usize,
    /// The reranker: a Reward plugin's registry name.
    pub reranker: String,
    /// Its config table (TOML text).
    pub reranker_config: String,
    /// The generator a generator reward scores with.
    pub generator: Option<String>,
    /// Its config table (TOML text).
    pub generator_config: String,
    /// Queries per reranker call (each with its `depth` passages).
    pub batch: usize,
    /// Read and write the generation cache.
    pub use_cache: bool,
    /// The dataset (its queries, corpus and qrels), and where the run goes.
    pub judging: Judging,
}

fn check(o: &RerankOptions) -> Result<(), EvalError> {
    o.judging.check()?;
    if o.depth == 0 || o.depth > 10_000 {
        return Err(EvalError::Invalid(format!("--depth must be in 1..=10000 (results reranked per query), got {}", o.depth)));
    }
    if o.batch == 0 {
        return Err(EvalError::Invalid("--batch must be at least 1".into()));
    }
    Ok(())
}

/// Checks the options and plugin configs, opens the dataset, loads the
/// reranker (and generator), then [`run_loaded`].
pub fn run(host: &PluginHost, o: &RerankOptions) -> Result<EvalOutput, EvalError> {
    use crate::plugins::registry::Kind;
    use rir_sdk::ConfigOf;
    check(o)?;
    host.load(&o.reranker)?.validate(Kind::Reward, ConfigOf::Reward, &o.reranker_config).map_err(|e| crate::HostError::step("--reranker-config", e))?;
    if let Some(g) = &o.generator {
        host.load(g)?.validate(Kind::Generator, ConfigOf::Generator, &o.generator_config).map_err(|e| crate::HostError::step("--generator-config", e))?;
    }
    // The run file is read before the models load: a bad line costs nothing.
    let first = runfile::read(&o.run)?;
    let ds = o.judging.open(&host.settings.cache_dir)?;
    // A run of another dataset is refused before the models load.
    let lists = top_lists(o, &ds, &first)?;
    let reward = host.load(&o.reranker)?.reward(&o.reranker_config)?;
    let generator = o.generator.as_ref().map(|g| host.load(g)?.generator(&o.generator_config)).transpose()?;
    rerank(host, o, &ds, &lists, reward.as_ref(), generator.as_deref())
}

/// [`run`] with the dataset open and the models loaded (what `rir run`
/// does for a `rerank` variant).
pub fn run_loaded(host: &PluginHost, o: &RerankOptions, ds: &data::Dataset, reward: &dyn Reward, generator: Option<&dyn Generator>) -> Result<EvalOutput, EvalError> {
    check(o)?;
    let first = runfile::read(&o.run)?;
    let lists = top_lists(o, ds, &first)?;
    rerank(host, o, ds, &lists, reward, generator)
}

/// Each query's top `depth` in trec order, every query and document checked
/// against the dataset.
fn top_lists(o: &RerankOptions, ds: &data::Dataset, first: &Run) -> Result<Vec<(String, Vec<(String, f64)>)>, EvalError> {
    let queries: std::collections::HashSet<&str> = ds.queries.iter().map(|(id, _)| id.as_str()).collect();
    let docs: std::collections::HashSet<&str> = ds.corpus.iter().map(|d| d.id.as_str()).collect();
    let unknown_q: Vec<&String> = first.keys().filter(|q| !queries.contains(q.as_str())).collect();
    if let Some(q) = unknown_q.first() {
        return Err(EvalError::Invalid(format!("{}: query {q} is not in {} ({} of the run's {} queries are not)", o.run.display(), ds.name, unknown_q.len(), first.len())));
    }
    let mut lists = Vec::with_capacity(first.len());
    for (qid, results) in first {
        let mut l = results.clone();
        trec_order(&mut l);
        l.truncate(o.depth);
        if let Some((d, _)) = l.iter().find(|(d, _)| !docs.contains(d.as_str())) {
            return Err(EvalError::Invalid(format!("{}: query {qid} ranks document {d}, which is not in {}'s corpus", o.run.display(), ds.name)));
        }
        lists.push((qid.clone(), l));
    }
    Ok(lists)
}

fn rerank(host: &PluginHost, o: &RerankOptions, ds: &data::Dataset, lists: &[(String, Vec<(String, f64)>)], reward: &dyn Reward, generator: Option<&dyn Generator>) -> Result<EvalOutput, EvalError> {
    let t = Instant::now();
    let queries: HashMap<&str, &str> = ds.queries.iter().map(|(id, text)| (id.as_str(), text.as_str())).collect();
    let docs: HashMap<&str, usize> = ds.corpus.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
    let texts: Vec<String> = ds.corpus.iter().map(data::Doc::encoder_text).collect();

    let gname = o.generator.as_deref().unwrap_or_default();
    let gcache = generator.filter(|_| o.use_cache).map(|g| GenerationCache::for_generator(&host.settings.cache_dir, gname, &o.generator_config, g));
    let cached = generator.map(|g| Cached::new(g, gcache.as_ref()));
    let ctx = RewardContext { retriever: None, generator: cached.as_ref().map(|c| c as &dyn Generator) };
    let mut run = Run::new();
    let (mut flat, mut fallbacks) = (0usize, 0u64);
    let bar = crate::util::progress::bar(lists.len(), "rerank", "queries");
    for chunk in lists.chunks(o.batch) {
        let items: Vec<RewardItem> = chunk
            .iter()
            .map(|(qid, l)| RewardItem { query: queries[qid.as_str()].to_owned(), reference: String::new(), candidates: l.iter().map(|(d, _)| texts[docs[d.as_str()]].clone()).collect() })
            .collect();
        let scores = reward.score(&ctx, &items).map_err(|source| crate::HostError::Plugin { plugin: o.reranker.clone(), kind: crate::plugins::registry::Kind::Reward, source })?;
        if scores.len() != items.len() {
            return Err(EvalError::Invalid(format!("reranker {} returned {} score lists for {} queries", o.reranker, scores.len(), items.len())));
        }
        for ((qid, l), s) in chunk.iter().zip(scores) {
            if s.scores.len() != l.len() || s.scores.iter().any(|x| !x.is_finite()) {
                return Err(EvalError::Invalid(format!(
                    "reranker {} gave query {qid} {} scores for {} passages{}",
                    o.reranker,
                    s.scores.len(),
                    l.len(),
                    if s.scores.iter().any(|x| !x.is_finite()) { " (some not finite)" } else { "" }
                )));
            }
            fallbacks += u64::from(s.fallbacks);
            if crate::stages::rlgf::is_flat(&s.scores) {
                // A flat answer is the reward's "could not score": keep the first stage's order.
                flat += 1;
                let n = l.len() as f64;
                run.insert(qid.clone(), l.iter().enumerate().map(|(i, (d, _))| (d.clone(), n - i as f64)).collect());
                continue;
            }
            run.insert(qid.clone(), l.iter().zip(&s.scores).map(|((d, _), x)| (d.clone(), *x)).collect());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    if flat > 0 {
        log::warn!("reranker {}: flat scores for {flat} of {} queries (their first-stage order is kept)", o.reranker, lists.len());
    }
    let timings: BTreeMap<String, f64> = [("rerank".to_owned(), t.elapsed().as_secs_f64())].into_iter().collect();
    let config = json!({
        "rerank": {"run": o.run, "depth": o.depth, "plugin": o.reranker, "config": o.reranker_config,
                   "flat_queries": flat, "fallbacks": fallbacks, "scored": lists.iter().map(|l| l.1.len()).sum::<usize>()},
        "generator": o.generator.as_ref().map(|g| json!({"plugin": g, "config": o.generator_config, "model": generator.map(|m| m.model_name())})),
        "ignore_identical_ids": o.judging.ignore_identical_ids,
        "dataset": {"dir": ds.dir, "docs": ds.corpus.len(), "queries": ds.queries.len()},
        "experiment": o.judging.experiment,
    });
    o.judging.scoring().write(ds, &run, timings, config)
}
