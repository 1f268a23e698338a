//! Tests of `farm_worker::pool` on real filesystems.
//!
//! As root each btrfs test makes its own loopback btrfs (`truncate`, `mkfs.btrfs`,
//! `mount -o loop,user_subvol_rm_allowed`) and removes it afterwards; the copy-backend
//! tests mount a tmpfs. Not as root, the btrfs tests use `FARM_TEST_BTRFS_DIR` (a
//! directory on btrfs mounted with user_subvol_rm_allowed, owned by the user) and are
//! skipped with a printed reason without it, or fail when `CI=true`.
//!
//! The unprivileged tests re-execute this binary through `setpriv` as user `farmpool`
//! (created with `useradd` if missing), filtered to an `#[ignore]`d child test, with the
//! pool directory in `FARM_POOL_CHILD_DIR`.
//!
//! Timings are printed (run with `--nocapture` to see them).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use farm_worker::pool::copy::{self, Reflink};
use farm_worker::pool::{
    Backend, BackendChoice, BackendKind, Begin, BtrfsBackend, ChainHandle, ChainId, PendingChain,
    Pool, PoolError, PoolOptions, Severity, WorkspaceOptions,
};

// ---------------------------------------------------------------- fixtures

const CHILD_ENV: &str = "FARM_POOL_CHILD_DIR";
const UNPRIV_USER: &str = "farmpool";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips (prints why) outside CI; fails in CI.
fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: {reason}; CI=true, so this test must run (run CI as root)");
    }
    // Straight to stderr: the test harness captures eprintln!.
    let _ = writeln!(io::stderr(), "SKIPPED {test}: {reason}");
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serialises mount/umount/useradd between the test threads.
static SETUP: Mutex<()> = Mutex::new(());

/// A scratch filesystem: a loopback btrfs or a tmpfs mounted for the test (as root), or a
/// temporary directory on an existing one.
struct Scratch {
    base: Option<tempfile::TempDir>,
    mnt: PathBuf,
    mounted: bool,
}

impl Scratch {
    fn path(&self) -> &Path {
        &self.mnt
    }

    fn new_base() -> tempfile::TempDir {
        let base = tempfile::Builder::new()
            .prefix("farm-pool-test.")
            .tempdir()
            .unwrap();
        // The unprivileged child must be able to traverse it.
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        base
    }

    /// A loopback btrfs of `mb` MiB mounted with `opts` (root only).
    fn loop_btrfs(mb: u64, opts: &str) -> Scratch {
        let base = Self::new_base();
        let img = base.path().join("img");
        let mnt = base.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run(Command::new("truncate")
            .arg("-s")
            .arg(format!("{mb}M"))
            .arg(&img));
        run(Command::new("mkfs.btrfs").arg("-q").arg(&img));
        {
            let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("mount")
                .arg("-o")
                .arg(opts)
                .arg(&img)
                .arg(&mnt));
        }
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch {
            base: Some(base),
            mnt,
            mounted: true,
        }
    }

    fn tmpfs() -> Scratch {
        let base = Self::new_base();
        let mnt = base.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        {
            let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=512m,mode=0755", "farm-test"])
                .arg(&mnt));
        }
        Scratch {
            base: Some(base),
            mnt,
            mounted: true,
        }
    }

    fn dir_in(parent: &Path) -> Scratch {
        let base = tempfile::Builder::new()
            .prefix("farm-pool-test.")
            .tempdir_in(parent)
            .unwrap();
        let mnt = base.path().to_path_buf();
        Scratch {
            base: Some(base),
            mnt,
            mounted: false,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success())
            {
                return; // the TempDir removes the image and the mount point
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot unmount {}; leaving it", self.mnt.display());
        // Never let TempDir recurse into a still-mounted filesystem.
        if let Some(b) = self.base.take() {
            let _ = b.keep();
        }
    }
}

