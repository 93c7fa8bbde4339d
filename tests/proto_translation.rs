//! Scenario vectors for the core's data-mode conversion (`server_data`):
//! a client's PORT/EPRT carried out as PASV/EPSV toward the server, a
//! client's PASV/EPSV carried out as PORT/EPRT, and the mapping of the
//! server's refusals to the refusal the client's own command expects.
//!
//! Lab addresses as in `tests/proto_vectors.rs`: client 192.0.2.10,
//! gateway 192.0.2.1 inside and 198.51.100.1 outside, server
//! 198.51.100.20; the driver opens pinhole `id` on port `50000 + id`.

#[path = "common/proto.rs"]
mod wire;

use ftpgate::proto::driver::{Driver, Transcript, lab_endpoints, pinhole};
use ftpgate::proto::{
    DataMode, DataVerb, DataVerdict, DenyReason, Event, PinholeClose, PinholeRequest, RewriteKind,
    ServerData, SessionConfig, Shape, Side,
};
use proptest::prelude::*;
use wire::{CLIENT, GATEWAY_INSIDE, GATEWAY_OUTSIDE, SERVER, assert_wire, ip, sa, text};

fn rewrites(t: &Transcript) -> Vec<&'static str> {
    t.events
        .iter()
        .filter_map(|e| match e {
            Event::Rewrite { kind, .. } => Some(kind.as_str()),
            _ => None,
        })
        .collect()
}

fn session(server_data: ServerData) -> Driver {
    session_at(server_data, lab_endpoints())
}

/// A logged-in session converting per `server_data`, between `ep`.
fn session_at(server_data: ServerData, ep: ftpgate::proto::Endpoints) -> Driver {
    let cfg = SessionConfig {
        server_data,
        ..SessionConfig::default()
    };
    let mut d = Driver::new(cfg, ep);
    d.login();
    d
}

/// A session converting per `server_data` after the client's bytes
/// `client` and the server's answer `server`.
fn converted(server_data: ServerData, client: &[u8], server: &[u8]) -> Driver {
    let mut d = session(server_data);
    d.input(Side::Client, client);
    d.input(Side::Server, server);
    legs_connected(&mut d);
    d
}

/// The plane has connected both legs of a converted PORT/EPRT's pinhole
/// (number 1), if there is one: the server's leg is judged, and the
/// client's 200 may go.
fn legs_connected(d: &mut Driver) {
    let dial_both = |r: &&PinholeRequest| matches!(r.shape, Shape::DialBoth { .. });
    if d.transcript.pinhole_requests().iter().any(dial_both) {
        assert_eq!(d.peer_connects(1), DataVerdict::Accept);
    }
}

/// The client sends `command`, which the gateway sends on converted as
/// `to_server`; the server refuses that with `refusal`, and the client
/// gets `code` (the refusal its own command expects) naming both verbs
/// and the server's code. Returns the session for more checks.
fn refused_conversion(
    server_data: ServerData,
    command: &str,
    to_server: &str,
    refusal: &str,
    code: &str,
) -> Driver {
    let d = converted(
        server_data,
        format!("{command}\r\n").as_bytes(),
        format!("{refusal}\r\n").as_bytes(),
    );
    let verb = |line: &str| line.split_whitespace().next().unwrap().to_string();
    let (sent, asked, theirs) = (verb(to_server), verb(command), &refusal[..3]);
    assert_wire(
        &d.transcript,
        &format!(
            "{code} Can't open data connection: the server refused {sent} (ftpgate sent it for {asked}) with {theirs}.\r\n"
        ),
        to_server,
    );
    d
}

// ---- server_data = "passive": PORT/EPRT become PASV/EPSV -------------------------

