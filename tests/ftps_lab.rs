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

#[path = "lab/prereq.rs"]
mod prereq;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SRV1: &str = "198.51.100.20";
const SRV2: &str = "198.51.100.21";
const SRV1_V6: &str = "2001:db8:2::20";
const GW_IN: &str = "192.0.2.1";
const ATTACKER_TARGET: &str = "198.51.100.30:2525";

struct Lab {
    prefix: String,
    gateway: Option<Child>,
}

impl Lab {
    fn state(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/fglab-{}", self.prefix))
    }

    fn tls(&self, file: &str) -> String {
        self.state().join("tls").join(file).display().to_string()
    }

    fn lab(&self, args: &[&str]) -> Output {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh"))
            .args(args)
            .env("FG_PREFIX", &self.prefix)
            .env("FG_STATE", self.state())
            .env("FG_TLS", "1")
            .output()
            .expect("run lab.sh")
    }

    /// Runs `cmd` in lab host `host`, bounded in time.
    fn exec(&self, host: &str, cmd: &[&str]) -> Output {
        let mut all = vec!["exec", host, "timeout", "60"];
        all.extend_from_slice(cmd);
        self.lab(&all)
    }

    fn expected_sha(&self, server: &str) -> String {
        let p = self.state().join(server).join("root/data.bin.sha256");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    fn denials(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state().join("deny.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn wait_denial(
        &self,
        reason: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .denials()
                .into_iter()
                .find(|v| v["reason"] == reason && pred(v));
            if found.is_some() || Instant::now() > until {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        if std::env::var_os("FG_KEEP_LAB").is_none() {
            self.lab(&["down"]);
        }
    }
}

use prereq::text;

fn sha256_file(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
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

{}{}{}{}{}
[data]
plane = "{plane}"
ports = "50000-50999"
accept_timeout = "5s"

[policy]
auth_tls = "passthrough"
require_tls = true

[[policy.tls_passthrough]]
name = "lab-vsftpd"
servers = ["{SRV1}/32", "{SRV1_V6}/128"]
data_ports = "40000-40100"

[deny_log]
path = "{}/deny.jsonl"

[admin]
bind = "127.0.0.1:9121"
"#,
        reverse(2100, SRV1, &ca, ""),
        reverse(2101, SRV2, &ca, "upstream_tls_name = \"srv2.fglab\""),
        reverse(2102, SRV1, &other, ""),
        reverse(2103, SRV1, &ca, "tls_implicit = true"),
        reverse(2104, &format!("{SRV1}:990"), &ca, ""),
        lab.state().display()
    );
    let path = lab.state().join("ftpgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_gateway(lab: &Lab, config: &Path) -> Child {
    let log = std::fs::File::create(lab.state().join("ftpgate.stderr")).unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("{}gw", lab.prefix)])
        .arg(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["--log-level", "debug", "run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if lab
            .exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/readyz"])
            .status
            .success()
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("gateway did not become ready");
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
    let o = out.join("curl-implicit");
    add(
        "curl implicit FTPS (ftps://), vsftpd".into(),
        "srv1",
        vec![
            "curl".into(),
            "-sS".into(),
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            format!("ftps://ftptest:ftptest@{GW_IN}:2103/data.bin"),
        ],
        o,
    );
    let o = out.join("curl-tls12");
    add(
        "curl --ssl-reqd --tls-max 1.2, vsftpd".into(),
        "srv1",
        vec![
            "curl".into(),
            "-sS".into(),
            "--ssl-reqd".into(),
            "--tls-max".into(),
            "1.2".into(),
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
        ],
        o,
    );
    let o = out.join("curl-upstream-implicit");
    add(
        "curl --ssl-reqd, implicit TLS upstream (vsftpd :990)".into(),
        "srv1",
        vec![
            "curl".into(),
            "-sS".into(),
            "--ssl-reqd".into(),
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            format!("ftp://ftptest:ftptest@{GW_IN}:2104/data.bin"),
        ],
        o,
    );
    let o = out.join("curl-passthrough");
    add(
        "curl --ssl-reqd through transparent passthrough, vsftpd".into(),
        "srv1",
        vec![
            "curl".into(),
            "-sS".into(),
            "--ssl-reqd".into(),
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            format!("ftp://ftptest:ftptest@{SRV1}/data.bin"),
        ],
        o,
    );
    let o = out.join("curl-passthrough-v6");
    add(
        "curl --ssl-reqd through transparent passthrough over IPv6, vsftpd".into(),
        "srv1",
        vec![
            "curl".into(),
            "-sS".into(),
            "--ssl-reqd".into(),
            "--cacert".into(),
            ca.clone(),
            "-o".into(),
            o.display().to_string(),
            format!("ftp://ftptest:ftptest@[{SRV1_V6}]/data.bin"),
        ],
        o,
    );
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
    let prefix = prereq::lab_prefix(base);
    let mut lab = Lab {
        prefix,
        gateway: None,
    };
    let up = lab.lab(&["up"]);
    assert!(up.status.success(), "lab up failed:\n{}", text(&up));
    let servers = lab.lab(&["start-servers"]);
    assert!(
        servers.status.success(),
        "start-servers failed:\n{}",
        text(&servers)
    );
    let out = lab.state().join("out");
    std::fs::create_dir_all(&out).unwrap();

    let config = gateway_config(&lab, plane);
    let check = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "check-config: {}", text(&check));
    let rules = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["nft-rules", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(rules.status.success(), "{}", text(&rules));
    let printed = String::from_utf8_lossy(&rules.stdout).to_string();
    for redirect in [
        "ip daddr { 198.51.100.20/32 } tcp dport 40000-40100 redirect to :2121",
        "ip6 daddr { 2001:db8:2::20/128 } tcp dport 40000-40100 redirect to :2121",
    ] {
        assert!(
            printed.contains(redirect),
            "nft-rules prints no {redirect}:\n{printed}"
        );
    }
    let rules_file = lab.state().join("rules.nft");
    std::fs::write(&rules_file, &rules.stdout).unwrap();
    let load = lab.exec("gw", &["nft", "-f", rules_file.to_str().unwrap()]);
    assert!(load.status.success(), "nft -f failed:\n{}", text(&load));
    if plane == "kernel" {
        let line = printed
            .lines()
            .find_map(|l| l.strip_prefix("#   ct mark "))
            .expect("nft-rules names the forward accept line");
        let rule = format!("ct mark {line}");
        let add = lab.exec(
            "gw",
            &["nft", "add", "rule", "inet", "fglab", "forward", &rule],
        );
        assert!(add.status.success(), "{}", text(&add));
    }
    lab.gateway = Some(start_gateway(&lab, &config));

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

    // A server whose certificate does not verify: 421 and a deny line.
    let wrong = lab.exec(
        "in1",
        &[
            "curl",
            "-sS",
            "-v",
            "--ssl-reqd",
            "--cacert",
            &ca,
            &format!("ftp://ftptest:ftptest@{GW_IN}:2102/data.bin"),
            "-o",
            &scratch,
        ],
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
    let plain = lab.exec(
        "in1",
        &[
            "curl",
            "-sS",
            "-v",
            &format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
            "-o",
            &scratch,
        ],
    );
    assert!(
        text(&plain).contains("< 530 TLS required"),
        "{}",
        text(&plain)
    );
    lab.wait_denial("tls_required", |v| v["verb"] == "USER")
        .expect("tls_required line for USER");

    // PROT P required: a data command without it gets 521.
    let no_prot = lab.exec(
        "in1",
        &[
            "python3",
            &client,
            GW_IN,
            "2100",
            &ca,
            &scratch,
            "--no-prot-p",
        ],
    );
    assert!(text(&no_prot).contains("521 "), "{}", text(&no_prot));
    lab.wait_denial("tls_required", |v| v["verb"] == "PASV")
        .expect("tls_required line for PASV");

    // Bounce on the terminated path: the gateway still reads the PORT.
    let bounce = lab.exec(
        "in1",
        &[
            "python3",
            &client,
            GW_IN,
            "2100",
            &ca,
            &scratch,
            "--bounce",
            ATTACKER_TARGET,
        ],
    );
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
        .env("FG_PREFIX", &lab.prefix)
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
    let other = lab.exec(
        "in1",
        &[
            "curl",
            "-sS",
            "--ssl-reqd",
            "--cacert",
            &ca,
            &format!("ftp://ftptest:ftptest@{SRV2}/data.bin"),
            "-o",
            &scratch,
        ],
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
    let pid = lab.gateway.as_ref().unwrap().id();
    // The child is `ip netns exec`, which execs ftpgate: the same pid.
    let _ = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let o = lab.exec(
            "in1",
            &[
                "curl",
                "-sS",
                "-v",
                "--ssl-reqd",
                "--cacert",
                &ca,
                &format!("ftp://ftptest:ftptest@{GW_IN}:2100/data.bin"),
                "-o",
                &scratch,
            ],
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
    let metrics = lab.exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
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
