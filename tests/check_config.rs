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

#[test]
fn a_reverse_upstream_that_is_the_gateways_own_listener_is_refused() {
    let (ok, said) = check(
        "[[listener]]\nmode = \"reverse\"\nbind = [\"0.0.0.0:2100\"]\nupstream = \"127.0.0.1:2100\"\n",
    );
    assert!(!ok, "{said}");
    assert!(said.contains("listener[0].upstream"), "{said}");
}

#[test]
fn a_command_line_limit_above_4096_is_refused() {
    let (ok, said) = check(
        "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"192.0.2.20:21\"\n\
         [limits]\nmax_command_line = 8192\n",
    );
    assert!(!ok, "{said}");
    assert!(said.contains("limits.max_command_line"), "{said}");
}

#[test]
fn ftpgate_run_refuses_to_start_relaying_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ftpgate.toml");
    std::fs::write(
        &path,
        "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"127.0.0.1:2100\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("listener[0].upstream"), "{said}");
}

#[test]
fn translation_and_tls_on_one_listener_are_refused_together() {
    let listener = "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\n\
                    upstream = \"192.0.2.20:21\"\nupstream_tls = \"explicit\"\n";
    let (ok, said) = check(&format!("{listener}server_data = \"passive\"\n"));
    assert!(!ok, "{said}");
    assert!(
        said.contains("`listener[0].server_data` translation is not supported together with TLS"),
        "{said}"
    );
    // Each on its own is fine.
    let (ok, said) = check(listener);
    assert!(ok, "{said}");
}
