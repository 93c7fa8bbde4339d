//! Opening NETLINK_NETFILTER sockets and the socket options both users need.
//!
//! The socket lives in the network namespace of the thread that opens it, so
//! tests that `unshare(CLONE_NEWNET)` on a thread open their sockets there.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};

/// A bound NETLINK_NETFILTER socket with extended ACKs turned on, so kernel
/// errors can carry a reason and the offset of the offending attribute
/// (NETLINK_EXT_ACK, linux/netlink.h), and capped ACKs, so an error does not
/// echo the whole request back (NETLINK_CAP_ACK).
pub(crate) fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    // Both are optional refinements: old kernels without them still work.
    let _ = sock.set_ext_ack(true);
    let _ = sock.set_cap_ack(true);
    Ok(sock)
}

fn setsockopt_int(
    sock: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `sock`, and the option value
    // is a c_int whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Bounds every blocking `recv` (SO_RCVTIMEO), so a lost reply turns into a
/// timeout instead of a thread stuck forever.
pub(crate) fn set_recv_timeout(sock: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: as above, with a timeval.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks for a receive buffer of `bytes`: SO_RCVBUFFORCE ignores
/// net.core.rmem_max but needs CAP_NET_ADMIN; without it SO_RCVBUF is capped
/// at rmem_max. Returns what the kernel granted (it doubles the request for
/// bookkeeping, socket(7)).
pub(crate) fn grow_receive_buffer(sock: &Socket, bytes: usize) -> io::Result<usize> {
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want).is_err() {
        setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_RCVBUF, want)?;
    }
    sock.get_rx_buf_sz()
}

/// The errno of an io::Error, or 0.
pub(crate) fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
