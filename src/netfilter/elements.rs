//! Typed keys and values of the ftpgate sets, and their nftables encoding.
//!
//! A concatenation (`ipv4_addr . ipv4_addr . inet_service`) is stored by the
//! kernel as its components back to back, each padded to a 32-bit register
//! (NFT_REG32_SIZE, linux/netfilter/nf_tables.h): an IPv4 address takes 4
//! bytes, an IPv6 address 16, and an `inet_service` 4: the port in network
//! byte order followed by two zero bytes. That is also what `nft` writes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which of a pair of sets an element belongs in: the ruleset keeps IPv4 and
/// IPv6 apart (`armed4`/`armed6`, ...), since a concatenation has one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The digit that ends the set names of this family ("armed4").
    pub fn suffix(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }

    fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }
}

/// The names of the eight sets of the ruleset `ftpgate nft-rules` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholeSet {
    /// Pinhole keys waiting for their one connection (`armed4`, `armed6`).
    Armed,
    /// Pinhole key -> real endpoint (`dnat4`, `dnat6`).
    Dnat,
    /// Pinhole key -> the conntrack mark its flow gets (`mark4`, `mark6`):
    /// ftpgate's tag in the high 16 bits, the pinhole port in the low 16, so
    /// every live pinhole's flow has a mark of its own.
    Mark,
    /// Conntrack mark -> source address of the onward leg (`snat4`,
    /// `snat6`). Keyed by the mark, not by the packet's addresses: two
    /// pinholes of one client toward the same server port (a server reusing
    /// its passive port) must not share, or delete, each other's element.
    Snat,
}

impl PinholeSet {
    pub const ALL: [PinholeSet; 4] = [
        PinholeSet::Armed,
        PinholeSet::Dnat,
        PinholeSet::Mark,
        PinholeSet::Snat,
    ];

    pub fn name(self, family: Family) -> String {
        let base = match self {
            PinholeSet::Armed => "armed",
            PinholeSet::Dnat => "dnat",
            PinholeSet::Mark => "mark",
            PinholeSet::Snat => "snat",
        };
        format!("{base}{}", family.suffix())
    }

    /// Key length in bytes the kernel reports for this set (NFTA_SET_KEY_LEN).
    pub fn key_len(self, family: Family) -> u32 {
        match self {
            PinholeSet::Snat => 4,
            _ => (2 * family.addr_len() + 4) as u32,
        }
    }

    /// Data length of the map (NFTA_SET_DATA_LEN); `None` for a plain set.
    pub fn data_len(self, family: Family) -> Option<u32> {
        match self {
            PinholeSet::Armed => None,
            PinholeSet::Dnat => Some((family.addr_len() + 4) as u32),
            PinholeSet::Mark => Some(4),
            PinholeSet::Snat => Some(family.addr_len() as u32),
        }
    }
}

/// A conntrack mark as key or data (`mark` type: a 32-bit value in host
/// byte order, as `ct mark` loads it into a register).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtMark(pub u32);

impl CtMark {
    pub fn from_nft_bytes(bytes: &[u8]) -> Option<Self> {
        let b: [u8; 4] = bytes.try_into().ok()?;
        Some(Self(u32::from_ne_bytes(b)))
    }
}

impl NftValue for CtMark {
    fn to_nft_bytes(&self) -> Vec<u8> {
        self.0.to_ne_bytes().to_vec()
    }
}

/// An address pair of two different families cannot form one key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("addresses {0} and {1} are of different families; a set key holds one family")]
pub struct MixedFamily(pub IpAddr, pub IpAddr);

/// Something that is stored in a set as key or data bytes.
pub trait NftValue {
    fn to_nft_bytes(&self) -> Vec<u8>;
}

fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn push_port(out: &mut Vec<u8>, port: u16) {
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

fn read_addr(bytes: &[u8], family: Family) -> Option<IpAddr> {
    match family {
        Family::V4 => {
            let b: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        Family::V6 => {
            let b: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
    }
}

fn read_port(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// The family a key of `len` bytes (addr . addr . port) belongs to.
fn family_of_key_len(len: usize) -> Option<Family> {
    match len {
        12 => Some(Family::V4),
        36 => Some(Family::V6),
        _ => None,
    }
}

/// Key of `armed*` and `dnat*`: (expected peer address, address it connects
/// to, pinhole port), as `ip saddr . ip daddr . tcp dport` sees the SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PinholeKey {
    peer: IpAddr,
    local: IpAddr,
    port: u16,
}

impl PinholeKey {
    /// IPv4-mapped IPv6 addresses (from dual-stack sockets) are taken as the
    /// IPv4 addresses they are on the wire.
    pub fn new(peer: IpAddr, local: IpAddr, port: u16) -> Result<Self, MixedFamily> {
        let (peer, local) = (peer.to_canonical(), local.to_canonical());
        if Family::of(peer) != Family::of(local) {
            return Err(MixedFamily(peer, local));
        }
        Ok(Self { peer, local, port })
    }

    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    pub fn local(&self) -> IpAddr {
        self.local
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn family(&self) -> Family {
        Family::of(self.peer)
    }

    /// Decodes key bytes read back from the kernel; `None` if the length fits
    /// neither family.
    pub fn from_nft_bytes(bytes: &[u8]) -> Option<Self> {
        let family = family_of_key_len(bytes.len())?;
        let n = family.addr_len();
        Some(Self {
            peer: read_addr(bytes, family)?,
            local: read_addr(bytes.get(n..)?, family)?,
            port: read_port(bytes.get(2 * n..)?)?,
        })
    }
}

impl NftValue for PinholeKey {
    fn to_nft_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(36);
        push_addr(&mut out, self.peer);
        push_addr(&mut out, self.local);
        push_port(&mut out, self.port);
        out
    }
}

impl fmt::Display for PinholeKey {
    /// In `nft` syntax: `peer . local . port`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", self.peer, self.local, self.port)
    }
}

/// Data of `dnat*`: the real endpoint the pinhole leads to
/// (`ipv4_addr . inet_service`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint(pub SocketAddr);

impl Endpoint {
    pub fn family(&self) -> Family {
        Family::of(self.0.ip().to_canonical())
    }

    pub fn from_nft_bytes(bytes: &[u8]) -> Option<Self> {
        let family = match bytes.len() {
            8 => Family::V4,
            20 => Family::V6,
            _ => return None,
        };
        let addr = read_addr(bytes, family)?;
        let port = read_port(bytes.get(family.addr_len()..)?)?;
        Some(Self(SocketAddr::new(addr, port)))
    }
}

impl NftValue for Endpoint {
    fn to_nft_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        push_addr(&mut out, self.0.ip().to_canonical());
        push_port(&mut out, self.0.port());
        out
    }
}

/// Data of `snat*`: the source address the gateway uses toward the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnatSource(pub IpAddr);

impl SnatSource {
    pub fn family(&self) -> Family {
        Family::of(self.0.to_canonical())
    }

    pub fn from_nft_bytes(bytes: &[u8]) -> Option<Self> {
        let family = match bytes.len() {
            4 => Family::V4,
            16 => Family::V6,
            _ => return None,
        };
        read_addr(bytes, family).map(Self)
    }
}

impl NftValue for SnatSource {
    fn to_nft_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        push_addr(&mut out, self.0.to_canonical());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn ipv4_key_is_addresses_then_port_padded_to_a_register() {
        let k = PinholeKey::new(ip("192.0.2.1"), ip("198.51.100.2"), 50001).expect("same family");
        assert_eq!(
            k.to_nft_bytes(),
            [192, 0, 2, 1, 198, 51, 100, 2, 0xc3, 0x51, 0, 0]
        );
        assert_eq!(PinholeKey::from_nft_bytes(&k.to_nft_bytes()), Some(k));
        assert_eq!(
            k.to_nft_bytes().len() as u32,
            PinholeSet::Armed.key_len(Family::V4)
        );
    }

    #[test]
    fn ipv6_key_and_endpoint_round_trip() {
        let k = PinholeKey::new(ip("2001:db8::1"), ip("2001:db8::2"), 21).expect("same family");
        let bytes = k.to_nft_bytes();
        assert_eq!(bytes.len(), 36);
        assert_eq!(&bytes[32..], &[0, 21, 0, 0]);
        assert_eq!(PinholeKey::from_nft_bytes(&bytes), Some(k));
        let e = Endpoint("[2001:db8:1::5]:21000".parse().expect("addr"));
        assert_eq!(
            e.to_nft_bytes().len() as u32,
            PinholeSet::Dnat.data_len(Family::V6).unwrap_or(0)
        );
        assert_eq!(Endpoint::from_nft_bytes(&e.to_nft_bytes()), Some(e));
        let s = SnatSource(ip("2001:db8::9"));
        assert_eq!(SnatSource::from_nft_bytes(&s.to_nft_bytes()), Some(s));
    }

    #[test]
    fn mapped_addresses_become_ipv4_and_mixed_families_are_refused() {
        let k = PinholeKey::new(ip("::ffff:192.0.2.1"), ip("198.51.100.2"), 1).expect("mapped");
        assert_eq!(k.family(), Family::V4);
        assert!(PinholeKey::new(ip("2001:db8::1"), ip("192.0.2.1"), 1).is_err());
    }

    #[test]
    fn decoding_odd_lengths_gives_none() {
        for len in [0, 3, 11, 13, 35, 40] {
            assert_eq!(PinholeKey::from_nft_bytes(&vec![0; len]), None);
            assert_eq!(CtMark::from_nft_bytes(&vec![0; len]), None);
            assert_eq!(Endpoint::from_nft_bytes(&vec![0; len]), None);
        }
        assert_eq!(SnatSource::from_nft_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn a_mark_round_trips_in_host_byte_order() {
        let m = CtMark(0xf7a0_c351);
        assert_eq!(m.to_nft_bytes(), 0xf7a0_c351u32.to_ne_bytes().to_vec());
        assert_eq!(CtMark::from_nft_bytes(&m.to_nft_bytes()), Some(m));
        assert_eq!(
            m.to_nft_bytes().len() as u32,
            PinholeSet::Mark.data_len(Family::V4).unwrap_or(0)
        );
        assert_eq!(
            m.to_nft_bytes().len() as u32,
            PinholeSet::Snat.key_len(Family::V6)
        );
    }

    #[test]
    fn set_names_follow_the_ruleset() {
        assert_eq!(PinholeSet::Armed.name(Family::V4), "armed4");
        assert_eq!(PinholeSet::Snat.name(Family::V6), "snat6");
        assert_eq!(PinholeSet::Snat.data_len(Family::V4), Some(4));
    }
}
