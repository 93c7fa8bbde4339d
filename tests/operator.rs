//! The operator surface end to end: real sessions through the gateway (one
//! allowed transfer, several refusals), then the exact deny-log lines and the
//! exact metric values they produce, read from the admin listener.
//!
//! One test per binary: the metrics recorder is process-wide.

mod common;

use std::time::Duration;

use common::{
    FtpClient, FtpServer, Gateway, http_get, metric, parse_227, parse_229, parse_metrics, skip,
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A metric name, a subset of its labels, and the value expected.
type Expected = (&'static str, Vec<(&'static str, &'static str)>, f64);

fn without_ts(mut v: Value) -> Value {
    let ts = v
        .as_object_mut()
        .unwrap()
        .remove("ts")
        .expect("every line has ts");
    let ts = ts.as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(ts).is_ok(),
        "ts is not RFC 3339 UTC: {ts}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_produce_exact_deny_lines_and_metric_values() {
    let test = "sessions_produce_exact_deny_lines_and_metric_values";
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    let data = server.put_file("data.bin", 300_000);
    let gw = Gateway::reverse(server.addr, "52600-52699", "").await;
    let admin = gw.running.admin.unwrap();
    let upstream = server.addr.to_string();

    // An allowed download over EPSV.
    let mut a = FtpClient::login(gw.addr).await;
    assert!(a.cmd("TYPE I").await.starts_with("200"));
    let port = parse_229(&a.cmd("EPSV").await);
    let mut d = TcpStream::connect((gw.addr.ip(), port)).await.unwrap();
    assert!(a.cmd("RETR data.bin").await.starts_with('1'));
    let mut got = Vec::new();
    d.read_to_end(&mut got).await.unwrap();
    drop(d);
    assert!(a.reply().await.starts_with("226"));
    assert!(got == data);
    assert!(a.cmd("QUIT").await.starts_with("221"));

    // Refusals: a bounce to a third host (not 127.0.0.0/8: that is the
    // gateway's own, refused with rule gateway_address), AUTH TLS, a PASV
    // nobody connects to.
    let mut b = FtpClient::login(gw.addr).await;
    assert!(b.cmd("PORT 192,0,2,99,195,80").await.starts_with("504"));
    assert!(b.cmd("AUTH TLS").await.starts_with("534"));
    let pasv = parse_227(&b.cmd("PASV").await);
    gw.wait_denial("pinhole_expired").await;
    assert!(b.cmd("QUIT").await.starts_with("221"));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // ---- the deny log, line for line ---------------------------------------
    let client_b = b.local.to_string();
    let lines: Vec<Value> = gw.denials().into_iter().map(without_ts).collect();
    let expected = vec![
        json!({
            "reason": "bounce", "session": 2, "mode": "reverse",
            "client": client_b, "server": upstream, "side": "client",
            "verb": "PORT", "argument": "192,0,2,99,195,80", "target": "192.0.2.99:50000",
            "rule": "data_peer_is_control_peer",
            "reply": "504 Data connection target refused by policy."
        }),
        json!({
            "reason": "auth_refused", "session": 2, "mode": "reverse",
            "client": client_b, "server": upstream, "side": "client",
            "verb": "AUTH", "argument": "TLS", "rule": "auth_tls",
            "reply": "534 Request denied for policy reasons: the control channel must stay inspectable."
        }),
        json!({
            "reason": "pinhole_expired", "session": 2, "mode": "reverse",
            "client": client_b, "server": upstream, "side": "client",
            "target": pasv.to_string(), "expected_peer": "127.0.0.1"
        }),
    ];
    assert_eq!(lines, expected, "deny log differs");

    // ---- the metrics ---------------------------------------------------------
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let m = parse_metrics(&body);
    let reverse = ("mode", "reverse");
    let checks: Vec<Expected> = vec![
        (
            "ftpgate_denials_total",
            vec![reverse, ("reason", "bounce")],
            1.0,
        ),
        (
            "ftpgate_denials_total",
            vec![reverse, ("reason", "auth_refused")],
            1.0,
        ),
        (
            "ftpgate_denials_total",
            vec![reverse, ("reason", "pinhole_expired")],
            1.0,
        ),
        ("ftpgate_denials_total", vec![], 3.0),
        ("ftpgate_rewrites_total", vec![("kind", "epsv")], 1.0),
        ("ftpgate_rewrites_total", vec![("kind", "pasv")], 1.0),
        (
            "ftpgate_pinholes_opened_total",
            vec![("mode", "passive")],
            2.0,
        ),
        ("ftpgate_pinholes_expired_total", vec![], 1.0),
        ("ftpgate_pinholes_open", vec![], 0.0),
        ("ftpgate_data_connections_active", vec![], 0.0),
        ("ftpgate_port_pool_free", vec![], 100.0),
        (
            "ftpgate_data_connections_total",
            vec![("mode", "passive")],
            1.0,
        ),
        (
            "ftpgate_data_bytes_total",
            vec![("direction", "download"), ("mode", "passive")],
            data.len() as f64,
        ),
        (
            "ftpgate_data_bytes_total",
            vec![("direction", "upload")],
            0.0,
        ),
        (
            "ftpgate_sessions_total",
            vec![reverse, ("outcome", "server_closed")],
            2.0,
        ),
        ("ftpgate_sessions_active", vec![reverse], 0.0),
        ("ftpgate_pinhole_wait_seconds_count", vec![], 1.0),
        ("ftpgate_upstream_connect_seconds_count", vec![], 2.0),
        (
            "ftpgate_data_transfer_seconds_count",
            vec![("mode", "passive")],
            1.0,
        ),
        ("ftpgate_deny_log_dropped_total", vec![], 0.0),
        // USER+PASS twice; EPSV, PORT, PASV; RETR; AUTH; TYPE; QUIT twice.
        ("ftpgate_commands_total", vec![("class", "login")], 4.0),
        ("ftpgate_commands_total", vec![("class", "data_setup")], 3.0),
        ("ftpgate_commands_total", vec![("class", "transfer")], 1.0),
        ("ftpgate_commands_total", vec![("class", "security")], 1.0),
        ("ftpgate_commands_total", vec![("class", "other")], 1.0),
        ("ftpgate_commands_total", vec![("class", "quit")], 2.0),
    ];
    let mut wrong = Vec::new();
    for (name, labels, want) in &checks {
        let got = metric(&m, name, labels);
        if got != *want {
            wrong.push(format!("{name}{labels:?}: {got}, expected {want}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "metrics differ:\n{}\n\n{body}",
        wrong.join("\n")
    );
    // Real histogram buckets, not summaries.
    assert!(
        body.contains("ftpgate_pinhole_wait_seconds_bucket{le=\"0.005\"}"),
        "{body}"
    );
    // No label ever carries an address or a port.
    for s in &m {
        for v in s.labels.values() {
            assert!(
                !v.contains("127.0.0") && !v.contains(':'),
                "address in a label: {s:?}"
            );
        }
    }

    // ---- the other admin endpoints ---------------------------------------
    assert_eq!(http_get(admin, "/healthz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(admin, "/readyz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(admin, "/nope").await.0, "HTTP/1.1 404 Not Found");
    let huge = "x".repeat(20_000);
    assert_eq!(
        http_get(admin, &format!("/{huge}")).await.0,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
}
