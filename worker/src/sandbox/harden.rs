//! Hardening of the build script beyond its namespaces: the seccomp filter (with
//! `PR_SET_NO_NEW_PRIVS`, installed right before exec) and, for `network: none`, the
//! loopback interface of the sandbox's own network namespace.

use farm_stackerfile::Network;

use super::SandboxSpec;
use super::seccomp::{self, SeccompError};
use crate::sys;

/// The seccomp program for the script; `None` (with a warning) on an architecture
/// farm has no syscall table for.
pub(super) fn script_filter(
    spec: &SandboxSpec,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<libc::sock_filter>>, String> {
    match seccomp::program(spec.nested_userns) {
        Ok(p) => Ok(Some(p)),
        Err(e @ SeccompError::UnsupportedArch(_)) => {
            warnings.push(format!("{e}: the build runs without one"));
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// In init, before the mounts: with `network: none` the sandbox has a network namespace
/// of its own (unshared with the user namespace); bring its loopback up.
pub(super) fn network(spec: &SandboxSpec) -> Result<(), String> {
    match spec.network {
        Network::Host => Ok(()),
        Network::None => {
            sys::loopback_up().map_err(|e| format!("bringing up lo in the build's network: {e}"))
        }
    }
}
