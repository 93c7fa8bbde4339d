//! The NAT lab: network namespaces with an inside client, an inside
//! attacker, the gateway (forwarding dropped, so data can only pass through
//! ftpgate's pinholes), vsftpd, proftpd and pure-ftpd outside, and a bounce
//! target. ftpgate runs in transparent mode with the nftables rules it
//! prints itself.
//!
//! Needs root, iproute2, nftables, vsftpd, proftpd, pure-ftpd, curl and lftp, which
//! `scripts/install-test-deps` installs; skipped (and says so) otherwise.

mod classic;
#[path = "lab/kit.rs"]
mod kit;
#[path = "lab/prereq.rs"]
mod prereq;
#[path = "lab/rules.rs"]
mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kit::{
    GW_IN, GW_OUT, LabGuard, LabSh, OUT3, SRV1, SRV1_V6, SRV2, SRV2_V6, SRV3, SRV3_V6, sha256_file,
};
use prereq::text;

thread_local! {
    /// The namespace prefix of the lab this test thread runs: each plane
    /// gets its own lab, so the two tests can run side by side.
    static PREFIX: std::cell::Cell<&'static str> = const { std::cell::Cell::new("fgt-") };
}

fn prefix() -> &'static str {
    PREFIX.with(|p| p.get())
}
/// The port of the reverse listener that publishes srv1 on [`GW_IN`].
const REVERSE_PORT: u16 = 2100;

/// `lab.sh` for this thread's lab.
fn sh() -> LabSh {
    LabSh::new(prefix())
}

fn state_dir() -> PathBuf {
    sh().state
}

/// Runs `cmd` in the lab host `host`, bounded in time.
fn exec(host: &str, cmd: &[&str]) -> Output {
    sh().exec(host, cmd)
}

fn missing_prerequisite() -> Option<String> {
    prereq::lab_missing(&["ip", "nft", "vsftpd", "curl", "lftp"])
}

fn gateway_config(dir: &Path, fxp: bool, plane: &str) -> PathBuf {
    let mut text = format!(
        r#"
[[listener]]
mode = "transparent"
bind = ["0.0.0.0:2121", "[::]:2121"]
interfaces = ["br-in"]

[[listener]]
mode = "reverse"
bind = ["{GW_IN}:{REVERSE_PORT}"]
upstream = "{SRV1}:21"
{}"#,
        kit::config_tables(plane, dir)
    );
    if fxp {
        text.push_str(
            "\n[[policy.fxp]]\nname = \"lab-servers\"\nservers = [\"198.51.100.0/24\"]\n",
        );
    }
    let path = dir.join("ftpgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn denials(dir: &Path) -> Vec<serde_json::Value> {
    kit::denials(&dir.join("deny.jsonl"))
}

fn wait_denial(dir: &Path, reason: &str) -> Option<serde_json::Value> {
    wait_denial_where(dir, reason, |_| true)
}

/// Waits for the first deny line of `reason` for which `pred` holds.
fn wait_denial_where(
    dir: &Path,
    reason: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    kit::wait_denial(&dir.join("deny.jsonl"), reason, pred)
}

/// The client address of a deny line, without its port.
fn denial_client(v: &serde_json::Value) -> Option<&str> {
    v["client"].as_str()?.rsplit_once(':').map(|(ip, _)| ip)
}

fn expected_sha(server: &str) -> String {
    sh().expected_sha(server)
}

fn metric(name_and_labels: &str) -> f64 {
    sh().metric(name_and_labels)
}

/// Starts tests/lab/race.py on in1 as the victim of a pinhole race: it logs
/// in to srv1, sends PASV and waits for `signal` before using the pinhole.
/// Returns the process and its first line (`PASV <address> <port>`).
fn pasv_victim(signal: &Path) -> (Child, String) {
    let mut victim = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}in1", prefix()),
            "timeout",
            "60",
            "python3",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/race.py"))
        .args(["pasv", SRV1])
        .arg(signal)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    {
        use std::io::BufRead;
        let stdout = victim.stdout.as_mut().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut first)
            .unwrap();
    }
    (victim, first)
}

/// Runs a Python 3 snippet in the lab host `host`.
fn python(host: &str, code: &str) -> Output {
    exec(host, &["python3", "-c", code])
}

