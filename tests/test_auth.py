"""Token verification, claims and channel patterns, without a network.

The attacks a verifier must refuse are spelled out one by one: ``alg: none``,
HS256 signed with the RSA public key, wrong audience or issuer, expiry,
``nbf`` in the future, claims of the wrong shape.
"""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from wirehub import cli
from wirehub.auth import Principal, TokenVerifier, accepted_subprotocol, mint_token, token_from_request
from wirehub.protocol.errors import AuthCode, AuthError
from wirehub.protocol.patterns import PatternError, compile_pattern, matches

SECRET = "test-secret-that-is-long-enough-for-hs512-" * 2


def _claims(**extra):
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 60, **extra}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- patterns -------------------------------------------------------------------

@pytest.mark.parametrize("pattern, channel, expected", [
    ("runner:*", "runner:42", True),
    ("runner:*", "runner:42:logs", False),        # * is exactly one segment
    ("runner:*", "runner.42", False),             # separators match literally
    ("runner:*", "runner:", False),               # * is never empty
    ("runner.*", "runner.a.b", False),            # the escape the issue names
    ("runner.*", "runnerX.a", False),             # '.' is not a regex dot
    ("logs:**", "logs:a", True),
    ("logs:**", "logs:a:b.c", True),
    ("logs:**", "logs", False),                   # ** is one or more segments
    ("logs:**", "logsx:a", False),
    ("telemetry.*.cpu", "telemetry.node1.cpu", True),
    ("telemetry.*.cpu", "telemetry.node1.mem", False),
    ("telemetry.*.cpu", "telemetry.a.b.cpu", False),
    ("**", "anything:at.all", True),
    ("prices.btc", "prices.btc", True),
    ("prices.btc", "prices.btcx", False),
    ("a/b=c@d", "a/b=c@d", True),
])
def test_pattern_matching(pattern, channel, expected):
    assert matches(pattern, channel) is expected


@pytest.mark.parametrize("pattern", ["", "run*", "a.**.b", "**x", "a b", "a.(b|c)", "a.[bc]", "é"])
def test_invalid_patterns_are_refused(pattern):
    with pytest.raises(PatternError):
        compile_pattern(pattern)


_segment = st.text("abcXYZ019_-@/=", min_size=1, max_size=6)
_channel = st.lists(st.tuples(_segment, st.sampled_from(".:")), min_size=1, max_size=5).map(
    lambda parts: "".join(seg + sep for seg, sep in parts)[:-1])


@given(_channel, _channel)
def test_a_pattern_without_wildcards_matches_only_itself(pattern, channel):
    assert matches(pattern, pattern)
    assert matches(pattern, channel) is (pattern == channel)


@given(_channel, _segment, st.sampled_from(".:"))
def test_single_wildcard_never_crosses_a_separator(prefix, extra, sep):
    assert matches(prefix + ":*", prefix + ":" + extra)
    assert not matches(prefix + ":*", prefix + ":" + extra + sep + extra)
    assert matches(prefix + ":**", prefix + ":" + extra + sep + extra)


# -- verification ---------------------------------------------------------------

def test_valid_token_grants_its_claims():
    verifier = TokenVerifier(secret=SECRET)
    token = mint_token(SECRET, sub="alice", subscribe=["runner:*"], publish=["telemetry.*"],
                       permissions=["runners:delete"])
    principal = verifier.verify(token)
    assert principal.sub == "alice"
    assert principal.exp > time.time()
    assert principal.can_subscribe("runner:1") and not principal.can_subscribe("runner:1:logs")
    assert principal.can_publish("telemetry.x") and not principal.can_publish("runner:1")
    assert principal.has_permission("runners:delete") and not principal.has_permission("admin")


def test_admin_implies_every_permission():
    principal = Principal("root", permissions=["admin"])
    assert principal.has_permission("runners:delete") and principal.has_permission("anything")


