//! Both directions across the boundary.
//!
//! `Guarded*` wrap a plain-API implementation as an FFI object, catching every
//! panic and turning it into [`PluginError::Panic`] (a panic unwinding through
//! an `extern "C"` frame would abort the host). `Remote*` wrap an FFI object as
//! a plain-API implementation; the host calls plugins through them, and a
//! reward plugin calls the retriever and generator it is handed through them.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use abi_stable::{
    pointer_trait::{AsPtr, GetPointerKind},
    sabi_trait::TD_Opaque,
    sabi_types::RRef,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec},
};

use crate::api::*;
use crate::convert::{to_rstrings, to_strings};
use crate::error::{FfiError, PluginError, PluginResult};
use crate::ffi::*;

thread_local! {
    /// The last panic's message and location, filled by the hook that
    /// [`crate::export`] installs in plugin libraries.
    pub(crate) static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(m) = LAST_PANIC.with(|p| p.borrow_mut().take()) {
        return m;
    }
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs `f`, turning an error or a panic into an FFI error value.
pub fn guard<T>(f: impl FnOnce() -> PluginResult<T>) -> RResult<T, FfiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => RResult::RErr(PluginError::Panic(panic_message(payload)).into()),
    }
}

fn back<T>(r: RResult<T, FfiError>) -> PluginResult<T> {
    r.into_result().map_err(PluginError::from)
}

// ---- plain API -> FFI ---------------------------------------------------

impl<T: Retriever + ?Sized> Retriever for &T {
    fn info(&self) -> RetrieverInfo {
        (**self).info()
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        (**self).encode_queries(texts, instruction)
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        (**self).encode_corpus(texts)
    }
}
impl<T: Generator + ?Sized> Generator for &T {
    fn model_name(&self) -> String {
        (**self).model_name()
    }
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        (**self).generate(requests)
    }
    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        (**self).score(requests)
    }
    fn generate_with(&self, requests: &[GenerationRequest], progress: &dyn ProgressSink) -> PluginResult<Vec<Vec<Completion>>> {
        (**self).generate_with(requests, progress)
    }
}

pub struct GuardedRetriever<R>(pub R);
impl<R: Retriever> RetrieverFfi for GuardedRetriever<R> {
    fn info(&self) -> RResult<FfiRetrieverInfo, FfiError> {
        guard(|| Ok(self.0.info().into()))
    }
    fn encode_queries(&self, texts: RSlice<'_, RString>, instruction: ROption<RStr<'_>>) -> RResult<FfiMatrix, FfiError> {
        guard(|| {
            let texts = to_strings(texts.as_slice());
            let e = self.0.encode_queries(&texts, instruction.into_option().map(|s| s.as_str()))?;
            Ok(e.into())
        })
    }
    fn encode_corpus(&self, texts: RSlice<'_, RString>) -> RResult<FfiMatrix, FfiError> {
        guard(|| Ok(self.0.encode_corpus(&to_strings(texts.as_slice()))?.into()))
    }
}

pub struct GuardedGenerator<G>(pub G);
impl<G: Generator> GeneratorFfi for GuardedGenerator<G> {
    fn model_name(&self) -> RResult<RString, FfiError> {
        guard(|| Ok(self.0.model_name().into()))
    }
    fn generate(&self, requests: RSlice<'_, FfiRequest>) -> RResult<RVec<RVec<FfiCompletion>>, FfiError> {
        guard(|| {
            let reqs: Vec<GenerationRequest> = requests.iter().map(GenerationRequest::from).collect();
            let out = self.0.generate(&reqs)?;
            check_generation_shape(&reqs, &out)?;
            Ok(out.into_iter().map(|v| v.into_iter().map(FfiCompletion::from).collect()).collect())
        })
    }
    fn score(&self, requests: RSlice<'_, FfiScoreRequest>) -> RResult<RVec<FfiScore>, FfiError> {
        guard(|| {
            let reqs: Vec<ScoreRequest> = requests.iter().map(ScoreRequest::from).collect();
            let out = self.0.score(&reqs)?;
            check_score_shape(reqs.len(), &out)?;
            Ok(out.into_iter().map(FfiScore::from).collect())
        })
    }
    fn generate_with(
        &self,
        requests: RSlice<'_, FfiRequest>,
        progress: ProgressFfi_TO<'_, RRef<'_, ()>>,
    ) -> RResult<RVec<RVec<FfiCompletion>>, FfiError> {
        guard(|| {
            let reqs: Vec<GenerationRequest> = requests.iter().map(GenerationRequest::from).collect();
            let out = self.0.generate_with(&reqs, &RemoteProgress(progress))?;
            check_generation_shape(&reqs, &out)?;
            Ok(out.into_iter().map(|v| v.into_iter().map(FfiCompletion::from).collect()).collect())
        })
    }
}

