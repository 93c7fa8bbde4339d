//! What the protocol core's scenario tests share (`tests/proto_vectors.rs`,
//! `tests/proto_translation.rs`): the lab's addresses as the driver's
//! `lab_endpoints` has them, address parsing, and the bytes each side got.

// Not every test that includes this file uses every piece.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};

use ftpgate::proto::driver::Transcript;

pub const CLIENT: &str = "192.0.2.10";
pub const GATEWAY_INSIDE: &str = "192.0.2.1";
pub const GATEWAY_OUTSIDE: &str = "198.51.100.1";
pub const SERVER: &str = "198.51.100.20";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The bytes the client and the server got, exactly.
pub fn assert_wire(t: &Transcript, to_client: &str, to_server: &str) {
    assert_eq!(text(&t.to_client), to_client, "bytes to the client");
    assert_eq!(text(&t.to_server), to_server, "bytes to the server");
}
