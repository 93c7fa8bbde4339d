//! The data relay: copies both directions between two TCP connections.
//!
//! Each direction ends on its own: an EOF is passed on as a half-close
//! (shutdown of the write side), so a client that closes its sending side
//! after STOR still gets the server's bytes and vice versa. Both directions
//! share one idle clock: a download keeps the relay alive although its upload
//! direction carries nothing.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const BUFFER: usize = 64 * 1024;

/// Bytes relayed in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Relays until both directions have ended, an error occurs, or nothing has
/// moved for `idle`. Returns the byte counts either way.
pub async fn relay(a: TcpStream, b: TcpStream, idle: Duration) -> (Relayed, io::Result<()>) {
    relay_until(a, b, idle, std::future::pending()).await
}

/// Like [`relay`], and ends (both connections closed) when `cancel`
/// resolves: a data connection ends with its control session.
pub async fn relay_until(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    cancel: impl std::future::Future<Output = ()>,
) -> (Relayed, io::Result<()>) {
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let a_to_b_count = Arc::new(AtomicU64::new(0));
    let b_to_a_count = Arc::new(AtomicU64::new(0));
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let forward = pump(ar, bw, start, &activity, &a_to_b_count);
    let backward = pump(br, aw, start, &activity, &b_to_a_count);
    let both = async { tokio::try_join!(forward, backward).map(|_| ()) };
    let result = tokio::select! {
        r = both => r,
        () = watchdog(start, &activity, idle) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "data connection idle",
        )),
        () = cancel => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "control session ended",
        )),
    };
    let counts = Relayed {
        a_to_b: a_to_b_count.load(Ordering::Relaxed),
        b_to_a: b_to_a_count.load(Ordering::Relaxed),
    };
    (counts, result)
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    start: Instant,
    activity: &AtomicU64,
    count: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other side learns this direction is done.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn watchdog(start: Instant, activity: &AtomicU64, idle: Duration) {
    loop {
        let last = Duration::from_millis(activity.load(Ordering::Relaxed));
        let deadline = start + last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_both_directions_with_half_close() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let task = tokio::spawn(relay(a, b, Duration::from_secs(5)));
        client.write_all(b"upload").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"upload");
        // The other direction still works after the half-close.
        server.write_all(b"download!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"download!");
        let (counts, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(
            counts,
            Relayed {
                a_to_b: 6,
                b_to_a: 9
            }
        );
    }

    #[tokio::test]
    async fn a_cancelled_relay_closes_both_connections() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(relay_until(a, b, Duration::from_secs(60), async {
            let _ = rx.await;
        }));
        client.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        drop(tx);
        let (counts, result) = task.await.unwrap();
        assert_eq!(counts.a_to_b, 3);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap_or(0), 0);
        assert_eq!(server.read_to_end(&mut rest).await.unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn idle_relay_is_closed() {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let (_, result) = relay(a, b, Duration::from_millis(200)).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
