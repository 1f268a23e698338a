//! `farm pull`: write the images of a finished build into a local OCI layout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use farm_coordinator::grpc::blobs::download;
use farm_image::oci::{Descriptor, DescriptorBuilder, ImageManifest, MediaType};
use farm_image::{Digest, OciLayout};
use farm_proto::v1::StatusRequest;

use crate::client::{Client, CoordinatorArg};
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
pub struct PullArgs {
    /// The build id (from `farm submit` or `farm status`)
    #[arg(value_name = "ID")]
    pub id: String,

    /// The OCI layout to write to (created if needed)
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,

    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

pub fn run(args: PullArgs) -> anyhow::Result<ExitCode> {
    let addr = args.coordinator.required("pull")?;
    block_on(async move {
        let mut client = Client::connect(&addr).await?;
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
pub fn print_tags(dir: &Path, tags: &[(String, String)], stderr: bool) {
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
pub async fn pull(
    client: &mut Client,
    id: &str,
    dir: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let status = client
        .farm
        .status(StatusRequest { id: id.to_string() })
        .await
        .map_err(|s| client.error("Status", id, s))?
        .into_inner();
    let wanted: Vec<(String, Digest)> = status
        .layers
        .iter()
        .filter(|l| l.tagged && !l.manifest_digest.is_empty())
        .map(|l| {
            Digest::parse(&l.manifest_digest)
                .map(|d| (l.name.clone(), d))
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
    use farm_proto::v1::{BuildState, BuildStatus, LayerState, LayerStatus};

    use super::*;
    use crate::fake::{Fake, Script};

    /// The digest of `s`.
    fn b(s: &str) -> farm_image::oci::Digest {
        Digest::of(s.as_bytes()).to_oci()
    }

    /// A manifest (and its config and layer) in the fake's store; its digest.
    async fn image(fake: &Fake, seed: &str) -> Digest {
        let config = format!("{{\"seed\":\"{seed}\"}}");
        let layer = format!("layer bytes of {seed}");
        fake.store.put(config.clone().into()).await.unwrap();
        fake.store.put(layer.clone().into()).await.unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": b(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": b(&layer).to_string(), "size": layer.len()}],
        });
        let body = serde_json::to_vec(&manifest).unwrap();
        fake.store.put(body.into()).await.unwrap().digest
    }

    #[tokio::test]
    async fn pull_writes_and_tags_every_tagged_image() {
        let fake = Fake::start(Script::default()).await;
        let app = image(&fake, "app").await;
        let base = image(&fake, "base").await;
        let layer = |name: &str, digest: &Digest, tagged: bool| LayerStatus {
            name: name.into(),
            state: LayerState::LayerBuilt as i32,
            manifest_digest: digest.to_string(),
            tagged,
            ..LayerStatus::default()
        };
        fake.script.lock().unwrap().status = BuildStatus {
            id: "b1".into(),
            state: BuildState::Succeeded as i32,
            layers: vec![layer("base", &base, false), layer("app", &app, true)],
            ..BuildStatus::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("oci");
        let mut c = Client::connect(&fake.addr).await.unwrap();
        let tags = pull(&mut c, "b1", &out).await.unwrap();
        assert_eq!(tags, [("app".to_string(), app.to_string())]);
        let layout = OciLayout::open(&out).await.unwrap();
        assert_eq!(layout.tags().await.unwrap(), ["app"]);
        let desc = layout.resolve("app").await.unwrap();
        assert_eq!(desc.digest().to_string(), app.to_string());
        let (_, manifest) = layout.manifest("app", None).await.unwrap();
        for d in std::iter::once(manifest.config().digest())
            .chain(manifest.layers().iter().map(|l| l.digest()))
        {
            assert!(
                layout
                    .blobs()
                    .exists(&Digest::try_from(d).unwrap())
                    .await
                    .unwrap()
            );
        }
        assert!(!layout.blobs().exists(&base).await.unwrap());

        // Again into the same layout: nothing changes; an unknown build is not found.
        assert_eq!(pull(&mut c, "b1", &out).await.unwrap(), tags);
        let e = pull(&mut c, "b2", &out).await.unwrap_err();
        assert_eq!(e.to_string(), format!("no build b2 on {}", fake.addr));

        // A manifest the store lacks is an error naming the image.
        let missing = Digest::of(b"gone");
        fake.script.lock().unwrap().status.layers = vec![layer("gone", &missing, true)];
        let e = pull(&mut c, "b1", &out).await.unwrap_err();
        assert!(format!("{e:#}").contains("image gone"), "{e:#}");
    }
}
