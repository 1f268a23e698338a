//! Reading a build's events a page at a time (a long build's stream is never read whole).

use super::{Result, StateStore};

impl StateStore {
    /// At most `limit` of build `build`'s events with a sequence number above `after`,
    /// in order.
    pub async fn events_page(
        &self,
        build: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, json FROM events WHERE build_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(build)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|(s, j)| (s as u64, j)).collect())
    }
}
