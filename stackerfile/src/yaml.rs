//! A YAML tree that remembers where every node came from.
//!
//! `serde_yaml` (the parser of record for plain data such as `--substitute-file`) cannot
//! report where a value sits, and every stackerfile error must name `file:line:column`.
//! So the language is read from `yaml-rust2`'s event stream into this small tree: each
//! node keeps its position and, for scalars, the raw text and style, which also lets us
//! read `mode: 0755` as octal the way stacker's YAML 1.1 parser does.

use std::collections::HashMap;

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
    /// Another place the error concerns (the first of two duplicate keys, the anchor an
    /// alias names), with the words that introduce it ("the first one is at").
    pub related: Option<(Offset, &'static str)>,
}

/// How much YAML the aliases of one document may copy, in total, measured as the
/// approximate memory of the copied nodes ([`NODE_COST`] per node plus the text of its
/// scalars). Real stackerfiles reuse a script or a list through an anchor a few times,
/// far below this; an alias bomb (each level repeating the one before) passes it after
/// a few levels, and is refused there instead of taking the parser's memory with it.
pub(crate) const ALIAS_BUDGET: usize = 16 << 20;

/// What one node counts against [`ALIAS_BUDGET`] besides its text.
const NODE_COST: usize = std::mem::size_of::<Node>() + 16;

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

    /// The node as an error message shows it: a scalar quoted, else its kind.
    pub(crate) fn shown(&self) -> String {
        self.scalar()
            .map(|s| format!("'{s}'"))
            .unwrap_or_else(|| self.kind_name().into())
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
    parse_with_budget(text, ALIAS_BUDGET)
}

/// [`parse`] with an alias budget (tests use small ones).
pub(crate) fn parse_with_budget(
    text: &str,
    alias_budget: usize,
) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder {
        offsets: CharOffsets::new(text),
        alias_budget,
        text,
        stack: Vec::new(),
        documents: Vec::new(),
        anchors: HashMap::new(),
        error: None,
        second_document_at: 0,
        aliased: 0,
    };
    let mut parser = Parser::new_from_str(text);
    // Events one at a time (not `Parser::load`), so that the first error stops the work:
    // after an alias bomb is refused nothing more is built.
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(next) => next,
            Err(e) => {
                return Err(SyntaxError {
                    at: builder.offsets.byte(e.marker().index()),
                    message: e.info().to_string(),
                    related: None,
                });
            }
        };
        if ev == Event::StreamEnd {
            break;
        }
        builder.on_event(ev, mark);
        if builder.error.is_some() {
            break;
        }
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
    Ok(builder.documents.pop().map(|(node, _)| node))
}

/// Turns yaml-rust2's character indexes into byte offsets without an entry per
/// character: ASCII text needs no table, other text keeps the byte offset of every
/// [`CharOffsets::STRIDE`]th character and walks the few characters after it.
struct CharOffsets<'t> {
    text: &'t str,
    /// Byte offset of character `i * STRIDE`; empty for ASCII text.
    every: Vec<usize>,
}

impl<'t> CharOffsets<'t> {
    const STRIDE: usize = 256;

    fn new(text: &'t str) -> Self {
        let every = if text.is_ascii() {
            Vec::new()
        } else {
            text.char_indices()
                .step_by(Self::STRIDE)
                .map(|(b, _)| b)
                .collect()
        };
        CharOffsets { text, every }
    }

    fn byte(&self, char_index: usize) -> Offset {
        if self.every.is_empty() {
            return char_index.min(self.text.len());
        }
        let slot = (char_index / Self::STRIDE).min(self.every.len() - 1);
        let start = self.every[slot];
        let skip = char_index - slot * Self::STRIDE;
        self.text[start..]
            .char_indices()
            .nth(skip)
            .map_or(self.text.len(), |(b, _)| start + b)
    }
}

struct Builder<'t> {
    text: &'t str,
    offsets: CharOffsets<'t>,
    stack: Vec<Frame>,
    /// Finished top-level nodes with their costs.
    documents: Vec<(Node, usize)>,
    /// Anchor id -> the anchored node and its cost.
    anchors: HashMap<usize, (Node, usize)>,
    error: Option<SyntaxError>,
    second_document_at: Offset,
    /// What aliases copied so far, against `alias_budget`.
    aliased: usize,
    alias_budget: usize,
}

enum Frame {
    Seq {
        at: Offset,
        anchor: usize,
        items: Vec<Node>,
        cost: usize,
    },
    Map {
        at: Offset,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
        cost: usize,
    },
}

