//! The auth service end to end, with the real user service beside it, on
//! SQLite and PostgreSQL: register (a user in the user service), log in,
//! tokens verified against the published key set by `trellis_auth`,
//! refresh rotation and reuse detection, logout, introspection, failed-login
//! limits, key rotation, and the audit trail of it all.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde_json::{Value, json};
use shop_auth::{AuthService, AuthSettings};
use shop_user::{UserService, UserSettings};
use tokio::sync::oneshot;
use trellis::{
    App, State,
    auth::{Jwks, JwksTiming, UrlSource, Verifier, VerifierConfig},
    config::Config,
    transport::ServerConfig,
};
use trellis_testkit::http;

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), trellis::AppError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

async fn run(app: App, addr: SocketAddr) -> Running {
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
    .expect("ready within 10 s")
    .unwrap();
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

/// The user service and the auth service in front of one database each
/// (SQLite in `dir`, or two databases' worth of tables in one PostgreSQL).
struct Shop {
    user: Running,
    auth: Running,
    settings: AuthSettings,
}

impl Shop {
    async fn start(dir: &Path, database: Option<String>, extra: &[(&str, &str)]) -> Shop {
        let mut user = Config::<UserSettings>::builder().env_vars(Vec::new());
        if let Some(url) = &database {
            user = user.set("--database-url", [("database.url", url.as_str())]);
        }
        let user = trellis::service::bind::<UserService>(
            user.build().await.unwrap(),
            &dir.join("user"),
            ServerConfig::default(),
        )
        .await
        .unwrap();
        let user_addr = user.local_addr();
        let user = run(user.into_app(App::builder("user")), user_addr).await;

        let endpoint = format!("http://{user_addr}");
        let mut set = vec![("users.endpoint", endpoint.as_str())];
        if let Some(url) = &database {
            set.push(("database.url", url.as_str()));
        }
        set.extend_from_slice(extra);
        let config = Config::<AuthSettings>::builder()
            .env_vars(Vec::new())
            .set("test", set)
            .build()
            .await
            .unwrap();
        let settings = config.current().config.clone();
        let auth = trellis::service::bind::<AuthService>(config, dir, ServerConfig::default())
            .await
            .unwrap();
        let auth_addr = auth.local_addr();
        let auth = run(auth.into_app(App::builder("auth")), auth_addr).await;
        Shop {
            user,
            auth,
            settings,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = http::request(self.auth.addr, "POST", path, Some(&body.to_string()))
            .await
            .unwrap();
        let value = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
        };
        (r.status, value)
    }

    async fn register(&self, email: &str) -> Value {
        let (status, body) = self
            .post(
                "/v1/auth/register",
                json!({"email": email, "password": "correct horse battery", "display_name": "Ann"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn login(&self, email: &str, password: &str) -> (u16, Value) {
        self.post(
            "/v1/auth/login",
            json!({"email": email, "password": password}),
        )
        .await
    }

    fn verifier(&self) -> Verifier {
        let source = UrlSource::new(
            &format!("http://{}/.well-known/jwks.json", self.auth.addr),
            None,
        )
        .unwrap();
        let mut config = VerifierConfig::new("trellis", "shop");
        config.algorithms = vec![trellis::auth::Algorithm::EdDSA];
        Verifier::new(config, Jwks::new(source, JwksTiming::default())).unwrap()
    }

    async fn stop(self) {
        self.auth.stop().await;
        self.user.stop().await;
    }
}

fn reason(body: &Value) -> &str {
    body["error"]["reason"]
        .as_str()
        .or_else(|| body["reason"].as_str())
        .unwrap_or_else(|| panic!("no reason in {body}"))
}

async fn the_whole_flow(database: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(dir.path(), database, &[("tokens.reuse_grace", "0s")]).await;

    // Register: an account is a user in the user service.
    let ann = shop.register("Ann@Example.com").await;
    assert_eq!(ann["email"], "ann@example.com");
    let id = ann["user_id"].as_str().unwrap().to_owned();
    let user = http::get(shop.user.addr, &format!("/v1/users/{id}"))
        .await
        .unwrap();
    assert_eq!(user.status, 200, "{}", user.body);
    assert!(user.body.contains("ann@example.com"), "{}", user.body);

    // Bad registrations, each naming the problem.
    let (status, body) = shop
        .post(
            "/v1/auth/register",
            json!({"email": "ann@example.com", "password": "correct horse battery", "display_name": "Ann"}),
        )
        .await;
    assert_eq!((status, reason(&body)), (409, "EMAIL_TAKEN"), "{body}");
    let (status, body) = shop
        .post(
            "/v1/auth/register",
            json!({"email": "bob@example.com", "password": "short", "display_name": "Bob"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("password"), "{body}");

    // Login: a JWT that verifies against the published keys, with the
    // claims the issue names.
    let (status, tokens) = shop.login("ann@example.com", "correct horse battery").await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 900, "a number, as RFC 6749 has it");
    let access = tokens["access_token"].as_str().unwrap();
    let verifier = shop.verifier();
    let claims = verifier.verify(access).await.unwrap();
    assert_eq!(claims.sub, id);
    assert_eq!(claims.iss, "trellis");
    assert_eq!(claims.aud, ["shop"]);
    assert_eq!(claims.roles, ["customer"]);
    assert_eq!(claims.tenant.as_deref(), Some("default"));
    assert!(claims.jti.is_some() && claims.iat.is_some() && claims.nbf.is_some());
    assert_eq!(claims.exp - claims.iat.unwrap(), 900);
    let header = jsonwebtoken::decode_header(access).unwrap();
    assert_eq!(header.alg, trellis::auth::Algorithm::EdDSA);
    assert!(header.kid.is_some());

    // Wrong password and unknown account: the same answer.
    let (s1, wrong) = shop.login("ann@example.com", "wrong horse battery").await;
    let (s2, unknown) = shop
        .login("nobody@example.com", "wrong horse battery")
        .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(wrong, unknown);
    assert_eq!(reason(&wrong), "INVALID_CREDENTIALS");

    // Introspection: access and refresh tokens are active; garbage is not.
    let (_, info) = shop
        .post("/v1/auth/introspect", json!({"token": access}))
        .await;
    assert_eq!(
        (info["active"].clone(), info["sub"].clone()),
        (json!(true), json!(id))
    );
    assert_eq!(info["token_type"], "access_token");
    let refresh1 = tokens["refresh_token"].as_str().unwrap().to_owned();
    let (_, info) = shop
        .post("/v1/auth/introspect", json!({"token": refresh1}))
        .await;
    assert_eq!(info["active"], true, "{info}");
    let (_, info) = shop
        .post("/v1/auth/introspect", json!({"token": "garbage"}))
        .await;
    assert_eq!(
        (info["active"].clone(), info["sub"].clone()),
        (json!(false), json!(null)),
        "inactive says nothing else: {info}"
    );

    // Refresh rotates: new tokens; the old refresh token is used up.
    let (status, second) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh1}))
        .await;
    assert_eq!(status, 200, "{second}");
    let refresh2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(refresh1, refresh2);
    assert_eq!(
        verifier
            .verify(second["access_token"].as_str().unwrap())
            .await
            .unwrap()
            .sub,
        id
    );
    // The second one works (the reuse below could have been refused for
    // no other reason)...
    let (_, info) = shop
        .post("/v1/auth/introspect", json!({"token": refresh2}))
        .await;
    assert_eq!(info["active"], true);
    // ...until the first is presented again: reuse revokes the family.
    let (status, body) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh1}))
        .await;
    assert_eq!((status, reason(&body)), (401, "INVALID_GRANT"), "{body}");
    let (status, body) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh2}))
        .await;
    assert_eq!(
        (status, reason(&body)),
        (401, "INVALID_GRANT"),
        "the family is revoked: {body}"
    );

    // Logout revokes a fresh login's tokens; an unknown token is no error.
    let (_, third) = shop.login("ann@example.com", "correct horse battery").await;
    let refresh3 = third["refresh_token"].as_str().unwrap();
    let (status, _) = shop
        .post("/v1/auth/logout", json!({"refresh_token": refresh3}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh3}))
        .await;
    assert_eq!(status, 401);
    let (status, _) = shop
        .post("/v1/auth/logout", json!({"refresh_token": "rt_unknown"}))
        .await;
    assert_eq!(status, 200);

    // The key set is plain RFC 8037: no empty members.
    let jwks = http::get(shop.auth.addr, "/.well-known/jwks.json")
        .await
        .unwrap();
    let jwks: Value = serde_json::from_str(&jwks.body).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["alg"].as_str()
        ),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA")),
        "{jwks}"
    );
    assert!(
        key.get("y").is_none() && key["x"].as_str().is_some_and(|x| x.len() == 43),
        "{jwks}"
    );

    // OpenID discovery names the key set.
    let doc = http::get(shop.auth.addr, "/.well-known/openid-configuration")
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&doc.body).unwrap();
    assert_eq!(doc["issuer"], "trellis");
    assert_eq!(
        doc["jwks_uri"],
        "http://127.0.0.1:8080/.well-known/jwks.json"
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["EdDSA"])
    );

    // Every decision is in the trail, and the chain holds.
    let trail = dir.path().join("auth-audit.jsonl");
    let records = trellis::auth::audit::read_all(&trail).unwrap();
    let outcomes: Vec<String> = records
        .iter()
        .map(|r| format!("{} {}", r.entry.kind, r.entry.outcome))
        .collect();
    for expected in [
        "register ok",
        "login ok",
        "login failed",
        "refresh ok",
        "refresh refused: reuse detected",
        "refresh refused: revoked",
        "logout ok",
    ] {
        assert!(
            outcomes.iter().any(|o| o == expected),
            "{expected:?} not in {outcomes:?}"
        );
    }
    let failed = records
        .iter()
        .find(|r| r.entry.outcome == "failed")
        .unwrap();
    assert_eq!(failed.entry.client_ip.as_deref(), Some("127.0.0.1"));
    trellis::auth::audit::verify(&trail).unwrap();
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_refresh_logout_on_sqlite() {
    the_whole_flow(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_refresh_logout_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    the_whole_flow(Some(pg.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_inside_the_grace_window_is_not_a_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(dir.path(), None, &[("tokens.reuse_grace", "60s")]).await;
    shop.register("cat@example.com").await;
    let (_, tokens) = shop.login("cat@example.com", "correct horse battery").await;
    let refresh = tokens["refresh_token"].as_str().unwrap();
    // The response to the first refresh is "lost"; the client sends it again.
    let (s1, first) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh}))
        .await;
    let (s2, second) = shop
        .post("/v1/auth/refresh", json!({"refresh_token": refresh}))
        .await;
    assert_eq!((s1, s2), (200, 200), "{first} {second}");
    // Both successors are live: nothing was revoked.
    for t in [&first, &second] {
        let (_, info) = shop
            .post("/v1/auth/introspect", json!({"token": t["refresh_token"]}))
            .await;
        assert_eq!(info["active"], true, "{info}");
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_account_and_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(
        dir.path(),
        None,
        &[
            ("login.max_failures_per_account", "3"),
            ("login.max_failures_per_ip", "6"),
        ],
    )
    .await;
    shop.register("dan@example.com").await;
    shop.register("eve@example.com").await;
    // The right password works before any failure...
    assert_eq!(
        shop.login("dan@example.com", "correct horse battery")
            .await
            .0,
        200
    );
    for _ in 0..3 {
        assert_eq!(
            shop.login("dan@example.com", "wrong wrong wrong").await.0,
            401
        );
    }
    // ...and not after three: the account is refused for the window.
    let (status, body) = shop.login("dan@example.com", "correct horse battery").await;
    assert_eq!(
        (status, reason(&body)),
        (429, "TOO_MANY_ATTEMPTS"),
        "{body}"
    );
    // Another account from the same address still logs in.
    assert_eq!(
        shop.login("eve@example.com", "correct horse battery")
            .await
            .0,
        200
    );
    // An unknown email is limited the same way: refusals do not tell which
    // accounts exist.
    for _ in 0..3 {
        assert_eq!(
            shop.login("ghost@example.com", "wrong wrong wrong").await.0,
            401
        );
    }
    assert_eq!(shop.login("ghost@example.com", "x").await.0, 429);
    // Six failures from this address in all: now every account is refused
    // from it, even with the right password.
    let (status, _) = shop.login("eve@example.com", "correct horse battery").await;
    assert_eq!(status, 429);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_takes_as_long_for_an_unknown_account_as_for_a_known_one() {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(
        dir.path(),
        None,
        &[
            ("login.max_failures_per_ip", "1000"),
            ("login.max_failures_per_account", "1000"),
        ],
    )
    .await;
    shop.register("fay@example.com").await;
    async fn median(shop: &Shop, email: &str) -> Duration {
        let mut times = Vec::new();
        for _ in 0..7 {
            let start = std::time::Instant::now();
            assert_eq!(shop.login(email, "wrong wrong wrong").await.0, 401);
            times.push(start.elapsed());
        }
        times.sort();
        times[3]
    }
    // Alternate so background noise hits both.
    let known = median(&shop, "fay@example.com").await;
    let unknown = median(&shop, "nobody@example.com").await;
    let known2 = median(&shop, "fay@example.com").await;
    let known = known.min(known2);
    // Without the decoy hash an unknown account answers in well under a
    // millisecond against tens for a known one; a factor of three either
    // way is noise, not a leak.
    assert!(
        unknown * 3 > known && known * 3 > unknown,
        "known {known:?} vs unknown {unknown:?}"
    );
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_published_before_it_signs_and_old_tokens_stay_valid() {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(dir.path(), None, &[("keys.reload_interval", "100ms")]).await;
    shop.register("gus@example.com").await;
    let (_, before) = shop.login("gus@example.com", "correct horse battery").await;
    let old_token = before["access_token"].as_str().unwrap().to_owned();
    let old_kid = jsonwebtoken::decode_header(&old_token)
        .unwrap()
        .kid
        .unwrap();

    // A key that activates in an hour: published at once, not signing.
    let pending = shop_auth::rotate_key(&shop.settings, dir.path(), Duration::from_secs(3600))
        .await
        .unwrap();
    let jwks = http::poll_until(
        shop.auth.addr,
        "/.well-known/jwks.json",
        Duration::from_secs(10),
        |r| r.body.contains(&pending.kid),
    )
    .await
    .unwrap();
    assert!(jwks.body.contains(&old_kid), "{}", jwks.body);
    let (_, during) = shop.login("gus@example.com", "correct horse battery").await;
    let kid = |t: &Value| {
        jsonwebtoken::decode_header(t["access_token"].as_str().unwrap())
            .unwrap()
            .kid
            .unwrap()
    };
    assert_eq!(kid(&during), old_kid, "a pending key does not sign");

    // One that activates now: the next login is signed with it.
    let now = shop_auth::rotate_key(&shop.settings, dir.path(), Duration::ZERO)
        .await
        .unwrap();
    // Published and signing come from one reload of the key table: once
    // the key set shows it, logins are signed with it.
    let jwks = http::poll_until(
        shop.auth.addr,
        "/.well-known/jwks.json",
        Duration::from_secs(10),
        |r| r.body.contains(&now.kid),
    )
    .await
    .unwrap();
    assert!(jwks.body.contains(&now.kid), "{}", jwks.body);
    let (_, after) = shop.login("gus@example.com", "correct horse battery").await;
    assert_eq!(kid(&after), now.kid);
    // The old key's token still verifies: its key stays published.
    let verifier = shop.verifier();
    verifier.verify(&old_token).await.unwrap();
    verifier
        .verify(after["access_token"].as_str().unwrap())
        .await
        .unwrap();
    let status = shop_auth::key_status(&shop.settings, dir.path())
        .await
        .unwrap();
    let states: Vec<(&str, &str)> = status
        .iter()
        .map(|s| (s.key.kid.as_str(), s.state))
        .collect();
    assert!(
        states.contains(&(old_kid.as_str(), "retiring")),
        "{states:?}"
    );
    assert!(states.contains(&(now.kid.as_str(), "active")), "{states:?}");
    assert!(
        states.contains(&(pending.kid.as_str(), "pending")),
        "{states:?}"
    );
    // Keys are sealed at rest: the database holds no private key.
    let db = std::fs::read(dir.path().join("auth.db")).unwrap();
    let text = String::from_utf8_lossy(&db);
    assert!(!text.contains("PRIVATE KEY"));
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sealed_under_another_encryption_key_does_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let shop = Shop::start(dir.path(), None, &[]).await;
    shop.stop().await;
    // The same data dir, a different key encryption key: the stored key
    // does not open, so the service refuses to start signing with nothing.
    let other = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    let shop = Shop::start(dir.path(), None, &[("keys.encryption_key", other)]).await;
    shop.register("hal@example.com").await;
    let (status, body) = shop.login("hal@example.com", "correct horse battery").await;
    assert_eq!(status, 503, "{body}");
    let keys = shop_auth::key_status(&shop.settings, dir.path())
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].state, "unreadable", "{keys:?}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_and_rs256_keys_by_config() {
    for (alg, kty) in [("ES256", "EC"), ("RS256", "RSA")] {
        let dir = tempfile::tempdir().unwrap();
        let shop = Shop::start(dir.path(), None, &[("keys.algorithm", alg)]).await;
        shop.register("ivy@example.com").await;
        let (status, tokens) = shop.login("ivy@example.com", "correct horse battery").await;
        assert_eq!(status, 200, "{tokens}");
        let token = tokens["access_token"].as_str().unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(format!("{:?}", header.alg), alg);
        let jwks = http::get(shop.auth.addr, "/.well-known/jwks.json")
            .await
            .unwrap();
        let jwks: Value = serde_json::from_str(&jwks.body).unwrap();
        assert_eq!(jwks["keys"][0]["kty"], kty, "{jwks}");
        // Verified from the published key set, as any verifier would.
        let source = UrlSource::new(
            &format!("http://{}/.well-known/jwks.json", shop.auth.addr),
            None,
        )
        .unwrap();
        let verifier = Verifier::new(
            VerifierConfig::new("trellis", "shop"),
            Jwks::new(source, JwksTiming::default()),
        )
        .unwrap();
        verifier.verify(token).await.unwrap();
        shop.stop().await;
    }
}
