//! FTPS through the gateway in the NAT lab (`tests/lab/lab.sh` with
//! `FG_TLS=1`): vsftpd with `ssl_enable`, `force_local_logins_ssl`,
//! `force_local_data_ssl` and `require_ssl_reuse`, proftpd with mod_tls and
//! `TLSRequired on`, certificates made at lab setup.
//!
//! Reverse listeners terminate TLS (the gateway's certificate, signed by
//! the lab CA) with an explicit TLS leg upstream, verified against the lab
//! CA; one listener verifies against another CA (a wrong certificate), one
//! is implicit toward the client, one speaks implicit TLS to vsftpd on port
//! 990; the proftpd listener verifies a DNS name (`upstream_tls_name`). The transparent listener passes AUTH TLS through to vsftpd
//! only (`[[policy.tls_passthrough]]`). Clients: curl `--ssl-reqd` (EPSV
//! and PASV), lftp `ftp:ssl-force` (passive and active), Python's
//! `ftplib.FTP_TLS` with session reuse (passive and active). Every
//! transfer's sha256 is checked; bounce and PASV theft are still refused
//! on the terminated path; a wrong upstream certificate, a login before
//! AUTH and a client that skips PROT P are refused with their replies and
//! deny lines; a new certificate is served after SIGHUP. Both data planes
//! (two labs, side by side).
//!
//! Root only; prints `SKIPPED` and passes otherwise.

#[path = "lab/kit.rs"]
mod kit;
#[path = "lab/prereq.rs"]
mod prereq;
#[path = "lab/rules.rs"]
mod rules;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kit::{GW_IN, LabGuard, LabSh, SRV1, SRV1_V6, SRV2, sha256_file};
use prereq::text;

const ATTACKER_TARGET: &str = "198.51.100.30:2525";

/// The lab with FTPS-only servers, torn down when the test ends.
struct Lab {
    guard: LabGuard,
}

impl Lab {
    fn sh(&self) -> &LabSh {
        &self.guard.sh
    }

    fn state(&self) -> PathBuf {
        self.sh().state.clone()
    }

    fn tls(&self, file: &str) -> String {
        self.state().join("tls").join(file).display().to_string()
    }

    /// Runs `cmd` in lab host `host`, bounded in time.
    fn exec(&self, host: &str, cmd: &[&str]) -> std::process::Output {
        self.sh().exec(host, cmd)
    }

    fn expected_sha(&self, server: &str) -> String {
        self.sh().expected_sha(server)
    }

    fn wait_denial(
        &self,
        reason: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        kit::wait_denial(&self.state().join("deny.jsonl"), reason, pred)
    }
}

