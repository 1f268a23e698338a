//! Every key and every form of the language.

use std::path::PathBuf;

use super::{plan, plan_files, subs};
use crate::{Base, Severity, Source, Substitutions};

fn only(text: &str) -> crate::Layer {
    let p = plan(text);
    assert_eq!(p.layers.len(), 1);
    p.layers[0].layer.clone()
}

#[test]
fn from_types() {
    let p = plan(
        "d:\n  from:\n    type: docker\n    url: docker://alpine:3.20\n    insecure: true\n\
         o:\n  from:\n    type: oci\n    url: layouts/x:v1:extra\n\
         t:\n  from:\n    type: tar\n    url: rootfs.tar.gz\n\
         h:\n  from:\n    type: tar\n    url: https://example.com/r.tar\n\
         s:\n  from:\n    type: tar\n    url: stacker://t/out/r.tar\n\
         b:\n  from:\n    type: built\n    tag: d\n\
         z:\n  from:\n    type: scratch\n",
    );
    let l = |n: &str| p.layers[p.index_of(n).unwrap()].layer.from.clone();
    assert_eq!(
        l("d"),
        Base::Docker {
            url: "docker://alpine:3.20".into(),
            insecure: true
        }
    );
    assert_eq!(
        l("o"),
        Base::Oci {
            url: "layouts/x:v1:extra".into()
        }
    );
    assert_eq!(
        l("t"),
        Base::Tar {
            source: Source::Local {
                written: "rootfs.tar.gz".into(),
                path: PathBuf::from("rootfs.tar.gz")
            }
        }
    );
    assert_eq!(
        l("h"),
        Base::Tar {
            source: Source::Http {
                url: "https://example.com/r.tar".into()
            }
        }
    );
    assert_eq!(
        l("s"),
        Base::Tar {
            source: Source::Layer {
                layer: "t".into(),
                path: "out/r.tar".into()
            }
        }
    );
    assert_eq!(l("b"), Base::Built { tag: "d".into() });
    assert_eq!(l("z"), Base::Scratch);
}

#[test]
fn oci_urls_as_stacker_reads_them() {
    // `oci:base` under `type: oci` is the layout `oci/` with tag `base` (no transport
    // prefix); `type: docker` takes the `oci:` transport for the same base.
    let l = only("a:\n  from:\n    type: oci\n    url: oci:base\n");
    assert_eq!(
        l.from,
        Base::Oci {
            url: "oci:base".into()
        }
    );
    let l = only("a:\n  from:\n    type: docker\n    url: oci:/layouts/x:v1\n");
    assert_eq!(
        l.from,
        Base::Oci {
            url: "/layouts/x:v1".into()
        }
    );
}

#[test]
fn docker_insecure_defaults_false_and_accepts_yaml11_booleans() {
    let l = only("a:\n  from:\n    type: docker\n    url: docker://x/y:1\n");
    assert!(matches!(
        l.from,
        Base::Docker {
            insecure: false,
            ..
        }
    ));
    let l = only("a:\n  from:\n    type: docker\n    url: docker://x/y:1\n    insecure: yes\n");
    assert!(matches!(l.from, Base::Docker { insecure: true, .. }));
}

#[test]
fn imports_string_list_and_map_forms() {
    let p = plan(
        "build: {from: {type: scratch}}\na:\n  from: {type: scratch}\n  imports:\n    - conf/app.conf\n    - dir/\n    \
         - https://example.com/tool.tar.gz\n    - stacker://build/out/app\n    \
         - path: tool.bin\n      hash: 9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\n      \
         dest: /usr/local/bin/\n      mode: 0755\n      uid: 1000\n      gid: 1000\n",
    );
    let l = &p.layers[1].layer;
    assert_eq!(l.imports.len(), 5);
    assert_eq!(
        l.imports[0].source,
        Source::Local {
            written: "conf/app.conf".into(),
            path: PathBuf::from("conf/app.conf")
        }
    );
    assert!(matches!(&l.imports[1].source, Source::Local { written, .. } if written == "dir/"));
    assert!(matches!(&l.imports[2].source, Source::Http { url } if url.ends_with("tool.tar.gz")));
    assert_eq!(
        l.imports[3].source,
        Source::Layer {
            layer: "build".into(),
            path: "out/app".into()
        }
    );
    let m = &l.imports[4];
    assert_eq!(
        m.hash.as_deref(),
        Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
    );
    assert_eq!(m.dest.as_deref(), Some("/usr/local/bin/"));
    assert_eq!(m.mode, Some(0o755));
    assert_eq!((m.uid, m.gid), (Some(1000), Some(1000)));
    assert!(!l.legacy_import);
}

