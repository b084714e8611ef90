//! Per-dataset task descriptions (data/tasks.toml, embedded) and the prompts
//! Reinforced-IR builds from them.

use std::collections::BTreeMap;

use rir_sdk::{Message, Prompt};
use serde::Deserialize;

const TASKS: &str = include_str!("../../../../data/tasks.toml");

/// How a dataset's task is described in the prompts (the seed's task table, by dataset name).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// The task instruction the prompts open with.
    pub task: String,
    /// What a query is called (SciFact: a claim).
    pub query_type: String,
    /// What a passage is called.
    pub passage_type: String,
    /// What an augmentation answers with (the seed's `answer_type`).
    pub answer_type: String,
}

/// The task entry for a dataset, or `[default]`.
pub fn task_for(dataset: &str) -> Task {
    let mut all: BTreeMap<String, Task> = toml::from_str(TASKS).expect("data/tasks.toml is valid");
    all.remove(dataset).unwrap_or_else(|| all.remove("default").expect("tasks.toml has [default]"))
}

/// The augmentation prompt (DESIGN §1.2): a brief `answer_type` for the query
/// in the context of the task, without explanation.
pub fn augmentation(task: &Task, query: &str) -> Prompt {
    Prompt::Chat(vec![Message::user(format!(
        "{task}\nWrite a brief {answer} for the following {qt}. Reply with the {answer} only, without any explanation.\n\n{qt}: {query}",
        task = task.task,
        answer = task.answer_type,
        qt = task.query_type,
    ))])
}

/// The fixed prefix put before an augmentation when it is encoded on the
/// corpus side (one definition, shared with the plugins through the SDK).
pub use rir_sdk::method::AUGMENTATION_PREFIX;

#[cfg(test)]
mod tests {
    #[test]
    fn known_and_default_tasks() {
        assert_eq!(super::task_for("scifact").answer_type, "paper abstract");
        assert_eq!(super::task_for("my-own-corpus").query_type, "query");
    }
}
