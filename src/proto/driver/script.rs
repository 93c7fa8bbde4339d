//! Scripts: what a property test or the fuzzer plays against a session
//! through the [`Driver`], and the byte format the fuzz target reads them
//! from ([`script_from_bytes`]).
//!
//! Besides the bytes of either side and the clock, a script carries the
//! daemon's side of the conversation, interleaved in any order: data
//! connections arriving at the session's pinholes (from the expected peer or
//! a thief), pinholes closed or taken over, and the answers to look-ups and
//! pinhole requests, given at once or held back and given later (or for a
//! key that is no longer asked about).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use super::{Driver, FOREIGN_ENDPOINT, FOREIGN_PINHOLE, Transcript, lab_endpoints, pinhole};
use crate::proto::{
    DataVerdict, FxpRule, PinholeId, Policy, Resolution, ResolveId, Resolved, SessionConfig, Side,
};

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Bytes from one side.
    Input(Side, Vec<u8>),
    /// The clock moves on; a deadline that has passed fires.
    Advance(Duration),
    /// A data connection from `peer` arrives at one of the pinholes the
    /// session asked for: the `pinhole`-th, counted modulo how many there
    /// are (a key the session has not used when there are none).
    Connect { pinhole: u8, peer: Peer },
    /// The daemon reports that pinhole (chosen as for `Connect`) and its
    /// data connection gone.
    Closed(u8),
    /// Another session of the client took that pinhole over (FXP).
    TakenOver(u8),
    /// How the daemon answers look-ups from now on.
    ResolveBy(ResolveBy),
    /// Answers the oldest look-up held back.
    Answer(Answer),
    /// How the daemon answers pinhole requests from now on.
    PinholesBy(PinholesBy),
    /// Answers a pinhole request held back: the oldest or the newest,
    /// opened or failed; `stale` answers a key that was never asked for
    /// instead (the held request stays held).
    AnswerPinhole {
        opened: bool,
        newest: bool,
        stale: bool,
    },
    /// One side closes its control connection.
    Eof(Side),
    /// The gateway shuts down.
    Shutdown,
    /// The session's configuration: only as the first step, ignored
    /// elsewhere.
    Configure(Setup),
}

/// Who opens a data connection to a pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The pinhole's expected peer.
    Expected,
    /// The expected peer, as an IPv4-mapped IPv6 address.
    ExpectedMapped,
    /// An inside host that is neither client nor server (PASV theft).
    Thief,
    /// The control server.
    Server,
    /// The control client.
    Client,
}

/// How the driver's daemon answers [`crate::proto::Event::Resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveBy {
    /// As the real daemon would ([`super::lab_resolution`]).
    Lab,
    /// Every target is a live pinhole of the client, in front of
    /// [`FOREIGN_ENDPOINT`].
    Pinhole,
    /// Every target is a live pinhole in front of a server's port 21.
    PrivilegedPinhole,
    /// Every target is one of the gateway's own addresses.
    Gateway,
    /// Every target is a third host.
    Elsewhere,
    /// Look-ups are held until the script answers them.
    Later,
}

/// An answer to a held look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Pinhole,
    Gateway,
    Elsewhere,
    /// An answer to a look-up nobody asked for (the held one stays held).
    Stale,
}

/// How the driver's daemon answers pinhole requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinholesBy {
    Open,
    Fail,
    /// Requests are held until the script answers them.
    Later,
}

/// A session configuration a script can start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setup {
    /// A `[[policy.fxp]]` rule covering the outside network 198.51.100.0/24
    /// (the server, the foreign endpoint, and the gateway's outside
    /// address).
    pub fxp: bool,
    /// One pinhole per session instead of two.
    pub one_pinhole: bool,
    /// 227 replies advertise [`ADVERTISED`] (a NAT in front).
    pub advertise: bool,
    /// The listener terminates TLS (AUTH TLS answered 234; the driver
    /// reports every handshake as done).
    pub terminate_tls: bool,
}

