//! `rir._rir`: the native half of rir's Python package, a thin layer over
//! the host library (`rir::model`, `rir::engine::metrics`, `rir::experiment`).
//! What users call (argument names of the original Reinforced-IR code, numpy
//! arrays, pandas) is in `rir/__init__.py`; this module takes plain values.
//!
//! Every long call releases the GIL; errors become `rir.RirError` carrying
//! the one-line message `rir` prints; progress bars go to Python's
//! `sys.stderr` (so notebooks show them).

use std::path::{Path, PathBuf};

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use rir::engine::{data, metrics, runfile};
use rir::{HostError, PluginHost};

pyo3::create_exception!(rir, RirError, PyException, "An error from rir, with the one-line message the `rir` command prints.");

/// Any host-side error as `RirError`, with the CLI's one-line message.
fn py_err(e: impl std::error::Error + 'static) -> PyErr {
    RirError::new_err(rir::error::one_line(&e))
}

fn input_err(msg: impl Into<String>) -> PyErr {
    py_err(HostError::Input(msg.into()))
}

/// A config given as JSON (a Python dict) written as the TOML table a plugin reads.
fn toml_of(what: &str, json: &str) -> PyResult<String> {
    let table: toml::Table = serde_json::from_str(json).map_err(|e| input_err(format!("{what}: {e}")))?;
    toml::to_string(&table).map_err(|e| input_err(format!("{what}: {e}")))
}

/// Embeddings as little-endian f32 bytes (numpy reads them without a copy).
fn matrix<'py>(py: Python<'py>, e: &rir_sdk::Embeddings) -> (Bound<'py, PyByteArray>, usize, usize) {
    let mut bytes = Vec::with_capacity(e.data.len() * 4);
    for v in &e.data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    (PyByteArray::new(py, &bytes), e.rows, e.dim)
}

/// A loaded retriever and optional generator (`rir::model::ReinforcedIr`).
#[pyclass(module = "rir._rir", frozen)]
struct Model {
    model: rir::model::ReinforcedIr,
    // The plugins' libraries stay loaded while their objects live.
    _host: PluginHost,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (retriever, retriever_config, generator=None, generator_config=None, *, query_instruction=None,
        query_weight=0.8, augmentation_max_tokens=300, temperature=0.0, chat=true, batch=256, generation_batch=8,
        cache=true, registry=None, plugin_dirs=Vec::new(), threads=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        retriever: String,
        retriever_config: String,
        generator: Option<String>,
        generator_config: Option<String>,
        query_instruction: Option<String>,
        query_weight: f64,
        augmentation_max_tokens: u32,
        temperature: f32,
        chat: bool,
        batch: usize,
        generation_batch: usize,
        cache: bool,
        registry: Option<PathBuf>,
        plugin_dirs: Vec<PathBuf>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let rcfg = toml_of("retriever_config", &retriever_config)?;
        let gcfg = generator_config.as_deref().map(|g| toml_of("generator_config", g)).transpose()?;
        if batch == 0 || generation_batch == 0 {
            return Err(input_err("batch_size and generation_batch must be at least 1"));
        }
        let h = PluginHost::discover(registry, &plugin_dirs, threads).map_err(py_err)?;
        let loaded = py.detach(|| {
            let g = generator.as_deref().zip(gcfg.as_deref());
            rir::model::ReinforcedIr::load(&h, (&retriever, &rcfg), g)
        });
        let mut model = loaded.map_err(py_err)?;
        if !cache {
            model = model.without_caches();
        }
        model.query_instruction = query_instruction;
        model.query_weight = query_weight;
        model.augmentation_max_tokens = augmentation_max_tokens;
        model.temperature = temperature;
        model.chat = chat;
        model.batch = batch;
        model.generation_batch = generation_batch;
        Ok(Model { model, _host: h })
    }

