//! Where a download may go. A remote submission's http(s) imports and `tar` base URLs
//! reach public addresses only: not loopback, link-local (the cloud metadata service at
//! 169.254.169.254 among them), private (RFC 1918, CGNAT, ULA `fc00::/7`), unspecified,
//! multicast or broadcast ones, nor those forms hidden in IPv6 (`::ffff:127.0.0.1`,
//! NAT64, 6to4). The coordinator's operator may allow more with `farm coordinator
//! --allow-fetch CIDR|HOST`; the embedded mode fetches anything, as stacker does.
//!
//! The check is made where the HTTP client connects: a name is resolved by
//! [`GuardedResolver`], which hands the client only the allowed addresses (the address
//! checked is the address connected to: no second lookup to race); an IP literal, which
//! the client never resolves, is checked before each request and at every redirect
//! ([`check_url`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

/// What a download may reach.
#[derive(Debug, Clone, Default)]
pub enum Destinations {
    /// Every address (a local build; tests).
    #[default]
    Any,
    /// Public addresses, and what the list allows besides.
    Public(Arc<AllowList>),
}

/// Addresses and host names the operator allows beyond public addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<Allowed>);

/// One `--allow-fetch` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Addresses in a network (`10.0.0.0/8`, `127.0.0.1`, `fd00::/8`).
    Net(Net),
    /// A host name, whatever it resolves to (`mirror.internal`).
    Host(String),
}

/// An address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(&n.octets(), &a.octets(), self.prefix.into())
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix_eq(&n.octets(), &a.octets(), self.prefix.into())
            }
            (IpAddr::V4(_), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|a| self.contains(IpAddr::V4(a))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: usize) -> bool {
    let (bytes, rest) = (bits / 8, bits % 8);
    a[..bytes] == b[..bytes]
        && (rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            a[bytes] & mask == b[bytes] & mask
        })
}

/// A bad `--allow-fetch` value.
#[derive(Debug, thiserror::Error)]
#[error(
    "--allow-fetch {value:?}: {reason} (write a network like 10.0.0.0/8 or fd00::/8, an address, or a host name)"
)]
pub struct BadAllowed {
    value: String,
    reason: String,
}

impl FromStr for Allowed {
    type Err = BadAllowed;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| BadAllowed {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        match addr.parse::<IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    None => max,
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?,
                };
                Ok(Allowed::Net(Net { addr: ip, prefix }))
            }
            Err(_) if prefix.is_some() => Err(bad("not an IP network")),
            Err(_) => {
                let host = s.to_ascii_lowercase();
                if host
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
                {
                    Ok(Allowed::Host(host.trim_end_matches('.').to_string()))
                } else {
                    Err(bad("not an address, a network or a host name"))
                }
            }
        }
    }
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Net(n) => write!(f, "{}/{}", n.addr, n.prefix),
            Allowed::Host(h) => f.write_str(h),
        }
    }
}

impl AllowList {
    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.0
            .iter()
            .any(|a| matches!(a, Allowed::Host(h) if h.eq_ignore_ascii_case(host)))
    }

    fn allows_addr(&self, ip: IpAddr) -> bool {
        self.0
            .iter()
            .any(|a| matches!(a, Allowed::Net(n) if n.contains(ip)))
    }

    /// Is `ip`, reached as `host`, allowed? `Err` says why not.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), Refused> {
        match reserved(ip) {
            Some(kind) if !self.allows_host(host) && !self.allows_addr(ip) => Err(Refused {
                host: host.to_string(),
                addr: ip,
                kind,
            }),
            _ => Ok(()),
        }
    }
}

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Loopback,
    /// Including the cloud metadata service (169.254.169.254).
    LinkLocal,
    /// RFC 1918, CGNAT (100.64.0.0/10), unique local IPv6 (fc00::/7).
    Private,
    Unspecified,
    Multicast,
    Broadcast,
    /// Documentation, benchmarking, reserved for future use, site-local IPv6.
    Special,
}

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reserved::Loopback => "a loopback address",
            Reserved::LinkLocal => "a link-local address (where cloud metadata services live)",
            Reserved::Private => "a private address",
            Reserved::Unspecified => "an unspecified address",
            Reserved::Multicast => "a multicast address",
            Reserved::Broadcast => "the broadcast address",
            Reserved::Special => "a reserved address",
        })
    }
}

