//! The deny log: one JSON object per line, written by a dedicated task.
//!
//! [`DenyLog::record`] is the one place a refusal becomes visible: it writes
//! the deny-log line, increments `ftpgate_denials_total{reason}` and emits a
//! trace event, all with the same reason string. The queue to the writer is
//! bounded; when it is full a line is dropped, counted in
//! `ftpgate_deny_log_dropped_total`, and the writer reports the number of
//! dropped lines in the log itself as soon as it can.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{DenyLogConfig, Mode};
use crate::metrics as m;
use crate::proto::Denial;

/// Who a deny-log line is about.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: u64,
    pub mode: Mode,
    pub client: SocketAddr,
    pub server: Option<SocketAddr>,
}

#[derive(Debug)]
enum Msg {
    Line(String),
    Reopen,
}

/// A cheap, cloneable handle to the deny-log writer.
#[derive(Debug, Clone)]
pub struct DenyLog {
    tx: mpsc::Sender<Msg>,
    dropped: Arc<AtomicU64>,
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
    /// Starts the writer task. Fails if the log file cannot be opened.
    pub fn start(cfg: &DenyLogConfig) -> io::Result<(DenyLog, tokio::task::JoinHandle<()>)> {
        let sink = Sink::open(cfg.path.clone())?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(writer(rx, sink, dropped.clone()));
        Ok((DenyLog { tx, dropped }, task))
    }

    /// Records one refusal. `peer` is the host that actually connected, when
    /// that is not the expected one.
    pub fn record(&self, info: &SessionInfo, denial: &Denial) {
        let reason = denial.reason.as_str();
        m::denial(reason, info.mode);
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
    File(PathBuf, io::BufWriter<std::fs::File>),
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
                Ok(Sink::File(path, io::BufWriter::new(file)))
            }
        }
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.write_all(b"\n")
            }
            Sink::File(_, w) => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().flush(),
            Sink::File(_, w) => w.flush(),
        }
    }
}

async fn writer(mut rx: mpsc::Receiver<Msg>, mut sink: Sink, dropped: Arc<AtomicU64>) {
    while let Some(msg) = rx.recv().await {
        let mut next = Some(msg);
        // Write everything queued, then flush once.
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => {
                    let lost = dropped.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let notice = serde_json::json!({
                            "ts": timestamp(),
                            "reason": "deny_log_dropped",
                            "dropped": lost,
                        });
                        report(sink.write_line(&notice.to_string()));
                    }
                    report(sink.write_line(&line));
                }
                Msg::Reopen => {
                    report(sink.flush());
                    if let Sink::File(path, _) = &sink {
                        match Sink::open(Some(path.clone())) {
                            Ok(new) => sink = new,
                            Err(e) => tracing::error!("deny log: cannot reopen: {e}"),
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        report(sink.flush());
    }
    report(sink.flush());
}

fn report(result: io::Result<()>) {
    if let Err(e) = result {
        tracing::error!("deny log: write failed: {e}");
        m::deny_log_dropped();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DenyReason, Side};

    fn info() -> SessionInfo {
        SessionInfo {
            id: 1,
            mode: Mode::Reverse,
            client: "192.0.2.10:40000".parse().unwrap(),
            server: Some("198.51.100.20:21".parse().unwrap()),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_lines_and_says_how_many_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deny.jsonl");
        let cfg = DenyLogConfig {
            path: Some(path.clone()),
            queue: 2,
        };
        let (log, _writer) = DenyLog::start(&cfg).unwrap();
        // The writer cannot run before this task yields: the queue of 2
        // fills and the other 8 lines are dropped.
        for _ in 0..10 {
            log.record(&info(), &Denial::new(DenyReason::Bounce, Side::Client));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["reason"], "deny_log_dropped");
        assert_eq!(lines[0]["dropped"], 8);
        assert_eq!(lines[1]["reason"], "bounce");
        assert_eq!(lines[2]["reason"], "bounce");
    }
}
