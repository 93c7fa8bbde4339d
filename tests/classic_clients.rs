//! Classic command-line clients (inetutils-ftp, tnftp) through the gateway
//! in reverse mode on loopback: a download from a real FTP server (Debian's
//! pyftpdlib, or the lab's pure-ftpd as root; throttled so the transfer is
//! still running) is interrupted with ^C on the client's terminal. The
//! client aborts the way RFC 959 section 4.1.3 says, with Telnet IP and a
//! Synch as TCP urgent data before ABOR; the abort must reach the server,
//! the client must get its prompt back at once and the session must go on.
//! Skipped (and says so) when a client or server is missing, or pure-ftpd
//! without root; `scripts/install-test-deps` installs them. (vsftpd and
//! proftpd abort in the NAT lab, `nat_lab.rs`, pure-ftpd there too.)
//!
//! And the same bytes on the wire, without a client: what the server
//! receives, and which byte of it is urgent data.

mod classic;
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use classic::pure_ftpd::PureFtpd;
use classic::{CLIENTS, Expect, Outcome};
use common::{FtpServer, Gateway, skip};

/// Bytes per second the server sends: the 256 MiB file would take minutes.
const THROTTLE: &str = "1048576";
const BIG: u64 = 256 << 20;

/// Which real server the clients abort against.
#[derive(Clone, Copy)]
enum Make {
    Pyftpdlib,
    PureFtpd,
}

/// A running server of a [`Make`].
enum Upstream {
    Pyftpdlib { server: FtpServer, log: PathBuf },
    PureFtpd(PureFtpd),
}

impl Upstream {
    /// `Err` says why `make` cannot run here.
    fn start(make: Make, logs: &Path) -> Result<Upstream, String> {
        match make {
            Make::Pyftpdlib => {
                let log = logs.join("ftpd.log");
                FtpServer::start_args(&["--throttle", THROTTLE, "--log", log.to_str().unwrap()])
                    .map(|server| Upstream::Pyftpdlib { server, log })
                    .ok_or_else(|| "Debian's python3-pyftpdlib is not installed".to_string())
            }
            Make::PureFtpd => PureFtpd::start(1024).map(Upstream::PureFtpd),
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Upstream::Pyftpdlib { server, .. } => server.addr,
            Upstream::PureFtpd(p) => p.addr,
        }
    }

    fn root(&self) -> PathBuf {
        match self {
            Upstream::Pyftpdlib { server, .. } => server.root.path().to_path_buf(),
            Upstream::PureFtpd(p) => p.root(),
        }
    }

    /// The ABORs the server logged: pyftpdlib logs every command it
    /// reads, pure-ftpd an ABOR during a transfer by its reply only.
    fn aborts(&self) -> usize {
        match self {
            Upstream::Pyftpdlib { log, .. } => std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("<- ") && l.ends_with("ABOR"))
                .count(),
            Upstream::PureFtpd(p) => p.aborts(),
        }
    }
}

