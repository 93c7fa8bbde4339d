//! The configuration file's raw form (what serde reads) and its validation
//! into [`Config`](super::Config): every problem is collected, none stops
//! the others from being found.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;

use super::tls::{RawPassthrough, tls_settings};
use super::{
    Advertise, AdvertiseRule, Config, Data, DataCaps, DenyLogConfig, Limits, Listener, Mode, Plane,
};
use crate::clients::Caps;
use crate::proto::policy::canonical_ip;
use crate::proto::{DEFAULT_MAX_REFUSALS, FxpRule, Policy, ServerData};
use crate::proxy_protocol::TrustedProxies;
// ---- raw form: what the file says ------------------------------------------

#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) listener: Vec<RawListener>,
    #[serde(default)]
    pub(super) data: RawData,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) deny_log: RawDenyLog,
    #[serde(default)]
    pub(super) admin: RawAdmin,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawListener {
    pub(super) mode: String,
    pub(super) bind: Vec<String>,
    #[serde(default)]
    pub(super) interfaces: Vec<String>,
    #[serde(default = "default_intercept_port")]
    pub(super) intercept_port: u16,
    pub(super) upstream: Option<String>,
    /// A string, or an array of `{ clients = CIDR, address = IP }` tables
    /// (validated by hand, so every problem is reported with its path).
    pub(super) advertise: Option<toml::Value>,
    #[serde(default = "default_server_data")]
    pub(super) server_data: String,
    pub(super) nat64_prefix: Option<String>,
    #[serde(default)]
    pub(super) proxy_protocol: bool,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    pub(super) tls_cert: Option<String>,
    pub(super) tls_key: Option<String>,
    #[serde(default)]
    pub(super) tls_implicit: bool,
    pub(super) upstream_tls: Option<String>,
    pub(super) upstream_tls_name: Option<String>,
    pub(super) upstream_ca: Option<String>,
}

pub(super) fn default_server_data() -> String {
    "as-client".into()
}

