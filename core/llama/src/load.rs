//! Loading Llama models: GGUF (llama.cpp's layout, quantized) or an HF
//! directory (config.json + safetensors + tokenizer.json), PEFT LoRA adapters
//! merged in at load, and export of any loaded model as an HF directory.
//!
//! The adapter format agreed with the DPO trainer is PEFT's: adapter_config.json
//! (`r`, `lora_alpha`, `target_modules`) and adapter_model.safetensors with
//! `base_model.model.model.layers.N.{self_attn,mlp}.X_proj.lora_{A,B}.weight`,
//! in HF layout. Against a GGUF base, q/k deltas are permuted into llama.cpp's
//! row order before they are added.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use rir_sdk::{PluginError, PluginResult};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::model::{Layer, Linear, Llama, Shape};

/// What a loaded model carries besides its weights.
pub struct Assets {
    pub tokenizer: Tokenizer,
    pub template: Option<String>,
    pub bos: String,
    pub eos: String,
    pub eos_ids: Vec<u32>,
    pub name: String,
    /// The GGUF's metadata when the model was loaded from one (tokenizer,
    /// template, architecture keys): what [`export_gguf`] writes again.
    pub gguf_metadata: Option<HashMap<String, gguf_file::Value>>,
}

fn cerr(what: impl std::fmt::Display) -> impl Fn(candle_core::Error) -> PluginError {
    move |e| PluginError::resource(format!("{what}: {e}"))
}

/// The HF names of a layer's linear maps, in `Layer` field order.
pub const LINEARS: [&str; 7] =
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

fn linear_mut(l: &mut Layer, i: usize) -> &mut Linear {
    match i {
        0 => &mut l.wq,
        1 => &mut l.wk,
        2 => &mut l.wv,
        3 => &mut l.wo,
        4 => &mut l.gate,
        5 => &mut l.up,
        _ => &mut l.down,
    }
}

