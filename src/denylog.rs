//! The deny log: one JSON object per line, written by a dedicated task.
//!
//! [`DenyLog::record`] is the one place a refusal becomes visible: it writes
//! the deny-log line, increments `ftpgate_denials_total{reason}` and emits a
//! trace event, all with the same reason string.
//!
//! One source must not be able to blind the log for the others, so lines are
//! aggregated per source before they are queued: of each (source, reason)
//! the first `deny_log.burst` lines of every `deny_log.interval` are written;
//! the rest are counted (`ftpgate_deny_log_suppressed_total{reason}`, and
//! still in `ftpgate_denials_total`) and summarised at the end of the
//! interval as one line `{"reason":...,"suppressed":N,"client":SOURCE,...}`.
//! A source is the client address (for a PASV theft the thief's), an IPv6
//! client per `limits.ipv6_client_prefix` ([`ClientKey`]). The trace event
//! follows the line: a suppressed refusal is not traced one by one, its
//! summary is. At most [`MAX_TRACKED`] (source, reason) pairs are tracked
//! per interval; beyond, lines are queued unaggregated.
//!
//! The queue to the writer is bounded; when it is full a line is dropped,
//! counted in `ftpgate_deny_log_dropped_total`, and the writer reports the
//! number of dropped lines in the log itself as soon as it can. Summaries
//! are written by the writer itself and never dropped.
//!
//! A write that fails (disk full, file system gone read-only) loses its
//! batch of lines and nothing else: the file is cut back to where the batch
//! began, so no half line is left; the lost lines are counted as dropped
//! and reported in the log once writing works again. The failure is said
//! once on standard error, and counted in
//! `ftpgate_deny_log_write_errors_total` on every failed write; the writer
//! keeps trying with every new batch and says when writing works again.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::clients::ClientKey;
use crate::config::{DenyLogConfig, Mode};
use crate::metrics as m;
use crate::proto::{Denial, DenyReason};

/// (source, reason) pairs tracked per interval; a flood from more sources
/// than this is written unaggregated and meets the queue's bound.
pub const MAX_TRACKED: usize = 16 * 1024;

/// Who a deny-log line is about.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub mode: Mode,
    pub client: SocketAddr,
    pub server: Option<SocketAddr>,
    /// The client as per-client limits and the log's aggregation count it.
    pub source: ClientKey,
}

#[derive(Debug)]
enum Msg {
    Line(String),
    Reopen,
}

/// A cheap, cloneable handle to the deny-log writer. The writer ends, after
/// writing every queued line and the pending summaries, when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub struct DenyLog {
    tx: mpsc::Sender<Msg>,
    dropped: Arc<AtomicU64>,
    window: Arc<Mutex<Window>>,
}

/// What a (source, reason) pair did in the current interval.
#[derive(Debug, Default)]
struct Tally {
    written: u32,
    suppressed: u64,
}

/// The aggregation of the current interval. Shared by every `record` (which
/// decides) and the writer (which rolls it over and writes the summaries).
#[derive(Debug)]
struct Window {
    burst: u32,
    tallies: HashMap<(ClientKey, DenyReason), Tally>,
}

impl Window {
    /// Whether the next line of `key` is written (else it is suppressed).
    /// `weight` is how many refusals the line stands for: a session's own
    /// summary line stands for all it summarised.
    fn admit(&mut self, key: (ClientKey, DenyReason), weight: u64) -> bool {
        if let Some(t) = self.tallies.get_mut(&key) {
            if t.written < self.burst {
                t.written += 1;
                return true;
            }
            t.suppressed += weight;
            return false;
        }
        if self.tallies.len() < MAX_TRACKED {
            self.tallies.insert(
                key,
                Tally {
                    written: 1,
                    suppressed: 0,
                },
            );
        }
        true
    }

