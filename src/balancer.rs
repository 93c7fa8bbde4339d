//! `ftpgate balancer-config`: the configuration of an L4 balancer in front
//! of several gateway instances, each owning a slice of the data-port range.
//!
//! FTP needs no state shared between instances: a session's control
//! connection and every data connection it negotiates land on the same
//! instance. The control port is balanced; each data-port slice is mapped to
//! the one instance that owns it, whose 227/229 replies only ever name ports
//! of its own slice (its `[data] ports`). The shipped examples
//! (`deploy/haproxy/haproxy.cfg`, `deploy/ipvs/ipvs.sh`) are this module's
//! output for the command line written at their top, and the lab test runs
//! HAProxy with the same output for its own addresses.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// What the balancer fronts.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The address clients connect to (the balancer's).
    pub vip: IpAddr,
    /// The control port clients connect to.
    pub port: u16,
    /// The control port the instances listen on.
    pub instance_port: u16,
    /// The whole data-port range, cut into one slice per instance.
    pub ports: (u16, u16),
    /// The instances' addresses, in order: instance i owns slice i.
    pub instances: Vec<IpAddr>,
    /// The instances' admin port (`/readyz`).
    pub admin_port: u16,
    /// How often the balancer checks `/readyz`.
    pub check_interval: Duration,
}

/// Why no configuration can be made.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("name at least one instance")]
    NoInstances,
    #[error("the data ports {0}-{1} cannot give {2} instances a port each")]
    TooFewPorts(u16, u16, usize),
    #[error("the VIP and the instances must be of one address family")]
    Families,
}

impl Layout {
    /// The data-port slice of each instance: contiguous, in order, sizes
    /// differing by one at most.
    pub fn slices(&self) -> Result<Vec<(u16, u16)>, LayoutError> {
        let n = self.instances.len();
        if n == 0 {
            return Err(LayoutError::NoInstances);
        }
        if self
            .instances
            .iter()
            .any(|i| i.is_ipv4() != self.vip.is_ipv4())
        {
            return Err(LayoutError::Families);
        }
        let (lo, hi) = self.ports;
        let total = usize::from(hi) - usize::from(lo) + 1;
        if hi < lo || total < n {
            return Err(LayoutError::TooFewPorts(lo, hi, n));
        }
        let mut out = Vec::with_capacity(n);
        let mut start = usize::from(lo);
        for i in 0..n {
            let len = total / n + usize::from(i < total % n);
            // In range: the slices add up to `total` ports from `lo`.
            let first = u16::try_from(start).unwrap_or(u16::MAX);
            let last = u16::try_from(start + len - 1).unwrap_or(u16::MAX);
            out.push((first, last));
            start += len;
        }
        Ok(out)
    }

    fn name(i: usize) -> String {
        format!("ftpgate{}", i + 1)
    }

    /// What each instance's own configuration must say.
    fn instance_notes(
        &self,
        out: &mut String,
        slices: &[(u16, u16)],
        proxy: Option<&str>,
    ) -> std::fmt::Result {
        writeln!(out, "# Each instance's ftpgate.toml (reverse mode):")?;
        for (i, (addr, (a, b))) in self.instances.iter().zip(slices).enumerate() {
            writeln!(
                out,
                "#   {} at {}: [[listener]] bind = [\"{}\"], advertise = \"{}\"; [data] ports = \"{a}-{b}\"; [admin] bind = \"{}\"",
                Self::name(i),
                addr,
                sock(*addr, self.instance_port),
                self.vip,
                sock(*addr, self.admin_port),
            )?;
        }
        match proxy {
            Some(trusted) => writeln!(
                out,
                "#   and on every instance: [[listener]] proxy_protocol = true, trusted_proxies = [\"{trusted}\"];\n\
                 #   [data] proxy_protocol = true; [limits] drain_delay = \"{}\"",
                humantime::format_duration(self.drain_delay())
            ),
            None => writeln!(
                out,
                "#   and on every instance: [limits] drain_delay = \"{}\" (no PROXY protocol: the\n\
                 #   balancer keeps the client's address)",
                humantime::format_duration(self.drain_delay())
            ),
        }
    }

    /// Long enough for the balancer to see `/readyz` fail and stop
    /// sending: its check interval times (fall + 1), rounded up to a
    /// second, at least two.
    pub fn drain_delay(&self) -> Duration {
        let ms = self.check_interval.as_millis() * 3;
        Duration::from_secs(u64::try_from(ms.div_ceil(1000)).unwrap_or(60).max(2))
    }

    /// An HAProxy (2.4 or later) configuration: the control port balanced
    /// (least connections) to instances that answer `/readyz`, PROXY v2 to
    /// each; each data slice to its instance, PROXY v2 too.
    pub fn haproxy(&self, command: &str) -> Result<String, LayoutError> {
        let slices = self.slices()?;
        let mut out = String::new();
        let _ = self.write_haproxy(&mut out, command, &slices);
        Ok(out)
    }

