//! The llama generator's model formats and batching on SmolLM2-135M-Instruct:
//! batched decoding equals one-at-a-time decoding, the GGUF exported as an HF
//! safetensors directory loads and generates like the GGUF, PEFT LoRA
//! adapters merge the same into either layout, and malformed models fail
//! with clear errors.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use rir_plugin_llama_generator::LlamaGenerator;
use rir_sdk::{GenerationRequest, Generator, Message, Prompt};

fn load(extra: &str) -> LlamaGenerator {
    LlamaGenerator::new(&format!("model = {SMOLLM:?}\n{extra}")).unwrap()
}

fn chat(q: &str) -> Prompt {
    Prompt::Chat(vec![Message::user(q.to_string())])
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// Last-position logits of one prompt.
fn logits(g: &LlamaGenerator, text: &str) -> Vec<f32> {
    let ids = g.encode(&g.render(&chat(text)).unwrap()).unwrap();
    let (l, _) = g.model.prefill(&[&ids]).unwrap();
    l.get(0).unwrap().to_vec1().unwrap()
}

const PROMPTS: [&str; 5] = [
    "What is BM25?",
    "Write one sentence about protein folding in yeast cells under heat stress.",
    "Name a prime number.",
    "Explain dense retrieval to a student in two sentences, mentioning embeddings and nearest neighbours.",
    "Hi",
];

#[test]
fn batched_decoding_equals_sequential_decoding() {
    // Every prefill path: the integer kernels, the f32 GEMM and (where the
    // CPU has AVX512-BF16) the bf16 GEMM.
    let mut paths = vec!["quantized", "dense"];
    if rir_models::bf16::available() {
        paths.push("bf16");
    }
    for prefill in paths {
        batched_equals_sequential(&format!("prefill = {prefill:?}"));
    }
}

fn batched_equals_sequential(prefill: &str) {
    eprintln!("{prefill}");
    let one = load(&format!("max_batch = 1\n{prefill}"));
    let many = load(&format!("max_batch = 8\n{prefill}"));
    let mut reqs: Vec<GenerationRequest> = PROMPTS.iter().map(|p| GenerationRequest::greedy(chat(p), 24)).collect();
    // Sampled requests with several samples each, fanned out from one prefill.
    for p in &PROMPTS[..2] {
        let mut r = GenerationRequest::greedy(chat(p), 16);
        r.n = 3;
        r.temperature = 0.9;
        r.top_p = 0.9;
        r.seed = Some(7);
        reqs.push(r);
    }
    let a = one.generate(&reqs).unwrap();
    let b = many.generate(&reqs).unwrap();
    let total: usize = a.iter().map(|v| v.len()).sum();
    let same = a.iter().flatten().zip(b.iter().flatten()).filter(|(x, y)| x.text == y.text).count();
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        if x.text != y.text {
            eprintln!("batched differs:\n one  {:?}\n many {:?}", x.text, y.text);
        }
    }
    eprintln!("batched (max_batch 8) vs one at a time: {same}/{total} completions identical");
    assert_eq!(b.iter().map(|v| v.len()).collect::<Vec<_>>(), vec![1, 1, 1, 1, 1, 3, 3]);
    // Every kernel computes a row alone (attention skips pads, in a fixed
    // order), so batching changes no number at all.
    assert_eq!(same, total, "only {same}/{total} identical");
    let ids: Vec<Vec<u32>> = PROMPTS.iter().map(|p| many.encode(&many.render(&chat(p)).unwrap()).unwrap()).collect();
    let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let (batch, mut cache) = many.model.prefill(&refs).unwrap();
    for (i, r) in refs.iter().enumerate() {
        let (alone, _) = many.model.prefill(&[r]).unwrap();
        let (x, y): (Vec<f32>, Vec<f32>) = (alone.get(0).unwrap().to_vec1().unwrap(), batch.get(i).unwrap().to_vec1().unwrap());
        let diff = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("prompt {i} ({} tokens, {} pad): max |logit difference| alone vs in the batch {diff:.2e}", r.len(), cache.pads[i]);
        assert_eq!(diff, 0.0, "prompt {i}");
    }
    // A decode step after dropping rows still matches.
    let keep = [4usize, 1];
    let mut small = cache.select(&keep).unwrap();
    let step = many.model.step(&[28, 28], &mut small).unwrap();
    let full = many.model.step(&[28; 5], &mut cache).unwrap();
    for (j, &k) in keep.iter().enumerate() {
        let (x, y): (Vec<f32>, Vec<f32>) = (step.get(j).unwrap().to_vec1().unwrap(), full.get(k).unwrap().to_vec1().unwrap());
        assert_eq!(x, y);
    }
    // The three samples of a request differ (distinct seeds), and all finish.
    assert!(b[5][0].text != b[5][1].text || b[5][1].text != b[5][2].text);
    assert!(b.iter().flatten().all(|c| c.finish_reason == "stop" || c.finish_reason == "length"));
}