impl Builder<'_> {
    /// Add a finished node (costing `cost`) to the collection being built.
    fn push_node(&mut self, node: Node, cost: usize) {
        match self.stack.last_mut() {
            None => {
                if self.documents.len() == 1 {
                    self.second_document_at = node.at;
                }
                self.documents.push((node, cost));
            }
            Some(Frame::Seq {
                items, cost: total, ..
            }) => {
                *total = total.saturating_add(cost);
                items.push(node)
            }
            Some(Frame::Map {
                entries,
                pending_key,
                cost: total,
                ..
            }) => {
                *total = total.saturating_add(cost);
                match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(key) => entries.push((key, node)),
                }
            }
        }
    }

    fn fail(&mut self, at: Offset, message: String, related: Option<(Offset, &'static str)>) {
        if self.error.is_none() {
            self.error = Some(SyntaxError {
                at,
                message,
                related,
            });
        }
    }

    /// The name an alias at `at` is written with (`*name`).
    fn alias_name(&self, at: Offset) -> &str {
        let rest = self.text.get(at..).unwrap_or("");
        let rest = rest.strip_prefix('*').unwrap_or(rest);
        let end = rest
            .find(|c: char| c.is_whitespace() || ",[]{}".contains(c))
            .unwrap_or(rest.len());
        &rest[..end]
    }

    fn alias(&mut self, id: usize, at: Offset) {
        let Some((node, cost)) = self.anchors.get(&id) else {
            self.fail(at, "alias to an unknown anchor".to_string(), None);
            return;
        };
        let cost = *cost;
        self.aliased = self.aliased.saturating_add(cost);
        if self.aliased > self.alias_budget {
            let anchor_at = node.at;
            let name = self.alias_name(at).to_string();
            self.fail(
                at,
                format!(
                    "alias '*{name}' makes the aliases of this file copy more than {} of \
                     YAML (anchor '&{name}' holds about {}, copied again at every alias); \
                     this looks like an alias bomb, so the file is refused",
                    human_bytes(self.alias_budget),
                    human_bytes(cost),
                ),
                Some((anchor_at, "the anchor is at")),
            );
            return;
        }
        let mut node = node.clone();
        node.at = at;
        self.push_node(node, cost);
    }
}

