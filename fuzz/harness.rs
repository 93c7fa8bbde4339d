//! The check shared by the fuzz target (`fuzz_targets/session.rs`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`): both include this file.
//!
//! A fuzz input is a script (see `driver::script_from_bytes`): the bytes of
//! both sides interleaved with the daemon's side (data connections from the
//! expected peer or a thief, pinholes closed or taken over, look-up and
//! pinhole answers of every kind, now or later, time steps). After every
//! step the core's invariants are asserted; at the end the session is
//! closed and the refusals are accounted for.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use ftpgate::proto::driver::{self, Driver, Setup, Step, StepReport, Transcript};
use ftpgate::proto::policy::{canonical, canonical_ip};
use ftpgate::proto::{
    DataMode, DataVerdict, Denial, DenyReason, Event, PinholeId, Side, command, reply,
};

/// Every reply the gateway answers a refusal with (a deny event carrying
/// any other is an error here: keep this list complete).
const REFUSAL_REPLIES: &[&str] = &[
    "425 Can't open data connection: too many open data connections.",
    "425 Can't open data connection: no pinhole available.",
    "425 Can't open data connection: the gateway could not connect to your port or the server's.",
    "425 Can't open data connection: unusable passive reply from server.",
    "425 Can't open data connection: passive address refused by policy.",
    "500 Syntax error, command unrecognized.",
    "500 Command line too long.",
    "500 Syntax error: bare CR or NUL in command line.",
    "501 Syntax error in parameters or arguments.",
    "502 Command not implemented: use EPRT or EPSV.",
    "503 EPSV ALL in effect: only EPSV may set up data connections.",
    "504 Data connection target refused by policy.",
    "522 Network protocol not supported, use (1).",
    "522 Network protocol not supported, use (2).",
    "530 Please log in first.",
    "534 Request denied for policy reasons: the control channel must stay inspectable.",
    "503 Bad sequence of commands.",
    "504 Security mechanism not understood: use AUTH TLS.",
    "504 PROT takes C or P.",
    "521 Data connection cannot be opened with this PROT setting: use PROT P.",
    "530 TLS required: send AUTH TLS before logging in.",
    "536 Requested PROT level not supported.",
    "421 Too many refused commands: closing control connection.",
];

/// Plays `data` as a script once with every input whole and once cut at
/// offsets taken from the data itself; both runs must produce the same
/// bytes and events, and the whole run must keep every invariant of
/// [`Invariants`] after every step.
pub fn check(data: &[u8]) {
    let mut steps = driver::script_from_bytes(data);
    // The session ends: counted refusals are summed up in deny events.
    steps.push(Step::Eof(Side::Client));
    let setup = match steps.first() {
        Some(Step::Configure(setup)) => *setup,
        _ => Setup::default(),
    };
    let mut invariants = Invariants::new(setup);
    let whole = driver::play_observed(&steps, &[], |d, r| invariants.after_step(d, r));
    invariants.at_end(&whole, &steps);
    let splits: Vec<usize> = data.iter().rev().map(|&b| usize::from(b)).collect();
    let split = driver::play(&steps, &splits);
    assert_same(&whole, &split);
}

fn assert_same(whole: &Transcript, split: &Transcript) {
    assert_eq!(
        String::from_utf8_lossy(&split.to_client),
        String::from_utf8_lossy(&whole.to_client),
        "bytes to the client depend on how the input was cut"
    );
    assert_eq!(
        String::from_utf8_lossy(&split.to_server),
        String::from_utf8_lossy(&whole.to_server),
        "bytes to the server depend on how the input was cut"
    );
    assert_eq!(
        split.urgent_to_server, whole.urgent_to_server,
        "urgent data to the server depends on how the input was cut"
    );
    assert_eq!(
        split.events, whole.events,
        "events depend on how the input was cut"
    );
}

/// What the core promises, checked from the outside after every step:
///
/// - every line the gateway writes ends in CRLF and holds no other CR and
///   no NUL (a peer never sees a line boundary the gateway did not write);
/// - the client never sees an address the gateway did not write: every line
///   a client could read as a 227/229 (or that starts with 227/229) is the
///   gateway's canonical line, naming the address it announces and the
///   port of a passive pinhole the daemon opened for this session;
/// - the server is only ever told to connect to an active pinhole the
///   daemon opened for this session, or (with the FXP rule) to a host the
///   rule covers that is not the gateway;
/// - a pinhole's peer is the control peer: passive pinholes expect the
///   client and lead to the server, active ones expect the server and lead
///   to the client;
/// - a data connection is accepted only from the expected peer of a pinhole
///   that was opened and is still waiting, once; anyone else is refused
///   with at most one deny event (`pasv_theft`, naming it), and nothing is
///   written to either side;
/// - every deny event is one refusal (reply: one 4yz/5yz line the gateway
///   knows) or one summary (a count, no reply); at the end, every refusal
///   reply the client received is accounted for by its deny event or a
///   summary's count.
struct Invariants {
    setup: Setup,
    /// Pinholes a data connection was accepted at.
    accepted: HashSet<PinholeId>,
    /// Pinholes the core closed or the daemon reported gone.
    gone: HashSet<PinholeId>,
}

