//! Server-side reply handling: pairing final replies with the commands they
//! answer, login success, and the 227/229 replies whose address the gateway
//! replaces with a pinhole's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use super::Session;
use super::output::{Route, TOO_MANY_DATA_CONNECTIONS};
use super::pending::{Expect, LoginEnd, PassivePlan, Pending, Style};
use super::types::{CloseReason, DataMode, Event, PinholeId, PinholeRequest, RewriteKind};
use crate::proto::Side;
use crate::proto::command::format_host_port;
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::framing::{Frame, check_line_bytes, telnet_decode};
use crate::proto::policy::{DataRequest, Decision, canonical};
use crate::proto::reply::{self, Code, ReplyLine};

/// Lines of a multi-line reply to PASV/EPSV kept while waiting for its end.
const MAX_PASSIVE_BUFFER: usize = 16 * 1024;

/// The final line of a 227/229 reply, held until its pinhole is open.
#[derive(Debug, Clone)]
pub(super) struct HeldReply {
    pub(super) id: PinholeId,
    plan: PassivePlan,
    line: Vec<u8>,
    replaced: bool,
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
            Some(Pending::Command(Expect::Transfer)) => {
                // The transfer is over: its data connection no longer holds
                // a slot, whenever its plane reports the end (the kernel
                // plane hears of it only when conntrack drops the flow,
                // minutes after TIME_WAIT).
                self.transfer_done();
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
                        TOO_MANY_DATA_CONNECTIONS,
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
    pub(super) fn pasv_announce_ip(&self) -> Option<Ipv4Addr> {
        match (self.ep.advertise, self.ep.client_local.ip()) {
            (Some(IpAddr::V4(ip)), _) | (_, IpAddr::V4(ip)) => Some(ip),
            _ => None,
        }
    }

    pub(super) fn send_passive_reply(&mut self, held: HeldReply, listen: SocketAddr) {
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

    /// Passes on, unchanged, the passive-reply lines held so far.
    fn flush_passive_lines(&mut self) {
        for line in std::mem::take(&mut self.passive_lines) {
            self.send_line_to_client(&line);
        }
        self.passive_bytes = 0;
    }
}

/// The text that replaces a malformed server line.
fn withheld(code: Code, sep: char) -> Vec<u8> {
    format!("{}{sep}(reply line withheld by ftpgate: malformed)", code.0).into_bytes()
}
