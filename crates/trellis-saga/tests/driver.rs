//! The coordinator end to end over HTTP: real participants (axum, their
//! handlers behind the barrier on SQLite), a checkout of two steps —
//! reserve stock, charge an account — that succeeds, that compensates when
//! the charge is refused, that retries a participant answering 503, and
//! that a second coordinator finishes after the first died mid-call.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use trellis_saga::{
    barrier::{self, BarrierError, Branch, Op},
    driver::{Driver, DriverConfig, HttpCaller},
    log::{Definition, Endpoint, SagaLog, StepDefinition, migrator},
    machine::{Answer, Status},
};
use trellis_store::{Pool, with_pool, with_tx};

#[derive(Clone)]
struct Shop {
    pool: Pool,
    /// The next this-many charges answer 503.
    unavailable: Arc<AtomicU32>,
}

/// Runs `sql` (with `$1` = amount) under the barrier; 409 when `refuse`
/// says the row would go negative.
async fn branch(
    shop: &Shop,
    headers: &HeaderMap,
    sql: &'static str,
    amount: i64,
    check: Option<&'static str>,
) -> StatusCode {
    let Ok(branch) = Branch::from_headers(headers) else {
        return StatusCode::BAD_REQUEST;
    };
    let outcome = barrier::run(&shop.pool, &branch, |tx| {
        Box::pin(async move {
            if let Some(check) = check {
                let have: i64 =
                    with_tx!(tx, c => sqlx::query_scalar(check).fetch_one(&mut **c).await)
                        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
                if have < amount {
                    return Err(StatusCode::CONFLICT);
                }
            }
            with_tx!(tx, c => sqlx::query(sql).bind(amount).execute(&mut **c).await.map(drop))
                .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
        })
    })
    .await;
    match outcome {
        Ok(_) => StatusCode::OK,
        Err(BarrierError::Handler(status)) => status,
        Err(BarrierError::Store(_)) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn participant(dir: &std::path::Path) -> (SocketAddr, Shop) {
    let migrations = trellis_store::migrator(
        "_shop_migrations",
        &[
            (
                1,
                "shop",
                "CREATE TABLE stock (sku TEXT PRIMARY KEY, n BIGINT NOT NULL);
                 CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL);
                 INSERT INTO stock VALUES ('tea', 10);
                 INSERT INTO accounts VALUES ('ann', 100);",
            ),
            barrier::MIGRATION,
        ],
    );
    let pool = Pool::open(
        &format!("sqlite://{}", dir.join("shop.db").display()),
        4,
        Duration::from_secs(10),
        &migrations,
    )
    .await
    .unwrap();
    let shop = Shop {
        pool,
        unavailable: Arc::default(),
    };
    let app = Router::new()
        .route(
            "/reserve",
            post(|State(s): State<Shop>, h: HeaderMap| async move {
                branch(
                    &s,
                    &h,
                    "UPDATE stock SET n = n - $1 WHERE sku = 'tea'",
                    2,
                    Some("SELECT n FROM stock WHERE sku = 'tea'"),
                )
                .await
            }),
        )
        .route(
            "/release",
            post(|State(s): State<Shop>, h: HeaderMap| async move {
                branch(
                    &s,
                    &h,
                    "UPDATE stock SET n = n + $1 WHERE sku = 'tea'",
                    2,
                    None,
                )
                .await
            }),
        )
        .route(
            "/charge",
            post(
                |State(s): State<Shop>, h: HeaderMap, body: String| async move {
                    if s.unavailable.load(Ordering::SeqCst) > 0 {
                        s.unavailable.fetch_sub(1, Ordering::SeqCst);
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let amount: i64 = body.trim().parse().unwrap_or(0);
                    branch(
                        &s,
                        &h,
                        "UPDATE accounts SET balance = balance - $1 WHERE id = 'ann'",
                        amount,
                        Some("SELECT balance FROM accounts WHERE id = 'ann'"),
                    )
                    .await
                },
            ),
        )
        .route(
            "/refund",
            post(
                |State(s): State<Shop>, h: HeaderMap, body: String| async move {
                    let amount: i64 = body.trim().parse().unwrap_or(0);
                    branch(
                        &s,
                        &h,
                        "UPDATE accounts SET balance = balance + $1 WHERE id = 'ann'",
                        amount,
                        None,
                    )
                    .await
                },
            ),
        )
        .with_state(shop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, shop)
}

fn checkout(addr: SocketAddr, amount: i64) -> Definition {
    let http = |path: &str| Endpoint::Http {
        url: format!("http://{addr}{path}"),
    };
    Definition {
        steps: vec![
            StepDefinition {
                name: "reserve".into(),
                action: http("/reserve"),
                compensate: http("/release"),
                payload: Vec::new(),
                confirm: None,
                after: Vec::new(),
            },
            StepDefinition {
                name: "charge".into(),
                action: http("/charge"),
                compensate: http("/refund"),
                payload: amount.to_string().into_bytes(),
                confirm: None,
                after: Vec::new(),
            },
        ],
        timeout_to_fail_ms: 60_000,
        traceparent: None,
        kind: Default::default(),
        query: None,
        concurrent: false,
    }
}

async fn totals(shop: &Shop) -> (i64, i64) {
    let stock: i64 = with_pool!(&shop.pool, p => sqlx::query_scalar("SELECT n FROM stock").fetch_one(p).await.unwrap());
    let balance: i64 = with_pool!(&shop.pool, p => sqlx::query_scalar("SELECT balance FROM accounts").fetch_one(p).await.unwrap());
    (stock, balance)
}

/// Waits for the moment `gid` is next due: its retry time, or the end of
/// the lease a coordinator holds on it.
async fn until_due(log: &SagaLog, gid: &str) {
    let record = log.get(gid).await.unwrap().unwrap();
    let due = record.next_attempt_ms.max(record.lease_until_ms + 1);
    let now = trellis_store::now_ms();
    if due > now {
        tokio::time::sleep(Duration::from_millis((due - now) as u64)).await;
    }
}

/// Drives until `gid` ends; its final status.
async fn finish(driver: &Driver, log: &SagaLog, gid: &str) -> Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        driver.run_once().await.unwrap();
        let status = log.get(gid).await.unwrap().unwrap().state.status;
        if status.is_terminal() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{gid} still {status:?}"
        );
        until_due(log, gid).await;
    }
}