impl Invariants {
    fn new(setup: Setup) -> Self {
        Invariants {
            setup,
            accepted: HashSet::new(),
            gone: HashSet::new(),
        }
    }

    fn after_step(&mut self, d: &Driver, r: &StepReport<'_>) {
        let t = &d.transcript;
        let to_client = &t.to_client[r.to_client.clone()];
        let to_server = &t.to_server[r.to_server.clone()];
        assert_clean_lines(to_client);
        assert_clean_lines(to_server);
        self.client_sees_only_gateway_passive_lines(d, to_client);
        self.server_gets_only_allowed_targets(d, to_server);
        let events = &t.events[r.events.clone()];
        for event in events {
            match event {
                Event::Deny(denial) => assert_one_refusal_or_summary(denial),
                Event::OpenPinhole(req) => {
                    let ep = d.session.endpoints();
                    let (client, server) =
                        (canonical_ip(ep.client.ip()), canonical_ip(ep.server.ip()));
                    match req.mode {
                        DataMode::Passive => {
                            assert_eq!(req.expected_peer, client, "{req:?}");
                            assert_eq!(req.connect_to.ip(), server, "{req:?}");
                            assert_eq!(req.listen_ip, ep.client_local.ip(), "{req:?}");
                        }
                        DataMode::Active => {
                            assert_eq!(req.expected_peer, server, "{req:?}");
                            assert_eq!(req.connect_to.ip(), client, "{req:?}");
                            assert_eq!(req.listen_ip, ep.server_local.ip(), "{req:?}");
                        }
                    }
                }
                Event::ClosePinhole { id, .. } => {
                    self.gone.insert(*id);
                }
                _ => {}
            }
        }
        if let (Step::Closed(_), Some(id)) = (r.step, r.named) {
            self.gone.insert(id);
        }
        if let Some((id, peer, verdict)) = r.connection {
            self.data_connection(d, r, events, id, peer, verdict);
        }
    }

    fn data_connection(
        &mut self,
        d: &Driver,
        r: &StepReport<'_>,
        events: &[Event],
        id: PinholeId,
        peer: SocketAddr,
        verdict: DataVerdict,
    ) {
        assert!(
            r.to_client.is_empty() && r.to_server.is_empty(),
            "a data connection made the gateway write"
        );
        let request = d.requests.iter().find(|q| q.id == id);
        let peer_ip = canonical_ip(peer.ip());
        if verdict == DataVerdict::Accept {
            let request = request.unwrap_or_else(|| panic!("accepted at {id:?}, never requested"));
            assert!(
                d.opened.iter().any(|(o, _)| *o == id),
                "accepted at {id:?}, never opened"
            );
            assert_eq!(peer_ip, request.expected_peer, "accepted a thief");
            assert!(
                !self.gone.contains(&id),
                "accepted at a closed pinhole {id:?}"
            );
            assert!(self.accepted.insert(id), "accepted twice at {id:?}");
        }
        let denials: Vec<&Denial> = events
            .iter()
            .filter_map(|e| match e {
                Event::Deny(d) => Some(d),
                _ => None,
            })
            .collect();
        assert!(
            denials.len() <= 1,
            "one connection, {} deny events",
            denials.len()
        );
        if let Some(denial) = denials.first() {
            assert_eq!(verdict, DataVerdict::Refuse);
            assert_eq!(denial.reason, DenyReason::PasvTheft);
            assert_eq!(denial.peer, Some(peer));
            assert_ne!(Some(peer_ip), request.map(|q| q.expected_peer));
        }
    }

    /// The address 227 replies name: the advertised one, else the one the
    /// client connected to.
    fn announced(d: &Driver) -> Option<IpAddr> {
        let ep = d.session.endpoints();
        ep.advertise
            .filter(IpAddr::is_ipv4)
            .or(Some(ep.client_local.ip()).filter(IpAddr::is_ipv4))
    }

