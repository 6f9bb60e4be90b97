//! The Mesos source against a fake master serving the real operator-API payloads: leader
//! redirects with credentials, events one by one in chunked RecordIO, a stream dropped in the
//! middle of a frame, `GET_STATE` as the fallback, and the latency from an event to a blocked
//! `/v1/vips` watcher.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::ctl::Ctl;
use crate::common::mesos::{FakeMesos, fixture, fixture_lines};
use crate::common::process::Proc;
use crate::common::{BIN, get_json};
use l4lb::model::VipTable;
use l4lb::model::wire::{VipJson, table_to_json};
use l4lb::source::http::Auth;

/// (name or IP, port/protocol, backends with state) of each VIP as the API shows it, sorted.
fn summary(t: &VipTable) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<_> = table_to_json(t)
        .into_iter()
        .map(|v| {
            let backends = v
                .backend
                .iter()
                .map(|b| format!("{} {:?}", SocketAddr::new(b.ip, b.port), b.state))
                .collect();
            let name = v.name.unwrap_or_else(|| v.ip.to_string());
            (name, format!("{}/{}", v.port, v.protocol), backends)
        })
        .collect();
    out.sort();
    out
}

/// The names the API at `api` serves, sorted.
async fn vip_names(api: SocketAddr) -> Vec<String> {
    let vips: Vec<VipJson> = get_json(&format!("http://{api}/v1/vips")).await;
    let mut names: Vec<String> = vips.into_iter().filter_map(|v| v.name).collect();
    names.sort();
    names
}

