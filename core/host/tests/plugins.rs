//! Loading real plugin libraries through the stable ABI.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use common::*;
use rir::{HostError, Kind, Status};
use rir_sdk::{
    Embeddings, GenerationRequest, Message, PluginError, Progress, ProgressSink, Prompt, Retriever, RewardContext, RewardItem,
    TrainJob, NoProgress,
};

#[test]
fn two_retrievers_side_by_side_each_answer_for_themselves() {
    plugin_dir();
    let host = host();
    let hash = host.load("example-hash").unwrap().retriever("dim = 64").unwrap();
    let probe = host.load("probe").unwrap().retriever("").unwrap();
    let docs = texts(&["protein folding kinetics", "tax law"]);

    let a = hash.encode_corpus(&docs).unwrap();
    let b = probe.encode_corpus(&docs).unwrap();
    assert_eq!((a.rows, a.dim), (2, 64));
    assert_eq!(b, Embeddings::new(2, 2, vec![24.0, 1.0, 7.0, 1.0]).unwrap());
    // The loaded example library computes exactly what the crate does in-process.
    let local = rir_plugin_example_hash::HashRetriever::new("dim = 64").unwrap();
    assert_eq!(a, local.encode_corpus(&docs).unwrap());
    assert_eq!(hash.info().fingerprint, "example-hash/v1/dim=64/max=512");
    assert_eq!(probe.info().model, "probe");
    // Loading again returns the same library, not a fresh copy.
    assert!(std::sync::Arc::ptr_eq(&host.load("probe").unwrap(), &host.load("probe").unwrap()));
}

