//! The daemon's background tasks (admin listener, data-plane listeners,
//! relays, the kernel plane's watchers): tracked, so that shutdown ends
//! when they have ended instead of leaving them behind.
//!
//! A task is spawned into a [`JoinSet`]; finished ones are reaped as new
//! ones come, so the set holds only live tasks. Long-running loops select
//! on [`Tasks::stopping`]; [`Tasks::shutdown`] signals it, awaits every
//! task until a deadline and aborts what is left.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A cloneable handle to one set of tracked tasks.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    set: Mutex<JoinSet<()>>,
    stop: watch::Sender<bool>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks {
            inner: Arc::new(Inner {
                set: Mutex::new(JoinSet::new()),
                stop: watch::Sender::new(false),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.inner.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `task` in the set.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut set = self.lock();
        reap(&mut set);
        set.spawn(task);
    }

    /// Resolves once shutdown has begun.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.inner.stop.subscribe();
        async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        }
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        let mut set = self.lock();
        reap(&mut set);
        set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Signals [`Tasks::stopping`] and awaits every task until `deadline`;
    /// the rest are aborted. Tasks spawned meanwhile are awaited too.
    /// Returns how many had to be aborted.
    pub async fn shutdown(&self, deadline: Instant) -> usize {
        self.inner.stop.send_replace(true);
        loop {
            let mut set = std::mem::take(&mut *self.lock());
            if set.is_empty() {
                return 0;
            }
            loop {
                match tokio::time::timeout_at(deadline, set.join_next()).await {
                    Ok(Some(ended)) => report(ended),
                    Ok(None) => break,
                    Err(_) => {
                        let left = set.len() + self.lock().len();
                        set.abort_all();
                        self.lock().abort_all();
                        while set.join_next().await.is_some() {}
                        return left;
                    }
                }
            }
        }
    }
}

/// Collects finished tasks; a panic is worth an error line.
fn reap(set: &mut JoinSet<()>) {
    while let Some(ended) = set.try_join_next() {
        report(ended);
    }
}

fn report(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended
        && e.is_panic()
    {
        tracing::error!("a background task panicked: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn shutdown_awaits_tasks_that_stop_and_aborts_the_stuck_ones() {
        let tasks = Tasks::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(4);
        let stopping = tasks.stopping();
        let tx = done_tx.clone();
        tasks.spawn(async move {
            stopping.await;
            let _ = tx.send("stopped").await;
        });
        tasks.spawn(std::future::pending());
        tasks.spawn(async {});
        tokio::task::yield_now().await;
        assert_eq!(tasks.len(), 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        let aborted = tasks.shutdown(deadline).await;
        assert_eq!(aborted, 1);
        assert_eq!(done_rx.recv().await, Some("stopped"));
        assert!(tasks.is_empty());
        // Already stopping: a late loop sees it at once.
        tokio::time::timeout(Duration::from_millis(1), tasks.stopping())
            .await
            .unwrap();
    }
}
