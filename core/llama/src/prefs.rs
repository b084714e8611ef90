//! Preference data in LLaMA-Factory's sharegpt "ranking" format, as the DPO
//! trainers read it: one JSON object per line (or one JSON array) with
//! `conversations` (system/human turns), `chosen` and `rejected` (gpt turns)
//! and an optional `system`.

use std::path::Path;

use rir_sdk::{Message, PluginError, PluginResult};
use serde::Deserialize;

/// One preference pair from the data file.
#[derive(Clone, Debug)]
pub struct Pair {
    pub messages: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Deserialize)]
struct Turn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    conversations: Vec<Turn>,
    chosen: Turn,
    rejected: Turn,
    #[serde(default)]
    system: Option<String>,
}

fn role(from: &str) -> Option<&'static str> {
    match from {
        "system" => Some("system"),
        "human" | "user" => Some("user"),
        "gpt" | "assistant" => Some("assistant"),
        _ => None,
    }
}

/// Reads LLaMA-Factory's sharegpt ranking data (JSON lines or a JSON array);
/// errors name the file and line.
pub fn read_pairs(path: &Path) -> PluginResult<Vec<Pair>> {
    let text = std::fs::read_to_string(path).map_err(|e| PluginError::input(format!("{}: {e}", path.display())))?;
    let rows: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| PluginError::input(format!("{}: {e}", path.display())))?;
        v.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map(|v| (i + 1, v))
                    .map_err(|e| PluginError::input(format!("{}:{}: {e}", path.display(), i + 1)))
            })
            .collect::<PluginResult<_>>()?
    };
    rows.into_iter()
        .map(|(line, v)| {
            let at = |m: String| PluginError::input(format!("{}:{line}: {m}", path.display()));
            let r: Row = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
            let mut messages: Vec<Message> = r.system.map(Message::system).into_iter().collect();
            for t in r.conversations {
                let role = role(&t.from).ok_or_else(|| at(format!("unknown speaker {:?} (system, human or gpt)", t.from)))?;
                messages.push(Message { role: role.into(), content: t.value });
            }
            if messages.last().is_none_or(|m| m.role != "user") {
                return Err(at("the conversation must end with a human turn".into()));
            }
            Ok(Pair { messages, chosen: r.chosen.value, rejected: r.rejected.value })
        })
        .collect()
}

