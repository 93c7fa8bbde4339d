//! Server-side reply handling: pairing final replies with the commands they
//! answer, login success, the 227/229 replies the gateway answers with its
//! own canonical line naming a pinhole, and the server lines a client could
//! read as a passive reply, which never reach it as they were.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::Session;
use super::output::{NO_PINHOLE, Route, TOO_MANY_DATA_CONNECTIONS};
use super::pending::{Expect, LoginEnd, PassivePlan, Pending, Style, ToActive, ToPassive};
use super::types::{
    CloseReason, DataMode, DataVerb, Event, PinholeClose, PinholeId, PinholeRequest, RewriteKind,
    Shape,
};
use crate::proto::Side;
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::framing::{Frame, check_line_bytes, telnet_decode};
use crate::proto::policy::{DataRequest, Decision, canonical};
use crate::proto::reply::{self, Code, ReplyLine};

/// Lines of a multi-line reply to PASV/EPSV kept while waiting for its end.
const MAX_PASSIVE_BUFFER: usize = 16 * 1024;

/// The text that replaces a server line a client could read as a passive
/// reply (see [`reply::looks_passive`]).
const LOOKALIKE_WITHHELD: &str = "(line withheld by ftpgate: looks like a passive reply)";

/// The code shown for a 227/229 reply that is not the final reply to
/// PASV/EPSV (an unsolicited one, or one to another command): RFC 959
/// section 4.2 wants the first and last line of a reply to carry its code,
/// and a line starting with 227/229 is what must not reach the client.
/// 200 keeps the reply's class (2yz, completion), which is what clients act
/// on.
const NEUTRAL_CODE: Code = Code(200);

/// The final line of a 227/229 reply, held until its pinhole is open.
#[derive(Debug, Clone)]
pub(super) struct HeldReply {
    pub(super) id: PinholeId,
    answer: Answer,
    replaced: bool,
}

impl HeldReply {
    /// Released only once the pinhole's data connections are all made,
    /// not when it opens (see `Session::release_held_reply`).
    pub(super) fn waits_for_legs(&self) -> bool {
        matches!(self.answer, Answer::PortAccepted(_))
    }
}

/// What the client gets once a held reply's pinhole is open.
#[derive(Debug, Clone)]
enum Answer {
    /// The gateway's 227/229 for the client's PASV/EPSV.
    Passive(PassivePlan),
    /// 200 for the client's PORT/EPRT, sent upstream as PASV/EPSV.
    PortAccepted(ToPassive),
}

/// The client's PORT/EPRT was carried out as PASV/EPSV toward the server.
const PORT_OK: &str = "200 PORT command successful.";
const EPRT_OK: &str = "200 EPRT command successful.";

/// The lines of a multi-line reply to PASV/EPSV before its final line: only
/// passed on when that reply turns out to be an error or preliminary.
#[derive(Debug, Default)]
pub(super) struct PassiveLines {
    lines: Vec<Vec<u8>>,
    bytes: usize,
    /// A line among them was replaced because it looked like a passive
    /// reply; logged only if the lines are passed on.
    withheld: bool,
}