fn gateway_config(lab: &Lab, plane: &str) -> PathBuf {
    let (cert, key, ca, other) = (
        lab.tls("gw.pem"),
        lab.tls("gw.key"),
        lab.tls("ca.pem"),
        lab.tls("other-ca.pem"),
    );
    let reverse = |port: u16, upstream: &str, ca: &str, extra: &str| {
        let (upstream, tls) = match upstream.strip_suffix(":990") {
            Some(host) => (format!("{host}:990"), "implicit"),
            None => (format!("{upstream}:21"), "explicit"),
        };
        format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"{GW_IN}:{port}\"]\nupstream = \"{upstream}\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\nupstream_tls = \"{tls}\"\n\
             upstream_ca = \"{ca}\"\n{extra}\n"
        )
    };
    let text = format!(
        r#"
[[listener]]
mode = "transparent"
bind = ["0.0.0.0:2121", "[::]:2121"]
interfaces = ["br-in"]

{}{}{}{}{}{}
[policy]
auth_tls = "passthrough"
require_tls = true

[[policy.tls_passthrough]]
name = "lab-vsftpd"
servers = ["{SRV1}/32", "{SRV1_V6}/128"]
data_ports = "40000-40100"
"#,
        reverse(2100, SRV1, &ca, ""),
        reverse(2101, SRV2, &ca, "upstream_tls_name = \"srv2.fglab\""),
        reverse(2102, SRV1, &other, ""),
        reverse(2103, SRV1, &ca, "tls_implicit = true"),
        reverse(2104, &format!("{SRV1}:990"), &ca, ""),
        kit::config_tables(plane, &lab.state()),
    );
    let path = lab.state().join("ftpgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One download: the command and where its bytes land.
struct Cell {
    name: String,
    cmd: Vec<String>,
    out: PathBuf,
    server: &'static str,
}

fn matrix(lab: &Lab, out: &Path) -> Vec<Cell> {
    let ca = lab.tls("ca.pem");
    let client = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lab/ftps_client.py")
        .display()
        .to_string();
    let mut cells = Vec::new();
    let mut add = |name: String, server: &'static str, cmd: Vec<String>, out: PathBuf| {
        cells.push(Cell {
            name,
            cmd,
            out,
            server,
        })
    };
    for (port, server, label) in [(2100, "srv1", "vsftpd"), (2101, "srv2", "proftpd")] {
        let url = format!("ftp://ftptest:ftptest@{GW_IN}:{port}/data.bin");
        for (mode, flag) in [("EPSV", None), ("PASV", Some("--disable-epsv"))] {
            let o = out.join(format!("curl-{label}-{mode}"));
            let mut cmd = vec!["curl", "-sS", "--ssl-reqd", "--cacert", &ca];
            cmd.extend(flag);
            let o_s = o.display().to_string();
            cmd.extend(["-o", &o_s, &url]);
            let cmd = cmd.into_iter().map(String::from).collect();
            add(format!("curl --ssl-reqd {mode}, {label}"), server, cmd, o);
        }
        for passive in [true, false] {
            let o = out.join(format!("lftp-{label}-{passive}"));
            let script = format!(
                "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {ca}; \
                 set ftp:passive-mode {passive}; set net:max-retries 1; set net:timeout 15; \
                 get data.bin -o {}; bye",
                o.display()
            );
            let cmd = vec![
                "lftp".to_string(),
                "-u".into(),
                "ftptest,ftptest".into(),
                "-e".into(),
                script,
                format!("ftp://{GW_IN}:{port}"),
            ];
            let mode = if passive { "passive" } else { "active" };
            add(format!("lftp ssl-force {mode}, {label}"), server, cmd, o);
        }
        for active in [false, true] {
            let o = out.join(format!("ftplib-{label}-{active}"));
            let mut cmd = vec![
                "python3".to_string(),
                client.clone(),
                GW_IN.into(),
                port.to_string(),
                ca.clone(),
                o.display().to_string(),
            ];
            if active {
                cmd.push("--active".into());
            }
            let mode = if active { "active" } else { "passive" };
            add(
                format!("ftplib FTP_TLS (session reuse) {mode}, {label}"),
                server,
                cmd,
                o,
            );
        }
    }
    // curl to vsftpd: `flags` come before the CA, the output and the URL.
    let curls: [(&str, &str, &[&str], String); 5] = [
        (
            "curl-implicit",
            "curl implicit FTPS (ftps://), vsftpd",
            &[],
            format!("ftps://ftptest:ftptest@{GW_IN}:2103/data.bin"),
        ),
        (
            "curl-tls12",
            "curl --ssl-reqd --tls-max 1.2, vsftpd",
            &["--ssl-reqd", "--tls-max", "1.2"],
            format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
        ),
        (
            "curl-upstream-implicit",
            "curl --ssl-reqd, implicit TLS upstream (vsftpd :990)",
            &["--ssl-reqd"],
            format!("ftp://ftptest:ftptest@{GW_IN}:2104/data.bin"),
        ),
        (
            "curl-passthrough",
            "curl --ssl-reqd through transparent passthrough, vsftpd",
            &["--ssl-reqd"],
            format!("ftp://ftptest:ftptest@{SRV1}/data.bin"),
        ),
        (
            "curl-passthrough-v6",
            "curl --ssl-reqd through transparent passthrough over IPv6, vsftpd",
            &["--ssl-reqd"],
            format!("ftp://ftptest:ftptest@[{SRV1_V6}]/data.bin"),
        ),
    ];
    for (file, name, flags, url) in curls {
        let o = out.join(file);
        let mut cmd = vec!["curl".to_string(), "-sS".into()];
        cmd.extend(flags.iter().map(|f| f.to_string()));
        cmd.extend([
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            url,
        ]);
        add(name.into(), "srv1", cmd, o);
    }
    let o = out.join("lftp-passthrough");
    add(
        "lftp ssl-force through transparent passthrough, vsftpd".into(),
        "srv1",
        vec![
            "lftp".into(),
            "-u".into(),
            "ftptest,ftptest".into(),
            "-e".into(),
            format!(
                "set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {ca}; \
                 set net:max-retries 1; set net:timeout 15; get data.bin -o {}; bye",
                o.display()
            ),
            format!("ftp://{SRV1}"),
        ],
        o,
    );
    cells
}

