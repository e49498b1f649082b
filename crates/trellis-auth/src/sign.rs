//! The issuing side: a signing key, its public half as a JWK, and tokens
//! signed with it. For the auth service, and for tests that need tokens.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
        EllipticCurveKeyType, Jwk, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
        PublicKeyUse, RSAKeyParameters, RSAKeyType,
    },
};
use serde::Serialize;

/// A private key that signs tokens, with its key id.
pub struct SigningKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    public: Jwk,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private half is never printed.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new Ed25519 key (`EdDSA`).
    pub fn generate_ed25519(kid: impl Into<String>) -> Result<SigningKey, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "generating an Ed25519 key failed".to_owned())?;
        SigningKey::from_pkcs8(kid, Algorithm::EdDSA, doc.as_ref())
    }

    /// A new P-256 key (`ES256`).
    pub fn generate_es256(kid: impl Into<String>) -> Result<SigningKey, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| "generating a P-256 key failed".to_owned())?;
        SigningKey::from_pkcs8(kid, Algorithm::ES256, doc.as_ref())
    }

    /// A new RSA-2048 key for RS256 (for verifiers that take nothing
    /// newer).
    pub fn generate_rs256(kid: impl Into<String>) -> Result<SigningKey, String> {
        use aws_lc_rs::encoding::AsDer as _;
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| "generating an RSA key failed".to_owned())?;
        let doc = pair
            .as_der()
            .map_err(|_| "encoding an RSA key failed".to_owned())?;
        SigningKey::from_pkcs8(kid, Algorithm::RS256, doc.as_ref())
    }

    /// A key from its PKCS#8 document (as [`pkcs8`](Self::pkcs8) gives it):
    /// `EdDSA` (Ed25519), `ES256` (P-256) or `RS256` (RSA).
    pub fn from_pkcs8(
        kid: impl Into<String>,
        alg: Algorithm,
        pkcs8: &[u8],
    ) -> Result<SigningKey, String> {
        use aws_lc_rs::signature::KeyPair as _;
        let kid = kid.into();
        let (encoding, params) = match alg {
            Algorithm::EdDSA => {
                let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8)
                    .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
                (
                    EncodingKey::from_ed_der(pkcs8),
                    AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                        key_type: OctetKeyPairType::OctetKeyPair,
                        curve: EllipticCurve::Ed25519,
                        x: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
                    }),
                )
            }
            Algorithm::ES256 => {
                let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                    &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                )
                .map_err(|e| format!("not a P-256 PKCS#8 key: {e}"))?;
                // An uncompressed point: 0x04, x, y.
                let point = pair.public_key().as_ref();
                if point.len() != 65 {
                    return Err("unexpected P-256 public key encoding".to_owned());
                }
                (
                    EncodingKey::from_ec_der(pkcs8),
                    AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                        key_type: EllipticCurveKeyType::EC,
                        curve: EllipticCurve::P256,
                        x: URL_SAFE_NO_PAD.encode(&point[1..33]),
                        y: URL_SAFE_NO_PAD.encode(&point[33..]),
                    }),
                )
            }
            Algorithm::RS256 => {
                use aws_lc_rs::signature::KeyPair as _;
                let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8)
                    .map_err(|e| format!("not an RSA PKCS#8 key: {e}"))?;
                // The signer takes the PKCS#1 key inside the PKCS#8 document;
                // the JWK, n and e from the PKCS#1 public key.
                let pkcs1 = rsa_private_pkcs1(pkcs8).ok_or("malformed RSA PKCS#8 key")?;
                let (n, e) = rsa_public_parts(pair.public_key().as_ref())
                    .ok_or("malformed RSA public key")?;
                (
                    EncodingKey::from_rsa_der(pkcs1),
                    AlgorithmParameters::RSA(RSAKeyParameters {
                        key_type: RSAKeyType::RSA,
                        n: URL_SAFE_NO_PAD.encode(n),
                        e: URL_SAFE_NO_PAD.encode(e),
                    }),
                )
            }
            other => {
                return Err(format!(
                    "{other:?}: signing supports EdDSA, ES256 and RS256"
                ));
            }
        };
        let public = Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(match alg {
                    Algorithm::EdDSA => KeyAlgorithm::EdDSA,
                    Algorithm::RS256 => KeyAlgorithm::RS256,
                    _ => KeyAlgorithm::ES256,
                }),
                key_id: Some(kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: params,
        };
        Ok(SigningKey {
            kid,
            alg,
            encoding,
            public,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm it signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The public half, for a key set.
    pub fn jwk(&self) -> &Jwk {
        &self.public
    }

    /// The private key as PKCS#8 (to store it, encrypted).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// `claims` signed as a compact JWS with `typ: JWT` and this key's
    /// `kid`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, String> {
        let mut header = Header::new(self.alg);
        header.typ = Some("JWT".to_owned());
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    /// `claims` signed under a header of the caller's (tests of what
    /// verifiers refuse use it).
    pub fn sign_with_header<T: Serialize>(
        &self,
        header: &Header,
        claims: &T,
    ) -> Result<String, String> {
        jsonwebtoken::encode(header, claims, &self.encoding).map_err(|e| e.to_string())
    }
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`.
fn rsa_private_pkcs1(pkcs8: &[u8]) -> Option<&[u8]> {
    use trellis_core::der::{INTEGER, OCTET_STRING, SEQUENCE, expect};
    let (info, _) = expect(pkcs8, SEQUENCE)?;
    let (_, rest) = expect(info, INTEGER)?;
    let (_, rest) = expect(rest, SEQUENCE)?;
    let (key, _) = expect(rest, OCTET_STRING)?;
    Some(key)
}

/// `n` and `e` of a PKCS#1 `RSAPublicKey`, as unsigned big-endian bytes.
fn rsa_public_parts(pkcs1: &[u8]) -> Option<(&[u8], &[u8])> {
    use trellis_core::der::{INTEGER, SEQUENCE, expect, unsigned};
    let (key, _) = expect(pkcs1, SEQUENCE)?;
    let (n, rest) = expect(key, INTEGER)?;
    let (e, _) = expect(rest, INTEGER)?;
    Some((unsigned(n), unsigned(e)))
}
