//! Metric names and the few functions that update them.
//!
//! Labels are low-cardinality enums (reason, kind, mode, direction, outcome);
//! never addresses or ports. Names follow the Prometheus conventions: a unit
//! suffix, `_total` for counters.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::config::Mode;

pub const DENIALS: &str = "ftpgate_denials_total";
pub const DENY_LOG_DROPPED: &str = "ftpgate_deny_log_dropped_total";
pub const DENY_LOG_WRITE_ERRORS: &str = "ftpgate_deny_log_write_errors_total";
pub const DENY_LOG_SUPPRESSED: &str = "ftpgate_deny_log_suppressed_total";
pub const SESSIONS_ACTIVE: &str = "ftpgate_sessions_active";
pub const SESSIONS: &str = "ftpgate_sessions_total";
pub const REWRITES: &str = "ftpgate_rewrites_total";
pub const PINHOLES_OPEN: &str = "ftpgate_pinholes_open";
pub const PINHOLES_OPENED: &str = "ftpgate_pinholes_opened_total";
pub const PINHOLES_EXPIRED: &str = "ftpgate_pinholes_expired_total";
pub const PINHOLES_REFUSED: &str = "ftpgate_pinhole_connections_refused_total";
pub const PORT_POOL_FREE: &str = "ftpgate_port_pool_free";
pub const DATA_CONNECTIONS: &str = "ftpgate_data_connections_total";
pub const DATA_CONNECTIONS_ACTIVE: &str = "ftpgate_data_connections_active";
pub const DATA_BYTES: &str = "ftpgate_data_bytes_total";
pub const PINHOLE_WAIT: &str = "ftpgate_pinhole_wait_seconds";
pub const UPSTREAM_CONNECT: &str = "ftpgate_upstream_connect_seconds";
pub const DATA_TRANSFER: &str = "ftpgate_data_transfer_seconds";
pub const UPSTREAM_FAILURES: &str = "ftpgate_upstream_connect_failures_total";
pub const CONFIG_RELOADS: &str = "ftpgate_config_reloads_total";
pub const COMMANDS: &str = "ftpgate_commands_total";
pub const ACCEPT_FAILURES: &str = "ftpgate_accept_failures_total";
pub const TLS_HANDSHAKES: &str = "ftpgate_tls_handshakes_total";
pub const TLS_SESSIONS: &str = "ftpgate_tls_sessions_total";
pub const TLS_PASSTHROUGH: &str = "ftpgate_tls_passthrough_sessions_total";
pub const CONNTRACK_OVERRUNS: &str = "ftpgate_conntrack_event_overruns_total";
pub const KERNEL_FLOWS_RETRIED: &str = "ftpgate_kernel_flows_retried_total";

/// Histogram buckets, in seconds, for waits from milliseconds to minutes.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for data transfers, up to hours.
pub const TRANSFER_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

pub fn denial(reason: &'static str, mode: Mode) {
    denial_n(reason, mode, 1);
}

/// `n` refusals of one reason (a summary line stands for several).
pub fn denial_n(reason: &'static str, mode: Mode, n: u64) {
    counter!(DENIALS, "reason" => reason, "mode" => mode.as_str()).increment(n);
}

pub fn deny_log_dropped() {
    deny_log_dropped_n(1);
}

pub fn deny_log_dropped_n(n: u64) {
    counter!(DENY_LOG_DROPPED).increment(n);
}

/// A write to the deny log failed (disk full, file gone, ...).
pub fn deny_log_write_error() {
    counter!(DENY_LOG_WRITE_ERRORS).increment(1);
}

/// A refusal counted toward its source's summary line instead of a line
/// of its own.
/// `n` refusals that got no deny-log line of their own (summarised).
pub fn deny_log_suppressed(reason: &'static str, n: u64) {
    counter!(DENY_LOG_SUPPRESSED, "reason" => reason).increment(n);
}

/// A TLS handshake the gateway took part in: `side` is "client" or
/// "server" (the control connection), "client_data" or "server_data";
/// `result` "ok" or "failed".
pub fn tls_handshake(side: &'static str, result: &'static str) {
    counter!(TLS_HANDSHAKES, "side" => side, "result" => result).increment(1);
}

