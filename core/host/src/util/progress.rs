//! Progress of long steps. On a terminal: an indicatif bar with rate and ETA.
//! Elsewhere (CI logs, `nohup`, `2> file`) indicatif would draw nothing, so
//! the same bar is written as a plain line at most every
//! `RIR_PROGRESS_SECS` seconds (default 30): a 30-minute stage in a log file
//! still says how far it got and how long it has left.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike};

/// The bar every long host step shows: label, bar, count, rate, ETA.
pub fn bar(len: usize, label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len as u64), draw_target()).with_message(label.to_owned());
    let template = format!("{{msg:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{rate}}  ETA {{left}}");
    let style = ProgressStyle::with_template(&template)
        .expect("template")
        .progress_chars("=> ")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&rate_text(s.pos(), s.elapsed()));
        })
        .with_key("left", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&left_text(s.pos(), s.len(), s.elapsed()));
        });
    bar.set_style(style);
    // No steady tick: with indicatif 0.18 every tick counts as a step of no
    // progress, and the rate of a step that advances in chunks (a batch of
    // generations) decayed to nonsense (0.009/s, "ETA 2h" for 4 minutes).
    bar
}

/// The rate since the start. indicatif's own estimate weights the last
/// seconds, so a step that advances once every few minutes (a 1.5B DPO
/// step) read "0/s" and an ETA of hours; the mean since the start does not
/// decay between steps. Slow steps read as seconds each.
fn rate_text(done: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if done == 0 || secs <= 0.0 {
        return "-".into();
    }
    let per_sec = done as f64 / secs;
    match per_sec {
        r if r >= 10.0 => format!("{r:.0}/s"),
        r if r >= 1.0 => format!("{r:.1}/s"),
        r if r >= 0.1 => format!("{r:.2}/s"),
        r => format!("{:.0} s each", 1.0 / r),
    }
}

/// Time left at the mean rate since the start ("-" before the first item).
fn left_text(done: u64, len: Option<u64>, elapsed: Duration) -> String {
    match len {
        Some(len) if done > 0 && len >= done => {
            let left = elapsed.as_secs_f64() * (len - done) as f64 / done as f64;
            HumanDuration(Duration::from_secs_f64(left)).to_string()
        }
        _ => "-".into(),
    }
}

/// Where bars go when the process's stderr is not where the user looks:
/// the Python package hands a function that writes to `sys.stderr`, so a
/// notebook shows a live bar (each redraw a `\r`-led line, which Jupyter and
/// terminals both redraw in place).
type Writer = Box<dyn Fn(&str) + Send + Sync>;
static WRITER: OnceLock<Writer> = OnceLock::new();

/// Sends every bar drawn from now on to `writer` (once per process; false if
/// one was set already).
pub fn set_writer(writer: Writer) -> bool {
    WRITER.set(writer).is_ok()
}

fn draw_target() -> ProgressDrawTarget {
    if WRITER.get().is_some() {
        return ProgressDrawTarget::term_like_with_hz(Box::new(Redraw::default()), 4);
    }
    if std::io::stderr().is_terminal() {
        return ProgressDrawTarget::stderr();
    }
    let every = std::env::var("RIR_PROGRESS_SECS").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(30);
    if every == 0 {
        return ProgressDrawTarget::hidden();
    }
    ProgressDrawTarget::term_like_with_hz(Box::new(LineLog::new(Duration::from_secs(every))), 1)
}

/// A `TermLike` that turns redraws into at most one stderr line per
/// interval; the first non-empty draw (the step's start, with its total) is
/// The `TermLike` methods of a sink that writes lines, not a screen:
/// cursor moves are ignored and a line is written as a string.
macro_rules! line_terminal {
    () => {
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
    };
}

/// written at once.
#[derive(Debug)]
struct LineLog {
    every: Duration,
    state: Mutex<(String, Option<Instant>)>,
}

impl LineLog {
    fn new(every: Duration) -> Self {
        LineLog { every, state: Mutex::new((String::new(), None)) }
    }
}