/// llama.cpp's converter permutes Q/K rows so interleaved rope equals HF's
/// half-split rope: `reshape(heads, 2, d/2, in).swap(1, 2)`. `to_gguf` false
/// applies the inverse.
pub fn permute_rows(w: &Tensor, heads: usize, to_gguf: bool) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    w.reshape((heads, a, b, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}

/// `path` is a .gguf file, or a directory holding an HF model or a .gguf.
pub fn model_file(p: &Path) -> PluginResult<(PathBuf, bool)> {
    if p.is_file() {
        return Ok((p.to_owned(), false));
    }
    if p.join("config.json").is_file() {
        return Ok((p.to_owned(), true));
    }
    let g = rir_models::files_with_extension(p, "gguf")?.into_iter().next().ok_or_else(|| {
        PluginError::resource(format!("{}: neither a .gguf file nor an HF model directory (config.json)", p.display()))
    })?;
    Ok((g, false))
}

/// Loads what [`model_file`] found: an HF directory in `dtype`, or a GGUF
/// (its weights as they are quantized).
pub fn load_model(path: &Path, hf: bool, dtype: DType, device: &Device) -> PluginResult<(Llama, Assets)> {
    if hf {
        load_hf(path, dtype, device)
    } else {
        load_gguf(path, device)
    }
}

pub fn load_gguf(path: &Path, device: &Device) -> PluginResult<(Llama, Assets)> {
    let d = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| PluginError::resource(format!("{d}: {e}")))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| PluginError::resource(format!("{d}: not a GGUF file: {e}")))?;
    let md = |k: &str| content.metadata.get(k);
    let arch = md("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    // Qwen2 is Llama with Q/K/V biases; llama.cpp keeps its Q/K rows in HF's
    // order (half-split rope), where it permutes Llama's for interleaved rope.
    if arch != "llama" && arch != "qwen2" {
        return Err(PluginError::resource(format!("{d}: architecture {arch:?} is not supported (llama, qwen2)")));
    }
    let qwen = arch == "qwen2";
    let tokenizer = crate::gguf_tokenizer::from_gguf(&content).map_err(|e| PluginError::resource(format!("{d}: {e}")))?;
    let u = |k: &str| md(k).and_then(|v| v.to_u32().ok());
    let need = |k: &str| u(k).ok_or_else(|| PluginError::resource(format!("{d}: no `{k}` in the GGUF metadata")));
    let eos_id = need("tokenizer.ggml.eos_token_id")?;
    let token = |i: Option<u32>| i.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = need(&key("attention.head_count"))? as usize;
    let hidden = need(&key("embedding_length"))? as usize;
    let shape = Shape {
        n_layer: need(&key("block_count"))? as usize,
        hidden,
        n_head,
        n_kv_head: u(&key("attention.head_count_kv")).map_or(n_head, |v| v as usize),
        head_dim: u(&key("rope.dimension_count")).map_or(hidden / n_head, |v| v as usize),
        eps: md(&key("attention.layer_norm_rms_epsilon")).and_then(|v| v.to_f32().ok()).unwrap_or(1e-5) as f64,
        rope_theta: md(&key("rope.freq_base")).and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0),
        context: u(&key("context_length")).unwrap_or(4096) as usize,
        interleaved_rope: !qwen,
    };
    // Chat models end a turn with their own token as well as the GGUF's eos
    // (Qwen2: <|im_end|> and <|endoftext|>).
    let mut eos_ids = vec![eos_id];
    for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(id) = tokenizer.token_to_id(t) {
            if !eos_ids.contains(&id) && (qwen || t == "<|eot_id|>") {
                eos_ids.push(id);
            }
        }
    }
    let assets = Assets {
        bos: token(u("tokenizer.ggml.bos_token_id")),
        eos: token(Some(eos_id)),
        eos_ids,
        template: md("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
        name: md("general.name")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
        tokenizer,
        gguf_metadata: Some(content.metadata.clone()),
    };
    let mut q = |name: &str| content.tensor(&mut file, name, device).map_err(cerr(format!("{d}: tensor {name}")));
    let embed_q = q("token_embd.weight")?;
    let embed = embed_q.dequantize(device).map_err(cerr("token_embd"))?;
    let (output, tied) = match q("output.weight") {
        Ok(t) => (t, false),
        Err(_) => (embed_q, true),
    };
    let lin = |t| Linear::quantized(t).map_err(cerr("weights"));
    let deq = |t: candle_core::quantized::QTensor| t.dequantize(device).map_err(cerr("norm"));
    let mut layers = Vec::with_capacity(shape.n_layer);
    for i in 0..shape.n_layer {
        let p = format!("blk.{i}");
        layers.push(Layer {
            wq: lin(q(&format!("{p}.attn_q.weight"))?)?,
            wk: lin(q(&format!("{p}.attn_k.weight"))?)?,
            wv: lin(q(&format!("{p}.attn_v.weight"))?)?,
            wo: lin(q(&format!("{p}.attn_output.weight"))?)?,
            gate: lin(q(&format!("{p}.ffn_gate.weight"))?)?,
            up: lin(q(&format!("{p}.ffn_up.weight"))?)?,
            down: lin(q(&format!("{p}.ffn_down.weight"))?)?,
            attn_norm: deq(q(&format!("{p}.attn_norm.weight"))?)?,
            ffn_norm: deq(q(&format!("{p}.ffn_norm.weight"))?)?,
            qkv_bias: if qwen {
                Some([
                    deq(q(&format!("{p}.attn_q.bias"))?)?,
                    deq(q(&format!("{p}.attn_k.bias"))?)?,
                    deq(q(&format!("{p}.attn_v.bias"))?)?,
                ])
            } else {
                None
            },
        });
    }
    let norm = deq(q("output_norm.weight")?)?;
    let mut model = Llama::new(embed, layers, norm, lin(output)?, shape, DType::F32, device).map_err(cerr("model"))?;
    model.tied_output = tied;
    Ok((model, assets))
}

/// The keys of an HF llama config.json that matter here; others are ignored
/// (HF configs carry many).
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "eps")]
    rms_norm_eps: f64,
    #[serde(default = "theta")]
    rope_theta: f32,
    #[serde(default = "ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}
fn eps() -> f64 {
    1e-6
}
fn theta() -> f32 {
    10_000.0
}
fn ctx() -> usize {
    4096
}

/// Reads an HF token entry: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
        None => String::new(),
    }
}