/// `keep_dense = false` makes the f32 copy of each matrix per product and
/// drops it: every number is the kept copies', bit for bit — prompts
/// batched and alone, a lone row, decode steps, scored continuations and
/// generated text — and the fingerprint is the same.
#[test]
fn dense_prefill_without_kept_copies_gives_the_same_numbers() {
    let kept = load("prefill = \"dense\"");
    let per_call = load("prefill = \"dense\"\nkeep_dense = false");
    assert_eq!(kept.fingerprint, per_call.fingerprint);
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let ids: Vec<Vec<u32>> = PROMPTS.iter().map(|p| kept.encode(&kept.render(&chat(p)).unwrap()).unwrap()).collect();
    let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    for batch in [&refs[..], &refs[..1]] {
        let (a, mut ac) = kept.model.prefill(batch).unwrap();
        let (b, mut bc) = per_call.model.prefill(batch).unwrap();
        assert_eq!(bits(&a), bits(&b), "{} prompts: last-position logits", batch.len());
        let n = batch.len();
        assert_eq!(bits(&kept.model.step(&vec![28; n], &mut ac).unwrap()), bits(&per_call.model.step(&vec![28; n], &mut bc).unwrap()));
        // Scoring runs continuations through the dense path too.
        let cont: Vec<&[u32]> = vec![&[28u32, 1000, 17][..]; n];
        assert_eq!(bits(&kept.model.extend(&cont, &mut ac).unwrap()), bits(&per_call.model.extend(&cont, &mut bc).unwrap()));
    }
    // And the integer prefill does differ (the test would see a no-op).
    let quantized = load("");
    assert_ne!(bits(&quantized.model.prefill(&refs[..1]).unwrap().0), bits(&per_call.model.prefill(&refs[..1]).unwrap().0));
    let reqs: Vec<GenerationRequest> = PROMPTS.iter().map(|p| GenerationRequest::greedy(chat(p), 16)).collect();
    let texts = |g: &LlamaGenerator| g.generate(&reqs).unwrap().into_iter().map(|v| v[0].text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&kept), texts(&per_call));
    // Without the dense prefill the setting means nothing: refused by name.
    let e = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nkeep_dense = false")).err().unwrap().to_string();
    assert!(e.contains("keep_dense"), "{e}");
}

