//! The deployment kit in `deploy/`, checked with the tools operators use:
//! systemd-analyze (verify, security), systemd-sysusers, logrotate, promtool
//! (rules, rule unit tests, config), hadolint, kubernetes-validate, and
//! `ftpgate check-config` on every shipped configuration. Consistency checks
//! that need no tool (metric names in alerts and the dashboard, ports and
//! paths that must agree between files) always run.
//!
//! A check whose tool is missing prints `SKIPPED <test>: <why>` and passes;
//! `scripts/install-test-deps` (run by `scripts/test` as root) installs them
//! all: the Debian packages systemd, logrotate and prometheus (for promtool),
//! and kubernetes-validate and hadolint in the venv `$FG_VENV` (default
//! /opt/ftpgate-lab/venv).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Exposure score `systemd-analyze security` may report for the unit at
/// most. Measured: 1.4 with systemd 252 (Debian 12); the margin absorbs
/// scoring changes between systemd versions, a lost hardening line does not
/// fit in it.
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ftpgate() -> &'static str {
    env!("CARGO_BIN_EXE_ftpgate")
}

fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// A program on PATH, in the sbin directories, or in the deploy-kit venv.
fn tool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("FG_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ftpgate-lab/venv"));
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.push(venv.join("bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs a command, prints what it said (visible with --nocapture).
fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    println!(
        "--- {what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn is_root() -> bool {
    read(Path::new("/proc/self/status"))
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

// ---------------------------------------------------------------------------
// Small readers for the kit's own file formats (no YAML/INI crates here).

/// `Key=Value` lines of a systemd unit, by key, in order.
fn unit_directives(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            map.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    map
}

fn one<'a>(d: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match d.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("the unit must set {key}= exactly once, has {other:?}"),
    }
}

/// The value of a YAML key in a block: a plain scalar on the key's line, or
/// a `|`/`>` block scalar on the lines indented below it.
fn yaml_value(lines: &[&str], at: usize) -> String {
    let line = lines[at];
    let indent = line.len() - line.trim_start().len();
    let (_, rest) = line.split_once(':').expect("a key line");
    let rest = rest.trim();
    if !(rest.starts_with('|') || rest.starts_with('>')) {
        return rest.trim_matches('"').to_string();
    }
    let mut body = String::new();
    for l in &lines[at + 1..] {
        let ind = l.len() - l.trim_start().len();
        if !l.trim().is_empty() && ind <= indent {
            break;
        }
        body.push_str(l.trim());
        body.push(if rest.starts_with('|') { '\n' } else { ' ' });
    }
    body.trim().to_string()
}

/// One alerting rule of deploy/prometheus/ftpgate-alerts.yml.
#[derive(Debug)]
struct Alert {
    name: String,
    expr: String,
    severity: Option<String>,
    summary: Option<String>,
    description: Option<String>,
}

fn alerts() -> Vec<Alert> {
    let src = read(&deploy("prometheus/ftpgate-alerts.yml"));
    let lines: Vec<&str> = src.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_start().starts_with("- alert:"))
        .collect();
    let mut out = Vec::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(lines.len());
        let field = |key: &str| {
            (start..end)
                .find(|&i| {
                    let t = lines[i].trim_start().trim_start_matches("- ");
                    t.starts_with(key) && t[key.len()..].starts_with(':')
                })
                .map(|i| yaml_value(&lines, i))
        };
        out.push(Alert {
            name: field("alert").unwrap(),
            expr: field("expr").unwrap_or_default(),
            severity: field("severity"),
            summary: field("summary"),
            description: field("description"),
        });
    }
    out
}

/// Metric names the daemon exports: the `pub const` names in src/metrics.rs.
fn known_metrics() -> BTreeSet<String> {
    let src = read(&repo().join("src/metrics.rs"));
    let names: BTreeSet<String> = src
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains("&str"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("ftpgate_"))
        .map(str::to_string)
        .collect();
    assert!(
        names.len() >= 15,
        "could not read the metric names from src/metrics.rs: {names:?}"
    );
    names
}

