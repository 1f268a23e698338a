//! The layer DAG: edges from `built` bases and `stacker://` references, topological waves
//! (layers that can build at the same time), stable in load order.

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

use crate::canonical::CanonicalLayer;
use crate::diag::{Diagnostic, Pos, Severity, suggest};
use crate::load::{FileSource, LoadedFile, PlanError};
use crate::model::{Base, Layer};
use crate::subst::Substitutions;

/// The default of [`PlanOptions::max_file_size`]: 1 MiB.
pub const DEFAULT_MAX_STACKERFILE_SIZE: u64 = 1 << 20;

/// What a plan needs besides the files.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub substitutions: Substitutions,
    /// The largest stackerfile (each file, before substitution) read, in bytes
    /// (`--max-stackerfile-size`).
    pub max_file_size: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            substitutions: Substitutions::default(),
            max_file_size: DEFAULT_MAX_STACKERFILE_SIZE,
        }
    }
}

impl PlanOptions {
    /// Options with these substitutions and the default limits.
    pub fn new(substitutions: Substitutions) -> Self {
        PlanOptions {
            substitutions,
            ..Default::default()
        }
    }
}

/// A layer in the plan.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    pub layer: Layer,
    /// Index into [`Plan::files`].
    pub file: usize,
    /// Indexes into [`Plan::layers`] of the layers it needs first.
    pub depends_on: Vec<usize>,
    pub canonical: CanonicalLayer,
    /// `sha256:...` of the canonical definition.
    pub definition_digest: String,
}

/// Stackerfiles turned into a DAG of layer builds.
#[derive(Debug, Clone)]
pub struct Plan {
    pub files: Vec<LoadedFile>,
    /// Layers in load order: prerequisite files first, then file order.
    pub layers: Vec<PlannedLayer>,
    /// Topological levels: wave 0 has no dependencies; every layer's dependencies are in
    /// earlier waves. Indexes into `layers`, in load order within a wave.
    pub waves: Vec<Vec<usize>>,
    pub warnings: Vec<Diagnostic>,
}

impl Plan {
    /// Load `entry` (and its prerequisites) and plan it.
    pub fn load(
        entry: &Path,
        options: &PlanOptions,
        source: &dyn FileSource,
    ) -> Result<Plan, PlanError> {
        Self::load_many(&[entry.to_path_buf()], options, source)
    }

    /// Load several stackerfiles (and their prerequisites) and plan them as one DAG.
    pub fn load_many(
        entries: &[std::path::PathBuf],
        options: &PlanOptions,
        source: &dyn FileSource,
    ) -> Result<Plan, PlanError> {
        let loaded = crate::load::load_many(
            entries,
            &options.substitutions,
            options.max_file_size,
            source,
        )?;
        let files = loaded.files;
        let warnings = loaded.warnings;
        let layers = loaded.layers;
        match build_dag(&files, &layers) {
            Ok((deps, waves)) => Ok(Plan {
                layers: layers
                    .into_iter()
                    .zip(deps)
                    .map(|((file, layer), depends_on)| {
                        let canonical = CanonicalLayer::of(&layer);
                        PlannedLayer {
                            definition_digest: canonical.digest(),
                            canonical,
                            layer,
                            file,
                            depends_on,
                        }
                    })
                    .collect(),
                files,
                waves,
                warnings,
            }),
            Err(diagnostics) => Err(PlanError {
                diagnostics,
                warnings,
            }),
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.layer.name == name)
    }

    /// The `farm plan --json` object.
    pub fn to_json(&self) -> serde_json::Value {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|p| {
                let l = &p.layer;
                let mut from = serde_json::Map::new();
                from.insert("type".into(), l.from.type_name().into());
                match &l.from {
                    Base::Docker { url, insecure } => {
                        from.insert("url".into(), url.clone().into());
                        from.insert("insecure".into(), (*insecure).into());
                    }
                    Base::Oci { url } => {
                        from.insert("url".into(), url.clone().into());
                    }
                    Base::Tar { source } => {
                        from.insert("url".into(), source.written().into());
                    }
                    Base::Built { tag } => {
                        from.insert("tag".into(), tag.clone().into());
                    }
                    Base::Scratch => {}
                }
                json!({
                    "name": l.name,
                    "file": self.files[p.file].path.display().to_string(),
                    "from": from,
                    "depends_on": p.depends_on.iter().map(|&d| self.layers[d].layer.name.clone()).collect::<Vec<_>>(),
                    "imports": l.imports.iter().map(|i| {
                        json!({"source": i.source.written(), "dest": i.dest, "hash": i.hash})
                    }).collect::<Vec<_>>(),
                    "build_only": l.build_only,
                    "tagged": !l.build_only,
                    "definition_digest": p.definition_digest,
                })
            })
            .collect();
        let waves: Vec<Vec<String>> = self
            .waves
            .iter()
            .map(|w| {
                w.iter()
                    .map(|&i| self.layers[i].layer.name.clone())
                    .collect()
            })
            .collect();
        json!({ "layers": layers, "waves": waves })
    }
}

type Dag = (Vec<Vec<usize>>, Vec<Vec<usize>>);

/// How many missing layer names get a "did you mean": each suggestion compares the name
/// with every layer.
const MAX_SUGGESTIONS: usize = 20;

