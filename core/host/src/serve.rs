//! `rir serve`: any Generator plugin behind an OpenAI-compatible HTTP API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`), so a
//! tuned generator can be used by other tools.
//!
//! `/v1/completions` with `echo: true`, `logprobs` and `max_tokens: 0`
//! scores the prompt instead of continuing it (as vLLM and OpenAI's legacy
//! API do): every token with its log-probability (the first, which has no
//! context, as null) and its character offset, through `Generator::score`.

use std::time::{SystemTime, UNIX_EPOCH};

use rir_sdk::{Completion, GenerationRequest, Generator, Message, Prompt, ScoreRequest};
use serde_json::{json, Value};

/// Serves until the process is stopped, with `workers` request threads.
pub fn serve(generator: &dyn Generator, server: &tiny_http::Server, workers: usize) {
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                while let Ok(mut req) = server.recv() {
                    let (status, body) = handle(generator, &mut req);
                    let resp = tiny_http::Response::from_string(body.to_string())
                        .with_status_code(status)
                        .with_header(tiny_http::Header::from_bytes("Content-Type", "application/json").expect("header"));
                    let _ = req.respond(resp);
                }
            });
        }
    });
}

fn error(status: u16, kind: &str, message: impl std::fmt::Display) -> (u16, Value) {
    (status, json!({"error": {"message": message.to_string(), "type": kind, "code": status}}))
}

fn handle(g: &dyn Generator, req: &mut tiny_http::Request) -> (u16, Value) {
    let path = req.url().split('?').next().unwrap_or("").trim_end_matches('/').to_owned();
    match (req.method(), path.as_str()) {
        (tiny_http::Method::Get, "/health") => (200, json!({"status": "ok"})),
        (tiny_http::Method::Get, "/v1/models") => (
            200,
            json!({"object": "list", "data": [{"id": g.model_name(), "object": "model", "owned_by": "rir"}]}),
        ),
        (tiny_http::Method::Post, "/v1/chat/completions") | (tiny_http::Method::Post, "/v1/completions") => {
            let mut text = String::new();
            if let Err(e) = req.as_reader().read_to_string(&mut text) {
                return error(400, "invalid_request_error", format!("reading the body: {e}"));
            }
            let body: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => return error(400, "invalid_request_error", format!("body is not JSON: {e}")),
            };
            let chat = path.ends_with("chat/completions");
            if !chat && body.get("echo").and_then(Value::as_bool) == Some(true) {
                return echo(g, &body);
            }
            match requests(&body, chat) {
                Ok(reqs) => match g.generate(&reqs) {
                    Ok(out) => (200, response(g, chat, &reqs, out)),
                    Err(e) => error(500, "server_error", e),
                },
                Err(msg) => error(400, "invalid_request_error", msg),
            }
        }
        _ => error(404, "not_found", format!("no route for {} {path}", req.method())),
    }
}

/// OpenAI request JSON → generation requests (a completions prompt may be a list).
fn requests(b: &Value, chat: bool) -> Result<Vec<GenerationRequest>, String> {
    let num = |k: &str, d: f64| -> Result<f64, String> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_f64().ok_or_else(|| format!("`{k}` must be a number")),
        }
    };
    let stop = match b.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(|s| s.as_str().map(str::to_owned).ok_or("`stop` must hold strings")).collect::<Result<_, _>>()?,
        _ => return Err("`stop` must be a string or a list of strings".into()),
    };
    let logprobs = match b.get("logprobs") {
        Some(Value::Bool(x)) => *x,
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0) > 0,
        _ => false,
    };
    let base = GenerationRequest {
        prompt: Prompt::Text(String::new()),
        n: num("n", 1.0)? as u32,
        temperature: num("temperature", 1.0)? as f32,
        top_p: num("top_p", 1.0)? as f32,
        max_tokens: num("max_tokens", 256.0)? as u32,
        stop,
        seed: b.get("seed").and_then(Value::as_u64),
        logprobs,
    };
    if base.n == 0 {
        return Err("`n` must be at least 1".into());
    }
    if chat {
        let msgs = b.get("messages").and_then(Value::as_array).ok_or("`messages` (a list) is required")?;
        let messages = msgs
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).ok_or("every message needs a `role`")?;
                let content = m.get("content").and_then(Value::as_str).ok_or("every message needs string `content`")?;
                Ok(Message { role: role.into(), content: content.into() })
            })
            .collect::<Result<Vec<_>, &str>>()?;
        Ok(vec![GenerationRequest { prompt: Prompt::Chat(messages), ..base }])
    } else {
        Ok(text_prompts(b)?.into_iter().map(|p| GenerationRequest { prompt: Prompt::Text(p), ..base.clone() }).collect())
    }
}

