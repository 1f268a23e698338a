//! A YAML tree that remembers where every node came from.
//!
//! `serde_yaml` (the parser of record for plain data such as `--substitute-file`) cannot
//! report where a value sits, and every stackerfile error must name `file:line:column`.
//! So the language is read from `yaml-rust2`'s event stream into this small tree: each
//! node keeps its position and, for scalars, the raw text and style, which also lets us
//! read `mode: 0755` as octal the way stacker's YAML 1.1 parser does.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Byte offset into the (substituted) text a node starts at.
pub(crate) type Offset = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    Plain,
    Quoted,
    Block,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Scalar { text: String, style: Style },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: Kind,
    pub at: Offset,
}

/// A YAML syntax error with the offset it happened at.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub at: Offset,
    pub message: String,
    /// Another place the error concerns (the first of two duplicate keys).
    pub related: Option<Offset>,
}

impl Node {
    pub(crate) fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// A plain `~`, `null`, or nothing at all: YAML's null.
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, style: Style::Plain }
            if text.is_empty() || text == "~" || text.eq_ignore_ascii_case("null"))
    }

    pub(crate) fn kind_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a map",
        }
    }

    /// Look a key up in a mapping node.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Parse one YAML document. An empty stream gives `None`.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Byte offsets: yaml-rust2's markers count characters, so convert once.
    let char_to_byte: Vec<usize> = text
        .char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(text.len()))
        .collect();
    builder.char_to_byte = char_to_byte;
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            at: builder.byte(e.marker().index()),
            message: e.info().to_string(),
            related: None,
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    if builder.documents.len() > 1 {
        return Err(SyntaxError {
            at: builder.second_document_at,
            message: "a stackerfile is one YAML document, but this file has more than one \
                      (remove the extra '---')"
                .to_string(),
            related: None,
        });
    }
    Ok(builder.documents.pop())
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    documents: Vec<Node>,
    anchors: std::collections::HashMap<usize, Node>,
    error: Option<SyntaxError>,
    second_document_at: Offset,
    char_to_byte: Vec<usize>,
}

