//! The progress display of a build: a spinner per running layer on a terminal (log lines
//! scroll above them, prefixed with the layer name), plain lines otherwise; and a
//! summary of what was built, cached, failed or skipped, with durations.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use farm_coordinator::Plan;
use farm_model::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
enum State {
    Waiting,
    Running,
    Built(Duration),
    Cached,
    Failed(String),
    Skipped(String),
    /// Stopped or never started because the build was cancelled.
    Cancelled,
}

pub(crate) struct Progress {
    task: JoinHandle<String>,
}

impl Progress {
    pub(crate) fn start(plan: &Plan, mut rx: UnboundedReceiver<Event>) -> Progress {
        let names: Vec<String> = plan.layers.iter().map(|l| l.layer.name.clone()).collect();
        let width = names.iter().map(String::len).max().unwrap_or(0);
        let terminal = std::io::stderr().is_terminal();
        let tty = crate::common::progress_forced().unwrap_or(terminal) && !crate::common::quiet();
        let quiet = crate::common::quiet();
        let task = tokio::spawn(async move {
            let mp = MultiProgress::with_draw_target(match (tty, terminal) {
                (false, _) => ProgressDrawTarget::hidden(),
                (true, true) => ProgressDrawTarget::stderr(),
                // --progress on a pipe or a file: draw anyway.
                (true, false) => ProgressDrawTarget::term_like(Box::new(AnsiStderr)),
            });
            let style = ProgressStyle::with_template("{spinner} {prefix} {wide_msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let mut bars: HashMap<String, ProgressBar> = HashMap::new();
            let mut states: HashMap<String, State> =
                names.iter().map(|n| (n.clone(), State::Waiting)).collect();
            let say = |mp: &MultiProgress, line: String| {
                crate::common::log_line(&line);
                if quiet && !line.contains("] FAILED: ") {
                    return;
                }
                if tty {
                    let _ = mp.println(line);
                } else {
                    eprintln!("{line}");
                }
            };
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Started { layer } => {
                        if tty {
                            let bar = mp.add(ProgressBar::new_spinner());
                            bar.set_style(style.clone());
                            bar.set_prefix(format!("{layer:width$}"));
                            bar.set_message("building");
                            bar.enable_steady_tick(Duration::from_millis(120));
                            bars.insert(layer.clone(), bar);
                        } else {
                            say(&mp, format!("[{layer}] building"));
                        }
                        states.insert(layer, State::Running);
                    }
                    Event::Assigned { layer, worker } => {
                        if let Some(bar) = bars.get(&layer) {
                            bar.set_message(format!("building on {worker}"));
                        } else {
                            say(&mp, format!("[{layer}] on worker {worker}"));
                        }
                    }
                    Event::Log { layer, line } => {
                        if let Some(bar) = bars.get(&layer) {
                            bar.set_message(line.clone());
                        }
                        say(&mp, format!("{layer:width$} | {line}"));
                    }
                    Event::Cached { layer } => {
                        say(&mp, format!("[{layer}] cached"));
                        states.insert(layer, State::Cached);
                    }
                    Event::Built { layer, duration } => {
                        if let Some(bar) = bars.remove(&layer) {
                            bar.finish_and_clear();
                        }
                        say(
                            &mp,
                            format!("[{layer}] built in {:.1}s", duration.as_secs_f64()),
                        );
                        states.insert(layer, State::Built(duration));
                    }
                    Event::Failed { layer, failure } => {
                        if let Some(bar) = bars.remove(&layer) {
                            bar.finish_and_clear();
                        }
                        say(&mp, format!("[{layer}] FAILED: {failure}"));
                        states.insert(layer, State::Failed(failure.message));
                    }
                    Event::Cancelled { layer, .. } => {
                        if let Some(bar) = bars.remove(&layer) {
                            bar.finish_and_clear();
                        }
                        say(&mp, format!("[{layer}] cancelled"));
                        states.insert(layer, State::Cancelled);
                    }
                    Event::Skipped { layer, because } => {
                        if let Some(bar) = bars.remove(&layer) {
                            bar.finish_and_clear();
                        }
                        say(&mp, format!("[{layer}] skipped: {because}"));
                        states.insert(layer, State::Skipped(because));
                    }
                }
            }
            for bar in bars.values() {
                bar.finish_and_clear();
            }
            summary(&names, &states, width)
        });
        Progress { task }
    }

    /// Wait for the last event (the sender side must be gone) and return the summary.
    pub(crate) async fn finish(self) -> String {
        self.task.await.unwrap_or_default()
    }
}

/// stderr as a terminal that understands ANSI escapes, for `--progress` when stderr is
/// not a terminal (indicatif hides its display there).
#[derive(Debug)]
struct AnsiStderr;

impl AnsiStderr {
    fn put(&self, s: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        std::io::stderr().write_all(s.as_bytes())
    }
}

impl indicatif::TermLike for AnsiStderr {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))
        } else {
            Ok(())
        }
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        std::io::stderr().flush()
    }
}

fn summary(names: &[String], states: &HashMap<String, State>, width: usize) -> String {
    let mut out = String::from("\nsummary:\n");
    let (mut built, mut cached, mut failed) = (0, 0, 0);
    for name in names {
        let line = match states.get(name).cloned().unwrap_or(State::Waiting) {
            State::Built(d) => {
                built += 1;
                format!("built   {:>7.1}s", d.as_secs_f64())
            }
            State::Cached => {
                cached += 1;
                "cached".to_string()
            }
            State::Failed(e) => {
                failed += 1;
                format!("FAILED  {}", e.lines().next().unwrap_or(""))
            }
            State::Skipped(why) => format!("skipped ({why})"),
            State::Cancelled => "cancelled".to_string(),
            State::Running | State::Waiting => "not run".to_string(),
        };
        let _ = writeln!(out, "  {name:width$}  {line}");
    }
    let _ = write!(out, "{built} built, {cached} cached, {failed} failed");
    out
}
