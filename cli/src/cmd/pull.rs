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
        if tags.is_empty() {
            eprintln!("farm pull: build {} has no tagged images", args.id);
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Copy every tagged image of build `id` into the layout at `dir` and tag it; prints
/// `DIR:TAG  DIGEST` lines on stdout and returns the (tag, digest) pairs.
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
    for (tag, digest) in &out {
        println!("{}:{tag}  {digest}", dir.display());
    }
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
