//! The coordinator's embedded SQLite databases: one way to open them, so every store
//! shares the same durability and concurrency settings (WAL, a busy timeout, several
//! processes on one state dir).

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Open (creating if missing) the database at `path` and run `schema` on it.
pub async fn open(path: &Path, schema: &'static str) -> Result<SqlitePool, sqlx::Error> {
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL loses no committed transaction when the process is killed
        // (only when the machine loses power), and saves an fsync per commit.
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(connect)
        .await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    Ok(pool)
}