/// What only the kernel plane has: a used element is gone (a second
/// connection to the same pinhole gets nothing), and an expired pinhole's
/// elements are gone from the kernel (read back over netlink with
/// `ftpgate pinholes`).
fn kernel_plane_checks(dir: &Path) {
    let pinholes = || {
        let o = exec("gw", &[env!("CARGO_BIN_EXE_ftpgate"), "pinholes"]);
        assert!(o.status.success(), "ftpgate pinholes: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let refused_before = metric("ftpgate_pinhole_connections_refused_total");
    let second = python(
        "in1",
        &format!(
            "import ftplib, socket\n\
             f = ftplib.FTP('{SRV1}', timeout=10)\n\
             f.login('ftptest', 'ftptest')\n\
             f.voidcmd('TYPE I')\n\
             host, port = ftplib.parse227(f.sendcmd('PASV'))\n\
             d = socket.create_connection((host, port), timeout=5)\n\
             f.sendcmd('RETR data.bin')\n\
             n = 0\n\
             while True:\n    b = d.recv(65536)\n    if not b: break\n    n += len(b)\n\
             d.close()\n\
             print('FIRST', n, f.voidresp())\n\
             got = 0\n\
             try:\n    s = socket.create_connection((host, port), timeout=3)\n    s.settimeout(3)\n    got = len(s.recv(65536))\n\
             except OSError as e:\n    print('SECOND error', type(e).__name__)\n\
             print('SECOND bytes', got)\n"
        ),
    );
    let said = text(&second);
    assert!(said.contains("FIRST 3145728 226"), "first transfer: {said}");
    // The second connection matched no element and fell through to
    // ftpgate's listener, which found no pinhole there and refused it (had
    // the element survived, the server's closed port would have answered).
    assert_eq!(
        metric("ftpgate_pinhole_connections_refused_total") - refused_before,
        1.0,
        "{said}"
    );
    assert!(
        said.contains("SECOND bytes 0"),
        "second connection got data: {said}"
    );
    eprintln!(
        "  kernel: second connection to a used pinhole               gets nothing (element consumed)"
    );

    // A pinhole nobody connects to: its elements exist, then expire with
    // the core's clock (accept_timeout 5s) and are deleted.
    let waiter = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}in1", prefix()),
            "timeout",
            "30",
            "python3",
            "-c",
        ])
        .arg(format!(
            "import ftplib, time\n\
             f = ftplib.FTP('{SRV1}', timeout=10)\n\
             f.login('ftptest', 'ftptest')\n\
             host, port = ftplib.parse227(f.sendcmd('PASV'))\n\
             print(port, flush=True)\n\
             time.sleep(9)\n"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut waiter = waiter;
    let mut port = String::new();
    {
        use std::io::BufRead;
        std::io::BufReader::new(waiter.stdout.as_mut().unwrap())
            .read_line(&mut port)
            .unwrap();
    }
    let port = port.trim().to_string();
    let live = pinholes();
    eprintln!("  ftpgate pinholes while port {port} waits:\n{live}");
    assert!(
        live.lines()
            .any(|l| l.starts_with("armed4")
                && l.contains(&format!("192.0.2.10 to 192.0.2.1:{port}"))),
        "no armed element for port {port}:\n{live}"
    );
    assert!(
        live.lines()
            .any(|l| l.starts_with("dnat4") && l.contains(&format!(":{port} -> {SRV1}:"))),
        "{live}"
    );
    let suffix = format!(":{port}");
    let until = Instant::now() + Duration::from_secs(15);
    while !denials(dir).iter().any(|d| {
        d["reason"] == "pinhole_expired"
            && d["target"].as_str().is_some_and(|t| t.ends_with(&suffix))
    }) {
        assert!(
            Instant::now() < until,
            "no pinhole_expired deny line for port {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = pinholes();
    assert!(
        !after.contains(&format!(":{port}")),
        "elements outlived the pinhole:\n{after}"
    );
    let _ = waiter.wait();
    eprintln!(
        "  kernel: unused pinhole                                      expired (deny pinhole_expired), elements deleted"
    );
}

/// A client closes its control connection in the middle of a download it
/// does not read: the data connection must end with the session (proxy: the
/// relay is cancelled; kernel: the conntrack flow is deleted), before the
/// client reads another byte.
fn data_connection_ends_with_its_session(dir: &Path, plane: &str) {
    const ACTIVE: &str = "ftpgate_data_connections_active";
    let go = dir.join("read-now");
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}in1", prefix()),
            "timeout",
            "40",
            "python3",
            "-c",
        ])
        .arg(format!(
            "import ftplib, os, socket, time\n\
             f = ftplib.FTP('{SRV1}', timeout=10)\n\
             f.login('ftptest', 'ftptest')\n\
             f.voidcmd('TYPE I')\n\
             host, port = ftplib.parse227(f.sendcmd('PASV'))\n\
             d = socket.socket()\n\
             d.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n\
             d.settimeout(10)\n\
             d.connect((host, port))\n\
             print(f.sendcmd('RETR data.bin'), flush=True)\n\
             time.sleep(1)\n\
             f.close()\n\
             print('CLOSED', flush=True)\n\
             until = time.time() + 20\n\
             while not os.path.exists('{}') and time.time() < until: time.sleep(0.05)\n\
             n, how = 0, 'eof'\n\
             try:\n    while True:\n        b = d.recv(65536)\n        if not b: break\n        n += len(b)\n\
             except OSError as e:\n    how = type(e).__name__\n\
             print('DATA', n, how, flush=True)\n",
            go.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(client.stdout.as_mut().unwrap());
        while !said.contains("CLOSED") {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            said.push_str(&line);
        }
    }
    assert!(said.contains("150") && said.contains("CLOSED"), "{said}");
    let until = Instant::now() + Duration::from_secs(5);
    while metric(ACTIVE) != 0.0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let active = metric(ACTIVE);
    std::fs::write(&go, b"go").unwrap();
    let done = client.wait_with_output().unwrap();
    said.push_str(&text(&done));
    assert_eq!(
        active, 0.0,
        "{plane}: data connections outlived their session: {said}"
    );
    let n: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("DATA "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        n < 3 * 1024 * 1024,
        "{plane}: the whole file was carried after its session ended: {said}"
    );
    eprintln!(
        "  control closed mid-download                                 data connection ended with it ({n} bytes read after)"
    );
}

/// The classic clients (inetutils-ftp, tnftp) interrupted with ^C in the
/// middle of a download, through the transparent gateway. They abort with
/// Telnet IP, a Synch as TCP urgent data and ABOR (RFC 959 section 4.1.3),
/// then read the data connection to its end before they read the replies.
/// The servers' egress is rate-limited (tc tbf, 1 MB/s), so the transfer
/// is still running when ^C comes.
///
/// vsftpd (`async_abor_enable`) reads its control connection during a
/// transfer only on SIGURG, i.e. when urgent data arrives: from a 1 GiB
/// file it must stop at once (426, 226), which it only does if the gateway
/// sent the Synch on as urgent data. proftpd 1.3.8 gets no SIGURG here,
/// with or without the gateway (its session sets F_SETOWN on the control
/// connection before it takes the user's uid, and the kernel then refuses
/// the signal), so it reads ABOR when the transfer ends: a 1 MiB file, and
/// ABOR must still be answered after the transfer's reply (the clients
/// then take about 10 s to show their prompt, without the gateway too).
/// pure-ftpd watches its control connection during a transfer and stops at
/// an ABOR whether or not it came urgent: from a 1 GiB file, at once.
fn classic_clients_abort(dir: &Path) {
    let mut failures = Vec::new();
    // vsftpd logs commands and replies, proftpd one line per command;
    // pure-ftpd (syslog, `-d -d`) logs no command line for an ABOR it
    // reads during a transfer, only its reply "426 ABORT".
    let servers = [
        (
            "srv1",
            "vsftpd",
            SRV1,
            ("vsftpd.log", "FTP command"),
            1u64 << 30,
            classic::Expect::Aborted,
        ),
        (
            "srv2",
            "proftpd",
            SRV2,
            ("commands.log", ""),
            1 << 20,
            classic::Expect::Finished,
        ),
        (
            "srv3",
            "pure-ftpd",
            SRV3,
            ("syslog.log", "426 ABORT"),
            1 << 30,
            classic::Expect::Aborted,
        ),
    ];
    let aborts_logged = |server: &str, (log, kind): (&str, &str)| {
        std::fs::read_to_string(state_dir().join(server).join(log))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(kind) && l.contains("ABOR"))
            .count()
    };
    for (server, make, addr, log, size, expect) in servers {
        let shape = [
            "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "8mbit", "burst",
            "32kb", "latency", "100ms",
        ];
        let o = exec(server, &shape);
        assert!(o.status.success(), "tc: {}", text(&o));
        // Sparse: the server reads zeros.
        let big = state_dir().join(server).join("root/big.bin");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(size))
            .unwrap();
        let before = aborts_logged(server, log);
        let mut ran = 0;
        for (client, mode) in [("inetutils-ftp", "active"), ("tnftp", "passive")] {
            let Some(binary) = classic::find(client) else {
                eprintln!(
                    "SKIPPED nat_lab classic {client}: not installed (scripts/install-test-deps)"
                );
                continue;
            };
            ran += 1;
            let transcript = dir.join(format!("{make}-{client}.txt"));
            let argv =
                classic::driver_argv(&binary, addr, 21, "big.bin", mode, expect, &transcript);
            let args: Vec<&str> = argv.iter().map(String::as_str).collect();
            let o = exec("in1", &args);
            let outcome = classic::Outcome::read(&o.stdout, &transcript);
            let problems = outcome.problems(expect);
            if problems.is_empty() {
                eprintln!("  {make}: {:58} pass", outcome.summary());
            } else {
                failures.push(format!(
                    "{make}: {client} ({mode}): {problems:?}\n--- terminal ---\n{}\n{}",
                    outcome.transcript.replace(&"#".repeat(64), ""),
                    text(&o)
                ));
            }
        }
        // Wait for the server to have logged every ABOR.
        let until = Instant::now() + Duration::from_secs(3);
        while aborts_logged(server, log) - before < ran && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        let received = aborts_logged(server, log) - before;
        if received != ran {
            failures.push(format!("{make} logged {received} ABOR commands, not {ran}"));
        }
        let _ = std::fs::remove_file(&big);
        let o = exec(server, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
        assert!(o.status.success(), "tc: {}", text(&o));
    }
    let refused: Vec<_> = denials(dir)
        .into_iter()
        .filter(|d| d["reason"] == "malformed_command")
        .collect();
    assert!(
        failures.is_empty() && refused.is_empty(),
        "classic clients could not abort:\n{}\nmalformed_command denials: {refused:?}",
        failures.join("\n")
    );
}

