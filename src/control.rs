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
}

/// Connects to `info.server` and runs the session until either side
/// closes, the core closes it, or `shutdown` turns true.
pub async fn serve(
    shared: Arc<Shared>,
    settings: SessionSettings,
    info: SessionInfo,
    mut client: TcpStream,
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
            return refuse_connection(&shared.deny, &mut client, &info, denial, reply).await;
        }
    };
    let _ = client.set_nodelay(true);
    let Ok(server_local) = server.local_addr() else {
        return;
    };
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
    };
    let outcome = run.drive(client, server, &mut shutdown).await;
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

async fn connect_any(to: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    tokio::time::timeout(limit, TcpStream::connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn write_timeout(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer does not read"))?
}

/// Writes what the core produced for one peer, in order, each byte it
/// marked urgent with MSG_OOB (the Synch in front of ABOR).
async fn send(stream: &mut TcpStream, out: &Transmit) -> io::Result<()> {
    if out.urgent.is_empty() {
        if !out.is_empty() {
            write_timeout(stream, &out.bytes).await?;
        }
        return Ok(());
    }
    for chunk in out.chunks() {
        match chunk {
            Chunk::Stream(bytes) => write_timeout(stream, bytes).await?,
            Chunk::Urgent(byte) => send_urgent(stream, byte).await?,
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
}

impl Running {
    async fn drive(
        &mut self,
        mut client: TcpStream,
        mut server: TcpStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> &'static str {
        let outcome = loop {
            self.process_events();
            if let Err(e) = self.flush(&mut client, &mut server).await {
                tracing::debug!(session = self.info.id, "write failed: {e}");
                break "write_failed";
            }
            if self.session.is_closed() {
                break self.close_reason();
            }
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            let (client_rd, server_rd) = (
                self.session.wants_input(Side::Client),
                self.session.wants_input(Side::Server),
            );
            tokio::select! {
                r = client.readable(), if client_rd => self.input(Side::Client, r, &client),
                r = server.readable(), if server_rd => self.input(Side::Server, r, &server),
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
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
        outcome
    }

    fn close_reason(&mut self) -> &'static str {
        self.last_close.map_or("closed", CloseReason::as_str)
    }

    /// `from` is readable (or failed): reads what is there into the
    /// thread's buffer and feeds it to the core.
    fn input(&mut self, from: Side, ready: io::Result<()>, stream: &TcpStream) {
        let now = Instant::now().into_std();
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

    async fn flush(&mut self, client: &mut TcpStream, server: &mut TcpStream) -> io::Result<()> {
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
