//! The TOML configuration: parsed into raw structs, then validated once into
//! the immutable [`Config`] the daemon runs with. Every problem is reported
//! at once: unknown keys (all of them, with their paths) and every invalid
//! value.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};
use serde::Deserialize;

use crate::clients::Caps;
use crate::proto::policy::canonical_ip;
use crate::proto::{
    AuthTls, DEFAULT_MAX_REFUSALS, FxpRule, Policy, ServerData, SessionConfig, TlsPolicy,
};
use crate::proxy_protocol::TrustedProxies;
use crate::tls::{ListenerTls, UpstreamTls};

mod tls;

pub use tls::{AuthTlsSetting, TlsSettings};
use tls::{RawPassthrough, tls_settings};

/// All problems found in a configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// nftables redirects inside port-21 traffic to the gateway; the upstream
    /// server is the connection's original destination.
    Transparent,
    /// The gateway publishes one server.
    Reverse,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Transparent => "transparent",
            Mode::Reverse => "reverse",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub mode: Mode,
    pub bind: Vec<SocketAddr>,
    /// Inside interfaces whose traffic `nft-rules` redirects (transparent).
    pub interfaces: Vec<String>,
    /// The upstream port transparent mode intercepts (normally 21).
    pub intercept_port: u16,
    /// The published server (reverse).
    pub upstream: Option<SocketAddr>,
    pub advertise: Advertise,
    /// How data connections toward the server are opened.
    pub server_data: ServerData,
    /// Transparent mode: IPv6 destinations inside this /96 (RFC 6052) stand
    /// for the IPv4 server embedded in their last 32 bits (NAT64).
    pub nat64_prefix: Option<Ipv6Net>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// from one of `trusted_proxies`, whose source is the client.
    pub proxy_protocol: bool,
    pub trusted_proxies: TrustedProxies,
    /// Client-facing TLS (reverse mode, `tls_cert` and `tls_key`).
    pub tls: Option<Arc<ListenerTls>>,
    /// TLS toward the upstream server (`upstream_tls`).
    pub upstream_tls: Option<Arc<UpstreamTls>>,
}

/// The address announced in 227 replies: none (the address the client
/// reached), one for every client, or one per client network (split
/// horizon: inside clients get the gateway's inside address, outside
/// clients its public one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Advertise {
    #[default]
    Reached,
    One(IpAddr),
    /// The first rule whose network holds the client wins; no match: the
    /// address the client reached.
    PerClient(Vec<AdvertiseRule>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseRule {
    pub clients: IpNet,
    pub address: IpAddr,
}

impl Advertise {
    /// The address to announce to `client`, if not the one it reached.
    pub fn for_client(&self, client: IpAddr) -> Option<IpAddr> {
        let client = canonical_ip(client);
        match self {
            Advertise::Reached => None,
            Advertise::One(ip) => Some(*ip),
            Advertise::PerClient(rules) => rules
                .iter()
                .find(|r| r.clients.contains(&client))
                .map(|r| r.address),
        }
    }

    /// Every address this listener may announce.
    pub fn addresses(&self) -> Vec<IpAddr> {
        match self {
            Advertise::Reached => Vec::new(),
            Advertise::One(ip) => vec![*ip],
            Advertise::PerClient(rules) => rules.iter().map(|r| r.address).collect(),
        }
    }
}

/// Which data plane carries the bytes of data connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// A pinhole listener per data connection and a userland relay
    /// (splice(2) on Linux). Works without privileges and everywhere.
    Proxy,
    /// nftables map elements per pinhole: conntrack carries the bytes and
    /// userland never touches them. Linux, CAP_NET_ADMIN, the rules printed
    /// by `ftpgate nft-rules` loaded.
    Kernel,
}

