//! Behind a load balancer, on loopback (no root): the PROXY protocol on the
//! control listener and on passive pinholes, the drain at SIGTERM
//! (`/readyz` 503 while the listener still accepts for `drain_delay`), and
//! the shipped balancer examples being `ftpgate balancer-config`'s output.
//!
//! The "balancer" here is the test itself: it connects from 127.0.0.1 (a
//! trusted proxy) and writes PROXY headers naming clients from the
//! documentation ranges, so the gateway's view of the client is the
//! header's and nothing else.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FtpServer, Gateway, http_get, metric, parse_227, parse_229, scrape, skip};
use proxy_header::{ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const VIP: &str = "198.51.100.5";

/// pyftpdlib and a gateway in front of it that reads PROXY headers on the
/// control listener (from `trusted`) and on its pinholes (`ports`);
/// `extra` is appended to its config. `None` (the skip said for `test`)
/// without pyftpdlib.
async fn server_and_gateway(
    test: &str,
    ports: &str,
    trusted: &str,
    extra: &str,
) -> Option<(FtpServer, Gateway)> {
    let Some(server) = FtpServer::start(None) else {
        skip(test, "Debian's python3-pyftpdlib is not installed");
        return None;
    };
    let gw = Gateway::reverse_full(
        server.addr,
        ports,
        &format!("proxy_protocol = true\ntrusted_proxies = [\"{trusted}\"]"),
        extra,
        "accept_timeout = \"5s\"\nproxy_protocol = true",
        "",
    )
    .await;
    Some((server, gw))
}

/// `ftpgate_denials_total{reason="proxy_header"}` (the recorder is the
/// process's, shared by the tests here).
async fn proxy_header_denials(admin: SocketAddr) -> f64 {
    metric(
        &scrape(admin).await,
        "ftpgate_denials_total",
        &[("reason", "proxy_header")],
    )
}

/// The PROXY header a balancer sends for `client` connecting to `to`.
fn header(client: &str, to: SocketAddr) -> ProxyHeader<'static> {
    ProxyHeader::with_address(ProxiedAddress::stream(client.parse().unwrap(), to))
}

fn v2(client: &str, to: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    header(client, to).encode_v2(&mut out).unwrap();
    out
}

fn v1(client: &str, to: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    header(client, to).encode_v1(&mut out).unwrap();
    out
}

/// A control connection through the "balancer": the header, then FTP.
struct Ctl {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Ctl {
    /// Connects and sends `header` and `first` in one write (a client's
    /// first bytes may ride in the balancer's first segment).
    async fn open(addr: SocketAddr, header: &[u8], first: &str) -> (Ctl, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(first.as_bytes());
        s.write_all(&bytes).await.unwrap();
        let (r, w) = s.into_split();
        let mut c = Ctl {
            rd: BufReader::new(r),
            wr: w,
        };
        let greeting = c.line().await;
        (c, greeting)
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.rd.read_line(&mut line))
            .await
            .expect("reply")
            .unwrap();
        line
    }

    async fn cmd(&mut self, cmd: &str) -> String {
        self.wr
            .write_all(format!("{cmd}\r\n").as_bytes())
            .await
            .unwrap();
        self.line().await
    }

    /// `RETR file.bin` over a data connection to `pinhole` that begins
    /// with `header`: the bytes between the 1xx and the 226.
    async fn retr(&mut self, pinhole: SocketAddr, header: &[u8]) -> Vec<u8> {
        let mut data = TcpStream::connect(pinhole).await.unwrap();
        data.write_all(header).await.unwrap();
        assert!(self.cmd("RETR file.bin").await.starts_with('1'));
        let mut got = Vec::new();
        data.read_to_end(&mut got).await.unwrap();
        drop(data);
        assert!(self.line().await.starts_with("226"));
        got
    }

