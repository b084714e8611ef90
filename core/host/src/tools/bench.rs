//! `rir bench encode`: encoder throughput against this machine's fp32 GEMM
//! peak, measured in the same run. `rir bench generate`: decoding beside
//! llama.cpp. `rir bench lexical`: a text retriever's indexing and search.

use std::time::Instant;

use rir_models::encoder::TextBatcher;
use serde::Serialize;

use crate::plugins::PluginHost;

/// Best-of-`reps` fp32 GEMM rate for n×n×n with `threads` threads, using the
/// same GEMM crate candle's CPU backend uses.
#[derive(Debug, Clone, Serialize)]
pub struct GemmPeak {
    /// The matrix size.
    pub n: usize,
    /// Threads used.
    pub threads: usize,
    /// The best rate, GFLOP/s.
    pub gflops: f64,
}

/// Measures [`GemmPeak`]: the machine's fp32 GEMM ceiling, against which
/// encoding throughput is reported as a share.
pub fn gemm_peak(n: usize, threads: usize, reps: usize) -> GemmPeak {
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32) * 0.01).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 89) as f32) * 0.01).collect();
    let gflops = pool(threads).install(|| f32_gemm_gflops(&a, &b, (n, n, n), threads, reps));
    GemmPeak { n, threads, gflops }
}

/// A pool of `threads` for a timed product.
fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build().expect("thread pool")
}

/// GFLOP/s of `f`, a product of `flops`, best of `reps` after a warm-up run.
fn best_gflops(flops: f64, reps: usize, f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) + 1 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

/// GFLOP/s of the `gemm` crate's f32 GEMM `x·b` (candle's CPU matmul) for
/// x (m, k) and b (k, n) row-major, on the current pool; best of `reps`.
fn f32_gemm_gflops(x: &[f32], b: &[f32], (m, n, k): (usize, usize, usize), threads: usize, reps: usize) -> f64 {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut y = vec![0f32; m * n];
    let g = best_gflops(2.0 * (m * n * k) as f64, reps, &mut || {
        // SAFETY: row-major buffers of the sizes given.
        unsafe {
            gemm::gemm(
                m, n, k,
                y.as_mut_ptr(), 1, n as isize, false,
                x.as_ptr(), 1, k as isize,
                b.as_ptr(), 1, n as isize,
                0.0, 1.0, false, false, false, par,
            );
        }
    });
    std::hint::black_box(&y);
    g
}

/// One row of `rir bench gemm`: `y = x·Wᵀ` for x (m, k) and W (n, k).
#[derive(Debug, Clone, Serialize)]
pub struct GemmRow {
    /// Rows of x.
    pub m: usize,
    /// Outputs (rows of W).
    pub n: usize,
    /// Inputs (the shared dimension).
    pub k: usize,
    /// The `gemm` crate in f32 (candle's CPU matmul, `prefill = "dense"`), GFLOP/s.
    pub f32_gflops: f64,
    /// `rir_models::bf16` (W packed once, outside the timing), GFLOP/s;
    /// None where it does not run (`rir_models::bf16::unavailable`).
    pub bf16_gflops: Option<f64>,
}

/// Times both GEMMs on one shape, best of `reps` after a warm-up, on a
/// pool of `threads`.
pub fn gemm_shape(m: usize, n: usize, k: usize, threads: usize, reps: usize) -> GemmRow {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32) * 0.01 - 0.48).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32) * 0.01 - 0.44).collect();
    // (k, n) for the f32 GEMM, as `dense` keeps its copies.
    let mut wt = vec![0f32; k * n];
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = w[r * k + c];
        }
    }
    pool(threads).install(|| {
        let f32_gflops = f32_gemm_gflops(&x, &wt, (m, n, k), threads, reps);
        let bf16_gflops = rir_models::bf16::available().then(|| {
            let p = rir_models::bf16::Bf16Matrix::pack(&w, n, k);
            best_gflops(2.0 * (m * n * k) as f64, reps, &mut || {
                std::hint::black_box(p.matmul(&x, m));
            })
        });
        GemmRow { m, n, k, f32_gflops, bf16_gflops }
    })
}

/// BERT shape, from config.json, for counting FLOPs.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct BertShape {
    /// Model width.
    pub hidden_size: usize,
    /// FFN width.
    pub intermediate_size: usize,
    /// Layers.
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

