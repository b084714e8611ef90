//! The data stages as subcommands (`rir queries`, `rir rlrf-data`, `rir
//! rlgf-data`), built from their [`DataStage`] definitions: the flags are
//! the stage's [`Needs`](super::Needs), `--config` is its config type, the
//! summary and the files named are the stage's own. No stage has a
//! hand-written argument struct.

use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches, Command};
use rir_sdk::ConfigOf;

use crate::engine::encode::EmbeddingCache;
use crate::engine::generate::GenerationCache;
use crate::error::HostError;
use crate::plugins::registry::Kind;
use crate::plugins::PluginHost;
use crate::stages::{dispatch_data_stage, Context, DataStage, GeneratorIn, RetrieverIn, Stage, TextRetrieverIn, DATA_STAGES};

/// A data stage chosen on the command line, with its flags' values.
pub struct StageCommand {
    /// Which stage.
    pub stage: Stage,
    /// Its flags.
    pub flags: StageFlags,
}

/// The flags of a data stage (the ones its [`Needs`](super::Needs) has).
#[derive(Debug, Clone, Default)]
pub struct StageFlags {
    /// `--dataset`.
    pub dataset: String,
    /// `--mirror` (or `$RIR_MIRROR`).
    pub mirror: Option<PathBuf>,
    /// `--queries`.
    pub queries: Option<PathBuf>,
    /// `--generator` and `--generator-config`.
    pub generator: (String, String),
    /// `--retriever` and `--retriever-config`.
    pub retriever: Option<(String, String)>,
    /// `--reward` and `--reward-config`.
    pub reward: Option<(String, String)>,
    /// `--lexical` and `--lexical-config` (used when the config asks).
    pub lexical: Option<(String, String)>,
    /// `--config`.
    pub config: String,
    /// `--output`.
    pub output: PathBuf,
    /// `--no-cache`.
    pub no_cache: bool,
}

fn flag(name: &'static str, value: &'static str, help: String) -> Arg {
    Arg::new(name).long(name).value_name(value).help(help)
}

/// The subcommand of stage `S`, its flags from `S::NEEDS`.
pub fn command<S: DataStage>() -> Command {
    let n = S::NEEDS;
    // Under their own heading: the global options keep theirs.
    let mut c = Command::new(S::STAGE.as_str()).about(S::ABOUT).next_help_heading("Stage options");
    c = c.arg(flag("dataset", "NAME|DIR", "Dataset name or BEIR directory (only its corpus is used)".into()).required(true));
    c = c.arg(flag("mirror", "DIR", "Local BEIR mirror (DIR/beir/NAME) to copy the dataset from".into()).env("RIR_MIRROR").value_parser(clap::value_parser!(PathBuf)));
    if n.queries {
        c = c.arg(flag("queries", "FILE", "queries.jsonl from `rir queries`".into()).required(true).value_parser(clap::value_parser!(PathBuf)));
    }
    c = c.arg(flag("generator", "PLUGIN", format!("{} (registry name)", n.generator)).required(true));
    c = c.arg(flag("generator-config", "TOML", "The generator's config table (TOML text or @FILE)".into()).default_value(""));
    if let Some(what) = n.retriever {
        c = c.arg(flag("retriever", "PLUGIN", format!("{what} (registry name)")).required(true));
        c = c.arg(flag("retriever-config", "TOML", "The retriever's config table (TOML text or @FILE)".into()).default_value(""));
    }
    if let Some((default, what)) = n.reward {
        c = c.arg(flag("reward", "PLUGIN", format!("{what} (registry name)")).default_value(default));
        c = c.arg(flag("reward-config", "TOML", "The reward's config table (TOML text or @FILE)".into()).default_value(""));
    }
    if let Some((default, what)) = n.text_retriever {
        c = c.arg(flag("lexical", "PLUGIN", format!("{what} (registry name)")).default_value(default));
        c = c.arg(flag("lexical-config", "TOML", "The text retriever's config table (TOML text or @FILE)".into()).default_value(""));
    }
    c = c.arg(flag("config", "TOML", format!("Stage settings (TOML text or @FILE): {}", S::config_keys())).default_value(""));
    c = c.arg(flag("output", "DIR", format!("Output directory ({})", S::OUTPUTS.join(", "))).required(true).value_parser(clap::value_parser!(PathBuf)));
    c.arg(Arg::new("no-cache").long("no-cache").action(ArgAction::SetTrue).help("Skip the embedding and generation caches"))
}