#[test]
fn port_becomes_pasv_and_the_gateway_dials_both_ends_before_the_client_gets_200() {
    let mut d = session(ServerData::Passive);
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    // Nothing for the client until the server's passive reply.
    assert_wire(&d.transcript, "", "PASV\r\n");
    assert!(d.transcript.pinhole_requests().is_empty());
    // A NATed server's private 227 address is still replaced by its
    // control address.
    d.input(
        Side::Server,
        b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n",
    );
    // Still nothing for the client: the plane dials both ends first.
    assert_wire(&d.transcript, "", "PASV\r\n");
    assert_eq!(
        d.transcript.pinhole_requests(),
        vec![&PinholeRequest {
            id: pinhole(1),
            mode: DataMode::Active,
            listen_ip: ip(GATEWAY_INSIDE),
            expected_peer: ip(SERVER),
            connect_to: sa("192.0.2.10:6446"),
            connect_from: ip(GATEWAY_INSIDE),
            client_tls: false,
            shape: Shape::DialBoth {
                dial: sa("198.51.100.20:51210"),
                dial_from: ip(GATEWAY_OUTSIDE),
            },
        }]
    );
    // The dialled server leg is judged like any data connection; once it
    // is accepted (the client's leg was connected before it), the 200.
    assert_eq!(
        d.connect_from(1, sa("198.51.100.20:51210")),
        DataVerdict::Accept
    );
    assert_wire(
        &d.transcript,
        "200 PORT command successful.\r\n",
        "PASV\r\n",
    );
    assert_eq!(rewrites(&d.transcript), ["port_to_pasv"]);
    d.transcript = Transcript::default();
    d.input(Side::Client, b"RETR f\r\n");
    d.input(Side::Server, b"150 go\r\n226 done\r\n");
    assert_wire(&d.transcript, "150 go\r\n226 done\r\n", "RETR f\r\n");
}

#[test]
fn a_converted_port_whose_legs_cannot_be_connected_gets_425_not_200() {
    let mut d = session(ServerData::Passive);
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    d.input(Side::Server, b"227 ok (198,51,100,20,200,10)\r\n");
    // The plane could not reach the client's port (or the server's): it
    // reports the pinhole closed.
    d.session.handle_pinhole_closed(pinhole(1), d.now);
    d.settle();
    assert_wire(
        &d.transcript,
        "425 Can't open data connection: the gateway could not connect to your port or the server's.\r\n",
        "PASV\r\n",
    );
    assert_eq!(d.transcript.reasons(), [DenyReason::PinholeUnavailable]);
    // The session goes on.
    d.transcript = Transcript::default();
    d.input(Side::Client, b"NOOP\r\n");
    assert_wire(&d.transcript, "", "NOOP\r\n");
    // A slow plane: the pinhole expires before both legs are there.
    let mut d = session(ServerData::Passive);
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    d.input(Side::Server, b"227 ok (198,51,100,20,200,10)\r\n");
    d.advance(SessionConfig::default().pinhole_timeout + std::time::Duration::from_secs(1));
    assert_wire(
        &d.transcript,
        "425 Can't open data connection: the gateway could not connect to your port or the server's.\r\n",
        "PASV\r\n",
    );
    assert_eq!(d.transcript.reasons(), [DenyReason::PinholeExpired]);
}

#[test]
fn eprt_becomes_pasv_toward_an_ipv4_server_and_gets_200() {
    let d = converted(
        ServerData::Passive,
        b"EPRT |1|192.0.2.10|6446|\r\n",
        b"227 ok (198,51,100,20,200,10)\r\n",
    );
    assert_wire(
        &d.transcript,
        "200 EPRT command successful.\r\n",
        "PASV\r\n",
    );
    assert_eq!(rewrites(&d.transcript), ["eprt_to_pasv"]);
}

#[test]
fn a_bounce_port_is_refused_before_any_conversion() {
    let mut d = session(ServerData::Passive);
    d.input(Side::Client, b"PORT 192,0,2,99,25,46\r\n");
    assert_wire(
        &d.transcript,
        "504 Data connection target refused by policy.\r\n",
        "",
    );
    assert_eq!(d.transcript.denials()[0].reason, DenyReason::Bounce);
}