#[test]
fn imports_single_string_and_sha256_prefix() {
    let l = only("a:\n  from: {type: scratch}\n  imports: one.txt\n");
    assert_eq!(l.imports.len(), 1);
    let h = "ab".repeat(32);
    let l = only(&format!(
        "a:\n  from: {{type: scratch}}\n  imports:\n    - path: x\n      hash: sha256:{h}\n"
    ));
    assert_eq!(l.imports[0].hash.as_deref(), Some(h.as_str()));
}

#[test]
fn mode_forms() {
    for (written, want) in [
        ("0755", 0o755),
        ("0o644", 0o644),
        ("'0600'", 0o600),
        ("493", 493),
        ("04755", 0o4755),
    ] {
        let l = only(&format!(
            "a:\n  from: {{type: scratch}}\n  imports:\n    - path: x\n      mode: {written}\n"
        ));
        assert_eq!(l.imports[0].mode, Some(want), "mode: {written}");
    }
}

#[test]
fn unknown_import_map_key_warns_and_is_ignored() {
    let p = plan("a:\n  from: {type: scratch}\n  imports:\n    - path: x\n      dset: /y\n");
    assert_eq!(p.layers[0].layer.imports[0].dest, None);
    let w = &p.warnings[0];
    assert_eq!(w.severity, Severity::Warning);
    assert!(w.message.contains("unknown key 'dset'"), "{w}");
    assert_eq!(w.help.as_deref(), Some("did you mean 'dest'?"));
    assert_eq!((w.pos.line, w.pos.col), (5, 7));
}

#[test]
fn deprecated_import_key() {
    let p = plan("a:\n  from: {type: scratch}\n  import:\n    - x.txt\n");
    let l = &p.layers[0].layer;
    assert!(l.legacy_import);
    assert_eq!(l.imports.len(), 1);
    assert!(p.warnings[0].message.contains("'import' is deprecated"));
    assert_eq!(p.layers[0].canonical.imports_dir, "/stacker");
}

#[test]
fn run_string_and_list() {
    let l = only("a:\n  from: {type: scratch}\n  run: echo hi\n");
    assert_eq!(l.run.as_deref(), Some("echo hi"));
    let l = only("a:\n  from: {type: scratch}\n  run:\n    - echo one\n    - echo two\n");
    assert_eq!(l.run.as_deref(), Some("echo one\necho two"));
    let l = only("a:\n  from: {type: scratch}\n  run: |\n    #!/bin/bash\n    echo x\n");
    assert_eq!(l.run.as_deref(), Some("#!/bin/bash\necho x\n"));
}

#[test]
fn commands_split_like_a_shell_or_take_lists() {
    let l = only(
        "a:\n  from: {type: scratch}\n  cmd: /bin/app --name 'two words'\n  \
         entrypoint: [\"/bin/sh\", \"-c\"]\n",
    );
    assert_eq!(
        l.cmd,
        Some(vec!["/bin/app".into(), "--name".into(), "two words".into()])
    );
    assert_eq!(l.entrypoint, Some(vec!["/bin/sh".into(), "-c".into()]));
    let l = only("a:\n  from: {type: scratch}\n  full_command: /bin/app run\n");
    assert_eq!(l.full_command, Some(vec!["/bin/app".into(), "run".into()]));
}

#[test]
fn full_command_with_cmd_warns() {
    let p = plan("a:\n  from: {type: scratch}\n  full_command: /x\n  cmd: /y\n");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.message.contains("full_command"))
    );
}

