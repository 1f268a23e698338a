//! The coordinator's embedded SQLite databases: one way to open them, so every store
//! shares the same durability and concurrency settings (WAL, a busy timeout, several
//! processes on one state dir). The databases and the state dir are private to the
//! coordinator's user: they hold submitted environments and build logs.

use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// Open (creating if missing) the database at `path` and run `schema` on it.
/// Mode of the database files (`-wal` and `-shm` included).
pub const FILE_MODE: u32 = 0o600;
/// Mode of the state dir.
pub const DIR_MODE: u32 = 0o700;

/// Open (creating if missing) the database at `path` and run `schema` on it. The file,
/// its `-wal` and its `-shm` are mode 0600 (SQLite gives the latter two the database's
/// mode when it creates them).
pub async fn open(path: &Path, schema: &'static str) -> Result<SqlitePool, sqlx::Error> {
    // Held until the database is set up: see `setup_lock`.
    let _setup = setup_lock(path).await?;
    private_files(path)?;
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
    incremental_auto_vacuum(&pool).await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    private_files(path)?;
    Ok(pool)
}

/// Wait for, then hold, the exclusive right to set up databases in `path`'s directory.
/// SQLite's switch of a new database to WAL does not wait out the busy timeout: two
/// processes opening a new database at once (two `farm build`s sharing a fresh state
/// dir) could fail with "database is locked". The lock is a `flock` of the directory:
/// it does not touch SQLite's own (fcntl) locks on the files, and it is dropped with
/// the process.
/// A file system without `flock` (some network ones) gets no lock, with a warning:
/// only two processes creating the same database at the same moment can then fail.
async fn setup_lock(path: &Path) -> std::io::Result<Option<Flock<std::fs::File>>> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    tokio::task::spawn_blocking(move || {
        let handle = std::fs::File::open(&dir)?;
        match Flock::lock(handle, FlockArg::LockExclusive) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::ENOLCK | nix::errno::Errno::EOPNOTSUPP)) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "this file system cannot lock the state dir: databases are set up unlocked"
                );
                Ok(None)
            }
            Err((_, e)) => Err(std::io::Error::from(e)),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Make the database give freed pages back incrementally ([`incremental_vacuum`] after
/// deletions) instead of keeping them forever. A database made before that setting
/// needs one full `VACUUM` to switch (it rewrites the file: once, at the first start
/// with this version); a new one only needs the setting before its first table.
async fn incremental_auto_vacuum(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    const INCREMENTAL: i64 = 2;
    let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum").fetch_one(pool).await?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    // One connection for both: the mode must be set on the connection that vacuums.
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql("PRAGMA auto_vacuum = INCREMENTAL")
        .execute(&mut *conn)
        .await?;
    let (pages,): (i64,) = sqlx::query_as("PRAGMA page_count")
        .fetch_one(&mut *conn)
        .await?;
    if pages > 0 {
        tracing::info!("switching a database to incremental vacuuming (a one-time VACUUM)");
        sqlx::raw_sql("VACUUM").execute(&mut *conn).await?;
    }
    Ok(())
}

/// Give back up to `pages` free pages of the database to the filesystem (bounded, so
/// a large deletion is returned over several calls without a long write lock).
pub async fn incremental_vacuum(pool: &SqlitePool, pages: u32) -> Result<(), sqlx::Error> {
    // A number formatted in: nothing to inject.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PRAGMA incremental_vacuum({pages})"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Create `path` mode 0600 if it is missing; make it and its `-wal`/`-shm` 0600.
fn private_files(path: &Path) -> std::io::Result<()> {
    // An existing database is never opened here: closing any descriptor of it would
    // drop the fcntl locks this process's connections hold on it.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for file in [
        path.to_path_buf(),
        sibling(path, "-wal"),
        sibling(path, "-shm"),
    ] {
        match std::fs::metadata(&file) {
            Ok(m) if m.permissions().mode() & 0o7777 != FILE_MODE => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(FILE_MODE))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Create the state dir `dir` mode 0700, or tighten an existing one of this user's to
/// 0700 (saying so); one of another user's is left as it is, with a warning.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(dir)?;
            // The mode passed to mkdir is reduced by the umask; DIR_MODE is what we want.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
        }
        Err(e) => Err(e),
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o077 == 0 {
                return Ok(());
            }
            if m.uid() == nix::unistd::geteuid().as_raw() {
                tracing::warn!(
                    dir = %dir.display(),
                    "the state dir was mode {mode:04o}: tightening it to {DIR_MODE:04o}"
                );
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            } else {
                tracing::warn!(
                    dir = %dir.display(),
                    "the state dir is mode {mode:04o} and owned by uid {}, not this user: \
                     others may read the coordinator's state",
                    m.uid()
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two processes (here: threads with connections of their own) opening one new
    /// database at the same moment both open it. Without the setup lock about one
    /// attempt in fifteen failed with "database is locked".
    #[test]
    fn a_new_database_opened_by_two_at_once_opens_for_both() {
        let d = tempfile::tempdir().unwrap();
        let mut failures = Vec::new();
        for attempt in 0..100 {
            let path = d.path().join(format!("new-{attempt}.db"));
            let openers: Vec<_> = (0..2)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(open(&path, "CREATE TABLE IF NOT EXISTS t (v TEXT);"))
                            .map(|_| ())
                    })
                })
                .collect();
            for opener in openers {
                if let Err(e) = opener.join().unwrap() {
                    failures.push(format!("attempt {attempt}: {e}"));
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}
