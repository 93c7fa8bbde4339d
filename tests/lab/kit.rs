//! What the tests that run ftpgate in the namespace lab share
//! (`tests/nat_lab.rs`, `tests/xlate_lab.rs`, `tests/ftps_lab.rs`): the
//! lab's addresses, `lab.sh` for one lab, the lab torn down with its
//! gateway, ftpgate started in the gateway namespace, the tables every
//! lab config ends with, and the checks of downloads, metrics and deny
//! logs. Needs `mod prereq` (`tests/lab/prereq.rs`) beside it.

// Not every test that includes this file uses every piece.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::prereq::text;

/// srv1 (vsftpd).
pub const SRV1: &str = "198.51.100.20";
pub const SRV1_V6: &str = "2001:db8:2::20";
/// srv2 (proftpd).
pub const SRV2: &str = "198.51.100.21";
pub const SRV2_V6: &str = "2001:db8:2::21";
/// srv3 (pure-ftpd).
pub const SRV3: &str = "198.51.100.22";
pub const SRV3_V6: &str = "2001:db8:2::22";
/// out3 (the recorder, a bounce target).
pub const OUT3: &str = "198.51.100.30";
/// The gateway's inside addresses, where reverse listeners publish.
pub const GW_IN: &str = "192.0.2.1";
pub const GW_IN6: &str = "2001:db8:1::1";
/// The gateway's outside address.
pub const GW_OUT: &str = "198.51.100.1";

/// `tests/lab/lab.sh` for the lab of one namespace prefix.
#[derive(Clone)]
pub struct LabSh {
    pub prefix: String,
    /// `FG_STATE`: configs, logs, server roots.
    pub state: PathBuf,
    /// `FG_TLS=1`: `start-servers` runs FTPS-only servers.
    pub tls: bool,
    /// How long (seconds) [`LabSh::exec`] gives a command.
    pub timeout: &'static str,
}

impl LabSh {
    /// The lab of `prefix`, its state in `/tmp/fglab-<prefix>`, commands
    /// bounded to 60 s.
    pub fn new(prefix: &str) -> LabSh {
        LabSh {
            prefix: prefix.to_string(),
            state: PathBuf::from(format!("/tmp/fglab-{prefix}")),
            tls: false,
            timeout: "60",
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh"));
        cmd.args(args)
            .env("FG_PREFIX", &self.prefix)
            .env("FG_STATE", &self.state);
        if self.tls {
            cmd.env("FG_TLS", "1");
        }
        cmd.output().expect("run lab.sh")
    }

    /// Runs `cmd` in lab host `host`, bounded in time.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Output {
        let mut all = vec!["exec", host, "timeout", self.timeout];
        all.extend_from_slice(cmd);
        self.run(&all)
    }

    /// Builds the lab and starts its servers.
    pub fn up_with_servers(&self) {
        let up = self.run(&["up"]);
        assert!(up.status.success(), "lab up failed:\n{}", text(&up));
        let servers = self.run(&["start-servers"]);
        assert!(
            servers.status.success(),
            "start-servers failed:\n{}",
            text(&servers)
        );
    }

    /// The sha256 of `data.bin` on lab server `server` (e.g. "srv1").
    pub fn expected_sha(&self, server: &str) -> String {
        let p = self.state.join(server).join("root/data.bin.sha256");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    /// The gateway's metrics (its admin listener on 127.0.0.1:9121).
    pub fn metrics(&self) -> String {
        let o = self.exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/metrics"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The sum of the samples whose series starts with `name_and_labels`.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Starts ftpgate with `config` in the gateway namespace, its standard
    /// error appended to `log` (written over without `append`). Returns
    /// once /readyz answers; after 10 s it kills it and panics with the log.
    pub fn start_gateway(&self, config: &Path, log: &Path, append: bool) -> Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(log)
            .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &format!("{}gw", self.prefix)])
            .arg(env!("CARGO_BIN_EXE_ftpgate"))
            .args(["--log-level", "debug", "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self
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
        panic!(
            "gateway did not become ready:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// A lab that is torn down with its gateway when the test ends, however
/// it ends (`FG_KEEP_LAB` set: left up).
pub struct LabGuard {
    pub sh: LabSh,
    pub gateway: Option<Child>,
}

impl LabGuard {
    pub fn new(sh: LabSh) -> LabGuard {
        LabGuard { sh, gateway: None }
    }

    /// Kills the running gateway, if any.
    pub fn stop_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        self.stop_gateway();
        if std::env::var_os("FG_KEEP_LAB").is_none() {
            self.sh.run(&["down"]);
        }
    }
}

/// The tables every lab config ends with: the data plane and its pinhole
/// range, the deny log in `dir`, and the admin listener the tests read.
pub fn config_tables(plane: &str, dir: &Path) -> String {
    format!(
        r#"
[data]
plane = "{plane}"
ports = "50000-50999"
accept_timeout = "5s"

[deny_log]
path = "{}/deny.jsonl"

[admin]
bind = "127.0.0.1:9121"
"#,
        dir.display()
    )
}

/// `ftpgate check-config` accepts `config`.
pub fn check_config(config: &Path) {
    let check = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(check.status.success(), "check-config: {}", text(&check));
}

/// The sha256 of a file, empty if there is none.
pub fn sha256_file(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The deny log's lines at `path` that parse.
pub fn denials(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (10 s at most) for the first line of `reason` in the deny log at
/// `path` for which `pred` holds.
pub fn wait_denial(
    path: &Path,
    reason: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let found = denials(path)
            .into_iter()
            .find(|v| v["reason"] == reason && pred(v));
        if found.is_some() || Instant::now() > until {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
