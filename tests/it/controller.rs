//! The control plane against a fake Marathon: snapshot, SSE invalidation, blocking watches,
//! faults that must keep the last good table.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::ctl::Ctl;
use crate::common::marathon::{FakeMarathon, Fault, add_task, host_app, task};
use l4lb::api;
use l4lb::model::wire::VipJson;
use l4lb::source::http::{Auth, SourceClient};
use l4lb::source::marathon::client::Client;
use l4lb::source::state::BuildConfig;
use serde_json::Value;

/// (resync interval, request timeout): events alone change the table...
const QUIET: (Duration, Duration) = (Duration::from_secs(300), Duration::from_secs(2));
/// ...or a resync every 100 ms, each request given 500 ms.
const EAGER: (Duration, Duration) = (Duration::from_millis(100), Duration::from_millis(500));

/// A controller following the Marathon masters `urls` with `timing`.
async fn start_controller(urls: &[String], (resync, timeout): (Duration, Duration)) -> Ctl {
    let build = BuildConfig {
        vip_cidr: "198.18.128.0/17".parse().unwrap(),
        ..BuildConfig::default()
    };
    Ctl::marathon(urls, build, resync, timeout).await
}

/// A fake Marathon serving `apps` and a controller following `before` (masters tried first)
/// and then the fake, once its first table is out and the event stream's snapshot settled;
/// with the version it holds then.
async fn follow(
    apps: Vec<Value>,
    before: &[String],
    timing: (Duration, Duration),
) -> (FakeMarathon, Ctl, u64) {
    l4lb::tls::init();
    let fake = FakeMarathon::start().await;
    for app in apps {
        fake.put_app(app);
    }
    let mut urls = before.to_vec();
    urls.push(fake.url());
    let mut ctl = start_controller(&urls, timing).await;
    ctl.wait_version(0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v = ctl.rx.borrow().version;
    (fake, ctl, v)
}

/// GET /v1/vips, optionally blocking; returns the index header and the VIPs.
async fn get_vips(api: SocketAddr, index: Option<u64>, wait: &str) -> (u64, Vec<VipJson>) {
    let q = index
        .map(|i| format!("?index={i}&wait={wait}"))
        .unwrap_or_default();
    let r = reqwest::get(format!("http://{api}/v1/vips{q}"))
        .await
        .unwrap();
    assert!(r.status().is_success());
    let idx = r.headers()[api::INDEX_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (idx, r.json().await.unwrap())
}

fn web_app(n_tasks: usize) -> serde_json::Value {
    let mut app = host_app("/web", &["/web:80"], "tcp");
    for i in 0..n_tasks {
        add_task(
            &mut app,
            task(
                "/web",
                i,
                &format!("198.18.0.{}", i + 1),
                &[31000 + i as u16],
                "TASK_RUNNING",
            ),
        );
    }
    app
}

fn backends(v: &[VipJson]) -> Vec<String> {
    v.iter()
        .flat_map(|v| v.backend.iter().map(|b| format!("{}:{}", b.ip, b.port)))
        .collect()
}

#[tokio::test]
async fn scale_up_through_the_event_stream_wakes_a_blocked_watcher() {
    let (fake, ctl, v0) = follow(vec![web_app(1)], &[], QUIET).await;
    // Let the stream connect and its reconnect snapshot settle. The start snapshot and the
    // reconnect one may be one read when the stream attaches first.
    tokio::time::timeout(Duration::from_secs(15), async {
        while fake.event_streams.load(Ordering::SeqCst) == 0
            || fake.apps_since_stream.load(Ordering::SeqCst) == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (idx, vips) = get_vips(ctl.api, None, "").await;
    assert!(idx >= v0);
    assert_eq!(vips.len(), 1);
    assert_eq!(vips[0].vip, "web.marathon.l4lb.thisdcos.directory:80");
    assert_eq!(backends(&vips), vec!["198.18.0.1:31000"]);

    let snapshots_before = fake.apps_requests.load(Ordering::SeqCst);
    let mut delays = Vec::new();
    let mut index = idx;
    for n in 1..=100usize {
        let watcher = tokio::spawn(get_vips(ctl.api, Some(index), "10s"));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut app = fake.app("/web").unwrap();
        let t = task(
            "/web",
            n,
            &format!("198.18.{}.{}", 1 + n / 250, 1 + n % 250),
            &[31000 + n as u16],
            "TASK_RUNNING",
        );
        let tid = t["id"].as_str().unwrap().to_string();
        add_task(&mut app, t);
        fake.put_app(app);
        let sent = Instant::now();
        fake.emit_status("/web", &tid, "TASK_RUNNING");
        let (new_index, vips) = watcher.await.unwrap();
        delays.push(sent.elapsed());
        assert!(new_index > index);
        assert_eq!(backends(&vips).len(), n + 1, "iteration {n}");
        index = new_index;
    }
    // Every change came through single-app reads, not full snapshots.
    assert_eq!(fake.apps_requests.load(Ordering::SeqCst), snapshots_before);
    assert!(fake.app_requests.load(Ordering::SeqCst) >= 100);
    delays.sort();
    println!(
        "event -> watcher: median {:?}, worst {:?} over {} changes",
        delays[delays.len() / 2],
        delays[delays.len() - 1],
        delays.len()
    );
}

#[tokio::test]
async fn a_killed_task_leaves_and_a_deleted_app_goes() {
    let (fake, mut ctl, v) = follow(vec![web_app(2)], &[], QUIET).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert_eq!(backends(&vips).len(), 2);

    let mut app = fake.app("/web").unwrap();
    let killed = app["tasks"][1]["id"].as_str().unwrap().to_string();
    app["tasks"].as_array_mut().unwrap().remove(1);
    fake.put_app(app);
    fake.emit_status("/web", &killed, "TASK_KILLED");
    let v2 = ctl.wait_version(v).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert_eq!(backends(&vips), vec!["198.18.0.1:31000"]);

    fake.remove_app("/web");
    fake.emit("app_terminated_event", serde_json::json!({"eventType": "app_terminated_event", "appId": "/web", "timestamp": "2014-03-01T23:29:30.158Z"}));
    ctl.wait_version(v2).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert!(vips.is_empty());
}

#[tokio::test]
async fn faults_keep_the_last_good_table_then_recover() {
    let (fake, mut ctl, _) = follow(vec![web_app(1)], &[], EAGER).await;
    let good = ctl.rx.borrow().clone();

    for fault in [
        Fault::Garbage,
        Fault::Truncated,
        Fault::Status(503),
        Fault::Hang,
    ] {
        fake.set_fault(fault);
        let before = fake.apps_requests.load(Ordering::SeqCst);
        // A change arrives while Marathon is broken: event and resync both fail.
        let mut app = fake.app("/web").unwrap();
        app["tasks"] = serde_json::json!([]);
        fake.put_app(app);
        fake.emit_status("/web", "x", "TASK_KILLED");
        tokio::time::timeout(Duration::from_secs(10), async {
            while fake.apps_requests.load(Ordering::SeqCst) < before + 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no resync attempts under {fault:?}"));
        let now = ctl.rx.borrow().clone();
        assert_eq!(now.version, good.version, "{fault:?} replaced the table");
        let (_, vips) = get_vips(ctl.api, None, "").await;
        assert_eq!(backends(&vips), vec!["198.18.0.1:31000"], "{fault:?}");
        fake.put_app(web_app(1));
    }
    ctl.assert_metrics(&[
        "l4lb_sync_errors_total{kind=\"payload\"}",
        "l4lb_sync_errors_total{kind=\"timeout\"}",
        "l4lb_sync_errors_total{kind=\"status_5xx\"}",
    ])
    .await;

    // Recovery: the change made during the outage now lands.
    fake.set_fault(Fault::None);
    let mut app = fake.app("/web").unwrap();
    app["tasks"] = serde_json::json!([]);
    fake.put_app(app);
    ctl.wait_version(good.version).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert!(backends(&vips).is_empty());
}

#[tokio::test]
async fn an_oversized_marathon_answer_is_an_error_not_a_memory_spike() {
    l4lb::tls::init();
    let fake = FakeMarathon::start().await;
    for i in 0..20 {
        fake.put_app(host_app(&format!("/app-{i}"), &["/web:80"], "tcp"));
    }
    let url = fake.url().parse().unwrap();
    let client = Client::new(vec![url], Auth::None, Duration::from_secs(2)).unwrap();
    let whole = client.apps().await.unwrap();
    assert!(whole.len() > 1024, "{}", whole.len());
    let capped = client.clone().with_max_body(1024);
    let err = capped.apps().await.unwrap_err();
    assert_eq!(err.kind(), "too_large", "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
    // One byte more than the answer is enough.
    let exact = client.with_max_body(whole.len());
    assert_eq!(exact.apps().await.unwrap(), whole);
}

#[tokio::test]
async fn marathon_going_away_keeps_the_table_and_failover_finds_another_master() {
    l4lb::tls::init();
    // The first master refuses connections (bound then dropped); the second serves.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (fake, ctl, v) = follow(vec![web_app(3)], &[format!("http://{dead}")], EAGER).await;
    fake.stop();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(ctl.rx.borrow().version, v);
    let (idx, vips) = get_vips(ctl.api, None, "").await;
    assert_eq!(idx, v);
    assert_eq!(backends(&vips).len(), 3);
    ctl.assert_metrics(&["l4lb_sync_errors_total{kind=\"connect\"}"])
        .await;
}

#[tokio::test]
async fn a_bad_label_drops_only_itself_and_is_counted() {
    let mut app = host_app(
        "/mixed",
        &["/good:80", "missing-port", "198.18.0.1:80"],
        "tcp",
    );
    add_task(
        &mut app,
        task(
            "/mixed",
            0,
            "198.18.0.1",
            &[31000, 31001, 31002],
            "TASK_RUNNING",
        ),
    );
    let (_fake, ctl, _) = follow(vec![app], &[], QUIET).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert_eq!(vips.len(), 1);
    assert_eq!(vips[0].vip, "good.marathon.l4lb.thisdcos.directory:80");
    ctl.assert_metrics(&[
        "l4lb_label_errors_total{reason=\"missing_port\"} 1",
        "l4lb_label_errors_total{reason=\"cluster_address\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn etag_and_blocking_query_edges() {
    let (_fake, ctl, _) = follow(vec![web_app(1)], &[], QUIET).await;
    let r = reqwest::get(format!("http://{}/v1/vips", ctl.api))
        .await
        .unwrap();
    let etag = r.headers()["etag"].clone();
    let index: u64 = r.headers()[api::INDEX_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let r2 = reqwest::Client::new()
        .get(format!("http://{}/v1/vips", ctl.api))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 304);
    // No change: the blocking query returns at the end of its wait with the same index.
    let t = Instant::now();
    let (same, _) = get_vips(ctl.api, Some(index), "300ms").await;
    assert_eq!(same, index);
    assert!(t.elapsed() >= Duration::from_millis(250));
    // An index from the future (a restarted controller) answers at once.
    let t = Instant::now();
    get_vips(ctl.api, Some(index + 1000), "10s").await;
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn apps_file_is_reread_on_change_and_a_bad_edit_keeps_the_table() {
    l4lb::tls::init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apps.json");
    // Edits land atomically (write + rename, as editors and config management do), so the
    // 20 ms poller never reads a half-written file and the error counts below are exact.
    let put = |body: String| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let write = |n: usize| put(serde_json::json!({ "apps": [web_app(n)] }).to_string());
    write(1);
    let file = path.clone();
    let mut ctl = Ctl::start(BuildConfig::default(), |publisher, stop| {
        l4lb::source::file::run(
            file,
            Duration::from_millis(20),
            publisher,
            l4lb::source::marathon::apps::contributions,
            stop,
        )
    })
    .await;
    let v1 = ctl.wait_version(0).await;
    write(2);
    let v2 = ctl.wait_version(v1).await;
    assert_eq!(ctl.rx.borrow().backend_count(), 2);
    put("{\"apps\": [ {\"id\": ".to_string());
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ctl.rx.borrow().version,
        v2,
        "a bad edit or a missing file replaced the table"
    );
    assert_eq!(ctl.rx.borrow().backend_count(), 2);
    write(3);
    ctl.wait_version(v2).await;
    assert_eq!(ctl.rx.borrow().backend_count(), 3);
    ctl.assert_metrics(&[
        "l4lb_sync_errors_total{kind=\"file_payload\"} 1",
        "l4lb_sync_errors_total{kind=\"file_read\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn delta_watch_carries_only_the_change_and_falls_back_to_full() {
    let mut other = host_app("/other", &["/other:90"], "tcp");
    add_task(
        &mut other,
        task("/other", 0, "198.18.0.9", &[32000], "TASK_RUNNING"),
    );
    let (fake, ctl, _) = follow(vec![web_app(1), other], &[], QUIET).await;
    let get_delta = |index: u64| {
        let api = ctl.api;
        async move {
            let r = reqwest::get(format!("http://{api}/v1/vips/delta?index={index}&wait=10s"))
                .await
                .unwrap();
            let idx: u64 = r.headers()[api::INDEX_HEADER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            (idx, r.json::<l4lb::model::wire::DeltaJson>().await.unwrap())
        }
    };
    // From nothing: the full table.
    let (v1, full) = get_delta(0).await;
    assert!(full.full);
    assert_eq!(full.upsert.len(), 2);
    let mirror = full.clone().apply(&l4lb::model::VipTable::default());

    // A scale-up of /web: the delta holds /web only.
    let watcher = tokio::spawn(get_delta(v1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut app = fake.app("/web").unwrap();
    add_task(
        &mut app,
        task("/web", 1, "198.18.0.2", &[31001], "TASK_RUNNING"),
    );
    fake.put_app(app);
    fake.emit_status("/web", "web.1", "TASK_RUNNING");
    let (v2, d) = watcher.await.unwrap();
    assert!(v2 > v1 && !d.full && d.from == v1 && d.to == v2);
    assert_eq!(d.upsert.len(), 1);
    assert_eq!(d.upsert[0].vip, "web.marathon.l4lb.thisdcos.directory:80");
    assert!(d.remove.is_empty());
    let mirror = d.apply(&mirror);
    assert!(mirror.same_content(&ctl.rx.borrow()));

    // An index this controller never served: the full table again.
    let (_, again) = get_delta(v1 - 1).await;
    assert!(again.full);
}

/// Marathon answers 404 on the single read of a live app during a deployment: the app's VIPs
/// stay until a full read says otherwise, a storm of such 404s costs about one full read a
/// second, and an app really gone is still dropped.
#[tokio::test]
async fn a_404_for_a_held_app_is_confirmed_by_a_full_read_before_anything_is_dropped() {
    let (fake, mut ctl, v) = follow(vec![web_app(2)], &[], QUIET).await;
    fake.set_single_404(true);
    let before = fake.apps_requests.load(Ordering::SeqCst);
    let task = fake.app("/web").unwrap()["tasks"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // 60 events over 3 s, each naming the live app.
    let start = Instant::now();
    for _ in 0..60 {
        fake.emit_status("/web", &task, "TASK_RUNNING");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, vips) = get_vips(ctl.api, None, "").await;
        assert_eq!(
            backends(&vips).len(),
            2,
            "a 404 dropped a live app's backends"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert_eq!(backends(&vips).len(), 2);
    let full_reads = fake.apps_requests.load(Ordering::SeqCst) - before;
    let secs = start.elapsed().as_secs() + 1;
    println!(
        "60 events answered 404 over {:?}: {full_reads} full reads",
        start.elapsed()
    );
    assert!(full_reads >= 1, "no full read confirmed the 404");
    assert!(
        full_reads <= secs + 1,
        "{full_reads} full reads in {secs} s"
    );
    assert_eq!(ctl.rx.borrow().version, v, "the table changed");
    // Gone for real: the confirming read drops it.
    fake.remove_app("/web");
    fake.emit("app_terminated_event", serde_json::json!({"eventType": "app_terminated_event", "appId": "/web", "timestamp": "2014-03-01T23:29:30.158Z"}));
    ctl.wait_version(v).await;
    let (_, vips) = get_vips(ctl.api, None, "").await;
    assert!(vips.is_empty());
}
