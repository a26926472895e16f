"""Snapshot cookies in Python, written from docs/snapshot-cookie.md alone.

A second implementation of the cookie around `session.v1.Snapshot`: the v2 format in every mode
(HMAC-SHA256, AES-256-GCM, ChaCha20-Poly1305), the v1 legacy format read-only, and the reader's
checks in the order the spec gives. The protobuf body is encoded and decoded by hand (varints and
length-delimited fields), so nothing but `cryptography` (HKDF and the AEADs) is needed; the MAC
is the standard library's.

Run by tests/cross_language.rs, one operation per run: a JSON request on stdin, a JSON answer on
stdout.

    {"op": "encode", "key": {"material": HEX, "kid": KID?}, "mode": MODE, "snapshot": SNAPSHOT}
        -> {"cookie": VALUE}
    {"op": "decode", "keys": [{"material": HEX, "kid": KID?}, ...], "cookie": VALUE,
     "now_ms": MS, "for": {"id": ID, "namespace": NS, "max_age_ms": MS}?}
        -> {"snapshot": SNAPSHOT} or {"refused": REASON}
    {"op": "derive", "material": HEX}
        -> {"sha256": HEX, "kid": KID, "prk": HEX, "mac": HEX, "aes": HEX, "chacha": HEX}

A JSON array of requests is answered by the array of their answers.

MODE is "plain", "aes-256-gcm" or "chacha20-poly1305". SNAPSHOT is an object with the message's
field names; attribute values are hex. A refused cookie is an answer, not a failure: the exit
status is 0 unless the request itself is bad.

Checks raise explicitly, never with a bare `assert`, so that `python -O` (which strips asserts,
and which the Rust test uses) changes nothing.
"""
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_COOKIE_BYTES = 4096
MIN_KEY_BYTES = 32
MAX_CLOCK_SKEW_MS = 60_000
MAX_KID_LEN = 16
HKDF_SALT = b"stickless-cookie"
INFO_MAC = b"stickless cookie mac v1"
INFO_AES = b"stickless cookie aes-256-gcm v1"
INFO_CHACHA = b"stickless cookie chacha20 v1"
MODE_PLAIN = 0
MODE_AES_256_GCM = 1
MODE_CHACHA20_POLY1305 = 2
MODES = {
    "plain": MODE_PLAIN,
    "aes-256-gcm": MODE_AES_256_GCM,
    "chacha20-poly1305": MODE_CHACHA20_POLY1305,
}
HMAC_LEN = 32
NONCE_LEN = 12
AEAD_TAG_LEN = 16
KID_RE = re.compile(r"[A-Za-z0-9_-]{1,16}\Z")
B64URL_RE = re.compile(r"[A-Za-z0-9_-]*\Z")
U64_MAX = (1 << 64) - 1


class Refused(Exception):
    """A cookie a reader must not trust; the message is the reason."""


class BadRequest(Exception):
    """A request this script cannot carry out (not a property of any cookie)."""


def require(condition, message):
    """Raises BadRequest with message unless condition holds (whatever -O says)."""
    if not condition:
        raise BadRequest(message)


# --- base64url without padding (RFC 4648 section 5) ---------------------------------------------


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    """Strict: only the url-safe alphabet, no padding, no length of 1 mod 4, zero spare bits."""
    if not B64URL_RE.match(text) or len(text) % 4 == 1:
        raise Refused("malformed")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except binascii.Error:
        raise Refused("malformed") from None
    if b64url_encode(data) != text:
        raise Refused("malformed")  # non-zero spare bits in the last character
    return data


# --- keys ---------------------------------------------------------------------------------------


def derive_kid(material):
    """The id of key material: base64url of the first 6 bytes of its SHA-256 (8 characters)."""
    return b64url_encode(hashlib.sha256(material).digest()[:6])


def hkdf(material, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=info).derive(material)


class Key:
    """One key: its id and the three secrets HKDF derives from its material."""

    def __init__(self, material, kid=None):
        require(len(material) >= MIN_KEY_BYTES, "key material must be at least 32 bytes")
        self.kid = derive_kid(material) if kid is None else kid
        require(KID_RE.match(self.kid) is not None, "key id must be 1 to 16 of [A-Za-z0-9_-]")
        self.mac = hkdf(material, INFO_MAC)
        self.aeads = {
            MODE_AES_256_GCM: AESGCM(hkdf(material, INFO_AES)),
            MODE_CHACHA20_POLY1305: ChaCha20Poly1305(hkdf(material, INFO_CHACHA)),
        }


