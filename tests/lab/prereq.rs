//! What the namespace lab needs, shared by the tests that build it
//! (`tests/nat_lab.rs`, `tests/faults.rs`): why the lab cannot run here, if
//! it cannot, the namespace prefix of a lab, and a command's output as text.

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `None` when the lab can run: root, the given tools, and the lab's copies
/// of proftpd and pure-ftpd (`scripts/install-test-deps` installs them all).
pub fn lab_missing(tools: &[&str]) -> Option<String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    if uid.trim_ascii() != b"0" {
        return Some("needs root (network namespaces, nftables)".into());
    }
    for tool in tools {
        let found = Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/opt/ftpgate-lab/proftpd/usr/sbin/proftpd").exists() {
        return Some("proftpd (lab copy) is not installed".into());
    }
    if !Path::new("/opt/ftpgate-lab/pure-ftpd/usr/sbin/pure-ftpd").exists() {
        return Some("pure-ftpd (lab copy) is not installed".into());
    }
    None
}

/// The namespace prefix of a lab: `base` (e.g. "fgt-") plus FG_LAB_TAG
/// (letters and digits, at most 8), which makes the names unique to one
/// checkout, so labs of several checkouts can run side by side.
// Not every test that includes this file builds a prefixed lab
// (tests/scale_out.rs does not).
#[allow(dead_code)]
pub fn lab_prefix(base: &str) -> String {
    let tag: String = std::env::var("FG_LAB_TAG")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    if tag.is_empty() {
        base.to_string()
    } else {
        format!("{base}{tag}-")
    }
}

/// A finished command's standard output and error, as text.
#[allow(dead_code)]
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