def test_default_patterns_apply_to_every_token_and_to_anonymous():
    verifier = TokenVerifier(secret=SECRET, default_subscribe=["public.*"])
    principal = verifier.verify(mint_token(SECRET, sub="bob"))
    assert principal.can_subscribe("public.news") and not principal.can_subscribe("private.x")
    anonymous = verifier.anonymous()
    assert anonymous.sub is None
    assert anonymous.can_subscribe("public.news") and not anonymous.can_publish("public.news")


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_every_hmac_algorithm(algorithm):
    token = jwt.encode(_claims(), SECRET, algorithm=algorithm)
    assert TokenVerifier(secret=SECRET).verify(token).sub == "alice"


def test_wrong_signature():
    token = jwt.encode(_claims(), "another-secret-another-secret-another", algorithm="HS256")
    with pytest.raises(AuthError, match="Signature verification failed") as info:
        TokenVerifier(secret=SECRET).verify(token)
    assert info.value.code == AuthCode.INVALID_TOKEN


def _unsigned(claims) -> str:
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def test_alg_none_is_refused(rsa_key):
    for verifier in (TokenVerifier(secret=SECRET), TokenVerifier(public_key_pem=_public_pem(rsa_key))):
        with pytest.raises(AuthError, match="algorithm 'none' is not accepted"):
            verifier.verify(_unsigned(_claims()))


def test_hs256_signed_with_the_rsa_public_key_is_refused(rsa_key):
    pem = _public_pem(rsa_key)
    # The classic key-confusion forgery: an HMAC over the public key's PEM.
    import hashlib
    import hmac

    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(
        hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()).rstrip(b"=")
    forged = b".".join([header, payload, signature]).decode()
    with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):
        TokenVerifier(public_key_pem=pem).verify(forged)


def test_rsa_and_ec_public_keys(rsa_key):
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    assert TokenVerifier(public_key_pem=_public_pem(rsa_key)).verify(token).sub == "alice"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(public_key_pem=_public_pem(ec_key))
    assert verifier.algorithms == ["ES256"]
    assert verifier.verify(jwt.encode(_claims(), ec_key, algorithm="ES256")).sub == "alice"
    with pytest.raises(AuthError):  # RS256 token against an EC key
        verifier.verify(token)


def test_jwks_picks_the_key_by_kid(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = []
    for kid, key in (("k1", rsa_key), ("k2", other)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    verifier = TokenVerifier(jwks_json=json.dumps({"keys": keys}))
    token = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "k2"})
    assert verifier.verify(token).sub == "alice"
    wrong_kid = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(AuthError, match="Signature verification failed"):
        verifier.verify(wrong_kid)
    unknown = jwt.encode(_claims(), other, algorithm="RS256", headers={"kid": "k9"})
    with pytest.raises(AuthError, match="no key"):
        verifier.verify(unknown)


def test_expiry_not_before_and_leeway():
    now = int(time.time())
    expired = jwt.encode(_claims(exp=now - 10), SECRET)
    with pytest.raises(AuthError) as info:
        TokenVerifier(secret=SECRET).verify(expired)
    assert info.value.code == AuthCode.TOKEN_EXPIRED
    assert TokenVerifier(secret=SECRET, leeway_s=30).verify(expired).sub == "alice"
    early = jwt.encode(_claims(nbf=now + 60), SECRET)
    with pytest.raises(AuthError, match="not yet valid"):
        TokenVerifier(secret=SECRET).verify(early)


def test_audience_and_issuer():
    verifier = TokenVerifier(secret=SECRET, audience="wirehub", issuer="https://idp.example")
    good = jwt.encode(_claims(aud="wirehub", iss="https://idp.example"), SECRET)
    assert verifier.verify(good).sub == "alice"
    for claims in (_claims(aud="other", iss="https://idp.example"), _claims(iss="https://idp.example"),
                   _claims(aud="wirehub", iss="https://evil.example")):
        with pytest.raises(AuthError):
            verifier.verify(jwt.encode(claims, SECRET))