#[test]
fn maps_lists_and_strings() {
    let l = only(
        "a:\n  from: {type: scratch}\n  environment:\n    B: 2\n    A: 'x y'\n    EMPTY:\n  \
         build_env:\n    GOFLAGS: -mod=vendor\n  build_env_passthrough:\n    - '^FOO.*'\n    - BAR\n  \
         volumes: [/data, /cache]\n  labels:\n    org.example.x: y\n  annotations:\n    k: v\n  \
         generate_labels:\n    - echo 1 > /stacker/oci-labels/one\n  working_dir: /srv\n  \
         runtime_user: 1000:1000\n  build_only: true\n  os: linux\n  arch: arm64\n  \
         bom:\n    generate: true\n",
    );
    assert_eq!(
        l.environment.iter().collect::<Vec<_>>(),
        vec![
            (&"A".to_string(), &"x y".to_string()),
            (&"B".to_string(), &"2".to_string()),
            (&"EMPTY".to_string(), &String::new())
        ]
    );
    assert_eq!(l.build_env["GOFLAGS"], "-mod=vendor");
    assert_eq!(
        l.build_env_passthrough,
        Some(vec!["^FOO.*".to_string(), "BAR".to_string()])
    );
    assert_eq!(l.volumes, vec!["/data", "/cache"]);
    assert_eq!(l.labels["org.example.x"], "y");
    assert_eq!(l.annotations["k"], "v");
    assert_eq!(
        l.generate_labels.as_deref(),
        Some("echo 1 > /stacker/oci-labels/one")
    );
    assert_eq!(l.working_dir.as_deref(), Some("/srv"));
    assert_eq!(l.runtime_user.as_deref(), Some("1000:1000"));
    assert!(l.build_only);
    assert_eq!(
        (l.os.as_deref(), l.arch.as_deref()),
        (Some("linux"), Some("arm64"))
    );
}

#[test]
fn bom_is_accepted_with_a_warning() {
    let p = plan("a:\n  from: {type: scratch}\n  bom:\n    generate: true\n");
    assert!(p.warnings.iter().any(|w| w.message.contains("'bom'")));
}

#[test]
fn binds_in_all_three_forms() {
    let l = only(
        "a:\n  from: {type: scratch}\n  binds:\n    - /src\n    - /a -> /b\n    \
         - source: rel/dir\n      dest: /mnt\n    - source: /only\n",
    );
    let b: Vec<(String, String)> = l
        .binds
        .iter()
        .map(|b| (b.source.display().to_string(), b.dest.clone()))
        .collect();
    assert_eq!(
        b,
        vec![
            ("/src".into(), "/src".into()),
            ("/a".into(), "/b".into()),
            ("rel/dir".into(), "/mnt".into()),
            ("/only".into(), "/only".into()),
        ]
    );
}

#[test]
fn a_bind_map_may_ask_for_read_write_or_read_only() {
    use crate::BindAccess;
    let l = only(
        "a:\n  from: {type: scratch}\n  binds:\n    - /src\n    \
         - {source: /cache, dest: /c, rw: true}\n    - {source: /ro, rw: false}\n",
    );
    let access: Vec<BindAccess> = l.binds.iter().map(|b| b.access).collect();
    assert_eq!(
        access,
        [
            BindAccess::Unspecified,
            BindAccess::ReadWrite,
            BindAccess::ReadOnly
        ]
    );
}

#[test]
fn overlay_dirs_default_dest() {
    let l = only(
        "a:\n  from: {type: scratch}\n  overlay_dirs:\n    - source: files\n    \
         - source: more\n      dest: /opt\n",
    );
    assert_eq!(l.overlay_dirs[0].dest, "/");
    assert_eq!(l.overlay_dirs[1].dest, "/opt");
    assert_eq!(l.overlay_dirs[1].source, PathBuf::from("more"));
}

