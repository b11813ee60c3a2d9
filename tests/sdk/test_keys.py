"""AgentKey: generation, the 0600 key file, signing, and a repr that shows no key material."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from paymaster.core.tokens import load_public_key, private_key_to_pem, verify_spend_token
from paymaster.sdk.keys import AgentKey

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_gives_distinct_keys_with_protocol_public_keys() -> None:
    first, second = AgentKey.generate(), AgentKey.generate()
    assert first != second
    assert len(first.public_key) == 43
    assert len(base64.urlsafe_b64decode(first.public_key + "=")) == 32
    load_public_key(first.public_key)  # the authority accepts it


@posix_only
def test_save_writes_0600_and_load_round_trips(tmp_path: Path) -> None:
    key = AgentKey.generate()
    path = tmp_path / "agent.pem"
    key.save(path)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = AgentKey.load(path)
    assert loaded == key
    assert loaded.public_key == key.public_key
    assert AgentKey.load(str(path)) == key


@posix_only
def test_save_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        AgentKey.generate().save(tmp_path / "agent.pem")
    finally:
        os.umask(old)
    assert mode(tmp_path / "agent.pem") == 0o600


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    first = AgentKey.generate()
    first.save(path)
    with pytest.raises(FileExistsError):
        AgentKey.generate().save(path)
    assert AgentKey.load(path) == first


@posix_only
def test_save_overwrite_replaces_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    path.write_bytes(b"old, world-readable")
    path.chmod(0o644)
    key = AgentKey.generate()
    key.save(path, overwrite=True)
    assert AgentKey.load(path) == key
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["agent.pem"]  # no temporary file left


@posix_only
def test_save_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "agent.pem"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        AgentKey.generate().save(link)
    assert victim.read_bytes() == b"precious"


def test_save_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AgentKey.generate().save(tmp_path / "nope" / "agent.pem")


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_load_rejects_what_is_not_an_ed25519_key(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "agent.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        AgentKey.load(path)


def test_sign_makes_tokens_the_authority_verifies() -> None:
    key = AgentKey.generate()
    now = time.time()
    token = key.sign(agent_id="ag_1", aud="paymaster", max_amount="0.02", task="tk_9", now=now)
    assert token.startswith("spt_")
    claims = verify_spend_token(token, load_public_key(key.public_key), audience="paymaster", now=now)
    assert (claims.agent_id, claims.max_amount, claims.task, claims.exp - claims.iat) == (
        "ag_1",
        "0.02",
        "tk_9",
        60,
    )
    assert key.sign(agent_id="ag_1", aud="paymaster") != key.sign(agent_id="ag_1", aud="paymaster")


def test_sign_passes_on_argument_errors() -> None:
    with pytest.raises(ValueError):
        AgentKey.generate().sign(agent_id="ag_1", aud="paymaster", ttl_seconds=301)


def test_repr_and_str_show_no_key_material() -> None:
    key = AgentKey.generate()
    raw_private = key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem_body = b"".join(private_key_to_pem(key.private_key).splitlines()[1:-1]).decode()
    for text in (repr(key), str(key), f"{key!r}", repr([key]), repr({"key": key})):
        assert "AgentKey" in text
        assert key.public_key not in text  # only a short fingerprint of the public half
        for secret in (
            pem_body,
            pem_body[20:40],
            raw_private.hex(),
            base64.urlsafe_b64encode(raw_private).decode().rstrip("="),
            base64.b64encode(raw_private).decode(),
        ):
            assert secret not in text


def test_key_cannot_be_pickled_but_copies_are_itself() -> None:
    key = AgentKey.generate()
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert copy.copy(key) is key
    assert copy.deepcopy({"k": key})["k"] is key


def test_constructor_requires_an_ed25519_private_key() -> None:
    with pytest.raises(TypeError):
        AgentKey(load_public_key(AgentKey.generate().public_key))  # type: ignore[arg-type]
