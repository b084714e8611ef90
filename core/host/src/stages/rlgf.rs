//! Stage `rlgf-data` (DESIGN §1.3): distillation data from generator feedback.
//!
//! For each pseudo query: the (tuned) generator's answer at temperature 0;
//! hard negatives mined with the current retriever, or with a text
//! retriever such as BM25 (`miner = "lexical"`) (the first rank whose
//! score is at most `threshold` × the positive's, the next `window` results,
//! the positive dropped, `negatives` kept; ranks `fallback_ranks` sampled
//! when the positive is not in the top `depth` or no rank qualifies); then
//! the Reward plugin (generator-reward) reranks positive + negatives and its
//! order decides: the top passage becomes the positive, the rest follow with
//! teacher scores 1/(i+1). Output: FlagEmbedding's jsonl
//! (`{query, answer, pos, neg, pos_scores, neg_scores}` plus ids) and
//! `rlgf.stats.json`.

use std::collections::HashMap;
use std::path::Path;

use rir_sdk::{GenerationRequest, Reward, RewardContext, RewardItem};
use serde::{Deserialize, Serialize};

use crate::engine::data::Dataset;
use crate::engine::encode::{encode, Side};
use crate::error::HostError;
use crate::engine::generate::generate_all;
use crate::engine::prompts::{augmentation, Task};
use crate::util::files::{write_json, write_jsonl, Rng};
use crate::stages::queries::PseudoQuery;
use crate::stages::{Context, DataStage, GeneratorIn, Needs, RetrieverIn, Stage, TextRetrieverIn};

/// `[stages.rlgf]`: how rlgf-data mines negatives and asks the teacher.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RlgfDataConfig {
    /// Tokens for the generator's answer (temperature 0); 0: no answers.
    #[serde(default = "d_answer")]
    pub answer_max_tokens: u32,
    /// A negative scores at most this fraction of the positive's score.
    #[serde(default = "d_threshold")]
    pub threshold: f32,
    /// Results taken after the first qualifying rank.
    #[serde(default = "d_window")]
    pub window: usize,
    /// Negatives kept per query (group size = negatives + 1).
    #[serde(default = "d_negatives")]
    pub negatives: usize,
    /// The positive must be within this many results, else the fallback.
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// Ranks (0-based, end exclusive) sampled when mining finds nothing.
    #[serde(default = "d_fallback")]
    pub fallback_ranks: (usize, usize),
    /// Seeds the fallback sampling.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Requests per generator call, and items per reward call.
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// Texts per retriever call when mining (corpus and queries).
    #[serde(default = "crate::util::defaults::usize_of::<32>", skip_serializing_if = "crate::util::defaults::is_usize::<32>")]
    pub encode_batch: usize,
    /// Skip the generator's reranking (the retriever's order is kept).
    #[serde(default)]
    pub no_rerank: bool,
    /// Which passage is the positive: the teacher's top pick (`teacher`, the
    /// method as described) or always the passage the query was written
    /// from (`source`: a weak teacher's top pick is often a false positive).
    #[serde(default)]
    pub positive: PositiveChoice,
    /// The teacher scores written: `rank` (1/(i+1) in the teacher's order,
    /// as described) or `raw` (the reward's own scores, e.g. a pointwise
    /// generator's log-probabilities, for a KL loss over their distribution).
    #[serde(default)]
    pub teacher_scores: TeacherScores,
    /// Drop the items whose teacher failed: flat scores (every candidate the
    /// same, which is how the rewards report an unusable answer). Counted in
    /// the stats either way.
    #[serde(default = "d_true")]
    pub drop_failed: bool,
    /// Which first stage mines the negatives: `dense` (the current
    /// retriever, as described) or `lexical` (the experiment's text
    /// retriever, BM25 by default: RocketQA's and DPR's negatives, fewer of
    /// them unlabelled positives than a dense retriever's top ranks).
    #[serde(default, skip_serializing_if = "Miner::is_dense")]
    pub miner: Miner,
    /// The teacher reranks only the first this many queries (0: all); the
    /// others keep the miner's negatives in its order with rank scores
    /// 1/(i+1), as GPL-style items. The queries stage writes queries in a
    /// seeded shuffled order, so the teacher sees a random sample: a CPU run
    /// can train on pseudo queries for the whole corpus and pay the
    /// teacher's scoring (~0.3 queries/s for a 135M model) for a few
    /// hundred. With `teacher_scores = "raw"` the two kinds of item carry
    /// scores on different scales: fine for InfoNCE with a false-negative
    /// margin (it compares within an item), not for `loss = "kl"`. Not
    /// serialized at 0, so stage keys made before it existed still hold.
    #[serde(default, skip_serializing_if = "crate::util::defaults::is_usize::<0>")]
    pub teacher_queries: usize,
}

