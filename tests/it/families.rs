//! Address families end to end (issue #22): a container-network app whose one task has an
//! IPv4 and an IPv6 address, and no IPv6 flag given. Its name gets an A and an AAAA address,
//! each serving its own family: curl to the A address reaches the IPv4 backend, to the AAAA
//! address the IPv6 one, and an IPv6 socket to the A address written IPv4-mapped
//! (`::ffff:a.b.c.d`) the IPv4 one. Its IP VIPs, one per family, serve their own family only.
//! Under `--data-plane proxy` and `--data-plane bpf` alike (root only: each has its own network
//! namespace and, for the kernel path, its own BPF filesystem); `l4lb check` lists the same.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::apps::write_apps;
use crate::common::netns::NetNs;
use crate::common::process::Proc;
use crate::common::{BIN, wait_for};
use crate::follow::Bpffs;

/// The task's two addresses, on the namespace's `eth0`.
const V4: &str = "198.18.0.1";
const V6: &str = "fd00:18::1";
/// The container port, the same on both addresses.
const PORT: u16 = 8080;
const NAME: &str = "dual.marathon.l4lb.thisdcos.directory";
/// The IP VIPs of the same port: one per family.
const IP4: &str = "198.18.5.5";
const IP6: &str = "fd01:d::4";

#[test]
fn a_dual_stack_task_under_the_proxy() {
    skip_unless_root!();
    dual_stack("famp", false);
}

#[test]
fn a_dual_stack_task_under_the_kernel_path() {
    skip_unless_root!();
    dual_stack("famb", true);
}

/// `l4lb check` categorizes as the controller does: each address of the dual-stack name and
/// each IP VIP lists only its own family's backend; a name with only IPv6 backends has no
/// IPv4 address.
#[test]
fn check_lists_each_address_with_its_own_family() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apps.json");
    let mut six = dual_app();
    six["id"] = json!("/six");
    six["container"]["portMappings"][0]["labels"] = json!({"VIP_0": "/six:80"});
    six["tasks"][0]["id"] = json!("six.1");
    six["tasks"][0]["ipAddresses"] = json!([{"ipAddress": "fd00:18::2", "protocol": "IPv6"}]);
    write_apps(&file, vec![dual_app(), six]);
    let vips = crate::common::check_ok(&[std::ffi::OsStr::new("--apps-file"), file.as_os_str()]);
    let rows: Vec<String> = vips
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let ip: std::net::IpAddr = v["ip"].as_str().unwrap().parse().unwrap();
            let backends: Vec<&str> = v["backend"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["ip"].as_str().unwrap())
                .collect();
            let family = if ip.is_ipv4() { "v4" } else { "v6" };
            format!(
                "{} {family} {}",
                v["vip"].as_str().unwrap(),
                backends.join(",")
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            format!("{IP4}:81 v4 {V4}"),
            format!("[{IP6}]:81 v6 {V6}"),
            format!("{NAME}:80 v4 {V4}"),
            format!("{NAME}:80 v6 {V6}"),
            "six.marathon.l4lb.thisdcos.directory:80 v6 fd00:18::2".to_string(),
        ]
    );
}

/// A Marathon app on a container network (`dcos6`) whose task has both addresses.
fn dual_app() -> Value {
    json!({
        "id": "/dual",
        "networks": [{"mode": "container", "name": "dcos6"}],
        "container": {"type": "MESOS", "portMappings": [{
            "containerPort": PORT, "protocol": "tcp", "name": "http",
            "labels": {"VIP_0": "/dual:80", "VIP_1": format!("{IP4}:81"), "VIP_2": format!("{IP6}:81")}
        }]},
        "tasks": [{
            "id": "dual.1", "host": V4, "ports": [], "state": "TASK_RUNNING",
            "ipAddresses": [{"ipAddress": V4, "protocol": "IPv4"}, {"ipAddress": V6, "protocol": "IPv6"}]
        }]
    })
}

/// An HTTP backend on `ip:PORT` that answers with `name`: socat running a script that reads
/// the request head, then writes the answer.
fn backend(ns: &NetNs, dir: &std::path::Path, ip: &str, name: &str) -> Proc {
    let script = dir.join(format!("backend-{name}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile IFS= read -r l; do [ \"$l\" = \"$(printf '\\r')\" ] && break; [ -z \"$l\" ] && break; done\n\
             printf 'HTTP/1.0 200 OK\\r\\nContent-Length: {}\\r\\nConnection: close\\r\\n\\r\\n{name}\\n'\n",
            name.len() + 1
        ),
    )
    .unwrap();
    let listen = match ip.contains(':') {
        true => format!("TCP6-LISTEN:{PORT},bind=[{ip}],fork,reuseaddr,ipv6only=1"),
        false => format!("TCP4-LISTEN:{PORT},bind={ip},fork,reuseaddr"),
    };
    let mut cmd = ns.command("socat");
    cmd.arg(listen)
        .arg(format!("EXEC:/bin/sh {}", script.display()));
    let p = Proc::spawn(&format!("socat {name}"), cmd);
    let url = url(ip, PORT);
    wait_for(
        &format!("backend {name} on {url}"),
        Duration::from_secs(10),
        Duration::from_millis(20),
        || (get(ns, &url).as_deref() == Some(name)).then_some(()),
    );
    p
}