impl Plane {
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Proxy => "proxy",
            Plane::Kernel => "kernel",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Data {
    pub plane: Plane,
    /// The tag of data connections on the kernel plane: the high 16 bits
    /// of their conntrack mark (the low 16 bits are the pinhole port).
    pub kernel_mark: u32,
    pub ports: (u16, u16),
    pub accept_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pinholes_per_session: usize,
    pub caps: DataCaps,
    /// Passive data connections of sessions that came through a PROXY
    /// listener carry a PROXY header too (from that listener's trusted
    /// proxies); its source is checked as the expected peer.
    pub proxy_protocol: bool,
}

/// The data path's caps, per client and gateway-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataCaps {
    /// Pinholes waiting for their peer.
    pub pinholes: Caps,
    /// Data connections, carried or reserved by a waiting pinhole.
    pub connections: Caps,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_client: usize,
    pub login_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_command_line: usize,
    pub max_reply_line: usize,
    pub shutdown_grace: Duration,
    /// At SIGTERM `/readyz` turns 503 and the listeners keep accepting
    /// this long (zero: they close at once), so a balancer that checks
    /// `/readyz` stops sending sessions before the listeners close.
    pub drain_delay: Duration,
    /// Core hardening (see the block at the end of this file).
    pub max_refused_commands: usize,
    /// IPv6 clients are counted per prefix of this length.
    pub ipv6_client_prefix: u8,
}

#[derive(Debug, Clone)]
pub struct DenyLogConfig {
    /// `None`: standard output.
    pub path: Option<PathBuf>,
    pub queue: usize,
    /// Lines written per (source, reason) and interval; the rest are
    /// summarised.
    pub burst: u32,
    pub interval: Duration,
}

/// The validated, immutable configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub data: Data,
    pub policy: Policy,
    pub limits: Limits,
    pub deny_log: DenyLogConfig,
    pub admin: Option<SocketAddr>,
    pub tls: TlsSettings,
    /// What a session on each listener needs, by listener index: derived
    /// once per load, not per accepted connection.
    sessions: Vec<Arc<SessionConfig>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{}: {e}", path.display())],
        })?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let raw: RawConfig = serde_ignored::deserialize(deserializer, |path| {
            problems.push(format!("unknown key `{path}`"));
        })
        .map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let config = raw.validate(&mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The TLS policy of sessions on `listener`.
    fn tls_policy_for(&self, listener: &Listener) -> TlsPolicy {
        let auth = match (self.tls.auth_tls, &listener.tls, listener.mode) {
            (Some(AuthTlsSetting::Refuse), _, _) => AuthTls::Refuse,
            (Some(AuthTlsSetting::Passthrough), _, Mode::Transparent) => {
                AuthTls::Passthrough(self.tls.passthrough.clone())
            }
            (_, Some(tls), Mode::Reverse) => AuthTls::Terminate {
                implicit: tls.implicit,
            },
            _ => AuthTls::Refuse,
        };
        TlsPolicy {
            auth,
            require_tls: self.tls.require_tls,
        }
    }

    /// What one control session needs, derived once (no listener: no
    /// TLS).
    pub fn session_config(&self) -> Arc<SessionConfig> {
        self.session_config_for(None)
    }

    /// What a control session accepted by listener number `index` needs
    /// (shared by all of them, made when the configuration was loaded).
    pub fn listener_session_config(&self, index: usize) -> Option<Arc<SessionConfig>> {
        self.sessions.get(index).cloned()
    }

    /// What a control session accepted by `listener` needs.
    pub fn session_config_for(&self, listener: Option<&Listener>) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            server_data: listener.map_or(ServerData::AsClient, |l| l.server_data),
            policy: self.policy.clone(),
            max_command_line: self.limits.max_command_line,
            max_reply_line: self.limits.max_reply_line,
            max_pinholes: self.data.max_pinholes_per_session,
            pinhole_timeout: self.data.accept_timeout,
            login_timeout: self.limits.login_timeout,
            idle_timeout: self.limits.idle_timeout,
            max_refusals: self.limits.max_refused_commands,
            tls: listener.map_or_else(TlsPolicy::default, |l| self.tls_policy_for(l)),
        })
    }
}

// ---- raw form: what the file says ------------------------------------------

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    data: RawData,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    deny_log: RawDenyLog,
    #[serde(default)]
    admin: RawAdmin,
}

