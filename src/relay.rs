//! The data relay: moves both directions between two TCP connections.
//!
//! Each direction ends on its own: an EOF is passed on as a half-close
//! (shutdown of the write side), so a client that closes its sending side
//! after STOR still gets the server's bytes and vice versa. Both directions
//! share one idle clock: a download keeps the relay alive although its upload
//! direction carries nothing.
//!
//! On Linux the bytes go socket -> pipe -> socket with splice(2) and never
//! enter userland (see `splice`); elsewhere, and for a relay that cannot get
//! its pipes, a copy loop moves them through a 64 KiB buffer per direction.

#[cfg(all(test, target_os = "linux"))]
mod measure;
#[cfg(target_os = "linux")]
mod splice;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Buffer of one copy-loop direction.
const COPY_BUFFER: usize = 64 * 1024;

/// Pipe size asked for per splice direction.
///
/// Measured on loopback (`relay::measure`, 512 MiB runs, best of 3-4, a
/// 2-core VM shared with builds, so +-20%), CPU seconds per GiB spent by
/// the relay thread / by the whole process including both endpoints:
///
/// | path                 | MB/s      | relay     | process   |
/// |----------------------|-----------|-----------|-----------|
/// | direct, no relay     | 3260-3550 | -         | 0.31-0.41 |
/// | copy loop, 64 KiB    | 1700      | 0.39-0.50 | 0.60-0.87 |
/// | splice, pipe 64 KiB  | 1330-1740 | 0.31-0.32 | 0.76-0.86 |
/// | splice, pipe 256 KiB | 1480-1880 | 0.23-0.28 | 0.67-0.82 |
/// | splice, pipe 1 MiB   | 1340-2300 | 0.19-0.23 | 0.69-0.73 |
///
/// 256 KiB: a pipe holds one skb fragment per page slot, so with a NIC's
/// MSS-sized fragments a 64 KiB pipe (16 slots) moves ~23 KB per splice,
/// while 1 MiB pipes pin up to 1 MiB per stalled direction and use up an
/// unprivileged user's fs.pipe-user-pages-soft (64 MiB) at 32 relays
/// instead of 128. Past that budget the size is refused and the relay
/// splices through the default 64 KiB, or copies (see `MIN_PIPE_BYTES`).
///
/// Socket buffers are left to the kernel's autotuning: SO_RCVBUF/SO_SNDBUF
/// of 256 KiB, 1 MiB or 4 MiB on the relay's sockets gave 1220-2430 MB/s
/// and 0.20-0.30 relay CPU s/GiB, no steady gain over the default, and a
/// fixed size would switch autotuning off (capping windows on long paths).
#[cfg(target_os = "linux")]
const PIPE_BYTES: usize = 256 * 1024;

/// Below the kernel's default pipe size (what an unprivileged user gets as
/// 8 KiB, 2-slot pipes once over fs.pipe-user-pages-soft) splice is not
/// worth it: with MSS-sized fragments each splice would move ~3 KB, where
/// the copy loop moves up to 64 KiB per read. (Loopback's fragments are
/// large, and there 8 KiB pipes measured 0.35-0.41 relay CPU s/GiB, no
/// better than the copy loop.)
#[cfg(target_os = "linux")]
const MIN_PIPE_BYTES: usize = 64 * 1024;

/// Bytes relayed in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// How a relay moves the bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mover {
    /// splice(2) through one pipe per direction on Linux. Elsewhere, or when
    /// the pipes cannot be had (out of descriptors or pipe pages), the copy
    /// loop.
    #[default]
    Splice,
    /// Read into a userland buffer, write it out: portable, and about 1.7
    /// times the relay's CPU per byte of splice (see `PIPE_BYTES`).
    Copy,
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
    run(engine(Mover::default()), a, b, idle, cancel).await
}

