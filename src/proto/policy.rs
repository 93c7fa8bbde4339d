//! The policy decision for data connections, in one function.
//!
//! RFC 2577 (FTP security considerations) is the background: a PORT naming a
//! third host is the bounce attack, a PORT to a privileged port abuses the
//! server as a port scanner or a relay, and a PASV reply naming another host
//! can steer the gateway into a network the server should not reach.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::deny::DenyReason;

/// A server-to-server (FXP) rule: transfers between any two servers in
/// `servers` are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FxpRule {
    pub name: String,
    pub servers: Vec<IpNet>,
}

impl FxpRule {
    fn covers(&self, ip: IpAddr) -> bool {
        self.servers.iter().any(|net| net.contains(&ip))
    }
}

/// The data-connection policy, validated and immutable at runtime.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Refused data ports on top of every port below 1024, sorted.
    pub deny_ports: Vec<u16>,
    pub fxp: Vec<FxpRule>,
}

/// Rule names that appear in deny-log lines.
pub const RULE_PRIVILEGED: &str = "privileged_ports";
pub const RULE_DENY_PORTS: &str = "deny_ports";
pub const RULE_DATA_PEER: &str = "data_peer_is_control_peer";
pub const RULE_GATEWAY_ADDRESS: &str = "gateway_address";

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) name IPv4 hosts; every
/// comparison and CIDR match uses this canonical form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

/// The two ends of the control connection, canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlPeers {
    pub client: IpAddr,
    pub server: IpAddr,
}

/// A data connection the client or the server asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRequest {
    /// PORT/EPRT: the server is to connect to `target`; `behind` is what
    /// the gateway knows of that address.
    Active { target: SocketAddr, behind: Behind },
    /// A 227/229 reply: the client is to connect to `announced` on the server.
    Passive { announced: SocketAddr },
}

/// What stands behind a PORT/EPRT target, as far as the gateway knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    /// Nothing of the gateway's: the client itself or another host.
    Host,
    /// One of the gateway's live pinholes, opened by this client: the real
    /// endpoint behind it (canonical).
    Pinhole(SocketAddr),
    /// One of the gateway's own addresses that is no such pinhole.
    Gateway,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Relay through a pinhole of the gateway's own to `endpoint`.
    /// `replaced` says a passive address was replaced by the server's.
    Relay {
        endpoint: SocketAddr,
        replaced: bool,
    },
    /// Server-to-server: the two servers connect to each other directly.
    Direct {
        endpoint: SocketAddr,
        rule: String,
    },
    Deny {
        reason: DenyReason,
        rule: String,
    },
}

impl Policy {
    /// Decides one data-connection request. Addresses must be canonical.
    pub fn decide(&self, peers: ControlPeers, request: DataRequest) -> Decision {
        match request {
            DataRequest::Active { target, behind } => {
                let (endpoint, via_pinhole) = match behind {
                    // The gateway's own addresses are never data targets,
                    // whatever the FXP rules say: the server would connect
                    // to the gateway's own ports (the bounce of RFC 2577
                    // section 3, aimed at the box in the middle).
                    Behind::Gateway => {
                        return Decision::Deny {
                            reason: DenyReason::Bounce,
                            rule: RULE_GATEWAY_ADDRESS.to_string(),
                        };
                    }
                    Behind::Pinhole(endpoint) => (endpoint, true),
                    Behind::Host => (target, false),
                };
                // Who comes first: a PORT to a third host's port 25 is a
                // bounce (RFC 2577), whatever its port.
                let direct = if !via_pinhole && endpoint.ip() == peers.client {
                    None
                } else {
                    match self.fxp_rule(peers.server, endpoint.ip()) {
                        Some(rule) => Some(format!("fxp:{}", rule.name)),
                        None => {
                            return Decision::Deny {
                                reason: if via_pinhole {
                                    DenyReason::FxpDenied
                                } else {
                                    DenyReason::Bounce
                                },
                                rule: RULE_DATA_PEER.to_string(),
                            };
                        }
                    }
                };
                if let Some(deny) = self.check_port(endpoint.port()) {
                    return deny;
                }
                match direct {
                    None => Decision::Relay {
                        endpoint,
                        replaced: false,
                    },
                    Some(rule) => Decision::Direct { endpoint, rule },
                }
            }
            DataRequest::Passive { announced } => {
                if let Some(deny) = self.check_port(announced.port()) {
                    return deny;
                }
                // The data peer is the control peer: a server behind NAT
                // announces a private address, and an outside server must
                // never steer the gateway elsewhere.
                let replaced = announced.ip() != peers.server;
                Decision::Relay {
                    endpoint: SocketAddr::new(peers.server, announced.port()),
                    replaced,
                }
            }
        }
    }

