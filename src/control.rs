//! One control session: a `select!` loop that feeds the protocol core with
//! bytes, timer expiries and pinhole news, and carries out what it asks.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{DataCaps, Mode};
use crate::dataplane::{
    DataProxy, DataTimeouts, OpenError, Owner, Plane, PlaneEvent, apparent_addresses,
};
use crate::denylog::{DenyLog, SessionInfo};
use crate::localaddrs::LocalAddrs;
use crate::metrics as m;
use crate::proto::{
    Chunk, CloseReason, Denial, DenyReason, Endpoints, Event, PinholeClose, PinholeRequest,
    Resolution, Session, SessionConfig, SessionId, Side, Transmit,
};
use crate::proxy_protocol::TrustedProxies;
use crate::tls::{self as ftls, DataTls, ListenerTls, UpstreamTls};

mod ftps;

use ftps::{Ctl, Got, upstream_prelude};

const READ_BUFFER: usize = 16 * 1024;

thread_local! {
    /// One read buffer per runtime thread, not two per session: an idle
    /// session then holds no buffer at all (its cost is its core state and
    /// its sockets). Borrowed only inside a synchronous section, so a task
    /// moving between threads never holds it across an await.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_BUFFER].into_boxed_slice());
}
/// A peer that does not take our bytes for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A refused connection gets this long to take its 421.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Plane events queued for one session before the plane waits.
const PLANE_EVENTS: usize = 64;

/// What every session shares.
pub struct Shared {
    pub plane: Plane,
    pub deny: DenyLog,
    /// The gateway's own addresses (never data targets).
    pub local: LocalAddrs,
    /// Live TLS passthrough grants (transparent mode).
    pub passthrough: Arc<crate::dataplane::passthrough::Grants>,
}

/// The per-session settings taken from the configuration at accept time.
#[derive(Clone)]
pub struct SessionSettings {
    pub core: Arc<SessionConfig>,
    pub mode: Mode,
    pub advertise: Option<IpAddr>,
    /// Passive data connections carry a PROXY header from these sources
    /// (`[data] proxy_protocol`, a session from a PROXY listener).
    pub data_proxy: Option<TrustedProxies>,
    pub connect_timeout: Duration,
    pub data: DataTimeouts,
    pub data_caps: DataCaps,
    /// The listener's client-facing TLS (reverse mode with a certificate).
    pub client_tls: Option<Arc<ListenerTls>>,
    /// TLS toward the upstream server.
    pub upstream_tls: Option<Arc<UpstreamTls>>,
}

