//! faiss behind rir's `Index` interface: any index factory string
//! (`Flat`, `HNSW32,Flat`, `IVF256,Flat`, `IVF256,PQ32`, ...) over inner
//! product, with save and load through faiss's own file format.

use std::path::Path;
use std::sync::Mutex;

use faiss::{index::IndexImpl, Index as _, MetricType};
use rir_sdk::{config, Embeddings, Hits, Index, PluginError, PluginResult};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaissConfig {
    /// faiss index factory string.
    pub factory: String,
    /// HNSW: search-time beam width (efSearch); 0 keeps faiss's default.
    pub ef_search: usize,
    /// IVF: lists probed at search time; 0 keeps faiss's default (1).
    pub nprobe: usize,
}

impl Default for FaissConfig {
    fn default() -> Self {
        Self { factory: "Flat".into(), ef_search: 0, nprobe: 0 }
    }
}

pub struct FaissIndex {
    cfg: FaissConfig,
    dim: usize,
    // faiss-rs wants `&mut` for search although faiss does not modify the index.
    index: Mutex<IndexImpl>,
}

fn ferr(what: &str, e: faiss::error::Error) -> PluginError {
    PluginError::other(format!("faiss {what}: {e}"))
}

impl FaissIndex {
    pub fn new(config_toml: &str, dim: usize) -> PluginResult<Self> {
        let cfg: FaissConfig = config::parse(config_toml)?;
        if dim == 0 {
            return Err(PluginError::input("dimension must be at least 1"));
        }
        let index = faiss::index_factory(dim as u32, &cfg.factory, MetricType::InnerProduct)
            .map_err(|e| PluginError::config(format!("factory {:?}: {e}", cfg.factory)))?;
        let mut me = Self { cfg, dim, index: Mutex::new(index) };
        me.apply_search_params()?;
        Ok(me)
    }

    /// Search-time knobs, set through faiss's ParameterSpace. A knob the index
    /// type does not have (efSearch on an IVF index) is a config error.
    fn apply_search_params(&mut self) -> PluginResult<()> {
        let knobs = [("efSearch", self.cfg.ef_search, "ef_search"), ("nprobe", self.cfg.nprobe, "nprobe")];
        for (name, value, key) in knobs {
            if value == 0 {
                continue;
            }
            let ps = faiss::index::autotune::ParameterSpace::new().map_err(|e| ferr("ParameterSpace", e))?;
            let index = self.index.get_mut().expect("index lock");
            ps.set_index_parameter(index, name, value as f64).map_err(|e| {
                PluginError::config(format!("{key} = {value} does not apply to index {:?}: {e}", self.cfg.factory))
            })?;
        }
        Ok(())
    }

    fn check_dim(&self, e: &Embeddings) -> PluginResult<()> {
        if e.dim != self.dim {
            return Err(PluginError::input(format!("index has dimension {}, vectors have {}", self.dim, e.dim)));
        }
        Ok(())
    }
}

impl Index for FaissIndex {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.index.lock().expect("index lock").ntotal() as usize
    }
    fn add(&mut self, v: &Embeddings) -> PluginResult<()> {
        self.check_dim(v)?;
        let index = self.index.get_mut().expect("index lock");
        if !index.is_trained() {
            // IVF/PQ indexes learn their codebooks from the first vectors added.
            index.train(&v.data).map_err(|e| ferr("train", e))?;
        }
        index.add(&v.data).map_err(|e| ferr("add", e))
    }
    fn search(&self, q: &Embeddings, k: usize) -> PluginResult<Hits> {
        self.check_dim(q)?;
        let r = self.index.lock().expect("index lock").search(&q.data, k).map_err(|e| ferr("search", e))?;
        let ids = r.labels.iter().map(|l| l.get().map_or(-1, |v| v as i64)).collect();
        let scores = r.distances.iter().map(|&d| if d.is_finite() { d } else { f32::NEG_INFINITY }).collect();
        Ok(Hits { queries: q.rows, k, ids, scores })
    }
    fn save(&self, path: &Path) -> PluginResult<()> {
        faiss::write_index(&*self.index.lock().expect("index lock"), path.to_string_lossy().as_ref()).map_err(|e| ferr("write", e))
    }
    fn load(&mut self, path: &Path) -> PluginResult<()> {
        let index = faiss::read_index(path.to_string_lossy().as_ref()).map_err(|e| ferr("read", e))?;
        if index.d() as usize != self.dim {
            return Err(PluginError::input(format!(
                "{} holds a {}-dimensional index, expected {}",
                path.display(),
                index.d(),
                self.dim
            )));
        }
        self.index = Mutex::new(index);
        self.apply_search_params()
    }
}

rir_sdk::export_plugin! {
    name: "faiss",
    description: "faiss index (static build): Flat, HNSW, IVF, PQ via factory strings",
    index: FaissIndex::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Index => config::check::<FaissConfig>(text),
        _ => Ok(()),
    },
}
