//! Scenario tests for the core's hardening rules: the
//! client sees only passive addresses the gateway wrote, address-verb
//! lookalikes are refused, the login timer, the abuse budget and the deny
//! aggregation, and shutdown through the core.
//!
//! Lab addresses as in `proto_vectors.rs`: client 192.0.2.10, gateway
//! 192.0.2.1 inside, server 198.51.100.20; the first pinhole is port 50001.

use std::time::Duration;

use ftpgate::proto::driver::{Driver, Transcript, lab_endpoints};
use ftpgate::proto::{CloseReason, DenyReason, Event, SessionConfig, Side};

// ---- helpers ---------------------------------------------------------------

/// The one 227 line a client may see for the first pinhole.
const CANONICAL_227: &str = "227 Entering Passive Mode (192,0,2,1,195,81).\r\n";
/// The one 229 line a client may see for the first pinhole.
const CANONICAL_229: &str = "229 Entering Extended Passive Mode (|||50001|)\r\n";
/// What replaces a continuation line that looks like a passive reply.
const WITHHELD_TEXT: &str = " (line withheld by ftpgate: looks like a passive reply)\r\n";
/// What replaces the first line of a 227/229 reply to another command.
const WITHHELD_START: &str = "200-(line withheld by ftpgate: looks like a passive reply)\r\n";
/// What replaces the final line of a 227/229 reply to another command.
const WITHHELD_END: &str = "200 (line withheld by ftpgate: looks like a passive reply)\r\n";
const R425_LIMIT: &str = "425 Can't open data connection: too many open data connections.\r\n";
const R425_PASSIVE_POLICY: &str =
    "425 Can't open data connection: passive address refused by policy.\r\n";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `command`, then `reply` from the server, and returns what the
/// client got.
fn exchange(d: &mut Driver, command: &[u8], reply: &[u8]) -> String {
    d.transcript = Transcript::default();
    d.input(Side::Client, command);
    d.input(Side::Server, reply);
    text(&d.transcript.to_client)
}

// ---- 1. the client sees only passive replies the gateway wrote -------------

#[test]
fn final_227_to_pasv_is_the_canonical_line_whatever_text_the_server_wrote() {
    for reply in [
        &b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n"[..],
        b"227 Entering Passive Mode 10,0,0,5,200,10\r\n",
        b"227 =10,0,0,5,200,10\r\n",
        // Text around the numbers that a first-digit-group client would
        // read as the address, and a second group after the real one.
        b"227 Host 10.0.0.9 says (10,0,0,5,200,10) not 10,0,0,9,1,1\r\n",
    ] {
        let mut d = Driver::logged_in();
        let got = exchange(&mut d, b"PASV\r\n", reply);
        assert_eq!(got, CANONICAL_227, "{}", text(reply));
        assert_eq!(d.transcript.pinhole_requests().len(), 1);
        assert!(d.transcript.reasons().is_empty(), "{:#?}", d.transcript);
    }
}

#[test]
fn final_229_to_epsv_is_the_canonical_line_whatever_text_the_server_wrote() {
    for reply in [
        &b"229 Entering Extended Passive Mode (|||6446|)\r\n"[..],
        b"229 ok (!!!6446!)\r\n",
        b"229 Server 10.0.0.5 (|||6446|) 10,0,0,5,1,1\r\n",
    ] {
        let mut d = Driver::logged_in();
        let got = exchange(&mut d, b"EPSV\r\n", reply);
        assert_eq!(got, CANONICAL_229, "{}", text(reply));
        assert_eq!(d.transcript.pinhole_requests().len(), 1);
    }
}

#[test]
fn multi_line_227_to_pasv_shows_the_client_only_the_canonical_line() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"PASV\r\n",
        b"227-Entering Passive Mode (10,0,0,9,1,1)\r\n227-(10,0,0,9,1,2)\r\n 227 (10,0,0,9,1,3)\r\n227 Entering Passive Mode (10,0,0,5,200,10).\r\n",
    );
    assert_eq!(got, CANONICAL_227);
    assert!(d.transcript.reasons().is_empty());
}

#[test]
fn multi_line_227_to_pasv_refused_by_policy_shows_the_client_only_the_425() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"PASV\r\n",
        b"227-Entering Passive Mode (10,0,0,9,1,1)\r\n 227 (10,0,0,9,1,3)\r\n227 (10,0,0,5,0,22)\r\n",
    );
    assert_eq!(got, R425_PASSIVE_POLICY);
    assert_eq!(d.transcript.reasons(), [DenyReason::PrivilegedPort]);
}

