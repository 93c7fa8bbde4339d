//! Linux: each direction moves bytes socket -> pipe -> socket with splice(2),
//! so the payload pages are handed from one socket to the other inside the
//! kernel and never copied through a userland buffer.
//!
//! Readiness comes from tokio (`async_io` on the streams), so a relay is still
//! one task and no thread blocks in splice.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Count, IdleClock};

/// The pipe of one direction. Both ends close on drop.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the kernel granted, which may be less than was asked for.
    capacity: usize,
}

impl Pipe {
    /// A non-blocking pipe of about `wanted` bytes. Fails only if no pipe can
    /// be had at all (EMFILE, ENFILE); a refused size is not an error.
    pub(super) fn new(wanted: usize) -> io::Result<Pipe> {
        let mut fds: [libc::c_int; 2] = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array it
        // is given and touches nothing else.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing
        // else owns; from here on the OwnedFds close them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Growing a pipe is refused (EPERM) beyond fs.pipe-max-size, or once
        // this user holds more than fs.pipe-user-pages-soft pages of pipes
        // (without CAP_SYS_RESOURCE). The pipe still works at the size it
        // has, at the cost of more syscalls per byte, so ignore the refusal
        // and ask what we got.
        let wanted = libc::c_int::try_from(wanted).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        // SAFETY: fcntl on a descriptor we own; F_GETPIPE_SZ takes no argument.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe holds at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Moves `src` to `dst` through `pipe` until EOF on `src`, then half-closes
/// `dst`. Bytes are counted, and the idle clock touched, when they leave the
/// pipe into `dst`: only then has the relay delivered them.
///
/// A peer that has gone away makes splice fail with EPIPE or ECONNRESET,
/// which end the relay as errors. EPIPE also raises SIGPIPE (splice has no
/// MSG_NOSIGNAL); a Rust program ignores SIGPIPE from the start, so this only
/// matters to a non-Rust host that embeds the crate.
pub(super) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    idle: &IdleClock,
    count: &Count,
) -> io::Result<()> {
    loop {
        // The pipe is empty whenever we fill it. That keeps EAGAIN
        // unambiguous: it can only mean "the socket has nothing", which is
        // what `async_io` assumes when it clears the read readiness. EAGAIN
        // from a full pipe would clear it while data waits in the socket,
        // and edge-triggered epoll would never report that data again.
        let filled = src
            .async_io(Interest::READABLE, || {
                splice(src.as_fd(), pipe.write.as_fd(), pipe.capacity)
            })
            .await?;
        if filled == 0 {
            // EOF, and the pipe is empty, so nothing is left undelivered.
            // Half-close: the other side learns this direction is done.
            return SockRef::from(dst).shutdown(Shutdown::Write);
        }
        let mut left = filled;
        while left > 0 {
            // The pipe holds `left` bytes, so EAGAIN here can only come from
            // a full socket send buffer.
            let n = dst
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), dst.as_fd(), left)
                })
                .await?;
            if n == 0 {
                // Cannot happen with bytes in the pipe; never spin on it.
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= n;
            count.add(n);
            idle.touch();
        }
    }
}

/// One splice(2) call, non-blocking on both ends. `Ok(0)` from a socket
/// source is EOF.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the whole call. Null
    // offsets are required for pipes and sockets (they have no position).
    // SPLICE_F_MOVE is a hint: move pages instead of copying where possible.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            ptr::null_mut(),
            to.as_raw_fd(),
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    // Negative means failure, with errno still set: nothing ran in between.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
