//! The agent's client of its controllers (not the controller): follow one or more controllers with Consul-style blocking queries on
//! `GET /v1/vips/delta?index=N&wait=…` (only what changed since the version held), failing
//! over between them. When every controller is down
//! the last table stays published, so the data plane keeps forwarding.
//!
//! Agents spread over the controllers: each orders the list by rendezvous hashing of its
//! identity ([`super::rendezvous`]), so thousands of agents given the same list divide evenly
//! and each comes back to the same controller. On failure an agent moves down its order; while
//! it is away from its first choice it asks the ones above it for `/ready` every
//! `return_check`, and once one is back it returns after a delay of its own within
//! `return_spread`, so a controller that comes back is not hit by all its agents at once.
//!
//! A broken controller never makes the agent spin: an answer without a valid index is an
//! error (backed off), an answer that came back early without advancing the index backs off,
//! and a delta that does not apply to the table held asks for the full table once, then backs
//! off ([`judge`], pure, decides).

use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use tokio_util::sync::CancellationToken;

use super::TableTx;
use super::http::{Auth, Backoff, ReadError, read_capped};
use super::metrics::SourceMetrics;
use crate::model::Secret;
use crate::model::delta_in::Delta;
use crate::model::wire::{CHANGED_AT_HEADER, INDEX_HEADER};
use crate::model::{VipTable, unix_ms_now};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub controllers: Vec<Url>,
    /// How long one blocking query may wait on the controller.
    pub wait: Duration,
    pub token: Option<Secret>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest answer read (`--max-answer-size`); a longer one is an error that keeps the
    /// last table.
    pub max_answer: usize,
    /// Most backends one VIP of an answer may have (`--max-backends-per-vip`); an answer
    /// with more is an error that keeps the last table.
    pub max_backends_per_vip: usize,
    /// This agent's name for rendezvous hashing (`--node-name`, default the hostname).
    pub identity: String,
    /// Returns to a recovered controller are spread over this long (`--controller-return-spread`).
    pub return_spread: Duration,
    /// How often an agent away from its first choice asks the ones above for `/ready`.
    pub return_check: Duration,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    Status(StatusCode),
    #[error("body is not a VIP list: {0}")]
    Body(serde_json::Error),
    #[error("body longer than {0} bytes")]
    TooLarge(usize),
    #[error("missing or invalid {INDEX_HEADER} header")]
    NoIndex,
    #[error("VIP {0} has {1} backends, over --max-backends-per-vip {2}")]
    TooManyBackends(String, usize, usize),
}

/// One successful answer, as [`judge`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    /// The index the agent asked with.
    asked: u64,
    /// The index the controller answered with.
    index: u64,
    full: bool,
    /// The version a (non-full) delta applies to.
    from: u64,
    /// Came back in under half the wait: a blocking query that did not block.
    quick: bool,
}

/// What to do with an [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Apply it; with `pause`, back off before the next query (the controller answered at
    /// once without anything having changed).
    Apply { pause: bool },
    /// It does not apply to the table held (version `held`): read the full table, at once the
    /// first time, after a back-off if the previous answer was already such a resync.
    Resync { pause: bool },
}

/// The pure core of the watch loop: `held` is the controller version the agent's mirror is
/// at; `resynced` says the last delta did not apply either.
fn judge(a: Answer, held: u64, resynced: bool) -> Verdict {
    if !a.full && a.from != held {
        Verdict::Resync { pause: resynced }
    } else {
        Verdict::Apply {
            pause: a.quick && a.index == a.asked,
        }
    }
}

