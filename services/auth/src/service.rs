//! The gRPC face of the auth service: converts between the generated
//! messages and the use cases, and works out who is calling.

use std::{net::IpAddr, sync::Arc};

use tonic::{Request, Response, Status};
use trellis::core::PeerAddr;

use crate::{
    api::v1::{
        GetJwksRequest, GetOpenIdConfigurationRequest, IntrospectRequest, IntrospectResponse,
        JsonWebKeySet, LoginRequest, LogoutRequest, OpenIdConfiguration, RefreshRequest,
        RegisterRequest, RegisterResponse, TokenResponse, auth_service_server::AuthService,
    },
    biz::{Accounts, Caller, Tokens},
};

/// Implements `shop.auth.v1.AuthService` over [`Accounts`].
#[derive(Clone)]
pub struct AuthServiceHandler {
    accounts: Arc<Accounts>,
    trusted_proxies: Arc<[IpAddr]>,
    public_url: Arc<str>,
}

impl AuthServiceHandler {
    /// A handler over `accounts`; `X-Forwarded-For` is believed only from
    /// `trusted_proxies`; `public_url` is where clients reach the service
    /// (the discovery document's links).
    pub fn new(accounts: Arc<Accounts>, trusted_proxies: &[IpAddr], public_url: &str) -> Self {
        AuthServiceHandler {
            accounts,
            trusted_proxies: trusted_proxies.into(),
            public_url: public_url.trim_end_matches('/').into(),
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Caller {
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        Caller {
            ip: client_ip(
                peer,
                request
                    .metadata()
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
                &self.trusted_proxies,
            ),
        }
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy —
/// the last `X-Forwarded-For` entry not itself a trusted proxy.
pub fn client_ip<'a>(
    peer: Option<IpAddr>,
    forwarded: impl Iterator<Item = &'a str>,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = forwarded
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .take(64)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) if trusted.contains(&ip) => continue,
            Ok(ip) => return Some(ip),
            Err(_) => return Some(peer),
        }
    }
    Some(peer)
}

fn token_response(t: Tokens) -> TokenResponse {
    TokenResponse {
        access_token: t.access_token,
        token_type: "Bearer".into(),
        expires_in: i32::try_from(t.expires_in).unwrap_or(i32::MAX),
        refresh_token: t.refresh_token,
        refresh_expires_in: i32::try_from(t.refresh_expires_in).unwrap_or(i32::MAX),
    }
}

#[tonic::async_trait]
impl AuthService for AuthServiceHandler {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let created = self
            .accounts
            .register(&r.email, &r.password, &r.display_name, &caller)
            .await?;
        Ok(Response::new(RegisterResponse {
            user_id: created.user_id,
            email: created.email,
        }))
    }

    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<TokenResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let tokens = self.accounts.login(&r.email, &r.password, &caller).await?;
        Ok(Response::new(token_response(tokens)))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<TokenResponse>, Status> {
        let caller = self.caller(&request);
        let tokens = self
            .accounts
            .refresh(&request.get_ref().refresh_token, &caller)
            .await?;
        Ok(Response::new(token_response(tokens)))
    }

    async fn logout(&self, request: Request<LogoutRequest>) -> Result<Response<()>, Status> {
        let caller = self.caller(&request);
        self.accounts
            .logout(&request.get_ref().refresh_token, &caller)
            .await?;
        Ok(Response::new(()))
    }

    async fn introspect(
        &self,
        request: Request<IntrospectRequest>,
    ) -> Result<Response<IntrospectResponse>, Status> {
        let found = self.accounts.introspect(&request.get_ref().token).await?;
        let Some(claims) = found.claims.filter(|_| found.active) else {
            return Ok(Response::new(IntrospectResponse::default()));
        };
        let secs = |s: u64| u32::try_from(s).unwrap_or(u32::MAX);
        Ok(Response::new(IntrospectResponse {
            active: true,
            token_type: Some(found.token_type),
            sub: Some(claims.sub),
            iss: Some(claims.iss),
            aud: claims.aud,
            exp: Some(secs(claims.exp)),
            iat: claims.iat.map(secs),
            jti: claims.jti,
            roles: claims.roles,
            tenant: claims.tenant,
        }))
    }

    async fn get_jwks(
        &self,
        _: Request<GetJwksRequest>,
    ) -> Result<Response<JsonWebKeySet>, Status> {
        Ok(Response::new(JsonWebKeySet {
            keys: self.accounts.jwks(),
        }))
    }

    async fn get_open_id_configuration(
        &self,
        _: Request<GetOpenIdConfigurationRequest>,
    ) -> Result<Response<OpenIdConfiguration>, Status> {
        let base = &self.public_url;
        let mut algs: Vec<String> = self.accounts.jwks().into_iter().map(|k| k.alg).collect();
        algs.sort();
        algs.dedup();
        Ok(Response::new(OpenIdConfiguration {
            issuer: self.accounts.settings().issuer.clone(),
            jwks_uri: format!("{base}/.well-known/jwks.json"),
            token_endpoint: format!("{base}/v1/auth/login"),
            introspection_endpoint: format!("{base}/v1/auth/introspect"),
            revocation_endpoint: format!("{base}/v1/auth/logout"),
            id_token_signing_alg_values_supported: algs,
            response_types_supported: vec!["token".into()],
            subject_types_supported: vec!["public".into()],
            grant_types_supported: vec!["password".into(), "refresh_token".into()],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = [ip("127.0.0.1")];
        let xff = ["203.0.113.9, 198.51.100.7"];
        // From an untrusted peer: the peer, whatever the header says.
        assert_eq!(
            client_ip(Some(ip("10.0.0.5")), xff.into_iter(), &trusted),
            Some(ip("10.0.0.5"))
        );
        // Through the trusted proxy: the hop it saw, not what the client
        // claimed before it.
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), xff.into_iter(), &trusted),
            Some(ip("198.51.100.7"))
        );
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), ["garbage"].into_iter(), &trusted),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(
            client_ip(Some(ip("127.0.0.1")), std::iter::empty(), &trusted),
            Some(ip("127.0.0.1"))
        );
    }
}
