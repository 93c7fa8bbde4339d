//! The protocol core: pure and synchronous, no sockets, no clock, no async.
//!
//! # Event model
//!
//! A [`Session`] is one FTP control session seen from the middle. The daemon
//! feeds it bytes as they arrive from either peer with
//! [`Session::handle_input`], passing the current time, and after every call it
//! collects three kinds of output: the bytes to write to each peer
//! ([`Session::take_transmit`], a [`Transmit`] that also names the bytes
//! to send as TCP urgent data: the Synch in front of ABOR, RFC 959 section
//! 4.1.3), the actions to carry out
//! ([`Session::poll_event`]: open or close a pinhole, look up an address, log a
//! refusal, close the session) and the next deadline
//! ([`Session::poll_timeout`]), at which it calls [`Session::handle_timeout`].
//! The core never blocks and never reads a clock, so a test can drive a whole
//! session, timers included, in microseconds and deterministically.
//!
//! Input is framed into lines ([`framing`]); Telnet sequences are removed; a
//! malformed line is answered by the core itself and never forwarded. Client
//! lines are parsed as commands ([`command`]), server lines as replies
//! ([`reply`]). Every forwarded command is appended to a FIFO; every final
//! reply from the server pops it. That pairing is what makes pipelining safe:
//! a 227 is only acted on when it is the final reply to a PASV the gateway
//! forwarded, and the gateway's own replies (refusals) are queued in the same
//! FIFO so the client receives all replies in the order of its commands.
//!
//! An address-bearing line is held, never forwarded as it is. For PORT/EPRT
//! the core checks the target with [`policy::Policy::decide`]; an address that
//! is not the client's own may be one of the gateway's pinholes (a
//! server-to-server transfer) or one of the gateway's own addresses (never a
//! data target), so the core first emits [`Event::Resolve`] and waits for
//! [`Session::handle_resolved`] and its [`Resolution`]. An allowed request becomes
//! [`Event::OpenPinhole`]; only after [`Session::handle_pinhole_opened`]
//! reports the pinhole's address is the rewritten PORT, EPRT, 227 or 229 line
//! emitted. A failure gives the client 425. While a line from one side is
//! held, the core reads no further lines from that side
//! ([`Session::wants_input`] is false), so ordering is kept and memory stays
//! bounded; the other direction keeps flowing.
//!
//! Translation: with [`ServerData::Passive`] a PORT/EPRT the policy allows
//! goes upstream as PASV/EPSV, and the server's passive reply opens a
//! pinhole of [`Shape::DialBoth`] (the gateway connects out to both ends)
//! before the client gets its 200; with [`ServerData::Active`] a PASV/EPSV
//! opens a [`Shape::AcceptBoth`] pinhole first, then PORT/EPRT naming it
//! goes upstream, and the client gets the gateway's 227/229 only after the
//! server's 2yz. A server refusal of a translated command reaches the client
//! as the refusal its own command expects (`translation_refused`). Between
//! an IPv6 client and an IPv4 server, EPSV/EPRT go upstream as PASV/PORT
//! (RFC 6384; `ALGS` switches it per session).
//!
//! Every refusal produces exactly one [`Event::Deny`] carrying a stable
//! [`DenyReason`] and the reply the gateway sent; the daemon turns it into a
//! deny-log line and a counter. So that one session cannot flood the log,
//! a session emits the first few refusals of each reason one by one and
//! counts the rest: a summary [`Denial`] with `suppressed` set follows at
//! most every ten seconds (the `now` passed in) and when the session closes.
//! A client that keeps sending refused lines past `max_refusals` is closed
//! with 421.

pub mod command;
pub mod deny;
pub mod driver;
pub mod framing;
pub mod policy;
pub mod reply;
pub mod session;

pub use deny::{Denial, DenyReason};
pub use policy::{FxpRule, Policy};
pub use session::{
    AuthTls, Chunk, CloseReason, DEFAULT_MAX_REFUSALS, DataMode, DataVerb, DataVerdict, Endpoints,
    Event, PassthroughRule, PinholeClose, PinholeId, PinholeRequest, Resolution, ResolveId,
    Resolved, RewriteKind, ServerData, Session, SessionConfig, SessionId, Shape, TlsPolicy,
    Transmit,
};

/// One end of the control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}
