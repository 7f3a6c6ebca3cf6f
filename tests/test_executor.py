"""The in-process executor runs only the site's installed ClientApp."""

from __future__ import annotations

from flwr.cli.build import build_fab_from_files

from medfed.client.executor import INSTALLED_CLIENTAPP, bundle_clientapp
from medfed.server.control import _fab_bytes


def test_medfed_bundle_names_the_installed_clientapp() -> None:
    assert bundle_clientapp(_fab_bytes()) == INSTALLED_CLIENTAPP


def test_foreign_bundle_is_detected() -> None:
    pyproject = _fab_bytes_text().replace(INSTALLED_CLIENTAPP, "evil.client:app")
    fab = build_fab_from_files({"pyproject.toml": pyproject.encode()})[0]
    assert bundle_clientapp(fab) == "evil.client:app"


def _fab_bytes_text() -> str:
    from importlib.resources import files

    return files("medfed.server").joinpath("flower_app/pyproject.toml").read_text()
