//! Marathon pods against the fake Marathon: the snapshot reads `/v2/pods/::status`, a pod event
//! re-reads that pod alone (`/v2/pods/{id}::status`), and a deleted pod's VIPs go; each
//! running container is answered in `.mesos` under its container's name, as Mesos-DNS does.

use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use l4lb::agent::dns::{DnsCatalog, DnsConfig, answer_packet};

use crate::common::ctl::Ctl;
use crate::common::marathon::FakeMarathon;
use l4lb::source::TableRx;
use l4lb::source::state::BuildConfig;
use serde_json::{Value, json};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/marathon/l4lb-pods-status.json"
);

/// Named VIPs and their backend counts, sorted.
fn names(rx: &TableRx) -> Vec<(String, usize)> {
    let t = rx.borrow();
    let mut out: Vec<_> = t
        .vips
        .values()
        .filter_map(|v| Some((v.name.as_ref()?.label.clone(), v.backends.len())))
        .collect();
    out.sort();
    out
}

async fn wait_names(rx: &mut TableRx, want: &[(&str, usize)]) {
    let want: Vec<(String, usize)> = want.iter().map(|(n, c)| (n.to_string(), *c)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while names(rx) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?}, want {want:?}",
            names(rx)
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

/// A fake Marathon serving the pods of [`FIXTURE`], and those pods.
async fn fake_with_fixture_pods() -> (FakeMarathon, Vec<Value>) {
    let fake = FakeMarathon::start().await;
    let pods: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    for p in &pods {
        fake.put_pod(p.clone());
    }
    (fake, pods)
}

#[tokio::test]
async fn pods_are_read_with_apps_and_followed_by_their_events() {
    let (fake, pods) = fake_with_fixture_pods().await;
    // No resync during the test: only events may change the table.
    let (resync, timeout) = (Duration::from_secs(3600), Duration::from_secs(5));
    let mut ctl = Ctl::marathon(&[fake.url()], BuildConfig::default(), resync, timeout).await;
    wait_names(&mut ctl.rx, &[("db", 3), ("web-pod", 1)]).await;
    wait_for_stream(&fake).await;
    // The second instance of /web-pod starts running: an instance event re-reads the pod.
    let mut web = pods[0].clone();
    web["instances"][1]["containers"][0]["status"] = json!("TASK_RUNNING");
    fake.put_pod(web);
    fake.emit(
        "instance_changed_event",
        json!({"instanceId": "web-pod.instance-2", "condition": "Running", "runSpecId": "/web-pod",
               "agentId": "S2", "host": "198.18.0.2", "runSpecVersion": "2026-11-29T10:00:00.000Z",
               "timestamp": "2026-11-29T10:00:01.000Z", "eventType": "instance_changed_event"}),
    );
    wait_names(&mut ctl.rx, &[("db", 3), ("web-pod", 2)]).await;
    // The db pod is deleted: its name goes.
    fake.remove_pod("/db-pod");
    fake.emit(
        "pod_deleted_event",
        json!({"clientIp": "198.18.0.9", "uri": "/v2/pods/db-pod", "eventType": "pod_deleted_event",
               "timestamp": "2026-11-29T10:00:02.000Z"}),
    );
    wait_names(&mut ctl.rx, &[("web-pod", 2)]).await;
}

async fn wait_for_stream(fake: &FakeMarathon) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fake.event_streams.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no event stream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The stream is counted when requested; give it a moment to be attached.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// `name`'s answer from `catalog`: the code and the records' data, sorted.
fn ask(catalog: &DnsCatalog, name: &str, t: RecordType) -> (ResponseCode, Vec<String>) {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    let a = answer_packet(catalog, &q.to_vec().unwrap(), false).expect("an answer");
    let a = Message::from_vec(&a).unwrap();
    let mut data: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
    data.sort();
    (a.metadata.response_code, data)
}

/// Pods' running containers are Mesos tasks named after their container: the DNS answers
/// `<container>.marathon.mesos` (the instance's address in container networking, else its
/// agent) and the SRV of their host ports; a staging or killing container is no name.
#[tokio::test]
async fn pod_containers_are_answered_under_their_names_in_mesos() {
    let (fake, _) = fake_with_fixture_pods().await;
    let (resync, timeout) = (Duration::from_secs(3600), Duration::from_secs(5));
    let mut ctl = Ctl::marathon(&[fake.url()], BuildConfig::default(), resync, timeout).await;
    let t = ctl.wait(|t| t.apps.contains_key("/db-pod::db")).await;
    let catalog = DnsCatalog::new(&DnsConfig {
        mesos: true,
        ..DnsConfig::default()
    });
    catalog.publish_tasks(&t.apps);
    let ok = |d: &[&str]| {
        (
            ResponseCode::NoError,
            d.iter().map(|s| s.to_string()).collect(),
        )
    };
    assert_eq!(
        ask(&catalog, "web.marathon.mesos.", RecordType::A),
        ok(&["198.18.0.1"])
    );
    assert_eq!(
        ask(&catalog, "sidecar.marathon.mesos.", RecordType::A),
        ok(&["198.18.0.1"])
    );
    assert_eq!(
        ask(&catalog, "db.marathon.mesos.", RecordType::A),
        ok(&["9.0.1.5", "9.0.1.6", "9.0.1.7"])
    );
    assert_eq!(
        ask(&catalog, "_web._tcp.marathon.mesos.", RecordType::SRV),
        ok(&["0 0 31001 web-pod-instance-1-web.web.marathon.mesos."])
    );
    assert_eq!(
        ask(&catalog, "dns.marathon.mesos.", RecordType::A).0,
        ResponseCode::NXDomain
    );
    // The DC/OS zone too.
    assert_eq!(
        ask(
            &catalog,
            "db.marathon.containerip.dcos.thisdcos.directory.",
            RecordType::A
        ),
        ok(&["9.0.1.5", "9.0.1.6", "9.0.1.7"])
    );
}
