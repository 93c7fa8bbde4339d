//! Scenario tests for the protocol core, driven through the public API with
//! the deterministic [`Driver`] (virtual clock, synchronous daemon answers).
//!
//! Lab addresses (see `driver::lab_endpoints`): client 192.0.2.10, gateway
//! 192.0.2.1 inside and 198.51.100.1 outside, server 198.51.100.20. The
//! driver opens pinhole `id` on port `50000 + id`, so the first pinhole of a
//! session is 50001 = 195,81.
//!
//! Every refusal is checked three ways: the exact reply the client gets, the
//! exact bytes the server gets (a refused line never reaches it), and exactly
//! one `Event::Deny` with the expected reason.

#[path = "common/proto.rs"]
mod wire;

use std::time::Duration;

use ftpgate::proto::driver::{
    self, Driver, FOREIGN_ENDPOINT, FOREIGN_PINHOLE, FOREIGN_PINHOLE_PORT, Step, Transcript,
    lab_endpoints, pinhole,
};
use ftpgate::proto::{
    CloseReason, DataMode, DataVerb, DataVerdict, Denial, DenyReason, Endpoints, Event, FxpRule,
    PinholeClose, PinholeRequest, Policy, Resolution, RewriteKind, SessionConfig, Shape, Side,
};
use wire::{CLIENT, GATEWAY_INSIDE, GATEWAY_OUTSIDE, SERVER, assert_wire, ip, sa, text};

// ---- helpers ---------------------------------------------------------------

/// The client's PORT for its own address, port 6446.
const CLIENT_PORT: &[u8] = b"PORT 192,0,2,10,25,46\r\n";
/// What the server receives instead: the gateway's outside address and the
/// first pinhole (50001).
const REWRITTEN_PORT: &[u8] = b"PORT 198,51,100,1,195,81\r\n";
/// A 227 naming a private address, as a server behind NAT sends it.
const PRIVATE_227: &[u8] = b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n";
/// What the client receives instead: the gateway's inside address, port 50001.
const REWRITTEN_227: &[u8] = b"227 Entering Passive Mode (192,0,2,1,195,81).\r\n";

const R501: &str = "501 Syntax error in parameters or arguments.\r\n";
const R500_TOO_LONG: &str = "500 Command line too long.\r\n";
const R500_BAD_BYTES: &str = "500 Syntax error: bare CR or NUL in command line.\r\n";
const R500_VERB: &str = "500 Syntax error, command unrecognized.\r\n";
const R502: &str = "502 Command not implemented: use EPRT or EPSV.\r\n";
const R503_EPSV_ALL: &str = "503 EPSV ALL in effect: only EPSV may set up data connections.\r\n";
const R504: &str = "504 Data connection target refused by policy.\r\n";
const R522_V4: &str = "522 Network protocol not supported, use (1).\r\n";
const R530: &str = "530 Please log in first.\r\n";
const R534: &str =
    "534 Request denied for policy reasons: the control channel must stay inspectable.\r\n";
const R425_LIMIT: &str = "425 Can't open data connection: too many open data connections.\r\n";
const R425_NO_PINHOLE: &str = "425 Can't open data connection: no pinhole available.\r\n";
const R425_BAD_PASSIVE: &str =
    "425 Can't open data connection: unusable passive reply from server.\r\n";
const R425_PASSIVE_POLICY: &str =
    "425 Can't open data connection: passive address refused by policy.\r\n";

fn logged_in_with(cfg: SessionConfig) -> Driver {
    let mut d = Driver::new(cfg, lab_endpoints());
    d.login();
    d
}

fn fxp_policy() -> Policy {
    Policy {
        deny_ports: Vec::new(),
        fxp: vec![FxpRule {
            name: "mirrors".into(),
            servers: vec!["198.51.100.0/24".parse().unwrap()],
        }],
    }
}

/// Asserts exactly one deny event, with `reason`, and returns it.
fn the_denial(t: &Transcript, reason: DenyReason) -> Denial {
    let all = t.denials();
    assert_eq!(
        all.len(),
        1,
        "expected exactly one deny event: {:#?}",
        t.events
    );
    assert_eq!(all[0].reason, reason, "{:#?}", all[0]);
    all[0].clone()
}

fn cfg() -> SessionConfig {
    SessionConfig::default()
}

// ---- refusals of client commands: one table ----------------------------------

/// A client line the gateway answers itself. The session is logged in unless
/// `logged_in` is false (then only the greeting was seen).
struct Refusal {
    name: &'static str,
    line: &'static [u8],
    reply: &'static str,
    reason: DenyReason,
    logged_in: bool,
}

const fn refusal(
    name: &'static str,
    line: &'static [u8],
    reply: &'static str,
    reason: DenyReason,
) -> Refusal {
    Refusal {
        name,
        line,
        reply,
        reason,
        logged_in: true,
    }
}

const REFUSALS: &[Refusal] = &[
    refusal(
        "octet 256",
        b"PORT 192,0,2,256,25,46\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "seven fields",
        b"PORT 192,0,2,10,25,46,1\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "five fields",
        b"PORT 192,0,2,10,25\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "plus sign",
        b"PORT +192,0,2,10,25,46\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "minus sign",
        b"PORT 192,0,2,10,-25,46\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "port zero",
        b"PORT 192,0,2,10,0,0\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "PORT without argument",
        b"PORT\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "tab after the verb",
        b"PORT\t192,0,2,10,25,46\r\n",
        R500_VERB,
        DenyReason::MalformedCommand,
    ),
    refusal(
        "leading blank",
        b" PORT 192,0,2,10,25,46\r\n",
        R500_VERB,
        DenyReason::MalformedCommand,
    ),
    refusal(
        "leading tab",
        b"\tPORT 192,0,2,10,25,46\r\n",
        R500_VERB,
        DenyReason::MalformedCommand,
    ),
    refusal(
        "empty line",
        b"\r\n",
        R500_VERB,
        DenyReason::MalformedCommand,
    ),
    refusal(
        "bare CR inside a line",
        b"NOOP\rPORT 192,0,2,10,25,46\r\n",
        R500_BAD_BYTES,
        DenyReason::MalformedLine,
    ),
    refusal(
        "NUL inside a line",
        b"PORT 192,0,2,10,25,46\0\r\n",
        R500_BAD_BYTES,
        DenyReason::MalformedLine,
    ),
    refusal(
        "two CRs before the LF",
        b"NOOP\r\r\n",
        R500_BAD_BYTES,
        DenyReason::MalformedLine,
    ),
    refusal(
        "EPRT with a real IPv6 address on an IPv4 session",
        b"EPRT |2|2001:db8::1|6446|\r\n",
        R522_V4,
        DenyReason::AddressFamily,
    ),
    refusal(
        "EPRT with an unknown family",
        b"EPRT |3|192.0.2.10|6446|\r\n",
        R522_V4,
        DenyReason::AddressFamily,
    ),
    refusal(
        "EPRT with a missing final delimiter",
        b"EPRT |1|192.0.2.10|6446\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "EPSV for IPv6 on an IPv4 session",
        b"EPSV 2\r\n",
        R522_V4,
        DenyReason::AddressFamily,
    ),
    refusal(
        "EPSV with a non-numeric argument",
        b"EPSV x\r\n",
        R501,
        DenyReason::BadArgument,
    ),
    refusal(
        "LPRT",
        b"LPRT 4,4,192,0,2,10,2,25,46\r\n",
        R502,
        DenyReason::UnsupportedCommand,
    ),
    refusal("LPSV", b"LPSV\r\n", R502, DenyReason::UnsupportedCommand),
    refusal("SPSV", b"SPSV\r\n", R502, DenyReason::UnsupportedCommand),
    refusal("AUTH TLS", b"AUTH TLS\r\n", R534, DenyReason::AuthRefused),
    refusal("AUTH SSL", b"auth ssl\r\n", R534, DenyReason::AuthRefused),
    refusal("PBSZ", b"PBSZ 0\r\n", R534, DenyReason::AuthRefused),
    refusal(
        "bounce PORT to a third host",
        b"PORT 203,0,113,5,25,46\r\n",
        R504,
        DenyReason::Bounce,
    ),
    refusal(
        "bounce EPRT to a third host",
        b"EPRT |1|203.0.113.5|6446|\r\n",
        R504,
        DenyReason::Bounce,
    ),
    refusal(
        "PORT to the client's own privileged port",
        b"PORT 192,0,2,10,0,25\r\n",
        R504,
        DenyReason::PrivilegedPort,
    ),
    refusal(
        "PORT to a gateway pinhole without an FXP rule",
        b"PORT 192,0,2,1,199,55\r\n",
        R504,
        DenyReason::FxpDenied,
    ),
    Refusal {
        name: "PORT before login",
        line: CLIENT_PORT,
        reply: R530,
        reason: DenyReason::NotLoggedIn,
        logged_in: false,
    },
    Refusal {
        name: "EPRT before login",
        line: b"EPRT |1|192.0.2.10|6446|\r\n",
        reply: R530,
        reason: DenyReason::NotLoggedIn,
        logged_in: false,
    },
    Refusal {
        name: "PASV before login",
        line: b"PASV\r\n",
        reply: R530,
        reason: DenyReason::NotLoggedIn,
        logged_in: false,
    },
    Refusal {
        name: "EPSV before login",
        line: b"EPSV\r\n",
        reply: R530,
        reason: DenyReason::NotLoggedIn,
        logged_in: false,
    },
    Refusal {
        name: "AUTH TLS before login",
        line: b"AUTH TLS\r\n",
        reply: R534,
        reason: DenyReason::AuthRefused,
        logged_in: false,
    },
];

