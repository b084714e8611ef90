//! The `rir` binary as a user runs it.

mod common;

use std::process::Command;

use common::*;

fn rir(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rir"))
        .args(args)
        .current_dir(root())
        .env_remove("RIR_REGISTRY")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn plugins_lists_the_example_plugin_as_built() {
    plugin_dir();
    let (ok, out, err) = rir(&["plugins"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.contains("example-hash")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("retriever") && line.contains("0.1.0") && line.contains("built"), "{line}");
}

#[test]
fn plugins_check_reports_library_and_kinds() {
    plugin_dir();
    let (ok, out, err) = rir(&["plugins", "check", "probe"]);
    assert!(ok, "{err}");
    assert!(out.contains("provides    retriever, generator, reward, trainer, index"), "{out}");
    assert!(out.contains("librir_plugin_probe"), "{out}");

    let (ok, _, err) = rir(&["plugins", "check", "prob"]);
    assert!(!ok);
    assert!(err.contains("unknown plugin 'prob'") && err.contains("did you mean 'probe'?"), "{err}");
}

#[test]
fn version_names_the_plugin_abi() {
    let (ok, out, _) = rir(&["--version"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("rir {} (plugin ABI {})", env!("CARGO_PKG_VERSION"), rir_sdk::ffi::ABI_VERSION));
}

#[test]
fn a_bad_registry_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.toml");
    std::fs::write(&reg, "[plugins.x]\nkinds = [\"retriever\"]\ncrate = \"y\"\nlibary = \"z\"\n").unwrap();
    let (ok, _, err) = rir(&["--registry", reg.to_str().unwrap(), "plugins"]);
    assert!(!ok);
    assert!(err.contains("registry.toml:4:1: unknown field `libary`"), "{err}");
}
