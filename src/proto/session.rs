//! One control session: both directions, the pending-command FIFO, the
//! login state, the pinholes it asked for and its timers.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Side;
use super::command::{
    self, ArgError, Command, CommandClass, EpsvArg, Verb, af_number, format_eprt_arg,
    format_host_port,
};
use super::deny::{Denial, DenyReason};
use super::framing::{Frame, LineFramer, check_line_bytes, telnet_decode, telnet_encode_into};
use super::policy::{ControlPeers, DataRequest, Decision, Policy, canonical, canonical_ip};
use super::reply::{self, Code, ReplyLine};

/// Everything a session needs to know that does not change during it.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub policy: Policy,
    /// Longest command line accepted from the client, in bytes.
    pub max_command_line: usize,
    /// Longest reply line accepted from the server, in bytes.
    pub max_reply_line: usize,
    /// Pinholes (waiting or carrying data) one session may hold.
    pub max_pinholes: usize,
    /// How long a pinhole waits for its peer.
    pub pinhole_timeout: Duration,
    /// Time from connect to a successful login.
    pub login_timeout: Duration,
    /// Control-channel silence tolerated while no data connection is open.
    pub idle_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            policy: Policy::default(),
            max_command_line: 2048,
            max_reply_line: 8192,
            max_pinholes: 2,
            pinhole_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
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

/// Names a pinhole within its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinholeId(pub u64);

/// Names an outstanding [`Event::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolveId(pub u64);

/// The daemon's handle for a pinhole of another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForeignPinhole(pub u64);

/// Who connects to a pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// PORT/EPRT: the server connects in, the gateway connects to the client.
    Active,
    /// PASV/EPSV: the client connects in, the gateway connects to the server.
    Passive,
}

impl DataMode {
    fn connecting_side(self) -> Side {
        match self {
            DataMode::Active => Side::Server,
            DataMode::Passive => Side::Client,
        }
    }
}

/// What the daemon must open: listen on `listen_ip` (a free port of its
/// range), accept one connection from `expected_peer` only, then connect
/// from `connect_from` to `connect_to` and relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinholeRequest {
    pub id: PinholeId,
    pub mode: DataMode,
    pub listen_ip: IpAddr,
    pub expected_peer: IpAddr,
    pub connect_to: SocketAddr,
    pub connect_from: IpAddr,
}

/// The endpoint behind a pinhole of the gateway, found by [`Event::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub pinhole: ForeignPinhole,
    pub endpoint: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholeClose {
    /// A newer PORT/PASV replaced it (RFC 959: one data address at a time).
    Superseded,
    /// Its peer did not connect in time.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteKind {
    Port,
    Eprt,
    Pasv,
    Epsv,
    /// A PORT/EPRT passed on for a server-to-server transfer.
    Fxp,
}

impl RewriteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RewriteKind::Port => "port",
            RewriteKind::Eprt => "eprt",
            RewriteKind::Pasv => "pasv",
            RewriteKind::Epsv => "epsv",
            RewriteKind::Fxp => "fxp",
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
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ServerClosed => "server_closed",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::NotFtp => "not_ftp",
        }
    }
}

/// What the core asks of the daemon, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Open a pinhole; answer with `handle_pinhole_opened` or
    /// `handle_pinhole_failed`.
    OpenPinhole(PinholeRequest),
    /// Close a pinhole of this session that is still waiting.
    ClosePinhole {
        id: PinholeId,
        cause: PinholeClose,
    },
    /// Is `target` one of the gateway's own pinholes? Answer with
    /// `handle_resolved`.
    Resolve {
        id: ResolveId,
        target: SocketAddr,
    },
    /// Close another session's pinhole: its endpoint now gets a direct
    /// server-to-server connection instead.
    TakeOverPinhole(ForeignPinhole),
    Deny(Denial),
    /// An address-bearing line was rewritten (or passed on, for FXP).
    Rewrite {
        kind: RewriteKind,
        address_replaced: bool,
    },
    /// The user logged in.
    LoggedIn,
    /// Flush what is queued for each side, then close the session.
    Close(CloseReason),
}

