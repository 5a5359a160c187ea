"""CurveZMQ key pair files: `<name>.public` (0644) and `<name>.secret` (0600), z85 text."""

from __future__ import annotations

import os
from pathlib import Path

import zmq

PUBLIC_SUFFIX = ".public"
SECRET_SUFFIX = ".secret"


def key_paths(out_dir: str | Path, name: str = "server") -> tuple[Path, Path]:
    """(public key file, secret key file) of key pair `name` in out_dir."""
    out = Path(out_dir)
    return out / f"{name}{PUBLIC_SUFFIX}", out / f"{name}{SECRET_SUFFIX}"


def write_keypair(
    out_dir: str | Path, name: str = "server", overwrite: bool = False
) -> tuple[Path, Path]:
    """Generate a key pair with `zmq.curve_keypair()` and write it; returns the two paths.

    The secret file is created with mode 0600 (never readable by others, not even briefly);
    a folder that does not exist yet is created with mode 0700.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}: use a plain file stem such as 'server'")
    public_key, secret_key = zmq.curve_keypair()  # z85-encoded bytes
    out = Path(out_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = key_paths(out, name)
    existing = [p for p in (public_path, secret_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --force to replace the key pair")
    for path in existing:
        path.unlink()
    _write(secret_path, secret_key, 0o600)
    _write(public_path, public_key, 0o644)
    return public_path, secret_path


def read_keypair(out_dir: str | Path, name: str = "server") -> tuple[bytes, bytes]:
    """(public, secret) z85 keys written by `write_keypair`; refuses a group/world-readable
    secret file."""
    public_path, secret_path = key_paths(out_dir, name)
    mode = secret_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{secret_path} has mode {mode:o}; run `chmod 600 {secret_path}` first"
        )
    return public_path.read_bytes().strip(), secret_path.read_bytes().strip()


def _write(path: Path, key: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    os.chmod(path, mode)  # the umask may have narrowed a public file; keep modes exact
