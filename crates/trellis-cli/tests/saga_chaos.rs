//! The checkout saga under crashes: the coordinator, order, inventory and
//! payment as four `trellis serve` processes (etcd as their registry) on
//! SQLite and on PostgreSQL (there with a second coordinator sharing the
//! log), N concurrent checkouts, and a chaos driver
//! that kills (SIGKILL) and restarts each process at random moments and
//! pauses them (SIGSTOP past the coordinator's call deadline, so calls
//! time out and arrive late, or twice). Afterwards every saga is terminal
//! and the books balance:
//! - every product's initial stock = its stock + its committed units, and
//!   no reservation is left open (failed orders' all released);
//! - every account's opening balance = its balance + the charges of its
//!   confirmed orders; no refund without a charge; one charge per order;
//! - every confirmed order has its charge and its committed reservation;
//!   every failed one has neither in effect.
//!
//! N is 1000 by default; `TRELLIS_SAGA_CHAOS_N` changes it (up to 100 000);
//! `TRELLIS_SAGA_CHAOS_SEED` replays a run's chaos.

mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use shop_order::api::v1::{
    CreateOrderRequest, OrderLine, order_service_client::OrderServiceClient,
};
use support::Trellis;
use trellis_saga::api::v1::{ListSagasRequest, Status, saga_service_client::SagaServiceClient};
use trellis_store::{Pool, with_pool};
use trellis_testkit::{Etcd, Postgres};

const SERVICES: [&str; 4] = ["saga", "inventory", "payment", "order"];

/// The service a process runs: `saga-2` is a second coordinator.
fn service_of(process: &'static str) -> &'static str {
    if process.starts_with("saga") {
        "saga"
    } else {
        process
    }
}
const OPENING_BALANCE: i64 = 20_000;
const PRODUCTS: [(&str, i64, i64); 3] = [
    ("tea", 450, 100_000),
    ("cups", 2400, 400),
    ("teapot", 8900, 60),
];
const USERS: usize = 40;

/// A small deterministic generator (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Shop {
    /// The processes: the four services, and on PostgreSQL a second
    /// coordinator sharing the first one's log.
    processes: Vec<&'static str>,
    etcd: Etcd,
    root: PathBuf,
    ports: HashMap<&'static str, u16>,
    databases: HashMap<&'static str, String>,
    running: HashMap<&'static str, Trellis>,
}

impl Shop {
    fn config(&self, service: &str) -> PathBuf {
        let file = self.root.join(format!("{service}.toml"));
        let text = match service {
            // Short deadlines and leases: paused participants time out,
            // a killed coordinator's sagas are taken over quickly.
            "saga" => {
                "[driver]\nlease = \"2s\"\ncall_timeout = \"400ms\"\nbackoff = \"20ms\"\nmax_backoff = \"400ms\"\npoll = \"100ms\"\ntimeout_to_fail = \"120s\"\n"
                    .to_owned()
            }
            "inventory" => {
                let mut t = String::new();
                for (sku, price, stock) in PRODUCTS {
                    t.push_str(&format!(
                        "[[seed]]\nsku = \"{sku}\"\nname = \"{sku}\"\nprice_cents = {price}\nstock = {stock}\n"
                    ));
                }
                t
            }
            "payment" => format!("opening_balance_cents = {OPENING_BALANCE}\n"),
            "order" => "checkout_timeout = \"120s\"\nresubmit_after = \"500ms\"\n[client]\ntimeout = \"2s\"\n".to_owned(),
            _ => String::new(),
        };
        std::fs::write(&file, text).unwrap();
        file
    }

    fn start(&mut self, process: &'static str) {
        let service = service_of(process);
        let listen = format!("127.0.0.1:{}", self.ports[process]);
        let data = self.root.join(process);
        std::fs::create_dir_all(&data).unwrap();
        let config = self.config(service);
        let registry = format!("etcd://{}?ttl=2s", self.etcd.addr());
        let mut args = vec![
            "serve",
            service,
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
            "--registry",
            &registry,
            "--config",
            config.to_str().unwrap(),
        ];
        if let Some(url) = self.databases.get(service) {
            args.extend(["--database-url", url.as_str()]);
        }
        let mut child = support::spawn_with_log(&args, Some("warn"));
        child.line_starting_with(&format!("{service} serving"));
        self.running.insert(process, child);
    }

