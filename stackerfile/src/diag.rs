//! Diagnostics: what is wrong, where (`file:line:column` in the file as the user wrote
//! it, before substitution), in which layer, and what would be right.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A 1-based line and column (columns count characters, not bytes).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub pos: Pos,
    pub layer: Option<String>,
    pub message: String,
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file.display())?;
        if self.pos.line > 0 {
            write!(f, ":{}:{}", self.pos.line, self.pos.col)?;
        }
        write!(f, ": {sev}: ")?;
        if let Some(layer) = &self.layer {
            write!(f, "layer '{layer}': ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets of the substituted text back to lines and columns of the original.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    original: String,
    /// (start in substituted text, end in substituted text, start in original, end in original),
    /// in increasing order.
    replacements: Vec<(usize, usize, usize, usize)>,
    /// Byte offsets where the original's lines start: built on the first lookup, one entry
    /// per line.
    lines: std::sync::OnceLock<Vec<usize>>,
}

impl SourceMap {
    pub fn new(original: String) -> Self {
        SourceMap {
            original,
            replacements: Vec::new(),
            lines: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn push_replacement(&mut self, new: (usize, usize), orig: (usize, usize)) {
        self.replacements.push((new.0, new.1, orig.0, orig.1));
    }

    /// The original file's text.
    pub fn original(&self) -> &str {
        &self.original
    }

    /// Position of a byte offset into the original text.
    pub fn pos_original(&self, offset: usize) -> Pos {
        let text = &self.original;
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let lines = self.lines.get_or_init(|| {
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        // The last line start at or before the offset (lines[0] is 0, so there is one).
        let line = lines.partition_point(|&start| start <= offset);
        let line_start = lines[line - 1];
        let col = text[line_start..offset].chars().count() + 1;
        Pos { line, col }
    }

    /// Position in the original text of a byte offset into the substituted text. Offsets
    /// inside a substituted value map to the start of its `${{...}}`.
    pub fn pos(&self, substituted_offset: usize) -> Pos {
        // The replacements that start at or before the offset; the last of them decides.
        let before = self
            .replacements
            .partition_point(|&(ns, ..)| ns <= substituted_offset);
        let delta: isize = match before.checked_sub(1).map(|i| self.replacements[i]) {
            None => 0,
            Some((_, ne, os, _)) if substituted_offset < ne => return self.pos_original(os),
            Some((_, ne, _, oe)) => oe as isize - ne as isize,
        };
        let orig = (substituted_offset as isize + delta).max(0) as usize;
        self.pos_original(orig.min(self.original.len()))
    }
}

/// Line and column of a byte offset in `text`.
pub fn pos_in(text: &str, offset: usize) -> Pos {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = text[line_start..offset].chars().count() + 1;
    Pos { line, col }
}

/// Collects diagnostics for one file while it is read.
pub(crate) struct Reporter<'a> {
    pub file: &'a Path,
    pub map: &'a SourceMap,
    pub out: &'a mut Vec<Diagnostic>,
}

impl Reporter<'_> {
    pub(crate) fn at(&self, offset: usize) -> Pos {
        self.map.pos(offset)
    }

    pub(crate) fn push(
        &mut self,
        severity: Severity,
        offset: usize,
        layer: Option<&str>,
        message: String,
        help: Option<String>,
    ) {
        let pos = self.at(offset);
        self.out.push(Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            pos,
            layer: layer.map(str::to_string),
            message,
            help,
        });
    }
}

/// The longest word [`suggest`] looks for a near miss of: the distance costs the product
/// of the lengths, and a typo of a longer word is unlikely.
pub const SUGGEST_MAX_LEN: usize = 64;

/// The nearest of `candidates` to `word`, when it is close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = word.chars().count();
    if len > SUGGEST_MAX_LEN {
        return None;
    }
    let limit = (len / 3).max(1);
    candidates
        .into_iter()
        // A length that differs by more than the limit is never close enough.
        .filter(|c| c.chars().count().abs_diff(len) <= limit)
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_map_back_through_replacements() {
        // original: "a: ${{X}}\nb: 1\n"  substituted: "a: hello world\nb: 1\n"
        let original = "a: ${{X}}\nb: 1\n".to_string();
        let mut map = SourceMap::new(original);
        map.push_replacement((3, 14), (3, 9));
        // 'b' in the substituted text is at byte 15
        assert_eq!(map.pos(15), Pos { line: 2, col: 1 });
        // inside the value -> the placeholder's start
        assert_eq!(map.pos(8), Pos { line: 1, col: 4 });
        assert_eq!(map.pos(0), Pos { line: 1, col: 1 });
    }

    #[test]
    fn line_index_agrees_with_a_scan() {
        let text = "a: 1\né: ü\n\n  x: y\nlast";
        let map = SourceMap::new(text.to_string());
        for offset in 0..=text.len() + 2 {
            assert_eq!(map.pos_original(offset), pos_in(text, offset), "{offset}");
        }
    }

    #[test]
    fn columns_count_characters() {
        assert_eq!(pos_in("é: x", 4), Pos { line: 1, col: 4 });
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("improts", ["imports", "import"]), Some("imports"));
        assert_eq!(suggest("zzzzzz", ["imports", "import"]), None);
        assert_eq!(suggest("rnu", ["run", "cmd"]), Some("run"));
        // Too long to look for (the distance costs the product of the lengths).
        let long = "a".repeat(SUGGEST_MAX_LEN + 1);
        let near = format!("{long}b");
        assert_eq!(suggest(&long, [near.as_str()]), None);
    }

    #[test]
    fn display_format() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: PathBuf::from("s.yaml"),
            pos: Pos { line: 3, col: 5 },
            layer: Some("app".into()),
            message: "unknown key 'improts'".into(),
            help: Some("did you mean 'imports'?".into()),
        };
        assert_eq!(
            d.to_string(),
            "s.yaml:3:5: error: layer 'app': unknown key 'improts'\n  help: did you mean 'imports'?"
        );
    }
}
