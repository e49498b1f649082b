//! The shop's events: order, inventory and payment publish through their
//! outboxes — on the embedded log under `trellis up`, on NATS JetStream
//! with `--events nats://…` — the order history projection follows them,
//! `trellis events tail` shows them decoded and `trellis events replay`
//! rebuilds the projection; the user service's notifications consumer tells
//! the buyer, and the payment ledger (event-sourced) shows the charge.

mod support;

use std::{net::SocketAddr, time::Duration};

use trellis_testkit::{Nats, eventually};

/// The checkout's events, in the order the saga causes them.
const CHECKOUT: &[&str] = &[
    "shop.order.placed.v1",
    "shop.inventory.reserved.v1",
    "shop.payment.charged.v1",
    "shop.inventory.committed.v1",
    "shop.order.confirmed.v1",
];

/// Places an order through the gateway and waits until its history shows
/// the whole checkout; the order id and the history's event types.
async fn checkout(gateway: SocketAddr) -> (String, Vec<String>) {
    let token = support::token_through(gateway, "eve@example.com").await;
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let placed = support::call(
        gateway,
        "POST",
        "/v1/orders",
        &auth,
        r#"{"lines":[{"sku":"tea","quantity":2}]}"#,
    )
    .await;
    assert_eq!(placed.status, 200, "{}", placed.body);
    let order: serde_json::Value = serde_json::from_str(&placed.body).expect("order");
    let id = order["id"].as_str().expect("id").to_owned();
    let user = order["userId"].as_str().expect("userId").to_owned();
    let path = format!("/v1/orders/{id}/history");
    let types = eventually(
        Duration::from_secs(30),
        "the whole checkout in the history",
        || {
            let path = path.clone();
            async move {
                let answer = support::call(gateway, "GET", &path, &auth, "").await;
                let body: serde_json::Value = serde_json::from_str(&answer.body)
                    .map_err(|e| format!("{e}: {}", answer.body))?;
                let types: Vec<String> = body["events"]
                    .as_array()
                    .map(|events| {
                        events
                            .iter()
                            .filter_map(|e| e["type"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if types.len() >= CHECKOUT.len() {
                    Ok(types)
                } else {
                    Err(format!("{} {}", answer.status, answer.body))
                }
            }
        },
    )
    .await;
    // Another user does not see it.
    let other = support::token_through(gateway, "mallory@example.com").await;
    let bearer = format!("Bearer {other}");
    let hidden = support::call(
        gateway,
        "GET",
        &path,
        &[("Authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(hidden.status, 404, "{}", hidden.body);

    // The buyer is told, once (a durable consumer of the order's events in
    // the user service, through its inbox).
    let notifications = format!("/v1/users/{user}/notifications");
    let told = eventually(
        Duration::from_secs(30),
        "the confirmation among the notifications",
        || {
            let path = notifications.clone();
            async move {
                let answer = support::call(gateway, "GET", &path, &auth, "").await;
                if answer.body.contains("order_confirmed") {
                    Ok(answer.body)
                } else {
                    Err(format!("{} {}", answer.status, answer.body))
                }
            }
        },
    )
    .await;
    let told: serde_json::Value = serde_json::from_str(&told).expect("json");
    let told = told["notifications"].as_array().expect("notifications");
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["orderId"], id.as_str());
    let theirs = support::call(
        gateway,
        "GET",
        &notifications,
        &[("Authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(theirs.status, 403, "{}", theirs.body);

    // The account's ledger: opened, then charged for this order.
    let ledger = support::call(
        gateway,
        "GET",
        &format!("/v1/accounts/{user}/ledger"),
        &auth,
        "",
    )
    .await;
    assert_eq!(ledger.status, 200, "{}", ledger.body);
    let ledger: serde_json::Value = serde_json::from_str(&ledger.body).expect("json");
    let entries: Vec<(&str, &str)> = ledger["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default(),
                e["amountCents"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(entries, [("opened", "10000"), ("charged", "900")]);
    (id, types)
}

/// `trellis events tail ARGS`: its first `count` lines.
async fn tail(args: Vec<String>, count: usize) -> Vec<String> {
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut tail = support::spawn(&args);
            (0..count).map(|_| tail.line_starting_with("{")).collect()
        }),
    )
    .await
    .expect("tail printed in time")
    .expect("tail")
}

fn gateway_of(trellis: &mut support::Trellis) -> SocketAddr {
    let front = trellis.line_starting_with("gateway");
    front
        .split_whitespace()
        .nth(1)
        .expect("address")
        .parse()
        .expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_publishes_the_shop_events_on_the_embedded_bus() {
    let data = tempfile::tempdir().expect("dir");
    let dir = data.path().to_str().expect("utf-8").to_owned();
    let mut trellis = support::spawn(&["up", "--base-port", "0", "--data-dir", &dir]);
    let gateway = gateway_of(&mut trellis);
    let (id, types) = checkout(gateway).await;
    assert_eq!(types, CHECKOUT, "the history follows the checkout in order");

    // The events as the bus has them: protobuf data decoded by schema.
    let lines = tail(
        [
            "events",
            "tail",
            "--all",
            "--json",
            "--count",
            "5",
            "--data-dir",
            &dir,
        ]
        .map(str::to_owned)
        .to_vec(),
        5,
    )
    .await;
    // Each service relays its own outbox: the stream interleaves them.
    let first: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|e| e["subject"] == "events.order.placed")
        .unwrap_or_else(|| panic!("no events.order.placed in {lines:?}"));
    assert_eq!(first["event"]["type"], "shop.order.placed.v1");
    assert_eq!(first["event"]["subject"], format!("order/{id}"));
    assert_eq!(
        first["event"]["dataschema"],
        "proto:shop.order.v1.OrderPlaced"
    );
    assert_eq!(first["event"]["data"]["orderId"], id.as_str());
    assert_eq!(first["event"]["data"]["totalCents"], "900");
    assert_eq!(
        first["event"]["sequence"], "1",
        "the outbox numbers the aggregate's events"
    );

    trellis.signal(libc::SIGTERM);
    assert_eq!(
        trellis.wait(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        trellis.stderr()
    );

    // Rebuilt from zero, the projection has the same rows.
    let db = format!("sqlite://{}/order.db", dir);
    let read = || async {
        let pool = sqlx::SqlitePool::connect(&db).await.expect("order db");
        let rows: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT order_id, seq, type FROM order_history ORDER BY seq")
                .fetch_all(&pool)
                .await
                .expect("rows");
        pool.close().await;
        rows
    };
    let before = read().await;
    assert_eq!(before.len(), CHECKOUT.len());
    let mut replay = support::spawn(&["events", "replay", "order-history", "--data-dir", &dir]);
    let said = replay.line_starting_with("order-history");
    assert!(said.contains("rebuilt from 5 events"), "{said}");
    assert_eq!(
        replay.wait(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        replay.stderr()
    );
    assert_eq!(read().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_nats_publishes_the_shop_events_on_jetstream() {
    let nats = Nats::start().expect("nats-server");
    let data = tempfile::tempdir().expect("dir");
    let dir = data.path().to_str().expect("utf-8").to_owned();
    let url = nats.url();
    let mut trellis = support::spawn(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        &dir,
        "--events",
        &url,
    ]);
    let gateway = gateway_of(&mut trellis);
    let (id, types) = checkout(gateway).await;
    assert_eq!(types, CHECKOUT);
    assert!(
        !data.path().join("events.db").exists(),
        "nothing went to the embedded log"
    );
    let lines = tail(
        [
            "events",
            "tail",
            "events.payment.>",
            "--all",
            "--json",
            "--count",
            "1",
            "--events",
            &url,
        ]
        .map(str::to_owned)
        .to_vec(),
        1,
    )
    .await;
    let charged: serde_json::Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(charged["event"]["type"], "shop.payment.charged.v1");
    assert_eq!(charged["event"]["data"]["orderId"], id.as_str());
    assert_eq!(charged["event"]["data"]["amountCents"], "900");
    trellis.signal(libc::SIGTERM);
    assert_eq!(
        trellis.wait(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        trellis.stderr()
    );
}