/// Resolve dependency names to indexes (checking that each is visible from the file that
/// uses it), reject cycles, and compute waves.
fn build_dag(files: &[LoadedFile], layers: &[(usize, Layer)]) -> Result<Dag, Vec<Diagnostic>> {
    let by_name: HashMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, (_, l))| (l.name.as_str(), i))
        .collect();
    let visible = visibility(files);
    let mut errors = Vec::new();
    // Missing names given a "did you mean" so far (see `MAX_SUGGESTIONS`).
    let mut suggested = 0;
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(layers.len());
    for (file, layer) in layers {
        let mut mine = Vec::new();
        for name in layer.dependencies() {
            match by_name.get(name) {
                Some(&d) if visible[*file][layers[d].0] => mine.push(d),
                Some(&d) => errors.push(Diagnostic {
                    severity: Severity::Error,
                    file: layer.file.clone(),
                    pos: reference_pos(layer, name),
                    layer: Some(layer.name.clone()),
                    message: format!(
                        "depends on '{name}', which is defined in {}, not in this file or \
                         its prerequisites",
                        layers[d].1.file.display()
                    ),
                    help: Some(format!(
                        "add {} to config.prerequisites of {}",
                        layers[d].1.file.display(),
                        layer.file.display()
                    )),
                }),
                None => {
                    let candidates = layers
                        .iter()
                        .filter(|(f, _)| visible[*file][*f])
                        .map(|(_, l)| l.name.as_str());
                    // Each suggestion scans every layer: only the first few missing names
                    // get one (a file of thousands of them took seconds per thousand).
                    suggested += 1;
                    let near = if suggested <= MAX_SUGGESTIONS {
                        suggest(name, candidates)
                    } else {
                        None
                    };
                    let help = match near {
                        Some(s) => format!("did you mean '{s}'?"),
                        None => "define that layer, or add the stackerfile that defines it to \
                                 config.prerequisites"
                            .to_string(),
                    };
                    errors.push(Diagnostic {
                        severity: Severity::Error,
                        file: layer.file.clone(),
                        pos: reference_pos(layer, name),
                        layer: Some(layer.name.clone()),
                        message: format!("depends on '{name}', which is not defined"),
                        help: Some(help),
                    });
                }
            }
        }
        deps.push(mine);
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // Kahn's algorithm, taking ready layers in load order so waves are stable.
    let n = layers.len();
    let mut level = vec![usize::MAX; n];
    let mut remaining: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut frontier: Vec<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
    let mut waves = Vec::new();
    let mut placed = 0;
    while !frontier.is_empty() {
        frontier.sort_unstable();
        let mut next = Vec::new();
        for &i in &frontier {
            level[i] = waves.len();
            for &j in &dependents[i] {
                remaining[j] -= 1;
                if remaining[j] == 0 {
                    next.push(j);
                }
            }
        }
        placed += frontier.len();
        waves.push(std::mem::replace(&mut frontier, next));
    }
    if placed < n {
        return Err(vec![cycle_error(layers, &deps, &level)]);
    }
    Ok((deps, waves))
}

/// `visible[f][g]`: layers of file `g` may be referenced from file `f` (g is f or one of
/// its prerequisites, transitively).
fn visibility(files: &[LoadedFile]) -> Vec<Vec<bool>> {
    let n = files.len();
    let mut visible = vec![vec![false; n]; n];
    // Files are in load order (prerequisites first), so one pass suffices.
    for f in 0..n {
        visible[f][f] = true;
        for &p in &files[f].prerequisites {
            let from_p = visible[p].clone();
            for (seen, via) in visible[f].iter_mut().zip(from_p) {
                *seen |= via;
            }
        }
    }
    visible
}

fn reference_pos(layer: &Layer, name: &str) -> Pos {
    let in_base = match &layer.from {
        Base::Built { tag } => tag == name,
        Base::Tar { source } => source.layer() == Some(name),
        _ => false,
    };
    if in_base {
        return layer.from_pos;
    }
    layer
        .imports
        .iter()
        .find(|i| i.source.layer() == Some(name))
        .map_or(layer.pos, |i| i.pos)
}

fn cycle_error(layers: &[(usize, Layer)], deps: &[Vec<usize>], level: &[usize]) -> Diagnostic {
    // Walk dependencies among unplaced layers from the first one until a layer repeats.
    let start = (0..layers.len())
        .find(|&i| level[i] == usize::MAX)
        .unwrap_or(0);
    let mut path = vec![start];
    let mut cur = start;
    let cycle = loop {
        let Some(&next) = deps[cur].iter().find(|&&d| level[d] == usize::MAX) else {
            break path.clone();
        };
        if let Some(at) = path.iter().position(|&p| p == next) {
            let mut c = path[at..].to_vec();
            c.push(next);
            break c;
        }
        path.push(next);
        cur = next;
    };
    let names: Vec<&str> = cycle.iter().map(|&i| layers[i].1.name.as_str()).collect();
    let first = &layers[cycle[0]].1;
    Diagnostic {
        severity: Severity::Error,
        file: first.file.clone(),
        pos: first.from_pos,
        layer: Some(first.name.clone()),
        message: format!("dependency cycle: {}", names.join(" -> ")),
        help: Some(
            "a layer cannot depend on itself through 'built' bases or stacker:// references".into(),
        ),
    }
}
