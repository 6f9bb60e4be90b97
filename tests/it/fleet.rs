//! A controller followed by a fleet: 10,000 agents' blocking queries parked on one real
//! controller process (1,000 VIPs) are all answered after one change, cost little memory each,
//! and never delay health; past `--api-max-connections` a watcher gets a fast 503 with
//! `Retry-After` while health is still answered.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::BIN;
use crate::common::apps::{labelled_app, write_apps};
use crate::common::process::Proc;

/// `n` apps, each with one named VIP (`/app<i>:80`) and one task; app 0 gets `extra` more.
fn fleet_apps(path: &Path, n: usize, extra: usize) {
    let apps: Vec<Value> = (0..n)
        .map(|i| {
            let tasks = if i == 0 { 1 + extra } else { 1 };
            let backends: Vec<SocketAddr> = (0..tasks)
                .map(|t| {
                    SocketAddr::from((
                        [198, 18, (i / 250) as u8, (i % 250) as u8],
                        31000 + t as u16,
                    ))
                })
                .collect();
            labelled_app(
                &format!("/app{i}"),
                &[&format!("/app{i}:80")],
                "tcp",
                &backends,
            )
        })
        .collect();
    write_apps(path, apps);
}

/// A temporary apps file of 10 apps (the directory goes with the returned guard).
fn small_fleet() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    fleet_apps(&file, 10, 0);
    (dir, file)
}

fn controller(file: &Path, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(BIN);
    cmd.args(["controller", "--apps-file"])
        .arg(file)
        .args(["--apps-file-poll", "50ms", "--api-listen", "127.0.0.1:0"])
        .args(extra);
    let p = Proc::spawn("controller", cmd);
    let log = p.log();
    let api = log.addr("API listening", Duration::from_secs(20));
    log.wait_for("first table built", Duration::from_secs(30));
    (p, api)
}

/// One HTTP/1.1 GET on `s`; returns the status, the headers (lower-cased) and the body.
async fn get_on(s: &mut TcpStream, path: &str) -> std::io::Result<(u16, String, Vec<u8>)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, head, buf[head_end..].to_vec()))
}

/// A fresh connection, one GET, and how long it took.
async fn timed_get(api: SocketAddr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = async {
        let mut s = TcpStream::connect(api).await?;
        get_on(&mut s, path).await
    };
    match tokio::time::timeout(Duration::from_secs(5), r).await {
        Ok(Ok((status, _, _))) => (status, t.elapsed()),
        _ => (0, t.elapsed()),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The value of an unlabelled series in `/metrics`.
async fn metric(api: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(api).await.ok()?;
    let (_, _, body) = get_on(&mut s, "/metrics").await.ok()?;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(' ')?;
        v.trim().parse().ok()
    })
}

async fn index_of(api: SocketAddr) -> u64 {
    let mut s = TcpStream::connect(api).await.unwrap();
    let (status, head, _) = get_on(&mut s, "/v1/vips/delta").await.unwrap();
    assert_eq!(status, 200, "{head}");
    header_index(&head).unwrap()
}

/// One answer a watcher got: its status and when it arrived.
type Answer = (usize, u16, Instant);

