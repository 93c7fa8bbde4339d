//! FTP over TLS (RFC 4217) as the core sees it: AUTH, PBSZ and PROT.
//!
//! Terminating (reverse mode with a certificate): the gateway is the TLS
//! server toward the client and answers AUTH, PBSZ and PROT itself; the
//! shell does the handshake and the core goes on reading plaintext, so
//! every other rule still holds. The upstream leg is the shell's business
//! (it sets up its own AUTH/PBSZ/PROT before the session starts), so none
//! of these commands ever reaches the server. PROT P makes the client leg
//! of later data connections TLS.
//!
//! Passthrough (transparent mode): AUTH goes to a server a rule names;
//! after its 234 the shell relays the control channel opaquely and the
//! client may reach that server's passive range for the rest of the
//! session. Everything else gets 534.

use super::Session;
use super::output::Route;
use super::pending::{Expect, Pending};
use super::types::{AuthTls, Event};
use crate::proto::Side;
use crate::proto::command::Command;
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::reply::Code;

/// RFC 4217 section 4: the server accepts the security mechanism.
pub(super) const AUTH_OK: &str = "234 AUTH TLS successful: start the TLS handshake.";
const AUTH_REFUSED: &str =
    "534 Request denied for policy reasons: the control channel must stay inspectable.";
const BAD_SEQUENCE: &str = "503 Bad sequence of commands.";
/// RFC 4217 section 9: data connections need PROT P here.
pub(super) const PROT_P_REQUIRED: &str =
    "521 Data connection cannot be opened with this PROT setting: use PROT P.";
pub(super) const TLS_REQUIRED: &str = "530 TLS required: send AUTH TLS before logging in.";

/// Where the client's control connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum ClientTls {
    #[default]
    Plain,
    /// 234 sent; the shell is handshaking.
    Handshaking,
    Secure,
    /// AUTH went to the server under a passthrough rule; waiting for its
    /// reply.
    AwaitingServer,
    /// Opaque from here on: the core reads nothing more.
    Passthrough,
}

#[derive(Debug, Default)]
pub(super) struct TlsState {
    pub(super) client: ClientTls,
    pbsz: bool,
    pub(super) prot_private: bool,
}

impl TlsState {
    pub(super) fn new(auth: &AuthTls) -> Self {
        let client = match auth {
            AuthTls::Terminate { implicit: true } => ClientTls::Secure,
            _ => ClientTls::Plain,
        };
        TlsState {
            client,
            ..TlsState::default()
        }
    }

    /// Whether the core reads the client now.
    pub(super) fn reads_client(&self) -> bool {
        matches!(self.client, ClientTls::Plain | ClientTls::Secure)
    }

    pub(super) fn reads_server(&self) -> bool {
        self.client != ClientTls::Passthrough
    }
}

impl Session {
    fn terminating(&self) -> bool {
        matches!(self.cfg.tls.auth, AuthTls::Terminate { .. })
    }

    pub(super) fn tls_secure(&self) -> bool {
        self.tls.client == ClientTls::Secure
    }

    /// The client's data legs speak TLS.
    pub(super) fn client_data_tls(&self) -> bool {
        self.tls_secure() && self.tls.prot_private
    }

    /// `require_tls` refuses this login command (cleartext password).
    pub(super) fn login_needs_tls(&self) -> bool {
        self.cfg.tls.require_tls && self.terminating() && !self.tls_secure()
    }

    /// `require_tls` refuses data connections without PROT P.
    pub(super) fn data_needs_prot_p(&self) -> bool {
        self.cfg.tls.require_tls && self.terminating() && !self.client_data_tls()
    }

    pub(super) fn on_auth(&mut self, cmd: &Command, denial: Denial) {
        let arg = cmd.arg.unwrap_or_default().trim_ascii();
        // RFC 4217 section 4: TLS, or TLS-C; SSL is the older name.
        let known = [&b"TLS"[..], b"TLS-C", b"SSL"]
            .iter()
            .any(|m| m.eq_ignore_ascii_case(arg));
        match &self.cfg.tls.auth {
            AuthTls::Refuse => self.refuse_client(denial.rule("auth_tls"), AUTH_REFUSED),
            AuthTls::Terminate { .. } => {
                if !known {
                    return self.refuse_client(
                        denial.rule("auth_tls"),
                        "504 Security mechanism not understood: use AUTH TLS.",
                    );
                }
                if self.tls.client != ClientTls::Plain || !self.quiet_for_handshake() {
                    return self.refuse_client(denial.rule("auth_tls"), BAD_SEQUENCE);
                }
                // Straight out: nothing is queued before it (checked above).
                self.to_client.extend_from_slice(AUTH_OK.as_bytes());
                self.to_client.extend_from_slice(b"\r\n");
                self.tls.client = ClientTls::Handshaking;
                self.events.push_back(Event::StartTls);
            }
            AuthTls::Passthrough(rules) => {
                let server = self.peers.server;
                let rule = rules
                    .iter()
                    .find(|r| r.servers.iter().any(|n| n.contains(&server)))
                    .cloned();
                let Some(rule) = rule else {
                    return self.refuse_client(denial.rule("auth_tls"), AUTH_REFUSED);
                };
                if !known || self.logged_in || !self.quiet_for_handshake() {
                    return self.refuse_client(denial.rule(rule.name), BAD_SEQUENCE);
                }
                self.tls.client = ClientTls::AwaitingServer;
                let line = format!("AUTH {}", String::from_utf8_lossy(arg));
                self.forward_line(line.as_bytes(), Expect::AuthPassthrough(rule.data_ports));
                self.pending_rule = Some(rule.name);
            }
        }
    }

