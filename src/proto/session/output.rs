//! What the session writes: lines to either peer, the gateway's own replies
//! in command order, the one refusal path and the close.

use super::Session;
use super::pending::{Expect, Pending};
use super::replies::client_code;
use super::types::{CloseReason, Event};
use crate::proto::Side;
use crate::proto::deny::{Denial, DenyReason};
use crate::proto::framing::{IP_SYNCH, SYNCH_URGENT, telnet_encode_into};

/// Sent when a PORT/EPRT or a passive reply would need one pinhole more
/// than a session may hold.
pub(super) const TOO_MANY_DATA_CONNECTIONS: &str =
    "425 Can't open data connection: too many open data connections.";
/// Sent when the pinhole a data connection needs could not be opened, or
/// is gone.
pub(super) const NO_PINHOLE: &str = "425 Can't open data connection: no pinhole available.";
/// Sent for a PORT/EPRT sent upstream as PASV/EPSV whose two data legs the
/// gateway could not connect (the client's port or the server's passive
/// port did not answer in time).
pub(super) const NO_DATA_LEGS: &str =
    "425 Can't open data connection: the gateway could not connect to your port or the server's.";
/// Sent for a verb the gateway does not pass on: not a clean token, or a
/// lookalike of an address verb (RFC 959 section 4.2.1: 500, syntax error,
/// command unrecognized).
pub(super) const UNRECOGNIZED: &str = "500 Syntax error, command unrecognized.";
/// The replies that close a session (RFC 959 section 4.2: 421, service not
/// available, closing control connection).
pub(super) const LOGIN_TIMED_OUT: &str = "421 Login timed out: closing control connection.";
pub(super) const IDLE_TIMED_OUT: &str = "421 Idle timeout: closing control connection.";
pub(super) const SHUTTING_DOWN: &str = "421 Service shutting down: closing control connection.";
/// The text of the final line the gateway adds to a server reply it cuts
/// short to close the session.
const CUT_SHORT: &str = "(reply cut short by ftpgate: closing)";
/// Sent for a PORT, EPRT or EPSV argument that does not parse.
pub(super) const BAD_ARGUMENT: &str = "501 Syntax error in parameters or arguments.";

/// Where the gateway's own reply to a refusal goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// A reply to a client command: queued behind earlier commands.
    Queued,
    /// Replaces the server's reply to the command now being answered.
    InPlace,
    /// No reply.
    Silent,
}

impl Session {
    pub(super) fn forward_line(&mut self, line: &[u8], expect: Expect) {
        telnet_encode_into(line, &mut self.to_server);
        self.to_server.extend_from_slice(b"\r\n");
        self.pending.push_back(Pending::Command(expect));
    }

    /// Sends ABOR behind Telnet IP and a Synch whose IAC goes as urgent
    /// data, however the client sent it (RFC 959 section 4.1.3; RFC 854).
    /// A server in the middle of a transfer may only look at its control
    /// connection when urgent data arrives (vsftpd acts on SIGURG), so a
    /// plain ABOR would wait for the end of the transfer it is meant to
    /// stop. The client's own urgent mark is not copied: the gateway reads
    /// urgent data inline and does not see where a client put it, and
    /// clients put it in different places (the BSD clients on the IAC
    /// before DM, lftp on the DM, Python's ftplib on the LF of a plain
    /// `ABOR\r\n`); every ABOR gets the same Synch.
    pub(super) fn forward_abort(&mut self, line: &[u8]) {
        let start = self.to_server.len();
        self.to_server.extend_from_slice(&IP_SYNCH);
        self.urgent_to_server.push(start + SYNCH_URGENT);
        self.forward_line(line, Expect::Other);
    }

    pub(super) fn send_line_to_client(&mut self, line: &[u8]) {
        telnet_encode_into(line, &mut self.to_client);
        self.to_client.extend_from_slice(b"\r\n");
    }

    /// Sends the gateway's own replies that have reached the head of the
    /// FIFO, unless a server reply is in the middle of being relayed.
    pub(super) fn flush_local_replies(&mut self) {
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

    /// The gateway's own reply to a command it answers itself (no
    /// refusal): queued behind earlier commands.
    pub(super) fn reply_locally(&mut self, reply: &str) {
        self.pending
            .push_back(Pending::Local(format!("{reply}\r\n").into_bytes()));
        self.flush_local_replies();
    }

    /// A server line the gateway will not pass on: logged, nobody answered.
    pub(super) fn server_line_refused(&mut self, reason: DenyReason) {
        self.refuse(Denial::new(reason, Side::Server), "", Route::Silent);
    }

    /// Every refusal goes through here: one deny event (or one count
    /// toward a summary, see `abuse`), one reply.
    pub(super) fn refuse(&mut self, mut denial: Denial, reply: &str, route: Route) {
        if route != Route::Silent {
            denial.reply = Some(reply.to_string());
        }
        self.log_denial(denial);
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

    /// Sends the closing `reply` (a 421) and closes. RFC 959 allows 421 at
    /// any time when the service shuts down, but not inside a multi-line
    /// reply: there a client reads it as text of that reply (section 4.2).
    /// So a server reply the client has seen the start of is ended first
    /// with a final line of its code; the gateway's replies still queued
    /// behind unanswered commands are dropped, the 421 answers them all.
    pub(super) fn close_with_reply(&mut self, reply: &str, reason: CloseReason) {
        if self.closed {
            return;
        }
        self.end_open_reply();
        self.to_client.extend_from_slice(reply.as_bytes());
        self.to_client.extend_from_slice(b"\r\n");
        self.close(reason);
    }

    /// Ends the multi-line reply the client is in the middle of, if any.
    /// The lines of a reply to PASV/EPSV are held until its end and never
    /// reached the client: nothing to end then.
    fn end_open_reply(&mut self) {
        let Some(code) = self.open_reply.take() else {
            return;
        };
        if !self.answers_passive() {
            // The code the client saw on the first line (227/229 shown as
            // the neutral code).
            let line = format!("{} {CUT_SHORT}", client_code(code).0);
            self.send_line_to_client(line.as_bytes());
        }
    }

    pub(super) fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            // Whatever was counted is logged before the session ends.
            self.log_summaries();
            self.events.push_back(Event::Close(reason));
        }
    }
}
