//! The nftables ruleset a configuration needs (`ftpgate nft-rules`).
//!
//! Transparent mode needs two redirects on the inside interfaces: port 21 to
//! the listener, and the data port range to itself. The second one serves
//! EPSV clients and clients that ignore the address in a 227 reply (curl's
//! default): they connect to the server's address on the pinhole port, and
//! the redirect delivers that connection to the gateway.

use std::fmt::Write;

use crate::config::{Config, Mode};

pub fn ruleset(cfg: &Config, source: &str) -> String {
    let mut out = String::new();
    let (low, high) = cfg.data.ports;
    let _ = writeln!(out, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        out,
        "# nftables rules for ftpgate, generated from {source}."
    );
    let _ = writeln!(
        out,
        "# Load with: nft -f FILE (replaces the table on every load)."
    );
    let _ = writeln!(
        out,
        "# The input filter must also accept TCP to the listener ports and to {low}-{high}."
    );
    let _ = writeln!(out, "table inet ftpgate");
    let _ = writeln!(out, "delete table inet ftpgate");
    let _ = writeln!(out, "table inet ftpgate {{");
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    let mut any = false;
    for listener in cfg.listeners.iter().filter(|l| l.mode == Mode::Transparent) {
        any = true;
        let iif = match listener.interfaces.as_slice() {
            [] => String::new(),
            names => {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                format!("iifname {{ {} }} ", quoted.join(", "))
            }
        };
        let v4 = listener.bind.iter().find(|a| a.is_ipv4()).map(|a| a.port());
        let v6 = listener.bind.iter().find(|a| a.is_ipv6()).map(|a| a.port());
        let intercept = listener.intercept_port;
        let families: Vec<(&str, u16)> = match (v4, v6) {
            (Some(a), Some(b)) if a == b => vec![("", a)],
            _ => v4
                .map(|p| ("meta nfproto ipv4 ", p))
                .into_iter()
                .chain(v6.map(|p| ("meta nfproto ipv6 ", p)))
                .collect(),
        };
        let _ = writeln!(
            out,
            "\t\t# control connections to FTP servers: to the listener"
        );
        for (family, port) in &families {
            let _ = writeln!(
                out,
                "\t\t{iif}{family}tcp dport {intercept} redirect to :{port}"
            );
        }
        let _ = writeln!(
            out,
            "\t\t# data connections to a server's address on a pinhole port (EPSV, curl)"
        );
        for (family, _) in &families {
            let _ = writeln!(out, "\t\t{iif}{family}tcp dport {low}-{high} redirect");
        }
    }
    if !any {
        let _ = writeln!(out, "\t\t# no transparent listener: nothing to redirect");
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_listener_gets_control_and_data_redirects() {
        let cfg = Config::parse(
            r#"
            [[listener]]
            mode = "transparent"
            bind = ["0.0.0.0:2121", "[::]:2121"]
            interfaces = ["br-in"]
            [data]
            ports = "50000-50099"
            "#,
        )
        .unwrap();
        let rules = ruleset(&cfg, "test.toml");
        assert!(
            rules.contains("iifname { \"br-in\" } tcp dport 21 redirect to :2121"),
            "{rules}"
        );
        assert!(
            rules.contains("iifname { \"br-in\" } tcp dport 50000-50099 redirect"),
            "{rules}"
        );
    }

    #[test]
    fn families_on_different_ports_get_their_own_rules() {
        let cfg = Config::parse(
            r#"
            [[listener]]
            mode = "transparent"
            bind = ["0.0.0.0:2121", "[::]:2122"]
            "#,
        )
        .unwrap();
        let rules = ruleset(&cfg, "test.toml");
        assert!(
            rules.contains("meta nfproto ipv4 tcp dport 21 redirect to :2121"),
            "{rules}"
        );
        assert!(
            rules.contains("meta nfproto ipv6 tcp dport 21 redirect to :2122"),
            "{rules}"
        );
    }
}
