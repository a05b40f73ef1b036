"""Composition of preconditioners: streaming module by module gives the same result as whole-dict composition."""

import torch

from pretrace.curvature.operators import Chain, Identity, Preconditioner, Scaled


class _Doubling(Preconditioner):
    """Module-wise: multiplies each module's gradient by a module-specific factor (records what it saw)."""

    module_wise = True

    def __init__(self):
        self.calls: list[list[str]] = []

    def apply(self, grads):
        self.calls.append(sorted(grads))
        return {name: g * (2.0 + len(name)) for name, g in grads.items()}


class _Coupling(Preconditioner):
    """Not module-wise: adds the mean of every module's first entry to each module (couples modules)."""

    def apply(self, grads):
        shared = sum(g.flatten()[0] for g in grads.values()) / len(grads)
        return {name: g + shared for name, g in grads.items()}


def _grads():
    torch.manual_seed(0)
    return {"a": torch.randn(3, 4, 5), "bb": torch.randn(3, 2, 6)}


def test_module_wise_chain_streams_modules_and_equals_whole_composition():
    first, second = _Doubling(), _Doubling()
    chain = Scaled(Chain([first, Identity(), second]), 0.5)
    assert chain.module_wise
    grads = _grads()
    out = chain.apply(grads)
    assert first.calls == [["a"], ["bb"]] and second.calls == [["a"], ["bb"]]  # one module at a time
    for name, g in grads.items():
        torch.testing.assert_close(out[name], 0.5 * (2.0 + len(name)) ** 2 * g)
    torch.testing.assert_close(grads["a"], _grads()["a"])  # inputs untouched


def test_chain_with_a_coupling_operator_applies_it_to_all_modules_at_once():
    coupling = Chain([_Doubling(), _Coupling()])
    assert not coupling.module_wise and not Scaled(coupling, 2.0).module_wise
    grads = _grads()
    doubled = {name: g * (2.0 + len(name)) for name, g in grads.items()}
    expected = _Coupling().apply(doubled)
    out = coupling.apply(grads)
    for name in grads:
        torch.testing.assert_close(out[name], expected[name])
