//! Who counts as one client: an IPv4 address, or an IPv6 address's network
//! prefix (`limits.ipv6_client_prefix`, /64 by default). One IPv6 host
//! usually holds a whole /64 and can pick a fresh address for every
//! connection, so counting IPv6 clients per address would let one of them
//! slip past every per-client limit and every per-source aggregation.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::proto::policy::canonical_ip;

/// The IPv6 prefix length that makes one client when the configuration
/// does not say otherwise.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

/// One client, as per-client limits and the deny log's aggregation count
/// it. IPv4-mapped IPv6 addresses are IPv4 clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// The address with the bits beyond `prefix` cleared.
    net: IpAddr,
    /// 32 for IPv4; the configured prefix length for IPv6.
    prefix: u8,
}

impl ClientKey {
    /// The client `ip` belongs to when IPv6 clients are counted per
    /// `/ipv6_prefix` (clamped to 1..=128).
    pub fn of(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => ClientKey {
                net: IpAddr::V4(v4),
                prefix: 32,
            },
            IpAddr::V6(v6) => {
                let prefix = ipv6_prefix.clamp(1, 128);
                let mask = u128::MAX << (128 - u32::from(prefix));
                ClientKey {
                    net: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix,
                }
            }
        }
    }

    /// The IPv6 prefix length this key was made with (what a related
    /// address, e.g. a PASV thief's, is counted with too).
    pub fn ipv6_prefix(&self) -> u8 {
        match self.net {
            IpAddr::V4(_) => DEFAULT_IPV6_PREFIX,
            IpAddr::V6(_) => self.prefix,
        }
    }
}

impl fmt::Display for ClientKey {
    /// `192.0.2.10`, `2001:db8:1::/64`, or a whole IPv6 address for /128.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) if self.prefix == 128 => write!(f, "{v6}"),
            IpAddr::V6(v6) => write!(f, "{v6}/{}", self.prefix),
        }
    }
}

/// The two caps of a [`Counter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub total: usize,
    pub per_client: usize,
}

/// Why a [`Counter`] refused a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("the gateway-wide limit of {0} is reached")]
    Total(usize),
    #[error("the client's limit of {0} is reached")]
    Client(usize),
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    /// Only clients holding claims have an entry, so the map never holds
    /// more entries than the total cap allows claims.
    per_client: HashMap<ClientKey, usize>,
}

/// Counts claims of something (sessions, pinholes, data connections) per
/// client and in total, each under a cap. A claim is a [`Claim`] guard:
/// it is released when dropped, however its holder ends (a panic too).
#[derive(Debug, Default)]
pub struct Counter {
    counts: Mutex<Counts>,
}

impl Counter {
    pub fn new() -> Arc<Counter> {
        Arc::new(Counter::default())
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Plain counters: still consistent after a holder panicked.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more for `client`, if both caps allow it.
    pub fn claim(self: &Arc<Self>, client: ClientKey, caps: Caps) -> Result<Claim, Full> {
        let mut counts = self.lock();
        if counts.total >= caps.total {
            return Err(Full::Total(caps.total));
        }
        let n = counts.per_client.get(&client).copied().unwrap_or(0);
        if n >= caps.per_client {
            return Err(Full::Client(caps.per_client));
        }
        counts.total += 1;
        counts.per_client.insert(client, n + 1);
        Ok(Claim {
            counter: Arc::clone(self),
            client,
        })
    }

    /// Claims held now, by everyone.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Claims `client` holds now.
    pub fn of(&self, client: ClientKey) -> usize {
        self.lock().per_client.get(&client).copied().unwrap_or(0)
    }

    fn release(&self, client: ClientKey) {
        let mut counts = self.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&client);
            }
        }
    }
}

/// One counted claim; released on drop.
#[derive(Debug)]
pub struct Claim {
    counter: Arc<Counter>,
    client: ClientKey,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.counter.release(self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, prefix: u8) -> ClientKey {
        ClientKey::of(ip.parse().unwrap(), prefix)
    }

    #[test]
    fn ipv6_addresses_of_one_prefix_are_one_client() {
        assert_eq!(key("2001:db8:1:2::10", 64), key("2001:db8:1:2:ffff::1", 64));
        assert_ne!(key("2001:db8:1:2::10", 64), key("2001:db8:1:3::10", 64));
        assert_eq!(key("2001:db8:1:2::10", 48), key("2001:db8:1:3::10", 48));
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        assert_eq!(key("2001:db8:1:2::10", 64).to_string(), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8::1", 128).to_string(), "2001:db8::1");
    }

    #[test]
    fn ipv4_clients_are_whole_addresses_mapped_or_not() {
        assert_ne!(key("192.0.2.10", 64), key("192.0.2.11", 64));
        assert_eq!(key("::ffff:192.0.2.10", 64), key("192.0.2.10", 64));
        assert_eq!(key("::ffff:192.0.2.10", 64).to_string(), "192.0.2.10");
    }

    #[test]
    fn claims_are_capped_per_client_and_in_total_and_released_on_drop() {
        let counter = Counter::new();
        let caps = Caps {
            total: 3,
            per_client: 2,
        };
        let (a, b) = (key("192.0.2.1", 64), key("192.0.2.2", 64));
        let a1 = counter.claim(a, caps).unwrap();
        let _a2 = counter.claim(a, caps).unwrap();
        assert_eq!(counter.claim(a, caps).unwrap_err(), Full::Client(2));
        let _b1 = counter.claim(b, caps).unwrap();
        assert_eq!(counter.claim(b, caps).unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!((counter.total(), counter.of(a)), (2, 1));
        let _b2 = counter.claim(b, caps).unwrap();
        // A claim dropped during a panic is released too.
        let c = key("192.0.2.3", 64);
        let wide = Caps {
            total: 10,
            per_client: 10,
        };
        let counter2 = Arc::clone(&counter);
        let panicked = std::thread::spawn(move || {
            let _held = counter2.claim(c, wide).unwrap();
            panic!("a holder panics");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(counter.of(c), 0);
        assert_eq!(counter.total(), 3);
    }

    #[test]
    fn out_of_range_prefixes_are_clamped() {
        assert_eq!(key("2001:db8::1", 0), key("3fff::1", 1));
        assert_eq!(key("2001:db8::1", 200), key("2001:db8::1", 128));
    }
}
