use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use farm_image::{BlobStore, Digest};
use farm_model::{BuiltImage, ChainId, LayerBlob};
use proptest::prelude::*;

use super::{GcPolicy, GcReport, collect};
use crate::cache::ActionCache;
use crate::farm::{ContextFile, Submission};
use crate::state::{BuildState, LayerResult, StateStore};

struct World {
    _dir: tempfile::TempDir,
    /// The collector's store.
    blobs: BlobStore,
    /// The test's own (its looks are not uses the collector sees).
    look: BlobStore,
    state: StateStore,
    cache: ActionCache,
    digests: Vec<Digest>,
    sizes: Vec<u64>,
}

impl World {
    async fn new(blobs: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(&dir.path().join("blobs")).unwrap();
        let state = StateStore::open(&dir.path().join("state.db"))
            .await
            .unwrap();
        let cache = ActionCache::open(&dir.path().join("cache.db"))
            .await
            .unwrap();
        let mut digests = Vec::new();
        let mut sizes = Vec::new();
        for i in 0..blobs {
            let data = format!("blob {i} {}", "x".repeat(i % 7));
            let info = store.put(Bytes::from(data)).await.unwrap();
            digests.push(info.digest);
            sizes.push(info.size);
        }
        World {
            // Another instance: what the test wrote is not "used lately" by the collector.
            blobs: BlobStore::local(&dir.path().join("blobs")).unwrap(),
            _dir: dir,
            look: store,
            state,
            cache,
            digests,
            sizes,
        }
    }

