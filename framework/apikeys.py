"""API keys: which tenant a caller of the served bento is, and which routes and channels it may call.

A caller sends `Authorization: Bearer sk-slipway-…`, as OpenAI-compatible clients do. `create_key` makes the
key (`sk-slipway-` + 32 random bytes, URL-safe base64), shows it once, and keeps only its sha256 in
`projects/<name>/.slipway/api-keys.jsonl`. A fast hash is enough: the key has 256 random bits, so there is no
dictionary to try and no guess to slow down (slow hashes such as bcrypt exist for low-entropy passwords).

The keys file is a gate (a row in it lets callers in), so like every gate in Slipway it counts only signed
statements: each line is a `framework.signing.Signed` create or revoke statement, and a line counts only when
its signature holds and its key is listed in signers.toml, not revoked, with the `keys` role. Anything else
(a hand-typed row, a row edited after signing, a row from another project, one signed by an unlisted key or a
key without the role) is ignored with a logged warning. Revocations are by key id and win over any create row,
in any order, so replaying an old create line cannot revive a key.

`verify_key` is on the request path: the table is rebuilt only when one of its three files changes (stat:
mtime, size, inode), and each line's signature is checked once per process. A served bento passes its own
copies of signers.toml and project.toml (`KeyFiles`), and the project's live keys file, so a key created or
revoked while it serves takes effect on the next request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from framework import signing
from framework.errors import ReleaseRefused, SpecError
from framework.spec import KEYED_ENDPOINTS, Project, TenantSpec, parse_spec

log = logging.getLogger("slipway.apikeys")

PREFIX = "sk-slipway-"
ROLE = "keys"
KEYS_FILE = "api-keys.jsonl"
CREATE, REVOKE = "api-key-create", "api-key-revoke"


def keys_path(project_dir: Path) -> Path:
    """Where a project's API keys live: its git-ignored state folder (hashes only, mode 0600)."""
    return project_dir / ".slipway" / KEYS_FILE


def key_hash(key: str) -> str:
    """The sha256 (hex) a key is stored and looked up by."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_for(digest: str) -> str:
    """`key-` + the first 12 hex digits of the key's sha256: names a key in lists and revocations. (48 bits
    of a hash of 256 random bits tell nothing about the key.)"""
    return f"key-{digest[:12]}"


@dataclass(frozen=True)
class KeyFiles:
    """The three files a key is verified against: the keys file (rows), the signers file (who may sign
    them) and project.toml (the project's name, which the rows must name, and its tenants)."""

    keys: Path
    signers: Path
    project_toml: Path

    @classmethod
    def of_project(cls, project_dir: Path) -> KeyFiles:
        project_dir = Path(project_dir)
        return cls(keys_path(project_dir), signing.signers_path(project_dir), project_dir / "project.toml")


@dataclass(frozen=True)
class ApiKey:
    """A key whose create statement holds (never the key itself)."""

    key_id: str
    tenant: str
    sha256: str
    endpoints: tuple[str, ...] | None      # None: every route the tenant may call
    channels: tuple[str, ...] | None       # None: every channel the tenant may call
    created_at: str
    created_by: str                        # the signer's name in signers.toml
    revoked_at: str | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None

    def allows(self, endpoint: str, channel: str | None) -> bool:
        return ((self.endpoints is None or endpoint.strip("/") in self.endpoints)
                and (self.channels is None or channel in self.channels))

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant": self.tenant,
                "endpoints": list(self.endpoints) if self.endpoints is not None else None,
                "channels": list(self.channels) if self.channels is not None else None,
                "created_at": self.created_at, "created_by": self.created_by,
                "revoked": self.revoked_at is not None, "revoked_at": self.revoked_at, "revoked_by": self.revoked_by,
                "revoke_reason": self.revoke_reason}


@dataclass(frozen=True)
class Ignored:
    """A line of the keys file that counts for nothing, and why (it is logged once per change of the file)."""

    line: int
    key_id: str | None
    reason: str


