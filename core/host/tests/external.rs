//! Third-party plugins: a crate outside this workspace, built against the SDK,
//! registered in its own registry.toml, loaded and called. Also the two ways a
//! stale or foreign build is refused: another ABI version, another layout.
//!
//! Each case copies `plugins/example-hash` (and for the mismatches a modified
//! copy of the SDK) to a temporary directory and runs `cargo build --offline`
//! there with the workspace's Cargo.lock, so no network is needed once the
//! workspace itself has been built.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rir::{HostError, Registry};
use rir_sdk::Retriever;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "target" {
            continue;
        }
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// Copies the example plugin to `dir/<name>` as a standalone crate depending
/// on the SDK at `sdk`, builds it, and returns the library path.
fn build_external(dir: &Path, name: &str, sdk: &Path) -> PathBuf {
    let krate = dir.join(name);
    copy_dir(&root().join("plugins/example-hash"), &krate);
    let manifest = krate.join("Cargo.toml");
    edit(&manifest, "name = \"rir-plugin-example-hash\"", &format!("name = \"{name}\""));
    edit(&manifest, "path = \"../../core/sdk\"", &format!("path = {:?}", sdk.display().to_string()));
    // Its own workspace root, so cargo does not look for one above the temp dir.
    let text = std::fs::read_to_string(&manifest).unwrap() + "\n[workspace]\n";
    std::fs::write(&manifest, text).unwrap();
    std::fs::copy(root().join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();

    // A target dir of its own: the workspace's is in use by this test run.
    let target = plugin_dir().parent().unwrap().join("ext-plugins");
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--offline", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(out.status.success(), "building {name} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    target.join("release").join(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    ))
}

fn registry_for(dir: &Path, name: &str, lib: &Path) -> rir::PluginHost {
    let path = dir.join("registry.toml");
    std::fs::write(
        &path,
        format!("[plugins.{name}]\nkinds = [\"retriever\"]\nlibrary = {:?}\n", lib.display().to_string()),
    )
    .unwrap();
    rir::PluginHost::new(Registry::load(&path).unwrap(), settings())
}

#[test]
fn a_plugin_built_outside_the_workspace_loads_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_external(dir.path(), "ext-hash", &root().join("core/sdk"));
    let host = registry_for(dir.path(), "ext-hash", &lib);
    let r = host.load("ext-hash").unwrap().retriever("dim = 32").unwrap();
    let docs = texts(&["an outside plugin", "still encodes"]);
    let expected = rir_plugin_example_hash::HashRetriever::new("dim = 32").unwrap().encode_corpus(&docs).unwrap();
    assert_eq!(r.encode_corpus(&docs).unwrap(), expected);
}

#[test]
fn a_plugin_built_for_an_older_abi_version_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = standalone_sdk_copy(dir.path());
    // 0.1.0: the ABI before generators could score.
    let now = format!("pub const ABI_VERSION: &str = \"{}\";", rir_sdk::ffi::ABI_VERSION);
    edit(&sdk.join("src/ffi.rs"), &now, "pub const ABI_VERSION: &str = \"0.1.0\";");
    let lib = build_external(dir.path(), "ext-hash-abi", &sdk);
    let err = registry_for(dir.path(), "ext-hash-abi", &lib).load("ext-hash-abi").unwrap_err();
    assert!(matches!(err, HostError::Abi { .. }), "{err}");
    let msg = err.to_string();
    eprintln!("refused as: {msg}");
    assert!(!msg.contains('\n'), "{msg}");
    let want = format!("host expects plugin ABI {}, library was built for 0.1.0", rir_sdk::ffi::ABI_VERSION);
    assert!(msg.contains(&want), "{msg}");
}

#[test]
fn a_plugin_whose_types_have_another_layout_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let sdk = standalone_sdk_copy(dir.path());
    // Same ABI version, but the host context gained a field.
    edit(&sdk.join("src/ffi.rs"), "    pub cache_dir: RString,\n}", "    pub cache_dir: RString,\n    pub extra: u32,\n}");
    let lib = build_external(dir.path(), "ext-hash-layout", &sdk);
    let err = registry_for(dir.path(), "ext-hash-layout", &lib).load("ext-hash-layout").unwrap_err();
    assert!(matches!(err, HostError::Abi { .. }), "{err}");
    let msg = err.to_string();
    eprintln!("refused as: {msg}");
    assert!(!msg.contains('\n') && msg.len() < 500, "{msg}");
    assert!(msg.contains("type layouts differ from the host's"), "{msg}");
    assert!(msg.contains("FfiHost: incompatible type size (expected 48, found 56)"), "{msg}");
}

/// A copy of core/sdk that builds outside the workspace, to be modified.
fn standalone_sdk_copy(dir: &Path) -> PathBuf {
    let sdk = dir.join("sdk");
    copy_dir(&root().join("core/sdk"), &sdk);
    let manifest = sdk.join("Cargo.toml");
    edit(&manifest, "version.workspace = true", "version = \"0.1.0\"");
    edit(&manifest, "edition.workspace = true", "edition = \"2021\"");
    edit(&manifest, "license.workspace = true", "");
    for dep in ["abi_stable", "serde", "toml", "thiserror", "log"] {
        pin_workspace_dep(&manifest, dep);
    }
    sdk
}

/// `foo.workspace = true` → the workspace's requirement for foo, spelled out.
fn pin_workspace_dep(manifest: &Path, dep: &str) {
    let ws = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let line = ws.lines().find(|l| l.starts_with(&format!("{dep} = "))).unwrap();
    edit(manifest, &format!("{dep}.workspace = true"), line);
}
