//! `trellis events tail|replay`: follow the event bus, and rebuild a
//! projection from it.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use prost_reflect::{DescriptorPool, DynamicMessage};
use trellis::core::Secret;
use trellis_events::{Bus, EventsSettings, StartAt, Stored};

#[derive(Args, Clone)]
pub struct BusArgs {
    /// The bus: nats://host:port (tls://…) for JetStream; default the
    /// embedded log, DATA_DIR/events.db.
    #[arg(long, env = "TRELLIS_EVENTS")]
    events: Option<String>,
    /// Where `trellis up` keeps its data (the embedded log).
    #[arg(long, default_value = "./.trellis")]
    data_dir: PathBuf,
}

impl BusArgs {
    async fn connect(&self) -> Result<Bus, String> {
        let settings = EventsSettings {
            url: self.events.clone().map(Secret::new),
            ..EventsSettings::default()
        };
        Bus::connect(&settings, &self.data_dir)
            .await
            .map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Print events as they are published: sequence, time, bus subject,
    /// type, CloudEvents subject and data (protobuf data decoded by its
    /// schema, as JSON).
    Tail {
        /// The subjects (`*` one token, `>` the rest).
        #[arg(default_value = "events.>")]
        subject: String,
        /// Start with the oldest event kept (default: only new ones).
        #[arg(long, conflicts_with = "from_seq")]
        all: bool,
        /// Start at this stream sequence.
        #[arg(long)]
        from_seq: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per event (the CloudEvent in structured mode,
        /// data decoded) instead of a line of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Rebuild a projection from zero by replaying the stream into it.
    Replay {
        /// Which projection.
        #[arg(value_parser = ["order-history"])]
        projection: String,
        /// The order service's database (default: DATA_DIR/order.db).
        #[arg(long)]
        database_url: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
}

pub async fn run(command: EventsCommand) -> Result<(), String> {
    match command {
        EventsCommand::Tail {
            subject,
            all,
            from_seq,
            count,
            json,
            bus,
        } => {
            let start = match (all, from_seq) {
                (_, Some(seq)) => StartAt::Seq(seq),
                (true, None) => StartAt::All,
                (false, None) => StartAt::New,
            };
            let schemas = schemas();
            let mut reader = bus
                .connect()
                .await?
                .read(&subject, start)
                .await
                .map_err(|e| e.to_string())?;
            let mut seen = 0;
            while count.is_none_or(|n| seen < n) {
                let stored = reader.next().await.map_err(|e| e.to_string())?;
                println!("{}", render(&stored, &schemas, json));
                seen += 1;
            }
            Ok(())
        }
        EventsCommand::Replay {
            projection: _,
            database_url,
            bus,
        } => {
            let database = trellis_store::DatabaseSettings {
                url: database_url.map(Secret::new),
                ..Default::default()
            };
            let orders = shop_order::data::Orders::open(&database, &bus.data_dir.join("order.db"))
                .await
                .map_err(|e| e.to_string())?;
            let bus = bus.connect().await?;
            trellis_events::migrate(orders.pool())
                .await
                .map_err(|e| e.to_string())?;
            let applied = trellis_events::projection::rebuild(
                orders.pool(),
                &bus,
                &shop_order::history::OrderHistory,
            )
            .await
            .map_err(|e| e.to_string())?;
            println!(
                "{}: rebuilt from {applied} events (checkpoint {})",
                shop_order::history::NAME,
                bus.last_seq().await.map_err(|e| e.to_string())?
            );
            orders.close().await;
            Ok(())
        }
    }
}

/// The shop's messages, to decode protobuf event data by its schema.
fn schemas() -> DescriptorPool {
    let mut pool = DescriptorPool::new();
    for set in [
        shop_order::api::FILE_DESCRIPTOR_SET,
        shop_inventory::api::FILE_DESCRIPTOR_SET,
        shop_payment::api::FILE_DESCRIPTOR_SET,
    ] {
        if let Err(e) = pool.decode_file_descriptor_set(set) {
            tracing::debug!(error = %e, "descriptor set not added");
        }
    }
    pool
}

/// The event's data as JSON: decoded by its protobuf schema, parsed when
/// JSON, else base64.
fn data_json(stored: &Stored, schemas: &DescriptorPool) -> serde_json::Value {
    let event = &stored.event;
    if let Some(message) = event.proto_message()
        && let Some(descriptor) = schemas.get_message_by_name(message)
        && let Ok(decoded) = DynamicMessage::decode(descriptor, event.data.clone())
        && let Ok(value) = serde_json::to_value(&decoded)
    {
        return value;
    }
    serde_json::from_slice(&event.data).unwrap_or_else(|_| {
        use base64::Engine as _;
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(&event.data))
    })
}

fn render(stored: &Stored, schemas: &DescriptorPool, json: bool) -> String {
    let data = data_json(stored, schemas);
    let event = &stored.event;
    if json {
        let mut doc: serde_json::Value =
            serde_json::from_slice(&event.to_structured()).unwrap_or_default();
        if let Some(doc) = doc.as_object_mut() {
            doc.remove("data_base64");
            doc.insert("data".into(), data);
        }
        serde_json::json!({
            "seq": stored.seq,
            "subject": stored.subject,
            "published": crate::rfc3339(stored.published_ms),
            "event": doc,
        })
        .to_string()
    } else {
        format!(
            "#{} {} {} {} {} {}",
            stored.seq,
            crate::rfc3339(stored.published_ms),
            stored.subject,
            event.ty,
            event.subject.as_deref().unwrap_or("-"),
            data
        )
    }
}