/// A generator must score every request, with finite non-positive values.
fn check_score_shape(n: usize, out: &[Score]) -> PluginResult<()> {
    if out.len() != n {
        return Err(PluginError::other(format!("generator scored {} of {n} requests", out.len())));
    }
    if let Some(i) = out.iter().position(|s| !s.logprob.is_finite() || s.logprob > 1e-6) {
        return Err(PluginError::other(format!("generator returned log-probability {} for request {i}", out[i].logprob)));
    }
    Ok(())
}

/// A generator must answer every request with exactly `n` completions.
fn check_generation_shape(reqs: &[GenerationRequest], out: &[Vec<Completion>]) -> PluginResult<()> {
    if out.len() != reqs.len() {
        return Err(PluginError::other(format!("generator answered {} of {} requests", out.len(), reqs.len())));
    }
    for (i, (r, o)) in reqs.iter().zip(out).enumerate() {
        if o.len() != r.n as usize {
            return Err(PluginError::other(format!("request {i} asked for n={} completions, got {}", r.n, o.len())));
        }
    }
    Ok(())
}

pub struct GuardedReward<W>(pub W);
impl<W: Reward> RewardFfi for GuardedReward<W> {
    fn score(
        &self,
        retriever: ROption<RetrieverRef<'_>>,
        generator: ROption<GeneratorRef<'_>>,
        items: RSlice<'_, FfiRewardItem>,
    ) -> RResult<RVec<FfiRewardScores>, FfiError> {
        guard(|| {
            let r = retriever.into_option().map(RemoteRetriever::new).transpose()?;
            let g = generator.into_option().map(RemoteGenerator::new).transpose()?;
            let ctx = RewardContext {
                retriever: r.as_ref().map(|r| r as &dyn Retriever),
                generator: g.as_ref().map(|g| g as &dyn Generator),
            };
            let items: Vec<RewardItem> = items.iter().map(RewardItem::from).collect();
            let out = self.0.score(&ctx, &items)?;
            if out.len() != items.len() {
                return Err(PluginError::other(format!("reward scored {} of {} items", out.len(), items.len())));
            }
            Ok(out.into_iter().map(FfiRewardScores::from).collect())
        })
    }
}

struct GuardedProgress<'a>(&'a dyn ProgressSink);
impl ProgressFfi for GuardedProgress<'_> {
    fn report(&self, progress: &FfiProgress) {
        // A panicking progress sink must not unwind into the plugin.
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.report(&Progress::from(progress))));
    }
    fn cancelled(&self) -> bool {
        catch_unwind(AssertUnwindSafe(|| self.0.cancelled())).unwrap_or(true)
    }
}

struct RemoteProgress<'a, 'b>(ProgressFfi_TO<'a, RRef<'b, ()>>);
impl ProgressSink for RemoteProgress<'_, '_> {
    fn report(&self, progress: &Progress) {
        self.0.report(&FfiProgress::from(progress))
    }
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
}

pub struct GuardedTrainer<T>(pub T);
impl<T: Trainer> TrainerFfi for GuardedTrainer<T> {
    fn train(&self, job: &FfiTrainJob, progress: ProgressFfi_TO<'_, RRef<'_, ()>>) -> RResult<FfiTrainReport, FfiError> {
        guard(|| Ok(self.0.train(&TrainJob::from(job), &RemoteProgress(progress))?.into()))
    }
}