fn read_json(p: &Path) -> PluginResult<serde_json::Value> {
    let t = std::fs::read_to_string(p).map_err(|e| PluginError::resource(format!("{}: {e}", p.display())))?;
    serde_json::from_str(&t).map_err(|e| PluginError::resource(format!("{}: {e}", p.display())))
}

/// All tensors of a directory's *.safetensors files.
pub fn read_safetensors(dir: &Path, device: &Device) -> PluginResult<HashMap<String, Tensor>> {
    let files = rir_models::files_with_extension(dir, "safetensors")?;
    if files.is_empty() {
        return Err(PluginError::resource(format!("{}: no *.safetensors weights", dir.display())));
    }
    let mut all = HashMap::new();
    for f in files {
        all.extend(candle_core::safetensors::load(&f, device).map_err(cerr(f.display()))?);
    }
    Ok(all)
}

pub fn load_hf(dir: &Path, dtype: DType, device: &Device) -> PluginResult<(Llama, Assets)> {
    let d = dir.display();
    let cfg_path = dir.join("config.json");
    let raw = read_json(&cfg_path)?;
    let cfg: HfConfig =
        serde_json::from_value(raw).map_err(|e| PluginError::resource(format!("{}: {e}", cfg_path.display())))?;
    let qwen = cfg.model_type.as_deref() == Some("qwen2");
    if cfg.model_type.as_deref() != Some("llama") && !qwen {
        return Err(PluginError::resource(format!(
            "{}: model_type {:?} is not supported (llama, qwen2)",
            cfg_path.display(),
            cfg.model_type
        )));
    }
    if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(PluginError::Unsupported(format!("{}: rope_scaling is not supported", cfg_path.display())));
    }
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(PluginError::resource(format!("{d}: no tokenizer.json")));
    }
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| PluginError::resource(format!("{}: {e}", tok_path.display())))?;
    let tc = if dir.join("tokenizer_config.json").is_file() { read_json(&dir.join("tokenizer_config.json"))? } else { serde_json::json!({}) };
    let eos = token_text(tc.get("eos_token"));
    let mut eos_ids: Vec<u32> = match &cfg.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().map(|v| v as u32).collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => vec![],
    };
    if eos_ids.is_empty() {
        eos_ids.extend(tokenizer.token_to_id(&eos));
    }
    if eos_ids.is_empty() {
        return Err(PluginError::resource(format!("{d}: no eos_token_id in config.json and no eos_token in tokenizer_config.json")));
    }
    let assets = Assets {
        bos: token_text(tc.get("bos_token")),
        eos,
        eos_ids,
        template: tc.get("chat_template").and_then(|v| v.as_str()).map(str::to_owned),
        name: dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        tokenizer,
        gguf_metadata: None,
    };
    let mut w = read_safetensors(dir, device)?;
    let mut take = |name: &str| {
        w.remove(name)
            .ok_or_else(|| PluginError::resource(format!("{d}: tensor {name} missing")))
            .and_then(|t| t.to_dtype(dtype).map_err(cerr(name)))
    };
    let embed = take("model.embed_tokens.weight")?;
    let output = if cfg.tie_word_embeddings { embed.clone() } else { take("lm_head.weight").or_else(|_| Ok::<_, PluginError>(embed.clone()))? };
    let shape = Shape {
        n_layer: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        n_head: cfg.num_attention_heads,
        n_kv_head: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        head_dim: cfg.head_dim.unwrap_or(cfg.hidden_size / cfg.num_attention_heads),
        eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        context: cfg.max_position_embeddings,
        interleaved_rope: false,
    };
    let mut layers = Vec::with_capacity(shape.n_layer);
    for i in 0..shape.n_layer {
        let p = format!("model.layers.{i}");
        let mut lin = |n: &str| take(&format!("{p}.{n}.weight")).map(Linear::dense);
        layers.push(Layer {
            wq: lin(LINEARS[0])?,
            wk: lin(LINEARS[1])?,
            wv: lin(LINEARS[2])?,
            wo: lin(LINEARS[3])?,
            gate: lin(LINEARS[4])?,
            up: lin(LINEARS[5])?,
            down: lin(LINEARS[6])?,
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            qkv_bias: if qwen {
                Some([
                    take(&format!("{p}.self_attn.q_proj.bias"))?,
                    take(&format!("{p}.self_attn.k_proj.bias"))?,
                    take(&format!("{p}.self_attn.v_proj.bias"))?,
                ])
            } else {
                None
            },
        });
    }
    let norm = take("model.norm.weight")?;
    let model = Llama::new(embed, layers, norm, Linear::dense(output), shape, dtype, device).map_err(cerr("model"))?;
    Ok((model, assets))
}

