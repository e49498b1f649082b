//! The event-sourced ledger behind the payment API, on SQLite and
//! PostgreSQL: concurrent charges of one account never overdraw it and
//! never fail a checkout for losing a race; saga compensations refund
//! once; the ledger pages; an account is visible to its owner only; and
//! balances kept in rows by earlier versions carry over into the ledger.

use shop_payment::{
    api::v1::{
        ChargeRequest, GetAccountRequest, ListLedgerRequest,
        payment_branches_server::PaymentBranches, payment_service_server::PaymentService,
    },
    data::Payments,
    service::PaymentHandler,
};
use tonic::{Code, Request};
use trellis_saga::barrier::{Branch, Op};

async fn open(url: &str, dir: &std::path::Path) -> Payments {
    let settings = trellis_store::DatabaseSettings {
        url: Some(trellis::core::Secret::new(url.to_owned())),
        ..Default::default()
    };
    Payments::open(&settings, &dir.join("payment.db"), 1000)
        .await
        .unwrap()
}

fn charge(order: &str, user: &str, amount: i64) -> ChargeRequest {
    ChargeRequest {
        order_id: order.into(),
        user_id: user.into(),
        amount_cents: amount,
    }
}

/// `request` as the saga coordinator sends branch `op` of saga `gid`.
fn in_saga<T>(message: T, gid: &str, op: Op) -> Request<T> {
    let mut request = Request::new(message);
    let branch = Branch::new(gid, "charge", op);
    for (name, value) in branch.headers().unwrap() {
        let name = tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()).unwrap();
        request
            .metadata_mut()
            .insert(name, value.to_str().unwrap().parse().unwrap());
    }
    request
}

