//! Tokens verified against key sets in process and over real HTTP: what is
//! accepted, every reason a token is refused, and how the key cache fetches
//! (a new `kid` found at once, made-up ones held to one fetch per cooldown,
//! stale keys served while the key set is down, a withdrawn key refused).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, routing::get};
use base64::Engine as _;
use http::{Request, StatusCode, header};
use tower::{ServiceExt, service_fn};
use trellis_auth::{
    Access, Algorithm, AuthLayer, Claims, Header, JwkSet, Jwks, JwksTiming, Policy, Refusal,
    SigningKey, StaticSource, UrlSource, Verifier, VerifierConfig,
};

const ISSUER: &str = "https://auth.test";
const AUDIENCE: &str = "shop";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "sub": sub, "aud": AUDIENCE,
        "exp": now() + 600, "iat": now(), "nbf": now() - 1,
        "jti": uuid(), "roles": ["customer"], "tenant": "acme",
    })
}

/// A different token each call (a fresh `jti`), so the verified-token cache
/// cannot answer for the key set.
fn uuid() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn set(keys: &[&SigningKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|k| k.jwk().clone()).collect(),
    }
}

fn timing(cooldown: Duration) -> JwksTiming {
    JwksTiming {
        refresh: Duration::from_secs(3600),
        cooldown,
    }
}

fn verifier(keys: Arc<Jwks>) -> Verifier {
    Verifier::new(VerifierConfig::new(ISSUER, AUDIENCE), keys).unwrap()
}

#[tokio::test]
async fn a_good_token_passes_and_each_fault_is_refused_for_its_reason() {
    let key = SigningKey::generate_ed25519("k1").unwrap();
    let es = SigningKey::generate_es256("k2").unwrap();
    let rs = SigningKey::generate_rs256("k3").unwrap();
    let keys = Jwks::new(
        StaticSource::new(set(&[&key, &es, &rs])),
        timing(Duration::ZERO),
    );
    let v = verifier(keys);

    let ok = v
        .verify(&key.sign(&claims("alice")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (ok.sub.as_str(), ok.tenant.as_deref()),
        ("alice", Some("acme"))
    );
    assert_eq!(ok.roles, ["customer"]);
    // RS256 keys sign tokens the verifier takes from their JWK (n, e).
    assert_eq!(
        v.verify(&rs.sign(&claims("carol")).unwrap())
            .await
            .unwrap()
            .sub,
        "carol"
    );
    // A round trip through the PKCS#8 document gives the same key.
    let again = SigningKey::from_pkcs8("k3", trellis_auth::Algorithm::RS256, rs.pkcs8()).unwrap();
    assert_eq!(again.jwk(), rs.jwk());
    // ES256 is on the default allowlist too.
    assert_eq!(
        v.verify(&es.sign(&claims("bob")).unwrap())
            .await
            .unwrap()
            .sub,
        "bob"
    );

    let with = |patch: serde_json::Value| {
        let mut c = claims("alice");
        for (k, val) in patch.as_object().unwrap() {
            if val.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = val.clone();
            }
        }
        key.sign(&c).unwrap()
    };
    let cases = [
        (
            with(serde_json::json!({"exp": now() - 120})),
            Refusal::Expired,
        ),
        (
            with(serde_json::json!({"nbf": now() + 120})),
            Refusal::NotYetValid,
        ),
        (
            with(serde_json::json!({"iss": "https://evil.test"})),
            Refusal::Issuer,
        ),
        (
            with(serde_json::json!({"aud": ["other"]})),
            Refusal::Audience,
        ),
        (
            with(serde_json::json!({"sub": null})),
            Refusal::Claim("sub".into()),
        ),
        (
            with(serde_json::json!({"exp": null})),
            Refusal::Claim("exp".into()),
        ),
    ];
    for (token, want) in cases {
        assert_eq!(v.verify(&token).await.unwrap_err(), want);
    }
    // Within the leeway (30 s) an expired token still passes.
    v.verify(&with(serde_json::json!({"exp": now() - 5})))
        .await
        .unwrap();

    // A changed payload, the signature kept.
    let good = key.sign(&claims("alice")).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    payload["roles"] = serde_json::json!(["admin"]);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&payload).unwrap()),
        parts[2]
    );
    assert_eq!(v.verify(&forged).await.unwrap_err(), Refusal::Signature);

    // `alg: none`, and HS256 "signed" with the public key's bytes.
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    assert!(matches!(
        v.verify(&none).await.unwrap_err(),
        Refusal::Malformed | Refusal::Algorithm(_)
    ));
    let x = key.jwk().algorithm.clone();
    let public_bytes = match x {
        jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(p) => b64.decode(p.x).unwrap(),
        _ => unreachable!(),
    };
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let hs_token = jsonwebtoken::encode(
        &hs,
        &claims("alice"),
        &jsonwebtoken::EncodingKey::from_secret(&public_bytes).unwrap(),
    )
    .unwrap();
    assert_eq!(
        v.verify(&hs_token).await.unwrap_err(),
        Refusal::Algorithm("HS256".into())
    );

    // typ, crit, an unknown kid, a kid of the wrong algorithm.
    let mut odd = Header::new(Algorithm::EdDSA);
    odd.kid = Some("k1".into());
    odd.typ = Some("secevent+jwt".into());
    let token = key.sign_with_header(&odd, &claims("alice")).unwrap();
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        Refusal::Type("secevent+jwt".into())
    );
    let crit = format!(
        "{}.{}.{}",
        b64.encode(br#"{"alg":"EdDSA","kid":"k1","crit":["exp"],"exp":1}"#),
        parts[1],
        parts[2]
    );
    assert_eq!(v.verify(&crit).await.unwrap_err(), Refusal::Critical);
    let stranger = SigningKey::generate_ed25519("k9").unwrap();
    assert_eq!(
        v.verify(&stranger.sign(&claims("mallory")).unwrap())
            .await
            .unwrap_err(),
        Refusal::UnknownKey
    );
    // The stranger's key under a kid the set knows: the signature fails.
    let impostor = SigningKey::from_pkcs8("k1", Algorithm::EdDSA, stranger.pkcs8()).unwrap();
    assert_eq!(
        v.verify(&impostor.sign(&claims("mallory")).unwrap())
            .await
            .unwrap_err(),
        Refusal::Signature
    );
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some("k1".into()); // k1 is an Ed25519 key
    let token = es.sign_with_header(&es_header, &claims("alice")).unwrap();
    assert_eq!(v.verify(&token).await.unwrap_err(), Refusal::UnknownKey);

    // An allowlist without ES256 refuses ES256 tokens by their algorithm.
    let mut only_ed = VerifierConfig::new(ISSUER, AUDIENCE);
    only_ed.algorithms = vec![Algorithm::EdDSA];
    let strict = Verifier::new(
        only_ed,
        Jwks::new(StaticSource::new(set(&[&key, &es])), timing(Duration::ZERO)),
    )
    .unwrap();
    assert_eq!(
        strict
            .verify(&es.sign(&claims("bob")).unwrap())
            .await
            .unwrap_err(),
        Refusal::Algorithm("ES256".into())
    );
    // Symmetric algorithms are refused outright in the config.
    let mut hmac = VerifierConfig::new(ISSUER, AUDIENCE);
    hmac.algorithms = vec![Algorithm::HS256];
    assert!(
        Verifier::new(
            hmac,
            Jwks::new(StaticSource::default(), JwksTiming::default())
        )
        .is_err()
    );
    // Garbage and oversize input.
    assert_eq!(v.verify("not.a.jwt").await.unwrap_err(), Refusal::Malformed);
    assert_eq!(
        v.verify(&"a".repeat(20_000)).await.unwrap_err(),
        Refusal::Malformed
    );
}

