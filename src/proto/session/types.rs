//! The session's public vocabulary: its configuration, the addresses it is
//! given, the names of pinholes and look-ups, and the events it emits.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::proto::Side;
use crate::proto::deny::Denial;
use crate::proto::policy::Policy;

/// Default of [`SessionConfig::max_refusals`] (and of the config key
/// `limits.max_refused_commands`).
pub const DEFAULT_MAX_REFUSALS: usize = 50;

/// How the gateway opens data connections toward the server (per
/// listener, `server_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerData {
    /// As the client asked: PORT/EPRT stay active, PASV/EPSV passive.
    #[default]
    AsClient,
    /// Every PORT/EPRT becomes PASV/EPSV toward the server: the gateway
    /// connects out to the server's passive port and to the client's port.
    Passive,
    /// Every PASV/EPSV becomes PORT/EPRT toward the server: the gateway
    /// listens for the server's connection and for the client's.
    Active,
}

impl ServerData {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerData::AsClient => "as-client",
            ServerData::Passive => "passive",
            ServerData::Active => "active",
        }
    }
}

/// Everything a session needs to know that does not change during it.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub policy: Policy,
    /// How data connections toward the server are opened.
    pub server_data: ServerData,
    /// Longest command line accepted from the client, in bytes.
    pub max_command_line: usize,
    /// Longest reply line accepted from the server, in bytes.
    pub max_reply_line: usize,
    /// Pinholes (waiting or carrying data) one session may hold.
    pub max_pinholes: usize,
    /// How long a pinhole waits for its peer.
    pub pinhole_timeout: Duration,
    /// Time from connect, or from the latest USER or REIN, to a successful
    /// login.
    pub login_timeout: Duration,
    /// Control-channel silence tolerated while no data connection is open.
    pub idle_timeout: Duration,
    /// Refused client lines a session may send; one more closes it with 421.
    pub max_refusals: usize,
    /// What AUTH TLS does on this session (RFC 4217).
    pub tls: TlsPolicy,
}

/// How a session answers AUTH TLS (RFC 4217), from the listener and
/// `[policy] auth_tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthTls {
    /// 534: the control channel must stay inspectable.
    #[default]
    Refuse,
    /// The gateway is the TLS server toward the client (reverse mode with
    /// a certificate): it answers AUTH, PBSZ and PROT itself and still sees
    /// the plaintext. `implicit`: the connection started with TLS (port 990
    /// style), so the session is secure from its first byte.
    Terminate { implicit: bool },
    /// Transparent mode: AUTH goes to servers named in a rule; after their
    /// 234 the control channel is relayed opaquely. Others get 534.
    Passthrough(Vec<PassthroughRule>),
}

/// A `[[policy.tls_passthrough]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassthroughRule {
    pub name: String,
    pub servers: Vec<ipnet::IpNet>,
    /// The servers' published passive range: what the client may connect
    /// to for the rest of the session.
    pub data_ports: (u16, u16),
}

/// The session's TLS policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    pub auth: AuthTls,
    /// Refuse USER/PASS before AUTH TLS (530), and data connections
    /// without PROT P (521), on a terminating session.
    pub require_tls: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            policy: Policy::default(),
            server_data: ServerData::AsClient,
            max_command_line: 2048,
            max_reply_line: 8192,
            max_pinholes: 2,
            pinhole_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
            max_refusals: DEFAULT_MAX_REFUSALS,
            tls: TlsPolicy::default(),
        }
    }
}

/// The four addresses of the two control connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// The client, as seen on the inside.
    pub client: SocketAddr,
    /// The gateway's address the client connected to.
    pub client_local: SocketAddr,
    /// The upstream server.
    pub server: SocketAddr,
    /// The gateway's address on the upstream connection.
    pub server_local: SocketAddr,
    /// Announced in 227 replies instead of `client_local` (a NAT in front).
    pub advertise: Option<IpAddr>,
}

/// Names a session within the gateway (the daemon's session number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// The one key of a pinhole, everywhere: in the core that owns it, in the
/// data plane that carries it out, and in another session that names it
/// in a server-to-server PORT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinholeId {
    /// The session that asked for it and owns its life.
    pub session: SessionId,
    /// Its number within that session.
    pub seq: u64,
}

/// Names an outstanding [`Event::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolveId(pub u64);

/// Who connects to a pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// PORT/EPRT: the server connects in, the gateway connects to the client.
    Active,
    /// PASV/EPSV: the client connects in, the gateway connects to the server.
    Passive,
}

impl DataMode {
    pub(super) fn connecting_side(self) -> Side {
        match self {
            DataMode::Active => Side::Server,
            DataMode::Passive => Side::Client,
        }
    }
}