pub(super) fn default_intercept_port() -> u16 {
    21
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawData {
    pub(super) plane: String,
    pub(super) kernel_mark: u32,
    pub(super) ports: String,
    pub(super) accept_timeout: String,
    pub(super) connect_timeout: String,
    pub(super) idle_timeout: String,
    pub(super) max_pinholes_per_session: usize,
    pub(super) max_pinholes: usize,
    pub(super) max_pinholes_per_client: usize,
    pub(super) max_connections: usize,
    pub(super) max_connections_per_client: usize,
    pub(super) proxy_protocol: bool,
}

impl Default for RawData {
    fn default() -> Self {
        RawData {
            plane: "proxy".into(),
            kernel_mark: 0xf7a0,
            ports: "50000-50999".into(),
            accept_timeout: "30s".into(),
            connect_timeout: "10s".into(),
            idle_timeout: "10m".into(),
            max_pinholes_per_session: 2,
            max_pinholes: 1000,
            max_pinholes_per_client: 32,
            max_connections: 1000,
            max_connections_per_client: 32,
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawPolicy {
    pub(super) deny_ports: Vec<u16>,
    pub(super) auth_tls: Option<String>,
    pub(super) require_tls: bool,
    pub(super) fxp: Vec<RawFxp>,
    pub(super) tls_passthrough: Vec<RawPassthrough>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            deny_ports: vec![1433, 3306, 3389, 5432, 5900, 6379],
            auth_tls: None,
            require_tls: false,
            fxp: Vec::new(),
            tls_passthrough: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawFxp {
    pub(super) name: String,
    pub(super) servers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawLimits {
    pub(super) max_sessions: usize,
    pub(super) max_sessions_per_client: usize,
    pub(super) login_timeout: String,
    pub(super) idle_timeout: String,
    pub(super) connect_timeout: String,
    pub(super) max_command_line: usize,
    pub(super) max_reply_line: usize,
    pub(super) shutdown_grace: String,
    pub(super) drain_delay: String,
    /// Core hardening (see the block at the end of this file).
    pub(super) max_refused_commands: usize,
    pub(super) ipv6_client_prefix: u8,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_sessions: 10_000,
            max_sessions_per_client: 64,
            login_timeout: "30s".into(),
            idle_timeout: "15m".into(),
            connect_timeout: "10s".into(),
            max_command_line: 2048,
            max_reply_line: 8192,
            shutdown_grace: "30s".into(),
            drain_delay: "0s".into(),
            max_refused_commands: DEFAULT_MAX_REFUSALS,
            ipv6_client_prefix: crate::clients::DEFAULT_IPV6_PREFIX,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawDenyLog {
    pub(super) path: String,
    pub(super) queue: usize,
    pub(super) burst: u32,
    pub(super) interval: String,
}

impl Default for RawDenyLog {
    fn default() -> Self {
        RawDenyLog {
            path: "-".into(),
            queue: 4096,
            burst: 10,
            interval: "10s".into(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct RawAdmin {
    pub(super) bind: Option<String>,
}

// ---- validation ------------------------------------------------------------

pub(super) fn duration(key: &str, text: &str, problems: &mut Vec<String>) -> Duration {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            problems.push(format!("`{key}` must be longer than zero"));
            Duration::from_secs(1)
        }
        Err(e) => {
            problems.push(format!(
                "`{key}` = {text:?}: {e} (write e.g. \"30s\", \"10m\")"
            ));
            Duration::from_secs(1)
        }
    }
}

pub(super) fn duration_or_zero(key: &str, text: &str, problems: &mut Vec<String>) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| {
        problems.push(format!(
            "`{key}` = {text:?}: {e} (write e.g. \"0s\", \"2s\")"
        ));
        Duration::ZERO
    })
}

pub(super) fn positive(key: &str, value: usize, problems: &mut Vec<String>) -> usize {
    if value == 0 {
        problems.push(format!("`{key}` must be at least 1"));
    }
    value
}

pub(super) fn port_range(text: &str, problems: &mut Vec<String>) -> (u16, u16) {
    let parsed = text.split_once('-').and_then(|(a, b)| {
        let a: u16 = a.trim().parse().ok()?;
        let b: u16 = b.trim().parse().ok()?;
        Some((a, b))
    });
    match parsed {
        Some((a, b)) if a >= 1024 && a <= b => (a, b),
        _ => {
            problems.push(format!(
                "`data.ports` = {text:?}: write a range \"LOW-HIGH\" with 1024 <= LOW <= HIGH <= 65535"
            ));
            (50000, 50999)
        }
    }
}

impl RawListener {
    fn validate(self, i: usize, problems: &mut Vec<String>) -> Listener {
        let key = |k: &str| format!("listener[{i}].{k}");
        let mode = match self.mode.as_str() {
            "transparent" => Some(Mode::Transparent),
            "reverse" => Some(Mode::Reverse),
            other => {
                problems.push(format!(
                    "`{}` = {other:?}: must be \"transparent\" or \"reverse\"",
                    key("mode")
                ));
                None
            }
        };
        let mut bind = Vec::new();
        for b in &self.bind {
            match b.parse::<SocketAddr>() {
                Ok(addr) => bind.push(addr),
                Err(_) => problems.push(format!(
                    "`{}`: {b:?} is no socket address (write \"0.0.0.0:2121\" or \"[::]:2121\")",
                    key("bind")
                )),
            }
        }
        if self.bind.is_empty() {
            problems.push(format!("`{}` needs at least one address", key("bind")));
        }
        let upstream = self.upstream.as_deref().and_then(|u| match u.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!("`{}`: {u:?} is no socket address", key("upstream")));
                None
            }
        });
        let advertise = match &self.advertise {
            None => Advertise::Reached,
            Some(value) => advertise(&key("advertise"), value, problems),
        };
        let server_data = match self.server_data.as_str() {
            "as-client" => ServerData::AsClient,
            "passive" => ServerData::Passive,
            "active" => ServerData::Active,
            other => {
                problems.push(format!(
                    "`{}` = {other:?}: write \"as-client\", \"passive\" or \"active\"",
                    key("server_data")
                ));
                ServerData::AsClient
            }
        };
        let nat64_prefix = self.nat64_prefix.as_deref().and_then(|p| {
            match p.parse::<Ipv6Net>() {
                Ok(net) if net.prefix_len() == 96 => Some(net.trunc()),
                _ => {
                    problems.push(format!(
                        "`{}` = {p:?}: write an IPv6 /96 network such as \"64:ff9b::/96\" (RFC 6052)",
                        key("nat64_prefix")
                    ));
                    None
                }
            }
        });
        if nat64_prefix.is_some() && mode != Some(Mode::Transparent) {
            problems.push(format!(
                "`{}` is only for transparent mode (reverse mode names its upstream)",
                key("nat64_prefix")
            ));
        }
        match mode {
            Some(Mode::Reverse) if self.upstream.is_none() => {
                problems.push(format!("`{}` is required in reverse mode", key("upstream")));
            }
            Some(Mode::Transparent) if self.upstream.is_some() => problems.push(format!(
                "`{}` is only for reverse mode: transparent mode takes the original destination",
                key("upstream")
            )),
            _ => {}
        }
        if mode == Some(Mode::Transparent) && self.interfaces.is_empty() {
            let binds: Vec<&str> = self.bind.iter().map(String::as_str).collect();
            problems.push(format!(
                "`{}` must name the inside interfaces of the transparent listener on {}: \
                 its redirects must not take traffic arriving on other interfaces",
                key("interfaces"),
                binds.join(", ")
            ));
        }
        if mode == Some(Mode::Reverse) && !self.interfaces.is_empty() {
            problems.push(format!(
                "`{}` is only for transparent mode",
                key("interfaces")
            ));
        }
        for name in &self.interfaces {
            if name.is_empty()
                || name.len() > 15
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            {
                problems.push(format!(
                    "`{}`: {name:?} is no interface name",
                    key("interfaces")
                ));
            }
        }
        let mut trusted = Vec::new();
        for t in &self.trusted_proxies {
            match parse_net(t) {
                Some(net) => trusted.push(net),
                None => problems.push(format!(
                    "`{}`: {t:?} is no address or CIDR network",
                    key("trusted_proxies")
                )),
            }
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            problems.push(format!(
                "`{}` must name the load balancers whose PROXY headers are believed \
                 (`{}` = true): anyone else could claim any client address",
                key("trusted_proxies"),
                key("proxy_protocol")
            ));
        }
        if !self.proxy_protocol && !self.trusted_proxies.is_empty() {
            problems.push(format!(
                "`{}` is only for `{}` = true",
                key("trusted_proxies"),
                key("proxy_protocol")
            ));
        }
        if self.proxy_protocol && mode == Some(Mode::Transparent) {
            problems.push(format!(
                "`{}` is for reverse listeners: a transparent listener takes the server \
                 from the redirected connection, which a balancer does not keep",
                key("proxy_protocol")
            ));
        }
        let tls = self.client_tls(i, mode, problems);
        let upstream_tls = self.upstream_tls(i, mode, upstream, problems);
        Listener {
            mode: mode.unwrap_or(Mode::Reverse),
            bind,
            interfaces: self.interfaces,
            intercept_port: self.intercept_port,
            upstream,
            advertise,
            server_data,
            nat64_prefix,
            proxy_protocol: self.proxy_protocol,
            trusted_proxies: TrustedProxies::new(trusted),
            tls,
            upstream_tls,
        }
    }
}

/// `advertise`: one IP address, or a list of `{ clients = CIDR, address =
/// IP }` tables.
pub(super) fn advertise(key: &str, value: &toml::Value, problems: &mut Vec<String>) -> Advertise {
    const HOW: &str = "write one IP address (\"203.0.113.7\") or a list of { clients = \"CIDR\", address = \"IP\" } tables";
    match value {
        toml::Value::String(a) => match a.parse() {
            Ok(ip) => Advertise::One(canonical_ip(ip)),
            Err(_) => {
                problems.push(format!("`{key}`: {a:?} is no IP address ({HOW})"));
                Advertise::Reached
            }
        },
        toml::Value::Array(items) => {
            let mut rules = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let Some(table) = item.as_table() else {
                    problems.push(format!("`{key}[{i}]` is no table ({HOW})"));
                    continue;
                };
                for k in table.keys().filter(|k| *k != "clients" && *k != "address") {
                    problems.push(format!("unknown key `{key}[{i}].{k}`"));
                }
                let clients = table.get("clients").and_then(|v| v.as_str());
                let clients = match clients.map(|c| (c, parse_net(c))) {
                    Some((_, Some(net))) => Some(net),
                    Some((c, None)) => {
                        problems.push(format!("`{key}[{i}].clients`: {c:?} is no CIDR network"));
                        None
                    }
                    None => {
                        problems.push(format!("`{key}[{i}].clients` is required (a CIDR network)"));
                        None
                    }
                };
                let address = match table.get("address").and_then(|v| v.as_str()) {
                    Some(a) => match a.parse::<IpAddr>() {
                        Ok(ip) => Some(canonical_ip(ip)),
                        Err(_) => {
                            problems.push(format!("`{key}[{i}].address`: {a:?} is no IP address"));
                            None
                        }
                    },
                    None => {
                        problems.push(format!("`{key}[{i}].address` is required (an IP address)"));
                        None
                    }
                };
                if let (Some(clients), Some(address)) = (clients, address) {
                    rules.push(AdvertiseRule { clients, address });
                }
            }
            if items.is_empty() {
                problems.push(format!("`{key}` must not be an empty list ({HOW})"));
            }
            Advertise::PerClient(rules)
        }
        _ => {
            problems.push(format!("`{key}`: {HOW}"));
            Advertise::Reached
        }
    }
}

impl RawConfig {
    pub(super) fn validate(self, problems: &mut Vec<String>) -> Config {
        if self.listener.is_empty() {
            problems.push("at least one [[listener]] is required".into());
        }
        let listeners: Vec<Listener> = self
            .listener
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.validate(i, problems))
            .collect();
        let mut seen = BTreeSet::new();
        for addr in listeners.iter().flat_map(|l| &l.bind) {
            if !seen.insert(*addr) {
                problems.push(format!("listener address {addr} appears twice"));
            }
        }
        let binds: Vec<SocketAddr> = listeners.iter().flat_map(|l| l.bind.clone()).collect();
        for (i, l) in listeners.iter().enumerate() {
            if let Some(up) = l.upstream.filter(|up| is_own_listener(*up, &binds)) {
                problems.push(format!(
                    "`listener[{i}].upstream` = \"{up}\" is the gateway's own listener: \
                     it would relay to itself"
                ));
            }
        }

        let d = self.data;
        let plane = match d.plane.as_str() {
            "proxy" => Plane::Proxy,
            "kernel" => Plane::Kernel,
            other => {
                problems.push(format!(
                    "`data.plane` = {other:?}: write \"proxy\" or \"kernel\""
                ));
                Plane::Proxy
            }
        };
        if d.kernel_mark == 0 || d.kernel_mark > 0xffff {
            problems.push(format!(
                "`data.kernel_mark` = {:#x}: write a tag from 0x1 to 0xffff (the high 16 bits of the conntrack mark of ftpgate's flows; the low 16 bits are the pinhole port)",
                d.kernel_mark
            ));
        }
        let ports = port_range(&d.ports, problems);
        if plane == Plane::Kernel && ports.0 == ports.1 {
            problems.push(
                "`data.ports`: the kernel plane needs at least two ports (the first is the fall-through listener)".into(),
            );
        }
        if d.proxy_protocol && plane == Plane::Kernel {
            problems.push(
                "`data.proxy_protocol` needs `data.plane` = \"proxy\": on the kernel plane \
                 conntrack carries data connections and nothing reads a PROXY header (it \
                 would reach the server as data), and the kernel's pinhole elements are \
                 keyed by the peer the packets come from, the balancer; use the proxy plane, \
                 or route data connections to the instance without PROXY headers"
                    .into(),
            );
        }
        if d.proxy_protocol && !listeners.iter().any(|l| l.proxy_protocol) {
            problems.push(
                "`data.proxy_protocol` needs a listener with `proxy_protocol` = true: its \
                 `trusted_proxies` are the sources data connections' headers are believed from"
                    .into(),
            );
        }
        let data = Data {
            plane,
            proxy_protocol: d.proxy_protocol,
            kernel_mark: d.kernel_mark,
            ports,
            accept_timeout: duration("data.accept_timeout", &d.accept_timeout, problems),
            connect_timeout: duration("data.connect_timeout", &d.connect_timeout, problems),
            idle_timeout: duration("data.idle_timeout", &d.idle_timeout, problems),
            max_pinholes_per_session: positive(
                "data.max_pinholes_per_session",
                d.max_pinholes_per_session,
                problems,
            ),
            caps: DataCaps {
                pinholes: Caps {
                    total: positive("data.max_pinholes", d.max_pinholes, problems),
                    per_client: positive(
                        "data.max_pinholes_per_client",
                        d.max_pinholes_per_client,
                        problems,
                    ),
                },
                connections: Caps {
                    total: positive("data.max_connections", d.max_connections, problems),
                    per_client: positive(
                        "data.max_connections_per_client",
                        d.max_connections_per_client,
                        problems,
                    ),
                },
            },
        };

        let p = self.policy;
        let tls = tls_settings(&p, &listeners, problems);
        let mut deny_ports = p.deny_ports;
        deny_ports.sort_unstable();
        deny_ports.dedup();
        let mut fxp = Vec::new();
        for (i, rule) in p.fxp.into_iter().enumerate() {
            if rule.name.is_empty() {
                problems.push(format!("`policy.fxp[{i}].name` must not be empty"));
            }
            let mut servers = Vec::new();
            for s in &rule.servers {
                match parse_net(s) {
                    Some(net) => servers.push(net),
                    None => problems.push(format!(
                        "`policy.fxp[{i}].servers`: {s:?} is no address or CIDR network"
                    )),
                }
            }
            if rule.servers.is_empty() {
                problems.push(format!("`policy.fxp[{i}].servers` must not be empty"));
            }
            fxp.push(FxpRule {
                name: rule.name,
                servers,
            });
        }

        let l = self.limits;
        let limits = Limits {
            max_sessions: positive("limits.max_sessions", l.max_sessions, problems),
            max_sessions_per_client: positive(
                "limits.max_sessions_per_client",
                l.max_sessions_per_client,
                problems,
            ),
            login_timeout: duration("limits.login_timeout", &l.login_timeout, problems),
            idle_timeout: duration("limits.idle_timeout", &l.idle_timeout, problems),
            connect_timeout: duration("limits.connect_timeout", &l.connect_timeout, problems),
            max_command_line: line_limit(
                "limits.max_command_line",
                l.max_command_line,
                MAX_COMMAND_LINE,
                problems,
            ),
            max_reply_line: line_limit(
                "limits.max_reply_line",
                l.max_reply_line,
                1 << 20,
                problems,
            ),
            shutdown_grace: duration("limits.shutdown_grace", &l.shutdown_grace, problems),
            drain_delay: duration_or_zero("limits.drain_delay", &l.drain_delay, problems),
            max_refused_commands: refusal_budget(l.max_refused_commands, problems),
            ipv6_client_prefix: l.ipv6_client_prefix,
        };
        if !(1..=128).contains(&l.ipv6_client_prefix) {
            problems.push(format!(
                "`limits.ipv6_client_prefix` = {}: must be between 1 and 128",
                l.ipv6_client_prefix
            ));
        }

        let deny_log = DenyLogConfig {
            path: (self.deny_log.path != "-").then(|| PathBuf::from(&self.deny_log.path)),
            queue: positive("deny_log.queue", self.deny_log.queue, problems),
            burst: positive("deny_log.burst", self.deny_log.burst as usize, problems) as u32,
            interval: duration("deny_log.interval", &self.deny_log.interval, problems),
        };
        let admin = self.admin.bind.as_deref().and_then(|b| match b.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!("`admin.bind`: {b:?} is no socket address"));
                None
            }
        });

        let mut config = Config {
            listeners,
            data,
            policy: Policy { deny_ports, fxp },
            limits,
            deny_log,
            admin,
            tls,
            sessions: Vec::new(),
        };
        config.sessions = (config.listeners.iter())
            .map(|l| config.session_config_for(Some(l)))
            .collect();
        config
    }
}

