//! Llama-architecture models on candle, shared by the llama-generator and
//! dpo-trainer plugins (a plugin crate cannot link another plugin's library:
//! each exports the same loader symbol).
//!
//! - `load`: GGUF (llama.cpp layout) and HF safetensors directories, PEFT
//!   LoRA merging, export as an HF directory;
//! - `model`: the inference forward with an external KV cache (batched,
//!   left-padded, batch-invariant on CPU);
//! - `attention`: that forward's causal attention on the CPU, in tiles
//!   that give the row-by-row definition's numbers bit for bit;
//! - `prefix_cache`: prompt prefixes' keys and values kept across calls;
//! - `quant`: Q4_1 / Q8_0 matrix products for x86;
//! - `sampler`: greedy and nucleus sampling;
//! - `train`: a differentiable forward with LoRA adapters, for training.

mod attention;
mod gguf_tokenizer;
pub mod load;
pub mod model;
pub mod prefix_cache;
pub mod prefs;
pub mod quant;
pub mod rope;
pub mod sampler;
pub mod train;

pub use load::{export_gguf, export_hf, load_gguf, load_hf, load_model, merge_lora, model_file, quantize_dense_q8_0, Assets, GgufType};
pub use model::{Kept, KvCache, Linear, Llama, Shape};
pub use prefix_cache::PrefixStats;

use rir_sdk::{Message, PluginError, PluginResult};

/// Renders a chat with the model's Jinja template, the generation prompt
/// appended (as llama.cpp and transformers do).
pub fn render_chat(assets: &Assets, messages: &[Message]) -> PluginResult<String> {
    let tpl = assets
        .template
        .as_deref()
        .ok_or_else(|| PluginError::Unsupported("the model has no chat template; send a text prompt".into()))?;
    let mut env = minijinja::Environment::new();
    env.add_template("chat", tpl).map_err(|e| PluginError::resource(format!("chat template: {e}")))?;
    let msgs: Vec<_> = messages.iter().map(|Message { role, content }| minijinja::context! { role, content }).collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs, add_generation_prompt => true,
                bos_token => assets.bos, eos_token => assets.eos,
            })
        })
        .map_err(|e| PluginError::input(format!("chat template: {e}")))
}
