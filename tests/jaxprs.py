"""Walking traced programs in tests, and lowering them for the GPU without one."""

import jax
import jax.extend
import pytest


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from equations(sub)


def lower_for_cuda(kernel, *args):
    """The kernel's jit lowered for the cuda platform (no GPU needed on jax 0.10), as text."""
    try:
        lowered = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:  # newer jax asks for a (possibly abstract) GPU here
        if "No supported GPU" not in str(e):  # (NotImplementedError is a RuntimeError)
            raise
        pytest.skip(f"Triton lowering needs a GPU on this jax: {e}")
    return lowered.as_text()
