//! The faults' kernel data plane: the namespace lab of `tests/lab/lab.sh`
//! under a prefix of its own (`fgf-` plus `FG_LAB_TAG`), with ftpgate in
//! transparent mode in the gateway namespace, started (and restarted with
//! other limits) as the faults need. What the loopback tests read from
//! their child process, read here from the gateway namespace: `/proc` of
//! the gateway, its metrics, its deny log, and the kernel's pinhole
//! elements (`ftpgate pinholes`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{Sample, metric, parse_metrics, pseudo_random};
use super::{Idle, fd_listing, tail};

/// srv1 (vsftpd).
pub const LAB_SRV1: &str = "198.51.100.20";
/// out3: nothing listens on port 21 there.
pub const LAB_OUT3: &str = "198.51.100.30";

/// How the gateway is started.
#[derive(Default)]
pub struct LabGateway {
    /// Where the deny log goes (default: the lab's temporary dir).
    pub deny_log: Option<PathBuf>,
    /// RLIMIT_NOFILE, soft and hard (`prlimit`; the daemon raises soft to
    /// hard).
    pub nofile: Option<u32>,
}

/// The lab, torn down on drop with the gateway.
pub struct KernelLab {
    prefix: String,
    plane: String,
    gateway: Option<Child>,
    pub pid: u32,
    pub dir: tempfile::TempDir,
    deny_log: PathBuf,
    /// The gateway's standard error of this start.
    stderr: PathBuf,
    starts: usize,
}

impl KernelLab {
    pub fn lab(&self, args: &[&str]) -> std::process::Output {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh"))
            .args(args)
            .env("FG_PREFIX", &self.prefix)
            .env("FG_STATE", self.state())
            .output()
            .expect("run lab.sh")
    }

    pub fn state(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/fglab-{}", self.prefix))
    }

    /// Runs `cmd` in lab host `host`, bounded in time.
    pub fn exec(&self, host: &str, cmd: &[&str]) -> std::process::Output {
        let mut all = vec!["exec", host, "timeout", "60"];
        all.extend_from_slice(cmd);
        self.lab(&all)
    }

