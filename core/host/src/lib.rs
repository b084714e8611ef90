//! The rir host: registry and plugin loader, and (as later stages land) the
//! pipeline that reads as the method does — data → encode → index → search →
//! metrics → report; queries → rlrf → rlgf.

pub mod error;
pub mod plugins;
pub mod registry;
pub mod suggest;

pub use error::HostError;
pub use plugins::{HostSettings, Plugin, PluginHost, Status};
pub use registry::{Kind, Registry};
