//! The typed form of a stackerfile layer, after substitution and validation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::diag::Pos;

/// One layer (one image) of a stackerfile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub name: String,
    /// The stackerfile it was defined in (as the loader was given it).
    pub file: PathBuf,
    /// Directory that relative paths of this layer resolve against.
    pub dir: PathBuf,
    pub pos: Pos,
    pub from: Base,
    /// Where `from` is written (for errors about the base).
    pub from_pos: Pos,
    pub imports: Vec<Import>,
    /// True when the deprecated `import` key was used: files appear under `/stacker/`.
    pub legacy_import: bool,
    /// The `run` script, list items joined by newlines.
    pub run: Option<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub full_command: Option<Vec<String>>,
    pub environment: BTreeMap<String, String>,
    pub build_env: BTreeMap<String, String>,
    /// Anchored regexes; `None` means stacker's default list.
    pub build_env_passthrough: Option<Vec<String>>,
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub generate_labels: Option<String>,
    pub working_dir: Option<String>,
    pub runtime_user: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub build_only: bool,
    pub binds: Vec<Bind>,
    pub overlay_dirs: Vec<OverlayDir>,
    pub os: Option<String>,
    pub arch: Option<String>,
    /// farm's own keys for the build sandbox (`network`, `run_timeout`,
    /// `nested_userns`); stacker has none of them.
    #[serde(default)]
    pub sandbox: LayerSandbox,
}

/// A layer's farm-only sandbox settings. Defaults keep stacker's behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerSandbox {
    /// `network: host|none`; `None`: not said (the worker's default, host unless the
    /// worker runs with `--network none`).
    #[serde(default)]
    pub network: Option<Network>,
    /// `run_timeout`: the longest `run` may take, in seconds (an integer, or a duration
    /// such as `90s`, `10m`, `2h`); `None`: the worker's `--run-timeout`.
    #[serde(default)]
    pub run_timeout: Option<u64>,
    /// `nested_userns: true`: `run` may create user namespaces of its own (the seccomp
    /// filter denies it otherwise).
    #[serde(default)]
    pub nested_userns: bool,
}

/// The network of a layer's `run`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The worker's network, as stacker does.
    #[default]
    Host,
    /// A network namespace of its own with only a loopback interface (up).
    None,
}

impl Network {
    pub fn as_str(&self) -> &'static str {
        match self {
            Network::Host => "host",
            Network::None => "none",
        }
    }
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Network::Host),
            "none" => Ok(Network::None),
            other => Err(format!("unknown network '{other}' (host or none)")),
        }
    }
}

/// Default `build_env_passthrough` (stacker's): proxies, TERM, SOURCE_DATE_EPOCH.
pub const DEFAULT_PASSTHROUGH: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "NO_PROXY",
    "TERM",
    "SOURCE_DATE_EPOCH",
];

/// A layer's `build_env_passthrough` compiled as stacker applies it: each regex
/// anchored (`^(?:RE)$`), stacker's [`DEFAULT_PASSTHROUGH`] (as literal names) when the
/// layer gives none. The coordinator picks a layer's passthrough variables with it; the
/// CLI, which variables to send at all.
#[derive(Debug, Clone)]
pub struct Passthrough(Rules);

#[derive(Debug, Clone)]
enum Rules {
    /// Stacker's defaults: literal names, no regex to compile (most layers; compiling
    /// ten regexes per layer was a fifth of the coordinator's time on a 20,000-layer plan).
    Default,
    /// The layer's own regexes as one alternation; `None` when it gives none that compile
    /// (refused when the stackerfile is parsed) or an empty list: nothing passes.
    Own(Option<regex::Regex>),
}

impl Passthrough {
    /// The rules of `layer` (invalid regexes, refused when the stackerfile is parsed,
    /// match nothing).
    pub fn of(layer: &Layer) -> Passthrough {
        let Some(own) = &layer.build_env_passthrough else {
            return Passthrough(Rules::Default);
        };
        let valid: Vec<String> = own
            .iter()
            .filter(|p| regex::Regex::new(p).is_ok())
            .map(|p| format!("(?:{p})"))
            .collect();
        let joined = (!valid.is_empty())
            .then(|| regex::Regex::new(&format!("^(?:{})$", valid.join("|"))).ok())
            .flatten();
        Passthrough(Rules::Own(joined))
    }