@pytest.mark.parametrize("claims, message", [
    ({"exp": int(time.time()) + 60}, 'missing the "sub" claim'),
    ({"sub": "alice"}, 'missing the "exp" claim'),
    (_claims(sub=""), "'sub' must be a non-empty string"),
    (_claims(subscribe="runner:*"), "'subscribe' must be a list of strings"),
    (_claims(permissions=[1]), "'permissions' must be a list of strings"),
    (_claims(publish=["run*"]), "wildcard must be a whole segment"),
])
def test_malformed_claims(claims, message):
    with pytest.raises(AuthError, match=message):
        TokenVerifier(secret=SECRET).verify(jwt.encode(claims, SECRET))


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "..", "eyJhbGciOiJIUzI1NiJ9..", "\x00" * 10])
def test_garbage_tokens(token):
    with pytest.raises(AuthError):
        TokenVerifier(secret=SECRET).verify(token)


def test_algorithms_must_match_the_key_type(rsa_key):
    with pytest.raises(ValueError, match="RS256 cannot be verified"):
        TokenVerifier(secret=SECRET, algorithms=["RS256"])
    with pytest.raises(ValueError, match="HS256 cannot be verified"):
        TokenVerifier(public_key_pem=_public_pem(rsa_key), algorithms=["HS256"])
    with pytest.raises(ValueError, match="no verification key"):
        TokenVerifier()
    restricted = TokenVerifier(secret=SECRET, algorithms=["HS512"])
    with pytest.raises(AuthError, match="'HS256' is not accepted"):
        restricted.verify(jwt.encode(_claims(), SECRET, algorithm="HS256"))


# -- where the token comes from ---------------------------------------------------

def test_token_sources_in_order():
    headers = CIMultiDict({"Authorization": "Bearer from-header", "Sec-WebSocket-Protocol": "wirehub, bearer.sp"})
    assert token_from_request("/ws?token=from-query", headers) == "from-header"
    assert token_from_request("/ws?token=from-query", CIMultiDict()) == "from-query"
    headers = CIMultiDict({"Sec-WebSocket-Protocol": "wirehub, bearer.from-subprotocol"})
    assert token_from_request("/ws", headers) == "from-subprotocol"
    assert accepted_subprotocol(headers) == "wirehub"
    assert token_from_request("/ws", CIMultiDict()) is None
    assert accepted_subprotocol(CIMultiDict({"Sec-WebSocket-Protocol": "other"})) is None


@pytest.mark.parametrize("headers", [
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer "},
    {"Sec-WebSocket-Protocol": "bearer.abc"},  # a browser would fail: nothing to accept
])
def test_malformed_token_carriers(headers):
    with pytest.raises(AuthError):
        token_from_request("/ws", CIMultiDict(headers))


# -- wirehub token ----------------------------------------------------------------

def test_cli_mints_a_token_the_gateway_accepts(capsys):
    assert cli.main(["token", "--secret", SECRET, "--sub", "alice", "--subscribe", "runner:*",
                     "--subscribe", "logs:**", "--publish", "telemetry.*", "--permission",
                     "runners:delete", "--ttl", "15m"]) == 0
    principal = TokenVerifier(secret=SECRET).verify(capsys.readouterr().out.strip())
    assert principal.sub == "alice"
    assert 14 * 60 < principal.exp - time.time() <= 15 * 60
    assert principal.can_subscribe("logs:a:b") and principal.can_publish("telemetry.x")
    assert principal.has_permission("runners:delete")


def test_cli_token_errors(capsys, monkeypatch):
    monkeypatch.delenv("WIREHUB_JWT_SECRET", raising=False)
    assert cli.main(["token", "--sub", "alice"]) == 2
    assert "no secret" in capsys.readouterr().err
    assert cli.main(["token", "--secret", SECRET, "--sub", "a", "--subscribe", "bad*"]) == 2
    assert "wildcard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["token", "--secret", SECRET, "--sub", "a", "--ttl", "soon"])
