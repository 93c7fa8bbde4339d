//! Property tests for the protocol core: parse/format round trips for every
//! address format the gateway rewrites, framing split invariance, and the
//! session-level property that how the bytes are cut into reads never
//! changes what the gateway sends or does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use ftpgate::proto::command::{
    format_eprt_arg, format_host_port, is_delimiter, parse_eprt_arg, parse_port_arg,
};
use ftpgate::proto::driver::{self, Step, Transcript};
use ftpgate::proto::framing::{Frame, LineFramer};
use ftpgate::proto::reply::{self, parse_227, parse_229};
use ftpgate::proto::{Event, Side};
use proptest::prelude::*;

// ---- address formats ---------------------------------------------------------

fn v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

fn v6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        // Mapped and compatible forms print differently; cover them.
        v4().prop_map(|ip| ip.to_ipv6_mapped()),
        v4().prop_map(|ip| ip.to_ipv6_compatible()),
        any::<u16>().prop_map(|x| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, x)),
    ]
}

fn nonzero_port() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// Reply text that cannot be mistaken for part of the numbers.
fn filler() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no digits or commas", |b| !b.is_ascii_digit() && *b != b','),
        0..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn port_argument_round_trips(ip in v4(), port in nonzero_port()) {
        let addr = SocketAddrV4::new(ip, port);
        let text = format_host_port(addr);
        prop_assert_eq!(parse_port_arg(text.as_bytes()), Ok(addr));
    }

    #[test]
    fn port_argument_parses_to_what_it_says(n in any::<[u8; 6]>()) {
        let text = n.map(|x| x.to_string()).join(",");
        let port = u16::from_be_bytes([n[4], n[5]]);
        let parsed = parse_port_arg(text.as_bytes());
        if port == 0 {
            prop_assert!(parsed.is_err());
        } else {
            let addr = parsed.unwrap();
            prop_assert_eq!(addr.ip().octets(), [n[0], n[1], n[2], n[3]]);
            prop_assert_eq!(addr.port(), port);
            prop_assert_eq!(format_host_port(addr), text);
        }
    }

    #[test]
    fn eprt_argument_round_trips_for_both_families(
        ip in prop_oneof![v4().prop_map(IpAddr::V4), v6().prop_map(IpAddr::V6)],
        port in nonzero_port(),
    ) {
        let addr = SocketAddr::new(ip, port);
        let text = format_eprt_arg(addr);
        prop_assert_eq!(parse_eprt_arg(text.as_bytes()), Ok(addr), "{}", text);
    }

    #[test]
    fn eprt_argument_with_any_delimiter_parses(
        ip in prop_oneof![v4().prop_map(IpAddr::V4), v6().prop_map(IpAddr::V6)],
        port in nonzero_port(),
        // Letters are valid delimiters too, but one that occurs in the
        // address (hex digits, `:` and `.`) makes the argument ambiguous.
        d in (33u8..=126).prop_filter("a delimiter not in any address", |d| {
            is_delimiter(*d) && !d.is_ascii_alphanumeric() && *d != b':' && *d != b'.'
        }),
    ) {
        let addr = SocketAddr::new(ip, port);
        let af = if ip.is_ipv4() { 1 } else { 2 };
        let d = d as char;
        let text = format!("{d}{af}{d}{ip}{d}{port}{d}");
        prop_assert_eq!(parse_eprt_arg(text.as_bytes()), Ok(addr), "{}", text);
    }

    #[test]
    fn reply_227_round_trips_through_arbitrary_text(
        ip in v4(),
        port in any::<u16>(),
        before in filler(),
        after in filler(),
        spaces in any::<bool>(),
    ) {
        let addr = SocketAddrV4::new(ip, port);
        let numbers = if spaces {
            format_host_port(addr).replace(',', ", ")
        } else {
            format_host_port(addr)
        };
        let mut line = b"227 ".to_vec();
        line.extend_from_slice(&before);
        line.extend_from_slice(numbers.as_bytes());
        line.extend_from_slice(&after);
        let found = parse_227(&line).expect("numbers found");
        prop_assert_eq!(found.addr, addr);
        prop_assert_eq!(&line[found.span.clone()], numbers.as_bytes());
        // The gateway's own line names what it was built from.
        let canonical = reply::canonical_227(addr);
        prop_assert_eq!(parse_227(&canonical).map(|p| p.addr), Some(addr));
    }

    #[test]
    fn reply_229_round_trips_through_arbitrary_text(
        port in nonzero_port(),
        d in (33u8..=126).prop_filter("a valid delimiter", |d| is_delimiter(*d)),
        before in proptest::collection::vec(any::<u8>().prop_filter("no digits", |b| !b.is_ascii_digit()), 0..40),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let d = d as char;
        let group = format!("({d}{d}{d}{port}{d})");
        let mut line = b"229 ".to_vec();
        line.extend_from_slice(&before);
        line.extend_from_slice(group.as_bytes());
        line.extend_from_slice(&after);
        let found = parse_229(&line).expect("group found");
        prop_assert_eq!(found.port, port);
        let digits = port.to_string();
        prop_assert_eq!(&line[found.span.clone()], digits.as_bytes());
        let canonical = reply::canonical_229(port);
        prop_assert_eq!(parse_229(&canonical).map(|p| p.port), Some(port));
    }

    #[test]
    fn address_parsers_never_panic(line in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse_port_arg(&line);
        let _ = parse_eprt_arg(&line);
        let _ = parse_227(&line);
        let _ = parse_229(&line);
        let _ = reply::classify(&line, None);
        let _ = ftpgate::proto::framing::telnet_decode(&line);
        let _ = ftpgate::proto::command::parse_command(&line);
    }
}

