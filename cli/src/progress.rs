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
        let tty = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let mp = MultiProgress::with_draw_target(if tty {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            });
            let style = ProgressStyle::with_template("{spinner} {prefix} {wide_msg} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let mut bars: HashMap<String, ProgressBar> = HashMap::new();
            let mut states: HashMap<String, State> =
                names.iter().map(|n| (n.clone(), State::Waiting)).collect();
            let say = |mp: &MultiProgress, line: String| {
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