#[test]
fn a_refused_pasv_reaches_the_client_as_the_refusal_of_its_port() {
    for (server, client) in [
        ("502 PASV not allowed.", "502"),
        ("500 Unknown command.", "502"),
        ("501 Nope.", "502"),
        ("425 Cannot open passive connection.", "425"),
        ("530 Not logged in.", "530"),
    ] {
        let d = refused_conversion(
            ServerData::Passive,
            "PORT 192,0,2,10,25,46",
            "PASV\r\n",
            server,
            client,
        );
        let all = d.transcript.denials();
        assert_eq!(all.len(), 1, "{server}");
        assert_eq!(all[0].reason, DenyReason::TranslationRefused);
        assert_eq!(all[0].rule.as_deref(), Some("port_to_pasv"));
        assert_eq!(all[0].verb.as_deref(), Some("PORT"));
        assert_eq!(all[0].argument.as_deref(), Some("192,0,2,10,25,46"));
        assert!(d.transcript.pinhole_requests().is_empty());
    }
}

#[test]
fn a_multi_line_passive_reply_never_reaches_a_converted_client() {
    let d = converted(
        ServerData::Passive,
        b"PORT 192,0,2,10,25,46\r\n",
        b"227-Entering Passive Mode (10,0,0,5,1,1)\r\n227 (198,51,100,20,200,10)\r\n",
    );
    assert_wire(
        &d.transcript,
        "200 PORT command successful.\r\n",
        "PASV\r\n",
    );
}

// ---- server_data = "active": PASV/EPSV become PORT/EPRT --------------------------

#[test]
fn pasv_becomes_port_and_the_client_gets_227_only_after_the_server_accepted_it() {
    let mut d = session(ServerData::Active);
    d.input(Side::Client, b"PASV\r\n");
    assert_eq!(
        d.transcript.pinhole_requests(),
        vec![&PinholeRequest {
            id: pinhole(1),
            mode: DataMode::Passive,
            listen_ip: ip(GATEWAY_INSIDE),
            expected_peer: ip(CLIENT),
            connect_to: sa("198.51.100.20:0"),
            connect_from: ip(GATEWAY_OUTSIDE),
            client_tls: false,
            shape: Shape::AcceptBoth {
                server_listen: ip(GATEWAY_OUTSIDE),
                server: ip(SERVER),
            },
        }]
    );
    // The server is told the gateway's outside address, same port.
    assert_wire(&d.transcript, "", "PORT 198,51,100,1,195,81\r\n");
    d.input(Side::Server, b"200 PORT command successful.\r\n");
    assert_wire(
        &d.transcript,
        "227 Entering Passive Mode (192,0,2,1,195,81).\r\n",
        "PORT 198,51,100,1,195,81\r\n",
    );
    assert_eq!(rewrites(&d.transcript), ["pasv_to_port"]);
    // Both ends connect in; anyone else is a thief.
    assert_eq!(
        d.connect_from(1, sa("192.0.2.10:40100")),
        DataVerdict::Accept
    );
    assert_eq!(
        d.connect_from(1, sa("192.0.2.11:40100")),
        DataVerdict::Refuse
    );
    assert_eq!(d.transcript.denials()[0].reason, DenyReason::PasvTheft);
    assert_eq!(
        d.connect_from(1, sa("198.51.100.20:20")),
        DataVerdict::Accept
    );
    // One connection each: a second from the client is refused.
    assert_eq!(
        d.connect_from(1, sa("192.0.2.10:40101")),
        DataVerdict::Refuse
    );
}

#[test]
fn epsv_becomes_port_and_the_client_gets_229() {
    let d = converted(ServerData::Active, b"EPSV\r\n", b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "PORT 198,51,100,1,195,81\r\n",
    );
    assert_eq!(rewrites(&d.transcript), ["epsv_to_port"]);
}

