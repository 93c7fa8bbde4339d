//! The nftables ruleset a configuration needs (`ftpgate nft-rules`).
//!
//! Transparent mode needs two redirects on the inside interfaces (a
//! transparent listener must name them): port 21 to the listener, and the
//! data port range to itself. The second one serves EPSV clients and
//! clients that ignore the address in a 227 reply (curl's default): they
//! connect to the server's address on the pinhole port, and the redirect
//! delivers that connection to the gateway. It matches only destinations
//! that are not the gateway's own (`fib daddr type != local`): a
//! connection to one of the gateway's addresses, its outside ones
//! included, is not moved onto the inside address.
//!
//! The kernel data plane adds the sets and maps ftpgate fills per pinhole,
//! the rule that consumes a pinhole on its first connection and translates
//! it, the fall-through redirect of everything else in the data range to
//! ftpgate's own listener (the first port of the range), and the source
//! translation of the onward leg. See `dataplane::kernel`.

use std::fmt::Write;

use crate::config::{Config, Mode, Plane};

/// TLS passthrough: connections from the inside to a rule's servers on
/// its `data_ports` go to the listener too, which relays them only for a
/// client whose session the server accepted AUTH TLS on (see
/// `dataplane::passthrough`). Both planes: the gateway cannot read those
/// bytes, so they need no pinhole, only this redirect.
fn passthrough_redirects(
    out: &mut String,
    cfg: &Config,
    iif: &str,
    v4: Option<u16>,
    v6: Option<u16>,
) {
    if cfg.tls.auth_tls != Some(crate::config::AuthTlsSetting::Passthrough) {
        return;
    }
    for rule in &cfg.tls.passthrough {
        let (a, b) = rule.data_ports;
        let _ = writeln!(
            out,
            "\t\t# TLS passthrough ({}): the servers' passive range, to the listener",
            rule.name
        );
        for (family, port, want_v4) in [("ip", v4, true), ("ip6", v6, false)] {
            let nets: Vec<String> = rule
                .servers
                .iter()
                .filter(|n| matches!(n, ipnet::IpNet::V4(_)) == want_v4)
                .map(ToString::to_string)
                .collect();
            let Some(port) = port.filter(|_| !nets.is_empty()) else {
                continue;
            };
            let _ = writeln!(
                out,
                "\t\t{iif}{family} daddr {{ {} }} tcp dport {a}-{b} redirect to :{port}",
                nets.join(", ")
            );
        }
    }
}

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
    balanced_input(&mut out, cfg);
    let kernel = cfg.data.plane == Plane::Kernel;
    let mark = cfg.data.kernel_mark;
    if kernel {
        let _ = writeln!(
            out,
            "# Kernel data plane: conntrack carries ftpgate's data connections. Needs"
        );
        let _ = writeln!(
            out,
            "# net.ipv4.ip_forward=1 (and net.ipv6.conf.all.forwarding=1 for IPv6)."
        );
        let _ = writeln!(
            out,
            "# Your forward chain (policy drop) needs this one line for ftpgate's flows:"
        );
        let _ = writeln!(out, "#   {}", forward_accept(mark));
    }
    let _ = writeln!(out, "table inet ftpgate");
    let _ = writeln!(out, "delete table inet ftpgate");
    let _ = writeln!(out, "table inet ftpgate {{");
    if kernel {
        kernel_sets(&mut out);
    }
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    let mut any = false;
    for listener in cfg.listeners.iter().filter(|l| l.mode == Mode::Transparent) {
        any = true;
        let iif = iif_match(&listener.interfaces);
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
        passthrough_redirects(&mut out, cfg, &iif, v4, v6);
        if kernel {
            // The pinhole rules below come first; what they leave goes to
            // the fall-through listener.
            continue;
        }
        let _ = writeln!(
            out,
            "\t\t# data connections to a server's address on a pinhole port (EPSV, curl)"
        );
        for (family, _) in &families {
            let _ = writeln!(
                out,
                "\t\t{iif}{family}{NOT_LOCAL}tcp dport {low}-{high} redirect"
            );
        }
    }
    if kernel {
        kernel_prerouting(&mut out, cfg);
    } else if !any {
        let _ = writeln!(out, "\t\t# no transparent listener: nothing to redirect");
    }
    let _ = writeln!(out, "\t}}");
    if kernel {
        let _ = writeln!(out, "\tchain postrouting {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(
            out,
            "\t\t# the onward leg leaves from the gateway's address on that side"
        );
        for (ip, _) in FAMILIES {
            let _ = writeln!(
                out,
                "\t\tmeta nfproto {} ct mark and {TAG_MASK:#010x} == {:#010x} snat {ip} to ct mark map @snat{}",
                if ip == "ip" { "ipv4" } else { "ipv6" },
                mark << 16,
                family_suffix(ip)
            );
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
    out
}

/// Matches destinations that are not an address of the gateway itself.
const NOT_LOCAL: &str = "fib daddr type != local ";

/// `iifname { "a", "b" } ` for the named interfaces; nothing for none.
fn iif_match(interfaces: &[String]) -> String {
    match interfaces {
        [] => String::new(),
        names => {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("iifname {{ {} }} ", quoted.join(", "))
        }
    }
}

/// The high 16 bits of a kernel-plane flow's mark are ftpgate's tag
/// (`data.kernel_mark`), the low 16 bits its pinhole's port.
const TAG_MASK: u32 = 0xffff_0000;

/// The one line an operator's forward chain needs for ftpgate's flows.
pub fn forward_accept(tag: u32) -> String {
    format!("ct mark and {TAG_MASK:#010x} == {:#010x} accept", tag << 16)
}

/// (nftables payload keyword, address type) per family.
const FAMILIES: [(&str, &str); 2] = [("ip", "ipv4_addr"), ("ip6", "ipv6_addr")];

fn family_suffix(ip: &str) -> &'static str {
    if ip == "ip" { "4" } else { "6" }
}

