//! Listeners: accept control connections, apply the session limits, find the
//! upstream server, and start a control session for each.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};

use crate::clients::{Caps, ClientKey, Counter, Full};
use crate::config::{Config, Listener, Mode};
use crate::control::{self, SessionSettings, Shared};
use crate::dataplane::DataTimeouts;
use crate::denylog::SessionInfo;
use crate::proto::policy::canonical;
use crate::proto::{Denial, DenyReason, Side};
use crate::proxy_protocol::{self, HEADER_TIMEOUT, HeaderError};
use crate::sockets::original_dst_at;
pub use crate::sockets::{bind, original_dst};

/// The gateway's running state shared by all listeners.
pub struct Gateway {
    shared: Arc<Shared>,
    config: watch::Receiver<Arc<Config>>,
    /// Sessions running, per client and in total; each session holds a
    /// claim (a drop guard) for as long as its task lives.
    sessions: Arc<Counter>,
    next_id: AtomicU64,
    /// Test hook: sessions panic once admitted.
    #[cfg(any(test, feature = "test-util"))]
    panic_sessions: std::sync::atomic::AtomicBool,
}

impl Gateway {
    pub fn new(shared: Arc<Shared>, config: watch::Receiver<Arc<Config>>) -> Arc<Gateway> {
        Arc::new(Gateway {
            shared,
            sessions: Counter::new(),
            config,
            next_id: AtomicU64::new(1),
            #[cfg(any(test, feature = "test-util"))]
            panic_sessions: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Test hook: every session admitted from now on panics.
    #[cfg(any(test, feature = "test-util"))]
    pub fn panic_sessions_for_test(&self) {
        self.panic_sessions.store(true, Ordering::Relaxed);
    }

    /// Sessions `client` holds now.
    pub fn sessions_of(&self, client: ClientKey) -> usize {
        self.sessions.of(client)
    }

    /// Sessions currently running.
    pub fn active_sessions(&self) -> usize {
        self.sessions.total()
    }

    /// Accepts on `listener` until `stop` turns true; sessions run in `tasks`.
    pub async fn accept_loop(
        self: Arc<Self>,
        index: usize,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
        sessions_stop: watch::Receiver<bool>,
        tasks: Arc<Mutex<JoinSet<()>>>,
    ) {
        let mut errors = AcceptErrors::new("control");
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            };
            let gw = Arc::clone(&self);
            let stop = sessions_stop.clone();
            let mut set = tasks.lock().unwrap_or_else(|e| e.into_inner());
            // Reap finished sessions so the set stays small.
            while let Some(ended) = set.try_join_next() {
                report_session_end(ended);
            }
            set.spawn(async move { gw.admit(index, stream, peer, stop).await });
        }
    }

    async fn admit(
        self: Arc<Self>,
        index: usize,
        mut stream: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        let cfg = self.config.borrow().clone();
        let (Some(listener), Some(core)) =
            (cfg.listeners.get(index), cfg.listener_session_config(index))
        else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = canonical(peer);
        let mut info = SessionInfo {
            id,
            mode: listener.mode,
            client: peer,
            server: None,
            source: ClientKey::of(peer.ip(), cfg.limits.ipv6_client_prefix),
        };
        // Behind a balancer the client is whom the PROXY header names.
        let mut balancer_vip = None;
        if listener.proxy_protocol {
            let trusted = &listener.trusted_proxies;
            match proxy_protocol::accept(&mut stream, peer, trusted, HEADER_TIMEOUT).await {
                Ok(proxied) => {
                    info.client = proxied.client;
                    info.source = ClientKey::of(proxied.client.ip(), cfg.limits.ipv6_client_prefix);
                    balancer_vip = proxied.destination.map(|d| d.ip());
                }
                Err(e) => {
                    tracing::debug!(session = id, %peer, "refused: {e}");
                    let rule = match e {
                        HeaderError::Untrusted(_) => "trusted_proxies",
                        _ => "proxy_protocol",
                    };
                    let denial = Denial::new(DenyReason::ProxyHeader, Side::Client).rule(rule);
                    let reply = "421 Service not available: no PROXY header from a trusted proxy.";
                    return self.refuse_with(&mut stream, &info, denial, reply).await;
                }
            }
        }
        // A redirected connection's addresses, asked of the kernel once
        // (a reverse listener needs neither).
        let (local, original) = match listener.mode {
            Mode::Transparent => {
                let local = stream.local_addr().ok();
                (local, local.and_then(|l| original_dst_at(&stream, l)))
            }
            Mode::Reverse => (None, None),
        };
        if let Some(to) = original
            && to.port() != listener.intercept_port
            && cfg.tls.passthrough.iter().any(|r| {
                (r.data_ports.0..=r.data_ports.1).contains(&to.port())
                    && r.servers.iter().any(|n| n.contains(&canonical(to).ip()))
            })
        {
            return self
                .passthrough_data(stream, info.client, canonical(to))
                .await;
        }
        let upstream = match self.upstream(listener, local, original) {
            Ok(u) => u,
            Err(reason) => {
                let reply = match reason {
                    DenyReason::NoOriginalDestination => {
                        "421 Service not available: no original destination."
                    }
                    _ => "421 Service not available: connection to the gateway itself.",
                };
                return self.refuse(&mut stream, &info, reason, reply).await;
            }
        };
        info.server = Some(upstream);
        let caps = Caps {
            total: cfg.limits.max_sessions,
            per_client: cfg.limits.max_sessions_per_client,
        };
        // Released when this task ends, however it ends.
        let _slot = match self.sessions.claim(info.source, caps) {
            Ok(slot) => slot,
            Err(Full::Total(_)) => {
                let reply = "421 Too many connections; try again later.";
                return self
                    .refuse(&mut stream, &info, DenyReason::SessionLimit, reply)
                    .await;
            }
            Err(Full::Client(_)) => {
                let reply = "421 Too many connections from your address; try again later.";
                return self
                    .refuse(&mut stream, &info, DenyReason::ClientSessionLimit, reply)
                    .await;
            }
        };
        let settings = SessionSettings {
            core,
            mode: listener.mode,
            // Passive replies name what the client connected to: the
            // configured address for this client's network, else the
            // balancer's address from the header (a balancer that owns the
            // data ports maps them back).
            advertise: listener
                .advertise
                .for_client(info.client.ip())
                .or(balancer_vip),
            data_proxy: (cfg.data.proxy_protocol && listener.proxy_protocol)
                .then(|| listener.trusted_proxies.clone()),
            connect_timeout: cfg.limits.connect_timeout,
            data: DataTimeouts {
                accept: cfg.data.accept_timeout,
                connect: cfg.data.connect_timeout,
                idle: cfg.data.idle_timeout,
            },
            data_caps: cfg.data.caps,
            client_tls: listener.tls.clone(),
            upstream_tls: listener.upstream_tls.clone(),
        };
        #[cfg(any(test, feature = "test-util"))]
        if self.panic_sessions.load(Ordering::Relaxed) {
            panic!("test hook: session {id} panics");
        }
        control::serve(Arc::clone(&self.shared), settings, info, stream, stop).await;
    }

    /// A connection redirected to a TLS passthrough server's passive range:
    /// relayed if a live passthrough session of this client holds a grant
    /// for it, else closed.
    async fn passthrough_data(&self, stream: TcpStream, peer: SocketAddr, to: SocketAddr) {
        let Some(grant_use) = self.shared.passthrough.find(peer.ip(), to) else {
            crate::metrics::pinhole_refused();
            tracing::debug!(%peer, %to, "passthrough data connection without a grant refused");
            return;
        };
        let owner = &grant_use.owner;
        let timeouts = owner.timeouts;
        let connected = tokio::time::timeout(timeouts.connect, TcpStream::connect(to)).await;
        let Ok(Ok(outbound)) = connected else {
            tracing::debug!(session = owner.info.id, %to, "passthrough data connection onward failed");
            return;
        };
        let _ = outbound.set_nodelay(true);
        let _active = crate::metrics::DataConnectionActive::start();
        let began = std::time::Instant::now();
        let (counts, _) =
            crate::relay::relay_until(stream, outbound, timeouts.idle, owner.ended()).await;
        crate::metrics::data_connection(
            "proxy",
            "passthrough",
            counts.b_to_a,
            counts.a_to_b,
            began.elapsed(),
        );
    }

    /// Where a session goes: a reverse listener's server, or a redirected
    /// connection's original destination (`original`; `local` is the
    /// address it reached the gateway on).
    fn upstream(
        &self,
        listener: &Listener,
        local: Option<SocketAddr>,
        original: Option<SocketAddr>,
    ) -> Result<SocketAddr, DenyReason> {
        match listener.mode {
            Mode::Reverse => listener.upstream.ok_or(DenyReason::Loop),
            Mode::Transparent => {
                let orig = original.map(|o| nat64_embedded(o, listener.nat64_prefix));
                transparent_upstream(local, orig, |ip| self.shared.local.contains(ip))
            }
        }
    }

    async fn refuse(
        &self,
        stream: &mut TcpStream,
        info: &SessionInfo,
        reason: DenyReason,
        reply: &str,
    ) {
        self.refuse_with(stream, info, Denial::new(reason, Side::Client), reply)
            .await;
    }

    async fn refuse_with(
        &self,
        stream: &mut TcpStream,
        info: &SessionInfo,
        denial: Denial,
        reply: &str,
    ) {
        control::refuse_connection(&self.shared.deny, stream, info, denial, reply).await;
    }
}

/// Failed accepts of one listener (EMFILE and friends): each backs off
/// instead of spinning and is counted in `ftpgate_accept_failures_total`;
/// a line is logged at most every [`AcceptErrors::LOG_EVERY`] with the
/// count since the last. At the open-file limit a listener alternates
/// between a failed accept and one that gets the descriptor a refused
/// session just gave back, so "log the first of a run" would still log
/// twenty lines a second.
pub struct AcceptErrors {
    listener: &'static str,
    unlogged: u64,
    logged: Option<std::time::Instant>,
}

impl AcceptErrors {
    /// How long a failed accept waits before the next try.
    pub const BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
    /// At most one line per listener this often.
    pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors {
            listener,
            unlogged: 0,
            logged: None,
        }
    }

