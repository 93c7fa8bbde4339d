//! The kernel data plane's netlink layer (Linux only).
//!
//! ftpgate keeps policing the FTP control channel in userland; for each
//! negotiated data connection it installs nf_tables set and map elements
//! with timeouts ([`nftables`]), so conntrack and NAT carry the data bytes,
//! and it follows those connections through conntrack events
//! ([`conntrack`]). Everything speaks NETLINK_NETFILTER directly: no `nft`
//! process is spawned.

pub mod conntrack;
pub mod elements;
mod msg;
pub mod nftables;
mod sock;

pub use elements::{
    CtMark, Endpoint, Family, MixedFamily, NftValue, PinholeKey, PinholeSet, SnatSource,
};
pub use nftables::{ElemInfo, ElemOp, NftError, Nftables, SetElem, SetInfo};
