//! `rir` — the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, Color, Table};
use rir::{registry, HostError, HostSettings, PluginHost, Registry, Status};

#[derive(Parser)]
#[command(
    name = "rir",
    about = "Reinforced-IR: domain-adapted dense retrieval with a generator and a retriever that teach each other"
)]
struct Cli {
    /// registry.toml to use [default: $RIR_REGISTRY, else ./registry.toml or the nearest parent's]
    #[arg(long, global = true)]
    registry: Option<PathBuf>,
    /// Extra directory to look for plugin libraries in (before the defaults); repeatable
    #[arg(long = "plugin-dir", global = true)]
    plugin_dirs: Vec<PathBuf>,
    /// Compute threads handed to plugins [default: all cores]
    #[arg(long, global = true, env = "RIR_THREADS")]
    threads: Option<usize>,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG also works
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the registered plugins and whether each is built, missing or refused
    Plugins {
        #[command(subcommand)]
        action: Option<PluginsAction>,
    },
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Load one plugin, run every check, and show what it provides
    Check { name: String },
}

fn main() -> ExitCode {
    // The version line also names the plugin ABI, which is only known at run time here.
    let version: &'static str =
        Box::leak(format!("{} (plugin ABI {})", env!("CARGO_PKG_VERSION"), rir_sdk::ffi::ABI_VERSION).into_boxed_str());
    let cli = Cli::from_arg_matches(&Cli::command().version(version).get_matches()).unwrap_or_else(|e| e.exit());
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn host(cli: &Cli) -> Result<PluginHost> {
    let path = cli.registry.clone().or_else(registry::discover).ok_or(HostError::NoRegistry)?;
    let registry = Registry::load(&path)?;
    let mut settings = HostSettings::default();
    settings.plugin_dirs.splice(0..0, cli.plugin_dirs.iter().cloned());
    if let Some(t) = cli.threads {
        settings.threads = t.max(1);
    }
    Ok(PluginHost::new(registry, settings))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Plugins { action: None } => list_plugins(&host(&cli)?),
        Command::Plugins { action: Some(PluginsAction::Check { name }) } => check_plugin(&host(&cli)?, name),
    }
}

fn list_plugins(host: &PluginHost) -> Result<ExitCode> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["name", "kinds", "version", "status", "description"]);
    let mut problems = Vec::new();
    for (name, reg) in &host.registry.plugins {
        let (status, plugin, err) = host.status(name);
        let kinds = reg.entry.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
        let version = plugin.as_ref().map_or("-".to_owned(), |p| p.version.clone());
        let color = match status {
            Status::Built | Status::PinnedOk => Color::Green,
            Status::Missing => Color::Yellow,
            Status::Mismatch(_) => Color::Red,
        };
        let description =
            if reg.entry.description.is_empty() { plugin.map(|p| p.description.clone()).unwrap_or_default() } else { reg.entry.description.clone() };
        table.add_row(vec![Cell::new(name), Cell::new(kinds), Cell::new(version), Cell::new(&status).fg(color), Cell::new(description)]);
        problems.extend(err.map(|e| e.to_string()));
    }
    println!("registry: {}", host.registry.path.display());
    println!("{table}");
    for p in &problems {
        println!("  {p}");
    }
    Ok(ExitCode::SUCCESS)
}

fn check_plugin(host: &PluginHost, name: &str) -> Result<ExitCode> {
    let reg = host.registry.get(name)?;
    let plugin = host.load(name).with_context(|| format!("checking plugin '{name}'"))?;
    println!("plugin      {}", plugin.name);
    println!("library     {}", plugin.path.display());
    println!("sha256      {}{}", plugin.sha256, if reg.entry.sha256.is_some() { " (matches pin)" } else { " (not pinned)" });
    println!("version     {}", plugin.version);
    println!("built with  rir-sdk {} (plugin ABI {})", plugin.sdk_version, rir_sdk::ffi::ABI_VERSION);
    println!("provides    {}", plugin.provides.join(", "));
    println!("registered  {}", reg.entry.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "));
    println!("status      ok");
    Ok(ExitCode::SUCCESS)
}
