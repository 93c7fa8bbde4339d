//! Who counts as one client: an IPv4 address, or an IPv6 address's network
//! prefix (`limits.ipv6_client_prefix`, /64 by default). One IPv6 host
//! usually holds a whole /64 and can pick a fresh address for every
//! connection, so counting IPv6 clients per address would let one of them
//! slip past every per-client limit and every per-source aggregation.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

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
    fn out_of_range_prefixes_are_clamped() {
        assert_eq!(key("2001:db8::1", 0), key("3fff::1", 1));
        assert_eq!(key("2001:db8::1", 200), key("2001:db8::1", 128));
    }
}