    fn client_sees_only_gateway_passive_lines(&self, d: &Driver, out: &[u8]) {
        let passive_ports: Vec<u16> = d
            .opened
            .iter()
            .filter(|(id, _)| {
                d.requests
                    .iter()
                    .any(|q| q.id == *id && q.mode == DataMode::Passive)
            })
            .map(|(_, addr)| addr.port())
            .collect();
        for line in lines(out) {
            if !reply::looks_passive(line) && !line.starts_with(b"227") && !line.starts_with(b"229")
            {
                continue;
            }
            let ok_227 = reply::parse_227(line).is_some_and(|p| {
                Some(IpAddr::V4(*p.addr.ip())) == Self::announced(d)
                    && passive_ports.contains(&p.addr.port())
                    && reply::canonical_227(p.addr) == line
            });
            let ok_229 = reply::parse_229(line).is_some_and(|p| {
                passive_ports.contains(&p.port) && reply::canonical_229(p.port) == line
            });
            assert!(
                ok_227 || ok_229,
                "a passive reply the gateway did not write reached the client: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    fn server_gets_only_allowed_targets(&self, d: &Driver, out: &[u8]) {
        let ep = d.session.endpoints();
        let gateway = [
            Some(canonical_ip(ep.client_local.ip())),
            Some(canonical_ip(ep.server_local.ip())),
            ep.advertise,
        ];
        for line in lines(out) {
            let verb = line.get(..5).map(|v| v.to_ascii_uppercase());
            let target = match verb.as_deref() {
                Some(b"PORT ") => command::parse_port_arg(&line[5..]).map(SocketAddr::V4),
                Some(b"EPRT ") => command::parse_eprt_arg(&line[5..]),
                _ => continue,
            };
            let target = canonical(target.unwrap_or_else(|_| {
                panic!(
                    "unreadable address line sent: {:?}",
                    String::from_utf8_lossy(line)
                )
            }));
            let pinhole = d.opened.iter().any(|(id, listen)| {
                canonical(*listen) == target
                    && d.requests
                        .iter()
                        .any(|q| q.id == *id && q.mode == DataMode::Active)
            });
            let fxp = self.setup.fxp_covers(target.ip())
                && !gateway.contains(&Some(target.ip()))
                && target.port() >= 1024;
            assert!(
                pinhole || fxp,
                "the server was told to connect to {target}: {:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Every refusal reply the client got has its deny event, or was
    /// counted in a summary. Skipped when the server itself sent such a
    /// line (the gateway relays it, and it would be counted too).
    fn at_end(&self, t: &Transcript, steps: &[Step]) {
        let server_sent = |text: &str| {
            steps.iter().any(|s| match s {
                Step::Input(Side::Server, data) => {
                    data.windows(text.len()).any(|w| w == text.as_bytes())
                }
                _ => false,
            })
        };
        let mut suppressed = 0u64;
        for e in &t.events {
            if let Event::Deny(d) = e {
                suppressed += d.suppressed.unwrap_or(0);
            }
        }
        for text in REFUSAL_REPLIES {
            if server_sent(&text[4..]) {
                continue;
            }
            let got = lines(&t.to_client)
                .filter(|l| *l == text.as_bytes())
                .count() as u64;
            let logged = t
                .events
                .iter()
                .filter(|e| matches!(e, Event::Deny(d) if d.suppressed.is_none() && d.reply.as_deref() == Some(*text)))
                .count() as u64;
            assert!(
                got <= logged + suppressed,
                "{got} refusals {text:?} reached the client, {logged} deny events and {suppressed} counted"
            );
        }
    }
}

fn assert_one_refusal_or_summary(denial: &Denial) {
    match (denial.suppressed, &denial.reply) {
        (Some(n), None) => assert!(n >= 1, "an empty summary: {denial:?}"),
        (Some(_), Some(_)) => panic!("a summary with a reply: {denial:?}"),
        (None, Some(reply)) => assert!(
            REFUSAL_REPLIES.contains(&reply.as_str()),
            "a refusal reply the harness does not know: {reply:?}"
        ),
        (None, None) => {}
    }
}

/// The lines of `out`, without their CRLF.
fn lines(out: &[u8]) -> impl Iterator<Item = &[u8]> {
    out.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
}

/// Every line the gateway writes ends in CRLF and holds no other CR and no
/// NUL: a peer can never be made to see a line boundary the gateway did not.
fn assert_clean_lines(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "unterminated output"
    );
    for line in out.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !line.contains(&b'\r') && !line.contains(&0),
            "bare CR or NUL sent: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}