/// Pipelined commands tolerated without replies before the core stops
/// reading the client (backpressure, not loss).
const MAX_PENDING: usize = 256;
/// Lines of a multi-line reply to PASV/EPSV kept while waiting for its end.
const MAX_PASSIVE_BUFFER: usize = 16 * 1024;
/// Longest command argument copied into a deny event.
const MAX_LOGGED_ARG: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// PASV / 227.
    Pasv,
    /// EPSV / 229.
    Epsv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PassivePlan {
    /// What the client asked for and gets back.
    client: Style,
    /// What the gateway sent upstream.
    upstream: Style,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// USER/PASS/ACCT: a 230 or 232 logs in.
    Login(LoginEnd),
    /// REIN.
    Rein(LoginEnd),
    Passive(PassivePlan),
    Other,
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
enum LoginEnd {
    EndedLogin,
    NoLogin,
}

/// An entry of the FIFO that pairs replies with commands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// The server's greeting.
    Greeting,
    /// A forwarded command awaiting its final reply.
    Command(Expect),
    /// The gateway's own reply to a command it did not forward; sent once
    /// every earlier command has its reply, so order is kept.
    Local(Vec<u8>),
}

/// A PORT/EPRT held back while the daemon works on it.
#[derive(Debug, Clone)]
struct ActiveCommand {
    verb: Verb,
    verb_text: String,
    arg: String,
    target: SocketAddr,
}

#[derive(Debug, Clone)]
enum HeldCommand {
    Resolving(ResolveId, ActiveCommand),
    Opening(PinholeId, ActiveCommand),
}

/// The final line of a 227/229 reply, held until its pinhole is open.
#[derive(Debug, Clone)]
struct HeldReply {
    id: PinholeId,
    plan: PassivePlan,
    line: Vec<u8>,
    replaced: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Requested,
    Waiting {
        expires: Instant,
        listen: SocketAddr,
    },
    Connected,
}

#[derive(Debug, Clone)]
struct Slot {
    id: PinholeId,
    mode: DataMode,
    expected_peer: IpAddr,
    state: SlotState,
}

/// Where the gateway's own reply to a refusal goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// A reply to a client command: queued behind earlier commands.
    Queued,
    /// Replaces the server's reply to the command now being answered.
    InPlace,
    /// No reply.
    Silent,
}

