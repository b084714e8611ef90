//! Serving engines rir starts itself (`[serve]` in an experiment): the
//! generator's model behind llama.cpp's server, vLLM, or any command,
//! reached through the openai-generator. An engine is started for the step
//! that needs it on that step's model (the base, or round r's tuned one),
//! waited for on its health endpoint, and stopped when the step ends or
//! fails (dropping the handle): no orphan process. Its output goes to a log
//! file in the run directory, whose tail an error quotes.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::HostError;

/// Which engine serves the model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Engine {
    /// llama.cpp's `llama-server` (on PATH): serves a GGUF.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// `vllm serve`: serves an HF directory (or a GGUF).
    #[serde(rename = "vllm")]
    Vllm,
    /// `command`, a command line with `{model}`, `{port}`, `{host}`.
    #[serde(rename = "command")]
    Command,
    /// `rir serve` with the llama-generator on the model (this build's
    /// `rir`: beside the running binary, else on PATH).
    #[serde(rename = "rir")]
    Rir,
}

impl Engine {
    /// Its name in `[serve] engine`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::LlamaCpp => "llama.cpp",
            Engine::Vllm => "vllm",
            Engine::Command => "command",
            Engine::Rir => "rir",
        }
    }
}

/// `[serve]`: how the experiment's generator is served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    /// `llama.cpp`, `vllm`, `rir` or `command`.
    pub engine: Engine,
    /// For `engine = "command"`: the command line. Split at whitespace
    /// before the placeholders are filled, so a path with spaces stays one
    /// argument; no shell is involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Extra arguments appended to the engine's command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// The address the engine listens on (loopback unless you say so).
    #[serde(default = "loopback")]
    pub host: String,
    /// Its port; 0 (the default): a free one, picked per start.
    #[serde(default)]
    pub port: u16,
    /// Seconds to wait for the health endpoint to answer 200.
    #[serde(default = "d_timeout")]
    pub start_timeout: f64,
    /// The health endpoint's path (llama.cpp and vLLM: `/health`).
    #[serde(default = "d_health")]
    pub health: String,
}
fn loopback() -> String {
    "127.0.0.1".into()
}
fn d_timeout() -> f64 {
    300.0
}
fn d_health() -> String {
    "/health".into()
}