# --- the protobuf body: session.v1.Snapshot -----------------------------------------------------

STRING_FIELDS = {1: "id", 2: "namespace", 3: "user_id", 10: "epoch"}
UINT64_FIELDS = {
    5: "version",
    6: "created_at_ms",
    7: "issued_at_ms",
    8: "expires_at_ms",
    9: "ttl_ms",
    11: "base_version",
    15: "confirmed_at_ms",
}
REPEATED_STRING_FIELDS = {12: "offline_set", 13: "offline_removed"}
ATTRS = 4
OFFLINE_USER = 14
WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


def empty_snapshot():
    snapshot = {name: "" for name in STRING_FIELDS.values()}
    snapshot.update({name: 0 for name in UINT64_FIELDS.values()})
    snapshot.update({name: [] for name in REPEATED_STRING_FIELDS.values()})
    snapshot["attrs"] = {}
    snapshot["offline_user"] = False
    return snapshot


def put_varint(out, value):
    require(0 <= value <= U64_MAX, "a uint64 out of range")
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def put_len(out, field, data):
    put_varint(out, field << 3 | WIRE_LEN)
    put_varint(out, len(data))
    out += data


def encode_snapshot(snapshot):
    """The canonical encoding: fields by number, zero values left out, attrs sorted by key."""
    out = bytearray()
    for field in range(1, 16):
        if field in STRING_FIELDS:
            text = snapshot[STRING_FIELDS[field]]
            if text:
                put_len(out, field, text.encode("utf-8"))
        elif field in UINT64_FIELDS:
            value = snapshot[UINT64_FIELDS[field]]
            if value:
                put_varint(out, field << 3 | WIRE_VARINT)
                put_varint(out, value)
        elif field in REPEATED_STRING_FIELDS:
            for text in snapshot[REPEATED_STRING_FIELDS[field]]:
                put_len(out, field, text.encode("utf-8"))
        elif field == ATTRS:
            for key in sorted(snapshot["attrs"]):
                value = snapshot["attrs"][key]
                entry = bytearray()
                if key:
                    put_len(entry, 1, key.encode("utf-8"))
                if value:
                    put_len(entry, 2, value)
                put_len(out, ATTRS, entry)
        elif field == OFFLINE_USER:
            if snapshot["offline_user"]:
                put_varint(out, OFFLINE_USER << 3 | WIRE_VARINT)
                put_varint(out, 1)
    return bytes(out)