impl Session {
    pub(super) fn on_server_frame(&mut self, frame: Frame) {
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
            ReplyLine::Text => self.reply_text(class, line),
            ReplyLine::Start(code) => {
                self.open_reply = Some(code);
                let line = if malformed {
                    self.server_line_refused(DenyReason::MalformedReply);
                    withheld(code, '-')
                } else {
                    line
                };
                self.reply_text(class, line);
            }
            ReplyLine::End(code) => {
                self.open_reply = None;
                self.reply_end(code, line, malformed);
                // The next reply's lookalikes are logged again.
                self.lookalike_logged = false;
            }
        }
    }

    /// Whether the reply being read answers a PASV/EPSV.
    pub(super) fn answers_passive(&self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending::Command(
                Expect::Passive(_) | Expect::ToPassive(_) | Expect::ToActive(_)
            ))
        )
    }

    /// A line inside a reply that is not its end.
    fn reply_text(&mut self, role: ReplyLine, line: Vec<u8>) {
        if self.answers_passive() {
            // Held until the end: only the final line of a passive reply
            // reaches the client, so no server address leaks through.
            let (line, replaced) = neutralized(role, line);
            if self.passive.bytes + line.len() <= MAX_PASSIVE_BUFFER {
                self.passive.withheld |= replaced;
                self.passive.bytes += line.len();
                self.passive.lines.push(line);
            }
        } else {
            self.relay_line(role, line);
        }
    }

    /// Passes a server reply line on to the client, unless a client could
    /// read it as a passive reply: then a neutral line of the same role
    /// takes its place, so the reply keeps its structure.
    fn relay_line(&mut self, role: ReplyLine, line: Vec<u8>) {
        let (line, replaced) = neutralized(role, line);
        if replaced {
            self.lookalike_withheld();
        }
        self.send_line_to_client(&line);
    }

    /// One deny event per reply, however many of its lines were withheld.
    fn lookalike_withheld(&mut self) {
        if !self.lookalike_logged {
            self.lookalike_logged = true;
            self.server_line_refused(DenyReason::PassiveReplyWithheld);
        }
    }

    fn reply_end(&mut self, code: Code, line: Vec<u8>, malformed: bool) {
        // A malformed final 227/229 to a pending PASV/EPSV is refused by
        // on_passive_reply as malformed_passive_reply (with the 425 the
        // client gets); logging it here too would make two deny events for
        // one refusal.
        let passive_final = matches!(code, Code(227) | Code(229)) && self.answers_passive();
        if malformed && !passive_final {
            self.server_line_refused(DenyReason::MalformedReply);
        }
        let line = if malformed { withheld(code, ' ') } else { line };
        let end = ReplyLine::End(code);
        if code.is_preliminary() {
            // 1yz: the command goes on; its final reply comes later.
            self.flush_passive_lines();
            self.relay_line(end, line);
            return;
        }
        match self.pending.pop_front() {
            Some(Pending::Greeting) | Some(Pending::Command(Expect::Other)) | None => {
                self.relay_line(end, line);
            }
            Some(Pending::Command(Expect::Transfer)) => {
                // The transfer is over: its data connection no longer holds
                // a slot, whenever its plane reports the end (the kernel
                // plane hears of it only when conntrack drops the flow,
                // minutes after TIME_WAIT).
                self.transfer_done();
                self.relay_line(end, line);
            }
            Some(Pending::Command(Expect::Login(login_end))) => {
                if matches!(code, Code(230) | Code(232)) && !self.logged_in {
                    self.logged_in = true;
                    self.login_deadline = None;
                    self.events.push_back(Event::LoggedIn);
                } else {
                    self.login_refused(login_end, code);
                }
                self.relay_line(end, line);
            }
            Some(Pending::Command(Expect::Rein(login_end))) => {
                self.login_refused(login_end, code);
                self.relay_line(end, line);
            }
            Some(Pending::Command(Expect::Passive(plan))) => {
                self.on_passive_reply(plan, code, line, malformed);
            }
            Some(Pending::Command(Expect::AuthPassthrough(ports))) => {
                self.relay_line(end, line);
                self.on_auth_reply(code, ports);
            }
            Some(Pending::Command(Expect::ToPassive(plan))) => {
                self.on_to_passive_reply(plan, code, line, malformed);
            }
            Some(Pending::Command(Expect::ToActive(plan))) => {
                self.on_to_active_reply(plan, code);
            }
            Some(local @ Pending::Local(_)) => {
                // A reply nobody asked for while a local one waits.
                self.pending.push_front(local);
                self.relay_line(end, line);
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

    /// The server's data endpoint in a final 227/229 to the PASV/EPSV
    /// the gateway sent as `upstream`.
    fn announced(
        &self,
        upstream: Style,
        code: Code,
        line: &[u8],
        malformed: bool,
    ) -> Option<SocketAddr> {
        let announced = match (malformed, upstream, code) {
            (false, Style::Pasv, Code(227)) => {
                reply::parse_227(line).map(|p| SocketAddr::V4(p.addr))
            }
            (false, Style::Epsv, Code(229)) => {
                reply::parse_229(line).map(|p| SocketAddr::new(self.peers.server, p.port))
            }
            _ => None,
        };
        announced.map(canonical)
    }

    fn on_passive_reply(&mut self, plan: PassivePlan, code: Code, line: Vec<u8>, malformed: bool) {
        if code != Code(227) && code != Code(229) {
            // An error reply: passed on, lookalikes withheld.
            self.flush_passive_lines();
            return self.relay_line(ReplyLine::End(code), line);
        }
        // Whatever the server wrote around its final line goes: the client
        // gets the gateway's canonical line or the gateway's 425.
        self.passive = PassiveLines::default();
        let Some((id, endpoint, replaced)) = self.passive_leg(
            (plan.upstream, code, &line, malformed),
            DataMode::Passive,
            self.peers.client,
        ) else {
            return;
        };
        self.events.push_back(Event::OpenPinhole(PinholeRequest {
            id,
            mode: DataMode::Passive,
            listen_ip: self.ep.client_local.ip(),
            expected_peer: self.peers.client,
            connect_to: endpoint,
            connect_from: self.ep.server_local.ip(),
            client_tls: self.client_data_tls(),
            shape: Shape::Relay,
        }));
        self.held_reply = Some(HeldReply {
            id,
            answer: Answer::Passive(plan),
            replaced,
        });
    }

    /// The server's 227/229 `reply` (style, code, line, malformed) read and
    /// policed, and a slot reserved for a pinhole of `mode` expecting
    /// `peer`: its key, the endpoint the gateway connects to and whether
    /// the announced address was replaced. None once the client has been
    /// refused (unusable reply, policy, or no slot).
    fn passive_leg(
        &mut self,
        (upstream, code, line, malformed): (Style, Code, &[u8], bool),
        mode: DataMode,
        peer: IpAddr,
    ) -> Option<(PinholeId, SocketAddr, bool)> {
        let Some(announced) = self.announced(upstream, code, line, malformed) else {
            self.refuse_unusable_passive_reply();
            return None;
        };
        let (endpoint, replaced) = self.passive_endpoint(announced)?;
        let Some(id) = self.reserve_slot(mode, vec![peer]) else {
            self.refuse(
                Denial::new(DenyReason::PinholeLimit, Side::Client),
                TOO_MANY_DATA_CONNECTIONS,
                Route::InPlace,
            );
            return None;
        };
        Some((id, endpoint, replaced))
    }

    fn refuse_unusable_passive_reply(&mut self) {
        self.refuse(
            Denial::new(DenyReason::MalformedPassiveReply, Side::Server),
            "425 Can't open data connection: unusable passive reply from server.",
            Route::InPlace,
        );
    }

    /// Where the gateway connects for a server's passive reply naming
    /// `announced` (policy: the control address unless a rule allows
    /// another), and whether that replaced the server's address. `None`:
    /// refused, the client has its 425.
    fn passive_endpoint(&mut self, announced: SocketAddr) -> Option<(SocketAddr, bool)> {
        match self
            .cfg
            .policy
            .decide(self.peers, DataRequest::Passive { announced })
        {
            Decision::Relay { endpoint, replaced } => Some((endpoint, replaced)),
            Decision::Deny { reason, rule } => {
                let denial = Denial::new(reason, Side::Server)
                    .target(announced)
                    .rule(rule);
                self.refuse(
                    denial,
                    "425 Can't open data connection: passive address refused by policy.",
                    Route::InPlace,
                );
                None
            }
            Decision::Direct { .. } => unreachable!("passive requests are always relayed"),
        }
    }

    /// The server's reply to the PASV/EPSV that stands for the client's
    /// PORT/EPRT (`server_data = "passive"`): a pinhole that connects out
    /// to the server's passive port and to the client's port; the client
    /// gets its 200 once it is open.
    fn on_to_passive_reply(&mut self, plan: ToPassive, code: Code, line: Vec<u8>, malformed: bool) {
        self.passive = PassiveLines::default();
        if code != Code(227) && code != Code(229) {
            let arg = Some(plan.arg.as_str()).filter(|a| !a.is_empty());
            return self.translation_refused(
                code,
                plan.client,
                plan.upstream.verb(),
                &plan.verb_text,
                arg,
            );
        }
        let Some((id, endpoint, replaced)) = self.passive_leg(
            (plan.upstream, code, &line, malformed),
            DataMode::Active,
            self.peers.server,
        ) else {
            return;
        };
        self.events.push_back(Event::OpenPinhole(PinholeRequest {
            id,
            mode: DataMode::Active,
            listen_ip: self.ep.client_local.ip(),
            expected_peer: self.peers.server,
            connect_to: plan.target,
            connect_from: self.ep.client_local.ip(),
            client_tls: self.client_data_tls(),
            shape: Shape::DialBoth {
                dial: endpoint,
                dial_from: self.ep.server_local.ip(),
            },
        }));
        self.held_reply = Some(HeldReply {
            id,
            answer: Answer::PortAccepted(plan),
            replaced,
        });
    }

    /// The server's reply to the PORT/EPRT that stands for the client's
    /// PASV/EPSV (`server_data = "active"`): accepted, the client gets the
    /// gateway's 227/229 naming the pinhole; refused, the pinhole goes and
    /// the client gets the matching refusal.
    fn on_to_active_reply(&mut self, plan: ToActive, code: Code) {
        self.passive = PassiveLines::default();
        let waiting = self.slots.iter().any(|s| s.id == plan.id);
        if code.0 / 100 == 2 && !waiting {
            // The server took the PORT, but the pinhole it names is gone
            // (expired while the server was slow, or superseded).
            return self.refuse(
                Denial::new(DenyReason::PinholeUnavailable, Side::Client),
                NO_PINHOLE,
                Route::InPlace,
            );
        }
        if code.0 / 100 != 2 {
            if waiting {
                self.slots.retain(|s| s.id != plan.id);
                self.events.push_back(Event::ClosePinhole {
                    id: plan.id,
                    cause: PinholeClose::ServerRefused,
                });
            }
            return self.translation_refused(
                code,
                plan.client.verb(),
                plan.upstream,
                &plan.verb_text,
                None,
            );
        }
        self.send_passive_line(plan.client, plan.port);
        self.events.push_back(Event::Rewrite {
            kind: RewriteKind::for_verbs(plan.client.verb(), plan.upstream),
            address_replaced: true,
        });
    }

    /// The server refused (`code`) the command the gateway sent instead of
    /// the client's: the client gets the refusal its own command expects
    /// (RFC 959 section 4.2: 4yz transient, 5yz permanent; 421 and 530
    /// keep their meaning), and the deny log names the translation.
    fn translation_refused(
        &mut self,
        code: Code,
        client: DataVerb,
        server: DataVerb,
        verb_text: &str,
        argument: Option<&str>,
    ) {
        let mapped = match code.0 {
            421 | 530 => code.0,
            400..=499 => 425,
            _ => 502,
        };
        let reply = format!(
            "{mapped} Can't open data connection: the server refused {} (ftpgate sent it for {}) with {}.",
            verb_name(server),
            verb_name(client),
            code.0
        );
        let mut denial = Denial::new(DenyReason::TranslationRefused, Side::Server)
            .rule(RewriteKind::for_verbs(client, server).as_str());
        denial.verb = Some(verb_text.to_string());
        denial.argument = argument.map(str::to_string);
        self.refuse(denial, &reply, Route::InPlace);
    }

    /// The gateway address a 227 names: the advertised address, else the
    /// address the client connected to, when it is IPv4.
    pub(super) fn pasv_announce_ip(&self) -> Option<Ipv4Addr> {
        match (self.ep.advertise, self.ep.client_local.ip()) {
            (Some(IpAddr::V4(ip)), _) | (_, IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }

    pub(super) fn send_passive_reply(&mut self, held: HeldReply, listen: SocketAddr) {
        let (client, server) = match &held.answer {
            Answer::Passive(plan) => {
                self.send_passive_line(plan.client, listen.port());
                (plan.client.verb(), plan.upstream.verb())
            }
            Answer::PortAccepted(plan) => {
                let ok = match plan.client {
                    DataVerb::Port => PORT_OK,
                    _ => EPRT_OK,
                };
                self.send_line_to_client(ok.as_bytes());
                (plan.client, plan.upstream.verb())
            }
        };
        self.events.push_back(Event::Rewrite {
            kind: RewriteKind::for_verbs(client, server),
            address_replaced: held.replaced,
        });
        self.flush_local_replies();
    }

    /// The gateway's canonical 227/229 naming `port`.
    fn send_passive_line(&mut self, client: Style, port: u16) {
        // Always the gateway's own line: none of the server's text
        // reaches the client.
        let line = match client {
            Style::Pasv => {
                let Some(ip) = self.pasv_announce_ip() else {
                    // The endpoints never change, and on_passive_command
                    // only plans a 227 when this address exists.
                    unreachable!("PASV is refused without an IPv4 address to announce")
                };
                reply::canonical_227(SocketAddrV4::new(ip, port))
            }
            Style::Epsv => reply::canonical_229(port),
        };
        self.send_line_to_client(&line);
    }

    /// Passes on the passive-reply lines held so far (lookalikes already
    /// replaced).
    fn flush_passive_lines(&mut self) {
        let held = std::mem::take(&mut self.passive);
        if held.withheld {
            self.lookalike_withheld();
        }
        for line in held.lines {
            self.send_line_to_client(&line);
        }
    }
}

fn verb_name(verb: DataVerb) -> &'static str {
    match verb {
        DataVerb::Port => "PORT",
        DataVerb::Eprt => "EPRT",
        DataVerb::Pasv => "PASV",
        DataVerb::Epsv => "EPSV",
    }
}

/// The code the client sees for a server reply of `code`: only the gateway
/// writes 227/229 lines.
pub(super) fn client_code(code: Code) -> Code {
    if code == Code(227) || code == Code(229) {
        NEUTRAL_CODE
    } else {
        code
    }
}

/// `line` as the client may see it, and whether it was replaced. A
/// continuation line becomes a text line that starts with a blank (RFC 959
/// section 4.2: text lines that could be read as a code are padded); a first
/// or last line keeps its place with the neutral code.
fn neutralized(role: ReplyLine, line: Vec<u8>) -> (Vec<u8>, bool) {
    if !reply::looks_passive(&line) {
        return (line, false);
    }
    let replacement = match role {
        ReplyLine::Start(code) => format!("{}-{LOOKALIKE_WITHHELD}", client_code(code).0),
        ReplyLine::End(code) => format!("{} {LOOKALIKE_WITHHELD}", client_code(code).0),
        ReplyLine::Text => format!(" {LOOKALIKE_WITHHELD}"),
    };
    (replacement.into_bytes(), true)
}

/// The text that replaces a malformed server line.
fn withheld(code: Code, sep: char) -> Vec<u8> {
    format!(
        "{}{sep}(reply line withheld by ftpgate: malformed)",
        client_code(code).0
    )
    .into_bytes()
}