fn statfs_is(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

/// A btrfs scratch directory mounted with user_subvol_rm_allowed, or None (skipped).
fn btrfs(test: &str) -> Option<Scratch> {
    if is_root() {
        return Some(Scratch::loop_btrfs(1024, "loop,user_subvol_rm_allowed"));
    }
    if let Ok(d) = std::env::var("FARM_TEST_BTRFS_DIR")
        && statfs_is(Path::new(&d), nix::sys::statfs::BTRFS_SUPER_MAGIC)
    {
        return Some(Scratch::dir_in(Path::new(&d)));
    }
    skip(
        test,
        "needs root (for a loopback btrfs) or FARM_TEST_BTRFS_DIR on btrfs",
    );
    None
}

/// A tmpfs scratch directory, or None (skipped).
fn tmpfs(test: &str) -> Option<Scratch> {
    if is_root() {
        return Some(Scratch::tmpfs());
    }
    if statfs_is(Path::new("/dev/shm"), nix::sys::statfs::TMPFS_MAGIC) {
        return Some(Scratch::dir_in(Path::new("/dev/shm")));
    }
    skip(test, "needs root (to mount a tmpfs) or a tmpfs at /dev/shm");
    None
}

fn id(n: u64) -> ChainId {
    format!("sha256:{n:064x}").parse().unwrap()
}

fn create(p: Begin) -> PendingChain {
    match p {
        Begin::Create(p) => p,
        Begin::Exists(h) => panic!("chain {} unexpectedly exists", h.id()),
    }
}

fn exists(p: Begin) -> ChainHandle {
    match p {
        Begin::Exists(h) => h,
        Begin::Create(p) => panic!("chain {} unexpectedly missing", p.id()),
    }
}

/// `n` files of `size` bytes in directories of 200.
fn fill(root: &Path, n: usize, size: usize) {
    let data = vec![b'x'; size];
    for i in 0..n {
        let d = root.join(format!("d{:03}", i / 200));
        if i % 200 == 0 {
            fs::create_dir_all(&d).unwrap();
        }
        fs::write(d.join(format!("f{i:05}")), &data).unwrap();
    }
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Everything in `pool/chains` and `pool/work`, hidden entries included.
fn volumes(pool: &Pool) -> Vec<String> {
    let mut v: Vec<String> = ["chains", "work"]
        .iter()
        .flat_map(|d| fs::read_dir(pool.dir().join(d)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn open(dir: &Path) -> Pool {
    Pool::open(dir, PoolOptions::default()).unwrap()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------- btrfs backend

#[test]
fn btrfs_snapshot_is_o1_and_faster_than_copying_20000_files() {
    let Some(fs_) = btrfs("btrfs_snapshot_is_o1") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    assert_eq!(pool.backend(), BackendKind::Btrfs);

    // A tiny chain, for the O(1) comparison.
    let mut tiny = create(pool.begin_chain(&id(100), None).unwrap());
    fill(tiny.rootfs(), 10, 1024);
    tiny.set_layer_size(10 * 1024);
    let tiny = tiny.commit().unwrap();

    let mut big = create(pool.begin_chain(&id(1), None).unwrap());
    let t = Instant::now();
    fill(big.rootfs(), 20_000, 1024);
    let t_fill = t.elapsed();
    big.set_layer_size(20_000 * 1024);
    let big = big.commit().unwrap();
    assert_eq!(count_files(big.rootfs()), 20_000);

    // Snapshots (median of 5), excluding the deletion of the result.
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let snap = |parent: &ChainHandle, n: u64| {
        let t = Instant::now();
        let child = create(pool.begin_chain(&id(n), Some(parent)).unwrap());
        let e = t.elapsed();
        assert!(child.rootfs().join("d000").exists());
        e
    };
    let t_snap = median((0..5).map(|i| snap(&big, 10 + i)).collect());
    let t_snap_tiny = median((0..5).map(|i| snap(&tiny, 20 + i)).collect());
    let child = create(pool.begin_chain(&id(2), Some(&big)).unwrap());
    assert_eq!(count_files(child.rootfs()), 20_000);
    drop(child);

    let t = Instant::now();
    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: Some(&big),
        })
        .unwrap();
    let t_ws = t.elapsed();
    assert_eq!(count_files(ws.rootfs().unwrap()), 20_000);
    drop(ws);

    let t = Instant::now();
    let st = copy::copy_tree(big.rootfs(), &fs_.path().join("reflinked"), Reflink::Auto).unwrap();
    let t_reflink = t.elapsed();
    assert_eq!(st.files, 20_000);
    assert_eq!(
        st.reflinked, 20_000,
        "reflinks should work within one btrfs"
    );

    let t = Instant::now();
    let st = copy::copy_tree(big.rootfs(), &fs_.path().join("copied"), Reflink::Never).unwrap();
    let t_copy = t.elapsed();
    assert_eq!((st.files, st.reflinked), (20_000, 0));

    println!(
        "20,000 files of 1 KiB on a loopback btrfs: write {} | btrfs snapshot as pending chain, \
         median of 5: {} (10-file chain: {}) | new workspace with overlay dirs + snapshot {} | \
         copy_tree with reflinks {} | copy_tree without reflinks {}",
        ms(t_fill),
        ms(t_snap),
        ms(t_snap_tiny),
        ms(t_ws),
        ms(t_reflink),
        ms(t_copy)
    );
    assert!(
        t_snap < t_reflink,
        "snapshot {t_snap:?} not faster than reflink copy {t_reflink:?}"
    );
    assert!(
        t_snap < t_copy,
        "snapshot {t_snap:?} not faster than copy {t_copy:?}"
    );
    assert!(t_ws < t_copy);
}

#[test]
fn btrfs_pending_chain_dropped_without_commit_leaves_nothing() {
    let Some(fs_) = btrfs("btrfs_pending_dropped") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    let base = {
        let p = create(pool.begin_chain(&id(1), None).unwrap());
        fill(p.rootfs(), 100, 10);
        p.commit().unwrap()
    };
    let before = volumes(&pool);
    assert_eq!(before, vec![format!("sha256-{:064x}", 1)]);

    for parent in [None, Some(&base)] {
        let p = create(pool.begin_chain(&id(2), parent).unwrap());
        fill(&p.rootfs().join("new"), 1000, 10);
        assert!(p.volume().exists());
        assert!(!pool.contains(&id(2)));
        let vol = p.volume().to_path_buf();
        drop(p);
        assert!(!vol.exists());
        assert_eq!(
            volumes(&pool),
            before,
            "parent {:?}",
            parent.map(|p| p.id())
        );
        assert!(pool.chain(&id(2)).unwrap().is_none());
        assert!(
            !pool
                .dir()
                .join(format!("meta/sha256-{:064x}.json", 2))
                .exists()
        );
    }
    // abort() does the same, reporting errors.
    let p = create(pool.begin_chain(&id(3), Some(&base)).unwrap());
    p.abort().unwrap();
    assert_eq!(volumes(&pool), before);
    // And the id can be created afterwards; then begin_chain finds it.
    let made = create(pool.begin_chain(&id(2), None).unwrap())
        .commit()
        .unwrap();
    let found = exists(pool.begin_chain(&id(2), None).unwrap());
    assert_eq!(found.rootfs(), made.rootfs());
}

#[test]
fn btrfs_commit_is_atomic() {
    let Some(fs_) = btrfs("btrfs_commit_is_atomic") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    const FILES: usize = 300;
    for round in 0..10u64 {
        let cid = id(1000 + round);
        let target = pool
            .dir()
            .join("chains")
            .join(format!("sha256-{:064x}", 1000 + round));
        let mut p = create(pool.begin_chain(&cid, None).unwrap());
        fill(p.rootfs(), FILES, 16);
        assert!(!target.exists());
        assert!(pool.chain(&cid).unwrap().is_none());
        assert!(pool.list().unwrap().iter().all(|c| c.id != cid));

        // A watcher that checks the chain the moment its id appears.
        let t2 = target.clone();
        let watcher = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !t2.exists() {
                assert!(Instant::now() < deadline, "chain never appeared");
                std::hint::spin_loop();
            }
            let ro = BtrfsBackend.is_readonly(&t2).unwrap();
            let n = count_files(&t2.join("rootfs"));
            (ro, n)
        });
        std::thread::sleep(Duration::from_millis(5));
        p.set_layer_size(FILES as u64 * 16);
        let h = p.commit().unwrap();
        let (ro, n) = watcher.join().unwrap();
        assert!(ro, "chain visible before it was sealed read-only");
        assert_eq!(n, FILES, "chain visible before it was complete");
        assert!(h.is_readonly().unwrap());
        assert_eq!(h.info().size_bytes, Some(FILES as u64 * 16));
        assert!(pool.chain(&cid).unwrap().is_some());
    }
    assert!(
        volumes(&pool).iter().all(|v| !v.starts_with('.')),
        "{:?}",
        volumes(&pool)
    );
}

#[test]
fn btrfs_two_threads_creating_one_chain_end_with_one_chain() {
    let Some(fs_) = btrfs("btrfs_two_threads") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    let parent = {
        let p = create(pool.begin_chain(&id(1), None).unwrap());
        fs::write(p.rootfs().join("base"), b"base").unwrap();
        p.commit().unwrap()
    };
    let parent = Arc::new(parent);
    for round in 0..3u64 {
        let cid = id(10 + round);
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (pool, cid, barrier, parent) =
                    (pool.clone(), cid.clone(), barrier.clone(), parent.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match pool.begin_chain(&cid, Some(&*parent)).unwrap() {
                        Begin::Create(p) => {
                            fs::write(p.rootfs().join("winner"), format!("thread {t}")).unwrap();
                            std::thread::sleep(Duration::from_millis(200));
                            let h = p.commit().unwrap();
                            (true, fs::read_to_string(h.rootfs().join("winner")).unwrap())
                        }
                        Begin::Exists(h) => (
                            false,
                            fs::read_to_string(h.rootfs().join("winner")).unwrap(),
                        ),
                    }
                })
            })
            .collect();
        let results: Vec<(bool, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.0).count(), 1, "{results:?}");
        assert_eq!(
            results[0].1, results[1].1,
            "both must see the winner's chain"
        );
        assert_eq!(
            pool.list().unwrap().iter().filter(|c| c.id == cid).count(),
            1
        );
    }
    assert_eq!(pool.list().unwrap().len(), 4);
    assert!(
        volumes(&pool).iter().all(|v| !v.starts_with('.')),
        "{:?}",
        volumes(&pool)
    );
}