    fn age(&self, i: usize, secs: u64) {
        let file = std::path::PathBuf::from(self.blobs.url().trim_start_matches("file://"))
            .join(self.digests[i].blob_path());
        std::fs::File::open(file)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    /// An image of blob `config` and blobs `layers`.
    fn image(&self, blobs: &[usize]) -> BuiltImage {
        let (config, layers) = blobs.split_first().expect("an image has a config");
        BuiltImage {
            config_digest: self.digests[*config].to_string(),
            config_size: self.sizes[*config],
            layers: layers
                .iter()
                .map(|&i| LayerBlob {
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    digest: self.digests[i].to_string(),
                    size: self.sizes[i],
                    verity_root_hash: None,
                    diff_id: self.digests[i].to_string(),
                })
                .collect(),
            chain_id: ChainId::empty(),
        }
    }

    async fn exists(&self, i: usize) -> bool {
        self.look.exists(&self.digests[i]).await.unwrap()
    }
}

/// A random farm: blobs (old or young), cache entries (stale or fresh), builds
/// (finished or not) whose layers recorded results and manifests, and uploaded contexts.
#[derive(Debug, Clone)]
struct Graph {
    old: Vec<bool>,
    /// Blob indexes (config first) and whether the entry is past its maximum age.
    cache: Vec<(Vec<usize>, bool)>,
    builds: Vec<Build>,
    /// `GcPolicy::keep_builds`.
    keep_builds: Option<usize>,
}

#[derive(Debug, Clone)]
struct Build {
    finished: bool,
    /// Per layer: its result (blob indexes, config first) and its manifest, if any.
    layers: Vec<(Option<Vec<usize>>, Option<usize>)>,
    context: Vec<usize>,
}

fn graphs() -> impl Strategy<Value = Graph> {
    (1usize..24).prop_flat_map(|n| {
        let image = prop::collection::vec(0..n, 1..4);
        let layer = (prop::option::of(image.clone()), prop::option::of(0..n));
        let build = (
            any::<bool>(),
            prop::collection::vec(layer, 0..3),
            prop::collection::vec(0..n, 0..3),
        )
            .prop_map(|(finished, layers, context)| Build {
                finished,
                layers,
                context,
            });
        (
            prop::collection::vec(any::<bool>(), n),
            prop::collection::vec((image, any::<bool>()), 0..6),
            prop::collection::vec(build, 0..4),
            prop::option::of(0usize..3),
        )
            .prop_map(|(old, cache, builds, keep_builds)| Graph {
                old,
                cache,
                builds,
                keep_builds,
            })
    })
}

impl Graph {
    fn referenced(&self) -> BTreeSet<usize> {
        let mut r = BTreeSet::new();
        for (blobs, stale) in &self.cache {
            if !stale {
                r.extend(blobs.iter().copied());
            }
        }
        let finished = self.builds.iter().filter(|b| b.finished).count();
        let forgotten = finished.saturating_sub(self.keep_builds.unwrap_or(usize::MAX));
        let mut nth_finished = 0;
        for b in &self.builds {
            if b.finished {
                nth_finished += 1;
                // The oldest finished builds are forgotten.
                if nth_finished <= forgotten {
                    continue;
                }
            }
            for (result, manifest) in &b.layers {
                r.extend(result.iter().flatten().copied());
                r.extend(manifest.iter().copied());
            }
            if !b.finished {
                r.extend(b.context.iter().copied());
            }
        }
        r
    }
}

async fn populate(g: &Graph) -> World {
    let w = World::new(g.old.len()).await;
    for (i, old) in g.old.iter().enumerate() {
        if *old {
            w.age(i, 2 * 3600);
        }
    }
    let now = crate::cache::now();
    for (n, (blobs, stale)) in g.cache.iter().enumerate() {
        let key = format!("key-{n}");
        w.cache.put(&key, &w.image(blobs)).await.unwrap();
        if *stale {
            w.cache
                .set_last_used(&key, now - 31 * 24 * 3600)
                .await
                .unwrap();
        }
    }
    for b in &g.builds {
        let mut spec = Submission::new(["stacker.yaml"]);
        spec.context = b
            .context
            .iter()
            .enumerate()
            .map(|(n, &i)| ContextFile {
                path: format!("f{n}"),
                digest: w.digests[i].to_string(),
                mode: 0o644,
                symlink_target: String::new(),
            })
            .collect();
        let names: Vec<String> = (0..b.layers.len()).map(|n| format!("l{n}")).collect();
        let id = w
            .state
            .create_build(&serde_json::to_string(&spec).unwrap(), &names)
            .await
            .unwrap();
        let results: Vec<LayerResult> = b
            .layers
            .iter()
            .enumerate()
            .filter_map(|(idx, (result, manifest))| {
                // The state records a manifest only with a result.
                let result = result.as_ref()?;
                Some(LayerResult {
                    idx: idx as u32,
                    result_json: serde_json::to_string(&w.image(result)).unwrap(),
                    cached: false,
                    duration_ms: 1,
                    manifest_digest: manifest.map(|m| w.digests[m].to_string()),
                })
            })
            .collect();
        w.state.layer_results(&id, results).await.unwrap();
        // Distinct creation times: the newest builds are the ones kept.
        tokio::time::sleep(Duration::from_millis(3)).await;
        if b.finished {
            w.state
                .set_build_state(&id, BuildState::Succeeded)
                .await
                .unwrap();
        }
    }
    w
}

fn policy(g: &Graph) -> GcPolicy {
    GcPolicy {
        batch: 3,
        keep_builds: g.keep_builds,
        ..GcPolicy::default()
    }
}

async fn check(g: Graph) {
    // Manifests recorded without a result are not possible: drop them from the model.
    let mut g = g;
    for b in &mut g.builds {
        for (result, manifest) in &mut b.layers {
            if result.is_none() {
                *manifest = None;
            }
        }
    }
    let w = populate(&g).await;
    let referenced = g.referenced();
    let doomed: BTreeSet<usize> = (0..g.old.len())
        .filter(|i| g.old[*i] && !referenced.contains(i))
        .collect();
    let doomed_bytes: u64 = doomed.iter().map(|&i| w.sizes[i]).sum();
    let stale = g.cache.iter().filter(|(_, s)| *s).count() as u64;

    let dry = collect(&w.state, &w.cache, &w.blobs, &policy(&g), true)
        .await
        .unwrap();
    assert_eq!(dry.blobs_removed, doomed.len() as u64, "{g:?}\n{dry:?}");
    assert_eq!(dry.bytes_removed, doomed_bytes);
    assert_eq!(dry.cache_evicted, stale);
    for i in 0..g.old.len() {
        assert!(w.exists(i).await, "a dry run removed blob {i}");
    }
    assert_eq!(w.cache.entries().await.unwrap(), g.cache.len() as u64);

    let wet = collect(&w.state, &w.cache, &w.blobs, &policy(&g), false)
        .await
        .unwrap();
    assert_eq!(
        GcReport {
            dry_run: true,
            ..wet.clone()
        },
        dry,
        "the dry run said what the collection did"
    );
    for i in 0..g.old.len() {
        assert_eq!(
            w.exists(i).await,
            !doomed.contains(&i),
            "blob {i} (old {}, referenced {}) in {g:?}",
            g.old[i],
            referenced.contains(&i)
        );
    }
    assert_eq!(
        w.cache.entries().await.unwrap(),
        g.cache.len() as u64 - stale
    );
    let again = collect(&w.state, &w.cache, &w.blobs, &policy(&g), false)
        .await
        .unwrap();
    assert_eq!((again.blobs_removed, again.cache_evicted), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn gc_removes_exactly_the_unreferenced_old_blobs(g in graphs()) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check(g));
    }
}

