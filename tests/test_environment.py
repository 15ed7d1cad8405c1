"""What the CI machine is expected to have, as failures rather than skips: the pinned reference libraries and
every build of the native kernels this CPU can run. Tests that need them skip only for a missing CUDA device or
instruction set; a broken install or build fails here."""

from __future__ import annotations

import importlib.metadata

import pytest

from engine.kernels import native, triton_decode

PINNED = {"transformers": "5.23.0", "triton": "3.9.0", "xgrammar": "0.2.8"}


@pytest.mark.parametrize(("package", "version"), PINNED.items())
def test_the_pinned_reference_packages_are_installed(package, version):
    assert importlib.metadata.version(package) == version


def test_triton_imports():
    assert triton_decode.available()


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_native_build_this_cpu_runs_compiles_and_loads(isa):
    if not native.runs_here(isa):
        pytest.skip(f"this CPU lacks the {isa} instruction set")
    assert native.library(isa) is not None, f"the {isa} build of the native kernels failed: see the log above"
