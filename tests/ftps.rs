//! FTPS termination on loopback, without root: the gateway in-process with
//! a certificate made by the openssl CLI, a plain upstream (Debian's
//! pyftpdlib), real clients (curl, lftp, Python's ftplib). The TLS
//! upstream leg and the servers that demand TLS are in `tests/ftps_lab.rs`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{FtpClient, FtpServer, Gateway, curl, have, metric, scrape, skip};

/// A self-signed certificate for 127.0.0.1 and ::1 in `dir`: (cert, key).
fn make_cert(dir: &Path, cn: &str) -> Option<(String, String)> {
    let (cert, key) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,IP:::1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then(|| (cert.display().to_string(), key.display().to_string()))
}

struct Setup {
    server: FtpServer,
    gw: Gateway,
    cert: String,
    data: Vec<u8>,
    _certs: tempfile::TempDir,
}

async fn setup(test: &str, ports: &str, extra: &str) -> Option<Setup> {
    setup_on(test, "127.0.0.1:0", ports, extra).await
}

/// [`setup`] with the gateway's listener on `bind`.
async fn setup_on(test: &str, bind: &str, ports: &str, extra: &str) -> Option<Setup> {
    let Some(server) = FtpServer::start(None) else {
        skip(test, "Debian's python3-pyftpdlib is not installed");
        return None;
    };
    let certs = tempfile::tempdir().unwrap();
    let Some((cert, key)) = make_cert(certs.path(), "gw") else {
        skip(test, "the openssl CLI is not installed");
        return None;
    };
    let data = server.put_file("data.bin", 1 << 20);
    let keys = format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n");
    let gw = Gateway::reverse_on(bind, server.addr, ports, [&keys, extra, "", ""]).await;
    Some(Setup {
        server,
        gw,
        cert,
        data,
        _certs: certs,
    })
}

/// Runs a Python script (30 s at most); returns whether it succeeded and
/// what it printed, standard output first.
async fn python(script: &str) -> (bool, String) {
    let o = tokio::process::Command::new("timeout")
        .args(["30", "python3", "-c", script])
        .output()
        .await
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), said)
}

