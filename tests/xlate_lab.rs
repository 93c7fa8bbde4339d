//! Translation at the edge, in the namespace lab of `tests/lab/` (prefix
//! `fgx-`, plus `FG_LAB_TAG`): real clients and servers through ftpgate's
//! data-mode conversion (`server_data`), across address families (reverse
//! publishing both ways, NAT64 with RFC 6384 translation and ALGS), and
//! with one advertised address per client network. Every download is
//! checked against the server's sha256.
//!
//! Needs root, iproute2, nftables, vsftpd, curl, lftp and tnftp, which
//! `scripts/install-test-deps` installs; skipped (and says so) otherwise.

#[path = "lab/kit.rs"]
mod kit;
#[path = "lab/prereq.rs"]
mod prereq;
#[path = "lab/rules.rs"]
mod rules;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kit::{GW_IN, GW_IN6, GW_OUT, LabGuard, LabSh, SRV1, SRV1_V6};
use prereq::text;

/// 198.51.100.20 inside the NAT64 prefix 64:ff9b::/96 (RFC 6052).
const SRV1_NAT64: &str = "64:ff9b::c633:6414";
/// The "public" address split horizon announces to outside clients; the
/// lab's gateway maps it to its outside address (a NAT in front).
const PUBLIC: &str = "203.0.113.7";
/// The second vsftpd on srv1, with passive mode turned off.
const NO_PASV_PORT: u16 = 2121;
/// A vsftpd on srv1 that listens on IPv4 only.
const V4_ONLY_PORT: u16 = 2122;
/// A vsftpd on srv1 that listens on its IPv6 address only.
const V6_ONLY_PORT: u16 = 2123;

struct Lab {
    guard: LabGuard,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.out("ftpgate.stderr")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("ftpgate stderr (last 40 lines, newest first):");
            for l in tail {
                eprintln!("  {l}");
            }
            eprintln!("deny log: {:#?}", self.denials());
        }
        // Then the guard stops the gateway and takes the lab down.
    }
}

impl Lab {
    fn sh(&self) -> &LabSh {
        &self.guard.sh
    }

    /// Runs `cmd` in lab host `host`, bounded in time.
    fn exec(&self, host: &str, cmd: &[&str]) -> Output {
        self.sh().exec(host, cmd)
    }

    fn ok(&self, host: &str, cmd: &[&str]) -> String {
        let o = self.exec(host, cmd);
        assert!(o.status.success(), "{host}: {cmd:?} failed:\n{}", text(&o));
        text(&o)
    }