/// Follow the controllers until `shutdown`, publishing each changed table on `tx` with an
/// agent-local version (controllers number their tables independently).
pub async fn run(
    cfg: WatchConfig,
    tx: TableTx,
    metrics: SourceMetrics,
    shutdown: CancellationToken,
) {
    let http = match crate::tls::client_builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(cfg.wait + Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build HTTP client");
            return;
        }
    };
    if cfg.controllers.is_empty() {
        return;
    }
    let controllers: Vec<Url> = super::rendezvous::order(&cfg.identity, &cfg.controllers)
        .into_iter()
        .map(|i| cfg.controllers[i].clone())
        .collect();
    tracing::info!(
        first = %controllers[0],
        identity = %cfg.identity,
        "controllers ordered by rendezvous hashing"
    );
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    // Where in `controllers` this agent is now (0: its first choice).
    let mut pos = 0usize;
    let mut index = 0u64;
    // The controller's own table at `index` (in its numbering), which deltas apply to.
    let mut mirror = VipTable::default();
    let mut resynced = false;
    let mut returning = Returning::default();
    loop {
        let base = &controllers[pos];
        let fut = poll(&http, base, index, &cfg);
        tokio::pin!(fut);
        let started = tokio::time::Instant::now();
        let res = loop {
            let due = returning.due(pos, &cfg);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = &mut fut => break Some(r),
                () = tokio::time::sleep_until(due), if pos > 0 => {
                    if returning.check(&http, &controllers[..pos], &cfg).await {
                        break None;
                    }
                }
            }
        };
        let Some(res) = res else {
            let back = returning.take().unwrap_or(0);
            tracing::info!(
                from = %controllers[pos],
                to = %controllers[back],
                "returning to a controller that is back"
            );
            pos = back;
            index = 0;
            mirror = VipTable::default();
            resynced = false;
            continue;
        };
        match res {
            Ok((new_index, changed_at, delta)) => {
                metrics.request("vips_watch", "ok");
                metrics.set_connected(true);
                if delta.full {
                    metrics.last_resync_ms.set(unix_ms_now() as i64);
                }
                let answer = Answer {
                    asked: index,
                    index: new_index,
                    full: delta.full,
                    from: delta.from,
                    quick: started.elapsed() < cfg.wait / 2,
                };
                let wait_after = match judge(answer, mirror.version, resynced) {
                    Verdict::Resync { pause: again } => {
                        // Not a change to what we hold (cannot happen with a sane controller):
                        // start over with a full read.
                        tracing::warn!(
                            controller = %base,
                            from = delta.from,
                            held = mirror.version,
                            "controller sent a delta that does not apply; reading the full table"
                        );
                        metrics.sync_error("controller");
                        index = 0;
                        mirror = VipTable::default();
                        resynced = true;
                        if again && !backoff.pause(&shutdown).await {
                            return;
                        }
                        continue;
                    }
                    Verdict::Apply { pause } => pause,
                };
                if !delta.full {
                    resynced = false;
                }
                if wait_after {
                    tracing::debug!(controller = %base, index = new_index, "controller answered at once with nothing new; backing off");
                } else {
                    backoff.reset();
                }
                mirror = delta.apply(&mirror);
                index = new_index;
                let current = tx.borrow().clone();
                let mut t = mirror.clone();
                t.version = current.version + 1;
                if current.version == 0 || !t.same_content(&current) {
                    t.changed_at_ms = changed_at;
                    let t = Arc::new(t.share_with(&current));
                    tracing::info!(
                        version = t.version,
                        controller_index = index,
                        vips = t.vips.len(),
                        "new VIP table from controller"
                    );
                    metrics.observe_table(&t);
                    metrics.last_event_ms.set(unix_ms_now() as i64);
                    tx.send_replace(t);
                }
                if wait_after && !backoff.pause(&shutdown).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(controller = %base, error = %e, "controller watch failed; keeping the last table");
                metrics.request("vips_watch", "error");
                metrics.sync_error("controller");
                metrics.set_connected(false);
                pos = (pos + 1) % controllers.len();
                returning = Returning::default();
                index = 0;
                mirror = VipTable::default();
                resynced = false;
                if !backoff.pause(&shutdown).await {
                    return;
                }
            }
        }
    }
}

/// The way back to a controller above the one followed now: when to ask next, and which one
/// answered ready and when to go to it.
#[derive(Debug, Default)]
struct Returning {
    next_check: Option<tokio::time::Instant>,
    /// (position in the order, when to switch).
    to: Option<(usize, tokio::time::Instant)>,
}

impl Returning {
    /// When the watch should next be interrupted (a check, or the switch).
    fn due(&mut self, pos: usize, cfg: &WatchConfig) -> tokio::time::Instant {
        if pos == 0 {
            return tokio::time::Instant::now() + cfg.return_check;
        }
        if let Some((p, at)) = self.to
            && p < pos
        {
            return at;
        }
        *self
            .next_check
            .get_or_insert_with(|| tokio::time::Instant::now() + cfg.return_check)
    }

