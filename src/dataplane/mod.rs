//! Data planes: how the pinholes the protocol core decides are carried out.
//!
//! The core owns every pinhole's life (open, expiry, the theft verdict,
//! close). A data plane only does what the core asked and reports what
//! happened on sockets or in the kernel, as [`PlaneEvent`]s sent to the
//! pinhole's owner, the control session that asked for it:
//!
//! - [`Plane::Proxy`]: a listener per pinhole accepts the connection and a
//!   userland relay (splice(2) on Linux) moves the bytes;
//! - [`Plane::Kernel`]: nftables set and map elements per pinhole, keyed by
//!   the expected peer; conntrack carries the bytes and userland never
//!   touches them. Connections that match no element fall through to one
//!   listener of ftpgate, so a thief is still refused and logged.
//!
//! Both share the [`Registry`]: the port range, and for every live pinhole
//! its key ([`PinholeId`]), its owner and the few facts other sessions need
//! to recognise it in a server-to-server PORT. The control task never knows
//! which plane runs.
//!
//! Pinholes and data connections are capped per client and gateway-wide
//! (`[data] max_pinholes*`, `max_connections*`): a pinhole reserves its
//! data connection when it opens, so a connection that arrives is never
//! refused for want of a slot, and a refused open is the core's 425
//! (`pinhole_unavailable`). A data connection ends with the control session
//! that negotiated it: the proxy relay is cancelled when the session's
//! event channel closes, the kernel plane deletes the session's conntrack
//! flows.

pub mod passthrough;
pub mod proxy;
mod registry;

#[cfg(target_os = "linux")]
pub mod kernel;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::clients::Full;
use crate::config::{DataCaps, Mode};
use crate::denylog::SessionInfo;
use crate::proto::{DataMode, DataVerdict, PinholeId, PinholeRequest, Resolved, SessionId};
use crate::tasks::Tasks;

pub use registry::Registry;

/// What a plane reports to the session that owns a pinhole.
#[derive(Debug)]
pub enum PlaneEvent {
    /// A connection from `peer` arrived at pinhole `id`. The owner's core
    /// decides (expected peer or theft) and answers on `verdict`.
    Arrived {
        id: PinholeId,
        peer: SocketAddr,
        verdict: oneshot::Sender<DataVerdict>,
    },
    /// The kernel let `peer` through pinhole `id` (it matched the element
    /// keyed by the expected peer); the flow is already set up.
    Established { id: PinholeId, peer: SocketAddr },
    /// The data connection through pinhole `id` has ended.
    Closed { id: PinholeId },
    /// Another session of the same client named this passive pinhole in a
    /// PORT to a second server (FXP): the servers now connect directly and
    /// the pinhole is withdrawn.
    TakenOver { id: PinholeId },
}

/// The session a pinhole belongs to: where its events go.
#[derive(Clone)]
pub struct Owner {
    pub events: mpsc::Sender<PlaneEvent>,
    pub info: Arc<SessionInfo>,
    /// The session's data timeouts (from the configuration it started with).
    pub timeouts: DataTimeouts,
    /// The caps its pinholes and data connections are counted against.
    pub caps: DataCaps,
    /// The session's data TLS (a terminated FTPS session): its data
    /// connections are relayed in userland, where the bytes can be
    /// decrypted and encrypted again.
    pub tls: Option<crate::tls::DataTls>,
    /// Set when its passive data connections come through a balancer
    /// with a PROXY header.
    pub proxied: Option<Arc<DataProxy>>,
}

impl Owner {
    /// Whether `request`'s connection needs TLS on either leg: then no
    /// plane may hand it to the kernel.
    pub fn needs_userland(&self, request: &PinholeRequest) -> bool {
        request.client_tls || self.tls.as_ref().is_some_and(|t| t.any())
    }
}

/// Passive data connections that arrive through a balancer: the PROXY
/// header's source is the peer the core checks; a connection from
/// elsewhere, or without a valid header, is refused and logged.
#[derive(Debug)]
pub struct DataProxy {
    pub trusted: crate::proxy_protocol::TrustedProxies,
    pub deny: crate::denylog::DenyLog,
}

impl Owner {
    /// Sends `event`; a session that has ended has no more use for it.
    pub async fn report(&self, event: PlaneEvent) {
        let _ = self.events.send(event).await;
    }

    /// Resolves when the owning session has ended (its event receiver is
    /// gone): its data connections end with it.
    pub async fn ended(&self) {
        self.events.closed().await;
    }

    /// Asks the owner's core about a connection from `peer`. A session
    /// that ended, or does not answer within `limit`, refuses.
    pub async fn ask(&self, id: PinholeId, peer: SocketAddr, limit: Duration) -> DataVerdict {
        let (tx, rx) = oneshot::channel();
        let asked = PlaneEvent::Arrived {
            id,
            peer,
            verdict: tx,
        };
        if self.events.send(asked).await.is_err() {
            return DataVerdict::Refuse;
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(verdict)) => verdict,
            _ => DataVerdict::Refuse,
        }
    }
}

/// Timeouts of the data path.
#[derive(Debug, Clone, Copy)]
pub struct DataTimeouts {
    /// How long a pinhole waits for its peer (the core's clock; the kernel
    /// plane gives its elements this plus a margin, so they cannot outlive
    /// a crashed gateway).
    pub accept: Duration,
    pub connect: Duration,
    pub idle: Duration,
}