/// The address a [`Setup`] with `advertise` announces in 227 replies.
pub const ADVERTISED: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
/// The outside network the [`Setup`] FXP rule covers.
pub const FXP_NETWORK: &str = "198.51.100.0/24";
/// Where a thief connects from.
const THIEF: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66));

impl Setup {
    /// Whether this configuration's FXP rule covers `ip`.
    pub fn fxp_covers(self, ip: IpAddr) -> bool {
        // A constant: parsing it cannot fail.
        let net: ipnet::IpNet = FXP_NETWORK.parse().unwrap();
        self.fxp && net.contains(&crate::proto::policy::canonical_ip(ip))
    }

    /// A driver for the lab endpoints with this configuration.
    pub fn driver(self) -> Driver {
        let mut policy = Policy::default();
        if self.fxp {
            policy.fxp.push(FxpRule {
                name: "lab".into(),
                // A constant: parsing it cannot fail.
                servers: vec![FXP_NETWORK.parse().unwrap()],
            });
        }
        let mut cfg = SessionConfig {
            policy,
            max_pinholes: if self.one_pinhole { 1 } else { 2 },
            ..SessionConfig::default()
        };
        if self.terminate_tls {
            cfg.tls.auth = crate::proto::AuthTls::Terminate { implicit: false };
        }
        let mut ep = lab_endpoints();
        if self.advertise {
            ep.advertise = Some(ADVERTISED);
        }
        Driver::new(cfg, ep)
    }
}

/// What one step did, for an observer of [`play_observed`].
#[derive(Debug)]
pub struct StepReport<'a> {
    pub step: &'a Step,
    /// The pinhole a `Connect`, `Closed` or `TakenOver` named.
    pub named: Option<PinholeId>,
    /// For a `Connect`: the pinhole, who connected, and the core's verdict.
    pub connection: Option<(PinholeId, SocketAddr, DataVerdict)>,
    /// What the step added to each part of the transcript.
    pub to_client: Range<usize>,
    pub to_server: Range<usize>,
    pub events: Range<usize>,
}

/// Plays `steps`, each input split at the given offsets, and returns the
/// transcript. Used by the split-invariance property and the fuzz target.
pub fn play(steps: &[Step], splits: &[usize]) -> Transcript {
    play_observed(steps, splits, |_, _| {})
}

/// Plays `steps` as [`play`] does and calls `observe` after every step
/// (a leading `Configure` is not a step of its own).
pub fn play_observed(
    steps: &[Step],
    splits: &[usize],
    mut observe: impl FnMut(&Driver, &StepReport<'_>),
) -> Transcript {
    let (mut d, steps) = match steps.split_first() {
        Some((Step::Configure(setup), rest)) => (setup.driver(), rest),
        _ => (Driver::lab(), steps),
    };
    let mut k = 0;
    for step in steps {
        let before = (
            d.transcript.to_client.len(),
            d.transcript.to_server.len(),
            d.transcript.events.len(),
        );
        let mut connection = None;
        let mut named = None;
        match step {
            Step::Input(side, data) => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let cut = splits.get(k).map_or(rest.len(), |&c| (c % rest.len()) + 1);
                    k += 1;
                    d.input(*side, &rest[..cut]);
                    rest = &rest[cut..];
                }
            }
            Step::Advance(by) => d.advance(*by),
            Step::Connect { pinhole, peer } => {
                let (id, from) = d.connection(*pinhole, *peer);
                let verdict = d.session.handle_data_connection(id, from, d.now);
                d.settle();
                connection = Some((id, from, verdict));
                named = Some(id);
            }
            Step::Closed(n) => {
                let id = d.nth_pinhole(*n);
                d.session.handle_pinhole_closed(id, d.now);
                d.settle();
                named = Some(id);
            }
            Step::TakenOver(n) => {
                let id = d.nth_pinhole(*n);
                d.session.handle_pinhole_taken_over(id, d.now);
                d.settle();
                named = Some(id);
            }
            Step::ResolveBy(by) => d.resolve_by(*by),
            Step::Answer(answer) => d.answer_held_resolve(*answer),
            Step::PinholesBy(by) => {
                d.defer_pinholes = *by == PinholesBy::Later;
                d.pinholes_work = *by != PinholesBy::Fail;
            }
            Step::AnswerPinhole {
                opened,
                newest,
                stale,
            } => d.answer_held_pinhole(*opened, *newest, *stale),
            Step::Eof(side) => {
                d.session.handle_eof(*side, d.now);
                d.settle();
            }
            Step::Shutdown => {
                d.session.handle_shutdown(d.now);
                d.settle();
            }
            Step::Configure(_) => {}
        }
        let report = StepReport {
            step,
            named,
            connection,
            to_client: before.0..d.transcript.to_client.len(),
            to_server: before.1..d.transcript.to_server.len(),
            events: before.2..d.transcript.events.len(),
        };
        observe(&d, &report);
    }
    d.transcript
}