/// A session ended in TLS state `state`: "plain", "terminated" (TLS
/// toward the client, the server or both), "passthrough".
pub fn tls_session(state: &'static str) {
    counter!(TLS_SESSIONS, "state" => state).increment(1);
}

/// A session went opaque under a passthrough rule.
pub fn tls_passthrough() {
    counter!(TLS_PASSTHROUGH).increment(1);
}

pub fn session_started(mode: Mode) {
    gauge!(SESSIONS_ACTIVE, "mode" => mode.as_str()).increment(1.0);
}

pub fn session_ended(mode: Mode, outcome: &'static str) {
    gauge!(SESSIONS_ACTIVE, "mode" => mode.as_str()).decrement(1.0);
    counter!(SESSIONS, "mode" => mode.as_str(), "outcome" => outcome).increment(1);
}

/// A session refused before it started (limits, loop, upstream down).
pub fn session_refused(mode: Mode, outcome: &'static str) {
    counter!(SESSIONS, "mode" => mode.as_str(), "outcome" => outcome).increment(1);
}

pub fn rewrite(kind: &'static str) {
    counter!(REWRITES, "kind" => kind).increment(1);
}

pub fn commands(class: &'static str, n: u64) {
    counter!(COMMANDS, "class" => class).increment(n);
}

pub fn upstream_connect(took: Duration, ok: bool) {
    histogram!(UPSTREAM_CONNECT).record(took.as_secs_f64());
    if !ok {
        counter!(UPSTREAM_FAILURES).increment(1);
    }
}

pub fn pinhole_opened(mode: &'static str) {
    counter!(PINHOLES_OPENED, "mode" => mode).increment(1);
    gauge!(PINHOLES_OPEN).increment(1.0);
}

pub fn pinhole_closed() {
    gauge!(PINHOLES_OPEN).decrement(1.0);
}

pub fn pinhole_expired() {
    counter!(PINHOLES_EXPIRED).increment(1);
}

/// A listener's accept failed (`listener`: control, pinhole, fall_through).
pub fn accept_failed(listener: &'static str) {
    counter!(ACCEPT_FAILURES, "listener" => listener).increment(1);
}

pub fn conntrack_overrun() {
    counter!(CONNTRACK_OVERRUNS).increment(1);
}

pub fn kernel_flow_retried() {
    counter!(KERNEL_FLOWS_RETRIED).increment(1);
}

pub fn pinhole_refused() {
    counter!(PINHOLES_REFUSED).increment(1);
}

pub fn pinhole_wait(took: Duration) {
    histogram!(PINHOLE_WAIT).record(took.as_secs_f64());
}

pub fn port_pool_free(free: usize) {
    gauge!(PORT_POOL_FREE).set(free as f64);
}

/// One finished data connection. `direction` is "download" (server to
/// client) or "upload"; `mode` is "active" or "passive".
pub fn data_connection(
    plane: &'static str,
    mode: &'static str,
    to_client: u64,
    to_server: u64,
    took: Duration,
) {
    counter!(DATA_CONNECTIONS, "mode" => mode, "plane" => plane).increment(1);
    counter!(DATA_BYTES, "direction" => "download", "mode" => mode, "plane" => plane)
        .increment(to_client);
    counter!(DATA_BYTES, "direction" => "upload", "mode" => mode, "plane" => plane)
        .increment(to_server);
    histogram!(DATA_TRANSFER, "mode" => mode, "plane" => plane).record(took.as_secs_f64());
}

pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// Counts a data connection as active while it lives.
pub struct DataConnectionActive(());

impl DataConnectionActive {
    pub fn start() -> Self {
        gauge!(DATA_CONNECTIONS_ACTIVE).increment(1.0);
        DataConnectionActive(())
    }
}

impl Drop for DataConnectionActive {
    fn drop(&mut self) {
        gauge!(DATA_CONNECTIONS_ACTIVE).decrement(1.0);
    }
}