    /// Ends the interval: the pairs that had lines suppressed, and a fresh
    /// start for everyone.
    fn roll(&mut self) -> Vec<((ClientKey, DenyReason), u64)> {
        let mut out: Vec<_> = self
            .tallies
            .drain()
            .filter(|(_, t)| t.suppressed > 0)
            .map(|(k, t)| (k, t.suppressed))
            .collect();
        out.sort();
        out
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    reason: &'static str,
    session: u64,
    mode: &'static str,
    client: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<SocketAddr>,
    side: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    verb: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    argument: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_peer: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply: Option<&'a str>,
    /// A summary: this many more refusals of `reason` were counted by the
    /// core instead of logged one by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    suppressed: Option<u64>,
}

pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl DenyLog {
    /// Starts the writer task. Fails if the log file cannot be opened. The
    /// task ends when every [`DenyLog`] handle is gone.
    pub fn start(cfg: &DenyLogConfig) -> io::Result<(DenyLog, tokio::task::JoinHandle<()>)> {
        let sink = Sink::open(cfg.path.clone())?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let window = Arc::new(Mutex::new(Window {
            burst: cfg.burst,
            tallies: HashMap::new(),
        }));
        let writer = Writer {
            sink,
            dropped: Arc::clone(&dropped),
            window: Arc::clone(&window),
            interval: cfg.interval,
            batch: Batch::default(),
            failing: false,
        };
        let task = tokio::spawn(writer.run(rx));
        Ok((
            DenyLog {
                tx,
                dropped,
                window,
            },
            task,
        ))
    }

    /// Records one refusal: a line, or a count toward its source's summary.
    pub fn record(&self, info: &SessionInfo, denial: &Denial) {
        let reason = denial.reason.as_str();
        // A session's summary line stands for the refusals it counted.
        let weight = denial.suppressed.unwrap_or(1).max(1);
        m::denial_n(reason, info.mode, weight);
        // The thief, not the session it tried to rob, is the source of a
        // PASV theft.
        let source = denial.peer.map_or(info.source, |p| {
            ClientKey::of(p.ip(), info.source.ipv6_prefix())
        });
        if let Some(n) = denial.suppressed {
            // Summarised by the session: none of these got a line of its own.
            m::deny_log_suppressed(reason, n);
        }
        let admitted = lock(&self.window).admit((source, denial.reason), weight);
        if !admitted {
            if denial.suppressed.is_none() {
                m::deny_log_suppressed(reason, 1);
            }
            return;
        }
        tracing::info!(
            reason,
            session = info.id,
            client = %info.client,
            verb = denial.verb.as_deref(),
            target = denial.target.map(tracing::field::display),
            rule = denial.rule.as_deref(),
            "denied"
        );
        let line = Line {
            ts: timestamp(),
            reason,
            session: info.id,
            mode: info.mode.as_str(),
            client: info.client,
            server: info.server,
            side: denial.side.as_str(),
            verb: denial.verb.as_deref(),
            argument: denial.argument.as_deref(),
            target: denial.target,
            expected_peer: denial.expected_peer,
            peer: denial.peer,
            rule: denial.rule.as_deref(),
            reply: denial.reply.as_deref(),
            suppressed: denial.suppressed,
        };
        let Ok(json) = serde_json::to_string(&line) else {
            return;
        };
        if self.tx.try_send(Msg::Line(json)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            m::deny_log_dropped();
        }
    }

    /// Reopens the log file (after logrotate moved it).
    pub async fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen).await;
    }
}

enum Sink {
    Stdout,
    File(PathBuf, std::fs::File),
}

impl Sink {
    fn open(path: Option<PathBuf>) -> io::Result<Sink> {
        match path {
            None => Ok(Sink::Stdout),
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                Ok(Sink::File(path, file))
            }
        }
    }

    /// Writes whole lines, or none of them: a write that fails half-way
    /// (ENOSPC after a short write) is cut back off the file, so the log
    /// never holds a half line that would end up glued to the next one.
    fn write_lines(&mut self, text: &str) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()
            }
            Sink::File(_, file) => {
                let before = file.metadata()?.len();
                file.write_all(text.as_bytes()).inspect_err(|_| {
                    // Shrinking needs no space; if even that fails the
                    // next batch still starts on a line of its own only
                    // by luck, and the error already says so.
                    let _ = file.set_len(before);
                })
            }
        }
    }
}