fn s(name: &str, port: &str, backends: &[&str]) -> (String, String, Vec<String>) {
    (
        name.into(),
        port.into(),
        backends.iter().map(|b| b.to_string()).collect(),
    )
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const API: &str = "api.hello-world.marathon.l4lb.thisdcos.directory";
const APP: &str = "app.marathon.l4lb.thisdcos.directory";

#[tokio::test]
async fn follows_the_leader_with_credentials_and_applies_a_stream_event_by_event() {
    let leader = FakeMesos::start().await;
    leader.require_auth("token=s3cret");
    leader.set_script(fixture_lines("hello-overlay.json"));
    let follower = FakeMesos::start().await;
    follower.redirect_to(leader.addr);
    let mut ctl = Ctl::mesos(&[follower.url()], Auth::Token("s3cret".into())).await;
    let want = [
        s(API, "80/tcp", &["10.0.0.49:19630 Active"]),
        s(
            "host-vip.hello-world.l4lb.thisdcos.directory",
            "80/tcp",
            &["10.0.0.49:4044 Active"],
        ),
        s(
            "overlay-vip.hello-world.l4lb.thisdcos.directory",
            "80/tcp",
            &["9.0.2.3:4044 Active"],
        ),
    ];
    let t = ctl.wait(|t| summary(t) == want).await;
    assert_eq!(summary(&t), want);
    assert_eq!(leader.subscribes.load(Ordering::SeqCst), 1);
    assert_eq!(leader.unauthorized.load(Ordering::SeqCst), 0);
    assert!(follower.redirects.load(Ordering::SeqCst) >= 1);
    // The same through the API.
    assert_eq!(
        vip_names(ctl.api).await,
        want.iter().map(|w| w.0.clone()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn wrong_credentials_are_refused_and_nothing_is_published() {
    let leader = FakeMesos::start().await;
    leader.require_auth("token=s3cret");
    leader.set_script(fixture_lines("hello-overlay.json"));
    leader.set_state(fixture("tcp-and-udp.json"));
    let ctl = Ctl::mesos(&[leader.url()], Auth::Token("wrong".into())).await;
    wait_until("two refusals", || {
        leader.unauthorized.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        ctl.rx.borrow().version,
        0,
        "no table from a master that refused us"
    );
}

/// GET /v1/vips blocking on `index`.
async fn blocking_vips(api: SocketAddr, index: u64) -> Vec<VipJson> {
    get_json(&format!("http://{api}/v1/vips?index={index}&wait=10s")).await
}

#[tokio::test]
async fn an_event_reaches_a_blocked_watcher_within_milliseconds() {
    let lines = fixture_lines("hello-world.json");
    let leader = FakeMesos::start().await;
    leader.set_script(vec![lines[0].clone()]);
    let mut ctl = Ctl::mesos(&[leader.url()], Auth::None).await;
    let first = ctl.wait(|t| !t.vips.is_empty()).await;
    assert_eq!(
        summary(&first),
        [s(API, "80/tcp", &["172.17.0.4:21872 Active"])]
    );
    let mut worst = Duration::ZERO;
    // TASK_KILLING (draining), then TASK_KILLED (gone): each wakes the watcher.
    let mut index = first.version;
    for (line, want) in [(&lines[1], "Draining"), (&lines[2], "")] {
        let api = ctl.api;
        let watcher = tokio::spawn(async move { blocking_vips(api, index).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = Instant::now();
        leader.emit(line);
        let vips = watcher.await.unwrap();
        let took = sent.elapsed();
        worst = worst.max(took);
        let states: Vec<String> = vips
            .iter()
            .flat_map(|v| &v.backend)
            .map(|b| format!("{:?}", b.state))
            .collect();
        if want.is_empty() {
            assert!(vips.is_empty(), "{vips:?}");
        } else {
            assert_eq!(states, [want]);
        }
        index = ctl.rx.borrow().version;
    }
    eprintln!("event -> blocked watcher: worst {worst:?}");
    assert!(worst < Duration::from_millis(250), "took {worst:?}");
}

#[tokio::test]
async fn a_stream_dropped_mid_frame_reads_the_state_and_subscribes_again() {
    let lines = fixture_lines("hello-world.json");
    let leader = FakeMesos::start().await;
    leader.set_script(vec![lines[0].clone()]);
    leader.set_state(fixture("tcp-and-udp.json"));
    let mut ctl = Ctl::mesos(&[leader.url()], Auth::None).await;
    ctl.wait(|t| !t.vips.is_empty()).await;
    wait_until("the stream", || leader.open_streams() == 1).await;
    leader.cut();
    // The state is read at once, then the stream is opened again (its SUBSCRIBED wins).
    wait_until("GET_STATE and a new SUBSCRIBE", || {
        leader.get_states.load(Ordering::SeqCst) >= 1 && leader.open_streams() == 1
    })
    .await;
    assert_eq!(leader.subscribes.load(Ordering::SeqCst), 2);
    let t = ctl
        .wait(|t| summary(t) == [s(API, "80/tcp", &["172.17.0.4:21872 Active"])])
        .await;
    // Events flow on the new stream.
    leader.emit(&lines[1]);
    let t = ctl.wait(|n| n.version > t.version).await;
    assert_eq!(
        summary(&t),
        [s(API, "80/tcp", &["172.17.0.4:21872 Draining"])]
    );
}

#[tokio::test]
async fn get_state_is_the_fallback_when_subscribe_is_refused() {
    let leader = FakeMesos::start().await;
    leader.refuse_subscribe(true);
    leader.set_state(fixture("tcp-and-udp.json"));
    let mut ctl = Ctl::mesos(&[leader.url()], Auth::None).await;
    let t = ctl.wait(|t| !t.vips.is_empty()).await;
    // One task, its label on a tcp and a udp port: two VIPs of one name.
    let app = |port| s(APP, port, &["172.17.0.3:6416 Active"]);
    assert_eq!(summary(&t), [app("80/tcp"), app("80/udp")]);
    // It keeps trying to subscribe; once the master accepts, the stream takes over.
    leader.set_script(fixture_lines("hello-overlay.json"));
    leader.refuse_subscribe(false);
    ctl.wait(|t| summary(t).iter().any(|v| v.0 == API)).await;
    assert_eq!(leader.subscribes.load(Ordering::SeqCst), 1);
}

/// `l4lb check` with `args`: its exit code, stdout and stderr.
fn check(args: &[&str]) -> (Option<i32>, Vec<u8>, String) {
    let out = std::process::Command::new(BIN)
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), out.stdout, err)
}

#[test]
fn check_reads_a_get_state_file() {
    let file = format!("{}/tcp-and-udp.json", crate::common::mesos::FIXTURES);
    let (code, out, err) = check(&["--mesos-state-file", &file]);
    assert_eq!(code, Some(0), "{err}");
    let vips: Vec<VipJson> = serde_json::from_slice(&out).unwrap();
    let got: Vec<String> = vips
        .iter()
        .map(|v| format!("{} {}", v.vip, v.protocol.as_str()))
        .collect();
    assert_eq!(got, [format!("{APP}:80 tcp"), format!("{APP}:80 udp")]);
    // A bad label is reported with its task and reason, and fails the check.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("state.json");
    std::fs::write(
        &bad,
        fixture("tcp-and-udp.json").replace("/app:80", "/app:70000"),
    )
    .unwrap();
    let (code, _, err) = check(&["--mesos-state-file", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("[bad_port]") && err.contains("app.80eefa01"),
        "{err}"
    );
    // Not both files at once.
    let (code, _, _) = check(&["--mesos-state-file", &file, "--apps-file", &file]);
    assert_ne!(code, Some(0));
}

/// The real binary follows a Mesos master that demands a token, given by the source flags'
/// environment variables under their neutral names and under the old Marathon ones.
#[tokio::test]
async fn controller_binary_follows_mesos_with_credentials_by_new_or_old_names() {
    l4lb::tls::init();
    for env in [
        [
            ("L4LB_SOURCE_AUTH", "token"),
            ("L4LB_SOURCE_CREDENTIALS", "s3cret"),
        ],
        [
            ("L4LB_MARATHON_AUTH", "token"),
            ("L4LB_MARATHON_CREDENTIALS", "s3cret"),
        ],
    ] {
        let leader = FakeMesos::start().await;
        leader.require_auth("token=s3cret");
        leader.set_script(fixture_lines("hello-overlay.json"));
        let url = leader.url();
        let (_proc, api) = tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(BIN);
            cmd.args(["controller", "--mesos", &url, "--api-listen", "127.0.0.1:0"])
                .envs(env);
            let p = Proc::spawn("l4lb", cmd);
            let addr: SocketAddr = p.log().addr("API listening", Duration::from_secs(20));
            (p, addr)
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names = vip_names(api).await;
            if names
                == [
                    API,
                    "host-vip.hello-world.l4lb.thisdcos.directory",
                    "overlay-vip.hello-world.l4lb.thisdcos.directory",
                ]
            {
                break;
            }
            assert!(Instant::now() < deadline, "{env:?}: still {names:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(leader.subscribes.load(Ordering::SeqCst), 1, "{env:?}");
        assert_eq!(leader.unauthorized.load(Ordering::SeqCst), 0, "{env:?}");
    }
}

#[tokio::test]
async fn a_new_leader_after_fail_over_is_found_through_the_configured_masters() {
    let lines = fixture_lines("hello-world.json");
    let a = FakeMesos::start().await;
    a.set_script(vec![lines[0].clone()]);
    let b = FakeMesos::start().await;
    b.redirect_to(a.addr);
    let mut ctl = Ctl::mesos(&[b.url()], Auth::None).await;
    ctl.wait(|t| !t.vips.is_empty()).await;
    assert_eq!(a.subscribes.load(Ordering::SeqCst), 1);
    // The leader dies; the other master takes over with the state that has the task killing.
    a.stop();
    a.cut();
    b.set_script(vec![lines[0].clone(), lines[1].clone()]);
    b.lead();
    let t = ctl
        .wait(|t| summary(t) == [s(API, "80/tcp", &["172.17.0.4:21872 Draining"])])
        .await;
    assert!(t.version > 0);
    assert_eq!(b.subscribes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_silent_stream_is_dropped_after_three_heartbeat_intervals() {
    let lines = fixture_lines("hello-world.json");
    // The master promises a heartbeat every 0.2 s and then sends nothing: after three intervals
    // (at least a second) the stream counts as dead and is opened again.
    let mut first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    first["subscribed"]["heartbeat_interval_seconds"] = serde_json::json!(0.2);
    let leader = FakeMesos::start().await;
    leader.set_script(vec![first.to_string()]);
    let started = Instant::now();
    let mut ctl = Ctl::mesos(&[leader.url()], Auth::None).await;
    ctl.wait(|t| !t.vips.is_empty()).await;
    wait_until("a second subscription", || {
        leader.subscribes.load(Ordering::SeqCst) >= 2
    })
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(leader.get_states.load(Ordering::SeqCst) >= 1);
}
