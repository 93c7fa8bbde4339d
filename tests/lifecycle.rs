//! The `ftpgate` binary's lifecycle: SIGHUP reloads policy for new sessions
//! and reopens the deny log (logrotate), a bad config on reload is refused
//! and the old one kept, SIGTERM drains within the grace period.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{FtpClient, FtpServer, skip};

struct Daemon {
    child: Child,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Daemon {
    fn start(config: &std::path::Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut d = Daemon {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
            stderr: rx,
        };
        let addr_of = |line: &str| -> SocketAddr {
            let a = line
                .split("addr=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            a.parse().unwrap()
        };
        // The admin listener is bound (and logged) before the FTP listeners.
        let mut line = d.wait_stderr("listening");
        if line.contains("admin listening") {
            d.admin = Some(addr_of(&line));
            line = d.wait_stderr("listening");
        }
        d.addr = addr_of(&line);
        d
    }

    fn wait_stderr(&mut self, needle: &str) -> String {
        let until = Instant::now() + Duration::from_secs(10);
        while let Ok(line) = self
            .stderr
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("ftpgate never said {needle:?}");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(
    path: &std::path::Path,
    upstream: SocketAddr,
    deny: &std::path::Path,
    deny_ports: &str,
) {
    let text = format!(
        r#"
[[listener]]
mode = "reverse"
bind = ["127.0.0.1:0"]
upstream = "{upstream}"
[data]
ports = "52700-52799"
[policy]
deny_ports = [{deny_ports}]
[limits]
shutdown_grace = "3s"
[deny_log]
path = "{}"
[admin]
bind = "127.0.0.1:0"
"#,
        deny.display()
    );
    std::fs::write(path, text).unwrap();
}

fn reasons(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

async fn wait_for(path: &std::path::Path, reason: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if reasons(path).iter().any(|r| r == reason) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policy_and_reopens_the_log_and_sigterm_drains() {
    let test = "sighup_reloads_policy_and_reopens_the_log_and_sigterm_drains";
    let Some(server) = FtpServer::start(None) else {
        return skip(test, "Debian's python3-pyftpdlib is not installed");
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ftpgate.toml");
    let deny = dir.path().join("deny.jsonl");
    write_config(&config, server.addr, &deny, "");
    let mut daemon = Daemon::start(&config);

    // Port 40000 is allowed by this policy.
    let mut c = FtpClient::login(daemon.addr).await;
    let port = format!("PORT 127,0,0,1,{},{}", 40000 / 256, 40000 % 256);
    assert!(
        c.cmd(&port).await.starts_with("200"),
        "PORT to an allowed port"
    );
    assert!(c.cmd("QUIT").await.starts_with("221"));

    // logrotate moves the file away, then ftpgate gets SIGHUP with a new
    // policy that denies port 40000.
    c = FtpClient::login(daemon.addr).await;
    assert!(c.cmd("AUTH TLS").await.starts_with("534"));
    assert!(wait_for(&deny, "auth_refused").await);
    let rotated = dir.path().join("deny.jsonl.1");
    std::fs::rename(&deny, &rotated).unwrap();
    write_config(&config, server.addr, &deny, "40000");
    daemon.signal("-HUP");
    daemon.wait_stderr("configuration reloaded");
    // The session that was already running keeps its policy...
    assert!(
        c.cmd(&port).await.starts_with("200"),
        "old session, old policy"
    );
    // ...new sessions get the new one, and the line lands in the new file.
    let mut n = FtpClient::login(daemon.addr).await;
    assert!(
        n.cmd(&port).await.starts_with("504"),
        "new session, new policy"
    );
    assert!(
        wait_for(&deny, "denied_port").await,
        "no denied_port in the reopened log"
    );
    assert_eq!(reasons(&rotated), vec!["auth_refused"]);

    // A broken config is refused on reload; the running one stays.
    std::fs::write(&config, "this is = not [valid").unwrap();
    daemon.signal("-HUP");
    daemon.wait_stderr("reload failed, keeping the old configuration");
    assert!(n.cmd("NOOP").await.starts_with("200"));
    let (_, body) = common::http_get(daemon.admin.unwrap(), "/metrics").await;
    let m = common::parse_metrics(&body);
    let reloads =
        |result| common::metric(&m, "ftpgate_config_reloads_total", &[("result", result)]);
    assert_eq!(
        (reloads("success"), reloads("failure")),
        (1.0, 1.0),
        "{body}"
    );

    // SIGTERM: no new sessions, running ones finish within the grace.
    daemon.signal("-TERM");
    daemon.wait_stderr("shutting down");
    assert!(
        n.cmd("NOOP").await.starts_with("200"),
        "a running session goes on while draining"
    );
    assert!(
        tokio::net::TcpStream::connect(daemon.addr).await.is_err(),
        "new connections are refused while draining"
    );
    assert!(n.cmd("QUIT").await.starts_with("221"));
    // `c` stays open: the grace period (3s) ends it with 421.
    let last = c.reply().await;
    assert!(last.starts_with("421"), "{last}");
    let status = tokio::task::spawn_blocking(move || daemon.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_config_starts_and_stops_cleanly() {
    let test = "the_shipped_config_starts_and_stops_cleanly";
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ftpgate.toml");
    // It binds fixed ports (2121, 9121): skip, saying so, if they are taken.
    for port in [2121, 9121] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            return skip(test, &format!("port {port} is in use on this machine"));
        }
    }
    let mut daemon = Daemon::start(&config);
    let (status, _) = common::http_get("127.0.0.1:9121".parse().unwrap(), "/healthz").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    daemon.signal("-TERM");
    let status = tokio::task::spawn_blocking(move || daemon.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}
