use super::*;
use crate::labels::IpPolicy;
use crate::source::entries::assemble;
use crate::source::entries::test_util::{s, summary};
use crate::vip_alloc::VipAllocator;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/marathon");

fn resolve(h: &str) -> Option<IpAddr> {
    (h == "agent-1").then(|| "198.18.1.1".parse().unwrap())
}

#[test]
fn pods_publish_endpoint_labels_with_each_instances_backends() {
    let body = std::fs::read(format!("{FIXTURES}/l4lb-pods-status.json")).unwrap();
    let (pods, bad) = parse_pods(&body).unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    let contribs: Vec<Contribution> = pods
        .iter()
        .map(|p| pod_contribution(p, &mut resolve))
        .collect();
    let mut alloc = VipAllocator::new(
        "11.0.0.0/8".parse().unwrap(),
        "fd01:c::/64".parse().unwrap(),
    );
    let b = assemble(&contribs, "marathon", &IpPolicy::default(), &mut alloc);
    let got = summary(&b.vips, true);
    assert_eq!(
        got,
        [
            // container/bridge: the agent (resolved) and the allocated host port; killing drains.
            s(
                "198.18.5.53",
                "53/tcp",
                &["198.18.1.1:31053 Draining dns-pod.instance-1.dns"]
            ),
            s(
                "198.18.5.53",
                "53/udp",
                &["198.18.1.1:31053 Draining dns-pod.instance-1.dns"]
            ),
            // Container networking: the instance address and the container port; a health
            // check reported healthy → active, unhealthy or not yet reported → draining.
            s(
                "db.marathon.l4lb.thisdcos.directory",
                "5432/tcp",
                &[
                    "9.0.1.5:5432 Active db-pod.instance-1.db",
                    "9.0.1.6:5432 Draining db-pod.instance-2.db",
                    "9.0.1.7:5432 Draining db-pod.instance-3.db"
                ]
            ),
            // Host networking: the running instance's agent and allocated port; staging is none.
            s(
                "web-pod.marathon.l4lb.thisdcos.directory",
                "80/tcp",
                &["198.18.0.1:31001 Active web-pod.instance-1.web"]
            ),
        ]
    );
    let reasons: Vec<_> = b
        .rejections
        .iter()
        .map(|r| (r.app.as_str(), r.key.as_str(), r.reason))
        .collect();
    assert_eq!(reasons, [("/dns-pod", "VIP_1", "bad_port")]);
    // The single-pod answer parses the same way.
    let one = serde_json::to_vec(&serde_json::from_slice::<Vec<Value>>(&body).unwrap()[1]).unwrap();
    assert_eq!(
        pod_contribution(&parse_pod(&one).unwrap(), &mut resolve),
        contribs[1]
    );
}

#[test]
fn broken_pods_are_skipped_alone() {
    let (pods, bad) =
        parse_pods(br#"[{"id":"/ok"},{"id":"/bad","spec":{"containers":"x"}},{"nope":1}]"#)
            .unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(bad.len(), 2);
    assert!(parse_pods(b"{}").is_err());
}

/// Each running container is a Mesos task named after its container: task names the DNS
/// serves as `<container>.marathon.mesos` (host ports from its endpoints, container
/// addresses in container networking); staging and killing containers are none.
#[test]
fn running_containers_are_tasks_named_after_their_container() {
    let body = std::fs::read(format!("{FIXTURES}/l4lb-pods-status.json")).unwrap();
    let (pods, _) = parse_pods(&body).unwrap();
    let contribs: Vec<Contribution> = pods
        .iter()
        .map(|p| pod_contribution(p, &mut resolve))
        .collect();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let task = |id: &str, host: &str, container: &[&str], ports: Vec<TaskPort>| TaskRecord {
        id: id.into(),
        host: Some(ip(host)),
        container: container.iter().map(|c| ip(c)).collect(),
        ports,
    };
    let http = TaskPort {
        port: 31001,
        protocol: crate::model::Protocol::Tcp,
        name: Some("http".into()),
    };
    assert_eq!(
        contribs[0].named_tasks,
        [
            (
                "sidecar".to_string(),
                vec![task(
                    "web-pod.instance-1.sidecar",
                    "198.18.0.1",
                    &[],
                    vec![]
                )]
            ),
            (
                "web".to_string(),
                vec![task(
                    "web-pod.instance-1.web",
                    "198.18.0.1",
                    &[],
                    vec![http]
                )]
            ),
        ]
    );
    assert_eq!(
        contribs[1].named_tasks,
        [(
            "db".to_string(),
            vec![
                task("db-pod.instance-1.db", "198.18.0.1", &["9.0.1.5"], vec![]),
                task("db-pod.instance-2.db", "198.18.0.2", &["9.0.1.6"], vec![]),
                task("db-pod.instance-3.db", "198.18.0.3", &["9.0.1.7"], vec![]),
            ]
        )]
    );
    assert!(
        contribs[2].named_tasks.is_empty(),
        "a killing container is no task name"
    );
    assert!(
        contribs
            .iter()
            .all(|c| c.tasks.is_empty() && c.task_name.is_none())
    );
    // In the table: under `<pod>::<container>`, with the container's name.
    let apps = crate::source::entries::app_tasks(&contribs, "marathon");
    let keys: Vec<(&str, &str)> = apps
        .iter()
        .map(|(k, t)| (k.as_str(), t.name.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("/db-pod::db", "db"),
            ("/web-pod::sidecar", "sidecar"),
            ("/web-pod::web", "web")
        ]
    );
}