/// What the daemon must open: listen on `listen_ip` (a free port of its
/// range), accept one connection from `expected_peer` only, then connect
/// from `connect_from` to `connect_to` and relay. A translated data
/// connection ([`ServerData`]) changes one leg, as `shape` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinholeRequest {
    pub id: PinholeId,
    pub mode: DataMode,
    pub listen_ip: IpAddr,
    pub expected_peer: IpAddr,
    pub connect_to: SocketAddr,
    pub connect_from: IpAddr,
    /// The client's leg speaks TLS (PROT P on a terminated session): the
    /// gateway is its TLS server, whichever side connects.
    pub client_tls: bool,
    pub shape: Shape,
}

/// The legs of a pinhole. Translated shapes are always relayed in
/// userland, whatever the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One leg in (the expected peer connects to the pinhole), one out.
    Relay,
    /// `server_data = "active"`: both legs come in on the same port. The
    /// client (`expected_peer`) connects to `listen_ip`; the server
    /// connects to `server_listen` after the gateway's PORT/EPRT.
    /// `connect_to` and `connect_from` are unused.
    AcceptBoth {
        server_listen: IpAddr,
        server: IpAddr,
    },
    /// `server_data = "passive"`: both legs go out, nothing listens. The
    /// gateway connects from `dial_from` to the server's passive endpoint
    /// `dial` (the server is `expected_peer`), and from `connect_from` to
    /// the client's PORT/EPRT target `connect_to`.
    DialBoth { dial: SocketAddr, dial_from: IpAddr },
}

/// The endpoint behind a pinhole of the gateway, found by [`Event::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// A pinhole of another session of the same client.
    pub pinhole: PinholeId,
    pub endpoint: SocketAddr,
}

/// The daemon's answer to [`Event::Resolve`]: what a PORT/EPRT target that
/// is not the client's own address stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// A live passive pinhole of the gateway that this session's client
    /// opened (in this or another of its sessions): a server-to-server
    /// transfer, decided on the real endpoint behind it.
    Pinhole(Resolved),
    /// One of the gateway's own addresses with no such pinhole there:
    /// never a data target (refused as `bounce`, rule `gateway_address`).
    GatewayAddress,
    /// Not the gateway: a third host.
    Elsewhere,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholeClose {
    /// A newer PORT/PASV replaced it (RFC 959: one data address at a time).
    Superseded,
    /// Its peer did not connect in time.
    Expired,
    /// Another session of the same client sent its address to a second
    /// server (FXP): the servers now connect to each other directly.
    TakenOver,
    /// The server refused the PORT/EPRT the gateway sent for it
    /// (`server_data = "active"`).
    ServerRefused,
}

/// The core's answer to a connection that arrived at one of its pinholes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// The expected peer: carry the connection.
    Accept,
    /// Anyone else, or a pinhole that is no longer waiting: close it.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteKind {
    Port,
    Eprt,
    Pasv,
    Epsv,
    /// A PORT/EPRT passed on for a server-to-server transfer.
    Fxp,
    /// The client's command became another one toward the server: a data
    /// mode conversion (`server_data`) or an address family translation
    /// (RFC 6384), named `<client verb>_to_<server verb>`.
    Translated {
        client: DataVerb,
        server: DataVerb,
    },
}

/// The four data-connection verbs, for naming translations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerb {
    Port,
    Eprt,
    Pasv,
    Epsv,
}

impl RewriteKind {
    pub fn as_str(self) -> &'static str {
        use DataVerb::*;
        match self {
            RewriteKind::Port => "port",
            RewriteKind::Eprt => "eprt",
            RewriteKind::Pasv => "pasv",
            RewriteKind::Epsv => "epsv",
            RewriteKind::Fxp => "fxp",
            RewriteKind::Translated { client, server } => match (client, server) {
                (Port, Pasv) => "port_to_pasv",
                (Port, Epsv) => "port_to_epsv",
                (Eprt, Pasv) => "eprt_to_pasv",
                (Eprt, Epsv) => "eprt_to_epsv",
                (Pasv, Port) => "pasv_to_port",
                (Pasv, Eprt) => "pasv_to_eprt",
                (Epsv, Port) => "epsv_to_port",
                (Epsv, Eprt) => "epsv_to_eprt",
                (Pasv, Epsv) => "pasv_to_epsv",
                (Epsv, Pasv) => "epsv_to_pasv",
                (Port, Eprt) => "port_to_eprt",
                (Eprt, Port) => "eprt_to_port",
                (Port, Port) => "port",
                (Eprt, Eprt) => "eprt",
                (Pasv, Pasv) => "pasv",
                (Epsv, Epsv) => "epsv",
            },
        }
    }

    /// The kind for a client verb that went upstream as `server`: the
    /// plain kind when they are the same verb.
    pub fn for_verbs(client: DataVerb, server: DataVerb) -> RewriteKind {
        match (client, server) {
            (DataVerb::Port, DataVerb::Port) => RewriteKind::Port,
            (DataVerb::Eprt, DataVerb::Eprt) => RewriteKind::Eprt,
            (DataVerb::Pasv, DataVerb::Pasv) => RewriteKind::Pasv,
            (DataVerb::Epsv, DataVerb::Epsv) => RewriteKind::Epsv,
            (client, server) => RewriteKind::Translated { client, server },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    ServerClosed,
    LoginTimeout,
    IdleTimeout,
    NotFtp,
    /// The client kept sending refused input past its budget.
    RefusalBudget,
    /// The gateway is shutting down.
    Shutdown,
    /// The TLS handshake on the control connection failed.
    TlsFailed,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::NotFtp => "not_ftp",
            CloseReason::RefusalBudget => "refusal_budget",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TlsFailed => "tls_failed",
        }
    }
}

