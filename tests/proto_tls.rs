//! The core's side of FTP over TLS (RFC 4217): what it answers itself on a
//! terminating session, what it forwards under a passthrough rule, and
//! what it refuses.

use ftpgate::proto::driver::{Driver, lab_endpoints};
use ftpgate::proto::{
    AuthTls, DenyReason, Event, PassthroughRule, Session, SessionConfig, SessionId, Side, TlsPolicy,
};

fn terminating(require_tls: bool) -> Driver {
    let cfg = SessionConfig {
        tls: TlsPolicy {
            auth: AuthTls::Terminate { implicit: false },
            require_tls,
        },
        ..SessionConfig::default()
    };
    Driver::new(cfg, lab_endpoints())
}

fn client_text(d: &Driver) -> String {
    String::from_utf8_lossy(&d.transcript.to_client).into_owned()
}

fn reasons(d: &Driver) -> Vec<DenyReason> {
    d.transcript
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Deny(denial) => Some(denial.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn auth_tls_is_answered_by_the_gateway_and_nothing_reaches_the_server() {
    let mut d = terminating(false);
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"AUTH TLS\r\n");
    assert!(client_text(&d).ends_with("234 AUTH TLS successful: start the TLS handshake.\r\n"));
    // The driver answers the handshake at once (see the next test for
    // the pause in between).
    assert!(d.transcript.events.contains(&Event::StartTls));
    d.input(Side::Client, b"USER u\r\nPBSZ 0\r\nPROT P\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    assert_eq!(d.transcript.to_server, b"USER u\r\n");
    let text = client_text(&d);
    assert!(
        text.ends_with("331 pw\r\n200 PBSZ=0\r\n200 Protection level set to P.\r\n"),
        "{text}"
    );
}

#[test]
fn nothing_is_read_from_the_client_while_its_handshake_runs() {
    let cfg = std::sync::Arc::new(SessionConfig {
        tls: TlsPolicy {
            auth: AuthTls::Terminate { implicit: false },
            require_tls: false,
        },
        ..SessionConfig::default()
    });
    let now = std::time::Instant::now();
    let mut s = Session::new(cfg, lab_endpoints(), SessionId(1), now);
    s.handle_input(Side::Server, b"220 ready\r\n", now);
    s.handle_input(Side::Client, b"AUTH TLS\r\n", now);
    let mut events = Vec::new();
    while let Some(e) = s.poll_event() {
        events.push(e);
    }
    assert_eq!(events, [Event::StartTls]);
    assert!(!s.wants_input(Side::Client));
    s.handle_tls_established(now);
    assert!(s.wants_input(Side::Client));
}

#[test]
fn prot_p_makes_the_client_leg_of_a_pinhole_tls() {
    let mut d = terminating(false);
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"AUTH TLS\r\n");
    d.session.handle_tls_established(d.now);
    d.input(Side::Client, b"PBSZ 0\r\nPROT P\r\nUSER u\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    d.input(Side::Client, b"PASS p\r\n");
    d.input(Side::Server, b"230 ok\r\n");
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"229 (|||40001|)\r\n");
    assert!(d.requests.last().is_some_and(|r| r.client_tls));
    d.input(Side::Client, b"PROT C\r\nPASV\r\n");
    d.input(Side::Server, b"227 (198,51,100,20,156,66)\r\n");
    assert!(d.requests.last().is_some_and(|r| !r.client_tls));
}

#[test]
fn require_tls_refuses_cleartext_logins_and_data_without_prot_p() {
    let mut d = terminating(true);
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"USER u\r\nPROT P\r\n");
    let text = client_text(&d);
    assert!(text.contains("530 TLS required"), "{text}");
    assert!(text.contains("503 "), "{text}");
    assert!(d.transcript.to_server.is_empty());
    d.input(Side::Client, b"AUTH TLS\r\n");
    d.session.handle_tls_established(d.now);
    d.input(Side::Client, b"USER u\r\n");
    d.input(Side::Server, b"331 pw\r\n");
    d.input(Side::Client, b"PASS p\r\n");
    d.input(Side::Server, b"230 ok\r\n");
    d.input(Side::Client, b"PASV\r\n");
    assert!(
        client_text(&d).ends_with(
            "521 Data connection cannot be opened with this PROT setting: use PROT P.\r\n"
        )
    );
    assert_eq!(
        reasons(&d),
        [
            DenyReason::TlsRequired,
            DenyReason::AuthRefused,
            DenyReason::TlsRequired
        ]
    );
    assert!(d.requests.is_empty());
}

#[test]
fn a_failed_handshake_closes_the_session_with_one_deny_line() {
    let mut d = terminating(false);
    d.input(Side::Server, b"220 ready\r\n");
    d.input(Side::Client, b"AUTH TLS\r\n");
    d.session.handle_tls_failed("bad record", d.now);
    d.settle();
    assert!(d.session.is_closed());
    assert_eq!(reasons(&d), [DenyReason::TlsHandshakeFailed]);
}

#[test]
fn auth_with_commands_in_flight_is_out_of_sequence() {
    let mut d = terminating(false);
    // The greeting has not arrived: the 234 could not be the last byte.
    d.input(Side::Client, b"AUTH TLS\r\n");
    assert!(client_text(&d).is_empty());
    d.input(Side::Server, b"220 ready\r\n");
    assert!(client_text(&d).contains("503 "));
    assert!(!d.transcript.events.contains(&Event::StartTls));
}

#[test]
fn passthrough_forwards_auth_only_to_servers_a_rule_names() {
    let rule = |net: &str| PassthroughRule {
        name: "r".into(),
        servers: vec![net.parse().unwrap()],
        data_ports: (40000, 40100),
    };
    for (net, passes) in [("198.51.100.20/32", true), ("198.51.100.99/32", false)] {
        let cfg = SessionConfig {
            tls: TlsPolicy {
                auth: AuthTls::Passthrough(vec![rule(net)]),
                require_tls: false,
            },
            ..SessionConfig::default()
        };
        let mut d = Driver::new(cfg, lab_endpoints());
        d.input(Side::Server, b"220 ready\r\n");
        d.input(Side::Client, b"AUTH TLS\r\n");
        if !passes {
            assert!(client_text(&d).ends_with("534 Request denied for policy reasons: the control channel must stay inspectable.\r\n"));
            assert_eq!(reasons(&d), [DenyReason::AuthRefused]);
            continue;
        }
        assert_eq!(d.transcript.to_server, b"AUTH TLS\r\n");
        d.input(Side::Server, b"234 go\r\n");
        assert!(client_text(&d).ends_with("234 go\r\n"));
        assert!(d.session.is_passthrough());
        assert!(!d.session.wants_input(Side::Client) && !d.session.wants_input(Side::Server));
        assert!(d.transcript.events.contains(&Event::Passthrough {
            server: "198.51.100.20".parse().unwrap(),
            data_ports: (40000, 40100),
        }));
        assert_eq!(reasons(&d), [DenyReason::TlsPassthrough]);
    }
}
