//! `farm pull`: write the images of a finished build into a local OCI layout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use farm_client::blobs::download;
use farm_image::oci::{Descriptor, DescriptorBuilder, ImageManifest, MediaType};
use farm_image::{Digest, OciLayout};

use crate::client::{Client, CoordinatorArg, StatusInWords, connect};
use crate::local::block_on;

/// Write the images of a build into an OCI layout.
///
/// Every tagged layer (not build_only) that the build produced is copied from the
/// coordinator's blob store: its manifest, config and layers (blobs the layout already
/// holds are not downloaded again), and tagged with the layer's name. All tags move in
/// one atomic update of index.json. Prints `DIR:TAG  DIGEST` per image.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
farm pull 4f1c2a -o oci\n  \
farm status 4f1c2a --wait && farm pull 4f1c2a -o out\n  \
skopeo copy oci:oci:app docker://registry.example/app:1.0")]
pub(crate) struct PullArgs {
    /// The build id (from `farm submit` or `farm status`)
    #[arg(value_name = "ID")]
    pub id: String,

    /// The OCI layout to write to (created if needed)
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub(crate) fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("pull")?;
    block_on(async move {
        let mut client = connect(&addr).await?;
        let tags = pull(&mut client, &args.id, &args.output).await?;
        print_tags(&args.output, &tags, false);
        if tags.is_empty() {
            eprintln!("farm pull: build {} has no tagged images", args.id);
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// `DIR:TAG  DIGEST` per image, on stdout (on stderr when stdout is for JSON).
pub(crate) fn print_tags(dir: &Path, tags: &[(String, String)], stderr: bool) {
    for (tag, digest) in tags {
        if stderr {
            eprintln!("{}:{tag}  {digest}", dir.display());
        } else {
            println!("{}:{tag}  {digest}", dir.display());
        }
    }
}

/// Copy every tagged image of build `id` into the layout at `dir` and tag it; returns
/// the (tag, digest) pairs (see [`print_tags`]).
pub(crate) async fn pull(
    client: &mut Client,
    id: &str,
    dir: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    pull_as(client, id, dir, farm_image::LayerType::Tar).await
}

/// [`pull`], tagging each image as stacker tags a `layer_type` build's (`NAME-squashfs`).
pub(crate) async fn pull_as(
    client: &mut Client,
    id: &str,
    dir: &Path,
    layer_type: farm_image::LayerType,
) -> anyhow::Result<Vec<(String, String)>> {
    let status = client
        .status(id)
        .await
        .map_err(|s| client.error("Status", id, s))?;
    let wanted: Vec<(String, Digest)> = status
        .layers
        .iter()
        .filter(|l| l.tagged && !l.manifest_digest.is_empty())
        .map(|l| {
            Digest::parse(&l.manifest_digest)
                .map(|d| (layer_type.tag(&l.name), d))
                .with_context(|| format!("layer {}: manifest digest", l.name))
        })
        .collect::<anyhow::Result<_>>()?;
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let layout = if dir.join("index.json").exists() {
        OciLayout::open(dir).await
    } else {
        OciLayout::create(dir).await
    }
    .with_context(|| format!("opening the OCI layout {}", dir.display()))?;

    let mut tags = Vec::new();
    for (tag, digest) in wanted {
        let desc = fetch_image(client, &layout, &digest)
            .await
            .with_context(|| format!("image {tag} ({digest})"))?;
        tags.push((tag, desc));
    }
    layout
        .set_tags(&tags)
        .await
        .with_context(|| format!("tagging in {}", dir.display()))?;
    let out: Vec<(String, String)> = tags
        .into_iter()
        .map(|(tag, desc)| (tag, desc.digest().to_string()))
        .collect();
    Ok(out)
}

/// Download manifest `digest`, its config and its layers into `layout`; the manifest's
/// descriptor.
async fn fetch_image(
    client: &mut Client,
    layout: &OciLayout,
    digest: &Digest,
) -> anyhow::Result<Descriptor> {
    let addr = client.addr.clone();
    let info = download(&mut client.blobs, digest, layout.blobs())
        .await
        .with_context(|| format!("downloading the manifest from {addr}"))?;
    let body = layout.blobs().get_bytes(digest).await?;
    let manifest: ImageManifest = serde_json::from_slice(&body)
        .with_context(|| format!("{digest} is not an OCI image manifest"))?;
    let mut blobs = vec![manifest.config().digest().clone()];
    blobs.extend(manifest.layers().iter().map(|l| l.digest().clone()));
    for d in blobs {
        let d = Digest::try_from(&d)?;
        download(&mut client.blobs, &d, layout.blobs())
            .await
            .with_context(|| format!("downloading {d} from {addr}"))?;
    }
    let media_type = manifest
        .media_type()
        .clone()
        .unwrap_or(MediaType::ImageManifest);
    Ok(DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest.to_oci())
        .size(info.size)
        .build()?)
}

#[cfg(test)]
mod tests {
    use farm_coordinator::farm::Submission;
    use farm_proto::v1::{BuildState, LayerStatus};

    use super::*;
    use crate::client::watch;
    use crate::test_coordinator::ServedEmbedded;

    /// A real build (the coordinator's server, the embedded worker behind it) of a
    /// build_only base and two tagged images, pulled: only the tagged ones are written.
    #[tokio::test(flavor = "multi_thread")]
    async fn pull_writes_and_tags_every_tagged_image() {
        let dir = tempfile::tempdir().unwrap();
        let Some(served) = ServedEmbedded::start(dir.path()).await else {
            return;
        };
        let addr = served.addr.clone();

        let ctx = dir.path().join("ctx");
        for name in ["base", "app", "tool"] {
            std::fs::create_dir_all(ctx.join(name)).unwrap();
            std::fs::write(ctx.join(name).join("f"), format!("{name}\n")).unwrap();
        }
        let file = ctx.join("stacker.yaml");
        std::fs::write(
            &file,
            "base:\n  build_only: true\n  from:\n    type: scratch\n  imports:\n    - path: base\n      dest: /base\n\
             app:\n  from:\n    type: built\n    tag: base\n  imports:\n    - path: app\n      dest: /app\n\
             tool:\n  from:\n    type: scratch\n  imports:\n    - path: tool\n      dest: /tool\n",
        )
        .unwrap();
        let farm = served.embedded.farm.clone();
        let (id, _) = farm
            .submit(Submission::new([file.to_string_lossy()]))
            .await
            .unwrap();
        let mut c = Client::connect(&addr).await.unwrap();
        let last = watch(&mut c, &id, |_| {}).await.unwrap();
        assert_eq!(
            farm_client::final_state(&last),
            Some(BuildState::Succeeded as i32),
            "{last:?}"
        );
        let status = c.status(&id).await.unwrap();
        let layer =
            |name: &str| -> &LayerStatus { status.layers.iter().find(|l| l.name == name).unwrap() };
        assert!(!layer("base").tagged);

        let out = dir.path().join("oci");
        let mut tags = pull(&mut c, &id, &out).await.unwrap();
        tags.sort();
        let expected: Vec<(String, String)> = ["app", "tool"]
            .iter()
            .map(|n| (n.to_string(), layer(n).manifest_digest.clone()))
            .collect();
        assert_eq!(tags, expected);
        let oci = OciLayout::open(&out).await.unwrap();
        let mut names = oci.tags().await.unwrap();
        names.sort();
        assert_eq!(names, ["app", "tool"]);
        for (tag, digest) in &tags {
            let desc = oci.resolve(tag).await.unwrap();
            assert_eq!(&desc.digest().to_string(), digest);
            let (_, manifest) = oci.manifest(tag, None).await.unwrap();
            for d in std::iter::once(manifest.config().digest())
                .chain(manifest.layers().iter().map(|l| l.digest()))
            {
                assert!(
                    oci.blobs()
                        .exists(&Digest::try_from(d).unwrap())
                        .await
                        .unwrap()
                );
            }
        }
        // The build_only base is no image of its own in the layout.
        if let Ok(base) = Digest::parse(&layer("base").manifest_digest) {
            assert!(!oci.blobs().exists(&base).await.unwrap());
        }

        // Again into the same layout: nothing changes; an unknown build is not found.
        let mut again = pull(&mut c, &id, &out).await.unwrap();
        again.sort();
        assert_eq!(again, tags);
        let e = pull(&mut c, "no-such-build", &out).await.unwrap_err();
        assert_eq!(e.to_string(), format!("no build no-such-build on {addr}"));

        // A manifest the coordinator's store lacks is an error naming the image.
        let app = Digest::parse(&layer("app").manifest_digest).unwrap();
        let store = served.embedded.farm.blobs();
        let root = store.url().strip_prefix("file://").unwrap();
        std::fs::remove_file(Path::new(root).join(store.blob_path(&app).as_ref())).unwrap();
        assert!(!store.exists(&app).await.unwrap());
        let e = pull(&mut c, &id, &dir.path().join("fresh"))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("image app"), "{e:#}");

        served.stop().await;
    }
}