/// `1536` -> `1.5 KiB`.
pub(crate) fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = self.offsets.byte(mark.index());
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let style = match style {
                    TScalarStyle::Plain if tag.is_none() => Style::Plain,
                    TScalarStyle::Plain
                    | TScalarStyle::SingleQuoted
                    | TScalarStyle::DoubleQuoted => Style::Quoted,
                    TScalarStyle::Literal | TScalarStyle::Folded => Style::Block,
                };
                let cost = NODE_COST + text.len();
                let node = Node {
                    kind: Kind::Scalar { text, style },
                    at,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, (node.clone(), cost));
                }
                self.push_node(node, cost);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq {
                at,
                anchor,
                items: Vec::new(),
                cost: NODE_COST,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Frame::Map {
                at,
                anchor,
                entries: Vec::new(),
                pending_key: None,
                cost: NODE_COST,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, cost) = match self.stack.pop() {
                    Some(Frame::Seq {
                        at,
                        anchor,
                        items,
                        cost,
                    }) => (
                        Node {
                            kind: Kind::Seq(items),
                            at,
                        },
                        anchor,
                        cost,
                    ),
                    Some(Frame::Map {
                        at,
                        anchor,
                        entries,
                        cost,
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
                            cost,
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
                    self.anchors.insert(anchor, (node.clone(), cost));
                }
                self.push_node(node, cost);
            }
            Event::Alias(id) => self.alias(id, at),
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
/// Linear in the entries: keys seen are kept in a hash map.
fn merge_and_check(entries: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, SyntaxError> {
    let mut out: Vec<(Node, Node)> = Vec::with_capacity(entries.len());
    let mut merged: Vec<(Node, Node)> = Vec::new();
    // Scalar key -> where it first appears.
    let mut seen: HashMap<String, Offset> = HashMap::with_capacity(entries.len());
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
        if let Some(k) = key.scalar() {
            if let Some(&first) = seen.get(k) {
                return Err(SyntaxError {
                    at: key.at,
                    message: format!("duplicate key '{k}' in one mapping"),
                    related: Some((first, "the first one is at")),
                });
            }
            seen.insert(k.to_string(), key.at);
        }
        out.push((key, value));
    }
    for (key, value) in merged {
        if let Some(k) = key.scalar() {
            if seen.contains_key(k) {
                continue;
            }
            seen.insert(k.to_string(), key.at);
        }
        out.push((key, value));
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

    /// Nine levels of nine aliases to the level before: 9^9 scalars if expanded.
    fn billion_laughs() -> String {
        let names = "abcdefghi";
        let mut text = String::from("a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n");
        for (prev, name) in names.chars().zip(names.chars().skip(1)) {
            let items = vec![format!("*{prev}"); 9].join(",");
            text.push_str(&format!("{name}: &{name} [{items}]\n"));
        }
        text
    }

    #[test]
    fn an_alias_bomb_is_refused_naming_alias_and_anchor() {
        let text = billion_laughs();
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("alias bomb"), "{}", e.message);
        // The error sits on the alias that crossed the budget and names it and its anchor.
        let alias = &text[e.at..];
        let name = &alias[1..alias.find(',').unwrap()];
        assert!(alias.starts_with('*'), "{alias:?}");
        assert!(e.message.contains(&format!("'*{name}'")), "{}", e.message);
        assert!(e.message.contains(&format!("'&{name}'")), "{}", e.message);
        let (anchor_at, words) = e.related.expect("points at the anchor");
        assert_eq!(words, "the anchor is at");
        assert!(
            text[..anchor_at].ends_with(&format!("&{name} ")),
            "{anchor_at}"
        );
    }

    #[test]
    fn the_budget_counts_copied_nodes_and_text() {
        // Each alias of a 3-item list costs four nodes and its text.
        let one = NODE_COST * 4 + 3;
        let text = "a: &a [x, y, z]\nb: [*a, *a, *a]\n";
        assert!(parse_with_budget(text, 3 * one).is_ok());
        let e = parse_with_budget(text, 3 * one - 1).unwrap_err();
        assert_eq!(&text[e.at..e.at + 2], "*a");
        assert_eq!(
            e.at,
            text.rfind("*a").unwrap(),
            "the third alias crosses it"
        );
        // A long scalar copied a few times is as much a bomb as many small nodes.
        let long = "x".repeat(1 << 20);
        let text = format!("a: &s '{long}'\nb: [{}]\n", vec!["*s"; 20].join(", "));
        let e = parse(&text).unwrap_err();
        assert!(
            e.message.contains("'&s' holds about 1.0 MiB"),
            "{}",
            e.message
        );
        // Within the budget, aliases still copy their node.
        let n = root("a: &a [x, y]\nb: *a\n");
        assert!(matches!(&n.get("b").unwrap().kind, Kind::Seq(items) if items.len() == 2));
    }

    #[test]
    fn duplicate_keys_are_found_among_many() {
        // Linear: 200,000 keys would be 2e10 comparisons for a pairwise check.
        let mut text = String::new();
        for i in 0..200_000 {
            text.push_str(&format!("k{i}: v\n"));
        }
        assert!(parse(&text).is_ok());
        text.push_str("k123: again\n");
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("duplicate key 'k123'"), "{}", e.message);
        let (first, _) = e.related.unwrap();
        assert!(text[first..].starts_with("k123: v\n"));
        // A merged key never clashes with an explicit one, nor the second merged one
        // with the first.
        let n = root("a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n  y: 3\n");
        let c = n.get("c").unwrap();
        assert_eq!(c.get("x").unwrap().scalar(), Some("1"));
        assert_eq!(c.get("y").unwrap().scalar(), Some("3"));
    }

    #[test]
    fn char_offsets_without_a_table_per_character() {
        let text: String = (0..2000)
            .map(|i| if i % 7 == 0 { 'é' } else { 'a' })
            .collect();
        let offsets = CharOffsets::new(&text);
        assert!(offsets.every.len() <= 2000 / CharOffsets::STRIDE + 1);
        for (i, (b, _)) in text.char_indices().enumerate() {
            assert_eq!(offsets.byte(i), b, "char {i}");
        }
        assert_eq!(offsets.byte(2000), text.len());
        assert_eq!(offsets.byte(5000), text.len());
        let ascii = CharOffsets::new("plain");
        assert!(ascii.every.is_empty());
        assert_eq!(ascii.byte(3), 3);
    }

    #[test]
    fn empty_and_multi_document() {
        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
        assert!(parse("a: 1\n---\nb: 2\n").is_err());
        assert!(parse("---\na: 1\n").unwrap().is_some());
    }
}