#[test]
fn each_refused_command_gets_its_reply_one_deny_event_and_never_reaches_the_server() {
    assert_eq!(FOREIGN_PINHOLE_PORT, 199 * 256 + 55);
    for case in REFUSALS {
        let mut d = if case.logged_in {
            Driver::logged_in()
        } else {
            let mut d = Driver::lab();
            d.input(Side::Server, b"220 ready\r\n");
            d.transcript = Transcript::default();
            d
        };
        d.input(Side::Client, case.line);
        let t = &d.transcript;
        assert_eq!(text(&t.to_client), case.reply, "{}: reply", case.name);
        assert!(
            t.to_server.is_empty(),
            "{}: forwarded {:?}",
            case.name,
            text(&t.to_server)
        );
        let deny: Vec<_> = t.denials();
        assert_eq!(deny.len(), 1, "{}: {:#?}", case.name, t.events);
        assert_eq!(deny[0].reason, case.reason, "{}", case.name);
        assert_eq!(deny[0].side, Side::Client, "{}", case.name);
        assert_eq!(
            deny[0].reply.as_deref(),
            Some(case.reply.trim_end()),
            "{}: the deny event carries the reply sent",
            case.name
        );
        assert!(
            t.pinhole_requests().is_empty(),
            "{}: opened a pinhole",
            case.name
        );
        assert!(
            !d.session.is_closed(),
            "{}: the session stays up",
            case.name
        );

        // The session goes on: the next command is relayed as usual.
        d.transcript = Transcript::default();
        d.input(Side::Client, b"NOOP\r\n");
        d.input(Side::Server, b"200 ok\r\n");
        assert_wire(&d.transcript, "200 ok\r\n", "NOOP\r\n");
    }
}

// ---- framing ----------------------------------------------------------------

#[test]
fn port_split_at_every_byte_offset_gives_the_same_result() {
    let whole = driver::play(
        &[
            Step::Input(Side::Server, b"220 ready\r\n".to_vec()),
            Step::Input(Side::Client, b"USER u\r\nPASS p\r\n".to_vec()),
            Step::Input(Side::Server, b"331 pw\r\n230 ok\r\n".to_vec()),
            Step::Input(Side::Client, CLIENT_PORT.to_vec()),
            Step::Input(Side::Server, b"200 PORT ok\r\n".to_vec()),
        ],
        &[],
    );
    assert!(text(&whole.to_server).ends_with(&text(REWRITTEN_PORT)));
    assert!(text(&whole.to_client).ends_with("200 PORT ok\r\n"));

    for cut in 0..=CLIENT_PORT.len() {
        let mut d = Driver::logged_in();
        d.input(Side::Client, &CLIENT_PORT[..cut]);
        d.input(Side::Client, &CLIENT_PORT[cut..]);
        d.input(Side::Server, b"200 PORT ok\r\n");
        assert_wire(&d.transcript, "200 PORT ok\r\n", &text(REWRITTEN_PORT));
        assert_eq!(d.transcript.pinhole_requests().len(), 1, "cut at {cut}");
    }
    // One byte at a time.
    let mut d = Driver::logged_in();
    for b in CLIENT_PORT {
        d.input(Side::Client, &[*b]);
    }
    assert_wire(&d.transcript, "", &text(REWRITTEN_PORT));
}

#[test]
fn bare_lf_ends_a_command_and_crlf_is_forwarded() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"NOOP\nPWD\n");
    assert_wire(&d.transcript, "", "NOOP\r\nPWD\r\n");
    assert!(d.transcript.events.is_empty());
}

#[test]
fn bare_lf_ends_a_port_command_too() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\n");
    assert_wire(&d.transcript, "", &text(REWRITTEN_PORT));
}

#[test]
fn telnet_interrupt_and_synch_before_abor_reach_the_server_as_a_synch_and_abor() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"\xff\xf4\xff\xf2ABOR\r\n");
    assert_eq!(d.transcript.to_server, b"\xff\xf4\xff\xf2ABOR\r\n");
    // The IAC before the DM goes as urgent data (tests/proto_abort.rs).
    assert_eq!(d.transcript.urgent_to_server, [2]);
    assert!(d.transcript.denials().is_empty());
}

#[test]
fn iac_iac_in_a_path_is_a_literal_0xff_and_stays_doubled_on_the_wire() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"RETR a\xff\xffb\r\n");
    assert_eq!(d.transcript.to_server, b"RETR a\xff\xffb\r\n");
}

#[test]
fn ten_kilobyte_command_line_is_refused_discarded_and_the_next_command_works() {
    let mut d = Driver::logged_in();
    let mut long = b"STOR ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 10 * 1024));
    long.extend_from_slice(b"\r\nNOOP\r\n");
    d.input(Side::Client, &long);
    the_denial(&d.transcript, DenyReason::LineTooLong);
    d.input(Side::Server, b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        &format!("{R500_TOO_LONG}200 ok\r\n"),
        "NOOP\r\n",
    );
}

#[test]
fn ten_kilobyte_command_line_in_small_pieces_is_refused_the_same_way() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"STOR ");
    for _ in 0..100 {
        d.input(Side::Client, &[b'a'; 100]);
    }
    d.input(Side::Client, b"\r\nNOOP\r\n");
    the_denial(&d.transcript, DenyReason::LineTooLong);
    assert_wire(&d.transcript, R500_TOO_LONG, "NOOP\r\n");
}

#[test]
fn over_long_port_line_with_a_valid_prefix_is_not_forwarded() {
    let mut d = Driver::logged_in();
    let mut long = CLIENT_PORT[..CLIENT_PORT.len() - 2].to_vec();
    long.extend(std::iter::repeat_n(b' ', 4096));
    long.extend_from_slice(b"\r\n");
    d.input(Side::Client, &long);
    the_denial(&d.transcript, DenyReason::LineTooLong);
    assert_wire(&d.transcript, R500_TOO_LONG, "");
}

// ---- verbs ------------------------------------------------------------------

#[test]
fn lowercase_port_is_port_and_is_rewritten() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"port 192,0,2,10,25,46\r\n");
    assert_wire(&d.transcript, "", &text(REWRITTEN_PORT));
    assert!(d.transcript.events.contains(&Event::Rewrite {
        kind: RewriteKind::Port,
        address_replaced: true
    }));
}

#[test]
fn portal_is_not_port_but_is_refused_as_a_lookalike_of_it() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORTAL 192,0,2,10,25,46\r\n");
    assert_wire(&d.transcript, R500_VERB, "");
    the_denial(&d.transcript, DenyReason::AddressVerbLookalike);
    assert!(d.transcript.pinhole_requests().is_empty());
}

// ---- pipelining and reply pairing ---------------------------------------------

