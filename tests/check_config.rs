//! `ftpgate check-config`: the binary reports every problem of a file and
//! exits 2, or says ok.

use std::process::Command;

/// Runs check-config on `text`; returns (success, stdout + stderr).
fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ftpgate.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2), "{said}");
    }
    (out.status.success(), said)
}

#[test]
fn a_transparent_listener_without_inside_interfaces_is_refused_naming_it() {
    let (ok, said) =
        check("[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\", \"[::]:2121\"]\n");
    assert!(!ok, "{said}");
    assert!(said.contains("listener[0].interfaces"), "{said}");
    assert!(said.contains("0.0.0.0:2121, [::]:2121"), "{said}");
    let (ok, said) = check(
        "[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\"]\ninterfaces = [\"br-in\"]\n",
    );
    assert!(ok, "{said}");
}