/// One row of `rir bench encode`.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeBench {
    /// The retriever plugin.
    pub plugin: String,
    /// Its config table.
    pub config: String,
    /// Documents encoded.
    pub docs: usize,
    /// Their tokens (after truncation).
    pub tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Documents per second.
    pub docs_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Forward FLOPs done, in GFLOP ([`BertShape::flops`]).
    pub gflop: f64,
    /// Their rate, GFLOP/s.
    pub gflops: f64,
    /// That rate as a share of [`gemm_peak`].
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
) -> anyhow::Result<(EncodeBench, rir_sdk::Embeddings)> {
    let table: toml::Table = config.parse()?;
    let dir = model_dir(host, &table, "tokenizer")?;
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
    Ok((encode_row(plugin, config, texts.len(), tokens, gflop, seconds, peak), e))
}

fn encode_row(plugin: &str, config: &str, docs: usize, tokens: usize, gflop: f64, seconds: f64, peak: &GemmPeak) -> EncodeBench {
    let gflops = gflop / seconds;
    EncodeBench {
        plugin: plugin.into(),
        config: config.into(),
        docs,
        tokens,
        seconds,
        docs_per_s: docs as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        gflop,
        gflops,
        percent_of_peak: 100.0 * gflops / peak.gflops,
    }
}

/// The local directory of a retriever config's model (`key` first if set:
/// `tokenizer` where the model file has no tokenizer beside it).
fn model_dir(host: &PluginHost, table: &toml::Table, key: &str) -> anyhow::Result<std::path::PathBuf> {
    let source = table.get(key).or_else(|| table.get("model")).and_then(|v| v.as_str());
    let source = source.ok_or_else(|| anyhow::anyhow!("the retriever config needs a `model` key to count FLOPs"))?;
    let dir = rir_models::resolve(source, &host.settings.cache_dir)?;
    Ok(if dir.is_dir() { dir } else { dir.parent().map(|p| p.to_owned()).unwrap_or_default() })
}

/// A sentence-transformers run of the same texts: its row, its embeddings
/// and the versions that made them.
pub struct SentenceTransformersRun {
    /// Its row (tokens and FLOPs counted as candle's).
    pub bench: EncodeBench,
    /// One embedding per text, in order.
    pub embeddings: rir_sdk::Embeddings,
    /// torch's and sentence-transformers' versions, and the thread count.
    pub versions: String,
}

/// The same encoding as `candle` (a candle-encoder row of [`bench_encode`]:
/// its model directory, `max_length`, `batch_size`, thread count; its token
/// and FLOP counts, since the tokenizer and truncation are the same) through
/// sentence-transformers on PyTorch CPU (bench/encode/st_encode.py, run by
/// `python`), timed inside Python around `encode` after the same warm-up.
pub fn bench_sentence_transformers(
    host: &PluginHost,
    python: &std::path::Path,
    candle: &EncodeBench,
    dtype: &str,
    texts: &[String],
    peak: &GemmPeak,
    scratch: &std::path::Path,
) -> anyhow::Result<SentenceTransformersRun> {
    use anyhow::Context;
    let table: toml::Table = candle.config.parse()?;
    let dir = model_dir(host, &table, "model")?;
    let int = |k: &str| table.get(k).and_then(|v| v.as_integer()).ok_or_else(|| anyhow::anyhow!("the candle-encoder config has no `{k}`"));
    let (max_length, batch) = (int("max_length")?, int("batch_size")?);
    let script = scratch.join("st_encode.py");
    std::fs::write(&script, include_str!("../../../../bench/encode/st_encode.py"))?;
    let input = scratch.join("texts.jsonl");
    let mut lines = String::new();
    for t in texts {
        lines.push_str(&serde_json::json!({ "text": t }).to_string());
        lines.push('\n');
    }
    std::fs::write(&input, lines)?;
    let out = scratch.join("embeddings.f32");
    let threads = host.settings.threads.max(1);
    let run = std::process::Command::new(python)
        .arg(&script)
        .arg(&dir)
        .arg(&input)
        .args([threads.to_string(), batch.to_string(), max_length.to_string()])
        .arg(&out)
        .arg(dtype)
        // One pool of `threads`: torch's intra-op threads, not OpenMP's default of every core.
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("starting {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        anyhow::bail!("{} bench/encode/st_encode.py failed ({}):\n{}", python.display(), run.status, tail.join("\n"));
    }
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("st_encode.py printed {line:?}, not its JSON line"))?;
    let seconds = v["seconds"].as_f64().ok_or_else(|| anyhow::anyhow!("st_encode.py: no seconds in {line}"))?;
    let dim = v["dim"].as_u64().ok_or_else(|| anyhow::anyhow!("st_encode.py: no dim in {line}"))? as usize;
    let bytes = std::fs::read(&out).with_context(|| format!("reading st_encode.py's embeddings {}", out.display()))?;
    let data: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let embeddings = rir_sdk::Embeddings::new(texts.len(), dim, data).map_err(|e| anyhow::anyhow!("st_encode.py's embeddings: {e}"))?;
    let versions = format!("torch {}, sentence-transformers {}, {} threads", v["torch"].as_str().unwrap_or("?"), v["sentence_transformers"].as_str().unwrap_or("?"), v["threads"]);
    let bench = encode_row("sentence-transformers", &format!("{} (PyTorch CPU)", dir.display()), texts.len(), candle.tokens, candle.gflop, seconds, peak);
    Ok(SentenceTransformersRun { bench, embeddings, versions })
}

