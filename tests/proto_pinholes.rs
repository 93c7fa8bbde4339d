//! The core owns every pinhole's life: the data plane only reports who
//! connected, and the core decides (expected peer or theft), expires, and
//! withdraws pinholes taken over by a server-to-server transfer. Each
//! refusal is exactly one deny event.

use std::net::SocketAddr;
use std::time::Duration;

use ftpgate::proto::driver::{Driver, Transcript, pinhole};
use ftpgate::proto::{DataVerdict, DenyReason, Event, PinholeClose, Side};

const THIEF: &str = "192.0.2.66:40000";

fn passive_pinhole() -> Driver {
    let mut d = Driver::lab();
    d.login();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (198,51,100,20,200,10).\r\n",
    );
    assert_eq!(d.requests.len(), 1, "{:#?}", d.transcript.events);
    d.transcript = Transcript::default();
    d
}

#[test]
fn expected_peer_is_accepted_once_and_a_second_connection_is_refused() {
    let mut d = passive_pinhole();
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    assert_eq!(d.peer_connects(1), DataVerdict::Refuse);
    // The expected peer coming back is no theft: nothing is logged.
    assert!(d.transcript.denials().is_empty(), "{:#?}", d.transcript);
}

#[test]
fn another_host_is_pasv_theft_with_its_address_and_the_pinhole_still_waits() {
    let mut d = passive_pinhole();
    let thief: SocketAddr = THIEF.parse().unwrap();
    assert_eq!(d.connect_from(1, thief), DataVerdict::Refuse);
    let logged = d.transcript.denials();
    assert_eq!(logged.len(), 1, "{:#?}", d.transcript);
    let denial = logged[0];
    assert_eq!(denial.reason, DenyReason::PasvTheft);
    assert_eq!(denial.side, Side::Client);
    assert_eq!(denial.peer, Some(thief));
    assert_eq!(denial.expected_peer, Some("192.0.2.10".parse().unwrap()));
    assert_eq!(denial.target.map(|t| t.port()), Some(50001));
    assert_eq!(denial.rule.as_deref(), Some("expected_peer_only"));
    // The real client still gets its data connection.
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
}

#[test]
fn a_thief_after_the_transfer_began_is_still_logged() {
    let mut d = passive_pinhole();
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.transcript = Transcript::default();
    let thief: SocketAddr = THIEF.parse().unwrap();
    assert_eq!(d.connect_from(1, thief), DataVerdict::Refuse);
    let logged = d.transcript.denials();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].reason, DenyReason::PasvTheft);
}

#[test]
fn an_expired_pinhole_refuses_even_its_expected_peer() {
    let mut d = passive_pinhole();
    d.advance(Duration::from_secs(31));
    assert!(
        d.transcript.events.contains(&Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::Expired
        }),
        "{:#?}",
        d.transcript.events
    );
    assert_eq!(d.transcript.denials()[0].reason, DenyReason::PinholeExpired);
    assert_eq!(d.peer_connects(1), DataVerdict::Refuse);
}

#[test]
fn an_active_pinhole_expects_the_server() {
    let mut d = Driver::lab();
    d.login();
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    d.transcript = Transcript::default();
    // The client itself connecting to the server-side pinhole is theft.
    let client: SocketAddr = "192.0.2.10:40000".parse().unwrap();
    assert_eq!(d.connect_from(1, client), DataVerdict::Refuse);
    assert_eq!(d.transcript.denials()[0].side, Side::Server);
    let server: SocketAddr = "198.51.100.20:20".parse().unwrap();
    assert_eq!(d.connect_from(1, server), DataVerdict::Accept);
}

#[test]
fn a_pinhole_taken_over_for_fxp_is_withdrawn_once() {
    let mut d = passive_pinhole();
    d.session.handle_pinhole_taken_over(pinhole(1), d.now);
    d.settle();
    assert_eq!(
        d.transcript.events,
        vec![Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::TakenOver
        }]
    );
    // Not waiting any more: no expiry later, and no connection taken.
    d.transcript = Transcript::default();
    d.advance(Duration::from_secs(60));
    assert!(d.transcript.denials().is_empty(), "{:#?}", d.transcript);
    assert_eq!(d.peer_connects(1), DataVerdict::Refuse);
    // A second take-over of the same pinhole does nothing.
    d.session.handle_pinhole_taken_over(pinhole(1), d.now);
    d.settle();
    assert!(d.transcript.events.is_empty());
}

#[test]
fn a_connected_pinhole_is_not_taken_over() {
    let mut d = passive_pinhole();
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.transcript = Transcript::default();
    d.session.handle_pinhole_taken_over(pinhole(1), d.now);
    d.settle();
    assert!(d.transcript.events.is_empty());
}

/// A logged-in session that may hold one pinhole.
fn one_slot() -> Driver {
    let mut d = Driver::new(
        ftpgate::proto::SessionConfig {
            max_pinholes: 1,
            ..Default::default()
        },
        ftpgate::proto::driver::lab_endpoints(),
    );
    d.login();
    d
}

#[test]
fn a_transfer_final_reply_frees_its_data_connection_slot() {
    // With one slot, a second transfer is only possible once the first
    // one's data connection is over. The kernel plane reports that end
    // minutes late (conntrack keeps TIME_WAIT), so the core takes it from
    // the transfer's final reply.
    let mut d = one_slot();
    for (seq, verb) in [(1, "RETR a"), (2, "STOR b"), (3, "LIST")] {
        d.input(Side::Client, b"PASV\r\n");
        d.input(
            Side::Server,
            b"227 Entering Passive Mode (198,51,100,20,200,10).\r\n",
        );
        assert_eq!(d.peer_connects(seq), DataVerdict::Accept, "{verb}");
        d.input(Side::Client, format!("{verb}\r\n").as_bytes());
        d.input(Side::Server, b"150 Opening data connection\r\n");
        d.input(Side::Server, b"226 Transfer complete\r\n");
    }
    assert_eq!(d.requests.len(), 3);
    assert!(d.transcript.denials().is_empty(), "{:#?}", d.transcript);
}

#[test]
fn a_non_transfer_reply_keeps_the_data_connection_slot() {
    let mut d = one_slot();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (198,51,100,20,200,10).\r\n",
    );
    assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    d.input(Side::Client, b"NOOP\r\n");
    d.input(Side::Server, b"200 ok\r\n");
    d.transcript = Transcript::default();
    d.input(Side::Client, b"PASV\r\n");
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (198,51,100,20,200,11).\r\n",
    );
    assert_eq!(
        d.transcript.denials()[0].reason,
        DenyReason::PinholeLimit,
        "{:#?}",
        d.transcript
    );
}
