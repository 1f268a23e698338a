//! `${{NAME}}` / `${{NAME:default}}` substitution on a file's raw text, before YAML
//! parsing, so that a value can inject YAML (as in stacker).

use crate::diag::{SourceMap, pos_in};

/// Where substitution values come from. Earlier sources win: `--substitute`, then
/// `--substitute-file`, then the built-ins.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Substitutions {
    pub cli: Vec<(String, String)>,
    pub file: Vec<(String, String)>,
    pub builtins: Vec<(String, String)>,
}

/// Error building the substitution set from user input (not from a stackerfile).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubstitutionInputError {
    #[error("--substitute '{0}': expected NAME=VALUE (for example --substitute VERSION=1.2)")]
    MissingEquals(String),
    #[error("--substitute '{0}': '{1}' is not a valid name (letters, digits and '_')")]
    BadName(String, String),
    #[error("substitute file: {0}")]
    File(String),
}

impl Substitutions {
    /// Parse one `--substitute NAME=VALUE` (the value may contain `=` and `,`).
    pub fn parse_cli(arg: &str) -> Result<(String, String), SubstitutionInputError> {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| SubstitutionInputError::MissingEquals(arg.to_string()))?;
        if !is_name(name) {
            return Err(SubstitutionInputError::BadName(
                arg.to_string(),
                name.to_string(),
            ));
        }
        Ok((name.to_string(), value.to_string()))
    }

    /// Parse a `--substitute-file`: a YAML map of names to scalar values.
    pub fn parse_file(text: &str) -> Result<Vec<(String, String)>, SubstitutionInputError> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| SubstitutionInputError::File(e.to_string()))?;
        let map = match value {
            serde_yaml::Value::Null => return Ok(Vec::new()),
            serde_yaml::Value::Mapping(m) => m,
            _ => {
                return Err(SubstitutionInputError::File(
                    "expected a map of NAME: VALUE".to_string(),
                ));
            }
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let name = scalar_text(&k).ok_or_else(|| {
                SubstitutionInputError::File("keys must be plain names".to_string())
            })?;
            if !is_name(&name) {
                return Err(SubstitutionInputError::File(format!(
                    "'{name}' is not a valid name (letters, digits and '_')"
                )));
            }
            let value = scalar_text(&v).ok_or_else(|| {
                SubstitutionInputError::File(format!("the value of '{name}' must be a scalar"))
            })?;
            out.push((name, value));
        }
        Ok(out)
    }

    pub fn lookup(&self, name: &str) -> Option<&str> {
        [&self.cli, &self.file, &self.builtins]
            .into_iter()
            .find_map(|src| src.iter().rev().find(|(k, _)| k == name))
            .map(|(_, v)| v.as_str())
    }

    /// Names the user provided (not the built-ins): these trigger the shell-style warning.
    fn provided(&self) -> impl Iterator<Item = &str> {
        self.cli.iter().chain(&self.file).map(|(k, _)| k.as_str())
    }
}

fn scalar_text(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        serde_yaml::Value::Null => Some(String::new()),
        _ => None,
    }
}

pub(crate) fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A problem found while substituting, at a byte offset of the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubstProblem {
    pub at: usize,
    pub message: String,
    pub help: Option<String>,
    pub warning: bool,
}

/// The most a file may grow to with its substitutions: a 1 MiB file of `${{X}}`s with a
/// value of a few MB would otherwise become hundreds of GB in memory.
pub const MAX_SUBSTITUTED: usize = 16 << 20;
/// The most shell-style warnings one file gets (each finds its line from the start).
const MAX_SHELL_WARNINGS: usize = 20;

