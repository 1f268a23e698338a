//! The seccomp filter of the build script, in the spirit of the default container
//! profile: a deny list, every other syscall allowed. Denied with EPERM: kernel module
//! load/unload, kexec, bpf, the keyring (add_key, request_key, keyctl), userfaultfd,
//! perf_event_open, acct, swapon/swapoff, open_by_handle_at, and (unless the layer asks
//! for `nested_userns: true`) new user namespaces: `unshare` and `clone` with
//! `CLONE_NEWUSER`. `clone3` passes its flags in memory a filter cannot read, so it gets
//! ENOSYS and the C library falls back to `clone` (what container runtimes do). On
//! x86_64 the x32 ABI (syscall numbers with bit 30) is denied outright.
//!
//! The program is written here rather than with a filter crate because those kill a
//! process that uses another architecture's syscall table, and builds do run 32-bit
//! binaries (i386 on x86_64, arm on aarch64): the compat tables get the same deny list
//! with their own numbers.
//!
//! Installed by [`crate::sys::install_script_pre_exec`] in the script's process, after
//! all of the sandbox setup (which itself unshares and mounts), right before `exec`,
//! together with `PR_SET_NO_NEW_PRIVS` (which seccomp requires and which keeps setuid
//! binaries from gaining anything).

use libc::sock_filter;

// Classic BPF opcodes (linux/bpf_common.h) and seccomp return values.
const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

// Offsets in `struct seccomp_data`: nr (u32), arch (u32), ip (u64), args[6] (u64,
// little endian here: the low word of args[0] is at 16).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;

