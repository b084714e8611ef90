//! `rir encode` on one's own texts, as the seed's README shows it: MiniLM
//! (and SmolLM2 augmenting the queries), its two queries and two documents,
//! the 2×2 similarity; files that numpy loads; the augmentation mix checked
//! against the parts encoded separately.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

const QUERIES: &str = "how much protein should a female eat\nsummit define\n";
const DOCS: &str = r#"{"_id": "protein", "text": "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon."}
{"_id": "summit", "title": "Summit", "text": "Definition of summit for English Language Learners. : 1 the highest point of a mountain : the top of a mountain. : 2 the highest level. : 3 a meeting or series of meetings between the leaders of two or more governments."}
"#;

fn rir(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    plugin_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(["--threads", "2"])
        .args(args)
        .current_dir(root())
        .env_remove("RIR_REGISTRY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// A numpy expression over the files in `dir`, printed by Python.
fn numpy(dir: &std::path::Path, expr: &str) -> String {
    let code = format!("import numpy as np, json, os\nos.chdir({:?})\nprint({expr})", dir.display().to_string());
    let out = Command::new(python()).args(["-c", &code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn own_texts_are_encoded_written_for_numpy_and_compared() {
    let dir = tempfile::tempdir().unwrap();
    let (q, d) = (dir.path().join("q.txt"), dir.path().join("d.jsonl"));
    std::fs::write(&q, QUERIES).unwrap();
    std::fs::write(&d, DOCS).unwrap();
    let plain = dir.path().join("plain");
    let (ok, out, err) = rir(&["encode", "--queries", q.to_str().unwrap(), "--docs", d.to_str().unwrap(), "--similarity", "--output", plain.to_str().unwrap(), "--no-cache"], None);
    assert!(ok, "{err}");
    // The matrix: each query's own document scores far above the other.
    let rows: Vec<Vec<f32>> = out
        .lines()
        .filter(|l| l.starts_with("│ 1 ") || l.starts_with("│ 2 "))
        .map(|l| l.split('┆').skip(1).map(|c| c.trim_matches(|c: char| c == '│' || c.is_whitespace()).parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0][0] > rows[0][1] + 0.5 && rows[1][1] > rows[1][0] + 0.5, "{out}");
    assert!(out.contains("protein") && out.contains("summit"), "{out}");
    // numpy reads what was written, and it is what was printed.
    assert_eq!(numpy(&plain, "np.load('queries.npy').shape, np.load('docs.npy').dtype"), "(2, 384) float32");
    let m = numpy(&plain, "' '.join(f'{v:.4f}' for v in (np.load('queries.npy') @ np.load('docs.npy').T).ravel())");
    let printed: Vec<String> = rows.iter().flatten().map(|v| format!("{v:.4}")).collect();
    assert_eq!(m, printed.join(" "));
    assert_eq!(numpy(&plain, "[json.loads(l)['_id'] for l in open('docs.jsonl')]"), "['protein', 'summit']");
    assert_eq!(numpy(&plain, "np.allclose([json.loads(l)['embedding'] for l in open('queries.jsonl')], np.load('queries.npy'))"), "True");

    // With SmolLM2 augmenting the queries (read from stdin this time).
    let aug = dir.path().join("aug");
    let gcfg = format!("model = {SMOLLM:?}");
    let (ok, _, err) = rir(
        &["encode", "--queries", "-", "--generator", "llama-generator", "--generator-config", &gcfg, "--task-instruction",
          "Given a web search query, retrieve relevant passages that answer the query.", "--answer-type", "passage",
          "--augmentation-max-tokens", "32", "--output", aug.to_str().unwrap(), "--no-cache"],
        Some(QUERIES),
    );
    assert!(ok, "{err}");
    let augs: Vec<String> = std::fs::read_to_string(aug.join("queries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["augmentation"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(augs.len(), 2);
    assert!(augs.iter().all(|a| !a.is_empty()), "{augs:?}");
    // The mix: 0.8·e(query) + 0.2·e_corpus(prefix + augmentation).
    let parts = dir.path().join("parts");
    let prefixed: String = augs.iter().map(|a| format!("{}\n", serde_json::json!({"text": format!("{}{a}", rir::engine::prompts::AUGMENTATION_PREFIX)}))).collect();
    let (ok, _, err) = rir(&["encode", "--docs", "-", "--output", parts.to_str().unwrap(), "--no-cache"], Some(&prefixed));
    assert!(ok, "{err}");
    let check = "np.abs(np.load('aug/queries.npy') - (0.8 * np.load('plain/queries.npy') + 0.2 * np.load('parts/docs.npy'))).max() < 1e-5";
    assert_eq!(numpy(dir.path(), check), "True");
}

#[test]
fn bad_input_is_refused_before_any_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"_id\": \"a\", \"text\": \"fine\"}\n{\"_id\": \"b\"}\n").unwrap();
    let out = dir.path().join("out");
    for (args, want) in [
        (vec!["encode", "--docs", bad.to_str().unwrap(), "--output", out.to_str().unwrap()], "bad.jsonl:2:"),
        (vec!["encode", "--queries", "-", "--docs", "-", "--similarity"], "cannot both read stdin"),
        (vec!["encode", "--queries", bad.to_str().unwrap(), "--similarity"], "--similarity needs both"),
        (vec!["encode", "--output", out.to_str().unwrap()], "nothing to encode"),
        (vec!["encode", "--queries", bad.to_str().unwrap()], "nothing to do"),
    ] {
        let (ok, _, err) = rir(&args, None);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    assert!(!out.exists(), "nothing is written on bad input");
}