#[test]
fn btrfs_read_only_chain_cannot_be_written() {
    let Some(fs_) = btrfs("btrfs_read_only") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    let mut p = create(pool.begin_chain(&id(1), None).unwrap());
    fs::write(p.rootfs().join("f"), b"1").unwrap();
    fs::create_dir(p.rootfs().join("d")).unwrap();
    p.set_layer_size(1);
    let h = p.commit().unwrap();
    assert!(h.is_readonly().unwrap());
    let erofs = |r: io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(fs::write(h.rootfs().join("new"), b"x"), "create a file");
    erofs(
        fs::OpenOptions::new()
            .append(true)
            .open(h.rootfs().join("f"))
            .map(drop),
        "open for writing",
    );
    erofs(fs::remove_file(h.rootfs().join("f")), "unlink");
    erofs(fs::create_dir(h.rootfs().join("d/e")), "mkdir");
    erofs(
        fs::set_permissions(h.rootfs().join("f"), fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    erofs(
        fs::rename(h.rootfs().join("f"), h.rootfs().join("g")),
        "rename",
    );
    assert_eq!(fs::read(h.rootfs().join("f")).unwrap(), b"1");
    // A child chain made from it is writable, and the parent stays as it was.
    let c = create(pool.begin_chain(&id(2), Some(&h)).unwrap());
    fs::write(c.rootfs().join("f"), b"2").unwrap();
    assert_eq!(fs::read(h.rootfs().join("f")).unwrap(), b"1");
}

#[test]
fn btrfs_gc_removes_lru_chains_and_skips_held_ones() {
    let Some(fs_) = btrfs("btrfs_gc") else { return };
    let pool = open(&fs_.path().join("pool"));
    for n in 1..=4 {
        let mut p = create(pool.begin_chain(&id(n), None).unwrap());
        fill(p.rootfs(), 5, 10);
        p.set_layer_size(100);
        drop(p.commit().unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Chain 1 is held by a handle in this process (taking it counts as a use), then
    // chain 3 is used again: LRU order becomes 2, 4, 1, 3.
    std::thread::sleep(Duration::from_millis(5));
    let held = pool.chain(&id(1)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(5));
    drop(pool.chain(&id(3)).unwrap().unwrap());
    assert_eq!(pool.usage().unwrap(), 400);

    // Chain 2 is held by another process: a shell holding a shared flock on its lock file.
    let lock_file = pool.use_lock_path(&id(2));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 9<\"$1\" && flock -s 9 && echo locked && read x || true")
        .arg("sh")
        .arg(&lock_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");

    let r = pool.gc(100).unwrap();
    let removed: Vec<ChainId> = r.removed.iter().map(|c| c.id.clone()).collect();
    assert_eq!(removed, vec![id(4), id(3)], "{r:?}");
    assert_eq!(r.skipped_in_use, vec![id(2), id(1)]);
    assert_eq!((r.bytes_before, r.bytes_after), (400, 200));
    assert!(!pool.contains(&id(3)) && !pool.contains(&id(4)));
    assert!(held.rootfs().join("d000/f00000").exists());
    assert!(pool.contains(&id(2)));

    // Release both holders: now the least recently used (2) goes, and that is enough.
    drop(child.stdin.take()); // the shell's `read` ends, and with it the lock
    assert!(child.wait().unwrap().success());
    drop(held);
    let r = pool.gc(100).unwrap();
    assert_eq!(
        r.removed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![id(2)]
    );
    assert!(r.skipped_in_use.is_empty());
    assert_eq!(
        pool.list()
            .unwrap()
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![id(1)]
    );
    assert_eq!(volumes(&pool), vec![format!("sha256-{:064x}", 1)]);
    // remove_chain refuses a held chain.
    let h1 = pool.chain(&id(1)).unwrap().unwrap();
    assert!(matches!(
        pool.remove_chain(&id(1)),
        Err(PoolError::InUse(_))
    ));
    drop(h1);
    assert!(pool.remove_chain(&id(1)).unwrap());
    assert!(volumes(&pool).is_empty());
}

#[test]
fn btrfs_parent_can_be_collected_while_children_live() {
    let Some(fs_) = btrfs("btrfs_parent_gc") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    let p = create(pool.begin_chain(&id(1), None).unwrap());
    fs::write(p.rootfs().join("a"), b"parent").unwrap();
    let parent = p.commit().unwrap();
    let mut c = create(pool.begin_chain(&id(2), Some(&parent)).unwrap());
    fs::write(c.rootfs().join("b"), b"child").unwrap();
    c.set_layer_size(5);
    let child = c.commit().unwrap();
    assert_eq!(child.info().parent, Some(id(1)));
    assert_eq!(
        child.info().size_bytes,
        Some(6 + 5),
        "parent's walked size + hint"
    );
    drop(parent);
    let r = pool.gc(11).unwrap();
    assert_eq!(r.removed.len(), 1);
    assert_eq!(r.removed[0].id, id(1));
    assert_eq!(fs::read(child.rootfs().join("a")).unwrap(), b"parent");
}

#[test]
fn btrfs_workspace_is_removed_on_drop() {
    let Some(fs_) = btrfs("btrfs_workspace") else {
        return;
    };
    let pool = open(&fs_.path().join("pool"));
    let mut p = create(pool.begin_chain(&id(1), None).unwrap());
    fs::write(p.rootfs().join("a"), b"1").unwrap();
    p.set_layer_size(1);
    let h = p.commit().unwrap();
    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: Some(&h),
        })
        .unwrap();
    let (upper, work, rootfs) = (
        ws.upper().unwrap().to_path_buf(),
        ws.work().unwrap().to_path_buf(),
        ws.rootfs().unwrap().to_path_buf(),
    );
    for d in [&upper, &work, &rootfs] {
        assert!(d.starts_with(pool.dir()));
        assert!(d.is_dir());
    }
    assert_eq!(
        fs::metadata(&upper).unwrap().dev(),
        fs::metadata(&work).unwrap().dev(),
        "same filesystem"
    );
    fs::write(rootfs.join("a"), b"2").unwrap();
    fs::write(upper.join("u"), b"u").unwrap();
    // the overlay's work dir ends up unreadable: the delete must cope
    fs::create_dir(work.join("work")).unwrap();
    fs::set_permissions(work.join("work"), fs::Permissions::from_mode(0o000)).unwrap();
    assert_eq!(fs::read(h.rootfs().join("a")).unwrap(), b"1");
    let path = ws.path().to_path_buf();
    drop(ws);
    assert!(!path.exists());
    assert_eq!(volumes(&pool), vec![format!("sha256-{:064x}", 1)]);
    // remove() reports errors instead of logging them.
    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: None,
        })
        .unwrap();
    assert!(ws.rootfs().is_none());
    ws.remove().unwrap();
    assert_eq!(volumes(&pool).len(), 1);
}