/// PEFT's adapter_config.json, the keys that matter for merging.
#[derive(Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// Adds `scale · B·A` of every adapted linear map into the model's weights
/// (quantized ones are dequantized first). Returns how many maps changed.
pub fn merge_lora(model: &mut Llama, dir: &Path) -> PluginResult<usize> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: AdapterConfig = serde_json::from_value(read_json(&cfg_path)?)
        .map_err(|e| PluginError::resource(format!("{}: {e}", cfg_path.display())))?;
    if cfg.fan_in_fan_out {
        return Err(PluginError::Unsupported(format!("{}: fan_in_fan_out adapters are not supported", cfg_path.display())));
    }
    let scale = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };
    let device = model.device.clone();
    let mut t = read_safetensors(dir, &device)?;
    let mut names: Vec<String> = t.keys().filter(|k| k.ends_with(".lora_A.weight")).cloned().collect();
    names.sort();
    let leftover: Vec<&String> = t.keys().filter(|k| !k.ends_with(".lora_A.weight") && !k.ends_with(".lora_B.weight")).collect();
    if let Some(k) = leftover.first() {
        return Err(PluginError::resource(format!("{}: unexpected adapter tensor {k} (only LoRA A/B are supported)", dir.display())));
    }
    let (n_head, n_kv) = (model.shape.n_head, model.shape.n_kv_head);
    let interleaved = model.shape.interleaved_rope;
    let dtype = model.dtype;
    for a_name in &names {
        let module = a_name.trim_end_matches(".lora_A.weight");
        let bad = || PluginError::resource(format!("{}: adapter tensor {a_name} names no llama linear map", dir.display()));
        let rest = module.split(".layers.").nth(1).ok_or_else(bad)?;
        let (idx, which) = rest.split_once('.').ok_or_else(bad)?;
        let li: usize = idx.parse().map_err(|_| bad())?;
        let wi = LINEARS.iter().position(|l| *l == which).ok_or_else(bad)?;
        let a = t.remove(a_name).ok_or_else(bad)?;
        let b = t.remove(&format!("{module}.lora_B.weight")).ok_or_else(|| {
            PluginError::resource(format!("{}: {module}.lora_B.weight missing", dir.display()))
        })?;
        let layer = model.layers.get_mut(li).ok_or_else(bad)?;
        let lin = linear_mut(layer, wi);
        let m = |e| PluginError::other(format!("merging {module}: {e}"));
        let mut delta = (b.to_dtype(DType::F32).map_err(m)?.matmul(&a.to_dtype(DType::F32).map_err(m)?).map_err(m)? * scale).map_err(m)?;
        if interleaved && wi < 2 {
            delta = permute_rows(&delta, if wi == 0 { n_head } else { n_kv }, true).map_err(m)?;
        }
        let base = lin.dequantize(&device).map_err(m)?;
        if base.dims() != delta.dims() {
            return Err(PluginError::resource(format!(
                "{}: {module}: B·A is {:?} but the weight is {:?}",
                dir.display(),
                delta.dims(),
                base.dims()
            )));
        }
        let merged = (base + delta).map_err(m)?;
        // Quantized bases run f32 activations; dense ones keep their dtype.
        let merged = if dtype == DType::F32 { merged } else { merged.to_dtype(dtype).map_err(m)? };
        *lin = Linear::dense(merged);
    }
    model.clear_prefix_cache();
    Ok(names.len())
}

