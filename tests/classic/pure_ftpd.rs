//! pure-ftpd on a loopback port: the lab's unpacked copy
//! (`scripts/install-test-deps`, `/opt/ftpgate-lab/pure-ftpd`), run as
//! `tests/lab/lab.sh` runs it on srv3 (pure-ftpd(8): its own user file,
//! chroot, no anonymous login, every command and reply logged), throttled
//! so that a download is still running when a classic client's ^C comes.
//! Needs root (chroot, the user's uid, a mount namespace for /dev/log).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UNPACKED: &str = "/opt/ftpgate-lab/pure-ftpd";
/// The lab's user and password; the virtual user runs as nobody.
const USER: &str = "ftptest";
const NOBODY: u32 = 65534;

/// pure-ftpd and its syslog receiver, killed on drop.
pub struct PureFtpd {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// pure-ftpd, leader of a process group with its session processes.
    server: Child,
    syslog: Child,
}

impl PureFtpd {
    /// Starts it, downloads throttled to `kib_per_s` KiB/s (`-T`); `Err`
    /// says why it cannot run here.
    pub fn start(kib_per_s: u32) -> Result<PureFtpd, String> {
        let bin = Path::new(UNPACKED).join("usr/sbin/pure-ftpd");
        let pure_pw = Path::new(UNPACKED).join("usr/bin/pure-pw");
        if !bin.exists() || !pure_pw.exists() {
            return Err(format!(
                "pure-ftpd (lab copy in {UNPACKED}) is not installed"
            ));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("pure-ftpd needs root (chroot, setuid, a mount namespace)".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root).map_err(|e| e.to_string())?;
        for d in [dir.path(), &root] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| e.to_string())?;
        }
        // A crypt(3) hash, as lab.sh writes it (pure-pw's argon2id costs
        // seconds per login on a loaded machine).
        let hash = Command::new("openssl")
            .args(["passwd", "-6", "-salt", "fglab", USER])
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
        if !hash.starts_with("$6$") {
            return Err("openssl passwd -6 gave no hash".into());
        }
        let passwd = dir.path().join("pureftpd.passwd");
        std::fs::write(
            &passwd,
            format!(
                "{USER}:{hash}:{NOBODY}:{NOBODY}::{}/./::::::::::::\n",
                root.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let pdb = dir.path().join("pureftpd.pdb");
        let mkdb = Command::new(&pure_pw)
            .arg("mkdb")
            .arg(&pdb)
            .arg("-f")
            .arg(&passwd)
            .output()
            .map_err(|e| e.to_string())?;
        if !mkdb.status.success() {
            return Err(format!("pure-pw mkdb: {:?}", mkdb));
        }
        let lab = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab");
        let sock = dir.path().join("log.sock");
        let syslog = Command::new("/usr/bin/python3")
            .arg(lab.join("syslog.py"))
            .arg("--socket")
            .arg(&sock)
            .arg("--log")
            .arg(dir.path().join("syslog.log"))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > until {
                return Err("the syslog receiver did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // pure-ftpd takes a port, not a socket: a free one, again if
        // another process takes it first.
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut server = Command::new("unshare")
                .args(["--mount", "--propagation", "slave"])
                .arg(lab.join("with-devlog.sh"))
                .arg(&sock)
                .arg(&bin)
                .arg("-S")
                .arg(format!("127.0.0.1,{port}"))
                .arg(format!("-lpuredb:{}", pdb.display()))
                .args(["-E", "-A", "-H", "-d", "-d"])
                .arg("-T")
                .arg(format!("{kib_per_s}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("unshare: {e}"))?;
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Ok(PureFtpd {
                        addr,
                        dir,
                        server,
                        syslog,
                    });
                }
                if let Ok(Some(status)) = server.try_wait() {
                    last = format!("pure-ftpd exited ({status}) on port {port}");
                    break;
                }
                if Instant::now() > until {
                    kill_group(&mut server);
                    last = format!("pure-ftpd did not listen on port {port}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut syslog = syslog;
        let _ = syslog.kill();
        let _ = syslog.wait();
        Err(last)
    }

    /// The directory the user is chrooted into.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// What pure-ftpd logged (`-d -d`: every command and reply).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("syslog.log")).unwrap_or_default()
    }

    /// ABORs it read during a transfer: it logs no command line for
    /// those, only its reply, "426 ABORT".
    pub fn aborts(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.ends_with("426 ABORT"))
            .count()
    }
}

/// Kills pure-ftpd and the session processes it forked (its group).
fn kill_group(server: &mut Child) {
    // SAFETY: kill(2) with a negative pid signals the process group the
    // child leads (spawned with process_group(0)); no memory is involved.
    unsafe { libc::kill(-(server.id() as libc::pid_t), libc::SIGKILL) };
    let _ = server.wait();
}

impl Drop for PureFtpd {
    fn drop(&mut self) {
        kill_group(&mut self.server);
        let _ = self.syslog.kill();
        let _ = self.syslog.wait();
    }
}
