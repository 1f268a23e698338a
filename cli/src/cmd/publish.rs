//! `farm publish` and `farm build --push`: images to a registry, stacker's way
//! (`docker://host/ns` gives `host/ns/<image>:<tag>`).
//!
//! [`publish_images`] is the one place that pushes; `farm publish --layout` feeds it the
//! images of an OCI layout, `farm build --push` the images a build just tagged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use farm_image::{BlobStore, Digest, OciLayout};
use farm_registry::{ConnectOptions, Credentials, PushImage, PushOptions, PushTarget, Pushed};

use crate::local::block_on;

/// Credentials for registries (pulling `docker` bases and pushing).
#[derive(Debug, Clone, Args)]
pub(crate) struct RegistryArgs {
    /// User name for the registries this command talks to (with --registry-password).
    /// Without them, the usual auth files are used: $REGISTRY_AUTH_FILE,
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json,
    /// ~/.docker/config.json
    #[arg(
        long,
        visible_alias = "username",
        value_name = "USER",
        env = "FARM_REGISTRY_USERNAME"
    )]
    pub registry_username: Option<String>,

    /// Password for --registry-username. Prefer $FARM_REGISTRY_PASSWORD or an auth file
    /// (`skopeo login`, `docker login`): a command line is visible to other users
    #[arg(
        long,
        visible_alias = "password",
        value_name = "PASSWORD",
        env = "FARM_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    pub registry_password: Option<String>,
}

impl RegistryArgs {
    pub(crate) fn credentials(&self) -> anyhow::Result<Credentials> {
        Ok(Credentials::from_env(
            self.registry_username.clone(),
            self.registry_password.clone(),
        )?)
    }
}

/// `farm build --push ...`.
#[derive(Debug, Clone, Args)]
pub(crate) struct PushArgs {
    /// After a successful build, push each image to URL (docker://HOST[:PORT]/NAMESPACE):
    /// layer NAME goes to HOST[:PORT]/NAMESPACE/NAME:TAG. build_only layers are never
    /// pushed
    #[arg(long, value_name = "URL")]
    pub push: Option<String>,

    /// Tag the pushed images with TAG (repeatable) [default: latest]
    #[arg(long = "push-tag", value_name = "TAG", requires = "push")]
    pub push_tags: Vec<String>,

    /// Allow --push to a registry over plain http or with an unverifiable certificate
    #[arg(long, requires = "push")]
    pub push_insecure: bool,
}

/// Push images to a registry, as stacker's publish does.
///
/// Every image tagged in the OCI layout (or only those given with --image) goes to
/// HOST[:PORT]/NAMESPACE/IMAGE:TAG for each --tag (default: latest). With -f FILE or
/// -d DIR, as stacker: the images are the layers those stackerfiles define (not their
/// prerequisites' layers, never build_only ones). With --url oci:DIR, the images are
/// copied into the OCI layout DIR as IMAGE_TAG. Blobs the registry
/// already has are not sent again, blobs shared by several images are uploaded once
/// and mounted into the other repositories, and each manifest is pushed with its exact
/// local bytes, so the registry's digest is the one in the layout. All blobs and
/// manifests go first, the tags last: a failed publish moves no tag.
///
/// Credentials: --registry-username/--registry-password, else the usual auth files
/// ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
/// ~/.config/containers/auth.json, ~/.docker/config.json).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
  farm build && farm publish --url docker://registry.example.com/team\n  \
  farm publish --url docker://localhost:5000/dev --tag 1.2 --tag latest --image app --skip-tls\n  \
  farm publish -f stacker.yaml --url oci:published --tag 1.2 --show-only\n  \
  farm build --push docker://registry.example.com/team --push-tag 1.2   (build, then push)\n  \
  farm publish b-1795961460799-adfc59c5 --url docker://registry.example.com/team --coordinator farm:7600")]
pub(crate) struct PublishArgs {
    /// Where to push: docker://HOST[:PORT]/NAMESPACE, or oci:DIR (an OCI layout)
    #[arg(long, value_name = "URL")]
    pub url: String,

