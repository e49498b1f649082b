//! `trellis audit verify` and `trellis audit tail` on a real trail file.

use std::process::Command;

use trellis::auth::audit::{AuditLog, Entry};

fn trellis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the trellis binary runs")
}

#[tokio::test]
async fn verify_names_the_broken_line_and_tail_prints_the_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    for i in 1..=3 {
        log.append(Entry {
            subject: Some(format!("user-{i}")),
            ..Entry::new("call", "POST orders", "200")
        })
        .await
        .unwrap();
    }
    let file = path.to_str().unwrap();
    let ok = trellis(&["audit", "verify", file]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("3 records, chain intact"), "{stdout}");

    let tail = trellis(&["audit", "tail", "-n", "2", file]);
    assert!(tail.status.success());
    let seqs: Vec<u64> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [2, 3]);

    // One record changed: refused, the line named.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("user-2", "user-9", 1)).unwrap();
    let broken = trellis(&["audit", "verify", file]);
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert_eq!(broken.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}