/// Writes a loaded model as an HF llama directory (f32 safetensors in HF
/// layout, config.json, tokenizer.json, tokenizer_config.json): the form the
/// trainers start from and the merged model they write.
pub fn export_hf(model: &Llama, assets: &Assets, out: &Path) -> PluginResult<()> {
    let e = |e: candle_core::Error| PluginError::other(format!("export: {e}"));
    let io = |e: std::io::Error| PluginError::resource(format!("{}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(io)?;
    let s = &model.shape;
    let dense = |l: &Linear| l.dequantize(&model.device);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), model.embed.to_dtype(DType::F32).map_err(e)?);
    t.insert("model.norm.weight".into(), model.norm.to_dtype(DType::F32).map_err(e)?);
    t.insert("lm_head.weight".into(), dense(&model.output).map_err(e)?);
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (j, w) in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down].into_iter().enumerate() {
            let mut w = dense(w).map_err(e)?;
            if s.interleaved_rope && j < 2 {
                w = permute_rows(&w, if j == 0 { s.n_head } else { s.n_kv_head }, false).map_err(e)?;
            }
            t.insert(format!("{p}.{}.weight", LINEARS[j]), w);
        }
        if let Some(b) = &l.qkv_bias {
            for (n, b) in ["q_proj", "k_proj", "v_proj"].iter().zip(b) {
                t.insert(format!("{p}.self_attn.{n}.bias"), b.to_dtype(DType::F32).map_err(e)?);
            }
        }
        t.insert(format!("{p}.input_layernorm.weight"), l.attn_norm.to_dtype(DType::F32).map_err(e)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), l.ffn_norm.to_dtype(DType::F32).map_err(e)?);
    }
    candle_core::safetensors::save(&t, out.join("model.safetensors")).map_err(e)?;
    let vocab = model.embed.dim(0).map_err(e)?;
    let qwen = model.layers.first().is_some_and(|l| l.qkv_bias.is_some());
    let config = serde_json::json!({
        "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen { "qwen2" } else { "llama" },
        "hidden_size": s.hidden,
        "intermediate_size": model.layers.first().map(|l| dense(&l.up).and_then(|w| w.dim(0))).transpose().map_err(e)?,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_kv_head,
        "num_hidden_layers": s.n_layer,
        "head_dim": s.head_dim,
        "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.context,
        "vocab_size": vocab,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "eos_token_id": assets.eos_ids.first(),
        "bos_token_id": assets.tokenizer.token_to_id(&assets.bos),
        "torch_dtype": "float32",
    });
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(out.join(name), serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io)
    };
    write("config.json", &config)?;
    write(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": assets.bos, "eos_token": assets.eos, "chat_template": assets.template,
            "model_max_length": s.context, "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    assets
        .tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|err| PluginError::other(format!("{}: tokenizer.json: {err}", out.display())))?;
    Ok(())
}

/// The weight type of a GGUF export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 8-bit blocks (llama.cpp's `Q8_0`, file type 7).
    Q8_0,
    /// Half precision (file type 1).
    F16,
}

impl GgufType {
    fn ggml(self) -> candle_core::quantized::GgmlDType {
        match self {
            GgufType::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
            GgufType::F16 => candle_core::quantized::GgmlDType::F16,
        }
    }
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_MOSTLY_*).
    fn file_type(self) -> u32 {
        match self {
            GgufType::Q8_0 => 7,
            GgufType::F16 => 1,
        }
    }
}