@dataclass(frozen=True)
class KeyTable:
    """The keys file as the gate reads it: valid keys by id and by hash, and the lines that were ignored."""

    project: str
    tenants: Mapping[str, TenantSpec]
    keys: dict[str, ApiKey] = field(default_factory=dict)
    by_hash: dict[str, ApiKey] = field(default_factory=dict)
    ignored: list[Ignored] = field(default_factory=list)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant (whose limits apply), and the key it used."""

    tenant: str
    key_id: str
    limits: TenantSpec


@dataclass(frozen=True)
class KeyRefusal:
    """Why a request may not pass: `status` 401 (no key, unknown or revoked) or 403 (a valid key outside its
    scope), a stable `code`, and a message safe to send back to the caller."""

    status: int
    code: str
    message: str
    key_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


def bearer(header: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header value; None when absent or another scheme."""
    scheme, _, value = (header or "").strip().partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def verify_key(source: Path | KeyFiles, presented_key: str | None, endpoint: str,
               channel: str | None = None) -> Caller | KeyRefusal:
    """The tenant a presented key belongs to, or why it is refused.

    `source` is a project folder or the `KeyFiles` to read (a served bento passes its own copies of signers.toml
    and project.toml). `endpoint` is the route called (`triage` or `/triage`), `channel` the channel serving it
    (None: a version served without one). Unknown, malformed or revoked keys are 401; a valid key used outside
    its own or its tenant's routes or channels, or whose tenant project.toml no longer declares, is 403.
    Raises `SpecError` when signers.toml or project.toml does not parse (fail closed, and loudly).
    """
    if not presented_key:
        return KeyRefusal(401, "api-key-missing", f"no API key: send the header `Authorization: Bearer {PREFIX}…`")
    table = load_keys(source if isinstance(source, KeyFiles) else KeyFiles.of_project(Path(source)))
    # A dict lookup on the sha256 of the presented key: its timing depends on the hash, which a caller cannot
    # steer towards a stored one, so it leaks nothing a constant-time comparison would protect.
    found = table.by_hash.get(key_hash(presented_key))
    if found is None:
        return KeyRefusal(401, "api-key-unknown", "this API key is not valid for this service")
    if found.revoked_at is not None:
        return KeyRefusal(401, "api-key-revoked", f"API key {found.key_id} was revoked", found.key_id)
    limits = table.tenants.get(found.tenant)
    if limits is None:
        return KeyRefusal(403, "api-key-tenant", f"API key {found.key_id} belongs to tenant {found.tenant!r}, "
                                                 "which this service no longer serves", found.key_id)
    if not found.allows(endpoint, channel) or not limits.allows(endpoint, channel):
        where = f"/{endpoint.strip('/')}" + (f" on channel {channel!r}" if channel else " (no channel)")
        return KeyRefusal(403, "api-key-scope", f"API key {found.key_id} (tenant {found.tenant!r}) may not call "
                                                f"{where}", found.key_id)
    return Caller(tenant=found.tenant, key_id=found.key_id, limits=limits)


# -- reading the keys file ---------------------------------------------------------------------------------------

_lock = threading.Lock()
_tables: dict[KeyFiles, tuple[tuple, KeyTable]] = {}
_signatures: dict[str, bool] = {}   # sha256 of a line → does its signature hold (no policy: that can change)


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def load_keys(files: KeyFiles) -> KeyTable:
    """The keys file as the gate reads it; rebuilt only when one of the three files changed (cheap per request)."""
    stamp = (_stamp(files.keys), _stamp(files.signers), _stamp(files.project_toml))
    cached = _tables.get(files)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    with _lock:
        cached = _tables.get(files)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        table = _read(files)
        for skipped in table.ignored:
            log.warning("%s:%d: ignoring API key row%s: %s", files.keys, skipped.line,
                        f" {skipped.key_id}" if skipped.key_id else "", skipped.reason)
        _tables[files] = (stamp, table)
        return table


def _read(files: KeyFiles) -> KeyTable:
    spec = parse_spec(files.project_toml.read_text(encoding="utf-8"), str(files.project_toml))
    signers = signing.load_signers_file(files.signers)
    table = KeyTable(project=spec.project.name, tenants=dict(spec.tenants))
    try:
        lines = files.keys.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    creates: list[tuple[int, dict, str]] = []
    revokes: dict[str, tuple[dict, str]] = {}
    seen: set[str] = set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        statement, by, why = _check_line(text, table.project, signers)
        key_id = statement.get("key_id") if isinstance(statement, dict) else None
        if why is None and text in seen:
            why = "a copy of an earlier line"
        if why is not None:
            table.ignored.append(Ignored(number, key_id if isinstance(key_id, str) else None, why))
            continue
        seen.add(text)
        if statement["action"] == REVOKE:
            revokes.setdefault(statement["key_id"], (statement, by))
        else:
            creates.append((number, statement, by))
    for number, statement, by in creates:
        key_id = statement["key_id"]
        if key_id in table.keys:
            table.ignored.append(Ignored(number, key_id, "a second create row for this key id (the first counts)"))
            continue
        revoked, revoker = revokes.get(key_id, (None, None))
        if revoked is not None and revoked["sha256"] != statement["sha256"]:
            revoked, revoker = None, None
        entry = ApiKey(key_id=key_id, tenant=statement["tenant"], sha256=statement["sha256"],
                       endpoints=_tuple(statement["endpoints"]), channels=_tuple(statement["channels"]),
                       created_at=statement["at"], created_by=by,
                       revoked_at=revoked["at"] if revoked else None, revoked_by=revoker,
                       revoke_reason=revoked.get("reason") if revoked else None)
        table.keys[key_id] = entry
        table.by_hash[entry.sha256] = entry
    return table


