//! The notifications consumer on NATS JetStream: the order service's events
//! become one notification each, however often they are delivered — a
//! copy republished under another message id (as by a relay that stayed
//! down past the duplicate window) is absorbed by the inbox —, data that
//! cannot be read is dead-lettered without stopping the consumer, and a
//! user sees only their own.

use std::time::Duration;

use prost::Message;
use shop_order::api::v1::{OrderConfirmed, OrderFailed, OrderPlaced};
use shop_user::{
    api::v1::{ListNotificationsRequest, user_service_server::UserService},
    biz::Users,
    data::SqlUserRepo,
    notify,
    service::UserServiceHandler,
};
use tonic::Request;
use trellis_events::{Bus, Event, EventsSettings, StartAt};

fn order_event(what: &str, message: &str, order: &str, data: Vec<u8>) -> Event {
    Event::new("/shop/order", format!("shop.order.{what}.v1"), data)
        .with_content_type("application/protobuf")
        .with_schema(format!("proto:shop.order.v1.{message}"))
        .with_subject(format!("order/{order}"))
}

async fn listed(handler: &UserServiceHandler<SqlUserRepo>, user: &str) -> Vec<(String, String)> {
    handler
        .list_notifications(Request::new(ListNotificationsRequest {
            user_id: user.into(),
            page_size: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .notifications
        .into_iter()
        .map(|n| (n.kind, n.order_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_events_notify_their_user_once() {
    let nats = trellis_testkit::Nats::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = trellis_store::DatabaseSettings {
        url: Some(trellis::core::Secret::new(format!(
            "sqlite://{}",
            dir.path().join("user.db").display()
        ))),
        ..Default::default()
    };
    let store = SqlUserRepo::open(&settings, &dir.path().join("user.db"))
        .await
        .unwrap();
    let events = EventsSettings {
        url: Some(trellis::core::Secret::new(nats.url())),
        ..EventsSettings::default()
    };
    let bus = Bus::connect(&events, dir.path()).await.unwrap();
    let consumer = tokio::spawn(notify::run(store.pool().clone(), bus.clone()));
    let handler =
        UserServiceHandler::new(Users::new(store.clone())).with_notifications(store.pool().clone());

    let placed = OrderPlaced {
        order_id: "o-1".into(),
        user_id: "u-1".into(),
        lines: vec![],
        total_cents: 900,
    };
    let confirmed = order_event(
        "confirmed",
        "OrderConfirmed",
        "o-1",
        OrderConfirmed {
            order_id: "o-1".into(),
            user_id: "u-1".into(),
        }
        .encode_to_vec(),
    );
    bus.publish(
        "events.order.placed",
        &order_event("placed", "OrderPlaced", "o-1", placed.encode_to_vec()),
    )
    .await
    .unwrap();
    bus.publish("events.order.confirmed", &confirmed)
        .await
        .unwrap();
    // The same event again under another message id: JetStream keeps it,
    // the consumer gets it a second time.
    let raw = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in confirmed.to_headers() {
        headers.insert(name.as_str(), value.as_str());
    }
    headers.insert("Nats-Msg-Id", "republished-after-the-window");
    let copy = js
        .publish_with_headers("events.order.confirmed", headers, confirmed.data.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!copy.duplicate, "the bus kept the copy: it is delivered");
    // Unreadable data: dead-lettered, and the consumer goes on.
    bus.publish(
        "events.order.confirmed",
        &order_event("confirmed", "OrderConfirmed", "o-2", vec![0xff, 0xff, 0xff]),
    )
    .await
    .unwrap();
    // The last one: once its notification is there, every event before it
    // was handled (one consumer, in stream order).
    bus.publish(
        "events.order.failed",
        &order_event(
            "failed",
            "OrderFailed",
            "o-3",
            OrderFailed {
                order_id: "o-3".into(),
                reason: "payment: insufficient funds".into(),
                user_id: "u-1".into(),
            }
            .encode_to_vec(),
        ),
    )
    .await
    .unwrap();

    let seen = trellis_testkit::eventually(
        Duration::from_secs(20),
        "the last event's notification",
        || {
            let handler = handler.clone();
            async move {
                let got = listed(&handler, "u-1").await;
                if got.iter().any(|n| n.1 == "o-3") {
                    Ok(got)
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    assert_eq!(
        seen,
        [
            ("order_failed".to_owned(), "o-3".to_owned()),
            ("order_confirmed".to_owned(), "o-1".to_owned()),
        ],
        "one notification per event, newest first; none for the placed order"
    );
    // Both deliveries of o-1's confirmation went through the inbox: one row
    // per event handled (o-1, o-3), the copy acknowledged as a duplicate.
    let handled: i64 = trellis_store::with_pool!(store.pool(), p => {
        sqlx::query_scalar("SELECT count(*) FROM trellis_inbox WHERE consumer = $1")
            .bind(notify::CONSUMER)
            .fetch_one(p)
            .await
            .unwrap()
    });
    assert_eq!(handled, 2);
    let mut dead = bus.read("events.dlq.>", StartAt::All).await.unwrap();
    let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("the unreadable event was dead-lettered")
        .unwrap();
    assert_eq!(letter.event.subject.as_deref(), Some("order/o-2"));

    // A user sees their own only.
    let mut theirs = Request::new(ListNotificationsRequest {
        user_id: "u-1".into(),
        page_size: 0,
    });
    theirs
        .metadata_mut()
        .insert("x-user-id", "u-2".parse().unwrap());
    let denied = handler.list_notifications(theirs).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(listed(&handler, "u-2").await.is_empty());
    consumer.abort();
}