/// Cosine of each row of `a` with the same row of `b`: (min, mean).
pub fn row_cosines(a: &rir_sdk::Embeddings, b: &rir_sdk::Embeddings) -> anyhow::Result<(f64, f64)> {
    anyhow::ensure!(a.rows == b.rows && a.dim == b.dim, "embeddings of {}x{} and {}x{} cannot be compared", a.rows, a.dim, b.rows, b.dim);
    let cos: Vec<f64> = (0..a.rows)
        .map(|i| {
            let (x, y) = (a.row(i), b.row(i));
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let n = |v: &[f32]| v.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            dot / (n(x) * n(y)).max(1e-30)
        })
        .collect();
    let min = cos.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((min, cos.iter().sum::<f64>() / cos.len().max(1) as f64))
}

/// One row of `rir bench generate`.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBench {
    /// Which engine: `rir PLUGIN` or llama.cpp.
    pub engine: String,
    /// "single" (one sequence at a time) or "aggregate" (`sequences` together).
    pub mode: String,
    /// Sequences generated.
    pub sequences: usize,
    /// Tokens generated (or, for prefill, prompt tokens).
    pub tokens: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
}

/// Prompts in the prefill measurement.
pub const PREFILL_PROMPTS: usize = 16;

/// Raw-text prompts whose greedy continuations rarely end early, so both
/// engines decode about `max_tokens` tokens.
pub const GENERATE_PROMPTS: [&str; 3] = [
    "The history of information retrieval begins with library catalogues, and",
    "In this paper we study how dense retrievers adapt to scientific claims. First,",
    "Protein folding in yeast cells under heat stress is a process in which",
];

fn row(engine: &str, mode: &str, sequences: usize, tokens: usize, seconds: f64) -> GenerateBench {
    GenerateBench {
        engine: engine.into(),
        mode: mode.into(),
        sequences,
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds,
    }
}

/// Single-stream greedy decoding of each prompt, then `samples` sampled
/// sequences per prompt decoded together (n = samples), through the plugin.
/// Tokens are counted from the returned log-probabilities (EOS included).
pub fn bench_generate_plugin(
    host: &PluginHost,
    plugin: &str,
    config: &str,
    max_tokens: u32,
    samples: u32,
    repeats: usize,
) -> anyhow::Result<Vec<GenerateBench>> {
    use rir_sdk::{GenerationRequest, Prompt};
    let g = host.load(plugin)?.generator(config)?;
    let req = |p: &str, n: u32, t: f32| {
        let mut r = GenerationRequest::greedy(Prompt::Text(p.into()), max_tokens);
        r.n = n;
        r.temperature = t;
        r.top_p = 0.9;
        r.seed = Some(1);
        r.logprobs = true;
        r
    };
    let count = |out: &[Vec<rir_sdk::Completion>]| -> usize {
        out.iter().flatten().map(|c| c.logprobs.as_ref().map_or(0, |l| l.len())).sum()
    };
    let mut warm = req(GENERATE_PROMPTS[0], 1, 0.0);
    warm.max_tokens = 4;
    g.generate(&[warm])?;
    let name = format!("rir {plugin}");
    let run = |n: u32, temperature: f32| -> anyhow::Result<(usize, f64)> {
        let (mut tokens, mut secs) = (0, 0.0);
        for p in GENERATE_PROMPTS {
            let t = Instant::now();
            let out = g.generate(&[req(p, n, temperature)])?;
            secs += t.elapsed().as_secs_f64();
            tokens += count(&out);
        }
        Ok((tokens, secs))
    };
    let (t1, s1) = best_of(repeats, || run(1, 0.0))?;
    let (tn, sn) = best_of(repeats, || run(samples, 0.9))?;
    Ok(vec![row(&name, "single", 1, t1, s1), row(&name, "aggregate", samples as usize, tn, sn)])
}

