//! The kernel plane: nftables elements per pinhole, conntrack carries the
//! bytes (OpenBSD's ftp-proxy does the same with pf anchors).
//!
//! The static part, loaded by the operator from `ftpgate nft-rules` and
//! checked here at start, is a table `inet ftpgate` with, per family, an
//! `armed` set, a `dnat` map and a `snat` map, keyed by (expected peer,
//! address it connects to, pinhole port). For each pinhole the core decides,
//! ftpgate adds in one transaction: the armed key and the dnat translation
//! for every address the peer may connect to, and the snat source for the
//! onward leg. The prerouting rule deletes the armed key as the first
//! connection matches it, so one pinhole carries one connection; every
//! other connection to the data range falls through to ftpgate's own
//! listener on the first port of the range, where the owning core judges it
//! (PASV theft is logged with the thief's address). Elements carry a kernel
//! timeout a little longer than the core's, so nothing outlives a crash, and
//! the sets are flushed at start, so a restart starts clean.
//!
//! Conntrack events tell ftpgate what happened: a new flow with ftpgate's
//! mark is a pinhole used (its remaining elements are deleted and the owner
//! told), a destroyed one is a data connection ended, with the byte counts
//! of conntrack accounting. When the session that negotiated a flow ends,
//! the flow is deleted from conntrack: the next packet of either side finds
//! no translation, falls through to the gateway itself and is answered with
//! a reset (and the forward chain accepts only marked flows anyway).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::registry::{Entry, Found, Registry, Reservation};
use super::{OpenError, Owner, PlaneEvent, directions, mode_label, proxy};
use crate::clients::Claim;
use crate::config::Data;
use crate::metrics as m;
use crate::netfilter::conntrack::{
    self, CtError, Event as CtEvent, EventKind, EventsConfig, MarkFilter,
};
use crate::netfilter::{
    CtMark, ElemOp, Endpoint, Family, NftError, Nftables, PinholeKey, PinholeSet, SetElem,
    SnatSource,
};
use crate::proto::policy::{canonical, canonical_ip};
use crate::proto::{DataVerdict, PinholeId, PinholeRequest, SessionId, Shape};
use crate::tasks::Tasks;

/// The table the rules of `ftpgate nft-rules` create.
pub const TABLE: &str = "ftpgate";
/// Kernel elements outlive the core's pinhole timer by this much: the core
/// deletes them itself; the kernel timeout only covers a crashed gateway.
const ELEMENT_MARGIN: Duration = Duration::from_secs(5);
/// Ports found with elements already installed before an open gives up.
const MAX_TAKEN_PORTS: usize = 8;
/// IP protocol number of TCP: only TCP flows are data connections.
const TCP: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("conntrack events")]
    Conntrack(#[from] CtError),
    #[error(
        "nftables refused ftpgate: it needs CAP_NET_ADMIN (run as root or grant the capability, see deploy/systemd/kernel-plane/)"
    )]
    Permission(#[source] NftError),
    #[error("cannot start the element reaper thread: {0}")]
    Reaper(String),
    #[error("cannot bind the fall-through listener on port {port}: {source}")]
    Trap { port: u16, source: io::Error },
}

/// A data connection the kernel carries, by its original tuple.
struct Flow {
    id: PinholeId,
    owner: Owner,
    request: PinholeRequest,
    began: Instant,
    _active: m::DataConnectionActive,
    /// Its counted data-connection slot.
    _slot: Option<Claim>,
    /// Ended before it was established: its byte counts, while it waits
    /// out RETRY_WINDOW for its client's retry (see `fall_through`).
    died: Option<(u64, u64)>,
}

/// The low 16 bits of a flow's conntrack mark: the pinhole port. The high
/// 16 bits are ftpgate's tag (`data.kernel_mark`).
const PORT_BITS: u32 = 0xffff;
const TAG_MASK: u32 = 0xffff_0000;