    /// Nothing in flight either way: the next bytes on the connection are
    /// the handshake's.
    fn quiet_for_handshake(&self) -> bool {
        self.pending.is_empty()
            && self.open_reply.is_none()
            && self.held_reply.is_none()
            && self.client_in.buffered() == 0
    }

    /// PBSZ, PROT, and the RFC 2228 commands the gateway never passes on.
    pub(super) fn on_protection_command(&mut self, cmd: &Command, denial: Denial) {
        let verb = cmd.verb_text.to_ascii_uppercase();
        let arg = cmd.arg.unwrap_or_default().trim_ascii();
        if !self.terminating() {
            return self.refuse_client(denial.rule("auth_tls"), AUTH_REFUSED);
        }
        if !self.tls_secure() {
            // RFC 4217 section 9: PBSZ/PROT before the security exchange.
            return self.refuse_client(denial.rule("auth_tls"), BAD_SEQUENCE);
        }
        match verb.as_str() {
            "PBSZ" => {
                // RFC 4217 section 9: TLS has no buffer; the answer is 0.
                self.tls.pbsz = true;
                self.local_reply("200 PBSZ=0");
            }
            "PROT" if !self.tls.pbsz => self.refuse_client(denial, BAD_SEQUENCE),
            "PROT" if arg.eq_ignore_ascii_case(b"P") => {
                self.tls.prot_private = true;
                self.local_reply("200 Protection level set to P.");
            }
            "PROT" if arg.eq_ignore_ascii_case(b"C") => {
                self.tls.prot_private = false;
                self.local_reply("200 Protection level set to C.");
            }
            "PROT" if arg.eq_ignore_ascii_case(b"S") || arg.eq_ignore_ascii_case(b"E") => self
                .refuse_client(
                    denial.rule("auth_tls"),
                    "536 Requested PROT level not supported.",
                ),
            "PROT" => self.refuse_client(denial, "504 PROT takes C or P."),
            // CCC would make the control channel cleartext again behind
            // the gateway's back; ADAT, MIC, CONF, ENC belong to other
            // mechanisms.
            _ => self.refuse_client(denial.rule("auth_tls"), AUTH_REFUSED),
        }
    }

    /// The gateway's own positive reply, in command order.
    fn local_reply(&mut self, reply: &str) {
        self.pending
            .push_back(Pending::Local(format!("{reply}\r\n").into_bytes()));
        self.flush_local_replies();
    }

    /// The server's final reply to an AUTH sent under a passthrough rule.
    pub(super) fn on_auth_reply(&mut self, code: Code, data_ports: (u16, u16)) {
        let rule = self.pending_rule.take().unwrap_or_default();
        if code != Code(234) {
            self.tls.client = ClientTls::Plain;
            return;
        }
        self.tls.client = ClientTls::Passthrough;
        // Logged once per session, with the range granted: from here on
        // the gateway sees nothing of this session but its data peers.
        let mut denial = Denial::new(DenyReason::TlsPassthrough, Side::Server).rule(rule);
        denial.argument = Some(format!("data_ports {}-{}", data_ports.0, data_ports.1));
        self.refuse(denial, "", Route::Silent);
        self.events.push_back(Event::Passthrough {
            server: self.peers.server,
            data_ports,
        });
    }

    /// The shell finished the TLS handshake with the client.
    pub fn handle_tls_established(&mut self, now: std::time::Instant) {
        self.tick(now);
        if self.tls.client == ClientTls::Handshaking {
            self.tls.client = ClientTls::Secure;
            // RFC 4217 section 4: after AUTH the client logs in again; a
            // fresh PBSZ/PROT state.
            self.tls.pbsz = false;
            self.tls.prot_private = false;
            self.drain(now);
        }
    }

    /// The TLS handshake with the client failed: nothing more can be said
    /// to it. One deny line, then the session closes.
    pub fn handle_tls_failed(&mut self, error: &str, now: std::time::Instant) {
        self.tick(now);
        let mut denial = Denial::new(DenyReason::TlsHandshakeFailed, Side::Client);
        denial.argument = Some(error.chars().take(200).collect());
        self.refuse(denial, "", Route::Silent);
        self.close(super::types::CloseReason::TlsFailed);
    }

    /// The session is being relayed opaquely (passthrough): the core is
    /// done with it.
    pub fn is_passthrough(&self) -> bool {
        self.tls.client == ClientTls::Passthrough
    }
}