#[test]
fn a_panic_in_a_plugin_is_an_error_and_the_host_carries_on() {
    plugin_dir();
    let host = host();
    let probe = host.load("probe").unwrap().retriever("").unwrap();
    let err = probe.encode_corpus(&texts(&["fine", "panic"])).unwrap_err();
    match &err {
        PluginError::Panic(m) => {
            assert!(m.contains("probe was asked to panic"), "{m}");
            assert!(m.contains("probe/src/lib.rs:"), "panic location missing: {m}");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    // Same object, second call: works.
    assert_eq!(probe.encode_corpus(&texts(&["abc"])).unwrap().data, vec![3.0, 1.0]);
    // An ordinary error keeps its kind.
    assert!(matches!(probe.encode_corpus(&texts(&["error"])), Err(PluginError::Input(_))));
    // A panicking constructor is an error too, and names the plugin.
    let e = host.load("probe").unwrap().retriever("panic_on_new = true").err().unwrap();
    assert!(matches!(&e, HostError::Plugin { source: PluginError::Panic(_), .. }), "{e}");
    assert!(e.to_string().starts_with("plugin 'probe' (retriever): plugin panicked: constructor asked to panic"), "{e}");
}

#[test]
fn a_text_retriever_crosses_the_boundary_and_its_failures_stay_errors() {
    plugin_dir();
    let host = host();
    let p = host.load("probe").unwrap();
    let mut r = p.text_retriever("").unwrap();
    let docs = texts(&["red fish", "blue fish", "red red"]);
    let cache = temp_cache();
    // Built once, then opened from the cache by a fresh object.
    assert!(!rir::engine::lexical::open_or_build("probe", r.as_mut(), &docs, Some(cache.path())).unwrap());
    let mut again = p.text_retriever("").unwrap();
    assert!(rir::engine::lexical::open_or_build("probe", again.as_mut(), &docs, Some(cache.path())).unwrap());
    let h = rir::engine::lexical::search("probe", again.as_ref(), &texts(&["red", "fish blue"]), 2, 1).unwrap();
    assert_eq!(h.ids, vec![2, 0, 1, 0]);
    assert_eq!(h.scores, vec![2.0, 1.0, 2.0, 1.0]);
    match r.search(&texts(&["panic"]), 1) {
        Err(PluginError::Panic(m)) => assert!(m.contains("asked to panic"), "{m}"),
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert!(matches!(r.search(&texts(&["error"]), 1), Err(PluginError::Input(_))));
    // An id past the corpus is the plugin's error, caught before the host indexes with it.
    let e = rir::engine::lexical::search("probe", r.as_ref(), &texts(&["bad-id"]), 1, 8).unwrap_err().to_string();
    assert!(e.contains("plugin 'probe' (text-retriever)") && e.contains("document 3, the index holds 3"), "{e}");
    // The same object still answers.
    assert_eq!(r.search(&texts(&["blue"]), 1).unwrap().ids, vec![1]);
}

#[test]
fn config_errors_name_the_key() {
    plugin_dir();
    let e = host().load("example-hash").unwrap().retriever("dimm = 3").err().unwrap().to_string();
    assert!(e.contains("example-hash") && e.contains("dimm") && e.contains("invalid config"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn generator_reward_trainer_and_index_cross_the_boundary() {
    plugin_dir();
    let host = host();
    let p = host.load("probe").unwrap();

    let g = p.generator("").unwrap();
    assert_eq!(g.model_name(), "probe-echo");
    let mut req = GenerationRequest::greedy(Prompt::Chat(vec![Message::system("s"), Message::user("hello")]), 8);
    req.n = 3;
    req.stop = vec!["\n".into()];
    let out = g.generate(&[req, GenerationRequest::greedy(Prompt::Text("raw".into()), 4)]).unwrap();
    assert_eq!(out[0].iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), ["hello #0", "hello #1", "hello #2"]);
    assert_eq!(out[1][0].text, "raw #0");

    // The reward runs in the probe library and calls back into the
    // example-hash library through the handle the host passes it.
    let reward = p.reward("").unwrap();
    let hash = host.load("example-hash").unwrap().retriever("dim = 128").unwrap();
    let items = vec![RewardItem {
        query: "protein folding".into(),
        reference: String::new(),
        candidates: texts(&["protein folding in cells", "stock markets"]),
    }];
    let ctx = RewardContext { retriever: Some(hash.as_ref()), generator: None };
    let s = reward.score(&ctx, &items).unwrap();
    assert_eq!(s[0].scores.len(), 2);
    assert!(s[0].scores[0] > s[0].scores[1] + 0.2, "{:?}", s[0].scores);
    let e = reward.score(&RewardContext::default(), &items).unwrap_err();
    assert!(e.to_string().contains("needs a retriever"), "{e}");

    // Trainer: files in, files out, progress back to the host, cancellation.
    struct Sink(Mutex<Vec<Progress>>, AtomicBool);
    impl ProgressSink for Sink {
        fn report(&self, p: &Progress) {
            self.0.lock().unwrap().push(p.clone());
        }
        fn cancelled(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let job = TrainJob {
        base_model: "base".into(),
        data_file: dir.path().join("data.jsonl"),
        output_dir: dir.path().join("out"),
        params: String::new(),
        passage_vectors: None,
    };
    let sink = Sink(Mutex::new(vec![]), AtomicBool::new(false));
    let report = p.trainer("steps = 3").unwrap().train(&job, &sink).unwrap();
    assert_eq!(report.steps, 3);
    assert_eq!(report.loss, vec![1.0, 0.5, 1.0 / 3.0]);
    assert_eq!(std::fs::read_to_string(job.output_dir.join("model.txt")).unwrap(), "trained from base");
    assert_eq!(report.extra_json, r#"{"passage_vectors":null}"#);
    let given = TrainJob { passage_vectors: Some(dir.path().join("v.safetensors")), ..job.clone() };
    let r = p.trainer("steps = 1").unwrap().train(&given, &NoProgress).unwrap();
    let seen: serde_json::Value = serde_json::from_str(&r.extra_json).unwrap();
    assert_eq!(seen["passage_vectors"].as_str(), Some(dir.path().join("v.safetensors").to_str().unwrap()));
    let seen = sink.0.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|p| p.done).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(seen[2].loss, Some(1.0 / 3.0));
    sink.1.store(true, Ordering::SeqCst);
    assert_eq!(p.trainer("steps = 3").unwrap().train(&job, &sink).unwrap_err(), PluginError::Cancelled);

    // A host progress sink that panics does not take the plugin or host down.
    struct Bad(AtomicUsize);
    impl ProgressSink for Bad {
        fn report(&self, _: &Progress) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("sink broke");
        }
    }
    let bad = Bad(AtomicUsize::new(0));
    assert!(p.trainer("steps = 2").unwrap().train(&job, &bad).is_ok());
    assert_eq!(bad.0.load(Ordering::SeqCst), 2);

    // Index: add, search, save, load.
    let mut idx = p.index("", 2).unwrap();
    idx.add(&Embeddings::new(3, 2, vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7]).unwrap()).unwrap();
    assert_eq!(idx.len(), 3);
    let hits = idx.search(&Embeddings::new(1, 2, vec![1.0, 0.1]).unwrap(), 2).unwrap();
    assert_eq!(hits.ids, vec![0, 2]);
    let f = dir.path().join("flat.idx");
    idx.save(&f).unwrap();
    let mut again = p.index("", 2).unwrap();
    again.load(&f).unwrap();
    assert_eq!(again.search(&Embeddings::new(1, 2, vec![1.0, 0.1]).unwrap(), 2).unwrap(), hits);
    let e = idx.add(&Embeddings::new(1, 3, vec![0.0; 3]).unwrap()).unwrap_err();
    assert!(matches!(e, PluginError::Input(_)), "{e}");
}

#[test]
fn asking_for_a_kind_the_plugin_lacks_is_refused_before_calling_it() {
    plugin_dir();
    let e = host().load("example-hash").unwrap().generator("").err().unwrap();
    assert!(matches!(e, HostError::KindNotProvided { kind: Kind::Generator, .. }));
    assert_eq!(e.to_string(), "plugin 'example-hash' does not provide a generator (it provides retriever, text-retriever)");
}

#[test]
fn registry_that_claims_a_kind_the_library_lacks_is_a_mismatch() {
    let lib = lib_path("rir-plugin-example-hash");
    let (_d, host) = host_from(&format!(
        "[plugins.liar]\nkinds = [\"retriever\", \"trainer\"]\nlibrary = {:?}\n",
        lib.display().to_string()
    ));
    let host = host.unwrap();
    let (status, _, err) = host.status("liar");
    assert!(matches!(status, Status::Mismatch(_)));
    assert_eq!(
        err.unwrap().to_string(),
        "plugin 'liar': registry lists kind 'trainer' but the library provides only retriever, text-retriever"
    );
}

#[test]
fn sha256_pins_are_enforced() {
    let lib = lib_path("rir-plugin-example-hash");
    let good = rir::plugins::sha256_file(&lib).unwrap();
    let bad = "0".repeat(64);
    let text = format!(
        "[plugins.good]\nkinds = [\"retriever\"]\nlibrary = {l:?}\nsha256 = \"{good}\"\n\n\
         [plugins.bad]\nkinds = [\"retriever\"]\nlibrary = {l:?}\nsha256 = \"{bad}\"\n",
        l = lib.display().to_string()
    );
    let (_d, host) = host_from(&text);
    let host = host.unwrap();
    assert_eq!(host.status("good").0, Status::PinnedOk);
    let (status, _, err) = host.status("bad");
    assert!(matches!(status, Status::Mismatch(_)));
    let msg = err.unwrap().to_string();
    assert_eq!(
        msg,
        format!("plugin 'bad': sha256 mismatch for {}: expected {bad}, found {good}", lib.display())
    );
}

#[test]
fn a_missing_library_says_where_it_looked_and_how_to_build_it() {
    let (_d, host) = host_from("[plugins.ghost]\nkinds = [\"retriever\"]\ncrate = \"rir-plugin-ghost\"\n");
    let host = host.unwrap();
    let (status, _, err) = host.status("ghost");
    assert_eq!(status, Status::Missing);
    let msg = err.unwrap().to_string();
    assert!(msg.starts_with("plugin 'ghost': library not found (tried "), "{msg}");
    assert!(msg.contains("librir_plugin_ghost.so") || msg.contains("rir_plugin_ghost"), "{msg}");
    assert!(msg.ends_with("build it with `cargo build --release --workspace`"), "{msg}");
}

#[test]
fn an_explicit_library_that_is_missing_or_no_plugin_says_so() {
    let (_d, host) = host_from("[plugins.ghost]\nkinds = [\"retriever\"]\nlibrary = \"/no/such/libghost.so\"\n");
    let msg = host.unwrap().status("ghost").2.unwrap().to_string();
    assert!(msg.contains("registry.toml names this library explicitly") && !msg.contains("build it with `the"), "{msg}");
    // A real shared library that is no rir plugin (the C library's libm).
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"].into_iter().find(|p| std::path::Path::new(p).exists());
    if let Some(libm) = libm {
        let (_d, host) = host_from(&format!("[plugins.m]\nkinds = [\"retriever\"]\nlibrary = {libm:?}\n"));
        let msg = host.unwrap().status("m").2.unwrap().to_string();
        assert!(msg.contains("not an rir plugin") && !msg.contains('\0') && !msg.contains("Could load"), "{msg}");
    }
}

#[test]
fn malformed_registry_errors_name_file_line_and_column() {
    let (d, host) = host_from("[plugins.a]\nkinds = [\"retriever\"\ncrate = \"x\"\n");
    let msg = host.err().unwrap().to_string();
    let file = d.path().join("registry.toml").display().to_string();
    assert!(msg.starts_with(&format!("{file}:3:")), "{msg}");

    let (_d, host) = host_from("[plugins.a]\nkinds = [\"retriever\"]\ncrate = \"x\"\nsha265 = \"ab\"\n");
    let msg = host.err().unwrap().to_string();
    assert!(msg.contains(":4:1: unknown field `sha265`"), "{msg}");

    let (_d, host) = host_from("[plugins.a]\nkinds = [\"retreiver\"]\ncrate = \"x\"\n");
    let msg = host.err().unwrap().to_string();
    assert!(msg.contains(":2:") && msg.contains("retreiver"), "{msg}");

    let (_d, host) = host_from("[plugin.a]\nkinds = []\n");
    let msg = host.err().unwrap().to_string();
    assert!(msg.contains(":1:2: unknown field `plugin`"), "{msg}");

    let (_d, host) = host_from("\n[plugins.a]\nkinds = [\"index\"]\n");
    assert!(host.err().unwrap().to_string().contains(":2:1: plugin 'a' needs `crate` or `library`"));

    let missing = std::path::Path::new("/no/such/registry.toml");
    let msg = rir::Registry::load(missing).unwrap_err().to_string();
    assert!(msg.starts_with("cannot read /no/such/registry.toml: "), "{msg}");

    let (_d, host) = host_from("[plugins.a]\nkinds = [\"index\"]\ncrate = \"x\"\nsha256 = \"abc\"\n");
    assert!(host.err().unwrap().to_string().ends_with("plugin 'a': sha256 must be 64 hex digits"));
}

#[test]
fn unknown_plugin_names_suggest_the_nearest() {
    let e = host().load("exmple-hash").unwrap_err().to_string();
    assert!(e.ends_with("did you mean 'example-hash'?"), "{e}");
}