#[test]
fn pipelined_noop_and_port_keep_their_order_both_ways() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"NOOP\r\nPORT 192,0,2,10,25,46\r\n");
    assert_eq!(
        text(&d.transcript.to_server),
        format!("NOOP\r\n{}", text(REWRITTEN_PORT))
    );
    d.input(Side::Server, b"200 NOOP ok\r\n200 PORT ok\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        "200 NOOP ok\r\n200 PORT ok\r\n"
    );
}

#[test]
fn pipelined_pasv_and_list_get_the_rewritten_227_before_the_150() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\nLIST\r\n");
    assert_eq!(text(&d.transcript.to_server), "PASV\r\nLIST\r\n");
    // All three replies in one segment.
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n150 Here it comes\r\n226 Done\r\n",
    );
    assert_eq!(
        text(&d.transcript.to_client),
        format!("{}150 Here it comes\r\n226 Done\r\n", text(REWRITTEN_227))
    );
}

#[test]
fn refusal_inside_a_pipeline_is_answered_in_command_order() {
    let mut d = Driver::logged_in();
    d.input(
        Side::Client,
        b"NOOP\r\nPORT 192,0,2,10,25,46,1\r\nPWD\r\nPORT 203,0,113,5,25,46\r\nSYST\r\n",
    );
    assert_eq!(text(&d.transcript.to_server), "NOOP\r\nPWD\r\nSYST\r\n");
    assert!(
        d.transcript.to_client.is_empty(),
        "nothing before the NOOP reply"
    );
    d.input(Side::Server, b"200 NOOP ok\r\n257 \"/\"\r\n215 UNIX\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        format!("200 NOOP ok\r\n{R501}257 \"/\"\r\n{R504}215 UNIX\r\n")
    );
    let reasons: Vec<_> = d.transcript.denials().iter().map(|d| d.reason).collect();
    assert_eq!(reasons, [DenyReason::BadArgument, DenyReason::Bounce]);
}

#[test]
fn refusal_waits_for_a_multi_line_reply_in_progress() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"HELP\r\n");
    d.input(Side::Server, b"214-Commands:\r\n USER PASS\r\n");
    d.input(Side::Client, b"LPSV\r\n");
    d.input(Side::Server, b"214 End\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        format!("214-Commands:\r\n USER PASS\r\n214 End\r\n{R502}")
    );
}

#[test]
fn preliminary_reply_does_not_consume_the_pending_command() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"RETR f\r\nLPSV\r\n");
    d.input(Side::Server, b"150 Opening\r\n");
    assert_eq!(text(&d.transcript.to_client), "150 Opening\r\n");
    d.input(Side::Server, b"226 Done\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        format!("150 Opening\r\n226 Done\r\n{R502}")
    );
}

// ---- passive replies ------------------------------------------------------------

#[test]
fn pasv_address_is_replaced_by_the_server_control_address() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_wire(&d.transcript, &text(REWRITTEN_227), "PASV\r\n");
    assert_eq!(
        d.transcript.events,
        vec![
            Event::OpenPinhole(PinholeRequest {
                id: pinhole(1),
                mode: DataMode::Passive,
                listen_ip: ip(GATEWAY_INSIDE),
                expected_peer: ip(CLIENT),
                connect_to: sa("198.51.100.20:51210"),
                connect_from: ip(GATEWAY_OUTSIDE),
                client_tls: false,
                shape: Shape::Relay,
            }),
            Event::Rewrite {
                kind: RewriteKind::Pasv,
                address_replaced: true
            },
        ]
    );
}

#[test]
fn pasv_naming_the_server_itself_is_rewritten_without_replacement() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (198,51,100,20,200,10).\r\n",
    );
    assert_eq!(text(&d.transcript.to_client), text(REWRITTEN_227));
    assert!(d.transcript.events.contains(&Event::Rewrite {
        kind: RewriteKind::Pasv,
        address_replaced: false
    }));
}

#[test]
fn pasv_reply_announces_the_advertised_address_when_one_is_configured() {
    let ep = Endpoints {
        advertise: Some(ip("203.0.113.7")),
        ..lab_endpoints()
    };
    let mut d = Driver::new(cfg(), ep);
    d.login();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(
        text(&d.transcript.to_client),
        "227 Entering Passive Mode (203,0,113,7,195,81).\r\n"
    );
}

#[test]
fn pasv_reply_without_parentheses_is_answered_with_the_canonical_227() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode 10,0,0,5,200,10\r\n",
    );
    assert_eq!(text(&d.transcript.to_client), text(REWRITTEN_227));
    assert_eq!(d.transcript.pinhole_requests().len(), 1);
}

#[test]
fn pasv_reply_with_an_equals_sign_is_answered_with_the_canonical_227() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, b"227 =10,0,0,5,200,10\r\n");
    assert_eq!(text(&d.transcript.to_client), text(REWRITTEN_227));
}

#[test]
fn multi_line_227_reply_to_pasv_reaches_the_client_as_its_rewritten_final_line_only() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227-Server 10.0.0.5 says hello\r\n 10,0,0,5 is private\r\n227 Entering Passive Mode (10,0,0,5,200,10).\r\n",
    );
    assert_eq!(text(&d.transcript.to_client), text(REWRITTEN_227));
    assert_eq!(d.transcript.pinhole_requests().len(), 1);
    assert!(d.transcript.denials().is_empty());
}

#[test]
fn pasv_reply_whose_numbers_are_on_a_continuation_line_is_refused_with_425() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227-Entering Passive Mode\r\n (10,0,0,5,200,10)\r\n227 OK\r\n",
    );
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    let denial = the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
    assert_eq!(denial.side, Side::Server);
    assert!(d.transcript.pinhole_requests().is_empty());
}

#[test]
fn pasv_reply_without_any_numbers_is_refused_with_425() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, b"227 Entering Passive Mode\r\n");
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
}

#[test]
fn pasv_reply_with_an_octet_above_255_is_refused_with_425() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,256,200,10)\r\n",
    );
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
}

#[test]
fn pasv_reply_naming_a_privileged_port_is_refused_by_policy() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,5,0,22)\r\n",
    );
    assert_wire(&d.transcript, R425_PASSIVE_POLICY, "PASV\r\n");
    let denial = the_denial(&d.transcript, DenyReason::PrivilegedPort);
    assert_eq!(denial.target, Some(sa("10.0.0.5:22")));
    assert!(d.transcript.pinhole_requests().is_empty());
}

#[test]
fn pasv_error_reply_is_passed_on_whole() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, b"425-Cannot\r\n listen\r\n425 sorry\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        "425-Cannot\r\n listen\r\n425 sorry\r\n"
    );
    assert!(d.transcript.events.is_empty());
}

/// A continuation line a client could read as a passive reply, replaced.
const WITHHELD_TEXT: &str = " (line withheld by ftpgate: looks like a passive reply)\r\n";
/// A 227/229 final line outside a reply to PASV/EPSV, replaced.
const WITHHELD_END: &str = "200 (line withheld by ftpgate: looks like a passive reply)\r\n";

#[test]
fn a_227_inside_a_multi_line_reply_to_feat_is_withheld_and_opens_nothing() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"FEAT\r\n");
    let reply: &[u8] = b"211-Features:\r\n 227 (10,0,0,5,200,10)\r\n227 (10,0,0,5,200,10)\r\n227-(10,0,0,5,200,10)\r\n211 End\r\n";
    d.input(Side::Server, reply);
    assert_wire(
        &d.transcript,
        &format!("211-Features:\r\n{WITHHELD_TEXT}{WITHHELD_TEXT}{WITHHELD_TEXT}211 End\r\n"),
        "FEAT\r\n",
    );
    assert!(d.transcript.pinhole_requests().is_empty());
    the_denial(&d.transcript, DenyReason::PassiveReplyWithheld);
}