    pub async fn failed(&mut self, e: &io::Error) {
        crate::metrics::accept_failed(self.listener);
        self.unlogged += 1;
        if self.logged.is_none_or(|t| t.elapsed() >= Self::LOG_EVERY) {
            tracing::warn!(
                listener = self.listener,
                failures = self.unlogged,
                "accept failed: {e}; retrying every {:?}; failures are counted in \
                 ftpgate_accept_failures_total and logged at most every {:?}",
                Self::BACKOFF,
                Self::LOG_EVERY
            );
            self.unlogged = 0;
            self.logged = Some(std::time::Instant::now());
        }
        tokio::time::sleep(Self::BACKOFF).await;
    }
}

/// A session task has ended; a panic is worth an error line (its slot
/// and pinholes were released by their guards).
pub fn report_session_end(ended: Result<(), JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!("a session task panicked: {e}");
    }
}

/// The upstream of a transparent-mode connection accepted on `local`: its
/// original destination `orig`, unless there is none (SO_ORIGINAL_DST
/// failed: no redirect and no conntrack entry) or it is the gateway itself
/// (no redirect: relaying would loop).
/// NAT64 (RFC 6052 with a /96 prefix): an original destination inside
/// `prefix` stands for the IPv4 server in its last 32 bits; the gateway
/// itself is the translator for FTP and connects there over IPv4.
fn nat64_embedded(orig: SocketAddr, prefix: Option<ipnet::Ipv6Net>) -> SocketAddr {
    match (orig, prefix) {
        (SocketAddr::V6(v6), Some(net)) if net.contains(v6.ip()) => {
            let o = v6.ip().octets();
            let v4 = std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]);
            SocketAddr::new(IpAddr::V4(v4), v6.port())
        }
        _ => orig,
    }
}