    /// At a due time: true when it is time to switch (see [`Returning::take`]); otherwise ask
    /// the controllers `above` for `/ready` and, when one is, set when to go back to it.
    async fn check(&mut self, http: &reqwest::Client, above: &[Url], cfg: &WatchConfig) -> bool {
        let now = tokio::time::Instant::now();
        if self.to.is_some_and(|(_, at)| at <= now) {
            return true;
        }
        self.next_check = Some(now + cfg.return_check);
        for (p, base) in above.iter().enumerate() {
            let Ok(url) = base.join("ready") else {
                continue;
            };
            let ready = http
                .get(url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                if self.to.is_none_or(|(q, _)| p < q) {
                    let spread = super::rendezvous::spread_ms(
                        &cfg.identity,
                        u64::try_from(cfg.return_spread.as_millis()).unwrap_or(u64::MAX),
                    );
                    let at = now + Duration::from_millis(spread);
                    tracing::info!(controller = %base, after_ms = spread, "a preferred controller is back");
                    self.to = Some((p, at));
                }
                return false;
            }
        }
        false
    }

    /// The position to go back to, resetting the state for the next time away.
    fn take(&mut self) -> Option<usize> {
        let to = self.to.take().map(|(p, _)| p);
        self.next_check = None;
        to
    }
}