/// The conntrack mark of the flow through the pinhole on `port`.
pub fn pinhole_mark(tag: u32, port: u16) -> u32 {
    (tag << 16) | u32::from(port)
}

/// How long a withdrawn pinhole is still recognised when conntrack reports
/// its flow late (the first connection raced its withdrawal): its flow is
/// then still accounted and ended with its session. Its port stays out of
/// use as long (or until that report), so the report cannot find the next
/// pinhole there: a pinhole withdrawn unused keeps its port this much
/// longer.
const RECENT: Duration = Duration::from_secs(2);

/// How long after a pinhole's kernel flow appeared a connection from the
/// same client socket to the same address is taken as that client's retry
/// (see `fall_through`): TCP's first SYN retransmissions come after 1 s
/// and 3 s (RFC 6298), a retry after a reset at once.
const RETRY_WINDOW: Duration = Duration::from_secs(3);

/// Pinholes withdrawn in the last [`RECENT`], by port.
type Recent = Arc<Mutex<HashMap<u16, (Found, Instant)>>>;

fn lock_recent(recent: &Recent) -> std::sync::MutexGuard<'_, HashMap<u16, (Found, Instant)>> {
    recent.lock().unwrap_or_else(|e| e.into_inner())
}

/// The flows the kernel carries for ftpgate, by original tuple.
type Flows = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), Flow>>>;

