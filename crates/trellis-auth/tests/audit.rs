//! The audit trail on disk: appended in order across reopenings, and every
//! kind of tampering found by `verify` at the line where it is.

use trellis_auth::audit::{self, AuditLog, Entry, GENESIS};

fn entry(i: u32) -> Entry {
    Entry {
        subject: Some(format!("user-{i}")),
        tenant: Some("acme".into()),
        client_ip: Some("10.0.0.7".into()),
        resource: Some(format!("order-{i}")),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        ..Entry::new("call", "POST /v1/orders", "ok")
    }
}

#[tokio::test]
async fn the_chain_continues_across_reopenings_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    let first = log.append(entry(1)).await.unwrap();
    assert_eq!((first.seq, first.prev.as_str()), (1, GENESIS));
    for i in 2..=5 {
        log.append(entry(i)).await.unwrap();
    }
    drop(log);
    // Reopened: the sequence and the chain go on.
    let log = AuditLog::open(&path).unwrap();
    let sixth = log.append(entry(6)).await.unwrap();
    assert_eq!(sixth.seq, 6);
    let report = audit::verify(&path).unwrap();
    assert_eq!((report.records, report.broken), (6, None));
    assert_eq!(report.head, sixth.hash);
    let records = audit::read_all(&path).unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(records[3].entry, entry(4));
    assert_eq!(records[5].prev, records[4].hash);
}

#[tokio::test]
async fn a_changed_removed_inserted_or_reordered_record_is_found_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&path).unwrap();
    for i in 1..=5 {
        log.append(entry(i)).await.unwrap();
    }
    let good = std::fs::read_to_string(&path).unwrap();
    assert_eq!(audit::verify(&path).unwrap().broken, None);
    let lines: Vec<&str> = good.lines().collect();
    let check = |text: String, line: u64, why: &str| {
        std::fs::write(&path, text).unwrap();
        let report = audit::verify(&path).unwrap();
        let (at, reason) = report
            .broken
            .clone()
            .unwrap_or_else(|| panic!("not found: {why}"));
        assert_eq!(at, line, "{why}: {reason}");
        assert_eq!(report.records, line - 1, "{why}");
    };
    // Changed: an outcome rewritten in place.
    check(
        good.replacen(r#""outcome":"ok""#, r#""outcome":"refused""#, 3)
            .replacen(r#""outcome":"refused""#, r#""outcome":"ok""#, 2),
        3,
        "changed",
    );
    // Removed: the third record gone.
    let mut removed = lines.clone();
    removed.remove(2);
    check(removed.join("\n") + "\n", 3, "removed");
    // Inserted: the second record twice.
    let mut inserted = lines.clone();
    inserted.insert(2, lines[1]);
    check(inserted.join("\n") + "\n", 3, "inserted");
    // Reordered: the fourth before the third.
    let mut swapped = lines.clone();
    swapped.swap(2, 3);
    check(swapped.join("\n") + "\n", 3, "reordered");
    // Renumbered to hide a removal: the hash chain still breaks.
    let mut renumbered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    renumbered.remove(2);
    for (i, l) in renumbered.iter_mut().enumerate().skip(2) {
        *l = l.replacen(
            &format!(r#""seq":{}"#, i + 2),
            &format!(r#""seq":{}"#, i + 1),
            1,
        );
    }
    check(renumbered.join("\n") + "\n", 3, "renumbered");
    // A damaged tail refuses to be appended to.
    std::fs::write(&path, good.clone() + "{not json\n").unwrap();
    assert!(AuditLog::open(&path).is_err());
}
