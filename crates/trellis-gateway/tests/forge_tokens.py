"""Forges the tokens of the gateway's JWT attack suite with PyJWT and
`cryptography` — code that shares nothing with the verifier under test.

Usage: forge_tokens.py ISSUER AUDIENCE
Prints one JSON object: {"jwks": {...}, "valid": {name: token},
"forged": {name: token}}. The key set holds an Ed25519, a P-256 and an
RSA-2048 public key (kids "ed", "ec", "rsa"); "valid" has one good token
per key; "forged" has one token per attack, each of which must be refused.
"""

import base64
import hashlib
import hmac
import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

issuer, audience = sys.argv[1], sys.argv[2]
now = int(time.time())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


ed = ed25519.Ed25519PrivateKey.generate()
p256 = ec.generate_private_key(ec.SECP256R1())
rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
# The attacker's own key, never in the key set.
evil = ed25519.Ed25519PrivateKey.generate()


def public_jwk(key, kid: str, alg: str) -> dict:
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


jwks = {
    "keys": [
        public_jwk(ed, "ed", "EdDSA"),
        public_jwk(p256, "ec", "ES256"),
        public_jwk(rsa_key, "rsa", "RS256"),
    ]
}


def claims(**over):
    c = {
        "iss": issuer,
        "aud": audience,
        "sub": "mallory",
        "exp": now + 600,
        "iat": now,
        "nbf": now - 5,
        "roles": ["customer"],
    }
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def sign(key, alg, kid, payload=None, **headers):
    h = {"kid": kid, "typ": "JWT"}
    h.update(headers)
    return jwt.encode(payload or claims(), key, algorithm=alg, headers=h)


def hs256_with(secret: bytes, kid: str) -> str:
    """HS256 keyed with public key material: the key-confusion attack,
    signed by hand (PyJWT refuses to HMAC with a PEM)."""
    head = segment({"alg": "HS256", "typ": "JWT", "kid": kid})
    body = segment(claims())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


valid = {
    "ed25519": sign(ed, "EdDSA", "ed"),
    "es256": sign(p256, "ES256", "ec"),
    "rs256": sign(rsa_key, "RS256", "rsa"),
}

good = valid["ed25519"]
head, body, sig = good.split(".")
tampered_body = segment(claims(roles=["admin"], sub="root"))
evil_jwk = public_jwk(evil, "ed", "EdDSA")

forged = {
    "alg_none": f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': 'ed'})}.{segment(claims())}.",
    "alg_none_capitalised": f"{segment({'alg': 'None', 'typ': 'JWT', 'kid': 'ed'})}.{segment(claims())}.",
    "hs256_with_rsa_public_pem": hs256_with(pem(rsa_key), "rsa"),
    "hs256_with_ec_public_pem": hs256_with(pem(p256), "ec"),
    "hs256_with_ed25519_public_pem": hs256_with(pem(ed), "ed"),
    "hs256_with_ed25519_raw_key": hs256_with(
        ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), "ed"
    ),
    "unknown_kid": sign(evil, "EdDSA", "no-such-key"),
    "kid_path_traversal": sign(evil, "EdDSA", "../../../../../../dev/null"),
    "kid_sql": sign(evil, "EdDSA", "' OR '1'='1"),
    "jku_elsewhere": sign(evil, "EdDSA", "evil", jku="http://127.0.0.1:9/jwks.json"),
    "x5u_elsewhere": sign(evil, "EdDSA", "evil", x5u="http://127.0.0.1:9/cert.pem"),
    "embedded_jwk": sign(evil, "EdDSA", "ed", jwk=evil_jwk),
    "wrong_key_known_kid": sign(evil, "EdDSA", "ed"),
    "expired": sign(ed, "EdDSA", "ed", claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200)),
    "not_yet_valid": sign(ed, "EdDSA", "ed", claims(nbf=now + 3600)),
    "wrong_issuer": sign(ed, "EdDSA", "ed", claims(iss="https://evil.example")),
    "wrong_audience": sign(ed, "EdDSA", "ed", claims(aud="someone-else")),
    "missing_audience": sign(ed, "EdDSA", "ed", claims(aud=None)),
    "missing_expiry": sign(ed, "EdDSA", "ed", claims(exp=None)),
    "tampered_payload": f"{head}.{tampered_body}.{sig}",
    "stripped_signature": f"{head}.{body}.",
    "no_signature_segment": f"{head}.{body}",
    "crit_header": sign(ed, "EdDSA", "ed", crit=["exp"]),
    "alg_swapped_to_es256": f"{segment({'alg': 'ES256', 'typ': 'JWT', 'kid': 'ed'})}.{body}.{sig}",
    "wrong_typ": sign(ed, "EdDSA", "ed", typ="JWE"),
    "oversize": sign(ed, "EdDSA", "ed", claims(padding="x" * 9000)),
    "garbage": "not-a-token",
    "garbage_segments": "a.b.c",
    "binary_junk": b64(bytes(range(256))),
}

json.dump({"jwks": jwks, "valid": valid, "forged": forged}, sys.stdout)