#[test]
fn btrfs_full_pool_is_a_clear_error_and_stays_consistent() {
    if !is_root() {
        skip(
            "btrfs_full_pool",
            "needs root to make a small loopback btrfs",
        );
        return;
    }
    let fs_ = Scratch::loop_btrfs(256, "loop,user_subvol_rm_allowed");
    let pool = open(&fs_.path().join("pool"));
    let keep = {
        let p = create(pool.begin_chain(&id(1), None).unwrap());
        fs::write(p.rootfs().join("a"), b"kept").unwrap();
        p.commit().unwrap()
    };
    let p = create(pool.begin_chain(&id(2), Some(&keep)).unwrap());
    let big = p.rootfs().join("big");
    let mut f = fs::File::create(&big).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let err = loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            break e;
        }
    };
    drop(f);
    assert!(farm_worker::pool::is_no_space(&err), "{err}");
    // A full pool still hands out its chains.
    assert!(pool.chain(&id(1)).unwrap().is_some());
    let perr = pool.error("write layer into", &big, err);
    assert!(perr.is_pool_full(), "{perr}");
    let msg = perr.to_string();
    println!("full pool error: {msg}");
    assert!(
        msg.contains("is full") && msg.contains(&pool.dir().display().to_string()),
        "{msg}"
    );
    drop(p);
    assert_eq!(volumes(&pool), vec![format!("sha256-{:064x}", 1)]);
    assert!(!pool.contains(&id(2)));
    assert_eq!(fs::read(keep.rootfs().join("a")).unwrap(), b"kept");
    // Space comes back (btrfs frees a deleted subvolume in the background).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        run(Command::new("btrfs")
            .arg("filesystem")
            .arg("sync")
            .arg(fs_.path()));
        let attempt = pool.begin_chain(&id(3), Some(&keep)).and_then(|b| {
            let p = create(b);
            fs::write(p.rootfs().join("small"), vec![1u8; 4 << 20])
                .map_err(|e| pool.error("write", p.rootfs(), e))?;
            p.commit()
        });
        match attempt {
            Ok(_) => break,
            Err(e) if e.is_pool_full() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("pool did not recover: {e}"),
        }
    }
    assert!(volumes(&pool).iter().all(|v| !v.starts_with('.')));
}

