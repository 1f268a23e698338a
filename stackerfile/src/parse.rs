//! Reading one stackerfile's YAML tree into typed layers, reporting every problem with
//! its position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::diag::{Pos, Reporter, Severity, suggest};
use crate::model::{Base, Bind, BindAccess, Import, Layer, Network, OverlayDir, Source};
use crate::yaml::{Kind, Node, Style};

pub(crate) const LAYER_KEYS: &[&str] = &[
    "from",
    "imports",
    "import",
    "run",
    "cmd",
    "entrypoint",
    "full_command",
    "environment",
    "build_env",
    "build_env_passthrough",
    "volumes",
    "labels",
    "generate_labels",
    "working_dir",
    "runtime_user",
    "annotations",
    "build_only",
    "binds",
    "overlay_dirs",
    "network",
    "run_timeout",
    "nested_userns",
    "os",
    "arch",
    "bom",
];
const FROM_KEYS: &[&str] = &["type", "url", "tag", "insecure"];
const FROM_TYPES: &[&str] = &["docker", "oci", "tar", "built", "scratch"];
const IMPORT_KEYS: &[&str] = &["path", "hash", "dest", "mode", "uid", "gid"];

/// A prerequisite named in `config.prerequisites`.
#[derive(Debug, Clone)]
pub(crate) struct Prerequisite {
    pub path: PathBuf,
    pub pos: Pos,
}

#[derive(Debug, Default)]
pub(crate) struct ParsedFile {
    pub layers: Vec<Layer>,
    pub prerequisites: Vec<Prerequisite>,
}

pub(crate) fn parse_file(root: Option<&Node>, dir: &Path, rep: &mut Reporter) -> ParsedFile {
    let mut out = ParsedFile::default();
    let Some(root) = root else {
        return out;
    };
    let entries = match &root.kind {
        Kind::Map(entries) => entries,
        _ if root.is_null() => return out,
        _ => {
            rep.push(
                Severity::Error,
                root.at,
                None,
                format!(
                    "a stackerfile must be a map of layer names to layers, not {}",
                    root.kind_name()
                ),
                Some("start with a layer name, e.g.\n    mylayer:\n      from:\n        type: scratch".into()),
            );
            return out;
        }
    };
    for (key, value) in entries {
        let Some(name) = key.scalar() else {
            rep.push(
                Severity::Error,
                key.at,
                None,
                format!("a layer name must be a string, not {}", key.kind_name()),
                None,
            );
            continue;
        };
        if name == "config" {
            out.prerequisites = parse_config(value, dir, rep);
            continue;
        }
        let mut cx = Cx {
            rep,
            layer: name.to_string(),
            dir,
        };
        if let Some(layer) = cx.layer(key, value) {
            out.layers.push(layer);
        }
    }
    out
}

fn parse_config(node: &Node, dir: &Path, rep: &mut Reporter) -> Vec<Prerequisite> {
    let mut out = Vec::new();
    if node.is_null() {
        return out;
    }
    let Kind::Map(entries) = &node.kind else {
        rep.push(
            Severity::Error,
            node.at,
            None,
            format!("'config' must be a map, not {}", node.kind_name()),
            Some("config:\n    prerequisites:\n      - ../base/stacker.yaml".into()),
        );
        return out;
    };
    for (k, v) in entries {
        if k.scalar() != Some("prerequisites") {
            tracing::debug!(key = ?k.scalar(), "ignoring config key");
            continue;
        }
        let items: Vec<&Node> = match &v.kind {
            Kind::Seq(items) => items.iter().collect(),
            Kind::Scalar { .. } if v.is_null() => Vec::new(),
            Kind::Scalar { .. } => vec![v],
            Kind::Map(_) => {
                rep.push(
                    Severity::Error,
                    v.at,
                    None,
                    "'config.prerequisites' must be a list of stackerfile paths, not a map".into(),
                    None,
                );
                continue;
            }
        };
        for item in items {
            match item.scalar() {
                Some(p) if !p.is_empty() => out.push(Prerequisite {
                    path: dir.join(p),
                    pos: rep.at(item.at),
                }),
                _ => rep.push(
                    Severity::Error,
                    item.at,
                    None,
                    format!(
                        "a prerequisite must be a path to a stackerfile, not {}",
                        item.kind_name()
                    ),
                    None,
                ),
            }
        }
    }
    out
}