/// `ftpgate_*` names in a PromQL expression, histogram suffixes removed.
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("ftpgate_") {
        let start = i + pos;
        let preceded = start > 0 && {
            let c = bytes[start - 1];
            c.is_ascii_alphanumeric() || c == b'_' || c == b':'
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded {
            let mut name = &expr[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base;
                }
            }
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

fn assert_known(what: &str, expr: &str, known: &BTreeSet<String>) {
    for m in metrics_in(expr) {
        assert!(
            known.contains(&m),
            "{what} uses {m}, which ftpgate does not export (src/metrics.rs): {expr}"
        );
    }
}

fn toml_file(path: &Path) -> toml::Table {
    read(path)
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn toml_str<'a>(t: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    t.get(section)?.as_table()?.get(key)?.as_str()
}

fn shutdown_grace(t: &toml::Table) -> Duration {
    let s = toml_str(t, "limits", "shutdown_grace").unwrap_or("30s");
    humantime::parse_duration(s).unwrap()
}

/// The ftpgate.toml inside deploy/kubernetes/configmap.yaml.
fn configmap_toml() -> String {
    let src = read(&deploy("kubernetes/configmap.yaml"));
    let lines: Vec<&str> = src.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("ftpgate.toml: |"))
        .expect("configmap.yaml has data.\"ftpgate.toml\" as a literal block");
    let indent = lines[at].len() - lines[at].trim_start().len();
    let mut body = String::new();
    let mut strip = None;
    for l in &lines[at + 1..] {
        let ind = l.len() - l.trim_start().len();
        if !l.trim().is_empty() && ind <= indent {
            break;
        }
        let strip = *strip.get_or_insert(ind);
        body.push_str(l.get(strip..).unwrap_or(""));
        body.push('\n');
    }
    body
}

fn port_of(bind: &str) -> u16 {
    bind.rsplit(':').next().unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------
// systemd

#[test]
fn systemd_unit_has_the_required_settings() {
    let unit = read(&deploy("systemd/ftpgate.service"));
    let d = unit_directives(&unit);
    assert_eq!(
        one(&d, "ExecStart"),
        "/usr/local/bin/ftpgate run --config /etc/ftpgate/ftpgate.toml"
    );
    assert_eq!(one(&d, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&d, "KillSignal"), "SIGTERM");
    assert_eq!(one(&d, "Restart"), "on-failure");
    assert_eq!(one(&d, "LogsDirectory"), "ftpgate");
    assert_eq!(one(&d, "CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one(&d, "AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(
        one(&d, "RestrictAddressFamilies"),
        "AF_INET AF_INET6 AF_UNIX"
    );
    assert!(d["SystemCallFilter"].iter().any(|v| v == "@system-service"));
    assert!(
        d.get("User").is_some_and(|v| v == &["ftpgate"])
            || d.get("DynamicUser").is_some_and(|v| v == &["yes"]),
        "a dedicated user: User=ftpgate or DynamicUser=yes"
    );
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        assert_eq!(one(&d, key), "yes", "{key}");
    }
    assert_eq!(one(&d, "ProtectSystem"), "strict");
    assert_eq!(one(&d, "SystemCallArchitectures"), "native");
    let nofile: u64 = one(&d, "LimitNOFILE").parse().unwrap();
    assert!(nofile >= 65536, "LimitNOFILE={nofile}");
    assert!(unit.contains("CAP_NET_ADMIN"), "the TPROXY note");

    // systemd must wait longer than the daemon's own drain.
    let cfg = toml_file(&deploy("systemd/ftpgate.toml"));
    let stop = humantime::parse_duration(one(&d, "TimeoutStopSec")).unwrap();
    let grace = shutdown_grace(&cfg);
    assert!(
        stop >= grace + Duration::from_secs(10),
        "TimeoutStopSec {stop:?} must exceed shutdown_grace {grace:?} by the 5s session close and a margin"
    );
    // The deny log lives in the unit's LogsDirectory, and logrotate rotates it.
    let path = toml_str(&cfg, "deny_log", "path").unwrap();
    assert_eq!(path, "/var/log/ftpgate/deny.jsonl");
    let rotate = read(&deploy("logrotate/ftpgate"));
    assert!(rotate.contains(&format!("{path} {{")));
    assert!(
        !rotate.contains("\tcopytruncate"),
        "SIGHUP reopens the file"
    );
    assert!(rotate.contains("systemctl reload ftpgate"));
}

#[test]
fn systemd_analyze_verify_is_clean() {
    let test = "systemd_analyze_verify_is_clean";
    let Some(analyze) = tool("systemd-analyze") else {
        return skip(
            test,
            "systemd-analyze is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = read(&deploy("systemd/ftpgate.service"));
    // verify insists that ExecStart's binary exists: use the one cargo built.
    let ours = unit.replace(
        "ExecStart=/usr/local/bin/ftpgate ",
        &format!("ExecStart={} ", ftpgate()),
    );
    assert_ne!(ours, unit, "ExecStart=/usr/local/bin/ftpgate ... not found");
    let path = dir.path().join("ftpgate.service");
    std::fs::write(&path, ours).unwrap();
    let out = run(
        "systemd-analyze verify",
        Command::new(analyze).arg("verify").arg(&path),
    );
    let said = text(&out);
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains(&*path.to_string_lossy()) || l.contains("ftpgate.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify complains about the unit:\n{said}"
    );
}

#[test]
fn kernel_plane_drop_in_verifies_and_grants_only_netlink_admin() {
    let test = "kernel_plane_drop_in_verifies_and_grants_only_netlink_admin";
    let drop_in = read(&deploy("systemd/kernel-plane/kernel-plane.conf"));
    let d = unit_directives(&drop_in);
    assert_eq!(
        one(&d, "AmbientCapabilities"),
        "CAP_NET_BIND_SERVICE CAP_NET_ADMIN"
    );
    assert_eq!(
        one(&d, "CapabilityBoundingSet"),
        "CAP_NET_BIND_SERVICE CAP_NET_ADMIN"
    );
    assert!(one(&d, "RestrictAddressFamilies").contains("AF_NETLINK"));
    assert!(
        one(&d, "ExecStartPre").contains("ftpgate nft-rules --config /etc/ftpgate/ftpgate.toml"),
        "the drop-in loads the rules ftpgate prints"
    );
    let sysctl = read(&deploy("sysctl/90-ftpgate-kernel-plane.conf"));
    for key in [
        "net.ipv4.ip_forward = 1",
        "net.netfilter.nf_conntrack_acct = 1",
    ] {
        assert!(sysctl.contains(key), "{key} missing from the sysctl file");
    }
    // Both planes: the shipped data range is reserved from ephemeral use.
    let ports = read(&deploy("sysctl/90-ftpgate-data-ports.conf"));
    assert!(
        ports.contains("net.ipv4.ip_local_reserved_ports = 50000-50999"),
        "the data-port sysctl file reserves the shipped range"
    );
    assert!(
        read(&deploy("systemd/ftpgate.toml")).contains("ports = \"50000-50999\""),
        "the systemd config's data range is the one the sysctl file reserves"
    );
    let Some(analyze) = tool("systemd-analyze") else {
        return skip(
            test,
            "systemd-analyze is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    // The unit with the drop-in applied, as systemd would see it.
    let dir = tempfile::tempdir().unwrap();
    let unit = read(&deploy("systemd/ftpgate.service"))
        .replace("/usr/local/bin/ftpgate ", &format!("{} ", ftpgate()));
    let path = dir.path().join("ftpgate.service");
    std::fs::write(&path, unit).unwrap();
    let drop_dir = dir.path().join("ftpgate.service.d");
    std::fs::create_dir_all(&drop_dir).unwrap();
    std::fs::write(
        drop_dir.join("kernel-plane.conf"),
        drop_in.replace("/usr/local/bin/ftpgate ", &format!("{} ", ftpgate())),
    )
    .unwrap();
    let out = run(
        "systemd-analyze verify (with the kernel-plane drop-in)",
        Command::new(analyze).arg("verify").arg(&path),
    );
    let said = text(&out);
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ftpgate.service") || l.contains("kernel-plane.conf"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify complains:\n{said}"
    );
}

#[test]
fn systemd_analyze_security_exposure_is_low() {
    let test = "systemd_analyze_security_exposure_is_low";
    let Some(analyze) = tool("systemd-analyze") else {
        return skip(
            test,
            "systemd-analyze is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let out = run(
        "systemd-analyze security --offline=true",
        Command::new(analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(deploy("systemd/ftpgate.service")),
    );
    let said = text(&out);
    if said.contains("unrecognized option") || said.contains("Unknown command") {
        return skip(
            test,
            "this systemd-analyze has no `security --offline` (systemd < 250)",
        );
    }
    let score: f64 = said
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for ftpgate.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{said}"));
    println!("exposure score of deploy/systemd/ftpgate.service: {score} (at most {MAX_EXPOSURE})");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{said}"
    );
}

#[test]
fn sysusers_creates_the_service_user() {
    let test = "sysusers_creates_the_service_user";
    let Some(sysusers) = tool("systemd-sysusers") else {
        return skip(
            test,
            "systemd-sysusers is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    if !is_root() {
        return skip(
            test,
            "systemd-sysusers --root needs root to write the passwd files",
        );
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let file = std::fs::File::open(deploy("systemd/ftpgate.sysusers")).unwrap();
    let out = run(
        "systemd-sysusers",
        Command::new(sysusers)
            .arg(format!("--root={}", root.path().display()))
            .arg("-")
            .stdin(file),
    );
    assert!(out.status.success());
    let passwd = read(&root.path().join("etc/passwd"));
    let user = passwd
        .lines()
        .find(|l| l.starts_with("ftpgate:"))
        .unwrap_or_else(|| panic!("no ftpgate user:\n{passwd}"));
    assert!(user.ends_with(":/usr/sbin/nologin"), "{user}");
    assert!(read(&root.path().join("etc/group")).contains("ftpgate:"));
}

#[test]
fn logrotate_rotates_and_reloads() {
    let test = "logrotate_rotates_and_reloads";
    let Some(logrotate) = tool("logrotate") else {
        return skip(
            test,
            "logrotate is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The shipped file parses (debug mode changes nothing).
    let out = run(
        "logrotate -d",
        Command::new(&logrotate)
            .arg("-d")
            .arg("-s")
            .arg(&state)
            .arg(deploy("logrotate/ftpgate")),
    );
    let said = text(&out);
    assert!(
        out.status.success() && !said.contains("error"),
        "logrotate -d deploy/logrotate/ftpgate:\n{said}"
    );
    // A real rotation of a copy pointed at a temp dir, its postrotate
    // replaced by a marker: the file is renamed, not recreated (ftpgate does
    // that on SIGHUP), and the reload runs once.
    let shipped = read(&deploy("logrotate/ftpgate"));
    let log = dir.path().join("deny.jsonl");
    let marker = dir.path().join("reloaded");
    let mut conf = String::new();
    let mut in_script = false;
    for line in shipped.lines() {
        let t = line.trim();
        if t == "postrotate" {
            in_script = true;
            writeln!(conf, "{line}\n\t\techo reload >> {}", marker.display()).unwrap();
        } else if t == "endscript" {
            in_script = false;
            writeln!(conf, "{line}").unwrap();
        } else if !in_script {
            let line = line.replace("/var/log/ftpgate/deny.jsonl", &log.to_string_lossy());
            writeln!(conf, "{line}").unwrap();
        }
    }
    let conf_path = dir.path().join("ftpgate.logrotate");
    std::fs::write(&conf_path, conf).unwrap();
    let lines = "{\"reason\":\"bounce\"}\n{\"reason\":\"pinhole_expired\"}\n";
    std::fs::write(&log, lines).unwrap();
    let out = run(
        "logrotate -f (copy)",
        Command::new(&logrotate)
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf_path),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !log.exists(),
        "nocreate: ftpgate reopens and creates the file"
    );
    assert_eq!(read(&marker), "reload\n", "postrotate ran once");
    let rotated: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("deny.jsonl-")
        })
        .collect();
    assert_eq!(rotated.len(), 1, "{rotated:?}");
    assert_eq!(
        read(&rotated[0]),
        lines,
        "delaycompress: newest rotation is plain"
    );
}

// ---------------------------------------------------------------------------
// ftpgate check-config on every shipped configuration

#[test]
fn shipped_configs_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let k8s = dir.path().join("kubernetes-configmap.toml");
    std::fs::write(&k8s, configmap_toml()).unwrap();
    for path in [
        deploy("systemd/ftpgate.toml"),
        // the container image's /etc/ftpgate/ftpgate.toml
        repo().join("config/ftpgate.toml"),
        k8s.clone(),
    ] {
        let out = run(
            &format!("ftpgate check-config --config {}", path.display()),
            Command::new(ftpgate())
                .args(["check-config", "--config"])
                .arg(&path),
        );
        assert!(out.status.success(), "{}:\n{}", path.display(), text(&out));
    }
}

// ---------------------------------------------------------------------------
// Prometheus

#[test]
fn alert_rules_pass_promtool_check() {
    let test = "alert_rules_pass_promtool_check";
    let Some(promtool) = tool("promtool") else {
        return skip(
            test,
            "promtool (Debian package prometheus) is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let out = run(
        "promtool check rules",
        Command::new(promtool)
            .args(["check", "rules"])
            .arg(deploy("prometheus/ftpgate-alerts.yml")),
    );
    assert!(out.status.success());
    assert!(text(&out).contains("SUCCESS"));
}

#[test]
fn alert_rule_unit_tests_pass() {
    let test = "alert_rule_unit_tests_pass";
    let Some(promtool) = tool("promtool") else {
        return skip(
            test,
            "promtool (Debian package prometheus) is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let out = run(
        "promtool test rules",
        Command::new(promtool)
            .args(["test", "rules", "ftpgate-alerts.test.yml"])
            .current_dir(deploy("prometheus")),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The unit tests cover at least these alerts, firing and quiet.
    let tests = read(&deploy("prometheus/ftpgate-alerts.test.yml"));
    for alert in [
        "FtpgateBounceAttempt",
        "FtpgatePinholesExpiring",
        "FtpgateDenyLogDropping",
    ] {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no quiet case"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no firing case"
        );
    }
}

#[test]
fn scrape_config_passes_promtool_check() {
    let test = "scrape_config_passes_promtool_check";
    let Some(promtool) = tool("promtool") else {
        return skip(
            test,
            "promtool (Debian package prometheus) is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    let out = run(
        "promtool check config",
        Command::new(promtool)
            .args(["check", "config"])
            .arg(deploy("prometheus/scrape.yml")),
    );
    assert!(out.status.success());
    let said = text(&out);
    assert!(said.contains("ftpgate-alerts.yml"), "rule file included");
    let scrape = read(&deploy("prometheus/scrape.yml"));
    assert!(scrape.contains("job_name: ftpgate"));
    assert!(scrape.contains("127.0.0.1:9121"));
}

#[test]
fn alerts_cover_the_symptoms_with_known_metrics() {
    let known = known_metrics();
    let alerts = alerts();
    let names: BTreeSet<&str> = alerts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names.len(), alerts.len(), "alert names are unique");
    for (alert, must_use) in [
        ("FtpgateDown", "up{job=\"ftpgate\"}"),
        ("FtpgateBounceAttempt", "reason=~\"bounce|fxp_denied\""),
        ("FtpgatePasvTheft", "reason=\"pasv_theft\""),
        ("FtpgatePinholesExpiring", "ftpgate_pinholes_expired_total"),
        ("FtpgatePortPoolExhausted", "ftpgate_port_pool_free"),
        ("FtpgateDenyLogDropping", "ftpgate_deny_log_dropped_total"),
        (
            "FtpgateUpstreamConnectFailures",
            "ftpgate_upstream_connect_failures_total",
        ),
        ("FtpgateConfigReloadFailed", "result=\"failure\""),
    ] {
        let a = alerts
            .iter()
            .find(|a| a.name == alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(a.expr.contains(must_use), "{alert}: {}", a.expr);
    }
    for a in &alerts {
        assert!(!a.expr.is_empty(), "{}: no expr", a.name);
        assert_known(&format!("alert {}", a.name), &a.expr, &known);
        let sev = a.severity.as_deref().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&sev),
            "{}: severity {sev:?}",
            a.name
        );
        assert!(
            a.summary.as_deref().is_some_and(|s| s.len() > 10),
            "{}: summary",
            a.name
        );
        let desc = a.description.as_deref().unwrap_or_default();
        // A runbook hint: a command the operator runs on the gateway.
        assert!(
            [
                "ftpgate denials",
                "ftpgate check-config",
                "grep ",
                "journalctl"
            ]
            .iter()
            .any(|c| desc.contains(c)),
            "{}: description names no command to run: {desc}",
            a.name
        );
    }
    let pinholes = alerts
        .iter()
        .find(|a| a.name == "FtpgatePinholesExpiring")
        .unwrap();
    assert!(
        pinholes
            .description
            .as_deref()
            .unwrap()
            .contains("--reason pinhole_expired")
    );
}

// ---------------------------------------------------------------------------
// Grafana

fn dashboard() -> Value {
    serde_json::from_str(&read(&deploy("grafana/ftpgate-dashboard.json"))).unwrap()
}

/// Every panel, rows' nested panels included.
fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

#[test]
fn dashboard_panels_use_known_metrics() {
    let known = known_metrics();
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let mut used = BTreeSet::new();
    let all = panels(&d);
    for p in &all {
        let id = p["id"].as_u64().expect("every panel has an id");
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(!title.is_empty());
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(titles.insert(title), "duplicate panel title {title:?}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?} uses the datasource variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert_known(&format!("panel {title:?}"), expr, &known);
            used.extend(metrics_in(expr));
        }
    }
    println!("dashboard: {} panels, metrics used: {used:?}", all.len());
    for m in [
        "ftpgate_sessions_active",
        "ftpgate_sessions_total",
        "ftpgate_denials_total",
        "ftpgate_pinholes_open",
        "ftpgate_pinholes_opened_total",
        "ftpgate_pinholes_expired_total",
        "ftpgate_port_pool_free",
        "ftpgate_data_bytes_total",
        "ftpgate_pinhole_wait_seconds",
        "ftpgate_upstream_connect_seconds",
        "ftpgate_data_transfer_seconds",
        "ftpgate_deny_log_dropped_total",
        "ftpgate_config_reloads_total",
    ] {
        assert!(used.contains(m), "no panel shows {m}");
    }
    let exprs: String = all
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| format!("{}\n", t["expr"].as_str().unwrap()))
        .collect();
    for q in ["0.5", "0.95"] {
        assert!(
            exprs.contains(&format!(
                "histogram_quantile({q}, sum by (le) (rate(ftpgate_pinhole_wait_seconds_bucket"
            )),
            "pinhole wait quantile {q}"
        );
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let test = "dashboard_queries_parse_as_promql";
    let Some(promtool) = tool("promtool") else {
        return skip(
            test,
            "promtool (Debian package prometheus) is not installed; scripts/install-test-deps installs it (as root)",
        );
    };
    // Each query as a recording rule, Grafana's variables filled in, so
    // promtool's PromQL parser reads it.
    let d = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            n += 1;
            writeln!(
                rules,
                "      - record: ftpgate_dashboard:query_{n}\n        expr: {}",
                serde_json::to_string(&expr).unwrap()
            )
            .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = run(
        &format!("promtool check rules ({n} dashboard queries)"),
        Command::new(promtool).args(["check", "rules"]).arg(&file),
    );
    assert!(out.status.success(), "{}", text(&out));
}

// ---------------------------------------------------------------------------
// Container

/// Containerfile instructions, continuation lines joined, comments dropped.
fn containerfile() -> Vec<String> {
    let src = read(&deploy("container/Containerfile"));
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with('#') && cur.is_empty() || t.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// Files `cargo build` needs besides Cargo.toml and Cargo.lock: the library
/// and binary sources, a build script, and every target Cargo.toml declares
/// explicitly (`[[bench]]`, `[[test]]`, `[[example]]`, `[[bin]]`: Cargo
/// rejects the manifest when their files are missing, even for a build that
/// does not compile them). Auto-discovered tests and examples are not needed.
fn cargo_manifest_files() -> Vec<String> {
    let manifest = toml_file(&repo().join("Cargo.toml"));
    let mut files = vec!["src/main.rs".to_string()];
    if repo().join("src/lib.rs").exists() {
        files.push("src/lib.rs".to_string());
    }
    if let Some(path) = manifest.get("lib").and_then(|l| l.get("path")) {
        files.push(path.as_str().unwrap().to_string());
    }
    match manifest["package"].get("build") {
        Some(toml::Value::String(b)) => files.push(b.clone()),
        Some(toml::Value::Boolean(false)) => {}
        _ if repo().join("build.rs").exists() => files.push("build.rs".to_string()),
        _ => {}
    }
    for (section, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
        ("bin", "src/bin"),
    ] {
        for target in manifest
            .get(section)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match target.get("path") {
                Some(p) => p.as_str().unwrap().to_string(),
                None => {
                    let name = target["name"].as_str().unwrap();
                    let single = format!("{dir}/{name}.rs");
                    if repo().join(&single).exists() {
                        single
                    } else {
                        format!("{dir}/{name}/main.rs")
                    }
                }
            };
            files.push(path);
        }
    }
    files
}

#[test]
fn containerfile_is_coherent_and_lints_clean() {
    let test = "containerfile_is_coherent_and_lints_clean";
    let ins = containerfile();
    let froms: Vec<&String> = ins.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].starts_with("FROM rust:1-bookworm AS "));
    assert_eq!(froms[1], "FROM debian:bookworm-slim");
    assert!(
        ins.iter()
            .any(|i| i.starts_with("RUN ") && i.contains("cargo build --release --locked"))
    );
    // Every COPY from the build context names something in the repository.
    let mut copied: Vec<String> = Vec::new();
    for i in ins.iter().filter(|i| i.starts_with("COPY ")) {
        let words: Vec<&str> = i.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from=")) {
            continue;
        }
        let args: Vec<&&str> = words.iter().filter(|w| !w.starts_with("--")).collect();
        for src in &args[..args.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "{i}: {src} does not exist in the repository"
            );
            copied.push(src.trim_start_matches("./").to_string());
        }
    }
    // Cargo refuses a manifest whose declared targets' files are missing, so
    // the builder stage must copy every file Cargo.toml names.
    for file in cargo_manifest_files() {
        assert!(
            copied
                .iter()
                .any(|c| file == *c || file.starts_with(&format!("{}/", c.trim_end_matches('/')))),
            "Cargo.toml needs {file}, which the Containerfile does not COPY (copies {copied:?})"
        );
    }
    let user = ins
        .iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("a USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "non-root: {user}"
    );
    // EXPOSE matches the configuration the image ships.
    let cfg = toml_file(&repo().join("config/ftpgate.toml"));
    let data = toml_str(&cfg, "data", "ports").unwrap();
    let admin = toml_str(&cfg, "admin", "bind").unwrap();
    let expose = ins
        .iter()
        .find_map(|i| i.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    let listener = cfg["listener"].as_array().unwrap()[0]["bind"][0]
        .as_str()
        .unwrap();
    for port in [
        format!("{}/tcp", port_of(listener)),
        format!("{}/tcp", port_of(admin)),
        format!("{data}/tcp"),
    ] {
        assert!(
            expose.split_whitespace().any(|p| p == port),
            "EXPOSE {expose} lacks {port}"
        );
    }

    let Some(hadolint) = tool("hadolint") else {
        return skip(
            test,
            "hadolint is not installed (venv /opt/ftpgate-lab/venv); scripts/install-test-deps installs it (as root)",
        );
    };
    let out = run(
        "hadolint",
        Command::new(hadolint).arg(deploy("container/Containerfile")),
    );
    assert!(out.status.success(), "hadolint: {}", text(&out));
}

/// A free TCP port on 127.0.0.1 (released again; the race is harmless here).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn container_healthcheck_probes_readyz() {
    let test = "container_healthcheck_probes_readyz";
    if tool("bash").is_none() {
        return skip(test, "bash is not installed");
    }
    let hc = containerfile()
        .into_iter()
        .find(|i| i.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let json = &hc[hc.find("CMD [").expect("exec form") + 4..];
    let argv: Vec<String> = serde_json::from_str(json).unwrap();
    let cfg = toml_file(&repo().join("config/ftpgate.toml"));
    let admin = toml_str(&cfg, "admin", "bind").unwrap();
    let image_target = format!("/dev/tcp/{}", admin.replace(':', "/"));
    assert!(
        argv.iter().any(|a| a.contains(&image_target)),
        "the HEALTHCHECK asks the image's admin listener {admin}: {argv:?}"
    );

    // A real gateway with its admin listener on a free port.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("ftpgate.toml");
    std::fs::write(
        &conf,
        format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:{}\"]\nupstream = \"127.0.0.1:9\"\n\
             [data]\nports = \"52980-52989\"\n[admin]\nbind = \"127.0.0.1:{port}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let ours: Vec<String> = argv
        .iter()
        .map(|a| a.replace(&image_target, &format!("/dev/tcp/127.0.0.1/{port}")))
        .collect();
    let check = || {
        Command::new(&ours[0])
            .args(&ours[1..])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let gw = Killed(
        Command::new(ftpgate())
            .args(["run", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin_addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut healthy = check();
    while !healthy && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        healthy = check();
    }
    assert!(healthy, "HEALTHCHECK fails against a ready gateway");
    drop(gw);
    assert!(!check(), "HEALTHCHECK passes with no gateway");
    println!("HEALTHCHECK {ours:?}: healthy while running, unhealthy after");
}

// ---------------------------------------------------------------------------
// Kubernetes

const MANIFESTS: [&str; 4] = [
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "pdb.yaml",
];

#[test]
fn kubernetes_manifests_validate_strict() {
    let test = "kubernetes_manifests_validate_strict";
    let Some(validate) = tool("kubernetes-validate") else {
        return skip(
            test,
            "kubernetes-validate is not installed (venv /opt/ftpgate-lab/venv); scripts/install-test-deps installs it (as root)",
        );
    };
    for m in MANIFESTS {
        let out = run(
            &format!("kubernetes-validate --strict {m}"),
            Command::new(&validate)
                .arg("--strict")
                .arg(deploy("kubernetes").join(m)),
        );
        let said = text(&out);
        assert!(
            out.status.success() && said.contains("passed") && !said.contains("ERROR"),
            "{m}: {said}"
        );
    }
}

#[test]
fn kubernetes_manifests_are_coherent() {
    let dir = deploy("kubernetes");
    let kustomization = read(&dir.join("kustomization.yaml"));
    for m in MANIFESTS {
        assert!(
            kustomization.contains(&format!("- {m}")),
            "kustomization lists {m}"
        );
    }
    let dep = read(&dir.join("deployment.yaml"));
    for must in [
        "hostNetwork: true",
        "dnsPolicy: ClusterFirstWithHostNet",
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "path: /healthz",
        "path: /readyz",
        "resources:",
        "name: ftpgate-config",
    ] {
        assert!(dep.contains(must), "deployment.yaml lacks {must:?}");
    }
    let field = |src: &str, key: &str| -> Vec<String> {
        let lines: Vec<&str> = src.lines().collect();
        (0..lines.len())
            .filter(|&i| {
                lines[i]
                    .trim_start()
                    .trim_start_matches("- ")
                    .starts_with(&format!("{key}:"))
            })
            .map(|i| yaml_value(&lines, i))
            .collect()
    };
    // The image's user is the one the pod runs as.
    let image_user = containerfile()
        .into_iter()
        .rev()
        .find_map(|i| i.strip_prefix("USER ").map(str::to_string))
        .unwrap();
    assert_eq!(
        field(&dep, "runAsUser"),
        [image_user.split(':').next().unwrap()]
    );
    // Ports in the pod spec are the ones the ConfigMap binds.
    let cfg: toml::Table = configmap_toml().parse().unwrap();
    let listener = cfg["listener"].as_array().unwrap()[0]["bind"][0]
        .as_str()
        .unwrap();
    let admin = toml_str(&cfg, "admin", "bind").unwrap();
    assert!(
        admin.starts_with("0.0.0.0:"),
        "kubelet probes the pod IP: admin must not bind loopback ({admin})"
    );
    let ports = field(&dep, "containerPort");
    assert!(ports.contains(&port_of(listener).to_string()), "{ports:?}");
    assert!(ports.contains(&port_of(admin).to_string()), "{ports:?}");
    assert_eq!(
        toml_str(&cfg, "deny_log", "path"),
        Some("-"),
        "readOnlyRootFilesystem: the deny log goes to standard output"
    );
    // Kubernetes waits longer than the daemon drains.
    let grace: u64 = field(&dep, "terminationGracePeriodSeconds")[0]
        .parse()
        .unwrap();
    assert!(Duration::from_secs(grace) > shutdown_grace(&cfg) + Duration::from_secs(5));
    let svc = read(&dir.join("service.yaml"));
    assert!(field(&svc, "port").contains(&port_of(admin).to_string()));
}

// ---------------------------------------------------------------------------
// The index

#[test]
fn deploy_readme_names_existing_files() {
    let readme = read(&deploy("README.md"));
    let mut named = BTreeSet::new();
    for word in readme.split(|c: char| c.is_whitespace() || "`()[],:".contains(c)) {
        if let Some(rest) = word.strip_prefix("deploy/") {
            let rest = rest.trim_end_matches(['.', ';']);
            if !rest.is_empty() {
                named.insert(rest.to_string());
            }
        }
    }
    assert!(
        named.len() >= 8,
        "the index names the kit's files: {named:?}"
    );
    for rel in &named {
        assert!(deploy(rel).exists(), "deploy/README.md names deploy/{rel}");
    }
    for cmd in [
        "ftpgate nft-rules --config /etc/ftpgate/ftpgate.toml > /etc/nftables.d/ftpgate.nft",
        "systemctl enable --now ftpgate",
        "ftpgate check-config --config /etc/ftpgate/ftpgate.toml",
    ] {
        assert!(readme.contains(cmd), "deploy/README.md lacks `{cmd}`");
    }
}