/// What kind of non-public address `ip` is (`None`: public).
pub fn reserved(ip: IpAddr) -> Option<Reserved> {
    match ip {
        IpAddr::V4(v4) => reserved_v4(v4),
        IpAddr::V6(v6) => reserved_v6(v6),
    }
}

fn reserved_v4(ip: Ipv4Addr) -> Option<Reserved> {
    let o = ip.octets();
    Some(if ip.is_loopback() {
        Reserved::Loopback
    } else if ip.is_link_local() {
        Reserved::LinkLocal
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Reserved::Private
    } else if o[0] == 0 {
        // 0.0.0.0/8, "this network": 0.0.0.0 reaches this host.
        Reserved::Unspecified
    } else if ip.is_multicast() {
        Reserved::Multicast
    } else if ip.is_broadcast() {
        Reserved::Broadcast
    } else if ip.is_documentation()
        || o[0] >= 240
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        Reserved::Special
    } else {
        return None;
    })
}

fn reserved_v6(ip: Ipv6Addr) -> Option<Reserved> {
    // IPv4 in IPv6: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64
    // (64:ff9b::/96) and 6to4 (2002:AABB:CCDD::/48) reach the IPv4 address.
    let s = ip.segments();
    let o = ip.octets();
    let embedded = if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if (s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified())
        || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
    {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return reserved_v4(v4);
    }
    Some(if ip.is_loopback() {
        Reserved::Loopback
    } else if ip.is_unspecified() {
        Reserved::Unspecified
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Reserved::LinkLocal
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Reserved::Private
    } else if ip.is_multicast() {
        Reserved::Multicast
    } else if (s[0] & 0xffc0) == 0xfec0 || (s[0] == 0x2001 && s[1] == 0xdb8) {
        Reserved::Special
    } else {
        return None;
    })
}

/// A destination a download may not reach.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{host} is {addr}, {kind}: a coordinator fetches only public addresses for a remote \
     submission (its operator may allow this one with `farm coordinator --allow-fetch {allow}`)",
    allow = if host.parse::<IpAddr>().is_ok() { addr.to_string() } else { host.clone() }
)]
pub struct Refused {
    pub host: String,
    pub addr: IpAddr,
    pub kind: Reserved,
}

/// Check a URL whose host is an IP literal (the HTTP client does not resolve those);
/// names are checked when they are resolved ([`GuardedResolver`]).
pub fn check_url(allow: &AllowList, url: &reqwest::Url) -> Result<(), Refused> {
    let host = url.host_str().unwrap_or_default();
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    allow.check(&ip.to_string(), ip)
}

/// Resolves names for the HTTP client of remote submissions, keeping only allowed
/// addresses; none left is a [`Refused`].
#[derive(Debug)]
pub struct GuardedResolver(pub Arc<AllowList>);