    fn python(&self, host: &str, code: &str) -> String {
        self.ok(host, &["python3", "-c", code])
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn assert_download(&self, name: &str, file: &Path) {
        assert_eq!(
            kit::sha256_file(file),
            self.sh().expected_sha("srv1"),
            "{name}: checksum of {}",
            file.display()
        );
        eprintln!("  {name:<62} ok (sha256)");
    }

    fn metric(&self, name_and_labels: &str) -> f64 {
        self.sh().metric(name_and_labels)
    }

    /// Waits (10 s at most) until `name_and_labels` reaches `min`.
    fn wait_metric(&self, name_and_labels: &str, min: f64) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.metric(name_and_labels);
            if n >= min {
                return;
            }
            assert!(Instant::now() < until, "{name_and_labels}: {n} < {min}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// At least `min` rewrites of `kind` so far.
    fn assert_rewrites(&self, kind: &str, min: f64) {
        let n = self.metric(&format!("ftpgate_rewrites_total{{kind=\"{kind}\"}}"));
        let all: Vec<String> = self
            .sh()
            .metrics()
            .lines()
            .filter(|l| l.starts_with("ftpgate_rewrites_total"))
            .map(str::to_string)
            .collect();
        assert!(n >= min, "{kind}: {n} < {min}; {all:#?}");
    }

    fn denials(&self) -> Vec<serde_json::Value> {
        kit::denials(&self.out("deny.jsonl"))
    }

    fn nft(&self, host: &str, rules: &str, name: &str) {
        let file = self.out(name);
        std::fs::write(&file, rules).unwrap();
        self.ok(host, &["nft", "-f", file.to_str().unwrap()]);
    }
}

fn gateway_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
# server_data = "passive": active-only clients, a server that refuses
# inbound data connections.
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2101"]
upstream = "{SRV1}:21"
server_data = "passive"

# The same without conversion.
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2102"]
upstream = "{SRV1}:21"

# server_data = "active": a server with passive mode off.
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2103"]
upstream = "{SRV1}:{NO_PASV_PORT}"
server_data = "active"

# The IPv4-only server published on IPv6.
[[listener]]
mode = "reverse"
bind = ["[{GW_IN6}]:2104"]
upstream = "{SRV1}:{V4_ONLY_PORT}"

# The IPv6-only server published on IPv4.
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2105"]
upstream = "[{SRV1_V6}]:{V6_ONLY_PORT}"

# Split horizon: one listener, an address per client network.
[[listener]]
mode = "reverse"
bind = ["0.0.0.0:2106"]
upstream = "{SRV1}:21"
advertise = [
  {{ clients = "192.0.2.0/24", address = "{GW_IN}" }},
  {{ clients = "0.0.0.0/0", address = "{PUBLIC}" }},
]

# A converted PASV the server refuses.
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2107"]
upstream = "{SRV1}:{NO_PASV_PORT}"
server_data = "passive"

# NAT64: IPv6 clients reach IPv4 servers at 64:ff9b::/96 (here the
# IPv4-only vsftpd's port is the intercepted one).
[[listener]]
mode = "transparent"
bind = ["[::]:2121"]
interfaces = ["br-in"]
intercept_port = {V4_ONLY_PORT}
nat64_prefix = "64:ff9b::/96"
{}"#,
        kit::config_tables("proxy", dir)
    );
    let path = dir.join("ftpgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// On the kernel plane: both conversions (carried in userland) and the
/// IPv6 client of the IPv4 server (legs of two families: userland too).
fn kernel_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"
[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2101"]
upstream = "{SRV1}:21"
server_data = "passive"

[[listener]]
mode = "reverse"
bind = ["[{GW_IN6}]:2104"]
upstream = "{SRV1}:{V4_ONLY_PORT}"

[[listener]]
mode = "reverse"
bind = ["{GW_IN}:2103"]
upstream = "{SRV1}:{NO_PASV_PORT}"
server_data = "active"
{}"#,
        kit::config_tables("kernel", dir)
    );
    let path = dir.join("ftpgate-kernel.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start_gateway(lab: &mut Lab, config: PathBuf, plane: &str) {
    kit::check_config(&config);
    let gw = format!("{}gw", lab.sh().prefix);
    rules::load_printed_rules(&config, lab.dir.path(), &gw, plane);
    if lab.guard.gateway.is_none() {
        // The NAT in front of split horizon's public address.
        lab.nft(
            "gw",
            &format!(
                "table ip xlnat {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  \
                 ip daddr {PUBLIC} dnat to {GW_OUT}\n }}\n}}\n"
            ),
            "public.nft",
        );
    }
    // Starts (or restarts) ftpgate; its log goes on in the same file.
    lab.guard.stop_gateway();
    let child = lab
        .sh()
        .start_gateway(&config, &lab.out("ftpgate.stderr"), true);
    lab.guard.gateway = Some(child);
}

/// Another vsftpd on srv1 (same root, same files) on `port`, with the
/// lab's configuration changed by `keys` (`key=value` lines replaced or
/// added).
fn start_vsftpd(lab: &Lab, name: &str, port: u16, keys: &[(&str, &str)]) {
    let conf = std::fs::read_to_string(lab.sh().state.join("srv1/vsftpd.conf")).unwrap();
    let log = lab.dir.path().display().to_string();
    let mut set: Vec<(String, String)> = vec![
        ("listen_port".into(), port.to_string()),
        ("vsftpd_log_file".into(), format!("{log}/{name}.log")),
        ("xferlog_file".into(), format!("{log}/{name}.xferlog")),
    ];
    set.extend(keys.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut lines: Vec<String> = conf
        .lines()
        .filter(|l| {
            !set.iter()
                .any(|(k, _)| l.split_once('=').is_some_and(|(lk, _)| lk == k))
        })
        .map(str::to_string)
        .collect();
    lines.extend(set.iter().map(|(k, v)| format!("{k}={v}")));
    let path = lab.out(&format!("vsftpd-{name}.conf"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    // Detached; `lab.sh down` kills every process in the namespace.
    lab.ok(
        "srv1",
        &[
            "sh",
            "-c",
            &format!(
                "setsid vsftpd {} </dev/null >/dev/null 2>&1 &",
                path.display()
            ),
        ],
    );
    let until = Instant::now() + Duration::from_secs(10);
    let sport = format!("sport = :{port}");
    while Instant::now() < until {
        let o = lab.exec("srv1", &["ss", "-Hltn", &sport]);
        if !o.stdout.is_empty() {
            eprintln!(
                "  vsftpd {name} on port {port}: {}",
                String::from_utf8_lossy(&o.stdout).trim()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("vsftpd {name} did not start on port {port}");
}

/// srv1 accepts new TCP connections only to its control port and its
/// passive range, and opens none itself: active mode (the server
/// connecting out for the data) cannot work, only passive can.
const SERVER_FIREWALL: &str = "table inet xlfw {
  chain input {
    type filter hook input priority filter; policy accept;
    ct state established,related accept
    iif lo accept
    tcp dport { 21, 40000-40100 } accept
    meta l4proto tcp ct state new drop
  }
  chain output {
    type filter hook output priority filter; policy accept;
    ct state established,related accept
    oif lo accept
    meta l4proto tcp ct state new drop
  }
}
";

/// A file name for a transfer named `name` (letters and digits only: lftp
/// reads its command line like a shell).
fn file_name(name: &str) -> String {
    let stem: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{stem}.bin")
}

fn curl(lab: &Lab, name: &str, host: &str, args: &[&str], url: &str) {
    let file = lab.out(&file_name(name));
    let mut cmd = vec!["curl", "-sS", "--max-time", "30"];
    cmd.extend_from_slice(args);
    let f = file.to_str().unwrap();
    cmd.extend_from_slice(&["-o", f, url]);
    lab.ok(host, &cmd);
    lab.assert_download(name, &file);
}

fn lftp(lab: &Lab, name: &str, host: &str, settings: &str, port: u16, server: &str) {
    let file = lab.out(&file_name(name));
    let script = format!(
        "set net:max-retries 1; set net:timeout 10; {settings}; get data.bin -o {}; bye",
        file.display()
    );
    let p = port.to_string();
    lab.ok(
        host,
        &[
            "lftp",
            "-u",
            "ftptest,ftptest",
            "-p",
            &p,
            "-e",
            &script,
            server,
        ],
    );
    lab.assert_download(name, &file);
}

/// ftplib download; the client's address family follows `server`.
fn ftplib(lab: &Lab, name: &str, host: &str, server: &str, port: u16, before: &str) -> String {
    let file = lab.out(&file_name(name));
    let said = lab.python(
        host,
        &format!(
            "import ftplib\n\
             f = ftplib.FTP(timeout=15)\n\
             f.connect('{server}', {port})\n\
             f.login('ftptest', 'ftptest')\n\
             {before}\n\
             with open('{}', 'wb') as out:\n    print(f.retrbinary('RETR data.bin', out.write))\n\
             f.quit()\n",
            file.display()
        ),
    );
    lab.assert_download(name, &file);
    said
}

#[test]
fn translation_lab_converts_data_modes_crosses_families_and_splits_the_horizon() {
    if let Some(why) = prereq::lab_missing(&["ip", "nft", "vsftpd", "curl", "lftp", "tnftp"]) {
        eprintln!("SKIPPED xlate_lab: {why} (run scripts/test as root)");
        return;
    }
    let mut sh = LabSh::new(&prereq::lab_prefix("fgx-"));
    sh.timeout = "40";
    let mut lab = Lab {
        guard: LabGuard::new(sh),
        dir: tempfile::tempdir().unwrap(),
    };
    lab.sh().up_with_servers();
    start_vsftpd(&lab, "nopasv", NO_PASV_PORT, &[("pasv_enable", "NO")]);
    start_vsftpd(
        &lab,
        "ipv4only",
        V4_ONLY_PORT,
        &[
            ("listen", "YES"),
            ("listen_ipv6", "NO"),
            ("listen_address", SRV1),
        ],
    );
    start_vsftpd(
        &lab,
        "ipv6only",
        V6_ONLY_PORT,
        &[("listen_address6", SRV1_V6)],
    );
    // in2 becomes an IPv6-only client.
    lab.ok("in2", &["ip", "-4", "addr", "flush", "dev", "eth0"]);
    let config = gateway_config(lab.dir.path());
    start_gateway(&mut lab, config, "proxy");

    eprintln!(
        "server_data = \"passive\" (srv1 refuses every new connection but 21 and its passive range):"
    );
    lab.nft("srv1", SERVER_FIREWALL, "server-firewall.nft");
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:2101/data.bin");
    // tnftp in active mode (-A), auto-fetch.
    let tn = lab.out("tnftp-active.bin");
    lab.ok(
        "in1",
        &["tnftp", "-A", "-V", "-o", tn.to_str().unwrap(), &url],
    );
    lab.assert_download("tnftp -A (EPRT) -> PASV", &tn);
    // tnftp with EPRT off for IPv4 (`epsv4 off`): PORT.
    let tn_port = lab.out("tnftp-active-port.bin");
    lab.ok(
        "in1",
        &[
            "sh",
            "-c",
            &format!(
                "printf 'user ftptest ftptest\\nbinary\\nepsv4 off\\nget data.bin {}\\nquit\\n' \
                 | tnftp -A -n -V {GW_IN} 2101",
                tn_port.display()
            ),
        ],
    );
    lab.assert_download("tnftp -A, epsv4 off (PORT) -> PASV", &tn_port);
    lftp(
        &lab,
        "lftp active (PORT) -> PASV",
        "in1",
        "set ftp:passive-mode off; set ftp:prefer-epsv no",
        2101,
        GW_IN,
    );
    curl(&lab, "curl -P - (EPRT) -> PASV", "in1", &["-P", "-"], &url);
    // Without conversion the same transfer cannot work: the server may not
    // connect out.
    let direct = lab.out("tnftp-unconverted.bin");
    let failed = lab.exec(
        "in1",
        &[
            "timeout",
            "15",
            "tnftp",
            "-A",
            "-V",
            "-o",
            direct.to_str().unwrap(),
            &format!("ftp://ftptest:ftptest@{GW_IN}:2102/data.bin"),
        ],
    );
    let size = std::fs::metadata(&direct).map(|m| m.len()).unwrap_or(0);
    assert!(
        !failed.status.success() || size < 3145728,
        "active mode crossed the server's firewall without conversion:\n{}",
        text(&failed)
    );
    eprintln!(
        "  tnftp -A without conversion                                    fails (as it must)"
    );
    lab.ok("srv1", &["nft", "delete", "table", "inet", "xlfw"]);
    lab.assert_rewrites("port_to_pasv", 2.0);
    lab.assert_rewrites("eprt_to_pasv", 2.0);

    eprintln!("server_data = \"active\" (vsftpd pasv_enable=NO):");
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:2103/data.bin");
    curl(&lab, "curl EPSV -> PORT", "in1", &[], &url);
    curl(&lab, "curl PASV -> PORT", "in1", &["--disable-epsv"], &url);
    lftp(
        &lab,
        "lftp passive -> PORT",
        "in1",
        "set ftp:passive-mode on",
        2103,
        GW_IN,
    );
    lab.assert_rewrites("epsv_to_port", 1.0);
    lab.assert_rewrites("pasv_to_port", 1.0);
    // A converted PASV the server refuses: the client's PORT gets the
    // matching refusal, the deny log names the translation.
    let refused = lab.exec(
        "in1",
        &[
            "curl",
            "-sS",
            "--max-time",
            "15",
            "-P",
            "-",
            "--disable-eprt",
            "-o",
            "/dev/null",
            &format!("ftp://ftptest:ftptest@{GW_IN}:2107/data.bin"),
        ],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    let until = Instant::now() + Duration::from_secs(10);
    let deny = loop {
        if let Some(d) = lab
            .denials()
            .into_iter()
            .find(|d| d["reason"] == "translation_refused")
        {
            break d;
        }
        assert!(
            Instant::now() < until,
            "no translation_refused line: {:?}",
            lab.denials()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(deny["rule"], "port_to_pasv", "{deny}");
    eprintln!(
        "  PASV refused by the server                                     client PORT refused, deny {deny}"
    );

    eprintln!("IPv6-only client (in2), IPv4-only vsftpd (reverse, [{GW_IN6}]:2104):");
    let url = format!("ftp://ftptest:ftptest@[{GW_IN6}]:2104/data.bin");
    curl(&lab, "v6 curl EPSV", "in2", &["-6"], &url);
    curl(
        &lab,
        "v6 curl --disable-epsv",
        "in2",
        &["-6", "--disable-epsv"],
        &url,
    );
    curl(&lab, "v6 curl EPRT", "in2", &["-6", "-P", "-"], &url);
    lftp(
        &lab,
        "v6 lftp",
        "in2",
        "set ftp:passive-mode on",
        2104,
        GW_IN6,
    );
    ftplib(&lab, "v6 ftplib", "in2", GW_IN6, 2104, "");
    lab.assert_rewrites("epsv_to_pasv", 3.0);
    lab.assert_rewrites("eprt_to_port", 1.0);

    eprintln!(
        "IPv6-only client (in2), IPv4-only vsftpd through NAT64 ([{SRV1_NAT64}]:{V4_ONLY_PORT}):"
    );
    let url = format!("ftp://ftptest:ftptest@[{SRV1_NAT64}]:{V4_ONLY_PORT}/data.bin");
    curl(&lab, "nat64 curl EPSV", "in2", &[], &url);
    curl(
        &lab,
        "nat64 curl --disable-epsv",
        "in2",
        &["--disable-epsv"],
        &url,
    );
    lftp(
        &lab,
        "nat64 lftp",
        "in2",
        "set ftp:passive-mode on",
        V4_ONLY_PORT,
        SRV1_NAT64,
    );
    let said = ftplib(
        &lab,
        "nat64 ftplib (ALGS)",
        "in2",
        SRV1_NAT64,
        V4_ONLY_PORT,
        "print(f.sendcmd('ALGS STATUS64'))\nprint(f.sendcmd('ALGS DISABLE64'))\nprint(f.sendcmd('ALGS ENABLE64'))",
    );
    assert!(
        said.contains("216 ENABLED") && said.contains("216 DISABLED"),
        "{said}"
    );

    eprintln!("IPv4 client (in1), IPv6-only vsftpd (reverse, {GW_IN}:2105):");
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:2105/data.bin");
    curl(
        &lab,
        "v4 curl PASV -> EPSV",
        "in1",
        &["--disable-epsv"],
        &url,
    );
    curl(&lab, "v4 curl EPSV", "in1", &[], &url);
    curl(
        &lab,
        "v4 curl PORT -> EPRT",
        "in1",
        &["-P", "-", "--disable-eprt"],
        &url,
    );
    lftp(
        &lab,
        "v4 lftp",
        "in1",
        "set ftp:passive-mode on",
        2105,
        GW_IN,
    );
    lab.assert_rewrites("pasv_to_epsv", 1.0);
    lab.assert_rewrites("port_to_eprt", 1.0);

    eprintln!("split horizon (one listener on 0.0.0.0:2106):");
    let trusting = "f.trust_server_pasv_ipv4_address = True\nprint('PASV', f.sendcmd('PASV'))";
    let inside = ftplib(&lab, "inside client (in1)", "in1", GW_IN, 2106, trusting);
    assert!(inside.contains("(192,0,2,1,"), "{inside}");
    let outside = ftplib(
        &lab,
        "outside client (out3)",
        "out3",
        GW_OUT,
        2106,
        trusting,
    );
    assert!(outside.contains("(203,0,113,7,"), "{outside}");
    eprintln!("  inside got {GW_IN}, outside got {PUBLIC} in their 227 replies");

    eprintln!("kernel plane: translated pinholes carried in userland:");
    let config = kernel_config(lab.dir.path());
    start_gateway(&mut lab, config, "kernel");
    lab.nft("srv1", SERVER_FIREWALL, "server-firewall.nft");
    let before = lab.metric("ftpgate_rewrites_total{kind=\"port_to_pasv\"}");
    lftp(
        &lab,
        "kernel: lftp active (PORT) -> PASV",
        "in1",
        "set ftp:passive-mode off; set ftp:prefer-epsv no",
        2101,
        GW_IN,
    );
    let tn = lab.out("kernel-tnftp-active.bin");
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:2101/data.bin");
    lab.ok(
        "in1",
        &["tnftp", "-A", "-V", "-o", tn.to_str().unwrap(), &url],
    );
    lab.assert_download("kernel: tnftp -A (EPRT) -> PASV", &tn);
    lab.ok("srv1", &["nft", "delete", "table", "inet", "xlfw"]);
    let url = format!("ftp://ftptest:ftptest@[{GW_IN6}]:2104/data.bin");
    curl(&lab, "kernel: v6 curl EPSV -> PASV", "in2", &["-6"], &url);
    assert!(lab.metric("ftpgate_rewrites_total{kind=\"port_to_pasv\"}") > before);
    let url = format!("ftp://ftptest:ftptest@{GW_IN}:2103/data.bin");
    curl(&lab, "kernel: curl EPSV -> PORT", "in1", &[], &url);
    lftp(
        &lab,
        "kernel: lftp passive -> PORT",
        "in1",
        "set ftp:passive-mode on",
        2103,
        GW_IN,
    );
    lab.assert_rewrites("epsv_to_port", 1.0);
    // Every one of these went through the userland relay (a relay's
    // bytes are counted when it ends, just after the client has its file).
    let bytes = |mode: &str| {
        format!(
            "ftpgate_data_bytes_total{{direction=\"download\",mode=\"{mode}\",plane=\"proxy\"}}"
        )
    };
    lab.wait_metric(&bytes("active"), 2.0 * 3145728.0);
    lab.wait_metric(&bytes("passive"), 3.0 * 3145728.0);
}
