//! One control session: a `select!` loop that feeds the protocol core with
//! bytes, timer expiries and pinhole news, and carries out what it asks.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::Mode;
use crate::denylog::{DenyLog, SessionInfo};
use crate::metrics as m;
use crate::pinhole::{DataTimeouts, PinholePool, PinholeTask, PinholeUpdate};
use crate::proto::{
    CloseReason, DataMode, Denial, DenyReason, Endpoints, Event, PinholeClose, PinholeId, Session,
    SessionConfig, Side,
};

const READ_BUFFER: usize = 16 * 1024;
/// A peer that does not take our bytes for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// A refused connection gets this long to take its 421.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every session shares.
pub struct Shared {
    pub pool: Arc<PinholePool>,
    pub deny: DenyLog,
}

/// The per-session settings taken from the configuration at accept time.
#[derive(Clone)]
pub struct SessionSettings {
    pub core: Arc<SessionConfig>,
    pub mode: Mode,
    pub advertise: Option<IpAddr>,
    pub connect_timeout: Duration,
    pub data: DataTimeouts,
}

/// Connects to `upstream` and runs the session until either side closes,
/// the core closes it, or `shutdown` turns true.
pub async fn serve(
    shared: Arc<Shared>,
    settings: SessionSettings,
    id: u64,
    mut client: TcpStream,
    upstream: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let client_addr = client.peer_addr();
    let client_local = client.local_addr();
    let (Ok(client_addr), Ok(client_local)) = (client_addr, client_local) else {
        return;
    };
    let info = SessionInfo {
        id,
        mode: settings.mode,
        client: client_addr,
        server: Some(upstream),
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
    let mut run = Running {
        session: Session::new(settings.core.clone(), ep, Instant::now().into_std()),
        shared,
        settings,
        info,
        pinholes: HashMap::new(),
        updates: mpsc::channel(64),
        last_close: None,
    };
    let outcome = run.drive(client, server, &mut shutdown).await;
    for key in run.pinholes.values() {
        run.shared.pool.cancel(*key);
    }
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
    deny.record(info, &denial, None);
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

struct Running {
    shared: Arc<Shared>,
    settings: SessionSettings,
    info: Arc<SessionInfo>,
    session: Session,
    /// This session's pinholes by id, with their pool keys.
    pinholes: HashMap<PinholeId, u64>,
    updates: (mpsc::Sender<PinholeUpdate>, mpsc::Receiver<PinholeUpdate>),
    last_close: Option<CloseReason>,
}

impl Running {
    async fn drive(
        &mut self,
        mut client: TcpStream,
        mut server: TcpStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> &'static str {
        let mut cbuf = vec![0u8; READ_BUFFER];
        let mut sbuf = vec![0u8; READ_BUFFER];
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
                r = client.read(&mut cbuf), if client_rd => self.input(Side::Client, r, &cbuf),
                r = server.read(&mut sbuf), if server_rd => self.input(Side::Server, r, &sbuf),
                Some(update) = self.updates.1.recv() => self.pinhole_update(update),
                () = sleep_until_opt(deadline) => {
                    self.session.handle_timeout(Instant::now().into_std());
                }
                _ = shutdown.changed() => {
                    let _ = write_timeout(
                        &mut client,
                        b"421 Service shutting down: closing control connection.\r\n",
                    )
                    .await;
                    break "shutdown";
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

    fn input(&mut self, from: Side, read: io::Result<usize>, buf: &[u8]) {
        let now = Instant::now().into_std();
        match read {
            Ok(0) | Err(_) => self.session.handle_eof(from, now),
            Ok(n) => self.session.handle_input(from, &buf[..n], now),
        }
    }

    fn pinhole_update(&mut self, update: PinholeUpdate) {
        let now = Instant::now().into_std();
        match update {
            PinholeUpdate::Connected(id) => self.session.handle_pinhole_connected(id, now),
            PinholeUpdate::Closed(id) => {
                self.pinholes.remove(&id);
                self.session.handle_pinhole_closed(id, now);
            }
        }
    }

    async fn flush(&mut self, client: &mut TcpStream, server: &mut TcpStream) -> io::Result<()> {
        let to_server = self.session.take_transmit(Side::Server);
        if !to_server.is_empty() {
            write_timeout(server, &to_server).await?;
        }
        let to_client = self.session.take_transmit(Side::Client);
        if !to_client.is_empty() {
            write_timeout(client, &to_client).await?;
        }
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
                    if let Some(key) = self.pinholes.remove(&id) {
                        self.shared.pool.cancel(key);
                    }
                }
                Event::Resolve { id, target } => {
                    let found = self.shared.pool.resolve(target);
                    self.session.handle_resolved(id, found, now);
                }
                Event::TakeOverPinhole(foreign) => self.shared.pool.cancel(foreign.0),
                Event::Deny(denial) => self.shared.deny.record(&self.info, &denial, None),
                Event::Rewrite { kind, .. } => m::rewrite(kind.as_str()),
                Event::LoggedIn => {
                    tracing::debug!(session = self.info.id, "logged in");
                }
                Event::Close(reason) => self.last_close = Some(reason),
            }
        }
    }

    fn open_pinhole(&mut self, request: crate::proto::PinholeRequest) {
        let now = Instant::now().into_std();
        let ep = *self.session.endpoints();
        // How a client may name this pinhole in a PORT to another server.
        let mut apparent = vec![request.listen_ip];
        if request.mode == DataMode::Passive {
            apparent.extend(ep.advertise);
            if self.settings.mode == Mode::Transparent {
                apparent.push(ep.server.ip());
            }
        }
        match self.shared.pool.open(&request, apparent) {
            Ok(opened) => {
                let addr = opened.addr;
                self.pinholes.insert(request.id, opened.key);
                let task = PinholeTask {
                    pool: Arc::clone(&self.shared.pool),
                    opened,
                    request: request.clone(),
                    timeouts: self.settings.data,
                    updates: self.updates.0.clone(),
                    deny: self.shared.deny.clone(),
                    info: Arc::clone(&self.info),
                };
                tokio::spawn(task.run());
                self.session.handle_pinhole_opened(request.id, addr, now);
            }
            Err(e) => {
                tracing::warn!(session = self.info.id, listen = %request.listen_ip, "cannot open pinhole: {e}");
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