#[test]
fn relative_paths_resolve_against_the_containing_file() {
    let p = plan_files(
        &[
            (
                "top/stacker.yaml",
                "config:\n  prerequisites:\n    - ../lib/base.yaml\n\
                 app:\n  from: {type: built, tag: base}\n  imports:\n    - conf/app.conf\n",
            ),
            (
                "lib/base.yaml",
                "base:\n  from:\n    type: tar\n    url: rootfs.tar\n  imports: [data/]\n  \
                 binds: [cache -> /cache]\n  overlay_dirs:\n    - source: over\n",
            ),
        ],
        Substitutions::default(),
    )
    .unwrap();
    let base = &p.layers[p.index_of("base").unwrap()].layer;
    let app = &p.layers[p.index_of("app").unwrap()].layer;
    assert!(
        matches!(&base.from, Base::Tar { source: Source::Local { path, .. } } if path == &PathBuf::from("lib/rootfs.tar"))
    );
    assert!(
        matches!(&base.imports[0].source, Source::Local { path, .. } if path == &PathBuf::from("lib/data/"))
    );
    assert_eq!(base.binds[0].source, PathBuf::from("lib/cache"));
    assert_eq!(base.overlay_dirs[0].source, PathBuf::from("lib/over"));
    assert!(
        matches!(&app.imports[0].source, Source::Local { path, .. } if path == &PathBuf::from("top/conf/app.conf"))
    );
    assert_eq!(p.files[0].path, PathBuf::from("lib/base.yaml"));
}

#[test]
fn config_other_keys_are_ignored_and_config_is_not_a_layer() {
    let p = plan("config:\n  whatever: 1\na:\n  from: {type: scratch}\n");
    assert_eq!(p.layers.len(), 1);
}

#[test]
fn substitution_can_inject_yaml_and_defaults_apply() {
    let p = plan_files(
        &[(
            "stacker.yaml",
            "a:\n  from: ${{BASE}}\n  run: echo ${{MSG:hello world}}${{EMPTY:}}\n",
        )],
        subs(&[("BASE", "{type: docker, url: 'docker://x/y:1'}")]),
    )
    .unwrap();
    let l = &p.layers[0].layer;
    assert!(matches!(&l.from, Base::Docker { url, .. } if url == "docker://x/y:1"));
    assert_eq!(l.run.as_deref(), Some("echo hello world"));
    assert!(p.files[0].substituted.contains("docker://x/y:1"));
}

#[test]
fn substitution_precedence_cli_over_file_over_builtin() {
    let s = Substitutions {
        cli: vec![("A".into(), "cli".into())],
        file: vec![("A".into(), "file".into()), ("B".into(), "file".into())],
        builtins: vec![
            ("B".into(), "builtin".into()),
            ("STACKER_ROOTFS_DIR".into(), "/pool".into()),
        ],
    };
    let p = plan_files(
        &[(
            "stacker.yaml",
            "a:\n  from: {type: scratch}\n  environment:\n    A: ${{A}}\n    B: ${{B}}\n    \
             R: ${{STACKER_ROOTFS_DIR}}\n",
        )],
        s,
    )
    .unwrap();
    let env = &p.layers[0].layer.environment;
    assert_eq!(
        (env["A"].as_str(), env["B"].as_str(), env["R"].as_str()),
        ("cli", "file", "/pool")
    );
}

#[test]
fn shell_placeholders_of_provided_names_warn_with_position() {
    let p = plan_files(
        &[(
            "stacker.yaml",
            "a:\n  from: {type: scratch}\n  run: echo $VERSION $VERSIONS ${{VERSION}}\n",
        )],
        subs(&[("VERSION", "1")]),
    )
    .unwrap();
    assert_eq!(
        p.layers[0].layer.run.as_deref(),
        Some("echo $VERSION $VERSIONS 1")
    );
    let w: Vec<_> = p
        .warnings
        .iter()
        .filter(|w| w.message.contains("shell syntax"))
        .collect();
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].pos.line, w[0].pos.col), (3, 13));
}

#[test]
fn scalars_of_other_types_become_their_text() {
    let l = only("a:\n  from: {type: scratch}\n  labels:\n    n: 1.10\n    b: yes\n");
    assert_eq!(l.labels["n"], "1.10");
    assert_eq!(l.labels["b"], "yes");
}

#[test]
fn yaml_anchors_and_merge_keys() {
    let p = plan(
        ".common: &common\n  from: {type: scratch}\n  environment: {A: '1'}\n\
         a:\n  <<: *common\n  run: echo a\n",
    );
    // `.common` is itself a layer, as in stacker
    assert_eq!(p.layers.len(), 2);
    let a = &p.layers[p.index_of("a").unwrap()].layer;
    assert_eq!(a.environment["A"], "1");
    assert_eq!(a.run.as_deref(), Some("echo a"));
}

