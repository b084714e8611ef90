//! Conversions between the plain API types and their stable-ABI forms.

use abi_stable::std_types::{ROption, RString, RVec};

use crate::api::*;
use crate::error::PluginResult;
use crate::ffi::*;

fn rstrings(v: &[String]) -> RVec<RString> {
    v.iter().map(|s| RString::from(s.as_str())).collect()
}
fn strings(v: &[RString]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl From<Embeddings> for FfiMatrix {
    fn from(e: Embeddings) -> Self {
        FfiMatrix { rows: e.rows as u64, dim: e.dim as u64, data: e.data.into() }
    }
}
impl TryFrom<FfiMatrix> for Embeddings {
    type Error = crate::PluginError;
    fn try_from(m: FfiMatrix) -> PluginResult<Self> {
        Embeddings::new(m.rows as usize, m.dim as usize, m.data.into_vec())
    }
}

impl From<RetrieverInfo> for FfiRetrieverInfo {
    fn from(i: RetrieverInfo) -> Self {
        FfiRetrieverInfo {
            model: i.model.into(),
            fingerprint: i.fingerprint.into(),
            corpus_fingerprint: i.corpus_fingerprint.map(Into::into).into(),
            dim: i.dim as u64,
            max_length: i.max_length as u64,
            normalized: i.normalized,
        }
    }
}
impl From<FfiRetrieverInfo> for RetrieverInfo {
    fn from(i: FfiRetrieverInfo) -> Self {
        RetrieverInfo {
            model: i.model.into(),
            fingerprint: i.fingerprint.into(),
            corpus_fingerprint: i.corpus_fingerprint.into_option().map(Into::into),
            dim: i.dim as usize,
            max_length: i.max_length as usize,
            normalized: i.normalized,
        }
    }
}

impl From<&GenerationRequest> for FfiRequest {
    fn from(r: &GenerationRequest) -> Self {
        let (chat, text) = prompt_to_ffi(&r.prompt);
        FfiRequest {
            chat,
            text,
            n: r.n,
            temperature: r.temperature,
            top_p: r.top_p,
            max_tokens: r.max_tokens,
            stop: rstrings(&r.stop),
            seed: r.seed.into(),
            logprobs: r.logprobs,
        }
    }
}
impl From<&FfiRequest> for GenerationRequest {
    fn from(r: &FfiRequest) -> Self {
        GenerationRequest {
            prompt: prompt_from_ffi(&r.chat, &r.text),
            n: r.n,
            temperature: r.temperature,
            top_p: r.top_p,
            max_tokens: r.max_tokens,
            stop: strings(&r.stop),
            seed: r.seed.into_option(),
            logprobs: r.logprobs,
        }
    }
}

impl From<Completion> for FfiCompletion {
    fn from(c: Completion) -> Self {
        FfiCompletion {
            text: c.text.into(),
            finish_reason: c.finish_reason.into(),
            logprobs: c.logprobs.map(logprobs_to_ffi).into(),
            usage: c.usage.map(FfiUsage::from).into(),
        }
    }
}
impl From<FfiCompletion> for Completion {
    fn from(c: FfiCompletion) -> Self {
        Completion {
            text: c.text.into(),
            finish_reason: c.finish_reason.into(),
            logprobs: c.logprobs.into_option().map(logprobs_from_ffi),
            usage: c.usage.into_option().map(RequestUsage::from),
        }
    }
}

impl From<RequestUsage> for FfiUsage {
    fn from(u: RequestUsage) -> Self {
        FfiUsage { prompt_tokens: u.prompt_tokens.into(), completion_tokens: u.completion_tokens.into(), retries: u.retries, cached_tokens: u.cached_tokens.into() }
    }
}
impl From<FfiUsage> for RequestUsage {
    fn from(u: FfiUsage) -> Self {
        RequestUsage {
            prompt_tokens: u.prompt_tokens.into_option(),
            completion_tokens: u.completion_tokens.into_option(),
            retries: u.retries,
            cached_tokens: u.cached_tokens.into_option(),
        }
    }
}

impl From<&RewardItem> for FfiRewardItem {
    fn from(i: &RewardItem) -> Self {
        FfiRewardItem {
            query: i.query.as_str().into(),
            reference: i.reference.as_str().into(),
            candidates: rstrings(&i.candidates),
        }
    }
}
impl From<&FfiRewardItem> for RewardItem {
    fn from(i: &FfiRewardItem) -> Self {
        RewardItem {
            query: i.query.to_string(),
            reference: i.reference.to_string(),
            candidates: strings(&i.candidates),
        }
    }
}
impl From<RewardScores> for FfiRewardScores {
    fn from(s: RewardScores) -> Self {
        FfiRewardScores { baseline: s.baseline.into(), scores: s.scores.into(), query_weight: s.query_weight.into(), fallbacks: s.fallbacks }
    }
}
impl From<FfiRewardScores> for RewardScores {
    fn from(s: FfiRewardScores) -> Self {
        RewardScores { baseline: s.baseline.into_option(), scores: s.scores.into_vec(), query_weight: s.query_weight.into_option(), fallbacks: s.fallbacks }
    }
}

impl From<&TrainJob> for FfiTrainJob {
    fn from(j: &TrainJob) -> Self {
        FfiTrainJob {
            base_model: j.base_model.as_str().into(),
            data_file: j.data_file.to_string_lossy().as_ref().into(),
            output_dir: j.output_dir.to_string_lossy().as_ref().into(),
            params: j.params.as_str().into(),
            passage_vectors: j.passage_vectors.as_ref().map(|p| RString::from(p.to_string_lossy().as_ref())).into(),
        }
    }
}
impl From<&FfiTrainJob> for TrainJob {
    fn from(j: &FfiTrainJob) -> Self {
        TrainJob {
            base_model: j.base_model.to_string(),
            data_file: j.data_file.as_str().into(),
            output_dir: j.output_dir.as_str().into(),
            params: j.params.to_string(),
            passage_vectors: j.passage_vectors.as_ref().map(|p| p.as_str().into()).into_option(),
        }
    }
}
impl From<TrainReport> for FfiTrainReport {
    fn from(r: TrainReport) -> Self {
        FfiTrainReport {
            model_dir: r.model_dir.to_string_lossy().as_ref().into(),
            steps: r.steps,
            seconds: r.seconds,
            loss: r.loss.into(),
            extra_json: r.extra_json.into(),
        }
    }
}
impl From<FfiTrainReport> for TrainReport {
    fn from(r: FfiTrainReport) -> Self {
        TrainReport {
            model_dir: r.model_dir.as_str().into(),
            steps: r.steps,
            seconds: r.seconds,
            loss: r.loss.into_vec(),
            extra_json: r.extra_json.into(),
        }
    }
}

impl From<&Progress> for FfiProgress {
    fn from(p: &Progress) -> Self {
        FfiProgress {
            stage: p.stage.as_str().into(),
            done: p.done,
            total: p.total,
            loss: p.loss.into(),
            message: p.message.as_str().into(),
        }
    }
}
impl From<&FfiProgress> for Progress {
    fn from(p: &FfiProgress) -> Self {
        Progress {
            stage: p.stage.to_string(),
            done: p.done,
            total: p.total,
            loss: p.loss.into_option(),
            message: p.message.to_string(),
        }
    }
}

impl From<Hits> for FfiHits {
    fn from(h: Hits) -> Self {
        FfiHits { queries: h.queries as u64, k: h.k as u64, ids: h.ids.into(), scores: h.scores.into() }
    }
}
impl From<FfiHits> for Hits {
    fn from(h: FfiHits) -> Self {
        Hits { queries: h.queries as usize, k: h.k as usize, ids: h.ids.into_vec(), scores: h.scores.into_vec() }
    }
}

pub(crate) fn to_rstrings(v: &[String]) -> RVec<RString> {
    rstrings(v)
}
pub(crate) fn to_strings(v: &[RString]) -> Vec<String> {
    strings(v)
}

fn prompt_to_ffi(p: &Prompt) -> (RVec<FfiMessage>, ROption<RString>) {
    match p {
        Prompt::Chat(m) => (
            m.iter().map(|m| FfiMessage { role: m.role.as_str().into(), content: m.content.as_str().into() }).collect(),
            ROption::RNone,
        ),
        Prompt::Text(t) => (RVec::new(), ROption::RSome(t.as_str().into())),
    }
}
fn prompt_from_ffi(chat: &RVec<FfiMessage>, text: &ROption<RString>) -> Prompt {
    match text {
        ROption::RSome(t) => Prompt::Text(t.to_string()),
        ROption::RNone => {
            Prompt::Chat(chat.iter().map(|m| Message { role: m.role.to_string(), content: m.content.to_string() }).collect())
        }
    }
}

impl From<&ScoreRequest> for FfiScoreRequest {
    fn from(r: &ScoreRequest) -> Self {
        let (chat, text) = prompt_to_ffi(&r.prompt);
        FfiScoreRequest { chat, text, continuation: r.continuation.as_str().into() }
    }
}
impl From<&FfiScoreRequest> for ScoreRequest {
    fn from(r: &FfiScoreRequest) -> Self {
        ScoreRequest { prompt: prompt_from_ffi(&r.chat, &r.text), continuation: r.continuation.to_string() }
    }
}
fn logprobs_to_ffi(l: Vec<TokenLogprob>) -> RVec<FfiLogprob> {
    l.into_iter().map(|t| FfiLogprob { token: t.token.into(), logprob: t.logprob }).collect()
}
fn logprobs_from_ffi(l: RVec<FfiLogprob>) -> Vec<TokenLogprob> {
    l.into_iter().map(|t| TokenLogprob { token: t.token.into(), logprob: t.logprob }).collect()
}

impl From<Score> for FfiScore {
    fn from(s: Score) -> Self {
        FfiScore { logprob: s.logprob, tokens: logprobs_to_ffi(s.tokens), usage: s.usage.map(FfiUsage::from).into() }
    }
}
impl From<FfiScore> for Score {
    fn from(s: FfiScore) -> Self {
        Score { logprob: s.logprob, tokens: logprobs_from_ffi(s.tokens), usage: s.usage.into_option().map(RequestUsage::from) }
    }
}

impl From<TextRetrieverInfo> for FfiTextRetrieverInfo {
    fn from(i: TextRetrieverInfo) -> Self {
        FfiTextRetrieverInfo { model: i.model.into(), fingerprint: i.fingerprint.into() }
    }
}
impl From<FfiTextRetrieverInfo> for TextRetrieverInfo {
    fn from(i: FfiTextRetrieverInfo) -> Self {
        TextRetrieverInfo { model: i.model.into(), fingerprint: i.fingerprint.into() }
    }
}