/// Parsing context for one layer.
struct Cx<'r, 'a> {
    rep: &'r mut Reporter<'a>,
    layer: String,
    dir: &'r Path,
}

impl Cx<'_, '_> {
    fn err(&mut self, at: usize, message: String, help: Option<String>) {
        let layer = self.layer.clone();
        self.rep
            .push(Severity::Error, at, Some(&layer), message, help);
    }

    fn warn(&mut self, at: usize, message: String, help: Option<String>) {
        let layer = self.layer.clone();
        self.rep
            .push(Severity::Warning, at, Some(&layer), message, help);
    }

    fn wrong_type(&mut self, key: &str, node: &Node, expected: &str, example: &str) {
        self.err(
            node.at,
            format!("'{key}' must be {expected}, not {}", node.kind_name()),
            Some(format!("for example: {example}")),
        );
    }

    fn layer(&mut self, key: &Node, value: &Node) -> Option<Layer> {
        let name = self.layer.clone();
        let mut ok = true;
        if name.contains(':') {
            self.err(
                key.at,
                "a layer name must not contain ':'".into(),
                Some(format!(
                    "':' separates a name from a tag in image references; rename it, e.g. '{}'",
                    name.replace(':', "-")
                )),
            );
            ok = false;
        }
        if name.is_empty() {
            self.err(key.at, "a layer name must not be empty".into(), None);
            ok = false;
        }
        let Kind::Map(entries) = &value.kind else {
            self.err(
                value.at,
                format!("a layer must be a map of keys, not {}", value.kind_name()),
                Some(format!("{name}:\n    from:\n      type: scratch")),
            );
            return None;
        };
        let mut layer = Layer {
            name,
            file: self.rep.file.to_path_buf(),
            dir: self.dir.to_path_buf(),
            pos: self.rep.at(key.at),
            from: Base::Scratch,
            from_pos: self.rep.at(key.at),
            imports: Vec::new(),
            legacy_import: false,
            run: None,
            cmd: None,
            entrypoint: None,
            full_command: None,
            environment: BTreeMap::new(),
            build_env: BTreeMap::new(),
            build_env_passthrough: None,
            volumes: Vec::new(),
            labels: BTreeMap::new(),
            generate_labels: None,
            working_dir: None,
            runtime_user: None,
            annotations: BTreeMap::new(),
            build_only: false,
            binds: Vec::new(),
            overlay_dirs: Vec::new(),
            os: None,
            arch: None,
            sandbox: Default::default(),
        };
        let mut from_seen = false;
        // The legacy `import` key when it holds entries (stacker reads an empty one as
        // absent), and whether `imports` holds entries.
        let mut import_key: Option<&Node> = None;
        let mut legacy_imports = Vec::new();
        let mut imports_has_entries = false;
        for (k, v) in entries {
            let Some(key) = k.scalar() else {
                self.err(
                    k.at,
                    format!("a key must be a string, not {}", k.kind_name()),
                    None,
                );
                ok = false;
                continue;
            };
            let before = self.rep.out.len();
            match key {
                "from" => {
                    from_seen = true;
                    layer.from_pos = self.rep.at(v.at);
                    if let Some((base, at)) = self.from(v) {
                        layer.from = base;
                        layer.from_pos = self.rep.at(at);
                    }
                }
                "imports" => {
                    imports_has_entries = !is_empty(v);
                    layer.imports = self.imports(key, v);
                }
                "import" if is_empty(v) => {}
                "import" => {
                    import_key = Some(k);
                    self.warn(
                        k.at,
                        "'import' is deprecated: its files appear under /stacker/ instead of \
                         /stacker/imports/"
                            .into(),
                        Some("use 'imports' and read the files from /stacker/imports/".into()),
                    );
                    legacy_imports = self.imports(key, v);
                }
                "run" => layer.run = self.script(key, v),
                "generate_labels" => layer.generate_labels = self.script(key, v),
                "cmd" => layer.cmd = self.command(key, v),
                "entrypoint" => layer.entrypoint = self.command(key, v),
                "full_command" => layer.full_command = self.command(key, v),
                "environment" => layer.environment = self.string_map(key, v),
                "build_env" => layer.build_env = self.string_map(key, v),
                "labels" => layer.labels = self.string_map(key, v),
                "annotations" => layer.annotations = self.string_map(key, v),
                "build_env_passthrough" => {
                    layer.build_env_passthrough = self.passthrough(key, v);
                }
                "volumes" => layer.volumes = self.string_list(key, v, false).unwrap_or_default(),
                "working_dir" => layer.working_dir = self.string(key, v),
                "runtime_user" => layer.runtime_user = self.string(key, v),
                "build_only" => layer.build_only = self.boolean(key, v).unwrap_or(false),
                "binds" => layer.binds = self.binds(key, v),
                "overlay_dirs" => layer.overlay_dirs = self.overlay_dirs(key, v),
                "os" | "arch" => {
                    let s = self.string(key, v);
                    if s.as_deref().is_none_or(|s| s.trim().is_empty()) {
                        // An empty value has no position of its own: point at the key.
                        self.err(
                            if v.is_null() { k.at } else { v.at },
                            format!("'{key}' must not be empty"),
                            Some(if key == "os" {
                                "for example: os: linux".into()
                            } else {
                                "for example: arch: amd64".into()
                            }),
                        );
                    } else if key == "os" {
                        layer.os = s;
                    } else {
                        layer.arch = s;
                    }
                }
                "network" => layer.sandbox.network = self.network(key, v),
                "run_timeout" => layer.sandbox.run_timeout = self.duration_secs(key, v),
                "nested_userns" => {
                    layer.sandbox.nested_userns = self.boolean(key, v).unwrap_or(false);
                }
                "bom" => self.warn(
                    k.at,
                    "'bom' is accepted and ignored (stacker dropped SBOM generation)".into(),
                    None,
                ),
                other => {
                    let help = match suggest(other, LAYER_KEYS.iter().copied()) {
                        Some(s) => format!("did you mean '{s}'?"),
                        None => format!("known keys: {}", LAYER_KEYS.join(", ")),
                    };
                    self.err(k.at, format!("unknown key '{other}'"), Some(help));
                }
            }
            if self.rep.out[before..]
                .iter()
                .any(|d| d.severity == Severity::Error)
            {
                ok = false;
            }
        }
        if let Some(a) = import_key {
            if imports_has_entries {
                self.err(
                    a.at,
                    "'import' and 'imports' cannot both be used in one layer".into(),
                    Some("keep 'imports' and move the 'import' entries into it".into()),
                );
                ok = false;
            }
            layer.imports = legacy_imports;
            layer.legacy_import = true;
        }
        if !from_seen {
            self.err(
                key.at,
                "missing 'from': every layer needs a base".into(),
                Some(
                    "add, e.g.\n    from:\n      type: docker\n      url: docker://alpine:3.20\n  \
                     or 'type: built' with 'tag: OTHER_LAYER', or 'type: scratch'"
                        .into(),
                ),
            );
            ok = false;
        }
        if layer.full_command.is_some() && (layer.cmd.is_some() || layer.entrypoint.is_some()) {
            self.warn(
                key.at,
                "'full_command' sets the entrypoint and clears cmd; 'cmd'/'entrypoint' in the \
                 same layer are overridden"
                    .into(),
                None,
            );
        }
        ok.then_some(layer)
    }

