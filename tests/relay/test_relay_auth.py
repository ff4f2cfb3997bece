"""Bearer-token authentication: key store, verification, refusals (401 vs 403), issuing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import (
    Authenticator,
    DeviceIdentity,
    Revocation,
    RevocationList,
    issue_token,
    require_device,
)
from relay.auth_keys import Key, KeyStore
from relay.errors import (
    AuthError,
    ConfigError,
    DeviceRevoked,
    ForbiddenError,
    KeyStoreError,
    NotOwnDevice,
    TokenAlgorithmRefused,
    TokenBadSignature,
    TokenExpired,
    TokenMalformed,
    TokenMissing,
    TokenNotYetValid,
    TokenUnknownKey,
    TokenWrongAudience,
    TokenWrongIssuer,
)
from tests.schemas import CONFIG

SECRET = b"s" * 40


def pem_private(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


def pem_public(key: Any) -> bytes:
    data: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def store(rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> KeyStore:
    return KeyStore(
        [
            Key.hmac("hs", SECRET),
            Key.from_pem("rsa", "RS256", private_pem=pem_private(rsa_key)),
            Key.from_pem(
                "ed", "EdDSA", private_pem=pem_private(ed_key), public_pem=pem_public(ed_key)
            ),
        ],
        current="ed",
    )


@pytest.fixture
def auth(store: KeyStore) -> Authenticator:
    return Authenticator(store, audience="relay-test", issuer="ops", leeway_s=5)


def token(store: KeyStore, kid: str | None = "ed", device: str = "tablet-7", **kw: Any) -> str:
    kw.setdefault("audience", "relay-test")
    kw.setdefault("issuer", "ops")
    claims = kw.pop("claims", {"sites": ["a", "b"]})
    ttl = kw.pop("ttl_s", 600)
    return issue_token(store, kid, device, claims, ttl, **kw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], signer: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    sig = (
        b"" if signer is None else hmac.new(signer, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(sig)}"


def valid_payload(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    payload = {"sub": "tablet-7", "aud": "relay-test", "iss": "ops", "iat": now, "exp": now + 600}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def refused(auth: Authenticator, header: str | None, error: type[AuthError]) -> AuthError:
    with pytest.raises(error) as info:
        auth.authenticate(header)
    assert type(info.value) is error
    return info.value


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("kid", ["hs", "rsa", "ed"])
def test_tokens_of_every_algorithm_verify(auth: Authenticator, store: KeyStore, kid: str) -> None:
    identity = auth.authenticate(f"Bearer {token(store, kid)}")
    assert identity.device_id == "tablet-7"
    assert identity.kid == kid
    assert identity.claims["sites"] == ["a", "b"]
    assert identity.claims["jti"]
    assert 590 <= identity.expires_at.timestamp() - time.time() <= 601


def test_scheme_is_case_insensitive_and_current_key_is_the_default(
    auth: Authenticator, store: KeyStore
) -> None:
    identity = auth.authenticate(f"  bearer   {token(store, None)} ")
    assert identity.kid == "ed"


def test_rotation_old_and_new_keys_both_verify(ed_key: ed25519.Ed25519PrivateKey) -> None:
    new = ed25519.Ed25519PrivateKey.generate()
    old_store = KeyStore([Key.from_pem("k1", "EdDSA", private_pem=pem_private(ed_key))])
    both = KeyStore(
        [
            Key.from_pem("k1", "EdDSA", public_pem=pem_public(ed_key)),
            Key.from_pem("k2", "EdDSA", private_pem=pem_private(new)),
        ],
        current="k2",
    )
    auth = Authenticator(both, audience="relay-test", issuer="ops")
    assert auth.authenticate("Bearer " + token(old_store, "k1")).kid == "k1"
    assert auth.authenticate("Bearer " + token(both, None)).kid == "k2"


def test_leeway_accepts_a_token_expired_seconds_ago(auth: Authenticator, store: KeyStore) -> None:
    t = token(store, now=time.time() - 62, ttl_s=60)
    assert auth.authenticate(f"Bearer {t}").device_id == "tablet-7"


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
            lambda n: n not in {"iss", "sub", "aud", "exp", "nbf", "iat", "jti"}
        ),
        st.one_of(
            st.text(max_size=8),
            st.integers(-(2**53), 2**53),
            st.booleans(),
            st.lists(st.text(max_size=5), max_size=3),
        ),
        max_size=4,
    ),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,30}", fullmatch=True),
)
def test_claims_round_trip(claims: dict[str, Any], device: str) -> None:
    store = KeyStore([Key.hmac("hs", SECRET)])
    auth = Authenticator(store, audience="a", issuer="i")
    identity = auth.authenticate(
        "Bearer " + issue_token(store, "hs", device, claims, 60, audience="a", issuer="i")
    )
    assert identity.device_id == device
    assert {k: identity.claims[k] for k in claims} == claims


# --------------------------------------------------------------------------- 401


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_token(auth: Authenticator, header: str | None) -> None:
    err = refused(auth, header, TokenMissing)
    assert err.status == 401
    assert err.headers() == {"WWW-Authenticate": 'Bearer realm="fieldsync"'}


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwdw==",
        "Bearer",
        "Bearer a b",
        "Token abc",
        "Bearer abc.def",
        "Bearer a.b.c",
        "Bearer " + "x" * 20000,
    ],
)
def test_malformed_header_or_token(auth: Authenticator, header: str) -> None:
    err = refused(auth, header, TokenMalformed)
    assert err.code == "token_malformed"
    assert "abc" not in err.message  # a token never appears in a message


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(auth: Authenticator, alg: str) -> None:
    t = forged({"alg": alg, "kid": "hs", "typ": "JWT"}, valid_payload(), None)
    assert refused(auth, f"Bearer {t}", TokenAlgorithmRefused).code == "token_alg_refused"


def test_algorithm_confusion_public_key_as_hmac_secret_is_refused(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic attack: sign HS256 with the RSA *public* key as the secret, name the RSA kid.
    t = forged({"alg": "HS256", "kid": "rsa", "typ": "JWT"}, valid_payload(), pem_public(rsa_key))
    err = refused(auth, f"Bearer {t}", TokenAlgorithmRefused)
    assert "RS256" in err.message


def test_header_alg_must_equal_the_keys_alg(
    auth: Authenticator, store: KeyStore, rsa_key: rsa.RSAPrivateKey
) -> None:
    # correctly signed RS256 token, but claiming the HS256 key's kid
    t = jwt.encode(valid_payload(), rsa_key, algorithm="RS256", headers={"kid": "hs"})
    refused(auth, f"Bearer {t}", TokenAlgorithmRefused)
    # PS256 with the RSA key: same key material, different algorithm
    t = jwt.encode(valid_payload(), rsa_key, algorithm="PS256", headers={"kid": "rsa"})
    refused(auth, f"Bearer {t}", TokenAlgorithmRefused)


def test_unknown_or_missing_kid(auth: Authenticator) -> None:
    t = jwt.encode(valid_payload(), SECRET, algorithm="HS256", headers={"kid": "nope"})
    assert "'nope'" in refused(auth, f"Bearer {t}", TokenUnknownKey).message
    t = jwt.encode(valid_payload(), SECRET, algorithm="HS256")
    assert "no kid" in refused(auth, f"Bearer {t}", TokenUnknownKey).message


def test_bad_signature(auth: Authenticator) -> None:
    other = KeyStore([Key.hmac("hs", b"o" * 40)])
    refused(auth, "Bearer " + token(other, "hs"), TokenBadSignature)
    ed_other = KeyStore(
        [Key.from_pem("ed", "EdDSA", private_pem=pem_private(ed25519.Ed25519PrivateKey.generate()))]
    )
    refused(auth, "Bearer " + token(ed_other, "ed"), TokenBadSignature)
    good = token(KeyStore([Key.hmac("hs", SECRET)]), "hs")
    head, payload, sig = good.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["sub"] = "someone-else"
    refused(auth, f"Bearer {head}.{b64(json.dumps(tampered).encode())}.{sig}", TokenBadSignature)


def test_expired(auth: Authenticator, store: KeyStore) -> None:
    err = refused(auth, "Bearer " + token(store, now=time.time() - 3600, ttl_s=60), TokenExpired)
    assert err.to_dict() == {
        "error": {"code": "token_expired", "message": "token has expired", "status": 401}
    }
    assert err.headers() == {"WWW-Authenticate": 'Bearer realm="fieldsync", error="invalid_token"'}


def test_not_yet_valid(auth: Authenticator) -> None:
    t = jwt.encode(
        valid_payload(nbf=int(time.time()) + 600), SECRET, algorithm="HS256", headers={"kid": "hs"}
    )
    refused(auth, f"Bearer {t}", TokenNotYetValid)
    t = jwt.encode(
        valid_payload(iat=int(time.time()) + 600), SECRET, algorithm="HS256", headers={"kid": "hs"}
    )
    refused(auth, f"Bearer {t}", TokenNotYetValid)


def test_wrong_audience_and_issuer(auth: Authenticator, store: KeyStore) -> None:
    refused(auth, "Bearer " + token(store, audience="another-relay"), TokenWrongAudience)
    refused(auth, "Bearer " + token(store, issuer="someone"), TokenWrongIssuer)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss"])
def test_required_claims(auth: Authenticator, claim: str) -> None:
    t = jwt.encode(valid_payload(**{claim: None}), SECRET, algorithm="HS256", headers={"kid": "hs"})
    assert f"'{claim}'" in refused(auth, f"Bearer {t}", TokenMalformed).message


def test_absurd_expiry_is_malformed(auth: Authenticator) -> None:
    t = jwt.encode(valid_payload(exp=10**20), SECRET, algorithm="HS256", headers={"kid": "hs"})
    refused(auth, f"Bearer {t}", TokenMalformed)


@pytest.mark.parametrize("sub", [123, "", "has space", "x" * 129])
def test_sub_must_be_a_device_id(auth: Authenticator, sub: Any) -> None:
    t = jwt.encode(valid_payload(sub=sub), SECRET, algorithm="HS256", headers={"kid": "hs"})
    refused(auth, f"Bearer {t}", TokenMalformed)


# --------------------------------------------------------------------------- 403


def test_revoked_device_is_forbidden(store: KeyStore) -> None:
    revoked = RevocationList([Revocation("tablet-7", reason="stolen")])
    auth = Authenticator(store, audience="relay-test", issuer="ops", revoked=revoked)
    err = refused(auth, "Bearer " + token(store), DeviceRevoked)
    assert isinstance(err, ForbiddenError)
    assert err.to_dict() == {
        "error": {
            "code": "token_revoked",
            "message": "device 'tablet-7' is revoked: stolen",
            "status": 403,
        }
    }
    assert err.headers() == {}
    assert auth.authenticate("Bearer " + token(store, device="tablet-8")).device_id == "tablet-8"


def test_revocation_of_tokens_issued_before_a_time(store: KeyStore) -> None:
    cutoff = time.time() - 100
    auth = Authenticator(
        store,
        audience="relay-test",
        issuer="ops",
        revoked=RevocationList([Revocation("tablet-7", cutoff)]),
    )
    refused(auth, "Bearer " + token(store, now=cutoff - 10), DeviceRevoked)
    assert auth.authenticate("Bearer " + token(store)).device_id == "tablet-7"
    # the list can be swapped while the authenticator is in use
    auth.revoked = RevocationList()
    assert auth.authenticate("Bearer " + token(store, now=cutoff - 10)).device_id == "tablet-7"


def test_require_device(auth: Authenticator, store: KeyStore) -> None:
    identity: DeviceIdentity = auth.authenticate("Bearer " + token(store))
    require_device(identity, "tablet-7")
    with pytest.raises(NotOwnDevice) as info:
        require_device(identity, "tablet-8")
    assert info.value.status == 403
    assert info.value.to_dict()["error"]["code"] == "forbidden_device"


# --------------------------------------------------------------------------- key store files


def write_keys(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


def test_example_keys_file_loads(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    shutil.copy(CONFIG / "relay-keys.example.toml", tmp_path / "keys.toml")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ed-2024-06.pem").write_bytes(pem_private(ed_key))
    (tmp_path / "keys" / "ed-2024-06.pub.pem").write_bytes(pem_public(ed_key))
    (tmp_path / "keys" / "rsa-2023-12.pub.pem").write_bytes(pem_public(rsa_key))
    store = KeyStore.from_file(tmp_path / "keys.toml", env={"FIELDSYNC_TOKEN_SECRET_1": "x" * 32})
    assert store.kids == ("ed-2024-06", "rsa-2023-12", "shared-1")
    assert store.current == "ed-2024-06"
    auth = Authenticator(store, audience="a", issuer="i")
    assert (
        auth.authenticate("Bearer " + issue_token(store, None, "d1", {}, 60, "a", "i")).kid
        == "ed-2024-06"
    )
    assert (
        auth.authenticate("Bearer " + issue_token(store, "shared-1", "d1", {}, 60, "a", "i")).kid
        == "shared-1"
    )
    with pytest.raises(KeyStoreError, match="'rsa-2023-12' has no private_key_pem"):
        issue_token(store, "rsa-2023-12", "d1", {}, 60)
    assert "x" * 32 not in repr(store.get("shared-1"))


def test_secret_inline_and_key_repr_hides_it(tmp_path: Path) -> None:
    store = KeyStore.from_file(
        write_keys(tmp_path, f'[[key]]\nkid = "k"\nalg = "HS256"\nsecret = "{"z" * 32}"\n')
    )
    assert "z" * 32 not in repr(store.get("k"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "defines no key"),
        ('[[key]]\nalg = "HS256"\nsecret = "x"\n', "key #1: kid is missing"),
        (
            '[[key]]\nkid = "k"\nalg = "HS512"\nsecret = "x"\n',
            "alg 'HS512' is not one of HS256, RS256, EdDSA",
        ),
        (
            '[[key]]\nkid = "k"\nalg = "HS256"\nsecret = "short"\n',
            "secret is 5 bytes; use at least 32",
        ),
        (
            '[[key]]\nkid = "k"\nalg = "HS256"\nsecret_env = "NOPE_NOT_SET"\n',
            "secret_env 'NOPE_NOT_SET' is not set",
        ),
        (
            '[[key]]\nkid = "k"\nalg = "HS256"\npublic_key_pem = "a.pem"\n',
            "HS256 takes secret or secret_env",
        ),
        (
            '[[key]]\nkid = "k"\nalg = "EdDSA"\nsecret = "x"\n',
            "EdDSA takes public_key_pem and/or private_key_pem",
        ),
        ('[[key]]\nkid = "k"\nalg = "EdDSA"\npublic_key_pem = "missing.pem"\n', "cannot read"),
        (
            '[[key]]\nkid = "k"\nalg = "HS256"\nsecrt = "x"\n',
            "secrt is not a known key (did you mean 'secret'?)",
        ),
        ('curent = "k"\n', "curent is not a known key (did you mean 'current'?)"),
        (
            'current = "kk"\n[[key]]\nkid = "k"\nalg = "HS256"\nsecret = "' + "x" * 32 + '"\n',
            "current 'kk' is not a kid",
        ),
        (
            '[[key]]\nkid = "k"\nalg = "HS256"\nsecret = "-----BEGIN PUBLIC KEY-----xxxxxxxxxxxxxxxxxxxxxx"\n',
            "looks like",
        ),
        ("[[key]\n", "not valid TOML"),
    ],
)
def test_invalid_keys_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write_keys(tmp_path, text)
    with pytest.raises(KeyStoreError) as info:
        KeyStore.from_file(path, env={})
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_duplicate_kid(tmp_path: Path) -> None:
    entry = '[[key]]\nkid = "k"\nalg = "HS256"\nsecret = "' + "x" * 32 + '"\n'
    with pytest.raises(KeyStoreError, match="kid 'k' is defined twice"):
        KeyStore.from_file(write_keys(tmp_path, entry + entry))


def test_pem_keys_must_fit_their_algorithm(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    with pytest.raises(KeyStoreError, match="EdDSA needs an Ed25519 or Ed448 key"):
        Key.from_pem("k", "EdDSA", public_pem=pem_public(rsa_key))
    with pytest.raises(KeyStoreError, match="RS256 needs an RSA key"):
        Key.from_pem("k", "RS256", private_pem=pem_private(ed_key))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(KeyStoreError, match="1024 bits"):
        Key.from_pem("k", "RS256", private_pem=pem_private(small))
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(KeyStoreError, match="not the public half"):
        Key.from_pem("k", "EdDSA", private_pem=pem_private(ed_key), public_pem=pem_public(other))
    with pytest.raises(KeyStoreError, match="not an unencrypted PEM"):
        Key.from_pem("k", "EdDSA", private_pem=b"garbage")
    with pytest.raises(KeyStoreError, match="give public_key_pem"):
        Key.from_pem("k", "EdDSA")
    with pytest.raises(KeyStoreError, match="RS256 or EdDSA"):
        Key.from_pem("k", "HS256", public_pem=pem_public(ed_key))


def test_revocation_file(tmp_path: Path) -> None:
    path = tmp_path / "revoked.toml"
    path.write_text(
        '[[revoked]]\ndevice = "tablet-1"\nreason = "stolen"\n'
        '[[revoked]]\ndevice = "tablet-2"\nissued_before = 2024-06-01T12:00:00Z\n'
    )
    revoked = RevocationList.from_file(path)
    assert len(revoked) == 2
    assert revoked.revocation_for("tablet-1", time.time()) is not None
    cutoff = 1717243200.0  # 2024-06-01T12:00:00Z
    assert revoked.revocation_for("tablet-2", cutoff - 1) is not None
    assert revoked.revocation_for("tablet-2", cutoff) is None
    assert revoked.revocation_for("tablet-3", 0) is None
    path.write_text('[[revoked]]\ndevice = "tablet-2"\nissued_before = 2024-06-01T12:00:00\n')
    with pytest.raises(
        KeyStoreError, match="revoked #1: issued_before must be a date-time with offset"
    ):
        RevocationList.from_file(path)
    path.write_text('[[revoked]]\ndevice = "a b"\n')
    with pytest.raises(KeyStoreError, match="device must be a device id"):
        RevocationList.from_file(path)


# --------------------------------------------------------------------------- issuing


@pytest.mark.parametrize(
    ("device", "claims", "ttl", "expected"),
    [
        ("d", {"exp": 1}, 60, "'exp' is a registered JWT claim"),
        ("d", {"sub": "x"}, 60, "'sub' is a registered JWT claim"),
        ("d", {"1x": "a"}, 60, "claim name '1x' is not valid"),
        ("d", {"x": {"a": 1}}, 60, "must be a string, integer, boolean or a list"),
        ("d", {"x": 1.5}, 60, "must be a string, integer, boolean or a list"),
        ("bad device", {}, 60, "device id 'bad device' is not valid"),
        ("d", {}, 0, "lifetime must be positive"),
    ],
)
def test_issue_refuses_bad_input(
    store: KeyStore, device: str, claims: dict[str, Any], ttl: float, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        issue_token(store, "hs", device, claims, ttl)


def test_issue_with_unknown_kid_or_no_current(store: KeyStore) -> None:
    with pytest.raises(KeyStoreError, match="no key with kid 'eed' \\(did you mean 'ed'\\?\\)"):
        issue_token(store, "eed", "d", {}, 60)
    with pytest.raises(KeyStoreError, match="no 'current' key"):
        issue_token(KeyStore([Key.hmac("hs", SECRET)]), None, "d", {}, 60)


def test_authenticator_settings_are_checked(store: KeyStore) -> None:
    with pytest.raises(ConfigError):
        Authenticator(store, audience="", issuer="i")
    with pytest.raises(ConfigError):
        Authenticator(store, audience="a", issuer="i", leeway_s=-1)
