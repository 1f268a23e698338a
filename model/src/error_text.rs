//! One line of text for an error and its causes, as users and logs see it.

/// An error and its sources, `: `-joined, without repeating a source whose text the
/// line already holds (many errors quote their source). The cause a user can act on
/// (a TLS failure, a refused connection) is often only in the sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct E {
        text: &'static str,
        #[source]
        source: Option<Box<E>>,
    }

    fn e(text: &'static str, source: Option<E>) -> E {
        E {
            text,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn sources_are_joined_once() {
        let inner = e("connection refused", None);
        let middle = e("transport error", Some(inner));
        assert_eq!(
            error_chain(&e("connecting", Some(middle))),
            "connecting: transport error: connection refused"
        );
        // A message that already quotes its source does not repeat it.
        let quoted = e("reading: disk on fire", Some(e("disk on fire", None)));
        assert_eq!(error_chain(&quoted), "reading: disk on fire");
    }
}
