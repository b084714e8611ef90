//! The faiss plugin against the built-in exact search on a real embedding
//! matrix (SciFact documents and queries, feature-hashing encoder).

mod common;

use common::*;
use rir::engine::data;
use rir::engine::search::{exact_topk, recall_against};
use rir_sdk::{Embeddings, Hits, Retriever};

fn scifact_embeddings() -> (Embeddings, Embeddings) {
    let cache = temp_cache();
    let ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let r = rir_plugin_example_hash::HashRetriever::new("dim = 384").unwrap();
    let docs: Vec<String> = ds.corpus.iter().map(data::Doc::encoder_text).collect();
    let qs: Vec<String> = ds.queries.iter().map(|q| q.1.clone()).collect();
    (r.encode_queries(&qs, None).unwrap(), r.encode_corpus(&docs).unwrap())
}

fn faiss_search(factory: &str, extra: &str, q: &Embeddings, c: &Embeddings, k: usize) -> Hits {
    let host = host();
    let mut idx = host.load("faiss").unwrap().index(&format!("factory = {factory:?}\n{extra}"), c.dim).unwrap();
    idx.add(c).unwrap();
    assert_eq!(idx.len(), c.rows);
    idx.search(q, k).unwrap()
}

#[test]
fn faiss_flat_returns_the_exact_top_100() {
    plugin_dir();
    let (q, c) = scifact_embeddings();
    let exact = exact_topk(&q, &c, 100, 2);
    let flat = faiss_search("Flat", "", &q, &c, 100);
    for i in 0..q.rows {
        let (e_ids, f_ids) = (&exact.ids[i * 100..(i + 1) * 100], &flat.ids[i * 100..(i + 1) * 100]);
        let (e_s, f_s) = (&exact.scores[i * 100..(i + 1) * 100], &flat.scores[i * 100..(i + 1) * 100]);
        for (a, b) in e_s.iter().zip(f_s) {
            assert!((a - b).abs() < 1e-4, "query {i}: scores {a} vs {b}");
        }
        // Same ids, except that faiss may order (or cut) exact ties differently.
        let cut = e_s[99];
        let strict = |ids: &[i64], s: &[f32]| {
            let mut v: Vec<i64> = ids.iter().zip(s).filter(|(_, s)| **s > cut + 1e-4).map(|(i, _)| *i).collect();
            v.sort();
            v
        };
        assert_eq!(strict(e_ids, e_s), strict(f_ids, f_s), "query {i}");
    }
}

#[test]
fn approximate_indexes_report_recall_and_round_trip_through_files() {
    plugin_dir();
    let (q, c) = scifact_embeddings();
    let exact = exact_topk(&q, &c, 10, 2);
    let hnsw = faiss_search("HNSW32,Flat", "ef_search = 128", &q, &c, 10);
    let r_hnsw = recall_against(&exact, &hnsw, 10);
    let ivf = faiss_search("IVF64,Flat", "nprobe = 8", &q, &c, 10);
    let r_ivf = recall_against(&exact, &ivf, 10);
    eprintln!("SciFact (5,183 docs, 384-d hashing vectors): recall@10 vs exact: HNSW32 efSearch=128 {r_hnsw:.4}, IVF64 nprobe=8 {r_ivf:.4}");
    assert!(r_hnsw > 0.9, "{r_hnsw}");
    assert!(r_ivf > 0.4, "{r_ivf}");

    // save / load
    let host = host();
    let p = host.load("faiss").unwrap();
    let mut idx = p.index("factory = \"HNSW32,Flat\"", c.dim).unwrap();
    idx.add(&c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("scifact.faiss");
    idx.save(&f).unwrap();
    let mut back = p.index("factory = \"HNSW32,Flat\"", c.dim).unwrap();
    back.load(&f).unwrap();
    assert_eq!(back.len(), c.rows);
    assert_eq!(back.search(&q, 10).unwrap(), idx.search(&q, 10).unwrap());

    // A dimension mismatch on load, and knobs that do not fit the index type.
    let mut wrong = p.index("", 8).unwrap();
    assert!(wrong.load(&f).unwrap_err().to_string().contains("384-dimensional index, expected 8"));
    let e = p.index("factory = \"IVF16,Flat\"\nef_search = 10", 8).err().unwrap().to_string();
    assert!(e.contains("ef_search = 10 does not apply"), "{e}");
    let e = p.index("factory = \"NoSuchIndex\"", 8).err().unwrap().to_string();
    assert!(e.contains("factory \"NoSuchIndex\""), "{e}");
}