/// Like [`relay_until`] for streams splice cannot serve (TLS legs, whose
/// bytes must be decrypted and encrypted again): always the copy loop.
pub async fn relay_streams<A, B>(
    a: A,
    b: B,
    idle: Duration,
    cancel: impl std::future::Future<Output = ()>,
) -> (Relayed, io::Result<()>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = IdleClock::new();
    let a_to_b = Count::default();
    let b_to_a = Count::default();
    let moved = copy(a, b, &clock, &a_to_b, &b_to_a);
    watch(moved, &clock, idle, cancel, [&a_to_b, &b_to_a]).await
}

/// Runs `moved` until it ends, the connection has been idle for `idle`
/// (on `clock`), or `cancel` fires; then the bytes counted each way.
async fn watch(
    moved: impl std::future::Future<Output = io::Result<()>>,
    clock: &IdleClock,
    idle: Duration,
    cancel: impl std::future::Future<Output = ()>,
    [a_to_b, b_to_a]: [&Count; 2],
) -> (Relayed, io::Result<()>) {
    let result = tokio::select! {
        r = moved => r,
        () = clock.expired(idle) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "data connection idle",
        )),
        () = cancel => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "control session ended",
        )),
    };
    let counts = Relayed {
        a_to_b: a_to_b.get(),
        b_to_a: b_to_a.get(),
    };
    (counts, result)
}

/// [`relay`] with a chosen [`Mover`], for comparing the two.
pub async fn relay_with(
    mover: Mover,
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
) -> (Relayed, io::Result<()>) {
    run(engine(mover), a, b, idle, std::future::pending()).await
}

fn engine(mover: Mover) -> Engine {
    match mover {
        #[cfg(target_os = "linux")]
        Mover::Splice => Engine::Splice {
            pipe_bytes: PIPE_BYTES,
        },
        #[cfg(not(target_os = "linux"))]
        Mover::Splice => Engine::Copy,
        Mover::Copy => Engine::Copy,
    }
}

/// A [`Mover`] made concrete for this platform.
#[derive(Debug, Clone, Copy)]
enum Engine {
    #[cfg(target_os = "linux")]
    Splice {
        pipe_bytes: usize,
    },
    Copy,
}

async fn run(
    engine: Engine,
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    cancel: impl std::future::Future<Output = ()>,
) -> (Relayed, io::Result<()>) {
    let clock = IdleClock::new();
    let a_to_b = Count::default();
    let b_to_a = Count::default();
    let moved = async {
        match engine {
            #[cfg(target_os = "linux")]
            Engine::Splice { pipe_bytes } => {
                splice_or_copy(a, b, pipe_bytes, &clock, &a_to_b, &b_to_a).await
            }
            Engine::Copy => copy(a, b, &clock, &a_to_b, &b_to_a).await,
        }
    };
    watch(moved, &clock, idle, cancel, [&a_to_b, &b_to_a]).await
}

#[cfg(target_os = "linux")]
async fn splice_or_copy(
    a: TcpStream,
    b: TcpStream,
    pipe_bytes: usize,
    clock: &IdleClock,
    a_to_b: &Count,
    b_to_a: &Count,
) -> io::Result<()> {
    use splice::{Pipe, pump};
    let pipes = Pipe::new(pipe_bytes)
        .and_then(|forward| Ok((forward, Pipe::new(pipe_bytes)?)))
        .and_then(|(forward, backward)| {
            let least = forward.capacity().min(backward.capacity());
            if least < MIN_PIPE_BYTES {
                // Over fs.pipe-user-pages-soft the kernel hands out 8 KiB
                // pipes and refuses to grow them (see MIN_PIPE_BYTES).
                return Err(io::Error::other(format!("only {least}-byte pipes granted")));
            }
            Ok((forward, backward))
        });
    let (forward_pipe, backward_pipe) = match pipes {
        Ok(pipes) => pipes,
        Err(e) => {
            // Out of descriptors (EMFILE, ENFILE) or of pipe pages. The
            // relay still works, at the copy loop's CPU cost.
            tracing::debug!("no pipes for splice ({e}), copying this relay through userland");
            return copy(a, b, clock, a_to_b, b_to_a).await;
        }
    };
    // Both directions use both streams: readiness methods take &self, and
    // each direction waits on a different interest of each stream.
    let forward = pump(&a, &b, &forward_pipe, clock, a_to_b);
    let backward = pump(&b, &a, &backward_pipe, clock, b_to_a);
    tokio::try_join!(forward, backward).map(|_| ())
}