/// `prefill = "bf16"` runs prompts on bf16 copies: its own fingerprint,
/// half the f32 copies' bytes, and numbers close to the f32 GEMM's — the
/// same next token for every prompt, logits and scored log-probabilities
/// within bf16's rounding. Where the CPU lacks AVX512-BF16 it runs the
/// dense path under dense's fingerprint.
#[test]
fn bf16_prefill_is_close_to_the_f32_prefill() {
    let dense = load("prefill = \"dense\"");
    let bf16 = load("prefill = \"bf16\"");
    if !rir_models::bf16::available() {
        assert_eq!(bf16.fingerprint, dense.fingerprint);
        eprintln!("no AVX512-BF16: prefill = \"bf16\" ran the dense path, as documented");
        return;
    }
    assert_ne!(bf16.fingerprint, dense.fingerprint);
    let (mut f32_bytes, mut bf16_bytes) = (0usize, 0usize);
    for (a, b) in dense.model.layers.iter().zip(&bf16.model.layers) {
        for (x, y) in [(&a.wq, &b.wq), (&a.up, &b.up), (&a.down, &b.down)] {
            match (x, y) {
                (rir_llama::Linear::Quant(_, Some(rir_llama::Kept::F32(t))), rir_llama::Linear::Quant(_, Some(rir_llama::Kept::Bf16(p)))) => {
                    f32_bytes += t.elem_count() * 4;
                    bf16_bytes += p.bytes();
                }
                _ => panic!("both models keep copies of the layer matrices"),
            }
        }
    }
    assert_eq!(f32_bytes, 2 * bf16_bytes, "bf16 copies are half the f32 ones");
    let mut worst = 1f64;
    for p in PROMPTS {
        let (x, y) = (logits(&dense, p), logits(&bf16, p));
        let c = cosine(&x, &y);
        let arg = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        eprintln!("{p:?}: cosine of last-position logits bf16 vs f32 {c:.6}, max |diff| {:.3}", x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
        assert_eq!(arg(&x), arg(&y), "{p:?}: the next token");
        worst = worst.min(c);
    }
    assert!(worst > 0.999, "cosine {worst}");
    // Scored continuations (the teacher's query likelihoods) agree closely.
    let req = |c: &str| rir_sdk::ScoreRequest { prompt: chat("Write a search query for: dense retrieval with embeddings."), continuation: c.to_string() };
    let reqs = vec![req("dense retrieval embeddings"), req("nearest neighbour search of text vectors"), req("protein folding")];
    let (a, b) = (dense.score(&reqs).unwrap(), bf16.score(&reqs).unwrap());
    for (x, y) in a.iter().zip(&b) {
        eprintln!("score f32 {:.4} bf16 {:.4}", x.logprob, y.logprob);
        assert!((x.logprob - y.logprob).abs() < 0.05 * x.logprob.abs().max(1.0), "{} vs {}", x.logprob, y.logprob);
    }
    let e = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nprefill = \"bf16\"\nkeep_dense = false")).err().unwrap().to_string();
    assert!(e.contains("keep_dense"), "{e}");
}

/// `prefill = "auto"` (the quickstart's) is `bf16` where the CPU runs it
/// faster than `dense` (AMD's AVX512-BF16) and `dense` elsewhere (Intel's
/// Xeons do half the f32 FMA's multiply-adds with `vdpbf16ps`): the mode it picks is
/// the CPU's, and its fingerprint is that mode's, so it shares the explicit
/// setting's cache.
#[test]
fn auto_prefill_is_bf16_where_it_is_faster_and_dense_elsewhere() {
    let auto = load("prefill = \"auto\"");
    let want = if rir_models::bf16::not_faster().is_none() { "bf16" } else { "dense" };
    eprintln!("CPU {:?}: prefill = \"auto\" picks {want} ({:?})", rir_models::bf16::cpu_vendor(), rir_models::bf16::not_faster());
    assert_eq!(auto.fingerprint, load(&format!("prefill = {want:?}")).fingerprint);
    let other = if want == "bf16" { "dense" } else { "quantized" };
    assert_ne!(auto.fingerprint, load(&format!("prefill = {other:?}")).fingerprint);
    if rir_models::bf16::cpu_vendor() == "GenuineIntel" {
        assert_eq!(want, "dense", "Intel's AVX512-BF16 runs at half the f32 FMA's rate");
    }
    let e = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nprefill = \"auto\"\nkeep_dense = false")).err().unwrap().to_string();
    assert!(e.contains("keep_dense"), "{e}");
}

