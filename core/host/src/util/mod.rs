//! What every layer shares: logging with redaction, progress bars, names
//! that become paths, atomic file writes and JSON lines, serde defaults,
//! per-stage peak memory.

pub mod defaults;
pub mod files;
pub mod logging;
pub mod memory;
pub mod paths;
pub mod progress;
pub mod suggest;
