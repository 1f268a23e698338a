//! The pool's syscalls: btrfs ioctls and FICLONE, through `nix`'s ioctl macros.
//!
//! Why ioctls and not the `btrfsutil` crate: see the module docs of [`crate::pool`]. The kernel
//! ABI used here (linux/btrfs.h, linux/fs.h) has been stable since Linux 3.x:
//!
//! | request | number | argument |
//! |---|---|---|
//! | `BTRFS_IOC_SUBVOL_CREATE` | `_IOW(0x94, 14, btrfs_ioctl_vol_args)` | name of the new subvolume, called on the parent directory |
//! | `BTRFS_IOC_SNAP_DESTROY` | `_IOW(0x94, 15, btrfs_ioctl_vol_args)` | name of the subvolume, called on its parent directory |
//! | `BTRFS_IOC_SNAP_CREATE_V2` | `_IOW(0x94, 23, btrfs_ioctl_vol_args_v2)` | source fd + flags + name, called on the destination's parent |
//! | `BTRFS_IOC_SUBVOL_GETFLAGS` | `_IOR(0x94, 25, u64)` | called on the subvolume root |
//! | `BTRFS_IOC_SUBVOL_SETFLAGS` | `_IOW(0x94, 26, u64)` | called on the subvolume root |
//! | `FICLONE` | `_IOW(0x94, 9, int)` | source fd, called on the destination file |
//!
//! Every wrapper takes borrowed file descriptors (so they are open for the duration of
//! the call) and validated names, and returns the kernel's errno untouched.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

/// `BTRFS_PATH_NAME_MAX` + 1.
const VOL_NAME_LEN: usize = 4088;
/// `BTRFS_SUBVOL_NAME_MAX` + 1.
const VOL_NAME_LEN_V2: usize = 4040;
/// `BTRFS_SUBVOL_RDONLY`.
pub const SUBVOL_RDONLY: u64 = 1 << 1;

/// `struct btrfs_ioctl_vol_args` (4096 bytes).
#[repr(C)]
pub struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME_LEN],
}

/// `struct btrfs_ioctl_vol_args_v2` (4096 bytes). The two unions of the C struct are
/// represented by their largest members (`unused[4]` and `name`), which fixes the layout.
#[repr(C)]
pub struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; VOL_NAME_LEN_V2],
}

// The kernel encodes the struct size in the request number; a wrong size would make the
// kernel reject the call (ENOTTY), never read out of bounds, but check it at compile time.
const _: () = assert!(std::mem::size_of::<VolArgs>() == 4096);
const _: () = assert!(std::mem::size_of::<VolArgsV2>() == 4096);

nix::ioctl_write_ptr!(btrfs_ioc_subvol_create, 0x94, 14, VolArgs);
nix::ioctl_write_ptr!(btrfs_ioc_snap_destroy, 0x94, 15, VolArgs);
nix::ioctl_write_ptr!(btrfs_ioc_snap_create_v2, 0x94, 23, VolArgsV2);
nix::ioctl_read!(btrfs_ioc_subvol_getflags, 0x94, 25, u64);
nix::ioctl_write_ptr!(btrfs_ioc_subvol_setflags, 0x94, 26, u64);
nix::ioctl_write_int!(ioc_ficlone, 0x94, 9);

/// Copies `name` into a NUL-terminated fixed buffer; rejects names that do not fit,
/// are empty, contain '/' or NUL, or are "." / "..".
fn fill_name(dst: &mut [u8], name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= dst.len()
        || bytes.contains(&0)
        || bytes.contains(&b'/')
        || bytes == b"."
        || bytes == b".."
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid subvolume name {name:?}"),
        ));
    }
    dst[..bytes.len()].copy_from_slice(bytes);
    dst[bytes.len()] = 0;
    Ok(())
}

fn vol_args(name: &OsStr) -> io::Result<Box<VolArgs>> {
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; VOL_NAME_LEN],
    });
    fill_name(&mut args.name, name)?;
    Ok(args)
}

/// Creates an empty subvolume `name` in the directory `parent`.
pub fn subvol_create(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let args = vol_args(name)?;
    // SAFETY: `parent` is a live borrowed fd; `args` is a properly laid out, fully
    // initialised `btrfs_ioctl_vol_args` with a NUL-terminated name, alive for the call;
    // the kernel only reads it (_IOW).
    unsafe { btrfs_ioc_subvol_create(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Deletes the subvolume `name` (its root must be directly in `parent`).
pub fn snap_destroy(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let args = vol_args(name)?;
    // SAFETY: as in `subvol_create`: live fd, initialised struct with NUL-terminated name,
    // read-only for the kernel.
    unsafe { btrfs_ioc_snap_destroy(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Snapshots the subvolume whose root is open as `source` to `name` in `parent`.
pub fn snap_create(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    source: BorrowedFd<'_>,
    readonly: bool,
) -> io::Result<()> {
    let mut args = Box::new(VolArgsV2 {
        fd: i64::from(source.as_raw_fd()),
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: [0; VOL_NAME_LEN_V2],
    });
    fill_name(&mut args.name, name)?;
    // SAFETY: both fds are live borrowed fds for the duration of the call; `args` is a
    // fully initialised `btrfs_ioctl_vol_args_v2`: no BTRFS_SUBVOL_QGROUP_INHERIT flag, so
    // the kernel does not dereference the qgroup pointer of the union (zeroed anyway),
    // and the name is NUL-terminated. The kernel only reads it (_IOW).
    unsafe { btrfs_ioc_snap_create_v2(parent.as_raw_fd(), &*args) }?;
    Ok(())
}

/// Reads the subvolume flags of the subvolume whose root is open as `subvol`.
pub fn subvol_getflags(subvol: BorrowedFd<'_>) -> io::Result<u64> {
    let mut flags: u64 = 0;
    // SAFETY: live fd; `flags` is a valid, aligned u64 the kernel writes once (_IOR).
    unsafe { btrfs_ioc_subvol_getflags(subvol.as_raw_fd(), &mut flags) }?;
    Ok(flags)
}

/// Sets the subvolume flags of the subvolume whose root is open as `subvol`.
pub fn subvol_setflags(subvol: BorrowedFd<'_>, flags: u64) -> io::Result<()> {
    // SAFETY: live fd; `flags` is a valid u64 the kernel only reads (_IOW).
    unsafe { btrfs_ioc_subvol_setflags(subvol.as_raw_fd(), &flags) }?;
    Ok(())
}

/// Makes `dest` share all of `source`'s extents (a reflink copy of the whole file).
pub fn ficlone(dest: BorrowedFd<'_>, source: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd by value (no pointer); both fds are live.
    unsafe { ioc_ficlone(dest.as_raw_fd(), source.as_raw_fd() as nix::libc::c_ulong) }?;
    Ok(())
}