impl TermLike for LineLog {
    fn width(&self) -> u16 {
        160
    }
    line_terminal!();
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.push_str(s.trim_matches('\r'));
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let line = std::mem::take(&mut st.0);
        let line = line.trim();
        let due = st.1.is_none_or(|t| t.elapsed() >= self.every);
        if !line.is_empty() && due {
            st.1 = Some(Instant::now());
            let mut err = std::io::stderr().lock();
            writeln!(err, "{line}")?;
        }
        Ok(())
    }
}

/// A `TermLike` that hands each redraw to the [`WRITER`] as one line that
/// starts with `\r` and covers the previous one; a finished bar's last state
/// stays and its line is ended when the bar is dropped; a cleared one is blanked.
#[derive(Debug, Default)]
struct Redraw {
    /// (the redraw being written, the width of the last line sent)
    state: Mutex<(String, usize)>,
}

impl TermLike for Redraw {
    fn width(&self) -> u16 {
        110
    }
    line_terminal!();
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0.push_str(s.trim_matches(['\r', '\n']));
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pending = std::mem::take(&mut st.0);
        let Some(w) = WRITER.get() else { return Ok(()) };
        let line = pending.trim_end();
        if line.is_empty() {
            // A cleared bar (finish_and_clear): blank its line, as a terminal would.
            if st.1 > 0 {
                w(&format!("\r{}\r", " ".repeat(st.1)));
                st.1 = 0;
            }
            return Ok(());
        }
        let width = line.chars().count();
        w(&format!("\r{line}{}", " ".repeat(st.1.saturating_sub(width))));
        st.1 = width;
        Ok(())
    }
}

impl Drop for Redraw {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let (Some(w), true) = (WRITER.get(), st.1 > 0) {
            w("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_log_writes_the_first_draw_then_one_line_per_interval() {
        let log = LineLog::new(Duration::from_secs(3600));
        log.write_str("step [=>  ] 1/10").unwrap();
        log.flush().unwrap();
        let first = log.state.lock().unwrap().1;
        assert!(first.is_some(), "first draw is written");
        log.write_str("step [==> ] 2/10").unwrap();
        log.flush().unwrap();
        assert_eq!(log.state.lock().unwrap().1, first, "a redraw inside the interval is dropped");
        assert!(log.state.lock().unwrap().0.is_empty(), "the dropped line does not pile up");
    }

    /// With a writer set (the Python package's sys.stderr), each redraw is a
    /// `\r`-led line covering the last, a cleared bar is blanked, a dropped
    /// one ends its line.
    #[test]
    fn a_writer_gets_each_redraw_as_one_carriage_return_line() {
        static OUT: Mutex<String> = Mutex::new(String::new());
        set_writer(Box::new(|s: &str| OUT.lock().unwrap().push_str(s)));
        let r = Redraw::default();
        r.write_str("enc [=====>    ] 5/10 texts      ").unwrap();
        r.flush().unwrap();
        r.write_str("enc [==========] 10/10").unwrap();
        r.flush().unwrap();
        drop(r);
        let out = OUT.lock().unwrap().clone();
        assert!(out.contains("\renc [=====>    ] 5/10 texts\renc [==========] 10/10     \n"), "{out:?}");
        let r = Redraw::default();
        r.write_str("x 1/2").unwrap();
        r.flush().unwrap();
        r.flush().unwrap();
        drop(r);
        assert!(OUT.lock().unwrap().contains("\rx 1/2\r     \r"), "a cleared bar leaves a blank line, no newline");
    }

    /// A step every 200 s (Qwen 1.5B's DPO steps) reads as such, with the
    /// time left at that pace, not "0/s" and hours.
    #[test]
    fn slow_steps_read_as_seconds_each_with_the_time_left_at_that_pace() {
        assert_eq!(rate_text(3, Duration::from_secs(600)), "200 s each");
        assert_eq!(left_text(3, Some(12), Duration::from_secs(600)), "30 minutes");
        assert_eq!(rate_text(0, Duration::from_secs(5)), "-");
        assert_eq!(left_text(0, Some(12), Duration::from_secs(5)), "-");
        assert_eq!(rate_text(300, Duration::from_secs(2)), "150/s");
        assert_eq!(rate_text(3, Duration::from_secs(2)), "1.5/s");
        assert_eq!(rate_text(1, Duration::from_secs(4)), "0.25/s");
    }
}