#[test]
fn empty_file_is_an_empty_plan() {
    let p = plan("");
    assert!(p.layers.is_empty() && p.waves.is_empty());
}

#[test]
fn an_empty_legacy_import_is_absent() {
    // stacker reads an empty `import` as absent: no conflict with `imports`, in either
    // order, and the layer's imports are those of `imports`.
    for empty in ["", " ~", " ''", " []"] {
        for text in [
            format!("a:\n  from: {{type: scratch}}\n  import:{empty}\n  imports: [x.txt]\n"),
            format!("a:\n  from: {{type: scratch}}\n  imports: [x.txt]\n  import:{empty}\n"),
        ] {
            let p = plan(&text);
            let l = &p.layers[0].layer;
            assert_eq!(l.imports.len(), 1, "{text}");
            assert_eq!(l.imports[0].source.written(), "x.txt");
            assert!(!l.legacy_import, "{text}");
        }
        let l = only(&format!(
            "a:\n  from: {{type: scratch}}\n  import:{empty}\n"
        ));
        assert!(l.imports.is_empty() && !l.legacy_import);
    }
    // An empty `imports` next to a legacy `import` with entries: the legacy ones.
    let l = only("a:\n  from: {type: scratch}\n  import: [x.txt]\n  imports: []\n");
    assert_eq!(l.imports.len(), 1);
    assert!(l.legacy_import);
}

#[test]
fn farm_sandbox_keys() {
    let l = only(
        "a:\n  from: {type: scratch}\n  network: none\n  run_timeout: 10m\n  nested_userns: true\n",
    );
    assert_eq!(l.sandbox.network, Some(crate::Network::None));
    assert_eq!(l.sandbox.run_timeout, Some(600));
    assert!(l.sandbox.nested_userns);
    let l = only("a:\n  from: {type: scratch}\n  run_timeout: 90\n  network: host\n");
    assert_eq!(l.sandbox.run_timeout, Some(90));
    assert_eq!(l.sandbox.network, Some(crate::Network::Host));
    let l = only("a:\n  from: {type: scratch}\n");
    assert_eq!(l.sandbox, crate::LayerSandbox::default());
    for (bad, says) in [
        ("network: internet", "'network' must be host or none"),
        (
            "run_timeout: 0",
            "'run_timeout' must be a positive duration",
        ),
        (
            "run_timeout: soon",
            "'run_timeout' must be a positive duration",
        ),
        (
            "nested_userns: maybe",
            "'nested_userns' must be true or false",
        ),
    ] {
        let e = super::errors(&format!("a:\n  from: {{type: scratch}}\n  {bad}\n"));
        assert!(
            e.diagnostics.iter().any(|d| d.message.contains(says)),
            "{bad}: {e}"
        );
    }
}

#[test]
fn passthrough_rules_are_anchored_alternatives_or_stackers_literal_defaults() {
    let own = only(
        "a:\n  from: {type: scratch}\n  build_env_passthrough:\n    - '^FOO.*'\n    - BAR\n    - 'B.Z'\n",
    );
    let rules = crate::Passthrough::of(&own);
    for (name, passes) in [
        ("FOO", true),
        ("FOOD", true),
        ("BAR", true),
        ("BAZ", true),
        ("XBAR", false),
        ("BARX", false),
        ("B.Z", true),
        ("TERM", false),
    ] {
        assert_eq!(rules.matches(name), passes, "{name}");
    }
    let none = only("a:\n  from: {type: scratch}\n  build_env_passthrough: []\n");
    assert!(!crate::Passthrough::of(&none).matches("TERM"));
    let default = only("a:\n  from: {type: scratch}\n");
    let rules = crate::Passthrough::of(&default);
    assert!(rules.matches("TERM") && rules.matches("https_proxy"));
    // Literal names, not patterns: `.` and prefixes do not match.
    assert!(!rules.matches("TERMX") && !rules.matches("http_proxyy"));
}
