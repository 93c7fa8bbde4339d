//! The FTPS keys: a listener's `tls_cert`, `tls_key`, `tls_implicit`,
//! `upstream_tls`, `upstream_tls_name` and `upstream_ca` (the files are read
//! and checked here, so `check-config` reports them and SIGHUP reloads
//! them), and `[policy] auth_tls`, `require_tls` and
//! `[[policy.tls_passthrough]]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::raw::{RawListener, RawPolicy, parse_net};
use super::{Listener, Mode};
use crate::proto::PassthroughRule;
use crate::tls::{ListenerTls, UpstreamMode, UpstreamTls};

/// `[policy] auth_tls`, `require_tls` and `[[policy.tls_passthrough]]`.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// `None`: "terminate" on listeners with a certificate, else "refuse".
    pub auth_tls: Option<AuthTlsSetting>,
    pub require_tls: bool,
    pub passthrough: Vec<PassthroughRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthTlsSetting {
    Refuse,
    Terminate,
    Passthrough,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawPassthrough {
    #[serde(default)]
    name: Option<String>,
    servers: Vec<String>,
    data_ports: String,
}

impl RawListener {
    pub(super) fn client_tls(
        &self,
        i: usize,
        mode: Option<Mode>,
        problems: &mut Vec<String>,
    ) -> Option<Arc<ListenerTls>> {
        let key = |k: &str| format!("listener[{i}].{k}");
        let (cert, tls_key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                if self.tls_implicit {
                    problems.push(format!(
                        "`{}` needs `{}` and `{}`",
                        key("tls_implicit"),
                        key("tls_cert"),
                        key("tls_key")
                    ));
                }
                return None;
            }
            (Some(c), Some(k)) => (PathBuf::from(c), PathBuf::from(k)),
            _ => {
                problems.push(format!(
                    "`{}` and `{}` go together",
                    key("tls_cert"),
                    key("tls_key")
                ));
                return None;
            }
        };
        if mode == Some(Mode::Transparent) {
            // Terminating there would mean impersonating every server.
            problems.push(format!(
                "`{}` is only for reverse mode: transparent mode passes TLS through (policy.auth_tls = \"passthrough\")",
                key("tls_cert")
            ));
            return None;
        }
        match crate::tls::server_config(&cert, &tls_key) {
            Ok(config) => Some(Arc::new(ListenerTls {
                cert,
                key: tls_key,
                implicit: self.tls_implicit,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            })),
            Err(e) => {
                problems.push(format!("`{}`: {e}", key("tls_cert")));
                None
            }
        }
    }

    pub(super) fn upstream_tls(
        &self,
        i: usize,
        mode: Option<Mode>,
        upstream: Option<SocketAddr>,
        problems: &mut Vec<String>,
    ) -> Option<Arc<UpstreamTls>> {
        let key = |k: &str| format!("listener[{i}].{k}");
        let upstream_mode = match self.upstream_tls.as_deref() {
            None | Some("none") => {
                for (k, set) in [
                    ("upstream_tls_name", self.upstream_tls_name.is_some()),
                    ("upstream_ca", self.upstream_ca.is_some()),
                ] {
                    if set {
                        problems.push(format!(
                            "`{}` needs `{}` = \"explicit\" or \"implicit\"",
                            key(k),
                            key("upstream_tls")
                        ));
                    }
                }
                return None;
            }
            Some("explicit") => UpstreamMode::Explicit,
            Some("implicit") => UpstreamMode::Implicit,
            Some(other) => {
                problems.push(format!(
                    "`{}` = {other:?}: write \"none\", \"explicit\" or \"implicit\"",
                    key("upstream_tls")
                ));
                return None;
            }
        };
        if mode != Some(Mode::Reverse) {
            problems.push(format!(
                "`{}` is only for reverse mode",
                key("upstream_tls")
            ));
            return None;
        }
        let name = match (&self.upstream_tls_name, upstream) {
            (Some(n), _) => match rustls::pki_types::ServerName::try_from(n.clone()) {
                Ok(name) => name,
                Err(_) => {
                    problems.push(format!(
                        "`{}` = {n:?}: no DNS name or IP address",
                        key("upstream_tls_name")
                    ));
                    return None;
                }
            },
            (None, Some(up)) => rustls::pki_types::ServerName::IpAddress(up.ip().into()),
            (None, None) => return None,
        };
        let ca = self.upstream_ca.as_deref().map(Path::new);
        match crate::tls::upstream_tls(upstream_mode, name, ca) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                problems.push(format!("`{}`: {e}", key("upstream_ca")));
                None
            }
        }
    }
}