/// The copy loop, both directions, for any pair of streams (TCP, or TLS
/// whose bytes must be decrypted and encrypted again).
async fn copy<A, B>(a: A, b: B, clock: &IdleClock, a_to_b: &Count, b_to_a: &Count) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let forward = copy_pump(ar, bw, clock, a_to_b);
    let backward = copy_pump(br, aw, clock, b_to_a);
    tokio::try_join!(forward, backward).map(|_| ())
}

async fn copy_pump<R, W>(mut r: R, mut w: W, clock: &IdleClock, count: &Count) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other side learns this direction is done.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        count.add(n);
        clock.touch();
    }
}

/// Bytes delivered in one direction. Read once both directions have stopped.
#[derive(Default)]
struct Count(AtomicU64);

impl Count {
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The one idle clock of a relay: the time of the last progress in either
/// direction. tokio's `Instant`, so tests can run it on a paused clock.
struct IdleClock {
    start: Instant,
    /// Milliseconds from `start` to the last progress.
    last: AtomicU64,
}

impl IdleClock {
    fn new() -> Self {
        IdleClock {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = self.start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
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

    /// Runs each check once per mover, as `tests::splice::NAME` and
    /// `tests::copy::NAME`, so the fallback stays proven on Linux too.
    macro_rules! on_each_mover {
        ($(#[$test:meta] $name:ident;)*) => {
            mod splice {
                $(#[$test] async fn $name() { super::$name(super::Mover::Splice).await })*
            }
            mod copy {
                $(#[$test] async fn $name() { super::$name(super::Mover::Copy).await })*
            }
        };
    }

    on_each_mover! {
        #[tokio::test] relays_both_directions_with_half_close;
        #[tokio::test] large_transfer_arrives_whole_and_counted;
        #[tokio::test] bytes_held_when_the_source_closes_are_delivered_before_the_half_close;
        #[tokio::test] peer_reset_ends_the_relay_with_an_error_and_the_counts_so_far;
        #[tokio::test(start_paused = true)] idle_relay_is_closed;
        #[tokio::test(start_paused = true)] one_busy_direction_keeps_the_relay_alive;
    }

    async fn relays_both_directions_with_half_close(mover: Mover) {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let task = tokio::spawn(relay_with(mover, a, b, Duration::from_secs(5)));
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

    /// Fills `buf` with the test stream from byte `offset` on: byte `i` of
    /// the stream is byte `i % 8` of the little-endian `i / 8`, so a lost,
    /// repeated or reordered chunk anywhere shows.
    fn fill_pattern(buf: &mut [u8], offset: u64) {
        // A word's worth at a time: unit tests run unoptimised, and 64 MiB
        // byte by byte would be slow.
        let mut at = 0;
        while at < buf.len() {
            let i = offset + at as u64;
            let from = (i % 8) as usize;
            let n = (8 - from).min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&(i / 8).to_le_bytes()[from..from + n]);
            at += n;
        }
    }

    async fn send_pattern<W: AsyncWrite + Unpin>(mut w: W, total: u64) {
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min((total - sent) as usize);
            fill_pattern(&mut buf[..n], sent);
            w.write_all(&buf[..n]).await.unwrap();
            sent += n as u64;
        }
        w.shutdown().await.unwrap();
    }

    /// Reads to EOF, checking every byte against the pattern; returns the
    /// number of bytes read.
    async fn receive_pattern<R: AsyncRead + Unpin>(mut r: R) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut want = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            fill_pattern(&mut want[..n], got);
            if buf[..n] != want[..n] {
                let k = (0..n).find(|&k| buf[k] != want[k]).unwrap_or(0);
                panic!("stream differs at byte {}", got + k as u64);
            }
            got += n as u64;
        }
    }

    #[test]
    fn pattern_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0u8; 100];
        fill_pattern(&mut whole, 3);
        for split in 0..100 {
            let mut parts = vec![0u8; 100];
            let (head, tail) = parts.split_at_mut(split);
            fill_pattern(head, 3);
            fill_pattern(tail, 3 + split as u64);
            assert_eq!(parts, whole, "split at {split}");
        }
        assert_eq!(&whole[5..13], &1u64.to_le_bytes());
    }