/// The longest command line the gateway may pass on. Servers cut longer
/// lines (vsftpd at 4096 bytes, others shorter) and take the rest as a
/// second command: the server would answer twice, and replies would no
/// longer pair with the commands the gateway forwarded.
pub const MAX_COMMAND_LINE: usize = 4096;

pub(super) fn line_limit(key: &str, value: usize, max: usize, problems: &mut Vec<String>) -> usize {
    // RFC 959 does not bound lines; 512 is the shortest any peer needs.
    if !(512..=max).contains(&value) {
        let why = if max == MAX_COMMAND_LINE {
            " (servers cut longer command lines, and replies would no longer pair with commands)"
        } else {
            ""
        };
        problems.push(format!(
            "`{key}` = {value}: must be between 512 and {max} bytes{why}"
        ));
    }
    value
}

/// Whether `upstream` would reach one of the gateway's own listeners
/// (`binds`): the same address, or a wildcard bind on the same port and an
/// upstream address of this host. Relaying there loops.
pub fn is_own_listener(upstream: SocketAddr, binds: &[SocketAddr]) -> bool {
    binds.iter().any(|bind| {
        bind.port() != 0
            && bind.port() == upstream.port()
            && (bind.ip() == upstream.ip()
                || (bind.ip().is_unspecified()
                    && bind.is_ipv4() == upstream.is_ipv4()
                    && is_this_host(upstream.ip())))
    })
}