/// No address for a name.
#[derive(Debug, thiserror::Error)]
#[error("{0} has no address")]
struct NoAddress(String);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let mut kept = Vec::with_capacity(found.len());
            for addr in found {
                match allow.check(&host, addr.ip()) {
                    Ok(()) => kept.push(addr),
                    Err(e) => {
                        tracing::debug!(host, addr = %addr.ip(), "address refused: {e}");
                        refused.get_or_insert(e);
                    }
                }
            }
            if kept.is_empty() {
                return Err(match refused {
                    Some(e) => Box::new(e) as Box<dyn std::error::Error + Send + Sync>,
                    None => Box::new(NoAddress(host)),
                });
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The redirect policy of remote submissions: at most 10, each checked like the first
/// request.
pub fn redirect_policy(allow: Arc<AllowList>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("too many redirects (more than 10)");
        }
        match check_url(&allow, attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

/// The [`Refused`] somewhere in `e`'s sources, if that is why it failed.
pub fn refused_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut source: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList(entries.iter().map(|e| e.parse().unwrap()).collect())
    }

    #[test]
    fn reserved_addresses_are_told_apart_from_public_ones() {
        let kind = |s: &str| reserved(s.parse().unwrap());
        assert_eq!(kind("127.0.0.1"), Some(Reserved::Loopback));
        assert_eq!(kind("127.9.9.9"), Some(Reserved::Loopback));
        assert_eq!(kind("::1"), Some(Reserved::Loopback));
        assert_eq!(kind("169.254.169.254"), Some(Reserved::LinkLocal));
        assert_eq!(kind("fe80::1"), Some(Reserved::LinkLocal));
        for private in ["10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1"] {
            assert_eq!(kind(private), Some(Reserved::Private), "{private}");
        }
        assert_eq!(kind("100.64.0.1"), Some(Reserved::Private));
        assert_eq!(kind("fd00::1"), Some(Reserved::Private));
        assert_eq!(kind("fc00::1"), Some(Reserved::Private));
        assert_eq!(kind("0.0.0.0"), Some(Reserved::Unspecified));
        assert_eq!(kind("::"), Some(Reserved::Unspecified));
        assert_eq!(kind("224.0.0.1"), Some(Reserved::Multicast));
        assert_eq!(kind("255.255.255.255"), Some(Reserved::Broadcast));
        // IPv4 hidden in IPv6 is the IPv4 address.
        assert_eq!(kind("::ffff:127.0.0.1"), Some(Reserved::Loopback));
        assert_eq!(kind("::ffff:169.254.169.254"), Some(Reserved::LinkLocal));
        assert_eq!(kind("::127.0.0.1"), Some(Reserved::Loopback));
        assert_eq!(kind("64:ff9b::10.0.0.1"), Some(Reserved::Private));
        assert_eq!(kind("2002:7f00:1::"), Some(Reserved::Loopback));
        for public in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "2606:4700::1111"] {
            assert_eq!(kind(public), None, "{public}");
        }
    }

    #[test]
    fn the_allow_list_takes_networks_addresses_and_names() {
        let allow = list(&["10.0.0.0/8", "127.0.0.1", "mirror.internal", "fd00::/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allow.check("x", ip("10.200.0.1")).is_ok());
        assert!(allow.check("x", ip("127.0.0.1")).is_ok());
        assert!(allow.check("x", ip("::ffff:127.0.0.1")).is_ok());
        assert!(allow.check("x", ip("127.0.0.2")).is_err());
        assert!(allow.check("MIRROR.internal.", ip("192.168.0.9")).is_ok());
        assert!(allow.check("fd12::1", ip("fd12::1")).is_ok());
        assert!(allow.check("fe80::1", ip("fe80::1")).is_err());
        assert!(allow.check("x", ip("8.8.8.8")).is_ok(), "public: always");
        let e = AllowList::default()
            .check("localhost", ip("127.0.0.1"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("localhost is 127.0.0.1, a loopback address"),
            "{msg}"
        );
        assert!(msg.contains("--allow-fetch localhost"), "{msg}");
        for bad in ["", "10.0.0.0/33", "nonsense/8", "a b", "::1/129"] {
            assert!(bad.parse::<Allowed>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_literals_in_urls_are_checked() {
        let allow = AllowList::default();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(check_url(&allow, &url("http://127.0.0.1:8080/x")).is_err());
        assert!(check_url(&allow, &url("http://[::ffff:7f00:1]/x")).is_err());
        assert!(check_url(&allow, &url("http://169.254.169.254/latest/")).is_err());
        assert!(check_url(&allow, &url("http://1.1.1.1/x")).is_ok());
        // Names are the resolver's to check.
        assert!(check_url(&allow, &url("http://example.com/x")).is_ok());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_by_the_resolver() {
        use reqwest::dns::Resolve;
        let resolver = GuardedResolver(Arc::new(AllowList::default()));
        let e = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let refused = refused_in(e.as_ref()).expect("a Refused");
        assert_eq!(refused.kind, Reserved::Loopback);
        let allowed = GuardedResolver(Arc::new(list(&["localhost"])));
        let addrs: Vec<_> = allowed
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
