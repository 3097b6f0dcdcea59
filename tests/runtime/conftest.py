"""Fixtures shared by the server tests: one tokenizer for the whole session and one warmed
tiny engine per module (warming an engine compiles its manifest: tens of seconds on CPU). Every
test that serves it leaves its slots idle (server_harness.serve checks)."""

from __future__ import annotations

import pytest

from tests.runtime.server_harness import tiny_engine
from tests.utils import smollm2_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer):
    # Per module, not per session: tests/conftest.py clears JAX's caches after each module
    # (a process has room for ~13k live XLA:CPU executables), which would leave a session
    # engine compiling again on its next call.
    return tiny_engine(tokenizer)
