//! The user service over real gRPC, against SQLite and against PostgreSQL
//! from the testkit, including bad input and restarts.

use std::{net::SocketAddr, time::Duration};

use shop_user::{
    UserService, UserSettings,
    api::v1::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRequest,
        User, user_service_client::UserServiceClient,
    },
};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use trellis::{App, Code, Error, State, transport::ServerConfig};

/// A running user service; stops (and waits for the drain) on `stop`.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), trellis::AppError>>,
}

impl Running {
    async fn start(database_url: &str) -> Running {
        Self::with(&[
            ("database.url", database_url),
            ("database.max_connections", "4"),
        ])
        .await
    }

    /// The service on the one path every service takes, with these
    /// settings over the defaults.
    async fn with(settings: &[(&str, &str)]) -> Running {
        let service = trellis::service::bind::<UserService>(
            settings_with(settings).await,
            // Unused: every caller names its database.
            std::path::Path::new("./.trellis"),
            ServerConfig::default(),
        )
        .await
        .unwrap();
        let addr = service.local_addr();
        let app = service.into_app(App::builder("user"));
        let mut lifecycle = app.lifecycle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        tokio::time::timeout(
            Duration::from_secs(10),
            lifecycle.wait_for(|s| *s == State::Ready),
        )
        .await
        .unwrap()
        .unwrap();
        Running {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(
            trellis::transport::connect(&self.addr.to_string(), &Default::default())
                .await
                .unwrap(),
        )
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// The user service's config: defaults, then `settings` (no files, no
/// process environment).
async fn settings_with(settings: &[(&str, &str)]) -> trellis::config::Config<UserSettings> {
    trellis::config::Config::<UserSettings>::builder()
        .env_vars(Vec::new())
        .set("the test", settings.iter().copied())
        .build()
        .await
        .unwrap()
}

fn new_user(email: &str, name: &str) -> CreateUserRequest {
    CreateUserRequest {
        user: Some(User {
            email: email.into(),
            display_name: name.into(),
            ..Default::default()
        }),
    }
}

/// Asserts a call failed with `code` and, when given, the field it names.
fn assert_error<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    reason: &str,
    field: Option<&str>,
) {
    let err = Error::from(result.expect_err("call should have failed"));
    assert_eq!(err.code(), code, "{err}");
    assert_eq!(err.reason(), reason, "{err}");
    assert_eq!(
        err.metadata().get("field").map(String::as_str),
        field,
        "{err}"
    );
}

/// The whole contract, run against each store.
async fn exercise(database_url: &str) {
    let service = Running::start(database_url).await;
    let mut client = service.client().await;

    // Create: normalised, server-assigned id and timestamps.
    let ada = client
        .create_user(new_user("  Ada@Example.com ", " Ada "))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.display_name, "Ada");
    assert!(uuid::Uuid::parse_str(&ada.id).is_ok());
    assert!(ada.create_time.is_some() && ada.create_time == ada.update_time);

    // Bad input names the field; duplicates and unknown ids are told apart.
    assert_error(
        client
            .create_user(new_user("ADA@example.com", "Other"))
            .await,
        Code::AlreadyExists,
        "EMAIL_TAKEN",
        Some("email"),
    );
    assert_error(
        client.create_user(new_user("not-an-email", "X")).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("email"),
    );
    assert_error(
        client.create_user(new_user("x@example.com", "  ")).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("display_name"),
    );
    assert_error(
        client.create_user(CreateUserRequest { user: None }).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("user"),
    );
    assert_error(
        client.get_user(GetUserRequest { id: "42".into() }).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("id"),
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_error(
        client
            .get_user(GetUserRequest {
                id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
        None,
    );

    // Get returns what Create stored.
    assert_eq!(
        client
            .get_user(GetUserRequest { id: ada.id.clone() })
            .await
            .unwrap()
            .into_inner(),
        ada
    );

    // Paging: every user exactly once, in creation order, pages of two.
    let mut created = vec![ada.id.clone()];
    for i in 0..4 {
        let u = client
            .create_user(new_user(
                &format!("user{i}@example.com"),
                &format!("User {i}"),
            ))
            .await
            .unwrap();
        created.push(u.into_inner().id);
    }
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = client
            .list_users(ListUsersRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    assert_error(
        client
            .list_users(ListUsersRequest {
                page_size: -1,
                page_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("page_size"),
    );
    assert_error(
        client
            .list_users(ListUsersRequest {
                page_size: 2,
                page_token: "garbage".into(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("page_token"),
    );

    // Update: only the masked field changes, update_time moves forward.
    let renamed = client
        .update_user(UpdateUserRequest {
            user: Some(User {
                id: ada.id.clone(),
                display_name: "Ada Lovelace".into(),
                email: "ignored@example.com".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.display_name, "Ada Lovelace");
    assert_eq!(renamed.email, "ada@example.com");
    assert!(
        renamed.update_time.as_ref().map(|t| (t.seconds, t.nanos))
            > ada.update_time.as_ref().map(|t| (t.seconds, t.nanos))
    );
    assert_error(
        client
            .update_user(UpdateUserRequest {
                user: Some(User {
                    id: ada.id.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["id".into()],
                }),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
        Some("update_mask"),
    );
    assert_error(
        client
            .update_user(UpdateUserRequest {
                user: Some(User {
                    id: ada.id.clone(),
                    email: "user0@example.com".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["email".into()],
                }),
            })
            .await,
        Code::AlreadyExists,
        "EMAIL_TAKEN",
        Some("email"),
    );
    assert_error(
        client
            .update_user(UpdateUserRequest {
                user: Some(User {
                    id: unknown.clone(),
                    display_name: "Nobody".into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
        None,
    );

    // Delete, then it is gone.
    client
        .delete_user(DeleteUserRequest { id: ada.id.clone() })
        .await
        .unwrap();
    assert_error(
        client.get_user(GetUserRequest { id: ada.id.clone() }).await,
        Code::NotFound,
        "USER_NOT_FOUND",
        None,
    );
    assert_error(
        client
            .delete_user(DeleteUserRequest { id: ada.id.clone() })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
        None,
    );

    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    exercise(&format!(
        "sqlite://{}",
        dir.path().join("user.db").display()
    ))
    .await;
}

/// An invalid id of 2 MiB: the error names the field and quotes a bounded
/// prefix, so the answer stays small (it used to echo the whole value in
/// grpc-message and again in the details trailer, ~3× the input).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_huge_id_is_answered_with_a_bounded_error() {
    let dir = tempfile::tempdir().unwrap();
    let service = Running::start(&format!("sqlite://{}", dir.path().join("u.db").display())).await;
    let mut client = service.client().await;
    let id = "z".repeat(2 * 1024 * 1024);
    let status = client
        .get_user(GetUserRequest { id: id.clone() })
        .await
        .expect_err("a 2 MiB id is not a user id");
    let err = Error::from(status.clone());
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(err.metadata().get("field").map(String::as_str), Some("id"));
    assert!(
        status.message().len() <= 1024 && status.details().len() <= 4096,
        "message {} bytes, details {} bytes for a {}-byte id",
        status.message().len(),
        status.details().len(),
        id.len()
    );
    assert!(
        status.message().contains("(2097152 bytes)"),
        "{}",
        status.message()
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_contract_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    exercise(&pg.url()).await;
}

/// PostgreSQL restarted under load (fast shutdown: sessions end with
/// 57P01): callers see UNAVAILABLE with a retry hint, never INTERNAL, and
/// the service serves again on its own once PostgreSQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_is_unavailable_then_recovers() {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    };
    let mut pg = trellis_testkit::Postgres::start().unwrap();
    let url = pg.url();
    let service = Running::with(&[
        ("database.url", url.as_str()),
        ("database.max_connections", "4"),
        // Calls wait this long for PostgreSQL before failing UNAVAILABLE.
        ("database.acquire_timeout", "200ms"),
        // Reads reach the database (the cache would answer them while it
        // is down).
        ("cache.enabled", "false"),
    ])
    .await;
    let mut client = service.client().await;
    let ada = client
        .create_user(new_user("ada@example.com", "Ada"))
        .await
        .unwrap()
        .into_inner();

    let successes = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<Vec<Error>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (mut client, id) = (service.client().await, ada.id.clone());
        let (successes, errors, stop) = (successes.clone(), errors.clone(), stop.clone());
        load.spawn(async move {
            while !stop.load(SeqCst) {
                match client.get_user(GetUserRequest { id: id.clone() }).await {
                    Ok(_) => {
                        successes.fetch_add(1, SeqCst);
                    }
                    Err(status) => errors.lock().unwrap().push(Error::from(status)),
                }
            }
        });
    }
    let wait_for_successes = |at_least: u64, within: Duration| {
        let successes = successes.clone();
        async move {
            let deadline = tokio::time::Instant::now() + within;
            while successes.load(SeqCst) < at_least {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} successful calls within {within:?}",
                    successes.load(SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_successes(50, Duration::from_secs(10)).await;

    // Down for longer than a call waits for a connection: calls fail.
    tokio::task::block_in_place(|| pg.stop()).unwrap();
    let failed_before = errors.lock().unwrap().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while errors.lock().unwrap().len() < failed_before + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls did not fail while PostgreSQL was down"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| pg.start_again()).unwrap();
    let back_at = std::time::Instant::now();
    let before = successes.load(SeqCst);
    wait_for_successes(before + 50, Duration::from_secs(15)).await;
    eprintln!(
        "serving again {:?} after PostgreSQL accepted connections",
        back_at.elapsed()
    );
    stop.store(true, SeqCst);
    while load.join_next().await.is_some() {}

    let errors = std::mem::take(&mut *errors.lock().unwrap());
    assert!(
        !errors.is_empty(),
        "no call failed: the restart was never seen by the service"
    );
    for err in errors.iter() {
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.retry_after().is_some(), "no retry hint on {err}");
    }
    eprintln!("{} calls failed, all UNAVAILABLE", errors.len());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_users_across_a_restart_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}",
        dir.path().join("nested/dir/user.db").display()
    );
    let first = Running::start(&url).await;
    let ada = first
        .client()
        .await
        .create_user(new_user("ada@example.com", "Ada"))
        .await
        .unwrap()
        .into_inner();
    first.stop().await;

    let second = Running::start(&url).await;
    let again = second
        .client()
        .await
        .get_user(GetUserRequest { id: ada.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, ada);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_health_per_service_and_reflects_v1_and_v1alpha() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::{v1, v1alpha};

    let dir = tempfile::tempdir().unwrap();
    let service = Running::start(&format!(
        "sqlite://{}",
        dir.path().join("user.db").display()
    ))
    .await;
    let channel = trellis::transport::connect(&service.addr.to_string(), &Default::default())
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for name in ["", "shop.user.v1.UserService"] {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {name:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut v1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(v1::ServerReflectionResponse {
        message_response:
            Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)),
        ..
    })) = responses.next().await
    else {
        panic!("no v1 list-services response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"shop.user.v1.UserService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    let mut v1alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "shop.user.v1.UserService".into(),
            ),
        ),
    };
    let mut responses = v1alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(Ok(v1alpha::ServerReflectionResponse {
        message_response:
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)),
        ..
    })) = responses.next().await
    else {
        panic!("no v1alpha file response");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    service.stop().await;
}

#[tokio::test]
async fn refuses_an_unsupported_database_url_naming_it() {
    // The settings refuse it, naming the key and where it came from.
    let err = trellis::config::Config::<UserSettings>::builder()
        .env_vars(Vec::new())
        .set("--database-url", [("database.url", "mysql://db/shop")])
        .build()
        .await
        .err()
        .expect("mysql is not supported");
    let text = err.to_string();
    assert!(
        text.contains("database.url")
            && text.contains("--database-url")
            && text.contains("sqlite:"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stack_rate_limits_live_from_config_and_the_resilient_client_calls_through() {
    use trellis::config::Config;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user.toml");
    std::fs::write(&file, "[server.rate_limit]\nrate = 0\nkey = \"route\"\n").unwrap();
    let config = Config::<shop_user::UserSettings>::builder()
        .file(&file)
        .env_vars(Vec::new())
        .build()
        .await
        .unwrap();
    let service =
        trellis::service::bind::<UserService>(config.clone(), dir.path(), ServerConfig::default())
            .await
            .unwrap();
    let addr = service.local_addr();
    let registry = trellis::registry::MemoryRegistry::new();
    let app = service
        .into_app(App::builder("user-stack").registry(std::sync::Arc::new(registry.clone())));
    let mut lifecycle = app.lifecycle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    lifecycle.wait_for(|s| *s == State::Ready).await.unwrap();

    // Through discovery, deadline, retries and a breaker.
    let channel = trellis::resilient_client(&registry, "user-stack")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while channel.balanced().endpoints().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never discovered the service"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = UserServiceClient::new(channel);
    let list = || shop_user::api::v1::ListUsersRequest {
        page_size: 1,
        page_token: String::new(),
    };
    for _ in 0..20 {
        client.list_users(list()).await.unwrap();
    }

    // A limit set while running applies to the next requests.
    std::fs::write(
        &file,
        "[server.rate_limit]\nrate = 2\nburst = 2\nkey = \"route\"\n",
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while config.current().config.server.rate_limit.rate != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let mut direct = UserServiceClient::new(
        trellis::transport::connect(&addr.to_string(), &Default::default())
            .await
            .unwrap(),
    );
    // The limiter follows the config on a task of its own: the first
    // limited call says it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while direct.list_users(list()).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no call was limited 5 s after the limit applied"
        );
    }
    let results: Vec<Result<_, tonic::Status>> = futures_in_order(&mut direct, 4).await;
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    assert!(
        limited >= 2,
        "with rate 2/s, burst 2, most of 4 quick calls are limited: {results:?}"
    );
    let exposition = trellis::telemetry::prometheus().unwrap().render();
    let rejections: u64 = exposition
        .lines()
        .find_map(|l| l.strip_prefix("rate_limit_rejections_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rate_limit_rejections_total in {exposition}"));
    assert!(rejections >= limited as u64, "{rejections} < {limited}");

    // And lifted again.
    std::fs::write(&file, "[server.rate_limit]\nrate = 0\nkey = \"route\"\n").unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while config.current().config.server.rate_limit.rate != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while direct.list_users(list()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls were still limited 5 s after the limit was lifted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        direct.list_users(list()).await.unwrap();
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

async fn futures_in_order(
    client: &mut UserServiceClient<Channel>,
    n: usize,
) -> Vec<Result<shop_user::api::v1::ListUsersResponse, tonic::Status>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            client
                .list_users(shop_user::api::v1::ListUsersRequest {
                    page_size: 1,
                    page_token: String::new(),
                })
                .await
                .map(tonic::Response::into_inner),
        );
    }
    out
}