/// A key set served over HTTP, counting fetches; `keys` can be changed.
struct KeyServer {
    url: String,
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl KeyServer {
    async fn start(keys: JwkSet) -> KeyServer {
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let state = (keys.clone(), fetches.clone());
        let app = Router::new()
            .route(
                "/.well-known/jwks.json",
                get(
                    |State((keys, fetches)): State<(Arc<Mutex<JwkSet>>, Arc<AtomicUsize>)>| async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        axum::Json(keys.lock().unwrap().clone())
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        KeyServer {
            url,
            keys,
            fetches,
            stop: Some(stop),
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn key_sets_over_http_are_cached_refetched_on_a_new_kid_and_kept_while_down() {
    let a = SigningKey::generate_ed25519("a").unwrap();
    let b = SigningKey::generate_ed25519("b").unwrap();
    let mut server = KeyServer::start(set(&[&a])).await;
    let keys = Jwks::new(
        UrlSource::new(&server.url, None).unwrap(),
        timing(Duration::from_secs(3600)),
    );
    let v = verifier(keys.clone());

    // The first token loads the set; later ones use the cache.
    v.verify(&a.sign(&claims("u1")).unwrap()).await.unwrap();
    v.verify(&a.sign(&claims("u2")).unwrap()).await.unwrap();
    assert_eq!(server.fetches(), 1);

    // A new key published: the first token naming it fetches once (no
    // cooldown has been spent on an unknown kid yet).
    *server.keys.lock().unwrap() = set(&[&a, &b]);
    v.verify(&b.sign(&claims("u3")).unwrap()).await.unwrap();
    assert_eq!(server.fetches(), 2);

    // Made-up kids: one fetch per cooldown (an hour here, spent on "b"),
    // however many come.
    let liars: Vec<String> = (0..50)
        .map(|i| {
            SigningKey::generate_ed25519(format!("made-up-{i}"))
                .unwrap()
                .sign(&claims("x"))
                .unwrap()
        })
        .collect();
    for liar in &liars {
        assert_eq!(v.verify(liar).await.unwrap_err(), Refusal::UnknownKey);
    }
    assert_eq!(
        server.fetches(),
        2,
        "no fetch for fifty unknown kids within the cooldown"
    );
    // Without a cooldown each of them would have fetched.
    let eager = verifier(Jwks::new(
        UrlSource::new(&server.url, None).unwrap(),
        timing(Duration::ZERO),
    ));
    for liar in &liars[..5] {
        assert_eq!(eager.verify(liar).await.unwrap_err(), Refusal::UnknownKey);
    }
    // (The first one's fetch is the set's first load.)
    assert_eq!(server.fetches(), 2 + 5);

    // The key set goes down: known keys still verify (fresh tokens, so the
    // signature is checked against the cached key).
    server.stop.take().unwrap().send(()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while keys.load().await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key server did not stop"
        );
        tokio::task::yield_now().await;
    }
    v.verify(&a.sign(&claims("u4")).unwrap()).await.unwrap();
    v.verify(&b.sign(&claims("u5")).unwrap()).await.unwrap();

    // A set that never loaded: 503, not 401.
    let cold = verifier(Jwks::new(
        UrlSource::new(&server.url, None).unwrap(),
        timing(Duration::ZERO),
    ));
    let refusal = cold
        .verify(&a.sign(&claims("u6")).unwrap())
        .await
        .unwrap_err();
    assert_eq!(refusal, Refusal::KeysUnavailable);
    assert_eq!(
        refusal.to_error("shop").http_status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn a_withdrawn_key_stops_verifying_even_tokens_verified_before() {
    let a = SigningKey::generate_ed25519("a").unwrap();
    let b = SigningKey::generate_ed25519("b").unwrap();
    let source = StaticSource::new(set(&[&a, &b]));
    let keys = Jwks::new(source.clone(), timing(Duration::ZERO));
    let v = verifier(keys.clone());
    let token = a.sign(&claims("u")).unwrap();
    v.verify(&token).await.unwrap();
    // Cached: verified again without a key lookup.
    v.verify(&token).await.unwrap();
    source.set(set(&[&b]));
    keys.load().await.unwrap();
    assert_eq!(v.verify(&token).await.unwrap_err(), Refusal::UnknownKey);
}

#[tokio::test]
async fn the_layer_answers_401_403_and_grpc_statuses_and_passes_the_claims_on() {
    let key = SigningKey::generate_ed25519("k").unwrap();
    let v = Arc::new(verifier(Jwks::new(
        StaticSource::new(set(&[&key])),
        timing(Duration::ZERO),
    )));
    let policy = Policy::new()
        .rule("/public*", Access::Public)
        .rule("/admin", Access::Require(vec!["admin".into()]));
    let inner = service_fn(|req: Request<String>| async move {
        use opentelemetry::baggage::BaggageExt as _;
        let who = req
            .extensions()
            .get::<Arc<Claims>>()
            .map_or("anonymous".to_owned(), |c| c.sub.clone());
        // The caller's identity travels in the context's baggage too.
        let cx = opentelemetry::Context::current();
        let baggage = cx.baggage();
        let from_baggage = baggage.get("enduser.id").map(|v| v.as_str().to_owned());
        if who != "anonymous" {
            assert_eq!(from_baggage.as_deref(), Some(who.as_str()));
            assert_eq!(
                baggage
                    .get("tenant")
                    .map(|v| v.as_str().to_owned())
                    .as_deref(),
                Some("acme")
            );
        }
        Ok::<_, std::convert::Infallible>(http::Response::new(who))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(AuthLayer::new(v, policy))
        .service(inner);
    let call = |path: &str, token: Option<&str>, grpc: bool| {
        let mut req = Request::get(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if grpc {
            req = req.header(header::CONTENT_TYPE, "application/grpc");
        }
        svc.clone().oneshot(req.body(String::new()).unwrap())
    };
    let token = key.sign(&claims("alice")).unwrap();

    let r = call("/orders", Some(&token), false).await.unwrap();
    assert_eq!((r.status(), r.body().as_str()), (StatusCode::OK, "alice"));
    let r = call("/public/x", None, false).await.unwrap();
    assert_eq!(
        (r.status(), r.body().as_str()),
        (StatusCode::OK, "anonymous")
    );

    let r = call("/orders", None, false).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"trellis\""
    );
    let r = call("/public/x", Some("garbage"), false).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "a bad token is refused even on public paths"
    );
    assert!(
        r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );

    let r = call("/admin", Some(&token), false).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.body().contains("\"admin\""), "{}", r.body());
    assert!(
        r.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("insufficient_scope")
    );
    let mut admin = claims("root");
    admin["roles"] = serde_json::json!(["admin"]);
    let r = call("/admin", Some(&key.sign(&admin).unwrap()), false)
        .await
        .unwrap();
    assert_eq!((r.status(), r.body().as_str()), (StatusCode::OK, "root"));

    // gRPC callers get statuses: UNAUTHENTICATED (16), PERMISSION_DENIED (7).
    let r = call("/orders", None, true).await.unwrap();
    assert_eq!(r.headers()["grpc-status"], "16");
    let r = call("/admin", Some(&token), true).await.unwrap();
    assert_eq!(r.headers()["grpc-status"], "7");
}