#[test]
fn multi_line_227_to_pasv_over_the_pinhole_cap_shows_the_client_only_the_425() {
    let cfg = SessionConfig {
        max_pinholes: 0,
        ..Default::default()
    };
    let mut d = Driver::new(cfg, lab_endpoints());
    d.login();
    let got = exchange(
        &mut d,
        b"PASV\r\n",
        b"227-Entering Passive Mode (10,0,0,9,1,1)\r\n227 (10,0,0,5,200,10)\r\n",
    );
    assert_eq!(got, R425_LIMIT);
}

#[test]
fn passive_lookalikes_in_an_error_reply_to_pasv_are_withheld_and_logged_once() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"PASV\r\n",
        b"425-Cannot open\r\n227 Entering Passive Mode (10,0,0,5,200,10).\r\n  227 (10,0,0,5,200,11)\r\n229-(|||6446|)\r\n still here\r\n425 sorry\r\n",
    );
    assert_eq!(
        got,
        format!(
            "425-Cannot open\r\n{WITHHELD_TEXT}{WITHHELD_TEXT}{WITHHELD_TEXT} still here\r\n425 sorry\r\n"
        )
    );
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
    assert_eq!(d.transcript.denials()[0].side, Side::Server);
    assert_eq!(d.transcript.pinhole_requests().len(), 0);
}

#[test]
fn passive_lookalike_in_a_preliminary_reply_to_pasv_is_withheld() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"PASV\r\n",
        b"150-Wait\r\n227 (10,0,0,5,200,10)\r\n150 wait\r\n",
    );
    assert_eq!(got, format!("150-Wait\r\n{WITHHELD_TEXT}150 wait\r\n"));
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
}

#[test]
fn passive_lookalikes_in_a_reply_to_feat_are_withheld_and_logged_once_per_reply() {
    let mut d = Driver::logged_in();
    let reply: &[u8] = b"211-Features:\r\n 227 (10,0,0,5,200,10)\r\n227 (10,0,0,5,200,10)\r\n227-(10,0,0,5,200,10)\r\n\t229 (|||6446|)\r\n EPSV\r\n 2270 files\r\n211 End\r\n";
    let got = exchange(&mut d, b"FEAT\r\n", reply);
    assert_eq!(
        got,
        format!(
            "211-Features:\r\n{w}{w}{w}{w} EPSV\r\n{w}211 End\r\n",
            w = WITHHELD_TEXT
        )
    );
    assert_eq!(text(&d.transcript.to_server), "FEAT\r\n");
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
    assert_eq!(d.transcript.pinhole_requests().len(), 0);
    // The next reply with a lookalike is logged again.
    let got = exchange(&mut d, b"STAT\r\n", b"211-Status:\r\n227 x\r\n211 End\r\n");
    assert_eq!(got, format!("211-Status:\r\n{WITHHELD_TEXT}211 End\r\n"));
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
}

#[test]
fn a_227_reply_to_another_command_becomes_a_neutral_200() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"NOOP\r\n",
        b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n",
    );
    assert_eq!(got, WITHHELD_END);
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
    assert_eq!(d.transcript.pinhole_requests().len(), 0);
    // The reply still answered the NOOP: the next command pairs as usual.
    let got = exchange(&mut d, b"PWD\r\n", b"257 \"/\"\r\n");
    assert_eq!(got, "257 \"/\"\r\n");
}

#[test]
fn a_multi_line_229_reply_to_another_command_keeps_its_structure() {
    let mut d = Driver::logged_in();
    let got = exchange(
        &mut d,
        b"NOOP\r\n",
        b"229-Extended (|||6446|)\r\n hello\r\n229-(|||6447|)\r\n229 (|||6448|)\r\n",
    );
    assert_eq!(
        got,
        format!("{WITHHELD_START} hello\r\n{WITHHELD_TEXT}{WITHHELD_END}")
    );
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
}