async fn interrupted_download_aborts(test: &str, client: &str, make: Make, ports: &str) {
    let Some(binary) = classic::find(client) else {
        return skip(test, &format!("{client} is not installed"));
    };
    let logs = tempfile::tempdir().unwrap();
    let server = match Upstream::start(make, logs.path()) {
        Ok(server) => server,
        Err(why) => return skip(test, &why),
    };
    // Sparse: no disk space, the server reads zeros.
    let big = std::fs::File::create(server.root().join("big.bin")).unwrap();
    big.set_len(BIG).unwrap();
    let gw = Gateway::reverse(server.addr(), ports, "").await;
    let mut failures = Vec::new();
    for mode in ["passive", "active"] {
        let transcript = logs.path().join(format!("{client}-{mode}.txt"));
        let argv = classic::driver_argv(
            &binary,
            &gw.addr.ip().to_string(),
            gw.addr.port(),
            "big.bin",
            mode,
            Expect::Aborted,
            &transcript,
        );
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .await
            .unwrap();
        let outcome = Outcome::read(&out.stdout, &transcript);
        eprintln!("{}", outcome.summary());
        let problems = outcome.problems(Expect::Aborted);
        if !problems.is_empty() {
            failures.push(format!(
                "{client} ({mode}): {problems:?}\n--- terminal ---\n{}\n--- driver stderr ---\n{}",
                outcome.transcript.replace(&"#".repeat(64), ""),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    // (pure-ftpd logs its reply as the session goes on.)
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while server.aborts() < 2 && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let received = server.aborts();
    if received != 2 {
        failures.push(format!(
            "the server received {received} ABOR commands, not 2"
        ));
    }
    let denials = gw.denials();
    assert!(
        failures.is_empty() && denials.is_empty(),
        "{}\ndenials: {denials:?}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inetutils_ftp_interrupted_mid_download_aborts_and_stays_usable() {
    let test = "inetutils_ftp_interrupted_mid_download_aborts_and_stays_usable";
    interrupted_download_aborts(test, CLIENTS[0], Make::Pyftpdlib, "54100-54199").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tnftp_interrupted_mid_download_aborts_and_stays_usable() {
    let test = "tnftp_interrupted_mid_download_aborts_and_stays_usable";
    interrupted_download_aborts(test, CLIENTS[1], Make::Pyftpdlib, "54200-54299").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inetutils_ftp_interrupted_mid_download_from_pure_ftpd_aborts_and_stays_usable() {
    let test = "inetutils_ftp_interrupted_mid_download_from_pure_ftpd_aborts_and_stays_usable";
    interrupted_download_aborts(test, CLIENTS[0], Make::PureFtpd, "54400-54499").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tnftp_interrupted_mid_download_from_pure_ftpd_aborts_and_stays_usable() {
    let test = "tnftp_interrupted_mid_download_from_pure_ftpd_aborts_and_stays_usable";
    interrupted_download_aborts(test, CLIENTS[1], Make::PureFtpd, "54500-54599").await;
}

/// The position of the urgent mark: is the next byte to read the urgent
/// one? (Linux `SIOCATMARK`, asm-generic/sockios.h; libc lacks it.)
#[cfg(target_os = "linux")]
fn at_mark(s: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    const SIOCATMARK: libc::c_ulong = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which lives
    // for the call; the descriptor is open (borrowed from `s`).
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), SIOCATMARK, &mut at) };
    assert_eq!(rc, 0, "SIOCATMARK: {}", std::io::Error::last_os_error());
    at != 0
}

/// A client sends ABOR as netkit does (`IAC IP IAC` with MSG_OOB, so the
/// second IAC is urgent, then `DM ABOR`) and as Python's ftplib does
/// (`ABOR\r\n` with MSG_OOB: the LF is urgent), then NOOP. The server
/// (reading urgent data inline, as vsftpd and proftpd do) must receive
/// each ABOR behind `IAC IP IAC DM` with the urgent mark on that IAC, so
/// its urgent pointer points at the DM (RFC 854); and the client's urgent
/// LF must not cut its line short: the gateway reads urgent data inline.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abor_reaches_the_server_behind_a_synch_with_the_urgent_mark_on_its_dm() {
    use std::io::{Read, Write};
    use tokio::io::{AsyncBufReadExt, BufReader};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    // The fake server: reads a byte at a time, noting where the urgent
    // mark was, and answers each line.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        socket2::SockRef::from(&s)
            .set_out_of_band_inline(true)
            .unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(b"220 fake\r\n").unwrap();
        let (mut got, mut urgent) = (Vec::new(), Vec::new());
        let mut replies = [&b"225 one\r\n"[..], b"225 two\r\n", b"200 noop\r\n"].into_iter();
        let mut byte = [0u8];
        while !got.ends_with(b"NOOP\r\n") {
            // Wait for the byte first: the mark is known once it is there.
            if s.peek(&mut byte).unwrap() == 0 {
                break;
            }
            if at_mark(&s) {
                urgent.push(got.len());
            }
            if s.read(&mut byte).unwrap() == 0 {
                break;
            }
            got.push(byte[0]);
            if byte[0] == b'\n' {
                s.write_all(replies.next().unwrap_or(b"500 more\r\n"))
                    .unwrap();
            }
        }
        (got, urgent)
    });
    let gw = Gateway::reverse(upstream, "54300-54399", "").await;
    let client = std::net::TcpStream::connect(gw.addr).unwrap();
    // Shared with the clone tokio reads replies from; the few bytes sent
    // here always fit the send buffer.
    client.set_nonblocking(true).unwrap();
    let sock = socket2::SockRef::from(&client);
    let replies = tokio::net::TcpStream::from_std(client.try_clone().unwrap()).unwrap();
    let mut lines = BufReader::new(replies);
    let mut line = String::new();
    let mut reply = async || {
        line.clear();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            lines.read_line(&mut line),
        )
        .await
        .expect("a reply")
        .unwrap();
        line.clone()
    };
    assert_eq!(reply().await, "220 fake\r\n");
    // netkit, inetutils, tnftp: abort_remote().
    assert_eq!(sock.send_out_of_band(b"\xff\xf4\xff").unwrap(), 3);
    assert_eq!(sock.send(b"\xf2ABOR\r\n").unwrap(), 7);
    assert_eq!(reply().await, "225 one\r\n");
    // Python's ftplib: FTP.abort().
    assert_eq!(sock.send_out_of_band(b"ABOR\r\n").unwrap(), 6);
    assert_eq!(reply().await, "225 two\r\n");
    assert_eq!(sock.send(b"NOOP\r\n").unwrap(), 6);
    assert_eq!(reply().await, "200 noop\r\n");
    let (got, urgent) = server.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(b"\xff\xf4\xff\xf2ABOR\r\n\xff\xf4\xff\xf2ABOR\r\nNOOP\r\n")
    );
    assert_eq!(urgent, [2, 12], "urgent marks (the IAC before each DM)");
    assert!(gw.denials().is_empty(), "{:?}", gw.denials());
}