/// The sans-IO control session. See the module documentation of
/// [`crate::proto`] for the event model.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    ep: Endpoints,
    peers: ControlPeers,
    client_in: LineFramer,
    server_in: LineFramer,
    to_client: Vec<u8>,
    to_server: Vec<u8>,
    events: VecDeque<Event>,
    pending: VecDeque<Pending>,
    open_reply: Option<Code>,
    passive_lines: Vec<Vec<u8>>,
    passive_bytes: usize,
    seen_server_line: bool,
    logged_in: bool,
    epsv_all: bool,
    closed: bool,
    held_command: Option<HeldCommand>,
    held_reply: Option<HeldReply>,
    slots: Vec<Slot>,
    /// Commands seen per class since the last `take_command_counts`.
    command_counts: [u64; CommandClass::ALL.len()],
    next_id: u64,
    login_deadline: Option<Instant>,
    last_activity: Instant,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, ep: Endpoints, now: Instant) -> Self {
        let ep = Endpoints {
            client: canonical(ep.client),
            client_local: canonical(ep.client_local),
            server: canonical(ep.server),
            server_local: canonical(ep.server_local),
            advertise: ep.advertise.map(canonical_ip),
        };
        Session {
            peers: ControlPeers {
                client: ep.client.ip(),
                server: ep.server.ip(),
            },
            client_in: LineFramer::new(cfg.max_command_line),
            server_in: LineFramer::new(cfg.max_reply_line),
            to_client: Vec::new(),
            to_server: Vec::new(),
            events: VecDeque::new(),
            pending: VecDeque::from([Pending::Greeting]),
            open_reply: None,
            passive_lines: Vec::new(),
            passive_bytes: 0,
            seen_server_line: false,
            logged_in: false,
            epsv_all: false,
            closed: false,
            held_command: None,
            held_reply: None,
            slots: Vec::new(),
            command_counts: [0; CommandClass::ALL.len()],
            next_id: 1,
            login_deadline: Some(now + cfg.login_timeout),
            last_activity: now,
            cfg,
            ep,
        }
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.ep
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether the daemon should read more from `from`. False while a line
    /// from that side is held, or too many commands await replies.
    pub fn wants_input(&self, from: Side) -> bool {
        !self.closed
            && match from {
                Side::Client => self.held_command.is_none() && self.pending.len() < MAX_PENDING,
                Side::Server => self.held_reply.is_none(),
            }
    }

    /// Bytes received from `from`.
    pub fn handle_input(&mut self, from: Side, data: &[u8], now: Instant) {
        if self.closed {
            return;
        }
        self.last_activity = now;
        match from {
            Side::Client => self.client_in.push(data),
            Side::Server => self.server_in.push(data),
        }
        self.drain(now);
    }

    /// `from` closed its end of the control connection.
    pub fn handle_eof(&mut self, from: Side, _now: Instant) {
        self.close(match from {
            Side::Client => CloseReason::ClientClosed,
            Side::Server => CloseReason::ServerClosed,
        });
    }

    /// The daemon answers an [`Event::Resolve`].
    pub fn handle_resolved(&mut self, id: ResolveId, found: Option<Resolved>, now: Instant) {
        match self.held_command.take() {
            Some(HeldCommand::Resolving(held_id, cmd)) if held_id == id => {
                self.decide_active(cmd, found);
                self.drain(now);
            }
            other => self.held_command = other,
        }
    }

    /// The pinhole `id` listens on `listen`.
    pub fn handle_pinhole_opened(&mut self, id: PinholeId, listen: SocketAddr, now: Instant) {
        let listen = canonical(listen);
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            return;
        };
        slot.state = SlotState::Waiting {
            expires: now + self.cfg.pinhole_timeout,
            listen,
        };
        match self.held_command.take() {
            Some(HeldCommand::Opening(held_id, cmd)) if held_id == id => {
                self.forward_active(&cmd, listen);
            }
            other => self.held_command = other,
        }
        if self.held_reply.as_ref().is_some_and(|h| h.id == id)
            && let Some(held) = self.held_reply.take()
        {
            self.send_passive_reply(held, listen);
        }
        self.drain(now);
    }

    /// The daemon could not open pinhole `id`.
    pub fn handle_pinhole_failed(&mut self, id: PinholeId, now: Instant) {
        self.slots.retain(|s| s.id != id);
        let refusal = Denial::new(DenyReason::PinholeUnavailable, Side::Client);
        const REPLY: &str = "425 Can't open data connection: no pinhole available.";
        match self.held_command.take() {
            Some(HeldCommand::Opening(held_id, cmd)) if held_id == id => {
                self.refuse(with_command(refusal.clone(), &cmd), REPLY, Route::Queued);
            }
            other => self.held_command = other,
        }
        if self.held_reply.as_ref().is_some_and(|h| h.id == id) {
            self.held_reply = None;
            self.refuse(refusal, REPLY, Route::InPlace);
            self.flush_local_replies();
        }
        self.drain(now);
    }

    /// The expected peer connected to pinhole `id`; it now carries data.
    pub fn handle_pinhole_connected(&mut self, id: PinholeId, _now: Instant) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.state = SlotState::Connected;
        }
    }

    /// Pinhole `id` and any data connection through it are gone.
    pub fn handle_pinhole_closed(&mut self, id: PinholeId, now: Instant) {
        self.slots.retain(|s| s.id != id);
        if self.slots.is_empty() {
            // A long transfer is activity: the idle clock restarts after it.
            self.last_activity = self.last_activity.max(now);
        }
    }

    /// The earliest time `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let login = self.login_deadline.filter(|_| !self.logged_in);
        let idle = self
            .slots
            .is_empty()
            .then(|| self.last_activity + self.cfg.idle_timeout);
        let pinholes = self.slots.iter().filter_map(|s| match s.state {
            SlotState::Waiting { expires, .. } => Some(expires),
            _ => None,
        });
        login.into_iter().chain(idle).chain(pinholes).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let mut expired = Vec::new();
        self.slots.retain(|s| match s.state {
            SlotState::Waiting { expires, listen } if expires <= now => {
                expired.push((s.clone(), listen));
                false
            }
            _ => true,
        });
        for (slot, listen) in expired {
            self.events.push_back(Event::ClosePinhole {
                id: slot.id,
                cause: PinholeClose::Expired,
            });
            let denial = Denial::new(DenyReason::PinholeExpired, slot.mode.connecting_side())
                .target(listen)
                .expected_peer(slot.expected_peer);
            self.refuse(denial, "", Route::Silent);
        }
        if !self.logged_in && self.login_deadline.is_some_and(|d| d <= now) {
            self.close_with_reply(
                "421 Login timed out: closing control connection.",
                CloseReason::LoginTimeout,
            );
        } else if self.slots.is_empty() && self.last_activity + self.cfg.idle_timeout <= now {
            self.close_with_reply(
                "421 Idle timeout: closing control connection.",
                CloseReason::IdleTimeout,
            );
        }
    }

    /// The next action for the daemon.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes the bytes to write to `to`.
    /// Commands per class since the last call (for metrics).
    pub fn take_command_counts(&mut self) -> impl Iterator<Item = (CommandClass, u64)> + use<> {
        let counts = std::mem::take(&mut self.command_counts);
        CommandClass::ALL
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
    }

    pub fn take_transmit(&mut self, to: Side) -> Vec<u8> {
        match to {
            Side::Client => std::mem::take(&mut self.to_client),
            Side::Server => std::mem::take(&mut self.to_server),
        }
    }

    // ---- input processing -------------------------------------------------

    /// Handles every line that can be handled now.
    ///
    /// The order does not depend on how the bytes were cut into reads, so
    /// the result is the same as if each line had arrived on its own:
    /// - Client lines go first, as far as they can. Handling one never
    ///   unblocks the server side, but a server reply can unblock the client
    ///   (it frees a pending slot at `MAX_PENDING`), so the client goes again
    ///   after every server line. (Reading all server lines of a read first
    ///   made a reply that arrived in the same read as earlier replies
    ///   unsolicited, and the same reply in a read of its own paired with a
    ///   command: a 227 was rewritten or not depending on TCP segmentation.)
    /// - When a client line becomes held, the drain stops until the daemon
    ///   answers (every answer drains again); otherwise the rest of a server
    ///   read would be handled before the answer, and the same lines read
    ///   separately after it.
    fn drain(&mut self, now: Instant) {
        loop {
            while self.wants_input(Side::Client) {
                let Some(frame) = self.client_in.next_frame() else {
                    break;
                };
                self.on_client_frame(frame, now);
                if self.held_command.is_some() {
                    return;
                }
            }
            if !self.wants_input(Side::Server) {
                return;
            }
            let Some(frame) = self.server_in.next_frame() else {
                return;
            };
            self.on_server_frame(frame);
        }
    }

    fn on_client_frame(&mut self, frame: Frame, now: Instant) {
        let raw = match frame {
            Frame::Line(raw) => raw,
            Frame::TooLong(_) => {
                let denial = Denial::new(DenyReason::LineTooLong, Side::Client);
                return self.refuse(denial, "500 Command line too long.", Route::Queued);
            }
        };
        let line = telnet_decode(&raw);
        if check_line_bytes(&line).is_err() {
            let denial = Denial::new(DenyReason::MalformedLine, Side::Client);
            return self.refuse(
                denial,
                "500 Syntax error: bare CR or NUL in command line.",
                Route::Queued,
            );
        }
        let Ok(cmd) = command::parse_command(&line) else {
            let denial = Denial::new(DenyReason::MalformedCommand, Side::Client);
            return self.refuse(
                denial,
                "500 Syntax error, command unrecognized.",
                Route::Queued,
            );
        };
        let class = cmd.class();
        if let Some(i) = CommandClass::ALL.iter().position(|c| *c == class) {
            self.command_counts[i] += 1;
        }
        match cmd.verb {
            Verb::Port | Verb::Eprt => self.on_active_command(&cmd),
            Verb::Pasv | Verb::Epsv => self.on_passive_command(&cmd, &line),
            Verb::Lprt | Verb::Lpsv | Verb::Spsv => self.refuse(
                command_denial(DenyReason::UnsupportedCommand, &cmd),
                "502 Command not implemented: use EPRT or EPSV.",
                Route::Queued,
            ),
            Verb::Auth | Verb::Protected => self.refuse(
                command_denial(DenyReason::AuthRefused, &cmd).rule("auth_tls"),
                "534 Request denied for policy reasons: the control channel must stay inspectable.",
                Route::Queued,
            ),
            Verb::User | Verb::Pass | Verb::Acct => {
                let mut end = LoginEnd::NoLogin;
                if cmd.verb == Verb::User && self.logged_in {
                    // A new USER starts a new login (RFC 959 section 4.1.1).
                    self.logged_in = false;
                    end = LoginEnd::EndedLogin;
                }
                self.forward_line(&line, Expect::Login(end));
            }
            Verb::Rein => {
                let end = if self.logged_in {
                    LoginEnd::EndedLogin
                } else {
                    LoginEnd::NoLogin
                };
                self.logged_in = false;
                self.login_deadline = Some(now + self.cfg.login_timeout);
                self.forward_line(&line, Expect::Rein(end));
            }
            Verb::Quit | Verb::Other => self.forward_line(&line, Expect::Other),
        }
    }

    /// The checks every data-connection command shares. `Err` carries the
    /// refusal.
    fn data_command_allowed(&self, cmd: &Command) -> Result<(), (DenyReason, &'static str)> {
        if !self.logged_in {
            return Err((DenyReason::NotLoggedIn, "530 Please log in first."));
        }
        if self.epsv_all && !(cmd.verb == Verb::Epsv) {
            return Err((
                DenyReason::EpsvAll,
                "503 EPSV ALL in effect: only EPSV may set up data connections.",
            ));
        }
        Ok(())
    }

    fn on_active_command(&mut self, cmd: &Command) {
        if let Err((reason, reply)) = self.data_command_allowed(cmd) {
            return self.refuse(command_denial(reason, cmd), reply, Route::Queued);
        }
        let arg = cmd.arg.unwrap_or_default();
        let parsed = match cmd.verb {
            Verb::Port => command::parse_port_arg(arg).map(SocketAddr::V4),
            _ => command::parse_eprt_arg(arg),
        };
        let target = match parsed {
            Ok(target) => canonical(target),
            Err(ArgError::Syntax) => {
                return self.refuse(
                    command_denial(DenyReason::BadArgument, cmd),
                    "501 Syntax error in parameters or arguments.",
                    Route::Queued,
                );
            }
            Err(ArgError::Family) => return self.refuse_family(cmd),
        };
        if af_number(target.ip()) != af_number(self.peers.client) {
            return self.refuse_family(cmd);
        }
        let active = ActiveCommand {
            verb: cmd.verb,
            verb_text: cmd.verb_text.clone(),
            arg: loggable_arg(cmd),
            target,
        };
        if target.ip() == self.peers.client {
            self.decide_active(active, None);
        } else {
            // Maybe one of the gateway's own pinholes (server-to-server).
            let id = ResolveId(self.allocate_id());
            self.events.push_back(Event::Resolve { id, target });
            self.held_command = Some(HeldCommand::Resolving(id, active));
        }
    }

    fn refuse_family(&mut self, cmd: &Command) {
        let reply = match af_number(self.peers.client) {
            1 => "522 Network protocol not supported, use (1).",
            _ => "522 Network protocol not supported, use (2).",
        };
        self.refuse(
            command_denial(DenyReason::AddressFamily, cmd),
            reply,
            Route::Queued,
        );
    }

    fn decide_active(&mut self, cmd: ActiveCommand, found: Option<Resolved>) {
        let request = DataRequest::Active {
            target: cmd.target,
            behind_pinhole: found.map(|r| canonical(r.endpoint)),
        };
        match self.cfg.policy.decide(self.peers, request) {
            Decision::Deny { reason, rule } => {
                let denial = with_command(Denial::new(reason, Side::Client), &cmd)
                    .target(request_endpoint(request))
                    .rule(rule);
                self.refuse(
                    denial,
                    "504 Data connection target refused by policy.",
                    Route::Queued,
                );
            }
            Decision::Relay { endpoint, .. } => {
                let Some(id) = self.reserve_slot(DataMode::Active, self.peers.server) else {
                    let denial =
                        with_command(Denial::new(DenyReason::PinholeLimit, Side::Client), &cmd);
                    return self.refuse(
                        denial,
                        "425 Can't open data connection: too many open data connections.",
                        Route::Queued,
                    );
                };
                self.events.push_back(Event::OpenPinhole(PinholeRequest {
                    id,
                    mode: DataMode::Active,
                    listen_ip: self.ep.server_local.ip(),
                    expected_peer: self.peers.server,
                    connect_to: endpoint,
                    connect_from: self.ep.client_local.ip(),
                }));
                self.held_command = Some(HeldCommand::Opening(id, cmd));
            }
            Decision::Direct { endpoint, .. } => {
                if let Some(found) = found {
                    self.events.push_back(Event::TakeOverPinhole(found.pinhole));
                }
                let line = active_line(cmd.verb, endpoint);
                self.forward_line(line.as_bytes(), Expect::Other);
                self.events.push_back(Event::Rewrite {
                    kind: RewriteKind::Fxp,
                    address_replaced: found.is_some(),
                });
            }
        }
    }

    fn forward_active(&mut self, cmd: &ActiveCommand, listen: SocketAddr) {
        let line = active_line(cmd.verb, listen);
        let kind = if line.starts_with("PORT") {
            RewriteKind::Port
        } else {
            RewriteKind::Eprt
        };
        self.forward_line(line.as_bytes(), Expect::Other);
        self.events.push_back(Event::Rewrite {
            kind,
            address_replaced: true,
        });
    }

    fn on_passive_command(&mut self, cmd: &Command, line: &[u8]) {
        if let Err((reason, reply)) = self.data_command_allowed(cmd) {
            return self.refuse(command_denial(reason, cmd), reply, Route::Queued);
        }
        let client_af = af_number(self.peers.client);
        let client = match cmd.verb {
            // The 227 must name an IPv4 address of the gateway. An IPv4
            // client reaching an IPv6-only gateway address (PROXY protocol
            // behind a balancer) has none: refused here, not a panic later.
            Verb::Pasv if client_af == 1 && self.pasv_announce_ip().is_some() => Style::Pasv,
            // PASV can only name an IPv4 address (RFC 2428 section 1).
            Verb::Pasv => return self.refuse_family(cmd),
            _ => match command::parse_epsv_arg(cmd.arg) {
                Ok(EpsvArg::All) => {
                    self.epsv_all = true;
                    return self.forward_line(line, Expect::Other);
                }
                Ok(EpsvArg::Any) => Style::Epsv,
                Ok(EpsvArg::Family(af)) if af == client_af => Style::Epsv,
                Ok(EpsvArg::Family(_)) | Err(ArgError::Family) => return self.refuse_family(cmd),
                Err(ArgError::Syntax) => {
                    return self.refuse(
                        command_denial(DenyReason::BadArgument, cmd),
                        "501 Syntax error in parameters or arguments.",
                        Route::Queued,
                    );
                }
            },
        };
        // The upstream side may use another family than the client side.
        let upstream = if client == Style::Pasv && af_number(self.peers.server) == 1 {
            Style::Pasv
        } else {
            Style::Epsv
        };
        let verb: &[u8] = match upstream {
            Style::Pasv => b"PASV",
            Style::Epsv => b"EPSV",
        };
        self.forward_line(verb, Expect::Passive(PassivePlan { client, upstream }));
    }

    fn on_server_frame(&mut self, frame: Frame) {
        let (line, malformed) = match frame {
            Frame::TooLong(head) => (head, true),
            Frame::Line(raw) => {
                let line = telnet_decode(&raw).into_owned();
                let malformed = check_line_bytes(&line).is_err();
                (line, malformed)
            }
        };
        let first = !self.seen_server_line;
        self.seen_server_line = true;
        let class = reply::classify(&line, self.open_reply);
        if first && (malformed || class.is_none()) {
            // A stream that does not start like FTP gets no ALG actions.
            self.server_line_refused(DenyReason::NotFtp);
            return self.close(CloseReason::NotFtp);
        }
        let Some(class) = class else {
            // Not part of any reply: never forwarded.
            return self.server_line_refused(DenyReason::MalformedReply);
        };
        match class {
            ReplyLine::Text if malformed => self.server_line_refused(DenyReason::MalformedReply),
            ReplyLine::Text => self.reply_text(line),
            ReplyLine::Start(code) => {
                self.open_reply = Some(code);
                let line = if malformed {
                    self.server_line_refused(DenyReason::MalformedReply);
                    withheld(code, '-')
                } else {
                    line
                };
                self.reply_text(line);
            }
            ReplyLine::End(code) => {
                self.open_reply = None;
                self.reply_end(code, line, malformed);
            }
        }
    }

    /// A line inside a reply that is not its end.
    fn reply_text(&mut self, line: Vec<u8>) {
        if matches!(
            self.pending.front(),
            Some(Pending::Command(Expect::Passive(_)))
        ) {
            // Held until the end: only the final line of a passive reply
            // reaches the client, so no server address leaks through.
            if self.passive_bytes + line.len() <= MAX_PASSIVE_BUFFER {
                self.passive_bytes += line.len();
                self.passive_lines.push(line);
            }
        } else {
            self.send_line_to_client(&line);
        }
    }

    fn reply_end(&mut self, code: Code, line: Vec<u8>, malformed: bool) {
        // A malformed final 227/229 to a pending PASV/EPSV is refused by
        // on_passive_reply as malformed_passive_reply (with the 425 the
        // client gets); logging it here too would make two deny events for
        // one refusal.
        let passive_final = matches!(code, Code(227) | Code(229))
            && matches!(
                self.pending.front(),
                Some(Pending::Command(Expect::Passive(_)))
            );
        if malformed && !passive_final {
            self.server_line_refused(DenyReason::MalformedReply);
        }
        let line = if malformed { withheld(code, ' ') } else { line };
        if code.is_preliminary() {
            // 1yz: the command goes on; its final reply comes later.
            self.flush_passive_lines();
            self.send_line_to_client(&line);
            return;
        }
        match self.pending.pop_front() {
            Some(Pending::Greeting) | Some(Pending::Command(Expect::Other)) | None => {
                self.send_line_to_client(&line);
            }
            Some(Pending::Command(Expect::Login(end))) => {
                if matches!(code, Code(230) | Code(232)) && !self.logged_in {
                    self.logged_in = true;
                    self.login_deadline = None;
                    self.events.push_back(Event::LoggedIn);
                } else {
                    self.login_refused(end, code);
                }
                self.send_line_to_client(&line);
            }
            Some(Pending::Command(Expect::Rein(end))) => {
                self.login_refused(end, code);
                self.send_line_to_client(&line);
            }
            Some(Pending::Command(Expect::Passive(plan))) => {
                self.on_passive_reply(plan, code, line, malformed);
            }
            Some(local @ Pending::Local(_)) => {
                // A reply nobody asked for while a local one waits.
                self.pending.push_front(local);
                self.send_line_to_client(&line);
            }
        }
        self.flush_local_replies();
    }

    /// The final reply to a USER or REIN that ended a login: a 4yz/5yz
    /// means the server kept that login (see [`LoginEnd`]).
    fn login_refused(&mut self, end: LoginEnd, code: Code) {
        if end == LoginEnd::EndedLogin && code.0 >= 400 && !self.logged_in {
            self.logged_in = true;
            self.login_deadline = None;
        }
    }

    fn on_passive_reply(&mut self, plan: PassivePlan, code: Code, line: Vec<u8>, malformed: bool) {
        if code != Code(227) && code != Code(229) {
            // An error reply: passed on whole.
            self.flush_passive_lines();
            return self.send_line_to_client(&line);
        }
        self.passive_lines.clear();
        self.passive_bytes = 0;
        let announced = match (malformed, plan.upstream, code) {
            (false, Style::Pasv, Code(227)) => {
                reply::parse_227(&line).map(|p| SocketAddr::V4(p.addr))
            }
            (false, Style::Epsv, Code(229)) => {
                reply::parse_229(&line).map(|p| SocketAddr::new(self.peers.server, p.port))
            }
            _ => None,
        };
        let Some(announced) = announced else {
            return self.refuse(
                Denial::new(DenyReason::MalformedPassiveReply, Side::Server),
                "425 Can't open data connection: unusable passive reply from server.",
                Route::InPlace,
            );
        };
        let announced = canonical(announced);
        match self
            .cfg
            .policy
            .decide(self.peers, DataRequest::Passive { announced })
        {
            Decision::Relay { endpoint, replaced } => {
                let Some(id) = self.reserve_slot(DataMode::Passive, self.peers.client) else {
                    return self.refuse(
                        Denial::new(DenyReason::PinholeLimit, Side::Client),
                        "425 Can't open data connection: too many open data connections.",
                        Route::InPlace,
                    );
                };
                self.events.push_back(Event::OpenPinhole(PinholeRequest {
                    id,
                    mode: DataMode::Passive,
                    listen_ip: self.ep.client_local.ip(),
                    expected_peer: self.peers.client,
                    connect_to: endpoint,
                    connect_from: self.ep.server_local.ip(),
                }));
                self.held_reply = Some(HeldReply {
                    id,
                    plan,
                    line,
                    replaced,
                });
            }
            Decision::Deny { reason, rule } => {
                let denial = Denial::new(reason, Side::Server)
                    .target(announced)
                    .rule(rule);
                self.refuse(
                    denial,
                    "425 Can't open data connection: passive address refused by policy.",
                    Route::InPlace,
                );
            }
            Decision::Direct { .. } => unreachable!("passive requests are always relayed"),
        }
    }

    /// The gateway address a 227 names: the advertised address, else the
    /// address the client connected to, when it is IPv4.
    fn pasv_announce_ip(&self) -> Option<Ipv4Addr> {
        match (self.ep.advertise, self.ep.client_local.ip()) {
            (Some(IpAddr::V4(ip)), _) | (_, IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }

    fn send_passive_reply(&mut self, held: HeldReply, listen: SocketAddr) {
        let port = listen.port();
        let line: Vec<u8> = match held.plan.client {
            Style::Pasv => {
                let Some(ip) = self.pasv_announce_ip() else {
                    // The endpoints never change, and on_passive_command
                    // only plans a 227 when this address exists.
                    unreachable!("PASV is refused without an IPv4 address to announce")
                };
                let numbers = format_host_port(SocketAddrV4::new(ip, port));
                match (held.plan.upstream, reply::parse_227(&held.line)) {
                    (Style::Pasv, Some(p)) => reply::splice(&held.line, p.span, &numbers),
                    _ => format!("227 Entering Passive Mode ({numbers}).").into_bytes(),
                }
            }
            Style::Epsv => match (held.plan.upstream, reply::parse_229(&held.line)) {
                (Style::Epsv, Some(p)) => reply::splice(&held.line, p.span, &port.to_string()),
                _ => format!("229 Entering Extended Passive Mode (|||{port}|)").into_bytes(),
            },
        };
        self.send_line_to_client(&line);
        self.events.push_back(Event::Rewrite {
            kind: match held.plan.client {
                Style::Pasv => RewriteKind::Pasv,
                Style::Epsv => RewriteKind::Epsv,
            },
            address_replaced: held.replaced,
        });
        self.flush_local_replies();
    }

    // ---- output ----------------------------------------------------------

    fn forward_line(&mut self, line: &[u8], expect: Expect) {
        telnet_encode_into(line, &mut self.to_server);
        self.to_server.extend_from_slice(b"\r\n");
        self.pending.push_back(Pending::Command(expect));
    }

    fn send_line_to_client(&mut self, line: &[u8]) {
        telnet_encode_into(line, &mut self.to_client);
        self.to_client.extend_from_slice(b"\r\n");
    }

    fn flush_passive_lines(&mut self) {
        for line in std::mem::take(&mut self.passive_lines) {
            self.send_line_to_client(&line);
        }
        self.passive_bytes = 0;
    }

    /// Sends the gateway's own replies that have reached the head of the
    /// FIFO, unless a server reply is in the middle of being relayed.
    fn flush_local_replies(&mut self) {
        while self.open_reply.is_none() && self.held_reply.is_none() {
            match self.pending.front() {
                Some(Pending::Local(_)) => {
                    if let Some(Pending::Local(reply)) = self.pending.pop_front() {
                        self.to_client.extend_from_slice(&reply);
                    }
                }
                _ => return,
            }
        }
    }

    /// A server line the gateway will not pass on: logged, nobody answered.
    fn server_line_refused(&mut self, reason: DenyReason) {
        self.refuse(Denial::new(reason, Side::Server), "", Route::Silent);
    }

    /// Every refusal goes through here: one deny event, one reply.
    fn refuse(&mut self, mut denial: Denial, reply: &str, route: Route) {
        if route != Route::Silent {
            denial.reply = Some(reply.to_string());
        }
        self.events.push_back(Event::Deny(denial));
        let bytes = format!("{reply}\r\n").into_bytes();
        match route {
            Route::Queued => {
                self.pending.push_back(Pending::Local(bytes));
                self.flush_local_replies();
            }
            Route::InPlace => self.to_client.extend_from_slice(&bytes),
            Route::Silent => {}
        }
    }

    fn close_with_reply(&mut self, reply: &str, reason: CloseReason) {
        // RFC 959 allows 421 at any time when the service shuts down.
        self.to_client.extend_from_slice(reply.as_bytes());
        self.to_client.extend_from_slice(b"\r\n");
        self.close(reason);
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            self.events.push_back(Event::Close(reason));
        }
    }

    // ---- pinholes --------------------------------------------------------

    fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Claims a pinhole slot. A new data-connection offer supersedes the
    /// ones still waiting (RFC 959: the server keeps one data address).
    fn reserve_slot(&mut self, mode: DataMode, expected_peer: IpAddr) -> Option<PinholeId> {
        let mut superseded = Vec::new();
        self.slots.retain(|s| match s.state {
            SlotState::Waiting { .. } => {
                superseded.push(s.id);
                false
            }
            _ => true,
        });
        for id in superseded {
            self.events.push_back(Event::ClosePinhole {
                id,
                cause: PinholeClose::Superseded,
            });
        }
        if self.slots.len() >= self.cfg.max_pinholes {
            return None;
        }
        let id = PinholeId(self.allocate_id());
        self.slots.push(Slot {
            id,
            mode,
            expected_peer,
            state: SlotState::Requested,
        });
        Some(id)
    }
}