    /// Whether the variable `name` passes.
    pub fn matches(&self, name: &str) -> bool {
        match &self.0 {
            Rules::Default => DEFAULT_PASSTHROUGH.contains(&name),
            Rules::Own(re) => re.as_ref().is_some_and(|r| r.is_match(name)),
        }
    }
}

/// The PATH added to the image config when neither the base nor the layer sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `from`: what a layer starts from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Base {
    /// `docker://host[:port]/repo:tag` or `...@sha256:...`.
    Docker {
        url: String,
        insecure: bool,
    },
    /// A local OCI layout `PATH:TAG` as stacker reads it (split at the last `:`, see
    /// `split_oci_url`), kept as written; also `type: docker` with `url: oci:PATH:TAG`.
    Oci {
        url: String,
    },
    /// A tarball that, with the `run` changes, forms one layer.
    Tar {
        source: Source,
    },
    /// Another layer of this file or a prerequisite.
    Built {
        tag: String,
    },
    Scratch,
}

impl Base {
    pub fn type_name(&self) -> &'static str {
        match self {
            Base::Docker { .. } => "docker",
            Base::Oci { .. } => "oci",
            Base::Tar { .. } => "tar",
            Base::Built { .. } => "built",
            Base::Scratch => "scratch",
        }
    }
}

/// Where an import or tar base comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// A local path: `written` as in the file, `path` resolved against the file's directory.
    Local {
        written: String,
        path: PathBuf,
    },
    Http {
        url: String,
    },
    /// `stacker://LAYER/PATH`: a path inside another layer's result.
    Layer {
        layer: String,
        path: String,
    },
}

impl Source {
    /// The layer this source depends on, if any.
    pub fn layer(&self) -> Option<&str> {
        match self {
            Source::Layer { layer, .. } => Some(layer),
            _ => None,
        }
    }

    /// The source as written in the stackerfile.
    pub fn written(&self) -> String {
        match self {
            Source::Local { written, .. } => written.clone(),
            Source::Http { url } => url.clone(),
            Source::Layer { layer, path } => format!("stacker://{layer}/{path}"),
        }
    }
}

/// One entry of `imports`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Import {
    pub source: Source,
    /// Lower-case sha256 hex, when given.
    pub hash: Option<String>,
    /// Absolute path in the image; `None`: only under `/stacker/imports` during `run`.
    pub dest: Option<String>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pos: Pos,
}

/// A host path bind-mounted during `run`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    /// The source as written.
    pub written: String,
    pub source: PathBuf,
    pub dest: String,
    /// What the entry asks for (`rw: true|false` in the map form).
    #[serde(default, skip_serializing_if = "BindAccess::is_unspecified")]
    pub access: BindAccess,
}

/// How a bind asks to be mounted. Unspecified is stacker's read-write on a local build;
/// a worker serving a farm mounts it read-only unless the entry asks for `rw: true` and
/// the worker's `--allow-bind PREFIX:rw` permits it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindAccess {
    #[default]
    Unspecified,
    ReadOnly,
    ReadWrite,
}

impl BindAccess {
    pub fn is_unspecified(&self) -> bool {
        *self == BindAccess::Unspecified
    }
}

/// A directory whose contents form an extra layer at `dest`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlayDir {
    pub written: String,
    pub source: PathBuf,
    pub dest: String,
}

impl Layer {
    /// The layer runs commands (`run` or `generate_labels`), so it must be built on a
    /// machine of its platform; one that only adds files and config builds anywhere.
    pub fn runs_commands(&self) -> bool {
        self.run.is_some() || self.generate_labels.is_some()
    }

    /// Names of the layers this one needs built first: its `built` base and every
    /// `stacker://` reference (imports and tar base URL), in order, without repeats.
    pub fn dependencies(&self) -> Vec<&str> {
        let base = match &self.from {
            Base::Built { tag } => Some(tag.as_str()),
            Base::Tar { source } => source.layer(),
            _ => None,
        };
        let mut out: Vec<&str> = Vec::new();
        for name in base
            .into_iter()
            .chain(self.imports.iter().filter_map(|i| i.source.layer()))
        {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }
}