/// Downloads data.bin with `tests/lab/ftps_client.py` (ftplib, PROT P,
/// the control session resumed on data connections) from the gateway at
/// `host`; returns what it printed.
async fn ftplib_download(host: &str, s: &Setup, out: &str, active: bool) -> String {
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/ftps_client.py");
    let mut cmd = tokio::process::Command::new("timeout");
    cmd.args(["30", "python3"]).arg(&client);
    cmd.args([host, &s.gw.addr.port().to_string(), &s.cert, out]);
    if active {
        cmd.arg("--active");
    }
    let o = cmd.output().await.unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_download_intact_over_terminated_tls_with_a_plain_upstream() {
    let test = "clients_download_intact_over_terminated_tls_with_a_plain_upstream";
    let Some(s) = setup(test, "52600-52699", "").await else {
        return;
    };
    let out = s.gw.dir.path().join("out.bin");
    let out_s = out.to_str().unwrap().to_string();
    let url = format!("ftp://ftptest:ftptest@{}/data.bin", s.gw.addr);
    let mut ran = Vec::new();
    if have("curl") {
        // The Debian curl fails active FTPS even without a gateway.
        for (name, extra) in [("EPSV", None), ("PASV", Some("--disable-epsv"))] {
            let _ = std::fs::remove_file(&out);
            let mut args = vec!["--ssl-reqd", "--cacert", &s.cert, "-o", &out_s, &url];
            args.extend(extra);
            let (ok, err) = curl(&args).await;
            assert!(ok, "curl {name}: {err}; denials {:?}", s.gw.denials());
            assert!(
                std::fs::read(&out).unwrap() == s.data,
                "curl {name}: bytes differ"
            );
            ran.push(format!("curl {name}"));
        }
    }
    if have("lftp") {
        for passive in [true, false] {
            let _ = std::fs::remove_file(&out);
            let script = format!(
                "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {}; \
                 set ftp:passive-mode {passive}; set net:max-retries 1; set net:timeout 10; \
                 get data.bin -o {out_s}; bye",
                s.cert
            );
            let o = tokio::process::Command::new("timeout")
                .args(["30", "lftp", "-u", "ftptest,ftptest", "-e", &script])
                .arg(format!("ftp://{}", s.gw.addr))
                .output()
                .await
                .unwrap();
            assert!(
                o.status.success() && std::fs::read(&out).unwrap() == s.data,
                "lftp passive={passive}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            ran.push(format!("lftp passive={passive}"));
        }
    }
    for active in [false, true] {
        let _ = std::fs::remove_file(&out);
        let said = ftplib_download("127.0.0.1", &s, &out_s, active).await;
        assert!(
            said.contains("RESULT ok") && said.contains("reused=True"),
            "ftplib active={active}: {said}"
        );
        assert!(std::fs::read(&out).unwrap() == s.data);
        ran.push(format!("ftplib active={active}"));
    }
    println!("{test}: {}", ran.join(", "));
    drop(s.server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_pbsz_and_prot_are_answered_by_the_gateway_in_rfc_4217_order() {
    let test = "auth_pbsz_and_prot_are_answered_by_the_gateway_in_rfc_4217_order";
    let Some(s) = setup(test, "52700-52799", "[policy]\nrequire_tls = true\n").await else {
        return;
    };
    let mut c = FtpClient::connect(s.gw.addr).await;
    // Before AUTH: PBSZ/PROT are out of sequence, a login is refused.
    assert!(c.cmd("PBSZ 0").await.starts_with("503"));
    assert!(c.cmd("USER ftptest").await.starts_with("530 TLS required"));
    assert!(c.cmd("AUTH KERBEROS_V4").await.starts_with("504"));
    assert!(c.cmd("AUTH TLS").await.starts_with("234"));
    let d = s.gw.wait_denial("tls_required").await;
    assert_eq!(d["verb"], "USER");
    assert_eq!(d["rule"], "require_tls");
    drop(c);
    // A client that says AUTH TLS and then no TLS: the handshake fails,
    // the session ends with a deny line.
    let d = s.gw.wait_denial("tls_handshake_failed").await;
    assert_eq!(d["side"], "client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_unreadable_and_mismatched_certificates() {
    let test = "check_config_reports_unreadable_and_mismatched_certificates";
    let dir = tempfile::tempdir().unwrap();
    let (Some((cert, _)), Some((_, other_key))) =
        (make_cert(dir.path(), "a"), make_cert(dir.path(), "b"))
    else {
        return skip(test, "the openssl CLI is not installed");
    };
    let config = |cert: &str, key: &str| {
        format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"192.0.2.20:21\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\nupstream_tls = \"explicit\"\n\
             upstream_ca = \"{cert}\"\n"
        )
    };
    let check = |text: String| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (code, said) = check(config(&cert, &other_key));
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("does not go with"), "{said}");
    let (code, said) = check(config("/nonexistent/cert.pem", &other_key));
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("/nonexistent/cert.pem"), "{said}");
    let (code, said) = check(config(&cert, &cert.replace("a.pem", "a.key")));
    assert_eq!(code, Some(0), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_that_skips_its_tls_handshake_is_logged() {
    let test = "a_data_connection_that_skips_its_tls_handshake_is_logged";
    let Some(s) = setup(test, "52800-52899", "").await else {
        return;
    };
    // PROT P, then a plain connection to the pinhole: the gateway's TLS
    // server side sees no ClientHello.
    let script = format!(
        "import ftplib, socket, ssl\n\
         ctx = ssl.create_default_context(cafile='{}')\n\
         f = ftplib.FTP_TLS(context=ctx, timeout=10)\n\
         f.connect('127.0.0.1', {})\n\
         f.auth(); f.login('ftptest', 'ftptest'); f.prot_p()\n\
         port = ftplib.parse227(f.sendcmd('PASV'))[1]\n\
         d = socket.create_connection(('127.0.0.1', port), timeout=10)\n\
         d.sendall(b'not a ClientHello\\r\\n' * 8)\n\
         d.settimeout(10)\n\
         print('DATA', d.recv(100))\n",
        s.cert,
        s.gw.addr.port()
    );
    let (_, said) = python(&script).await;
    assert!(said.contains("DATA"), "{said}");
    let d = s.gw.wait_denial("tls_handshake_failed").await;
    assert_eq!(d["side"], "client");
    assert_eq!(d["rule"], "data_tls");
    drop(s.server);
}

/// An IPv6 client through TLS termination to an IPv4 upstream: EPSV and
/// EPRT name IPv6 pinholes inside the encrypted control channel, and the
/// data connections are TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_downloads_over_terminated_tls() {
    let test = "an_ipv6_client_downloads_over_terminated_tls";
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return skip(test, "no IPv6 loopback (::1) here");
    }
    let Some(s) = setup_on(test, "[::1]:0", "52900-52999", "").await else {
        return;
    };
    assert!(s.gw.addr.is_ipv6(), "{}", s.gw.addr);
    let out = s.gw.dir.path().join("out.bin");
    let out_s = out.to_str().unwrap().to_string();
    let mut ran = Vec::new();
    if have("curl") {
        let url = format!("ftp://ftptest:ftptest@{}/data.bin", s.gw.addr);
        let (ok, err) = curl(&["--ssl-reqd", "--cacert", &s.cert, "-o", &out_s, &url]).await;
        assert!(
            ok,
            "curl EPSV over IPv6: {err}; denials {:?}",
            s.gw.denials()
        );
        assert!(std::fs::read(&out).unwrap() == s.data, "curl: bytes differ");
        ran.push("curl EPSV".to_string());
    }
    for active in [false, true] {
        let _ = std::fs::remove_file(&out);
        let said = ftplib_download("::1", &s, &out_s, active).await;
        assert!(
            said.contains("RESULT ok"),
            "ftplib over IPv6, active={active}: {said}; denials {:?}",
            s.gw.denials()
        );
        assert!(std::fs::read(&out).unwrap() == s.data);
        ran.push(format!("ftplib {}", if active { "EPRT" } else { "EPSV" }));
    }
    println!("{test}: {}", ran.join(", "));
    drop(s.server);
}

/// ABOR inside the TLS control channel (no urgent data: TLS has none, so
/// ftplib's FTP_TLS sends it in-band) while a PROT P download runs: the
/// server's 426/226 come back through the gateway, the data connection
/// ends, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abor_over_a_tls_control_channel_stops_the_transfer_and_the_session_goes_on() {
    let test = "abor_over_a_tls_control_channel_stops_the_transfer_and_the_session_goes_on";
    let Some(s) = setup(test, "53000-53099", "").await else {
        return;
    };
    s.server.put_file("big.bin", 32 << 20);
    let script = format!(
        "import ftplib, ssl\n\
         ctx = ssl.create_default_context(cafile='{}')\n\
         f = ftplib.FTP_TLS(context=ctx, timeout=10)\n\
         f.connect('127.0.0.1', {})\n\
         f.login('ftptest', 'ftptest'); f.prot_p()\n\
         conn = f.transfercmd('RETR big.bin')\n\
         got = len(conn.recv(65536))\n\
         resp = f.abort()\n\
         print('ABORT', resp)\n\
         conn.close()\n\
         if resp.startswith('426'):\n\
         \x20   print('THEN', f.getmultiline())\n\
         print('NOOP', f.sendcmd('NOOP'))\n\
         print('GOT', got)\n",
        s.cert,
        s.gw.addr.port()
    );
    let (ok, said) = python(&script).await;
    assert!(ok, "{said}");
    let abort = said.lines().find(|l| l.starts_with("ABORT")).unwrap_or("");
    assert!(
        abort.starts_with("ABORT 426") || abort.starts_with("ABORT 226"),
        "{said}"
    );
    assert!(said.contains("NOOP 200"), "{said}");
    // The aborted transfer's relay is gone, not left running.
    let admin = s.gw.running.admin.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(&scrape(admin).await, "ftpgate_data_connections_active", &[]) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the aborted relay stays"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!("{test}: {}", said.lines().collect::<Vec<_>>().join(" | "));
    drop(s.server);
}
