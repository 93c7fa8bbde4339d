//! The gateway's own addresses: never a data target (a PORT naming one that
//! is no live pinhole of its client is a bounce aimed at the gateway, RFC
//! 2577 section 3) and never the upstream of a transparent session (a loop).
//!
//! The set is the host's interface addresses (getifaddrs(3), which reads
//! them over netlink), cached and read again at most once per
//! [`REFRESH`]: an address added or removed is seen within that time, and a
//! burst of look-ups costs one enumeration. It holds at most
//! [`MAX_ADDRESSES`] entries. Loopback and unspecified addresses always
//! count as the gateway's own.
//!
//! Binding a socket to the address (the earlier probe) is no test: with
//! `net.ipv4.ip_nonlocal_bind` or `net.ipv6.ip_nonlocal_bind` set, as on
//! many HA boxes, every bind succeeds.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::policy::canonical_ip;

/// How old the cached set may be before a look-up reads it again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Addresses kept; an edge box with more is misconfigured, and the set
/// must not grow with it.
pub const MAX_ADDRESSES: usize = 4096;

/// Lists up to `limit` addresses of this host.
type Source = fn(usize) -> io::Result<HashSet<IpAddr>>;

/// The cached set of the gateway's own addresses.
pub struct LocalAddrs {
    source: Source,
    refresh: Duration,
    cached: Mutex<Option<Snapshot>>,
}

struct Snapshot {
    taken: Instant,
    addrs: Arc<HashSet<IpAddr>>,
}

impl Default for LocalAddrs {
    fn default() -> Self {
        LocalAddrs::new()
    }
}

impl LocalAddrs {
    /// The host's interface addresses, refreshed every [`REFRESH`].
    pub fn new() -> LocalAddrs {
        LocalAddrs::with_source(interface_addresses, REFRESH)
    }

    /// Reads the addresses from `source` instead (tests).
    pub fn with_source(source: Source, refresh: Duration) -> LocalAddrs {
        LocalAddrs {
            source,
            refresh,
            cached: Mutex::new(None),
        }
    }

    /// Whether `ip` is one of the gateway's own addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip.is_loopback() || ip.is_unspecified() || self.current().contains(&ip)
    }

    /// The set, read again if it is older than the refresh interval. When
    /// the host cannot be asked, the last set stays in use.
    fn current(&self) -> Arc<HashSet<IpAddr>> {
        let now = Instant::now();
        // The set stays consistent even if a holder panicked.
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cached.as_ref()
            && now.duration_since(s.taken) < self.refresh
        {
            return Arc::clone(&s.addrs);
        }
        let addrs = match (self.source)(MAX_ADDRESSES) {
            Ok(mut addrs) => {
                // A source that ignored the limit is cut to it.
                if addrs.len() > MAX_ADDRESSES {
                    addrs = addrs.into_iter().take(MAX_ADDRESSES).collect();
                }
                Arc::new(addrs)
            }
            Err(e) => {
                tracing::warn!("cannot list the gateway's addresses: {e}");
                cached
                    .as_ref()
                    .map_or_else(Arc::default, |s| Arc::clone(&s.addrs))
            }
        };
        *cached = Some(Snapshot {
            taken: now,
            addrs: Arc::clone(&addrs),
        });
        addrs
    }
}

/// Up to `limit` addresses of this host's interfaces, canonical.
#[cfg(unix)]
fn interface_addresses(limit: usize) -> io::Result<HashSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = HashSet::new();
    let mut node = head;
    while !node.is_null() && addrs.len() < limit {
        // SAFETY: `node` is an element of the list getifaddrs returned,
        // which stays valid until freeifaddrs below.
        let ifa = unsafe { &*node };
        // SAFETY: ifa_addr is null or points to a sockaddr of the family
        // it names, owned by the same list.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            addrs.insert(canonical_ip(ip));
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// The IP address in `sa`, for IPv4 and IPv6 socket addresses.
///
/// # Safety
/// `sa` is null or points to a valid socket address of the family it names.
#[cfg(unix)]
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a valid sockaddr; the casts follow
    // its family.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                // s_addr holds the octets in network order.
                Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// Without getifaddrs, only loopback and unspecified addresses are known.
#[cfg(not(unix))]
fn interface_addresses(_limit: usize) -> io::Result<HashSet<IpAddr>> {
    Ok(HashSet::new())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_unspecified_and_the_hosts_interface_addresses_are_own() {
        let local = LocalAddrs::new();
        for own in [
            "127.0.0.1",
            "127.0.0.53",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert!(local.contains(ip(own)), "{own}");
        }
        // Every address getifaddrs lists is own; a documentation address
        // no test host carries is not.
        let listed = interface_addresses(MAX_ADDRESSES).unwrap();
        for own in &listed {
            assert!(local.contains(*own), "{own}");
        }
        assert!(!local.contains(ip("203.0.113.77")));
        assert!(!local.contains(ip("2001:db8:ffff::77")));
    }

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    fn counted(_limit: usize) -> io::Result<HashSet<IpAddr>> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        Ok(HashSet::from([ip("198.51.100.1"), ip("::ffff:192.0.2.1")]))
    }

    #[test]
    fn the_set_is_read_once_per_refresh_interval_and_mapped_addresses_match() {
        let local = LocalAddrs::with_source(counted, Duration::from_secs(3600));
        for _ in 0..100 {
            assert!(local.contains(ip("198.51.100.1")));
            assert!(local.contains(ip("::ffff:198.51.100.1")));
            assert!(!local.contains(ip("198.51.100.20")));
        }
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    }

    fn too_many(_limit: usize) -> io::Result<HashSet<IpAddr>> {
        Ok((0..=u32::try_from(MAX_ADDRESSES).unwrap())
            .map(|n| IpAddr::from((0x0a00_0000 + n).to_be_bytes()))
            .collect())
    }

    #[test]
    fn the_set_is_bounded() {
        let local = LocalAddrs::with_source(too_many, Duration::from_secs(3600));
        assert!(local.current().len() <= MAX_ADDRESSES);
    }

    fn failing(_limit: usize) -> io::Result<HashSet<IpAddr>> {
        Err(io::Error::other("no netlink"))
    }

    #[test]
    fn a_failing_source_keeps_loopback_own_and_nothing_else() {
        let local = LocalAddrs::with_source(failing, Duration::ZERO);
        assert!(local.contains(ip("127.0.0.1")));
        assert!(!local.contains(ip("198.51.100.1")));
    }
}
