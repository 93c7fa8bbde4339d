//! The admin listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, the
//! request head bounded in size and time, so a scraper or a stray client can
//! never hold resources.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics as m;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder with real histogram buckets.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(m::DATA_TRANSFER.into()),
            m::TRANSFER_BUCKETS,
        )?
        .set_buckets(m::WAIT_BUCKETS)?
        .install_recorder()?;
    // Upkeep drains histogram data on a timer so memory stays flat even when
    // nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Serves admin requests on `listener` until `stop` resolves; then the
/// listener closes and requests still being answered are dropped (each is
/// bounded by [`REQUEST_TIMEOUT`] anyway).
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    ready: Arc<AtomicBool>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut requests = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut stop => return,
        };
        while requests.try_join_next().is_some() {}
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        let ready = Arc::clone(&ready);
        requests.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &handle, &ready)).await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    ready: &AtomicBool,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            )
            .await;
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" && method != b"HEAD" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
    }
    match path {
        b"/metrics" => {
            let body = handle.render();
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body).await
        }
        b"/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n").await,
        b"/readyz" if ready.load(Ordering::Relaxed) => {
            respond(&mut stream, "200 OK", "text/plain", "ready\n").await
        }
        b"/readyz" => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "not ready\n",
            )
            .await
        }
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
