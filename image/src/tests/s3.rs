//! The blob store on S3, against a moto_server started by each test.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::moto::Moto;
use crate::{BlobStore, Digest, Error, PART_SIZE, StoreOptions};

const BUCKET: &str = "farm-blobs";

fn data(n: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect::<Vec<_>>(),
    )
}

/// Options independent of the machine's environment, with moto's dummy credentials.
fn options() -> StoreOptions {
    StoreOptions {
        use_env: false,
        ..StoreOptions::default()
    }
    .with_config("aws_access_key_id", "testing")
    .with_config("aws_secret_access_key", "testing")
}

fn url(moto: &Moto, query: &str) -> String {
    format!(
        "s3://{BUCKET}/farm/cache?endpoint={}&region=us-east-1{query}",
        moto.endpoint()
    )
}

/// A moto server with the bucket and a store on it, or `None` to skip.
fn setup(test: &str) -> Option<(Moto, BlobStore)> {
    let moto = Moto::start(test)?;
    moto.create_bucket(BUCKET);
    let store = BlobStore::from_url_with(&url(&moto, ""), &options()).unwrap();
    Some((moto, store))
}

/// Everything under the store's prefix.
async fn listing(store: &BlobStore) -> Vec<String> {
    let prefix = object_store::path::Path::from("farm/cache");
    store
        .object_store()
        .list(Some(&prefix))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_put_get_exists_and_create_only() {
    let Some((_moto, store)) = setup("s3_put_get_exists_and_create_only") else {
        return;
    };
    let d = data(1000, 1);
    let digest = Digest::of(&d);
    assert!(!store.exists(&digest).await.unwrap());
    assert!(matches!(
        store.get(&digest).await,
        Err(Error::BlobNotFound(_))
    ));
    let info = store.put(d.clone()).await.unwrap();
    assert_eq!(info.digest, digest);
    assert_eq!(info.size, 1000);
    assert!(store.exists(&digest).await.unwrap());
    assert_eq!(store.size(&digest).await.unwrap(), Some(1000));
    assert_eq!(store.get_bytes(&digest).await.unwrap(), d);
    // The blob is where an OCI layout keeps it, under the URL's prefix.
    assert_eq!(
        listing(&store).await,
        vec![format!("farm/cache/{}", digest.blob_path())]
    );
    // A second put of the same content is success, not an error.
    assert_eq!(store.put(d.clone()).await.unwrap(), info);
    assert_eq!(store.put_verified(&digest, d.clone()).await.unwrap(), info);

    // Create-only: plant other bytes under a digest's name, then put the real content.
    // The planted object stays (the put did not overwrite it), and reading it fails
    // verification.
    let real = data(5000, 2);
    let planted = Digest::of(&real);
    store
        .object_store()
        .put(
            &store.blob_path(&planted),
            Bytes::from_static(b"evil").into(),
        )
        .await
        .unwrap();
    store.put(real.clone()).await.unwrap();
    let raw = store
        .object_store()
        .get(&store.blob_path(&planted))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&raw[..], b"evil", "a create-only put overwrote a blob");
    let err = store.get_bytes(&planted).await.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_large_streaming_blob_and_wrong_digest() {
    let Some((_moto, store)) = setup("s3_large_streaming_blob_and_wrong_digest") else {
        return;
    };
    let size = 20 << 20;
    assert!(size > 2 * PART_SIZE, "must be a multipart upload");
    let d = data(size, 3);
    let digest = Digest::of(&d);

    // A wrong expected digest is refused and leaves nothing behind.
    let mut w = store.writer();
    for chunk in d.chunks(1 << 20) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let wrong = Digest::of(b"something else");
    match w.finish_expecting(&wrong).await {
        Err(Error::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, digest);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.exists(&digest).await.unwrap());
    assert!(!store.exists(&wrong).await.unwrap());
    assert_eq!(listing(&store).await, Vec::<String>::new());

    // The right one is stored, streaming (multipart), and named only at the end.
    let start = Instant::now();
    let mut w = store.writer();
    for chunk in d.chunks(1 << 20) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let info = w.finish_expecting(&digest).await.unwrap();
    let put_secs = start.elapsed().as_secs_f64();
    assert_eq!(info.digest, digest);
    assert_eq!(info.size, size as u64);
    assert_eq!(store.size(&digest).await.unwrap(), Some(size as u64));
    // No staging debris.
    assert_eq!(
        listing(&store).await,
        vec![format!("farm/cache/{}", digest.blob_path())]
    );

    // Read back, streaming and verified.
    let start = Instant::now();
    let mut s = store.get(&digest).await.unwrap();
    let mut got = Vec::with_capacity(size);
    while let Some(chunk) = s.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    let get_secs = start.elapsed().as_secs_f64();
    assert!(got == d[..], "content differs");
    let mb = size as f64 / 1e6;
    eprintln!(
        "S3 (moto) 20 MB: multipart put {:.0} MB/s, get {:.0} MB/s",
        mb / put_secs,
        mb / get_secs
    );

    // Writing it again is success and the blob stays as it is.
    let mut w = store.writer();
    w.write(d.clone()).await.unwrap();
    assert_eq!(w.finish().await.unwrap(), info);
    assert_eq!(listing(&store).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_corrupted_object_fails_verification() {
    let Some((_moto, store)) = setup("s3_corrupted_object_fails_verification") else {
        return;
    };
    for size in [3000, 2 * PART_SIZE + 17] {
        let d = data(size, 4);
        let mut w = store.writer();
        w.write(d.clone()).await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(store.get_bytes(&info.digest).await.unwrap(), d);
        // Flip one byte of the stored object behind the store's back.
        let mut bad = d.to_vec();
        bad[size / 2] ^= 0x5a;
        let corrupt = || async {
            store
                .object_store()
                .put(
                    &store.blob_path(&info.digest),
                    Bytes::from(bad.clone()).into(),
                )
                .await
                .unwrap();
        };
        corrupt().await;
        let err = store.get_bytes(&info.digest).await.unwrap_err();
        match &err {
            Error::DigestMismatch { expected, actual } => {
                assert_eq!(expected, &info.digest);
                assert_ne!(actual, &info.digest);
            }
            other => panic!("expected a digest mismatch, got {other}"),
        }
        assert!(err.to_string().contains(&info.digest.to_string()), "{err}");
        // The corrupt object is removed, so that an upload can heal it.
        assert!(!store.exists(&info.digest).await.unwrap());
        // The blocking reader reports it as InvalidData.
        corrupt().await;
        let mut r = store.reader(&info.digest).await.unwrap();
        let res = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v)
        })
        .await
        .unwrap();
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // copy_to refuses to spread it.
        corrupt().await;
        let local = BlobStore::in_memory();
        assert!(store.copy_to(&info.digest, &local).await.is_err());
        assert!(!local.exists(&info.digest).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_copy_to_and_from_a_local_store() {
    let Some((_moto, s3)) = setup("s3_copy_to_and_from_a_local_store") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let local = BlobStore::local(&dir.path().join("a")).unwrap();
    let back = BlobStore::local(&dir.path().join("b")).unwrap();
    let small = data(100, 5);
    let large = data(PART_SIZE + 4321, 6);
    let file = dir.path().join("large");
    std::fs::write(&file, &large).unwrap();
    let s = local.put(small.clone()).await.unwrap();
    let l = local.put_file(&file).await.unwrap();
    for info in [&s, &l] {
        local.copy_to(&info.digest, &s3).await.unwrap();
        // Again: already there, nothing to do.
        local.copy_to(&info.digest, &s3).await.unwrap();
        s3.copy_to(&info.digest, &back).await.unwrap();
    }
    assert_eq!(back.get_bytes(&s.digest).await.unwrap(), small);
    assert_eq!(back.get_bytes(&l.digest).await.unwrap(), large);
    // put_file straight to S3 as well.
    assert_eq!(s3.put_file(&file).await.unwrap(), l);
    assert_eq!(listing(&s3).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_stopped_server_fails_in_bounded_time_naming_the_store() {
    let Some((mut moto, _)) = setup("s3_stopped_server_fails_in_bounded_time_naming_the_store")
    else {
        return;
    };
    // Tight retry bounds from the URL; they must be what is in effect.
    let url = url(&moto, "&max_retries=3&retry_timeout=4s");
    let store = BlobStore::from_url_with(&url, &options()).unwrap();
    let d = data(2000, 7);
    let info = store.put(d.clone()).await.unwrap();
    moto.stop();

    let start = Instant::now();
    let err = store.get_bytes(&info.digest).await.unwrap_err();
    let took = start.elapsed();
    let msg = err.to_string();
    eprintln!("after {took:?}: {msg}");
    assert!(matches!(err, Error::Store { .. }), "{msg}");
    assert!(msg.contains(&url), "error does not name the store: {msg}");
    assert!(
        msg.contains(&info.digest.to_string()),
        "error does not name the blob: {msg}"
    );
    assert!(
        msg.contains("3 retries"),
        "retries not as configured: {msg}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let start = Instant::now();
    let other = data(3000, 8);
    let err = store.put(other.clone()).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&url) && msg.contains(&Digest::of(&other).to_string()),
        "{msg}"
    );
    let err = store.exists(&info.digest).await.unwrap_err().to_string();
    assert!(
        err.contains(&url) && err.contains(&info.digest.to_string()),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

/// `from_url` with nothing but the usual AWS environment variables: run in a child
/// process of this test binary, since a test cannot safely change its own environment.
#[test]
fn s3_from_aws_environment_variables() {
    let Some(moto) = Moto::start("s3_from_aws_environment_variables") else {
        return;
    };
    moto.create_bucket(BUCKET);
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "tests::s3::env_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FARM_S3_CHILD_URL", format!("s3://{BUCKET}/from-env"))
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_ENDPOINT", "https://must-not-be-used.invalid")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_ALLOW_HTTP")
        .env_remove("AWS_ENDPOINT_URL_S3")
        .env_remove("AWS_SESSION_TOKEN")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("env_child ok"), "child did not run:\n{text}");
}

#[tokio::test]
#[ignore = "run by s3_from_aws_environment_variables with the environment it needs"]
async fn env_child() {
    let url = std::env::var("FARM_S3_CHILD_URL").expect("run by its parent test");
    let store = BlobStore::from_url(&url).unwrap();
    let d = data(777, 9);
    let info = store.put(d.clone()).await.unwrap();
    assert_eq!(store.get_bytes(&info.digest).await.unwrap(), d);
    eprintln!("env_child ok");
}

/// What a garbage collector needs works on S3: the listing (blobs only, with sizes and
/// ages), age-checked deletes, and the sweep of stale staging objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs_are_listed_and_old_ones_deleted() {
    let Some((moto, store)) = setup("s3_blobs_are_listed_and_old_ones_deleted") else {
        return;
    };
    let mut want = Vec::new();
    for n in 0..3u8 {
        let info = store.put(data(100 + n as usize, n)).await.unwrap();
        want.push((info.digest, info.size));
    }
    want.sort();
    // Not blobs: a stray object beside them, and a staging object.
    for (path, bytes) in [
        ("farm/cache/blobs/sha256/not-a-digest", &b"stray"[..]),
        ("farm/cache/.farm-staging/abandoned", &b"half an upload"[..]),
    ] {
        store
            .object_store()
            .put(
                &object_store::path::Path::from(path),
                Bytes::copy_from_slice(bytes).into(),
            )
            .await
            .unwrap();
    }
    let mut listed: Vec<(Digest, u64)> = store
        .list_blobs()
        .map(|b| {
            let b = b.unwrap();
            assert!(b.modified <= std::time::SystemTime::now() + Duration::from_secs(60));
            (b.digest, b.size)
        })
        .collect()
        .await;
    listed.sort();
    assert_eq!(listed, want);

    // Another process's store (no uses of its own): only what is older than the cutoff.
    let other = BlobStore::from_url_with(&url(&moto, ""), &options()).unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(3600);
    let future = std::time::SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(other.delete_if_older(&want[0].0, past).await.unwrap(), None);
    assert_eq!(
        other.delete_if_older(&want[0].0, future).await.unwrap(),
        Some(want[0].1)
    );
    assert!(!store.exists(&want[0].0).await.unwrap());
    assert_eq!(
        other.delete_if_older(&want[0].0, future).await.unwrap(),
        None
    );
    // The store that used a blob lately spares it.
    store
        .recent()
        .used_at(&want[1].0, future + Duration::from_secs(1));
    assert_eq!(
        store.delete_if_older(&want[1].0, future).await.unwrap(),
        None
    );
    assert!(store.exists(&want[1].0).await.unwrap());

    let swept = store.sweep_staging(future, false).await.unwrap();
    assert_eq!((swept.objects, swept.bytes), (1, 14));
    assert!(
        !listing(&store)
            .await
            .iter()
            .any(|p| p.contains(".farm-staging")),
        "{:?}",
        listing(&store).await
    );
}
