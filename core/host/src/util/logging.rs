//! The host's logger: env_logger behind a filter that keeps secrets out.
//!
//! Plugins redact what they forward (see `rir_sdk::secret`); the host does
//! the same for its own records, and drops wire-level TRACE dumps of HTTP
//! crates, which print request headers (an `Authorization` line) unredacted.

use rir_sdk::secret;

struct Redacting(env_logger::Logger);

impl log::Log for Redacting {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.0.enabled(m) && !secret::is_wire_trace(m.level(), m.target())
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let text = r.args().to_string();
        match secret::redact(&text) {
            std::borrow::Cow::Borrowed(_) => self.0.log(r),
            std::borrow::Cow::Owned(clean) => self.0.log(
                &log::Record::builder()
                    .args(format_args!("{clean}"))
                    .level(r.level())
                    .target(r.target())
                    .module_path(r.module_path())
                    .file(r.file())
                    .line(r.line())
                    .build(),
            ),
        }
    }
    fn flush(&self) {
        self.0.flush()
    }
}

/// Installs the process-wide logger at `default_level` (`RUST_LOG` wins).
pub fn init(default_level: &str) {
    let logger = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(Redacting(logger))).is_ok() {
        log::set_max_level(max);
    }
}