    fn write_haproxy(
        &self,
        out: &mut String,
        command: &str,
        slices: &[(u16, u16)],
    ) -> std::fmt::Result {
        let ms = self.check_interval.as_millis();
        writeln!(out, "# Generated by: {command}")?;
        writeln!(
            out,
            "# HAProxy in front of {} ftpgate instances. The control port is balanced;\n\
             # each data-port slice goes to the one instance that owns it (its 227/229\n\
             # replies name only ports of its slice). PROXY v2 carries the client's\n\
             # address on both. /readyz turns 503 at SIGTERM, and the instance keeps\n\
             # accepting for drain_delay, so no session is sent to a closing listener.",
            self.instances.len()
        )?;
        self.instance_notes(out, slices, Some("<this balancer's address>"))?;
        writeln!(
            out,
            r#"
global
    # two descriptors per connection: raise with the open-file limit
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    # a control connection is quiet while its transfer runs: above ftpgate's
    # limits.idle_timeout
    timeout client 20m
    timeout server 20m
    timeout check 1s
    # a connection refused by an instance that just died goes to another
    retries 3
    option redispatch

frontend ftp_control
    bind {}
    default_backend ftpgate_control

backend ftpgate_control
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check port {} inter {ms}ms fall 1 rise 2 send-proxy-v2"#,
            sock(self.vip, self.port),
            self.admin_port,
        )?;
        for (i, addr) in self.instances.iter().enumerate() {
            writeln!(
                out,
                "    server {} {}",
                Self::name(i),
                sock(*addr, self.instance_port)
            )?;
        }
        for (i, (addr, (a, b))) in self.instances.iter().zip(slices).enumerate() {
            let name = Self::name(i);
            writeln!(
                out,
                "\n# {name}'s data ports: no health check (the slice has no other owner,\n\
                 # and a draining instance still takes its sessions' data connections);\n\
                 # no port on the server line: the client's destination port is kept.\n\
                 frontend ftp_data_{name}\n    bind {}:{a}-{b}\n    default_backend ftp_data_{name}\n\n\
                 backend ftp_data_{name}\n    server {name} {} send-proxy-v2",
                host(self.vip),
                host(*addr)
            )?;
        }
        Ok(())
    }

    /// A shell script for IPVS (ipvsadm, NAT forwarding): the control port
    /// as a virtual service, each data slice as a firewall-mark service
    /// (nftables marks the slice), and a `/readyz` loop that sets an
    /// instance's control weight to 0 while it drains. IPVS keeps the
    /// client's address: the instances run without the PROXY protocol.
    pub fn ipvs(&self, command: &str) -> Result<String, LayoutError> {
        let slices = self.slices()?;
        let mut out = String::new();
        let _ = self.write_ipvs(&mut out, command, &slices);
        Ok(out)
    }

    fn write_ipvs(
        &self,
        out: &mut String,
        command: &str,
        slices: &[(u16, u16)],
    ) -> std::fmt::Result {
        let fam = if self.vip.is_ipv4() { "ip" } else { "ip6" };
        let six = if self.vip.is_ipv4() { "" } else { " -6" };
        let vip_port = sock(self.vip, self.port);
        writeln!(out, "#!/bin/sh")?;
        writeln!(out, "# Generated by: {command}")?;
        writeln!(
            out,
            "# IPVS (NAT forwarding) in front of {} ftpgate instances: the control port\n\
             # is a virtual service balanced by least connections; each data-port slice\n\
             # is a firewall-mark service with its one instance. The instances route\n\
             # through this director (their default gateway), so IPVS keeps the client's\n\
             # address and they run without the PROXY protocol. Active-mode (PORT) data\n\
             # connections are opened by the instance itself toward the client; the\n\
             # postrouting rule below makes them leave from the VIP.",
            self.instances.len()
        )?;
        self.instance_notes(out, slices, None)?;
        writeln!(out, "set -eu")?;
        writeln!(
            out,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.vs.conntrack=1"
        )?;
        writeln!(out, "nft -f - <<'EOF'")?;
        writeln!(out, "table {fam} ftpgate_ipvs")?;
        writeln!(out, "delete table {fam} ftpgate_ipvs")?;
        writeln!(out, "table {fam} ftpgate_ipvs {{")?;
        writeln!(out, "\tchain prerouting {{")?;
        writeln!(
            out,
            "\t\ttype filter hook prerouting priority mangle; policy accept;"
        )?;
        for (i, (a, b)) in slices.iter().enumerate() {
            writeln!(
                out,
                "\t\t{fam} daddr {} tcp dport {a}-{b} meta mark set {:#x}   # {}'s slice",
                self.vip,
                fwmark(i),
                Self::name(i)
            )?;
        }
        writeln!(out, "\t}}")?;
        writeln!(out, "\tchain postrouting {{")?;
        writeln!(
            out,
            "\t\ttype nat hook postrouting priority srcnat; policy accept;"
        )?;
        let all: Vec<String> = self.instances.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "\t\tct state new {fam} saddr {{ {} }} snat to {}   # active-mode data connections",
            all.join(", "),
            self.vip
        )?;
        writeln!(out, "\t}}")?;
        writeln!(out, "}}")?;
        writeln!(out, "EOF")?;
        writeln!(out, "ipvsadm -D -t {vip_port} 2>/dev/null || true")?;
        writeln!(out, "ipvsadm -A -t {vip_port} -s lc")?;
        for addr in &self.instances {
            writeln!(
                out,
                "ipvsadm -a -t {vip_port} -r {} -m",
                sock(*addr, self.instance_port)
            )?;
        }
        for (i, addr) in self.instances.iter().enumerate() {
            writeln!(out, "ipvsadm{six} -D -f {} 2>/dev/null || true", fwmark(i))?;
            writeln!(out, "ipvsadm{six} -A -f {} -s rr", fwmark(i))?;
            // Port 0: the destination port of the client's connection is kept.
            writeln!(
                out,
                "ipvsadm{six} -a -f {} -r {} -m",
                fwmark(i),
                sock(*addr, 0)
            )?;
        }
        let interval = self.check_interval.as_secs_f64();
        writeln!(
            out,
            "# Drain: an instance whose /readyz fails gets weight 0 for new control\n\
             # connections (its data slice stays: its sessions still need it). Run this\n\
             # loop under your service manager, or let keepalived do the same check."
        )?;
        writeln!(out, "while sleep {interval}; do")?;
        for addr in &self.instances {
            writeln!(
                out,
                "\tif curl -sf -m 1 http://{}/readyz >/dev/null; then w=1; else w=0; fi\n\
                 \tipvsadm -e -t {vip_port} -r {} -m -w \"$w\"",
                sock(*addr, self.admin_port),
                sock(*addr, self.instance_port)
            )?;
        }
        writeln!(out, "done")
    }
}