async fn poll(
    http: &reqwest::Client,
    base: &Url,
    index: u64,
    cfg: &WatchConfig,
) -> Result<(u64, u64, Delta), WatchError> {
    let mut url = base.clone();
    url.set_path(&format!(
        "{}/v1/vips/delta",
        base.path().trim_end_matches('/')
    ));
    url.set_query(Some(&format!(
        "index={index}&wait={}s",
        cfg.wait.as_secs().max(1)
    )));
    let auth = cfg.token.clone().map_or(Auth::None, Auth::Bearer);
    let resp = auth.apply(http.get(url)).send().await?;
    if !resp.status().is_success() {
        return Err(WatchError::Status(resp.status()));
    }
    let num = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    // Without its index an answer cannot be followed: asking again with index 0 would be
    // answered at once, forever.
    let new_index = num(INDEX_HEADER).ok_or(WatchError::NoIndex)?;
    let changed_at = num(CHANGED_AT_HEADER).unwrap_or(0);
    let limit = cfg.max_answer;
    let body = read_capped(resp, limit).await.map_err(|e| match e {
        ReadError::TooLarge => WatchError::TooLarge(limit),
        ReadError::Http(e) => WatchError::Http(e),
    })?;
    // Straight into model types (the body's strings borrowed while read); the body goes as
    // soon as it is parsed.
    let delta = Delta::from_slice(&body).map_err(WatchError::Body)?;
    drop(body);
    let max = cfg.max_backends_per_vip;
    if let Some(v) = delta.upsert.iter().find(|v| v.backends.len() > max) {
        return Err(WatchError::TooManyBackends(
            v.vip_string(),
            v.backends.len(),
            max,
        ));
    }
    Ok((new_index, changed_at, delta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn judge_cases() {
        use Verdict::{Apply, Resync};
        // ((asked, index, full, from, quick), held, resynced, verdict)
        let cases = [
            ((0, 5, true, 0, true), 0, false, Apply { pause: false }),
            ((5, 6, false, 5, true), 5, false, Apply { pause: false }),
            // A blocking query that returned at once with nothing new...
            ((5, 5, false, 5, true), 5, false, Apply { pause: true }),
            // ...or after the wait: a normal timeout.
            ((5, 5, false, 5, false), 5, false, Apply { pause: false }),
            // A controller restarted behind us answers at once with a lower index.
            ((9, 2, true, 0, true), 9, false, Apply { pause: false }),
            // A delta from a version not held: resync at once, then back off.
            ((5, 6, false, 3, true), 5, false, Resync { pause: false }),
            ((0, 6, false, 3, true), 0, true, Resync { pause: true }),
            // A full answer applies whatever its `from`.
            ((0, 6, true, 3, true), 0, true, Apply { pause: false }),
        ];
        for (i, ((asked, index, full, from, quick), held, resynced, want)) in
            cases.into_iter().enumerate()
        {
            let a = Answer {
                asked,
                index,
                full,
                from,
                quick,
            };
            assert_eq!(judge(a, held, resynced), want, "case {i}: {a:?}");
        }
    }

    /// A controller that answers every request with `head` (status line and headers) and
    /// `body`, counting the requests.
    async fn fake_controller(head: &'static str, body: String) -> (Url, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (h, body) = (Arc::clone(&h), body.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    // One request per connection; it ends with an empty line.
                    while !req.ends_with(b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::Relaxed);
                    let resp = format!(
                        "{head}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (url, hits)
    }

    /// Requests `run` sends to a controller answering `head`/`body` in `secs` seconds, and
    /// the table it published.
    async fn requests_in(head: &'static str, body: String, secs: u64) -> (usize, Arc<VipTable>) {
        requests_in_capped(head, body, secs, 1 << 20, 10_000).await
    }

    async fn requests_in_capped(
        head: &'static str,
        body: String,
        secs: u64,
        max_answer: usize,
        max_backends_per_vip: usize,
    ) -> (usize, Arc<VipTable>) {
        let (url, hits) = fake_controller(head, body).await;
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(VipTable::default()));
        let cfg = WatchConfig {
            controllers: vec![url],
            wait: Duration::from_secs(10),
            token: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            max_answer,
            max_backends_per_vip,
            identity: "test-agent".into(),
            return_spread: Duration::from_secs(1),
            return_check: Duration::from_secs(1),
        };
        let metrics = SourceMetrics::new(&mut prometheus_client::registry::Registry::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(cfg, tx, metrics, stop.clone()));
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.cancel();
        task.await.unwrap();
        let t = rx.borrow().clone();
        (hits.load(Ordering::Relaxed), t)
    }

    fn delta(from: u64, to: u64, full: bool) -> String {
        let vip = r#"{"vip":"198.18.5.5:80","protocol":"tcp","name":null,"ip":"198.18.5.5",
            "port":80,"backend":[{"ip":"198.18.0.1","port":8080,"state":"active"}]}"#;
        format!(r#"{{"from":{from},"to":{to},"full":{full},"upsert":[{vip}],"remove":[]}}"#)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_controller_is_polled_at_a_bounded_rate() {
        // 2 s at back-offs of 100–400 ms: a handful of requests; a hot loop sends thousands.
        const MAX: usize = 25;
        let cases: [(&str, &'static str, String); 4] = [
            ("no index", "HTTP/1.1 200 OK", delta(0, 7, true)),
            (
                "invalid index",
                "HTTP/1.1 200 OK\r\nx-l4lb-index: seven",
                delta(0, 7, true),
            ),
            (
                "delta from a version not held",
                "HTTP/1.1 200 OK\r\nx-l4lb-index: 7",
                delta(3, 7, false),
            ),
            (
                "blocking query that never blocks",
                "HTTP/1.1 200 OK\r\nx-l4lb-index: 7",
                delta(0, 7, true),
            ),
        ];
        let runs = cases.map(|(what, head, body)| async move {
            let (n, t) = requests_in(head, body, 2).await;
            (what, n, t)
        });
        for (what, n, t) in futures::future::join_all(runs).await {
            assert!((2..=MAX).contains(&n), "{what}: {n} requests in 2 s");
            // Only the sane-but-eager controller's table is taken.
            let want = usize::from(what == "blocking query that never blocks");
            assert_eq!(t.vips.len(), want, "{what}");
        }
    }

    /// An answer over `--max-answer-size` is an error that keeps the last table (here: none),
    /// and is retried with back-off, not in a loop; the same answer under the cap is taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_over_the_cap_keeps_the_last_table() {
        let body = delta(0, 7, true);
        let head = "HTTP/1.1 200 OK\r\nx-l4lb-index: 7";
        let (n, t) = requests_in_capped(head, body.clone(), 1, body.len() - 1, 10).await;
        assert!(t.vips.is_empty(), "a table over the cap was taken");
        assert!((1..=25).contains(&n), "{n} requests in 1 s");
        let (_, t) = requests_in_capped(head, body.clone(), 1, body.len(), 10).await;
        assert_eq!(t.vips.len(), 1, "at the cap the answer is read");
    }

    /// A VIP with more backends than `--max-backends-per-vip` makes the whole answer an
    /// error that keeps the last table (here: none), retried with back-off; at the limit it
    /// is taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vip_over_the_backend_limit_keeps_the_last_table() {
        let vip = r#"{"vip":"198.18.5.5:80","protocol":"tcp","name":null,"ip":"198.18.5.5",
            "port":80,"backend":[{"ip":"198.18.0.1","port":8080,"state":"active"},
            {"ip":"198.18.0.2","port":8080,"state":"active"}]}"#;
        let body = format!(r#"{{"from":0,"to":7,"full":true,"upsert":[{vip}],"remove":[]}}"#);
        let head = "HTTP/1.1 200 OK\r\nx-l4lb-index: 7";
        let (n, t) = requests_in_capped(head, body.clone(), 1, 1 << 20, 1).await;
        assert!(t.vips.is_empty(), "a VIP over the limit was taken");
        assert!((1..=25).contains(&n), "{n} requests in 1 s");
        let (_, t) = requests_in_capped(head, body, 1, 1 << 20, 2).await;
        assert_eq!(t.vips.len(), 1, "at the limit the answer is taken");
        assert_eq!(t.vips.values().next().unwrap().backends.len(), 2);
    }
}
