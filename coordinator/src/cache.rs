//! Cache keys and the action cache.
//!
//! A layer's key covers everything that decides its result: the canonical definition
//! (`farm-stackerfile`), the base (the base layer's own key for `built`, the tarball's
//! digest for `tar`, the manifest digest for `oci`/`docker`), the content digest of every
//! import (with or without `dest`, `stacker://` included) and `overlay_dirs` entry,
//! `SOURCE_DATE_EPOCH`, the platform, the values of passthrough variables that reach the
//! build, the compression (it changes blob digests) and the layer type (`--layer-type`,
//! with or without verity: each type's result is cached on its own). stacker misses `dest` imports and
//! `stacker://` contents; farm does not.

use std::collections::BTreeMap;
use std::path::Path;

use farm_model::BuiltImage;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use sqlx::sqlite::SqlitePool;

/// Bump when the key's composition changes.
const KEY_VERSION: u32 = 1;

/// What a layer's base contributes to its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "id", rename_all = "lowercase")]
pub enum BaseKey {
    Scratch,
    /// The base layer's cache key.
    Built(String),
    /// The tarball's content digest.
    Tar(String),
    /// The manifest digest of a local OCI layout's image.
    Oci(String),
    /// The manifest digest a registry tag resolved to.
    Docker(String),
}

/// Everything that enters a layer's cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInputs {
    pub definition_digest: String,
    pub base: BaseKey,
    /// Content digests, in import order.
    pub imports: Vec<String>,
    pub overlay_dirs: Vec<String>,
    pub source_date_epoch: Option<String>,
    /// `os/arch`.
    pub platform: String,
    /// Passthrough variables that reach `run`, with their values.
    pub passthrough: BTreeMap<String, String>,
    pub compression: String,
    /// The layer type when it is not tar (`squashfs+verity`, ...): a tar layer's key
    /// is the one it had before layer types existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_format: Option<String>,
}