fn config(owner: &str) -> DriverConfig {
    DriverConfig {
        owner: owner.into(),
        lease: Duration::from_secs(30),
        call_timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        batch: 16,
        max_in_flight: 64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_succeed_compensate_retry_and_survive_a_dead_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, shop) = participant(dir.path()).await;
    let log = SagaLog::new(
        Pool::open(
            &format!("sqlite://{}", dir.path().join("saga.db").display()),
            4,
            Duration::from_secs(10),
            &migrator(),
        )
        .await
        .unwrap(),
    );
    let driver = Driver::new(log.clone(), Arc::new(HttpCaller::default()), config("a"));

    // Success: stock reserved, account charged.
    log.submit("ok", &checkout(addr, 30)).await.unwrap();
    assert_eq!(finish(&driver, &log, "ok").await, Status::Succeeded);
    assert_eq!(totals(&shop).await, (8, 70));

    // Refused charge (insufficient funds): the reservation is released.
    log.submit("poor", &checkout(addr, 500)).await.unwrap();
    assert_eq!(finish(&driver, &log, "poor").await, Status::Compensated);
    assert_eq!(totals(&shop).await, (8, 70));
    let failed = log.get("poor").await.unwrap().unwrap().state;
    assert_eq!(failed.failure.as_ref().map(|f| f.0), Some(1), "{failed:?}");

    // A participant answering 503 twice: retried, then it succeeds.
    shop.unavailable.store(2, Ordering::SeqCst);
    log.submit("flaky", &checkout(addr, 10)).await.unwrap();
    assert_eq!(finish(&driver, &log, "flaky").await, Status::Succeeded);
    assert_eq!(totals(&shop).await, (6, 60));
    let flaky = log.get("flaky").await.unwrap().unwrap().state;
    assert_eq!(flaky.steps[1].attempts, 3, "{flaky:?}");

    // A coordinator dies after the reservation took effect but before it
    // recorded the answer; its lease runs out; another takes over, calls
    // the reservation again (the barrier absorbs it) and finishes.
    log.submit("orphan", &checkout(addr, 5)).await.unwrap();
    let mut claimed = log
        .claim("dead", Duration::from_millis(300), 1)
        .await
        .unwrap();
    let mut state = claimed[0].record.state.clone();
    state.calling(0, Op::Action);
    log.save(
        &mut claimed[0],
        "dead",
        &state,
        0,
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let caller = HttpCaller::default();
    let (answer, _) = trellis_saga::driver::Caller::call(
        &caller,
        &claimed[0].record.definition.steps[0].action,
        &Branch::new("orphan", "reserve", Op::Action)
            .headers()
            .unwrap()
            .into_iter()
            .collect(),
        &[],
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(answer, Answer::Success);
    assert_eq!(
        totals(&shop).await,
        (4, 60),
        "the dead coordinator's call took effect"
    );
    let survivor = Driver::new(log.clone(), Arc::new(HttpCaller::default()), config("b"));
    assert_eq!(finish(&survivor, &log, "orphan").await, Status::Succeeded);
    assert_eq!(totals(&shop).await, (4, 55), "reserved once, charged once");
}

/// gRPC branches, with the payload passed through as the request message:
/// against a real gRPC server (the standard health service), a call that
/// answers OK succeeds, and one that keeps answering NOT_FOUND is retried
/// until the saga's timeout_to_fail turns it round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_branches_succeed_and_retry_until_the_saga_times_out() {
    use prost::Message as _;
    let (reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = trellis_saga::driver::boxed(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy(),
    );
    let grpc = trellis_saga::driver::GrpcCaller::new(move |service: &str| {
        (service == "health").then(|| channel.clone())
    });
    let callers = trellis_saga::driver::Callers {
        http: HttpCaller::default(),
        grpc,
    };
    let check = |service: &str| {
        tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        }
        .encode_to_vec()
    };
    let endpoint = Endpoint::Grpc {
        service: "health".into(),
        path: "/grpc.health.v1.Health/Check".into(),
    };
    let saga = |payload: Vec<u8>, timeout_to_fail_ms| Definition {
        steps: vec![StepDefinition {
            name: "check".into(),
            action: endpoint.clone(),
            compensate: endpoint.clone(),
            payload,
            confirm: None,
            after: Vec::new(),
        }],
        timeout_to_fail_ms,
        traceparent: None,
        kind: Default::default(),
        query: None,
        concurrent: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let log = SagaLog::new(
        Pool::open(
            &format!("sqlite://{}", dir.path().join("saga.db").display()),
            4,
            Duration::from_secs(10),
            &migrator(),
        )
        .await
        .unwrap(),
    );
    let driver = Driver::new(log.clone(), Arc::new(callers), config("g"));
    log.submit("ok", &saga(check(""), 60_000)).await.unwrap();
    assert_eq!(finish(&driver, &log, "ok").await, Status::Succeeded);
    // NOT_FOUND is not a definite failure: retried, until the saga's
    // timeout turns it round. Its compensation (the same check) answers
    // NOT_FOUND too — retried — until the service is known.
    log.submit("lost", &saga(check("no.such.Service"), 300))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        driver.run_once().await.unwrap();
        let state = log.get("lost").await.unwrap().unwrap().state;
        if state.status == Status::Compensating {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{state:?}");
        until_due(&log, "lost").await;
    }
    reporter
        .set_service_status("no.such.Service", tonic_health::ServingStatus::Serving)
        .await;
    assert_eq!(finish(&driver, &log, "lost").await, Status::Compensated);
    let lost = log.get("lost").await.unwrap().unwrap().state;
    assert!(lost.steps[0].attempts >= 2, "{lost:?}");
    assert!(
        lost.failure
            .as_ref()
            .is_some_and(|f| f.1.contains("300 ms")),
        "{lost:?}"
    );
}
