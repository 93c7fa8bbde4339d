//! One control session: both directions, the pending-command FIFO, the
//! login state, the pinholes it asked for and its timers.
//!
//! This module holds the [`Session`] state, its public `handle_*`/`poll_*`/
//! `take_*` API and the drain loop. The rest lives in one file per concern:
//! `types` (the public vocabulary), `pending` (the FIFO pairing replies
//! with commands), `commands` (client lines), `replies` (server lines),
//! `pinholes` (slots and their expiry), `output` (writing, refusing,
//! closing) and `abuse` (the refusal budget and the deny aggregation).

mod abuse;
mod commands;
mod output;
mod pending;
mod pinholes;
mod replies;
mod tls;
mod types;

pub use types::{
    AuthTls, Chunk, CloseReason, DEFAULT_MAX_REFUSALS, DataMode, DataVerb, DataVerdict, Endpoints,
    Event, PassthroughRule, PinholeClose, PinholeId, PinholeRequest, Resolution, ResolveId,
    Resolved, RewriteKind, ServerData, SessionConfig, SessionId, Shape, TlsPolicy, Transmit,
};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Side;
use super::command::CommandClass;
use super::deny::{Denial, DenyReason};
use super::framing::LineFramer;
use super::policy::{ControlPeers, canonical, canonical_ip};
use super::reply::Code;
use abuse::DenyTally;
use commands::{HeldCommand, with_command};
use output::{IDLE_TIMED_OUT, LOGIN_TIMED_OUT, NO_DATA_LEGS, NO_PINHOLE, Route, SHUTTING_DOWN};
use pending::{MAX_PENDING, Pending};
use pinholes::{Slot, SlotState};
use replies::{HeldReply, PassiveLines};

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
    /// Offsets into `to_server` of the bytes that go as urgent data.
    urgent_to_server: Vec<usize>,
    events: VecDeque<Event>,
    pending: VecDeque<Pending>,
    open_reply: Option<Code>,
    /// The lines of a reply to PASV/EPSV read so far.
    passive: PassiveLines,
    /// A line of the reply being read was withheld and logged.
    lookalike_logged: bool,
    seen_server_line: bool,
    logged_in: bool,
    epsv_all: bool,
    /// RFC 6384 translation for an IPv6 client of an IPv4 server (ALGS
    /// ENABLE64/DISABLE64; on by default).
    alg64: bool,
    closed: bool,
    held_command: Option<HeldCommand>,
    held_reply: Option<HeldReply>,
    slots: Vec<Slot>,
    /// Commands seen per class since the last `take_command_counts`.
    command_counts: [u64; CommandClass::ALL.len()],
    /// This session's number: the first half of its pinholes' keys.
    id: SessionId,
    next_id: u64,
    login_deadline: Option<Instant>,
    last_activity: Instant,
    /// The latest time the daemon passed in: what deny aggregation measures
    /// its interval with.
    clock: Instant,
    /// Refused client lines so far, against `cfg.max_refusals`.
    refusals: usize,
    tally: DenyTally,
    /// AUTH/PBSZ/PROT state (RFC 4217).
    tls: tls::TlsState,
    /// The passthrough rule an AUTH awaiting the server's reply went under.
    pending_rule: Option<String>,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, ep: Endpoints, id: SessionId, now: Instant) -> Self {
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
            urgent_to_server: Vec::new(),
            events: VecDeque::new(),
            pending: VecDeque::from([Pending::Greeting]),
            open_reply: None,
            passive: PassiveLines::default(),
            lookalike_logged: false,
            seen_server_line: false,
            logged_in: false,
            epsv_all: false,
            alg64: true,
            closed: false,
            held_command: None,
            held_reply: None,
            slots: Vec::new(),
            command_counts: [0; CommandClass::ALL.len()],
            id,
            next_id: 1,
            login_deadline: Some(now + cfg.login_timeout),
            last_activity: now,
            clock: now,
            refusals: 0,
            tally: DenyTally::default(),
            tls: tls::TlsState::new(&cfg.tls.auth),
            pending_rule: None,
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
                Side::Client => {
                    self.held_command.is_none()
                        && self.pending.len() < MAX_PENDING
                        && self.tls.reads_client()
                }
                Side::Server => self.held_reply.is_none() && self.tls.reads_server(),
            }
    }

    /// Bytes received from `from`.
    pub fn handle_input(&mut self, from: Side, data: &[u8], now: Instant) {
        if self.closed {
            return;
        }
        self.tick(now);
        self.last_activity = now;
        match from {
            Side::Client => self.client_in.push(data),
            Side::Server => self.server_in.push(data),
        }
        self.drain(now);
    }

    /// `from` closed its end of the control connection.
    pub fn handle_eof(&mut self, from: Side, now: Instant) {
        self.tick(now);
        self.close(match from {
            Side::Client => CloseReason::ClientClosed,
            Side::Server => CloseReason::ServerClosed,
        });
    }

    /// The daemon answers an [`Event::Resolve`]. An answer to a look-up
    /// that is no longer outstanding is ignored.
    pub fn handle_resolved(&mut self, id: ResolveId, answer: Resolution, now: Instant) {
        self.tick(now);
        match self.held_command.take() {
            Some(HeldCommand::Resolving(held_id, cmd)) if held_id == id => {
                // The session's own gateway addresses are known here even
                // if the daemon did not recognise them.
                let answer = match answer {
                    Resolution::Elsewhere if self.is_gateway_ip(cmd.target().ip()) => {
                        Resolution::GatewayAddress
                    }
                    other => other,
                };
                self.decide_active(cmd, answer);
                self.drain(now);
            }
            other => self.held_command = other,
        }
    }

    /// The pinhole `id` listens on `listen`.
    pub fn handle_pinhole_opened(&mut self, id: PinholeId, listen: SocketAddr, now: Instant) {
        self.tick(now);
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
            Some(HeldCommand::OpeningBoth(held_id, ask)) if held_id == id => {
                self.forward_converted_port(id, ask, listen.port());
            }
            other => self.held_command = other,
        }
        // The 200 for a PORT/EPRT sent upstream as PASV/EPSV waits for
        // both of its legs (see `release_held_reply`).
        if self
            .held_reply
            .as_ref()
            .is_some_and(|h| h.id == id && !h.waits_for_legs())
            && let Some(held) = self.held_reply.take()
        {
            self.send_passive_reply(held, listen);
        }
        self.drain(now);
    }

    /// Pinhole `id` has all its data connections: a reply held for them
    /// goes to the client now. That is the 200 for a client's PORT/EPRT
    /// sent upstream as PASV/EPSV (`server_data = "passive"`): the gateway
    /// has connected to the client's port and to the server's passive
    /// port, so when the client's transfer command makes the server send,
    /// the client's data connection is already there (a client may fail a
    /// transfer whose final reply comes before its data connection).
    pub(super) fn release_held_reply(&mut self, id: PinholeId, listen: SocketAddr, now: Instant) {
        if self.held_reply.as_ref().is_some_and(|h| h.id == id)
            && let Some(held) = self.held_reply.take()
        {
            self.send_passive_reply(held, listen);
            self.drain(now);
        }
    }

    /// A reply held for pinhole `id` that will never open: the client gets
    /// `reply` instead (and the deny line says why).
    pub(super) fn refuse_held_reply(&mut self, id: PinholeId, refusal: Denial, reply: &str) {
        if self.held_reply.as_ref().is_some_and(|h| h.id == id) {
            self.held_reply = None;
            self.refuse(refusal, reply, Route::InPlace);
            self.flush_local_replies();
        }
    }

    /// The daemon could not open pinhole `id`.
    pub fn handle_pinhole_failed(&mut self, id: PinholeId, now: Instant) {
        self.tick(now);
        self.slots.retain(|s| s.id != id);
        let refusal = Denial::new(DenyReason::PinholeUnavailable, Side::Client);
        match self.held_command.take() {
            Some(HeldCommand::Opening(held_id, cmd)) if held_id == id => {
                self.refuse(
                    with_command(refusal.clone(), &cmd),
                    NO_PINHOLE,
                    Route::Queued,
                );
            }
            Some(HeldCommand::OpeningBoth(held_id, ask)) if held_id == id => {
                let mut refusal = refusal.clone();
                refusal.verb = Some(ask.verb_text().to_string());
                self.refuse(refusal, NO_PINHOLE, Route::Queued);
            }
            other => self.held_command = other,
        }
        self.refuse_held_reply(id, refusal, NO_PINHOLE);
        self.drain(now);
    }

    /// Pinhole `id` and any data connection through it are gone.
    pub fn handle_pinhole_closed(&mut self, id: PinholeId, now: Instant) {
        self.tick(now);
        self.slots.retain(|s| s.id != id);
        // Its legs could not be connected (converted PORT): no 200.
        if self.held_reply.as_ref().is_some_and(|h| h.id == id) {
            let refusal = Denial::new(DenyReason::PinholeUnavailable, Side::Client);
            self.refuse_held_reply(id, refusal, NO_DATA_LEGS);
            self.drain(now);
        }
        if self.slots.is_empty() {
            // A long transfer is activity: the idle clock restarts after it.
            self.last_activity = self.last_activity.max(now);
        }
    }

    /// The gateway is shutting down: the client gets
    /// `421 Service shutting down` (RFC 959 section 4.2: 421 may answer any
    /// command when the service is closing) and the session closes with
    /// [`CloseReason::Shutdown`]; the daemon then flushes and closes as for
    /// any other close.
    ///
    /// The 421 never lands inside a multi-line reply: if the client has
    /// seen the start of a server reply, the core ends that reply with a
    /// final line of its own code first (see `close_with_reply`). Waiting
    /// for the server to finish it would make shutdown depend on a server
    /// that may never do so. Lines held back (a reply to PASV/EPSV, or one
    /// waiting for its pinhole) never reached the client, so then the 421
    /// is all it gets.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        self.tick(now);
        self.close_with_reply(SHUTTING_DOWN, CloseReason::Shutdown);
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
        let pinholes = self.next_pinhole_expiry();
        let summary = self.tally.summary_due();
        login
            .into_iter()
            .chain(idle)
            .chain(pinholes)
            .chain(summary)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        self.tick(now);
        if self.tally.summary_due().is_some_and(|due| due <= now) {
            self.log_summaries();
        }
        self.expire_pinholes(now);
        if !self.logged_in && self.login_deadline.is_some_and(|d| d <= now) {
            self.close_with_reply(LOGIN_TIMED_OUT, CloseReason::LoginTimeout);
        } else if self.slots.is_empty() && self.last_activity + self.cfg.idle_timeout <= now {
            self.close_with_reply(IDLE_TIMED_OUT, CloseReason::IdleTimeout);
        }
    }

    /// The next action for the daemon.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Commands per class since the last call (for metrics).
    pub fn take_command_counts(&mut self) -> impl Iterator<Item = (CommandClass, u64)> + use<> {
        let counts = std::mem::take(&mut self.command_counts);
        CommandClass::ALL
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
    }

    /// Takes the bytes to write to `to`, with the ones that must go as TCP
    /// urgent data marked (see [`Transmit`]).
    pub fn take_transmit(&mut self, to: Side) -> Transmit {
        match to {
            Side::Client => Transmit {
                bytes: std::mem::take(&mut self.to_client),
                urgent: Vec::new(),
            },
            Side::Server => Transmit {
                bytes: std::mem::take(&mut self.to_server),
                urgent: std::mem::take(&mut self.urgent_to_server),
            },
        }
    }

    /// Whether `ip` is one of the gateway's addresses this session knows:
    /// where it met the client and the server, and the address it
    /// advertises in 227 replies.
    fn is_gateway_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip == self.ep.client_local.ip()
            || ip == self.ep.server_local.ip()
            || self.ep.advertise == Some(ip)
    }

    /// Notes the time the daemon passed in (never going back).
    fn tick(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
    }

    /// The next id for a pinhole or a look-up; unique within the session.
    fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
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
}