/// Also for other models: RIR_TEST_PREFIX_MODEL names one (Qwen2.5 1.5B's
/// K-quants were checked so, docs/BENCHMARKS.md).
/// Prompts of different lengths in one batch (left-padded): the pads are
/// left out of the norms and matrix products, and every prompt's logits and
/// next steps are those it gets alone, bit for bit, on both prefill paths.
#[test]
fn padded_batches_equal_each_prompt_alone_bit_for_bit() {
    for prefill in ["quantized", "dense"] {
        let g = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nprefill = {prefill:?}")).unwrap();
        let texts = [
            "Vitamin D lowers the risk of fractures in older adults, according to a large trial.",
            "BM25 is a ranking function.",
            "Sleep loss impairs memory consolidation, and the hippocampus replays the day's events during slow-wave sleep, which a night without sleep interrupts.",
        ];
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| g.encode(t).unwrap()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        assert_eq!(rir_llama::model::shared_prefix(&refs), None);
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (batch, mut bc) = g.model.prefill_whole(&refs).unwrap();
        assert!(bc.pads.iter().filter(|&&p| p > 0).count() == 2, "{:?}", bc.pads);
        let mut steps = Vec::new();
        for t in [28u32, 1000] {
            steps.push(g.model.step(&[t; 3], &mut bc).unwrap());
        }
        for (i, r) in refs.iter().enumerate() {
            let (alone, mut ac) = g.model.prefill_whole(&[r]).unwrap();
            assert_eq!(bits(&batch.get(i).unwrap()), bits(&alone.get(0).unwrap()), "{prefill}: prompt {i}'s last-position logits");
            for (t, s) in [28u32, 1000].iter().zip(&steps) {
                let a = g.model.step(&[*t], &mut ac).unwrap();
                assert_eq!(bits(&s.get(i).unwrap()), bits(&a.get(0).unwrap()), "{prefill}: prompt {i}'s step after the prefill");
            }
        }
    }
}

#[test]
fn prefill_shares_a_prefix_bit_for_bit() {
    let model = std::env::var("RIR_TEST_PREFIX_MODEL").unwrap_or_else(|_| SMOLLM.to_string());
    for prefill in ["quantized", "dense"] {
        let g = LlamaGenerator::new(&format!("model = {model:?}\nprefill = {prefill:?}")).unwrap();
        // One instruction before different queries, as the augmentation and
        // query prompts are: the chat template and the instruction are shared.
        let instruction = "Given a scientific claim, retrieve documents that support or refute the claim.\nWrite a brief paper abstract for the following claim. Reply with the abstract only.\n\nclaim: ";
        // The second set spreads wider than the shared prefix: its shortest
        // prompt's pads reach the column where the prefix ends.
        let long = "Aspirin use is linked to fewer colorectal cancers in older adults, and the benefit appears after ten years of daily use, is larger for proximal tumours, does not depend on the dose above 75 mg, and is seen in trials as well as in cohort studies of nurses and health professionals followed for decades; bleeding risk rises with age, so the balance of harm and benefit differs between people in their fifties and their seventies.";
        for queries in [
            &["Vitamin D lowers the risk of fractures.", "Aspirin use is linked to fewer colorectal cancers in older adults.", "BM25 is a ranking function.", "Sleep loss impairs memory consolidation."],
            &[long, "BM25 is a ranking function.", long, "Sleep loss impairs memory consolidation and the hippocampus replays the day."],
        ] {
            let ids: Vec<Vec<u32>> = queries.iter().map(|q| g.encode(&g.render(&chat(&format!("{instruction}{q}"))).unwrap()).unwrap()).collect();
            let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
            let p = rir_llama::model::shared_prefix(&refs).expect("the prompts share a prefix worth running once");
            let spread = refs.iter().map(|r| r.len()).max().unwrap() - refs.iter().map(|r| r.len()).min().unwrap();
            eprintln!("{prefill}: {} prompts of {:?} tokens share {p} (spread {spread})", refs.len(), refs.iter().map(|r| r.len()).collect::<Vec<_>>());
            assert!(p > 40);
            let (shared, mut sc) = g.model.prefill(&refs).unwrap();
            let (whole, mut wc) = g.model.prefill_whole(&refs).unwrap();
            assert_eq!(sc.pads, wc.pads);
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&shared), bits(&whole), "{prefill}: last-position logits (spread {spread})");
            // The decode steps that follow see the same cache.
            for t in [28u32, 1000, 5] {
                let a = g.model.step(&[t; 4], &mut sc).unwrap();
                let b = g.model.step(&[t; 4], &mut wc).unwrap();
                assert_eq!(bits(&a), bits(&b), "{prefill}: step after the prefill (spread {spread})");
            }
            if queries[0] == long {
                assert!(spread > p, "the second set must spread wider than its prefix");
            }
        }
    }
    // Nothing to share: one prompt, or prompts that differ from the start.
    assert_eq!(rir_llama::model::shared_prefix(&[&[1, 2, 3][..]]), None);
    assert_eq!(rir_llama::model::shared_prefix(&[&[1, 2, 3][..], &[2, 2, 3][..]]), None);
    // Where the lengths spread wider than the shared prefix, the short
    // prompts' pads reach the column where it ends: they take nothing from
    // it, and sharing is worth it only if the long ones save enough.
    let long: Vec<u32> = (0..100).collect();
    let short: Vec<u32> = (0..30).chain([7, 7]).collect();
    assert_eq!(rir_llama::model::shared_prefix(&[&long[..], &short[..]]), None);
    let long2: Vec<u32> = (0..30).chain(200..270).collect();
    assert_eq!(rir_llama::model::shared_prefix(&[&long[..], &long2[..], &short[..]]), Some(30));
    let a: Vec<u32> = (0..40).chain([1, 2]).collect();
    let b: Vec<u32> = (0..40).chain([3]).collect();
    assert_eq!(rir_llama::model::shared_prefix(&[&a[..], &b[..]]), Some(40));
}

