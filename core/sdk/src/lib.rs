//! # rir-sdk — write a plugin for rir
//!
//! A plugin is a `cdylib` crate that depends on this crate only. It implements
//! one or more of the plain traits in [`api`] — [`Retriever`], [`Generator`],
//! [`Reward`], [`Trainer`], [`Index`] — and exports them with
//! [`export_plugin!`]. The host loads the library at run time, checks that it
//! was built against a compatible ABI ([`ffi::ABI_VERSION`]), and calls it.
//! Every call is guarded: a panic inside the plugin comes back to the host as
//! [`PluginError::Panic`] instead of aborting it.
//!
//! See `docs/PLUGINS.md` in the rir repository for a walk-through.

pub mod api;
pub mod bridge;
pub mod config;
mod convert;
pub mod error;
pub mod export;
pub mod ffi;
pub mod launch;
pub mod method;
pub mod secret;

pub use abi_stable;
pub use api::*;
pub use error::{PluginError, PluginResult};
pub use export::{host, HostInfo};

/// Re-exported so plugins log through the host without their own dependency.
pub use log;

#[cfg(test)]
mod tests {
    #[test]
    fn root_symbol_matches_abi_stable() {
        assert_eq!(crate::export::ROOT_SYMBOL, abi_stable::library::ROOT_MODULE_LOADER_NAME);
    }
}
