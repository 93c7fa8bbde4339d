//! Shared pieces of the integration tests: a real FTP server, a gateway
//! started in-process on port 0, a small FTP client for scripted sessions,
//! and deny-log reading.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ftpgate::config::Config;
use ftpgate::daemon::{self, Running};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Why a test cannot run here, printed so a skip is never silent.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why} (scripts/test installs what is missing)");
}

pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A pyftpdlib server on 127.0.0.1, killed on drop.
pub struct FtpServer {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    child: Child,
}

impl FtpServer {
    /// `None` when Debian's python3-pyftpdlib is not installed.
    pub fn start(masquerade: Option<&str>) -> Option<FtpServer> {
        match masquerade {
            Some(m) => FtpServer::start_args(&["--masquerade", m]),
            None => FtpServer::start_args(&[]),
        }
    }

    /// Like [`FtpServer::start`], with more options of
    /// `tests/support/ftpd.py` (`--throttle`, `--log`).
    pub fn start_args(args: &[&str]) -> Option<FtpServer> {
        let ok = Command::new(DEBIAN_PYTHON)
            .args(["-c", "import pyftpdlib"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let root = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ftpd.py");
        let mut cmd = Command::new(DEBIAN_PYTHON);
        cmd.arg(script).arg("--dir").arg(root.path()).args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // One line: the server keeps its standard output open.
        let mut out = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut out)
            .unwrap();
        let port: u16 = out
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("ftpd did not start: {out:?}"));
        Some(FtpServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            root,
            child,
        })
    }

    /// Writes `len` pseudo-random bytes to `name` in the server root.
    pub fn put_file(&self, name: &str, len: usize) -> Vec<u8> {
        let data = pseudo_random(len);
        std::fs::write(self.root.path().join(name), &data).unwrap();
        data
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A gateway started in-process.
pub struct Gateway {
    pub running: Running,
    pub addr: SocketAddr,
    pub deny_log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    /// Reverse mode in front of `upstream`; `extra` is appended to the
    /// generated TOML (e.g. a [policy] table). Data ports come from `ports`
    /// so tests running in parallel do not compete for one range.
    pub async fn reverse(upstream: SocketAddr, ports: &str, extra: &str) -> Gateway {
        Gateway::reverse_with(upstream, ports, extra, "", "").await
    }

    /// Like [`Gateway::reverse`]; `data_keys` and `deny_log_keys` add keys
    /// to the [data] and [deny_log] tables the generated TOML already has
    /// (`accept_timeout` replaces the tests' default of 2s).
    pub async fn reverse_with(
        upstream: SocketAddr,
        ports: &str,
        extra: &str,
        data_keys: &str,
        deny_log_keys: &str,
    ) -> Gateway {
        Gateway::reverse_full(upstream, ports, "", extra, data_keys, deny_log_keys).await
    }

    /// Like [`Gateway::reverse_with`]; `listener_keys` add keys to the
    /// reverse listener (e.g. `tls_cert`).
    pub async fn reverse_full(
        upstream: SocketAddr,
        ports: &str,
        listener_keys: &str,
        extra: &str,
        data_keys: &str,
        deny_log_keys: &str,
    ) -> Gateway {
        let keys = [listener_keys, extra, data_keys, deny_log_keys];
        Gateway::reverse_on("127.0.0.1:0", upstream, ports, keys).await
    }

    /// [`Gateway::reverse_full`] with its listener on `bind`; `keys` are
    /// the listener's, the extra tables, `[data]`'s and `[deny_log]`'s.
    pub async fn reverse_on(
        bind: &str,
        upstream: SocketAddr,
        ports: &str,
        [listener_keys, extra, data_keys, deny_log_keys]: [&str; 4],
    ) -> Gateway {
        let accept = if data_keys.contains("accept_timeout") {
            ""
        } else {
            "accept_timeout = \"2s\""
        };
        let dir = tempfile::tempdir().unwrap();
        let deny_log = dir.path().join("deny.jsonl");
        let text = format!(
            r#"
[[listener]]
mode = "reverse"
bind = ["{bind}"]
upstream = "{upstream}"
{listener_keys}

[data]
ports = "{ports}"
{accept}
{data_keys}

[deny_log]
path = "{}"
{deny_log_keys}

[admin]
bind = "127.0.0.1:0"
{extra}
"#,
            deny_log.display()
        );
        let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let running = daemon::start(cfg).await.unwrap();
        let addr = running.listeners[0].1;
        Gateway {
            running,
            addr,
            deny_log,
            dir,
        }
    }

    /// Deny-log lines, parsed.
    pub fn denials(&self) -> Vec<serde_json::Value> {
        denials(&self.deny_log)
    }

    /// Waits (bounded) until a deny-log line with `reason` appears.
    pub async fn wait_denial(&self, reason: &str) -> serde_json::Value {
        wait_denial(&self.deny_log, reason).await
    }
}

/// The lines of the deny log at `path`, parsed. Every line must parse: a
/// line cut short (a full disk, a torn write) would be a bug of its own.
pub fn denials(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// Waits (bounded) until the deny log at `path` has a line with `reason`.
pub async fn wait_denial(path: &Path, reason: &str) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = denials(path).into_iter().find(|v| v["reason"] == reason) {
            return v;
        }
        assert!(
            Instant::now() < until,
            "no {reason} denial; log: {:?}",
            denials(path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A scripted FTP client for sessions curl cannot express.
pub struct FtpClient {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    /// This end of the control connection.
    pub local: SocketAddr,
}

impl FtpClient {
    pub async fn connect(addr: SocketAddr) -> FtpClient {
        let s = TcpStream::connect(addr).await.unwrap();
        FtpClient::greeted(s).await
    }

    /// Connects from the local address `from` (another loopback address
    /// is another client).
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> FtpClient {
        FtpClient::greeted(connect_from(addr, from).await).await
    }

    pub async fn login_from(addr: SocketAddr, from: std::net::IpAddr) -> FtpClient {
        let mut c = FtpClient::connect_from(addr, from).await;
        assert!(c.cmd("USER ftptest").await.starts_with("331"));
        assert!(c.cmd("PASS ftptest").await.starts_with("230"));
        c
    }

    async fn greeted(s: TcpStream) -> FtpClient {
        let local = s.local_addr().unwrap();
        let (r, w) = s.into_split();
        let mut c = FtpClient {
            rd: BufReader::new(r),
            wr: w,
            local,
        };
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220"), "{greeting}");
        c
    }

    pub async fn login(addr: SocketAddr) -> FtpClient {
        let mut c = FtpClient::connect(addr).await;
        assert!(c.cmd("USER ftptest").await.starts_with("331"));
        assert!(c.cmd("PASS ftptest").await.starts_with("230"));
        c
    }

    /// Reads one whole reply (multi-line aware, RFC 959 section 4.2).
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        let mut first_code: Option<String> = None;
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut line))
                .await
                .expect("reply timed out")
                .unwrap();
            assert!(n > 0, "connection closed; so far: {all:?}");
            all.push_str(&line);
            let code = line.get(..3).map(str::to_string);
            match &first_code {
                None if line.as_bytes().get(3) == Some(&b'-') => first_code = code,
                None => return all,
                Some(c) if code.as_ref() == Some(c) && line.as_bytes().get(3) == Some(&b' ') => {
                    return all;
                }
                Some(_) => {}
            }
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\r\n").await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.reply().await
    }
}

/// A TCP connection to `addr` from the local address `from`.
pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> TcpStream {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4().unwrap(),
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6().unwrap(),
    };
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// The admin listener's metrics, parsed.
pub async fn scrape(admin: SocketAddr) -> Vec<Sample> {
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    parse_metrics(&body)
}

/// Parses the address of a 227 reply.
pub fn parse_227(reply: &str) -> SocketAddr {
    let start = reply.find('(').unwrap() + 1;
    let end = reply[start..].find(')').unwrap() + start;
    let n: Vec<u16> = reply[start..end]
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    SocketAddr::from((
        [n[0] as u8, n[1] as u8, n[2] as u8, n[3] as u8],
        n[4] * 256 + n[5],
    ))
}

/// Runs curl with `args`; returns (success, stderr).
pub async fn curl(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Parses the port of a 229 reply.
pub fn parse_229(reply: &str) -> u16 {
    let start = reply.find("(|||").unwrap() + 4;
    let end = reply[start..].find('|').unwrap() + start;
    reply[start..end].parse().unwrap()
}

/// GET `path` from the admin listener; returns (status line, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).await.unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().unwrap(),
        });
    }
    out
}

/// The value of `name` whose labels include `labels`, summed over the rest.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Whether the tests run as root (network namespaces, nftables).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A throwaway network namespace with loopback up, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `name` (a leftover of that name is replaced) and adds
    /// `addrs` (e.g. "2001:db8::2/64") to its loopback. Needs root.
    pub fn create(name: &str, addrs: &[&str]) -> NetNs {
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        let ns = NetNs {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        for a in addrs {
            ip(&["-n", name, "addr", "add", a, "dev", "lo", "nodad"]);
        }
        ns
    }

    /// Runs `f` on a thread that has entered the namespace (threads and
    /// sockets it creates live there too), with a tokio runtime of its own.
    pub fn run<T, F>(&self, f: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns only changes this thread's network namespace to
            // the one the open file names.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
