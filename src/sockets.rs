//! Listening sockets and what a redirected connection was addressed to:
//! shared by the control listeners and the kernel plane's fall-through
//! listener.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::proto::policy::canonical;

/// Binds one listener address. IPv6 wildcards are IPv6-only so that an IPv4
/// wildcard on the same port can coexist.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The destination a redirected connection was addressed to
/// (SO_ORIGINAL_DST, IPv4 or IPv6), canonicalised.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    original_dst_at(stream, stream.local_addr().ok()?)
}

/// [`original_dst`] of a stream whose local address the caller has.
pub fn original_dst_at(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let orig = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    orig.ok().and_then(|a| a.as_socket()).map(canonical)
}