/// Which first stage mines the hard negatives (`miner`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Miner {
    /// The current dense retriever.
    #[default]
    Dense,
    /// A text retriever (the `text-retriever` kind, BM25 by default).
    Lexical,
}

impl Miner {
    // Left out of the serialised config when dense, so the step hashes of
    // experiments written before the key existed do not change.
    fn is_dense(&self) -> bool {
        *self == Miner::Dense
    }
}

/// Which passage is an example's positive (`positive`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PositiveChoice {
    /// The teacher's top pick (the method as described).
    #[default]
    Teacher,
    /// The passage the query was written from.
    Source,
}

/// The teacher scores written (`teacher_scores`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TeacherScores {
    /// 1/(i+1) in the teacher's order.
    #[default]
    Rank,
    /// The reward's own scores.
    Raw,
}
fn d_true() -> bool {
    true
}
fn d_answer() -> u32 {
    300
}
fn d_threshold() -> f32 {
    0.95
}
fn d_window() -> usize {
    50
}
fn d_negatives() -> usize {
    15
}
fn d_depth() -> usize {
    2000
}
fn d_fallback() -> (usize, usize) {
    (30, 200)
}
fn d_seed() -> u64 {
    42
}
fn d_batch() -> usize {
    8
}

impl RlgfDataConfig {
    /// The same mining without the generator (GPL/InPars-style data): no
    /// answers, no reranking, the source passage as the positive.
    pub fn gpl(&self) -> Self {
        RlgfDataConfig { no_rerank: true, positive: PositiveChoice::Source, answer_max_tokens: 0, ..self.clone() }
    }
}

impl Default for RlgfDataConfig {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// One training example in FlagEmbedding's format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistillExample {
    /// The pseudo query.
    pub query: String,
    /// The generator's answer to it (empty without answers).
    pub answer: String,
    /// The positive passage (one).
    pub pos: Vec<String>,
    /// The negatives, in the teacher's order.
    pub neg: Vec<String>,
    /// The positive's teacher score.
    pub pos_scores: Vec<f64>,
    /// The negatives' teacher scores.
    pub neg_scores: Vec<f64>,
    /// The pseudo query's id.
    pub query_id: String,
    /// The positive's document id.
    pub pos_id: String,
    /// The negatives' document ids.
    pub neg_ids: Vec<String>,
    /// The passage the pseudo query was written from.
    pub source_id: String,
}

/// What rlgf-data did (`rlgf.stats.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RlgfStats {
    /// Pseudo queries read.
    pub queries: usize,
    /// Queries whose negatives came from mining.
    pub mined: usize,
    /// Fallbacks: the positive was not in the top `depth`.
    pub fallback_not_in_depth: usize,
    /// Fallbacks: no rank qualified under the threshold.
    pub fallback_no_rank: usize,
    /// Queries whose top passage after reranking is not the source passage.
    pub positive_changed: usize,
    /// Reranking answers that needed a fallback (the reward's `fallbacks`).
    pub rerank_fallbacks: usize,
    /// Items whose teacher scores were flat (an unusable answer).
    pub teacher_failed: usize,
    /// Items dropped for it (`drop_failed`).
    pub dropped: usize,
    /// Items written to distill.jsonl.
    pub kept: usize,
    /// Answers read from the generation cache.
    pub answers_from_cache: usize,
    /// The first stage that mined the negatives.
    pub miner: Miner,
    /// Items the teacher reranked (`teacher_queries`; 0 with `no_rerank`).
    #[serde(default)]
    pub teacher_scored: usize,
}

