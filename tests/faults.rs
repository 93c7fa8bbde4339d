//! Faults on the data and control paths, one test each: the server resets
//! mid-transfer, the client vanishes mid-transfer, the upstream is
//! unreachable, the pinhole pool is exhausted, the deny log's disk is full,
//! the open-file limit is reached.
//!
//! Every test runs the real binary (`CARGO_BIN_EXE_ftpgate`, reverse mode on
//! loopback, proxy data plane) so its descriptors can be counted in
//! `/proc/<pid>/fd`. Each records the gateway's idle baseline (open fds,
//! `ftpgate_sessions_active`, `ftpgate_pinholes_open`,
//! `ftpgate_data_connections_active`), injects the fault, checks what the
//! operator sees (the client's reply, a deny-log line, a line on standard
//! error, a metric), waits (bounded) for the baseline to come back, and
//! checks that a transfer started afterwards arrives intact.
//!
//! These run on the proxy plane. The kernel data plane needs root and the
//! namespace lab (`tests/lab/lab.sh`, prefix `fgf-` plus `FG_LAB_TAG`,
//! driven by `faults/lab.rs`): `kernel_plane_faults_in_the_lab_...` runs
//! all six faults there, with the same recovery checks, and also checks
//! that no pinhole element is left in the kernel. The disk-full tests
//! mount a tmpfs. Without root they print `SKIPPED`.

mod common;
#[path = "faults/lab.rs"]
mod lab;
#[path = "lab/prereq.rs"]
mod prereq;
#[path = "lab/rules.rs"]
mod rules;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lab::{KernelLab, LAB_OUT3, LAB_SRV1, LabGateway, out_text};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How long anything may take to return to the idle baseline.
const SETTLE: Duration = Duration::from_secs(15);

/// The gateway binary, run as a child so its descriptors are its own.
struct GatewayProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr: PathBuf,
    deny_log: PathBuf,
    _dir: tempfile::TempDir,
}

struct Options<'a> {
    upstream: SocketAddr,
    ports: &'a str,
    data_keys: &'a str,
    /// Where the deny log goes (default: the gateway's temporary dir).
    deny_log: Option<PathBuf>,
    /// RLIMIT_NOFILE, soft and hard (the daemon raises soft to hard).
    nofile: Option<u32>,
}

impl<'a> Options<'a> {
    fn new(upstream: SocketAddr, ports: &'a str) -> Self {
        Options {
            upstream,
            ports,
            data_keys: "",
            deny_log: None,
            nofile: None,
        }
    }
}