    /// (bytes, rows, dim, augmentations or None)
    fn encode_queries<'py>(
        &self,
        py: Python<'py>,
        task_instruction: String,
        answer_type: String,
        queries: Vec<String>,
    ) -> PyResult<(Bound<'py, PyByteArray>, usize, usize, Option<Vec<String>>)> {
        let out = py.detach(|| self.model.encode_queries(&task_instruction, &answer_type, &queries)).map_err(py_err)?;
        let (b, r, d) = matrix(py, &out.embeddings);
        Ok((b, r, d, out.augmentations))
    }

    /// (bytes, rows, dim)
    fn encode_corpus<'py>(&self, py: Python<'py>, corpus: Vec<String>) -> PyResult<(Bound<'py, PyByteArray>, usize, usize)> {
        let e = py.detach(|| self.model.encode_corpus(&corpus)).map_err(py_err)?;
        Ok(matrix(py, &e))
    }

    /// The retriever's info and the generator's model name.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let i = self.model.retriever().info();
        d.set_item("retriever_model", i.model)?;
        d.set_item("dim", i.dim)?;
        d.set_item("corpus_fingerprint", i.corpus_fingerprint.clone().unwrap_or_else(|| i.fingerprint.clone()))?;
        d.set_item("fingerprint", i.fingerprint)?;
        d.set_item("max_length", i.max_length)?;
        d.set_item("normalized", i.normalized)?;
        d.set_item("generator_model", self.model.generator().map(|g| g.model_name()))?;
        Ok(d)
    }
}

type PyQrels = std::collections::BTreeMap<String, std::collections::BTreeMap<String, i32>>;
type PyRun = std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>;
type PerQuery = std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>;

/// trec_eval's numbers for `run` against `qrels`: (means by measure, per query by measure).
#[pyfunction]
#[pyo3(signature = (qrels, run, measures, averaging="run", ignore_identical_ids=true))]
fn evaluate(
    py: Python<'_>,
    qrels: PyQrels,
    run: PyRun,
    measures: &str,
    averaging: &str,
    ignore_identical_ids: bool,
) -> PyResult<(std::collections::BTreeMap<String, f64>, PerQuery)> {
    let measures = metrics::parse_measures(measures).map_err(|e| input_err(format!("measures: {e}")))?;
    let averaging: metrics::Averaging = averaging.parse().map_err(|e: String| input_err(format!("averaging: {e}")))?;
    let run: metrics::Run = run.into_iter().map(|(q, docs)| (q, docs.into_iter().collect())).collect();
    for (q, docs) in &run {
        if let Some((d, s)) = docs.iter().find(|(_, s)| !s.is_finite()) {
            return Err(input_err(format!("run: query {q}, document {d}: score {s} is not finite")));
        }
    }
    let ev = py.detach(|| metrics::evaluate(&qrels, &run, &measures, averaging, ignore_identical_ids));
    let name = |m: &metrics::Measure| m.to_string();
    let aggregate = ev.aggregate.iter().map(|(m, v)| (name(m), *v)).collect();
    let per_query = ev.per_query.iter().map(|(q, ms)| (q.clone(), ms.iter().map(|(m, v)| (name(m), *v)).collect())).collect();
    Ok((aggregate, per_query))
}

/// A TREC run file as {qid: {docid: score}}.
#[pyfunction]
fn load_run(path: PathBuf) -> PyResult<PyRun> {
    let run = runfile::read(&path).map_err(py_err)?;
    Ok(run.into_iter().map(|(q, docs)| (q, docs.into_iter().collect())).collect())
}

/// Writes {qid: {docid: score}} as a TREC run file (trec_eval's order, ranks from 1).
#[pyfunction]
#[pyo3(signature = (run, path, tag="rir"))]
fn save_run(run: PyRun, path: PathBuf, tag: &str) -> PyResult<()> {
    let run: metrics::Run = run.into_iter().map(|(q, docs)| (q, docs.into_iter().collect())).collect();
    runfile::write(&path, &run, tag).map_err(py_err)
}