def _tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _check_line(text: str, project: str, signers: signing.SignersSpec) -> tuple[Any, str, str | None]:
    """(statement, signer name, None) for a line that counts; else (whatever parsed, "", why it does not)."""
    try:
        row = json.loads(text)
        signed = signing.Signed.from_dict(row)
        if not isinstance(signed.statement, dict) or not isinstance(signed.key, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None, "", "not a signed statement ({statement, key, signature} JSON)"
    statement = signed.statement
    digest = hashlib.sha256(text.encode()).hexdigest()
    holds = _signatures.get(digest)
    if holds is None:
        holds = _signatures[digest] = signing.signature_holds(signed)
    if not holds:
        return statement, "", "rule signature-valid: the signature does not verify over this statement"
    try:
        signer, revoked = signers.by_key(signed.key), signers.revocation(signed.key)
    except ValueError:
        return statement, "", "rule known-key: not an OpenSSH public key"
    why = signing.key_refusal(signed.key, ROLE, signer, revoked)
    if why is not None:
        return statement, "", why
    assert signer is not None
    return statement, signer.name, _statement_problem(statement, project)


def _statement_problem(statement: dict, project: str) -> str | None:
    """Does a signed statement say what a keys row must say, for this project? (None: it does.)"""
    action = statement.get("action")
    if action not in (CREATE, REVOKE):
        return f"a signed {action!r} statement, not an API key create or revoke"
    if statement.get("project") != project:
        return f"signed for project {statement.get('project')!r}, not {project!r}"
    digest, key_id = statement.get("sha256"), statement.get("key_id")
    if not (isinstance(digest, str) and len(digest) == 64 and isinstance(key_id, str) and key_id == key_id_for(digest)):
        return "its key_id and sha256 do not belong together"
    if not isinstance(statement.get("at"), str):
        return "no time stamp"
    if action == CREATE:
        if not isinstance(statement.get("tenant"), str):
            return "no tenant"
        for scope in ("endpoints", "channels"):
            value = statement.get(scope, "missing")
            if value is not None and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                return f"{scope} is neither null nor a list of names"
    return None


# -- writing it (the CLI) ----------------------------------------------------------------------------------------

def new_key() -> str:
    """A fresh API key: `sk-slipway-` + 32 random bytes as URL-safe base64 (43 characters)."""
    return PREFIX + secrets.token_urlsafe(32)


def create_key(project: Project, tenant: str, *, endpoints: list[str] | None = None,
               channels: list[str] | None = None, key: Path | None = None,
               now: Callable[[], datetime] | None = None) -> tuple[str, ApiKey]:
    """Make a key for `tenant`, sign its create statement with `key` (an SSH key with the `keys` role) and
    append it to the keys file. Returns the key (shown once: only its hash is kept) and its entry.

    `endpoints` / `channels` narrow the key within what the tenant allows (None: all of it). Raises `SpecError`
    for an undeclared tenant or a scope the tenant does not allow, `ReleaseRefused` when the signing key may
    not create keys (a row it signed would not count), `IdentityError` when there is no key to sign with.
    """
    limits = project.spec.tenants.get(tenant)
    if limits is None:
        known = ", ".join(sorted(project.spec.tenants)) or "none"
        raise SpecError(f"no tenant {tenant!r} in project.toml (declared: {known})", path=str(project.toml_path),
                        field=f"tenants.{tenant}", hint=f"add a [tenants.{tenant}] table (docs/project-toml.md)")
    served = sorted({project.spec.serve.endpoint.strip("/"), *KEYED_ENDPOINTS})
    endpoints = _scope(endpoints, "--endpoint", served, limits.endpoints, tenant, project)
    channels = _scope(channels, "--channel", None, limits.channels, tenant, project)
    path, signer = _signer(project, key, "create API keys")
    secret = new_key()
    digest = key_hash(secret)
    statement = {"action": CREATE, "project": project.name, "key_id": key_id_for(digest), "sha256": digest,
                 "tenant": tenant, "endpoints": endpoints, "channels": channels, "at": _now(now)}
    signed = signing.sign(statement, path)
    _append(keys_path(project.dir), signed)
    entry = ApiKey(key_id=statement["key_id"], tenant=tenant, sha256=digest, endpoints=_tuple(endpoints),
                   channels=_tuple(channels), created_at=statement["at"], created_by=signer)
    return secret, entry


def revoke_key(project: Project, key_id: str, *, reason: str = "", key: Path | None = None,
               now: Callable[[], datetime] | None = None) -> tuple[ApiKey, bool]:
    """Sign and append the revocation of `key_id`; (its entry, False) when it was revoked already.

    Raises `SpecError` for a key id the file does not hold (or holds only in rows that do not count).
    """
    table = load_keys(KeyFiles.of_project(project.dir))
    found = table.keys.get(key_id)
    if found is None:
        raise SpecError(f"no API key {key_id!r} in {keys_path(project.dir)}", field="key_id",
                        hint=f"`slipway keys list {project.name}` shows the ids")
    if found.revoked_at is not None:
        return found, False
    path, signer = _signer(project, key, "revoke API keys")
    statement = {"action": REVOKE, "project": project.name, "key_id": key_id, "sha256": found.sha256,
                 "tenant": found.tenant, "reason": reason, "at": _now(now)}
    _append(keys_path(project.dir), signing.sign(statement, path))
    return dataclasses.replace(found, revoked_at=statement["at"], revoked_by=signer, revoke_reason=reason), True


def list_keys(project: Project) -> list[dict[str, Any]]:
    """Every key with its status (`active`, `revoked`), then every ignored line with why; never a key."""
    table = load_keys(KeyFiles.of_project(project.dir))
    rows = [{**entry.to_dict(), "line": None, "status": "revoked" if entry.revoked_at else "active"}
            for entry in sorted(table.keys.values(), key=lambda e: e.created_at)]
    rows += [{"key_id": skipped.key_id, "tenant": None, "endpoints": None, "channels": None, "created_at": None,
              "created_by": None, "revoked": None, "line": skipped.line, "status": f"ignored: {skipped.reason}"}
             for skipped in table.ignored]
    return rows


def _scope(given: list[str] | None, option: str, known: list[str] | None, allowed: list[str] | None, tenant: str,
           project: Project) -> list[str] | None:
    if not given:
        return None
    values = sorted({value.strip().strip("/") for value in given})
    for value in values:
        if known is not None and value not in known:
            raise SpecError(f"{value!r} is not a route the bento serves; expected one of {', '.join(known)}",
                            field=option)
        if allowed is not None and value not in allowed:
            raise SpecError(f"tenant {tenant!r} may not use {value!r}: a key cannot reach past its tenant "
                            f"(allowed: {', '.join(allowed)})", path=str(project.toml_path),
                            field=f"tenants.{tenant}.{option.removeprefix('--')}s")
    return values


def _signer(project: Project, key: Path | None, what: str) -> tuple[Path, str]:
    """The signing key, refused before anything is written when a row it signs would not count."""
    path = signing.find_key(key)
    public = signing.public_key(path)
    signers = signing.load_signers(project.dir)
    signer = signers.by_key(public)
    why = signing.key_refusal(public, ROLE, signer, signers.revocation(public))
    if why is not None:
        raise ReleaseRefused(f"refusing to {what} for {project.name}: {why}",
                             path=str(signing.signers_path(project.dir)),
                             hint=f"a person whose key has the {ROLE!r} role runs it; `slipway signers show` "
                                  f"prints your key, `slipway signers add {project.name} <name> --public-key FILE "
                                  f"--roles {ROLE}` proposes the entry (a reviewed change)")
    assert signer is not None
    return path, signer.name


def _now(now: Callable[[], datetime] | None) -> str:
    return (now or (lambda: datetime.now(UTC)))().astimezone(UTC).isoformat(timespec="seconds")


def _append(path: Path, signed: signing.Signed) -> None:
    """Add one line, atomically: under a lock, the whole file is rewritten beside it (mode 0600, fsynced) and
    renamed over the old one, so a reader (a serving worker) sees the old file or the new one, never half."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        line = json.dumps(signed.to_dict(), sort_keys=True, ensure_ascii=False).encode() + b"\n"
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            os.fchmod(out.fileno(), 0o600)   # whatever the umask, and if a stale temp file was there
            out.write(old + line)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
