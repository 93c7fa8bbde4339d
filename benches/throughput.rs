//! Throughput figures, each against a baseline measured in the same run:
//!
//! - data relay: bytes through `relay::relay` on loopback vs the same bytes
//!   copied directly between two loopback sockets, and the default mover
//!   (splice on Linux) vs the copy loop;
//! - control core: command lines through a `Session` (framing, parsing,
//!   FIFO, policy) vs splitting the same bytes into lines.
//!
//! `cargo bench --bench throughput` prints the figures. Under `cargo test`
//! (no `--bench` argument) it runs a tiny smoke pass only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ftpgate::proto::driver::lab_endpoints;
use ftpgate::proto::{Event, Session, SessionConfig, SessionId, Side};
use ftpgate::relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

async fn send_and_count(mut tx: TcpStream, mut rx: TcpStream, total: usize) -> Duration {
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            tx.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        tx.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = rx.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    writer.await.unwrap();
    assert_eq!(got, total);
    start.elapsed()
}

/// MB/s client -> [a | relay | b] -> server with the given mover.
async fn through_relay(mover: relay::Mover, total: usize) -> f64 {
    let (client, a) = pair().await;
    let (b, server) = pair().await;
    let task = tokio::spawn(relay::relay_with(mover, a, b, Duration::from_secs(30)));
    let elapsed = send_and_count(client, server, total).await;
    let _ = task.await;
    total as f64 / 1e6 / elapsed.as_secs_f64()
}

/// MB/s direct, through the default (splice on Linux) relay, and through
/// the copy loop.
async fn relay_figures(total: usize) -> (f64, f64, f64) {
    // Baseline: client socket straight to server socket.
    let (c, s) = pair().await;
    let direct = send_and_count(c, s, total).await;
    let direct = total as f64 / 1e6 / direct.as_secs_f64();
    let relayed = through_relay(relay::Mover::default(), total).await;
    let copied = through_relay(relay::Mover::Copy, total).await;
    (direct, relayed, copied)
}

fn control_script(commands: usize) -> (Vec<u8>, Vec<u8>) {
    let mut c = Vec::new();
    let mut s = b"220 ready\r\n331 pw\r\n230 ok\r\n".to_vec();
    c.extend_from_slice(b"USER u\r\nPASS p\r\n");
    for i in 0..commands {
        match i % 4 {
            0 => c.extend_from_slice(b"NOOP\r\n"),
            1 => c.extend_from_slice(b"CWD /pub/some/longer/directory/name\r\n"),
            2 => c.extend_from_slice(b"SIZE data.bin\r\n"),
            _ => c.extend_from_slice(b"TYPE I\r\n"),
        }
        s.extend_from_slice(b"200 ok\r\n");
    }
    (c, s)
}

fn core_figures(commands: usize) -> (f64, f64) {
    let (client, server) = control_script(commands);
    let lines = (commands + 2) as f64;
    // Baseline: split both directions into lines, nothing else.
    let start = Instant::now();
    let mut n = 0usize;
    for chunk in client.chunks(4096).chain(server.chunks(4096)) {
        n += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    std::hint::black_box(n);
    let split = start.elapsed();
    // The core: every line framed, parsed, paired and re-emitted.
    let start = Instant::now();
    let mut session = Session::new(
        Arc::new(SessionConfig::default()),
        lab_endpoints(),
        SessionId(1),
        Instant::now(),
    );
    let now = Instant::now();
    session.handle_input(Side::Server, &server[..27], now);
    for chunk in client.chunks(4096) {
        session.handle_input(Side::Client, chunk, now);
        std::hint::black_box(session.take_transmit(Side::Server));
    }
    for chunk in server[27..].chunks(4096) {
        session.handle_input(Side::Server, chunk, now);
        std::hint::black_box(session.take_transmit(Side::Client));
    }
    while let Some(e) = session.poll_event() {
        assert!(!matches!(e, Event::Deny(_)), "{e:?}");
    }
    let core = start.elapsed();
    (lines / split.as_secs_f64(), lines / core.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let bytes = if bench { 1 << 30 } else { 1 << 20 };
    let (direct, relayed, copied) = relay_figures(bytes).await;
    println!(
        "relay: {} MB on loopback: direct {direct:.0} MB/s, through relay {relayed:.0} MB/s, ratio {:.2}",
        bytes / 1_000_000,
        relayed / direct
    );
    println!(
        "relay: splice vs copy loop: {relayed:.0} vs {copied:.0} MB/s, ratio {:.2}",
        relayed / copied
    );
    // The core stops reading a client with 256 unanswered commands; all
    // replies are fed after the commands, so the script stays below that.
    let commands = 250;
    let rounds = if bench { 400 } else { 1 };
    let (mut split, mut core) = (0.0, 0.0);
    for _ in 0..rounds {
        let (s, c) = core_figures(commands);
        split += s;
        core += c;
    }
    let (split, core) = (split / rounds as f64, core / rounds as f64);
    println!(
        "core: {commands} commands x {rounds} rounds: line split {:.1} M lines/s, session {:.2} M lines/s, ratio {:.3}",
        split / 1e6,
        core / 1e6,
        core / split
    );
}