/// One download or upload cell of the matrix.
struct Cell {
    name: String,
    host: &'static str,
    cmd: Vec<String>,
    /// File whose checksum must match; server name for the expected sum.
    check: PathBuf,
    server: &'static str,
    upload: bool,
}

impl Cell {
    /// A download from in1 of `server`'s data.bin to `file`.
    fn download(name: String, server: &'static str, cmd: Vec<String>, file: PathBuf) -> Cell {
        Cell {
            name,
            host: "in1",
            cmd,
            check: file,
            server,
            upload: false,
        }
    }
}

/// `curl -sS --max-time 30`, then `args`, then `tail` (where the bytes go
/// or come from, and the URL).
fn curl_cmd(args: &[&str], tail: [String; 3]) -> Vec<String> {
    let mut cmd: Vec<String> = ["curl", "-sS", "--max-time", "30"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect();
    cmd.extend(tail);
    cmd
}

fn matrix(out: &Path) -> Vec<Cell> {
    let mut cells = Vec::new();
    let servers = [
        ("srv1", "vsftpd", SRV1, SRV1_V6),
        ("srv2", "proftpd", SRV2, SRV2_V6),
        ("srv3", "pure-ftpd", SRV3, SRV3_V6),
    ];
    for (server, make, v4, v6) in servers {
        let url = format!("ftp://ftptest:ftptest@{v4}/data.bin");
        let url6 = format!("ftp://ftptest:ftptest@[{v6}]/data.bin");
        let curl_cells: [(&str, Vec<&str>, &str); 7] = [
            ("curl EPSV (default)", vec![], url.as_str()),
            (
                "curl PASV (227 address ignored)",
                vec!["--disable-epsv"],
                &url,
            ),
            (
                "curl PASV (227 address honoured)",
                vec!["--disable-epsv", "--no-ftp-skip-pasv-ip"],
                &url,
            ),
            ("curl EPRT", vec!["-P", "-"], &url),
            ("curl PORT", vec!["-P", "-", "--disable-eprt"], &url),
            ("curl IPv6 EPSV", vec!["-g"], &url6),
            ("curl IPv6 EPRT", vec!["-g", "-P", "-"], &url6),
        ];
        for (i, (name, args, u)) in curl_cells.into_iter().enumerate() {
            let file = out.join(format!("{server}-curl-{i}.bin"));
            let cmd = curl_cmd(
                &args,
                ["-o".into(), file.display().to_string(), u.to_string()],
            );
            cells.push(Cell::download(format!("{make}: {name}"), server, cmd, file));
        }
        for (i, (name, settings, host)) in [
            (
                "lftp PASV (227 address honoured)",
                "set ftp:prefer-epsv no; set ftp:passive-mode on",
                v4.to_string(),
            ),
            (
                "lftp EPSV",
                "set ftp:prefer-epsv yes; set ftp:passive-mode on",
                v4.to_string(),
            ),
            ("lftp PORT", "set ftp:passive-mode off", v4.to_string()),
            (
                "lftp IPv6 EPSV",
                "set ftp:passive-mode on",
                format!("[{v6}]"),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let file = out.join(format!("{server}-lftp-{i}.bin"));
            let script = format!(
                "set net:max-retries 1; set net:timeout 10; set cmd:fail-exit yes; {settings}; \
                 open -u ftptest,ftptest ftp://{host}; get data.bin -o {}; bye",
                file.display()
            );
            let cmd = vec!["lftp".into(), "-c".into(), script];
            cells.push(Cell::download(format!("{make}: {name}"), server, cmd, file));
        }
        // Uploads: the file arrives in the server's root.
        let src = state_dir().join("srv1/root/data.bin");
        for (i, (name, args)) in [
            ("curl upload (EPSV)", vec![]),
            ("curl upload (PORT)", vec!["-P", "-", "--disable-eprt"]),
        ]
        .into_iter()
        .enumerate()
        {
            let dest = format!("up-{i}.bin");
            let cmd = curl_cmd(
                &args,
                [
                    "-T".into(),
                    src.display().to_string(),
                    format!("ftp://ftptest:ftptest@{v4}/{dest}"),
                ],
            );
            cells.push(Cell {
                name: format!("{make}: {name}"),
                host: "in1",
                cmd,
                check: state_dir().join(server).join("root").join(dest),
                server: "srv1",
                upload: true,
            });
        }
    }
    // Reverse mode: a listener on the gateway's inside address publishes
    // vsftpd; clients name the gateway, not the server.
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:{REVERSE_PORT}/data.bin");
    for (i, (name, args)) in [
        ("reverse: curl EPSV", vec![]),
        (
            "reverse: curl PASV (227 address honoured)",
            vec!["--disable-epsv", "--no-ftp-skip-pasv-ip"],
        ),
        ("reverse: curl PORT", vec!["-P", "-", "--disable-eprt"]),
        ("reverse: curl EPRT", vec!["-P", "-"]),
    ]
    .into_iter()
    .enumerate()
    {
        let file = out.join(format!("reverse-curl-{i}.bin"));
        let cmd = curl_cmd(
            &args,
            ["-o".into(), file.display().to_string(), url.clone()],
        );
        cells.push(Cell::download(format!("vsftpd: {name}"), "srv1", cmd, file));
    }
    cells
}

#[test]
fn nat_lab_proxy_plane_transfers_pass_only_through_pinholes_and_refusals_hold() {
    run_lab("fgt-", "proxy");
}

#[test]
fn nat_lab_kernel_plane_transfers_pass_only_through_pinholes_and_refusals_hold() {
    run_lab("fgk-", "kernel");
}

fn run_lab(lab_prefix: &'static str, plane: &str) {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIPPED nat_lab ({plane} plane): {why} (run scripts/test as root)");
        return;
    }
    let lab_prefix: &'static str = Box::leak(prereq::lab_prefix(lab_prefix).into_boxed_str());
    PREFIX.with(|p| p.set(lab_prefix));
    let mut guard = LabGuard::new(sh());
    guard.sh.up_with_servers();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    // Sanity: without the gateway nothing crosses.
    let direct = exec(
        "in1",
        &[
            "curl",
            "-sS",
            "--connect-timeout",
            "2",
            &format!("ftp://{SRV1}:2200/"),
        ],
    );
    assert!(
        !direct.status.success(),
        "traffic crossed without the gateway"
    );

    // The rules ftpgate prints are the rules the lab runs with.
    let config = gateway_config(dir.path(), false, plane);
    rules::load_printed_rules(&config, dir.path(), &format!("{}gw", prefix()), plane);
    let log = dir.path().join("ftpgate.stderr");
    guard.gateway = Some(guard.sh.start_gateway(&config, &log, false));

    // ---- the transfer matrix -------------------------------------------
    let mut results: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for cell in matrix(&out) {
        let args: Vec<&str> = cell.cmd.iter().map(String::as_str).collect();
        let started = Instant::now();
        let o = exec(cell.host, &args);
        let sum = sha256_file(&cell.check);
        let want = expected_sha(cell.server);
        let verdict = if o.status.success() && sum == want {
            format!(
                "pass ({:.2}s, sha256 {})",
                started.elapsed().as_secs_f64(),
                &sum[..12]
            )
        } else {
            failures.push(format!(
                "{}: exit {:?}, sha256 {:?}\n{}",
                cell.name,
                o.status.code(),
                sum,
                text(&o)
            ));
            "FAIL".into()
        };
        let kind = if cell.upload { "upload" } else { "download" };
        results.insert(format!("{} [{kind}]", cell.name), verdict);
    }
    eprintln!("NAT lab matrix ({plane} plane):");
    for (name, verdict) in &results {
        eprintln!("  {name:60} {verdict}");
    }
    if plane == "kernel" {
        // Every data connection of the matrix went through a kernel element:
        // none fell through to the userland relay.
        let o = exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/metrics"]);
        let relayed: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| {
                l.starts_with("ftpgate_data_connections_total") && l.contains("plane=\"proxy\"")
            })
            .map(str::to_string)
            .collect();
        assert!(relayed.is_empty(), "relayed in userland: {relayed:?}");
    }
    // lftp tries AUTH TLS first; the gateway's 534 makes it go on in plain
    // text. Nothing else may be refused during the matrix.
    let unexpected: Vec<_> = denials(dir.path())
        .into_iter()
        .filter(|d| d["reason"] != "auth_refused")
        .collect();
    assert!(
        failures.is_empty(),
        "failed cells:\n{}\ndenials: {unexpected:?}",
        failures.join("\n")
    );
    assert!(
        unexpected.is_empty(),
        "transfers produced denials: {unexpected:?}"
    );
    let auth = denials(dir.path()).len();
    eprintln!("  (lftp's AUTH TLS was refused with 534 {auth} times; lftp went on in plain text)");

    // ---- bounce: a PORT naming the third host never reaches it -----------
    let recorder_log = state_dir().join("out3/connections.log");
    let bounce = exec(
        "in1",
        &[
            "python3",
            "-c",
            &format!(
                "import ftplib\n\
                 f = ftplib.FTP('{SRV1}', timeout=10)\n\
                 f.login('ftptest', 'ftptest')\n\
                 try:\n    print(f.sendcmd('PORT {},9,221'))\n\
                 except ftplib.all_errors as e:\n    print('REFUSED', e)\n\
                 try:\n    f.retrlines('LIST')\n\
                 except ftplib.all_errors as e:\n    print('LIST', e)\n",
                OUT3.replace('.', ",")
            ),
        ],
    );
    let said = text(&bounce);
    assert!(
        said.contains("REFUSED 504"),
        "bounce PORT was not refused: {said}"
    );
    let denial = wait_denial(dir.path(), "bounce").expect("no bounce deny line");
    assert_eq!(denial["target"], format!("{OUT3}:2525"));
    assert_eq!(
        denial["client"].as_str().unwrap().split(':').next(),
        Some("192.0.2.10")
    );
    std::thread::sleep(Duration::from_millis(500));
    let reached = std::fs::read_to_string(&recorder_log).unwrap_or_default();
    assert!(
        reached.trim().is_empty(),
        "the bounce target was reached: {reached}"
    );
    eprintln!(
        "  bounce PORT to {OUT3}:2525                                  refused (504, deny bounce), target saw no connection"
    );

    // ---- PASV theft: a second inside host races to the pinhole -----------
    let signal = dir.path().join("go");
    let (victim, first) = pasv_victim(&signal);
    let parts: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"PASV"), "victim said {first:?}");
    let (addr, port) = (parts[1], parts[2]);
    let loot = dir.path().join("loot");
    let steal = exec(
        "in2",
        &[
            "python3",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/lab/race.py")
                .to_str()
                .unwrap(),
            "steal",
            addr,
            port,
            loot.to_str().unwrap(),
        ],
    );
    std::fs::write(&signal, b"go").unwrap();
    let victim_out = victim.wait_with_output().unwrap();
    let victim_said = text(&victim_out);
    let stolen = std::fs::read(&loot).unwrap_or_default();
    assert!(
        stolen.is_empty() || stolen.starts_with(b"ERROR"),
        "the attacker got {} bytes: {}",
        stolen.len(),
        text(&steal)
    );
    assert!(
        victim_said.contains(&format!("SHA256 {}", expected_sha("srv1"))),
        "the real client did not get the file: {victim_said}"
    );
    let theft = wait_denial(dir.path(), "pasv_theft").expect("no pasv_theft deny line");
    assert!(
        theft["peer"].as_str().unwrap().starts_with("192.0.2.11:"),
        "{theft}"
    );
    assert_eq!(theft["expected_peer"], "192.0.2.10");
    eprintln!(
        "  PASV theft from 192.0.2.11                                  refused (deny pasv_theft), victim's sha256 intact"
    );

    if plane == "kernel" {
        kernel_plane_checks(dir.path());
    }
    data_connection_ends_with_its_session(dir.path(), plane);
    classic_clients_abort(dir.path());

    // ---- server-to-server (FXP) ----------------------------------------
    let fxp = |dest: &str| {
        exec(
            "in1",
            &[
                "python3",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/lab/fxp.py")
                    .to_str()
                    .unwrap(),
                SRV1,
                SRV2,
                "data.bin",
                dest,
            ],
        )
    };
    let refused = fxp("fxp-denied.bin");
    assert_eq!(
        refused.status.code(),
        Some(2),
        "FXP was not refused: {}",
        text(&refused)
    );
    let denial = wait_denial(dir.path(), "fxp_denied").expect("no fxp_denied deny line");
    assert_eq!(denial["server"], format!("{SRV1}:21"));
    assert!(
        !state_dir().join("srv2/root/fxp-denied.bin").exists()
            || std::fs::metadata(state_dir().join("srv2/root/fxp-denied.bin"))
                .unwrap()
                .len()
                == 0,
        "data reached srv2 although FXP was refused"
    );
    eprintln!(
        "  FXP vsftpd -> proftpd, default policy                       refused (504, deny fxp_denied), nothing arrived"
    );

    // Allow the two servers and reload with SIGHUP.
    gateway_config(dir.path(), true, plane);
    let pid = guard.gateway.as_ref().unwrap().id();
    // `ip netns exec` execs ftpgate, so the child's pid is ftpgate's.
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(500));
    let relayed_before = metric("ftpgate_data_bytes_total");
    let allowed = fxp("fxp-allowed.bin");
    assert!(
        allowed.status.success(),
        "allowed FXP failed: {}",
        text(&allowed)
    );
    let arrived = sha256_file(&state_dir().join("srv2/root/fxp-allowed.bin"));
    assert_eq!(arrived, expected_sha("srv1"), "FXP file differs");
    assert_eq!(metric("ftpgate_rewrites_total{kind=\"fxp\"}"), 1.0);
    if plane == "proxy" {
        // (The kernel plane counts bytes when conntrack drops a flow,
        // minutes later, so earlier transfers could land in between.)
        let relayed_after = metric("ftpgate_data_bytes_total");
        assert!(
            relayed_after - relayed_before < 1024.0,
            "FXP data went through the gateway ({} bytes)",
            relayed_after - relayed_before
        );
    }
    eprintln!(
        "  FXP vsftpd -> proftpd, [[policy.fxp]] after SIGHUP          pass (sha256 intact, data server to server)"
    );

    pinhole_named_by_another_client_is_a_bounce(dir.path());
    gateway_address_is_never_a_port_target(dir.path());
}