fn lock(window: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    // A tally is plain counters: still right after a holder panicked.
    window.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    ts: String,
    reason: &'static str,
    suppressed: u64,
    /// The source: an address, or an IPv6 prefix.
    client: String,
    /// The interval the count covers.
    window: &'a str,
}

struct Writer {
    sink: Sink,
    dropped: Arc<AtomicU64>,
    window: Arc<Mutex<Window>>,
    interval: Duration,
    /// Lines gathered for one write.
    batch: Batch,
    /// The last write failed (said once on standard error).
    failing: bool,
}

/// The lines of one write, and what is lost if it fails.
#[derive(Default)]
struct Batch {
    text: String,
    /// Deny lines in `text` (each counted as dropped if the write fails).
    lines: u64,
    /// Earlier losses a `deny_log_dropped` line in `text` reports (owed
    /// again if the write fails).
    reported: u64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let start = tokio::time::Instant::now() + self.interval;
        let mut tick = tokio::time::interval_at(start, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => self.write_queued(msg, &mut rx),
                    None => break,
                },
                _ = tick.tick() => {
                    // Lines of the ending interval first, then its summary.
                    if let Ok(msg) = rx.try_recv() {
                        self.write_queued(msg, &mut rx);
                    }
                    self.summarise();
                    self.commit();
                }
            }
        }
        // Every sender is gone: nothing more can come. What was queued has
        // been written; the last summaries follow.
        self.summarise();
        self.commit();
    }

    /// Writes `first` and everything queued behind it in one write.
    fn write_queued(&mut self, first: Msg, rx: &mut mpsc::Receiver<Msg>) {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    let lost = self.dropped.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let notice = serde_json::json!({
                            "ts": timestamp(),
                            "reason": "deny_log_dropped",
                            "dropped": lost,
                        });
                        let _ = writeln!(self.batch.text, "{notice}");
                        self.batch.reported += lost;
                    }
                    self.push(&line);
                }
                Msg::Reopen => {
                    self.commit();
                    if let Sink::File(path, _) = &self.sink {
                        match Sink::open(Some(path.clone())) {
                            Ok(new) => self.sink = new,
                            Err(e) => tracing::error!("deny log: cannot reopen: {e}"),
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        self.commit();
    }

    fn push(&mut self, line: &str) {
        self.batch.text.push_str(line);
        self.batch.text.push('\n');
        self.batch.lines += 1;
    }

    /// Writes the batch. On failure its lines are lost and counted (the
    /// next line written reports them), and the failure is said once.
    fn commit(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        if batch.text.is_empty() {
            return;
        }
        match self.sink.write_lines(&batch.text) {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!("deny log: writing again");
                }
            }
            Err(e) => {
                m::deny_log_write_error();
                m::deny_log_dropped_n(batch.lines);
                self.dropped
                    .fetch_add(batch.lines + batch.reported, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        "deny log: write failed: {e}; its lines are dropped and counted \
                         (ftpgate_deny_log_dropped_total) until a write succeeds again"
                    );
                }
            }
        }
    }

    /// Ends the aggregation interval: one summary line per (source, reason)
    /// that had lines suppressed.
    fn summarise(&mut self) {
        let rolled = lock(&self.window).roll();
        if rolled.is_empty() {
            return;
        }
        let window = humantime::format_duration(self.interval).to_string();
        for ((source, reason), suppressed) in rolled {
            let reason = reason.as_str();
            tracing::info!(reason, client = %source, suppressed, "denials suppressed");
            let line = SummaryLine {
                ts: timestamp(),
                reason,
                suppressed,
                client: source.to_string(),
                window: &window,
            };
            if let Ok(json) = serde_json::to_string(&line) {
                self.push(&json);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Side;

    fn info_from(client: &str) -> SessionInfo {
        let client: SocketAddr = client.parse().unwrap();
        SessionInfo {
            id: 1,
            mode: Mode::Reverse,
            client,
            server: Some("198.51.100.20:21".parse().unwrap()),
            source: ClientKey::of(client.ip(), 64),
        }
    }

    fn info() -> SessionInfo {
        info_from("192.0.2.10:40000")
    }

    fn config(path: &std::path::Path, queue: usize, burst: u32) -> DenyLogConfig {
        DenyLogConfig {
            path: Some(path.to_path_buf()),
            queue,
            burst,
            interval: Duration::from_secs(1),
        }
    }

    fn read_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_lines_and_says_how_many_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        let (log, _writer) = DenyLog::start(&config(&path, 2, 100)).unwrap();
        // The writer cannot run before this task yields: the queue of 2
        // fills and the other 8 lines are dropped.
        for _ in 0..10 {
            log.record(&info(), &Denial::new(DenyReason::Bounce, Side::Client));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["reason"], "deny_log_dropped");
        assert_eq!(lines[0]["dropped"], 8);
        assert_eq!(lines[1]["reason"], "bounce");
        assert_eq!(lines[2]["reason"], "bounce");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flooding_source_gets_its_burst_then_one_summary_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        let (log, _writer) = DenyLog::start(&config(&path, 64, 3)).unwrap();
        let flood = Denial::new(DenyReason::MalformedCommand, Side::Client);
        for _ in 0..1000 {
            log.record(&info(), &flood);
        }
        // Another reason of the same source, and another source, are
        // counted on their own.
        let bounce = Denial::new(DenyReason::Bounce, Side::Client);
        log.record(&info(), &bounce);
        log.record(&info_from("192.0.2.11:40000"), &flood);
        // One IPv6 client is its /64, whichever address it uses.
        for i in 1..=5 {
            let v6 = format!("[2001:db8:1:2::{i}]:40000");
            log.record(&info_from(&v6), &flood);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lines = read_lines(&path);
        let count = |reason: &str, client: &str| {
            lines
                .iter()
                .filter(|v| v["reason"] == reason && v.get("suppressed").is_none())
                .filter(|v| v["client"].as_str().unwrap().starts_with(client))
                .count()
        };
        assert_eq!(count("malformed_command", "192.0.2.10:"), 3, "{lines:?}");
        assert_eq!(count("bounce", "192.0.2.10:"), 1);
        assert_eq!(count("malformed_command", "192.0.2.11:"), 1);
        assert_eq!(count("malformed_command", "[2001:db8:1:2::"), 3);
        let summaries: Vec<_> = lines
            .iter()
            .filter(|v| v.get("suppressed").is_some())
            .collect();
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        assert_eq!(summaries[0]["reason"], "malformed_command");
        assert_eq!(summaries[0]["client"], "192.0.2.10");
        assert_eq!(summaries[0]["suppressed"], 997);
        assert_eq!(summaries[0]["window"], "1s");
        assert_eq!(summaries[1]["client"], "2001:db8:1:2::/64");
        assert_eq!(summaries[1]["suppressed"], 2);
        // A new interval: the source gets its burst again.
        log.record(&info(), &flood);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read_lines(&path).len(), lines.len() + 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn suppressed_refusals_are_not_traced_one_by_one() {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        let (log, _writer) = DenyLog::start(&config(&path, 64, 5)).unwrap();
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let flood = Denial::new(DenyReason::MalformedLine, Side::Client);
            for _ in 0..10_000 {
                log.record(&info(), &flood);
            }
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("denied").count(), 5, "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_writer_ends_when_the_last_handle_drops_with_everything_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        let mut cfg = config(&path, 64, 2);
        cfg.interval = Duration::from_secs(3600);
        let (log, writer) = DenyLog::start(&cfg).unwrap();
        let copy = log.clone();
        for _ in 0..50 {
            copy.record(&info(), &Denial::new(DenyReason::Bounce, Side::Client));
        }
        drop(log);
        drop(copy);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends")
            .unwrap();
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[2]["suppressed"], 48);
    }
}