fn transparent_upstream(
    local: Option<SocketAddr>,
    orig: Option<SocketAddr>,
    is_local: impl Fn(IpAddr) -> bool,
) -> Result<SocketAddr, DenyReason> {
    let (Some(local), Some(orig)) = (local, orig) else {
        return Err(DenyReason::NoOriginalDestination);
    };
    if orig == canonical(local) || is_local(orig.ip()) {
        return Err(DenyReason::Loop);
    }
    Ok(orig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nat64_destination_stands_for_the_embedded_ipv4_server() {
        let prefix = Some("64:ff9b::/96".parse().unwrap());
        let orig: SocketAddr = "[64:ff9b::c633:6414]:21".parse().unwrap();
        assert_eq!(
            nat64_embedded(orig, prefix),
            "198.51.100.20:21".parse::<SocketAddr>().unwrap()
        );
        let outside: SocketAddr = "[2001:db8:2::20]:21".parse().unwrap();
        assert_eq!(nat64_embedded(outside, prefix), outside);
        assert_eq!(nat64_embedded(orig, None), orig);
    }
    use crate::dataplane::{Plane, proxy::ProxyPlane};
    use crate::denylog::DenyLog;

    #[tokio::test]
    async fn a_session_task_that_panics_releases_its_client_slot() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&format!(
            "[[listener]]\nmode = \"reverse\"\nbind = [\"127.0.0.1:0\"]\nupstream = \"192.0.2.20:21\"\n\
             [limits]\nmax_sessions_per_client = 1\n[deny_log]\npath = \"{}\"\n",
            dir.path().join("deny.jsonl").display()
        ))
        .unwrap();
        let (deny, _writer) = DenyLog::start(&cfg.deny_log).unwrap();
        let shared = Arc::new(Shared {
            plane: Plane::Proxy(ProxyPlane::new(cfg.data.ports, crate::tasks::Tasks::new())),
            deny,
            local: crate::localaddrs::LocalAddrs::new(),
            passthrough: crate::dataplane::passthrough::Grants::new(),
        });
        let (_config, config_rx) = watch::channel(Arc::new(cfg));
        let gateway = Gateway::new(shared, config_rx);
        gateway.panic_sessions_for_test();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let ended = tokio::spawn(Arc::clone(&gateway).admit(0, stream, peer, stop_rx)).await;
        assert!(ended.unwrap_err().is_panic());
        assert_eq!(gateway.sessions_of(ClientKey::of(peer.ip(), 64)), 0);
        assert_eq!(gateway.active_sessions(), 0);
    }

    #[test]
    fn a_transparent_connection_without_an_original_destination_is_not_a_loop() {
        let local: SocketAddr = "192.0.2.1:2121".parse().unwrap();
        let server: SocketAddr = "198.51.100.20:21".parse().unwrap();
        let only_gateway = |ip: IpAddr| ip == local.ip();
        assert_eq!(
            transparent_upstream(Some(local), None, only_gateway),
            Err(DenyReason::NoOriginalDestination)
        );
        assert_eq!(
            transparent_upstream(None, Some(server), only_gateway),
            Err(DenyReason::NoOriginalDestination)
        );
        assert_eq!(
            transparent_upstream(Some(local), Some(local), only_gateway),
            Err(DenyReason::Loop)
        );
        let own_port_21 = SocketAddr::new(local.ip(), 21);
        assert_eq!(
            transparent_upstream(Some(local), Some(own_port_21), only_gateway),
            Err(DenyReason::Loop)
        );
        assert_eq!(
            transparent_upstream(Some(local), Some(server), only_gateway),
            Ok(server)
        );
    }
}
