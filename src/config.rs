//! The TOML configuration: parsed into raw structs, then validated once into
//! the immutable [`Config`] the daemon runs with. Every problem is reported
//! at once: unknown keys (all of them, with their paths) and every invalid
//! value.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};

use crate::clients::Caps;
use crate::proto::policy::canonical_ip;
use crate::proto::{AuthTls, Policy, ServerData, SessionConfig, TlsPolicy};
use crate::proxy_protocol::TrustedProxies;
use crate::tls::{ListenerTls, UpstreamTls};

mod raw;
mod tls;

use raw::RawConfig;
pub use raw::{MAX_COMMAND_LINE, is_own_listener};
pub use tls::{AuthTlsSetting, TlsSettings};

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

/// The validated, immutable configuration. Only [`Config::parse`] makes
/// one, and nothing may change it afterwards: each listener's
/// [`SessionConfig`] is derived from it once, there (a reload parses a new
/// one).
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

#[cfg(test)]
mod tests {
    use super::raw::parse_net;
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