async fn balance(handler: &PaymentHandler, user: &str) -> i64 {
    handler
        .get_account(Request::new(GetAccountRequest {
            user_id: user.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .balance_cents
}

async fn ledger_kinds(handler: &PaymentHandler, user: &str) -> Vec<(i64, String)> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = handler
            .list_ledger(Request::new(ListLedgerRequest {
                user_id: user.into(),
                page_size: 3,
                page_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        entries.extend(page.entries.into_iter().map(|e| (e.version, e.kind)));
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

async fn concurrent_charges(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let handler = PaymentHandler::new(open(url, dir.path()).await);
    assert_eq!(balance(&handler, "u-1").await, 1000, "the opening balance");
    // 24 checkouts of one user at once, 100 cents each, half of them as
    // saga branches: ten fit in the opening balance.
    let calls = (0..24).map(|i| {
        let handler = handler.clone();
        async move {
            let message = charge(&format!("o-{i}"), "u-1", 100);
            let request = if i % 2 == 0 {
                in_saga(message, &format!("g-{i}"), Op::Action)
            } else {
                Request::new(message)
            };
            handler.charge(request).await.map(drop)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    let short = answers
        .iter()
        .filter(|a| {
            a.as_ref().is_err_and(|s| {
                s.code() == Code::FailedPrecondition && s.message().contains("insufficient funds")
            })
        })
        .count();
    assert_eq!(
        (ok, short),
        (10, 14),
        "ten charged, the rest refused for funds, none lost a race: {answers:?}"
    );
    assert_eq!(balance(&handler, "u-1").await, 0, "never below zero");
    let kinds = ledger_kinds(&handler, "u-1").await;
    assert_eq!(
        kinds.iter().map(|k| k.0).collect::<Vec<_>>(),
        (1..=11).collect::<Vec<_>>(),
        "versions without gaps"
    );
    assert_eq!(kinds[0].1, "opened");
    assert!(kinds[1..].iter().all(|k| k.1 == "charged"), "{kinds:?}");
    // A direct charge of an order charged before is refused.
    let charged = answers.iter().position(|a| a.is_ok()).unwrap();
    let again = handler
        .charge(Request::new(charge(&format!("o-{charged}"), "u-1", 100)))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_never_overdraw_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_charges(&format!("sqlite://{}", dir.path().join("p.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_never_overdraw_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    concurrent_charges(&pg.url()).await;
}

async fn refunds(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let handler = PaymentHandler::new(open(url, dir.path()).await);
    handler
        .charge(in_saga(charge("o-1", "u-2", 400), "g-1", Op::Action))
        .await
        .unwrap();
    assert_eq!(balance(&handler, "u-2").await, 600);
    // The compensation, delivered twice: one refund.
    for _ in 0..2 {
        handler
            .refund(in_saga(charge("o-1", "u-2", 400), "g-1", Op::Compensate))
            .await
            .unwrap();
    }
    assert_eq!(balance(&handler, "u-2").await, 1000);
    let kinds: Vec<String> = ledger_kinds(&handler, "u-2")
        .await
        .into_iter()
        .map(|k| k.1)
        .collect();
    assert_eq!(kinds, ["opened", "charged", "refunded"]);
    // A compensation whose action never ran moves nothing.
    handler
        .refund(in_saga(charge("o-9", "u-2", 400), "g-9", Op::Compensate))
        .await
        .unwrap();
    assert_eq!(ledger_kinds(&handler, "u-2").await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_refunds_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    refunds(&format!("sqlite://{}", dir.path().join("p.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_refunds_once_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    refunds(&pg.url()).await;
}

#[tokio::test]
async fn an_account_is_visible_to_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("p.db").display());
    let handler = PaymentHandler::new(open(&url, dir.path()).await);
    let as_user = |user: &str, of: &str| {
        let mut request = Request::new(GetAccountRequest { user_id: of.into() });
        request
            .metadata_mut()
            .insert("x-user-id", user.parse().unwrap());
        request
    };
    assert!(handler.get_account(as_user("u-1", "u-1")).await.is_ok());
    let denied = handler
        .get_account(as_user("u-2", "u-1"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut ledger = Request::new(ListLedgerRequest {
        user_id: "u-1".into(),
        ..Default::default()
    });
    ledger
        .metadata_mut()
        .insert("x-user-id", "u-2".parse().unwrap());
    assert_eq!(
        handler.list_ledger(ledger).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    for (size, token) in [(101, ""), (-1, ""), (0, "x")] {
        let bad = handler
            .list_ledger(Request::new(ListLedgerRequest {
                user_id: "u-1".into(),
                page_size: size,
                page_token: token.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{size} {token:?}");
    }
}

/// The payment store as the version before the ledger made it: balances in
/// an `accounts` table. (The statements must stay byte for byte those of
/// that version: migrations are checked by checksum.)
const ROWS_SCHEMA: &str = "CREATE TABLE accounts (
                    user_id        TEXT PRIMARY KEY,
                    balance_cents  BIGINT NOT NULL CHECK (balance_cents >= 0)
                );
                CREATE TABLE charges (
                    order_id      TEXT PRIMARY KEY,
                    user_id       TEXT NOT NULL,
                    amount_cents  BIGINT NOT NULL,
                    state         TEXT NOT NULL
                );";

async fn carried_over(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let before = trellis_store::migrator(
        "_payment_migrations",
        &[
            (1, "accounts and charges", ROWS_SCHEMA),
            trellis_saga::barrier::MIGRATION,
        ],
    );
    let old = trellis_store::Pool::open(url, 2, std::time::Duration::from_secs(5), &before)
        .await
        .unwrap();
    let mut tx = old.begin().await.unwrap();
    trellis_store::with_tx!(&mut tx, c => {
        sqlx::query("INSERT INTO accounts (user_id, balance_cents) VALUES ('u-old', 4200), ('u-poor', 0)")
            .execute(&mut **c)
            .await
            .unwrap();
    });
    tx.commit().await.unwrap();
    old.close().await;

    let handler = PaymentHandler::new(open(url, dir.path()).await);
    assert_eq!(balance(&handler, "u-old").await, 4200);
    assert_eq!(balance(&handler, "u-poor").await, 0, "not the opening 1000");
    assert_eq!(
        ledger_kinds(&handler, "u-old").await,
        [(1, "opened".to_owned())]
    );
    handler
        .charge(Request::new(charge("o-1", "u-old", 200)))
        .await
        .unwrap();
    assert_eq!(balance(&handler, "u-old").await, 4000);
    let short = handler
        .charge(Request::new(charge("o-2", "u-poor", 1)))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::FailedPrecondition, "{short:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_in_rows_carry_over_into_the_ledger_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    carried_over(&format!("sqlite://{}", dir.path().join("p.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_in_rows_carry_over_into_the_ledger_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    carried_over(&pg.url()).await;
}