/// Long prompts of varied length (padding as in a real batch) for the
/// prefill measurement: the generation prompts, rotated and repeated.
pub fn prefill_prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut s = format!("Document {i}.");
            for r in 0..2 + i % 5 {
                for j in 0..GENERATE_PROMPTS.len() {
                    s.push(' ');
                    s.push_str(GENERATE_PROMPTS[(i + r + j) % GENERATE_PROMPTS.len()]);
                    s.push_str(" more.");
                }
            }
            s
        })
        .collect()
}

/// Prompt processing: `prompts` in one call with one greedy token each (the
/// plugin batches them as a stage's call would), best of `repeats`. Tokens
/// are the prompt tokens the plugin reports in the call's usage.
pub fn bench_prefill_plugin(host: &PluginHost, plugin: &str, config: &str, prompts: &[String], repeats: usize) -> anyhow::Result<GenerateBench> {
    use rir_sdk::{GenerationRequest, Prompt};
    let g = host.load(plugin)?.generator(config)?;
    let reqs: Vec<GenerationRequest> = prompts.iter().map(|p| GenerationRequest::greedy(Prompt::Text(p.clone()), 1)).collect();
    g.generate(&reqs[..1])?;
    let (tokens, secs) = best_of(repeats, || {
        let t = Instant::now();
        let out = g.generate(&reqs)?;
        let secs = t.elapsed().as_secs_f64();
        Ok((prompt_tokens(plugin, &out)?, secs))
    })?;
    Ok(row(&format!("rir {plugin}"), "prefill", prompts.len(), tokens, secs))
}

/// The prompt tokens a generation call read, from each request's usage
/// (on its first completion); an error naming the plugin if it counts none.
fn prompt_tokens(plugin: &str, out: &[Vec<rir_sdk::Completion>]) -> anyhow::Result<usize> {
    out.iter()
        .map(|v| v.first().and_then(|c| c.usage).and_then(|u| u.prompt_tokens).map(|n| n as usize))
        .sum::<Option<usize>>()
        .ok_or_else(|| anyhow::anyhow!("{plugin} reports no prompt tokens in its usage: the bench counts a row's tokens from it"))
}

/// `count` different prompts of `tokens` tokens each for the generator
/// `g`: scientific prose (the generation prompts, rotated), tokenized once
/// by the generator itself (a scored continuation's pieces) and cut after
/// its first `tokens` pieces: (prompt, `tokens`). The ABI has no tokenize
/// call, so each prompt costs one forward pass over a little more text than
/// it keeps; re-tokenizing a cut can merge across it, so a prompt may read
/// a token or two fewer (llama.cpp's row reports its own count).
pub fn sized_prompts(g: &dyn rir_sdk::Generator, tokens: usize, count: usize) -> anyhow::Result<Vec<(String, usize)>> {
    use rir_sdk::{Prompt, ScoreRequest};
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // Each prompt starts differently, so no two share a prefix.
        let mut words: Vec<String> = vec![format!("Document {i}:")];
        let mut r = 0;
        loop {
            // A word is at least one token: this many words are enough.
            while words.len() < tokens + 16 {
                for j in 0..GENERATE_PROMPTS.len() {
                    words.extend(GENERATE_PROMPTS[(i + r + j) % GENERATE_PROMPTS.len()].split_whitespace().map(str::to_owned));
                    words.push(format!("({r}.{j})"));
                }
                r += 1;
            }
            let scored = g.score(&[ScoreRequest { prompt: Prompt::Text(String::new()), continuation: words.join(" ") }])?;
            let pieces = scored.into_iter().next().map(|s| s.tokens).unwrap_or_default();
            anyhow::ensure!(!pieces.is_empty(), "{} returned no tokens for a scored text: it cannot size prompts", g.model_name());
            if pieces.len() >= tokens {
                let text: String = pieces[..tokens].iter().map(|t| t.token.as_str()).collect();
                out.push((text.trim_start().to_owned(), tokens));
                break;
            }
            // Fewer pieces than words (cannot happen with subword tokenizers): more text.
            words.extend(words.clone());
        }
    }
    Ok(out)
}