impl clap::FromArgMatches for StageCommand {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let (name, sub) = m.subcommand().ok_or_else(|| clap::Error::new(clap::error::ErrorKind::MissingSubcommand))?;
        let stage: Stage = name.parse().map_err(|e: String| clap::Error::raw(clap::error::ErrorKind::InvalidSubcommand, e))?;
        let s = |k: &str| sub.try_get_one::<String>(k).ok().flatten().cloned();
        let p = |k: &str| sub.try_get_one::<PathBuf>(k).ok().flatten().cloned();
        let pair = |k: &str| s(k).map(|name| (name, s(&format!("{k}-config")).unwrap_or_default()));
        let flags = StageFlags {
            dataset: s("dataset").unwrap_or_default(),
            mirror: p("mirror"),
            queries: p("queries"),
            generator: pair("generator").unwrap_or_default(),
            retriever: pair("retriever"),
            reward: pair("reward"),
            lexical: pair("lexical"),
            config: s("config").unwrap_or_default(),
            output: p("output").unwrap_or_default(),
            no_cache: sub.get_flag("no-cache"),
        };
        Ok(StageCommand { stage, flags })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Subcommand for StageCommand {
    fn augment_subcommands(c: Command) -> Command {
        fn of<S: DataStage>() -> Result<Command, HostError> {
            Ok(command::<S>())
        }
        DATA_STAGES.iter().filter_map(|s| dispatch_data_stage!(*s, of()).ok()).fold(c, Command::subcommand)
    }
    fn augment_subcommands_for_update(c: Command) -> Command {
        Self::augment_subcommands(c)
    }
    fn has_subcommand(name: &str) -> bool {
        DATA_STAGES.iter().any(|s| s.as_str() == name)
    }
}

/// `@FILE` reads the file; anything else is the TOML text itself, which
/// must be a table. Errors name `what` (the flag).
pub fn toml_arg(s: &str, what: &str) -> Result<String, HostError> {
    let text = match s.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| HostError::Input(format!("{what}: reading {path}: {e}")))?,
        None => s.to_owned(),
    };
    // toml's own text: the line, column and the offending key.
    text.parse::<toml::Table>().map_err(|e| HostError::Input(format!("{what} is not a TOML table: {e}")))?;
    Ok(text)
}

/// Runs the chosen stage; returns the lines to print.
pub fn run(host: &PluginHost, c: &StageCommand) -> Result<Vec<String>, HostError> {
    dispatch_data_stage!(c.stage, run_stage(host, &c.flags))
}

/// Stage `S` from its flags: its settings and every plugin table are
/// checked before the dataset, a model or a data file is touched.
pub fn run_stage<S: DataStage>(host: &PluginHost, f: &StageFlags) -> Result<Vec<String>, HostError> {
    let cfg: S::Config = {
        let text = toml_arg(&f.config, "--config")?;
        toml::from_str(&text).map_err(|e| HostError::Input(format!("--config: {e}")))?
    };
    let gcfg = toml_arg(&f.generator.1, "--generator-config")?;
    let mut checks = vec![("--generator-config", f.generator.0.as_str(), Kind::Generator, ConfigOf::Generator, gcfg.clone())];
    let rcfg = f.retriever.as_ref().map(|(_, t)| toml_arg(t, "--retriever-config")).transpose()?;
    if let (Some((name, _)), Some(t)) = (&f.retriever, &rcfg) {
        checks.push(("--retriever-config", name, Kind::Retriever, ConfigOf::Retriever, t.clone()));
    }
    let wcfg = f.reward.as_ref().map(|(_, t)| toml_arg(t, "--reward-config")).transpose()?;
    if let (Some((name, _)), Some(t)) = (&f.reward, &wcfg) {
        checks.push(("--reward-config", name, Kind::Reward, ConfigOf::Reward, t.clone()));
    }
    // The text retriever only when the stage's settings use one.
    let lexical = f.lexical.as_ref().filter(|_| S::wants_text_retriever(&cfg));
    let lcfg = lexical.map(|(_, t)| toml_arg(t, "--lexical-config")).transpose()?;
    if let (Some((name, _)), Some(t)) = (lexical, &lcfg) {
        checks.push(("--lexical-config", name, Kind::TextRetriever, ConfigOf::TextRetriever, t.clone()));
    }
    for (flag, name, kind, what, text) in &checks {
        host.load(name)?.validate(*kind, *what, text).map_err(|e| HostError::step(*flag, e))?;
    }

    let ds = crate::engine::data::open(&f.dataset, None, &host.settings.cache_dir, f.mirror.as_deref())?;
    let queries = match &f.queries {
        Some(p) => crate::stages::queries::read(p)?,
        None => Vec::new(),
    };
    let cache_dir = &host.settings.cache_dir;
    let g = host.load(&f.generator.0)?.generator(&gcfg)?;
    let gcache = (!f.no_cache).then(|| GenerationCache::for_generator(cache_dir, &f.generator.0, &gcfg, g.as_ref()));
    let r = match (&f.retriever, &rcfg) {
        (Some((name, _)), Some(t)) => Some(host.load(name)?.retriever(t)?),
        _ => None,
    };
    let ecache = r.as_ref().filter(|_| !f.no_cache).map(|r| EmbeddingCache::new(cache_dir, &r.info()));
    let w = match (&f.reward, &wcfg) {
        (Some((name, _)), Some(t)) => Some(host.load(name)?.reward(t)?),
        _ => None,
    };
    let lex = match (lexical, &lcfg) {
        (Some((name, _)), Some(t)) => Some((name.as_str(), crate::engine::lexical::load_for(host, name, t, &ds, (!f.no_cache).then_some(cache_dir.as_path()))?)),
        _ => None,
    };
    let task = crate::engine::prompts::task_for(&ds.name);
    let ctx = Context {
        dataset: &ds,
        task: &task,
        queries: &queries,
        generator: Some(GeneratorIn { model: g.as_ref(), cache: gcache.as_ref() }),
        retriever: r.as_deref().map(|model| RetrieverIn { model, cache: ecache.as_ref() }),
        reward: w.as_deref(),
        text_retriever: lex.as_ref().map(|(plugin, model)| TextRetrieverIn { plugin, model: model.as_ref() }),
        threads: host.settings.threads,
    };
    let (_, stats) = S::run(&ctx, &cfg, &f.output)?;
    let wrote: Vec<String> = S::OUTPUTS.iter().map(|o| f.output.join(o).display().to_string()).collect();
    Ok(vec![S::summary(&stats), format!("wrote {}", wrote.join(", "))])
}