fn lock_flows(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), Flow>> {
    flows.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct KernelPlane {
    registry: Arc<Registry>,
    nft: Arc<Nftables>,
    reaper: Reaper,
    flows: Flows,
    recent: Recent,
    /// ftpgate's tag, the high 16 bits of its flows' marks.
    tag: u32,
    tasks: Tasks,
}

impl KernelPlane {
    pub async fn start(data: &Data, tasks: Tasks) -> Result<KernelPlane, KernelError> {
        let (low, high) = data.ports;
        let nft = Arc::new(Nftables::open(TABLE)?);
        nft.check_pinhole_sets().map_err(|e| match e {
            NftError::Kernel { errno, .. } if errno == libc::EPERM => KernelError::Permission(e),
            other => KernelError::Nft(other),
        })?;
        // A restart starts clean: nothing a previous run installed stays.
        let mut flush = Vec::new();
        for family in [Family::V4, Family::V6] {
            for set in PinholeSet::ALL {
                flush.push(ElemOp::flush(set.name(family)));
            }
        }
        nft.apply(&flush)?;
        prefer_destroy(&nft);
        if let Err(e) = conntrack::enable_accounting() {
            tracing::warn!(
                "kernel plane: conntrack accounting is off, data byte counts will be 0: {e}"
            );
        }
        if !ip_forwarding() {
            tracing::warn!(
                "kernel plane: IP forwarding is off (net.ipv4.ip_forward); data connections cannot pass"
            );
        }
        let tag = data.kernel_mark;
        let filter = MarkFilter {
            mark: tag << 16,
            mask: TAG_MASK,
        };
        let events = conntrack::Events::subscribe(EventsConfig {
            mark: Some(filter),
            ..EventsConfig::default()
        })?;
        let registry = Arc::new(Registry::new(low + 1, high));
        let trap4 = bind_trap(SocketAddr::from(([0, 0, 0, 0], low)))?;
        let trap6 = bind_trap(SocketAddr::from(([0u16; 8], low))).ok();
        let flows: Flows = Arc::new(Mutex::new(HashMap::new()));
        let recent: Recent = Arc::new(Mutex::new(HashMap::new()));
        let reaper = Reaper::start(Arc::clone(&registry), tag)?;
        let watcher = Watcher {
            registry: Arc::clone(&registry),
            reaper: reaper.clone(),
            flows: Arc::clone(&flows),
            recent: Arc::clone(&recent),
            tasks: tasks.clone(),
            filter,
        };
        let stopping = tasks.stopping();
        tasks.spawn(async move {
            tokio::select! {
                () = watcher.run(events) => {}
                () = stopping => {}
            }
        });
        for trap in std::iter::once(trap4).chain(trap6) {
            let serve = fall_through(
                trap,
                Arc::clone(&registry),
                reaper.clone(),
                Arc::clone(&flows),
                tasks.clone(),
            );
            let stopping = tasks.stopping();
            tasks.spawn(async move {
                tokio::select! {
                    () = serve => {}
                    () = stopping => {}
                }
            });
        }
        tracing::info!(
            table = TABLE,
            fall_through = low,
            mark = format_args!("{:#010x}/16", tag << 16),
            "kernel data plane ready"
        );
        Ok(KernelPlane {
            registry,
            nft,
            reaper,
            flows,
            recent,
            tag,
            tasks,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    pub fn open(
        &self,
        request: &PinholeRequest,
        apparent: Vec<IpAddr>,
        owner: &Owner,
    ) -> Result<SocketAddr, OpenError> {
        // Translated pinholes are carried in userland (as pinholes whose
        // legs differ in address family are).
        match request.shape {
            Shape::Relay => {}
            Shape::DialBoth { .. } => {
                return proxy::open_dial(&self.registry, &self.tasks, request, apparent, owner);
            }
            Shape::AcceptBoth { .. } => {
                return proxy::open_pair_handoff(
                    &self.registry,
                    &self.tasks,
                    request,
                    apparent,
                    owner,
                );
            }
        }
        let reservation = self.registry.reserve(owner)?;
        let timeout = owner.timeouts.accept + ELEMENT_MARGIN;
        let mut taken = 0;
        let (port, ()) = self.registry.claim(
            |port| {
                // A TLS data connection gets no elements: it falls through
                // to the listener and is relayed (and re-encrypted) in
                // userland.
                let ops = if owner.needs_userland(request) {
                    Vec::new()
                } else {
                    elements(request, &apparent, port, self.tag, Some(timeout))
                };
                match self.nft.apply(&ops) {
                    // Elements of this port that are still there (another
                    // gateway process on the same range, or a delete that
                    // failed): try another port, a few times at most, so a
                    // broken table cannot make every open walk the range.
                    Err(NftError::Kernel { errno, .. }) if errno == libc::EEXIST => {
                        taken += 1;
                        if taken > MAX_TAKEN_PORTS {
                            Err(io::Error::other(
                                "pinhole elements already exist for every port tried",
                            ))
                        } else {
                            Ok(None)
                        }
                    }
                    Ok(()) => Ok(Some(())),
                    Err(e) => Err(io::Error::other(e.to_string())),
                }
            },
            |_| Entry::new(request, apparent.clone(), owner, None, Some(reservation)),
        )?;
        Ok(SocketAddr::new(request.listen_ip, port))
    }

    pub fn cancel(&self, id: PinholeId) {
        // Its first connection may have matched just before the elements
        // went: conntrack then reports it after this, by the port in its
        // mark. Until it does (or RECENT has passed) the port is not handed
        // out again, so that report cannot find another pinhole there.
        if let Some((port, entry)) = self.reaper.withdraw(id, Some(Instant::now() + RECENT)) {
            let found = Found {
                handoff: None,
                id: entry.id,
                owner: entry.owner.clone(),
                request: entry.request.clone(),
                opened: entry.opened,
            };
            let mut recent = lock_recent(&self.recent);
            recent.retain(|_, (_, at)| at.elapsed() < RECENT);
            recent.insert(port, (found, Instant::now()));
            drop(recent);
            // No report came: forget it, and give the port back.
            let recent = Arc::clone(&self.recent);
            let registry = Arc::clone(&self.registry);
            let stopping = self.tasks.stopping();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(RECENT) => {}
                    () = stopping => return,
                }
                let mut recent = lock_recent(&recent);
                if recent.get(&port).is_some_and(|(f, _)| f.id == id) {
                    recent.remove(&port);
                }
                drop(recent);
                registry.sweep();
            });
        }
    }

    /// Deletes the conntrack flows of a session that has ended; their
    /// Destroy events then end them here as usual.
    pub fn end_flows(&self, session: SessionId) {
        let tuples: Vec<(SocketAddr, SocketAddr)> = lock_flows(&self.flows)
            .iter()
            .filter(|(_, f)| f.id.session == session)
            .map(|(t, _)| *t)
            .collect();
        for (src, dst) in tuples {
            self.reaper.end_flow(src, dst);
        }
    }
}

/// The elements of one pinhole: add them (with `timeout`) or, without one,
/// delete them. A pinhole whose two legs have different address families
/// gets none: its connection falls through to the listener, which relays it.
fn elements(
    request: &PinholeRequest,
    apparent: &[IpAddr],
    port: u16,
    tag: u32,
    timeout: Option<Duration>,
) -> Vec<ElemOp> {
    if request.shape != Shape::Relay {
        // Translated: carried in userland, never in the kernel.
        return Vec::new();
    }
    let peer = canonical_ip(request.expected_peer);
    let to = Endpoint(canonical(request.connect_to));
    let from = SnatSource(canonical_ip(request.connect_from));
    let family = Family::of(peer);
    if to.family() != family || from.family() != family {
        return Vec::new();
    }
    let mut ops = Vec::new();
    let mut put = |set: PinholeSet, key: &dyn NftKey, data: Option<&dyn NftKey>| {
        let name = set.name(family);
        ops.push(match timeout {
            Some(timeout) => {
                let mut elem = key.elem().with_timeout(timeout);
                if let Some(data) = data {
                    elem = data.data_of(elem);
                }
                ElemOp::add(name, elem)
            }
            None => key.delete(name),
        });
    };
    let mark = CtMark(pinhole_mark(tag, port));
    for local in apparent.iter().map(|a| canonical_ip(*a)) {
        let Ok(key) = PinholeKey::new(peer, local, port) else {
            continue;
        };
        put(PinholeSet::Armed, &key, None);
        put(PinholeSet::Dnat, &key, Some(&to));
        put(PinholeSet::Mark, &key, Some(&mark));
    }
    put(PinholeSet::Snat, &mark, Some(&from));
    ops
}

/// What `elements` needs of a key or a value, whatever its type.
trait NftKey {
    fn elem(&self) -> SetElem;
    fn data_of(&self, elem: SetElem) -> SetElem;
    fn delete(&self, set: String) -> ElemOp;
}

impl<T: crate::netfilter::NftValue> NftKey for T {
    fn elem(&self) -> SetElem {
        SetElem::new(self)
    }
    fn data_of(&self, elem: SetElem) -> SetElem {
        elem.with_data(self)
    }
    fn delete(&self, set: String) -> ElemOp {
        ElemOp::delete(set, self)
    }
}

/// Deletes pinhole elements in batches, off the sessions' path. An
/// nf_tables transaction that deletes set elements waits out an RCU grace
/// period before it returns (10-50 ms per transaction measured here, with
/// data flowing through the sets), while one that adds elements takes
/// microseconds: deleting each pinhole's elements on the control path held
/// a runtime thread that long per pinhole and cut the session rate to about
/// 50 per second. One thread gathers the deletes and commits them together;
/// a port is handed out again only after its elements are gone
/// ([`Registry::remove_quarantined`]).
#[derive(Clone)]
struct Reaper {
    tx: std::sync::mpsc::Sender<Reap>,
    registry: Arc<Registry>,
    tag: u32,
}

/// Work for the reaper thread.
enum Reap {
    /// A withdrawn pinhole's elements, and its quarantined port.
    Elements(Vec<ElemOp>, u16),
    /// The flow of a session that has ended, by original tuple.
    Flow(conntrack::Tuple),
}

/// How long the reaper waits for more deletes before it commits.
const REAP_GATHER: Duration = Duration::from_millis(5);

impl Reaper {
    fn start(registry: Arc<Registry>, tag: u32) -> Result<Reaper, KernelError> {
        // Its own socket: the sessions' adds never queue behind a commit
        // on the same socket lock.
        let nft = Nftables::open(TABLE)?;
        prefer_destroy(&nft);
        let mut flows = conntrack::Deleter::open()?;
        let (tx, rx) = std::sync::mpsc::channel::<Reap>();
        let released = Arc::clone(&registry);
        std::thread::Builder::new()
            .name("ftpgate-reaper".into())
            .spawn(move || reap(&nft, &mut flows, &rx, &released))
            .map_err(|e| KernelError::Reaper(e.to_string()))?;
        Ok(Reaper { tx, registry, tag })
    }

    /// Takes pinhole `id` out of the registry and queues its elements for
    /// deletion; its port returns to the pool once they are gone (and, with
    /// `flow_until`, once its flow was seen or that instant has passed).
    fn withdraw(&self, id: PinholeId, flow_until: Option<Instant>) -> Option<(u16, Entry)> {
        let (port, entry) = self.registry.remove_quarantined(id, flow_until)?;
        let ops = elements(&entry.request, &entry.apparent, port, self.tag, None);
        if ops.is_empty() {
            // Nothing in the kernel, so no flow of it can be reported.
            self.registry.flow_seen(port);
            self.registry.release(&[port]);
        } else if self.tx.send(Reap::Elements(ops, port)).is_err() {
            self.registry.release(&[port]);
        }
        Some((port, entry))
    }

    /// Ends the flow with original tuple (`src`, `dst`): its session is gone.
    fn end_flow(&self, src: SocketAddr, dst: SocketAddr) {
        let _ = self.tx.send(Reap::Flow(conntrack::Tuple {
            src,
            dst,
            proto: TCP,
        }));
    }
}

/// The reaper thread: ends when every sender is gone.
fn reap(
    nft: &Nftables,
    flows: &mut conntrack::Deleter,
    rx: &std::sync::mpsc::Receiver<Reap>,
    registry: &Registry,
) {
    while let Ok(first) = rx.recv() {
        let mut ops = Vec::new();
        let mut ports = Vec::new();
        let mut ended = Vec::new();
        let mut next = Some(first);
        while let Some(work) = next.take() {
            match work {
                Reap::Elements(more, port) => {
                    ops.extend(more);
                    ports.push(port);
                }
                Reap::Flow(tuple) => ended.push(tuple),
            }
            if ports.len() + ended.len() == 1 {
                // Gather what comes in meanwhile into one transaction.
                std::thread::sleep(REAP_GATHER);
            }
            if ops.len() + 64 < crate::netfilter::nftables::MAX_BATCH_OPS {
                next = rx.try_recv().ok();
            }
        }
        if !ops.is_empty()
            && let Err(e) = nft.apply(&ops)
        {
            // The kernel timeout removes them anyway; the ports come back
            // (an add that finds a leftover element tries another port).
            tracing::warn!("kernel plane: cannot delete pinhole elements: {e}");
        }
        registry.release(&ports);
        for tuple in ended {
            if let Err(e) = flows.delete(&tuple) {
                tracing::warn!(src = %tuple.src, dst = %tuple.dst, "kernel plane: cannot delete the flow of an ended session: {e}");
            }
        }
    }
}

/// Deletes that do not fail on absent elements, where the kernel has them.
fn prefer_destroy(nft: &Nftables) {
    let nothing = IpAddr::from([0, 0, 0, 0]);
    if let Ok(key) = PinholeKey::new(nothing, nothing, 0)
        && !nft.prefer_destroy(&PinholeSet::Armed.name(Family::V4), &key)
    {
        tracing::info!(
            "kernel plane: this kernel has no DESTROYSETELEM (Linux < 6.3): deleting a consumed element costs a retry"
        );
    }
}

fn bind_trap(addr: SocketAddr) -> Result<TcpListener, KernelError> {
    crate::sockets::bind(addr).map_err(|source| KernelError::Trap {
        port: addr.port(),
        source,
    })
}

fn ip_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

/// Follows conntrack: flows with ftpgate's mark are pinholes being used.
struct Watcher {
    registry: Arc<Registry>,
    reaper: Reaper,
    flows: Flows,
    recent: Recent,
    tasks: Tasks,
    /// ftpgate's flows: the tag in the high 16 bits of the mark.
    filter: MarkFilter,
}

impl Watcher {
    async fn run(self, mut events: conntrack::Events) {
        loop {
            match events.next().await {
                Ok(event) => self.handle(event).await,
                Err(CtError::Overrun) => {
                    m::conntrack_overrun();
                    tracing::warn!(
                        "kernel plane: conntrack events lost (receive buffer overrun); resynchronising"
                    );
                    self.resync().await;
                }
                Err(e) => {
                    tracing::error!("kernel plane: conntrack events failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn handle(&self, event: CtEvent) {
        let flow = event.flow;
        if !self.filter.matches(flow.mark) || flow.orig.proto != TCP {
            return;
        }
        let tuple = (canonical(flow.orig.src), canonical(flow.orig.dst));
        match event.kind {
            EventKind::New => self.established(tuple, flow.mark).await,
            EventKind::Destroy => {
                let bytes = |c: Option<conntrack::Counters>| c.map_or(0, |c| c.bytes);
                let counts = (bytes(flow.orig_counters), bytes(flow.reply_counters));
                let ours = {
                    let mut flows = self.lock_flows();
                    match flows.get_mut(&tuple) {
                        // Never established, and young: its client may
                        // still retry from the same socket.
                        Some(ours) if !flow.assured() && ours.began.elapsed() < RETRY_WINDOW => {
                            ours.died = Some(counts);
                            let wait = RETRY_WINDOW.saturating_sub(ours.began.elapsed());
                            drop(flows);
                            self.end_unless_retried(tuple, wait);
                            return;
                        }
                        Some(_) => flows.remove(&tuple),
                        None => None,
                    }
                };
                if let Some(ours) = ours {
                    ended(ours, counts.0, counts.1).await;
                }
            }
        }
    }

    fn lock_flows(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), Flow>> {
        lock_flows(&self.flows)
    }

    /// Ends the dead flow `tuple` after `wait` unless its client's retry
    /// took it over in the meantime.
    fn end_unless_retried(&self, tuple: (SocketAddr, SocketAddr), wait: Duration) {
        let flows = Arc::clone(&self.flows);
        let stopping = self.tasks.stopping();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stopping => {}
            }
            let dead = {
                let mut flows = lock_flows(&flows);
                match flows.get(&tuple).and_then(|f| f.died) {
                    Some(counts) => flows.remove(&tuple).map(|f| (f, counts)),
                    None => None,
                }
            };
            if let Some((flow, (from_peer, to_peer))) = dead {
                ended(flow, from_peer, to_peer).await;
            }
        });
    }

    /// A marked flow appeared: the pinhole its mark names is used (or was
    /// withdrawn just after its connection matched).
    async fn established(&self, (src, dst): (SocketAddr, SocketAddr), mark: u32) {
        let port = (mark & PORT_BITS) as u16;
        // A pinhole withdrawn before its flow was seen holds its port until
        // that flow is reported: first look there, then at the live ones.
        let withdrawn = lock_recent(&self.recent)
            .remove(&port)
            .filter(|(_, at)| at.elapsed() < RECENT)
            .map(|(found, _)| found);
        if withdrawn.is_some() {
            self.registry.flow_seen(port);
        }
        let found = withdrawn.or_else(|| self.registry.at_port(port));
        let Some(Found {
            id,
            owner,
            request,
            opened,
            ..
        }) = found
        else {
            return;
        };
        if src.ip() != request.expected_peer {
            // Cannot happen through the rules (the key is the peer); never
            // account somebody else's flow to this pinhole.
            return;
        }
        let mut slot = None;
        if let Some((_, mut entry)) = self.reaper.withdraw(id, None) {
            slot = entry.reservation.take().map(Reservation::into_connection);
        }
        m::pinhole_wait(opened.elapsed());
        let flow = Flow {
            id,
            owner: owner.clone(),
            request,
            began: Instant::now(),
            _active: m::DataConnectionActive::start(),
            _slot: slot,
            died: None,
        };
        self.lock_flows().insert((src, dst), flow);
        if owner.events.is_closed() {
            // The session ended while the flow was being set up.
            self.reaper.end_flow(src, dst);
            return;
        }
        owner
            .report(PlaneEvent::Established { id, peer: src })
            .await;
    }

    /// After lost events: flows the kernel no longer has are over (their
    /// byte counts are lost), flows it has that we missed are taken up.
    async fn resync(&self) {
        let live = match conntrack::dump(self.filter).await {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!("kernel plane: conntrack dump failed: {e}");
                return;
            }
        };
        let live: Vec<((SocketAddr, SocketAddr), u32)> = live
            .iter()
            .filter(|f| f.orig.proto == TCP)
            .map(|f| ((canonical(f.orig.src), canonical(f.orig.dst)), f.mark))
            .collect();
        let gone: Vec<Flow> = {
            let mut flows = self.lock_flows();
            let dead: Vec<_> = flows
                .keys()
                .filter(|k| !live.iter().any(|(t, _)| t == *k))
                .copied()
                .collect();
            dead.iter().filter_map(|k| flows.remove(k)).collect()
        };
        for flow in gone {
            ended(flow, 0, 0).await;
        }
        for (tuple, mark) in live {
            let known = self.lock_flows().contains_key(&tuple);
            if !known {
                self.established(tuple, mark).await;
            }
        }
    }
}

async fn ended(flow: Flow, from_peer: u64, to_peer: u64) {
    let (down, up) = directions(flow.request.mode, from_peer, to_peer);
    m::data_connection(
        "kernel",
        mode_label(flow.request.mode),
        down,
        up,
        flow.began.elapsed(),
    );
    flow.owner.report(PlaneEvent::Closed { id: flow.id }).await;
}

/// ftpgate's listener for connections to the data range that matched no
/// element: a thief, a second connection to a used pinhole, or a pinhole
/// the kernel cannot translate (its legs differ in address family). The
/// owning core judges each; the expected peer is relayed in userland.
async fn fall_through(
    listener: TcpListener,
    registry: Arc<Registry>,
    reaper: Reaper,
    flows: Flows,
    tasks: Tasks,
) {
    let mut errors = crate::server::AcceptErrors::new("fall_through");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                errors.failed(&e).await;
                continue;
            }
        };
        let peer = canonical(peer);
        let Some(original) = crate::sockets::original_dst(&stream).map(canonical) else {
            continue;
        };
        let port = original.port();
        let retry = {
            let mut flows = lock_flows(&flows);
            let fresh = flows
                .get(&(peer, original))
                .is_some_and(|f| f.began.elapsed() < RETRY_WINDOW);
            if fresh {
                flows.remove(&(peer, original))
            } else {
                None
            }
        };
        if let Some(flow) = retry {
            // The very client socket whose first SYN used this pinhole: its
            // kernel flow died before it was established, and the client
            // tried again. That happens when the server still holds the
            // same address pair in TIME_WAIT from an earlier connection
            // (the SNAT source is the gateway's for every client, and the
            // client's port is kept): the client's initial sequence number,
            // chosen for its own address pair, is then often below what the
            // server last saw, the server answers with an ACK, the client
            // resets (RFC 793 3.4) and retries. This retry is the pinhole's
            // one connection: carry it in userland, where the gateway's own
            // connection to the server gets a sequence number that server
            // accepts. Only within RETRY_WINDOW of the first SYN, and once.
            tracing::debug!(
                session = flow.owner.info.id,
                %peer,
                port,
                "kernel flow of a pinhole died before it was established; carrying the retry"
            );
            m::kernel_flow_retried();
            let Flow {
                owner,
                request,
                _slot,
                ..
            } = flow;
            tasks.spawn(async move {
                proxy::carry(stream, &request, &owner, _slot).await;
            });
            continue;
        }
        let found = registry.at_port(port);
        // A translated pinhole that dials out takes no connection in:
        // only the one the gateway made itself is its data connection.
        let found = found.filter(|f| !matches!(f.request.shape, Shape::DialBoth { .. }));
        let Some(Found {
            id,
            owner,
            request,
            handoff,
            ..
        }) = found
        else {
            // No pinhole holds this port (used, expired, never opened):
            // nobody's session to judge it, so it is counted and closed.
            m::pinhole_refused();
            tracing::debug!(%peer, port, "connection to a data port with no pinhole refused");
            continue;
        };
        let reaper = reaper.clone();
        tasks.spawn(async move {
            match owner.ask(id, peer, proxy::VERDICT_TIMEOUT).await {
                DataVerdict::Accept if handoff.is_some() => {
                    // One leg of a two-leg pinhole: its own task pairs
                    // it with the other.
                    if let Some(handoff) = handoff {
                        let _ = handoff.send((stream, peer)).await;
                    }
                }
                DataVerdict::Accept => {
                    let Some((_, mut entry)) = reaper.withdraw(id, None) else {
                        // Withdrawn in the meantime: its session has ended.
                        return;
                    };
                    let slot = entry.reservation.take().map(Reservation::into_connection);
                    proxy::carry(stream, &request, &owner, slot).await;
                }
                DataVerdict::Refuse => {
                    m::pinhole_refused();
                    drop(stream);
                }
            }
        });
    }
}