    /// The base, and where its reference (url or tag value) is written.
    fn from(&mut self, node: &Node) -> Option<(Base, usize)> {
        let Kind::Map(entries) = &node.kind else {
            self.wrong_type(
                "from",
                node,
                "a map",
                "from:\n      type: docker\n      url: docker://alpine:3.20",
            );
            return None;
        };
        let mut type_node = None;
        let mut url = None;
        let mut tag = None;
        let mut insecure = false;
        let mut present: Vec<(&str, &Node)> = Vec::new();
        for (k, v) in entries {
            let key = k.scalar().unwrap_or("");
            match key {
                "type" => type_node = Some(v),
                "url" => url = self.string("from.url", v).map(|s| (s, v.at)),
                "tag" => tag = self.string("from.tag", v).map(|s| (s, v.at)),
                "insecure" => insecure = self.boolean("from.insecure", v).unwrap_or(false),
                other => {
                    let help = match suggest(other, FROM_KEYS.iter().copied()) {
                        Some(s) => format!("did you mean '{s}'?"),
                        None => format!("'from' takes: {}", FROM_KEYS.join(", ")),
                    };
                    self.err(
                        k.at,
                        format!("unknown key '{other}' under 'from'"),
                        Some(help),
                    );
                    return None;
                }
            }
            present.push((key, k));
        }
        let Some(type_node) = type_node else {
            self.err(
                node.at,
                "'from' has no 'type'".into(),
                Some(format!(
                    "add 'type:' with one of: {}",
                    FROM_TYPES.join(", ")
                )),
            );
            return None;
        };
        let ty = self.string("from.type", type_node)?;
        let ignored = |keys: &[&str], this: &mut Self| {
            for (key, k) in &present {
                if *key != "type" && !keys.contains(key) {
                    this.warn(
                        k.at,
                        format!("'{key}' is ignored for 'from' of type '{ty}'"),
                        None,
                    );
                }
            }
        };
        let need_url = |this: &mut Self, url: Option<(String, usize)>, example: &str| match url {
            Some((u, at)) if !u.is_empty() => Some((u, at)),
            _ => {
                this.err(
                    node.at,
                    format!("'from' of type '{ty}' needs a 'url'"),
                    Some(format!("for example: url: {example}")),
                );
                None
            }
        };
        match ty.as_str() {
            "docker" => {
                ignored(&["url", "insecure"], self);
                let (url, url_at) = need_url(self, url, "docker://alpine:3.20")?;
                // Like stacker (containers/image), `type: docker` takes an `oci:` URL too:
                // the same base as `type: oci` with the rest.
                if let Some(rest) = url.strip_prefix("oci:") {
                    let url = rest.to_string();
                    self.oci_url(&url, url_at)?;
                    return Some((Base::Oci { url }, url_at));
                }
                if !url.starts_with("docker://") || url.len() <= "docker://".len() {
                    self.err(
                        url_at,
                        format!("'{url}' is not a docker URL"),
                        Some(
                            "write docker://[HOST[:PORT]/]REPO:TAG or ...@sha256:DIGEST, or \
                             oci:PATH:TAG for a local OCI layout"
                                .into(),
                        ),
                    );
                    return None;
                }
                Some((Base::Docker { url, insecure }, url_at))
            }
            "oci" => {
                ignored(&["url"], self);
                let (url, url_at) = need_url(self, url, "path/to/layout:tag")?;
                self.oci_url(&url, url_at)?;
                Some((Base::Oci { url }, url_at))
            }
            "tar" => {
                ignored(&["url"], self);
                let (url, url_at) = need_url(self, url, "rootfs.tar.gz")?;
                let source = self.source(&url, url_at)?;
                Some((Base::Tar { source }, url_at))
            }
            "built" => {
                ignored(&["tag"], self);
                match tag {
                    Some((t, at)) if !t.is_empty() => Some((Base::Built { tag: t }, at)),
                    _ => {
                        self.err(
                            node.at,
                            "'from' of type 'built' needs a 'tag': the name of the layer to \
                             start from"
                                .into(),
                            Some("for example:\n      type: built\n      tag: base".into()),
                        );
                        None
                    }
                }
            }
            "scratch" => {
                ignored(&[], self);
                Some((Base::Scratch, node.at))
            }
            other => {
                let help = match suggest(other, FROM_TYPES.iter().copied()) {
                    Some(s) => format!("did you mean '{s}'? (types: {})", FROM_TYPES.join(", ")),
                    None => format!("types: {}", FROM_TYPES.join(", ")),
                };
                self.err(
                    type_node.at,
                    format!("unknown 'from' type '{other}'"),
                    Some(help),
                );
                None
            }
        }
    }