    /// Publish the layers this stackerfile defines (stacker's -f)
    #[arg(
        short = 'f',
        long = "stacker-file",
        value_name = "FILE",
        conflicts_with_all = ["search_dir", "build"]
    )]
    pub stacker_file: Option<PathBuf>,

    /// Publish the layers of every stackerfile under DIR named PATTERN (stacker's -d)
    #[arg(
        short = 'd',
        long = "search-dir",
        value_name = "DIR",
        conflicts_with = "build"
    )]
    pub search_dir: Option<PathBuf>,

    /// With -d: the stackerfiles' name pattern (`*` and `?` wildcards)
    #[arg(
        short = 'p',
        long = "stacker-file-pattern",
        value_name = "PATTERN",
        default_value = "stacker.yaml"
    )]
    pub pattern: String,

    #[command(flatten)]
    pub subs: crate::common::SubstitutionArgs,

    /// Print what would be published where, and publish nothing (stacker's --show-only)
    #[arg(long)]
    pub show_only: bool,

    /// Tag to push each image under (repeatable) [default: latest]
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    /// Allow plain http or an unverifiable TLS certificate
    #[arg(long)]
    pub skip_tls: bool,

    /// Publish the images of these layer types (repeatable): NAME-squashfs of the
    /// layout goes to NAME:TAG-squashfs (oci: NAME_TAG-squashfs), as stacker publishes
    #[arg(long = "layer-type", value_name = "TYPE", default_value = "tar")]
    pub layer_types: Vec<farm_image::LayerType>,

    /// Accepted as stacker's global --no-verity (the images are already built)
    #[arg(long)]
    pub no_verity: bool,

    /// Push only this image (a tag of the layout; repeatable) [default: all]
    #[arg(long = "image", visible_alias = "layer", value_name = "NAME")]
    pub images: Vec<String>,

    /// The OCI layout holding the images (what `farm build -o` wrote; stacker's --oci-dir)
    #[arg(
        long,
        visible_alias = "oci-dir",
        value_name = "DIR",
        default_value = "oci",
        conflicts_with = "build"
    )]
    pub layout: PathBuf,

    /// Publish the images of this build of the coordinator instead of a layout
    #[arg(value_name = "BUILD-ID")]
    pub build: Option<String>,

    #[command(flatten)]
    pub coordinator: crate::client::CoordinatorArg,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// A temporary OCI layout, removed on drop.
pub(crate) struct ScratchLayout(PathBuf);

