//! Language tests over in-memory files: every key and form, every error with its
//! position, the DAG, canonical digests, and properties.

mod dag;
mod errors;
mod keys;
mod props;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{FileSource, Plan, PlanError, PlanOptions, Substitutions, load::normalize};

/// Files held in memory, keyed by normalised path.
#[derive(Default)]
pub(crate) struct MemFiles(pub HashMap<PathBuf, String>);

impl MemFiles {
    pub(crate) fn with(files: &[(&str, &str)]) -> Self {
        MemFiles(
            files
                .iter()
                .map(|(p, t)| (normalize(Path::new(p)), t.to_string()))
                .collect(),
        )
    }
}

impl FileSource for MemFiles {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.0
            .get(&normalize(path))
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

pub(crate) fn plan_files(files: &[(&str, &str)], subs: Substitutions) -> Result<Plan, PlanError> {
    let entry = files[0].0;
    Plan::load(
        Path::new(entry),
        &PlanOptions::new(subs),
        &MemFiles::with(files),
    )
}

pub(crate) fn plan(text: &str) -> Plan {
    match plan_files(&[("stacker.yaml", text)], Substitutions::default()) {
        Ok(p) => p,
        Err(e) => panic!("expected a plan, got:\n{e}"),
    }
}

pub(crate) fn errors(text: &str) -> PlanError {
    match plan_files(&[("stacker.yaml", text)], Substitutions::default()) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

pub(crate) fn subs(cli: &[(&str, &str)]) -> Substitutions {
    Substitutions {
        cli: cli
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ..Default::default()
    }
}
