//! Host logging and the thread budget reach plugin libraries.
//! (Its own test binary: it installs the process-wide logger.)

mod common;

use std::sync::Mutex;

use common::*;

static RECORDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        RECORDS.lock().unwrap().push(format!("{} {} {}", r.level(), r.target(), r.args()));
    }
    fn flush(&self) {}
}

#[test]
fn plugin_logs_arrive_in_the_host_logger_and_threads_are_the_hosts() {
    plugin_dir();
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let host = host();
    let r = host.load("probe").unwrap().retriever("").unwrap();
    r.encode_corpus(&texts(&["a", "b"])).unwrap();
    let recs = RECORDS.lock().unwrap().clone();
    assert!(
        recs.iter().any(|l| l == "INFO rir::plugin [rir_plugin_probe] probe encoding 2 texts"),
        "{recs:?}"
    );
    assert_eq!(r.info().fingerprint, "probe/threads=3");
}