#[test]
fn btrfs_check_reports_and_creates_nothing() {
    let Some(fs_) = btrfs("btrfs_check") else {
        return;
    };
    let dir = fs_.path().join("not-yet");
    let r = Pool::check(&dir);
    println!("{r}");
    assert!(!dir.exists());
    assert_eq!(r.backend, Some(BackendKind::Btrfs));
    assert!(r.writable);
    assert!(r.free_bytes.is_some_and(|f| f > 0));
    assert!(r.is_usable(), "{r}");
    let text = r.to_string();
    assert!(
        text.contains("btrfs") && text.contains("user_subvol_rm_allowed") && text.contains("free"),
        "{text}"
    );
}

#[test]
fn btrfs_leftovers_of_a_crashed_process_are_cleaned_up() {
    let Some(fs_) = btrfs("btrfs_crash_cleanup") else {
        return;
    };
    let dir = fs_.path().join("pool");
    let pool = open(&dir);
    drop(
        create(pool.begin_chain(&id(1), None).unwrap())
            .commit()
            .unwrap(),
    );
    // A child process starts a chain and a workspace, then dies without cleaning up.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_crash_midway",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = volumes(&pool);
    assert_eq!(
        left.len(),
        3,
        "child should have left a pending chain and a workspace: {left:?}"
    );
    // A live pending chain of this process is not touched.
    let live = create(pool.begin_chain(&id(3), None).unwrap());
    let r = pool.gc(u64::MAX).unwrap();
    assert_eq!(r.stale_removed, 2, "{r:?}");
    assert!(r.removed.is_empty());
    assert!(live.volume().exists());
    drop(live);
    assert_eq!(volumes(&pool), vec![format!("sha256-{:064x}", 1)]);
    // Pool::open cleans up too.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_crash_midway",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(volumes(&pool).len(), 3);
    let _again = open(&dir);
    assert_eq!(volumes(&pool), vec![format!("sha256-{:064x}", 1)]);
}