    /// Check an OCI layout URL `PATH:TAG` (see `oci_url_parts`).
    fn oci_url(&mut self, url: &str, at: usize) -> Option<()> {
        if crate::oci::oci_url_parts(url).is_some() {
            return Some(());
        }
        self.err(
            at,
            format!("'{url}' is not an OCI layout URL PATH:TAG"),
            Some(
                "write the layout's directory (relative to this file) and a tag, for \
                 example: url: oci:base (the layout oci/, tag base)"
                    .into(),
            ),
        );
        None
    }

    /// Parse an import path or tar URL.
    fn source(&mut self, written: &str, at: usize) -> Option<Source> {
        if let Some(rest) = written.strip_prefix("stacker://") {
            match rest.split_once('/') {
                Some((layer, path)) if !layer.is_empty() && !path.trim_matches('/').is_empty() => {
                    Some(Source::Layer {
                        layer: layer.to_string(),
                        path: path.to_string(),
                    })
                }
                _ => {
                    self.err(
                        at,
                        format!("'{written}' is not a valid stacker:// reference"),
                        Some("write stacker://LAYER/path/inside/it".into()),
                    );
                    None
                }
            }
        } else if crate::inputs::is_url(written) {
            Some(Source::Http {
                url: written.to_string(),
            })
        } else if written.contains("://") {
            self.err(
                at,
                format!("'{written}': unsupported URL scheme"),
                Some("imports are local paths, http(s):// URLs or stacker://LAYER/PATH".into()),
            );
            None
        } else if written.is_empty() {
            self.err(at, "an empty path".into(), None);
            None
        } else {
            Some(Source::Local {
                written: written.to_string(),
                path: self.dir.join(written),
            })
        }
    }