#[test]
fn unsolicited_227_and_229_become_neutral_200s_and_open_nothing() {
    let mut d = Driver::logged_in();
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n229 (|||6446|)\r\n",
    );
    assert_eq!(
        text(&d.transcript.to_client),
        format!("{WITHHELD_END}{WITHHELD_END}")
    );
    assert_eq!(
        d.transcript.reasons(),
        [
            DenyReason::PassiveReplyWithheld,
            DenyReason::PassiveReplyWithheld
        ]
    );
    assert_eq!(d.transcript.pinhole_requests().len(), 0);
}

#[test]
fn a_227_greeting_becomes_a_neutral_200() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"227 (10,0,0,5,200,10)\r\n");
    assert_eq!(text(&d.transcript.to_client), WITHHELD_END);
    assert_eq!(d.transcript.reasons(), [DenyReason::PassiveReplyWithheld]);
    assert!(!d.session.is_closed());
}

#[test]
fn malformed_227_reply_to_another_command_is_withheld_with_a_neutral_code_and_one_event() {
    let mut d = Driver::logged_in();
    let got = exchange(&mut d, b"NOOP\r\n", b"227 (10,0,0,5,200,10)\0\r\n");
    assert_eq!(got, "200 (reply line withheld by ftpgate: malformed)\r\n");
    assert_eq!(d.transcript.reasons(), [DenyReason::MalformedReply]);
}

// ---- 2. verbs that start like an address verb ------------------------------

const R500_VERB: &str = "500 Syntax error, command unrecognized.\r\n";

/// Some servers match verbs by prefix, so `PORTX 10,0,0,5,0,25` would be a
/// PORT the gateway never checked.
#[test]
fn verbs_that_start_like_an_address_verb_are_refused_and_never_forwarded() {
    for line in [
        &b"PORTX 10,0,0,5,0,25\r\n"[..],
        b"portal 192,0,2,10,25,46\r\n",
        b"EPRTX |1|10.0.0.5|25|\r\n",
        b"PASVX\r\n",
        b"Epsv2\r\n",
        b"LPRTX 4,4,10,0,0,5,2,0,25\r\n",
        b"LPSVX\r\n",
        b"SPSVX\r\n",
        b"PORT1 10,0,0,5,0,25\r\n",
    ] {
        for login in [true, false] {
            let mut d = if login {
                Driver::logged_in()
            } else {
                let mut d = Driver::lab();
                d.input(Side::Server, b"220 ready\r\n");
                d.transcript = Transcript::default();
                d
            };
            d.input(Side::Client, line);
            let t = &d.transcript;
            assert_eq!(text(&t.to_client), R500_VERB, "{}", text(line));
            assert!(t.to_server.is_empty(), "forwarded {}", text(line));
            assert_eq!(t.reasons(), [DenyReason::AddressVerbLookalike]);
            let denial = t.denials()[0];
            assert_eq!(denial.side, Side::Client);
            let verb = text(line).split(' ').next().unwrap().trim().to_uppercase();
            assert_eq!(denial.verb.as_deref(), Some(verb.as_str()));
            assert_eq!(denial.reply.as_deref(), Some(R500_VERB.trim_end()));
            assert!(!d.session.is_closed());
        }
    }
}

#[test]
fn verbs_that_only_share_a_shorter_prefix_are_relayed() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"POR x\r\nPAS\r\nEPSILON\r\nPORTSMOUTH\r\n");
    // PORTSMOUTH starts with PORT: refused; the others are relayed.
    assert_eq!(text(&d.transcript.to_server), "POR x\r\nPAS\r\nEPSILON\r\n");
    assert_eq!(d.transcript.reasons(), [DenyReason::AddressVerbLookalike]);
}

// ---- 3. the login timer restarts on a new USER -----------------------------

fn login_timed_out(d: &Driver) -> bool {
    d.session.is_closed()
        && d.transcript.events.last() == Some(&Event::Close(CloseReason::LoginTimeout))
}

#[test]
fn a_new_user_after_a_failed_login_gets_the_full_login_timeout_again() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"USER u\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    d.input(Side::Client, b"PASS wrong\r\n");
    d.input(Side::Server, b"530 Login incorrect.\r\n");
    d.advance(Duration::from_secs(25));
    d.input(Side::Client, b"USER u\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    // 50 s after connect, 25 s after the new USER: still open.
    d.advance(Duration::from_secs(25));
    assert!(!d.session.is_closed(), "{:#?}", d.transcript.events);
    d.advance(Duration::from_secs(4));
    assert!(!d.session.is_closed());
    d.advance(Duration::from_secs(1));
    assert!(login_timed_out(&d), "{:#?}", d.transcript.events);
}