/// Why mining fell back to sampled ranks (counted in `RlgfStats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The positive is not in the top `depth`.
    NotInDepth,
    /// No rank scores under `threshold` × the positive's.
    NoRank,
}

/// Hard negatives for one query from its ranked `hits` (doc indices and
/// scores, best first). `Err` names the fallback taken.
pub fn mine(
    hits: &[(usize, f32)],
    positive: usize,
    positive_score: f32,
    cfg: &RlgfDataConfig,
) -> Result<Vec<usize>, Fallback> {
    let depth = hits.len().min(cfg.depth);
    if !hits[..depth].iter().any(|h| h.0 == positive) {
        return Err(Fallback::NotInDepth);
    }
    let limit = cfg.threshold * positive_score;
    let start = hits[..depth].iter().position(|h| h.0 != positive && h.1 <= limit).ok_or(Fallback::NoRank)?;
    let mut out: Vec<usize> = Vec::new();
    for h in hits[start..].iter().take(cfg.window) {
        if h.0 != positive && !out.contains(&h.0) {
            out.push(h.0);
        }
    }
    out.truncate(cfg.negatives);
    if out.is_empty() {
        return Err(Fallback::NoRank);
    }
    Ok(out)
}

/// Whether a reward's scores for one item are flat (every candidate the
/// same, within 1e-12): how the rewards report an answer they could not use.
pub fn is_flat(scores: &[f64]) -> bool {
    scores.len() > 1 && scores.iter().all(|x| (x - scores[0]).abs() <= 1e-12)
}

/// The fallback: `n` distinct documents sampled from the ranks in `range`.
pub fn sample_ranks(hits: &[(usize, f32)], positive: usize, range: (usize, usize), n: usize, rng: &mut Rng) -> Vec<usize> {
    let (a, b) = (range.0.min(hits.len()), range.1.min(hits.len()));
    let mut pool: Vec<usize> = hits[a..b].iter().map(|h| h.0).filter(|d| *d != positive).collect();
    if pool.len() < n {
        // A small corpus: widen to every rank.
        pool = hits.iter().map(|h| h.0).filter(|d| *d != positive).collect();
    }
    rng.shuffle(&mut pool);
    pool.truncate(n);
    pool
}

/// Stage rlgf-data: answers from the generator, negatives mined with the
/// retriever, the group reranked (scored) by the generator's reward; writes
/// distill.jsonl (FlagEmbedding's format) and rlgf.stats.json. With
/// `no_rerank` and `answer_max_tokens = 0` neither the generator nor the
/// reward is called and the context need not hold them (GPL-style data).
pub struct RlgfData;