/// The gateway's own addresses are never data
/// targets. The FXP rule (198.51.100.0/24) covers the gateway's outside
/// address 198.51.100.1, yet a PORT naming it (port 9121, the admin port)
/// is a bounce (RFC 2577 section 3), never a server-to-server PORT: the
/// server would connect to the gateway's own ports.
fn gateway_address_is_never_a_port_target(dir: &Path) {
    let fxp_before = metric("ftpgate_rewrites_total{kind=\"fxp\"}");
    let said = text(&python(
        "in1",
        &format!(
            "import ftplib\n\
             f = ftplib.FTP('{SRV1}', timeout=10)\n\
             f.login('ftptest', 'ftptest')\n\
             try:\n    print('ACCEPTED', f.sendcmd('PORT {},35,161'))\n\
             except ftplib.all_errors as e:\n    print('REFUSED', e)\n\
             f.quit()\n",
            GW_OUT.replace('.', ",")
        ),
    ));
    assert!(
        said.contains("REFUSED 504"),
        "PORT to the gateway's outside address was not refused: {said}"
    );
    let target = format!("{GW_OUT}:9121");
    let denial = wait_denial_where(dir, "bounce", |d| d["target"] == target.as_str())
        .unwrap_or_else(|| panic!("no bounce deny line for {target}: {:?}", denials(dir)));
    assert_eq!(denial_client(&denial), Some("192.0.2.10"), "{denial}");
    assert_eq!(denial["rule"], "gateway_address", "{denial}");
    assert_eq!(
        metric("ftpgate_rewrites_total{kind=\"fxp\"}"),
        fxp_before,
        "the PORT to the gateway was counted as an FXP rewrite"
    );
    eprintln!(
        "  {:60}refused (504, deny bounce, rule gateway_address)",
        format!("PORT to the gateway's {target} (in the FXP rule)")
    );
}

