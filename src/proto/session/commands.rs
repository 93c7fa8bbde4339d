//! Client-side command handling: framing errors, login tracking, and the
//! PORT/EPRT and PASV/EPSV commands, held while the daemon resolves a target
//! or opens a pinhole.

use std::net::SocketAddr;
use std::time::Instant;

use super::Session;
use super::output::{BAD_ARGUMENT, TOO_MANY_DATA_CONNECTIONS, UNRECOGNIZED};
use super::pending::{Expect, LoginEnd, PassivePlan, Style, ToActive, ToPassive, is_transfer_verb};
use super::types::{
    DataMode, DataVerb, Event, PinholeId, PinholeRequest, Resolution, ResolveId, RewriteKind,
    ServerData, Shape,
};
use crate::proto::Side;
use crate::proto::command::{
    self, ArgError, Command, CommandClass, EpsvArg, Verb, af_number, format_eprt_arg,
    format_host_port,
};
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::framing::{Frame, check_line_bytes, telnet_decode};
use crate::proto::policy::{Behind, DataRequest, Decision, canonical};

/// Longest command argument copied into a deny event.
const MAX_LOGGED_ARG: usize = 256;

/// A PORT/EPRT held back while the daemon works on it.
#[derive(Debug, Clone)]
pub(super) struct ActiveCommand {
    verb: Verb,
    verb_text: String,
    arg: String,
    target: SocketAddr,
}

impl ActiveCommand {
    pub(super) fn target(&self) -> SocketAddr {
        self.target
    }
}

/// The client line the session is holding; no further client line is read
/// until the daemon answers.
#[derive(Debug, Clone)]
pub(super) enum HeldCommand {
    Resolving(ResolveId, ActiveCommand),
    Opening(PinholeId, ActiveCommand),
    /// A PASV/EPSV whose pinhole (both legs listening) is being opened
    /// before the gateway sends PORT/EPRT upstream (`server_data =
    /// "active"`).
    OpeningBoth(PinholeId, PassiveAsk),
}

/// A client's PASV/EPSV held while its pinhole opens.
#[derive(Debug, Clone)]
pub(super) struct PassiveAsk {
    client: Style,
    verb_text: String,
}

impl PassiveAsk {
    pub(super) fn verb_text(&self) -> &str {
        &self.verb_text
    }
}

/// RFC 6384 section 5: the ALGS command lets a client ask whether the
/// gateway translates EPSV/EPRT for an IPv4 server, and switch it per
/// session.
const ALGS_ENABLED: &str =
    "216 ENABLED: ftpgate translates EPSV/EPRT into PASV/PORT for this IPv4 server.";
const ALGS_DISABLED: &str =
    "216 DISABLED: ftpgate passes EPSV/EPRT to this IPv4 server as they are.";
const ALGS_USAGE: &str = "501 Syntax error: use ALGS STATUS64, ALGS ENABLE64 or ALGS DISABLE64.";