const CLONE_NEWUSER: u32 = libc::CLONE_NEWUSER as u32;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// One syscall table: its audit arch and the numbers of what is denied.
struct Table {
    arch: u32,
    denied: &'static [u32],
    unshare: u32,
    clone: u32,
    clone3: u32,
    /// The x32 ABI shares x86_64's audit arch; its numbers have bit 30 set.
    deny_x32: bool,
}

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
#[cfg(target_arch = "riscv64")]
const NATIVE_ARCH: u32 = 0xC000_00F3; // AUDIT_ARCH_RISCV64

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
const NATIVE_DENIED: &[u32] = &[
    libc::SYS_init_module as u32,
    libc::SYS_finit_module as u32,
    libc::SYS_delete_module as u32,
    libc::SYS_kexec_load as u32,
    libc::SYS_kexec_file_load as u32,
    libc::SYS_bpf as u32,
    libc::SYS_add_key as u32,
    libc::SYS_request_key as u32,
    libc::SYS_keyctl as u32,
    libc::SYS_userfaultfd as u32,
    libc::SYS_perf_event_open as u32,
    libc::SYS_acct as u32,
    libc::SYS_swapon as u32,
    libc::SYS_swapoff as u32,
    libc::SYS_open_by_handle_at as u32,
];

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
))]
fn tables() -> Vec<Table> {
    let native = Table {
        arch: NATIVE_ARCH,
        denied: NATIVE_DENIED,
        unshare: libc::SYS_unshare as u32,
        clone: libc::SYS_clone as u32,
        clone3: libc::SYS_clone3 as u32,
        deny_x32: cfg!(target_arch = "x86_64"),
    };
    let mut tables = vec![native];
    // The 32-bit compat tables (asm/unistd_32.h; arm EABI).
    if cfg!(target_arch = "x86_64") {
        tables.push(Table {
            arch: 0x4000_0003, // AUDIT_ARCH_I386
            // init/finit/delete_module, kexec_load, bpf, add_key, request_key, keyctl,
            // userfaultfd, perf_event_open, acct, swapon, swapoff, open_by_handle_at
            // (i386 has no kexec_file_load).
            denied: &[
                128, 350, 129, 283, 357, 286, 287, 288, 374, 336, 51, 87, 115, 342,
            ],
            unshare: 310,
            clone: 120,
            clone3: 435,
            deny_x32: false,
        });
    }
    if cfg!(target_arch = "aarch64") {
        tables.push(Table {
            arch: 0x4000_0028, // AUDIT_ARCH_ARM
            denied: &[
                128, 379, 129, 347, 401, 386, 309, 310, 311, 388, 364, 51, 87, 115, 371,
            ],
            unshare: 337,
            clone: 120,
            clone3: 435,
            deny_x32: false,
        });
    }
    tables
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64"
)))]
fn tables() -> Vec<Table> {
    Vec::new()
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn errno(e: i32) -> sock_filter {
    stmt(RET_K, RET_ERRNO | (e as u32 & 0xffff))
}

/// The instructions of one table, entered with A = the syscall number; every path ends
/// in a return.
fn table_block(t: &Table, nested_userns: bool) -> Vec<sock_filter> {
    let mut b = Vec::new();
    if t.deny_x32 {
        b.push(jump(JGE_K, X32_SYSCALL_BIT, 0, 1));
        b.push(errno(libc::EPERM));
    }
    for nr in t.denied {
        b.push(jump(JEQ_K, *nr, 0, 1));
        b.push(errno(libc::EPERM));
    }
    if !nested_userns {
        b.push(jump(JEQ_K, t.clone3, 0, 1));
        b.push(errno(libc::ENOSYS));
        for nr in [t.unshare, t.clone] {
            // nr matches: load flags, EPERM when CLONE_NEWUSER is set, else allow.
            b.push(jump(JEQ_K, nr, 0, 4));
            b.push(stmt(LD_W_ABS, OFF_ARG0_LO));
            b.push(jump(JSET_K, CLONE_NEWUSER, 0, 1));
            b.push(errno(libc::EPERM));
            b.push(stmt(RET_K, RET_ALLOW));
        }
    }
    b.push(stmt(RET_K, RET_ALLOW));
    b
}

/// Why there is no filter.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompError {
    #[error("no seccomp filter is defined for this architecture ({0})")]
    UnsupportedArch(&'static str),
    #[error("the seccomp filter is too long ({0} instructions)")]
    TooLong(usize),
}

/// The filter program for the build script.
pub(crate) fn program(nested_userns: bool) -> Result<Vec<sock_filter>, SeccompError> {
    let tables = tables();
    if tables.is_empty() {
        return Err(SeccompError::UnsupportedArch(std::env::consts::ARCH));
    }
    let mut prog = vec![stmt(LD_W_ABS, OFF_ARCH)];
    for t in &tables {
        let mut block = vec![stmt(LD_W_ABS, OFF_NR)];
        block.extend(table_block(t, nested_userns));
        let skip = u8::try_from(block.len()).map_err(|_| SeccompError::TooLong(block.len()))?;
        prog.push(jump(JEQ_K, t.arch, 0, skip));
        prog.extend(block);
    }
    // Any other architecture cannot occur on this kernel; allow rather than kill.
    prog.push(stmt(RET_K, RET_ALLOW));
    if prog.len() > usize::from(u16::MAX) {
        return Err(SeccompError::TooLong(prog.len()));
    }
    Ok(prog)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny classic-BPF interpreter for the instructions this module emits.
    fn eval(prog: &[sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        let data = |off: u32| match off {
            OFF_NR => nr,
            OFF_ARCH => arch,
            OFF_ARG0_LO => arg0 as u32,
            _ => panic!("unexpected load at {off}"),
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => a = data(i.k),
                RET_K => return i.k,
                JEQ_K | JGE_K | JSET_K => {
                    let taken = match i.code {
                        JEQ_K => a == i.k,
                        JGE_K => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn the_filter_compiles_for_this_arch() {
        let prog = program(false).expect("a filter for this architecture");
        assert!(prog.len() < 200, "{}", prog.len());
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn denied_calls_get_eperm_and_the_rest_is_allowed() {
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let enosys = RET_ERRNO | libc::ENOSYS as u32;
        let prog = program(false).unwrap();
        let call = |nr: libc::c_long, arg0: u64| eval(&prog, NATIVE_ARCH, nr as u32, arg0);
        for nr in [
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
        ] {
            assert_eq!(call(nr, 0), eperm, "syscall {nr}");
        }
        let newuser = libc::CLONE_NEWUSER as u64;
        let newns = libc::CLONE_NEWNS as u64;
        assert_eq!(call(libc::SYS_unshare, newuser | newns), eperm);
        assert_eq!(call(libc::SYS_unshare, newns), RET_ALLOW);
        assert_eq!(call(libc::SYS_clone, newuser), eperm);
        assert_eq!(call(libc::SYS_clone, libc::SIGCHLD as u64), RET_ALLOW);
        assert_eq!(call(libc::SYS_clone3, 0), enosys);
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_mount,
        ] {
            assert_eq!(call(nr, 0), RET_ALLOW, "syscall {nr}");
        }
        // The compat table: i386's keyctl (288) / arm's keyctl (311), and their unshare.
        let (compat, keyctl, unshare) = if cfg!(target_arch = "x86_64") {
            (0x4000_0003, 288, 310)
        } else {
            (0x4000_0028, 311, 337)
        };
        assert_eq!(eval(&prog, compat, keyctl, 0), eperm);
        assert_eq!(eval(&prog, compat, unshare, newuser), eperm);
        assert_eq!(eval(&prog, compat, 3, 0), RET_ALLOW);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(eval(&prog, NATIVE_ARCH, X32_SYSCALL_BIT | 1, 0), eperm);
        }
        // The layer asked for nested user namespaces.
        let open = program(true).unwrap();
        let call = |nr: libc::c_long, arg0: u64| eval(&open, NATIVE_ARCH, nr as u32, arg0);
        assert_eq!(call(libc::SYS_unshare, newuser), RET_ALLOW);
        assert_eq!(call(libc::SYS_clone3, 0), RET_ALLOW);
        assert_eq!(call(libc::SYS_keyctl, 0), eperm);
    }
}