#[test]
fn a_refused_port_reaches_the_client_as_the_refusal_of_its_pasv_and_the_pinhole_goes() {
    for (server, client) in [
        ("500 Illegal PORT command.", "502"),
        ("425 Security: Bad IP connecting.", "425"),
    ] {
        let mut d = refused_conversion(
            ServerData::Active,
            "PASV",
            "PORT 198,51,100,1,195,81\r\n",
            server,
            client,
        );
        assert!(d.transcript.events.contains(&Event::ClosePinhole {
            id: pinhole(1),
            cause: PinholeClose::ServerRefused,
        }));
        let all = d.transcript.denials();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].reason, DenyReason::TranslationRefused);
        assert_eq!(all[0].rule.as_deref(), Some("pasv_to_port"));
        // Nothing waits there any more.
        assert_eq!(
            d.connect_from(1, sa("192.0.2.10:40100")),
            DataVerdict::Refuse
        );
    }
}

#[test]
fn epsv_all_is_answered_by_the_gateway_when_it_converts() {
    let mut d = session(ServerData::Active);
    d.input(Side::Client, b"EPSV ALL\r\n");
    assert_wire(&d.transcript, "200 EPSV ALL command successful.\r\n", "");
    d.transcript = Transcript::default();
    d.input(Side::Client, b"EPSV\r\n");
    assert_wire(&d.transcript, "", "PORT 198,51,100,1,195,81\r\n");
}

#[test]
fn as_client_keeps_the_clients_own_mode() {
    let mut d = session(ServerData::AsClient);
    d.input(Side::Client, b"PORT 192,0,2,10,25,46\r\n");
    assert_wire(&d.transcript, "", "PORT 198,51,100,1,195,81\r\n");
    assert_eq!(d.transcript.pinhole_requests()[0].shape, Shape::Relay);
    let kind = RewriteKind::for_verbs(DataVerb::Port, DataVerb::Port);
    assert_eq!(kind, RewriteKind::Port);
}

// ---- framing does not change a conversion -------------------------------------------