#[derive(Debug, Deserialize)]
struct RawListener {
    mode: String,
    bind: Vec<String>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default = "default_intercept_port")]
    intercept_port: u16,
    upstream: Option<String>,
    /// A string, or an array of `{ clients = CIDR, address = IP }` tables
    /// (validated by hand, so every problem is reported with its path).
    advertise: Option<toml::Value>,
    #[serde(default = "default_server_data")]
    server_data: String,
    nat64_prefix: Option<String>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    #[serde(default)]
    tls_implicit: bool,
    upstream_tls: Option<String>,
    upstream_tls_name: Option<String>,
    upstream_ca: Option<String>,
}

fn default_server_data() -> String {
    "as-client".into()
}

fn default_intercept_port() -> u16 {
    21
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawData {
    plane: String,
    kernel_mark: u32,
    ports: String,
    accept_timeout: String,
    connect_timeout: String,
    idle_timeout: String,
    max_pinholes_per_session: usize,
    max_pinholes: usize,
    max_pinholes_per_client: usize,
    max_connections: usize,
    max_connections_per_client: usize,
    proxy_protocol: bool,
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
struct RawPolicy {
    deny_ports: Vec<u16>,
    auth_tls: Option<String>,
    require_tls: bool,
    fxp: Vec<RawFxp>,
    tls_passthrough: Vec<RawPassthrough>,
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
struct RawFxp {
    name: String,
    servers: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
struct RawLimits {
    max_sessions: usize,
    max_sessions_per_client: usize,
    login_timeout: String,
    idle_timeout: String,
    connect_timeout: String,
    max_command_line: usize,
    max_reply_line: usize,
    shutdown_grace: String,
    drain_delay: String,
    /// Core hardening (see the block at the end of this file).
    max_refused_commands: usize,
    ipv6_client_prefix: u8,
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
struct RawDenyLog {
    path: String,
    queue: usize,
    burst: u32,
    interval: String,
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
struct RawAdmin {
    bind: Option<String>,
}

// ---- validation ------------------------------------------------------------

fn duration(key: &str, text: &str, problems: &mut Vec<String>) -> Duration {
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

fn duration_or_zero(key: &str, text: &str, problems: &mut Vec<String>) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| {
        problems.push(format!(
            "`{key}` = {text:?}: {e} (write e.g. \"0s\", \"2s\")"
        ));
        Duration::ZERO
    })
}

fn positive(key: &str, value: usize, problems: &mut Vec<String>) -> usize {
    if value == 0 {
        problems.push(format!("`{key}` must be at least 1"));
    }
    value
}

fn port_range(text: &str, problems: &mut Vec<String>) -> (u16, u16) {
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
fn advertise(key: &str, value: &toml::Value, problems: &mut Vec<String>) -> Advertise {
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
    fn validate(self, problems: &mut Vec<String>) -> Config {
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

fn line_limit(key: &str, value: usize, max: usize, problems: &mut Vec<String>) -> usize {
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
fn is_this_host(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// An address or CIDR network; an IPv4-mapped IPv6 net is made IPv4.
fn parse_net(text: &str) -> Option<IpNet> {
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
const MAX_REFUSAL_BUDGET: usize = 1_000_000;

fn refusal_budget(value: usize, problems: &mut Vec<String>) -> usize {
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
        let text = include_str!("../config/ftpgate.toml");
        assert!(
            text.lines()
                .any(|l| l.trim() == format!("max_refused_commands = {DEFAULT_MAX_REFUSALS}")),
            "config/ftpgate.toml lacks max_refused_commands"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses() {
        let text = include_str!("../config/ftpgate.toml");
        let cfg = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.listeners.is_empty());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            colour = "blue"
            [[listener]]
            mode = "sideways"
            bind = ["nowhere"]
            extra = 1
            [data]
            ports = "80-70"
            accept_timeout = "soon"
            [limits]
            max_sessions = 0
        "#;
        let err = Config::parse(text).unwrap_err();
        let all = err.to_string();
        for needle in [
            "unknown key `colour`",
            "unknown key `listener.0.extra`",
            "listener[0].mode",
            "listener[0].bind",
            "data.ports",
            "data.accept_timeout",
            "limits.max_sessions",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn reverse_mode_needs_an_upstream() {
        let err = Config::parse("[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\n")
            .unwrap_err();
        assert!(err.to_string().contains("upstream"), "{err}");
    }

    #[test]
    fn a_transparent_listener_must_name_its_inside_interfaces() {
        let err = Config::parse(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"192.0.2.20:21\"\n\
             [[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\", \"[::]:2121\"]\n",
        )
        .unwrap_err();
        let all = err.to_string();
        assert!(
            all.contains("`listener[1].interfaces`") && all.contains("0.0.0.0:2121, [::]:2121"),
            "{all}"
        );
        assert_eq!(err.problems.len(), 1, "{all}");
    }

    #[test]
    fn a_reverse_upstream_that_is_the_gateways_own_listener_is_refused() {
        for (bind, upstream) in [
            ("127.0.0.1:2100", "127.0.0.1:2100"),
            ("0.0.0.0:2100", "127.0.0.1:2100"),
            ("[::]:2100", "[::1]:2100"),
            ("0.0.0.0:2100", "0.0.0.0:2100"),
        ] {
            let text = format!(
                "[[listener]]\nmode = \"reverse\"\nbind = [\"{bind}\"]\nupstream = \"{upstream}\"\n"
            );
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(
                err.contains("`listener[0].upstream`") && err.contains("own listener"),
                "{bind} / {upstream}: {err}"
            );
        }
        // Another listener of the gateway is its own too.
        let err = Config::parse(
            "[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\"]\ninterfaces = [\"br-in\"]\n\
             [[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"127.0.0.1:2121\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("`listener[1].upstream`"), "{err}");
        // Another port, or another host, is fine.
        for upstream in ["127.0.0.1:21", "192.0.2.20:2100"] {
            let text = format!(
                "[[listener]]\nmode = \"reverse\"\nbind = [\"0.0.0.0:2100\"]\nupstream = \"{upstream}\"\n"
            );
            Config::parse(&text).unwrap_or_else(|e| panic!("{upstream}: {e}"));
        }
    }

    #[test]
    fn command_lines_longer_than_servers_take_are_refused() {
        let limit = |n: usize| {
            Config::parse(&format!(
                "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"192.0.2.20:21\"\n\
                 [limits]\nmax_command_line = {n}\n"
            ))
        };
        assert!(limit(4096).is_ok());
        let err = limit(4097).unwrap_err().to_string();
        assert!(err.contains("`limits.max_command_line` = 4097"), "{err}");
        assert!(err.contains("4096"), "{err}");
        // Reply lines may still be long.
        assert!(
            Config::parse(
                "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"192.0.2.20:21\"\n\
                 [limits]\nmax_reply_line = 65536\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn advertise_is_one_address_or_one_per_client_network() {
        let one = Config::parse(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"0.0.0.0:2100\"]\nupstream = \"192.0.2.20:21\"\nadvertise = \"203.0.113.7\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = &one.listeners[0].advertise;
        assert_eq!(
            a.for_client("10.1.1.1".parse().unwrap()),
            Some("203.0.113.7".parse().unwrap())
        );
        let split = Config::parse(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"0.0.0.0:2100\"]\nupstream = \"192.0.2.20:21\"\n\
             advertise = [ { clients = \"192.0.2.0/24\", address = \"192.0.2.1\" },\
                           { clients = \"0.0.0.0/0\", address = \"203.0.113.7\" } ]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = &split.listeners[0].advertise;
        assert_eq!(
            a.for_client("192.0.2.10".parse().unwrap()),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            a.for_client("::ffff:192.0.2.10".parse().unwrap()),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            a.for_client("198.51.100.30".parse().unwrap()),
            Some("203.0.113.7".parse().unwrap())
        );
        // No rule for IPv6 clients: the address they reached.
        assert_eq!(a.for_client("2001:db8::1".parse().unwrap()), None);
    }

    #[test]
    fn translation_keys_are_checked_with_every_other_problem() {
        let err = Config::parse(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"0.0.0.0:2100\"]\nupstream = \"192.0.2.20:21\"\n\
             server_data = \"sideways\"\nnat64_prefix = \"64:ff9b::/96\"\n\
             advertise = [ { clients = \"nowhere\", address = \"192.0.2.1\", colour = 1 }, { clients = \"10.0.0.0/8\" } ]\n\
             [[listener]]\nmode = \"transparent\"\nbind = [\"[::]:2121\"]\ninterfaces = [\"br-in\"]\n\
             nat64_prefix = \"64:ff9b::/64\"\nserver_data = \"active\"\n[data]\nplane = \"kernel\"\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "`listener[0].server_data` = \"sideways\"",
            "`listener[0].nat64_prefix` is only for transparent mode",
            "`listener[0].advertise[0].clients`: \"nowhere\"",
            "unknown key `listener[0].advertise[0].colour`",
            "`listener[0].advertise[1].address` is required",
            "`listener[1].nat64_prefix` = \"64:ff9b::/64\"",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        let ok = Config::parse(
            "[[listener]]\nmode = \"transparent\"\nbind = [\"[::]:2121\"]\ninterfaces = [\"br-in\"]\n\
             nat64_prefix = \"64:ff9b::/96\"\nserver_data = \"passive\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.listeners[0].server_data, ServerData::Passive);
        assert_eq!(
            ok.session_config_for(Some(&ok.listeners[0])).server_data,
            ServerData::Passive
        );
    }

    #[test]
    fn mapped_fxp_networks_become_ipv4() {
        assert_eq!(
            parse_net("::ffff:198.51.100.0/120"),
            Some("198.51.100.0/24".parse().unwrap())
        );
        assert_eq!(
            parse_net("198.51.100.7"),
            Some("198.51.100.7/32".parse().unwrap())
        );
    }
}

#[cfg(test)]
mod scale_out_tests {
    use super::*;

    fn reverse(listener_keys: &str, rest: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"192.0.2.20:21\"\n{listener_keys}\n{rest}"
        ))
    }

    #[test]
    fn proxy_protocol_needs_trusted_proxies_and_a_reverse_listener() {
        let err = reverse("proxy_protocol = true", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`listener[0].trusted_proxies` must name"),
            "{err}"
        );
        let err = reverse("trusted_proxies = [\"10.0.0.2\"]", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only for `listener[0].proxy_protocol`"),
            "{err}"
        );
        let err = reverse("proxy_protocol = true\ntrusted_proxies = [\"nowhere\"]", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"nowhere\" is no address"), "{err}");
        let err = Config::parse(
            "[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\"]\ninterfaces = [\"br-in\"]\n\
             proxy_protocol = true\ntrusted_proxies = [\"10.0.0.2\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is for reverse listeners"), "{err}");
        let cfg = reverse(
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.2\", \"::ffff:10.0.1.0/120\"]",
            "[data]\nproxy_protocol = true\n[limits]\ndrain_delay = \"2s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let l = &cfg.listeners[0];
        assert!(l.proxy_protocol && cfg.data.proxy_protocol);
        assert!(l.trusted_proxies.contains("10.0.1.7".parse().unwrap()));
        assert!(!l.trusted_proxies.contains("10.0.0.3".parse().unwrap()));
        assert_eq!(cfg.limits.drain_delay, Duration::from_secs(2));
    }

    #[test]
    fn data_proxy_protocol_is_refused_on_the_kernel_plane_and_without_a_proxy_listener() {
        let err = reverse(
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.2\"]",
            "[data]\nplane = \"kernel\"\nproxy_protocol = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`data.proxy_protocol` needs `data.plane` = \"proxy\""),
            "{err}"
        );
        let err = reverse("", "[data]\nproxy_protocol = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs a listener with `proxy_protocol`"),
            "{err}"
        );
    }

    #[test]
    fn drain_delay_defaults_to_zero_and_must_be_a_duration() {
        assert_eq!(reverse("", "").unwrap().limits.drain_delay, Duration::ZERO);
        let err = reverse("", "[limits]\ndrain_delay = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`limits.drain_delay`"), "{err}");
    }
}