/// The sets and maps the kernel plane fills, keyed by (expected peer,
/// address it connects to, pinhole port).
fn kernel_sets(out: &mut String) {
    for (ip, addr) in FAMILIES {
        let n = family_suffix(ip);
        let key = format!("{addr} . {addr} . inet_service");
        let _ = writeln!(out, "\t# pinholes waiting for their one connection");
        let _ = writeln!(
            out,
            "\tset armed{n} {{ type {key}; flags dynamic,timeout; }}"
        );
        let _ = writeln!(out, "\t# where each pinhole leads");
        let _ = writeln!(
            out,
            "\tmap dnat{n} {{ type {key} : {addr} . inet_service; flags timeout; }}"
        );
        let _ = writeln!(
            out,
            "\t# the conntrack mark of each pinhole's flow: the tag, and the port"
        );
        let _ = writeln!(out, "\tmap mark{n} {{ type {key} : mark; flags timeout; }}");
        let _ = writeln!(
            out,
            "\t# the source address of each pinhole's onward leg, by mark"
        );
        let _ = writeln!(
            out,
            "\tmap snat{n} {{ type mark : {addr}; flags timeout; }}"
        );
    }
}

fn kernel_prerouting(out: &mut String, cfg: &Config) {
    let (low, high) = cfg.data.ports;
    let _ = writeln!(
        out,
        "\t\t# a pinhole's first connection from its expected peer: consumed and translated"
    );
    for (ip, _) in FAMILIES {
        let n = family_suffix(ip);
        let key = format!("{ip} saddr . {ip} daddr . tcp dport");
        let _ = writeln!(
            out,
            "\t\ttcp dport {low}-{high} {key} @armed{n} delete @armed{n} {{ {key} }} ct mark set {key} map @mark{n} dnat {ip} to {key} map @dnat{n}"
        );
    }
    let _ = writeln!(
        out,
        "\t\t# everything else in the data range: ftpgate's fall-through listener (theft is logged)"
    );
    for listener in cfg.listeners.iter().filter(|l| l.mode == Mode::Transparent) {
        let _ = writeln!(
            out,
            "\t\t{}{NOT_LOCAL}tcp dport {low}-{high} redirect to :{low}",
            iif_match(&listener.interfaces)
        );
    }
    let _ = writeln!(
        out,
        "\t\t# to the gateway's own addresses (reverse mode, a 227 address): from anywhere"
    );
    let _ = writeln!(
        out,
        "\t\tfib daddr type local tcp dport {low}-{high} redirect to :{low}"
    );
}