impl Driver {
    /// The key of the `n`-th pinhole the session asked for (modulo how many
    /// there are), or, when there are none, a key it never issues (counted
    /// down from the top, so a later request cannot get it: a daemon cannot
    /// report on a pinhole before the core has asked for it).
    fn nth_pinhole(&self, n: u8) -> PinholeId {
        match self.requests.len() {
            0 => pinhole(u64::MAX - u64::from(n)),
            len => self.requests[usize::from(n) % len].id,
        }
    }

    /// The pinhole a `Connect` goes to and the address it comes from.
    fn connection(&self, n: u8, peer: Peer) -> (PinholeId, SocketAddr) {
        let id = self.nth_pinhole(n);
        let ep = self.session.endpoints();
        let expected = self
            .requests
            .iter()
            .find(|r| r.id == id)
            .map_or(ep.client.ip(), |r| r.expected_peer);
        let ip = match peer {
            Peer::Expected => expected,
            Peer::ExpectedMapped => match expected {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => v6,
            },
            Peer::Thief => THIEF,
            Peer::Server => ep.server.ip(),
            Peer::Client => ep.client.ip(),
        };
        (id, SocketAddr::new(ip, 40100))
    }

    fn resolve_by(&mut self, by: ResolveBy) {
        self.defer_resolves = by == ResolveBy::Later;
        self.resolve = match by {
            ResolveBy::Lab | ResolveBy::Later => super::lab_resolution,
            ResolveBy::Pinhole => |_| foreign_pinhole(),
            ResolveBy::PrivilegedPinhole => |_| {
                Resolution::Pinhole(Resolved {
                    pinhole: FOREIGN_PINHOLE,
                    endpoint: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 21)), 21),
                })
            },
            ResolveBy::Gateway => |_| Resolution::GatewayAddress,
            ResolveBy::Elsewhere => |_| Resolution::Elsewhere,
        };
    }

    fn answer_held_resolve(&mut self, answer: Answer) {
        let resolution = match answer {
            Answer::Pinhole => foreign_pinhole(),
            Answer::Gateway => Resolution::GatewayAddress,
            Answer::Elsewhere | Answer::Stale => Resolution::Elsewhere,
        };
        let id = match (answer, self.held_resolves.front()) {
            (Answer::Stale, held) => ResolveId(held.map_or(u64::MAX, |(id, _)| id.0 ^ (1 << 40))),
            (_, None) => return,
            (_, Some(_)) => match self.held_resolves.pop_front() {
                Some((id, _)) => id,
                None => return,
            },
        };
        self.session.handle_resolved(id, resolution, self.now);
        self.settle();
    }

    fn answer_held_pinhole(&mut self, opened: bool, newest: bool, stale: bool) {
        if stale {
            let id = pinhole(1 << 40);
            if opened {
                let addr = SocketAddr::new(self.session.endpoints().client_local.ip(), 50999);
                self.session.handle_pinhole_opened(id, addr, self.now);
            } else {
                self.session.handle_pinhole_failed(id, self.now);
            }
        } else {
            let held = if newest {
                self.held_pinholes.pop_back()
            } else {
                self.held_pinholes.pop_front()
            };
            let Some(req) = held else {
                return;
            };
            self.answer_pinhole(&req, opened);
        }
        self.settle();
    }
}