#[test]
#[ignore = "run by btrfs_leftovers_of_a_crashed_process_are_cleaned_up"]
fn child_crash_midway() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        eprintln!("only meaningful when re-executed by its parent test");
        return;
    };
    let pool = open(Path::new(&dir));
    let base = pool.chain(&id(1)).unwrap().unwrap();
    let p = create(pool.begin_chain(&id(2), Some(&base)).unwrap());
    fs::write(p.rootfs().join("half"), b"half").unwrap();
    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: Some(&base),
        })
        .unwrap();
    fs::write(ws.upper().unwrap().join("u"), b"u").unwrap();
    // Die without running any destructor; the kernel releases the flocks.
    std::process::exit(0);
}

// ---------------------------------------------------------------- copy backend

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn copy_backend_on_tmpfs_warns_once_and_works() {
    let Some(fs_) = tmpfs("copy_backend_on_tmpfs") else {
        return;
    };
    let out = Captured::default();
    let sub = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let dir = fs_.path().join("pool");
    let pool = tracing::subscriber::with_default(sub, || open(&dir));
    let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    println!("captured: {log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one warning line: {log}");
    let l = lines[0];
    for want in [
        "WARN",
        "tmpfs",
        "not btrfs",
        "copy",
        "farm setup --user NAME --pool DIR",
        "mkfs.btrfs",
        "user_subvol_rm_allowed",
    ] {
        assert!(l.contains(want), "warning lacks {want:?}: {l}");
    }
    assert_eq!(pool.backend(), BackendKind::Copy);

    // The tree a snapshot must preserve.
    let p = create(pool.begin_chain(&id(1), None).unwrap());
    let r = p.rootfs().to_path_buf();
    fs::create_dir_all(r.join("usr/bin")).unwrap();
    fs::write(r.join("usr/bin/tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(r.join("usr/bin/tool"), fs::Permissions::from_mode(0o4711)).unwrap();
    fs::hard_link(r.join("usr/bin/tool"), r.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", r.join("usr/bin/link")).unwrap();
    let has_xattr = xattr_set(&r.join("usr/bin/tool"));
    if is_root() {
        std::os::unix::fs::lchown(r.join("usr/bin/tool"), Some(1234), Some(5678)).unwrap();
        fs::set_permissions(r.join("usr/bin/tool"), fs::Permissions::from_mode(0o4711)).unwrap();
    }
    let walked = p.rootfs().to_path_buf();
    let base = p.commit().unwrap();
    assert_eq!(
        base.info().size_bytes,
        Some(10 + 4),
        "walked: file once + symlink"
    );
    assert!(!walked.exists(), "pending path is renamed away");

    let c = create(pool.begin_chain(&id(2), Some(&base)).unwrap());
    let t = c.rootfs().join("usr/bin/tool");
    let m = fs::symlink_metadata(&t).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4711);
    assert_eq!(m.nlink(), 2);
    assert_eq!(
        m.ino(),
        fs::symlink_metadata(c.rootfs().join("usr/bin/tool2"))
            .unwrap()
            .ino()
    );
    assert_eq!(
        fs::read_link(c.rootfs().join("usr/bin/link")).unwrap(),
        PathBuf::from("tool")
    );
    assert_eq!(
        m.mtime(),
        fs::symlink_metadata(base.rootfs().join("usr/bin/tool"))
            .unwrap()
            .mtime()
    );
    if is_root() {
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
    }
    if has_xattr {
        assert_eq!(
            xattr::get(&t, "user.farm").unwrap().as_deref(),
            Some(&b"yes"[..])
        );
    }
    fs::write(c.rootfs().join("new"), b"n").unwrap();
    let child = c.commit().unwrap();
    assert!(!base.rootfs().join("new").exists());
    assert!(
        !child.is_readonly().unwrap(),
        "copy backend does not enforce read-only"
    );

    // Workspaces and gc work the same way.
    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: Some(&child),
        })
        .unwrap();
    assert!(ws.rootfs().unwrap().join("new").exists());
    drop(ws);
    let p = create(pool.begin_chain(&id(3), Some(&child)).unwrap());
    drop(p);
    drop(child);
    let r = pool.gc(0).unwrap();
    assert_eq!(r.removed.len(), 1);
    assert_eq!(r.skipped_in_use, vec![id(1)]);
    drop(base);
    assert_eq!(pool.gc(0).unwrap().removed.len(), 1);
    assert!(volumes(&pool).is_empty(), "{:?}", volumes(&pool));

    // Check says the same as the warning.
    let rep = Pool::check(&dir);
    assert_eq!(rep.backend, Some(BackendKind::Copy));
    assert!(
        rep.findings
            .iter()
            .any(|f| f.severity == Severity::Warning && f.message.contains("tmpfs"))
    );
}

