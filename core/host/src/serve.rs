//! `rir serve`: any Generator plugin behind an OpenAI-compatible HTTP API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`), so a
//! tuned generator can be used by other tools.

use std::time::{SystemTime, UNIX_EPOCH};

use rir_sdk::{Completion, GenerationRequest, Generator, Message, Prompt};
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
        let prompts: Vec<String> = match b.get("prompt") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().map(|p| p.as_str().map(str::to_owned).ok_or("`prompt` items must be strings")).collect::<Result<_, _>>()?,
            _ => return Err("`prompt` (a string or list of strings) is required".into()),
        };
        Ok(prompts.into_iter().map(|p| GenerationRequest { prompt: Prompt::Text(p), ..base.clone() }).collect())
    }
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