/// Substitute `text`. Returns the new text, a map back to the original, and problems
/// (errors and warnings).
/// The text is moved into the map, not copied: a large file is held twice (as written
/// and substituted), not three times.
pub(crate) fn substitute(
    text: impl Into<String>,
    subs: &Substitutions,
) -> (String, SourceMap, Vec<SubstProblem>) {
    let original: String = text.into();
    let text = original.as_str();
    let mut out = String::with_capacity(text.len());
    let mut replacements = Vec::new();
    let mut problems = Vec::new();
    let mut rest = 0;
    while let Some(found) = text[rest..].find("${{") {
        let start = rest + found;
        out.push_str(&text[rest..start]);
        let Some(close) = text[start + 3..].find("}}") else {
            problems.push(SubstProblem {
                at: start,
                message: "'${{' without a closing '}}'".to_string(),
                help: Some("write ${{NAME}} or ${{NAME:default}}".to_string()),
                warning: false,
            });
            out.push_str(&text[start..]);
            rest = text.len();
            break;
        };
        let end = start + 3 + close + 2;
        let inner = &text[start + 3..end - 2];
        let (name, default) = match inner.split_once(':') {
            Some((n, d)) => (n.trim(), Some(d)),
            None => (inner.trim(), None),
        };
        let value = if !is_name(name) {
            problems.push(SubstProblem {
                at: start,
                message: format!("'${{{{{inner}}}}}' is not a valid substitution"),
                help: Some(
                    "names are letters, digits and '_': ${{NAME}} or ${{NAME:default}}".into(),
                ),
                warning: false,
            });
            None
        } else if let Some(v) = subs.lookup(name) {
            Some(v)
        } else if let Some(d) = default {
            Some(d)
        } else {
            problems.push(SubstProblem {
                at: start,
                message: format!("no value for substitution '{name}'"),
                help: Some(format!(
                    "pass --substitute {name}=VALUE, put {name} in a --substitute-file, \
                     or give a default: ${{{{{name}:default}}}}"
                )),
                warning: false,
            });
            None
        };
        let value = value.unwrap_or(&text[start..end]);
        if out.len() + value.len() + (text.len() - end) > MAX_SUBSTITUTED {
            problems.push(SubstProblem {
                at: start,
                message: format!(
                    "with its substitutions the file grows past {} MiB (here, at '{}')",
                    MAX_SUBSTITUTED >> 20,
                    &text[start..end]
                ),
                help: Some("substitute shorter values, or fewer times".into()),
                warning: false,
            });
            rest = text.len();
            break;
        }
        let new_start = out.len();
        out.push_str(value);
        replacements.push(((new_start, out.len()), (start, end)));
        rest = end;
    }
    out.push_str(&text[rest..]);
    problems.extend(shell_style_warnings(text, subs));
    let mut map = SourceMap::new(original);
    for (new, orig) in replacements {
        map.push_replacement(new, orig);
    }
    (out, map, problems)
}

