"""Every error Slipway raises on purpose, in one small tree.

The CLI maps the tree to exit codes (see `exit_code`): a user error prints one
clean message that says what happened, where (file, line, field) and how to fix
it, never a traceback. Each class carries a stable kebab-case `code` that docs
and tests can rely on.
"""

from __future__ import annotations


class SlipwayError(Exception):
    """Base of every deliberate Slipway error."""

    code = "slipway-error"
    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None,
                 line: int | None = None, hint: str | None = None):
        self.message = message
        self.path = path
        self.field = field
        self.line = line
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.path:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        field = f"{self.field}: " if self.field else ""
        text = f"{where}{field}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SpecError(SlipwayError):
    """project.toml is missing, unparsable or does not validate."""

    code = "spec-invalid"
    exit_code = 2


class DatasetError(SlipwayError):
    """An eval/dev/train JSONL file is missing or has a corrupt row."""

    code = "dataset-invalid"
    exit_code = 2


class ModelError(SlipwayError):
    """A model file is missing, cannot be fetched, or does not match its sha256 pin."""

    code = "model-invalid"
    exit_code = 2


class RemoteModelError(ModelError):
    """A remote model server is unreachable, refuses the call, or answers as another model than the pinned one."""

    code = "model-remote"
    exit_code = 2


class ModelTimeout(ModelError):
    """A model call ran past its deadline (`serve.timeout_s` when served)."""

    code = "model-timeout"
    exit_code = 1


class TiersExhausted(ModelError):
    """Every tier of a routed pipeline failed to answer a request (framework/routing.py): the last tier's
    output was invalid too. The service's `[fallback]` answers it when `on` lists `exhausted`."""

    code = "tiers-exhausted"
    exit_code = 1


class NotebookError(SlipwayError):
    """The pipeline notebook cannot be imported or lacks the declared program."""

    code = "notebook-invalid"
    exit_code = 2


class StoreError(SlipwayError):
    """The DuckDB store cannot be opened or has an unknown schema version."""

    code = "store-error"
    exit_code = 3


class ContractFailed(SlipwayError):
    """At least one contract clause failed; carries the failing clause names."""

    code = "contract-failed"
    exit_code = 1

    def __init__(self, message: str, *, clauses: list[str], **kwargs):
        self.clauses = clauses
        super().__init__(message, **kwargs)


class ReleaseRefused(SlipwayError):
    """A deploy, approval, rollback, override or addition of served rows to the eval set is not allowed; the
    message names the rule that failed (missing check, too few valid approvals, self-approval, unknown or
    revoked key, missing role)."""

    code = "release-refused"
    exit_code = 1


class HandoffError(SlipwayError):
    """A human-queue entry cannot be resolved as asked: no such entry, a request id that names several, or
    labels that do not fit the program's output fields (`slipway queue resolve`)."""

    code = "handoff-invalid"
    exit_code = 2


class IdentityError(SlipwayError):
    """No signing key, an unreadable key, or ssh-keygen missing: nobody can be identified to act."""

    code = "identity"
    exit_code = 2


class BentoTampered(SlipwayError):
    """A file inside a built bento differs from its signed manifest, or the manifest's signature fails."""

    code = "bento-tampered"
    exit_code = 2


class AuditBroken(SlipwayError):
    """The audit log's hash chain does not verify: a row was edited or deleted."""

    code = "audit-broken"
    exit_code = 1


class NotReady(SlipwayError):
    """A served version did not become ready: its warm-up answer failed, it exited, or it passed
    `serve.startup_timeout_s`."""

    code = "serve-not-ready"
    exit_code = 1


class ContainerEngineMissing(SlipwayError):
    """No container engine BentoML can build with (docker, podman, buildah, nerdctl, buildctl) answers here;
    the message names each engine tried and why it could not be used (framework/container.py)."""

    code = "container-engine-missing"
    exit_code = 2


class ContainerBuildFailed(SlipwayError):
    """The container engine ran and failed to build the image (its own error is in the message)."""

    code = "container-build-failed"
    exit_code = 1


def exit_code(error: BaseException) -> int:
    """0 ok, 1 contract failed, 2 bad input/config, 3 internal."""
    if isinstance(error, SlipwayError):
        return error.exit_code
    return 3