/// `ftpgate pinholes`: the kernel plane's live elements, one line each,
/// read back over netlink (what the gateway installed, as the kernel holds
/// it now).
pub fn list_pinholes() -> Result<String, NftError> {
    use std::fmt::Write;
    let nft = Nftables::open(TABLE)?;
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        for set in PinholeSet::ALL {
            let name = set.name(family);
            for elem in nft.list(&name)? {
                let key = match set {
                    PinholeSet::Snat => {
                        CtMark::from_nft_bytes(&elem.key).map(|m| format!("ct mark {:#010x}", m.0))
                    }
                    _ => PinholeKey::from_nft_bytes(&elem.key)
                        .map(|k| format!("peer {} to {}:{}", k.peer(), k.local(), k.port())),
                };
                let data = elem.data.as_deref().and_then(|d| match set {
                    PinholeSet::Dnat => Endpoint::from_nft_bytes(d).map(|e| e.0.to_string()),
                    PinholeSet::Mark => {
                        CtMark::from_nft_bytes(d).map(|m| format!("ct mark {:#010x}", m.0))
                    }
                    PinholeSet::Snat => SnatSource::from_nft_bytes(d).map(|s| s.0.to_string()),
                    PinholeSet::Armed => None,
                });
                let _ = write!(out, "{name:7} {}", key.unwrap_or_else(|| "?".into()));
                if let Some(data) = data {
                    let _ = write!(out, " -> {data}");
                }
                if let Some(left) = elem.expiration {
                    let _ = write!(out, " (expires in {:.1}s)", left.as_secs_f64());
                }
                out.push('\n');
            }
        }
    }
    Ok(out)
}
