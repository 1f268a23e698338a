//! `.farm.yaml`: the builds a repository declares (read at the pushed commit).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::config::glob;
use super::event::{Change, EventKind};

/// The file's name at the repository's root.
pub const FARM_YAML: &str = ".farm.yaml";

/// Its largest accepted size.
pub const MAX_FARM_YAML: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FarmFile {
    pub version: u32,
    pub builds: Vec<BuildSpec>,
}

/// One build: a stackerfile of the repository and when it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// Its name: statuses are reported as `farm/<name>`.
    pub name: String,
    /// The stackerfile, relative to the repository's root.
    pub stackerfile: String,
    /// Substitutions for the stackerfile; `FARM_GIT_SHA`, `FARM_GIT_REF`,
    /// `FARM_GIT_BRANCH` and `FARM_GIT_TAG` are always given.
    #[serde(default)]
    pub substitutions: BTreeMap<String, String>,
    /// Events it runs on; empty: every event the repositories file allows.
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// Branch patterns it runs on for pushes; empty: every branch.
    #[serde(default)]
    pub branches: Vec<String>,
    /// Tag patterns it runs on for tag pushes; empty: every tag.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Path patterns (`*` matches anything, `/` included): a push builds only when one
    /// of the files its commits changed matches; empty: every push. Pull requests and
    /// pushes whose payload lists no files (or too many commits) always build.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Where its images go after a successful build (never for forks' pull requests).
    #[serde(default)]
    pub push: Option<PushSpec>,
}

/// A push target: each image (layer) `NAME` goes to `TO/NAME:TAG` for every tag.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    /// `docker://HOST[:PORT]/NAMESPACE`; must be under one of the repositories file's
    /// `push_to` prefixes.
    pub to: String,
    /// Tag templates: `{sha}`, `{short_sha}`, `{branch}`, `{tag}`, `{pr}` (a template
    /// that comes out empty for this event is skipped; `/` becomes `-`). Default
    /// `["{sha}"]`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What the tag templates are filled with.
#[derive(Debug, Clone, Default)]
pub struct TagValues {
    pub sha: String,
    pub branch: String,
    pub tag: String,
    pub pr: String,
}

