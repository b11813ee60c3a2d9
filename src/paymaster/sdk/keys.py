"""The agent's own ed25519 key: made, kept and used on the agent's side only.

The authority stores only the public key; the private key stays in this object and in a
PEM file readable by its owner alone, and signs each spend token locally.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from paymaster.core.tokens import (
    DEFAULT_TTL_SECONDS,
    generate_private_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_b64,
    sign_spend_token,
)

__all__ = ["AgentKey"]

# O_NOFOLLOW where the platform has it: never write a key through a planted symlink.
_CREATE_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_KEY_FILE_MODE = 0o600


def _write_new(path: Path, data: bytes) -> None:
    # Created 0600 from the start (O_EXCL + mode), so there is no moment at which the key
    # sits in a file someone else could open.
    fd = os.open(path, _CREATE_FLAGS, _KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


class AgentKey:
    """An agent's ed25519 private key.

    Usage: ``key = AgentKey.generate()``; ``key.save("agent.pem")`` (mode 0600, refuses to
    overwrite); register ``key.public_key``; ``key.sign(agent_id=..., aud=...)`` per call.
    """

    __slots__ = ("_private_key",)

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError("AgentKey needs an Ed25519PrivateKey")
        self._private_key = private_key

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(generate_private_key())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentKey:
        """Read a PEM (PKCS#8, unencrypted) ed25519 key; ``ValueError`` if it is not one."""
        return cls(private_key_from_pem(Path(path).read_bytes()))

    @property
    def public_key(self) -> str:
        """The public key to register with the authority: base64url of the raw 32 bytes."""
        return public_key_b64(self._private_key)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The underlying key, for interoperating with other cryptography code."""
        return self._private_key

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key as PEM with mode 0600.

        An existing file is an error (``FileExistsError``) unless ``overwrite=True``, in
        which case the new key replaces it atomically: an old key is never half-overwritten,
        and a file that was once world-readable does not keep its old mode.
        """
        target = Path(path)
        data = private_key_to_pem(self._private_key)
        if not overwrite:
            _write_new(target, data)
            return
        temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        _write_new(temp, data)
        try:
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def sign(
        self,
        *,
        agent_id: str,
        aud: str,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        max_amount: str | None = None,
        currency: str | None = None,
        htm: str | None = None,
        htu: str | None = None,
        task: str | None = None,
        session: str | None = None,
        now: float | None = None,
        alg: str = "EdDSA",
        jti: str | None = None,
    ) -> str:
        """A fresh single-use spend token (``spt_…``); see ``paymaster.core.tokens.sign_spend_token``."""
        return sign_spend_token(
            self._private_key,
            agent_id=agent_id,
            aud=aud,
            ttl_seconds=ttl_seconds,
            max_amount=max_amount,
            currency=currency,
            htm=htm,
            htu=htu,
            task=task,
            session=session,
            now=now,
            alg=alg,
            jti=jti,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AgentKey):
            return NotImplemented
        return self.public_key == other.public_key

    def __hash__(self) -> int:
        return hash(self.public_key)

    def __repr__(self) -> str:
        # A prefix of the *public* key identifies the key in logs; nothing of the private
        # key is ever rendered.
        return f"<AgentKey public_key={self.public_key[:8]}…>"

    def __copy__(self) -> AgentKey:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, object]) -> AgentKey:
        return self

    def __reduce__(self) -> str | tuple[object, ...]:
        # Pickling would copy the private key into caches, queues and crash dumps (the
        # underlying cryptography key refuses too; this says why and what to do instead).
        raise TypeError("AgentKey cannot be pickled; save() it to a file instead")