/// Prefill of `batch` prompts of one length together, rir's side: each
/// group of `batch` prompts in one call with one greedy token each (as a
/// stage batches them), the prompts' tokens over the wall time, best of
/// `repeats` (each repeat covers every group).
pub fn bench_prefill_sized_plugin(g: &dyn rir_sdk::Generator, name: &str, prompts: &[(String, usize)], prompt_tokens: usize, batch: usize, repeats: usize) -> anyhow::Result<GenerateBench> {
    use rir_sdk::{GenerationRequest, Prompt};
    let reqs: Vec<GenerationRequest> = prompts.iter().map(|(p, _)| GenerationRequest::greedy(Prompt::Text(p.clone()), 1)).collect();
    let total: usize = prompts.iter().map(|(_, n)| n).sum();
    let (tokens, secs) = best_of(repeats, || {
        let t = Instant::now();
        for group in reqs.chunks(batch.max(1)) {
            g.generate(group)?;
        }
        Ok((total, t.elapsed().as_secs_f64()))
    })?;
    Ok(row(name, &format!("prefill {prompt_tokens}x{batch}"), batch, tokens, secs))
}

/// The same against llama.cpp: each group of `batch` prompts sent at once
/// (one slot each, `n_predict` 1, no prompt cache), the server's own count
/// of prompt tokens over the wall time.
pub fn bench_prefill_sized_llama_cpp(server: &LlamaCppServer, prompts: &[(String, usize)], prompt_tokens: usize, batch: usize, repeats: usize) -> anyhow::Result<GenerateBench> {
    let one = |p: &str| -> anyhow::Result<usize> {
        let body = serde_json::json!({"prompt": p, "n_predict": 1, "temperature": 0.0, "cache_prompt": false});
        let v: serde_json::Value = ureq::post(&format!("{}/completion", server.base)).send_json(body)?.body_mut().read_json()?;
        Ok(v["timings"]["prompt_n"].as_u64().unwrap_or(0) as usize)
    };
    let (tokens, secs) = best_of(repeats, || {
        let (mut tokens, t) = (0, Instant::now());
        for group in prompts.chunks(batch.max(1)) {
            let counts: Vec<anyhow::Result<usize>> = std::thread::scope(|s| {
                let hs: Vec<_> = group.iter().map(|(p, _)| s.spawn(move || one(p))).collect();
                hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("request thread panicked")))).collect()
            });
            for c in counts {
                tokens += c?;
            }
        }
        Ok((tokens, t.elapsed().as_secs_f64()))
    })?;
    Ok(row("llama.cpp (xllamacpp)", &format!("prefill {prompt_tokens}x{batch}"), batch, tokens, secs))
}

/// Requests that open alike, for the prefix-cache rows: per repeat, one
/// shared opening (`openings[r]`, each repeat its own, so nothing one
/// repeat keeps serves the next) followed by `requests` different questions.
pub fn shared_prefix_prompts(openings: &[(String, usize)], requests: usize) -> Vec<Vec<String>> {
    openings
        .iter()
        .map(|(o, _)| (0..requests).map(|j| format!("{o}\n\nQuestion {j}: {}", GENERATE_PROMPTS[j % GENERATE_PROMPTS.len()])).collect())
        .collect()
}

