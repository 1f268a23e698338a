//! Image assembly: the config and manifest of a built stacker layer, exactly as
//! stackerfile.md says (inherited and extended Env/Labels/Volumes, Cmd/Entrypoint
//! inherited unless set (setting Entrypoint clears the inherited Cmd), `full_command`,
//! history, diff_ids, manifest annotations).

use std::collections::{BTreeMap, BTreeSet};

use farm_model::{LayerBlob, Platform};
use farm_stackerfile::{DEFAULT_PATH, Layer};
use oci_spec::image::{
    Arch, ConfigBuilder, HistoryBuilder, ImageConfiguration, ImageConfigurationBuilder, Os,
    RootFsBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("building the image {what}: {source}")]
    Spec {
        what: &'static str,
        source: oci_spec::OciSpecError,
    },
}

fn spec(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> AssembleError {
    move |source| AssembleError::Spec { what, source }
}

/// One layer blob added by this build, and what produced it (for the history entry:
/// "imports", "run", ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedLayer {
    pub blob: LayerBlob,
    pub what: String,
}

/// The platform an image is for: the layer's `os`/`arch`, else its base's, else this
/// machine's.
pub fn image_platform(layer: &Layer, base: Option<&ImageConfiguration>) -> Platform {
    let host = Platform::host();
    Platform::new(
        layer
            .os
            .clone()
            .or_else(|| base.map(|c| c.os().to_string()))
            .unwrap_or(host.os),
        layer
            .arch
            .clone()
            .or_else(|| base.map(|c| c.architecture().to_string()))
            .unwrap_or(host.arch),
    )
}