#[test]
fn a_227_inside_a_multi_line_reply_to_stat_is_withheld_and_opens_nothing() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"STAT\r\n");
    let reply: &[u8] =
        b"211-Status:\r\n227 Entering Passive Mode (10,0,0,5,200,10).\r\n211 End of status\r\n";
    d.input(Side::Server, reply);
    assert_wire(
        &d.transcript,
        &format!("211-Status:\r\n{WITHHELD_TEXT}211 End of status\r\n"),
        "STAT\r\n",
    );
    assert!(d.transcript.pinhole_requests().is_empty());
    the_denial(&d.transcript, DenyReason::PassiveReplyWithheld);
}

#[test]
fn unsolicited_227_opens_no_pinhole_and_is_withheld() {
    let mut d = Driver::logged_in();
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(text(&d.transcript.to_client), WITHHELD_END);
    assert!(d.transcript.pinhole_requests().is_empty());
    the_denial(&d.transcript, DenyReason::PassiveReplyWithheld);
}

#[test]
fn a_227_in_reply_to_noop_opens_no_pinhole_and_is_withheld() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"NOOP\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(text(&d.transcript.to_client), WITHHELD_END);
    assert!(d.transcript.pinhole_requests().is_empty());
}

#[test]
fn epsv_is_answered_with_the_canonical_229_naming_the_pinhole() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"229 Extended Passive (|||6446|) ok\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "EPSV\r\n",
    );
    let req = d.transcript.pinhole_requests()[0].clone();
    assert_eq!(req.connect_to, sa("198.51.100.20:6446"));
    assert_eq!(req.mode, DataMode::Passive);
}

#[test]
fn epsv_229_with_an_exclamation_mark_delimiter_is_answered_with_the_canonical_229() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(
        Side::Server,
        b"229 Entering Extended Passive Mode (!!!6446!)\r\n",
    );
    assert_eq!(
        text(&d.transcript.to_client),
        "229 Entering Extended Passive Mode (|||50001|)\r\n"
    );
    assert_eq!(d.transcript.pinhole_requests().len(), 1);
}

#[test]
fn epsv_229_with_port_zero_or_70000_is_refused_with_425() {
    for line in [
        &b"229 Entering Extended Passive Mode (|||0|)\r\n"[..],
        b"229 Entering Extended Passive Mode (|||70000|)\r\n",
        b"229 Entering Extended Passive Mode (|||6446!)\r\n",
        b"229 Entering Extended Passive Mode\r\n",
    ] {
        let mut d = Driver::logged_in();
        d.input(Side::Client, b"EPSV\r\n");
        d.input(Side::Server, line);
        assert_wire(&d.transcript, R425_BAD_PASSIVE, "EPSV\r\n");
        the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
        assert!(d.transcript.pinhole_requests().is_empty(), "{}", text(line));
    }
}

#[test]
fn epsv_1_on_an_ipv4_session_is_forwarded_as_plain_epsv() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPSV 1\r\n");
    assert_wire(&d.transcript, "", "EPSV\r\n");
}

#[test]
fn a_229_in_reply_to_pasv_is_refused_with_425() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"229 Entering Extended Passive Mode (|||6446|)\r\n",
    );
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
}

// ---- active mode ------------------------------------------------------------------

#[test]
fn port_from_the_clients_own_address_opens_a_pinhole_and_is_rewritten() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, "", &text(REWRITTEN_PORT));
    assert_eq!(
        d.transcript.events,
        vec![
            Event::OpenPinhole(PinholeRequest {
                id: pinhole(1),
                mode: DataMode::Active,
                listen_ip: ip(GATEWAY_OUTSIDE),
                expected_peer: ip(SERVER),
                connect_to: sa("192.0.2.10:6446"),
                connect_from: ip(GATEWAY_INSIDE),
                client_tls: false,
                shape: Shape::Relay,
            }),
            Event::Rewrite {
                kind: RewriteKind::Port,
                address_replaced: true
            },
        ]
    );
}

#[test]
fn eprt_from_the_clients_own_ipv4_is_rewritten() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPRT |1|192.0.2.10|6446|\r\n");
    assert_wire(&d.transcript, "", "EPRT |1|198.51.100.1|50001|\r\n");
}

#[test]
fn eprt_with_the_clients_ipv4_as_a_mapped_ipv6_address_is_accepted_and_rewritten() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPRT |2|::ffff:192.0.2.10|6446|\r\n");
    assert_wire(&d.transcript, "", "EPRT |1|198.51.100.1|50001|\r\n");
    assert_eq!(
        d.transcript.pinhole_requests()[0].connect_to,
        sa("192.0.2.10:6446")
    );
    assert!(d.transcript.denials().is_empty());
}

#[test]
fn bounce_port_to_a_third_host_asks_to_resolve_it_then_refuses_with_504() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORT 203,0,113,5,0,25\r\n");
    assert_wire(&d.transcript, R504, "");
    let [Event::Resolve { target, .. }, Event::Deny(denial)] = &d.transcript.events[..] else {
        panic!("{:#?}", d.transcript.events);
    };
    assert_eq!(*target, sa("203.0.113.5:25"));
    // A third host comes first: port 25 there is the classic bounce.
    assert_eq!(denial.reason, DenyReason::Bounce);

    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORT 203,0,113,5,25,46\r\n");
    assert_wire(&d.transcript, R504, "");
    let [Event::Resolve { target, .. }, Event::Deny(denial)] = &d.transcript.events[..] else {
        panic!("{:#?}", d.transcript.events);
    };
    assert_eq!(*target, sa("203.0.113.5:6446"));
    assert_eq!(denial.reason, DenyReason::Bounce);
    assert_eq!(denial.verb.as_deref(), Some("PORT"));
    assert_eq!(denial.argument.as_deref(), Some("203,0,113,5,25,46"));
    assert_eq!(denial.target, Some(sa("203.0.113.5:6446")));
    assert_eq!(denial.rule.as_deref(), Some("data_peer_is_control_peer"));
}

#[test]
fn port_to_a_gateway_pinhole_is_fxp_denied_by_default() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORT 192,0,2,1,199,55\r\n");
    assert_wire(&d.transcript, R504, "");
    let denial = the_denial(&d.transcript, DenyReason::FxpDenied);
    assert_eq!(denial.target, Some(sa(FOREIGN_ENDPOINT)));
    assert!(
        !d.transcript
            .events
            .iter()
            .any(|e| matches!(e, Event::TakeOverPinhole(_)))
    );
}

#[test]
fn port_to_a_gateway_pinhole_with_an_fxp_rule_names_the_real_endpoint_and_takes_the_pinhole_over() {
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.input(Side::Client, b"PORT 192,0,2,1,199,55\r\n");
    let [
        Event::Resolve { target, .. },
        Event::TakeOverPinhole(pinhole),
        Event::Rewrite {
            kind,
            address_replaced,
        },
    ] = &d.transcript.events[..]
    else {
        panic!("{:#?}", d.transcript.events);
    };
    assert_eq!(*target, sa("192.0.2.1:50999"));
    assert_eq!(*pinhole, FOREIGN_PINHOLE);
    assert_eq!(*kind, RewriteKind::Fxp);
    assert!(*address_replaced);
    // 40001 = 156 * 256 + 65
    assert_wire(&d.transcript, "", "PORT 198,51,100,21,156,65\r\n");
    d.input(Side::Server, b"200 PORT ok\r\n");
    assert_eq!(text(&d.transcript.to_client), "200 PORT ok\r\n");
}

#[test]
fn eprt_to_a_gateway_pinhole_with_an_fxp_rule_names_the_real_endpoint() {
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.input(Side::Client, b"EPRT |1|192.0.2.1|50999|\r\n");
    assert_wire(&d.transcript, "", "EPRT |1|198.51.100.21|40001|\r\n");
}

#[test]
fn port_to_a_server_outside_the_fxp_rule_is_still_a_bounce() {
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.input(Side::Client, b"PORT 203,0,113,5,25,46\r\n");
    assert_wire(&d.transcript, R504, "");
    the_denial(&d.transcript, DenyReason::Bounce);
}

/// An FXP rule that covers both of the gateway's lab networks (inside and
/// outside), so only the gateway-address rule can refuse its addresses.
fn fxp_policy_covering_the_gateway() -> Policy {
    Policy {
        deny_ports: Vec::new(),
        fxp: vec![FxpRule {
            name: "everything".into(),
            servers: vec![
                "192.0.2.0/24".parse().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
            ],
        }],
    }
}