/// rir's side of the prefix-cache rows: each repeat's prompts sent one at a
/// time (as a server gets them), one greedy token each; the prompts' tokens
/// (cached or not, as the plugin's usage counts them) over the wall time,
/// best of the repeats (one per set).
pub fn bench_shared_prefix_plugin(g: &dyn rir_sdk::Generator, name: &str, mode: &str, sets: &[Vec<String>]) -> anyhow::Result<GenerateBench> {
    use rir_sdk::{GenerationRequest, Prompt};
    let mut i = 0;
    let (tokens, secs) = best_of(sets.len(), || {
        let (mut tokens, t) = (0, Instant::now());
        for p in &sets[i] {
            tokens += prompt_tokens(name, &g.generate(&[GenerationRequest::greedy(Prompt::Text(p.clone()), 1)])?)?;
        }
        i += 1;
        Ok((tokens, t.elapsed().as_secs_f64()))
    })?;
    Ok(row(name, mode, sets.first().map_or(0, |s| s.len()), tokens, secs))
}

/// The same against llama.cpp, one slot, with its prompt cache
/// (`cache_prompt`: a request starts from what the slot's previous prompt
/// shares with it) on or off; tokens as the server counts them (run and
/// cached: `timings.prompt_n` + `timings.cache_n`).
pub fn bench_shared_prefix_llama_cpp(server: &LlamaCppServer, mode: &str, cache_prompt: bool, sets: &[Vec<String>]) -> anyhow::Result<GenerateBench> {
    let mut i = 0;
    let (tokens, secs) = best_of(sets.len(), || {
        let (mut tokens, t) = (0, Instant::now());
        for p in &sets[i] {
            let body = serde_json::json!({"prompt": p, "n_predict": 1, "temperature": 0.0, "cache_prompt": cache_prompt});
            let v: serde_json::Value = ureq::post(&format!("{}/completion", server.base)).send_json(body)?.body_mut().read_json()?;
            let count = |k: &str| v["timings"][k].as_u64().unwrap_or(0) as usize;
            tokens += count("prompt_n") + count("cache_n");
        }
        i += 1;
        Ok((tokens, t.elapsed().as_secs_f64()))
    })?;
    Ok(row("llama.cpp (xllamacpp)", mode, sets.first().map_or(0, |s| s.len()), tokens, secs))
}

/// The fastest of `repeats` runs (this is a shared VM: others' load only
/// ever slows a run down).
fn best_of(repeats: usize, mut f: impl FnMut() -> anyhow::Result<(usize, f64)>) -> anyhow::Result<(usize, f64)> {
    let mut best = f()?;
    for _ in 1..repeats.max(1) {
        let r = f()?;
        if r.0 as f64 / r.1 > best.0 as f64 / best.1 {
            best = r;
        }
    }
    Ok(best)
}

/// A llama.cpp server (the xllamacpp Python package) on loopback, stopped on drop.
pub struct LlamaCppServer {
    child: std::process::Child,
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub base: String,
}

impl LlamaCppServer {
    /// Starts `python llama_server.py GGUF PORT PARALLEL THREADS` (a
    /// 4,096-token context) and waits for /health to answer 200.
    pub fn start(python: &std::path::Path, gguf: &std::path::Path, parallel: usize, threads: usize, scratch: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_with_context(python, gguf, parallel, threads, 4096, scratch)
    }