/// `n` watchers on `api`, each following `/v1/vips/delta` as an agent does (a blocking query
/// with the index it holds, again with the index each answer gives) and reporting every
/// answer on the returned channel. Connects in batches so the listen backlog never
/// overflows. The watchers stop when the handles are dropped.
async fn watchers(
    api: SocketAddr,
    n: usize,
    index: u64,
    wait: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<Answer>,
    Vec<AbortOnDrop>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(n);
    let wait = Arc::<str>::from(wait);
    for id in 0..n {
        let (tx, wait) = (tx.clone(), Arc::clone(&wait));
        handles.push(AbortOnDrop(tokio::spawn(async move {
            let mut s = TcpStream::connect(api).await.ok()?;
            let mut index = index;
            loop {
                let path = format!("/v1/vips/delta?index={index}&wait={wait}");
                let (status, head, _) = get_on(&mut s, &path).await.ok()?;
                tx.send((id, status, Instant::now())).ok()?;
                match header_index(&head) {
                    Some(i) => index = i,
                    // Turned away (a 503 past the cap): come back on a new connection.
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        s = TcpStream::connect(api).await.ok()?;
                    }
                }
            }
        })));
        if id % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    (rx, handles)
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<Option<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn header_index(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{}:", l4lb::api::INDEX_HEADER)))
        .and_then(|v| v.trim().parse().ok())
}

/// Wait until `n` blocking queries are parked on `api`.
async fn parked(api: SocketAddr, n: usize, within: Duration) {
    let t = Instant::now();
    loop {
        let now = metric(api, "l4lb_api_watchers").await.unwrap_or(0.0) as usize;
        if now >= n {
            return;
        }
        assert!(t.elapsed() < within, "{now} parked of {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn ten_thousand_parked_watches_are_answered_after_one_change_and_health_never_waits() {
    const WATCHERS: usize = 10_000;
    const VIPS: usize = 1_000;
    l4lb::api::limits::raise_nofile();
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    if hard < (WATCHERS as u64) + 1_000 {
        eprintln!("skipped: a descriptor limit of {hard} cannot hold {WATCHERS} watchers");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    fleet_apps(&file, VIPS, 0);
    let (ctl, api) = controller(&file, &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cap = metric(api, "l4lb_api_max_connections").await.unwrap();
        assert!(
            cap >= WATCHERS as f64,
            "the cap {cap} does not follow the descriptor limit"
        );
        let index = index_of(api).await;
        let before = rss_kib(ctl.pid());
        let (mut answers, _watchers) = watchers(api, WATCHERS, index, "60s").await;
        parked(api, WATCHERS, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let parked_rss = rss_kib(ctl.pid());
        let per_watch = (parked_rss.saturating_sub(before)) as f64 * 1024.0 / WATCHERS as f64;
        // Health, readiness and metrics are answered at once meanwhile.
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            for p in ["/healthz", "/ready", "/metrics"] {
                let (status, took) = timed_get(api, p).await;
                assert_eq!(status, 200, "{p} with {WATCHERS} watchers parked");
                slowest = slowest.max(took);
            }
        }
        while answers.try_recv().is_ok() {}

        // One change: app 0 gets a second task.
        fleet_apps(&file, VIPS, 1);
        let changed = Instant::now();
        let mut first: Vec<Option<(u16, Duration)>> = vec![None; WATCHERS];
        let mut answered = 0;
        while answered < WATCHERS {
            let Ok(Some((id, status, at))) =
                tokio::time::timeout(Duration::from_secs(30), answers.recv()).await
            else {
                break;
            };
            if first[id].is_none() {
                first[id] = Some((status, at.saturating_duration_since(changed)));
                answered += 1;
            }
        }
        let mut took: Vec<Duration> = first
            .iter()
            .filter_map(|a| a.filter(|(status, _)| *status == 200).map(|(_, t)| t))
            .collect();
        let failed = WATCHERS - took.len();
        took.sort();
        let p99 = took.get(took.len() * 99 / 100).copied().unwrap_or_default();
        let last = took.last().copied().unwrap_or_default();
        let first = took.first().copied().unwrap_or_default();
        let p50 = took.get(took.len() / 2).copied().unwrap_or_default();
        println!(
            "{WATCHERS} watchers on {VIPS} VIPs: {per_watch:.0} B RSS each, health at most \
             {slowest:?}; after one change first {first:?}, p50 {p50:?}, p99 {p99:?}, last \
             {last:?}, {failed} not 200"
        );
        assert_eq!(failed, 0, "watchers not answered 200");
        assert!(
            p99 <= Duration::from_secs(1),
            "p99 {p99:?} from the change to the answer"
        );
        assert!(
            per_watch <= 16.0 * 1024.0,
            "{per_watch:.0} B per parked watch"
        );
        assert!(
            slowest < Duration::from_millis(200),
            "health took {slowest:?}"
        );
    });
}

#[test]
fn past_the_cap_a_watcher_gets_a_fast_503_and_health_is_still_answered() {
    const CAP: usize = 20;
    let (_dir, file) = small_fleet();
    let (ctl, api) = controller(&file, &["--api-max-connections", &CAP.to_string()]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let index = index_of(api).await;
        let (_answers, watchers) = watchers(api, CAP, index, "30s").await;
        parked(api, CAP, Duration::from_secs(10)).await;
        let path = format!("/v1/vips/delta?index={index}&wait=30s");
        // The cap is full: another watcher is told to go elsewhere, at once.
        let t = Instant::now();
        let mut s = TcpStream::connect(api).await.unwrap();
        let (status, head, _) = get_on(&mut s, &path).await.unwrap();
        let took = t.elapsed();
        assert_eq!(status, 503, "{head}");
        assert!(head.contains("retry-after: 5"), "{head}");
        assert!(took < Duration::from_millis(200), "the 503 took {took:?}");
        for p in ["/healthz", "/ready"] {
            let (status, took) = timed_get(api, p).await;
            assert_eq!(status, 200, "{p} at the cap");
            assert!(
                took < Duration::from_millis(200),
                "{p} took {took:?} at the cap"
            );
        }
        drop(watchers);
        // The parked ones gone, a watcher is served again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut s = TcpStream::connect(api).await.unwrap();
        let (status, _, _) = get_on(&mut s, "/v1/vips").await.unwrap();
        assert_eq!(status, 200);
        let over = metric(api, "l4lb_api_over_cap_total").await;
        assert!(over >= Some(3.0), "{over:?}");
    });
    drop(ctl);
}

/// The watchers parked on each controller.
async fn spread(apis: &[SocketAddr]) -> Vec<usize> {
    let mut out = Vec::new();
    for a in apis {
        out.push(metric(*a, "l4lb_api_watchers").await.unwrap_or(0.0) as usize);
    }
    out
}

/// Poll [`spread`] until `done` holds or `within` passes; returns the last spread seen and
/// when it held.
async fn spread_until(
    apis: &[SocketAddr],
    within: Duration,
    done: impl Fn(&[usize]) -> bool,
) -> (Vec<usize>, Option<Duration>) {
    let t = Instant::now();
    loop {
        let s = spread(apis).await;
        if done(&s) {
            return (s, Some(t.elapsed()));
        }
        if t.elapsed() > within {
            return (s, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn agents_spread_over_controllers_fail_over_and_return_gradually() {
    const AGENTS: usize = 30;
    let (_dir, file) = small_fleet();
    let mut ctls: Vec<(Proc, SocketAddr)> = (0..3).map(|_| controller(&file, &[])).collect();
    let apis: Vec<SocketAddr> = ctls.iter().map(|c| c.1).collect();
    let list = apis
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let agents: Vec<(Proc, tempfile::TempDir)> = (0..AGENTS)
        .map(|i| {
            let state = tempfile::tempdir().unwrap();
            let mut cmd = Command::new(BIN);
            cmd.args(crate::common::apps::agent_args(&list))
                .args(["--node-name", &format!("agent-{i}.example.com")])
                .args(["--controller-return-spread", "4s"])
                .arg("--state-dir")
                .arg(state.path());
            (Proc::spawn(&format!("agent {i}"), cmd), state)
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let all = |s: &[usize]| s.iter().sum::<usize>() == AGENTS;
        let (before, held) = spread_until(&apis, Duration::from_secs(30), all).await;
        assert!(held.is_some(), "agents never all watched: {before:?}");
        println!("{AGENTS} agents over 3 controllers: {before:?}");
        assert!(before.iter().all(|&n| n <= 18), "{before:?}");
        // The busiest controller stops: its agents follow the other two within 10 s.
        let gone = (0..3).max_by_key(|&i| before[i]).unwrap();
        let port = apis[gone].port();
        ctls[gone].0.stop_cleanly(Duration::from_secs(10));
        let others: Vec<SocketAddr> = (0..3).filter(|&i| i != gone).map(|i| apis[i]).collect();
        let (after, moved) = spread_until(&others, Duration::from_secs(10), all).await;
        println!("controller {gone} stopped: {after:?} on the other two after {moved:?}");
        assert!(
            moved.is_some(),
            "not all agents moved within 10 s: {after:?}"
        );
        // It comes back on the same address and gets its agents back, not all at once.
        let back = Command::new(BIN);
        let mut back = back;
        back.args(["controller", "--apps-file"]).arg(&file).args([
            "--apps-file-poll",
            "50ms",
            "--api-listen",
            &format!("127.0.0.1:{port}"),
        ]);
        ctls[gone].0 = Proc::spawn("controller (back)", back);
        ctls[gone]
            .0
            .log()
            .wait_for("first table built", Duration::from_secs(20));
        let t = Instant::now();
        let mut seen = Vec::new();
        loop {
            let s = spread(&apis).await;
            seen.push((t.elapsed(), s[gone]));
            if s[gone] >= before[gone] && all(&s) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "controller {gone} did not get its share back: {s:?}, was {before:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let first = seen.iter().find(|(_, n)| *n > 0).map(|(t, _)| *t).unwrap();
        let last = seen.last().map(|(t, _)| *t).unwrap();
        println!(
            "controller {gone} back: its {} agents returned between {first:?} and {last:?}",
            before[gone]
        );
        if before[gone] > 1 {
            assert!(
                last - first >= Duration::from_secs(1),
                "all returned within one second ({first:?}..{last:?})"
            );
        }
    });
    drop(agents);
}

/// An apps file with `/big` (a named VIP of `big` tasks) and `/small` (one task).
fn big_and_small(path: &Path, big: usize) {
    let at = |i: usize| SocketAddr::from(([198, 18, 7, i as u8], 31000));
    let big: Vec<SocketAddr> = (1..=big).map(at).collect();
    write_apps(
        path,
        vec![
            labelled_app("/big", &["/big:80"], "tcp", &big),
            labelled_app("/small", &["/small:80"], "tcp", &[at(100)]),
        ],
    );
}

/// `GET path` on `api`: status and body.
async fn get_text(api: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(api).await.unwrap();
    let (status, _, body) = get_on(&mut s, path).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Issue 21: a label that would make one VIP of more backends than the controller's
/// `--max-backends-per-vip` is rejected with its app in `/v1/label-errors` and counted, and
/// the rest of the table is served; an agent whose own limit a controller's answer passes
/// refuses that answer, says why, and keeps serving its last table.
#[test]
fn a_vip_over_the_backend_limit_is_a_label_error_and_an_agent_keeps_its_last_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    big_and_small(&file, 3);
    let (limited, api) = controller(&file, &["--max-backends-per-vip", "2"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (status, errors) = get_text(api, "/v1/label-errors").await;
        assert_eq!(status, 200);
        let errors: Value = serde_json::from_str(&errors).unwrap();
        let errors = errors.as_array().unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0]["app"], "/big");
        assert_eq!(errors[0]["reason"], "too_many_backends");
        assert_eq!(
            errors[0]["error"],
            "VIP big.marathon.l4lb.thisdcos.directory:80 would have 3 backends, \
             over --max-backends-per-vip 2"
        );
        let (_, vips) = get_text(api, "/v1/vips").await;
        assert!(
            vips.contains("small.marathon") && !vips.contains("big.marathon"),
            "{vips}"
        );
        let (_, metrics) = get_text(api, "/metrics").await;
        assert!(
            metrics.contains("l4lb_label_errors_total{reason=\"too_many_backends\"} 1"),
            "{metrics}"
        );
    });
    drop(limited);

    // A controller without that limit, an agent with it: first a table that fits.
    // (VIPs on loopback, which an agent without a VIP interface serves as they are.)
    big_and_small(&file, 2);
    let (_ctl, api) = controller(&file, &["--vip-cidr", "127.128.0.0/16"]);
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(crate::common::apps::agent_args(&format!("http://{api}")))
        .args(["--max-backends-per-vip", "2"])
        .arg("--state-dir")
        .arg(state.path());
    let agent = Proc::spawn("agent", cmd);
    let log = agent.log();
    let agent_api = log.addr("API listening", Duration::from_secs(20));
    let served = |api| {
        rt.block_on(async {
            let (status, vips) = get_text(api, "/v1/vips").await;
            assert_eq!(status, 200);
            serde_json::from_str::<Vec<l4lb::model::wire::VipJson>>(&vips).unwrap()
        })
    };
    let t = Instant::now();
    while served(agent_api).len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", log.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then one past it: refused, the last table kept.
    big_and_small(&file, 3);
    log.wait_for(
        "VIP big.marathon.l4lb.thisdcos.directory:80 has 3 backends, over --max-backends-per-vip 2",
        Duration::from_secs(20),
    );
    {
        let vips = served(agent_api);
        let big = vips
            .iter()
            .find(|v| v.vip.starts_with("big."))
            .unwrap_or_else(|| panic!("big kept: {vips:?}"));
        assert_eq!(big.backend.len(), 2, "the last table is kept");
        assert!(vips.iter().any(|v| v.vip.starts_with("small.")));
    }
}