pub struct GuardedIndex<I>(pub I);
impl<I: Index> IndexFfi for GuardedIndex<I> {
    fn dim(&self) -> u64 {
        self.0.dim() as u64
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn add(&mut self, data: RSlice<'_, f32>, rows: u64, dim: u64) -> RResult<(), FfiError> {
        guard(|| self.0.add(&Embeddings::new(rows as usize, dim as usize, data.to_vec())?))
    }
    fn search(&self, data: RSlice<'_, f32>, rows: u64, dim: u64, k: u64) -> RResult<FfiHits, FfiError> {
        guard(|| {
            let q = Embeddings::new(rows as usize, dim as usize, data.to_vec())?;
            Ok(self.0.search(&q, k as usize)?.into())
        })
    }
    fn save(&self, path: RStr<'_>) -> RResult<(), FfiError> {
        guard(|| self.0.save(Path::new(path.as_str())))
    }
    fn load(&mut self, path: RStr<'_>) -> RResult<(), FfiError> {
        guard(|| self.0.load(Path::new(path.as_str())))
    }
}

pub struct GuardedTextRetriever<T>(pub T);
impl<T: TextRetriever> TextRetrieverFfi for GuardedTextRetriever<T> {
    fn info(&self) -> RResult<FfiTextRetrieverInfo, FfiError> {
        guard(|| Ok(self.0.info().into()))
    }
    fn build(&mut self, dir: RStr<'_>, texts: RSlice<'_, RString>, progress: ProgressFfi_TO<'_, RRef<'_, ()>>) -> RResult<(), FfiError> {
        guard(|| self.0.build(Path::new(dir.as_str()), &to_strings(texts.as_slice()), &RemoteProgress(progress)))
    }
    fn open(&mut self, dir: RStr<'_>) -> RResult<(), FfiError> {
        guard(|| self.0.open(Path::new(dir.as_str())))
    }
    fn len(&self) -> u64 {
        // A panic here must not unwind through the boundary; 0 reads as "nothing open".
        catch_unwind(AssertUnwindSafe(|| self.0.len() as u64)).unwrap_or(0)
    }
    fn search(&self, queries: RSlice<'_, RString>, k: u64) -> RResult<FfiHits, FfiError> {
        guard(|| Ok(self.0.search(&to_strings(queries.as_slice()), k as usize)?.into()))
    }
}

// ---- FFI -> plain API ---------------------------------------------------

/// A retriever on the other side of the boundary. `info` is fetched once.
pub struct RemoteRetriever<'a, P: GetPointerKind = RRef<'a, ()>> {
    inner: RetrieverFfi_TO<'a, P>,
    info: RetrieverInfo,
}
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> RemoteRetriever<'a, P> {
    pub fn new(inner: RetrieverFfi_TO<'a, P>) -> PluginResult<Self> {
        let info = back(inner.info())?.into();
        Ok(Self { inner, info })
    }
}
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> Retriever for RemoteRetriever<'a, P>
where
    RetrieverFfi_TO<'a, P>: Send + Sync,
{
    fn info(&self) -> RetrieverInfo {
        self.info.clone()
    }
    fn encode_queries(&self, texts: &[String], instruction: Option<&str>) -> PluginResult<Embeddings> {
        let texts = to_rstrings(texts);
        let instruction = instruction.map(RStr::from_str).into();
        back(self.inner.encode_queries(texts.as_rslice(), instruction))?.try_into()
    }
    fn encode_corpus(&self, texts: &[String]) -> PluginResult<Embeddings> {
        let texts = to_rstrings(texts);
        back(self.inner.encode_corpus(texts.as_rslice()))?.try_into()
    }
}

/// A generator on the other side of the boundary. The model name is fetched once.
pub struct RemoteGenerator<'a, P: GetPointerKind = RRef<'a, ()>> {
    inner: GeneratorFfi_TO<'a, P>,
    model: String,
}
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> RemoteGenerator<'a, P> {
    pub fn new(inner: GeneratorFfi_TO<'a, P>) -> PluginResult<Self> {
        let model = back(inner.model_name())?.into();
        Ok(Self { inner, model })
    }
}
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> Generator for RemoteGenerator<'a, P>
where
    GeneratorFfi_TO<'a, P>: Send + Sync,
{
    fn model_name(&self) -> String {
        self.model.clone()
    }
    fn generate(&self, requests: &[GenerationRequest]) -> PluginResult<Vec<Vec<Completion>>> {
        let reqs: RVec<FfiRequest> = requests.iter().map(FfiRequest::from).collect();
        let out = back(self.inner.generate(reqs.as_rslice()))?;
        let out: Vec<Vec<Completion>> =
            out.into_iter().map(|v| v.into_iter().map(Completion::from).collect()).collect();
        check_generation_shape(requests, &out)?;
        Ok(out)
    }
    fn score(&self, requests: &[ScoreRequest]) -> PluginResult<Vec<Score>> {
        let reqs: RVec<FfiScoreRequest> = requests.iter().map(FfiScoreRequest::from).collect();
        let out: Vec<Score> = back(self.inner.score(reqs.as_rslice()))?.into_iter().map(Score::from).collect();
        check_score_shape(requests.len(), &out)?;
        Ok(out)
    }
    fn generate_with(&self, requests: &[GenerationRequest], progress: &dyn ProgressSink) -> PluginResult<Vec<Vec<Completion>>> {
        let reqs: RVec<FfiRequest> = requests.iter().map(FfiRequest::from).collect();
        let p = GuardedProgress(progress);
        let p = ProgressFfi_TO::from_ptr(RRef::new(&p), TD_Opaque);
        let out = back(self.inner.generate_with(reqs.as_rslice(), p))?;
        let out: Vec<Vec<Completion>> =
            out.into_iter().map(|v| v.into_iter().map(Completion::from).collect()).collect();
        check_generation_shape(requests, &out)?;
        Ok(out)
    }
}

