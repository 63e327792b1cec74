//! The byte relay shared by the transparent proxy (`proxy.rs`) and the chain roles
//! (`chain.rs`): copy both ways with half-closes passed on, count every byte twice (the
//! connection's counter and the role's total), and end a connection nothing moved on for the
//! idle timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Bytes read per call by [`copy_both`].
const BUF: usize = 16 * 1024;

/// When something last moved on a connection (for the idle timeout).
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { epoch: Instant::now(), last: AtomicU64::new(0) }
    }
}

impl Activity {
    /// Something moved now.
    pub fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// Returns once nothing moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.epoch + Duration::from_millis(self.last.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A byte counter of one connection and its role-wide twin, plus the connection's activity.
#[derive(Clone, Copy)]
pub struct Meter<'a> {
    /// This connection's bytes.
    pub mine: &'a AtomicU64,
    /// Every connection's bytes (none: counted elsewhere once the connection ends).
    pub total: Option<&'a AtomicU64>,
    /// Touched on every add.
    pub activity: &'a Activity,
}

impl Meter<'_> {
    /// `n` bytes moved.
    pub fn add(&self, n: usize) {
        self.mine.fetch_add(n as u64, Relaxed);
        if let Some(t) = self.total {
            t.fetch_add(n as u64, Relaxed);
        }
        self.activity.touch();
    }
}

/// How a relay or a chained connection ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<T> {
    /// It finished: the value `f` gave.
    Done(T),
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Runs `f` unless nothing moved on `activity` for `idle` (zero: never idle).
pub async fn with_idle<F: std::future::Future>(f: F, activity: &Activity, idle: Duration) -> Ended<F::Output> {
    if idle.is_zero() {
        return Ended::Done(f.await);
    }
    tokio::select! {
        r = f => Ended::Done(r),
        () = activity.idle_for(idle) => Ended::Idle,
    }
}

/// Copies `a` to `b` and `b` to `a` untouched, passing each EOF on as a half-close; an error
/// (a reset) either way ends the other at once.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B, a_to_b: Meter<'_>, b_to_a: Meter<'_>) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    tokio::try_join!(copy(ar, bw, a_to_b), copy(br, aw, b_to_a)).map(|_| ())
}

async fn copy(mut r: impl AsyncRead + Unpin, mut w: impl AsyncWrite + Unpin, meter: Meter<'_>) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        meter.add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_passes_half_closes_on_and_counts_twice() {
        let ((mut client, mut proxy_client), (mut proxy_server, mut server)) = (pair().await, pair().await);
        let (up, down, up_all, down_all, activity) =
            (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(100), AtomicU64::new(0), Activity::default());
        let peers = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            // The server still answers after the client's half-close.
            server.write_all(b"world!").await.unwrap();
            server.shutdown().await.unwrap();
            got.clear();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"world!");
        };
        let relayed = copy_both(
            &mut proxy_client,
            &mut proxy_server,
            Meter { mine: &up, total: Some(&up_all), activity: &activity },
            Meter { mine: &down, total: Some(&down_all), activity: &activity },
        );
        let (r, ()) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(relayed, peers) }).await.unwrap();
        r.unwrap();
        assert_eq!([&up, &down, &up_all, &down_all].map(|a| a.load(Relaxed)), [5, 6, 105, 6]);
    }

    #[tokio::test]
    async fn idle_ends_only_when_nothing_moves() {
        let activity = Activity::default();
        let busy = async {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                activity.touch();
            }
            "done"
        };
        assert_eq!(with_idle(busy, &activity, Duration::from_millis(40)).await, Ended::Done("done"));
        let stuck = std::future::pending::<()>();
        assert_eq!(with_idle(stuck, &activity, Duration::from_millis(20)).await, Ended::Idle);
    }
}