/// Whether `ip` is an address of this host: loopback, unspecified (which
/// connects to this host), or one a socket can be bound to.
pub(super) fn is_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// An address or CIDR network; an IPv4-mapped IPv6 net is made IPv4.
pub(super) fn parse_net(text: &str) -> Option<IpNet> {
    let net = text
        .parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))?;
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .ok()
                .map(IpNet::V4),
            None => Some(net),
        },
        _ => Some(net),
    }
}

// ---- core hardening: the refusal budget -----------------------------------
//
// `limits.max_refused_commands`: refused client lines one control session
// may send before the core closes it with 421 (the abuse budget). Only
// this block and the one field in `RawLimits`, `Limits` and
// `session_config` belong to it.

/// The largest accepted budget: beyond it the budget would never end a
/// session that only sends refused input.
pub(super) const MAX_REFUSAL_BUDGET: usize = 1_000_000;

pub(super) fn refusal_budget(value: usize, problems: &mut Vec<String>) -> usize {
    if !(1..=MAX_REFUSAL_BUDGET).contains(&value) {
        problems.push(format!(
            "`limits.max_refused_commands` = {value}: must be between 1 and {MAX_REFUSAL_BUDGET} refused commands"
        ));
    }
    value
}

#[cfg(test)]
mod refusal_budget_tests {
    use super::*;
    use crate::config::ConfigError;

    fn with_limits(limits: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"127.0.0.1:21\"\n[limits]\n{limits}\n"
        ))
    }

    #[test]
    fn max_refused_commands_defaults_to_50_and_reaches_the_session() {
        let cfg = with_limits("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.limits.max_refused_commands, 50);
        let cfg = with_limits("max_refused_commands = 7").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.session_config().max_refusals, 7);
    }

    #[test]
    fn max_refused_commands_out_of_range_is_reported_with_the_other_problems() {
        for bad in ["0", "1000001"] {
            let err = with_limits(&format!(
                "max_refused_commands = {bad}\nmax_sessions = 0\ncolour = 1"
            ))
            .unwrap_err()
            .to_string();
            for needle in [
                "limits.max_refused_commands",
                "limits.max_sessions",
                "unknown key `limits.colour`",
            ] {
                assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
            }
        }
    }

    #[test]
    fn shipped_config_documents_max_refused_commands_with_its_default() {
        let text = include_str!("../../config/ftpgate.toml");
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("max_refused_commands = {DEFAULT_MAX_REFUSALS}")),
            "config/ftpgate.toml lacks max_refused_commands"
        );
    }
}