/// Writes a loaded model as one GGUF file llama.cpp serves: the metadata of
/// the GGUF it was loaded from (architecture keys, tokenizer, chat
/// template) with `general.file_type` set to `ty`, and its weights under
/// llama.cpp's tensor names in `ty` (norms and biases f32, as llama.cpp
/// requires; a map whose rows are not a whole number of 32-wide blocks in
/// f16). The model's Q/K rows are already in llama.cpp's order (the GGUF
/// loader and the LoRA merge keep them so), so nothing is permuted. A model
/// loaded from an HF directory has no GGUF metadata: export it with
/// llama.cpp's `convert_hf_to_gguf.py` instead (refused here, naming it).
pub fn export_gguf(model: &Llama, assets: &Assets, out: &Path, ty: GgufType) -> PluginResult<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let md = assets.gguf_metadata.as_ref().ok_or_else(|| {
        PluginError::config(format!(
            "{}: a GGUF export needs a model loaded from a GGUF (its tokenizer and template metadata); this one came from an HF directory: \
             convert that with llama.cpp's convert_hf_to_gguf.py",
            out.display()
        ))
    })?;
    let e = |e: candle_core::Error| PluginError::other(format!("GGUF export: {e}"));
    let cpu = Device::Cpu;
    let quant = |w: &Tensor, ty: GgmlDType| -> candle_core::Result<QTensor> {
        let w = w.to_device(&cpu)?.to_dtype(DType::F32)?;
        let k = w.dims().last().copied().unwrap_or(0);
        // Q8_0 blocks are 32 wide along a row; narrower rows go to f16.
        let ty = if ty == GgmlDType::Q8_0 && !k.is_multiple_of(32) { GgmlDType::F16 } else { ty };
        QTensor::quantize(&w, ty)
    };
    let f32_of = |w: &Tensor| QTensor::quantize(&w.to_device(&cpu)?.to_dtype(DType::F32)?, GgmlDType::F32);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push(("token_embd.weight".into(), quant(&model.embed, ty.ggml()).map_err(e)?));
    tensors.push(("output_norm.weight".into(), f32_of(&model.norm).map_err(e)?));
    if !model.tied_output {
        tensors.push(("output.weight".into(), quant(&model.output.dequantize(&cpu).map_err(e)?, ty.ggml()).map_err(e)?));
    }
    const NAMES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), f32_of(&l.attn_norm).map_err(e)?));
        for (j, w) in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down].into_iter().enumerate() {
            tensors.push((format!("{p}.{}.weight", NAMES[j]), quant(&w.dequantize(&cpu).map_err(e)?, ty.ggml()).map_err(e)?));
        }
        if let Some(b) = &l.qkv_bias {
            for (n, b) in ["attn_q", "attn_k", "attn_v"].iter().zip(b) {
                tensors.push((format!("{p}.{n}.bias"), f32_of(b).map_err(e)?));
            }
        }
        tensors.push((format!("{p}.ffn_norm.weight"), f32_of(&l.ffn_norm).map_err(e)?));
    }
    let file_type = gguf_file::Value::U32(ty.file_type());
    let mut keys: Vec<&String> = md.keys().filter(|k| k.as_str() != "general.file_type").collect();
    keys.sort();
    let mut metadata: Vec<(&str, &gguf_file::Value)> = keys.iter().map(|k| (k.as_str(), &md[*k])).collect();
    metadata.push(("general.file_type", &file_type));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let io = |err: std::io::Error| PluginError::resource(format!("{}: {err}", out.display()));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Written beside and renamed: a reader never sees half a file.
    let tmp = out.with_extension(format!("gguf.{}.tmp", rir_models::unique()));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    gguf_file::write(&mut w, &metadata, &refs).map_err(e)?;
    std::io::Write::flush(&mut w).map_err(io)?;
    drop(w);
    std::fs::rename(&tmp, out).map_err(io)
}

/// Quantizes every dense linear map (and the output head) to Q8_0, the way
/// llama.cpp's `llama-quantize` would: a merged or trained model (dense f32
/// after LoRA) then decodes on the same integer kernels as a GGUF instead of
/// streaming f32 weights for each token. Maps already quantized, or whose
/// input width is not a multiple of 32, are left as they are. CPU only (the
/// own kernels are). Returns how many maps were quantized.
pub fn quantize_dense_q8_0(model: &mut Llama) -> PluginResult<usize> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    if !model.device.is_cpu() {
        return Err(PluginError::config("quantize: only on the CPU (on a GPU, run dense weights in bf16)"));
    }
    if model.dtype != DType::F32 {
        return Err(PluginError::config("quantize: needs f32 activations (dtype = \"auto\" or \"f32\")"));
    }
    let one = |lin: &mut Linear| -> candle_core::Result<bool> {
        let w = match lin {
            Linear::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.clone(),
            _ => return Ok(false),
        };
        let (_, k) = w.dims2()?;
        if !k.is_multiple_of(32) {
            return Ok(false);
        }
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
        *lin = Linear::quantized(q)?;
        Ok(true)
    };
    let e = |e: candle_core::Error| PluginError::other(format!("quantize: {e}"));
    let mut n = 0;
    for layer in &mut model.layers {
        for i in 0..LINEARS.len() {
            n += one(linear_mut(layer, i)).map_err(e)? as usize;
        }
    }
    n += one(&mut model.output).map_err(e)? as usize;
    model.clear_prefix_cache();
    Ok(n)
}