/// The prefix cache (`prefix_cache_mb`, on by default): later calls start
/// from the keys and values of earlier calls' prefixes — the next batch of
/// one instruction, a lone prompt, a served conversation's next turn — and
/// every logit and decode step is the one of running each prompt whole, on
/// both prefill paths; text through the Generator API is the same too.
#[test]
fn prefix_cache_reuses_earlier_calls_bit_for_bit() {
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let system = "You are a careful assistant for biomedical literature search. Answer in one short sentence, name the evidence, and never invent a citation.";
    for prefill in ["quantized", "dense"] {
        let g = load(&format!("prefill = {prefill:?}"));
        let plain = load(&format!("prefill = {prefill:?}\nshare_prefix = false"));
        assert_eq!(plain.model.prefix_cache_stats().lookups, 0);
        let ids = |instr: &str, q: &str| g.encode(&g.render(&Prompt::Chat(vec![Message::system(instr.to_string()), Message::user(q.to_string())])).unwrap()).unwrap();
        // Each call, checked against every prompt run whole (and a step after it).
        let check = |prompts: &[Vec<u32>], what: &str| {
            let refs: Vec<&[u32]> = prompts.iter().map(|v| v.as_slice()).collect();
            let (got, mut gc) = g.model.prefill(&refs).unwrap();
            let (want, mut wc) = g.model.prefill_whole(&refs).unwrap();
            assert_eq!(bits(&got), bits(&want), "{prefill}: {what}: last-position logits");
            let n = refs.len();
            assert_eq!(bits(&g.model.step(&vec![28; n], &mut gc).unwrap()), bits(&g.model.step(&vec![28; n], &mut wc).unwrap()), "{prefill}: {what}: the step after");
        };
        // Two batches of one instruction: the second starts from the first's prefix.
        check(&[ids(system, "Does vitamin D prevent fractures?"), ids(system, "Is BM25 a ranking function?"), ids(system, "Does sleep loss impair memory?")], "first batch");
        let s1 = g.model.prefix_cache_stats();
        assert_eq!((s1.hits, s1.entries), (0, 1), "{s1:?}");
        check(&[ids(system, "Does aspirin lower colorectal cancer risk in older adults?"), ids(system, "What does a cross-encoder do?")], "second batch");
        let s2 = g.model.prefix_cache_stats();
        assert_eq!(s2.hits, 1, "{s2:?}");
        assert!(s2.reused_tokens >= 30, "the system turn at least: {s2:?}");
        // A lone prompt (kept whole but its last position), then another
        // with the same opening, then the first again.
        let a = ids(system, "Summarise the evidence on statins and dementia.");
        check(std::slice::from_ref(&a), "lone prompt");
        let b = ids(system, "Summarise the evidence on statins and stroke.");
        check(std::slice::from_ref(&b), "lone prompt sharing the opening");
        check(std::slice::from_ref(&a), "the same prompt again");
        let s3 = g.model.prefix_cache_stats();
        assert_eq!(s3.hits, 4, "{s3:?}");
        // The system turn, then all of b's opening that is a's, then a whole (less its last position).
        assert!(s3.reused_tokens - s2.reused_tokens >= (16 + b.len() - 12 + a.len() - 1) as u64, "{s3:?}, {} / {} tokens", a.len(), b.len());
        // Through the Generator API, one request at a time as a server gets
        // them: the same text as without any sharing.
        let reqs: Vec<GenerationRequest> = ["Does coffee raise blood pressure?", "Does coffee raise heart rate?", "Does coffee raise blood pressure?"]
            .iter()
            .map(|q| GenerationRequest::greedy(Prompt::Chat(vec![Message::system(system.to_string()), Message::user(q.to_string())]), 12))
            .collect();
        // Each reports what the cache served as `cached_tokens`: the system
        // turn at least (kept by the calls above), all but the last position
        // for the repeated request; nothing without sharing.
        for (i, r) in reqs.iter().enumerate() {
            let x = g.generate(std::slice::from_ref(r)).unwrap();
            let y = plain.generate(std::slice::from_ref(r)).unwrap();
            assert_eq!(x[0][0].text, y[0][0].text, "{prefill}");
            let (u, v) = (x[0][0].usage.unwrap(), y[0][0].usage.unwrap());
            assert_eq!((v.cached_tokens, v.prompt_tokens), (Some(0), u.prompt_tokens), "{prefill}: {v:?}");
            let cached = u.cached_tokens.unwrap();
            assert!(cached >= 30 && cached < u.prompt_tokens.unwrap(), "{prefill}: request {i}: {u:?}");
            if i == 2 {
                assert_eq!(cached, u.prompt_tokens.unwrap() - 1, "{prefill}: the same request again: {u:?}");
            }
        }
        assert!(g.model.prefix_cache_stats().hits >= s3.hits + 3);
        g.model.clear_prefix_cache();
        assert_eq!(g.model.prefix_cache_stats().entries, 0);
    }
    // Off with a budget of 0.
    let off = load("prefix_cache_mb = 0");
    let p = off.encode(&off.render(&chat("A prompt long enough to be kept if the cache were on, which it is not.")).unwrap()).unwrap();
    off.model.prefill(&[&p]).unwrap();
    off.model.prefill(&[&p]).unwrap();
    let s = off.model.prefix_cache_stats();
    assert_eq!((s.hits, s.entries), (0, 0));
}

