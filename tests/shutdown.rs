//! Shutdown is a drain, not a sleep: it ends when the work has ended, and
//! what was queued is written before it returns.

mod common;

use std::time::{Duration, Instant};

use common::{FtpClient, FtpServer, Gateway, skip};
use tokio::net::TcpStream;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_every_deny_line_and_summary_and_ends_every_task() {
    let test = "shutdown_writes_every_deny_line_and_summary_and_ends_every_task";
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    // One line per source and reason; the rest are summarised at the end of
    // an interval that is an hour away.
    let gw = Gateway::reverse_with(
        server.addr,
        "53500-53599",
        "",
        "",
        "burst = 1\ninterval = \"1h\"",
    )
    .await;
    let admin = gw.running.admin.unwrap();
    let mut c = FtpClient::login(gw.addr).await;
    for _ in 0..20 {
        assert!(c.cmd("AUTH TLS").await.starts_with("534"));
    }
    let Gateway {
        running,
        deny_log,
        dir: _dir,
        ..
    } = gw;
    tokio::time::timeout(
        Duration::from_secs(15),
        running.shutdown(Duration::from_millis(200)),
    )
    .await
    .expect("shutdown ends");
    // The session still open after the grace period was closed with 421.
    let last = c.reply().await;
    assert!(last.starts_with("421"), "{last}");
    // Everything is in the log by the time shutdown returns.
    let log = lines(&deny_log);
    let written = log
        .iter()
        .filter(|v| v["reason"] == "auth_refused" && v.get("suppressed").is_none())
        .count();
    let summary = log.iter().find(|v| v.get("suppressed").is_some());
    assert_eq!(written, 1, "{log:?}");
    assert_eq!(
        summary.map(|v| v["suppressed"].clone()),
        Some(19.into()),
        "{log:?}"
    );
    // The admin listener ended with the gateway.
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener outlived shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_when_the_last_session_ends_not_at_the_grace_period() {
    let test = "shutdown_ends_when_the_last_session_ends_not_at_the_grace_period";
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    let gw = Gateway::reverse(server.addr, "53600-53699", "").await;
    let mut c = FtpClient::login(gw.addr).await;
    let addr = gw.addr;
    let began = Instant::now();
    let drain = tokio::spawn(gw.running.shutdown(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: the running session goes on, new ones are refused.
    assert!(c.cmd("NOOP").await.starts_with("200"));
    assert!(TcpStream::connect(addr).await.is_err());
    assert!(c.cmd("QUIT").await.starts_with("221"));
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("shutdown ended soon after the last session")
        .unwrap();
    assert!(began.elapsed() < Duration::from_secs(6));
}