#[tokio::test]
async fn the_cache_keeps_its_most_recently_used_entries_within_size_and_age() {
    let w = World::new(8).await;
    let now = crate::cache::now();
    // Newest first: a (blobs 0,1), b (1,2: shares 1), c (3,4), d (5) and an old e (6,7).
    let entries: [(&str, &[usize], i64); 5] = [
        ("a", &[0, 1], now),
        ("b", &[1, 2], now - 10),
        ("c", &[3, 4], now - 20),
        ("d", &[5], now - 30),
        ("e", &[6, 7], now - 40 * 24 * 3600),
    ];
    for (key, blobs, used) in entries {
        w.cache.put(key, &w.image(blobs)).await.unwrap();
        w.cache.set_last_used(key, used).await.unwrap();
    }
    let fits: u64 = [0, 1, 2].iter().map(|&i| w.sizes[i]).sum();
    let policy = GcPolicy {
        // a and b fit (their shared blob counted once); c does not, nor d after it.
        cache_max_size: Some(fits + w.sizes[3]),
        batch: 2,
        ..GcPolicy::default()
    };
    let r = collect(&w.state, &w.cache, &w.blobs, &policy, false)
        .await
        .unwrap();
    assert_eq!((r.cache_kept, r.cache_evicted, r.cache_bytes), (2, 3, fits));
    for (key, _, _) in &entries[..2] {
        assert!(w.cache.get(key).await.unwrap().is_some(), "{key}");
    }
    for (key, _, _) in &entries[2..] {
        assert!(w.cache.get(key).await.unwrap().is_none(), "{key}");
    }
    // Young blobs stay even unreferenced.
    for i in 0..8 {
        assert!(w.exists(i).await);
    }
    // With no size limit only the age counts.
    let w = World::new(8).await;
    for (key, blobs, used) in entries {
        w.cache.put(key, &w.image(blobs)).await.unwrap();
        w.cache.set_last_used(key, used).await.unwrap();
    }
    let r = collect(&w.state, &w.cache, &w.blobs, &GcPolicy::default(), false)
        .await
        .unwrap();
    assert_eq!((r.cache_kept, r.cache_evicted), (4, 1));
    assert!(w.cache.get("e").await.unwrap().is_none());
}

