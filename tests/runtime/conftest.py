"""Fixtures shared by the server tests: one tokenizer and one warmed tiny engine for the
whole session (warming an engine compiles its manifest: tens of seconds on CPU). Every
test that serves it leaves its slots idle (server_harness.serve checks)."""

from __future__ import annotations

import pytest

from tests.runtime.server_harness import tiny_engine
from tests.utils import smollm2_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def engine(tokenizer):
    return tiny_engine(tokenizer)