/// The gateway's own addresses are never data
/// targets, whatever the FXP rules say. A PORT/EPRT naming one of them that
/// is not a live pinhole of this client would make the server connect to the
/// gateway's own ports (RFC 2577 section 3: the bounce attack aimed at the
/// box in the middle). 9121 = 35 * 256 + 161 (the lab's admin port).
#[test]
fn port_or_eprt_to_the_gateways_own_address_is_a_bounce_whatever_the_fxp_rules() {
    let cases: [(&str, Policy, &[u8], &str); 8] = [
        (
            "inside address, no FXP rule",
            Policy::default(),
            b"PORT 192,0,2,1,35,161\r\n",
            "192.0.2.1:9121",
        ),
        (
            "outside address, no FXP rule",
            Policy::default(),
            b"PORT 198,51,100,1,35,161\r\n",
            "198.51.100.1:9121",
        ),
        (
            "outside address, FXP rule covering it",
            fxp_policy(),
            b"PORT 198,51,100,1,35,161\r\n",
            "198.51.100.1:9121",
        ),
        (
            "inside address, FXP rule covering it",
            fxp_policy_covering_the_gateway(),
            b"PORT 192,0,2,1,35,161\r\n",
            "192.0.2.1:9121",
        ),
        (
            "outside address, FXP rule covering both networks",
            fxp_policy_covering_the_gateway(),
            b"PORT 198,51,100,1,35,161\r\n",
            "198.51.100.1:9121",
        ),
        (
            "EPRT to the outside address, FXP rule covering it",
            fxp_policy(),
            b"EPRT |1|198.51.100.1|9121|\r\n",
            "198.51.100.1:9121",
        ),
        (
            "EPRT to the mapped inside address, FXP rule covering it",
            fxp_policy_covering_the_gateway(),
            b"EPRT |2|::ffff:192.0.2.1|9121|\r\n",
            "192.0.2.1:9121",
        ),
        (
            // The peer check comes before the port check.
            "privileged port of the outside address, FXP rule covering it",
            fxp_policy(),
            b"PORT 198,51,100,1,0,22\r\n",
            "198.51.100.1:22",
        ),
    ];
    for (name, policy, line, target) in cases {
        let mut d = logged_in_with(SessionConfig { policy, ..cfg() });
        d.input(Side::Client, line);
        assert_wire(&d.transcript, R504, "");
        let denial = the_denial(&d.transcript, DenyReason::Bounce);
        assert_eq!(denial.rule.as_deref(), Some("gateway_address"), "{name}");
        assert_eq!(denial.target, Some(sa(target)), "{name}");
        assert_eq!(denial.reply.as_deref(), Some(R504.trim_end()), "{name}");
        assert!(
            !d.transcript.events.iter().any(|e| matches!(
                e,
                Event::TakeOverPinhole(_) | Event::Rewrite { .. } | Event::OpenPinhole(_)
            )),
            "{name}: {:#?}",
            d.transcript.events
        );
        assert!(!d.session.is_closed(), "{name}");
    }
}

/// The daemon knows every address of the host; the core knows those of its
/// own session (where it met the client and the server, and the address it
/// advertises). Either is enough to refuse.
#[test]
fn gateway_addresses_are_refused_whether_the_daemon_or_the_core_recognises_them() {
    fn assert_gateway_bounce(d: &Driver, target: &str) {
        assert_wire(&d.transcript, R504, "");
        let denial = the_denial(&d.transcript, DenyReason::Bounce);
        assert_eq!(denial.rule.as_deref(), Some("gateway_address"));
        assert_eq!(denial.target, Some(sa(target)));
    }
    // A daemon that does not recognise the session's own addresses.
    for (line, target) in [
        (&b"PORT 192,0,2,1,35,161\r\n"[..], "192.0.2.1:9121"),
        (b"PORT 198,51,100,1,35,161\r\n", "198.51.100.1:9121"),
    ] {
        let mut d = logged_in_with(SessionConfig {
            policy: fxp_policy_covering_the_gateway(),
            ..cfg()
        });
        d.resolve = |_| Resolution::Elsewhere;
        d.input(Side::Client, line);
        assert_gateway_bounce(&d, target);
    }
    // The advertised address (a NAT in front of the gateway).
    let mut d = Driver::new(
        SessionConfig {
            policy: fxp_policy(),
            ..cfg()
        },
        Endpoints {
            advertise: Some(ip("198.51.100.99")),
            ..lab_endpoints()
        },
    );
    d.login();
    d.resolve = |_| Resolution::Elsewhere;
    d.input(Side::Client, b"PORT 198,51,100,99,35,161\r\n");
    assert_gateway_bounce(&d, "198.51.100.99:9121");
    // An address of another interface, which only the daemon knows.
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.resolve = |_| Resolution::GatewayAddress;
    d.input(Side::Client, b"PORT 198,51,100,7,35,161\r\n");
    assert_gateway_bounce(&d, "198.51.100.7:9121");
    // A third host the FXP rule covers is still a server-to-server PORT.
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.input(Side::Client, b"PORT 198,51,100,7,35,161\r\n");
    assert_wire(&d.transcript, "", "PORT 198,51,100,7,35,161\r\n");
    assert!(d.transcript.denials().is_empty());
}

/// A live pinhole of this client on a gateway address is no refusal: it is
/// how FXP works (the pinhole check comes before the gateway check).
#[test]
fn a_live_pinhole_on_the_gateways_outside_address_is_still_fxp() {
    let mut d = logged_in_with(SessionConfig {
        policy: fxp_policy(),
        ..cfg()
    });
    d.input(Side::Client, b"EPRT |1|198.51.100.1|50999|\r\n");
    assert_wire(&d.transcript, "", "EPRT |1|198.51.100.21|40001|\r\n");
    assert!(d.transcript.denials().is_empty());
}

#[test]
fn port_to_a_configured_deny_port_is_refused() {
    let mut d = logged_in_with(SessionConfig {
        policy: Policy {
            deny_ports: vec![3306, 6379],
            fxp: Vec::new(),
        },
        ..cfg()
    });
    // 3306 = 12 * 256 + 234
    d.input(Side::Client, b"PORT 192,0,2,10,12,234\r\n");
    assert_wire(&d.transcript, R504, "");
    let denial = the_denial(&d.transcript, DenyReason::DeniedPort);
    assert_eq!(denial.rule.as_deref(), Some("deny_ports"));
    assert_eq!(denial.target, Some(sa("192.0.2.10:3306")));
}

#[test]
fn port_to_the_clients_own_port_25_is_refused_as_privileged() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PORT 192,0,2,10,0,25\r\n");
    assert_wire(&d.transcript, R504, "");
    let denial = the_denial(&d.transcript, DenyReason::PrivilegedPort);
    assert_eq!(denial.rule.as_deref(), Some("privileged_ports"));
    assert!(d.transcript.pinhole_requests().is_empty());
}

#[test]
fn epsv_all_then_port_pasv_and_eprt_are_refused_with_503_but_epsv_works() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"EPSV ALL\r\n");
    d.input(Side::Server, b"200 EPSV ALL ok\r\n");
    assert_wire(&d.transcript, "200 EPSV ALL ok\r\n", "EPSV ALL\r\n");
    for line in [CLIENT_PORT, b"PASV\r\n", b"EPRT |1|192.0.2.10|6446|\r\n"] {
        d.transcript = Transcript::default();
        d.input(Side::Client, line);
        assert_wire(&d.transcript, R503_EPSV_ALL, "");
        the_denial(&d.transcript, DenyReason::EpsvAll);
    }
    d.transcript = Transcript::default();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"229 ok (|||6446|)\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "EPSV\r\n",
    );
}

#[test]
fn auth_tls_is_refused_with_534_and_never_forwarded() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"AUTH TLS\r\n");
    assert_wire(&d.transcript, R534, "");
    let denial = the_denial(&d.transcript, DenyReason::AuthRefused);
    assert_eq!(denial.verb.as_deref(), Some("AUTH"));
    assert_eq!(denial.argument.as_deref(), Some("TLS"));
    assert_eq!(denial.rule.as_deref(), Some("auth_tls"));
}

