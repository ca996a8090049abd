"""What `slipway build` packs (framework/build.py), without building: the real path is tests/e2e/test_build_serve.py."""

from __future__ import annotations

import json

import yaml

from framework.alerts import alert_rules
from framework.build import _write_context
from framework.spec import load_project


class FakeSigned:
    """Stands in for the signed check (signing.Signed): the context only writes its dict."""

    def to_dict(self) -> dict:
        return {"statement": {}, "signature": "fake"}


def test_the_bento_context_carries_the_contracts_alert_rules(project_root, tmp_path):
    project = load_project(str(project_root / "projects" / "ticket-triage"))
    _write_context(tmp_path, project, "tiny", "ticket-triage-tiny:abc", {}, {"signed": FakeSigned()}, "v1")
    written = yaml.safe_load((tmp_path / "slipway" / "alerts.yml").read_text())
    assert written == alert_rules(project.spec) and written["groups"][0]["rules"]
    assert (tmp_path / "framework" / "alerts.py").exists()   # service.py imports it inside the bento


def test_the_bento_carries_how_optimize_made_the_program_only_while_the_file_is_unchanged(toml_path):
    from framework.build import optimize_provenance
    from framework.content import file_hash
    from framework.optimize import provenance_path

    project = load_project(str(toml_path))
    assert optimize_provenance(project) is None   # no saved program
    saved = project.saved_program_path
    saved.write_text('{"triage": {"demos": []}}')
    provenance_path(saved).write_text(json.dumps({"optimizer": "BootstrapFewShot", "program_sha256": file_hash(saved)}))
    assert optimize_provenance(project)["optimizer"] == "BootstrapFewShot"
    saved.write_text('{"triage": {"demos": [{"ticket": "edited by hand"}]}}')
    assert optimize_provenance(project) is None   # edited after optimize: no claim about how it was made
    provenance_path(saved).write_text("{not json")
    assert optimize_provenance(project) is None
