//! The FIFO that pairs replies with commands: what each forwarded command
//! expects of its final reply, and the gateway's own replies queued in order.

use std::net::SocketAddr;

use super::types::{DataVerb, PinholeId};

/// Pipelined commands tolerated without replies before the core stops
/// reading the client (backpressure, not loss).
pub(super) const MAX_PENDING: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Style {
    /// PASV / 227.
    Pasv,
    /// EPSV / 229.
    Epsv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PassivePlan {
    /// What the client asked for and gets back.
    pub(super) client: Style,
    /// What the gateway sent upstream.
    pub(super) upstream: Style,
}

impl Style {
    pub(super) fn verb(self) -> DataVerb {
        match self {
            Style::Pasv => DataVerb::Pasv,
            Style::Epsv => DataVerb::Epsv,
        }
    }

    pub(super) fn line(self) -> &'static [u8] {
        match self {
            Style::Pasv => b"PASV",
            Style::Epsv => b"EPSV",
        }
    }
}

/// A client PORT/EPRT sent to the server as PASV/EPSV
/// (`server_data = "passive"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToPassive {
    /// PORT or EPRT.
    pub(super) client: DataVerb,
    pub(super) upstream: Style,
    /// The client's data endpoint, allowed by policy.
    pub(super) target: SocketAddr,
    pub(super) verb_text: String,
    pub(super) arg: String,
}

/// A client PASV/EPSV sent to the server as PORT/EPRT naming pinhole `id`
/// (`server_data = "active"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToActive {
    pub(super) client: Style,
    /// PORT or EPRT.
    pub(super) upstream: DataVerb,
    pub(super) id: PinholeId,
    /// The pinhole's port, on both of its addresses.
    pub(super) port: u16,
    pub(super) verb_text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Expect {
    /// USER/PASS/ACCT: a 230 or 232 logs in.
    Login(LoginEnd),
    /// REIN.
    Rein(LoginEnd),
    Passive(PassivePlan),
    ToPassive(ToPassive),
    ToActive(ToActive),
    /// A command that moves data (RETR, STOR, LIST, ...): its final reply
    /// means its data connection is over (RFC 959 section 5.4: the server
    /// closes or aborts the data connection before the 226/4yz/5yz).
    Transfer,
    /// AUTH sent to the server under a passthrough rule granting this
    /// passive range.
    AuthPassthrough((u16, u16)),
    Other,
}

/// Commands whose final reply ends a data connection (RFC 959 4.1.3,
/// RFC 3659 section 7 for MLSD).
pub(super) fn is_transfer_verb(verb: &str) -> bool {
    const TRANSFER: [&str; 7] = ["RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD"];
    TRANSFER.iter().any(|t| t.eq_ignore_ascii_case(verb))
}

/// Whether a USER or REIN ended a login. The gateway stops treating the
/// session as logged in as soon as it forwards such a command (so nothing
/// pipelined after it can open a pinhole), but when the server refuses the
/// command, its login stands and so must the gateway's: vsftpd answers a
/// second USER with "530 Can't change to another user." and REIN with
/// "502 REIN not implemented." and keeps the user logged in. Without this,
/// every later PORT/PASV was refused with 530 and the login timer closed the
/// session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LoginEnd {
    EndedLogin,
    NoLogin,
}

/// An entry of the FIFO that pairs replies with commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pending {
    /// The server's greeting.
    Greeting,
    /// A forwarded command awaiting its final reply.
    Command(Expect),
    /// The gateway's own reply to a command it did not forward; sent once
    /// every earlier command has its reply, so order is kept.
    Local(Vec<u8>),
}