// ---- pinholes -------------------------------------------------------------------

#[test]
fn pinhole_failure_for_port_gives_425_and_the_session_continues() {
    let mut d = Driver::logged_in();
    d.pinholes_work = false;
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, R425_NO_PINHOLE, "");
    let denial = the_denial(&d.transcript, DenyReason::PinholeUnavailable);
    assert_eq!(denial.verb.as_deref(), Some("PORT"));
    d.pinholes_work = true;
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    // Pinhole 1 failed; the next one is 2 (50002 = 195,82).
    assert_wire(&d.transcript, "", "PORT 198,51,100,1,195,82\r\n");
}

#[test]
fn pinhole_failure_for_pasv_gives_425_and_the_session_continues() {
    let mut d = Driver::logged_in();
    d.pinholes_work = false;
    d.input(Side::Client, b"PASV\r\nNOOP\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(text(&d.transcript.to_client), R425_NO_PINHOLE);
    the_denial(&d.transcript, DenyReason::PinholeUnavailable);
    d.input(Side::Server, b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        &format!("{R425_NO_PINHOLE}200 ok\r\n"),
        "PASV\r\nNOOP\r\n",
    );
}

#[test]
fn pinhole_cap_refuses_a_new_data_connection_with_425() {
    let mut d = logged_in_with(SessionConfig {
        max_pinholes: 1,
        ..cfg()
    });
    d.input(Side::Client, CLIENT_PORT);
    d.input(Side::Server, b"200 PORT ok\r\n");
    // The server connects: the pinhole now carries data.
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, R425_LIMIT, "");
    the_denial(&d.transcript, DenyReason::PinholeLimit);

    d.transcript = Transcript::default();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_wire(&d.transcript, R425_LIMIT, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::PinholeLimit);

    // Once the transfer is over, a new pinhole is possible again.
    d.session.handle_pinhole_closed(pinhole(1), d.now);
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_eq!(d.transcript.pinhole_requests().len(), 1);
}

#[test]
fn pinhole_cap_of_zero_refuses_every_data_connection() {
    let mut d = logged_in_with(SessionConfig {
        max_pinholes: 0,
        ..cfg()
    });
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, R425_LIMIT, "");
    the_denial(&d.transcript, DenyReason::PinholeLimit);
}

#[test]
fn a_new_port_supersedes_the_waiting_pinhole() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, CLIENT_PORT);
    d.input(Side::Server, b"200 ok\r\n");
    d.transcript = Transcript::default();
    d.input(Side::Client, b"PORT 192,0,2,10,25,47\r\n");
    assert_eq!(
        d.transcript.events[0],
        Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::Superseded
        }
    );
    assert_eq!(d.transcript.pinhole_requests()[0].id, pinhole(2));
    assert_eq!(
        d.transcript.pinhole_requests()[0].connect_to,
        sa("192.0.2.10:6447")
    );
    assert!(d.transcript.denials().is_empty());
}

#[test]
fn a_pasv_reply_supersedes_the_waiting_port_pinhole() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, CLIENT_PORT);
    d.input(Side::Server, b"200 ok\r\n");
    d.input(Side::Client, b"PASV\r\n");
    d.transcript = Transcript::default();
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(
        d.transcript.events[0],
        Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::Superseded
        }
    );
}

#[test]
fn waiting_pinhole_expires_after_the_timeout_with_one_deny_event() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, CLIENT_PORT);
    d.transcript = Transcript::default();
    d.advance(Duration::from_secs(29));
    assert!(d.transcript.events.is_empty());
    d.advance(Duration::from_secs(1));
    assert_eq!(
        d.transcript.events[0],
        Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::Expired
        }
    );
    let denial = the_denial(&d.transcript, DenyReason::PinholeExpired);
    assert_eq!(denial.side, Side::Server, "the server was to connect");
    assert_eq!(denial.target, Some(sa("198.51.100.1:50001")));
    assert_eq!(denial.expected_peer, Some(ip(SERVER)));
    assert!(!d.session.is_closed());
    assert!(d.transcript.to_client.is_empty() && d.transcript.to_server.is_empty());
}

#[test]
fn connected_pinhole_does_not_expire() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.transcript = Transcript::default();
    d.advance(Duration::from_secs(120));
    assert!(d.transcript.events.is_empty(), "{:#?}", d.transcript.events);
}

// ---- timers and session life -----------------------------------------------------

#[test]
fn login_timeout_sends_421_and_closes() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"USER u\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    d.transcript = Transcript::default();
    d.advance(Duration::from_secs(29));
    assert!(!d.session.is_closed());
    d.advance(Duration::from_secs(1));
    assert_eq!(
        text(&d.transcript.to_client),
        "421 Login timed out: closing control connection.\r\n"
    );
    assert_eq!(
        d.transcript.events,
        vec![Event::Close(CloseReason::LoginTimeout)]
    );
    assert!(d.session.is_closed());
    assert_eq!(d.session.poll_timeout(), None);
    // Nothing is processed after the close.
    d.transcript = Transcript::default();
    d.input(Side::Client, b"PASS p\r\n");
    assert_eq!(d.transcript, Transcript::default());
}

#[test]
fn login_stops_the_login_timer() {
    let mut d = Driver::logged_in();
    d.advance(Duration::from_secs(60));
    assert!(!d.session.is_closed());
    assert!(d.transcript.events.is_empty());
}

#[test]
fn idle_timeout_closes_a_quiet_session() {
    let mut d = Driver::logged_in();
    d.advance(Duration::from_secs(15 * 60 - 1));
    assert!(!d.session.is_closed());
    d.advance(Duration::from_secs(1));
    assert_eq!(
        text(&d.transcript.to_client),
        "421 Idle timeout: closing control connection.\r\n"
    );
    assert_eq!(
        d.transcript.events,
        vec![Event::Close(CloseReason::IdleTimeout)]
    );
}

#[test]
fn idle_timeout_is_suppressed_while_a_data_connection_is_open() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\nRETR big\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.input(Side::Server, b"150 Opening\r\n");
    d.transcript = Transcript::default();
    // A transfer much longer than the idle timeout.
    for _ in 0..10 {
        d.advance(Duration::from_secs(10 * 60));
    }
    assert!(!d.session.is_closed(), "{:#?}", d.transcript.events);
    d.session.handle_pinhole_closed(pinhole(1), d.now);
    d.input(Side::Server, b"226 Done\r\n");
    // The idle clock restarts after the transfer.
    d.advance(Duration::from_secs(15 * 60 - 1));
    assert!(!d.session.is_closed());
    d.advance(Duration::from_secs(1));
    assert!(d.session.is_closed());
    assert_eq!(
        d.transcript.events.last(),
        Some(&Event::Close(CloseReason::IdleTimeout))
    );
}

#[test]
fn a_greeting_that_is_not_ftp_closes_the_session_with_not_ftp() {
    for banner in [
        &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
        b"HTTP/1.1 400 Bad Request\r\n",
        b"220\0 ready\r\n",
        b"\r\n",
    ] {
        let mut d = Driver::lab();
        d.input(Side::Client, b"USER u\r\n");
        d.input(Side::Server, banner);
        let t = &d.transcript;
        assert!(t.to_client.is_empty(), "{}", text(banner));
        let denial = the_denial(t, DenyReason::NotFtp);
        assert_eq!(denial.side, Side::Server);
        assert_eq!(t.events.last(), Some(&Event::Close(CloseReason::NotFtp)));
        assert!(d.session.is_closed());
    }
}

#[test]
fn multi_line_greeting_is_relayed() {
    let mut d = Driver::lab();
    let greeting: &[u8] = b"220-Welcome\r\n220-to the\r\n220 server\r\n";
    d.input(Side::Server, greeting);
    assert_eq!(d.transcript.to_client, greeting);
    assert!(d.transcript.events.is_empty());
}

#[test]
fn eof_from_either_side_closes_the_session() {
    let mut d = Driver::logged_in();
    d.session.handle_eof(Side::Client, d.now);
    d.settle();
    assert_eq!(
        d.transcript.events,
        vec![Event::Close(CloseReason::ClientClosed)]
    );
    let mut d = Driver::logged_in();
    d.session.handle_eof(Side::Server, d.now);
    d.settle();
    assert_eq!(
        d.transcript.events,
        vec![Event::Close(CloseReason::ServerClosed)]
    );
}

