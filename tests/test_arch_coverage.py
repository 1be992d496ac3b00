"""Every causal-LM model type of the installed transformers, pruned on a tiny random model (tests/arch_coverage.py).

Nothing here names an architecture: the types come from transformers' auto mapping. A type is
pruned (cut in memory and at file level, reloaded, cache-consistent, the kept path unchanged),
refused by hubprune with one line, or could not be built tiny; none may fail a check, which
would mean hubprune cut a model into something that computes differently.
"""

from __future__ import annotations

from arch_coverage import report, run

# Just under the share last measured (transformers 5.25: 153 of 170, 90 %): a drop below it is a regression.
# docs/guide.md lists what is refused and why.
FLOOR = 0.89


def test_every_causal_lm_type_is_pruned_or_refused_with_a_reason():
    outcomes = run()
    print(report(outcomes))
    failed = [f"{o.model_type}: {o.detail}" for o in outcomes if o.status == "failed"]
    assert not failed, "\n".join(failed)
    decoder = [o for o in outcomes if o.status != "not decoder-only"]
    pruned = [o for o in decoder if o.status == "pruned"]
    assert len(decoder) >= 100, "fewer causal-LM types than expected: the auto mapping was not read"
    assert len(pruned) / len(decoder) >= FLOOR, report(outcomes)
    assert all(o.detail for o in outcomes if o.status in ("refused", "not tiny")), "a refusal without a reason"
