//! The process's supervisor: every long-lived task runs in a [`Tasks`] set, in one of two
//! groups, under one shutdown token, and is reaped with a bounded drain. Knows nothing of what
//! the tasks do; `app` and `node` start them.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::exit::chain;

/// What a tracked task returns: its name and how it ended.
type Ended = (&'static str, anyhow::Result<()>);

/// The process's long-lived tasks, in two groups: `main` (sources, the agent) stops on
/// `shutdown`; `serving` (the API, DNS) stops on its own token once `main` has drained, so
/// `/ready` says 503 and names resolve while connections finish. A task that fails (or
/// panics) before shutdown cancels `shutdown`: the process drains and exits 1 rather than
/// run on without, say, its API or its source.
pub struct Tasks {
    main: JoinSet<Ended>,
    serving: JoinSet<Ended>,
    shutdown: CancellationToken,
    serving_stop: CancellationToken,
    errors: Vec<String>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    pub fn new() -> Self {
        Tasks {
            main: JoinSet::new(),
            serving: JoinSet::new(),
            shutdown: CancellationToken::new(),
            serving_stop: CancellationToken::new(),
            errors: Vec::new(),
        }
    }

    /// The token the `main` group stops on (a signal, or a task that failed).
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The token the `serving` group stops on, after `main` has drained.
    pub fn serving_stop(&self) -> CancellationToken {
        self.serving_stop.clone()
    }

    /// Start a task that stops when `shutdown` is cancelled.
    pub fn spawn(
        &mut self,
        name: &'static str,
        f: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.main.spawn(async move { (name, f.await) });
    }

    /// Start a task that outlives the drain (it is given [`Tasks::serving_stop`]).
    pub fn spawn_serving(
        &mut self,
        name: &'static str,
        f: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.serving.spawn(async move { (name, f.await) });
    }

    /// Cancel `shutdown` on SIGTERM, SIGINT or SIGHUP (a HUP from a closed terminal or a
    /// careless `kill -HUP` drains like TERM instead of killing the process mid-flight).
    pub fn stop_on_signals(&mut self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let token = self.shutdown.clone();
        self.spawn("signals", async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                _ = hup.recv() => tracing::info!("SIGHUP: shutting down"),
                _ = token.cancelled() => return Ok(()),
            }
            token.cancel();
            Ok(())
        });
        Ok(())
    }

    fn record(&mut self, joined: Result<Ended, tokio::task::JoinError>) {
        if let Some(f) = failure(joined) {
            self.errors.push(f);
            self.shutdown.cancel();
        }
    }

    /// Wait for `shutdown` (a signal, or a task that failed), reaping tasks as they end.
    pub async fn until_shutdown(&mut self) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                Some(j) = self.main.join_next() => self.record(j),
                Some(j) = self.serving.join_next() => self.record(j),
            }
        }
    }

    /// The bounded drain: `main` gets up to `grace`, then `serving` is told to stop and gets
    /// up to two seconds; what is still running then is aborted and reported. Err lists every
    /// task that failed or had to be aborted.
    pub async fn drain(mut self, grace: Duration) -> anyhow::Result<()> {
        self.shutdown.cancel();
        reap(&mut self.main, grace, "task(s)", &mut self.errors).await;
        self.serving_stop.cancel();
        let after = Duration::from_secs(2);
        reap(
            &mut self.serving,
            after,
            "serving task(s)",
            &mut self.errors,
        )
        .await;
        if self.errors.is_empty() {
            tracing::info!("stopped");
            Ok(())
        } else {
            Err(anyhow::anyhow!("{}", self.errors.join("; ")))
        }
    }
}

/// How a task ended, if that was a failure (logged here).
fn failure(joined: Result<Ended, tokio::task::JoinError>) -> Option<String> {
    let f = match joined {
        Ok((_, Ok(()))) => return None,
        Ok((name, Err(e))) => format!("{name}: {}", chain(e.as_ref())),
        Err(e) if e.is_panic() => format!("a task panicked: {e}"),
        Err(e) => format!("a task was cancelled: {e}"),
    };
    tracing::error!("{f}");
    Some(f)
}

/// Await every task of `set` for up to `within`, then abort the rest; failures and aborted
/// tasks go to `errors`.
async fn reap(set: &mut JoinSet<Ended>, within: Duration, what: &str, errors: &mut Vec<String>) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(j)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        errors.extend(failure(j));
    }
    if !set.is_empty() {
        errors.push(format!(
            "{} {what} still running after {within:?}; aborted",
            set.len()
        ));
        set.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_task_stops_the_rest_and_is_reported() {
        let mut tasks = Tasks::new();
        let stop = tasks.shutdown();
        tasks.spawn("waiter", async move {
            stop.cancelled().await;
            Ok(())
        });
        tasks.spawn("broken", async { Err(anyhow::anyhow!("no source")) });
        let serving_stop = tasks.serving_stop();
        tasks.spawn_serving("api", async move {
            serving_stop.cancelled().await;
            Ok(())
        });
        tokio::time::timeout(Duration::from_secs(5), tasks.until_shutdown())
            .await
            .expect("a failed task cancels shutdown");
        let err = tasks
            .drain(Duration::from_secs(1))
            .await
            .expect_err("the failure is reported");
        assert_eq!(err.to_string(), "broken: no source");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_will_not_stop_is_aborted_after_the_grace() {
        let mut tasks = Tasks::new();
        tasks.spawn("stuck", std::future::pending());
        let err = tasks
            .drain(Duration::from_secs(3))
            .await
            .expect_err("an aborted task is an error");
        assert!(err.to_string().contains("1 task(s) still running"), "{err}");
    }
}