fn xattr_set(p: &Path) -> bool {
    xattr::set(p, "user.farm", b"yes").is_ok()
}

#[test]
fn copy_backend_uses_the_callers_deleter() {
    struct Counting(Mutex<Vec<PathBuf>>);
    impl farm_worker::pool::Deleter for Counting {
        fn remove_tree(&self, path: &Path) -> io::Result<()> {
            self.0.lock().unwrap().push(path.to_path_buf());
            farm_worker::pool::StdDeleter.remove_tree(path)
        }
    }
    let t = tempfile::tempdir().unwrap();
    let del = Arc::new(Counting(Mutex::new(Vec::new())));
    let pool = Pool::open(
        t.path().join("pool"),
        PoolOptions::default()
            .with_backend(BackendChoice::Copy)
            .with_deleter(del.clone()),
    )
    .unwrap();
    drop(create(pool.begin_chain(&id(1), None).unwrap()));
    drop(
        pool.workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: None,
        })
        .unwrap(),
    );
    let calls = del.0.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".pending.")
    );
    assert!(volumes(&pool).is_empty());
    // A pool keeps its backend.
    assert!(matches!(
        Pool::open(
            t.path().join("pool"),
            PoolOptions::default().with_backend(BackendChoice::Btrfs)
        ),
        Err(PoolError::BackendMismatch { .. })
    ));
}

#[test]
fn corrupt_or_missing_records_are_rebuilt() {
    let t = tempfile::tempdir().unwrap();
    let pool = Pool::open(
        t.path().join("pool"),
        PoolOptions::default().with_backend(BackendChoice::Copy),
    )
    .unwrap();
    for n in [1, 2] {
        let mut p = create(pool.begin_chain(&id(n), None).unwrap());
        p.set_layer_size(7);
        p.commit().unwrap();
    }
    let meta = |n: u64| pool.dir().join(format!("meta/sha256-{n:064x}.json"));
    fs::write(meta(1), b"{ torn").unwrap();
    fs::remove_file(meta(2)).unwrap();
    let list = pool.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|c| c.size_bytes.is_none()));
    let h = pool.chain(&id(1)).unwrap().unwrap();
    assert_eq!(h.info().size_bytes, None);
    drop(h);
    let r = pool.gc(0).unwrap();
    assert_eq!(r.unknown_size, 2);
    assert!(
        r.removed.is_empty(),
        "unknown sizes count as 0: nothing to free"
    );
}

// ---------------------------------------------------------------- unprivileged

/// Creates user `farmpool` if missing; returns (uid, gid).
fn unpriv_user() -> (u32, u32) {
    let _g = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if nix::unistd::User::from_name(UNPRIV_USER).unwrap().is_none() {
        run(Command::new("useradd").args(["-m", UNPRIV_USER]));
    }
    let u = nix::unistd::User::from_name(UNPRIV_USER).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Runs the ignored child test `name` as `farmpool` with `CHILD_ENV=dir`.
fn run_as_unpriv(name: &str, dir: &Path) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={UNPRIV_USER}"),
            &format!("--regid={UNPRIV_USER}"),
            "--init-groups",
        ])
        .arg(&exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child {name} stdout:\n{stdout}\n--- stderr:\n{stderr}");
    assert!(out.status.success(), "child {name} failed");
    assert!(stdout.contains("1 passed"), "child {name} did not run");
}

fn chown_tree_except_chains(root: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid)).unwrap();
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        let inside_chains = root.file_name().is_some_and(|n| n == "chains");
        if inside_chains {
            continue; // sealed volumes are read-only; their roots were chowned before commit
        }
        if p.symlink_metadata().unwrap().is_dir() {
            chown_tree_except_chains(&p, uid, gid);
        } else {
            std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).unwrap();
        }
    }
}

#[test]
fn unprivileged_user_creates_snapshots_seals_and_deletes_chains() {
    if !is_root() {
        // Already unprivileged: run the body directly on a btrfs we were given.
        if let Some(fs_) = btrfs("unprivileged_user") {
            unprivileged_body(&fs_.path().join("pool"), false);
        }
        return;
    }
    let fs_ = Scratch::loop_btrfs(1024, "loop,user_subvol_rm_allowed");
    let (uid, gid) = unpriv_user();
    let dir = fs_.path().join("pool");
    // As root, prepare a chain full of files of other users in directories the
    // unprivileged user cannot even read (what a build in a user namespace leaves).
    {
        let pool = open(&dir);
        let p = create(pool.begin_chain(&id(99), None).unwrap());
        let r = p.rootfs();
        fs::create_dir_all(r.join("root/secret")).unwrap();
        fill(&r.join("root/secret"), 50, 10);
        for e in walk(r) {
            std::os::unix::fs::lchown(&e, Some(100_000), Some(100_000)).unwrap();
        }
        fs::set_permissions(r.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
        // the volume (not the rootfs) is the pool user's
        std::os::unix::fs::lchown(p.volume(), Some(uid), Some(gid)).unwrap();
        drop(p.commit().unwrap());
    }
    chown_tree_except_chains(&dir, uid, gid);
    // and a directory the child may not write
    fs::create_dir(fs_.path().join("rootowned")).unwrap();
    run_as_unpriv("child_unprivileged_body", &dir);
    assert!(
        fs::read_dir(dir.join("chains")).unwrap().next().is_none(),
        "child's gc left chains"
    );
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if p.symlink_metadata().unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                out.push(e.unwrap().path());
            }
        }
        i += 1;
    }
    out
}

