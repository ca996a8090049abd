"""Who did what, proven by a signature: SSH keys, the project's signers file, signed statements.

Identity is never a name someone types. Each person signs with an SSH key they already hold, the way
git signs commits (`gpg.format = ssh`): `ssh-keygen -Y sign` makes the signature (so ssh-agent,
passphrases and hardware keys work as they do for git), and the `sshsig` library checks it in process
(the same SSHSIG format, namespace "slipway"). What a key may do is declared per project in
`projects/<name>/signers.toml`, a file kept in git beside project.toml, so changing who may approve
or deploy is itself a reviewed change:

    [[signers]]
    name  = "bob"
    key   = "ssh-ed25519 AAAAC3Nza… bob@laptop"
    roles = ["approve"]

Roles: `approve`, `deploy:<channel>`, `rollback:<channel>` (`*` for every channel), `override`,
`audit` (anchor and prune the audit log), `curate` (add served requests to the eval set,
framework/harvest.py), `keys` (create and revoke the API keys callers of the served bento present,
framework/apikeys.py), `flags` (switch pipeline variants on and off, framework/flags.py), `queue`
(resolve requests the service handed to a person, framework/handoff.py). Anyone may sign a check or a
build (the result names their key), but a deploy counts only checks, builds and approvals signed by keys
listed here and not revoked. A signed
*statement* is canonical JSON of what the action acts on (project, action, target, content hash,
channel, reason, time); the gates re-verify statements, never plain rows.
docs/trust.md compares this with the alternatives (OpenSSF model-signing, GPG, raw Ed25519).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from framework.errors import IdentityError, SpecError

NAMESPACE = "slipway"
SIGNERS_FILE = "signers.toml"
ROLE_PATTERN = r"^(approve|override|audit|curate|keys|flags|queue|(deploy|rollback):([a-z][a-z0-9_-]*|\*))$"
KEY_TYPES = ("ssh-ed25519", "ssh-rsa")  # what sshsig verifies; ed25519 is what `ssh-keygen -t ed25519` makes


def normal_key(line: str) -> str:
    """`type base64` without the comment: two spellings of one key compare equal."""
    parts = line.split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise ValueError(f"expected an OpenSSH public key line ({' or '.join(KEY_TYPES)} AAAA…), got {line[:40]!r}")
    return f"{parts[0]} {parts[1]}"


class Signer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")]
    key: str = Field(description="OpenSSH public key line, as in ~/.ssh/id_ed25519.pub")
    roles: list[Annotated[str, Field(pattern=ROLE_PATTERN)]] = Field(default_factory=list)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return normal_key(value)

    def may(self, role: str) -> bool:
        """`deploy:prod` is granted by `deploy:prod` or `deploy:*`."""
        kind, _, channel = role.partition(":")
        return role in self.roles or (bool(channel) and f"{kind}:*" in self.roles)


class Revoked(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    reason: str = ""

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return normal_key(value)


class SignersSpec(BaseModel):
    """`projects/<name>/signers.toml`: the keys the gates accept, and what each may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signers: list[Signer] = Field(default_factory=list)
    revoked: list[Revoked] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> SignersSpec:
        names: dict[str, str] = {}
        for signer in self.signers:
            if signer.name in names:
                raise ValueError(f"signer name {signer.name!r} appears twice: one person, one entry")
            if signer.key in names.values():
                other = next(n for n, k in names.items() if k == signer.key)
                raise ValueError(f"{signer.name!r} and {other!r} share one key: one key may not act as two people")
            names[signer.name] = signer.key
        return self

    def by_key(self, key: str) -> Signer | None:
        key = normal_key(key)
        return next((s for s in self.signers if s.key == key), None)

    def revocation(self, key: str) -> Revoked | None:
        key = normal_key(key)
        return next((r for r in self.revoked if r.key == key), None)


def signers_path(project_dir: Path) -> Path:
    return project_dir / SIGNERS_FILE


def load_signers(project_dir: Path) -> SignersSpec:
    """The project's signers file; a project without one has no signers (every gated action is refused)."""
    return load_signers_file(signers_path(project_dir))