/// The bytes for one peer that [`super::Session::take_transmit`] hands out,
/// and which of them must go as TCP urgent data.
///
/// The core cannot send urgent data itself (it does no IO); it names the
/// bytes, and the daemon sends each of them with `send(MSG_OOB)` after
/// everything before it and before everything after it. Today these are
/// the IACs of the Synchs in front of ABOR, only ever toward the server
/// (see [`crate::proto::framing::SYNCH_URGENT`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub bytes: Vec<u8>,
    /// Offsets into `bytes`, ascending, of the bytes to send as urgent data.
    pub urgent: Vec<usize>,
}

/// One piece of a [`Transmit`], in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// Ordinary stream data.
    Stream(&'a [u8]),
    /// One byte to send as TCP urgent data (MSG_OOB): the sender's urgent
    /// pointer then points just past it (RFC 854 Synch, BSD convention).
    Urgent(u8),
}

impl Transmit {
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes cut at the urgent ones, in order.
    pub fn chunks(&self) -> Vec<Chunk<'_>> {
        let mut chunks = Vec::with_capacity(2 * self.urgent.len() + 1);
        let mut start = 0;
        for &at in &self.urgent {
            let Some(&byte) = self.bytes.get(at).filter(|_| at >= start) else {
                continue;
            };
            if at > start {
                chunks.push(Chunk::Stream(&self.bytes[start..at]));
            }
            chunks.push(Chunk::Urgent(byte));
            start = at + 1;
        }
        if start < self.bytes.len() {
            chunks.push(Chunk::Stream(&self.bytes[start..]));
        }
        chunks
    }
}

/// What the core asks of the daemon, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Open a pinhole; answer with `handle_pinhole_opened` or
    /// `handle_pinhole_failed`.
    OpenPinhole(PinholeRequest),
    /// Withdraw a pinhole of this session that is still waiting.
    ClosePinhole {
        id: PinholeId,
        cause: PinholeClose,
    },
    /// Is `target` one of the gateway's own pinholes, or one of its own
    /// addresses? Answer with `handle_resolved` and a [`Resolution`].
    Resolve {
        id: ResolveId,
        target: SocketAddr,
    },
    /// Tell the owner of another session's pinhole that its endpoint now
    /// gets a direct server-to-server connection instead (the owner answers
    /// with `handle_pinhole_taken_over` and withdraws it).
    TakeOverPinhole(PinholeId),
    Deny(Denial),
    /// An address-bearing line was rewritten (or passed on, for FXP).
    Rewrite {
        kind: RewriteKind,
        address_replaced: bool,
    },
    /// The user logged in.
    LoggedIn,
    /// The gateway's 234 to AUTH TLS is the last byte queued for the
    /// client: flush it, then run the TLS handshake as server on the client
    /// connection and answer with `handle_tls_established` or
    /// `handle_tls_failed`. The core reads nothing from the client until
    /// then.
    StartTls,
    /// The server accepted AUTH TLS under a passthrough rule: from now on
    /// the shell relays the control connection opaquely (the core reads
    /// nothing more), and the client, only it, may open data connections
    /// to the server on `data_ports` until the session ends.
    Passthrough {
        server: IpAddr,
        data_ports: (u16, u16),
    },
    /// Flush what is queued for each side, then close the session.
    Close(CloseReason),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_chunks_cut_the_bytes_at_each_urgent_byte() {
        let t = Transmit {
            bytes: b"\xff\xf4\xff\xf2ABOR\r\n\xff".to_vec(),
            urgent: vec![2, 10],
        };
        assert_eq!(
            t.chunks(),
            [
                Chunk::Stream(b"\xff\xf4"),
                Chunk::Urgent(0xff),
                Chunk::Stream(b"\xf2ABOR\r\n"),
                Chunk::Urgent(0xff),
            ]
        );
        let first = Transmit {
            bytes: b"ab".to_vec(),
            urgent: vec![0],
        };
        assert_eq!(first.chunks(), [Chunk::Urgent(b'a'), Chunk::Stream(b"b")]);
        // Offsets out of range or out of order are skipped, never a panic.
        let bad = Transmit {
            bytes: b"ab".to_vec(),
            urgent: vec![1, 0, 9],
        };
        assert_eq!(bad.chunks(), [Chunk::Stream(b"a"), Chunk::Urgent(b'b')]);
    }
}
