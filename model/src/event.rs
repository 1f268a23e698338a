//! What happens during a build, for progress displays, the state store and logs.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::failure::LayerFailure;

/// One thing that happened to a layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        layer: String,
    },
    /// A worker took the layer.
    Assigned {
        layer: String,
        worker: String,
    },
    Log {
        layer: String,
        line: String,
    },
    Cached {
        layer: String,
    },
    Built {
        layer: String,
        duration: Duration,
    },
    /// The layer did not build (a failure of kind `Cancelled` is sent as
    /// [`Event::Cancelled`] instead).
    Failed {
        layer: String,
        failure: LayerFailure,
    },
    /// Not built because a dependency was not.
    Skipped {
        layer: String,
        because: String,
    },
    /// Stopped, or never started, because the build was cancelled.
    Cancelled {
        layer: String,
        reason: String,
    },
}

impl Event {
    /// The event of a layer that ended with `failure`.
    pub fn ended(layer: String, failure: LayerFailure) -> Event {
        if failure.is_cancelled() {
            Event::Cancelled {
                layer,
                reason: failure.message,
            }
        } else {
            Event::Failed { layer, failure }
        }
    }
}

/// Where events go. Sending never blocks and never fails: a watcher that went away
/// must not stop the build.
#[derive(Debug, Clone)]
pub struct EventSender(mpsc::UnboundedSender<Event>);

impl EventSender {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventSender(tx), rx)
    }

    pub fn send(&self, event: Event) {
        // Dropped only when nobody listens any more.
        let _ = self.0.send(event);
    }

    pub fn log(&self, layer: &str, line: impl Into<String>) {
        self.send(Event::Log {
            layer: layer.to_string(),
            line: line.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureKind;

    #[test]
    fn a_cancelled_failure_is_a_cancelled_event() {
        let e = Event::ended("a".into(), LayerFailure::cancelled());
        assert!(matches!(e, Event::Cancelled { .. }));
        let e = Event::ended(
            "a".into(),
            LayerFailure::new(FailureKind::RunFailed, "exit 1"),
        );
        assert!(
            matches!(e, Event::Failed { failure, .. } if failure.kind == FailureKind::RunFailed)
        );
    }
}