    /// [`LlamaCppServer::start`] with a context of `n_ctx` tokens shared by the slots.
    pub fn start_with_context(
        python: &std::path::Path,
        gguf: &std::path::Path,
        parallel: usize,
        threads: usize,
        n_ctx: usize,
        scratch: &std::path::Path,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(scratch)?;
        let script = scratch.join("llama_server.py");
        std::fs::write(&script, include_str!("../../../../tests/python/llama_server.py"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = std::process::Command::new(python)
            .args([script.as_os_str(), gguf.as_os_str()])
            .args([port.to_string(), parallel.to_string(), threads.to_string(), n_ctx.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (the xllamacpp package is needed: scripts/setup-python)", python.display()))?;
        let mut s = LlamaCppServer { child, base: format!("http://127.0.0.1:{port}") };
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(r) = ureq::get(&format!("{}/health", s.base)).call() {
                if r.status() == 200 {
                    return Ok(s);
                }
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                anyhow::bail!("the llama.cpp server exited ({status}) before becoming healthy");
            }
            anyhow::ensure!(Instant::now() < deadline, "the llama.cpp server did not become healthy in 120 s");
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

impl Drop for LlamaCppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same workload against llama.cpp's /completion endpoint: one request
/// at a time, then `samples` concurrent requests per prompt (the server runs
/// that many slots). Tokens are the server's own `tokens_predicted`.
pub fn bench_generate_llama_cpp(server: &LlamaCppServer, max_tokens: u32, samples: u32, repeats: usize) -> anyhow::Result<Vec<GenerateBench>> {
    let complete = |prompt: &str, temperature: f32, seed: u32, n: u32| -> anyhow::Result<usize> {
        let body = serde_json::json!({
            "prompt": prompt, "n_predict": n, "temperature": temperature, "top_p": 0.9,
            "seed": seed, "cache_prompt": false,
        });
        let v: serde_json::Value = ureq::post(&format!("{}/completion", server.base)).send_json(body)?.body_mut().read_json()?;
        Ok(v["tokens_predicted"].as_u64().unwrap_or(0) as usize)
    };
    complete(GENERATE_PROMPTS[0], 0.0, 1, 4)?;
    let single = best_of(repeats, || {
        let (mut tokens, mut secs) = (0, 0.0);
        for p in GENERATE_PROMPTS {
            let t = Instant::now();
            tokens += complete(p, 0.0, 1, max_tokens)?;
            secs += t.elapsed().as_secs_f64();
        }
        Ok((tokens, secs))
    })?;
    let (tokens, secs) = best_of(repeats, || {
        let (mut tokens, mut secs) = (0, 0.0);
        for p in GENERATE_PROMPTS {
            let t = Instant::now();
            let counts: Vec<anyhow::Result<usize>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..samples).map(|i| s.spawn(move || complete(p, 0.9, 1 + i, max_tokens))).collect();
                hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("request thread panicked")))).collect()
            });
            secs += t.elapsed().as_secs_f64();
            for c in counts {
                tokens += c?;
            }
        }
        Ok((tokens, secs))
    })?;
    let single = row("llama.cpp (xllamacpp)", "single", 1, single.0, single.1);
    // Prompt processing: the server's own count and time of prompt tokens.
    let prefill = best_of(repeats, || {
        let (mut tokens, mut secs) = (0, 0.0);
        for p in &prefill_prompts(PREFILL_PROMPTS) {
            let body = serde_json::json!({"prompt": p, "n_predict": 1, "temperature": 0.0, "cache_prompt": false});
            let v: serde_json::Value = ureq::post(&format!("{}/completion", server.base)).send_json(body)?.body_mut().read_json()?;
            tokens += v["timings"]["prompt_n"].as_u64().unwrap_or(0) as usize;
            secs += v["timings"]["prompt_ms"].as_f64().unwrap_or(0.0) / 1000.0;
        }
        Ok((tokens, secs))
    })?;
    Ok(vec![
        single,
        row("llama.cpp (xllamacpp)", "aggregate", samples as usize, tokens, secs),
        row("llama.cpp (xllamacpp)", "prefill", PREFILL_PROMPTS, prefill.0, prefill.1),
    ])
}

/// A text retriever's speed on one corpus: the fastest of the repeats of
/// a fresh index build and of one search over every query.
#[derive(Debug, Clone, Serialize)]
pub struct LexicalBench {
    /// Documents indexed.
    pub docs: usize,
    /// Seconds to build the index.
    pub index_seconds: f64,
    /// Queries searched.
    pub queries: usize,
    /// Seconds to search them all (one call).
    pub search_seconds: f64,
    /// Results per query.
    pub k: usize,
}

/// Builds `docs`' index in a temporary directory `repeat` times and
/// searches `queries` `repeat` times with a fresh object of `plugin`; the
/// last search's ranking comes back (document indices, best first) so the
/// caller can check its quality beside its speed.
pub fn bench_lexical(
    plugin: &crate::plugins::Plugin,
    config: &str,
    docs: &[String],
    queries: &[String],
    k: usize,
    repeat: usize,
) -> Result<(LexicalBench, rir_sdk::Hits), crate::HostError> {
    let err = |source| crate::HostError::Plugin { plugin: plugin.name.clone(), kind: crate::Kind::TextRetriever, source };
    let (mut index_s, mut search_s) = (f64::INFINITY, f64::INFINITY);
    let mut hits = None;
    for _ in 0..repeat.max(1) {
        let dir = tempfile::tempdir().map_err(|e| crate::HostError::Input(format!("temporary directory: {e}")))?;
        let mut r = plugin.text_retriever(config)?;
        let t = Instant::now();
        r.build(dir.path(), docs, &rir_sdk::NoProgress).map_err(err)?;
        index_s = index_s.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let h = std::hint::black_box(r.search(queries, k).map_err(err)?);
        search_s = search_s.min(t.elapsed().as_secs_f64());
        hits = Some(h);
    }
    let hits = hits.expect("repeat is at least 1");
    Ok((LexicalBench { docs: docs.len(), index_seconds: index_s, queries: queries.len(), search_seconds: search_s, k }, hits))
}

