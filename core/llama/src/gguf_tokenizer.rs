//! A byte-level BPE tokenizer built from GGUF metadata, as llama.cpp builds
//! it: vocabulary and merges from `tokenizer.ggml.*`, control tokens matched
//! whole, and the pre-tokenizer `tokenizer.ggml.pre` names: for Qwen2
//! (`qwen2`) its own split pattern (letters with one leading non-letter,
//! single digits, punctuation runs, newlines) before byte-level mapping;
//! otherwise (SmolLM2's `smollm`, GPT-2's default) digits split one by one
//! before GPT-2's byte-level pre-tokenisation.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(c: &Content, key: &str) -> Result<Vec<String>, String> {
    match c.metadata.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| format!("{key}: not a list of strings")))
            .collect(),
        _ => Err(format!("the GGUF has no `{key}` (needed to build the tokenizer)")),
    }
}

pub fn from_gguf(c: &Content) -> Result<Tokenizer, String> {
    let model = c.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
    if model.as_deref() != Some("gpt2") {
        return Err(format!(
            "tokenizer.ggml.model is {model:?}: only byte-level BPE (\"gpt2\") GGUF tokenizers are supported; put a tokenizer.json next to the model instead"
        ));
    }
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(c, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or(format!("bad merge {m:?}")))
        .collect::<Result<_, _>>()?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: ahash::AHashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| format!("BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = c.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let steps = match pre.as_str() {
        // Qwen2's tokenizer.json pattern (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
        "qwen2" => vec![
            PreTokenizerWrapper::Split(
                Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| format!("pre-tokenizer: {e}"))?,
            ),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ],
        _ => vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ],
    };
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control (3) and user-defined (4) tokens are matched as whole pieces of text.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(s, t)| AddedToken::from(s.clone(), *t == 3))
        .collect();
    tok.add_special_tokens(&special);
    Ok(tok)
}