impl KeyInputs {
    /// `sha256:<hex>` of the inputs.
    pub fn key(&self) -> String {
        #[derive(Serialize)]
        struct Versioned<'a> {
            version: u32,
            inputs: &'a KeyInputs,
        }
        let json = serde_json::to_vec(&Versioned {
            version: KEY_VERSION,
            inputs: self,
        })
        .expect("strings and maps always serialise");
        format!("sha256:{}", hex::encode(Sha256::digest(&json)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("action cache {path}: {source}")]
    Db { path: String, source: sqlx::Error },
    /// A group-committed write failed (see `group_commit`).
    #[error("action cache {path}: {source}")]
    Write {
        path: String,
        source: rusqlite::Error,
    },
    #[error("action cache entry {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// The action cache: cache key -> built layer, in SQLite (restart loses nothing; several
/// processes may share it: WAL mode and a busy timeout).
#[derive(Debug, Clone)]
pub struct ActionCache {
    pool: SqlitePool,
    path: String,
    /// Entries and their use times: written in group commits.
    writer: crate::group_commit::GroupCommit,
}

impl ActionCache {
    pub async fn open(path: &Path) -> Result<Self, CacheError> {
        let shown = path.display().to_string();
        let db = |source| CacheError::Db {
            path: shown.clone(),
            source,
        };
        let pool = crate::db::open(
            path,
            "CREATE TABLE IF NOT EXISTS action_cache (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                created INTEGER NOT NULL,
                last_used INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS action_cache_lru ON action_cache (last_used, key);",
        )
        .await
        .map_err(db)?;
        let writer =
            crate::group_commit::GroupCommit::start(path).map_err(|source| CacheError::Write {
                path: shown.clone(),
                source,
            })?;
        Ok(ActionCache {
            pool,
            path: shown,
            writer,
        })
    }

    fn err(&self, source: sqlx::Error) -> CacheError {
        CacheError::Db {
            path: self.path.clone(),
            source,
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<BuiltImage>, CacheError> {
        Ok(self.get_many(&[key]).await?.remove(key))
    }

    /// The entries of `keys` that the cache has, in one read per 500 keys (a build's
    /// ready layers are looked up together: one read each was a round trip to the
    /// database's thread per layer). Their use is recorded in one write behind.
    pub async fn get_many(
        &self,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, BuiltImage>, CacheError> {
        let mut found = std::collections::HashMap::new();
        for chunk in keys.chunks(500) {
            let list = serde_json::to_string(chunk).expect("strings always serialise");
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT key, value FROM action_cache
                 WHERE key IN (SELECT value FROM json_each(?1))",
            )
            .bind(list)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
            for (key, value) in rows {
                let image = serde_json::from_str(&value).map_err(|source| CacheError::Corrupt {
                    key: key.clone(),
                    source,
                })?;
                found.insert(key, image);
            }
        }
        if !found.is_empty() {
            let used: Vec<&String> = found.keys().collect();
            let used = serde_json::to_string(&used).expect("strings always serialise");
            let when = now();
            // Written behind: nobody waits for it, and a coordinator killed before it
            // is written only loses the newer time. Entries used within the last minute
            // keep theirs: a collector evicting by days loses nothing, and a
            // resubmitted big build rewrites no pages.
            self.writer
                .submit("recording action cache entries' use", move |conn| {
                    conn.prepare_cached(
                        "UPDATE action_cache SET last_used = ?2
                         WHERE key IN (SELECT value FROM json_each(?1)) AND last_used < ?2 - 60",
                    )?
                    .execute(rusqlite::params![used, when])
                    .map(|_| ())
                });
        }
        Ok(found)
    }

    /// Store `value` under `key`. Queued when called (writes commit in the order they
    /// were queued); the future answers once it committed.
    pub fn put(
        &self,
        key: &str,
        value: &BuiltImage,
    ) -> impl Future<Output = Result<(), CacheError>> + Send + 'static + use<> {
        let json = serde_json::to_string(value).expect("plain data always serialises");
        let (key, path) = (key.to_string(), self.path.clone());
        let err = move |source| CacheError::Write {
            path: path.clone(),
            source,
        };
        let failed = err.clone();
        self.writer
            .write(
                move |e| failed(crate::group_commit::clone_error(e)),
                move |conn| {
                    conn.prepare_cached(
                        "INSERT INTO action_cache (key, value, created, last_used) VALUES (?1, ?2, ?3, ?3)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value, last_used = excluded.last_used",
                    )
                    .and_then(|mut q| q.execute(rusqlite::params![key, json, now()]))
                    .map_err(err)?;
                    Ok(())
                },
            )
    }

    pub async fn remove(&self, key: &str) -> Result<(), CacheError> {
        sqlx::query("DELETE FROM action_cache WHERE key = ?1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn entries(&self) -> Result<u64, CacheError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM action_cache")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Entries by last use, most recent first, `limit` at a time: the page after
    /// `after` (the last `(last_used, key)` of the previous page; `None` for the first).
    /// Each page is one short read: writers are never held up for long.
    pub async fn page_by_use(
        &self,
        after: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<CacheEntry>, CacheError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(String, String, i64)> = match after {
            None => {
                sqlx::query_as(
                    "SELECT key, value, last_used FROM action_cache
                 ORDER BY last_used DESC, key DESC LIMIT ?1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
            Some((used, key)) => {
                sqlx::query_as(
                    "SELECT key, value, last_used FROM action_cache
                 WHERE (last_used, key) < (?1, ?2)
                 ORDER BY last_used DESC, key DESC LIMIT ?3",
                )
                .bind(used)
                .bind(key)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(key, value, last_used)| CacheEntry {
                image: serde_json::from_str(&value).ok(),
                key,
                last_used,
            })
            .collect())
    }

    /// Remove the entries `keys` in one transaction (the caller bounds how many).
    pub async fn remove_many(&self, keys: &[String]) -> Result<(), CacheError> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        for key in keys {
            sqlx::query("DELETE FROM action_cache WHERE key = ?1")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Give back up to `pages` free pages of the database file to the filesystem.
    pub async fn vacuum(&self, pages: u32) -> Result<(), CacheError> {
        crate::db::incremental_vacuum(&self.pool, pages)
            .await
            .map_err(|e| self.err(e))
    }

    /// Record that entry `key` was last used at `last_used` (unix seconds; tests).
    pub async fn set_last_used(&self, key: &str, last_used: i64) -> Result<(), CacheError> {
        sqlx::query("UPDATE action_cache SET last_used = ?2 WHERE key = ?1")
            .bind(key)
            .bind(last_used)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Remove every entry (`farm clean`, `--no-cache` does not need this).
    pub async fn clear(&self) -> Result<(), CacheError> {
        sqlx::query("DELETE FROM action_cache")
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

/// An action cache entry as [`ActionCache::page_by_use`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub key: String,
    /// Unix seconds of its last hit (or of its creation).
    pub last_used: i64,
    /// `None` when the stored value is unreadable (such an entry is of no use).
    pub image: Option<BuiltImage>,
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KeyInputs {
        KeyInputs {
            definition_digest: "sha256:aa".into(),
            base: BaseKey::Scratch,
            imports: vec!["sha256:11".into()],
            overlay_dirs: vec![],
            source_date_epoch: None,
            platform: "linux/amd64".into(),
            passthrough: BTreeMap::new(),
            compression: "gzip".into(),
            layer_format: None,
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let k = inputs().key();
        assert!(k.starts_with("sha256:") && k.len() == 71);
        assert_eq!(inputs().key(), k);
        let mut variants = Vec::new();
        let mut i = inputs();
        i.definition_digest = "sha256:bb".into();
        variants.push(i);
        let mut i = inputs();
        i.base = BaseKey::Built("sha256:aa".into());
        variants.push(i);
        let mut i = inputs();
        i.base = BaseKey::Tar("sha256:aa".into());
        variants.push(i);
        let mut i = inputs();
        i.imports = vec!["sha256:12".into()];
        variants.push(i);
        let mut i = inputs();
        i.overlay_dirs = vec!["sha256:12".into()];
        variants.push(i);
        let mut i = inputs();
        i.source_date_epoch = Some("0".into());
        variants.push(i);
        let mut i = inputs();
        i.platform = "linux/arm64".into();
        variants.push(i);
        let mut i = inputs();
        i.passthrough.insert("TERM".into(), "xterm".into());
        variants.push(i);
        let mut i = inputs();
        i.compression = "zstd".into();
        variants.push(i);
        let mut i = inputs();
        i.layer_format = Some("squashfs+verity".into());
        variants.push(i);
        let mut i = inputs();
        i.layer_format = Some("squashfs".into());
        variants.push(i);
        let mut i = inputs();
        i.layer_format = Some("erofs+verity".into());
        variants.push(i);
        let keys: Vec<String> = variants.iter().map(KeyInputs::key).collect();
        for (n, key) in keys.iter().enumerate() {
            assert_ne!(key, &k, "variant {n}");
            assert!(!keys[..n].contains(key), "variant {n} collides");
        }
    }

    /// A tar layer's key is the one it had before layer types existed (caches stay
    /// warm across the upgrade).
    #[test]
    fn a_tar_key_is_unchanged_by_layer_types() {
        let json = serde_json::to_string(&inputs()).unwrap();
        assert!(!json.contains("layer_format"), "{json}");
    }

    #[tokio::test]
    async fn cache_round_trip_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("cache.db");
        let value = BuiltImage {
            config_digest: "sha256:cc".into(),
            config_size: 10,
            layers: vec![farm_model::LayerBlob {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: "sha256:dd".into(),
                size: 5,
                diff_id: "sha256:ee".into(),
                verity_root_hash: None,
            }],
            chain_id: farm_model::ChainId::empty(),
        };
        {
            let c = ActionCache::open(&path).await.unwrap();
            assert_eq!(c.get("k").await.unwrap(), None);
            c.put("k", &value).await.unwrap();
            c.put("k", &value).await.unwrap();
            assert_eq!(c.entries().await.unwrap(), 1);
        }
        let c = ActionCache::open(&path).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(value));
        c.remove("k").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    /// A batch lookup answers exactly the keys the cache has (over several chunks),
    /// and records their use.
    #[tokio::test]
    async fn many_keys_are_looked_up_together_and_their_use_recorded() {
        let d = tempfile::tempdir().unwrap();
        let c = ActionCache::open(&d.path().join("cache.db")).await.unwrap();
        let value = |n: u64| BuiltImage {
            config_digest: format!("sha256:{n:02x}"),
            config_size: n,
            layers: vec![],
            chain_id: farm_model::ChainId::empty(),
        };
        let keys: Vec<String> = (0..1200).map(|n| format!("k{n}")).collect();
        for (n, key) in keys.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
            c.put(key, &value(n as u64)).await.unwrap();
        }
        sqlx::query("UPDATE action_cache SET last_used = 1")
            .execute(&c.pool)
            .await
            .unwrap();
        let mut asked: Vec<&str> = keys.iter().map(String::as_str).collect();
        asked.push("k0"); // asked twice
        asked.push("missing");
        let found = c.get_many(&asked).await.unwrap();
        assert_eq!(found.len(), 400);
        for (n, key) in keys.iter().enumerate() {
            assert_eq!(
                found.get(key),
                (n % 3 == 0).then(|| value(n as u64)).as_ref(),
                "{key}"
            );
        }
        // The use is written behind: wait for it.
        for _ in 0..100 {
            let (stale,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM action_cache WHERE last_used = 1")
                    .fetch_one(&c.pool)
                    .await
                    .unwrap();
            if stale == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the entries' use was not recorded");
    }
}