impl ServeSpec {
    /// Checks what can be checked before any work: the command, the host,
    /// the timeout. Errors name the key.
    pub fn check(&self) -> Result<(), String> {
        match (self.engine, &self.command) {
            (Engine::Command, None) => return Err("engine = \"command\" needs `command` (with {model} and {port})".into()),
            (Engine::Command, Some(c)) if !c.contains("{model}") || !c.contains("{port}") => {
                return Err(format!("command: {c:?} must contain {{model}} and {{port}}"));
            }
            (Engine::LlamaCpp | Engine::Vllm | Engine::Rir, Some(_)) => return Err("command: only with engine = \"command\"".into()),
            _ => {}
        }
        if self.host.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("host: {:?} is not an IP address", self.host));
        }
        if !(self.start_timeout.is_finite() && self.start_timeout > 0.0) {
            return Err(format!("start_timeout: must be a positive number of seconds, got {}", self.start_timeout));
        }
        if !self.health.starts_with('/') {
            return Err(format!("health: {:?} must be a path starting with /", self.health));
        }
        Ok(())
    }

    /// The engine's program is there (on PATH, or at the path given): what
    /// a dry run checks before any work.
    pub fn check_program(&self) -> Result<(), String> {
        let argv = self.argv(Path::new("MODEL"), 1);
        let prog = argv.first().map(String::as_str).unwrap_or_default();
        let found = if prog.contains('/') {
            Path::new(prog).is_file()
        } else {
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        };
        match (found, self.engine) {
            (true, _) => Ok(()),
            (false, Engine::LlamaCpp) => Err(format!("`{prog}` (llama.cpp's server) is not on PATH: install llama.cpp, or use engine = \"command\"")),
            (false, Engine::Vllm) => Err(format!("`{prog}` is not on PATH: pip install vllm (a GPU machine)")),
            (false, Engine::Command | Engine::Rir) => Err(format!("`{prog}` is not found (neither a file nor on PATH)")),
        }
    }

    /// The argument vector for `model` on `port`.
    fn argv(&self, model: &Path, port: u16) -> Vec<String> {
        if self.engine == Engine::Rir {
            // Built, not split: the generator's config is TOML with spaces.
            let config = format!("model = {:?}", model.display().to_string());
            let fixed = [rir_program(), "serve".into(), "--generator".into(), "llama-generator".into(), "--generator-config".into(), config];
            let net = ["--host".into(), self.host.clone(), "--port".into(), port.to_string()];
            return fixed.into_iter().chain(net).chain(self.args.iter().cloned()).collect();
        }
        let template = match self.engine {
            Engine::LlamaCpp => "llama-server --model {model} --host {host} --port {port}",
            Engine::Vllm => "vllm serve {model} --host {host} --port {port}",
            Engine::Command | Engine::Rir => self.command.as_deref().unwrap_or_default(),
        };
        let fill = |w: &str| w.replace("{model}", &model.display().to_string()).replace("{port}", &port.to_string()).replace("{host}", &self.host);
        template.split_whitespace().map(fill).chain(self.args.iter().cloned()).collect()
    }

    /// What the engine is given as `{model}`: a directory that holds one
    /// GGUF and no HF model (a `merge_format = "gguf-…"` DPO output) is
    /// replaced by the file, as the llama-generator reads it; an HF
    /// directory stays a directory (what vLLM serves), and llama.cpp, which
    /// serves only GGUF files, refuses it here with what to do.
    pub fn model_arg(&self, model: &Path) -> Result<PathBuf, HostError> {
        if model.is_file() {
            return Ok(model.to_owned());
        }
        let hf = model.join("config.json").is_file();
        let ggufs = rir_models::files_with_extension(model, "gguf").unwrap_or_default();
        match (hf, ggufs.as_slice(), self.engine) {
            (false, [one], _) => Ok(one.clone()),
            (false, [_, _, ..], _) => Err(HostError::Input(format!("{}: more than one .gguf; name the file", model.display()))),
            (_, _, Engine::LlamaCpp) => Err(HostError::Input(format!(
                "{}: llama.cpp serves a GGUF, and this is an HF directory (train with merge_format = \"gguf-q8_0\", or serve with vllm)",
                model.display()
            ))),
            _ => Ok(model.to_owned()),
        }
    }
}

/// A running engine; dropping it stops the process.
pub struct ServedEngine {
    child: Option<Child>,
    /// `http://HOST:PORT` (the OpenAI API is under `/v1`).
    pub base: String,
    /// Where its output goes.
    pub log: PathBuf,
    /// Where this start's output begins in the log (a retried step appends).
    log_from: u64,
}

