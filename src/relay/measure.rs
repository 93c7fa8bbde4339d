//! Loopback figures for the relay's tuning choices (pipe size, socket
//! buffers, splice vs copy). Ignored by default: it moves gigabytes.
//!
//! ```sh
//! cargo test --release --lib relay::measure -- --ignored --nocapture --test-threads 1
//! ```
//!
//! `FTPGATE_MEASURE_MIB` sets the bytes per run (default 1024),
//! `FTPGATE_MEASURE_ROUNDS` the runs per path (default 1; best kept),
//! `FTPGATE_MEASURE_ONLY` a comma-separated list of label parts to run. A client
//! thread sends through the relay to a server thread; the relay runs alone on
//! its own thread with a current-thread runtime, so that thread's CPU time
//! (getrusage RUSAGE_THREAD) is the relay's cost. The process figure adds the
//! two endpoints. The baseline is the same transfer client -> server direct.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::{Engine, PIPE_BYTES, Relayed, run};

const GIB: f64 = (1u64 << 30) as f64;

/// CPU time (user + system) of the calling thread or of the process.
fn cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage only writes the struct it is given; all-zero is a
    // valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `who` is RUSAGE_SELF or RUSAGE_THREAD.
    let rc = unsafe { libc::getrusage(who, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// Sends `total` bytes on `tx` and closes; reads `rx` to EOF. Returns the
/// elapsed time.
fn transfer(mut tx: TcpStream, mut rx: TcpStream, total: u64) -> Duration {
    let start = Instant::now();
    let sender = thread::spawn(move || {
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = chunk.len().min(left as usize);
            tx.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        tx.shutdown(Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = rx.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    sender.join().unwrap();
    assert_eq!(got, total);
    start.elapsed()
}

/// One run's figures.
#[derive(Clone, Copy)]
struct Run {
    elapsed: Duration,
    process: Duration,
    relay: Option<Duration>,
}

impl Run {
    /// Keeps the best of each figure: on a shared machine, interference only
    /// ever makes a run slower or costlier.
    fn best(self, other: Run) -> Run {
        Run {
            elapsed: self.elapsed.min(other.elapsed),
            process: self.process.min(other.process),
            relay: match (self.relay, other.relay) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

fn report(label: &str, total: u64, run: Run) {
    let per_gib = |d: Duration| d.as_secs_f64() * GIB / total as f64;
    let relay = run
        .relay
        .map_or(String::from("-"), |d| format!("{:.3}", per_gib(d)));
    println!(
        "{label:<32} {:>6.0} MB/s   relay {relay:>5} CPU s/GiB   process {:.3} CPU s/GiB",
        total as f64 / 1e6 / run.elapsed.as_secs_f64(),
        per_gib(run.process),
    );
}

/// The path under test: direct, or through the relay with this engine and
/// optionally SO_RCVBUF/SO_SNDBUF set on both relay sockets (after
/// connect, as the relay itself would have to).
#[derive(Clone, Copy)]
enum Path {
    Direct,
    Relay {
        engine: Engine,
        buffers: Option<usize>,
    },
}

fn measure(path: Path, total: u64) -> Run {
    let Path::Relay { engine, buffers } = path else {
        let (client, server) = pair();
        let before = cpu(libc::RUSAGE_SELF);
        let elapsed = transfer(client, server, total);
        let process = cpu(libc::RUSAGE_SELF) - before;
        return Run {
            elapsed,
            process,
            relay: None,
        };
    };
    let (client, a) = pair();
    let (b, server) = pair();
    if let Some(size) = buffers {
        for s in [&a, &b] {
            SockRef::from(s).set_recv_buffer_size(size).unwrap();
            SockRef::from(s).set_send_buffer_size(size).unwrap();
        }
    }
    let relay = thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let before = cpu(libc::RUSAGE_THREAD);
            let (counts, result) = rt.block_on(async {
                a.set_nonblocking(true).unwrap();
                b.set_nonblocking(true).unwrap();
                let a = tokio::net::TcpStream::from_std(a).unwrap();
                let b = tokio::net::TcpStream::from_std(b).unwrap();
                run(
                    engine,
                    a,
                    b,
                    Duration::from_secs(30),
                    std::future::pending(),
                )
                .await
            });
            result.unwrap();
            (counts, cpu(libc::RUSAGE_THREAD) - before)
        })
        .unwrap();
    let before = cpu(libc::RUSAGE_SELF);
    let elapsed = transfer(client, server, total);
    let (counts, relay_cpu) = relay.join().unwrap();
    let process = cpu(libc::RUSAGE_SELF) - before;
    assert_eq!(
        counts,
        Relayed {
            a_to_b: total,
            b_to_a: 0
        }
    );
    Run {
        elapsed,
        process,
        relay: Some(relay_cpu),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "moves gigabytes; run on purpose with --release --ignored"]
fn loopback_figures() {
    let total = env_u64("FTPGATE_MEASURE_MIB", 1024) << 20;
    let rounds = env_u64("FTPGATE_MEASURE_ROUNDS", 1).max(1);
    let splice = |pipe_kib: usize, buf_kib: Option<usize>| Path::Relay {
        engine: Engine::Splice {
            pipe_bytes: pipe_kib << 10,
        },
        buffers: buf_kib.map(|k| k << 10),
    };
    let default_pipe = PIPE_BYTES >> 10;
    let mut paths = vec![
        ("direct (no relay)".to_string(), Path::Direct),
        (
            "copy loop".to_string(),
            Path::Relay {
                engine: Engine::Copy,
                buffers: None,
            },
        ),
    ];
    // 8 KiB is what a new pipe gets once the user holds more than
    // fs.pipe-user-pages-soft.
    for kib in [8, 64, 256, 1024] {
        paths.push((format!("splice, pipe {kib} KiB"), splice(kib, None)));
    }
    for kib in [256, 1024, 4096] {
        let label = format!("splice, pipe {default_pipe} KiB, bufs {kib} KiB");
        paths.push((label, splice(default_pipe, Some(kib))));
    }
    if let Ok(only) = std::env::var("FTPGATE_MEASURE_ONLY") {
        paths.retain(|(label, _)| only.split(',').any(|o| label.contains(o)));
    }
    // Rounds interleave the paths, so a burst of load elsewhere does not
    // land on one path only; each path reports its best round.
    let mut best: Vec<Option<Run>> = vec![None; paths.len()];
    for _ in 0..rounds {
        for (slot, (_, path)) in best.iter_mut().zip(&paths) {
            let run = measure(*path, total);
            *slot = Some(slot.map_or(run, |b| b.best(run)));
        }
    }
    for ((label, _), run) in paths.iter().zip(best) {
        if let Some(run) = run {
            report(label, total, run);
        }
    }
}