    async fn login(addr: SocketAddr, header: &[u8]) -> Ctl {
        let (mut c, greeting) = Ctl::open(addr, header, "").await;
        assert!(greeting.starts_with("220"), "{greeting}");
        assert!(c.cmd("USER ftptest").await.starts_with("331"));
        assert!(c.cmd("PASS ftptest").await.starts_with("230"));
        assert!(c.cmd("TYPE I").await.starts_with("200"));
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_header_names_the_client_for_policy_limits_pinholes_and_logs() {
    const TEST: &str = "the_proxy_header_names_the_client";
    let Some((server, gw)) = server_and_gateway(
        TEST,
        "54600-54699",
        "127.0.0.0/8",
        "[limits]\nmax_sessions_per_client = 1\n",
    )
    .await
    else {
        return;
    };
    let file = server.put_file("file.bin", 300_000);
    let admin = gw.running.admin.unwrap();
    let vip: SocketAddr = format!("{VIP}:21").parse().unwrap();

    // The header and the first command in one segment: nothing of the
    // command is lost (v1 here, v2 below).
    let (mut a, greeting) =
        Ctl::open(gw.addr, &v1("192.0.2.10:40000", vip), "USER ftptest\r\n").await;
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(a.line().await.starts_with("331"));
    assert!(a.cmd("PASS ftptest").await.starts_with("230"));
    assert!(a.cmd("TYPE I").await.starts_with("200"));

    // Per-client limits count the header's client: a second session of
    // 192.0.2.10 is refused, one of 192.0.2.20 is not.
    let (_b, refused) = Ctl::open(gw.addr, &v2("192.0.2.10:40001", vip), "").await;
    assert!(
        refused.starts_with("421 Too many connections from your address"),
        "{refused}"
    );
    let mut other = Ctl::login(gw.addr, &v2("192.0.2.20:40002", vip)).await;

    // Policy: the data peer is the header's client, not the socket peer.
    let reply = a.cmd("PORT 127,0,0,1,200,10").await;
    assert!(reply.starts_with("504"), "{reply}");
    let bounce = gw.wait_denial("bounce").await;
    assert_eq!(bounce["client"], "192.0.2.10:40000", "{bounce}");

    // PASV names the balancer (the header's destination); the data
    // connection's header names the expected peer.
    let reply = a.cmd("PASV").await;
    let pinhole = parse_227(&reply);
    assert_eq!(pinhole.ip().to_string(), VIP, "{reply}");
    let pinhole = SocketAddr::new("127.0.0.1".parse().unwrap(), pinhole.port());
    // A thief's connection through the balancer: its header names it.
    let mut thief = TcpStream::connect(pinhole).await.unwrap();
    thief
        .write_all(&v2("192.0.2.99:5000", pinhole))
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        thief.read(&mut buf).await.unwrap_or(0),
        0,
        "the thief is closed"
    );
    let theft = gw.wait_denial("pasv_theft").await;
    assert_eq!(theft["peer"], "192.0.2.99:5000", "{theft}");
    assert_eq!(theft["client"], "192.0.2.10:40000", "{theft}");
    // No header at all: refused as proxy_header, the pinhole stays.
    let mut bare = TcpStream::connect(pinhole).await.unwrap();
    bare.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    assert_eq!(bare.read(&mut buf).await.unwrap_or(0), 0, "refused");
    let line = gw.wait_denial("proxy_header").await;
    assert_eq!(line["rule"], "proxy_protocol", "{line}");
    // The expected peer, with its header: the download arrives whole.
    let got = a.retr(pinhole, &v2("192.0.2.10:40100", pinhole)).await;
    assert!(got == file, "download differs ({} bytes)", got.len());

    // EPSV likewise, for the other client.
    let port = parse_229(&other.cmd("EPSV").await);
    let pinhole = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    let got = other.retr(pinhole, &v1("192.0.2.20:40200", pinhole)).await;
    assert!(got == file, "download differs ({} bytes)", got.len());

    // The recorder is the process's, shared with the other tests here.
    assert!(proxy_header_denials(admin).await >= 1.0);
    // Counted when the relay has ended, which may follow the 226.
    let until = Instant::now() + Duration::from_secs(5);
    while metric(&scrape(admin).await, "ftpgate_data_connections_total", &[]) < 2.0 {
        assert!(Instant::now() < until, "data connections not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.cmd("QUIT").await.starts_with("221"));
    assert!(other.cmd("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_from_untrusted_sources_or_without_a_header_get_421() {
    const TEST: &str = "connections_from_untrusted_sources_or_without_a_header_get_421";
    let Some((_server, gw)) = server_and_gateway(TEST, "54700-54799", "127.0.0.1", "").await else {
        return;
    };
    let admin = gw.running.admin.unwrap();
    let vip: SocketAddr = format!("{VIP}:21").parse().unwrap();
    let refused = "421 Service not available: no PROXY header from a trusted proxy.\r\n";

    // Untrusted: 127.0.0.2 is not 127.0.0.1.
    let s = common::connect_from(gw.addr, "127.0.0.2".parse().unwrap()).await;
    let (r, mut w) = s.into_split();
    w.write_all(&v2("192.0.2.10:40000", vip)).await.unwrap();
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await.unwrap();
    assert_eq!(line, refused);
    let untrusted = gw.wait_denial("proxy_header").await;
    assert_eq!(untrusted["rule"], "trusted_proxies");
    assert!(
        untrusted["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.2:")
    );

    // Trusted, but FTP instead of a header.
    let (_c, reply) = Ctl::open(gw.addr, b"", "USER ftptest\r\n").await;
    assert_eq!(reply, refused);
    // A header that never completes within the time limit.
    let (_c, reply) = Ctl::open(gw.addr, b"PROXY TCP4 192.0.2.10 ", "").await;
    assert_eq!(reply, refused);

    assert!(proxy_header_denials(admin).await >= 3.0);
    let lines: Vec<_> = gw
        .denials()
        .into_iter()
        .filter(|v| v["reason"] == "proxy_header")
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    drop(gw.running);
}

/// The real binary: SIGTERM turns `/readyz` 503 at once, the listener
/// keeps accepting sessions for `drain_delay`, then closes.
#[test]
fn sigterm_turns_readyz_503_and_keeps_accepting_for_the_drain_delay() {
    const TEST: &str = "sigterm_turns_readyz_503_and_keeps_accepting";
    let Some(server) = FtpServer::start(None) else {
        return skip(TEST, "Debian's python3-pyftpdlib is not installed");
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ftpgate.toml");
    let ctl_port = free_port();
    let admin_port = free_port();
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:{ctl_port}\"]\nupstream = \"{}\"\n\
             [data]\nports = \"54800-54899\"\n[limits]\ndrain_delay = \"2s\"\nshutdown_grace = \"5s\"\n\
             [admin]\nbind = \"127.0.0.1:{admin_port}\"\n",
            server.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let ctl: SocketAddr = format!("127.0.0.1:{ctl_port}").parse().unwrap();
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(admin).await.is_err()
            || http_get(admin, "/readyz").await.0 != "HTTP/1.1 200 OK"
        {
            assert!(Instant::now() < until, "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let termed = Instant::now();
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let (status, _) = http_get(admin, "/readyz").await;
            if status == "HTTP/1.1 503 Service Unavailable" {
                break;
            }
            assert!(Instant::now() < until, "/readyz still {status}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Still accepting, and the session is served.
        let mut c = common::FtpClient::login(ctl).await;
        assert!(c.cmd("NOOP").await.starts_with("200"));
        assert!(termed.elapsed() < Duration::from_secs(2));
        assert!(c.cmd("QUIT").await.starts_with("221"));
        // After the delay the listener is closed.
        let until = Instant::now() + Duration::from_secs(4);
        while TcpStream::connect(ctl).await.is_ok() {
            assert!(Instant::now() < until, "the listener is still open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(termed.elapsed() >= Duration::from_millis(1900));
    });
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("draining: /readyz answers 503"), "{stderr}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `deploy/haproxy/haproxy.cfg` and `deploy/ipvs/ipvs.sh` are exactly what
/// the command line at their top prints; HAProxy accepts its file where
/// it is installed.
#[test]
fn shipped_balancer_examples_are_the_generators_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/haproxy/haproxy.cfg", "deploy/ipvs/ipvs.sh"] {
        let shipped = std::fs::read_to_string(root.join(file)).unwrap();
        let command = shipped
            .lines()
            .find_map(|l| l.strip_prefix("# Generated by: ftpgate "))
            .unwrap_or_else(|| panic!("{file} names no command"));
        let out = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
            .args(command.split_whitespace())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout) == shipped,
            "{file} differs from `ftpgate {command}`: regenerate it"
        );
    }
    let sh = Command::new("sh")
        .args(["-n"])
        .arg(root.join("deploy/ipvs/ipvs.sh"))
        .status()
        .unwrap();
    assert!(sh.success());
    // The nftables part of the IPVS script (this kernel may have no IPVS
    // to run the rest): `nft -c` checks it without loading anything.
    let ipvs = std::fs::read_to_string(root.join("deploy/ipvs/ipvs.sh")).unwrap();
    let rules: String = ipvs
        .lines()
        .skip_while(|l| !l.starts_with("nft -f - <<'EOF'"))
        .skip(1)
        .take_while(|l| *l != "EOF")
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(rules.contains("meta mark set"), "{rules}");
    if common::is_root() && common::have("nft") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ipvs.nft");
        std::fs::write(&file, &rules).unwrap();
        let o = Command::new("nft")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}\n{rules}",
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        skip("nft -c on deploy/ipvs/ipvs.sh", "needs root and nftables");
    }
    if common::have("haproxy") {
        let o = Command::new("haproxy")
            .args(["-c", "-f"])
            .arg(root.join("deploy/haproxy/haproxy.cfg"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    } else {
        skip(
            "haproxy -c deploy/haproxy/haproxy.cfg",
            "haproxy is not installed",
        );
    }
}