#[test]
fn a_new_user_after_a_login_starts_the_login_timer_when_the_server_accepts_it() {
    let mut d = Driver::logged_in();
    d.advance(Duration::from_secs(60));
    d.input(Side::Client, b"USER other\r\n");
    d.input(Side::Server, b"331 Password required\r\n");
    d.advance(Duration::from_secs(29));
    assert!(!d.session.is_closed());
    d.advance(Duration::from_secs(1));
    assert!(login_timed_out(&d), "{:#?}", d.transcript.events);
}

// ---- 4. the abuse budget and the deny aggregation --------------------------

const R421_REFUSALS: &str = "421 Too many refused commands: closing control connection.\r\n";
const R502: &str = "502 Command not implemented: use EPRT or EPSV.\r\n";

fn with_budget(max_refusals: usize) -> Driver {
    let cfg = SessionConfig {
        max_refusals,
        ..Default::default()
    };
    let mut d = Driver::new(cfg, lab_endpoints());
    d.login();
    d
}

/// Deny events of `reason` logged one by one (no summary).
fn single(t: &Transcript, reason: DenyReason) -> usize {
    t.denials()
        .iter()
        .filter(|d| d.reason == reason && d.suppressed.is_none())
        .count()
}

/// The suppressed counts of the summaries of `reason`.
fn summaries(t: &Transcript, reason: DenyReason) -> Vec<u64> {
    t.denials()
        .iter()
        .filter(|d| d.reason == reason)
        .filter_map(|d| d.suppressed)
        .collect()
}

#[test]
fn refusal_budget_defaults_to_50() {
    assert_eq!(SessionConfig::default().max_refusals, 50);
    let mut d = Driver::logged_in();
    for _ in 0..50 {
        d.input(Side::Client, b"LPSV\r\n");
    }
    assert!(!d.session.is_closed());
    assert_eq!(text(&d.transcript.to_client), R502.repeat(50));
    d.input(Side::Client, b"LPSV\r\n");
    assert!(d.session.is_closed());
}

#[test]
fn a_session_that_keeps_sending_refused_input_is_closed_after_its_budget() {
    let mut d = with_budget(3);
    d.input(Side::Client, b"LPSV\r\n PORT 1\r\nNO\0OP\r\n");
    assert!(!d.session.is_closed());
    d.input(Side::Client, b"PORT 203,0,113,5,25,46\r\nNOOP\r\n");
    assert!(d.session.is_closed());
    assert_eq!(
        text(&d.transcript.to_client),
        format!(
            "{R502}500 Syntax error, command unrecognized.\r\n500 Syntax error: bare CR or NUL in command line.\r\n{R421_REFUSALS}"
        )
    );
    assert!(d.transcript.to_server.is_empty(), "nothing after the close");
    assert_eq!(
        d.transcript.reasons(),
        [
            DenyReason::UnsupportedCommand,
            DenyReason::MalformedCommand,
            DenyReason::MalformedLine,
            DenyReason::RefusalBudget,
        ]
    );
    let closing = d.transcript.denials()[3].clone();
    assert_eq!(closing.side, Side::Client);
    assert_eq!(closing.verb.as_deref(), Some("PORT"), "the last straw");
    assert_eq!(closing.reply.as_deref(), Some(R421_REFUSALS.trim_end()));
    assert_eq!(
        d.transcript.events.last(),
        Some(&Event::Close(CloseReason::RefusalBudget))
    );
    assert_eq!(CloseReason::RefusalBudget.as_str(), "refusal_budget");
    assert_eq!(DenyReason::RefusalBudget.as_str(), "refusal_budget");
}

#[test]
fn the_budget_closes_before_a_refused_reply_that_waits_for_the_server() {
    let mut d = with_budget(1);
    // Both refusals wait behind the NOOP's reply; the second closes.
    d.input(Side::Client, b"NOOP\r\nLPSV\r\nLPSV\r\n");
    assert!(d.session.is_closed());
    assert_eq!(text(&d.transcript.to_client), R421_REFUSALS);
    assert_eq!(text(&d.transcript.to_server), "NOOP\r\n");
}