// ---- framing -------------------------------------------------------------------

/// Input for the framer: lines of assorted lengths (some over the limit),
/// CRs, LFs and random bytes.
fn framer_input() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => Just(b"NOOP\r\n".to_vec()),
        2 => Just(b"\n".to_vec()),
        2 => Just(b"\r".to_vec()),
        2 => (0usize..80).prop_map(|n| vec![b'a'; n]),
        1 => proptest::collection::vec(any::<u8>(), 0..20),
    ];
    proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
}

/// Cuts `data` into pieces at `cuts` (taken modulo the remaining length).
fn cut(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut rest = data;
    let mut k = 0;
    while !rest.is_empty() {
        let n = cuts.get(k).map_or(rest.len(), |c| c % rest.len() + 1);
        pieces.push(rest[..n].to_vec());
        rest = &rest[n..];
        k += 1;
    }
    pieces
}

fn frames_draining_after_each_push(pieces: &[Vec<u8>], max: usize) -> Vec<Frame> {
    let mut f = LineFramer::new(max);
    let mut out = Vec::new();
    for p in pieces {
        f.push(p);
        while let Some(frame) = f.next_frame() {
            out.push(frame);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn framer_gives_the_same_frames_however_the_input_is_cut(
        data in framer_input(),
        cuts in proptest::collection::vec(0usize..40, 0..40),
        max in 16usize..48,
    ) {
        let whole = frames_draining_after_each_push(std::slice::from_ref(&data), max);
        let pieces = cut(&data, &cuts);
        prop_assert_eq!(&frames_draining_after_each_push(&pieces, max), &whole);
    }

    /// The session stops reading a side while a line from it is held, so
    /// several pushes can arrive before the next `next_frame`.
    #[test]
    fn framer_gives_the_same_frames_when_reads_are_deferred(
        data in framer_input(),
        cuts in proptest::collection::vec(0usize..40, 0..40),
        drain_after in proptest::collection::vec(0u8..3, 0..40),
        max in 16usize..48,
    ) {
        let whole = frames_draining_after_each_push(std::slice::from_ref(&data), max);
        let mut f = LineFramer::new(max);
        let mut got = Vec::new();
        for (i, p) in cut(&data, &cuts).iter().enumerate() {
            f.push(p);
            match drain_after.get(i).copied().unwrap_or(2) {
                // Not read at all: the side is held.
                0 => {}
                // One frame, then held.
                1 => got.extend(f.next_frame()),
                _ => {
                    while let Some(frame) = f.next_frame() {
                        got.push(frame);
                    }
                }
            }
        }
        while let Some(frame) = f.next_frame() {
            got.push(frame);
        }
        prop_assert_eq!(got, whole);
    }
}

// ---- session split invariance -----------------------------------------------------

const CLIENT_FRAGMENTS: &[&[u8]] = &[
    b"USER u\r\n",
    b"PASS secret\r\n",
    b"PORT 192,0,2,10,25,46\r\n",
    b"port 192,0,2,10,25,47\n",
    b"PORT 192,0,2,1,199,55\r\n",
    b"PORT 203,0,113,5,25,46\r\n",
    b"PORT 192,0,2,10,0,25\r\n",
    b"PORT 192,0,2,256,1,1\r\n",
    b"PORTAL 1,2,3,4,5,6\r\n",
    b"EPRT |1|192.0.2.10|6446|\r\n",
    b"EPRT |2|::ffff:192.0.2.10|6446|\r\n",
    b"EPRT |2|2001:db8::1|6446|\r\n",
    b"PASV\r\n",
    b"EPSV\r\n",
    b"EPSV ALL\r\n",
    b"LIST\r\n",
    b"RETR f\r\n",
    b"NOOP\r\n",
    b"FEAT\r\n",
    b"AUTH TLS\r\n",
    b"LPRT 4,4,1,2,3,4,2,1,1\r\n",
    b"REIN\r\n",
    b"QUIT\r\n",
    b"\xff\xf4\xff\xf2ABOR\r\n",
    // ABOR as a gateway without SO_OOBINLINE would read it, and plain.
    b"\xff\xf4\xf2ABOR\r\n",
    b"\xff\xf4\xffABOR\r\n",
    b"\xff\xf4\xff",
    b"ABOR\r\n",
    b" PORT 192,0,2,10,25,46\r\n",
    b"PORT\t192,0,2,10,25,46\r\n",
    b"NO\rOP\r\n",
    b"NO\0OP\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\xff",
    b"\xff\xff",
];

const SERVER_FRAGMENTS: &[&[u8]] = &[
    b"220 ready\r\n",
    b"220-Welcome\r\n220 ready\r\n",
    b"331 pw\r\n",
    b"230 ok\r\n",
    b"530 no\r\n",
    b"200 ok\r\n",
    b"150 go\r\n",
    b"226 done\r\n",
    b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n",
    b"227 Entering Passive Mode (198,51,100,20,0,21).\r\n",
    b"227 nothing\r\n",
    b"227-x\r\n 10,0,0,5\r\n227 (10,0,0,5,200,11)\r\n",
    b"229 Entering Extended Passive Mode (|||6446|)\r\n",
    b"229 (!!!70000!)\r\n",
    b"211-Features:\r\n 227 (10,0,0,5,200,10)\r\n211 End\r\n",
    // Lines a client could read as a passive reply, in every position.
    b"227-Entering Passive Mode (10,0,0,9,1,1)\r\n",
    b" 227 (10,0,0,9,1,2)\r\n",
    b"229-(|||6446|)\r\n",
    b"\t229 (|||6446|)\r\n",
    b"227 Host 10.0.0.9 (10,0,0,5,200,10)\r\n",
    b"229 Server 10.0.0.9 (|||6446|)\r\n",
    b"425-no\r\n227 (10,0,0,5,200,10)\r\n425 no\r\n",
    b"150-wait\r\n227 x\r\n150 wait\r\n",
    b"2270 files\r\n",
    b"227\r\n",
    b"227 (10,0,0,5,200,10)\0\r\n",
    b"214-Help\r\n",
    b"214 end\r\n",
    b"500 what\r\n",
    b"SSH-2.0-OpenSSH\r\n",
    b"hello\r\n",
    b"257 a\0b\r\n",
    b"\r",
    b"\n",
    b"\0",
    b"\xff",
];

fn fragment(set: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::sample::select(set).prop_map(<[u8]>::to_vec),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
        // Over-long lines: commands are limited to 2048 bytes, replies to 8192.
        1 => (2000usize..9000).prop_map(|n| {
            let mut v = b"STOR ".to_vec();
            v.resize(n, b'x');
            v.extend_from_slice(b"\r\n");
            v
        }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => proptest::collection::vec(fragment(CLIENT_FRAGMENTS), 1..4)
            .prop_map(|v| Step::Input(Side::Client, v.concat())),
        4 => proptest::collection::vec(fragment(SERVER_FRAGMENTS), 1..4)
            .prop_map(|v| Step::Input(Side::Server, v.concat())),
        1 => (0u64..100).prop_map(|s| Step::Advance(Duration::from_secs(s))),
    ]
}

fn login() -> Vec<Step> {
    vec![
        Step::Input(Side::Server, b"220 ready\r\n".to_vec()),
        Step::Input(Side::Client, b"USER u\r\nPASS p\r\n".to_vec()),
        Step::Input(Side::Server, b"331 pw\r\n230 ok\r\n".to_vec()),
    ]
}

fn script() -> impl Strategy<Value = Vec<Step>> {
    (any::<bool>(), proptest::collection::vec(step(), 0..24)).prop_map(|(logged_in, steps)| {
        if logged_in {
            login().into_iter().chain(steps).collect()
        } else {
            steps
        }
    })
}

fn assert_same(whole: &Transcript, split: &Transcript) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        String::from_utf8_lossy(&split.to_client),
        String::from_utf8_lossy(&whole.to_client)
    );
    prop_assert_eq!(
        String::from_utf8_lossy(&split.to_server),
        String::from_utf8_lossy(&whole.to_server)
    );
    prop_assert_eq!(&split.urgent_to_server, &whole.urgent_to_server);
    prop_assert_eq!(&split.events, &whole.events);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn session_output_does_not_depend_on_how_input_is_cut(
        steps in script(),
        splits in proptest::collection::vec(0usize..64, 0..200),
    ) {
        let whole = driver::play(&steps, &[]);
        let split = driver::play(&steps, &splits);
        assert_same(&whole, &split)?;
    }


    #[test]
    fn session_output_is_the_same_when_fed_one_byte_at_a_time(steps in script()) {
        let whole = driver::play(&steps, &[]);
        let bytes: usize = steps
            .iter()
            .map(|s| match s {
                Step::Input(_, d) => d.len(),
                _ => 0,
            })
            .sum();
        let split = driver::play(&steps, &vec![0; bytes]);
        assert_same(&whole, &split)?;
    }

    /// The client sees only addresses the gateway wrote.
    /// Whatever the server sends, every line that reaches the client and
    /// starts (after blanks) with 227 or 229 is a canonical line the gateway
    /// built, naming its own address; and the same holds however the input
    /// is cut.
    #[test]
    fn client_sees_no_passive_reply_line_the_gateway_did_not_write(
        steps in script(),
        splits in proptest::collection::vec(0usize..64, 0..200),
    ) {
        for t in [driver::play(&steps, &[]), driver::play(&steps, &splits)] {
            for line in t.to_client.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let start = line.iter().position(|&b| b != b' ' && b != b'\t');
                let trimmed = start.map_or(&[][..], |i| &line[i..]);
                if trimmed.starts_with(b"227") || trimmed.starts_with(b"229") {
                    prop_assert!(
                        is_canonical_passive_line(line),
                        "{:?}",
                        String::from_utf8_lossy(line)
                    );
                }
            }
        }
    }

    /// Whatever the peers send, the core never forwards a line to the
    /// server that it refused: every refused client line leaves no trace in
    /// the upstream bytes, so the upstream never sees a bare CR or a NUL.
    #[test]
    fn upstream_never_sees_a_bare_cr_or_a_nul(steps in script()) {
        let t = driver::play(&steps, &[]);
        for line in t.to_server.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            prop_assert!(!line.contains(&b'\r'), "{:?}", String::from_utf8_lossy(line));
            prop_assert!(!line.contains(&0), "{:?}", String::from_utf8_lossy(line));
        }
        prop_assert!(t.to_server.is_empty() || t.to_server.ends_with(b"\r\n"));
        prop_assert!(t.to_client.is_empty() || t.to_client.ends_with(b"\r\n"));
        let secrets = t.events.iter().filter(|e| format!("{e:?}").contains("secret")).count();
        prop_assert_eq!(secrets, 0, "PASS argument in an event");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// RFC 959 section 4.1.3: the only urgent data the gateway sends is the
    /// IAC of a Synch (`IAC IP IAC DM`) directly in front of an ABOR line,
    /// and every ABOR it sends has one.
    #[test]
    fn urgent_bytes_are_the_synch_in_front_of_each_abor(steps in script()) {
        let t = driver::play(&steps, &[]);
        let synch = ftpgate::proto::framing::IP_SYNCH;
        for &at in &t.urgent_to_server {
            let start = at - ftpgate::proto::framing::SYNCH_URGENT;
            prop_assert_eq!(&t.to_server[start..start + 4], &synch[..]);
            let line = &t.to_server[start + 4..];
            let end = line.iter().position(|&b| b == b'\n').unwrap();
            prop_assert!(line[..end].eq_ignore_ascii_case(b"ABOR\r"));
        }
        let aborts = t
            .to_server
            .split(|&b| b == b'\n')
            .map(|l| l.strip_prefix(&synch[..]).unwrap_or(l))
            .filter(|l| l.eq_ignore_ascii_case(b"ABOR\r"))
            .count();
        prop_assert_eq!(aborts, t.urgent_to_server.len());
    }
}