/// Connects to `info.server` and runs the session until either side
/// closes, the core closes it, or `shutdown` turns true.
pub async fn serve(
    shared: Arc<Shared>,
    settings: SessionSettings,
    info: SessionInfo,
    client: TcpStream,
    mut shutdown: watch::Receiver<bool>,
) {
    let (Some(upstream), Ok(client_local)) = (info.server, client.local_addr()) else {
        return;
    };
    let (id, client_addr) = (info.id, info.client);
    // Urgent data stays in the stream (RFC 6093 section 6 recommends it):
    // the classic clients send the IAC of the Synch before ABOR as urgent
    // data (RFC 959 section 4.1.3, RFC 854), and without SO_OOBINLINE the
    // kernel takes that byte out of the stream. Set before anything is
    // read, as the kernel decides where an urgent byte goes on arrival.
    if let Err(e) = SockRef::from(&client).set_out_of_band_inline(true) {
        tracing::debug!(session = id, "SO_OOBINLINE: {e}");
    }
    let _ = client.set_nodelay(true);
    // Implicit FTPS: the connection starts with the handshake.
    let mut client = match &settings.client_tls {
        // Boxed, like every TLS and passthrough step below: an async fn's
        // state is as large as its largest await, and a plain idle session
        // should not carry a handshake's worth of it (2.4 KiB each).
        Some(tls) if tls.implicit => {
            match Box::pin(ftls::bounded(tls.acceptor.accept(client))).await {
                Ok(s) => {
                    m::tls_handshake("client", "ok");
                    Ctl::Tls(Box::new(s.into()))
                }
                Err(e) => {
                    m::tls_handshake("client", "failed");
                    let mut denial = Denial::new(DenyReason::TlsHandshakeFailed, Side::Client);
                    denial.argument = Some(e.to_string());
                    shared.deny.record(&info, &denial);
                    m::session_refused(info.mode, denial.reason.as_str());
                    return;
                }
            }
        }
        _ => Ctl::Plain(client),
    };
    let began = std::time::Instant::now();
    // The control connection leaves from the address routing picks; data
    // connections toward the server later leave from that same address.
    let connected = connect_any(upstream, settings.connect_timeout).await;
    let server = match connected {
        Ok(s) => {
            m::upstream_connect(began.elapsed(), true);
            s
        }
        Err(e) => {
            m::upstream_connect(began.elapsed(), false);
            tracing::warn!(session = id, %upstream, "upstream unreachable: {e}");
            let denial =
                Denial::new(DenyReason::UpstreamUnreachable, Side::Server).target(upstream);
            let reply = "421 Service not available: cannot reach the server.";
            return refuse_ctl(&shared.deny, &mut client, &info, denial, reply).await;
        }
    };
    let Ok(server_local) = server.local_addr() else {
        return;
    };
    // The upstream TLS leg is set up before the session starts: the
    // client's AUTH/PBSZ/PROT are the gateway's to answer.
    let (server, greeting, connector) = match &settings.upstream_tls {
        None => (Ctl::Plain(server), Vec::new(), None),
        Some(up) => {
            let connector = up.for_session();
            match Box::pin(upstream_prelude(server, up, &connector)).await {
                Ok((server, greeting)) => {
                    m::tls_handshake("server", "ok");
                    (server, greeting, Some((connector, up.name.clone())))
                }
                Err(failure) => {
                    m::tls_handshake("server", "failed");
                    tracing::warn!(session = id, %upstream, "upstream TLS: {}", failure.detail);
                    let mut denial = Denial::new(DenyReason::TlsUpstreamVerifyFailed, Side::Server)
                        .target(upstream);
                    denial.argument = Some(failure.detail);
                    return refuse_ctl(&shared.deny, &mut client, &info, denial, failure.reply)
                        .await;
                }
            }
        }
    };
    let data_tls = (settings.client_tls.is_some() || connector.is_some()).then(|| DataTls {
        acceptor: settings.client_tls.as_ref().map(|t| t.acceptor.clone()),
        upstream: connector,
        deny: shared.deny.clone(),
    });
    let info = Arc::new(info);
    m::session_started(settings.mode);
    tracing::debug!(session = id, client = %client_addr, %upstream, "session started");

    let ep = Endpoints {
        client: client_addr,
        client_local,
        server: upstream,
        server_local,
        advertise: settings.advertise,
    };
    let (events_tx, events_rx) = mpsc::channel(PLANE_EVENTS);
    let mut run = Running {
        session: Session::new(
            settings.core.clone(),
            ep,
            SessionId(id),
            Instant::now().into_std(),
        ),
        owner: Owner {
            events: events_tx,
            info: Arc::clone(&info),
            timeouts: settings.data,
            caps: settings.data_caps,
            tls: data_tls,
            proxied: settings.data_proxy.clone().map(|trusted| {
                Arc::new(DataProxy {
                    trusted,
                    deny: shared.deny.clone(),
                })
            }),
        },
        _pinholes: SessionPinholes {
            shared: Arc::clone(&shared),
            session: SessionId(id),
        },
        shared,
        settings,
        info,
        events: events_rx,
        last_close: None,
        start_tls: false,
        passthrough: None,
        tls_state: "plain",
    };
    if client.is_tls() || server.is_tls() {
        run.tls_state = "terminated";
    }
    if !greeting.is_empty() {
        run.session
            .handle_input(Side::Server, &greeting, Instant::now().into_std());
    }
    let outcome = run.drive(client, server, &mut shutdown).await;
    m::tls_session(run.tls_state);
    m::session_ended(run.settings.mode, outcome);
    tracing::debug!(session = id, outcome, "session ended");
}

/// Refuses a control connection before any session runs on it: one deny
/// line, one refused-session count, the reply, then the connection closes.
pub async fn refuse_connection(
    deny: &DenyLog,
    stream: &mut TcpStream,
    info: &SessionInfo,
    mut denial: Denial,
    reply: &str,
) {
    denial.reply = Some(reply.to_string());
    deny.record(info, &denial);
    m::session_refused(info.mode, denial.reason.as_str());
    let line = format!("{reply}\r\n");
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Refuses on a control connection that may already speak TLS.
async fn refuse_ctl(
    deny: &DenyLog,
    stream: &mut Ctl,
    info: &SessionInfo,
    mut denial: Denial,
    reply: &str,
) {
    if let Ctl::Plain(tcp) = stream {
        return refuse_connection(deny, tcp, info, denial, reply).await;
    }
    denial.reply = Some(reply.to_string());
    deny.record(info, &denial);
    m::session_refused(info.mode, denial.reason.as_str());
    let line = format!("{reply}\r\n");
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(line.as_bytes())).await;
    stream.shutdown().await;
}

