//! Peak memory per input byte: a Marathon answer costs a small multiple of its size, however
//! many apps it holds (issue: a 16 MiB `/v2/apps` of minimal apps once took 1.5–2.5 GiB).
//! Measured exactly: the test re-runs this binary as a child whose only child is
//! `l4lb check`, and that child reports its children's peak RSS (`getrusage`).

use std::process::{Command, Stdio};

use crate::common::BIN;

/// Peak RSS (KiB) of `l4lb check --apps-file path`, measured in a child of our own.
fn peak_kib(path: &std::path::Path) -> u64 {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "memory::measure_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("L4LB_MEMORY_FILE", path)
        .stdin(Stdio::null())
        .output()
        .expect("run the measuring child");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("maxrss_kib=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no measurement: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Only as the child of [`a_marathon_answer_costs_a_small_multiple_of_its_size`].
#[test]
#[ignore = "run as a child by a_marathon_answer_costs_a_small_multiple_of_its_size"]
fn measure_child() {
    let file = std::env::var_os("L4LB_MEMORY_FILE").expect("L4LB_MEMORY_FILE");
    let st = Command::new(BIN)
        .arg("check")
        .arg("--apps-file")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run l4lb check");
    assert!(st.code().is_some(), "l4lb check was killed: {st}");
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    println!("maxrss_kib={}", ru.max_rss());
}

#[test]
fn a_marathon_answer_costs_a_small_multiple_of_its_size() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB of minimal apps: the worst case per byte (every app is overhead, none a VIP).
    let mut body = String::from("{\"apps\":[");
    let mut n = 0;
    while body.len() < 16 << 20 {
        if n > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "{{\"id\":\"/a{n}\",\"instances\":1,\"portDefinitions\":[{{\"port\":0,\"protocol\":\"tcp\"}}],\"tasks\":[]}}"
        ));
        n += 1;
    }
    body.push_str("]}");
    let big = dir.path().join("apps.json");
    std::fs::write(&big, &body).unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{\"apps\":[]}").unwrap();
    let (base, peak) = (peak_kib(&empty), peak_kib(&big));
    let per_byte = (peak.saturating_sub(base) * 1024) as f64 / body.len() as f64;
    eprintln!(
        "{n} apps, {} bytes: peak {peak} KiB, empty {base} KiB: {per_byte:.2} bytes per input byte",
        body.len()
    );
    assert!(
        per_byte <= 4.0,
        "{per_byte:.2} bytes of memory per input byte"
    );
}