pub(super) fn tls_settings(
    p: &RawPolicy,
    listeners: &[Listener],
    problems: &mut Vec<String>,
) -> TlsSettings {
    let auth_tls = match p.auth_tls.as_deref() {
        None => None,
        Some("refuse") => Some(AuthTlsSetting::Refuse),
        Some("terminate") => Some(AuthTlsSetting::Terminate),
        Some("passthrough") => Some(AuthTlsSetting::Passthrough),
        Some(other) => {
            problems.push(format!(
                "`policy.auth_tls` = {other:?}: write \"refuse\", \"terminate\" or \"passthrough\""
            ));
            None
        }
    };
    if auth_tls == Some(AuthTlsSetting::Terminate) {
        for (i, l) in listeners.iter().enumerate() {
            if l.mode == Mode::Reverse && l.tls.is_none() {
                problems.push(format!(
                    "`policy.auth_tls` = \"terminate\" needs `listener[{i}].tls_cert` and `tls_key`"
                ));
            }
        }
    }
    let mut passthrough = Vec::new();
    for (i, rule) in p.tls_passthrough.iter().enumerate() {
        let mut servers = Vec::new();
        for s in &rule.servers {
            match parse_net(s) {
                Some(net) => servers.push(net),
                None => problems.push(format!(
                    "`policy.tls_passthrough[{i}].servers`: {s:?} is no address or CIDR network"
                )),
            }
        }
        if rule.servers.is_empty() {
            problems.push(format!(
                "`policy.tls_passthrough[{i}].servers` must not be empty"
            ));
        }
        let data_ports = rule
            .data_ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| *a >= 1024 && a <= b);
        let Some(data_ports) = data_ports else {
            problems.push(format!(
                "`policy.tls_passthrough[{i}].data_ports` = {:?}: write the servers' passive range \"LOW-HIGH\", 1024 <= LOW <= HIGH",
                rule.data_ports
            ));
            continue;
        };
        passthrough.push(PassthroughRule {
            name: rule
                .name
                .clone()
                .unwrap_or_else(|| format!("tls_passthrough[{i}]")),
            servers,
            data_ports,
        });
    }
    for (i, l) in listeners.iter().enumerate() {
        // A translated pinhole's legs are relayed by a path that does not
        // speak TLS (yet).
        if (l.tls.is_some() || l.upstream_tls.is_some())
            && l.server_data != crate::proto::ServerData::AsClient
        {
            problems.push(format!(
                "`listener[{i}].server_data` translation is not supported together with TLS \
                 (`tls_cert` or `upstream_tls`) on the same listener"
            ));
        }
    }
    if !passthrough.is_empty() && auth_tls != Some(AuthTlsSetting::Passthrough) {
        problems
            .push("`policy.tls_passthrough` rules need `policy.auth_tls` = \"passthrough\"".into());
    }
    if auth_tls == Some(AuthTlsSetting::Passthrough) && passthrough.is_empty() {
        problems.push(
            "`policy.auth_tls` = \"passthrough\" needs at least one [[policy.tls_passthrough]] rule".into(),
        );
    }
    TlsSettings {
        auth_tls,
        require_tls: p.require_tls,
        passthrough,
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text)
    }

    #[test]
    fn tls_keys_are_checked_together_and_per_mode() {
        let err = parse(
            "[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\"]\ninterfaces = [\"br-in\"]\n\
             tls_cert = \"/x.pem\"\ntls_key = \"/x.key\"\nupstream_tls = \"explicit\"\n\
             [[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"192.0.2.20:21\"\n\
             tls_cert = \"/x.pem\"\ntls_implicit = true\nupstream_tls = \"sometimes\"\nupstream_ca = \"/ca.pem\"\n\
             [policy]\nauth_tls = \"maybe\"\n\
             [[policy.tls_passthrough]]\nservers = [\"nowhere\"]\ndata_ports = \"80-70\"\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "`listener[0].tls_cert` is only for reverse mode",
            "`listener[0].upstream_tls` is only for reverse mode",
            "`listener[1].tls_cert` and `listener[1].tls_key` go together",
            "`listener[1].upstream_tls` = \"sometimes\"",
            "`policy.auth_tls` = \"maybe\"",
            "`policy.tls_passthrough[0].servers`",
            "`policy.tls_passthrough[0].data_ports`",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn passthrough_needs_its_rules_and_its_setting() {
        let base = "[[listener]]\nmode = \"transparent\"\nbind = [\"0.0.0.0:2121\"]\ninterfaces = [\"br-in\"]\n";
        let err = parse(&format!("{base}[policy]\nauth_tls = \"passthrough\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at least one [[policy.tls_passthrough]]"),
            "{err}"
        );
        let err = parse(&format!(
            "{base}[[policy.tls_passthrough]]\nservers = [\"198.51.100.20\"]\ndata_ports = \"40000-40100\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("need `policy.auth_tls` = \"passthrough\""),
            "{err}"
        );
        let cfg = parse(&format!(
            "{base}[policy]\nauth_tls = \"passthrough\"\n\
             [[policy.tls_passthrough]]\nservers = [\"198.51.100.20\"]\ndata_ports = \"40000-40100\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let session = cfg.session_config_for(Some(&cfg.listeners[0]));
        assert!(
            matches!(session.tls.auth, AuthTls::Passthrough(ref r) if r[0].data_ports == (40000, 40100))
        );
        let rules = crate::nft::ruleset(&cfg, "test");
        assert!(
            rules.contains("ip daddr { 198.51.100.20/32 } tcp dport 40000-40100 redirect to :2121"),
            "{rules}"
        );
    }

    #[test]
    fn a_listener_without_a_certificate_refuses_auth_by_default() {
        let cfg = parse(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:2100\"]\nupstream = \"192.0.2.20:21\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            cfg.session_config_for(Some(&cfg.listeners[0])).tls.auth,
            AuthTls::Refuse
        );
    }
}
