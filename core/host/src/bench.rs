//! `rir bench encode`: encoder throughput against this machine's fp32 GEMM
//! peak, measured in the same run.

use std::time::Instant;

use rir_models::encoder::TextBatcher;
use serde::Serialize;

use crate::plugins::PluginHost;

/// Best-of-`reps` fp32 GEMM rate for n×n×n with `threads` threads, using the
/// same GEMM crate candle's CPU backend uses.
#[derive(Debug, Clone, Serialize)]
pub struct GemmPeak {
    pub n: usize,
    pub threads: usize,
    pub gflops: f64,
}

pub fn gemm_peak(n: usize, threads: usize, reps: usize) -> GemmPeak {
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32) * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 89) as f32) * 0.01).collect();
    let mut c = vec![0f32; n * n];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool");
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut best = f64::INFINITY;
    pool.install(|| {
        for _ in 0..reps.max(1) + 1 {
            let t = Instant::now();
            // SAFETY: row-major n×n buffers of the right sizes.
            unsafe {
                gemm::gemm(
                    n, n, n,
                    c.as_mut_ptr(), 1, n as isize, false,
                    a.as_ptr(), 1, n as isize,
                    b.as_ptr(), 1, n as isize,
                    0.0, 1.0, false, false, false, par,
                );
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
    });
    std::hint::black_box(&c);
    GemmPeak { n, threads, gflops: 2.0 * (n as f64).powi(3) / best / 1e9 }
}

/// BERT shape, from config.json, for counting FLOPs.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct BertShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
}

impl BertShape {
    /// Forward FLOPs for one sequence of `l` tokens (multiply-adds × 2):
    /// Q, K, V and output projections, the two FFN matrices, and attention's
    /// two L×L products. Embedding lookups, norms and softmax are left out.
    pub fn flops(&self, l: usize) -> f64 {
        let (h, i, l) = (self.hidden_size as f64, self.intermediate_size as f64, l as f64);
        let per_layer = 2.0 * l * (4.0 * h * h + 2.0 * h * i) + 2.0 * 2.0 * l * l * h;
        per_layer * self.num_hidden_layers as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EncodeBench {
    pub plugin: String,
    pub config: String,
    pub docs: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub docs_per_s: f64,
    pub tokens_per_s: f64,
    pub gflop: f64,
    pub gflops: f64,
    pub percent_of_peak: f64,
}

/// Encodes `texts` once (after a short warm-up) and reports throughput. The
/// model directory and tokenizer come from the config's `model` / `tokenizer`
/// keys, to count real (unpadded) tokens and FLOPs.
pub fn bench_encode(
    host: &PluginHost,
    plugin: &str,
    config: &str,
    texts: &[String],
    peak: &GemmPeak,
) -> anyhow::Result<EncodeBench> {
    let table: toml::Table = config.parse()?;
    let cache = &host.settings.cache_dir;
    let source = table.get("tokenizer").or_else(|| table.get("model")).and_then(|v| v.as_str());
    let source = source.ok_or_else(|| anyhow::anyhow!("the retriever config needs a `model` key to count FLOPs"))?;
    let dir = rir_models::resolve(source, cache)?;
    let dir = if dir.is_dir() { dir } else { dir.parent().map(|p| p.to_owned()).unwrap_or_default() };
    let shape: BertShape = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;

    let retriever = host.load(plugin)?.retriever(config)?;
    let max_length = retriever.info().max_length;
    let batcher = TextBatcher::load(&dir, max_length)?;
    let lengths: Vec<usize> = batcher.batches(texts, 1)?.iter().map(|b| b.tokens).collect();
    let tokens: usize = lengths.iter().sum();
    let gflop = lengths.iter().map(|&l| shape.flops(l)).sum::<f64>() / 1e9;

    retriever.encode_corpus(&texts[..texts.len().min(8)])?; // warm-up: page in weights, build kernels
    let t = Instant::now();
    let e = retriever.encode_corpus(texts)?;
    let seconds = t.elapsed().as_secs_f64();
    anyhow::ensure!(e.rows == texts.len(), "encoder returned {} rows for {} texts", e.rows, texts.len());
    let gflops = gflop / seconds;
    Ok(EncodeBench {
        plugin: plugin.into(),
        config: config.into(),
        docs: texts.len(),
        tokens,
        seconds,
        docs_per_s: texts.len() as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        gflop,
        gflops,
        percent_of_peak: 100.0 * gflops / peak.gflops,
    })
}