fn request_endpoint(request: DataRequest) -> SocketAddr {
    match request {
        DataRequest::Active {
            target,
            behind_pinhole,
        } => behind_pinhole.unwrap_or(target),
        DataRequest::Passive { announced } => announced,
    }
}

/// The PORT or EPRT line the gateway sends for `addr`: PORT only when the
/// client used PORT and the address is IPv4.
fn active_line(verb: Verb, addr: SocketAddr) -> String {
    match (verb, addr) {
        (Verb::Port, SocketAddr::V4(v4)) => format!("PORT {}", format_host_port(v4)),
        _ => format!("EPRT {}", format_eprt_arg(addr)),
    }
}

/// The text that replaces a malformed server line.
fn withheld(code: Code, sep: char) -> Vec<u8> {
    format!("{}{sep}(reply line withheld by ftpgate: malformed)", code.0).into_bytes()
}

fn loggable_arg(cmd: &Command) -> String {
    match cmd.arg {
        Some(_) if cmd.verb.is_secret() => String::new(),
        Some(arg) => {
            let text = String::from_utf8_lossy(arg);
            text.chars().take(MAX_LOGGED_ARG).collect()
        }
        None => String::new(),
    }
}

fn command_denial(reason: DenyReason, cmd: &Command) -> Denial {
    let mut d = Denial::new(reason, Side::Client);
    d.verb = Some(cmd.verb_text.clone());
    let arg = loggable_arg(cmd);
    d.argument = (!arg.is_empty()).then_some(arg);
    d
}

fn with_command(mut d: Denial, cmd: &ActiveCommand) -> Denial {
    d.verb = Some(cmd.verb_text.clone());
    d.argument = Some(cmd.arg.clone());
    d.target.get_or_insert(cmd.target);
    d
}
