"""Tiny demo subjects shared by the analysis tests (a short DDIM respacing keeps the DiT runs quick)."""

import pytest

from bitlaws.analysis import subjects


@pytest.fixture(scope="module")
def var_subject():
    return subjects.demo_subject("var-d1")


@pytest.fixture(scope="module")
def dit_subject():
    return subjects.demo_subject("dit-d2", respacing="ddim5")