#[test]
#[ignore = "run by unprivileged_user_creates_snapshots_seals_and_deletes_chains as user farmpool"]
fn child_unprivileged_body() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        eprintln!("only meaningful when re-executed by its parent test");
        return;
    };
    unprivileged_body(Path::new(&dir), true);
}

fn unprivileged_body(dir: &Path, prepared: bool) {
    assert!(!is_root(), "must run unprivileged");
    println!("running as uid {}", nix::unistd::geteuid());
    let pool = open(dir);
    assert_eq!(pool.backend(), BackendKind::Btrfs);

    let mut p = create(pool.begin_chain(&id(1), None).unwrap());
    fill(p.rootfs(), 200, 100);
    p.set_layer_size(200 * 100);
    let a = p.commit().unwrap();
    assert!(a.is_readonly().unwrap());
    assert_eq!(
        fs::write(a.rootfs().join("x"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );

    let mut c = create(pool.begin_chain(&id(2), Some(&a)).unwrap());
    fs::write(c.rootfs().join("child"), b"c").unwrap();
    c.set_layer_size(1);
    let b = c.commit().unwrap();
    assert_eq!(count_files(b.rootfs()), 201);
    assert_eq!(b.info().size_bytes, Some(20_001));

    let ws = pool
        .workspace(WorkspaceOptions {
            overlay_dirs: true,
            snapshot_of: Some(&b),
        })
        .unwrap();
    fs::write(ws.rootfs().unwrap().join("scratch"), b"s").unwrap();
    fs::write(ws.upper().unwrap().join("u"), b"u").unwrap();
    let wp = ws.path().to_path_buf();
    drop(ws);
    assert!(!wp.exists());

    drop(create(pool.begin_chain(&id(3), Some(&b)).unwrap()));
    drop((a, b));
    if prepared {
        assert!(pool.contains(&id(99)));
    }
    let r = pool.gc(0).unwrap();
    assert!(r.skipped_in_use.is_empty(), "{r:?}");
    assert_eq!(r.removed.len(), if prepared { 3 } else { 2 }, "{r:?}");
    assert!(volumes(&pool).is_empty(), "{:?}", volumes(&pool));

    if prepared {
        // Not writable: a clear error naming the directory and its owner.
        let ro = dir.parent().unwrap().join("rootowned");
        let e = Pool::open(ro.join("pool"), PoolOptions::default()).unwrap_err();
        let msg = e.to_string();
        println!("not writable error: {msg}");
        assert!(matches!(e, PoolError::NotWritable { .. }), "{e:?}");
        assert!(
            msg.contains(&ro.display().to_string()) && msg.contains("uid 0 (root)"),
            "{msg}"
        );
        assert!(!ro.join("pool").exists());
    }
}

#[test]
fn unprivileged_open_on_btrfs_without_user_subvol_rm_allowed_is_refused() {
    if !is_root() {
        skip(
            "unprivileged_without_user_subvol_rm_allowed",
            "needs root to mount a btrfs without the option",
        );
        return;
    }
    let fs_ = Scratch::loop_btrfs(256, "loop");
    let (uid, gid) = unpriv_user();
    let dir = fs_.path().join("pool");
    fs::create_dir(&dir).unwrap();
    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).unwrap();
    // Root is fine (it may delete subvolumes anyway).
    let r = Pool::check(&dir);
    assert!(r.is_usable(), "{r}");
    run_as_unpriv("child_open_without_user_subvol_rm_allowed", &dir);
}

#[test]
#[ignore = "run by unprivileged_open_on_btrfs_without_user_subvol_rm_allowed_is_refused as user farmpool"]
fn child_open_without_user_subvol_rm_allowed() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        eprintln!("only meaningful when re-executed by its parent test");
        return;
    };
    let e = Pool::open(&dir, PoolOptions::default()).unwrap_err();
    let msg = e.to_string();
    println!("error: {msg}");
    assert!(
        matches!(e, PoolError::UserSubvolRmNotAllowed { .. }),
        "{e:?}"
    );
    assert!(
        msg.contains("mount -o remount,user_subvol_rm_allowed"),
        "{msg}"
    );
    let r = Pool::check(&dir);
    println!("{r}");
    assert!(!r.is_usable());
    assert!(
        fs::read_dir(&dir).unwrap().next().is_none(),
        "open must not have created anything"
    );
}