/// RFC 3339 time for `created`: `SOURCE_DATE_EPOCH` when set, else now.
pub fn created_time(source_date_epoch: Option<u64>) -> String {
    let t = match source_date_epoch {
        Some(s) => std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
        None => std::time::SystemTime::now(),
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The config's `author`, as stacker writes it: `stacker` when `SOURCE_DATE_EPOCH` is set
/// (reproducible), else `USER@HOSTNAME` of the build (`SUDO_USER` first, as stacker).
pub fn author(source_date_epoch: Option<u64>) -> String {
    if source_date_epoch.is_some() {
        return "stacker".into();
    }
    let user = std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| nix::unistd::getuid().to_string());
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

/// When and by whom an image is made: its config's `created` and `author`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub created: String,
    pub author: String,
}

impl Stamp {
    pub fn new(source_date_epoch: Option<u64>) -> Stamp {
        Stamp {
            created: created_time(source_date_epoch),
            author: author(source_date_epoch),
        }
    }
}

/// The config of the image a stacker layer produces on top of `base`.
pub fn image_config(
    layer: &Layer,
    base: Option<&ImageConfiguration>,
    new_layers: &[AddedLayer],
    generated_labels: &BTreeMap<String, String>,
    stamp: &Stamp,
) -> Result<ImageConfiguration, AssembleError> {
    let created = stamp.created.as_str();
    let base_cfg = base.and_then(|b| b.config().clone());

    // Env: the base's, with the layer's names replaced in place or appended (sorted).
    let mut env: Vec<String> = base_cfg
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    for (k, v) in &layer.environment {
        let entry = format!("{k}={v}");
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map(|s| s.0) == Some(k))
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }

    let mut labels: BTreeMap<String, String> = base_cfg
        .as_ref()
        .and_then(|c| c.labels().clone())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default();
    labels.extend(layer.labels.clone());
    labels.extend(generated_labels.clone());

    let mut volumes: BTreeSet<String> = base_cfg
        .as_ref()
        .and_then(|c| c.volumes().clone())
        .map(|v| v.into_iter().collect())
        .unwrap_or_default();
    volumes.extend(layer.volumes.iter().cloned());

    // Setting `entrypoint` clears the inherited Cmd (as Docker and stacker do): the base's
    // Cmd was written for the base's entrypoint, not as arguments to this one.
    let (entrypoint, cmd) = match (&layer.full_command, &layer.entrypoint) {
        (Some(full), _) => (Some(full.clone()), None),
        (None, Some(ep)) => (Some(ep.clone()), layer.cmd.clone()),
        (None, None) => (
            base_cfg.as_ref().and_then(|c| c.entrypoint().clone()),
            layer
                .cmd
                .clone()
                .or_else(|| base_cfg.as_ref().and_then(|c| c.cmd().clone())),
        ),
    };

    let mut cfg = ConfigBuilder::default().env(env);
    if let Some(e) = entrypoint {
        cfg = cfg.entrypoint(e);
    }
    if let Some(c) = cmd {
        cfg = cfg.cmd(c);
    }
    if !labels.is_empty() {
        cfg = cfg.labels(
            labels
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        );
    }
    if !volumes.is_empty() {
        cfg = cfg.volumes(volumes.into_iter().collect::<Vec<_>>());
    }
    if let Some(w) = layer
        .working_dir
        .clone()
        .or_else(|| base_cfg.as_ref().and_then(|c| c.working_dir().clone()))
    {
        cfg = cfg.working_dir(w);
    }
    if let Some(u) = layer
        .runtime_user
        .clone()
        .or_else(|| base_cfg.as_ref().and_then(|c| c.user().clone()))
    {
        cfg = cfg.user(u);
    }
    if let Some(ports) = base_cfg.as_ref().and_then(|c| c.exposed_ports().clone()) {
        cfg = cfg.exposed_ports(ports);
    }
    if let Some(sig) = base_cfg.as_ref().and_then(|c| c.stop_signal().clone()) {
        cfg = cfg.stop_signal(sig);
    }
    let cfg = cfg.build().map_err(spec("config"))?;

    let mut diff_ids: Vec<String> = base
        .map(|b| b.rootfs().diff_ids().clone())
        .unwrap_or_default();
    let mut history = base.and_then(|b| b.history().clone()).unwrap_or_default();
    for l in new_layers {
        diff_ids.push(l.blob.diff_id.clone());
        history.push(
            HistoryBuilder::default()
                .created(created.to_string())
                .created_by(format!("stacker build of {} ({})", layer.name, l.what))
                .build()
                .map_err(spec("history"))?,
        );
    }
    if new_layers.is_empty() {
        history.push(
            HistoryBuilder::default()
                .created(created.to_string())
                .created_by(format!(
                    "stacker build of {} (no filesystem change)",
                    layer.name
                ))
                .empty_layer(true)
                .build()
                .map_err(spec("history"))?,
        );
    }

    let platform = image_platform(layer, base);
    ImageConfigurationBuilder::default()
        .created(created.to_string())
        .author(stamp.author.clone())
        .architecture(Arch::from(platform.arch.as_str()))
        .os(Os::from(platform.os.as_str()))
        .config(cfg)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(diff_ids)
                .build()
                .map_err(spec("rootfs"))?,
        )
        .history(history)
        .build()
        .map_err(spec("configuration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_stackerfile::{LocalFiles, Plan, PlanOptions};

    fn layer(yaml: &str) -> Layer {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("stacker.yaml");
        std::fs::write(&f, yaml).unwrap();
        let p = Plan::load(&f, &PlanOptions::default(), &LocalFiles).unwrap();
        p.layers.last().unwrap().layer.clone()
    }

    fn st() -> Stamp {
        Stamp {
            created: "t".into(),
            author: "a@h".into(),
        }
    }

    fn nl(n: u8) -> AddedLayer {
        AddedLayer {
            blob: LayerBlob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
                size: 1,
                diff_id: format!("sha256:{}", format!("{:02x}", n + 1).repeat(32)),
                verity_root_hash: None,
            },
            what: "run".into(),
        }
    }

    #[test]
    fn inheritance_and_extension() {
        let base_layer = layer(
            "b:\n  from: {type: scratch}\n  environment: {A: '1', PATH: /bin}\n  \
             labels: {x: '1'}\n  volumes: [/v1]\n  cmd: /bin/base-cmd\n  entrypoint: /bin/ep\n  \
             working_dir: /w\n  runtime_user: nobody\n",
        );
        let base = image_config(&base_layer, None, &[nl(1)], &BTreeMap::new(), &st()).unwrap();
        let child = layer(
            "c:\n  from: {type: scratch}\n  environment: {A: '2', B: '3'}\n  labels: {y: '2'}\n  \
             volumes: [/v2]\n  cmd: [run]\n",
        );
        let mut gen_labels = BTreeMap::new();
        gen_labels.insert("g".to_string(), "z".to_string());
        let cfg = image_config(&child, Some(&base), &[nl(3)], &gen_labels, &st()).unwrap();
        let c = cfg.config().clone().unwrap();
        assert_eq!(
            c.env().clone().unwrap(),
            vec!["A=2".to_string(), "PATH=/bin".into(), "B=3".into()]
        );
        let labels = c.labels().clone().unwrap();
        assert_eq!(
            (
                labels["x"].as_str(),
                labels["y"].as_str(),
                labels["g"].as_str()
            ),
            ("1", "2", "z")
        );
        let mut vols = c.volumes().clone().unwrap();
        vols.sort();
        assert_eq!(vols, vec!["/v1", "/v2"]);
        assert_eq!(c.cmd().clone().unwrap(), vec!["run"]);
        assert_eq!(
            c.entrypoint().clone().unwrap(),
            vec!["/bin/ep"],
            "inherited"
        );
        assert_eq!(c.working_dir().as_deref(), Some("/w"));
        assert_eq!(c.user().as_deref(), Some("nobody"));
        assert_eq!(cfg.rootfs().diff_ids().len(), 2);
        assert_eq!(cfg.history().as_ref().unwrap().len(), 2);
    }

    #[test]
    fn author_and_history_read_like_stackers() {
        let l = layer("web:\n  from: {type: scratch}\n");
        let cfg = image_config(&l, None, &[nl(1)], &BTreeMap::new(), &st()).unwrap();
        assert_eq!(cfg.author().as_deref(), Some("a@h"));
        let h = cfg.history().clone().unwrap();
        assert_eq!(
            h[0].created_by().as_deref(),
            Some("stacker build of web (run)")
        );
        let cfg = image_config(&l, None, &[], &BTreeMap::new(), &st()).unwrap();
        let h = cfg.history().clone().unwrap();
        assert!(
            h[0].created_by()
                .as_deref()
                .unwrap()
                .starts_with("stacker build of web"),
            "{h:?}"
        );
        assert_eq!(author(Some(0)), "stacker");
        let a = author(None);
        let (user, host) = a.split_once('@').unwrap();
        assert!(!user.is_empty() && !host.is_empty(), "{a}");
        assert_eq!(Stamp::new(Some(0)).created, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn entrypoint_clears_the_inherited_cmd() {
        let base_layer = layer("b:\n  from: {type: scratch}\n  cmd: /bin/sh\n");
        let base = image_config(&base_layer, None, &[nl(1)], &BTreeMap::new(), &st()).unwrap();
        let child = layer("c:\n  from: {type: scratch}\n  entrypoint: /bin/cat /hello\n");
        let cfg = image_config(&child, Some(&base), &[], &BTreeMap::new(), &st()).unwrap();
        let c = cfg.config().clone().unwrap();
        assert_eq!(c.entrypoint().clone().unwrap(), vec!["/bin/cat", "/hello"]);
        assert_eq!(
            c.cmd(),
            &None,
            "the base's Cmd is not an argument of the new entrypoint"
        );

        let both = layer("c:\n  from: {type: scratch}\n  entrypoint: /bin/cat\n  cmd: /hello\n");
        let cfg = image_config(&both, Some(&base), &[], &BTreeMap::new(), &st()).unwrap();
        let c = cfg.config().clone().unwrap();
        assert_eq!(c.entrypoint().clone().unwrap(), vec!["/bin/cat"]);
        assert_eq!(c.cmd().clone().unwrap(), vec!["/hello"]);

        let neither = layer("c:\n  from: {type: scratch}\n");
        let cfg = image_config(&neither, Some(&base), &[], &BTreeMap::new(), &st()).unwrap();
        assert_eq!(
            cfg.config().clone().unwrap().cmd().clone().unwrap(),
            vec!["/bin/sh"],
            "inherited when the layer sets neither"
        );
    }

    #[test]
    fn default_path_and_full_command_and_empty_layer() {
        let l = layer("a:\n  from: {type: scratch}\n  full_command: /app --x\n  cmd: ignored\n");
        let cfg = image_config(&l, None, &[], &BTreeMap::new(), &st()).unwrap();
        let c = cfg.config().clone().unwrap();
        assert_eq!(
            c.env().clone().unwrap(),
            vec![format!("PATH={DEFAULT_PATH}")]
        );
        assert_eq!(c.entrypoint().clone().unwrap(), vec!["/app", "--x"]);
        assert_eq!(c.cmd(), &None);
        let h = cfg.history().clone().unwrap();
        assert_eq!(h[0].empty_layer(), Some(true));
        assert!(cfg.rootfs().diff_ids().is_empty());
    }

    #[test]
    fn platform_from_layer_base_or_host() {
        let l = layer("a:\n  from: {type: scratch}\n  arch: arm64\n");
        let cfg = image_config(&l, None, &[], &BTreeMap::new(), &st()).unwrap();
        assert_eq!(cfg.architecture().to_string(), "arm64");
        assert_eq!(cfg.os().to_string(), "linux");
        let l2 = layer("a:\n  from: {type: scratch}\n");
        let cfg2 = image_config(&l2, Some(&cfg), &[], &BTreeMap::new(), &st()).unwrap();
        assert_eq!(
            cfg2.architecture().to_string(),
            "arm64",
            "inherited from the base"
        );
    }

    #[test]
    fn config_json_is_stable_and_sorted() {
        let l = layer(
            "a:\n  from: {type: scratch}\n  labels: {z: '1', a: '2', m: '3', q: '4', b: '5'}\n  \
             volumes: [/z, /a, /m]\n",
        );
        let json = |l: &Layer| {
            farm_image::to_canonical_json(
                &image_config(l, None, &[], &BTreeMap::new(), &st()).unwrap(),
            )
            .unwrap()
        };
        let first = json(&l);
        for _ in 0..20 {
            assert_eq!(json(&l), first);
        }
        let text = String::from_utf8(first).unwrap();
        assert!(
            text.find("\"a\":\"2\"").unwrap() < text.find("\"z\":\"1\"").unwrap(),
            "{text}"
        );
        assert_eq!(created_time(Some(0)), "1970-01-01T00:00:00Z");
    }
}