/// A pinhole may be named in a PORT (FXP) only by the
/// client address that opened it. With the FXP rule loaded, in1 holds a
/// PASV pinhole on srv1; in2, logged in to srv2 (covered by the same rule),
/// names that pinhole in a PORT. RFC 2577 section 3: a PORT naming anything
/// but the client itself is a bounce unless policy allows it, and taking
/// over somebody else's data connection is never allowed: in2 gets 504, a
/// `bounce` line names in2, no FXP rewrite is counted, and in1's pinhole
/// still carries in1's transfer.
fn pinhole_named_by_another_client_is_a_bounce(dir: &Path) {
    let signal = dir.join("go-fxp-thief");
    let (victim, first) = pasv_victim(&signal);
    let parts: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"PASV"), "in1 said {first:?}");
    let (addr, port): (&str, u16) = (parts[1], parts[2].parse().unwrap());
    let fxp_before = metric("ftpgate_rewrites_total{kind=\"fxp\"}");
    let port_arg = format!("{},{},{}", addr.replace('.', ","), port >> 8, port & 0xff);
    let thief = python(
        "in2",
        &format!(
            "import ftplib\n\
             f = ftplib.FTP('{SRV2}', timeout=10)\n\
             f.login('ftptest', 'ftptest')\n\
             try:\n    print('ACCEPTED', f.sendcmd('PORT {port_arg}'))\n\
             except ftplib.all_errors as e:\n    print('REFUSED', e)\n\
             f.quit()\n"
        ),
    );
    // in1 goes on with its transfer through the pinhole it still holds.
    std::fs::write(&signal, b"go").unwrap();
    let victim_out = victim.wait_with_output().unwrap();
    let victim_said = text(&victim_out);
    let said = text(&thief);
    assert!(
        said.contains("REFUSED 504"),
        "in2 named in1's pinhole {addr}:{port} and was not refused: {said}"
    );
    let target = format!("{addr}:{port}");
    let denial = wait_denial_where(dir, "bounce", |d| d["target"] == target.as_str())
        .unwrap_or_else(|| panic!("no bounce deny line for {target}: {:?}", denials(dir)));
    assert_eq!(denial_client(&denial), Some("192.0.2.11"), "{denial}");
    assert_eq!(denial["server"], format!("{SRV2}:21"), "{denial}");
    assert_eq!(denial["verb"], "PORT", "{denial}");
    // For in2 the pinhole does not exist: what it named is the gateway.
    assert_eq!(denial["rule"], "gateway_address", "{denial}");
    assert_eq!(
        metric("ftpgate_rewrites_total{kind=\"fxp\"}"),
        fxp_before,
        "the refused PORT was counted as an FXP rewrite"
    );
    assert!(
        victim_said.contains(&format!("SHA256 {}", expected_sha("srv1"))),
        "in1 did not get its file through its pinhole: {victim_said}"
    );
    eprintln!(
        "  {:60}refused (504, deny bounce for 192.0.2.11), in1's sha256 intact",
        format!("in2's PORT to srv2 naming in1's pinhole {target}")
    );
}