fn fwmark(i: usize) -> u32 {
    0xf7a1 + u32::try_from(i).unwrap_or(0)
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn sock(ip: IpAddr, port: u16) -> String {
    format!("{}:{port}", host(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: usize, ports: (u16, u16)) -> Layout {
        Layout {
            vip: "203.0.113.10".parse().unwrap(),
            port: 21,
            instance_port: 21,
            ports,
            instances: (0..n)
                .map(|i| format!("10.0.0.{}", 11 + i).parse().unwrap())
                .collect(),
            admin_port: 9121,
            check_interval: Duration::from_millis(200),
        }
    }

    #[test]
    fn slices_cover_the_range_in_order_without_overlap() {
        for (n, (lo, hi)) in [(3, (50000, 50999)), (4, (1024, 1030)), (1, (5, 5))] {
            let s = layout(n, (lo, hi)).slices().unwrap();
            assert_eq!(s.len(), n);
            assert_eq!(s[0].0, lo);
            assert_eq!(s[n - 1].1, hi);
            for w in s.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0);
            }
            let sizes: Vec<u16> = s.iter().map(|(a, b)| b - a + 1).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{sizes:?}");
        }
        assert_eq!(
            layout(3, (50000, 50999)).slices().unwrap(),
            vec![(50000, 50333), (50334, 50666), (50667, 50999)]
        );
        assert!(layout(3, (50000, 50001)).slices().is_err());
        assert!(layout(0, (50000, 50999)).slices().is_err());
    }

    #[test]
    fn haproxy_maps_each_slice_to_its_instance_with_proxy_v2() {
        let cfg = layout(3, (50000, 50999))
            .haproxy("ftpgate balancer-config")
            .unwrap();
        assert!(cfg.contains("bind 203.0.113.10:21\n"), "{cfg}");
        assert!(cfg.contains("option httpchk GET /readyz"));
        assert!(cfg.contains("inter 200ms fall 1 rise 2 send-proxy-v2"));
        assert!(cfg.contains("    server ftpgate2 10.0.0.12:21\n"));
        assert!(
            cfg.contains("bind 203.0.113.10:50334-50666\n    default_backend ftp_data_ftpgate2")
        );
        assert!(cfg.contains("server ftpgate2 10.0.0.12 send-proxy-v2"));
        assert!(cfg.contains("drain_delay = \"2s\""));
    }

    #[test]
    fn ipvs_marks_each_slice_and_keeps_the_port() {
        let sh = layout(3, (50000, 50999))
            .ipvs("ftpgate balancer-config")
            .unwrap();
        assert!(sh.contains("ip daddr 203.0.113.10 tcp dport 50667-50999 meta mark set 0xf7a3"));
        assert!(sh.contains("ipvsadm -a -f 63395 -r 10.0.0.13:0 -m"), "{sh}");
        assert!(sh.contains("ipvsadm -a -t 203.0.113.10:21 -r 10.0.0.11:21 -m"));
    }
}