/// A deterministic PEFT adapter touching every linear map of layer 0 and
/// q/k of every layer, large enough to change the output.
fn write_adapter(dir: &Path, g: &LlamaGenerator) {
    let s = &g.model.shape;
    let (hidden, heads, kv) = (s.hidden, s.n_head * s.head_dim, s.n_kv_head * s.head_dim);
    let inter = g.model.layers[0].up.forward(&Tensor::zeros((1, hidden), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap().dim(1).unwrap();
    let mut state = 12345u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.6
            })
            .collect()
    };
    let r = 4;
    let mut t = HashMap::new();
    let mut add = |layer: usize, name: &str, inp: usize, out: usize| {
        let p = format!("base_model.model.model.layers.{layer}.{name}");
        t.insert(format!("{p}.lora_A.weight"), Tensor::from_vec(rnd(r * inp), (r, inp), &Device::Cpu).unwrap());
        t.insert(format!("{p}.lora_B.weight"), Tensor::from_vec(rnd(out * r), (out, r), &Device::Cpu).unwrap());
    };
    for l in 0..s.n_layer {
        add(l, "self_attn.q_proj", hidden, heads);
        add(l, "self_attn.k_proj", hidden, kv);
    }
    add(0, "self_attn.v_proj", hidden, kv);
    add(0, "self_attn.o_proj", heads, hidden);
    add(0, "mlp.gate_proj", hidden, inter);
    add(0, "mlp.up_proj", hidden, inter);
    add(0, "mlp.down_proj", inter, hidden);
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}"#,
    )
    .unwrap();
}