def get_varint(data, at):
    """The varint at data[at:] and the offset after it; at most 10 bytes, at most 64 bits."""
    value = 0
    for i in range(10):
        if at + i >= len(data):
            raise Refused("malformed")
        byte = data[at + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if value > U64_MAX:
                raise Refused("malformed")
            return value, at + i + 1
    raise Refused("malformed")


def fields(data):
    """Yields (field number, wire type, value) of a message: an int for varints, the bytes of
    length-delimited fields, None for fixed-size ones (skipped by every caller)."""
    at = 0
    while at < len(data):
        tag, at = get_varint(data, at)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise Refused("malformed")
        if wire == WIRE_VARINT:
            value, at = get_varint(data, at)
        elif wire == WIRE_LEN:
            length, at = get_varint(data, at)
            if length > len(data) - at:
                raise Refused("malformed")
            value, at = data[at : at + length], at + length
        elif wire in (WIRE_I64, WIRE_I32):
            at += 8 if wire == WIRE_I64 else 4
            if at > len(data):
                raise Refused("malformed")
            value = None
        else:
            raise Refused("malformed")  # groups: never written
        yield field, wire, value


def utf8(data):
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("malformed") from None


def decode_snapshot(data):
    """Decodes a Snapshot: absent fields are zero, unknown fields skipped, the last of a repeated
    singular field wins, a known field of the wrong wire type is malformed."""
    snapshot = empty_snapshot()
    for field, wire, value in fields(data):
        known = (
            field in STRING_FIELDS
            or field in UINT64_FIELDS
            or field in REPEATED_STRING_FIELDS
            or field in (ATTRS, OFFLINE_USER)
        )
        if not known:
            continue
        expected = WIRE_VARINT if field in UINT64_FIELDS or field == OFFLINE_USER else WIRE_LEN
        if wire != expected:
            raise Refused("malformed")
        if field in STRING_FIELDS:
            snapshot[STRING_FIELDS[field]] = utf8(value)
        elif field in UINT64_FIELDS:
            snapshot[UINT64_FIELDS[field]] = value
        elif field in REPEATED_STRING_FIELDS:
            snapshot[REPEATED_STRING_FIELDS[field]].append(utf8(value))
        elif field == OFFLINE_USER:
            snapshot["offline_user"] = value != 0
        else:
            key, entry_value = "", b""
            for entry_field, entry_wire, v in fields(value):
                if entry_field in (1, 2) and entry_wire != WIRE_LEN:
                    raise Refused("malformed")
                if entry_field == 1:
                    key = utf8(v)
                elif entry_field == 2:
                    entry_value = bytes(v)
            snapshot["attrs"][key] = entry_value
    return snapshot


# --- the cookie ---------------------------------------------------------------------------------


def encode_cookie(key, mode, snapshot):
    """`v2.<kid>.<body>` for snapshot, signed (plain) or sealed by key."""
    header = ("v2." + key.kid + ".").encode("ascii")
    plain = encode_snapshot(snapshot)
    if mode == MODE_PLAIN:
        signed = header + bytes([MODE_PLAIN]) + plain
        body = signed[len(header) :] + hmac.new(key.mac, signed, hashlib.sha256).digest()
    else:
        nonce = os.urandom(NONCE_LEN)
        sealed = key.aeads[mode].encrypt(nonce, plain, header + bytes([mode]))
        body = bytes([mode]) + nonce + sealed
    value = header.decode("ascii") + b64url_encode(body)
    if len(value) > MAX_COOKIE_BYTES:
        raise BadRequest("the cookie would be over 4096 bytes")
    return value


def find_key(keys, kid):
    for key in keys:
        if key.kid == kid:
            return key
    raise Refused("unknown key")


def open_v2(keys, value):
    kid, dot, body = value[3:].partition(".")
    if not dot or not kid or len(kid) > MAX_KID_LEN or "." in body:
        raise Refused("malformed")
    key = find_key(keys, kid)
    header = ("v2." + kid + ".").encode("ascii")
    body = b64url_decode(body)
    if not body:
        raise Refused("malformed")
    mode = body[0]
    if mode == MODE_PLAIN:
        if len(body) < 1 + HMAC_LEN:
            raise Refused("malformed")
        signed, tag = header + body[:-HMAC_LEN], body[-HMAC_LEN:]
        expected = hmac.new(key.mac, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, tag):
            raise Refused("bad signature")
        return body[1:-HMAC_LEN]
    if mode in key.aeads:
        if len(body) < 1 + NONCE_LEN + AEAD_TAG_LEN:
            raise Refused("malformed")
        nonce, sealed = body[1 : 1 + NONCE_LEN], body[1 + NONCE_LEN :]
        try:
            return key.aeads[mode].decrypt(nonce, sealed, header + bytes([mode]))
        except InvalidTag:
            raise Refused("bad signature") from None
    raise Refused("malformed")


def open_v1(keys, value):
    signed, dot, tag = value.rpartition(".")
    if not dot or not signed.startswith("v1."):
        raise Refused("malformed")
    kid, dot, payload = signed[3:].partition(".")
    if not dot or not kid or len(kid) > MAX_KID_LEN or "." in payload or len(tag) != 43:
        raise Refused("malformed")
    key = find_key(keys, kid)
    tag = b64url_decode(tag)
    expected = hmac.new(key.mac, signed.encode("utf-8"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, tag):
        raise Refused("bad signature")
    body = b64url_decode(payload)
    if not body:
        raise Refused("malformed")
    mode = body[0]
    if mode == MODE_PLAIN:
        return body[1:]
    if mode in key.aeads:
        if len(body) < 1 + NONCE_LEN + AEAD_TAG_LEN:
            raise Refused("malformed")
        nonce, sealed = body[1 : 1 + NONCE_LEN], body[1 + NONCE_LEN :]
        try:
            return key.aeads[mode].decrypt(nonce, sealed, kid.encode("ascii"))
        except InvalidTag:
            raise Refused("malformed") from None  # the HMAC verified: a broken writer
    raise Refused("malformed")


def decode_cookie(keys, value, now_ms):
    """The snapshot in value, checked as a reader must, in the spec's order."""
    if len(value.encode("utf-8")) > MAX_COOKIE_BYTES:
        raise Refused("too large")
    plain = open_v2(keys, value) if value.startswith("v2.") else open_v1(keys, value)
    snapshot = decode_snapshot(plain)
    if snapshot["expires_at_ms"] <= now_ms:
        raise Refused("expired")
    if snapshot["issued_at_ms"] > now_ms + MAX_CLOCK_SKEW_MS:
        raise Refused("expired")
    return snapshot


def canonical(namespace):
    """A namespace as the server names it: "" is "default"."""
    return namespace or "default"


def decode_for(keys, value, now_ms, session_id, namespace, max_age_ms):
    """decode_cookie, then what makes a snapshot stand in for session_id in namespace."""
    snapshot = decode_cookie(keys, value, now_ms)
    if snapshot["id"] != session_id or canonical(snapshot["namespace"]) != canonical(namespace):
        raise Refused("other session")
    if snapshot["confirmed_at_ms"] == 0:
        raise Refused("unconfirmed")
    if now_ms >= min(snapshot["confirmed_at_ms"] + max_age_ms, U64_MAX):
        raise Refused("past max age")
    return snapshot


# --- JSON requests ------------------------------------------------------------------------------


def snapshot_from_json(obj):
    snapshot = empty_snapshot()
    for name, value in obj.items():
        require(name in snapshot, "unknown snapshot field " + name)
        if name == "attrs":
            value = {k: bytes.fromhex(v) for k, v in value.items()}
        snapshot[name] = value
    return snapshot


def snapshot_to_json(snapshot):
    obj = dict(snapshot)
    obj["attrs"] = {k: v.hex() for k, v in snapshot["attrs"].items()}
    return obj


def key_from_json(obj):
    return Key(bytes.fromhex(obj["material"]), obj.get("kid"))


def handle(request):
    op = request.get("op")
    if op == "derive":
        material = bytes.fromhex(request["material"])
        # HKDF by hand, as the spec spells it out, must agree with the library's.
        prk = hmac.new(HKDF_SALT, material, hashlib.sha256).digest()
        for info in (INFO_MAC, INFO_AES, INFO_CHACHA):
            by_hand = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
            require(by_hand == hkdf(material, info), "HKDF by hand differs for " + repr(info))
        return {
            "sha256": hashlib.sha256(material).hexdigest(),
            "kid": derive_kid(material),
            "prk": prk.hex(),
            "mac": hkdf(material, INFO_MAC).hex(),
            "aes": hkdf(material, INFO_AES).hex(),
            "chacha": hkdf(material, INFO_CHACHA).hex(),
        }
    if op == "encode":
        require(request["mode"] in MODES, "unknown mode")
        key = key_from_json(request["key"])
        snapshot = snapshot_from_json(request["snapshot"])
        return {"cookie": encode_cookie(key, MODES[request["mode"]], snapshot)}
    if op == "decode":
        keys = [key_from_json(k) for k in request["keys"]]
        require(len({k.kid for k in keys}) == len(keys), "two keys share an id")
        try:
            wanted = request.get("for")
            if wanted is None:
                snapshot = decode_cookie(keys, request["cookie"], request["now_ms"])
            else:
                snapshot = decode_for(
                    keys,
                    request["cookie"],
                    request["now_ms"],
                    wanted["id"],
                    wanted["namespace"],
                    wanted["max_age_ms"],
                )
        except Refused as refused:
            return {"refused": str(refused)}
        return {"snapshot": snapshot_to_json(snapshot)}
    raise BadRequest("unknown op " + repr(op))


def self_test():
    """The pieces the spec pins, checked before any request (and whatever -O says)."""
    require(b64url_encode(b"\xfb\xff") == "-_8", "base64url alphabet")
    for bad in ("-_9", "-_8=", "a", "a+b/"):
        try:
            b64url_decode(bad)
        except Refused:
            continue
        raise BadRequest("b64url_decode accepted " + bad)
    out = bytearray()
    put_varint(out, 300)
    require(bytes(out) == b"\xac\x02" and get_varint(out, 0) == (300, 2), "varint")


def main():
    self_test()
    try:
        request = json.load(sys.stdin)
        if isinstance(request, list):
            answer = [handle(r) for r in request]
        else:
            answer = handle(request)
    except (BadRequest, KeyError, TypeError, ValueError) as error:
        print("bad request: {!r}".format(error), file=sys.stderr)
        return 2
    json.dump(answer, sys.stdout, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