/// Blobs written while a collection runs survive it, whether the writer shares the
/// collector's store (a build in the coordinator) or is another process's (a worker, a
/// `farm submit` beside `farm gc`): new blobs are young, and an old blob written again
/// is young again (or was used lately), and its age is looked up again before a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_written_during_a_collection_survive_it() {
    for shared in [true, false] {
        let n = 300;
        let w = World::new(n).await;
        for i in 0..n {
            w.age(i, 2 * 3600);
        }
        let writer = if shared {
            w.blobs.clone()
        } else {
            BlobStore::local(&std::path::PathBuf::from(
                w.blobs.url().trim_start_matches("file://"),
            ))
            .unwrap()
        };
        let policy = GcPolicy {
            batch: 1,
            ..GcPolicy::default()
        };
        let gc = {
            let (state, cache, blobs) = (w.state.clone(), w.cache.clone(), w.blobs.clone());
            tokio::spawn(async move { collect(&state, &cache, &blobs, &policy, false).await })
        };
        // Write every other old blob again, and new ones, while it runs.
        let mut written = Vec::new();
        for i in (0..n).step_by(2) {
            let data = format!("blob {i} {}", "x".repeat(i % 7));
            written.push(writer.put(Bytes::from(data)).await.unwrap().digest);
            written.push(
                writer
                    .put(Bytes::from(format!("new {i}")))
                    .await
                    .unwrap()
                    .digest,
            );
            tokio::task::yield_now().await;
        }
        let report = gc.await.unwrap().unwrap();
        for d in &written {
            assert!(
                w.look.exists(d).await.unwrap(),
                "{d} was written during the collection and is gone (shared store: {shared}); {report:?}"
            );
        }
        assert!(
            report.blobs_removed > 0,
            "nothing was collected: {report:?}"
        );
    }
}

/// A database made before incremental vacuuming is switched once at open, keeps its
/// rows, and gives freed pages back after deletions.
#[tokio::test]
async fn an_old_database_switches_to_incremental_vacuum_and_gives_pages_back() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let old = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE t (v TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO t SELECT printf('%.500d', i) FROM n;",
        )
        .execute(&old)
        .await
        .unwrap();
        let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum")
            .fetch_one(&old)
            .await
            .unwrap();
        assert_eq!(mode, 0);
        old.close().await;
    }
    let pool = crate::db::open(&path, "CREATE TABLE IF NOT EXISTS t (v TEXT)")
        .await
        .unwrap();
    let one = |q: &'static str| {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(q).fetch_one(&pool).await.unwrap();
            n
        }
    };
    assert_eq!(one("PRAGMA auto_vacuum").await, 2);
    assert_eq!(one("SELECT COUNT(*) FROM t").await, 2000);
    sqlx::query("DELETE FROM t").execute(&pool).await.unwrap();
    let free = one("PRAGMA freelist_count").await;
    assert!(free > 100, "{free}");
    crate::db::incremental_vacuum(&pool, 50).await.unwrap();
    assert_eq!(one("PRAGMA freelist_count").await, free - 50);
    crate::db::incremental_vacuum(&pool, 1_000_000)
        .await
        .unwrap();
    assert_eq!(one("PRAGMA freelist_count").await, 0);
}

/// A coordinator collects on its own every `--gc-interval`, and its metrics say what
/// went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_farm_collects_periodically_and_counts_it() {
    use crate::farm::{Farm, FarmConfig};
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::local(&dir.path().join("blobs")).unwrap();
    let old = blobs.put(Bytes::from_static(b"old garbage")).await.unwrap();
    let file = dir.path().join("blobs").join(old.digest.blob_path());
    std::fs::File::open(&file)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    let farm = Farm::start(FarmConfig {
        gc: super::GcConfig {
            interval: Some(Duration::from_millis(50)),
            policy: GcPolicy::default(),
        },
        // Another store instance: the put above is not a use the farm saw.
        ..FarmConfig::new(
            dir.path().join("state"),
            BlobStore::local(&dir.path().join("blobs")).unwrap(),
        )
    })
    .await
    .unwrap();
    let mut gone = false;
    for _ in 0..400 {
        if !file.exists() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        gone,
        "the periodic collection did not remove an old unreferenced blob"
    );
    // The counters follow the collection that removed it (give it time to record).
    let mut text = String::new();
    for _ in 0..200 {
        text = farm.metrics().render();
        if text.contains("farm_gc_blobs_removed_total 1\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(text.contains("farm_gc_blobs_removed_total 1\n"), "{text}");
    assert!(
        text.contains(&format!("farm_gc_bytes_removed_total {}\n", old.size)),
        "{text}"
    );
    assert!(!text.contains("farm_gc_runs_total 0\n"), "{text}");
    assert!(text.contains("farm_gc_failures_total 0\n"), "{text}");
}