#[test]
fn login_event_is_emitted_on_230() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"USER u\r\nPASS p\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    assert!(!d.session.is_logged_in());
    d.input(Side::Server, b"230 ok\r\n");
    assert!(d.session.is_logged_in());
    assert_eq!(d.transcript.events, vec![Event::LoggedIn]);
}

#[test]
fn failed_login_keeps_data_commands_refused() {
    let mut d = Driver::lab();
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"USER u\r\nPASS wrong\r\n");
    d.input(Side::Server, b"331 pw\r\n530 Login incorrect\r\n");
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, R530, "");
}

#[test]
fn rein_ends_the_login() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"REIN\r\n");
    d.input(Side::Server, b"220 ready for new user\r\n");
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, R530, "");
}

#[test]
fn rein_accepted_by_the_server_restarts_the_login_timer() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"REIN\r\n");
    d.input(Side::Server, b"220 ready for new user\r\n");
    d.advance(Duration::from_secs(30));
    assert!(d.session.is_closed());
    assert_eq!(
        d.transcript.events.last(),
        Some(&Event::Close(CloseReason::LoginTimeout))
    );
}

/// vsftpd answers REIN with "502 REIN not implemented." and keeps the user
/// logged in: so does the gateway.
#[test]
fn rein_refused_by_the_server_keeps_the_login_and_stops_the_login_timer() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"REIN\r\n");
    d.input(Side::Server, b"502 REIN not implemented.\r\n");
    assert!(d.session.is_logged_in());
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, "", &text(REWRITTEN_PORT));
    d.input(Side::Server, b"200 ok\r\n");
    d.advance(Duration::from_secs(60));
    assert!(!d.session.is_closed(), "{:#?}", d.transcript.events);
}

/// vsftpd answers a second USER with "530 Can't change to another user."
/// and keeps the first login.
#[test]
fn second_user_refused_by_the_server_keeps_the_login() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"USER other\r\n");
    assert!(
        !d.session.is_logged_in(),
        "not logged in while the USER is open"
    );
    d.input(Side::Server, b"530 Can't change to another user.\r\n");
    assert!(d.session.is_logged_in());
    d.transcript = Transcript::default();
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_wire(&d.transcript, &text(REWRITTEN_227), "PASV\r\n");
}

#[test]
fn second_user_accepted_by_the_server_ends_the_login_until_the_next_230() {
    let mut d = Driver::logged_in();
    // The PORT pipelined behind the USER is refused whatever the server
    // answers to the USER.
    d.input(Side::Client, b"USER other\r\nPORT 192,0,2,10,25,46\r\n");
    d.input(Side::Server, b"331 Password required\r\n");
    assert!(!d.session.is_logged_in());
    assert_eq!(
        text(&d.transcript.to_client),
        format!("331 Password required\r\n{R530}")
    );
    d.input(Side::Client, b"PASS wrong\r\n");
    d.input(Side::Server, b"530 Login incorrect.\r\n");
    assert!(!d.session.is_logged_in(), "a refused PASS restores nothing");
    d.input(Side::Client, b"USER other\r\nPASS right\r\n");
    d.input(Side::Server, b"331 pw\r\n230 ok\r\n");
    assert!(d.session.is_logged_in());
}

// ---- server lines ------------------------------------------------------------------

#[test]
fn server_line_with_a_nul_is_withheld_with_one_deny_event() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PWD\r\n");
    d.input(Side::Server, b"257 \"/a\0b\"\r\n");
    assert_eq!(
        text(&d.transcript.to_client),
        "257 (reply line withheld by ftpgate: malformed)\r\n"
    );
    the_denial(&d.transcript, DenyReason::MalformedReply);
}

#[test]
fn server_junk_outside_a_reply_is_dropped_with_one_deny_event() {
    let mut d = Driver::logged_in();
    d.input(Side::Server, b"hello there\r\n");
    assert!(d.transcript.to_client.is_empty());
    the_denial(&d.transcript, DenyReason::MalformedReply);
}

#[test]
fn malformed_final_227_line_to_pasv_gives_425_and_exactly_one_deny_event() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,5,200,10)\0\r\n",
    );
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
    assert!(d.transcript.pinhole_requests().is_empty());
}

#[test]
fn over_long_final_227_line_to_pasv_gives_425_and_exactly_one_deny_event() {
    let mut d = Driver::logged_in();
    d.input(Side::Client, b"PASV\r\n");
    let mut line = b"227 Entering Passive Mode (10,0,0,5,200,10) ".to_vec();
    line.extend(std::iter::repeat_n(b'x', 10_000));
    line.extend_from_slice(b"\r\n");
    d.input(Side::Server, &line);
    assert_wire(&d.transcript, R425_BAD_PASSIVE, "PASV\r\n");
    the_denial(&d.transcript, DenyReason::MalformedPassiveReply);
}

// ---- deny-log hygiene -----------------------------------------------------------------

#[test]
fn pass_argument_never_appears_in_any_denial() {
    const SECRET: &str = "hunter2";
    let attempts: &[&[u8]] = &[
        b"PASS hunter2\r\n",
        b"PASS\thunter2\r\n",
        b" PASS hunter2\r\n",
        b"PASS hunter2\0\r\n",
        b"PASS hunt\rer2\r\n",
        b"ACCT hunter2\r\n",
        b"ACCT\thunter2\r\n",
    ];
    let mut long = b"PASS hunter2".to_vec();
    long.extend(std::iter::repeat_n(b'x', 5000));
    long.extend_from_slice(b"\r\n");
    let mut all_events = Vec::new();
    for attempt in attempts.iter().copied().chain([&long[..]]) {
        // Before and after login.
        for login in [false, true] {
            let mut d = if login {
                Driver::logged_in()
            } else {
                Driver::lab()
            };
            d.input(Side::Server, b"220 ready\r\n");
            d.input(Side::Client, b"USER u\r\n");
            d.input(Side::Client, attempt);
            d.input(Side::Server, b"331 pw\r\n530 no\r\n");
            all_events.extend(d.transcript.events);
        }
    }
    assert!(
        all_events.iter().any(|e| matches!(e, Event::Deny(_))),
        "some attempts are refused"
    );
    for event in &all_events {
        let Event::Deny(denial) = event else { continue };
        let shown = format!("{denial:?}");
        assert!(!shown.contains(SECRET), "secret logged: {shown}");
    }
}

#[test]
fn refused_command_argument_is_logged_truncated() {
    let mut d = Driver::logged_in();
    let mut line = b"PORT ".to_vec();
    line.extend(std::iter::repeat_n(b'9', 1000));
    line.extend_from_slice(b"\r\n");
    d.input(Side::Client, &line);
    let denial = the_denial(&d.transcript, DenyReason::BadArgument);
    assert_eq!(denial.argument.map(|a| a.len()), Some(256));
}