/// `$NAME` and `${NAME...}` are the run script's business and never substituted; when
/// NAME is exactly a name the user provided, they probably meant `${{NAME}}`: warn.
/// (stacker errors here, and matches by substring so `$FOOBAR` trips on `FOO`.)
fn shell_style_warnings(text: &str, subs: &Substitutions) -> Vec<SubstProblem> {
    let provided: Vec<&str> = subs.provided().collect();
    if provided.is_empty() {
        return Vec::new();
    }
    let bytes = text.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let (name_start, braced) = match bytes.get(i + 1) {
            Some(b'{') if bytes.get(i + 2) == Some(&b'{') => {
                i += 3;
                continue;
            }
            Some(b'{') => (i + 2, true),
            Some(_) => (i + 1, false),
            None => break,
        };
        let mut end = name_start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        let name = &text[name_start..end];
        let closes = !braced
            || matches!(
                bytes.get(end),
                Some(b'}' | b':' | b'-' | b'+' | b'?' | b'=' | b'#' | b'%' | b'/')
            );
        if closes && provided.contains(&name) {
            if out.len() == MAX_SHELL_WARNINGS {
                break;
            }
            let pos = pos_in(text, i);
            out.push(SubstProblem {
                at: i,
                message: format!(
                    "'{}' at line {} is shell syntax and is not substituted, but '{name}' \
                     was given as a substitution",
                    &text[i..if braced {
                        (end + 1).min(text.len())
                    } else {
                        end
                    }],
                    pos.line
                ),
                help: Some(format!("write ${{{{{name}}}}} to substitute it")),
                warning: true,
            });
        }
        i = end.max(i + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(cli: &[(&str, &str)], file: &[(&str, &str)]) -> Substitutions {
        let v = |x: &[(&str, &str)]| {
            x.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        Substitutions {
            cli: v(cli),
            file: v(file),
            builtins: vec![("STACKER_ROOTFS_DIR".into(), "/pool".into())],
        }
    }

    #[test]
    fn precedence_cli_file_builtin_default() {
        let s = subs(&[("A", "cli")], &[("A", "file"), ("B", "file")]);
        let (out, _, p) = substitute(
            "${{A}} ${{B}} ${{C:dflt}} ${{D:}} ${{STACKER_ROOTFS_DIR}} ${{A:x}}",
            &s,
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(out, "cli file dflt  /pool cli");
    }

    #[test]
    fn missing_names_the_variable_and_offset() {
        let (_, _, p) = substitute("a: 1\nb: ${{NOPE}}\n", &subs(&[], &[]));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].at, 8);
        assert!(p[0].message.contains("'NOPE'"));
        assert!(!p[0].warning);
    }

    #[test]
    fn values_may_contain_equals_commas_and_colons() {
        let (n, v) = Substitutions::parse_cli("X=a=b,c:d").unwrap();
        assert_eq!((n.as_str(), v.as_str()), ("X", "a=b,c:d"));
        assert_eq!(
            Substitutions::parse_cli("novalue"),
            Err(SubstitutionInputError::MissingEquals("novalue".into()))
        );
        assert!(Substitutions::parse_cli("a b=1").is_err());
    }

    #[test]
    fn default_may_contain_colons() {
        let (out, _, _) = substitute("${{URL:http://x:80/y}}", &subs(&[], &[]));
        assert_eq!(out, "http://x:80/y");
    }

    /// A file that would grow past the limit with its substitutions is an error at the
    /// substitution that crosses it, not gigabytes of memory.
    #[test]
    fn substitutions_may_not_grow_a_file_past_the_limit() {
        let big = "v".repeat(1 << 20);
        let s = subs(&[("X", &big)], &[]);
        let text = "a: ${{X}}\n".repeat(100);
        let (out, _, p) = substitute(text.as_str(), &s);
        assert!(out.len() <= MAX_SUBSTITUTED, "{}", out.len());
        let errors: Vec<_> = p.iter().filter(|p| !p.warning).collect();
        assert_eq!(errors.len(), 1, "{p:?}");
        assert!(
            errors[0].message.contains("grows past 16 MiB"),
            "{}",
            errors[0].message
        );
        assert_eq!(
            errors[0].at,
            15 * "a: ${{X}}\n".len() + 3,
            "the 16th crosses it"
        );
        // Just under the limit is fine.
        let text = "a: ${{X}}\n".repeat(15);
        let (out, _, p) = substitute(text.as_str(), &s);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(out.len(), 15 * (big.len() + 4));
    }

    /// Shell-style warnings stop after a few (each one finds its line from the start).
    #[test]
    fn shell_style_warnings_are_bounded() {
        let s = subs(&[("FOO", "1")], &[]);
        let (_, _, p) = substitute("run: echo $FOO\n".repeat(1000).as_str(), &s);
        assert_eq!(p.len(), MAX_SHELL_WARNINGS);
    }

    #[test]
    fn shell_style_warns_on_exact_names_only() {
        let s = subs(&[("FOO", "1")], &[]);
        let (_, _, p) = substitute("run: echo $FOO ${FOO} $FOOBAR ${FOOBAR} ${{FOO}}", &s);
        let warnings: Vec<_> = p.iter().filter(|p| p.warning).collect();
        assert_eq!(warnings.len(), 2, "{p:?}");
        assert_eq!(warnings[0].at, 10);
        assert_eq!(warnings[1].at, 15);
        // built-ins do not warn
        let (_, _, p) = substitute("$STACKER_ROOTFS_DIR", &s);
        assert!(p.is_empty());
    }

    #[test]
    fn unterminated_and_bad_names() {
        let (_, _, p) = substitute("a ${{X", &subs(&[], &[]));
        assert!(p[0].message.contains("without a closing"));
        let (_, _, p) = substitute("a ${{X Y}}", &subs(&[], &[]));
        assert!(p[0].message.contains("not a valid substitution"));
    }

    #[test]
    fn substitute_file_scalars() {
        let v = Substitutions::parse_file("A: 1\nB: true\nC: x=y\nD:\n").unwrap();
        assert_eq!(
            v,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "true".into()),
                ("C".into(), "x=y".into()),
                ("D".into(), "".into())
            ]
        );
        assert!(Substitutions::parse_file("- a\n").is_err());
        assert!(Substitutions::parse_file("A: [1]\n").is_err());
    }
}
