"""What `slipway build` packs (framework/build.py), without building: the real path is tests/e2e/test_build_serve.py."""

from __future__ import annotations

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