    fn kill(&mut self, service: &'static str) {
        if let Some(mut p) = self.running.remove(service) {
            p.signal(libc::SIGKILL);
            p.wait(Duration::from_secs(10));
        }
    }

    fn stop_all(&mut self) {
        for service in self.processes.clone() {
            if let Some(mut p) = self.running.remove(service) {
                p.signal(libc::SIGTERM);
                let status = p.wait(Duration::from_secs(20));
                assert!(
                    status.success(),
                    "{service} did not stop cleanly: {}",
                    p.stderr()
                );
            }
        }
    }
}

async fn channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Places orders until `n` were accepted, `concurrency` at a time; how
/// many requests failed (the order process was down or paused).
async fn place_orders(port: u16, n: usize, concurrency: usize, seed: u64) -> usize {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (next, failed) = (next.clone(), failed.clone());
        let client = OrderServiceClient::new(channel(port).await);
        workers.spawn(async move {
            let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                let mut lines = Vec::new();
                for (sku, _, _) in PRODUCTS {
                    if rng.below(2) == 0 {
                        lines.push(OrderLine {
                            sku: sku.into(),
                            quantity: 1 + rng.below(3) as i32,
                            price_cents: 0,
                        });
                    }
                }
                if lines.is_empty() {
                    lines.push(OrderLine {
                        sku: "tea".into(),
                        quantity: 1,
                        price_cents: 0,
                    });
                }
                let request = CreateOrderRequest {
                    user_id: format!("user-{}", rng.below(USERS as u64)),
                    lines,
                };
                // Retried until accepted: a lost answer may leave an order
                // the test never heard of, which the books must show too.
                trellis_testkit::eventually(Duration::from_secs(120), "an order accepted", || {
                    let (mut client, request, failed) =
                        (client.clone(), request.clone(), failed.clone());
                    async move {
                        let placed = client.create_order(request).await;
                        if placed.is_err() {
                            failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        placed.map(drop).map_err(|s| format!("{s:?}"))
                    }
                })
                .await;
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    failed.load(std::sync::atomic::Ordering::SeqCst)
}

/// What the chaos did.
#[derive(Default, Debug)]
struct Chaos {
    kills: HashMap<&'static str, usize>,
    pauses: HashMap<&'static str, usize>,
}

/// Kills and pauses processes at random until `stop` — and until each
/// was killed once: the first kills go round every process in a random
/// order.
async fn chaos(
    shop: &mut Shop,
    rng: &mut Rng,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Chaos {
    let mut done = Chaos::default();
    let processes = shop.processes.clone();
    let mut round: Vec<&'static str> = processes.clone();
    for i in (1..round.len()).rev() {
        round.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut stopped = false;
    loop {
        let wait = Duration::from_millis(100 + rng.below(200));
        tokio::select! {
            _ = &mut stop, if !stopped => stopped = true,
            _ = tokio::time::sleep(wait) => {}
        }
        if stopped && round.is_empty() {
            return done;
        }
        if rng.below(3) == 0 {
            // Paused past the coordinator's call deadline: its calls time
            // out, are retried, and the paused ones land late.
            let service = processes[rng.below(processes.len() as u64) as usize];
            if let Some(p) = shop.running.get(service) {
                p.signal(libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(500 + rng.below(700))).await;
                p.signal(libc::SIGCONT);
                *done.pauses.entry(service).or_default() += 1;
            }
        } else {
            let service = round
                .pop()
                .unwrap_or_else(|| processes[rng.below(processes.len() as u64) as usize]);
            shop.kill(service);
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            // Starting blocks on the child's first line.
            tokio::task::block_in_place(|| shop.start(service));
            *done.kills.entry(service).or_default() += 1;
        }
    }
}

/// Waits until the coordinator has no saga left running or compensating
/// and the order store no pending order.
async fn settle(shop: &Shop, orders: &Pool) {
    let sagas = SagaServiceClient::new(channel(shop.ports["saga"]).await);
    trellis_testkit::eventually(Duration::from_secs(180), "the shop settled", || {
        let mut sagas = sagas.clone();
        async move {
            let mut open = 0;
            for status in [Status::Running, Status::Compensating] {
                open += sagas
                    .list_sagas(ListSagasRequest {
                        status: status as i32,
                        page_size: 1000,
                    })
                    .await
                    .map_err(|s| format!("the coordinator: {s:?}"))?
                    .into_inner()
                    .sagas
                    .len();
            }
            let pending: i64 = with_pool!(orders, p => sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE status = 'pending'")
                .fetch_one(p)
                .await
                .map_err(|e| e.to_string())?);
            if open == 0 && pending == 0 {
                Ok(())
            } else {
                Err(format!("{open} sagas open, {pending} orders pending"))
            }
        }
    })
    .await;
}

async fn open(url: &str) -> Pool {
    Pool::open(
        url,
        4,
        Duration::from_secs(10),
        &trellis_store::migrator("_chaos_check", &[]),
    )
    .await
    .unwrap()
}

type Rows<T> = Vec<T>;

async fn rows2(pool: &Pool, sql: &'static str) -> Rows<(String, i64)> {
    with_pool!(pool, p => sqlx::query_as(sql).fetch_all(p).await.unwrap())
}

async fn rows3(pool: &Pool, sql: &'static str) -> Rows<(String, String, i64)> {
    with_pool!(pool, p => sqlx::query_as(sql).fetch_all(p).await.unwrap())
}

/// The books, checked against each other.
async fn audit(urls: &HashMap<&'static str, String>) -> (usize, usize) {
    let inventory = open(&urls["inventory"]).await;
    let payment = open(&urls["payment"]).await;
    let orders = open(&urls["order"]).await;

    // Orders: id, status, total; every failure a definite one — crashes,
    // pauses and repeated deliveries must not make a checkout time out.
    let all = rows3(&orders, "SELECT id, status, total_cents FROM orders").await;
    let reasons: Vec<(String, String)> = with_pool!(&orders, p => sqlx::query_as("SELECT id, failure_reason FROM orders WHERE status = 'failed'").fetch_all(p).await.unwrap());
    for (id, reason) in &reasons {
        assert!(
            reason.contains("insufficient funds") || reason.contains("insufficient stock"),
            "order {id} failed for a reason the chaos caused: {reason}"
        );
    }
    let lines: Vec<(String, String)> = with_pool!(&orders, p => sqlx::query_as("SELECT id, lines FROM orders").fetch_all(p).await.unwrap());
    let lines: HashMap<String, Vec<(String, i64)>> = lines
        .into_iter()
        .map(|(id, text)| {
            let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            let l = v
                .iter()
                .map(|l| {
                    (
                        l["sku"].as_str().unwrap().to_owned(),
                        l["quantity"].as_i64().unwrap(),
                    )
                })
                .collect();
            (id, l)
        })
        .collect();
    let mut confirmed = 0;
    let mut failed = 0;

    // Reservations: (order, sku) -> (state, qty); charges: order -> (user, amount, state).
    let reservations: Vec<(String, String, String, i64)> = with_pool!(&inventory, p => sqlx::query_as("SELECT order_id, sku, state, quantity FROM reservations").fetch_all(p).await.unwrap());
    let charges: Vec<(String, String, String, i64)> = with_pool!(&payment, p => sqlx::query_as("SELECT order_id, user_id, state, amount_cents FROM charges").fetch_all(p).await.unwrap());
    let mut by_order: HashMap<&str, Vec<(&str, &str, i64)>> = HashMap::new();
    for (order, sku, state, qty) in &reservations {
        assert!(
            state == "committed" || state == "released",
            "reservation left {state}: {order} {sku}"
        );
        by_order.entry(order).or_default().push((sku, state, *qty));
    }
    let charge_of: HashMap<&str, (&str, &str, i64)> = charges
        .iter()
        .map(|(o, u, s, a)| (o.as_str(), (u.as_str(), s.as_str(), *a)))
        .collect();
    assert_eq!(charge_of.len(), charges.len(), "an order charged twice");
    let known: std::collections::HashSet<&str> = all.iter().map(|(id, _, _)| id.as_str()).collect();
    for order in by_order.keys().chain(charge_of.keys()) {
        assert!(
            known.contains(order),
            "stock or money moved for an order that does not exist: {order}"
        );
    }
    for (id, status, total) in &all {
        let held = by_order.get(id.as_str()).cloned().unwrap_or_default();
        let charge = charge_of.get(id.as_str());
        match status.as_str() {
            "confirmed" => {
                confirmed += 1;
                let mut want = lines[id].clone();
                want.sort();
                let mut got: Vec<(String, i64)> = held
                    .iter()
                    .map(|(sku, state, qty)| {
                        assert_eq!(
                            *state, "committed",
                            "confirmed order {id} has a released line"
                        );
                        ((*sku).to_owned(), *qty)
                    })
                    .collect();
                got.sort();
                assert_eq!(
                    got, want,
                    "confirmed order {id}: reservation differs from its lines"
                );
                let (_, state, amount) =
                    charge.unwrap_or_else(|| panic!("confirmed order {id} was not charged"));
                assert_eq!(
                    (*state, *amount),
                    ("charged", *total),
                    "confirmed order {id}: charge"
                );
            }
            "failed" => {
                failed += 1;
                assert!(
                    held.iter().all(|(_, s, _)| *s == "released"),
                    "failed order {id} holds stock"
                );
                if let Some((_, state, _)) = charge {
                    assert_eq!(*state, "refunded", "failed order {id} kept its charge");
                }
            }
            other => panic!("order {id} ended {other}"),
        }
    }

    // Stock: initial = stock + committed.
    let stock = rows2(&inventory, "SELECT sku, stock FROM products").await;
    for (sku, now) in stock {
        let initial = PRODUCTS.iter().find(|p| p.0 == sku).unwrap().2;
        let committed: i64 = reservations
            .iter()
            .filter(|(_, s, state, _)| *s == sku && state == "committed")
            .map(|(_, _, _, q)| q)
            .sum();
        assert_eq!(
            initial,
            now + committed,
            "{sku}: stock {now} + committed {committed} != {initial}"
        );
    }

    // Money: opening = balance + charged (not refunded), each balance the
    // fold of the account's ledger.
    let users: Vec<String> = with_pool!(&payment, p => sqlx::query_scalar("SELECT DISTINCT aggregate_id FROM trellis_es_events WHERE aggregate_type = 'account'").fetch_all(p).await.unwrap());
    let ledger = shop_payment::data::Payments::open(
        &trellis_store::DatabaseSettings {
            url: Some(trellis::core::Secret::new(urls["payment"].clone())),
            ..Default::default()
        },
        Path::new("/nonexistent"),
        OPENING_BALANCE,
    )
    .await
    .unwrap();
    for user in users {
        let balance = ledger.balance(&user).await.unwrap();
        assert!(balance >= 0, "{user} is overdrawn: {balance}");
        let charged: i64 = charges
            .iter()
            .filter(|(_, u, state, _)| *u == user && state == "charged")
            .map(|(_, _, _, a)| a)
            .sum();
        assert_eq!(
            OPENING_BALANCE,
            balance + charged,
            "{user}: balance {balance} + charged {charged}"
        );
    }
    ledger.close().await;
    inventory.close().await;
    payment.close().await;
    orders.close().await;
    (confirmed, failed)
}

async fn run(
    processes: &[&'static str],
    databases: impl FnOnce(&Path) -> HashMap<&'static str, String>,
) {
    let n: usize = std::env::var("TRELLIS_SAGA_CHAOS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        .clamp(1, 100_000);
    let seed: u64 = std::env::var("TRELLIS_SAGA_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("saga chaos: N = {n}, TRELLIS_SAGA_CHAOS_SEED={seed}");
    let root = tempfile::tempdir().unwrap();
    let databases = databases(root.path());
    let mut shop = Shop {
        processes: processes.to_vec(),
        etcd: Etcd::start().unwrap(),
        root: root.path().to_owned(),
        ports: processes
            .iter()
            .map(|s| (*s, trellis_testkit::free_port().unwrap()))
            .collect(),
        databases: databases.clone(),
        running: HashMap::new(),
    };
    for process in processes {
        shop.start(process);
    }
    let order_port = shop.ports["order"];
    let load = tokio::spawn(place_orders(order_port, n, 16, seed));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let mut rng = Rng(seed);
    let chaos_run = async {
        let load_done = async {
            let failed = load.await.unwrap();
            let _ = stop.send(());
            failed
        };
        tokio::join!(load_done, chaos(&mut shop, &mut rng, stopped))
    };
    let (refused, chaos) = chaos_run.await;
    eprintln!("saga chaos: {chaos:?}; {refused} order requests refused and retried");
    // Everything up again: the shop finishes what it started.
    for process in processes {
        if !shop.running.contains_key(process) {
            shop.start(process);
        }
    }
    let urls: HashMap<&'static str, String> = SERVICES
        .iter()
        .map(|s| {
            (
                *s,
                databases.get(s).cloned().unwrap_or_else(|| {
                    format!(
                        "sqlite://{}",
                        root.path().join(s).join(format!("{s}.db")).display()
                    )
                }),
            )
        })
        .collect();
    let orders = open(&urls["order"]).await;
    settle(&shop, &orders).await;
    orders.close().await;

    // The chaos could have broken things: it hit every process, and
    // branches were delivered more than once.
    let mut sagas = SagaServiceClient::new(channel(shop.ports["saga"]).await);
    let listed = sagas
        .list_sagas(ListSagasRequest {
            status: 0,
            page_size: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .sagas;
    let retried = listed
        .iter()
        .filter(|s| s.steps.iter().any(|st| st.attempts > 2))
        .count();
    shop.stop_all();
    let (confirmed, failed) = audit(&urls).await;
    eprintln!(
        "saga chaos: {confirmed} confirmed, {failed} failed; {retried} of the last {} sagas retried a step",
        listed.len()
    );
    assert!(
        confirmed + failed >= n,
        "{confirmed} + {failed} orders < {n}"
    );
    assert!(
        confirmed > 0 && failed > 0,
        "both outcomes should occur: {confirmed} confirmed, {failed} failed"
    );
    assert!(
        processes.iter().all(|s| chaos.kills.contains_key(s)),
        "every process is killed at least once: {chaos:?}"
    );
    assert!(retried > 0, "no saga retried a step: the chaos hit nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_stay_consistent_while_processes_crash_on_sqlite() {
    run(&SERVICES, |_| HashMap::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_stay_consistent_while_processes_crash_on_postgres_with_two_coordinators() {
    let pg = Postgres::start().unwrap();
    let admin = open(&pg.url()).await;
    for s in SERVICES {
        with_pool!(&admin, p => sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE shop_{s}"))).execute(p).await.map(drop).unwrap());
    }
    admin.close().await;
    let base = pg.url();
    let base = base.trim_end_matches("/postgres").to_owned();
    // Two coordinators share the log, each claiming with leases; either
    // may be killed.
    run(
        &["saga", "saga-2", "inventory", "payment", "order"],
        move |_| {
            SERVICES
                .iter()
                .map(|s| (*s, format!("{base}/shop_{s}")))
                .collect()
        },
    )
    .await;
    drop(pg);
}