impl DataStage for RlgfData {
    const STAGE: Stage = Stage::RlgfData;
    const ABOUT: &'static str = "Stage `rlgf-data`: answers, hard negatives, generator reranking -> FlagEmbedding-style distillation data";
    const NEEDS: Needs = Needs {
        queries: true,
        generator: "The (tuned) generator: answers and reranking",
        retriever: Some("The current retriever: hard-negative mining"),
        reward: Some(("generator-reward", "Reward plugin (generator feedback)")),
        text_retriever: Some(("bm25", "Text retriever that mines the negatives with `miner = \"lexical\"`")),
    };
    const OUTPUTS: &'static [&'static str] = &["distill.jsonl", "rlgf.stats.json"];
    type Config = RlgfDataConfig;
    type Output = Vec<DistillExample>;
    type Stats = RlgfStats;

    fn run(ctx: &Context<'_>, cfg: &RlgfDataConfig, out: &Path) -> Result<(Vec<DistillExample>, RlgfStats), HostError> {
        // The generator and the reward only when they are called, asked
        // for before any work.
        let r = ctx.retriever(Stage::RlgfData)?;
        let g = if cfg.answer_max_tokens > 0 || !cfg.no_rerank { Some(ctx.generator(Stage::RlgfData)?) } else { None };
        let w = if cfg.no_rerank { None } else { Some(ctx.reward(Stage::RlgfData)?) };
        let lex = if cfg.miner == Miner::Lexical { Some(ctx.text_retriever(Stage::RlgfData)?) } else { None };
        run(ctx.dataset, ctx.task, ctx.queries, g, r, lex, w, cfg, ctx.threads, out)
    }

    fn wants_text_retriever(cfg: &RlgfDataConfig) -> bool {
        cfg.miner == Miner::Lexical
    }

    fn summary(s: &RlgfStats) -> String {
        format!(
            "{} queries: negatives mined for {} ({} fell back: positive beyond depth; {} fell back: no rank under the threshold); the teacher reranked {} and moved the positive in {}; {} reranking answers needed a fallback",
            s.queries, s.mined, s.fallback_not_in_depth, s.fallback_no_rank, s.teacher_scored, s.positive_changed, s.rerank_fallbacks
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    ds: &Dataset,
    task: &Task,
    queries: &[PseudoQuery],
    generator: Option<GeneratorIn<'_>>,
    retriever: RetrieverIn<'_>,
    lexical: Option<TextRetrieverIn<'_>>,
    reward: Option<&dyn Reward>,
    cfg: &RlgfDataConfig,
    threads: usize,
    out_dir: &Path,
) -> Result<(Vec<DistillExample>, RlgfStats), HostError> {
    let (ecache, retriever) = (retriever.cache, retriever.model);
    // Checked by `RlgfData::run` before any work: present when called.
    let missing = || HostError::Input("rlgf-data: the generator or reward it calls is missing".into());
    let by_id: HashMap<&str, usize> = ds.corpus.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();
    let sources: Vec<usize> = queries
        .iter()
        .map(|q| {
            by_id.get(q.passage_id.as_str()).copied().ok_or_else(|| {
                HostError::Input(format!("rlgf-data: query {} names passage {} which is not in {}", q.id, q.passage_id, ds.name))
            })
        })
        .collect::<Result<_, _>>()?;
    let input = |e: String| HostError::Input(format!("rlgf-data: {e}"));

    // Answers (temperature 0), as inference would augment the query; none
    // with answer_max_tokens = 0 (training data without generator output).
    let (answers, answers_from_cache) = if cfg.answer_max_tokens == 0 {
        (vec![String::new(); queries.len()], 0)
    } else {
        let reqs: Vec<GenerationRequest> =
            queries.iter().map(|q| GenerationRequest::greedy(augmentation(task, &q.text), cfg.answer_max_tokens)).collect();
        let g = generator.ok_or_else(missing)?;
        let (answers, from_cache) = generate_all(g.model, &reqs, g.cache, cfg.batch, "answers").map_err(|e| HostError::step("rlgf-data", e))?;
        (answers.iter().map(|c| c.first().map(|c| c.text.trim().to_owned()).unwrap_or_default()).collect(), from_cache)
    };

    // Mining with the current retriever, or the text retriever.
    let texts: Vec<String> = ds.corpus.iter().map(|d| d.encoder_text()).collect();
    let qtexts: Vec<String> = queries.iter().map(|q| q.text.clone()).collect();
    let k = cfg.depth.max(cfg.fallback_ranks.1).min(ds.corpus.len());
    let (hits, pos_scores): (rir_sdk::Hits, Vec<Option<f32>>) = match lexical {
        None => {
            let (ec, _) = encode(retriever, Side::Corpus, &texts, ecache, cfg.encode_batch.max(1), "corpus").map_err(|e| HostError::step("rlgf-data", e))?;
            let (eq, _) = encode(retriever, Side::Query(None), &qtexts, ecache, cfg.encode_batch.max(1), "queries").map_err(|e| HostError::step("rlgf-data", e))?;
            let hits = crate::engine::search::exact_topk(&eq, &ec, k, threads);
            let pos = sources.iter().enumerate().map(|(qi, &src)| Some(eq.row(qi).iter().zip(ec.row(src)).map(|(a, b)| a * b).sum())).collect();
            (hits, pos)
        }
        Some(t) => {
            if t.model.len() != ds.corpus.len() {
                return Err(input(format!("the text retriever's index holds {} documents, the corpus {}", t.model.len(), ds.corpus.len())));
            }
            let hits = crate::engine::lexical::search(t.plugin, t.model, &qtexts, k, cfg.encode_batch.max(1))?;
            // A text retriever scores only the documents it returns: the
            // positive's score is its score in the list (absent: beyond depth).
            let pos = sources
                .iter()
                .enumerate()
                .map(|(qi, &src)| (0..hits.k).find(|&j| hits.ids[qi * hits.k + j] == src as i64).map(|j| hits.scores[qi * hits.k + j]))
                .collect();
            (hits, pos)
        }
    };
    let mut rng = Rng(cfg.seed);
    let mut stats = RlgfStats { queries: queries.len(), answers_from_cache, miner: cfg.miner, ..Default::default() };
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(queries.len());
    for (qi, &src) in sources.iter().enumerate() {
        let row: Vec<(usize, f32)> = (0..hits.k)
            .filter_map(|j| {
                let id = hits.ids[qi * hits.k + j];
                (id >= 0).then(|| (id as usize, hits.scores[qi * hits.k + j]))
            })
            .collect();
        let mined = match pos_scores[qi] {
            Some(pos_score) => mine(&row, src, pos_score, cfg),
            None => Err(Fallback::NotInDepth),
        };
        let negs = match mined {
            Ok(n) => {
                stats.mined += 1;
                n
            }
            Err(why) => {
                match why {
                    Fallback::NotInDepth => stats.fallback_not_in_depth += 1,
                    Fallback::NoRank => stats.fallback_no_rank += 1,
                }
                sample_ranks(&row, src, cfg.fallback_ranks, cfg.negatives, &mut rng)
            }
        };
        let mut g = vec![src];
        g.extend(negs);
        groups.push(g);
    }

    // Generator feedback: the reward's order over positive + negatives.
    let items: Vec<RewardItem> = queries
        .iter()
        .zip(&groups)
        .map(|(q, g)| RewardItem { query: q.text.clone(), reference: String::new(), candidates: g.iter().map(|&d| texts[d].clone()).collect() })
        .collect();
    let rank_scores = |g: &Vec<usize>| (0..g.len()).map(|i| 1.0 / (i as f64 + 1.0)).collect::<Vec<f64>>();
    let taught = if cfg.no_rerank { 0 } else if cfg.teacher_queries > 0 { cfg.teacher_queries.min(items.len()) } else { items.len() };
    stats.teacher_scored = taught;
    let mut scores: Vec<Vec<f64>> = Vec::with_capacity(items.len());
    if taught > 0 {
        // The teacher's calls go through the stage's generation cache.
        let g = generator.ok_or_else(missing)?;
        let reward = reward.ok_or_else(missing)?;
        let cached = crate::engine::generate::Cached::new(g.model, g.cache);
        let ctx = RewardContext { retriever: Some(retriever), generator: Some(&cached) };
        let bar = crate::util::progress::bar(taught, "rerank", "queries");
        for chunk in items[..taught].chunks(cfg.batch.max(1)) {
            let s = reward.score(&ctx, chunk).map_err(|e| HostError::step("rlgf-data: reward", e))?;
            if s.len() != chunk.len() {
                return Err(input(format!("the reward returned {} scores for {} items", s.len(), chunk.len())));
            }
            for r in s {
                stats.rerank_fallbacks += r.fallbacks as usize;
                scores.push(r.scores);
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
    }
    scores.extend(groups[taught..].iter().map(rank_scores));

    let mut out = Vec::with_capacity(queries.len());
    for (qi, q) in queries.iter().enumerate() {
        let g = &groups[qi];
        let s = &scores[qi];
        let flat = is_flat(s);
        if flat && qi < taught {
            stats.teacher_failed += 1;
            if cfg.drop_failed {
                stats.dropped += 1;
                continue;
            }
        }
        // A stable sort: ties keep the retriever's order.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        if g[order[0]] != sources[qi] {
            stats.positive_changed += 1;
            if cfg.positive == PositiveChoice::Source {
                // The source passage (index 0 of the group) leads; the rest keep the teacher's order.
                order.retain(|&i| i != 0);
                order.insert(0, 0);
            }
        }
        let teacher: Vec<f64> = match cfg.teacher_scores {
            TeacherScores::Rank => (0..order.len()).map(|i| 1.0 / (i as f64 + 1.0)).collect(),
            TeacherScores::Raw => order.iter().map(|&i| s[i]).collect(),
        };
        out.push(DistillExample {
            query: q.text.clone(),
            answer: answers[qi].clone(),
            pos: vec![texts[g[order[0]]].clone()],
            neg: order[1..].iter().map(|&i| texts[g[i]].clone()).collect(),
            pos_scores: vec![teacher[0]],
            neg_scores: teacher[1..].to_vec(),
            query_id: q.id.clone(),
            pos_id: ds.corpus[g[order[0]]].id.clone(),
            neg_ids: order[1..].iter().map(|&i| ds.corpus[g[i]].id.clone()).collect(),
            source_id: q.passage_id.clone(),
        });
    }
    stats.kept = out.len();
    write_json(&out_dir.join("rlgf.stats.json"), &stats)?;
    if out.is_empty() {
        return Err(input(format!(
            "every one of {} items was dropped: the teacher failed on all of them ({})",
            queries.len(),
            out_dir.join("rlgf.stats.json").display()
        )));
    }
    write_jsonl(&out_dir.join("distill.jsonl"), &out)?;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(negatives: usize, window: usize) -> RlgfDataConfig {
        RlgfDataConfig { negatives, window, depth: 100, ..Default::default() }
    }

    #[test]
    fn mining_follows_the_threshold_rule() {
        // Positive 7 scores 1.0; 3 and 5 are too close (> 0.95), 9 is the first below.
        let hits = vec![(3, 0.99), (7, 1.0), (5, 0.96), (9, 0.95), (2, 0.9), (9, 0.8), (4, 0.7)];
        assert_eq!(mine(&hits, 7, 1.0, &cfg(15, 50)), Ok(vec![9, 2, 4]));
        assert_eq!(mine(&hits, 7, 1.0, &cfg(2, 50)), Ok(vec![9, 2]));
        // The window counts results, duplicates included.
        assert_eq!(mine(&hits, 7, 1.0, &cfg(15, 3)), Ok(vec![9, 2]));
        assert_eq!(mine(&hits, 8, 1.0, &cfg(15, 50)), Err(Fallback::NotInDepth));
        assert_eq!(mine(&[(7, 1.0), (3, 0.99)], 7, 1.0, &cfg(15, 50)), Err(Fallback::NoRank));
    }

    #[test]
    fn fallback_samples_the_rank_range_without_the_positive() {
        let hits: Vec<(usize, f32)> = (0..300).map(|i| (i, 1.0 - i as f32 / 300.0)).collect();
        let mut rng = Rng(1);
        let s = sample_ranks(&hits, 40, (30, 200), 15, &mut rng);
        assert_eq!(s.len(), 15);
        assert!(s.iter().all(|d| (30..200).contains(d) && *d != 40));
        let mut u = s.clone();
        u.sort();
        u.dedup();
        assert_eq!(u.len(), 15);
    }
}