/// Bytes from either side, in order.
type Conversation<'a> = &'a [(Side, &'a [u8])];

/// Each side's bytes fed whole or one byte at a time give the same
/// transcript: the result never depends on TCP segmentation.
#[test]
fn converted_sessions_do_not_depend_on_how_the_bytes_were_cut() {
    let conversations: [(ServerData, Conversation); 2] = [
        (
            ServerData::Passive,
            &[
                (
                    Side::Client,
                    b"PORT 192,0,2,10,25,46\r\nEPRT |1|192.0.2.10|6447|\r\n",
                ),
                (
                    Side::Server,
                    b"227-Entering\r\n227 (10,0,0,5,200,10)\r\n502 no\r\n",
                ),
                (Side::Client, b"RETR f\r\n"),
                (Side::Server, b"150 go\r\n226 done\r\n"),
            ],
        ),
        (
            ServerData::Active,
            &[
                (Side::Client, b"EPSV\r\n"),
                (Side::Server, b"200-ok\r\n200 ok\r\n"),
                (Side::Client, b"PASV\r\nSTOR f\r\n"),
                (Side::Server, b"425 nope\r\n150 go\r\n226 done\r\n"),
            ],
        ),
    ];
    for (server_data, steps) in conversations {
        let mut whole = session(server_data);
        let mut bytewise = session(server_data);
        for (side, bytes) in steps {
            whole.input(*side, bytes);
            for b in bytes.iter() {
                bytewise.input(*side, std::slice::from_ref(b));
            }
        }
        assert_eq!(
            text(&whole.transcript.to_client),
            text(&bytewise.transcript.to_client),
            "{server_data:?}"
        );
        assert_eq!(
            text(&whole.transcript.to_server),
            text(&bytewise.transcript.to_server),
            "{server_data:?}"
        );
        assert_eq!(
            whole.transcript.events, bytewise.transcript.events,
            "{server_data:?}"
        );
    }
}

#[test]
fn a_port_the_server_accepts_after_its_pinhole_expired_gets_425() {
    let mut d = session(ServerData::Active);
    d.input(Side::Client, b"PASV\r\n");
    d.advance(std::time::Duration::from_secs(31));
    d.transcript = Transcript::default();
    d.input(Side::Server, b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        "425 Can't open data connection: no pinhole available.\r\n",
        "",
    );
    assert_eq!(
        d.transcript.denials()[0].reason,
        DenyReason::PinholeUnavailable
    );
}

// ---- properties -------------------------------------------------------------------

/// One thing that happens in a converted session.
#[derive(Debug, Clone)]
enum Move {
    Client(&'static str),
    Server(&'static str),
    /// Pinhole `seq` gets a connection from `peer`.
    Connect(u64, &'static str),
    Advance(u64),
}

fn a_move() -> impl Strategy<Value = Move> {
    prop_oneof![
        prop::sample::select(vec![
            "PORT 192,0,2,10,25,46",
            "PORT 192,0,2,99,25,46",
            "PORT 192,0,2,1,195,81",
            "PORT 192,0,2,10,0,25",
            "EPRT |1|192.0.2.10|6446|",
            "EPRT |2|2001:db8::1|6446|",
            "PASV",
            "EPSV",
            "EPSV 1",
            "EPSV ALL",
            "RETR f",
            "STOR f",
            "ALGS STATUS64",
            "NOOP",
        ])
        .prop_map(Move::Client),
        prop::sample::select(vec![
            "227 Entering Passive Mode (10,0,0,5,200,10).",
            "227 (198,51,100,20,0,21)",
            "227 (192,0,2,99,200,10)",
            "227-x\r\n227 (198,51,100,20,200,10)",
            "229 Entering Extended Passive Mode (|||6446|)",
            "229 garbage",
            "200 PORT command successful.",
            "200-ok\r\n229 (|||1|)\r\n200 ok",
            "500 no",
            "425 no",
            "530 no",
            "150 go",
            "226 done",
        ])
        .prop_map(Move::Server),
        (
            1u64..6,
            prop::sample::select(vec![
                "192.0.2.10:40100",
                "198.51.100.20:20",
                "192.0.2.66:1234",
            ])
        )
            .prop_map(|(seq, peer)| Move::Connect(seq, peer)),
        (1u64..40).prop_map(Move::Advance),
    ]
}

fn server_data() -> impl Strategy<Value = ServerData> {
    prop::sample::select(vec![ServerData::Passive, ServerData::Active])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever either side does, a converted session keeps the rules:
    /// every pinhole leads only to the client and the server (the data
    /// peer is the control peer), a third host is never accepted, and the
    /// only 227/229 lines the client sees are the gateway's own.
    #[test]
    fn converted_sessions_keep_every_data_leg_on_the_control_peers(
        mode in server_data(),
        moves in prop::collection::vec(a_move(), 1..40),
    ) {
        let mut d = session(mode);
        for m in &moves {
            match m {
                Move::Client(line) => d.input(Side::Client, format!("{line}\r\n").as_bytes()),
                Move::Server(line) => d.input(Side::Server, format!("{line}\r\n").as_bytes()),
                Move::Connect(seq, peer) => {
                    let verdict = d.connect_from(*seq, sa(peer));
                    if peer.starts_with("192.0.2.66") {
                        prop_assert_eq!(verdict, DataVerdict::Refuse);
                    }
                }
                Move::Advance(secs) => d.advance(std::time::Duration::from_secs(*secs)),
            }
        }
        for req in d.transcript.pinhole_requests() {
            match req.shape {
                Shape::DialBoth { dial, dial_from } => {
                    prop_assert_eq!(mode, ServerData::Passive);
                    prop_assert_eq!(dial.ip(), ip(SERVER));
                    prop_assert_eq!(dial_from, ip(GATEWAY_OUTSIDE));
                    prop_assert_eq!(req.connect_to.ip(), ip(CLIENT));
                    prop_assert!(req.connect_to.port() >= 1024);
                    prop_assert_eq!(req.expected_peer, ip(SERVER));
                }
                Shape::AcceptBoth { server_listen, server } => {
                    prop_assert_eq!(mode, ServerData::Active);
                    prop_assert_eq!(server, ip(SERVER));
                    prop_assert_eq!(server_listen, ip(GATEWAY_OUTSIDE));
                    prop_assert_eq!(req.listen_ip, ip(GATEWAY_INSIDE));
                    prop_assert_eq!(req.expected_peer, ip(CLIENT));
                }
                // The mode the gateway does not convert: the client's own
                // PASV/EPSV ("passive") or PORT/EPRT ("active").
                Shape::Relay if req.mode == DataMode::Passive => {
                    prop_assert_eq!(mode, ServerData::Passive);
                    prop_assert_eq!(req.expected_peer, ip(CLIENT));
                    prop_assert_eq!(req.connect_to.ip(), ip(SERVER));
                }
                Shape::Relay => {
                    prop_assert_eq!(mode, ServerData::Active);
                    prop_assert_eq!(req.expected_peer, ip(SERVER));
                    prop_assert_eq!(req.connect_to.ip(), ip(CLIENT));
                }
            }
        }
        for line in text(&d.transcript.to_client).lines() {
            if line.starts_with("227") || line.starts_with("229") {
                prop_assert!(
                    line.starts_with("227 Entering Passive Mode (192,0,2,1,")
                        || line.starts_with("229 Entering Extended Passive Mode (|||"),
                    "{line}"
                );
            }
        }
        // The server only ever hears of the gateway's own addresses.
        for line in text(&d.transcript.to_server).lines() {
            if line.starts_with("PORT") {
                prop_assert!(line.starts_with("PORT 198,51,100,1,"), "{line}");
            }
            if line.starts_with("EPRT") {
                prop_assert!(line.starts_with("EPRT |1|198.51.100.1|"), "{line}");
            }
        }
    }
}

// ---- conversion across address families ------------------------------------------

#[test]
fn an_ipv6_clients_eprt_becomes_pasv_toward_an_ipv4_server() {
    let ep = ftpgate::proto::Endpoints {
        client: sa("[2001:db8:1::10]:40000"),
        client_local: sa("[2001:db8:1::1]:2121"),
        ..lab_endpoints()
    };
    let mut d = session_at(ServerData::Passive, ep);
    d.input(Side::Client, b"EPRT |2|2001:db8:1::10|6446|\r\n");
    d.input(Side::Server, b"227 ok (198,51,100,20,200,10)\r\n");
    legs_connected(&mut d);
    assert_wire(
        &d.transcript,
        "200 EPRT command successful.\r\n",
        "PASV\r\n",
    );
    let req = d.transcript.pinhole_requests()[0].clone();
    assert_eq!(req.connect_to, sa("[2001:db8:1::10]:6446"));
    assert_eq!(req.connect_from, ip("2001:db8:1::1"));
    assert_eq!(
        req.shape,
        Shape::DialBoth {
            dial: sa("198.51.100.20:51210"),
            dial_from: ip(GATEWAY_OUTSIDE),
        }
    );
    // And "active": the IPv6 client's EPSV becomes PORT for the IPv4 server.
    let mut d = session_at(ServerData::Active, ep);
    d.input(Side::Client, b"EPSV\r\n");
    d.input(Side::Server, b"200 ok\r\n");
    assert_wire(
        &d.transcript,
        "229 Entering Extended Passive Mode (|||50001|)\r\n",
        "PORT 198,51,100,1,195,81\r\n",
    );
}

#[test]
fn an_active_conversion_whose_server_never_connects_expires_naming_the_server() {
    let mut d = converted(ServerData::Active, b"PASV\r\n", b"200 ok\r\n");
    assert_eq!(
        d.connect_from(1, sa("192.0.2.10:40100")),
        DataVerdict::Accept
    );
    d.transcript = Transcript::default();
    d.advance(std::time::Duration::from_secs(31));
    let all = d.transcript.denials();
    assert_eq!(all.len(), 1, "{:#?}", d.transcript.events);
    assert_eq!(all[0].reason, DenyReason::PinholeExpired);
    assert_eq!(all[0].side, Side::Server);
    assert_eq!(all[0].expected_peer, Some(ip(SERVER)));
}