fn foreign_pinhole() -> Resolution {
    Resolution::Pinhole(Resolved {
        pinhole: FOREIGN_PINHOLE,
        // A constant: parsing it cannot fail.
        endpoint: FOREIGN_ENDPOINT.parse().unwrap(),
    })
}

/// Reads a fuzz input as a script. Each record is a tag byte and an
/// argument byte; the low four bits of the tag say what it is:
///
/// | tag & 15 | step | argument |
/// | --- | --- | --- |
/// | 0, 14 | client bytes | length; that many bytes follow |
/// | 1, 15 | server bytes | length; that many bytes follow |
/// | 2 | advance the clock | seconds |
/// | 3 | advance the clock | milliseconds |
/// | 4 | data connection | pinhole; tag >> 4 the peer: 0 expected, 1 expected as mapped IPv6, 2 thief, 3 server, 4 client, else expected |
/// | 5 | pinhole closed | pinhole |
/// | 6 | pinhole taken over | pinhole |
/// | 7 | answer look-ups from now on | mod 6: lab, pinhole, pinhole on port 21, gateway, elsewhere, later |
/// | 8 | answer the oldest held look-up | mod 4: pinhole, gateway, elsewhere, a stale key |
/// | 9 | answer pinhole requests from now on | mod 3: open, fail, later |
/// | 10 | answer a held pinhole request | bit 0 failed, bit 1 the newest, bit 2 a stale key |
/// | 11 | end of file | bit 0: the server's side, else the client's |
/// | 12 | shutdown | ignored |
/// | 13 | configuration (first record only) | bit 0 FXP rule, bit 1 one pinhole, bit 2 advertised address |
///
/// Tags 0, 1 and 2 read as they always did, so older corpus files keep
/// their meaning.
pub fn script_from_bytes(data: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = data;
    while let [tag, arg, tail @ ..] = rest {
        rest = tail;
        let side = |bit: u8| {
            if bit & 1 == 0 {
                Side::Client
            } else {
                Side::Server
            }
        };
        let step = match tag & 0x0f {
            kind @ (0 | 1 | 14 | 15) => {
                let n = usize::from(*arg).min(tail.len());
                rest = &tail[n..];
                Step::Input(side(kind), tail[..n].to_vec())
            }
            2 => Step::Advance(Duration::from_secs(u64::from(*arg))),
            3 => Step::Advance(Duration::from_millis(u64::from(*arg))),
            4 => Step::Connect {
                pinhole: *arg,
                peer: match tag >> 4 {
                    1 => Peer::ExpectedMapped,
                    2 => Peer::Thief,
                    3 => Peer::Server,
                    4 => Peer::Client,
                    _ => Peer::Expected,
                },
            },
            5 => Step::Closed(*arg),
            6 => Step::TakenOver(*arg),
            7 => Step::ResolveBy(match arg % 6 {
                0 => ResolveBy::Lab,
                1 => ResolveBy::Pinhole,
                2 => ResolveBy::PrivilegedPinhole,
                3 => ResolveBy::Gateway,
                4 => ResolveBy::Elsewhere,
                _ => ResolveBy::Later,
            }),
            8 => Step::Answer(match arg % 4 {
                0 => Answer::Pinhole,
                1 => Answer::Gateway,
                2 => Answer::Elsewhere,
                _ => Answer::Stale,
            }),
            9 => Step::PinholesBy(match arg % 3 {
                0 => PinholesBy::Open,
                1 => PinholesBy::Fail,
                _ => PinholesBy::Later,
            }),
            10 => Step::AnswerPinhole {
                opened: arg & 1 == 0,
                newest: arg & 2 != 0,
                stale: arg & 4 != 0,
            },
            11 => Step::Eof(side(*arg)),
            12 => Step::Shutdown,
            _ => Step::Configure(Setup {
                fxp: arg & 1 != 0,
                one_pinhole: arg & 2 != 0,
                advertise: arg & 4 != 0,
                terminate_tls: arg & 8 != 0,
            }),
        };
        steps.push(step);
    }
    steps
}
