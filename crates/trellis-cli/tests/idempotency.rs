//! Idempotent requests in the shop: CreateOrder through the gateway of
//! `trellis up` (the embedded store), and a direct payment Charge across
//! two `trellis serve payment` instances sharing Redis (`--redis`).

mod support;

use std::{net::SocketAddr, time::Duration};

use trellis_testkit::http;

async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Response {
    support::call(addr, "POST", path, headers, body).await
}

/// 50 copies of one request at once; the answers.
async fn fifty(
    targets: &[SocketAddr],
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<http::Response> {
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = targets[i % targets.len()];
        let path = path.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let body = body.to_owned();
        tasks.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            post(addr, &path, &headers, &body).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// Every answer the first one, all but one marked replayed.
fn one_answer(answers: &[http::Response]) {
    let first = answers
        .iter()
        .find(|a| a.header("idempotent-replayed").is_none())
        .unwrap_or_else(|| panic!("no answer ran the request: {:?}", answers[0].body));
    for a in answers {
        assert_eq!(a.status, first.status, "{}", a.body);
        assert_eq!(a.body, first.body);
    }
    let replayed = answers
        .iter()
        .filter(|a| a.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, answers.len() - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_order_with_a_key_places_one_order() {
    let data = tempfile::tempdir().unwrap();
    let mut trellis = support::spawn(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let front = trellis.line_starting_with("gateway");
    let gateway: SocketAddr = front.split_whitespace().nth(1).unwrap().parse().unwrap();
    let token = support::token_through(gateway, "ida@example.com").await;
    let bearer = format!("Bearer {token}");
    let lines = r#"{"lines":[{"sku":"tea","quantity":1}]}"#;
    let answers = fifty(
        &[gateway],
        "/v1/orders",
        &[
            ("Authorization", &bearer),
            ("Idempotency-Key", "order-ida-1"),
        ],
        lines,
    )
    .await;
    assert_eq!(answers[0].status, 200, "{}", answers[0].body);
    one_answer(&answers);
    // One order exists.
    let mine = http::raw(
        gateway,
        format!("GET /v1/orders HTTP/1.1\r\nHost: shop\r\nAuthorization: {bearer}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let orders: serde_json::Value = serde_json::from_str(&mine.body).unwrap();
    assert_eq!(
        orders["orders"].as_array().unwrap().len(),
        1,
        "{}",
        mine.body
    );
    // The key with another order: refused, naming why.
    let other = post(
        gateway,
        "/v1/orders",
        &[
            ("Authorization", &bearer),
            ("Idempotency-Key", "order-ida-1"),
        ],
        r#"{"lines":[{"sku":"tea","quantity":2}]}"#,
    )
    .await;
    assert_eq!(other.status, 422, "{}", other.body);
    assert!(
        other.body.contains("IDEMPOTENCY_KEY_REUSED"),
        "{}",
        other.body
    );
    // Without a key each request is its own order.
    let plain = post(gateway, "/v1/orders", &[("Authorization", &bearer)], lines).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert_ne!(plain.body, answers[0].body);

    trellis.signal(libc::SIGTERM);
    assert_eq!(
        trellis.wait(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        trellis.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_runs_once_across_two_instances_sharing_redis() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut instances = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let port = trellis_testkit::free_port().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut payment = support::spawn(&[
            "serve",
            "payment",
            "--listen",
            &listen,
            "--data-dir",
            data.path().to_str().unwrap(),
            "--redis",
            &redis.url(),
        ]);
        payment.line_starting_with("payment serving");
        let addr: SocketAddr = listen.parse().unwrap();
        http::poll_until(addr, "/readyz", Duration::from_secs(20), |r| {
            r.status == 200
        })
        .await
        .unwrap();
        instances.push(payment);
        addrs.push(addr);
    }
    let charge = r#"{"orderId":"o-1","userId":"u-1","amountCents":"300"}"#;
    let path = "/shop.payment.v1.PaymentBranches/Charge";
    let answers = fifty(&addrs, path, &[("Idempotency-Key", "charge-o-1")], charge).await;
    assert_eq!(answers[0].status, 200, "{}", answers[0].body);
    one_answer(&answers);
    let account = http::get(addrs[1], "/v1/accounts/u-1").await.unwrap();
    assert!(
        account.body.contains(r#""balanceCents":"9700""#),
        "charged once: {}",
        account.body
    );
    // The same charge without the key is refused, not taken twice.
    let again = post(addrs[0], path, &[], charge).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("ALREADY_CHARGED"), "{}", again.body);
    for mut payment in instances {
        payment.signal(libc::SIGTERM);
        assert_eq!(
            payment.wait(Duration::from_secs(15)).code(),
            Some(0),
            "{}",
            payment.stderr()
        );
    }
}