/// qrels as {qid: {docid: grade}} from a qrels file (BEIR TSV or TREC), or a
/// dataset's split (a BEIR name, fetched from `mirror` when not cached, or a
/// BEIR folder).
#[pyfunction]
#[pyo3(signature = (source, split=None, mirror=None))]
fn load_qrels(py: Python<'_>, source: String, split: Option<String>, mirror: Option<PathBuf>) -> PyResult<PyQrels> {
    let p = Path::new(&source);
    if p.is_file() {
        return data::read_qrels_file(p).map_err(py_err);
    }
    let cache = rir::plugins::default_cache_dir();
    let ds = py.detach(|| data::open(&source, split.as_deref(), &cache, mirror.as_deref())).map_err(py_err)?;
    Ok(ds.qrels)
}

/// `rir run`: (the comparison table as printed or None, OUTPUT/NAME, results files).
#[pyfunction]
#[pyo3(signature = (path=None, text=None, *, output=PathBuf::from("runs"), mirror=None, dry_run=false, cache=true,
    only=None, from_stage=None, registry=None, plugin_dirs=Vec::new(), threads=None))]
#[allow(clippy::too_many_arguments)]
fn run(
    py: Python<'_>,
    path: Option<PathBuf>,
    text: Option<String>,
    output: PathBuf,
    mirror: Option<PathBuf>,
    dry_run: bool,
    cache: bool,
    only: Option<String>,
    from_stage: Option<String>,
    registry: Option<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<(Option<String>, PathBuf, Vec<PathBuf>)> {
    use rir::experiment;
    let mut exp = match (path, text) {
        (Some(p), None) => experiment::load(&p),
        (None, Some(t)) => experiment::parse(&t, Path::new("<string>")),
        (None, None) => experiment::quickstart(),
        (Some(_), Some(_)) => return Err(input_err("give an experiment's path or its text, not both")),
    }
    .map_err(py_err)?;
    if mirror.is_some() {
        exp.mirror = mirror;
    }
    let stage = |s: Option<String>, what: &str| {
        s.map(|s| s.parse::<experiment::Stage>()).transpose().map_err(|e| input_err(format!("{what}: {e}")))
    };
    let opts = experiment::RunOptions { output, dry_run, only: stage(only, "only")?, from: stage(from_stage, "from_stage")?, use_cache: cache };
    let h = PluginHost::discover(registry, &plugin_dirs, threads).map_err(py_err)?;
    let out = py.detach(|| experiment::run(&h, &exp, &opts)).map_err(py_err)?;
    if let Some(e) = out.missing_error(&exp) {
        return Err(py_err(e));
    }
    Ok((out.table, out.root, out.results))
}

/// Sends rir's progress bars to `write` (a callable taking one str), once per process.
#[pyfunction]
fn _set_progress_writer(write: Py<PyAny>) -> bool {
    rir::util::progress::set_writer(Box::new(move |s: &str| {
        Python::attach(|py| {
            // A failing writer (a closed stream) costs the bar, not the work.
            let _ = write.call1(py, (s,));
        });
    }))
}

/// rir's logs (warnings by default; RUST_LOG as for `rir`) to the process's stderr, secrets redacted.
#[pyfunction]
#[pyo3(signature = (level="warn"))]
fn _init_logging(level: &str) {
    rir::util::logging::init(level);
}

/// rir's native module (see the `rir` package for the documented API).
#[pymodule]
fn _rir(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RirError", m.py().get_type::<RirError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ABI_VERSION", rir_sdk::ffi::ABI_VERSION)?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(load_run, m)?)?;
    m.add_function(wrap_pyfunction!(save_run, m)?)?;
    m.add_function(wrap_pyfunction!(load_qrels, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(_set_progress_writer, m)?)?;
    m.add_function(wrap_pyfunction!(_init_logging, m)?)?;
    Ok(())
}