/// `227 Entering Passive Mode (192,0,2,1,p1,p2).` (the lab gateway's inside
/// address) or `229 Entering Extended Passive Mode (|||port|)`, exactly.
fn is_canonical_passive_line(line: &[u8]) -> bool {
    let line = String::from_utf8_lossy(line);
    let byte = |s: &str| s.parse::<u8>().is_ok_and(|n| n.to_string() == s);
    if let Some(rest) = line
        .strip_prefix("227 Entering Passive Mode (192,0,2,1,")
        .and_then(|r| r.strip_suffix(")."))
    {
        return rest
            .split_once(',')
            .is_some_and(|(a, b)| byte(a) && byte(b));
    }
    line.strip_prefix("229 Entering Extended Passive Mode (|||")
        .and_then(|r| r.strip_suffix("|)"))
        .and_then(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0 && n.to_string() == p)
        })
        .is_some()
}

/// A client that pipelines past the core's pending-command limit stops being
/// read; the server's replies then let its commands through one by one. How
/// the server's replies are cut must not change the outcome.
#[test]
fn pipelining_past_the_pending_limit_is_split_invariant() {
    let mut flood = Vec::new();
    let mut forwarded = 0;
    for i in 0..300 {
        if i % 50 == 7 {
            // Refused by the gateway itself, queued behind earlier replies.
            flood.extend_from_slice(b"LPSV\r\n");
        } else {
            flood.extend_from_slice(b"NOOP\r\n");
            forwarded += 1;
        }
    }
    flood.extend_from_slice(b"PASV\r\n");
    let mut replies = Vec::new();
    for i in 0..forwarded {
        replies.extend_from_slice(b"200 ok\r\n");
        if i % 40 == 3 {
            replies.extend_from_slice(b"junk\r\n");
        }
    }
    replies.extend_from_slice(b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n");
    let mut steps = login();
    steps.push(Step::Input(Side::Client, flood));
    steps.push(Step::Input(Side::Server, replies.clone()));
    let whole = driver::play(&steps, &[]);
    assert!(
        whole
            .events
            .iter()
            .any(|e| matches!(e, Event::OpenPinhole(_))),
        "the PASV got through and its 227 was rewritten"
    );
    let lines = replies.iter().filter(|&&b| b == b'\n').count();
    for splits in [
        vec![0; replies.len() + 64],
        vec![7; lines * 2],
        vec![63; 400],
    ] {
        let split = driver::play(&steps, &splits);
        assert_eq!(
            String::from_utf8_lossy(&split.to_client),
            String::from_utf8_lossy(&whole.to_client)
        );
        assert_eq!(split.to_server, whole.to_server);
        assert_eq!(split.events, whole.events);
    }
}

/// Past the pending limit, a server reply lets the next client command
/// through in the middle of a server read; when that command must wait for
/// the daemon (a Resolve, a pinhole), the rest of the read waits too, so
/// the result is the same as with every reply read on its own.
#[test]
fn held_command_released_by_a_server_reply_is_split_invariant() {
    let mut flood = Vec::new();
    for _ in 0..256 {
        flood.extend_from_slice(b"NOOP\r\n");
    }
    flood.extend_from_slice(b"PORT 203,0,113,5,25,46\r\nPORT 192,0,2,10,25,46\r\nPASV\r\nNOOP\r\n");
    let mut replies = Vec::new();
    // 256 NOOPs and the client's own PORT (the bounce is answered locally).
    for _ in 0..256 + 1 {
        replies.extend_from_slice(b"200 ok\r\njunk\r\n");
    }
    replies.extend_from_slice(b"227 Entering Passive Mode (10,0,0,5,200,10).\r\n200 ok\r\n");
    let mut steps = login();
    steps.push(Step::Input(Side::Client, flood));
    steps.push(Step::Input(Side::Server, replies.clone()));
    let whole = driver::play(&steps, &[]);
    let opened = whole
        .events
        .iter()
        .filter(|e| matches!(e, Event::OpenPinhole(_)))
        .count();
    assert_eq!(opened, 2, "the PORT and the PASV got through");
    for server_cut in [1, 7, 14, 100] {
        // The login and the flood whole, then the replies in pieces.
        let mut splits: Vec<usize> = steps[..4]
            .iter()
            .map(|s| match s {
                Step::Input(_, d) => d.len() - 1,
                _ => unreachable!("only inputs"),
            })
            .collect();
        splits.extend(std::iter::repeat_n(server_cut - 1, replies.len()));
        let split = driver::play(&steps, &splits);
        assert_eq!(
            String::from_utf8_lossy(&split.to_client),
            String::from_utf8_lossy(&whole.to_client)
        );
        assert_eq!(split.to_server, whole.to_server);
        assert_eq!(split.events, whole.events, "cut every {server_cut} bytes");
    }
}
