//! The nftables rules the lab's gateway runs with: exactly those
//! `ftpgate nft-rules` prints for the gateway's config, shared by the tests
//! that build the lab (`tests/nat_lab.rs`, `tests/xlate_lab.rs`,
//! `tests/ftps_lab.rs`, `tests/faults.rs`).

use std::path::Path;
use std::process::Command;

use super::prereq::text;

/// Loads the rules `ftpgate nft-rules` prints for `config` into the
/// gateway namespace `gw_ns` (a copy is kept in `dir/rules.nft`). For the
/// kernel plane it also adds the one line the printed rules ask of the
/// operator's own forward chain; the lab's policy stays drop for the rest.
/// Returns the printed rules.
pub fn load_printed_rules(config: &Path, dir: &Path, gw_ns: &str, plane: &str) -> String {
    let rules = Command::new(env!("CARGO_BIN_EXE_ftpgate"))
        .args(["nft-rules", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(rules.status.success(), "{}", text(&rules));
    let rules_file = dir.join("rules.nft");
    std::fs::write(&rules_file, &rules.stdout).unwrap();
    let nft = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", gw_ns, "nft"])
            .args(args)
            .output()
            .unwrap()
    };
    let load = nft(&["-f", rules_file.to_str().unwrap()]);
    assert!(load.status.success(), "nft -f failed:\n{}", text(&load));
    let printed = String::from_utf8_lossy(&rules.stdout).into_owned();
    if plane == "kernel" {
        let line = printed
            .lines()
            .find_map(|l| l.strip_prefix("#   ct mark "))
            .expect("nft-rules names the forward accept line");
        let rule = format!("ct mark {line}");
        let add = nft(&["add", "rule", "inet", "fglab", "forward", &rule]);
        assert!(add.status.success(), "{}", text(&add));
    }
    printed
}