/// Listeners behind a load balancer (`proxy_protocol`): the instance's
/// input filter should take its listener port and its own data-port slice
/// from the balancers only (anyone else gets 421 and a deny line anyway),
/// and the slice from the published server too (active mode: the server
/// connects to the gateway's pinhole).
fn balanced_input(out: &mut String, cfg: &Config) {
    let (low, high) = cfg.data.ports;
    for l in cfg.listeners.iter().filter(|l| l.proxy_protocol) {
        let (v4, v6): (Vec<String>, Vec<String>) = {
            let nets = l.trusted_proxies.nets();
            (
                nets.iter()
                    .filter(|n| matches!(n, ipnet::IpNet::V4(_)))
                    .map(ToString::to_string)
                    .collect(),
                nets.iter()
                    .filter(|n| matches!(n, ipnet::IpNet::V6(_)))
                    .map(ToString::to_string)
                    .collect(),
            )
        };
        let mut ports: Vec<String> = l.bind.iter().map(|b| b.port().to_string()).collect();
        ports.sort();
        ports.dedup();
        let data = if cfg.data.proxy_protocol {
            format!(", {low}-{high}")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "# Behind a load balancer (proxy_protocol): this instance's input filter takes"
        );
        let _ = writeln!(
            out,
            "# its listener and its data-port slice from the balancer, and the slice from the server:"
        );
        for (family, nets) in [("ip", v4), ("ip6", v6)] {
            if !nets.is_empty() {
                let _ = writeln!(
                    out,
                    "#   {family} saddr {{ {} }} tcp dport {{ {}{data} }} accept",
                    nets.join(", "),
                    ports.join(", ")
                );
            }
        }
        if let Some(up) = l.upstream {
            let family = if up.is_ipv4() { "ip" } else { "ip6" };
            let _ = writeln!(
                out,
                "#   {family} saddr {} tcp dport {low}-{high} accept   # the server's active-mode (PORT) data connections",
                up.ip()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_behind_a_balancer_is_told_to_take_its_ports_from_the_balancer() {
        let cfg = Config::parse(
            r#"
            [[listener]]
            mode = "reverse"
            bind = ["10.0.0.11:21"]
            upstream = "192.0.2.20:21"
            proxy_protocol = true
            trusted_proxies = ["10.0.0.2", "2001:db8::2"]
            [data]
            ports = "50000-50333"
            proxy_protocol = true
            "#,
        )
        .unwrap();
        let rules = ruleset(&cfg, "test.toml");
        for line in [
            "#   ip saddr { 10.0.0.2/32 } tcp dport { 21, 50000-50333 } accept",
            "#   ip6 saddr { 2001:db8::2/128 } tcp dport { 21, 50000-50333 } accept",
            "#   ip saddr 192.0.2.20 tcp dport 50000-50333 accept",
        ] {
            assert!(rules.contains(line), "{rules}");
        }
    }

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
        // The data range only from the inside, and only toward addresses
        // that are not the gateway's own (those reach the pinholes as they
        // are).
        assert!(
            rules.contains(
                "iifname { \"br-in\" } fib daddr type != local tcp dport 50000-50099 redirect\n"
            ),
            "{rules}"
        );
        assert_data_redirects_are_inside_only(&rules, "50000-50099");
    }

    /// Every rule that redirects the data range names the inside
    /// interfaces and excludes the gateway's own addresses, or matches only
    /// the gateway's own addresses.
    fn assert_data_redirects_are_inside_only(rules: &str, range: &str) {
        let dport = format!("tcp dport {range}");
        let redirects: Vec<&str> = rules
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.contains(&dport) && l.contains("redirect"))
            .collect();
        assert!(!redirects.is_empty(), "{rules}");
        for rule in redirects {
            let inside = rule.starts_with("iifname {") && rule.contains("fib daddr type != local");
            let own = rule.starts_with("fib daddr type local ");
            assert!(inside || own, "redirects too much: {rule}\n{rules}");
        }
    }

    #[test]
    fn kernel_plane_fall_through_is_inside_only_or_to_the_gateway_itself() {
        let cfg = Config::parse(
            r#"
            [[listener]]
            mode = "transparent"
            bind = ["0.0.0.0:2121", "[::]:2121"]
            interfaces = ["br-in", "br-in2"]
            [data]
            plane = "kernel"
            ports = "50000-50099"
            "#,
        )
        .unwrap();
        let rules = ruleset(&cfg, "test.toml");
        assert!(
            rules.contains(
                "iifname { \"br-in\", \"br-in2\" } fib daddr type != local tcp dport 50000-50099 redirect to :50000\n"
            ),
            "{rules}"
        );
        assert!(
            rules.contains("fib daddr type local tcp dport 50000-50099 redirect to :50000\n"),
            "{rules}"
        );
        assert_data_redirects_are_inside_only(&rules, "50000-50099");
    }

    #[test]
    fn families_on_different_ports_get_their_own_rules() {
        let cfg = Config::parse(
            r#"
            [[listener]]
            mode = "transparent"
            bind = ["0.0.0.0:2121", "[::]:2122"]
            interfaces = ["br-in"]
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
        assert_data_redirects_are_inside_only(&rules, "50000-50999");
    }
}
