//! The classic command-line FTP clients (inetutils-ftp, tnftp: the BSD
//! ftp lineage) interrupted with ^C in the middle of a download, driven
//! under a pseudo-terminal by `tests/support/classic_ftp.py`. They abort
//! with Telnet IP and a Synch sent as TCP urgent data, then ABOR (RFC 959
//! section 4.1.3, RFC 854); these helpers build the driver's command line
//! and judge its report, and [`pure_ftpd::PureFtpd`] runs one of the servers they
//! abort against on loopback. Shared by `classic_clients.rs` (loopback)
//! and `nat_lab.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod pure_ftpd;

/// The Debian packages' binaries (netkit-ftp is gone from Debian; `ftp`
/// is tnftp).
pub const CLIENTS: [&str; 2] = ["inetutils-ftp", "tnftp"];

/// The full path of `client`, if installed.
pub fn find(client: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(client))
        .find(|p| p.exists())
}

/// The driver's command line. The prompt must come back within 15 s of ^C
/// when the server stops the transfer at once, 30 s when it finishes it.
pub fn driver_argv(
    client: &Path,
    host: &str,
    port: u16,
    file: &str,
    mode: &str,
    expect: Expect,
    transcript: &Path,
) -> Vec<String> {
    let within = match expect {
        Expect::Aborted => "15",
        Expect::Finished => "30",
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/classic_ftp.py");
    [
        "/usr/bin/python3".to_string(),
        script.display().to_string(),
        "--client".into(),
        client.display().to_string(),
        "--host".into(),
        host.into(),
        "--port".into(),
        port.to_string(),
        "--file".into(),
        file.into(),
        "--mode".into(),
        mode.into(),
        "--abort-within".into(),
        within.into(),
        "--transcript".into(),
        transcript.display().to_string(),
    ]
    .into()
}

/// How the server answers an ABOR that arrives during the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// It stops the transfer at once: 426, then 226 for ABOR.
    Aborted,
    /// It reads ABOR only when the transfer has ended (its final reply,
    /// then 225/226 for ABOR).
    Finished,
}

/// What the driver reported.
#[derive(Debug)]
pub struct Outcome {
    pub report: serde_json::Value,
    pub transcript: String,
}

impl Outcome {
    /// Reads the driver's JSON line from `stdout` and its transcript.
    pub fn read(stdout: &[u8], transcript: &Path) -> Outcome {
        let text = String::from_utf8_lossy(stdout);
        let report = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| serde_json::json!({ "error": format!("no report: {text}") }));
        let transcript = std::fs::read(transcript)
            .map(|t| String::from_utf8_lossy(&t).into_owned())
            .unwrap_or_default();
        Outcome { report, transcript }
    }

    /// The reply codes the client printed between ^C and its next prompt.
    pub fn after_interrupt(&self) -> Vec<String> {
        self.report["after_interrupt"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything a working abort shows, or what was missing: the prompt
    /// came back within the driver's bound, the transfer got its final
    /// reply and then ABOR 225/226 (RFC 959 section 4.1.3), with no error
    /// reply, and the session went on (PWD, a listing, QUIT). With
    /// [`Expect::Aborted`] the transfer's reply must be 426: the server
    /// stopped it.
    pub fn problems(&self, expect: Expect) -> Vec<String> {
        let r = &self.report;
        let mut problems = Vec::new();
        if !r["error"].is_null() {
            problems.push(format!("driver: {}", r["error"]));
        }
        if r["interrupted"] != true {
            problems.push("the download was never interrupted".into());
        }
        let codes = self.after_interrupt();
        let transfer: &[&str] = match expect {
            Expect::Aborted => &["426"],
            Expect::Finished => &["226", "426", "451"],
        };
        let ended = codes.iter().position(|c| transfer.contains(&c.as_str()));
        let answered = codes.iter().rposition(|c| c == "226" || c == "225");
        if !matches!((ended, answered), (Some(a), Some(b)) if a < b) {
            problems.push(format!(
                "replies after ^C are not {transfer:?} then 225/226: {codes:?}"
            ));
        }
        if let Some(bad) = codes.iter().find(|c| c.starts_with('5')) {
            problems.push(format!("an error reply after ^C: {bad} in {codes:?}"));
        }
        for (key, what) in [
            ("pwd", "pwd after the abort"),
            ("ls", "ls after the abort"),
            ("quit", "quit"),
        ] {
            if r[key] != true {
                problems.push(format!("{what} did not work"));
            }
        }
        problems
    }

    pub fn summary(&self) -> String {
        let prompt = match self.report["prompt_after"].as_f64() {
            Some(s) => format!("prompt {s:.2}s after ^C"),
            None => "no prompt after ^C".to_string(),
        };
        format!(
            "{} ({}): {prompt}, replies {:?}",
            self.report["client"].as_str().unwrap_or("?"),
            self.report["mode"].as_str().unwrap_or("?"),
            self.after_interrupt()
        )
    }
}