    fn check_port(&self, port: u16) -> Option<Decision> {
        if port < 1024 {
            return Some(Decision::Deny {
                reason: DenyReason::PrivilegedPort,
                rule: RULE_PRIVILEGED.to_string(),
            });
        }
        if self.deny_ports.binary_search(&port).is_ok() {
            return Some(Decision::Deny {
                reason: DenyReason::DeniedPort,
                rule: RULE_DENY_PORTS.to_string(),
            });
        }
        None
    }

    fn fxp_rule(&self, server: IpAddr, other: IpAddr) -> Option<&FxpRule> {
        self.fxp
            .iter()
            .find(|rule| rule.covers(server) && rule.covers(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> ControlPeers {
        ControlPeers {
            client: "192.0.2.10".parse().unwrap(),
            server: "198.51.100.20".parse().unwrap(),
        }
    }

    fn policy() -> Policy {
        Policy {
            deny_ports: vec![3306, 6379],
            fxp: vec![FxpRule {
                name: "mirrors".into(),
                servers: vec!["198.51.100.0/24".parse().unwrap()],
            }],
        }
    }

    fn active(target: &str, behind: Option<&str>) -> DataRequest {
        DataRequest::Active {
            target: target.parse().unwrap(),
            behind: behind.map_or(Behind::Host, |b| Behind::Pinhole(b.parse().unwrap())),
        }
    }

    fn deny_reason(d: Decision) -> Option<DenyReason> {
        match d {
            Decision::Deny { reason, .. } => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn active_target_must_be_the_client_on_an_unprivileged_allowed_port() {
        let p = Policy::default();
        assert!(matches!(
            p.decide(peers(), active("192.0.2.10:50000", None)),
            Decision::Relay { .. }
        ));
        let bounce = p.decide(peers(), active("203.0.113.5:50000", None));
        assert_eq!(deny_reason(bounce), Some(DenyReason::Bounce));
        let low = p.decide(peers(), active("192.0.2.10:25", None));
        assert_eq!(deny_reason(low), Some(DenyReason::PrivilegedPort));
        let smtp_bounce = p.decide(peers(), active("203.0.113.5:25", None));
        assert_eq!(deny_reason(smtp_bounce), Some(DenyReason::Bounce));
        let listed = policy().decide(peers(), active("192.0.2.10:3306", None));
        assert_eq!(deny_reason(listed), Some(DenyReason::DeniedPort));
    }

    #[test]
    fn the_gateways_own_address_is_a_bounce_whatever_the_fxp_rules() {
        let everything = Policy {
            deny_ports: Vec::new(),
            fxp: vec![FxpRule {
                name: "everything".into(),
                servers: vec!["0.0.0.0/0".parse().unwrap()],
            }],
        };
        for p in [Policy::default(), policy(), everything] {
            for target in ["198.51.100.1:9121", "192.0.2.1:50001", "198.51.100.1:22"] {
                let req = DataRequest::Active {
                    target: target.parse().unwrap(),
                    behind: Behind::Gateway,
                };
                assert_eq!(
                    p.decide(peers(), req),
                    Decision::Deny {
                        reason: DenyReason::Bounce,
                        rule: RULE_GATEWAY_ADDRESS.into()
                    },
                    "{target}"
                );
            }
        }
    }

    #[test]
    fn server_to_server_needs_an_fxp_rule_covering_both_servers() {
        let req = active("192.0.2.1:50001", Some("198.51.100.21:40001"));
        assert_eq!(
            deny_reason(Policy::default().decide(peers(), req)),
            Some(DenyReason::FxpDenied)
        );
        assert_eq!(
            policy().decide(peers(), req),
            Decision::Direct {
                endpoint: "198.51.100.21:40001".parse().unwrap(),
                rule: "fxp:mirrors".into()
            }
        );
        let outside_rule = active("192.0.2.1:50001", Some("203.0.113.9:40001"));
        assert_eq!(
            deny_reason(policy().decide(peers(), outside_rule)),
            Some(DenyReason::FxpDenied)
        );
    }

    #[test]
    fn passive_address_is_replaced_by_the_server_control_address() {
        let d = Policy::default().decide(
            peers(),
            DataRequest::Passive {
                announced: "10.0.0.5:40000".parse().unwrap(),
            },
        );
        assert_eq!(
            d,
            Decision::Relay {
                endpoint: "198.51.100.20:40000".parse().unwrap(),
                replaced: true
            }
        );
        let low = Policy::default().decide(
            peers(),
            DataRequest::Passive {
                announced: "198.51.100.20:22".parse().unwrap(),
            },
        );
        assert_eq!(deny_reason(low), Some(DenyReason::PrivilegedPort));
    }

    #[test]
    fn mapped_addresses_are_canonicalised() {
        let ip: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
        assert_eq!(canonical_ip(ip), "192.0.2.10".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
