"""Measuring a model: the numbers a pruned model is judged on, beside its original's.

- ``folder.py``: ``evaluate_folder``, what ``hubprune eval`` runs: a folder beside its original, recorded.
- ``evaluate.py``: ``evaluate_model`` (one model: tasks + perplexity) and ``evaluate_tasks``.
- ``tasks.py``: the built-in zero-shot tasks' data, posed as lm-evaluation-harness poses them.
- ``scoring.py``: log-likelihoods and acc / acc_norm as the harness's HFLM computes them.
- ``results.py``: ``TaskScore`` and ``EvalResult``, the scores as recorded and printed.
- ``harness.py``: any lm-evaluation-harness task, scored by the harness itself (``--backend lm-eval``).
- ``perplexity.py``: perplexity on held-out windows.
- ``chat.py``: chat fidelity: the pruned model's answers against its original's.
"""