async fn connect_any(to: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    tokio::time::timeout(limit, TcpStream::connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn write_timeout(stream: &mut Ctl, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer does not read"))?
}

/// Writes what the core produced for one peer, in order, each byte it
/// marked urgent with MSG_OOB (the Synch in front of ABOR). TLS has no
/// urgent data: there the byte goes in the stream like the rest.
async fn send(stream: &mut Ctl, out: &Transmit) -> io::Result<()> {
    if out.urgent.is_empty() || stream.is_tls() {
        if !out.is_empty() {
            write_timeout(stream, &out.bytes).await?;
        }
        return Ok(());
    }
    for chunk in out.chunks() {
        match (chunk, &mut *stream) {
            (Chunk::Stream(bytes), _) => write_timeout(stream, bytes).await?,
            (Chunk::Urgent(byte), Ctl::Plain(tcp)) => send_urgent(tcp, byte).await?,
            (Chunk::Urgent(byte), _) => write_timeout(stream, &[byte]).await?,
        }
    }
    Ok(())
}

/// Sends one byte as TCP urgent data, after everything written before it
/// (tokio has no call for MSG_OOB; socket2 makes it on the same socket).
/// The kernel then sends the urgent pointer just past that byte: on the
/// Synch's DM (RFC 854).
async fn send_urgent(stream: &TcpStream, byte: u8) -> io::Result<()> {
    let send = async {
        loop {
            stream.writable().await?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                SockRef::from(stream).send_out_of_band(&[byte])
            });
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(WRITE_TIMEOUT, send)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer does not read"))?
}

/// Withdraws a session's waiting pinholes when it ends, however it ends
/// (a panicking session included).
struct SessionPinholes {
    shared: Arc<Shared>,
    session: SessionId,
}

impl Drop for SessionPinholes {
    fn drop(&mut self) {
        self.shared.plane.release_session(self.session);
    }
}

struct Running {
    shared: Arc<Shared>,
    settings: SessionSettings,
    info: Arc<SessionInfo>,
    session: Session,
    /// Where the plane sends news of this session's pinholes.
    owner: Owner,
    events: mpsc::Receiver<PlaneEvent>,
    _pinholes: SessionPinholes,
    last_close: Option<CloseReason>,
    /// The core asked for the client handshake (its 234 is queued).
    start_tls: bool,
    /// The server accepted AUTH under a passthrough rule.
    passthrough: Option<(IpAddr, (u16, u16))>,
    /// For the sessions-by-TLS-state counter.
    tls_state: &'static str,
}

impl Running {
    async fn drive(
        &mut self,
        mut client: Ctl,
        mut server: Ctl,
        shutdown: &mut watch::Receiver<bool>,
    ) -> &'static str {
        // TLS streams are read into buffers of their own (a plain one
        // borrows the thread's buffer, see READ_BUF): only TLS sessions
        // pay for them.
        let mut client_buf = Vec::new();
        let mut server_buf = Vec::new();
        let outcome = loop {
            self.process_events();
            if let Err(e) = self.flush(&mut client, &mut server).await {
                tracing::debug!(session = self.info.id, "write failed: {e}");
                break "write_failed";
            }
            if self.session.is_closed() {
                break self.close_reason();
            }
            if std::mem::take(&mut self.start_tls) {
                client = Box::pin(self.client_handshake(client)).await;
                continue;
            }
            if let Some((to, ports)) = self.passthrough.take() {
                let (c, s) = (
                    std::mem::replace(&mut client, Ctl::Gone),
                    std::mem::replace(&mut server, Ctl::Gone),
                );
                break Box::pin(self.opaque(c, s, to, ports, shutdown)).await;
            }
            for (stream, buf) in [(&client, &mut client_buf), (&server, &mut server_buf)] {
                if stream.is_tls() && buf.is_empty() {
                    buf.resize(READ_BUFFER, 0);
                }
            }
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            let (client_rd, server_rd) = (
                self.session.wants_input(Side::Client),
                self.session.wants_input(Side::Server),
            );
            tokio::select! {
                r = client.wait(&mut client_buf), if client_rd => {
                    self.input(Side::Client, r, &client, &client_buf)
                }
                r = server.wait(&mut server_buf), if server_rd => {
                    self.input(Side::Server, r, &server, &server_buf)
                }
                Some(event) = self.events.recv() => self.plane_event(event),
                () = sleep_until_opt(deadline) => {
                    self.session.handle_timeout(Instant::now().into_std());
                }
                // The core writes the 421 where it cannot land inside a
                // relayed reply; the loop flushes it and ends as the session
                // closes (outcome "shutdown").
                _ = shutdown.changed() => {
                    self.session.handle_shutdown(Instant::now().into_std());
                }
            }
        };
        client.shutdown().await;
        server.shutdown().await;
        outcome
    }

    fn close_reason(&mut self) -> &'static str {
        self.last_close.map_or("closed", CloseReason::as_str)
    }

    /// The TLS handshake on the client connection after the core's 234
    /// (RFC 4217 section 4).
    async fn client_handshake(&mut self, client: Ctl) -> Ctl {
        let now = || Instant::now().into_std();
        let (Ctl::Plain(tcp), Some(tls)) = (client, self.settings.client_tls.clone()) else {
            self.session
                .handle_tls_failed("no plain connection to upgrade", now());
            return Ctl::Gone;
        };
        match ftls::bounded(tls.acceptor.accept(tcp)).await {
            Ok(s) => {
                m::tls_handshake("client", "ok");
                self.tls_state = "terminated";
                self.session.handle_tls_established(now());
                Ctl::Tls(Box::new(s.into()))
            }
            Err(e) => {
                m::tls_handshake("client", "failed");
                tracing::debug!(session = self.info.id, "client TLS handshake: {e}");
                self.session.handle_tls_failed(&e.to_string(), now());
                self.process_events();
                Ctl::Gone
            }
        }
    }

    /// Passthrough: the server accepted the client's AUTH under a rule.
    /// From here the control connection is relayed as it is (neither side
    /// can be read any more), and the client may reach the server's
    /// passive range until it ends.
    async fn opaque(
        &mut self,
        client: Ctl,
        server: Ctl,
        to: IpAddr,
        ports: (u16, u16),
        shutdown: &mut watch::Receiver<bool>,
    ) -> &'static str {
        m::tls_passthrough();
        self.tls_state = "passthrough";
        let (Ctl::Plain(client), Ctl::Plain(server)) = (client, server) else {
            return "closed";
        };
        let grant = self.shared.passthrough.grant(
            self.session.endpoints().client.ip(),
            to,
            ports,
            self.settings.core.max_pinholes,
            self.owner.clone(),
        );
        // The control connection's idle clock stops while a data
        // connection of this grant is relayed (see `idle_ended`).
        use crate::dataplane::passthrough::{LastRead, Watched, idle_ended};
        let last = LastRead::new();
        let idle = self.settings.core.idle_timeout;
        let ended = async {
            tokio::select! {
                _ = shutdown.changed() => {}
                () = idle_ended(&last, &grant, idle) => {}
            }
        };
        let client = Watched {
            inner: client,
            last: last.clone(),
        };
        let server = Watched {
            inner: server,
            last: last.clone(),
        };
        // The relay's own idle clock would count only control bytes.
        let never = Duration::from_secs(365 * 24 * 3600);
        let (_, result) = crate::relay::relay_streams(client, server, never, ended).await;
        drop(grant);
        match result {
            Ok(()) => "passthrough_closed",
            Err(_) => "passthrough_ended",
        }
    }

    /// `from` is readable (or failed): reads what is there into the
    /// thread's buffer and feeds it to the core. A TLS stream has read
    /// already, into `tls_buf`.
    fn input(&mut self, from: Side, got: Got, stream: &Ctl, tls_buf: &[u8]) {
        let now = Instant::now().into_std();
        let ready = match got {
            Got::Read(Ok(0)) | Got::Read(Err(_)) => return self.session.handle_eof(from, now),
            Got::Read(Ok(n)) => return self.session.handle_input(from, &tls_buf[..n], now),
            Got::Ready(r) => r,
        };
        let Ctl::Plain(stream) = stream else {
            return;
        };
        if ready.is_err() {
            return self.session.handle_eof(from, now);
        }
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            match stream.try_read(&mut buf) {
                Ok(0) => self.session.handle_eof(from, now),
                Ok(n) => self.session.handle_input(from, &buf[..n], now),
                // A spurious wake-up: readiness is cleared, wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.session.handle_eof(from, now),
            }
        });
    }

    /// News from the data plane. The core decides; the plane carries out.
    fn plane_event(&mut self, event: PlaneEvent) {
        let now = Instant::now().into_std();
        match event {
            PlaneEvent::Arrived { id, peer, verdict } => {
                let decided = self.session.handle_data_connection(id, peer, now);
                let _ = verdict.send(decided);
            }
            PlaneEvent::Established { id, peer } => {
                // The kernel matched the expected peer already; the core
                // still has the last word (the pinhole may have expired in
                // the same instant), but the flow exists either way.
                let decided = self.session.handle_data_connection(id, peer, now);
                tracing::debug!(session = self.info.id, ?id, %peer, ?decided, "kernel data connection");
            }
            PlaneEvent::Closed { id } => self.session.handle_pinhole_closed(id, now),
            PlaneEvent::TakenOver { id } => self.session.handle_pinhole_taken_over(id, now),
        }
    }

    async fn flush(&mut self, client: &mut Ctl, server: &mut Ctl) -> io::Result<()> {
        let to_server = self.session.take_transmit(Side::Server);
        send(server, &to_server).await?;
        let to_client = self.session.take_transmit(Side::Client);
        send(client, &to_client).await?;
        Ok(())
    }

    /// Carries out what the core asked for. Answers to the core may queue
    /// more events, so this loops until the core is quiet.
    fn process_events(&mut self) {
        for (class, n) in self.session.take_command_counts() {
            m::commands(class.as_str(), n);
        }
        while let Some(event) = self.session.poll_event() {
            let now = Instant::now().into_std();
            match event {
                Event::OpenPinhole(request) => self.open_pinhole(request),
                Event::ClosePinhole { id, cause } => {
                    if cause == PinholeClose::Expired {
                        m::pinhole_expired();
                    }
                    self.shared.plane.cancel(id);
                }
                Event::Resolve { id, target } => {
                    let answer = self.resolve(target);
                    self.session.handle_resolved(id, answer, now);
                }
                Event::TakeOverPinhole(id) => self.shared.plane.take_over(id),
                Event::Deny(denial) => self.shared.deny.record(&self.info, &denial),
                Event::Rewrite { kind, .. } => m::rewrite(kind.as_str()),
                Event::LoggedIn => {
                    tracing::debug!(session = self.info.id, "logged in");
                }
                Event::Close(reason) => self.last_close = Some(reason),
                Event::StartTls => self.start_tls = true,
                Event::Passthrough { server, data_ports } => {
                    self.passthrough = Some((server, data_ports));
                }
            }
        }
    }

    /// What a PORT/EPRT target that is not the client stands for: a live
    /// pinhole this client opened (only the opener may name one), else one
    /// of the gateway's own addresses (never a data target, whatever the
    /// FXP rules), else a third host.
    fn resolve(&self, target: SocketAddr) -> Resolution {
        let client = self.session.endpoints().client.ip();
        match self.shared.plane.resolve(target, client) {
            Some(found) => Resolution::Pinhole(found),
            None if self.shared.local.contains(target.ip()) => Resolution::GatewayAddress,
            None => Resolution::Elsewhere,
        }
    }

    fn open_pinhole(&mut self, request: PinholeRequest) {
        let now = Instant::now().into_std();
        let ep = *self.session.endpoints();
        let apparent =
            apparent_addresses(&request, self.settings.mode, ep.advertise, ep.server.ip());
        match self.shared.plane.open(&request, apparent, &self.owner) {
            Ok(addr) => self.session.handle_pinhole_opened(request.id, addr, now),
            Err(OpenError::Io(e)) => {
                tracing::warn!(session = self.info.id, listen = %request.listen_ip, "cannot open pinhole: {e}");
                self.session.handle_pinhole_failed(request.id, now);
            }
            Err(capped) => {
                // A cap, not a fault: the core's 425 and deny line say it.
                tracing::debug!(session = self.info.id, "no pinhole: {capped}");
                self.session.handle_pinhole_failed(request.id, now);
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