#[test]
fn refused_server_lines_do_not_count_against_the_client() {
    let mut d = with_budget(1);
    for _ in 0..10 {
        d.input(Side::Server, b"junk\r\n");
        d.input(Side::Client, b"NOOP\r\n");
        d.input(Side::Server, b"200 a\0b\r\n");
        d.input(Side::Server, b"227 (10,0,0,5,200,10)\r\n");
    }
    assert!(!d.session.is_closed(), "{:#?}", d.transcript.events);
}

#[test]
fn pinholes_the_gateway_cannot_open_do_not_count_against_the_client() {
    let mut d = with_budget(1);
    d.pinholes_work = false;
    for _ in 0..5 {
        d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    }
    assert!(!d.session.is_closed());
    assert_eq!(single(&d.transcript, DenyReason::PinholeUnavailable), 5);
}

#[test]
fn after_five_denials_of_one_reason_the_rest_are_counted_and_summed_up_at_close() {
    let mut d = with_budget(100);
    for _ in 0..12 {
        d.input(Side::Client, b"LPSV\r\n");
    }
    for _ in 0..2 {
        d.input(Side::Client, b"AUTH TLS\r\n");
    }
    // Every refusal is still answered.
    assert_eq!(text(&d.transcript.to_client).matches("502 ").count(), 12);
    assert_eq!(single(&d.transcript, DenyReason::UnsupportedCommand), 5);
    assert_eq!(single(&d.transcript, DenyReason::AuthRefused), 2);
    assert!(summaries(&d.transcript, DenyReason::UnsupportedCommand).is_empty());
    d.session.handle_eof(Side::Client, d.now);
    d.settle();
    assert_eq!(
        summaries(&d.transcript, DenyReason::UnsupportedCommand),
        [7]
    );
    assert!(summaries(&d.transcript, DenyReason::AuthRefused).is_empty());
    let summary = d
        .transcript
        .denials()
        .into_iter()
        .find(|d| d.suppressed.is_some())
        .cloned()
        .unwrap();
    assert_eq!(summary.side, Side::Client);
    // The summary comes before the close.
    assert_eq!(
        d.transcript.events.last(),
        Some(&Event::Close(CloseReason::ClientClosed))
    );
}

#[test]
fn suppressed_denials_are_summed_up_at_most_once_per_interval() {
    let mut d = with_budget(100);
    for _ in 0..12 {
        d.input(Side::Client, b"LPSV\r\n");
    }
    d.advance(Duration::from_secs(9));
    assert!(summaries(&d.transcript, DenyReason::UnsupportedCommand).is_empty());
    d.advance(Duration::from_secs(1));
    assert_eq!(
        summaries(&d.transcript, DenyReason::UnsupportedCommand),
        [7]
    );
    for _ in 0..3 {
        d.input(Side::Client, b"LPSV\r\n");
    }
    d.advance(Duration::from_secs(9));
    assert_eq!(
        summaries(&d.transcript, DenyReason::UnsupportedCommand),
        [7]
    );
    d.advance(Duration::from_secs(1));
    assert_eq!(
        summaries(&d.transcript, DenyReason::UnsupportedCommand),
        [7, 3]
    );
    // Nothing left to sum up: the close adds no summary.
    d.session.handle_eof(Side::Client, d.now);
    d.settle();
    assert_eq!(
        summaries(&d.transcript, DenyReason::UnsupportedCommand),
        [7, 3]
    );
    assert_eq!(single(&d.transcript, DenyReason::UnsupportedCommand), 5);
}

#[test]
fn a_server_flood_of_bad_lines_is_aggregated_too() {
    let mut d = Driver::logged_in();
    for _ in 0..100 {
        d.input(Side::Server, b"junk\r\n");
    }
    assert_eq!(single(&d.transcript, DenyReason::MalformedReply), 5);
    d.advance(Duration::from_secs(10));
    assert_eq!(summaries(&d.transcript, DenyReason::MalformedReply), [95]);
    assert!(!d.session.is_closed());
}

// ---- 5. shutdown through the core, never inside a relayed reply ------------

const R421_SHUTDOWN: &str = "421 Service shutting down: closing control connection.\r\n";

fn shutdown(d: &mut Driver) {
    d.session.handle_shutdown(d.now);
    d.settle();
}