impl ScratchLayout {
    pub(crate) fn new(what: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "farm-{what}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        Ok(ScratchLayout(dir))
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchLayout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to publish.
#[derive(Debug, Clone)]
pub(crate) struct PublishOptions {
    /// `docker://HOST[:PORT]/NAMESPACE`.
    pub url: String,
    pub tags: Vec<String>,
    pub insecure: bool,
    /// The flag that allows an insecure registry, for the TLS error's hint.
    pub insecure_flag: &'static str,
    pub credentials: Credentials,
    /// Print the pushed references on stderr (stdout is for JSON).
    pub refs_to_stderr: bool,
}

impl PublishOptions {
    /// Check the URL and tags before anything is built or sent.
    pub(crate) fn check(&self) -> anyhow::Result<PushTarget> {
        let target = PushTarget::parse(&self.url)?;
        for t in &self.tags {
            farm_registry::check_tag(t)?;
        }
        Ok(target)
    }
}

/// Push `images` (name, manifest digest) from `blobs`; prints one line per pushed tag
/// on stdout (`REFERENCE  DIGEST`) and a summary on stderr.
pub(crate) async fn publish_images(
    blobs: &BlobStore,
    images: &[(String, String)],
    opts: &PublishOptions,
) -> anyhow::Result<Vec<Pushed>> {
    let target = opts.check()?;
    let images = images
        .iter()
        .map(|(name, digest)| {
            Ok(PushImage {
                name: name.clone(),
                manifest_digest: Digest::parse(digest)
                    .with_context(|| format!("image '{name}': manifest digest"))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let push_opts = PushOptions {
        target: target.clone(),
        tags: opts.tags.clone(),
        connect: ConnectOptions {
            insecure: opts.insecure,
            tls_hint: if opts.insecure {
                "the registry's TLS fails even without certificate checks".into()
            } else {
                format!(
                    "for a registry with a self-signed certificate or plain http, add {}",
                    opts.insecure_flag
                )
            },
        },
    };
    let started = Instant::now();
    let (pushed, stats) = farm_registry::push(blobs, &images, &push_opts, &opts.credentials)
        .await
        .with_context(|| format!("pushing to {target}"))?;
    for p in &pushed {
        if opts.refs_to_stderr {
            eprintln!("{}  {}", p.reference, p.digest);
        } else {
            println!("{}  {}", p.reference, p.digest);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mb = stats.uploaded_bytes as f64 / 1e6;
    eprintln!(
        "farm: pushed {} image(s) to {target} in {secs:.1}s: {} blob(s) uploaded ({mb:.1} MB, \
         {:.0} MB/s), {} already there, {} mounted",
        images.len(),
        stats.uploaded,
        if secs > 0.0 { mb / secs } else { 0.0 },
        stats.skipped,
        stats.mounted,
    );
    Ok(pushed)
}

/// `farm build --push`: push what the build tagged. Returns whether it worked (the
/// error is printed).
/// With `json`, stdout is for the status object: the pushed references go to stderr.
pub(crate) async fn push_after_build(
    blobs: &BlobStore,
    tagged: &[(String, String)],
    push: &PushArgs,
    credentials: &Credentials,
    json: bool,
) -> bool {
    let Some(url) = &push.push else { return true };
    let opts = PublishOptions {
        url: url.clone(),
        tags: push.push_tags.clone(),
        insecure: push.push_insecure,
        insecure_flag: "--push-insecure",
        credentials: credentials.clone(),
        refs_to_stderr: json,
    };
    match publish_images(blobs, tagged, &opts).await {
        Ok(_) => true,
        Err(e) => {
            eprintln!("farm: --push failed: {e:#}");
            false
        }
    }
}

/// An image to publish: its name (a tag of the layout) and the stackerfile that defines
/// it, when publishing by stackerfile.
struct Wanted {
    name: String,
    file: Option<PathBuf>,
}

/// `-f`/`-d`: the layers the stackerfiles define, in file order, minus build_only ones
/// (said on stderr) and those --image leaves out; `None` without -f and -d.
fn stackerfile_images(args: &PublishArgs) -> anyhow::Result<Option<Vec<Wanted>>> {
    let files = match (&args.stacker_file, &args.search_dir) {
        (Some(f), _) => vec![f.clone()],
        (None, Some(dir)) => {
            let mut files = Vec::new();
            super::build::find_files(dir, &args.pattern, &mut files)
                .with_context(|| format!("searching {}", dir.display()))?;
            files.sort();
            if files.is_empty() {
                anyhow::bail!("no file named '{}' under {}", args.pattern, dir.display());
            }
            files
        }
        (None, None) => return Ok(None),
    };
    let layout = crate::common::Layout::new(None, None, Some(args.layout.clone()));
    let options = farm_stackerfile::PlanOptions::new(args.subs.substitutions(&layout)?);
    let mut wanted: Vec<Wanted> = Vec::new();
    for file in files {
        let Some(plan) = crate::common::plan_or_report("publish", &file, &options)? else {
            anyhow::bail!("{} does not load", file.display());
        };
        // The entry file loads last, after its prerequisites.
        let entry = plan.files.len().saturating_sub(1);
        for l in plan.layers.iter().filter(|l| l.file == entry) {
            let name = &l.layer.name;
            if l.layer.build_only {
                if !crate::common::quiet() {
                    eprintln!("will not publish: {} build_only {name}", file.display());
                }
                continue;
            }
            if (!args.images.is_empty() && !args.images.contains(name))
                || wanted.iter().any(|w| &w.name == name)
            {
                continue;
            }
            wanted.push(Wanted {
                name: name.clone(),
                file: Some(file.clone()),
            });
        }
    }
    Ok(Some(wanted))
}

/// `oci:DIR`: the layout DIR.
fn oci_destination(url: &str) -> Option<PathBuf> {
    url.strip_prefix("oci:").map(PathBuf::from)
}

/// Where IMAGE:TAG goes, as stacker writes it: `docker://HOST/NS/IMAGE:TAG`, or
/// `oci:DIR:IMAGE_TAG`.
fn destination(url: &str, image: &str, tag: &str) -> String {
    match oci_destination(url) {
        Some(_) => format!("{url}:{image}_{tag}"),
        None => format!("{}/{image}:{tag}", url.trim_end_matches('/')),
    }
}

/// Copy `images` (name, manifest digest) from `from` into the OCI layout `dir` as
/// NAME_TAG for each tag.
async fn publish_to_layout(
    from: &OciLayout,
    images: &[(String, String)],
    tags: &[String],
    dir: &std::path::Path,
    layer_type: farm_image::LayerType,
) -> anyhow::Result<()> {
    let to = if dir.join("index.json").exists() {
        OciLayout::open(dir).await
    } else {
        OciLayout::create(dir).await
    }
    .with_context(|| format!("opening the OCI layout {}", dir.display()))?;
    let mut tagged = Vec::new();
    for (name, _) in images {
        let (desc, manifest) = from.manifest(&layer_type.tag(name), None).await?;
        let digests = std::iter::once(desc.digest().to_string())
            .chain(std::iter::once(manifest.config().digest().to_string()))
            .chain(manifest.layers().iter().map(|l| l.digest().to_string()));
        for d in digests {
            from.blobs()
                .copy_to(&Digest::parse(&d)?, to.blobs())
                .await?;
        }
        for tag in tags {
            tagged.push((format!("{name}_{tag}"), desc.clone()));
        }
    }
    to.set_tags(&tagged).await?;
    for (tag, desc) in &tagged {
        println!("oci:{}:{tag}  {}", dir.display(), desc.digest());
    }
    Ok(())
}

pub(crate) fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    // The tags each image goes under (publish_images defaults the same way).
    let dest_tags = if args.tags.is_empty() {
        vec!["latest".to_string()]
    } else {
        args.tags.clone()
    };
    let opts = PublishOptions {
        url: args.url.clone(),
        tags: args.tags.clone(),
        insecure: args.skip_tls,
        insecure_flag: "--skip-tls",
        credentials: args.registry.credentials()?,
        refs_to_stderr: false,
    };
    match oci_destination(&args.url) {
        Some(dir) if dir.as_os_str().is_empty() => anyhow::bail!("--url oci:DIR needs a DIR"),
        Some(_) => {
            for t in &dest_tags {
                farm_registry::check_tag(t)?;
            }
        }
        None => {
            opts.check()?;
        }
    }
    let by_file = stackerfile_images(&args)?;
    let scratch = ScratchLayout::new("publish")?;
    block_on(async move {
        let mut args = args;
        if let Some(id) = &args.build {
            // A farm build: its images come through a temporary layout.
            let addr = args.coordinator.required("publish BUILD-ID")?;
            let mut client = crate::client::connect(&addr).await?;
            let tags = super::pull::pull(&mut client, id, scratch.path()).await?;
            if tags.is_empty() {
                anyhow::bail!("build {id} has no images (did it succeed? `farm status {id}`)");
            }
            args.layout = scratch.path().to_path_buf();
        }
        let layout = OciLayout::open(&args.layout)
            .await
            .with_context(|| format!("opening the OCI layout {}", args.layout.display()))?;
        let tags = layout.tags().await?;
        let wanted = match by_file {
            Some(wanted) => {
                for w in &wanted {
                    for t in &args.layer_types {
                        let typed = t.tag(&w.name);
                        if !tags.contains(&typed) {
                            let how = match t {
                                farm_image::LayerType::Tar => String::new(),
                                t => format!(" with --layer-type {t}"),
                            };
                            anyhow::bail!(
                                "no image '{typed}' in {}: build {}{how} before publishing it",
                                args.layout.display(),
                                w.file.as_deref().unwrap_or(args.layout.as_path()).display()
                            );
                        }
                    }
                }
                wanted
            }
            None => {
                for wanted in &args.images {
                    if !tags.contains(wanted) {
                        anyhow::bail!(
                            "no image '{wanted}' in {} (it has: {})",
                            args.layout.display(),
                            tags.join(", ")
                        );
                    }
                }
                // Without -f/-d the names are the layout's tags; for a squashfs/erofs
                // type, the tags that end in `-TYPE`, named without it.
                let wanted: Vec<Wanted> = tags
                    .iter()
                    .filter(|t| args.images.is_empty() || args.images.contains(t))
                    .filter_map(|t| {
                        let name = match args.layer_types.as_slice() {
                            [farm_image::LayerType::Tar] => t.clone(),
                            types => types
                                .iter()
                                .find_map(|ty| t.strip_suffix(&ty.tag("")).map(str::to_string))?,
                        };
                        Some(Wanted { name, file: None })
                    })
                    .collect();
                if wanted.is_empty() {
                    anyhow::bail!("no images in {}", args.layout.display());
                }
                wanted
            }
        };
        if args.show_only {
            for w in &wanted {
                let what = match &w.file {
                    Some(f) => format!("{} {}", f.display(), w.name),
                    None => w.name.clone(),
                };
                for t in &args.layer_types {
                    for tag in &dest_tags {
                        let to = destination(&args.url, &w.name, &t.tag(tag));
                        println!("would publish: {what} to {to}");
                    }
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        // Each layer type's images: the layout's NAME-TYPE under tags TAG-TYPE.
        for t in &args.layer_types {
            let mut images = Vec::new();
            for w in &wanted {
                let Ok(desc) = layout.resolve(&t.tag(&w.name)).await else {
                    // (without -f/-d: a name that has no image of this type)
                    continue;
                };
                images.push((w.name.clone(), desc.digest().to_string()));
            }
            let typed_tags: Vec<String> = dest_tags.iter().map(|tag| t.tag(tag)).collect();
            match oci_destination(&args.url) {
                Some(dir) => publish_to_layout(&layout, &images, &typed_tags, &dir, *t).await?,
                None => {
                    let mut opts = opts.clone();
                    if !matches!(t, farm_image::LayerType::Tar) {
                        opts.tags = typed_tags;
                    }
                    publish_images(layout.blobs(), &images, &opts).await?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

#[cfg(test)]
mod tests {
    use super::destination;

    #[test]
    fn destinations_as_stacker_names_them() {
        assert_eq!(
            destination("docker://reg.example.com/ns/", "app", "1.2"),
            "docker://reg.example.com/ns/app:1.2"
        );
        assert_eq!(
            destination("docker://reg:5000", "app", "latest"),
            "docker://reg:5000/app:latest"
        );
        assert_eq!(
            destination("oci:out/published", "app", "t1"),
            "oci:out/published:app_t1"
        );
    }
}