impl ServedEngine {
    /// Starts the engine on `model` (as [`ServeSpec::model_arg`] gives it)
    /// and waits until its health endpoint answers 200. A port that is taken, an engine that cannot start or
    /// that exits, and the timeout are errors that quote the log's tail.
    pub fn start(spec: &ServeSpec, model: &Path, log: &Path) -> Result<Self, HostError> {
        let port = match spec.port {
            0 => free_port(&spec.host)?,
            p => {
                // Refused before starting: an engine that cannot bind may
                // keep running or report it only in its log.
                std::net::TcpListener::bind((spec.host.as_str(), p)).map_err(|e| {
                    HostError::Input(format!("[serve] port {p} on {} cannot be used ({e}); leave `port` out for a free one", spec.host))
                })?;
                p
            }
        };
        let argv = spec.argv(model, port);
        let io = |e: std::io::Error| HostError::Io { path: log.to_owned(), source: e };
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io)?;
        let start_at = out.seek(SeekFrom::End(0)).map_err(io)?;
        std::io::Write::write_all(&mut out, format!("== {} {}\n", jiff::Timestamp::now().round(jiff::Unit::Second).map(|t| t.to_string()).unwrap_or_default(), argv.join(" ")).as_bytes()).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new(&argv[0]);
        // stdin stays open while the engine should run: servers that stop
        // when it closes (the tests' llama.cpp wrapper) stop with rir.
        cmd.args(&argv[1..]).stdin(Stdio::piped()).stdout(out).stderr(err);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // The engine dies with the thread that started it, even when
            // rir is killed outright (SIGKILL runs no destructor).
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| HostError::Input(format!("[serve] cannot start `{}`: {e} (is it installed and on PATH?)", argv[0])))?;
        let mut engine = ServedEngine { child: Some(child), base: format!("http://{}:{port}", url_host(&spec.host)), log: log.to_owned(), log_from: start_at };
        log::info!("serving {} at {} (log: {})", model.display(), engine.base, log.display());
        let deadline = Instant::now() + Duration::from_secs_f64(spec.start_timeout);
        let health = format!("{}{}", engine.base, spec.health);
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).http_status_as_error(false).build().into();
        loop {
            if let Some(status) = engine.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let tail = log_tail(log, engine.log_from);
                engine.child = None;
                return Err(HostError::Input(format!("[serve] `{}` exited ({status}) before it was ready; its log ({}):\n{tail}", argv[0], log.display())));
            }
            if agent.get(&health).call().is_ok_and(|r| r.status() == 200) {
                return Ok(engine);
            }
            if Instant::now() >= deadline {
                let tail = log_tail(log, engine.log_from);
                return Err(HostError::Input(format!(
                    "[serve] {health} did not answer 200 within {} s (start_timeout); the engine's log ({}):\n{tail}",
                    spec.start_timeout,
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// When the engine has exited (it died mid-step): its status and the
    /// tail of its log, for the step's error.
    pub fn exit_note(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(format!("the serving engine exited ({status}) during the step; its log ({}):\n{}", self.log.display(), log_tail(&self.log, self.log_from)))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the engine: its stdin closed, SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        drop(child.stdin.take());
        #[cfg(unix)]
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServedEngine {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `rir` binary of this build: the running one, one beside it (or
/// beside the test binary's directory), else `rir` on PATH.
fn rir_program() -> String {
    let exe = std::env::current_exe().ok();
    if let Some(e) = &exe {
        if e.file_stem().is_some_and(|s| s == "rir") {
            return e.display().to_string();
        }
        for dir in e.ancestors().skip(1).take(2) {
            if dir.join("rir").is_file() {
                return dir.join("rir").display().to_string();
            }
        }
    }
    "rir".into()
}

/// A port nobody listens on now (the engine binds it a moment later).
fn free_port(host: &str) -> Result<u16, HostError> {
    std::net::TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HostError::Input(format!("[serve] no free port on {host}: {e}")))
}

/// An IPv6 address in a URL is bracketed.
fn url_host(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_owned() }
}

/// The last 20 lines the engine wrote since `from`.
fn log_tail(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(engine: Engine, command: Option<&str>) -> ServeSpec {
        let mut s: ServeSpec = toml::from_str("engine = \"command\"").unwrap();
        s.engine = engine;
        s.command = command.map(str::to_owned);
        s
    }

    #[test]
    fn command_lines_are_filled_per_argument_and_checked() {
        let s = spec(Engine::Command, Some("python3 serve.py {model} --port {port} --host {host}"));
        assert!(s.check().is_ok());
        assert_eq!(s.argv(Path::new("/m/a b.gguf"), 8080), ["python3", "serve.py", "/m/a b.gguf", "--port", "8080", "--host", "127.0.0.1"]);
        let l = ServeSpec { args: vec!["--ctx-size".into(), "4096".into()], ..spec(Engine::LlamaCpp, None) };
        assert_eq!(l.argv(Path::new("m.gguf"), 1).join(" "), "llama-server --model m.gguf --host 127.0.0.1 --port 1 --ctx-size 4096");
        assert!(spec(Engine::Command, None).check().unwrap_err().contains("needs `command`"));
        assert!(spec(Engine::Command, Some("serve {model}")).check().unwrap_err().contains("{port}"));
        assert!(spec(Engine::Vllm, Some("x {model} {port}")).check().unwrap_err().contains("only with"));
        assert!(ServeSpec { host: "localhost:1".into(), ..spec(Engine::Vllm, None) }.check().unwrap_err().contains("host"));
        assert!(toml::from_str::<ServeSpec>("engine = \"llama.cpp\"\nprot = 1").unwrap_err().to_string().contains("prot"));
    }
}