    async fn large_transfer_arrives_whole_and_counted(mover: Mover) {
        // Both directions at once, unequal, so each direction ends on its own.
        const UP: u64 = 64 << 20;
        const DOWN: u64 = 8 << 20;
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let task = tokio::spawn(relay_with(mover, a, b, Duration::from_secs(30)));
        let (client_r, client_w) = client.into_split();
        let (server_r, server_w) = server.into_split();
        let up = tokio::spawn(send_pattern(client_w, UP));
        let down = tokio::spawn(send_pattern(server_w, DOWN));
        let (got_up, got_down) = tokio::join!(receive_pattern(server_r), receive_pattern(client_r));
        up.await.unwrap();
        down.await.unwrap();
        assert_eq!((got_up, got_down), (UP, DOWN));
        let (counts, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(
            counts,
            Relayed {
                a_to_b: UP,
                b_to_a: DOWN
            }
        );
    }

    async fn bytes_held_when_the_source_closes_are_delivered_before_the_half_close(mover: Mover) {
        // Small enough that the client gets all of it, and its FIN, off to
        // the relay while the server reads nothing: the relay then holds
        // bytes (in its pipe or buffer, and the socket buffers after it)
        // when it meets the EOF, and must deliver them before passing it on.
        const TOTAL: u64 = 256 << 10;
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let task = tokio::spawn(relay_with(mover, a, b, Duration::from_secs(30)));
        tokio::time::timeout(Duration::from_secs(5), send_pattern(client, TOTAL))
            .await
            .expect("the client could send everything and close");
        assert_eq!(receive_pattern(server).await, TOTAL);
        let (counts, _) = task.await.unwrap();
        assert_eq!(counts.a_to_b, TOTAL);
    }

    async fn peer_reset_ends_the_relay_with_an_error_and_the_counts_so_far(mover: Mover) {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let task = tokio::spawn(relay_with(mover, a, b, Duration::from_secs(5)));
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Linger 0: close sends RST instead of FIN.
        client.set_zero_linger().unwrap();
        drop(client);
        let (counts, result) = task.await.unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            counts,
            Relayed {
                a_to_b: 5,
                b_to_a: 0
            }
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_relay_granted_only_small_pipes_still_relays() {
        // 8 KiB pipes, as the kernel hands out past fs.pipe-user-pages-soft:
        // the relay falls back to the copy loop and still works.
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let engine = Engine::Splice { pipe_bytes: 8192 };
        let task = tokio::spawn(run(
            engine,
            a,
            b,
            Duration::from_secs(30),
            std::future::pending(),
        ));
        let up = tokio::spawn(send_pattern(client, 1 << 20));
        assert_eq!(receive_pattern(server).await, 1 << 20);
        up.await.unwrap();
        let (counts, _) = task.await.unwrap();
        assert_eq!(counts.a_to_b, 1 << 20);
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

    async fn idle_relay_is_closed(mover: Mover) {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let began = Instant::now();
        let (_, result) = relay_with(mover, a, b, Duration::from_secs(30)).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(began.elapsed().as_secs(), 30);
    }

    async fn one_busy_direction_keeps_the_relay_alive(mover: Mover) {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let began = Instant::now();
        let task = tokio::spawn(relay_with(mover, a, b, Duration::from_secs(30)));
        // Only the download direction carries anything, every 20 s. (The
        // paused clock does not jump ahead while a socket event it has
        // polled still has a task to wake, so each byte is relayed at the
        // virtual time it was sent.)
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            server.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            client.read_exact(&mut one).await.unwrap();
        }
        let (counts, result) = task.await.unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(counts.b_to_a, 3);
        // Last byte at 60 s, idle for 30 s after it.
        assert_eq!(began.elapsed().as_secs(), 90);
    }
}
