//! The daemon's lifecycle: start, reload (SIGHUP), drain (SIGTERM/SIGINT).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::control::Shared;
use crate::dataplane;
use crate::denylog::DenyLog;
use crate::localaddrs::LocalAddrs;
use crate::metrics as m;
use crate::server::{self, Gateway};
use crate::tasks::Tasks;

/// After the grace period: how long sessions get to take their 421 and
/// end, and then the background tasks and the deny-log writer to finish.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

static RECORDER: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// The process-wide Prometheus recorder, installed by the first caller
/// (several gateways in one process, as in tests, share it).
pub fn recorder() -> anyhow::Result<PrometheusHandle> {
    let mut slot = RECORDER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let handle = crate::admin::install_recorder()?;
    *slot = Some(handle.clone());
    Ok(handle)
}

/// A started gateway.
pub struct Running {
    /// The bound control listeners: (listener index, address).
    pub listeners: Vec<(usize, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub deny: DenyLog,
    config: watch::Sender<Arc<Config>>,
    gateway: Arc<Gateway>,
    stop_accepting: watch::Sender<bool>,
    /// The accept loops; they end when `stop_accepting` turns true.
    accepting: JoinSet<()>,
    stop_sessions: watch::Sender<bool>,
    sessions: Arc<Mutex<JoinSet<()>>>,
    /// The admin listener and the data plane's tasks.
    tasks: Tasks,
    /// The deny-log writer; it ends when the last `DenyLog` handle drops.
    writer: tokio::task::JoinHandle<()>,
    ready: Arc<AtomicBool>,
}

/// Binds everything the configuration names and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let (deny, writer) = DenyLog::start(&cfg.deny_log).context("cannot open the deny log")?;
    let handle = recorder()?;
    let ready = Arc::new(AtomicBool::new(false));
    // Dropped on an error below, the set aborts what it started.
    let tasks = Tasks::new();
    let admin = match cfg.admin {
        Some(addr) => {
            let l = server::bind(addr).context("admin listener")?;
            let bound = l.local_addr()?;
            tracing::info!(addr = %bound, "admin listening (/metrics, /healthz, /readyz)");
            tasks.spawn(crate::admin::serve(
                l,
                handle,
                Arc::clone(&ready),
                tasks.stopping(),
            ));
            Some(bound)
        }
        None => None,
    };
    let mut bound = Vec::new();
    for (i, listener) in cfg.listeners.iter().enumerate() {
        for addr in &listener.bind {
            let l = server::bind(*addr)?;
            bound.push((i, l.local_addr()?, l));
        }
    }
    // check-config compared the configured addresses; a listener on port 0
    // is only known now.
    let addrs: Vec<SocketAddr> = bound.iter().map(|(_, a, _)| *a).collect();
    for (i, listener) in cfg.listeners.iter().enumerate() {
        if let Some(up) = listener
            .upstream
            .filter(|up| crate::config::is_own_listener(*up, &addrs))
        {
            anyhow::bail!(
                "`listener[{i}].upstream` = \"{up}\" is the gateway's own listener: it would relay to itself"
            );
        }
    }
    let shared = Arc::new(Shared {
        plane: dataplane::start(&cfg.data, tasks.clone()).await?,
        deny: deny.clone(),
        local: LocalAddrs::new(),
        passthrough: dataplane::passthrough::Grants::new(),
    });
    let cfg = Arc::new(cfg);
    let (config_tx, config_rx) = watch::channel(Arc::clone(&cfg));
    let gateway = Gateway::new(shared, config_rx);
    let (stop_accepting, stop_rx) = watch::channel(false);
    let (stop_sessions, sessions_rx) = watch::channel(false);
    let sessions = Arc::new(Mutex::new(JoinSet::new()));
    let mut listeners = Vec::new();
    let mut accepting = JoinSet::new();
    for (i, addr, l) in bound {
        tracing::info!(%addr, mode = cfg.listeners[i].mode.as_str(), "listening");
        listeners.push((i, addr));
        accepting.spawn(Arc::clone(&gateway).accept_loop(
            i,
            l,
            stop_rx.clone(),
            sessions_rx.clone(),
            Arc::clone(&sessions),
        ));
    }
    ready.store(true, Ordering::Relaxed);
    Ok(Running {
        listeners,
        admin,
        deny,
        config: config_tx,
        gateway,
        stop_accepting,
        accepting,
        stop_sessions,
        sessions,
        tasks,
        writer,
        ready,
    })
}

