//! Answers for `farm status` and `farm list` in a few queries, whatever the number of
//! builds and layers: a build's layers without their results (which status does not
//! show), and every listed build's layers and webhook origin at once (not three queries
//! per build).

use std::collections::HashMap;

use super::{LayerRow, LayerState, LayerTuple, Result, StateStore, WebhookOrigin};

/// The columns of a layer row, its result left out.
macro_rules! status_cols {
    () => {
        "build_id, idx, name, state, worker, error, attempts, NULL, cached, duration_ms, manifest_digest"
    };
}

impl StateStore {
    pub(super) fn layer_row(&self, r: LayerTuple) -> Result<LayerRow> {
        Ok(LayerRow {
            build_id: r.0,
            idx: r.1 as u32,
            name: r.2,
            state: self.word(&r.3)?,
            worker: r.4,
            error: r.5,
            attempts: r.6 as u32,
            result_json: r.7,
            cached: r.8,
            duration_ms: r.9.map(|d| d as u64),
            manifest_digest: r.10,
        })
    }

    /// A build's layers in plan order, without their results (`result_json` is `None`).
    pub async fn layer_statuses(&self, build: &str) -> Result<Vec<LayerRow>> {
        let rows: Vec<LayerTuple> = sqlx::query_as(concat!(
            "SELECT ",
            status_cols!(),
            " FROM layers WHERE build_id = ?1 ORDER BY idx"
        ))
        .bind(build)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter().map(|r| self.layer_row(r)).collect()
    }

    /// The layers (without results, in plan order) of every build, or of `owner`'s
    /// builds, by build.
    pub async fn layer_statuses_of_all(
        &self,
        owner: Option<&str>,
    ) -> Result<HashMap<String, Vec<LayerRow>>> {
        let rows: Vec<LayerTuple> = match owner {
            None => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    status_cols!(),
                    " FROM layers ORDER BY build_id, idx"
                ))
                .fetch_all(&self.pool)
                .await
            }
            Some(owner) => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    status_cols!(),
                    " FROM layers WHERE build_id IN
                       (SELECT build_id FROM build_owners WHERE owner = ?1)
                     ORDER BY build_id, idx"
                ))
                .bind(owner)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|e| self.err(e))?;
        let mut by_build: HashMap<String, Vec<LayerRow>> = HashMap::new();
        for r in rows {
            let row = self.layer_row(r)?;
            by_build.entry(row.build_id.clone()).or_default().push(row);
        }
        Ok(by_build)
    }

    /// How many layers of every build (or of `owner`'s builds) are in each state, by
    /// build: one grouped query, nothing per layer leaves the database.
    pub async fn layer_counts_of_all(
        &self,
        owner: Option<&str>,
    ) -> Result<HashMap<String, Vec<(LayerState, u32)>>> {
        let rows: Vec<(String, String, i64)> = match owner {
            None => {
                sqlx::query_as(
                    "SELECT build_id, state, COUNT(*) FROM layers GROUP BY build_id, state",
                )
                .fetch_all(&self.pool)
                .await
            }
            Some(owner) => {
                sqlx::query_as(
                    "SELECT build_id, state, COUNT(*) FROM layers WHERE build_id IN
                       (SELECT build_id FROM build_owners WHERE owner = ?1)
                     GROUP BY build_id, state",
                )
                .bind(owner)
                .fetch_all(&self.pool)
                .await
            }
        }
        .map_err(|e| self.err(e))?;
        let mut by_build: HashMap<String, Vec<(LayerState, u32)>> = HashMap::new();
        for (build, state, count) in rows {
            let state: LayerState = self.word(&state)?;
            by_build
                .entry(build)
                .or_default()
                .push((state, u32::try_from(count).unwrap_or(u32::MAX)));
        }
        Ok(by_build)
    }

    /// The webhook delivery behind every build that has one, by build.
    pub async fn webhook_origins(&self) -> Result<HashMap<String, WebhookOrigin>> {
        let rows: Vec<(String, String, String, String, String, String)> = sqlx::query_as(
            "SELECT build_id, repo, sha, build, git_ref, delivery FROM webhook_builds",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(id, repo_key, sha, build, git_ref, delivery)| {
                (
                    id,
                    WebhookOrigin {
                        repo_key,
                        sha,
                        build,
                        git_ref,
                        delivery,
                    },
                )
            })
            .collect())
    }
}