#[test]
fn hf_export_and_lora_adapters_load_like_the_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = load("");
    let hf_dir = tmp.path().join("hf");
    rir_plugin_llama_generator::export_hf(&gguf.model, &gguf.assets, &hf_dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(hf_dir.join(f).is_file(), "{f} missing");
    }
    let hf = LlamaGenerator::new(&format!("model = {:?}", hf_dir.display().to_string())).unwrap();

    // Same tokenizer and template through tokenizer.json / tokenizer_config.json.
    for p in PROMPTS {
        let text = gguf.render(&chat(p)).unwrap();
        assert_eq!(text, hf.render(&chat(p)).unwrap());
        assert_eq!(gguf.encode(&text).unwrap(), hf.encode(&text).unwrap());
    }
    // Same function: dense f32 (HF layout, half-split rope) vs Q4_1 with
    // q8 activations (GGUF layout, interleaved rope).
    let base: Vec<f64> = PROMPTS.iter().map(|p| cosine(&logits(&gguf, p), &logits(&hf, p))).collect();
    eprintln!("GGUF vs exported HF, logit cosine per prompt: {base:.5?}");
    assert!(base.iter().all(|c| *c > 0.995), "{base:?}");
    let reqs: Vec<_> = PROMPTS.iter().map(|p| GenerationRequest::greedy(chat(p), 16)).collect();
    let (a, b) = (gguf.generate(&reqs).unwrap(), hf.generate(&reqs).unwrap());
    let same = a.iter().zip(&b).filter(|(x, y)| x[0].text == y[0].text).count();
    // Near-ties of a 135M model flip between q8 and f32 activations, so this
    // is reported, not asserted; the logits above are the check.
    eprintln!("greedy 16 tokens, GGUF vs exported HF: {same}/{} identical", PROMPTS.len());
    assert!(b.iter().all(|c| !c[0].text.is_empty()));

    // One adapter merged into the GGUF (q/k deltas permuted to its layout)
    // and into the HF model: the two agree, and differ from the base.
    let ad = tmp.path().join("adapter");
    write_adapter(&ad, &gguf);
    let ad_s = ad.display().to_string();
    let g_ad = load(&format!("adapter = {ad_s:?}"));
    let h_ad = LlamaGenerator::new(&format!("model = {:?}\nadapter = {ad_s:?}", hf_dir.display().to_string())).unwrap();
    let p = PROMPTS[1];
    let (lb, lg, lh) = (logits(&gguf, p), logits(&g_ad, p), logits(&h_ad, p));
    let (moved, agree) = (cosine(&lb, &lg), cosine(&lg, &lh));
    eprintln!("adapter: base vs merged cosine {moved:.5}, GGUF+adapter vs HF+adapter {agree:.5}");
    assert!(moved < 0.99, "the adapter should change the output ({moved})");
    assert!(agree > 0.995, "GGUF and HF merges disagree ({agree})");

    // The merged model, written as the DPO trainer writes it, loads and generates.
    let merged = tmp.path().join("merged");
    rir_plugin_llama_generator::export_hf(&g_ad.model, &g_ad.assets, &merged).unwrap();
    let m = LlamaGenerator::new(&format!("model = {:?}", merged.display().to_string())).unwrap();
    assert!(cosine(&logits(&m, p), &lh) > 0.9999);
    assert!(!m.generate(&reqs[..1]).unwrap()[0][0].text.is_empty());

    // `quantize = "q8_0"`: a dense model on Q8_0 kernels computes the same
    // function, under another fingerprint (caches keep apart). The exported
    // HF model stands for a trained one (this test's random adapter is far
    // larger than a trained one and makes any rounding stand out; on the
    // quickstart's DPO-merged model the cosines are >= 0.9998 as well).
    let q = LlamaGenerator::new(&format!("model = {:?}\nquantize = \"q8_0\"", hf_dir.display().to_string())).unwrap();
    // Q8_0 runs on this crate's kernel where the CPU has AVX-512 VNNI, else
    // on candle's Q8_0 (AVX2-only machines): quantized either way.
    let quantized = |l: &rir_llama::Linear| match l {
        rir_llama::Linear::Quant(..) => true,
        rir_llama::Linear::Candle(m) => matches!(m, candle_core::quantized::QMatMul::QTensor(t) if t.dtype() == candle_core::quantized::GgmlDType::Q8_0),
    };
    assert!(q.model.layers.iter().all(|l| quantized(&l.wq)));
    assert!(quantized(&q.model.output));
    assert_ne!(q.fingerprint, hf.fingerprint);
    let qc: Vec<f64> = PROMPTS.iter().map(|p| cosine(&logits(&q, p), &logits(&hf, p))).collect();
    eprintln!("dense f32 vs quantize = q8_0, logit cosine per prompt: {qc:.5?}");
    assert!(qc.iter().all(|c| *c > 0.999), "{qc:?}");
    let (dense, quant) = (hf.generate(&reqs).unwrap(), q.generate(&reqs).unwrap());
    let same = dense.iter().zip(&quant).filter(|(x, y)| x[0].text == y[0].text).count();
    eprintln!("greedy 16 tokens, dense vs q8_0: {same}/{} identical", PROMPTS.len());
    let bad = LlamaGenerator::new(&format!("model = {SMOLLM:?}\nquantize = \"q4_k\"")).err().expect("unknown quantize value");
    assert!(bad.to_string().contains("quantize") && bad.to_string().contains("q8_0"), "{bad}");
}