enum Frame {
    Seq {
        at: Offset,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        at: Offset,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

impl Builder {
    fn byte(&self, char_index: usize) -> Offset {
        self.char_to_byte
            .get(char_index)
            .copied()
            .unwrap_or_else(|| self.char_to_byte.last().copied().unwrap_or(0))
    }

    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.documents.len() == 1 {
                    self.second_document_at = node.at;
                }
                self.documents.push(node);
            }
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => *pending_key = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn fail(&mut self, at: Offset, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError {
                at,
                message,
                related: None,
            });
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = self.byte(mark.index());
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let style = match style {
                    TScalarStyle::Plain if tag.is_none() => Style::Plain,
                    TScalarStyle::Plain
                    | TScalarStyle::SingleQuoted
                    | TScalarStyle::DoubleQuoted => Style::Quoted,
                    TScalarStyle::Literal | TScalarStyle::Folded => Style::Block,
                };
                let node = Node {
                    kind: Kind::Scalar { text, style },
                    at,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                at,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                at,
                anchor,
                entries: Vec::new(),
                pending_key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { at, anchor, items }) => (
                        Node {
                            kind: Kind::Seq(items),
                            at,
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        at,
                        anchor,
                        entries,
                        ..
                    }) => match merge_and_check(entries) {
                        // A block mapping's start marker sits after its first key; the key
                        // itself is where a reader looks.
                        Ok(entries) => (
                            Node {
                                at: entries.first().map_or(at, |(k, _)| k.at.min(at)),
                                kind: Kind::Map(entries),
                            },
                            anchor,
                        ),
                        Err(e) => {
                            if self.error.is_none() {
                                self.error = Some(e);
                            }
                            return;
                        }
                    },
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_node(node);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.at = at;
                    self.push_node(node)
                }
                None => self.fail(at, "alias to an unknown anchor".to_string()),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

/// Apply `<<` merge keys (explicit keys win, earlier merged maps win over later ones, as in
/// go-yaml) and reject duplicate keys, which YAML forbids and stacker's parser reports.
fn merge_and_check(entries: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, SyntaxError> {
    let mut out: Vec<(Node, Node)> = Vec::with_capacity(entries.len());
    let mut merged: Vec<(Node, Node)> = Vec::new();
    for (key, value) in entries {
        if matches!(&key.kind, Kind::Scalar { text, style: Style::Plain } if text == "<<") {
            let sources: Vec<Node> = match value.kind {
                Kind::Map(_) => vec![value],
                Kind::Seq(items) => items,
                _ => {
                    return Err(SyntaxError {
                        at: value.at,
                        message: "a '<<' merge key needs a map or a list of maps".to_string(),
                        related: None,
                    });
                }
            };
            for source in sources {
                match source.kind {
                    Kind::Map(pairs) => merged.extend(pairs),
                    _ => {
                        return Err(SyntaxError {
                            at: source.at,
                            message: "a '<<' merge key needs a map or a list of maps".to_string(),
                            related: None,
                        });
                    }
                }
            }
            continue;
        }
        if let Some(k) = key.scalar()
            && let Some((first, _)) = out.iter().find(|(o, _)| o.scalar() == Some(k))
        {
            return Err(SyntaxError {
                at: key.at,
                message: format!("duplicate key '{k}' in one mapping"),
                related: Some(first.at),
            });
        }
        out.push((key, value));
    }
    for (key, value) in merged {
        let present = key
            .scalar()
            .is_some_and(|k| out.iter().any(|(o, _)| o.scalar() == Some(k)));
        if !present {
            out.push((key, value));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).unwrap().unwrap()
    }

    #[test]
    fn offsets_are_bytes_even_after_multibyte_text() {
        let text = "a: \"é€\"\nb:\n  c: 1\n";
        let n = root(text);
        let b = n.get("b").unwrap();
        let c = b.get("c").unwrap();
        assert_eq!(&text[c.at..c.at + 1], "1");
    }

    #[test]
    fn plain_scalars_keep_raw_text_and_style() {
        let n = root("m: 0755\nq: '0755'\nb: |\n  x\n");
        assert!(
            matches!(&n.get("m").unwrap().kind, Kind::Scalar { text, style: Style::Plain } if text == "0755")
        );
        assert!(matches!(
            &n.get("q").unwrap().kind,
            Kind::Scalar {
                style: Style::Quoted,
                ..
            }
        ));
        assert!(matches!(
            &n.get("b").unwrap().kind,
            Kind::Scalar {
                style: Style::Block,
                ..
            }
        ));
    }

    #[test]
    fn block_mappings_start_at_their_first_key() {
        let text = "a:\n  - k: 1\n    j: 2\nb:\n  type: x\n";
        let n = root(text);
        let Kind::Seq(items) = &n.get("a").unwrap().kind else {
            panic!()
        };
        assert_eq!(&text[items[0].at..items[0].at + 1], "k");
        let b = n.get("b").unwrap();
        assert_eq!(&text[b.at..b.at + 4], "type");
    }

    #[test]
    fn merge_keys_and_aliases() {
        let n = root("base: &b {x: 1, y: 2}\nl:\n  <<: *b\n  y: 3\n");
        let l = n.get("l").unwrap();
        assert_eq!(l.get("x").unwrap().scalar(), Some("1"));
        assert_eq!(l.get("y").unwrap().scalar(), Some("3"));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(e.message.contains("duplicate key 'a'"), "{}", e.message);
        assert_eq!(e.at, 10);
    }

    #[test]
    fn syntax_error_has_offset() {
        let text = "a:\n  - b\n c: [\n";
        let e = parse(text).unwrap_err();
        assert!(e.at > 0 && e.at <= text.len());
    }

    #[test]
    fn empty_and_multi_document() {
        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert!(parse("---\na: 1\n").unwrap().is_some());
    }
}