impl Running {
    /// Applies a new validated configuration to new sessions. Listener
    /// addresses and the data port range need a restart; a change there is
    /// reported and the rest still applied.
    pub fn reload(&self, new: Config) -> Vec<String> {
        let old = self.config.borrow().clone();
        let mut notes = Vec::new();
        let binds = |c: &Config| -> Vec<_> {
            c.listeners
                .iter()
                .map(|l| (l.mode, l.bind.clone()))
                .collect()
        };
        if binds(&old) != binds(&new) {
            notes.push("listener changes need a restart; kept the old listeners".to_string());
        }
        if old.data.ports != new.data.ports {
            notes.push("data.ports changes need a restart; kept the old range".to_string());
        }
        let _ = self.config.send(Arc::new(new));
        notes
    }

    pub fn active_sessions(&self) -> usize {
        self.gateway.active_sessions()
    }

    /// The first step of a drain: `/readyz` answers 503 from now on while
    /// the listeners keep accepting, so a balancer that checks it stops
    /// sending sessions here before [`Running::shutdown`] closes them.
    pub fn unready(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Drains: stops accepting, awaits the sessions for up to `grace`,
    /// then tells the rest to close (421) and awaits their ends, then the
    /// background tasks; last the deny-log writer, once every handle to it
    /// is gone, so every queued line and summary is written. Each step ends
    /// when its work has ended; the waits after `grace` share a bound of
    /// [`CLOSE_TIMEOUT`] (what is left then is aborted).
    pub async fn shutdown(mut self, grace: Duration) {
        use tokio::time::{Instant, timeout_at};
        self.ready.store(false, Ordering::Relaxed);
        self.stop_accepting.send_replace(true);
        // The accept loops end at once; after them no session is added.
        while self.accepting.join_next().await.is_some() {}
        let mut sessions =
            std::mem::take(&mut *self.sessions.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + grace;
        while let Ok(Some(ended)) = timeout_at(deadline, sessions.join_next()).await {
            server::report_session_end(ended);
        }
        let left = sessions.len();
        if left > 0 {
            tracing::info!(sessions = left, "grace period over: closing sessions");
        }
        self.stop_sessions.send_replace(true);
        let closing = Instant::now() + CLOSE_TIMEOUT;
        while let Ok(Some(ended)) = timeout_at(closing, sessions.join_next()).await {
            server::report_session_end(ended);
        }
        if !sessions.is_empty() {
            tracing::warn!(
                sessions = sessions.len(),
                "sessions did not close in time: aborted"
            );
            sessions.abort_all();
            while sessions.join_next().await.is_some() {}
        }
        let aborted = self.tasks.shutdown(closing).await;
        if aborted > 0 {
            tracing::warn!(
                tasks = aborted,
                "background tasks did not end in time: aborted"
            );
        }
        // The last handles to the deny log: the writer now sees its queue
        // close, writes what is left and ends.
        let Running {
            deny,
            gateway,
            writer,
            ..
        } = self;
        drop(deny);
        drop(gateway);
        if timeout_at(closing + CLOSE_TIMEOUT, writer).await.is_err() {
            tracing::error!("deny log: the writer did not finish in time");
        }
    }
}

/// `ftpgate run`: starts, then handles signals until told to stop.
pub async fn run(path: PathBuf) -> anyhow::Result<()> {
    let cfg = load(&path)?;
    let grace = cfg.limits.shutdown_grace;
    let drain = cfg.limits.drain_delay;
    // Handlers first: a signal that arrives once "listening" is logged must
    // drain the gateway, not kill it with the default action.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    raise_fd_limit();
    warn_ephemeral_overlap(cfg.data.ports);
    let running = start(cfg).await?;
    let (mut grace, mut drain) = (grace, drain);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                running.deny.reopen().await;
                match load(&path) {
                    Ok(new) => {
                        grace = new.limits.shutdown_grace;
                        drain = new.limits.drain_delay;
                        for note in running.reload(new) {
                            tracing::warn!("reload: {note}");
                        }
                        m::config_reload("success");
                        tracing::info!("configuration reloaded; new sessions use it");
                    }
                    Err(e) => {
                        m::config_reload("failure");
                        tracing::error!("reload failed, keeping the old configuration:\n{e:#}");
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    running.unready();
    if !drain.is_zero() {
        tracing::info!(
            sessions = running.active_sessions(),
            ?drain,
            "draining: /readyz answers 503, still accepting"
        );
        // A second signal cuts the delay short.
        tokio::select! {
            () = tokio::time::sleep(drain) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    tracing::info!(
        sessions = running.active_sessions(),
        ?grace,
        "shutting down"
    );
    running.shutdown(grace).await;
    Ok(())
}

/// The kernel hands out local ports for outgoing connections (ftpgate's own
/// upstream connections among them) from net.ipv4.ip_local_port_range; a
/// data port taken that way cannot hold a pinhole, and the kernel plane's
/// fall-through listener cannot start on it. Says so when the data range
/// overlaps that range without being reserved.
fn warn_ephemeral_overlap((low, high): (u16, u16)) {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"));
    let (Ok(range), Ok(reserved)) = (read("ip_local_port_range"), read("ip_local_reserved_ports"))
    else {
        return;
    };
    if let Some(n) = unreserved_ephemeral((low, high), &range, &reserved) {
        tracing::warn!(
            "{n} of the data ports {low}-{high} are in net.ipv4.ip_local_port_range ({}) and not reserved: \
             outgoing connections can take them; set net.ipv4.ip_local_reserved_ports={low}-{high}",
            range.split_whitespace().collect::<Vec<_>>().join("-")
        );
    }
}

/// How many ports of `data` the kernel may hand out for outgoing
/// connections, given the sysctl texts of ip_local_port_range ("32768
/// 60999") and ip_local_reserved_ports ("50000-50999,8080"); None if none.
fn unreserved_ephemeral((low, high): (u16, u16), range: &str, reserved: &str) -> Option<usize> {
    let mut bounds = range
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok());
    let (from, to) = (bounds.next()?, bounds.next()?);
    let reserved: Vec<(u32, u32)> = reserved
        .trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| match p.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => p.trim().parse().ok().map(|a| (a, a)),
        })
        .collect();
    let n = (u32::from(low)..=u32::from(high))
        .filter(|p| (from..=to).contains(p))
        .filter(|p| !reserved.iter().any(|(a, b)| (*a..=*b).contains(p)))
        .count();
    (n > 0).then_some(n)
}

/// Raises the soft limit on open files to the hard limit. Every session
/// holds two sockets and every data connection two more: a daemon started
/// from a shell (soft limit 1024) would die of EMFILE at a few hundred
/// sessions although the hard limit (systemd: 65536 in the shipped unit;
/// often 524288) allows far more.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            let before = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            before == limit.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::info!(open_files = limit.rlim_cur, "open-file limit");
    } else {
        tracing::warn!(
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_ports_in_the_ephemeral_range_are_found_unless_reserved() {
        use super::unreserved_ephemeral as u;
        assert_eq!(u((50000, 50999), "32768\t60999\n", "\n"), Some(1000));
        assert_eq!(u((50000, 50999), "32768 60999", "50000-50999\n"), None);
        assert_eq!(
            u((50000, 50999), "32768 60999", "8080,50000-50499"),
            Some(500)
        );
        assert_eq!(u((20000, 20999), "32768 60999", ""), None);
        assert_eq!(u((60900, 61099), "32768 60999", "60950"), Some(99));
    }
}
