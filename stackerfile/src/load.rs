//! Loading a stackerfile and its prerequisites (recursively, relative to the file that
//! names them) into one list of layers, with the file DAG checked for cycles.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use crate::diag::{Diagnostic, Pos, Reporter, Severity, SourceMap};
use crate::model::Layer;
use crate::parse::{ParsedFile, parse_file};
use crate::subst::{Substitutions, substitute};
use crate::yaml;

/// Reads stackerfiles. The default reads the local filesystem; the CLI and the
/// coordinator can supply files from elsewhere (uploaded, fetched over http).
pub trait FileSource {
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Read a file of at most `limit` bytes; a larger one is an error of kind
    /// [`std::io::ErrorKind::FileTooLarge`]. Sources that can tell the size before
    /// reading (the local filesystem) should, so that a huge file is never read.
    fn read_limited(&self, path: &Path, limit: u64) -> std::io::Result<String> {
        let text = self.read(path)?;
        if text.len() as u64 > limit {
            return Err(too_large(text.len() as u64, limit));
        }
        Ok(text)
    }
    /// A stable identity for a path (to find the same file reached by two routes).
    fn identity(&self, path: &Path) -> PathBuf {
        normalize(path)
    }
}

/// Reads from the local filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalFiles;

impl FileSource for LocalFiles {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn read_limited(&self, path: &Path, limit: u64) -> std::io::Result<String> {
        use std::io::Read;
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        if size > limit {
            return Err(too_large(size, limit));
        }
        // The file may grow while it is read: never take more than the limit and a byte.
        let mut text = String::with_capacity(size as usize);
        file.take(limit.saturating_add(1))
            .read_to_string(&mut text)?;
        if text.len() as u64 > limit {
            return Err(too_large(text.len() as u64, limit));
        }
        Ok(text)
    }
    fn identity(&self, path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| normalize(path))
    }
}

/// The error [`FileSource::read_limited`] gives for a file over the limit.
pub fn too_large(size: u64, limit: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::FileTooLarge,
        format!(
            "{} is over the stackerfile size limit of {}",
            human_size(size),
            human_size(limit)
        ),
    )
}

fn human_size(n: u64) -> String {
    crate::yaml::human_bytes(usize::try_from(n).unwrap_or(usize::MAX))
}

/// One loaded stackerfile.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// The path as the loader reached it (the entry file as given, prerequisites joined
    /// onto the directory of the file that names them).
    pub path: PathBuf,
    /// The text after substitution (what stacker records in the stacker_yaml annotation).
    pub substituted: String,
    /// Indexes (into [`Loaded::files`]) of its direct prerequisites.
    pub prerequisites: Vec<usize>,
}

/// All files and layers loaded together.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Files in load order: every file after all of its prerequisites.
    pub files: Vec<LoadedFile>,
    /// Layers in load order, each with the index of its file.
    pub layers: Vec<(usize, Layer)>,
    pub warnings: Vec<Diagnostic>,
}

/// Errors from loading or planning: every problem found, in file order.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct PlanError {
    pub diagnostics: Vec<Diagnostic>,
    /// Warnings found on the way, for the caller to show as well.
    pub warnings: Vec<Diagnostic>,
}

fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A limit to suggest: the next power of two over four times the current one, in MiB.
fn suggest_limit(current: u64) -> String {
    let mib = (current.saturating_mul(4) >> 20).max(1).next_power_of_two();
    format!("{mib}M")
}

/// Lexically normalise a path (`a/./b/../c` -> `a/c`) without touching the filesystem.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`; a leading `..` must stay.
                Some(Component::RootDir) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

struct Loader<'s> {
    source: &'s dyn FileSource,
    subs: &'s Substitutions,
    max_file_size: u64,
    loaded: Loaded,
    errors: Vec<Diagnostic>,
    /// identity -> index in loaded.files (once finished)
    done: HashMap<PathBuf, usize>,
    /// files being loaded (for cycle detection), with their display paths
    stack: Vec<(PathBuf, PathBuf)>,
    /// [`MAX_FILES`] was reached (and said).
    too_many_files: bool,
    /// Prerequisites read and parsed ahead, on several threads, by identity.
    prefetched: HashMap<PathBuf, Prepared>,
    /// Whether to prefetch (off: every file is read and parsed when it is loaded).
    prefetch: bool,
}