def load_signers_file(path: Path) -> SignersSpec:
    """A signers file at any path (a served bento carries a copy of the project's); missing: no signers."""
    if not path.exists():
        return SignersSpec()
    try:
        return SignersSpec.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"not valid TOML: {exc}", path=str(path)) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise SpecError(problems, path=str(path), hint="see docs/trust.md for the format") from None


# -- keys ----------------------------------------------------------------------
def default_key_path() -> Path:
    """The key `slipway signers init` creates when the person has no SSH key yet."""
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "slipway" / "id_ed25519"


def find_key(explicit: str | Path | None = None, *, create: bool = False) -> Path:
    """The private key (or, with ssh-agent, its .pub) to sign with: `--key`, else SLIPWAY_SIGNING_KEY,
    else git's `user.signingkey` (when it is a file), else ~/.ssh/id_ed25519, else the key
    `slipway signers init` made. The choice only says which key signs; who acts is whoever holds it.

    With `create` (checks and builds, which anyone may sign), a person without any key gets one made
    at `default_key_path()`, so `make demo` works on a fresh machine; gated actions never create one.
    """
    candidates: list[tuple[str, str | Path | None]] = [("--key", explicit),
                                                       ("SLIPWAY_SIGNING_KEY", os.environ.get("SLIPWAY_SIGNING_KEY"))]
    for source, value in candidates:
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise IdentityError(f"signing key {path} does not exist", field=source,
                                    hint="pass the path of your SSH private key, e.g. ~/.ssh/id_ed25519")
            return path
    try:
        git_key = subprocess.run(["git", "config", "user.signingkey"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git_key = ""
    for path in (Path(git_key).expanduser() if git_key and not git_key.startswith(("ssh-", "key::")) else None,
                 Path.home() / ".ssh" / "id_ed25519", default_key_path()):
        if path is not None and path.exists():
            return path
    if create:
        path = init_key()
        import sys

        print(f"created your signing key {path} ({fingerprint(public_key(path))}); `slipway signers show` prints "
              "the line a project's signers.toml needs", file=sys.stderr)
        return path
    raise IdentityError("no SSH signing key found", field="--key",
                        hint="create one with `slipway signers init` (or `ssh-keygen -t ed25519`), or pass "
                             "--key / set SLIPWAY_SIGNING_KEY")


def init_key(path: Path | None = None, *, comment: str = "") -> Path:
    """Create an Ed25519 key pair (no passphrase; protect the file like ~/.ssh) unless one exists."""
    path = path or default_key_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ssh_keygen(["-q", "-t", "ed25519", "-N", "", "-C", comment or f"slipway {os.environ.get('USER', '')}".strip(),
                 "-f", str(path)])
    return path


def public_key(private_or_public: Path) -> str:
    """The `type base64` line of a key file (reads `<key>.pub` beside a private key)."""
    pub = private_or_public if private_or_public.suffix == ".pub" else private_or_public.with_name(
        private_or_public.name + ".pub")
    if pub.exists():
        return normal_key(pub.read_text())
    out = _ssh_keygen(["-y", "-f", str(private_or_public)])
    return normal_key(out)


def fingerprint(key: str) -> str:
    """`SHA256:…`, as `ssh-keygen -lf` prints it."""
    import base64
    import hashlib

    blob = base64.b64decode(normal_key(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_keygen(args: list[str], data: bytes | None = None) -> str:
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise IdentityError("ssh-keygen is not installed", hint="install OpenSSH (Debian: apt-get install "
                                                               "openssh-client); it makes and signs with keys")
    done = subprocess.run([exe, *args], input=data, capture_output=True, timeout=120)
    if done.returncode != 0:
        raise IdentityError(f"ssh-keygen {args[0]} failed: {done.stderr.decode(errors='replace').strip()}",
                            hint="is the key readable, and loaded in ssh-agent if it has a passphrase?")
    return done.stdout.decode()


# -- statements ----------------------------------------------------------------
def canonical(statement: dict[str, Any]) -> bytes:
    """The exact bytes a signature covers: sorted, compact JSON (no whitespace, UTF-8)."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


@dataclass(frozen=True)
class Signed:
    """A statement with who signed it: the public key line and the armored SSHSIG signature."""

    statement: dict[str, Any]
    key: str
    signature: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "key": self.key, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signed:
        return cls(statement=data["statement"], key=data["key"], signature=data["signature"])


def sign(statement: dict[str, Any], key_path: Path | None = None) -> Signed:
    """Sign `statement` with the person's key through `ssh-keygen -Y sign` (agent and passphrases work)."""
    path = key_path or find_key()
    armored = _ssh_keygen(["-Y", "sign", "-q", "-f", str(path), "-n", NAMESPACE], data=canonical(statement))
    signed = Signed(statement=statement, key=public_key(path), signature=armored)
    if not signature_holds(signed):  # e.g. a stale .pub beside the key: nothing signed with it would count
        raise IdentityError(f"the signature made with {path} does not verify against {path}.pub",
                            hint="the .pub file is not this key's public half; regenerate it with "
                                 f"`ssh-keygen -y -f {path} > {path}.pub`")
    return signed


def signature_holds(signed: Signed) -> bool:
    """Does the signature verify over the statement, made by the key it names? (No policy here.)"""
    import sshsig

    try:
        embedded = sshsig.check_signature(canonical(signed.statement), signed.signature, namespace=NAMESPACE)
        return normal_key(embedded.openssh_str()) == normal_key(signed.key)
    except (sshsig.InvalidSignature, ValueError, NotImplementedError):
        return False


@dataclass(frozen=True)
class Verified:
    """A statement whose signature holds, with what the signers file says of its key."""

    signed: Signed
    signer: Signer | None      # None: a valid signature by a key the project does not list
    revoked: Revoked | None

    @property
    def name(self) -> str:
        return self.signer.name if self.signer else f"unlisted key {self.signed.fingerprint}"


def verify(signed: Signed, signers: SignersSpec) -> Verified | None:
    """None when the signature does not hold; else who signed it according to `signers`."""
    if not signature_holds(signed):
        return None
    return Verified(signed=signed, signer=signers.by_key(signed.key), revoked=signers.revocation(signed.key))


def refusal(verified: Verified | None, role: str | None) -> str | None:
    """Why this signature may not act as `role` (None = it may); each reason names the rule it breaks."""
    if verified is None:
        return "rule signature-valid: the signature does not verify over this statement"
    return key_refusal(verified.signed.key, role, verified.signer, verified.revoked)


def key_refusal(key: str, role: str | None, signer: Signer | None, revoked: Revoked | None) -> str | None:
    """The policy half of `refusal`: is this key listed, not revoked, and granted `role`?"""
    if revoked is not None:
        why = f" ({revoked.reason})" if revoked.reason else ""
        return f"rule key-not-revoked: key {fingerprint(key)} is revoked in signers.toml{why}"
    if signer is None:
        return f"rule known-key: key {fingerprint(key)} is not in signers.toml"
    if role is not None and not signer.may(role):
        return f"rule role: {signer.name} lacks the role {role!r} in signers.toml"
    return None


def signer_line(name: str, key: str, roles: list[str]) -> str:
    """A `[[signers]]` entry, as `slipway signers add` appends it."""
    Signer(name=name, key=key, roles=roles)  # validate before writing
    return f'\n[[signers]]\nname = "{name}"\nkey = "{normal_key(key)}"\nroles = {json.dumps(roles)}\n'


def add_signer(project_dir: Path, name: str, key: str, roles: list[str]) -> Path:
    """Append a signer to the project's signers.toml (validated as a whole before it is written)."""
    path = signers_path(project_dir)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    try:
        new = text + signer_line(name, key, roles)
        SignersSpec.model_validate(tomllib.loads(new))
    except ValidationError as exc:
        error = exc.errors()[0]
        raise SpecError(error["msg"].removeprefix("Value error, "), path=str(path),
                        field=".".join(map(str, error["loc"])) or None) from None
    path.write_text(new, encoding="utf-8")
    return path


_HEADER = """\
# Who may act on this project, by SSH public key (docs/trust.md). This file lives in git beside
# project.toml: adding a reviewer or a deployer is a change that is itself reviewed.
# Roles: approve, deploy:<channel>, rollback:<channel> (or :*), override, audit, curate, keys, flags, queue.
"""