#[test]
fn shutdown_between_replies_sends_421_and_closes_with_reason_shutdown() {
    let mut d = Driver::logged_in();
    shutdown(&mut d);
    assert_eq!(text(&d.transcript.to_client), R421_SHUTDOWN);
    assert!(d.transcript.to_server.is_empty());
    assert_eq!(d.transcript.events, [Event::Close(CloseReason::Shutdown)]);
    assert!(d.session.is_closed());
    assert_eq!(CloseReason::Shutdown.as_str(), "shutdown");
    // Once closed, nothing more happens.
    d.transcript = Transcript::default();
    shutdown(&mut d);
    d.input(Side::Server, b"200 late\r\n");
    assert_eq!(d.transcript, Transcript::default());
}

#[test]
fn shutdown_in_the_middle_of_a_relayed_multi_line_reply_ends_that_reply_first() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"FEAT\r\n");
    d.input(Side::Server, b"211-Features:\r\n EPSV\r\n");
    shutdown(&mut d);
    assert_eq!(
        text(&d.transcript.to_client),
        format!(
            "211-Features:\r\n EPSV\r\n211 (reply cut short by ftpgate: closing)\r\n{R421_SHUTDOWN}"
        )
    );
    assert_eq!(
        d.transcript.events.last(),
        Some(&Event::Close(CloseReason::Shutdown))
    );
}

#[test]
fn shutdown_in_the_middle_of_a_withheld_227_reply_ends_it_with_the_neutral_code() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"NOOP\r\n");
    d.input(Side::Server, b"227-(10,0,0,5,200,10)\r\n");
    shutdown(&mut d);
    assert_eq!(
        text(&d.transcript.to_client),
        format!("{WITHHELD_START}200 (reply cut short by ftpgate: closing)\r\n{R421_SHUTDOWN}")
    );
}

#[test]
fn shutdown_in_the_middle_of_a_reply_to_pasv_sends_only_the_421() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\nLPSV\r\n");
    d.input(
        Side::Server,
        b"227-Entering Passive Mode\r\n (10,0,0,5,200,10)\r\n",
    );
    shutdown(&mut d);
    // The held lines never reached the client, and the LPSV refusal queued
    // behind the PASV is dropped: the 421 is the client's only reply.
    assert_eq!(text(&d.transcript.to_client), R421_SHUTDOWN);
}

#[test]
fn shutdown_while_a_passive_reply_waits_for_its_pinhole_sends_only_the_421() {
    use ftpgate::proto::{Session, SessionId};
    use std::sync::Arc;
    let now = std::time::Instant::now();
    let mut s = Session::new(
        Arc::new(SessionConfig::default()),
        lab_endpoints(),
        SessionId(1),
        now,
    );
    for (side, data) in [
        (Side::Server, &b"220 ready\r\n"[..]),
        (Side::Client, b"USER u\r\nPASS p\r\n"),
        (Side::Server, b"331 pw\r\n230 ok\r\n"),
        (Side::Client, b"PASV\r\n"),
        (Side::Server, b"227 (10,0,0,5,200,10)\r\n"),
    ] {
        s.handle_input(side, data, now);
    }
    s.take_transmit(Side::Client);
    // The daemon has not answered the OpenPinhole yet.
    assert!(!s.wants_input(Side::Server));
    s.handle_shutdown(now);
    assert_eq!(text(&s.take_transmit(Side::Client).bytes), R421_SHUTDOWN);
    let mut events = Vec::new();
    while let Some(e) = s.poll_event() {
        events.push(e);
    }
    assert_eq!(events.last(), Some(&Event::Close(CloseReason::Shutdown)));
}

#[test]
fn login_timeout_in_the_middle_of_a_multi_line_greeting_ends_it_first() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"220-Welcome\r\n220-to the\r\n");
    d.advance(Duration::from_secs(30));
    assert_eq!(
        text(&d.transcript.to_client),
        "220-Welcome\r\n220-to the\r\n220 (reply cut short by ftpgate: closing)\r\n421 Login timed out: closing control connection.\r\n"
    );
}

#[test]
fn refusal_budget_in_the_middle_of_a_relayed_reply_ends_that_reply_first() {
    let mut d = with_budget(1);
    d.input(Side::Client, b"HELP\r\nLPSV\r\n");
    d.input(Side::Server, b"214-Commands:\r\n");
    d.input(Side::Client, b"LPSV\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        format!("214-Commands:\r\n214 (reply cut short by ftpgate: closing)\r\n{R421_REFUSALS}")
    );
}