fn write_gguf(path: &Path, md: &[(&str, candle_core::quantized::gguf_file::Value)]) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let w = QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &w)]).unwrap();
}

#[test]
fn malformed_models_fail_clearly() {
    use candle_core::quantized::gguf_file::Value;
    let tmp = tempfile::tempdir().unwrap();
    let err = |model: &Path, extra: &str| {
        LlamaGenerator::new(&format!("model = {:?}\n{extra}", model.display().to_string())).err().unwrap().to_string()
    };
    let q = tmp.path().join("gemma.gguf");
    write_gguf(&q, &[("general.architecture", Value::String("gemma2".into()))]);
    let e = err(&q, "");
    assert!(e.contains("architecture \"gemma2\" is not supported (llama, qwen2)"), "{e}");
    let nt = tmp.path().join("notok.gguf");
    write_gguf(&nt, &[("general.architecture", Value::String("llama".into()))]);
    let e = err(&nt, "");
    assert!(e.contains("notok.gguf") && e.contains("tokenizer"), "{e}");

    // HF directories: wrong model type, missing tokenizer, missing weights.
    let gguf = load("");
    let hf = tmp.path().join("hf");
    rir_plugin_llama_generator::export_hf(&gguf.model, &gguf.assets, &hf).unwrap();
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(hf.join("config.json"), cfg.replace("\"llama\"", "\"mistral\"")).unwrap();
    let e = err(&hf, "");
    assert!(e.contains("config.json") && e.contains("mistral") && e.contains("not supported"), "{e}");
    std::fs::write(hf.join("config.json"), &cfg).unwrap();
    std::fs::rename(hf.join("tokenizer.json"), tmp.path().join("t.json")).unwrap();
    assert!(err(&hf, "").contains("no tokenizer.json"));
    std::fs::rename(tmp.path().join("t.json"), hf.join("tokenizer.json")).unwrap();
    std::fs::rename(hf.join("model.safetensors"), tmp.path().join("m.bin")).unwrap();
    assert!(err(&hf, "").contains("no *.safetensors weights"));
    std::fs::rename(tmp.path().join("m.bin"), hf.join("model.safetensors")).unwrap();

    // Adapters: one naming a module llama does not have; bad config keys.
    let ad = tmp.path().join("ad");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(ad.join("adapter_config.json"), r#"{"r": 2, "lora_alpha": 4}"#).unwrap();
    let t: HashMap<String, Tensor> = [
        ("base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight".to_string(), Tensor::zeros((2, 576), candle_core::DType::F32, &Device::Cpu).unwrap()),
        ("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight".to_string(), Tensor::zeros((576, 2), candle_core::DType::F32, &Device::Cpu).unwrap()),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&t, ad.join("adapter_model.safetensors")).unwrap();
    let e = err(&hf, &format!("adapter = {:?}", ad.display().to_string()));
    assert!(e.contains("qkv_proj.lora_A.weight names no llama linear map"), "{e}");
    let e = err(&hf, "dtype = \"f8\"");
    assert!(e.contains("dtype") && e.contains("f8"), "{e}");
}


