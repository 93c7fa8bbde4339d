//! Refusals: the stable reason codes and the event each refusal produces.
//!
//! The same `reason` string is the deny-log field, the metric label and the
//! tracing field, so an operator can go from a counter to the log lines.

use std::net::{IpAddr, SocketAddr};

use super::Side;

/// Why something was refused. The strings from [`DenyReason::as_str`] are a
/// stable interface: dashboards and alerts depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DenyReason {
    /// A line with a bare CR or a NUL.
    MalformedLine,
    /// A line longer than the configured maximum.
    LineTooLong,
    /// A command whose verb is not a clean token (leading blank, tab, ...).
    MalformedCommand,
    /// A verb that starts with an address verb but is longer (PORTX,
    /// PASVX): some servers match verbs by prefix.
    AddressVerbLookalike,
    /// PORT/EPRT/EPSV arguments that do not parse.
    BadArgument,
    /// An address family the control connection does not use.
    AddressFamily,
    /// PORT/EPRT naming a host other than the client (FTP bounce, RFC 2577).
    Bounce,
    /// PORT/EPRT naming a server behind one of the gateway's own pinholes
    /// (a server-to-server transfer) that no FXP rule allows.
    FxpDenied,
    /// A data target on a port below 1024.
    PrivilegedPort,
    /// A data target on a port in the configured deny list.
    DeniedPort,
    /// PORT/EPRT/PASV after EPSV ALL (RFC 2428 section 4).
    EpsvAll,
    /// AUTH or an RFC 2228 security command: the channel must stay readable.
    AuthRefused,
    /// LPRT/LPSV/SPSV: address formats the gateway does not rewrite.
    UnsupportedCommand,
    /// A data-connection command before a successful login.
    NotLoggedIn,
    /// The session already holds its maximum number of pinholes.
    PinholeLimit,
    /// The gateway could not open a pinhole (port range exhausted, bind
    /// failure).
    PinholeUnavailable,
    /// A 227/229 reply to PASV/EPSV whose address cannot be read.
    MalformedPassiveReply,
    /// A server line that is no valid reply line (dropped or replaced).
    MalformedReply,
    /// The server's first line is no FTP reply.
    NotFtp,
    /// A server line a client could read as a 227/229 (outside the final
    /// reply to PASV/EPSV, which the gateway writes itself) was replaced by
    /// a neutral line: logged once per reply.
    PassiveReplyWithheld,
    /// A pinhole whose expected peer never connected.
    PinholeExpired,
    /// A data connection to a pinhole from a host other than the expected
    /// peer (PASV theft).
    PasvTheft,
    /// A control connection whose original destination is the gateway itself.
    Loop,
    /// A transparent-mode control connection whose original destination
    /// cannot be read (SO_ORIGINAL_DST failed: no redirect, no conntrack).
    NoOriginalDestination,
    /// The gateway is at its session limit.
    SessionLimit,
    /// This client is at its per-client session limit.
    ClientSessionLimit,
    /// The upstream server could not be reached.
    UpstreamUnreachable,
    /// The session kept sending refused input past its budget
    /// (`limits.max_refused_commands`) and was closed.
    RefusalBudget,
    /// The server refused the command the gateway translated the client's
    /// into (`server_data` conversion, RFC 6384 family translation): the
    /// client got the matching refusal of its own command.
    TranslationRefused,
    /// A listener that takes the PROXY protocol got a connection from a
    /// source outside `trusted_proxies`, or no valid PROXY header in time.
    ProxyHeader,
    /// The TLS handshake with the client failed (or timed out).
    TlsHandshakeFailed,
    /// `require_tls`: a login before AUTH TLS, or a data connection
    /// without PROT P, on a terminating listener.
    TlsRequired,
    /// The upstream server's certificate did not verify (or its TLS
    /// handshake failed): the session ends.
    TlsUpstreamVerifyFailed,
    /// Not a refusal: a session went opaque under a passthrough rule, with
    /// the data ports its client may reach (logged once per session).
    TlsPassthrough,
}