/// A file substituted and parsed, with what that found.
struct Prepared {
    /// The path it was read by (a file reached by another spelling is read again, so
    /// its diagnostics name the route that loads it).
    display: PathBuf,
    substituted: String,
    diags: Vec<Diagnostic>,
    parsed: ParsedFile,
}

/// Substitute and parse `text`, the file read as `display`.
fn prepare(text: String, subs: &Substitutions, display: &Path) -> Prepared {
    let (substituted, map, problems) = substitute(text, subs);
    let mut diags = Vec::new();
    for p in problems {
        diags.push(Diagnostic {
            severity: if p.warning {
                Severity::Warning
            } else {
                Severity::Error
            },
            file: display.to_path_buf(),
            pos: map.pos_original(p.at),
            layer: None,
            message: p.message,
            help: p.help,
        });
    }
    let dir = display.parent().map(Path::to_path_buf).unwrap_or_default();
    let parsed = if diags.iter().any(|d| d.severity == Severity::Error) {
        ParsedFile::default()
    } else {
        parse(&substituted, &map, display, &dir, &mut diags)
    };
    Prepared {
        display: display.to_path_buf(),
        substituted,
        diags,
        parsed,
    }
}

fn parse(
    text: &str,
    map: &SourceMap,
    display: &Path,
    dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> ParsedFile {
    let root = match yaml::parse(text) {
        Ok(r) => r,
        Err(e) => {
            let help = e.related.map(|(r, words)| {
                let p = map.pos(r);
                format!("{words} {}:{}:{}", display.display(), p.line, p.col)
            });
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: display.to_path_buf(),
                pos: map.pos(e.at),
                layer: None,
                message: format!("YAML: {}", e.message),
                help,
            });
            return ParsedFile::default();
        }
    };
    let mut rep = Reporter {
        file: display,
        map,
        out: diags,
    };
    parse_file(root.as_ref(), dir, &mut rep)
}

/// The most threads prerequisites are parsed on at once.
const PREFETCH_THREADS: usize = 8;

/// Load `entry` and, recursively, its prerequisites.
pub fn load(
    entry: &Path,
    subs: &Substitutions,
    max_file_size: u64,
    source: &dyn FileSource,
) -> Result<Loaded, PlanError> {
    load_many(&[entry.to_path_buf()], subs, max_file_size, source)
}

/// Load several stackerfiles (and their prerequisites) together, as one set of layers
/// (`farm recursive-build`). A file reached twice is loaded once.
pub fn load_many(
    entries: &[PathBuf],
    subs: &Substitutions,
    max_file_size: u64,
    source: &dyn FileSource,
) -> Result<Loaded, PlanError> {
    load_many_with(entries, subs, max_file_size, source, true)
}

/// [`load_many`], prerequisites read ahead and parsed on several threads or not.
fn load_many_with(
    entries: &[PathBuf],
    subs: &Substitutions,
    max_file_size: u64,
    source: &dyn FileSource,
    prefetch: bool,
) -> Result<Loaded, PlanError> {
    let mut loader = Loader {
        source,
        subs,
        max_file_size,
        loaded: Loaded::default(),
        errors: Vec::new(),
        done: HashMap::new(),
        stack: Vec::new(),
        too_many_files: false,
        prefetched: HashMap::new(),
        prefetch,
    };
    for entry in entries {
        loader.load_file(entry, None);
    }
    if loader.errors.is_empty() {
        loader.check_duplicates();
    }
    if loader.errors.is_empty() {
        Ok(loader.loaded)
    } else {
        Err(PlanError {
            diagnostics: loader.errors,
            warnings: loader.loaded.warnings,
        })
    }
}

/// How many stackerfiles one plan may load (entries and prerequisites): planning keeps
/// which file sees which, a table of this many squared (16 MiB here, where a context of
/// 100,000 files would have needed 10 GB).
pub const MAX_FILES: usize = 4096;

/// How deep prerequisites may nest (a file naming a file naming a file...): far beyond
/// any real set of stackerfiles, and within a 2 MiB stack (loading recurses) with room
/// to spare even in a debug build (256 fitted there, 512 did not).
pub const MAX_PREREQUISITE_DEPTH: usize = 128;