/// A completions request's `prompt`: a string or a list of strings.
fn text_prompts(b: &Value) -> Result<Vec<String>, String> {
    match b.get("prompt") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a.iter().map(|p| p.as_str().map(str::to_owned).ok_or_else(|| "`prompt` items must be strings".to_owned())).collect(),
        _ => Err("`prompt` (a string or list of strings) is required".into()),
    }
}

/// A scoring request: `echo` with `max_tokens` 0 returns the prompt's
/// tokens with their log-probabilities and character offsets.
fn echo(g: &dyn Generator, b: &Value) -> (u16, Value) {
    if b.get("max_tokens").and_then(Value::as_u64).unwrap_or(16) != 0 {
        return error(400, "invalid_request_error", "`echo` is supported with `max_tokens: 0` only (scoring the prompt)");
    }
    let prompts = match text_prompts(b) {
        Ok(p) => p,
        Err(m) => return error(400, "invalid_request_error", m),
    };
    if prompts.iter().any(String::is_empty) {
        return error(400, "invalid_request_error", "an empty `prompt` has no tokens to score");
    }
    // The whole prompt is the continuation of an empty one.
    let reqs: Vec<ScoreRequest> = prompts.iter().map(|p| ScoreRequest { prompt: Prompt::Text(String::new()), continuation: p.clone() }).collect();
    let scores = match g.score(&reqs) {
        Ok(s) => s,
        Err(e @ rir_sdk::PluginError::Unsupported(_)) => return error(400, "invalid_request_error", e),
        Err(e) => return error(500, "server_error", e),
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let choices: Vec<Value> = prompts
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(index, (p, s))| {
            let mut offsets = Vec::with_capacity(s.tokens.len());
            let mut at = 0usize;
            for t in &s.tokens {
                offsets.push(at);
                at += t.token.chars().count();
            }
            let lps: Vec<Value> = s.tokens.iter().enumerate().map(|(i, t)| if i == 0 { Value::Null } else { json!(t.logprob) }).collect();
            json!({"index": index, "text": p, "finish_reason": "length",
                   "logprobs": {"tokens": s.tokens.iter().map(|t| &t.token).collect::<Vec<_>>(), "token_logprobs": lps,
                                "text_offset": offsets, "top_logprobs": Value::Null}})
        })
        .collect();
    (200, json!({"id": format!("rir-{created}-score"), "object": "text_completion", "created": created, "model": g.model_name(), "choices": choices}))
}

fn response(g: &dyn Generator, chat: bool, reqs: &[GenerationRequest], out: Vec<Vec<Completion>>) -> Value {
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut choices = Vec::new();
    for (c, r) in out.into_iter().flatten().zip(reqs.iter().flat_map(|r| std::iter::repeat_n(r, r.n as usize))) {
        let index = choices.len();
        let lp = c.logprobs.filter(|_| r.logprobs);
        choices.push(if chat {
            json!({"index": index, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                   "logprobs": lp.map(|l| json!({"content": l.iter().map(|t| json!({"token": t.token, "logprob": t.logprob})).collect::<Vec<_>>()}))})
        } else {
            json!({"index": index, "text": c.text, "finish_reason": c.finish_reason,
                   "logprobs": lp.map(|l| json!({"tokens": l.iter().map(|t| &t.token).collect::<Vec<_>>(),
                                                 "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>()}))})
        });
    }
    json!({
        "id": format!("rir-{created}-{}", choices.len()),
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": g.model_name(),
        "choices": choices,
    })
}