impl Session {
    pub(super) fn on_client_frame(&mut self, frame: Frame, now: Instant) {
        let raw = match frame {
            Frame::Line(raw) => raw,
            Frame::TooLong(_) => {
                let denial = Denial::new(DenyReason::LineTooLong, Side::Client);
                return self.refuse_client(denial, "500 Command line too long.");
            }
        };
        let line = telnet_decode(&raw);
        if check_line_bytes(&line).is_err() {
            let denial = Denial::new(DenyReason::MalformedLine, Side::Client);
            return self.refuse_client(denial, "500 Syntax error: bare CR or NUL in command line.");
        }
        let Ok(cmd) = command::parse_command(&line) else {
            let denial = Denial::new(DenyReason::MalformedCommand, Side::Client);
            return self.refuse_client(denial, UNRECOGNIZED);
        };
        let class = cmd.class();
        if let Some(i) = CommandClass::ALL.iter().position(|c| *c == class) {
            self.command_counts[i] += 1;
        }
        match cmd.verb {
            Verb::Port | Verb::Eprt => self.on_active_command(&cmd),
            Verb::Pasv | Verb::Epsv => self.on_passive_command(&cmd, &line),
            // Not forwarded: a server that matches verbs by prefix would
            // take it for the address verb it starts with.
            Verb::AddressLookalike => self.refuse_client(
                command_denial(DenyReason::AddressVerbLookalike, &cmd),
                UNRECOGNIZED,
            ),
            Verb::Lprt | Verb::Lpsv | Verb::Spsv => self.refuse_client(
                command_denial(DenyReason::UnsupportedCommand, &cmd),
                "502 Command not implemented: use EPRT or EPSV.",
            ),
            Verb::Auth => self.on_auth(&cmd, command_denial(DenyReason::AuthRefused, &cmd)),
            Verb::Protected => {
                self.on_protection_command(&cmd, command_denial(DenyReason::AuthRefused, &cmd))
            }
            Verb::User | Verb::Pass | Verb::Acct if self.login_needs_tls() => self.refuse_client(
                command_denial(DenyReason::TlsRequired, &cmd).rule("require_tls"),
                super::tls::TLS_REQUIRED,
            ),
            Verb::User | Verb::Pass | Verb::Acct => {
                let mut end = LoginEnd::NoLogin;
                if cmd.verb == Verb::User {
                    // A new USER starts a new login (RFC 959 section
                    // 4.1.1), with the whole login time again, as REIN
                    // gives: a client retrying after a failed login is not
                    // cut off by the clock of its first attempt. After a
                    // login the timer only matters if the server accepts
                    // the USER (a refusal keeps the login, see LoginEnd).
                    self.login_deadline = Some(now + self.cfg.login_timeout);
                    if self.logged_in {
                        self.logged_in = false;
                        end = LoginEnd::EndedLogin;
                    }
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
            Verb::Other if is_transfer_verb(&cmd.verb_text) => {
                self.forward_line(&line, Expect::Transfer)
            }
            Verb::Other
                if cmd.verb_text.eq_ignore_ascii_case("ALGS") && self.crosses_families() =>
            {
                self.on_algs(&cmd)
            }
            Verb::Abor => self.forward_abort(&line),
            Verb::Quit | Verb::Other => self.forward_line(&line, Expect::Other),
        }
    }

    /// Whether the client and the server use different address families
    /// (reverse publishing across families, NAT64).
    pub(super) fn crosses_families(&self) -> bool {
        af_number(self.peers.client) != af_number(self.peers.server)
    }

    /// Whether EPSV/EPRT from an IPv6 client become PASV/PORT toward an
    /// IPv4 server (RFC 6384; the default, `ALGS DISABLE64` turns it off
    /// for the session).
    fn translates_to_ipv4(&self) -> bool {
        self.alg64 && self.crosses_families() && self.peers.server.is_ipv4()
    }

    fn on_algs(&mut self, cmd: &Command) {
        let arg = String::from_utf8_lossy(cmd.arg.unwrap_or_default()).to_ascii_uppercase();
        let reply = match arg.trim() {
            "STATUS64" => {
                if self.alg64 {
                    ALGS_ENABLED
                } else {
                    ALGS_DISABLED
                }
            }
            "ENABLE64" => {
                self.alg64 = true;
                ALGS_ENABLED
            }
            "DISABLE64" => {
                self.alg64 = false;
                ALGS_DISABLED
            }
            _ => ALGS_USAGE,
        };
        self.reply_locally(reply);
    }

    /// The checks every data-connection command shares. `Err` carries the
    /// refusal.
    fn data_command_allowed(&self, cmd: &Command) -> Result<(), (DenyReason, &'static str)> {
        if !self.logged_in {
            return Err((DenyReason::NotLoggedIn, "530 Please log in first."));
        }
        if self.data_needs_prot_p() && !is_epsv_all(cmd) {
            return Err((DenyReason::TlsRequired, super::tls::PROT_P_REQUIRED));
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
            return self.refuse_client(data_denial(reason, cmd), reply);
        }
        let arg = cmd.arg.unwrap_or_default();
        let parsed = match cmd.verb {
            Verb::Port => command::parse_port_arg(arg).map(SocketAddr::V4),
            _ => command::parse_eprt_arg(arg),
        };
        let target = match parsed {
            Ok(target) => canonical(target),
            Err(ArgError::Syntax) => {
                return self
                    .refuse_client(command_denial(DenyReason::BadArgument, cmd), BAD_ARGUMENT);
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
            self.decide_active(active, Resolution::Elsewhere);
        } else {
            // Maybe one of the gateway's own pinholes (server-to-server),
            // or one of its own addresses (never a data target).
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
        self.refuse_client(command_denial(DenyReason::AddressFamily, cmd), reply);
    }

    /// Decides a PORT/EPRT on what the daemon found behind its target
    /// (`Elsewhere` for the client's own address).
    pub(super) fn decide_active(&mut self, cmd: ActiveCommand, answer: Resolution) {
        let (behind, found) = match answer {
            Resolution::Pinhole(r) => (Behind::Pinhole(canonical(r.endpoint)), Some(r)),
            Resolution::GatewayAddress => (Behind::Gateway, None),
            Resolution::Elsewhere => (Behind::Host, None),
        };
        let request = DataRequest::Active {
            target: cmd.target,
            behind,
        };
        match self.cfg.policy.decide(self.peers, request) {
            Decision::Deny { reason, rule } => {
                let denial = with_command(Denial::new(reason, Side::Client), &cmd)
                    .target(request_endpoint(request))
                    .rule(rule);
                self.refuse_client(denial, "504 Data connection target refused by policy.");
            }
            Decision::Relay { endpoint, .. } if self.cfg.server_data == ServerData::Passive => {
                self.convert_to_passive(cmd, endpoint);
            }
            Decision::Relay { endpoint, .. } => {
                let Some(id) = self.reserve_slot(DataMode::Active, vec![self.peers.server]) else {
                    let denial =
                        with_command(Denial::new(DenyReason::PinholeLimit, Side::Client), &cmd);
                    return self.refuse_client(denial, TOO_MANY_DATA_CONNECTIONS);
                };
                self.events.push_back(Event::OpenPinhole(PinholeRequest {
                    id,
                    mode: DataMode::Active,
                    listen_ip: self.ep.server_local.ip(),
                    expected_peer: self.peers.server,
                    connect_to: endpoint,
                    connect_from: self.ep.client_local.ip(),
                    client_tls: self.client_data_tls(),
                    shape: Shape::Relay,
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

    pub(super) fn forward_active(&mut self, cmd: &ActiveCommand, listen: SocketAddr) {
        // RFC 6384: an IPv6 client's EPRT reaches an IPv4 server as PORT.
        let verb = if self.translates_to_ipv4() {
            Verb::Port
        } else {
            cmd.verb
        };
        let line = active_line(verb, listen);
        let server = if line.starts_with("PORT") {
            DataVerb::Port
        } else {
            DataVerb::Eprt
        };
        self.forward_line(line.as_bytes(), Expect::Other);
        self.events.push_back(Event::Rewrite {
            kind: RewriteKind::for_verbs(active_verb(cmd.verb), server),
            address_replaced: true,
        });
    }

    /// `server_data = "passive"`: the client's PORT/EPRT (its target
    /// allowed by policy) goes upstream as PASV/EPSV; the server's reply
    /// opens a pinhole that connects out to both (see `replies`).
    fn convert_to_passive(&mut self, cmd: ActiveCommand, target: SocketAddr) {
        let upstream = if self.peers.server.is_ipv4() {
            Style::Pasv
        } else {
            Style::Epsv
        };
        let plan = ToPassive {
            client: active_verb(cmd.verb),
            upstream,
            target,
            verb_text: cmd.verb_text,
            arg: cmd.arg,
        };
        self.forward_line(upstream.line(), Expect::ToPassive(plan));
    }

    /// `server_data = "active"`: the client's PASV/EPSV gets a pinhole
    /// listening for both peers on one port; once it is open the gateway
    /// sends PORT/EPRT naming it upstream, and answers the client only
    /// after the server accepted that (see `replies`).
    fn convert_to_active(&mut self, cmd: &Command, client: Style) {
        let peers = vec![self.peers.client, self.peers.server];
        let Some(id) = self.reserve_slot(DataMode::Passive, peers) else {
            return self.refuse_client(
                command_denial(DenyReason::PinholeLimit, cmd),
                TOO_MANY_DATA_CONNECTIONS,
            );
        };
        self.events.push_back(Event::OpenPinhole(PinholeRequest {
            id,
            mode: DataMode::Passive,
            listen_ip: self.ep.client_local.ip(),
            expected_peer: self.peers.client,
            connect_to: SocketAddr::new(self.peers.server, 0),
            connect_from: self.ep.server_local.ip(),
            client_tls: self.client_data_tls(),
            shape: Shape::AcceptBoth {
                server_listen: self.ep.server_local.ip(),
                server: self.peers.server,
            },
        }));
        let ask = PassiveAsk {
            client,
            verb_text: cmd.verb_text.clone(),
        };
        self.held_command = Some(HeldCommand::OpeningBoth(id, ask));
    }

    /// The pinhole of a converted PASV/EPSV is open on `port`: the
    /// server is told to connect to the gateway's address on its side.
    pub(super) fn forward_converted_port(&mut self, id: PinholeId, ask: PassiveAsk, port: u16) {
        let listen = SocketAddr::new(self.ep.server_local.ip(), port);
        let line = active_line(Verb::Port, listen);
        let upstream = if line.starts_with("PORT") {
            DataVerb::Port
        } else {
            DataVerb::Eprt
        };
        let plan = ToActive {
            client: ask.client,
            upstream,
            id,
            port,
            verb_text: ask.verb_text,
        };
        self.forward_line(line.as_bytes(), Expect::ToActive(plan));
    }

    fn on_passive_command(&mut self, cmd: &Command, line: &[u8]) {
        if let Err((reason, reply)) = self.data_command_allowed(cmd) {
            return self.refuse_client(data_denial(reason, cmd), reply);
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
                    if self.cfg.server_data != ServerData::AsClient || self.crosses_families() {
                        // The gateway may still send PASV, PORT or EPRT
                        // upstream for this client: the server must not
                        // refuse them.
                        return self.reply_locally(EPSV_ALL_OK);
                    }
                    return self.forward_line(line, Expect::Other);
                }
                Ok(EpsvArg::Any) => Style::Epsv,
                Ok(EpsvArg::Family(af)) if af == client_af => Style::Epsv,
                Ok(EpsvArg::Family(_)) | Err(ArgError::Family) => return self.refuse_family(cmd),
                Err(ArgError::Syntax) => {
                    return self
                        .refuse_client(command_denial(DenyReason::BadArgument, cmd), BAD_ARGUMENT);
                }
            },
        };
        if self.cfg.server_data == ServerData::Active {
            return self.convert_to_active(cmd, client);
        }
        // The upstream side may use another family than the client side;
        // an IPv6 client's EPSV reaches an IPv4 server as PASV (RFC 6384).
        let upstream = if af_number(self.peers.server) == 1
            && (client == Style::Pasv || self.translates_to_ipv4())
        {
            Style::Pasv
        } else {
            Style::Epsv
        };
        self.forward_line(
            upstream.line(),
            Expect::Passive(PassivePlan { client, upstream }),
        );
    }
}

/// The gateway's own answer to EPSV ALL when it may translate later
/// commands (RFC 2428 section 4).
const EPSV_ALL_OK: &str = "200 EPSV ALL command successful.";

fn active_verb(verb: Verb) -> DataVerb {
    if verb == Verb::Port {
        DataVerb::Port
    } else {
        DataVerb::Eprt
    }
}

fn is_epsv_all(cmd: &Command) -> bool {
    cmd.verb == Verb::Epsv && matches!(command::parse_epsv_arg(cmd.arg), Ok(EpsvArg::All))
}

fn request_endpoint(request: DataRequest) -> SocketAddr {
    match request {
        DataRequest::Active {
            behind: Behind::Pinhole(endpoint),
            ..
        } => endpoint,
        DataRequest::Active { target, .. } => target,
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

/// The refusal of a data command, with the rule for `tls_required`.
fn data_denial(reason: DenyReason, cmd: &Command) -> Denial {
    let d = command_denial(reason, cmd);
    if reason == DenyReason::TlsRequired {
        d.rule("require_tls")
    } else {
        d
    }
}

fn command_denial(reason: DenyReason, cmd: &Command) -> Denial {
    let mut d = Denial::new(reason, Side::Client);
    d.verb = Some(cmd.verb_text.clone());
    let arg = loggable_arg(cmd);
    d.argument = (!arg.is_empty()).then_some(arg);
    d
}

pub(super) fn with_command(mut d: Denial, cmd: &ActiveCommand) -> Denial {
    d.verb = Some(cmd.verb_text.clone());
    d.argument = Some(cmd.arg.clone());
    d.target.get_or_insert(cmd.target);
    d
}