#[test]
fn ftps_lab_proxy_plane_terminates_and_passes_through_with_every_policy() {
    run_lab("fgs-", "proxy");
}

#[test]
fn ftps_lab_kernel_plane_relays_tls_data_in_userland() {
    run_lab("fgz-", "kernel");
}

fn run_lab(base: &str, plane: &str) {
    if let Some(why) = prereq::lab_missing(&["ip", "nft", "vsftpd", "curl", "lftp", "openssl"]) {
        println!("SKIPPED ftps_lab ({plane} plane): {why} (run scripts/test as root)");
        return;
    }
    let mut sh = LabSh::new(&prereq::lab_prefix(base));
    sh.tls = true;
    let mut lab = Lab {
        guard: LabGuard::new(sh),
    };
    lab.sh().up_with_servers();
    let out = lab.state().join("out");
    std::fs::create_dir_all(&out).unwrap();

    let config = gateway_config(&lab, plane);
    kit::check_config(&config);
    let gw = format!("{}gw", lab.sh().prefix);
    let printed = rules::load_printed_rules(&config, &lab.state(), &gw, plane);
    for redirect in [
        "ip daddr { 198.51.100.20/32 } tcp dport 40000-40100 redirect to :2121",
        "ip6 daddr { 2001:db8:2::20/128 } tcp dport 40000-40100 redirect to :2121",
    ] {
        assert!(
            printed.contains(redirect),
            "nft-rules prints no {redirect}:\n{printed}"
        );
    }
    let log = lab.state().join("ftpgate.stderr");
    lab.guard.gateway = Some(lab.sh().start_gateway(&config, &log, false));

    // ---- transfers: every checksum must match ---------------------------
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for cell in matrix(&lab, &out) {
        let args: Vec<&str> = cell.cmd.iter().map(String::as_str).collect();
        let started = Instant::now();
        let o = lab.exec("in1", &args);
        let sum = sha256_file(&cell.out);
        let ok = o.status.success() && sum == lab.expected_sha(cell.server);
        if cell.name.starts_with("ftplib") && ok {
            assert!(
                text(&o).contains("reused=True"),
                "{}: the gateway did not let the client resume: {}",
                cell.name,
                text(&o)
            );
        }
        report.push(format!(
            "{:<66} {} ({:.2}s)",
            cell.name,
            if ok { "pass" } else { "FAIL" },
            started.elapsed().as_secs_f64()
        ));
        if !ok {
            failures.push(format!(
                "{}: exit {:?}, sha256 {sum:?}\n{}",
                cell.name,
                o.status.code(),
                text(&o)
            ));
        }
    }
    println!("ftps lab, {plane} plane:\n{}", report.join("\n"));
    if !failures.is_empty() {
        let log = std::fs::read_to_string(lab.state().join("ftpgate.stderr")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!(
            "{} transfer(s) failed:\n{}\n--- gateway log (last lines, newest first) ---\n{}",
            failures.len(),
            failures.join("\n"),
            tail.join("\n")
        );
    }
    let passthrough = lab
        .wait_denial("tls_passthrough", |v| {
            v["argument"] == "data_ports 40000-40100" && v["rule"] == "lab-vsftpd"
        })
        .expect("a tls_passthrough line with the range granted");
    assert_eq!(passthrough["mode"], "transparent");

    // ---- an upload through termination (STOR over PROT P) --------------
    let upload = out.join("upload.bin");
    let made = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 2000000 /dev/urandom > {}",
            upload.display()
        ))
        .status()
        .unwrap();
    assert!(made.success());
    let up = lab.exec(
        "in1",
        &[
            "curl",
            "-sS",
            "--ssl-reqd",
            "--cacert",
            &lab.tls("ca.pem"),
            "-T",
            upload.to_str().unwrap(),
            &format!("ftp://ftptest:ftptest@{GW_IN}:2100/upload.bin"),
        ],
    );
    assert!(up.status.success(), "upload: {}", text(&up));
    assert_eq!(
        sha256_file(&lab.state().join("srv1/root/upload.bin")),
        sha256_file(&upload),
        "the uploaded file differs"
    );

    // ---- refusals -------------------------------------------------------
    let ca = lab.tls("ca.pem");
    let client = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lab/ftps_client.py")
        .display()
        .to_string();
    let scratch = out.join("scratch").display().to_string();
    // curl on in1, what it downloads thrown away; `flags` before the URL.
    let curl = |flags: &[&str], url: &str| {
        let mut cmd = vec!["curl", "-sS"];
        cmd.extend_from_slice(flags);
        cmd.extend([url, "-o", &scratch]);
        lab.exec("in1", &cmd)
    };
    // tests/lab/ftps_client.py on in1 against the vsftpd listener, with `extra`.
    let ftps_client = |extra: &[&str]| {
        let mut cmd = vec!["python3", &client, GW_IN, "2100", &ca, &scratch];
        cmd.extend_from_slice(extra);
        lab.exec("in1", &cmd)
    };

    // A server whose certificate does not verify: 421 and a deny line.
    let wrong = curl(
        &["-v", "--ssl-reqd", "--cacert", &ca],
        &format!("ftp://ftptest:ftptest@{GW_IN}:2102/data.bin"),
    );
    assert!(!wrong.status.success());
    assert!(
        text(&wrong)
            .contains("< 421 Service not available: the server's TLS certificate did not verify."),
        "{}",
        text(&wrong)
    );
    lab.wait_denial("tls_upstream_verify_failed", |v| {
        v["argument"]
            .as_str()
            .is_some_and(|a| a.contains("UnknownIssuer"))
    })
    .expect("tls_upstream_verify_failed line");

    // require_tls: a cleartext login is refused before it reaches the server.
    let plain = curl(
        &["-v"],
        &format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
    );
    assert!(
        text(&plain).contains("< 530 TLS required"),
        "{}",
        text(&plain)
    );
    lab.wait_denial("tls_required", |v| v["verb"] == "USER")
        .expect("tls_required line for USER");

    // PROT P required: a data command without it gets 521.
    let no_prot = ftps_client(&["--no-prot-p"]);
    assert!(text(&no_prot).contains("521 "), "{}", text(&no_prot));
    lab.wait_denial("tls_required", |v| v["verb"] == "PASV")
        .expect("tls_required line for PASV");

    // Bounce on the terminated path: the gateway still reads the PORT.
    let bounce = ftps_client(&["--bounce", ATTACKER_TARGET]);
    assert!(
        text(&bounce).contains("RESULT reply 504"),
        "{}",
        text(&bounce)
    );
    lab.wait_denial("bounce", |v| v["target"] == ATTACKER_TARGET)
        .expect("bounce line");

    // PASV theft on the terminated path: the attacker's connection to the
    // victim's pinhole is refused and logged.
    let mut victim = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh"))
        .args([
            "exec", "in1", "timeout", "30", "python3", &client, GW_IN, "2100",
        ])
        .args([&ca, &scratch, "--pasv-hold", "4"])
        .env("FG_PREFIX", &lab.sh().prefix)
        .env("FG_STATE", lab.state())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut victim_out = std::io::BufReader::new(victim.stdout.take().unwrap());
    {
        use std::io::BufRead;
        victim_out.read_line(&mut line).unwrap();
    }
    let port = line
        .strip_prefix("PASV ")
        .map(str::trim)
        .unwrap_or_else(|| panic!("victim said {line:?}"))
        .to_string();
    let thief = lab.exec(
        "in2",
        &[
            "python3",
            "-c",
            &format!(
                "import socket\ns=socket.create_connection(('{GW_IN}',{port}),timeout=3)\n\
                 s.settimeout(3)\nprint('GOT', len(s.recv(100)))"
            ),
        ],
    );
    {
        // The rest of what the victim says, so it never writes to a closed
        // pipe.
        use std::io::Read;
        let _ = victim_out.read_to_string(&mut String::new());
    }
    let _ = victim.wait();
    assert!(
        !text(&thief).contains("GOT 1") && lab.wait_denial("pasv_theft", |_| true).is_some(),
        "theft not refused: {}",
        text(&thief)
    );

    // A server no passthrough rule names keeps getting 534.
    let other = curl(
        &["--ssl-reqd", "--cacert", &ca],
        &format!("ftp://ftptest:ftptest@{SRV2}/data.bin"),
    );
    assert!(!other.status.success());
    lab.wait_denial("auth_refused", |v| {
        v["server"].as_str().is_some_and(|s| s.starts_with(SRV2))
    })
    .expect("auth_refused for the server without a rule");

    // ---- SIGHUP: a new certificate for new sessions ---------------------
    let state = lab.state();
    let t = state.join("tls");
    let resign = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && openssl req -newkey rsa:2048 -nodes -subj '/CN=fglab gw reloaded' \
             -keyout gw2.key -out gw2.csr >/dev/null 2>&1 && openssl x509 -req -in gw2.csr \
             -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile gw.ext -out gw2.pem \
             >/dev/null 2>&1 && cp gw2.key gw.key && cp gw2.pem gw.pem",
            t.display()
        ))
        .status()
        .unwrap();
    assert!(resign.success());
    let pid = lab.guard.gateway.as_ref().unwrap().id();
    // The child is `ip netns exec`, which execs ftpgate: the same pid.
    let _ = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let o = curl(
            &["-v", "--ssl-reqd", "--cacert", &ca],
            &format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
        );
        if text(&o).contains("CN=fglab gw reloaded") && o.status.success() {
            break;
        }
        assert!(
            Instant::now() < until,
            "the reloaded certificate is not served: {}",
            text(&o)
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // ---- metrics ---------------------------------------------------------
    let metrics = lab.sh().metrics();
    for needle in [
        "ftpgate_tls_handshakes_total{side=\"client\",result=\"ok\"}",
        "ftpgate_tls_handshakes_total{side=\"server\",result=\"ok\"}",
        "ftpgate_tls_handshakes_total{side=\"server\",result=\"failed\"}",
        "ftpgate_tls_handshakes_total{side=\"client_data\",result=\"ok\"}",
        "ftpgate_tls_handshakes_total{side=\"server_data\",result=\"ok\"}",
        "ftpgate_tls_passthrough_sessions_total",
        "ftpgate_tls_sessions_total{state=\"terminated\"}",
        "ftpgate_denials_total{reason=\"tls_required\"",
        "ftpgate_denials_total{reason=\"tls_upstream_verify_failed\"",
    ] {
        assert!(metrics.contains(needle), "no {needle} in:\n{metrics}");
    }
}