/// Inputs the gateway refuses, each fed to a fresh logged-in session after an
/// optional client command; every one must yield exactly one deny event.
#[test]
fn each_refusal_yields_exactly_one_deny_event() {
    struct Case {
        name: &'static str,
        client: &'static [u8],
        server: &'static [u8],
        pinholes_work: bool,
        reason: DenyReason,
    }
    let cases = [
        Case {
            name: "bad PASV reply",
            client: b"PASV\r\n",
            server: b"227 nothing\r\n",
            pinholes_work: true,
            reason: DenyReason::MalformedPassiveReply,
        },
        Case {
            name: "malformed PASV reply",
            client: b"PASV\r\n",
            server: b"227 (10,0,0,5,200,10)\r\r\n",
            pinholes_work: true,
            reason: DenyReason::MalformedPassiveReply,
        },
        Case {
            name: "malformed EPSV reply",
            client: b"EPSV\r\n",
            server: b"229 (|||6446|)\0\r\n",
            pinholes_work: true,
            reason: DenyReason::MalformedPassiveReply,
        },
        Case {
            name: "PASV policy",
            client: b"PASV\r\n",
            server: b"227 (10,0,0,5,0,21)\r\n",
            pinholes_work: true,
            reason: DenyReason::PrivilegedPort,
        },
        Case {
            name: "PASV pinhole failure",
            client: b"PASV\r\n",
            server: PRIVATE_227,
            pinholes_work: false,
            reason: DenyReason::PinholeUnavailable,
        },
        Case {
            name: "PORT pinhole failure",
            client: CLIENT_PORT,
            server: b"",
            pinholes_work: false,
            reason: DenyReason::PinholeUnavailable,
        },
        Case {
            name: "FXP",
            client: b"PORT 192,0,2,1,199,55\r\n",
            server: b"",
            pinholes_work: true,
            reason: DenyReason::FxpDenied,
        },
        Case {
            name: "malformed reply line",
            client: b"PWD\r\n",
            server: b"257 a\rb\r\n",
            pinholes_work: true,
            reason: DenyReason::MalformedReply,
        },
        Case {
            name: "malformed multi-line start",
            client: b"HELP\r\n",
            server: b"214-a\0\r\n x\r\n214 end\r\n",
            pinholes_work: true,
            reason: DenyReason::MalformedReply,
        },
    ];
    for case in cases {
        let mut d = Driver::logged_in();
        d.pinholes_work = case.pinholes_work;
        d.input(Side::Client, case.client);
        d.input(Side::Server, case.server);
        let all = d.transcript.denials();
        assert_eq!(all.len(), 1, "{}: {:#?}", case.name, d.transcript.events);
        assert_eq!(all[0].reason, case.reason, "{}", case.name);
    }
}

// ---- address families and endpoints ------------------------------------------------

fn v6_endpoints() -> Endpoints {
    Endpoints {
        client: sa("[2001:db8:1::10]:40000"),
        client_local: sa("[2001:db8:1::1]:2121"),
        server: sa("198.51.100.20:21"),
        server_local: sa("198.51.100.1:45000"),
        advertise: None,
    }
}

#[test]
fn ipv6_client_eprt_reaches_an_ipv4_server_as_port() {
    // RFC 6384: an IPv4 server may know no EPRT; the gateway sends PORT.
    let mut d = Driver::new(cfg(), v6_endpoints());
    d.login();
    d.input(Side::Client, b"EPRT |2|2001:db8:1::10|6446|\r\n");
    assert_wire(&d.transcript, "", "PORT 198,51,100,1,195,81\r\n");
    assert!(d.transcript.events.contains(&Event::Rewrite {
        kind: RewriteKind::Translated {
            client: DataVerb::Eprt,
            server: DataVerb::Port
        },
        address_replaced: true
    }));
}

#[test]
fn ipv6_client_pasv_and_port_are_refused_with_522_epsv_works() {
    let mut d = Driver::new(cfg(), v6_endpoints());
    d.login();
    for line in [&b"PASV\r\n"[..], CLIENT_PORT] {
        d.transcript = Transcript::default();
        d.input(Side::Client, line);
        assert_wire(
            &d.transcript,
            "522 Network protocol not supported, use (2).\r\n",
            "",
        );
        the_denial(&d.transcript, DenyReason::AddressFamily);
    }
    // RFC 6384: the IPv6 client's EPSV reaches the IPv4 server as PASV;
    // the 227 comes back to the client as a 229.
    d.transcript = Transcript::default();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"227 ok (10,0,0,5,25,46)\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "PASV\r\n",
    );
    assert_eq!(
        d.transcript.pinhole_requests()[0].connect_to,
        sa("198.51.100.20:6446")
    );
    assert!(d.transcript.events.contains(&Event::Rewrite {
        kind: RewriteKind::Translated {
            client: DataVerb::Epsv,
            server: DataVerb::Pasv
        },
        address_replaced: true
    }));
}

#[test]
fn algs_reports_and_switches_the_rfc_6384_translation_per_session() {
    let mut d = Driver::new(cfg(), v6_endpoints());
    d.login();
    d.input(Side::Client, b"ALGS STATUS64\r\n");
    d.input(Side::Client, b"ALGS DISABLE64\r\n");
    d.input(Side::Client, b"algs status64\r\n");
    d.input(Side::Client, b"ALGS FOO\r\n");
    let enabled =
        "216 ENABLED: ftpgate translates EPSV/EPRT into PASV/PORT for this IPv4 server.\r\n";
    let disabled = "216 DISABLED: ftpgate passes EPSV/EPRT to this IPv4 server as they are.\r\n";
    let usage = "501 Syntax error: use ALGS STATUS64, ALGS ENABLE64 or ALGS DISABLE64.\r\n";
    assert_wire(
        &d.transcript,
        &format!("{enabled}{disabled}{disabled}{usage}"),
        "",
    );
    // Disabled: EPSV and EPRT go upstream as they are.
    d.transcript = Transcript::default();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"229 ok (|||6446|)\r\n");
    d.input(Side::Client, b"EPRT |2|2001:db8:1::10|6446|\r\n");
    d.input(Side::Server, b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n200 ok\r\n",
        "EPSV\r\nEPRT |1|198.51.100.1|50002|\r\n",
    );
    d.transcript = Transcript::default();
    d.input(Side::Client, b"ALGS ENABLE64\r\n");
    d.input(Side::Client, b"EPSV\r\n");
    assert_wire(&d.transcript, enabled, "PASV\r\n");
    // A session within one family has no ALG translation: ALGS is the
    // server's business.
    let mut same = Driver::logged_in();
    same.input(Side::Client, b"ALGS STATUS64\r\n");
    assert_wire(&same.transcript, "", "ALGS STATUS64\r\n");
}

#[test]
fn ipv4_client_with_an_ipv6_server_gets_a_227_from_an_upstream_epsv() {
    let ep = Endpoints {
        server: sa("[2001:db8:2::20]:21"),
        server_local: sa("[2001:db8:2::1]:45000"),
        ..lab_endpoints()
    };
    let mut d = Driver::new(cfg(), ep);
    d.login();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"229 Entering Extended Passive Mode (|||6446|)\r\n",
    );
    assert_wire(
        &d.transcript,
        "227 Entering Passive Mode (192,0,2,1,195,81).\r\n",
        "EPSV\r\n",
    );
    assert_eq!(
        d.transcript.pinhole_requests()[0].connect_to,
        sa("[2001:db8:2::20]:6446")
    );
    d.transcript = Transcript::default();
    d.input(Side::Client, CLIENT_PORT);
    assert_wire(&d.transcript, "", "EPRT |2|2001:db8:2::1|50002|\r\n");
}

#[test]
fn mapped_ipv4_endpoints_behave_like_ipv4() {
    let ep = Endpoints {
        client: sa("[::ffff:192.0.2.10]:40000"),
        client_local: sa("[::ffff:192.0.2.1]:2121"),
        ..lab_endpoints()
    };
    let mut d = Driver::new(cfg(), ep);
    d.login();
    d.input(Side::Client, CLIENT_PORT);
    d.input(Side::Client, b"PASV\r\n");
    d.input(Side::Server, b"200 ok\r\n");
    d.input(Side::Server, PRIVATE_227);
    assert_wire(
        &d.transcript,
        &format!(
            "200 ok\r\n{}",
            "227 Entering Passive Mode (192,0,2,1,195,82).\r\n"
        ),
        &format!("{}PASV\r\n", text(REWRITTEN_PORT)),
    );
}

/// With the PROXY protocol an IPv4 client can reach the gateway over IPv6:
/// a 227 cannot name the gateway then, so PASV is refused instead of the core
/// panicking while formatting the reply.
#[test]
fn pasv_from_an_ipv4_client_on_an_ipv6_only_gateway_address_is_refused_not_a_panic() {
    let ep = Endpoints {
        client_local: sa("[2001:db8:1::1]:2121"),
        ..lab_endpoints()
    };
    let mut d = Driver::new(cfg(), ep);
    d.login();
    d.input(Side::Client, b"PASV\r\n");
    assert_wire(&d.transcript, R522_V4, "");
    the_denial(&d.transcript, DenyReason::AddressFamily);
    // EPSV still works: it names no address.
    d.transcript = Transcript::default();
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"229 ok (|||6446|)\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "EPSV\r\n",
    );
}