impl DenyReason {
    pub const ALL: [DenyReason; 34] = [
        DenyReason::MalformedLine,
        DenyReason::LineTooLong,
        DenyReason::MalformedCommand,
        DenyReason::AddressVerbLookalike,
        DenyReason::BadArgument,
        DenyReason::AddressFamily,
        DenyReason::Bounce,
        DenyReason::FxpDenied,
        DenyReason::PrivilegedPort,
        DenyReason::DeniedPort,
        DenyReason::EpsvAll,
        DenyReason::AuthRefused,
        DenyReason::UnsupportedCommand,
        DenyReason::NotLoggedIn,
        DenyReason::PinholeLimit,
        DenyReason::PinholeUnavailable,
        DenyReason::MalformedPassiveReply,
        DenyReason::MalformedReply,
        DenyReason::NotFtp,
        DenyReason::PassiveReplyWithheld,
        DenyReason::PinholeExpired,
        DenyReason::PasvTheft,
        DenyReason::Loop,
        DenyReason::NoOriginalDestination,
        DenyReason::SessionLimit,
        DenyReason::ClientSessionLimit,
        DenyReason::UpstreamUnreachable,
        DenyReason::RefusalBudget,
        DenyReason::TranslationRefused,
        DenyReason::ProxyHeader,
        DenyReason::TlsHandshakeFailed,
        DenyReason::TlsRequired,
        DenyReason::TlsUpstreamVerifyFailed,
        DenyReason::TlsPassthrough,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::MalformedLine => "malformed_line",
            DenyReason::LineTooLong => "line_too_long",
            DenyReason::MalformedCommand => "malformed_command",
            DenyReason::AddressVerbLookalike => "address_verb_lookalike",
            DenyReason::BadArgument => "bad_argument",
            DenyReason::AddressFamily => "address_family",
            DenyReason::Bounce => "bounce",
            DenyReason::FxpDenied => "fxp_denied",
            DenyReason::PrivilegedPort => "privileged_port",
            DenyReason::DeniedPort => "denied_port",
            DenyReason::EpsvAll => "epsv_all",
            DenyReason::AuthRefused => "auth_refused",
            DenyReason::UnsupportedCommand => "unsupported_command",
            DenyReason::NotLoggedIn => "not_logged_in",
            DenyReason::PinholeLimit => "pinhole_limit",
            DenyReason::PinholeUnavailable => "pinhole_unavailable",
            DenyReason::MalformedPassiveReply => "malformed_passive_reply",
            DenyReason::MalformedReply => "malformed_reply",
            DenyReason::NotFtp => "not_ftp",
            DenyReason::PassiveReplyWithheld => "passive_reply_withheld",
            DenyReason::PinholeExpired => "pinhole_expired",
            DenyReason::PasvTheft => "pasv_theft",
            DenyReason::Loop => "loop",
            DenyReason::NoOriginalDestination => "no_original_destination",
            DenyReason::SessionLimit => "session_limit",
            DenyReason::ClientSessionLimit => "client_session_limit",
            DenyReason::UpstreamUnreachable => "upstream_unreachable",
            DenyReason::RefusalBudget => "refusal_budget",
            DenyReason::TranslationRefused => "translation_refused",
            DenyReason::ProxyHeader => "proxy_header",
            DenyReason::TlsHandshakeFailed => "tls_handshake_failed",
            DenyReason::TlsRequired => "tls_required",
            DenyReason::TlsUpstreamVerifyFailed => "tls_upstream_verify_failed",
            DenyReason::TlsPassthrough => "tls_passthrough",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One refusal, as the core saw it. The daemon adds the session id, the
/// control addresses and the time when it writes the deny-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: DenyReason,
    /// Whose input or connection was refused.
    pub side: Side,
    /// The command verb, upper-cased, when a command was refused.
    pub verb: Option<String>,
    /// The command argument (never for PASS/ACCT), truncated.
    pub argument: Option<String>,
    /// The data address concerned: the refused target, or the pinhole.
    pub target: Option<SocketAddr>,
    /// The host that was expected to connect (pinhole expiry, PASV theft).
    pub expected_peer: Option<IpAddr>,
    /// Who connected instead of the expected peer (PASV theft).
    pub peer: Option<SocketAddr>,
    /// The policy element that decided.
    pub rule: Option<String>,
    /// The FTP reply the gateway sent instead, without CRLF.
    pub reply: Option<String>,
    /// Set on a summary: this many further refusals of `reason` in the
    /// session were counted instead of logged one by one.
    pub suppressed: Option<u64>,
}

impl Denial {
    pub fn new(reason: DenyReason, side: Side) -> Self {
        Denial {
            reason,
            side,
            verb: None,
            argument: None,
            target: None,
            expected_peer: None,
            peer: None,
            rule: None,
            reply: None,
            suppressed: None,
        }
    }

    pub fn target(mut self, target: SocketAddr) -> Self {
        self.target = Some(target);
        self
    }

    pub fn peer(mut self, peer: SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    pub fn expected_peer(mut self, peer: IpAddr) -> Self {
        self.expected_peer = Some(peer);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_unique_snake_case() {
        let mut seen = std::collections::BTreeSet::new();
        for r in DenyReason::ALL {
            let s = r.as_str();
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s}"
            );
            assert!(seen.insert(s), "duplicate {s}");
        }
    }
}