impl PushSpec {
    /// The tags for this event (templates that come out empty are dropped).
    pub fn tags(&self, v: &TagValues) -> Vec<String> {
        let templates: Vec<&str> = if self.tags.is_empty() {
            vec!["{sha}"]
        } else {
            self.tags.iter().map(String::as_str).collect()
        };
        let short: String = v.sha.chars().take(12).collect();
        let mut out: Vec<String> = Vec::new();
        for t in templates {
            let needs = |k: &str, val: &str| !t.contains(k) || !val.is_empty();
            if !(needs("{branch}", &v.branch) && needs("{tag}", &v.tag) && needs("{pr}", &v.pr)) {
                continue;
            }
            let tag = t
                .replace("{sha}", &v.sha)
                .replace("{short_sha}", &short)
                .replace("{branch}", &v.branch)
                .replace("{tag}", &v.tag)
                .replace("{pr}", &v.pr)
                .replace('/', "-");
            if !tag.is_empty() && !out.contains(&tag) {
                out.push(tag);
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FarmFileError {
    #[error("{FARM_YAML} is larger than {MAX_FARM_YAML} bytes")]
    TooLarge,
    #[error("{FARM_YAML}: {0}")]
    Yaml(String),
    #[error("{FARM_YAML}: version {0} is not supported (write `version: 1`)")]
    Version(u32),
    #[error("{FARM_YAML}: build {0:?}: {1}")]
    Build(String, String),
}

impl FarmFile {
    pub fn parse(text: &[u8]) -> Result<FarmFile, FarmFileError> {
        if text.len() > MAX_FARM_YAML {
            return Err(FarmFileError::TooLarge);
        }
        let f: FarmFile =
            serde_yaml::from_slice(text).map_err(|e| FarmFileError::Yaml(e.to_string()))?;
        if f.version != 1 {
            return Err(FarmFileError::Version(f.version));
        }
        let mut names = std::collections::BTreeSet::new();
        for b in &f.builds {
            let bad = |m: &str| FarmFileError::Build(b.name.clone(), m.to_string());
            if b.name.is_empty()
                || !b
                    .name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
            {
                return Err(bad("names are letters, digits, '-', '_' and '.'"));
            }
            if !names.insert(b.name.as_str()) {
                return Err(bad("names must be unique"));
            }
            if b.stackerfile.is_empty()
                || b.stackerfile.starts_with('/')
                || b.stackerfile.split('/').any(|c| c == ".." || c.is_empty())
            {
                return Err(bad(
                    "stackerfile must be a relative path inside the repository",
                ));
            }
            if b.substitutions.keys().any(|k| k.starts_with("FARM_GIT_")) {
                return Err(bad("FARM_GIT_* substitutions are the farm's"));
            }
        }
        Ok(f)
    }
}

impl BuildSpec {
    /// Do the changed files (when the payload lists them) pass the path filters?
    pub fn paths_match(&self, changed: Option<&[String]>) -> bool {
        match changed {
            Some(files) if !self.paths.is_empty() => {
                files.iter().any(|f| self.paths.iter().any(|p| glob(p, f)))
            }
            _ => true,
        }
    }

    /// Does this build run for `change`?
    pub fn runs_for(&self, change: &Change) -> bool {
        if !self.events.is_empty() && !self.events.contains(&change.event()) {
            return false;
        }
        match change {
            Change::Branch(b) => {
                self.branches.is_empty() || self.branches.iter().any(|p| glob(p, b))
            }
            Change::Tag(t) => self.tags.is_empty() || self.tags.iter().any(|p| glob(p, t)),
            Change::PullRequest { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_their_triggers() {
        let f = FarmFile::parse(
            b"version: 1\nbuilds:\n  - name: app\n    stackerfile: app/stacker.yaml\n    events: [push]\n    branches: [main]\n  - name: rel\n    stackerfile: s.yaml\n    events: [tag]\n    tags: ['v*']\n",
        )
        .unwrap();
        let main = Change::Branch("main".into());
        assert!(f.builds[0].runs_for(&main));
        assert!(!f.builds[0].runs_for(&Change::Branch("dev".into())));
        assert!(!f.builds[1].runs_for(&main));
        assert!(f.builds[1].runs_for(&Change::Tag("v2".into())));
        assert!(!f.builds[0].runs_for(&Change::PullRequest {
            number: 1,
            fork: false
        }));
    }

    #[test]
    fn path_filters() {
        let f = FarmFile::parse(
            b"version: 1\nbuilds:\n  - name: app\n    stackerfile: s.yaml\n    paths: ['app/*', 'stacker.yaml']\n",
        )
        .unwrap();
        let b = &f.builds[0];
        assert!(b.paths_match(Some(&["app/src/main.c".to_string()])));
        assert!(b.paths_match(Some(&["stacker.yaml".to_string()])));
        assert!(!b.paths_match(Some(&["docs/readme.md".to_string()])));
        assert!(b.paths_match(None), "unknown files: it builds");
    }

    #[test]
    fn tag_templates() {
        let p = PushSpec {
            to: "docker://r/ns".into(),
            tags: vec![
                "{sha}".into(),
                "{branch}".into(),
                "{tag}".into(),
                "b-{short_sha}".into(),
            ],
        };
        let v = TagValues {
            sha: "0123456789abcdef".into(),
            branch: "feature/x".into(),
            ..Default::default()
        };
        assert_eq!(
            p.tags(&v),
            ["0123456789abcdef", "feature-x", "b-0123456789ab"]
        );
    }

    #[test]
    fn refused_files() {
        for bad in [
            "version: 2\nbuilds: []\n",
            "version: 1\nbuilds:\n  - name: a\n    stackerfile: ../x\n",
            "version: 1\nbuilds:\n  - name: a\n    stackerfile: /etc/x\n",
            "version: 1\nbuilds:\n  - name: 'a b'\n    stackerfile: x\n",
            "version: 1\nbuilds:\n  - name: a\n    stackerfile: x\n    substitutions: {FARM_GIT_SHA: x}\n",
            "version: 1\nbuilds:\n  - name: a\n    stackerfile: x\n    what: 1\n",
        ] {
            assert!(FarmFile::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