pub struct RemoteReward<'a, P: GetPointerKind = RRef<'a, ()>>(pub RewardFfi_TO<'a, P>);
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> Reward for RemoteReward<'a, P>
where
    RewardFfi_TO<'a, P>: Send + Sync,
{
    fn score(&self, ctx: &RewardContext<'_>, items: &[RewardItem]) -> PluginResult<Vec<RewardScores>> {
        let gr = ctx.retriever.map(GuardedRetriever);
        let gg = ctx.generator.map(GuardedGenerator);
        let r = gr.as_ref().map(|g| RetrieverFfi_TO::from_ptr(RRef::new(g), TD_Opaque));
        let g = gg.as_ref().map(|g| GeneratorFfi_TO::from_ptr(RRef::new(g), TD_Opaque));
        let items: RVec<FfiRewardItem> = items.iter().map(FfiRewardItem::from).collect();
        let out = back(self.0.score(r.into(), g.into(), items.as_rslice()))?;
        Ok(out.into_iter().map(RewardScores::from).collect())
    }
}

pub struct RemoteTrainer<'a, P: GetPointerKind = RRef<'a, ()>>(pub TrainerFfi_TO<'a, P>);
impl<'a, P: AsPtr<PtrTarget = ()> + GetPointerKind> Trainer for RemoteTrainer<'a, P>
where
    TrainerFfi_TO<'a, P>: Send + Sync,
{
    fn train(&self, job: &TrainJob, progress: &dyn ProgressSink) -> PluginResult<TrainReport> {
        let p = GuardedProgress(progress);
        let p = ProgressFfi_TO::from_ptr(RRef::new(&p), TD_Opaque);
        Ok(back(self.0.train(&FfiTrainJob::from(job), p))?.into())
    }
}

/// An owned index on the other side of the boundary.
pub struct RemoteIndex(pub IndexBox);
impl Index for RemoteIndex {
    fn dim(&self) -> usize {
        self.0.dim() as usize
    }
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    fn add(&mut self, v: &Embeddings) -> PluginResult<()> {
        back(self.0.add(RSlice::from_slice(&v.data), v.rows as u64, v.dim as u64))
    }
    fn search(&self, q: &Embeddings, k: usize) -> PluginResult<Hits> {
        Ok(back(self.0.search(RSlice::from_slice(&q.data), q.rows as u64, q.dim as u64, k as u64))?.into())
    }
    fn save(&self, path: &Path) -> PluginResult<()> {
        back(self.0.save(RStr::from_str(&path.to_string_lossy())))
    }
    fn load(&mut self, path: &Path) -> PluginResult<()> {
        back(self.0.load(RStr::from_str(&path.to_string_lossy())))
    }
}

/// An owned text retriever on the other side of the boundary. `info` is fetched once.
pub struct RemoteTextRetriever {
    inner: TextRetrieverBox,
    info: TextRetrieverInfo,
}
impl RemoteTextRetriever {
    pub fn new(inner: TextRetrieverBox) -> PluginResult<Self> {
        let info = back(inner.info())?.into();
        Ok(Self { inner, info })
    }
}
impl TextRetriever for RemoteTextRetriever {
    fn info(&self) -> TextRetrieverInfo {
        self.info.clone()
    }
    fn build(&mut self, dir: &Path, texts: &[String], progress: &dyn ProgressSink) -> PluginResult<()> {
        let p = GuardedProgress(progress);
        let p = ProgressFfi_TO::from_ptr(RRef::new(&p), TD_Opaque);
        let texts = to_rstrings(texts);
        back(self.inner.build(RStr::from_str(&dir.to_string_lossy()), texts.as_rslice(), p))
    }
    fn open(&mut self, dir: &Path) -> PluginResult<()> {
        back(self.inner.open(RStr::from_str(&dir.to_string_lossy())))
    }
    fn len(&self) -> usize {
        self.inner.len() as usize
    }
    fn search(&self, queries: &[String], k: usize) -> PluginResult<Hits> {
        let q = to_rstrings(queries);
        Ok(back(self.inner.search(q.as_rslice(), k as u64))?.into())
    }
}