impl GatewayProcess {
    fn start(o: Options<'_>) -> GatewayProcess {
        let dir = tempfile::tempdir().unwrap();
        let deny_log = o
            .deny_log
            .clone()
            .unwrap_or_else(|| dir.path().join("deny.jsonl"));
        let accept = if o.data_keys.contains("accept_timeout") {
            ""
        } else {
            "accept_timeout = \"5s\""
        };
        let text = format!(
            r#"
[[listener]]
mode = "reverse"
bind = ["127.0.0.1:0"]
upstream = "{}"

[data]
ports = "{}"
{accept}
{}

[deny_log]
path = "{}"
burst = 1000

[admin]
bind = "127.0.0.1:0"
"#,
            o.upstream,
            o.ports,
            o.data_keys,
            deny_log.display()
        );
        let config = dir.path().join("ftpgate.toml");
        std::fs::write(&config, text).unwrap();
        let stderr = dir.path().join("ftpgate.stderr");
        let mut cmd = match o.nofile {
            Some(n) => {
                // prlimit sets its own limit and execs: the pid stays.
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_ftpgate"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_ftpgate")),
        };
        let child = cmd
            .args(["--log-level", "debug", "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut gw = GatewayProcess {
            child,
            pid,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr,
            deny_log,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let log = gw.log();
            let addr_after = |marker: &str| -> Option<SocketAddr> {
                let line = log.lines().find(|l| l.contains(marker))?;
                let rest = &line[line.find("addr=")? + 5..];
                rest.split_whitespace().next()?.parse().ok()
            };
            if let (Some(a), Some(m)) = (
                addr_after(": listening addr="),
                addr_after("admin listening"),
            ) {
                gw.addr = a;
                gw.admin = m;
                return gw;
            }
            assert!(
                Instant::now() < until,
                "gateway did not start:\n{}",
                gw.log()
            );
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("gateway exited ({status}):\n{}", gw.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&scrape(self.admin).await, name, labels)
    }

    async fn idle(&self) -> Idle {
        let samples = scrape(self.admin).await;
        Idle {
            fds: self.open_fds(),
            sessions: metric(&samples, "ftpgate_sessions_active", &[]),
            pinholes: metric(&samples, "ftpgate_pinholes_open", &[]),
            data_connections: metric(&samples, "ftpgate_data_connections_active", &[]),
        }
    }

    /// The idle baseline: taken after a warm-up transfer, once two readings
    /// a moment apart agree and nothing is active.
    async fn baseline(&self) -> Idle {
        let until = Instant::now() + SETTLE;
        loop {
            let a = self.idle().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let b = self.idle().await;
            if a == b && b.sessions == 0.0 && b.pinholes == 0.0 && b.data_connections == 0.0 {
                eprintln!("  baseline: {b:?}");
                return b;
            }
            assert!(
                Instant::now() < until,
                "no stable idle baseline: {a:?} {b:?}"
            );
        }
    }

    /// Waits (bounded) until everything is back to `base`.
    async fn back_to(&self, base: Idle, after: &str) {
        let until = Instant::now() + SETTLE;
        loop {
            let now = self.idle().await;
            // Fewer descriptors than the baseline is no leak: the baseline
            // can hold a short-lived one (the admin connection of a
            // metrics scrape that the gateway had not closed yet).
            if now.fds <= base.fds
                && now.sessions == base.sessions
                && now.pinholes == base.pinholes
                && now.data_connections == base.data_connections
            {
                eprintln!("  {after}: back to the baseline {now:?}");
                return;
            }
            assert!(
                Instant::now() < until,
                "{after}: not back to the idle baseline within {SETTLE:?}: {now:?}, baseline {base:?}\n{}\n{}",
                fd_listing(self.pid),
                tail(&self.log(), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn denials(&self) -> Vec<serde_json::Value> {
        denials(&self.deny_log)
    }

    async fn wait_denial(&self, reason: &str) -> serde_json::Value {
        wait_denial(&self.deny_log, reason).await
    }

    /// curl downloads `name` through the gateway (EPSV); the bytes must be
    /// `want`'s.
    async fn download_intact(&self, name: &str, want: &[u8]) {
        let out = tempfile::NamedTempFile::new().unwrap();
        let url = format!("ftp://ftptest:ftptest@{}/{name}", self.addr);
        let (ok, err) = curl(&["-o", out.path().to_str().unwrap(), &url]).await;
        assert!(ok, "curl {url}: {err}\n{}", tail(&self.log(), 30));
        let got = std::fs::read(out.path()).unwrap();
        assert!(
            got == want,
            "{name}: {} bytes arrived, {} expected, or they differ",
            got.len(),
            want.len()
        );
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Idle {
    fds: usize,
    sessions: f64,
    pinholes: f64,
    data_connections: f64,
}

/// CPU time (user + system) of `pid` in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Sends the gateway `pid` SIGHUP and waits (bounded) until it says, on
/// the standard error `log` reads, that it reloaded.
fn reload(pid: u32, log: impl Fn() -> String) {
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let until = Instant::now() + Duration::from_secs(10);
    while !log().contains("configuration reloaded") {
        assert!(Instant::now() < until, "no reload:\n{}", tail(&log(), 20));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway `pid` under RLIMIT_NOFILE `limit`, with connections queued
/// until accept fails with EMFILE: waits (bounded) for that, then checks
/// that the descriptors below the limit are (nearly) all taken (one the
/// test runner passed down, e.g. a jobserver pipe at 251, sits above it
/// and is not the gateway's doing), and that for 2 s the accept loop backs
/// off instead of spinning and says nothing more: one "accept failed" line
/// in all. `log` reads the gateway's standard error.
fn backs_off_at_the_limit(pid: u32, limit: usize, log: impl Fn() -> String) {
    let until = Instant::now() + Duration::from_secs(10);
    while !log().contains("accept failed: Too many open files") {
        assert!(Instant::now() < until, "no EMFILE:\n{}", tail(&log(), 20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let below = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|fd| *fd < limit)
        .count();
    assert!(
        below + 4 >= limit,
        "{below} fds below {limit}:\n{}\n{}",
        fd_listing(pid),
        tail(&log(), 5)
    );
    let ticks = cpu_ticks(pid);
    let warned = log().matches("accept failed").count();
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(pid) - ticks;
    let warnings = log().matches("accept failed").count() - warned;
    eprintln!(
        "  at the limit: {below} fds below {limit}, {spent} CPU ticks in 2 s, {warnings} 'accept failed' lines in 2 s"
    );
    // 100 ticks per second: 20 ticks is 10% of one CPU.
    assert!(
        spent < 20,
        "the gateway spins at the fd limit: {spent} ticks in 2 s"
    );
    // Said once (at most every 10 s), not 20 times a second.
    assert_eq!(warnings, 0, "{}", tail(&log(), 10));
    assert_eq!(log().matches("accept failed").count(), 1);
}

fn fd_listing(pid: u32) -> String {
    let mut out = String::from("open fds:\n");
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            out.push_str(&format!(
                "  {} -> {}\n",
                e.file_name().to_string_lossy(),
                target.display()
            ));
        }
    }
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn pyftpd_or_skip(test: &str) -> Option<FtpServer> {
    if !have("curl") {
        skip(test, "curl is not installed");
        return None;
    }
    let s = FtpServer::start(None);
    if s.is_none() {
        skip(test, "python3-pyftpdlib is not installed");
    }
    s
}

// ---- a scripted FTP server -------------------------------------------------

/// A minimal FTP server for faults a real server will not produce on
/// demand: `RETR reset.bin` sends `cut` bytes of `data`, then resets the
/// data connection (RST: SO_LINGER 0) and replies 426; `RETR data.bin`
/// sends all of `data` and replies 226.
struct Scripted {
    data: Arc<Vec<u8>>,
    cut: usize,
}

impl Scripted {
    async fn serve(self, listener: TcpListener) {
        let me = Arc::new(self);
        // Bounded: the test's runtime ends with the test.
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(Arc::clone(&me).session(s));
        }
    }

    async fn session(self: Arc<Self>, s: TcpStream) {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut data_listener: Option<TcpListener> = None;
        let _ = w.write_all(b"220 scripted server ready\r\n").await;
        for _ in 0..1000 {
            let mut line = String::new();
            match tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let line = line.trim_end();
            let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
            let reply = match verb.to_ascii_uppercase().as_str() {
                "USER" => "331 Password required.".to_string(),
                "PASS" => "230 Logged in.".to_string(),
                "TYPE" => "200 Type set.".to_string(),
                "PWD" => "257 \"/\" is the current directory.".to_string(),
                "CWD" => "250 Okay.".to_string(),
                "SIZE" => format!("213 {}", self.data.len()),
                "EPSV" | "PASV" => {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let port = l.local_addr().unwrap().port();
                    data_listener = Some(l);
                    if verb.eq_ignore_ascii_case("EPSV") {
                        format!("229 Entering Extended Passive Mode (|||{port}|)")
                    } else {
                        format!(
                            "227 Entering Passive Mode (127,0,0,1,{},{})",
                            port >> 8,
                            port & 0xff
                        )
                    }
                }
                "RETR" => {
                    let Some(l) = data_listener.take() else {
                        let _ = w.write_all(b"425 Use PASV first.\r\n").await;
                        continue;
                    };
                    let _ = w.write_all(b"150 Opening data connection.\r\n").await;
                    let accepted = tokio::time::timeout(Duration::from_secs(10), l.accept()).await;
                    let Ok(Ok((mut d, _))) = accepted else {
                        let _ = w.write_all(b"425 No data connection.\r\n").await;
                        continue;
                    };
                    if arg == "reset.bin" {
                        let _ = d.write_all(&self.data[..self.cut]).await;
                        // Give the gateway the bytes, then reset.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let _ = d.set_zero_linger();
                        drop(d);
                        "426 Connection reset; transfer aborted.".to_string()
                    } else {
                        let _ = d.write_all(&self.data).await;
                        let _ = d.shutdown().await;
                        drop(d);
                        "226 Transfer complete.".to_string()
                    }
                }
                "QUIT" => {
                    let _ = w.write_all(b"221 Goodbye.\r\n").await;
                    return;
                }
                _ => "502 Command not implemented.".to_string(),
            };
            if w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn scripted_server(data: Arc<Vec<u8>>, cut: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(Scripted { data, cut }.serve(l));
    addr
}

// ---- (a) the server resets mid-transfer -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_mid_transfer_gives_the_client_426_and_leaves_nothing_behind() {
    if !have("curl") {
        return skip("server_reset_mid_transfer", "curl is not installed");
    }
    let data = Arc::new(pseudo_random(4 << 20));
    let cut = 256 * 1024;
    let server = scripted_server(Arc::clone(&data), cut).await;
    let gw = GatewayProcess::start(Options::new(server, "61100-61149"));
    gw.download_intact("data.bin", &data).await;
    let base = gw.baseline().await;

    for round in 0..3 {
        let mut c = FtpClient::login(gw.addr).await;
        assert!(c.cmd("TYPE I").await.starts_with("200"));
        let port = parse_229(&c.cmd("EPSV").await);
        let mut d = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let opening = c.cmd("RETR reset.bin").await;
        assert!(opening.starts_with("150"), "{opening}");
        let mut got = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), d.read_to_end(&mut got))
            .await
            .expect("the data connection ends");
        // The server's verdict reaches the client on the control channel.
        let verdict = c.reply().await;
        assert!(verdict.starts_with("426"), "{verdict}");
        assert!(got.len() <= cut, "{} bytes after a cut at {cut}", got.len());
        assert_eq!(got[..], data[..got.len()], "the bytes that came are right");
        eprintln!(
            "  round {round}: client read {} bytes, data connection {}, control {:?}",
            got.len(),
            match ended {
                Ok(_) => "closed (EOF)".to_string(),
                Err(e) => format!("error {:?}", e.kind()),
            },
            verdict.trim_end()
        );
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    gw.back_to(base, "after 3 server resets").await;
    assert!(
        gw.log().contains("data relay ended"),
        "the relay's end is logged (debug)"
    );
    gw.download_intact("data.bin", &data).await;
}

// ---- (b) the client vanishes mid-transfer -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transfer_releases_its_session_relay_and_fds() {
    let Some(server) = pyftpd_or_skip("client_killed_mid_transfer") else {
        return;
    };
    let big = server.put_file("big.bin", 32 << 20);
    let small = server.put_file("small.bin", 1 << 20);
    let gw = GatewayProcess::start(Options::new(server.addr, "61150-61199"));
    gw.download_intact("small.bin", &small).await;
    let base = gw.baseline().await;
    let sessions_before = gw.metric("ftpgate_sessions_total", &[]).await;

    for (round, mode) in [["--ftp-pasv", "--ftp-pasv"], ["-P", "127.0.0.1"]]
        .iter()
        .enumerate()
    {
        let out = tempfile::NamedTempFile::new().unwrap();
        let url = format!("ftp://ftptest:ftptest@{}/big.bin", gw.addr);
        let mut client = tokio::process::Command::new("curl")
            .args(["--silent", "--max-time", "30", "--limit-rate", "1M"])
            .args(mode)
            .args(["-o", out.path().to_str().unwrap(), &url])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Mid-transfer: the relay is up and bytes are arriving.
        let until = Instant::now() + Duration::from_secs(10);
        while !(gw.metric("ftpgate_data_connections_active", &[]).await == 1.0
            && std::fs::metadata(out.path()).map_or(0, |m| m.len()) > 100_000)
        {
            assert!(Instant::now() < until, "the transfer did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.start_kill().unwrap();
        let _ = client.wait().await;
        let got = std::fs::metadata(out.path()).unwrap().len();
        assert!(got < big.len() as u64);
        eprintln!("  round {round} ({mode:?}): curl killed after {got} bytes");
        gw.back_to(base, &format!("client killed ({mode:?})")).await;
    }
    // Each killed client's session ended and was counted.
    let sessions_after = gw.metric("ftpgate_sessions_total", &[]).await;
    assert_eq!(sessions_after - sessions_before, 2.0);
    gw.download_intact("small.bin", &small).await;
}

// ---- (c) the upstream is unreachable ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_421_each_time_and_leaks_nothing_until_it_is_back() {
    if !have("curl") {
        return skip("unreachable_upstream", "curl is not installed");
    }
    // A port nobody listens on (yet): connections to it are refused.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = probe.local_addr().unwrap();
    drop(probe);
    let gw = GatewayProcess::start(Options::new(upstream, "61200-61249"));
    let base = gw.baseline().await;

    for _ in 0..20 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            reply,
            "421 Service not available: cannot reach the server.\r\n"
        );
    }
    let denial = gw.wait_denial("upstream_unreachable").await;
    assert_eq!(denial["target"], upstream.to_string());
    assert_eq!(
        gw.metric("ftpgate_upstream_connect_failures_total", &[])
            .await,
        20.0
    );
    assert!(gw.log().contains("upstream unreachable"));
    gw.back_to(base, "after 20 refused connections").await;

    // The server comes up on that address: the next session works.
    let data = Arc::new(pseudo_random(2 << 20));
    let l = TcpListener::bind(upstream).await.unwrap();
    tokio::spawn(
        Scripted {
            data: Arc::clone(&data),
            cut: 0,
        }
        .serve(l),
    );
    gw.download_intact("data.bin", &data).await;
    gw.back_to(base, "after the transfer").await;
}

// ---- (d) the pinhole pool is exhausted --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pinhole_pool_gives_425_and_recovers_when_holders_leave() {
    let Some(server) = pyftpd_or_skip("exhausted_pinhole_pool") else {
        return;
    };
    let file = server.put_file("file.bin", 1 << 20);
    // Three ports, above the ephemeral range, so nothing else takes them.
    let gw = GatewayProcess::start(Options {
        data_keys: "accept_timeout = \"60s\"",
        ..Options::new(server.addr, "61250-61252")
    });
    gw.download_intact("file.bin", &file).await;
    let base = gw.baseline().await;
    assert_eq!(gw.metric("ftpgate_port_pool_free", &[]).await, 3.0);

    let from = |i: u8| IpAddr::from([127, 0, 0, i]);
    let mut holders = Vec::new();
    for i in 2..5 {
        let mut c = FtpClient::login_from(gw.addr, from(i)).await;
        let r = c.cmd("PASV").await;
        assert!(r.starts_with("227"), "{r}");
        holders.push(c);
    }
    assert_eq!(gw.metric("ftpgate_pinholes_open", &[]).await, 3.0);
    let mut late = FtpClient::login_from(gw.addr, from(5)).await;
    let r = late.cmd("PASV").await;
    assert_eq!(
        r,
        "425 Can't open data connection: no pinhole available.\r\n"
    );
    let r = late.cmd("EPSV").await;
    assert!(r.starts_with("425"), "{r}");
    let denial = gw.wait_denial("pinhole_unavailable").await;
    assert_eq!(
        denial["client"].as_str().unwrap().split(':').next(),
        Some("127.0.0.5")
    );
    // The session itself goes on.
    assert!(late.cmd("NOOP").await.starts_with("200"));
    assert!(late.cmd("QUIT").await.starts_with("221"));
    for mut c in holders {
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    gw.back_to(base, "holders quit").await;
    assert_eq!(gw.metric("ftpgate_port_pool_free", &[]).await, 3.0);
    gw.download_intact("file.bin", &file).await;
}

// ---- (e) the deny log's disk is full ------------------------------------------

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem with `name` until a write fails (ENOSPC).
    fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join(name)).unwrap();
        let chunk = [0u8; 4096];
        for _ in 0..100_000 {
            if f.write_all(&chunk).is_err() {
                return;
            }
        }
        panic!("the tmpfs did not fill");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A session that earns `n` bounce denials (PORT to another host).
async fn bounces(gw: SocketAddr, from: IpAddr, n: usize) {
    let mut c = FtpClient::login_from(gw, from).await;
    for i in 0..n {
        let r = c.cmd(&format!("PORT 192,0,2,{},4,{}", 10 + i, i)).await;
        assert!(r.starts_with("504"), "{r}");
    }
    assert!(c.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_deny_log_disk_is_reported_once_the_gateway_keeps_serving_and_hup_resumes() {
    const TEST: &str = "full_deny_log_disk";
    if !is_root() {
        return skip(TEST, "needs root (mounts a tmpfs)");
    }
    let Some(server) = pyftpd_or_skip(TEST) else {
        return;
    };
    let file = server.put_file("file.bin", 1 << 20);
    let fs = Tmpfs::mount("64k");
    let gw = GatewayProcess::start(Options {
        deny_log: Some(fs.path().join("deny.jsonl")),
        ..Options::new(server.addr, "61300-61349")
    });
    gw.download_intact("file.bin", &file).await;
    let base = gw.baseline().await;

    // The deny log is still empty, so it holds no page of the tmpfs: once
    // the filler has every page, each write fails. (With a line in it, the
    // rest of its page takes a small batch after a large one failed: the
    // log would flap between failing and "writing again".)
    assert_eq!(
        std::fs::metadata(fs.path().join("deny.jsonl"))
            .unwrap()
            .len(),
        0
    );
    fs.fill("filler");
    // Sessions from several sources, 5 refusals each (a session's own
    // budget per reason).
    let mut sessions = 0;
    for i in 3..30 {
        bounces(gw.addr, IpAddr::from([127, 0, 0, i]), 5).await;
        sessions += 1;
        if gw.metric("ftpgate_deny_log_dropped_total", &[]).await > 0.0 {
            break;
        }
    }
    // A few more after the first failure: still one line on stderr.
    for i in 30..35 {
        bounces(gw.addr, IpAddr::from([127, 0, 0, i]), 5).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log();
    let said = log.matches("deny log: write failed").count();
    assert_eq!(
        said,
        1,
        "said once on stderr (after {sessions} sessions):\n{}",
        tail(&log, 20)
    );
    let errors_metric = "ftpgate_deny_log_write_errors_total";
    let errors = gw.metric(errors_metric, &[]).await;
    assert!(errors > 0.0, "{errors_metric} after {sessions} sessions");
    let dropped = gw.metric("ftpgate_deny_log_dropped_total", &[]).await;
    assert!(dropped > 0.0, "lost lines are counted");
    eprintln!(
        "  disk full: {errors} failed writes, {dropped} lines dropped, stderr: {}",
        log.lines()
            .find(|l| l.contains("deny log: write failed"))
            .unwrap()
    );
    // Still serving, nothing held.
    let mut gw = gw;
    assert!(gw.alive());
    gw.download_intact("file.bin", &file).await;
    gw.back_to(base, "while the disk is full").await;

    // Space again, SIGHUP: lines are written again, the loss is reported.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    tokio::task::block_in_place(|| reload(gw.pid, || gw.log()));
    bounces(gw.addr, IpAddr::from([127, 0, 0, 99]), 1).await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = gw.denials();
        let fresh = lines.iter().any(|v| {
            v["reason"] == "bounce" && v["client"].as_str().unwrap().starts_with("127.0.0.99:")
        });
        if fresh {
            let notice = lines.iter().find(|v| v["reason"] == "deny_log_dropped");
            assert!(
                notice.is_some(),
                "the loss is reported in the log: {lines:?}"
            );
            eprintln!("  after HUP: {}", notice.unwrap());
            break;
        }
        assert!(Instant::now() < until, "no line after the HUP: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log().contains("deny log: writing again"));
    gw.back_to(base, "after the HUP").await;
}

// ---- (f) the open-file limit is reached ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_file_limit_reached_backs_off_without_spinning_and_serves_again() {
    if !have("prlimit") {
        return skip(
            "open_file_limit_reached",
            "prlimit (util-linux) is not installed",
        );
    }
    let Some(server) = pyftpd_or_skip("open_file_limit_reached") else {
        return;
    };
    let file = server.put_file("file.bin", 1 << 20);
    const LIMIT: usize = 48;
    let mut gw = GatewayProcess::start(Options {
        nofile: Some(LIMIT as u32),
        ..Options::new(server.addr, "61350-61399")
    });
    assert!(
        gw.log().contains(&format!("open_files={LIMIT}")),
        "{}",
        gw.log()
    );
    gw.download_intact("file.bin", &file).await;
    let base = gw.baseline().await;

    // Control connections until the gateway cannot accept more: each
    // session holds two descriptors, so about (LIMIT - baseline) / 2.
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    tokio::task::block_in_place(|| backs_off_at_the_limit(gw.pid, LIMIT, || gw.log()));
    assert!(gw.alive(), "the gateway died at the fd limit");
    // Sessions that got in were served: a greeting, or a clear 421 when
    // the upstream connection found no descriptor.
    let mut greeted = 0;
    let mut refused = 0;
    for s in held.iter_mut().take(4) {
        let mut buf = [0u8; 128];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.starts_with("220") {
                greeted += 1;
            } else if text.starts_with("421") {
                refused += 1;
            }
        }
    }
    eprintln!("  first 4 held connections: {greeted} greeted, {refused} refused with 421");
    drop(held);
    assert!(gw.alive(), "the gateway died at the fd limit");
    // Once the connections are gone the queued ones are accepted, find
    // their clients gone, and end.
    gw.back_to(base, "connections closed").await;
    let failures = gw
        .metric("ftpgate_accept_failures_total", &[("listener", "control")])
        .await;
    assert!(failures > 1.0, "failed accepts are counted: {failures}");
    eprintln!("  {failures} failed accepts counted, one 'accept failed' line on stderr");
    gw.download_intact("file.bin", &file).await;
    gw.back_to(base, "after the transfer").await;
}

// ---- the kernel data plane, in the namespace lab ---------------------------------

fn lab_missing() -> Option<String> {
    prereq::lab_missing(&["ip", "nft", "vsftpd", "curl", "ss", "prlimit", "mount"])
}

/// The six faults on the kernel plane, in one lab (one gateway at a time:
/// the lab's namespaces and admin port are the lab's): the server's data
/// connection reset mid-transfer (`ss -K` in the server's namespace), the
/// client killed mid-transfer, an unreachable upstream, the pinhole pool
/// exhausted, then with the gateway restarted the deny log's disk full and
/// the open-file limit reached. After each: the gateway's fds and gauges
/// back to the idle baseline and no pinhole element left in the kernel;
/// then a checked transfer.
///
/// Every fault of the loopback tests applies here; what differs is what
/// the kernel plane holds. Its data connections hold no descriptor of the
/// gateway (conntrack carries them), so at the open-file limit a session
/// that was already in still gets a pinhole (over the netlink socket it
/// has open) and a transfer; the test checks that (the proxy plane needs a
/// pinhole listener and two relay sockets for each data connection, so its
/// loopback test does not ask it).
#[test]
fn kernel_plane_faults_in_the_lab_leave_no_pinholes_flows_or_fds_behind() {
    const TEST: &str = "kernel_plane_faults_in_the_lab";
    if let Some(why) = lab_missing() {
        return skip(TEST, &why);
    }
    let mut lab = KernelLab::up("kernel");
    lab.download_intact();
    let base = lab.baseline();

    // (a) The server's end of the data connection is reset mid-transfer.
    let client = lab.slow_download();
    let kill = lab.exec(
        "srv1",
        &[
            "ss",
            "-K",
            "-tn",
            "state",
            "established",
            "( sport >= :40000 and sport <= :40100 )",
        ],
    );
    assert!(kill.status.success(), "ss -K: {}", out_text(&kill));
    let done = client.wait_with_output().unwrap();
    eprintln!(
        "  (a) server data socket killed (ss -K): curl exit {:?}: {}",
        done.status.code(),
        out_text(&done).trim()
    );
    assert!(!done.status.success(), "the transfer cannot have completed");
    lab.back_to(base, "server reset");
    lab.download_intact();

    // (b) The client is killed mid-transfer.
    let mut client = lab.slow_download();
    client.kill().unwrap();
    let _ = client.wait();
    eprintln!("  (b) curl killed mid-download");
    lab.back_to(base, "client killed");
    lab.download_intact();

    // (c) The upstream is unreachable (nothing listens on out3:21).
    let o = lab.exec(
        "in1",
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ns = socket.create_connection(('{LAB_OUT3}', 21), timeout=10)\n\
             print(s.makefile().readline().strip())"
            ),
        ],
    );
    let reply = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(
        reply,
        "421 Service not available: cannot reach the server.",
        "{}",
        out_text(&o)
    );
    let until = Instant::now() + Duration::from_secs(10);
    while !lab
        .denials()
        .iter()
        .any(|v| v["reason"] == "upstream_unreachable")
    {
        assert!(Instant::now() < until, "no upstream_unreachable line");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("  (c) unreachable upstream: {reply:?} and an upstream_unreachable line");
    lab.back_to(base, "upstream unreachable");

    // (d) The pinhole pool is exhausted: sessions hold PASV pinholes until
    // one is refused; the refused one keeps its session.
    let free = lab.metric("ftpgate_port_pool_free");
    assert!((1.0..=3.0).contains(&free), "pool of {free}");
    let script = format!(
        "import ftplib\n\
         held = []\n\
         for i in range(6):\n\
         \x20   f = ftplib.FTP('{LAB_SRV1}', timeout=10)\n\
         \x20   f.login('ftptest', 'ftptest')\n\
         \x20   held.append(f)\n\
         \x20   try:\n\
         \x20       f.sendcmd('PASV')\n\
         \x20   except ftplib.error_temp as e:\n\
         \x20       print('REFUSED', i, e, flush=True)\n\
         \x20       print('NOOP', f.sendcmd('NOOP'), flush=True)\n\
         \x20       break\n\
         for f in held:\n\
         \x20   f.quit()\n"
    );
    let o = lab.exec("in1", &["python3", "-c", &script]);
    let said = out_text(&o);
    assert!(
        said.contains(&format!(
            "REFUSED {} 425 Can't open data connection: no pinhole available.",
            free as usize
        )),
        "{said}"
    );
    assert!(said.contains("NOOP 200"), "{said}");
    assert!(
        lab.denials()
            .iter()
            .any(|v| v["reason"] == "pinhole_unavailable")
    );
    eprintln!(
        "  (d) pool of {free} exhausted: {}",
        said.lines().next().unwrap_or_default()
    );
    lab.back_to(base, "pool exhausted");
    // A pinhole withdrawn unused keeps its port 2 s longer (a late
    // conntrack report must not find the next pinhole there).
    lab.wait_metric("ftpgate_port_pool_free", free, Duration::from_secs(5));
    lab.download_intact();
    lab.back_to(base, "pool exhausted, then a transfer");

    kernel_plane_full_deny_log_disk(&mut lab);
    kernel_plane_open_file_limit(&mut lab);
}

/// (e) on the kernel plane: the deny log on a 64 KiB tmpfs that fills up.
/// Said once on standard error, lost lines counted, the gateway goes on
/// serving (a transfer through kernel elements), and after SIGHUP with
/// space again lines are written and the loss is reported in the log.
fn kernel_plane_full_deny_log_disk(lab: &mut KernelLab) {
    let fs = Tmpfs::mount("64k");
    lab.start_gateway(LabGateway {
        deny_log: Some(fs.path().join("deny.jsonl")),
        ..LabGateway::default()
    });
    lab.download_intact();
    let base = lab.baseline();

    // The deny log is still empty, so it holds no page of the tmpfs: once
    // the filler has every page, each write fails (see the loopback test).
    assert_eq!(
        std::fs::metadata(fs.path().join("deny.jsonl"))
            .unwrap()
            .len(),
        0
    );
    fs.fill("filler");
    // Sessions of 5 refusals each (a session's own budget per reason).
    let mut sessions = 0;
    while lab.metric("ftpgate_deny_log_dropped_total") == 0.0 {
        assert!(
            sessions < 30,
            "no deny line dropped after {sessions} sessions on a full disk:\n{}",
            tail(&lab.log(), 20)
        );
        lab.bounces("in1", 3, 5);
        sessions += 3;
    }
    // More after the first failure: still one line on stderr.
    lab.bounces("in1", 5, 5);
    let errors_metric = "ftpgate_deny_log_write_errors_total";
    let until = Instant::now() + Duration::from_secs(10);
    while lab.metric(errors_metric) == 0.0 || !lab.log().contains("deny log: write failed") {
        assert!(
            Instant::now() < until,
            "no write error reported after {sessions} sessions:\n{}",
            tail(&lab.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.log();
    assert_eq!(
        log.matches("deny log: write failed").count(),
        1,
        "said once on stderr:\n{}",
        tail(&log, 20)
    );
    let dropped = lab.metric("ftpgate_deny_log_dropped_total");
    eprintln!(
        "  (e) disk full: {} failed writes, {dropped} lines dropped, stderr: {}",
        lab.metric(errors_metric),
        log.lines()
            .find(|l| l.contains("deny log: write failed"))
            .unwrap()
    );
    assert!(lab.alive(), "the gateway died on a full disk");
    lab.download_intact();
    lab.back_to(base, "while the deny log's disk is full");

    // Space again, SIGHUP: lines are written again, the loss is reported.
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    reload(lab.pid, || lab.log());
    // From in2, which had no refusal before.
    lab.bounces("in2", 1, 1);
    lab.wait_denial("bounce from in2 after the HUP", |v| {
        v["reason"] == "bounce"
            && v["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("192.0.2.11:"))
    });
    let lines = lab.denials();
    let notice = lines
        .iter()
        .find(|v| v["reason"] == "deny_log_dropped")
        .unwrap_or_else(|| panic!("the loss is not reported in the log: {lines:?}"));
    eprintln!("  (e) after HUP: {notice}");
    assert!(lab.log().contains("deny log: writing again"));
    lab.back_to(base, "deny log writing again after the HUP");
    // The next gateway takes the deny log off the tmpfs before it goes.
    lab.start_gateway(LabGateway::default());
    drop(fs);
}

/// (f) on the kernel plane: RLIMIT_NOFILE 64 and inside connections until
/// accept fails with EMFILE. The accept loop backs off (no spinning, one
/// line on stderr); a session that logged in before the limit still
/// downloads intact through a kernel pinhole while the gateway is at it;
/// once the connections go, everything is back to the baseline.
fn kernel_plane_open_file_limit(lab: &mut KernelLab) {
    const LIMIT: usize = 64;
    lab.start_gateway(LabGateway {
        nofile: Some(LIMIT as u32),
        ..LabGateway::default()
    });
    assert!(
        lab.log().contains(&format!("open_files={LIMIT}")),
        "{}",
        lab.log()
    );
    lab.download_intact();
    let base = lab.baseline();
    assert!(
        base.fds + 16 <= LIMIT,
        "the kernel plane's baseline of {} fds leaves no room below {LIMIT}",
        base.fds
    );

    // A session that is in before the limit, and waits.
    let go = lab.dir.path().join("early-go");
    let mut early = lab.spawn(
        "in1",
        &[
            "timeout",
            "90",
            "python3",
            "-c",
            &format!(
                "import ftplib, hashlib, os, socket, time\n\
                 f = ftplib.FTP('{LAB_SRV1}', timeout=10)\n\
                 f.login('ftptest', 'ftptest')\n\
                 f.voidcmd('TYPE I')\n\
                 print('READY', flush=True)\n\
                 until = time.time() + 60\n\
                 while not os.path.exists('{}') and time.time() < until: time.sleep(0.05)\n\
                 host, port = ftplib.parse227(f.sendcmd('PASV'))\n\
                 d = socket.create_connection((host, port), timeout=10)\n\
                 f.sendcmd('RETR data.bin')\n\
                 h, n = hashlib.sha256(), 0\n\
                 while True:\n\
                 \x20   b = d.recv(65536)\n\
                 \x20   if not b: break\n\
                 \x20   h.update(b)\n\
                 \x20   n += len(b)\n\
                 d.close()\n\
                 print('DONE', f.voidresp(), flush=True)\n\
                 print('SHA256', h.hexdigest(), 'BYTES', n, flush=True)\n\
                 f.quit()\n",
                go.display()
            ),
        ],
    );
    let first_line = |child: &mut Child| {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        line
    };
    let ready = first_line(&mut early);
    assert_eq!(ready.trim(), "READY", "the early session did not log in");

    // Inside connections to srv1:21 (redirected to the gateway) until the
    // gateway cannot accept more, held until `release` exists.
    let release = lab.dir.path().join("release");
    let mut flood = lab.spawn(
        "in1",
        &[
            "timeout",
            "90",
            "python3",
            "-c",
            &format!(
                "import os, socket, time\n\
                 held = [socket.create_connection(('{LAB_SRV1}', 21), timeout=10) for _ in range({LIMIT})]\n\
                 print('HELD', len(held), flush=True)\n\
                 until = time.time() + 80\n\
                 while not os.path.exists('{}') and time.time() < until: time.sleep(0.05)\n\
                 greeted = refused = 0\n\
                 for s in held[:4]:\n\
                 \x20   s.settimeout(0.5)\n\
                 \x20   try:\n\
                 \x20       t = s.recv(128)\n\
                 \x20   except OSError:\n\
                 \x20       continue\n\
                 \x20   greeted += t.startswith(b'220')\n\
                 \x20   refused += t.startswith(b'421')\n\
                 print('FIRST4 greeted', greeted, 'refused', refused, flush=True)\n\
                 for s in held: s.close()\n",
                release.display()
            ),
        ],
    );
    let held = first_line(&mut flood);
    assert_eq!(held.trim(), format!("HELD {LIMIT}"));
    // (No metrics scrape at the limit: the admin listener is at it too.)
    backs_off_at_the_limit(lab.pid, LIMIT, || lab.log());
    assert!(lab.alive(), "the gateway died at the fd limit");

    // The session that was in downloads through a kernel pinhole, at the
    // limit: neither its pinhole nor its data connection needs a
    // descriptor of the gateway.
    std::fs::write(&go, b"go").unwrap();
    let early = early.wait_with_output().unwrap();
    let said = out_text(&early);
    let want = std::fs::read_to_string(lab.state().join("srv1/root/data.bin.sha256")).unwrap();
    let want = want.split_whitespace().next().unwrap();
    assert!(
        said.contains("DONE 226") && said.contains(&format!("SHA256 {want} BYTES 3145728")),
        "the early session's transfer at the fd limit: {said}\n{}",
        tail(&lab.log(), 20)
    );
    assert!(
        lab.open_fds() + 4 >= LIMIT,
        "no longer at the limit during the transfer: {} fds",
        lab.open_fds()
    );
    eprintln!(
        "  (f) at the limit, a session that was in downloaded data.bin intact (kernel pinhole)"
    );

    std::fs::write(&release, b"go").unwrap();
    let flood = flood.wait_with_output().unwrap();
    eprintln!("  (f) {}", out_text(&flood).trim());
    assert!(lab.alive(), "the gateway died at the fd limit");
    lab.back_to(base, "fd limit: connections closed");
    let failures = metric(
        &lab.metrics(),
        "ftpgate_accept_failures_total",
        &[("listener", "control")],
    );
    assert!(failures > 1.0, "failed accepts are counted: {failures}");
    eprintln!("  (f) {failures} failed accepts counted, one 'accept failed' line on stderr");
    lab.download_intact();
    lab.back_to(base, "fd limit: the end");
}