/// The addresses a client may use to reach (and name) a pinhole: the
/// listen address; for passive pinholes also the advertised address and, in
/// transparent mode, the server's own address (EPSV clients and clients that
/// ignore the 227 address connect there, and the redirect brings them here).
pub fn apparent_addresses(
    request: &PinholeRequest,
    mode: Mode,
    advertise: Option<IpAddr>,
    server: IpAddr,
) -> Vec<IpAddr> {
    let mut apparent = vec![request.listen_ip];
    if request.mode == DataMode::Passive {
        apparent.extend(advertise);
        if mode == Mode::Transparent {
            apparent.push(server);
        }
    }
    apparent.retain(|ip| ip.is_ipv4() == request.expected_peer.is_ipv4());
    apparent.dedup();
    apparent
}

/// Why a pinhole could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("pinholes: {0}")]
    Pinholes(Full),
    #[error("data connections: {0}")]
    Connections(Full),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One data plane, shared by every session.
pub enum Plane {
    Proxy(proxy::ProxyPlane),
    #[cfg(target_os = "linux")]
    Kernel(kernel::KernelPlane),
}

impl Plane {
    pub fn name(&self) -> &'static str {
        match self {
            Plane::Proxy(_) => "proxy",
            #[cfg(target_os = "linux")]
            Plane::Kernel(_) => "kernel",
        }
    }

    /// Opens a pinhole for `request` on a free port of the range; its
    /// events go to `owner`. Returns the address the pinhole is reached at.
    pub fn open(
        &self,
        request: &PinholeRequest,
        apparent: Vec<IpAddr>,
        owner: &Owner,
    ) -> Result<SocketAddr, OpenError> {
        match self {
            Plane::Proxy(p) => p.open(request, apparent, owner),
            #[cfg(target_os = "linux")]
            Plane::Kernel(k) => k.open(request, apparent, owner),
        }
    }

    /// Withdraws pinhole `id` if it is still waiting for its peer.
    pub fn cancel(&self, id: PinholeId) {
        match self {
            Plane::Proxy(p) => p.cancel(id),
            #[cfg(target_os = "linux")]
            Plane::Kernel(k) => k.cancel(id),
        }
    }

    /// Withdraws every waiting pinhole of a session that has ended, and
    /// ends its data connections: proxy relays end by themselves when the
    /// session's event channel closes ([`Owner::ended`]); the kernel's
    /// flows are deleted from conntrack.
    pub fn release_session(&self, session: SessionId) {
        let registry = self.registry();
        for id in registry.ids_of_session(session) {
            self.cancel(id);
        }
        #[cfg(target_os = "linux")]
        if let Plane::Kernel(k) = self {
            k.end_flows(session);
        }
    }

    /// The live passive pinhole `client` would name with `target`, if any.
    /// Only the client that opened a pinhole may name it: its other
    /// sessions are how a server-to-server transfer works, anyone else is
    /// trying to steer a server onto somebody else's transfer.
    pub fn resolve(&self, target: SocketAddr, client: IpAddr) -> Option<Resolved> {
        self.registry().resolve(target, client)
    }

    /// Tells the owner of pinhole `id` that a server-to-server transfer
    /// took it over.
    pub fn take_over(&self, id: PinholeId) {
        if let Some(owner) = self.registry().owner(id) {
            self.tasks()
                .spawn(async move { owner.report(PlaneEvent::TakenOver { id }).await });
        }
    }

    /// The plane's background tasks (pinhole listeners, relays, watchers).
    pub fn tasks(&self) -> &Tasks {
        match self {
            Plane::Proxy(p) => p.tasks(),
            #[cfg(target_os = "linux")]
            Plane::Kernel(k) => k.tasks(),
        }
    }

    pub fn registry(&self) -> &Registry {
        match self {
            Plane::Proxy(p) => p.registry(),
            #[cfg(target_os = "linux")]
            Plane::Kernel(k) => k.registry(),
        }
    }
}

/// Which way a data connection's bytes are counted: `peer_in` is the peer
/// that connected to the pinhole (the client for passive, the server for
/// active). Returns (download, upload): server to client, client to server.
pub fn directions(mode: DataMode, from_peer: u64, to_peer: u64) -> (u64, u64) {
    match mode {
        DataMode::Passive => (to_peer, from_peer),
        DataMode::Active => (from_peer, to_peer),
    }
}

pub fn mode_label(mode: DataMode) -> &'static str {
    match mode {
        DataMode::Active => "active",
        DataMode::Passive => "passive",
    }
}

/// Why a data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data.plane = \"kernel\" needs Linux (nftables and conntrack)")]
    NotLinux,
    #[cfg(target_os = "linux")]
    #[error("data.plane = \"kernel\"")]
    Kernel(#[from] kernel::KernelError),
}

/// Starts the data plane the configuration names; its background tasks
/// run in `tasks`.
pub async fn start(data: &crate::config::Data, tasks: Tasks) -> Result<Plane, StartError> {
    match data.plane {
        crate::config::Plane::Proxy => Ok(Plane::Proxy(proxy::ProxyPlane::new(data.ports, tasks))),
        #[cfg(target_os = "linux")]
        crate::config::Plane::Kernel => Ok(Plane::Kernel(
            kernel::KernelPlane::start(data, tasks).await?,
        )),
        #[cfg(not(target_os = "linux"))]
        crate::config::Plane::Kernel => Err(StartError::NotLinux),
    }
}