/// The peer: Anserini, the Lucene toolkit pyserini drives (its wheel ships
/// the fat jar), on the same documents (`id`, `contents` = title + text, as
/// pyserini's BEIR "flat" indexes) and queries, with the same thread count:
/// `IndexCollection` (positions, document vectors and raw text stored, as
/// pyserini's prebuilt BEIR indexes are) and `SearchCollection -bm25` (k1
/// 0.9, b 0.4). Times are wall clock of each Java process, so they include
/// the JVM's start and class loading — what a pyserini user waits for on
/// the command line. The last run's ranking comes back.
pub fn bench_anserini(
    java: &std::path::Path,
    jar: &std::path::Path,
    docs: &[(String, String)],
    queries: &[(String, String)],
    k: usize,
    threads: usize,
    repeat: usize,
) -> anyhow::Result<(LexicalBench, crate::engine::metrics::Run)> {
    use anyhow::Context;
    use std::io::Write;
    let dir = tempfile::tempdir().context("temporary directory")?;
    std::fs::create_dir(dir.path().join("input"))?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(dir.path().join("input/docs.jsonl"))?);
    for (id, text) in docs {
        writeln!(w, "{}", serde_json::json!({"id": id, "contents": text}))?;
    }
    w.flush()?;
    // Anserini's TsvString topics: one `id<TAB>text` a line.
    let mut topics = String::new();
    for (id, text) in queries {
        topics.push_str(&format!("{id}\t{}\n", text.replace(['\t', '\n', '\r'], " ")));
    }
    std::fs::write(dir.path().join("topics.tsv"), topics)?;
    let run_java = |args: &[&str], what: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = std::process::Command::new(java)
            .arg("-cp")
            .arg(jar)
            .args(args)
            .current_dir(dir.path())
            .output()
            .with_context(|| format!("running {} (set --java or JAVA)", java.display()))?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            anyhow::bail!("Anserini's {what} failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
        }
        Ok(secs)
    };
    let t = threads.max(1).to_string();
    let hits = k.to_string();
    let (mut index_s, mut search_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeat.max(1) {
        let _ = std::fs::remove_dir_all(dir.path().join("index"));
        index_s = index_s.min(run_java(
            &["io.anserini.index.IndexCollection", "-collection", "JsonCollection", "-input", "input", "-index", "index", "-generator", "DefaultLuceneDocumentGenerator", "-threads", &t, "-storePositions", "-storeDocvectors", "-storeRaw"],
            "IndexCollection",
        )?);
        search_s = search_s.min(run_java(
            &["io.anserini.search.SearchCollection", "-index", "index", "-topics", "topics.tsv", "-topicreader", "TsvString", "-output", "run.txt", "-bm25", "-hits", &hits, "-threads", &t],
            "SearchCollection",
        )?);
    }
    let run = crate::engine::runfile::read(&dir.path().join("run.txt")).context("reading Anserini's run file")?;
    Ok((LexicalBench { docs: docs.len(), index_seconds: index_s, queries: queries.len(), search_seconds: search_s, k }, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_cosines_compare_rows_in_order() {
        let a = rir_sdk::Embeddings::new(2, 2, vec![1.0, 0.0, 0.0, 2.0]).unwrap();
        let b = rir_sdk::Embeddings::new(2, 2, vec![3.0, 0.0, 1.0, 1.0]).unwrap();
        let (min, mean) = row_cosines(&a, &b).unwrap();
        assert!((min - 0.5f64.sqrt()).abs() < 1e-12, "{min}");
        assert!((mean - (1.0 + 0.5f64.sqrt()) / 2.0).abs() < 1e-12, "{mean}");
        let c = rir_sdk::Embeddings::new(1, 2, vec![1.0, 0.0]).unwrap();
        assert!(row_cosines(&a, &c).is_err());
    }
}
