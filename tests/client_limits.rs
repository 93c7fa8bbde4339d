//! Per-client limits: pinholes and data connections per client, and
//! IPv6 clients counted per prefix.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{FtpClient, FtpServer, Gateway, NetNs, connect_from, is_root, skip};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn server_or_skip(test: &str) -> Option<FtpServer> {
    let s = FtpServer::start(None);
    if s.is_none() {
        skip(test, "Debian's python3-pyftpdlib is not installed");
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_gets_425_beyond_its_default_pinhole_cap_and_others_are_unaffected() {
    let test = "one_client_gets_425_beyond_its_default_pinhole_cap_and_others_are_unaffected";
    let Some(server) = server_or_skip(test) else {
        return;
    };
    // Defaults: 32 pinholes (and data connections) per client.
    let gw = Gateway::reverse_with(
        server.addr,
        "53200-53299",
        "",
        "accept_timeout = \"60s\"",
        "",
    )
    .await;
    let mut sessions = Vec::new();
    for i in 0..32 {
        let mut c = FtpClient::login(gw.addr).await;
        let r = c.cmd("PASV").await;
        assert!(r.starts_with("227"), "session {i}: {r}");
        sessions.push(c);
    }
    let mut c = FtpClient::login(gw.addr).await;
    let r = c.cmd("PASV").await;
    assert!(r.starts_with("425"), "the 33rd pinhole of one client: {r}");
    let denial = gw.wait_denial("pinhole_unavailable").await;
    assert_eq!(denial["reply"], r.trim_end());
    // The session goes on, and another client is not affected.
    assert!(c.cmd("NOOP").await.starts_with("200"));
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut o = FtpClient::login_from(gw.addr, other).await;
    let r = o.cmd("PASV").await;
    assert!(r.starts_with("227"), "another client: {r}");
}

/// Reads the first reply line on a fresh control connection.
async fn first_line(to: SocketAddr, from: IpAddr) -> String {
    let s = connect_from(to, from).await;
    let mut line = String::new();
    let mut rd = BufReader::new(s);
    tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line))
        .await
        .expect("a reply")
        .unwrap();
    // Keep the session open: the caller's next connection must see it.
    std::mem::forget(rd);
    line
}

#[test]
fn ipv6_clients_of_one_prefix_share_their_session_limit() {
    let test = "ipv6_clients_of_one_prefix_share_their_session_limit";
    if !is_root() {
        return skip(
            test,
            "needs root (a network namespace with 2001:db8::/64 addresses)",
        );
    }
    let ns = NetNs::create(
        &format!("fgh8-v6-{}", std::process::id()),
        &[
            "2001:db8::1/64",
            "2001:db8::2/64",
            "2001:db8::3/64",
            "2001:db8:0:1::4/64",
        ],
    );
    ns.run(|| async {
        // An upstream that greets and holds every connection.
        let upstream = tokio::net::TcpListener::bind("[2001:db8::1]:0")
            .await
            .unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = upstream.accept().await {
                let _ = s.write_all(b"220 ready\r\n").await;
                held.push(s);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let deny = dir.path().join("deny.jsonl");
        let text = format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"[2001:db8::1]:0\"]\nupstream = \"{up}\"\n\
             [data]\nports = \"53300-53399\"\n\
             [limits]\nmax_sessions_per_client = 1\n\
             [deny_log]\npath = \"{}\"\n",
            deny.display()
        );
        let cfg = ftpgate::config::Config::parse(&text).unwrap();
        let running = ftpgate::daemon::start(cfg).await.unwrap();
        let gw = running.listeners[0].1;
        let addr = |a: &str| a.parse::<IpAddr>().unwrap();
        let first = first_line(gw, addr("2001:db8::2")).await;
        assert!(first.starts_with("220"), "{first}");
        // Another address of the same /64 is the same client.
        let second = first_line(gw, addr("2001:db8::3")).await;
        assert!(second.starts_with("421 "), "same /64: {second}");
        // Another /64 is another client.
        let third = first_line(gw, addr("2001:db8:0:1::4")).await;
        assert!(third.starts_with("220"), "another /64: {third}");
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = std::fs::read_to_string(&deny).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("client_session_limit")) {
                assert!(line.contains("\"client\":\"[2001:db8::3]:"), "{line}");
                break;
            }
            assert!(std::time::Instant::now() < until, "no deny line: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_wide_data_connection_cap_holds_across_clients_until_released() {
    let test = "the_gateway_wide_data_connection_cap_holds_across_clients_until_released";
    let Some(server) = server_or_skip(test) else {
        return;
    };
    let gw = Gateway::reverse_with(
        server.addr,
        "53400-53499",
        "",
        "accept_timeout = \"60s\"\nmax_connections = 1",
        "",
    )
    .await;
    // 127.0.0.1's waiting pinhole reserves the one data connection.
    let mut a = FtpClient::login(gw.addr).await;
    assert!(a.cmd("PASV").await.starts_with("227"));
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut b = FtpClient::login_from(gw.addr, other).await;
    let r = b.cmd("PASV").await;
    assert!(r.starts_with("425"), "{r}");
    let denial = gw.wait_denial("pinhole_unavailable").await;
    assert!(
        denial["client"].as_str().unwrap().starts_with("127.0.0.2:"),
        "{denial}"
    );
    // The first session ends: its reservation is released with it.
    assert!(a.cmd("QUIT").await.starts_with("221"));
    drop(a);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = b.cmd("PASV").await;
        if r.starts_with("227") {
            break;
        }
        assert!(std::time::Instant::now() < until, "still refused: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