    fn imports(&mut self, key: &str, node: &Node) -> Vec<Import> {
        let items: Vec<&Node> = match &node.kind {
            Kind::Seq(items) => items.iter().collect(),
            Kind::Scalar { .. } if node.is_null() => Vec::new(),
            Kind::Scalar { .. } => vec![node],
            Kind::Map(_) => {
                self.wrong_type(
                    key,
                    node,
                    "a path or a list",
                    &format!("{key}:\n      - file.txt"),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for item in items {
            let pos = self.rep.at(item.at);
            match &item.kind {
                Kind::Scalar { text, .. } => {
                    if let Some(source) = self.source(text, item.at) {
                        out.push(Import {
                            source,
                            hash: None,
                            dest: None,
                            mode: None,
                            uid: None,
                            gid: None,
                            pos,
                        });
                    }
                }
                Kind::Seq(_) => self.err(
                    item.at,
                    format!("a nested list inside '{key}'"),
                    Some("each entry is a path or a map with 'path:'".into()),
                ),
                Kind::Map(entries) => {
                    if let Some(i) = self.import_map(key, item, entries, pos) {
                        out.push(i);
                    }
                }
            }
        }
        out
    }

    fn import_map(
        &mut self,
        key: &str,
        item: &Node,
        entries: &[(Node, Node)],
        pos: Pos,
    ) -> Option<Import> {
        let mut import = Import {
            source: Source::Http { url: String::new() },
            hash: None,
            dest: None,
            mode: None,
            uid: None,
            gid: None,
            pos,
        };
        let mut source = None;
        let mut ok = true;
        for (k, v) in entries {
            match k.scalar().unwrap_or("") {
                "path" => match self.string("path", v) {
                    Some(p) => source = self.source(&p, v.at),
                    None => ok = false,
                },
                "hash" => {
                    let h = self.string("hash", v).unwrap_or_default();
                    let hex = h.strip_prefix("sha256:").unwrap_or(&h);
                    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        import.hash = Some(hex.to_ascii_lowercase());
                    } else {
                        self.err(
                            v.at,
                            format!("'{h}' is not a sha256 hash"),
                            Some(
                                "write the 64 hex digits of the file's sha256 (sha256sum FILE)"
                                    .into(),
                            ),
                        );
                        ok = false;
                    }
                }
                "dest" => {
                    let d = self.string("dest", v).unwrap_or_default();
                    if d.starts_with('/') {
                        import.dest = Some(d);
                    } else {
                        self.err(
                            v.at,
                            format!("'dest' must be an absolute path in the image, not '{d}'"),
                            Some(format!("write /{}", d.trim_start_matches("./"))),
                        );
                        ok = false;
                    }
                }
                "mode" => import.mode = self.number("mode", v, true, 0o7777),
                "uid" => import.uid = self.number("uid", v, false, u32::MAX),
                "gid" => import.gid = self.number("gid", v, false, u32::MAX),
                other => {
                    let help = suggest(other, IMPORT_KEYS.iter().copied())
                        .map(|s| format!("did you mean '{s}'?"));
                    self.warn(
                        k.at,
                        format!("unknown key '{other}' in an entry of '{key}' is ignored"),
                        help,
                    );
                }
            }
        }
        match source {
            Some(s) if ok => {
                import.source = s;
                Some(import)
            }
            Some(_) => None,
            None => {
                if item.get("path").is_none() {
                    self.err(
                        item.at,
                        format!("an entry of '{key}' has no 'path'"),
                        Some(format!(
                            "{key}:\n      - path: file.txt\n        dest: /etc/"
                        )),
                    );
                }
                None
            }
        }
    }

    fn number(&mut self, key: &str, node: &Node, octal: bool, max: u32) -> Option<u32> {
        let Kind::Scalar { text, style } = &node.kind else {
            self.wrong_type(key, node, "a number", &format!("{key}: 1000"));
            return None;
        };
        let t = text.trim();
        let parsed = if let Some(o) = t.strip_prefix("0o") {
            u32::from_str_radix(o, 8).ok()
        } else if let Some(h) = t.strip_prefix("0x") {
            u32::from_str_radix(h, 16).ok()
        } else if octal && (t.starts_with('0') || *style != Style::Plain) {
            // YAML 1.1 (stacker's parser) reads a leading 0 as octal; a quoted mode is
            // written the way chmod takes it.
            u32::from_str_radix(t, 8).ok()
        } else {
            t.parse::<u32>().ok()
        };
        match parsed {
            Some(n) if n <= max => Some(n),
            _ => {
                let example = if octal { "mode: 0755" } else { "uid: 1000" };
                self.err(
                    node.at,
                    format!(
                        "'{key}' must be a number{}, not '{t}'",
                        if octal { " (octal, like 0644)" } else { "" }
                    ),
                    Some(format!("for example: {example}")),
                );
                None
            }
        }
    }

    fn string(&mut self, key: &str, node: &Node) -> Option<String> {
        match &node.kind {
            Kind::Scalar { .. } if node.is_null() => None,
            Kind::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.wrong_type(key, node, "a string", &format!("{key}: value"));
                None
            }
        }
    }

    /// `network: host|none` (farm's key).
    fn network(&mut self, key: &str, node: &Node) -> Option<Network> {
        if node.is_null() {
            return None;
        }
        match node.scalar().map(str::parse::<Network>) {
            Some(Ok(n)) => Some(n),
            _ => {
                let shown = node.shown();
                self.err(
                    node.at,
                    format!("'{key}' must be host or none, not {shown}"),
                    Some(format!(
                        "for example: {key}: none (no network but loopback during run)"
                    )),
                );
                None
            }
        }
    }

    /// A positive duration in whole seconds: an integer (seconds) or `90s`, `10m`, `2h`,
    /// `1h 30m`.
    fn duration_secs(&mut self, key: &str, node: &Node) -> Option<u64> {
        if node.is_null() {
            return None;
        }
        let parsed = node.scalar().and_then(|s| {
            let s = s.trim();
            s.parse::<u64>()
                .ok()
                .or_else(|| humantime::parse_duration(s).ok().map(|d| d.as_secs()))
        });
        match parsed {
            Some(secs) if secs > 0 => Some(secs),
            _ => {
                let shown = node.shown();
                self.err(
                    node.at,
                    format!("'{key}' must be a positive duration, not {shown}"),
                    Some(format!("for example: {key}: 600 (seconds), or {key}: 10m")),
                );
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, node: &Node) -> Option<bool> {
        match node.scalar().map(str::to_ascii_lowercase).as_deref() {
            Some("true" | "yes" | "on") => Some(true),
            Some("false" | "no" | "off") => Some(false),
            _ if node.is_null() => None,
            _ => {
                let shown = node.shown();
                self.err(
                    node.at,
                    format!("'{key}' must be true or false, not {shown}"),
                    Some(format!("for example: {key}: true")),
                );
                None
            }
        }
    }

    /// A string, or a list of strings when `allow_scalar` (otherwise a list only).
    fn string_list(&mut self, key: &str, node: &Node, allow_scalar: bool) -> Option<Vec<String>> {
        match &node.kind {
            Kind::Scalar { .. } if node.is_null() => None,
            Kind::Scalar { text, .. } if allow_scalar => Some(vec![text.clone()]),
            Kind::Seq(items) => {
                let mut out = Vec::new();
                for item in items {
                    match &item.kind {
                        Kind::Scalar { text, .. } => out.push(text.clone()),
                        _ => self.err(
                            item.at,
                            format!(
                                "the entries of '{key}' must be strings, not {}",
                                item.kind_name()
                            ),
                            None,
                        ),
                    }
                }
                Some(out)
            }
            _ => {
                self.wrong_type(
                    key,
                    node,
                    "a list of strings",
                    &format!("{key}:\n      - /data"),
                );
                None
            }
        }
    }

    /// `run` and `generate_labels`: one script, list items joined by newlines.
    fn script(&mut self, key: &str, node: &Node) -> Option<String> {
        match &node.kind {
            Kind::Map(_) => {
                self.wrong_type(
                    key,
                    node,
                    "a string or a list of strings",
                    &format!("{key}: |\n      echo hello"),
                );
                None
            }
            _ => self.string_list(key, node, true).map(|l| l.join("\n")),
        }
    }

    /// `cmd`/`entrypoint`/`full_command`: a string split like a shell, or a list.
    fn command(&mut self, key: &str, node: &Node) -> Option<Vec<String>> {
        match &node.kind {
            Kind::Scalar { .. } if node.is_null() => None,
            Kind::Scalar { text, .. } => match shell_words::split(text) {
                Ok(words) => Some(words),
                Err(_) => {
                    self.err(
                        node.at,
                        format!("'{key}' has an unterminated quote"),
                        Some(format!("close the quote, or write {key} as a list")),
                    );
                    None
                }
            },
            Kind::Seq(_) => self.string_list(key, node, false),
            Kind::Map(_) => {
                self.wrong_type(
                    key,
                    node,
                    "a string or a list of strings",
                    &format!("{key}: [\"/bin/app\", \"--flag\"]"),
                );
                None
            }
        }
    }

    fn string_map(&mut self, key: &str, node: &Node) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match &node.kind {
            Kind::Scalar { .. } if node.is_null() => {}
            Kind::Map(entries) => {
                for (k, v) in entries {
                    let Some(name) = k.scalar() else {
                        self.err(k.at, format!("the keys of '{key}' must be strings"), None);
                        continue;
                    };
                    let value = match &v.kind {
                        Kind::Scalar { .. } if v.is_null() => String::new(),
                        Kind::Scalar { text, .. } => text.clone(),
                        _ => {
                            self.err(
                                v.at,
                                format!(
                                    "the value of '{key}.{name}' must be a string, not {}",
                                    v.kind_name()
                                ),
                                Some("quote it if it should be text".into()),
                            );
                            continue;
                        }
                    };
                    out.insert(name.to_string(), value);
                }
            }
            _ => self.wrong_type(key, node, "a map", &format!("{key}:\n      NAME: value")),
        }
        out
    }

    fn passthrough(&mut self, key: &str, node: &Node) -> Option<Vec<String>> {
        let list = self.string_list(key, node, false)?;
        let items: Vec<&Node> = match &node.kind {
            Kind::Seq(items) => items.iter().collect(),
            _ => Vec::new(),
        };
        for (re, item) in list.iter().zip(items) {
            if let Err(e) = regex::Regex::new(&format!("^(?:{re})$")) {
                self.err(
                    item.at,
                    format!(
                        "'{re}' is not a valid regular expression: {}",
                        first_line(&e.to_string())
                    ),
                    None,
                );
            }
        }
        Some(list)
    }

    fn binds(&mut self, key: &str, node: &Node) -> Vec<Bind> {
        let items = match &node.kind {
            Kind::Seq(items) => items,
            Kind::Scalar { .. } if node.is_null() => return Vec::new(),
            _ => {
                self.wrong_type(key, node, "a list", "binds:\n      - /src -> /dest");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for item in items {
            let mut access = BindAccess::Unspecified;
            let (source, dest) = match &item.kind {
                Kind::Scalar { text, .. } => match text.split_once("->") {
                    Some((s, d)) => (s.trim().to_string(), d.trim().to_string()),
                    None => (text.trim().to_string(), text.trim().to_string()),
                },
                Kind::Map(_) => {
                    let s = item.get("source").and_then(|n| self.string("source", n));
                    let d = item.get("dest").and_then(|n| self.string("dest", n));
                    if let Some(rw) = item.get("rw").and_then(|n| self.boolean("rw", n)) {
                        access = if rw {
                            BindAccess::ReadWrite
                        } else {
                            BindAccess::ReadOnly
                        };
                    }
                    for (k, _) in item_entries(item) {
                        let kk = k.scalar().unwrap_or("");
                        if !matches!(kk, "source" | "dest" | "rw") {
                            self.err(
                                k.at,
                                format!("unknown key '{kk}' in a bind"),
                                Some("a bind map takes 'source', 'dest' and 'rw'".into()),
                            );
                        }
                    }
                    match s {
                        Some(s) => {
                            let d = d.unwrap_or_else(|| s.clone());
                            (s, d)
                        }
                        None => {
                            self.err(item.at, "a bind needs a 'source'".into(), None);
                            continue;
                        }
                    }
                }
                Kind::Seq(_) => {
                    self.err(item.at, "a nested list inside 'binds'".into(), None);
                    continue;
                }
            };
            if source.is_empty() || dest.is_empty() {
                self.err(
                    item.at,
                    "a bind needs a source and a destination".into(),
                    Some("write \"/src\", \"/src -> /dest\" or {source: /src, dest: /dest}".into()),
                );
                continue;
            }
            let dest = if dest.starts_with('/') {
                dest
            } else {
                self.dir.join(&dest).to_string_lossy().into_owned()
            };
            out.push(Bind {
                source: self.dir.join(&source),
                written: source,
                dest,
                access,
            });
        }
        out
    }

    fn overlay_dirs(&mut self, key: &str, node: &Node) -> Vec<OverlayDir> {
        let items = match &node.kind {
            Kind::Seq(items) => items,
            Kind::Scalar { .. } if node.is_null() => return Vec::new(),
            _ => {
                self.wrong_type(
                    key,
                    node,
                    "a list",
                    "overlay_dirs:\n      - source: dir\n        dest: /opt",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for item in items {
            if !matches!(item.kind, Kind::Map(_)) {
                self.err(
                    item.at,
                    format!(
                        "an entry of 'overlay_dirs' must be a map, not {}",
                        item.kind_name()
                    ),
                    Some("- source: dir\n        dest: /opt".into()),
                );
                continue;
            }
            for (k, _) in item_entries(item) {
                let kk = k.scalar().unwrap_or("");
                if kk != "source" && kk != "dest" {
                    self.err(
                        k.at,
                        format!("unknown key '{kk}' in an overlay_dirs entry"),
                        Some("it takes 'source' and 'dest'".into()),
                    );
                }
            }
            let source = item.get("source").and_then(|n| self.string("source", n));
            let dest = item
                .get("dest")
                .and_then(|n| self.string("dest", n))
                .unwrap_or_else(|| "/".to_string());
            let Some(source) = source.filter(|s| !s.is_empty()) else {
                self.err(
                    item.at,
                    "an overlay_dirs entry needs a 'source'".into(),
                    None,
                );
                continue;
            };
            if !dest.starts_with('/') {
                self.err(
                    item.get("dest").map_or(item.at, |n| n.at),
                    format!("'dest' must be an absolute path in the image, not '{dest}'"),
                    Some(format!("write /{dest}")),
                );
                continue;
            }
            out.push(OverlayDir {
                source: self.dir.join(&source),
                written: source,
                dest,
            });
        }
        out
    }
}

/// An empty value: null, an empty string or an empty list.
fn is_empty(node: &Node) -> bool {
    match &node.kind {
        Kind::Scalar { text, .. } => node.is_null() || text.is_empty(),
        Kind::Seq(items) => items.is_empty(),
        Kind::Map(_) => false,
    }
}

fn item_entries(node: &Node) -> &[(Node, Node)] {
    match &node.kind {
        Kind::Map(e) => e,
        _ => &[],
    }
}

fn first_line(s: &str) -> &str {
    s.lines().last().unwrap_or(s).trim()
}
