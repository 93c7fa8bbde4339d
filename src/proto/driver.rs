//! A deterministic driver for scenario tests, property tests and fuzzing:
//! it plays a script against a [`Session`] and answers the session's
//! requests the way a well-behaved daemon would, with a virtual clock.
//! Answers can also be held back and given later, in any order, and the
//! daemon's news (a data connection, a pinhole closed or taken over) can be
//! interleaved with the bytes of either side: see [`script`].

mod script;

pub use script::{
    ADVERTISED, Answer, FXP_NETWORK, Peer, PinholesBy, ResolveBy, Setup, Step, StepReport, play,
    play_observed, script_from_bytes,
};

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    DataVerdict, Denial, DenyReason, Endpoints, Event, PinholeId, PinholeRequest, Resolution,
    ResolveId, Resolved, Session, SessionConfig, SessionId, Side,
};

/// Everything a session produced, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    pub to_client: Vec<u8>,
    pub to_server: Vec<u8>,
    /// Offsets into `to_server` of the bytes sent as TCP urgent data.
    pub urgent_to_server: Vec<usize>,
    pub events: Vec<Event>,
}

impl Transcript {
    /// The deny events, in order.
    pub fn denials(&self) -> Vec<&Denial> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Deny(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// The reasons of the deny events, in order.
    pub fn reasons(&self) -> Vec<DenyReason> {
        self.denials().iter().map(|d| d.reason).collect()
    }

    /// The pinholes the session asked for, in order.
    pub fn pinhole_requests(&self) -> Vec<&PinholeRequest> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::OpenPinhole(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

/// The addresses used by the driver: client 192.0.2.10, gateway 192.0.2.1
/// inside ([`GATEWAY_INSIDE`]) and 198.51.100.1 outside
/// ([`GATEWAY_OUTSIDE`]), server 198.51.100.20.
pub fn lab_endpoints() -> Endpoints {
    Endpoints {
        client: "192.0.2.10:40000".parse().unwrap(),
        client_local: "192.0.2.1:2121".parse().unwrap(),
        server: "198.51.100.20:21".parse().unwrap(),
        server_local: "198.51.100.1:45000".parse().unwrap(),
        advertise: None,
    }
}

/// The gateway's inside address in [`lab_endpoints`].
pub const GATEWAY_INSIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// The gateway's outside address in [`lab_endpoints`].
pub const GATEWAY_OUTSIDE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

/// The gateway's pinhole with this port (on either gateway address) stands
/// for a server-to-server endpoint (used to exercise [`Event::Resolve`]).
pub const FOREIGN_PINHOLE_PORT: u16 = 50999;
/// The key of that pinhole: another session's.
pub const FOREIGN_PINHOLE: PinholeId = PinholeId {
    session: SessionId(99),
    seq: 7,
};
/// The driver's session number.
pub const SESSION: SessionId = SessionId(1);

/// The key of the driver session's `seq`-th numbered object (pinholes and
/// lookups share one counter).
pub fn pinhole(seq: u64) -> PinholeId {
    PinholeId {
        session: SESSION,
        seq,
    }
}
pub const FOREIGN_ENDPOINT: &str = "198.51.100.21:40001";

/// How the driver's daemon answers [`Event::Resolve`] for `target`, as the
/// real one does: [`FOREIGN_PINHOLE_PORT`] on a gateway address is a live
/// pinhole of this client; any other port there is the gateway itself;
/// everything else is a third host.
pub fn lab_resolution(target: SocketAddr) -> Resolution {
    let ip = super::policy::canonical_ip(target.ip());
    let gateway = ip == GATEWAY_INSIDE || ip == GATEWAY_OUTSIDE;
    match (gateway, target.port()) {
        (true, FOREIGN_PINHOLE_PORT) => Resolution::Pinhole(Resolved {
            pinhole: FOREIGN_PINHOLE,
            // A constant: parsing it cannot fail.
            endpoint: FOREIGN_ENDPOINT.parse().unwrap(),
        }),
        (true, _) => Resolution::GatewayAddress,
        (false, _) => Resolution::Elsewhere,
    }
}

/// The port the driver's daemon opens pinhole `id` on.
pub fn pinhole_port(id: PinholeId) -> u16 {
    // Below 900, so the sum stays a valid port.
    50000 + (id.seq % 900) as u16
}

pub struct Driver {
    pub session: Session,
    pub now: Instant,
    pub transcript: Transcript,
    /// When false, OpenPinhole requests fail.
    pub pinholes_work: bool,
    /// When true, OpenPinhole requests wait in `held_pinholes` until the
    /// script answers them.
    pub defer_pinholes: bool,
    /// Every pinhole request the session made so far.
    pub requests: Vec<PinholeRequest>,
    /// Every pinhole the driver reported open, with the address it listens
    /// on.
    pub opened: Vec<(PinholeId, SocketAddr)>,
    /// Pinhole requests not answered yet, oldest first.
    pub held_pinholes: VecDeque<PinholeRequest>,
    /// How the driver answers [`Event::Resolve`] (default
    /// [`lab_resolution`]).
    pub resolve: fn(SocketAddr) -> Resolution,
    /// When true, look-ups wait in `held_resolves` until the script
    /// answers them.
    pub defer_resolves: bool,
    /// Look-ups not answered yet, oldest first.
    pub held_resolves: VecDeque<(ResolveId, SocketAddr)>,
}

impl Driver {
    pub fn new(cfg: SessionConfig, ep: Endpoints) -> Self {
        let now = Instant::now();
        Driver {
            session: Session::new(Arc::new(cfg), ep, SESSION, now),
            now,
            transcript: Transcript::default(),
            pinholes_work: true,
            defer_pinholes: false,
            requests: Vec::new(),
            opened: Vec::new(),
            held_pinholes: VecDeque::new(),
            resolve: lab_resolution,
            defer_resolves: false,
            held_resolves: VecDeque::new(),
        }
    }

    pub fn lab() -> Self {
        Driver::new(SessionConfig::default(), lab_endpoints())
    }

    /// A [`Driver::lab`] whose session has seen the greeting and a
    /// successful login; the transcript starts empty.
    pub fn logged_in() -> Self {
        let mut d = Driver::lab();
        d.login();
        d
    }

    pub fn input(&mut self, from: Side, data: &[u8]) {
        self.session.handle_input(from, data, self.now);
        self.settle();
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(self.now);
        }
        self.settle();
    }

    /// Collects output and answers requests until the session is quiet.
    pub fn settle(&mut self) {
        loop {
            let to_client = self.session.take_transmit(Side::Client);
            debug_assert!(to_client.urgent.is_empty());
            self.transcript.to_client.extend(to_client.bytes);
            let to_server = self.session.take_transmit(Side::Server);
            let base = self.transcript.to_server.len();
            self.transcript
                .urgent_to_server
                .extend(to_server.urgent.iter().map(|at| base + at));
            self.transcript.to_server.extend(to_server.bytes);
            let Some(event) = self.session.poll_event() else {
                return;
            };
            self.transcript.events.push(event.clone());
            match event {
                Event::OpenPinhole(req) => {
                    self.requests.push(req.clone());
                    if self.defer_pinholes {
                        self.held_pinholes.push_back(req);
                    } else {
                        let works = self.pinholes_work;
                        self.answer_pinhole(&req, works);
                    }
                }
                Event::Resolve { id, target } if self.defer_resolves => {
                    self.held_resolves.push_back((id, target));
                }
                Event::Resolve { id, target } => {
                    let answer = (self.resolve)(target);
                    self.session.handle_resolved(id, answer, self.now);
                }
                // The shell's handshake, done at once.
                Event::StartTls => self.session.handle_tls_established(self.now),
                _ => {}
            }
        }
    }

    /// Answers a pinhole request: opened on [`pinhole_port`], or failed.
    /// The caller settles.
    fn answer_pinhole(&mut self, req: &PinholeRequest, works: bool) {
        if works {
            let addr = SocketAddr::new(req.listen_ip, pinhole_port(req.id));
            self.opened.push((req.id, addr));
            self.session.handle_pinhole_opened(req.id, addr, self.now);
        } else {
            self.session.handle_pinhole_failed(req.id, self.now);
        }
    }

    /// A connection from `peer` arrives at the driver session's pinhole
    /// `seq`; returns the core's verdict.
    pub fn connect_from(&mut self, seq: u64, peer: SocketAddr) -> DataVerdict {
        let verdict = self
            .session
            .handle_data_connection(pinhole(seq), peer, self.now);
        self.settle();
        verdict
    }

    /// The expected peer of pinhole `seq` connects to it.
    pub fn peer_connects(&mut self, seq: u64) -> DataVerdict {
        let expected = self
            .requests
            .iter()
            .find(|r| r.id == pinhole(seq))
            .map(|r| r.expected_peer)
            .expect("the driver answered this pinhole request");
        self.connect_from(seq, SocketAddr::new(expected, 40100))
    }

    /// Logs in: greeting, USER, 331, PASS, 230.
    pub fn login(&mut self) {
        self.input(Side::Server, b"220 ready\r\n");
        self.input(Side::Client, b"USER u\r\n");
        self.input(Side::Server, b"331 pw\r\n");
        self.input(Side::Client, b"PASS p\r\n");
        self.input(Side::Server, b"230 ok\r\n");
        self.transcript = Transcript::default();
    }
}