fn url(ip: &str, port: u16) -> String {
    match ip.contains(':') {
        true => format!("http://[{ip}]:{port}/"),
        false => format!("http://{ip}:{port}/"),
    }
}

/// The body curl gets from `url` in `ns`, trimmed; `None` when it fails.
fn get(ns: &NetNs, url: &str) -> Option<String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", "2", url]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The addresses dig finds for `name` of type `qtype` at the agent's DNS.
fn dig(ns: &NetNs, name: &str, qtype: &str) -> Vec<String> {
    ns.dig_short(5454, name, qtype)
}

fn dual_stack(prefix: &str, bpf: bool) {
    let ns = NetNs::with_eth0(prefix, &format!("{V4}/15"));
    // nodad: the address is usable at once, not "tentative" for a second.
    ns.exec_ok(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{V6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let _b4 = backend(&ns, dir.path(), V4, "four");
    let _b6 = backend(&ns, dir.path(), V6, "six");
    let file = dir.path().join("apps.json");
    write_apps(&file, vec![dual_app()]);

    let bpffs = bpf.then(Bpffs::new);
    let mut cmd = ns.command(BIN);
    cmd.args(["run", "--apps-file"])
        .arg(&file)
        .args(["--apps-file-poll", "50ms", "--api-listen", "127.0.0.1:0"])
        .args([
            "--dns-listen",
            "127.0.0.1:5454",
            "--vip-cidr",
            "198.18.128.0/17",
        ])
        .args(["--shutdown-grace", "1s"]);
    match &bpffs {
        Some(fs) => {
            cmd.args(["--data-plane", "bpf", "--bpf-netns-only", "--bpf-instance"])
                .arg(format!("{prefix}-{}", std::process::id()))
                .arg("--bpffs")
                .arg(fs.0.path());
        }
        None => {
            cmd.args(["--data-plane", "proxy"]);
        }
    }
    let mut agent = Proc::spawn("l4lb", cmd);
    let log = agent.log();
    let api = log.addr("API listening", Duration::from_secs(20));
    log.wait_for("first table applied", Duration::from_secs(20));

    // /v1/vips: the name once per address, each with its own family's backend; the IP VIPs
    // likewise; under bpf, every one of them translated in the kernel.
    let plane = if bpf { "bpf" } else { "proxy" };
    let entries = wait_for(
        "the dual-stack VIPs in /v1/vips",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let all: Value = ns.get_json(&format!("http://{api}/v1/vips"))?;
            let rows: Vec<(String, String, String, String)> = all
                .as_array()?
                .iter()
                .map(|v| {
                    let backends: Vec<String> = v["backend"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| b["ip"].as_str().unwrap_or_default().to_string())
                        .collect();
                    (
                        v["vip"].as_str().unwrap_or_default().to_string(),
                        v["ip"].as_str().unwrap_or_default().to_string(),
                        backends.join(","),
                        v["data_plane"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            (rows.len() == 4 && rows.iter().all(|r| r.3 == plane)).then_some(rows)
        },
    );
    let ip_of = |vip: &str, backend: &str| -> String {
        entries
            .iter()
            .find(|r| r.0 == vip && r.2 == backend)
            .map(|r| r.1.clone())
            .unwrap_or_else(|| panic!("no {vip} with backend {backend}: {entries:?}"))
    };
    let a = ip_of(&format!("{NAME}:80"), V4);
    let aaaa = ip_of(&format!("{NAME}:80"), V6);
    assert_eq!(ip_of(&format!("{IP4}:81"), V4), IP4, "{entries:?}");
    assert_eq!(ip_of(&format!("[{IP6}]:81"), V6), IP6, "{entries:?}");
    assert!(
        a.starts_with("198.18.") && aaaa.starts_with("fd01:c::"),
        "{a} {aaaa}"
    );

    // DNS: one A, one AAAA, the addresses of /v1/vips.
    assert_eq!(dig(&ns, NAME, "A"), std::slice::from_ref(&a));
    assert_eq!(dig(&ns, NAME, "AAAA"), std::slice::from_ref(&aaaa));

    // Each address reaches its own family's backend, every time.
    let mapped = format!("::ffff:{a}");
    let cases = [
        (url(&a, 80), "four"),
        (url(&aaaa, 80), "six"),
        (url(&mapped, 80), "four"),
        (url(IP4, 81), "four"),
        (url(IP6, 81), "six"),
    ];
    for (url, want) in &cases {
        for i in 0..5 {
            assert_eq!(
                get(&ns, url).as_deref(),
                Some(*want),
                "{url} try {i} ({plane})"
            );
        }
    }
    if bpf {
        // The kernel path carried them, every address its own family (its counters are read
        // back every second): no VIP without kernel connections, and the proxy saw none.
        wait_for(
            "kernel counters on every VIP",
            Duration::from_secs(5),
            Duration::from_millis(100),
            || {
                let all: Value = ns.get_json(&format!("http://{api}/v1/vips"))?;
                all.as_array()?
                    .iter()
                    .all(|v| {
                        let b = &v["backend"][0];
                        b["kernel_connections"].as_u64().unwrap_or(0) >= 5
                            && b["connects"].as_u64() == Some(0)
                    })
                    .then_some(())
            },
        );
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = agent.exit_within(Duration::from_secs(10));
}