    pub fn spawn(&self, host: &str, cmd: &[&str]) -> Child {
        Command::new("ip")
            // No `timeout` in between: killing the child kills the client.
            .args(["netns", "exec", &format!("{}{host}", self.prefix)])
            .args(cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Builds the lab, loads the rules `ftpgate nft-rules` prints and
    /// starts the gateway with the defaults of [`LabGateway`].
    pub fn up(plane: &str) -> KernelLab {
        let prefix = super::prereq::lab_prefix("fgf-");
        let dir = tempfile::tempdir().unwrap();
        let mut lab = KernelLab {
            prefix,
            plane: plane.to_string(),
            gateway: None,
            pid: 0,
            deny_log: dir.path().join("deny.jsonl"),
            stderr: dir.path().join("ftpgate.stderr"),
            dir,
            starts: 0,
        };
        let up = lab.lab(&["up"]);
        assert!(up.status.success(), "lab up: {}", out_text(&up));
        let s = lab.lab(&["start-servers"]);
        assert!(s.status.success(), "start-servers: {}", out_text(&s));
        // Larger than every socket buffer on the way, so a slow download
        // is still in flight at the server when the fault hits.
        std::fs::write(
            lab.state().join("srv1/root/big.bin"),
            pseudo_random(48 << 20),
        )
        .unwrap();
        let config = lab.write_config();
        let gw = format!("{}gw", lab.prefix);
        super::rules::load_printed_rules(&config, lab.dir.path(), &gw, plane);
        lab.start_gateway(LabGateway::default());
        lab
    }

    /// The gateway's config, with the deny log at `self.deny_log`. Three
    /// pinhole ports (the first port of the range is the kernel plane's
    /// fall-through listener); `burst` high enough that the disk-full
    /// fault's lines are written, not aggregated.
    fn write_config(&self) -> PathBuf {
        let config = self.dir.path().join("ftpgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[[listener]]
mode = "transparent"
bind = ["0.0.0.0:2121"]
interfaces = ["br-in"]

[data]
plane = "{}"
ports = "50000-50003"
accept_timeout = "30s"

[deny_log]
path = "{}"
burst = 1000

[admin]
bind = "127.0.0.1:9121"
"#,
                self.plane,
                self.deny_log.display()
            ),
        )
        .unwrap();
        config
    }

    /// (Re)starts the gateway with `how`; the nftables rules stay (the
    /// gateway flushes its own elements at start).
    pub fn start_gateway(&mut self, how: LabGateway) {
        self.stop_gateway();
        self.starts += 1;
        self.deny_log = how
            .deny_log
            .unwrap_or_else(|| self.dir.path().join("deny.jsonl"));
        self.stderr = self
            .dir
            .path()
            .join(format!("ftpgate-{}.stderr", self.starts));
        let config = self.write_config();
        let stderr = std::fs::File::create(&self.stderr).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}gw", self.prefix)]);
        if let Some(n) = how.nofile {
            // prlimit sets the limit and execs: the pid stays.
            cmd.arg("prlimit")
                .arg(format!("--nofile={n}:{n}"))
                .arg("--");
        }
        let child = cmd
            .arg(env!("CARGO_BIN_EXE_ftpgate"))
            .args(["--log-level", "debug", "run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.pid = child.id();
        self.gateway = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while !self
            .exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/readyz"])
            .status
            .success()
        {
            assert!(Instant::now() < until, "gateway not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        // `ip netns exec` (and prlimit) exec: the child is the gateway.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap();
        assert_eq!(comm.trim(), "ftpgate");
    }

    pub fn stop_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }

    /// Whether the gateway process is still running.
    pub fn alive(&mut self) -> bool {
        self.gateway
            .as_mut()
            .is_some_and(|g| matches!(g.try_wait(), Ok(None)))
    }

    /// The standard error of the gateway's current start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn metrics(&self) -> Vec<Sample> {
        let o = self.exec("gw", &["curl", "-sf", "http://127.0.0.1:9121/metrics"]);
        parse_metrics(&String::from_utf8_lossy(&o.stdout))
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name, &[])
    }

    /// Waits (bounded) until metric `name` reads `want`.
    pub fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let now = self.metric(name);
            if now == want {
                return;
            }
            assert!(Instant::now() < until, "{name} is {now}, not {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Live kernel pinhole elements (`ftpgate pinholes`), one per line.
    pub fn elements(&self) -> usize {
        let o = self.exec("gw", &[env!("CARGO_BIN_EXE_ftpgate"), "pinholes"]);
        assert!(o.status.success(), "{}", out_text(&o));
        String::from_utf8_lossy(&o.stdout).lines().count()
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(usize::MAX, |d| d.count())
    }

    pub fn idle(&self) -> (Idle, usize) {
        let m = self.metrics();
        let idle = Idle {
            fds: self.open_fds(),
            sessions: metric(&m, "ftpgate_sessions_active", &[]),
            pinholes: metric(&m, "ftpgate_pinholes_open", &[]),
            data_connections: metric(&m, "ftpgate_data_connections_active", &[]),
        };
        (idle, self.elements())
    }

    /// The idle baseline: once two readings a moment apart agree, nothing
    /// is active and no element is in the kernel.
    pub fn baseline(&self) -> Idle {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let (a, _) = self.idle();
            std::thread::sleep(Duration::from_millis(200));
            let (b, elements) = self.idle();
            if a == b
                && elements == 0
                && b.sessions == 0.0
                && b.pinholes == 0.0
                && b.data_connections == 0.0
            {
                eprintln!("  kernel plane baseline: {b:?}");
                return b;
            }
            assert!(
                Instant::now() < until,
                "no stable idle baseline: {a:?} {b:?}, {elements} elements"
            );
        }
    }

    /// Waits (bounded: conntrack keeps a reset flow for 10 s) until the
    /// gateway is back to `base` with no pinhole elements in the kernel.
    /// Fewer descriptors than the baseline is no leak (a metrics scrape's
    /// admin connection can be in the baseline).
    pub fn back_to(&self, base: Idle, after: &str) {
        let until = Instant::now() + Duration::from_secs(40);
        loop {
            let (now, elements) = self.idle();
            if now.fds <= base.fds
                && now.sessions == base.sessions
                && now.pinholes == base.pinholes
                && now.data_connections == base.data_connections
                && elements == 0
            {
                eprintln!("  kernel plane, {after}: back to the baseline {now:?}, no elements");
                return;
            }
            assert!(
                Instant::now() < until,
                "kernel plane, {after}: {now:?} with {elements} elements, baseline {base:?}\n{}\n{}",
                fd_listing(self.pid),
                tail(&self.log(), 30)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Deny-log lines, parsed.
    pub fn denials(&self) -> Vec<serde_json::Value> {
        super::common::denials(&self.deny_log)
    }

    /// Waits (bounded) for a deny line for which `pred` holds.
    pub fn wait_denial(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !self.denials().iter().any(&pred) {
            assert!(
                Instant::now() < until,
                "no deny line {what}: {:?}",
                self.denials()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A checked curl download of srv1's data.bin from in1 (EPSV).
    pub fn download_intact(&self) {
        let out = self.dir.path().join("got.bin");
        let _ = std::fs::remove_file(&out);
        let o = self.exec(
            "in1",
            &[
                "curl",
                "-sS",
                "--max-time",
                "30",
                "-o",
                out.to_str().unwrap(),
                &format!("ftp://ftptest:ftptest@{LAB_SRV1}/data.bin"),
            ],
        );
        assert!(
            o.status.success(),
            "{}\n{}",
            out_text(&o),
            tail(&self.log(), 20)
        );
        let want = std::fs::read(self.state().join("srv1/root/data.bin")).unwrap();
        assert!(std::fs::read(&out).unwrap() == want, "download differs");
    }

    /// Starts a slow download in in1 and waits until its data flow is
    /// carried (the gateway counts an active data connection).
    pub fn slow_download(&self) -> Child {
        let out = self.dir.path().join("slow.bin");
        let _ = std::fs::remove_file(&out);
        let mut child = self.spawn(
            "in1",
            &[
                "curl",
                "-sS",
                "--max-time",
                "60",
                "--limit-rate",
                "200k",
                "-o",
                out.to_str().unwrap(),
                &format!("ftp://ftptest:ftptest@{LAB_SRV1}/big.bin"),
            ],
        );
        let until = Instant::now() + Duration::from_secs(15);
        while !(self.metric("ftpgate_data_connections_active") >= 1.0
            && std::fs::metadata(&out).map_or(0, |m| m.len()) > 100_000)
        {
            if let Ok(Some(_)) = child.try_wait() {
                let o = child.wait_with_output().unwrap();
                panic!("the slow download ended early: {}", out_text(&o));
            }
            assert!(
                Instant::now() < until,
                "the slow download did not start:\n{}",
                tail(&self.log(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    /// `sessions` sessions from lab host `host` to srv1, each earning
    /// `per_session` bounce denials (PORT naming another inside host, RFC
    /// 2577 section 3) before QUIT.
    pub fn bounces(&self, host: &str, sessions: usize, per_session: usize) {
        let script = format!(
            "import ftplib\n\
             for s in range({sessions}):\n\
             \x20   f = ftplib.FTP('{LAB_SRV1}', timeout=10)\n\
             \x20   f.login('ftptest', 'ftptest')\n\
             \x20   for i in range({per_session}):\n\
             \x20       try:\n\
             \x20           r = f.sendcmd('PORT 192,0,2,%d,4,%d' % (20 + i, i))\n\
             \x20       except ftplib.error_perm as e:\n\
             \x20           r = str(e)\n\
             \x20       assert r.startswith('504'), r\n\
             \x20   f.quit()\n\
             print('BOUNCED', {sessions} * {per_session})\n"
        );
        let o = self.exec(host, &["python3", "-c", &script]);
        assert!(o.status.success(), "bounces: {}", out_text(&o));
    }
}

impl Drop for KernelLab {
    fn drop(&mut self) {
        self.stop_gateway();
        if std::env::var_os("FG_KEEP_LAB").is_none() {
            self.lab(&["down"]);
        }
    }
}

pub fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