impl Loader<'_> {
    /// An error about loading `display`, at the prerequisite entry that names it (or at
    /// the file itself, for an entry point). Out of line, as `over_limits`.
    #[inline(never)]
    fn refuse(
        &mut self,
        display: &Path,
        named_by: Option<(&Path, Pos)>,
        message: String,
        help: Option<String>,
    ) {
        let (file, pos) = named_by.map_or((display.to_path_buf(), Pos::default()), |(f, p)| {
            (f.to_path_buf(), p)
        });
        self.errors.push(Diagnostic {
            severity: Severity::Error,
            file,
            pos,
            layer: None,
            message,
            help,
        });
    }

    /// Whether loading `display` would pass [`MAX_FILES`] or [`MAX_PREREQUISITE_DEPTH`]
    /// (then said in a diagnostic). Out of line: `load_file` recurses, and its frame is
    /// what the depth limit is measured in.
    #[inline(never)]
    fn over_limits(&mut self, display: &Path, named_by: Option<(&Path, Pos)>) -> bool {
        if self.done.len() + self.stack.len() >= MAX_FILES {
            // Said once: every further file would say it again.
            if !self.too_many_files {
                self.too_many_files = true;
                self.refuse(
                    display,
                    named_by,
                    format!(
                        "more than {MAX_FILES} stackerfiles to load together (at {})",
                        display.display()
                    ),
                    Some("plan and submit fewer stackerfiles at once".into()),
                );
            }
            return true;
        }
        if self.stack.len() >= MAX_PREREQUISITE_DEPTH {
            let message = format!(
                "prerequisites nested more than {MAX_PREREQUISITE_DEPTH} deep (from {} to {})",
                self.stack[0].1.display(),
                display.display()
            );
            self.refuse(
                display,
                named_by,
                message,
                Some(
                    "a file's prerequisites may themselves have prerequisites, but not this \
                     deep: name the files from one list instead of each naming the next"
                        .into(),
                ),
            );
            return true;
        }
        false
    }

    /// Read `path` (shown as `display`), or say why it cannot be. Out of line, as
    /// `over_limits`.
    #[inline(never)]
    fn read(
        &mut self,
        path: &Path,
        display: &Path,
        named_by: Option<(&Path, Pos)>,
    ) -> Option<String> {
        match self.source.read_limited(path, self.max_file_size) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                let what = if named_by.is_some() {
                    "prerequisite "
                } else {
                    ""
                };
                let help = format!(
                    "a stackerfile this large is likely a mistake; if it is not, raise the \
                     limit with --max-stackerfile-size {} on farm plan, build and submit \
                     (a coordinator has its own: farm coordinator --max-stackerfile-size)",
                    suggest_limit(self.max_file_size)
                );
                self.refuse(
                    display,
                    named_by,
                    format!("{what}stackerfile {}: {e}", display.display()),
                    Some(help),
                );
                None
            }
            Err(e) => {
                let what = if named_by.is_some() {
                    "prerequisite "
                } else {
                    ""
                };
                let help = if e.kind() == std::io::ErrorKind::NotFound {
                    Some(match named_by {
                        Some(_) => "prerequisite paths are relative to the file that names them"
                            .to_string(),
                        None => "pass the stackerfile as an argument or with -f FILE".to_string(),
                    })
                } else {
                    None
                };
                self.refuse(
                    display,
                    named_by,
                    format!("cannot read {what}stackerfile {}: {e}", display.display()),
                    help,
                );
                None
            }
        }
    }

    /// Read the files `prerequisites` name that are not loaded yet and substitute and
    /// parse them on several threads, for `load_file` to take when it reaches them. At
    /// most as many as may still be loaded ([`MAX_FILES`]); one that cannot be read is
    /// left for `load_file`, which says why.
    #[inline(never)]
    fn prefetch(&mut self, prerequisites: &[crate::parse::Prerequisite]) {
        let room =
            MAX_FILES.saturating_sub(self.done.len() + self.stack.len() + self.prefetched.len());
        // Files being loaded (the stack) and those already wanted are skipped through a
        // set: a file naming thousands of prerequisites compared each with every other.
        let mut seen: HashSet<PathBuf> = self.stack.iter().map(|(s, _)| s.clone()).collect();
        let mut ids: Vec<(PathBuf, &Path)> = Vec::new();
        for p in prerequisites {
            if ids.len() >= room {
                break;
            }
            let id = self.source.identity(&p.path);
            if self.done.contains_key(&id)
                || self.prefetched.contains_key(&id)
                || !seen.insert(id.clone())
            {
                continue;
            }
            ids.push((id, &p.path));
        }
        // One file is parsed where it is loaded: a thread would not pay.
        if ids.len() < 2 {
            return;
        }
        let wanted: Vec<(PathBuf, PathBuf, String)> = ids
            .into_iter()
            .filter_map(|(id, path)| {
                let text = self.source.read_limited(path, self.max_file_size).ok()?;
                Some((id, normalize(path), text))
            })
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(PREFETCH_THREADS)
            .min(wanted.len());
        if threads < 2 {
            return;
        }
        let per_thread = wanted.len().div_ceil(threads);
        let subs = self.subs;
        let prepared: Vec<(PathBuf, Prepared)> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut rest = wanted;
            while !rest.is_empty() {
                let chunk: Vec<_> = rest.drain(..per_thread.min(rest.len())).collect();
                let parse = move || {
                    chunk
                        .into_iter()
                        .map(|(id, display, text)| (id, prepare(text, subs, &display)))
                        .collect::<Vec<_>>()
                };
                // A thread the system will not start leaves its files to `load_file`.
                if let Ok(h) = std::thread::Builder::new().spawn_scoped(scope, parse) {
                    handles.push(h);
                }
            }
            // A thread that panicked leaves its files to `load_file`, which parses them
            // again (and panics there, as it would have without prefetching).
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .flatten()
                .collect()
        });
        self.prefetched.extend(prepared);
    }

    /// Load one file; `named_by` is (file, position) of the prerequisite entry naming it.
    fn load_file(&mut self, path: &Path, named_by: Option<(&Path, Pos)>) -> Option<usize> {
        let display = normalize(path);
        let id = self.source.identity(path);
        if let Some(&i) = self.done.get(&id) {
            return Some(i);
        }
        if let Some(start) = self.stack.iter().position(|(sid, _)| *sid == id) {
            let mut cycle: Vec<String> = self.stack[start..]
                .iter()
                .map(|(_, d)| d.display().to_string())
                .collect();
            cycle.push(display.display().to_string());
            self.refuse(
                &display,
                named_by,
                format!("prerequisite cycle: {}", cycle.join(" -> ")),
                Some("prerequisites must form a DAG; remove one of these entries".into()),
            );
            return None;
        }
        if self.over_limits(&display, named_by) {
            return None;
        }
        let prepared = match self.prefetched.remove(&id) {
            Some(p) if p.display == display => Some(p),
            _ => None,
        };
        let prepared = match prepared {
            Some(p) => p,
            None => match self.read(path, &display, named_by) {
                Some(text) => prepare(text, self.subs, &display),
                None => return None,
            },
        };
        self.stack.push((id.clone(), display.clone()));
        let Prepared {
            substituted,
            diags,
            parsed,
            ..
        } = prepared;
        let failed = diags.iter().any(|d| d.severity == Severity::Error);
        for d in diags {
            match d.severity {
                Severity::Error => self.errors.push(d),
                Severity::Warning => self.loaded.warnings.push(d),
            }
        }
        if !failed && self.prefetch {
            self.prefetch(&parsed.prerequisites);
        }

        let mut prereqs = Vec::new();
        if !failed {
            for p in &parsed.prerequisites {
                if let Some(i) = self.load_file(&p.path, Some((&display, p.pos)))
                    && !prereqs.contains(&i)
                {
                    prereqs.push(i);
                }
            }
        }
        self.stack.pop();
        let index = self.loaded.files.len();
        self.loaded.files.push(LoadedFile {
            path: display,
            substituted,
            prerequisites: prereqs,
        });
        self.done.insert(id, index);
        for layer in parsed.layers {
            self.loaded.layers.push((index, layer));
        }
        Some(index)
    }

    fn check_duplicates(&mut self) {
        let mut seen: HashMap<&str, &Layer> = HashMap::new();
        for (_, layer) in &self.loaded.layers {
            if let Some(first) = seen.get(layer.name.as_str()) {
                let same_file = first.file == layer.file;
                self.errors.push(Diagnostic {
                    severity: Severity::Error,
                    file: layer.file.clone(),
                    pos: layer.pos,
                    layer: Some(layer.name.clone()),
                    message: if same_file {
                        format!(
                            "layer '{}' is defined twice in {}",
                            layer.name,
                            layer.file.display()
                        )
                    } else {
                        format!(
                            "layer '{}' is defined in both {} and {}",
                            layer.name,
                            first.file.display(),
                            layer.file.display()
                        )
                    },
                    help: Some(format!(
                        "the first definition is at {}:{}:{}; layer names must be unique \
                         across a stackerfile and its prerequisites",
                        first.file.display(),
                        first.pos.line,
                        first.pos.col
                    )),
                });
            } else {
                seen.insert(&layer.name, layer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Files in memory, counting reads.
    struct Mem(HashMap<PathBuf, String>, AtomicUsize);

    impl FileSource for Mem {
        fn read(&self, path: &Path) -> std::io::Result<String> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0
                .get(&normalize(path))
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    fn mem(files: &[(&str, String)]) -> Mem {
        Mem(
            files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), t.clone()))
                .collect(),
            AtomicUsize::new(0),
        )
    }

    /// Prerequisites read ahead and parsed on several threads load exactly as one after
    /// the other: the same files, layers, warnings and errors in the same order, through
    /// substitutions, shell-style warnings, a file reached by two spellings, a missing
    /// one, one over the size limit, bad YAML and a cycle.
    #[test]
    fn prefetching_prerequisites_loads_what_loading_one_by_one_loads() {
        let layer = |name: &str, extra: &str| {
            format!("{name}:\n  from: {{type: scratch}}\n  run: echo {extra}\n")
        };
        let prereqs = |names: &[&str]| {
            let mut t = String::from("config:\n  prerequisites:\n");
            for n in names {
                t.push_str(&format!("    - {n}\n"));
            }
            t
        };
        let mut files: Vec<(&str, String)> = vec![
            ("b.yaml", layer("b", "$HOME ${{X}}")),
            ("sub/c.yaml", prereqs(&["../b.yaml"]) + &layer("c", "c")),
            (
                "a.yaml",
                prereqs(&["sub/c.yaml", "sub/../b.yaml"]) + &layer("a", "a"),
            ),
            ("bad.yaml", "x: [unclosed\n".to_string()),
            ("big.yaml", layer("big", &"x".repeat(5000))),
            ("cyc1.yaml", prereqs(&["cyc2.yaml"]) + &layer("y1", "1")),
            ("cyc2.yaml", prereqs(&["cyc1.yaml"]) + &layer("y2", "2")),
        ];
        let many: Vec<String> = (0..20).map(|i| format!("f{i}.yaml")).collect();
        for name in &many {
            files.push((
                name.as_str(),
                layer(&format!("l{name}").replace(".yaml", ""), "${{X}}"),
            ));
        }
        let mut good: Vec<&str> = vec!["a.yaml", "b.yaml", "sub/c.yaml"];
        good.extend(many.iter().map(String::as_str));
        let mut all = good.clone();
        all.extend(["missing.yaml", "bad.yaml", "big.yaml", "cyc1.yaml"]);
        let subs = Substitutions {
            cli: vec![("X".into(), "x-value".into())],
            ..Default::default()
        };
        for (entry_prereqs, fails) in [(good, false), (all, true)] {
            let mut files = files.clone();
            files.push(("entry.yaml", prereqs(&entry_prereqs) + &layer("e", "$USER")));
            let (one_by_one, ahead) = (mem(&files), mem(&files));
            let load = |source: &Mem, prefetch: bool| {
                load_many_with(
                    &[PathBuf::from("entry.yaml")],
                    &subs,
                    4096,
                    source,
                    prefetch,
                )
            };
            let (expected, got) = (load(&one_by_one, false), load(&ahead, true));
            assert_eq!(got.is_err(), fails);
            assert_eq!(format!("{got:?}"), format!("{expected:?}"));
            let (reads, reads_ahead) = (
                one_by_one.1.load(Ordering::Relaxed),
                ahead.1.load(Ordering::Relaxed),
            );
            // Ahead, the two files that cannot be loaded are tried twice: prefetching ran.
            assert_eq!(reads_ahead, reads + if fails { 2 } else { 0 });
        }
    }

    #[test]
    fn normalize_keeps_leading_parents() {
        for (a, b) in [
            ("../../x/y.yaml", "../../x/y.yaml"),
            ("a/../../b", "../b"),
            ("a/./b/../c", "a/c"),
            ("/../a", "/a"),
            ("./", "."),
        ] {
            assert_eq!(normalize(Path::new(a)), PathBuf::from(b), "{a}");
        }
    }
}
