"""`rlq eval`'s figures, pure: pass@k, mean@k and greedy accuracy from per-problem verdicts, and their report.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1):
with n samples of a problem of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k samples
drawn without replacement from the n contain a correct one, averaged over problems. It is computed as the
product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials. mean@k is the mean reward of the
k samples of a problem, averaged over problems (NeMo Gym's validation on AIME24 reports it with k = 32); with
0/1 rewards it equals pass@1. Greedy accuracy is the share of problems whose one greedy completion is correct.

No torch here: the sampling and judging that produce the verdicts are rlq/eval_run.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ESTIMATOR = "unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), averaged over problems"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` of them correct (Chen et al. 2021).

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """The k of pass@k to report for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return sorted({*ks, n}) if n else []


@dataclass
class ProblemResult:
    """One problem's outcome: the verdicts of its sampled completions and of its greedy one."""

    prompt_id: str
    ground_truth: str
    sampled: list[str] = field(default_factory=list)  # verdicts, one per sample
    greedy: str | None = None  # verdict of the greedy completion; None when greedy was not run
    greedy_text: str = ""
    sampled_lengths: list[int] = field(default_factory=list)  # completion tokens, one per sample
    sampled_truncated: int = 0  # samples that hit max_new_tokens

    @property
    def correct(self) -> int:
        return sum(v == "correct" for v in self.sampled)


def summarize(results: list[ProblemResult], ks: list[int] | None = None) -> dict[str, Any]:
    """The figures of a list of problems (each with the same number of samples, possibly 0).

    Returns:
        {"problems", "samples_per_problem", "greedy_accuracy" (None without greedy), "mean@k", "pass@k": {k: v},
        "verdicts": {sampled verdict: count}, "greedy_verdicts", "response_tokens_mean", "truncated_fraction"}.
    """
    n = len(results[0].sampled) if results else 0
    if any(len(r.sampled) != n for r in results):
        raise ValueError("every problem needs the same number of samples")
    ks = [k for k in (ks if ks is not None else default_ks(n)) if 1 <= k <= n]
    greedy = [r.greedy for r in results if r.greedy is not None]
    samples = n * len(results)
    lengths = [length for r in results for length in r.sampled_lengths]
    return {
        "problems": len(results),
        "samples_per_problem": n,
        "greedy_accuracy": _mean([v == "correct" for v in greedy]) if greedy else None,
        "mean@k": _mean([r.correct / n for r in results]) if n else None,
        "pass@k": {str(k): _mean([pass_at_k(n, r.correct, k) for r in results]) for k in ks},
        "verdicts": dict(Counter(v for r in results for v in r.sampled)),
        "greedy_verdicts": dict(Counter(greedy)),
        "response_tokens_mean": _mean(lengths) if lengths else None,
        "truncated_fraction": sum(r.sampled_truncated for r in results) / samples if samples else None,
    }


def _mean(values: list[float] | list[bool] | list[int]) -> float:
    return float(sum(values)) / max(len(values), 1)


def table(report: dict[str, Any]) -> str:
    """The report's figures as an aligned two-column text table (what `rlq eval` prints without --json)."""
    figures = report["figures"]
    n = figures["samples_per_problem"]
    rows = [("model", report["model"]), ("data", report["data"]), ("problems", str(figures["problems"]))]
    if figures["greedy_accuracy"] is not None:
        rows.append(("greedy accuracy", f"{figures['greedy_accuracy']:.4f}"))
    if n:
        rows.append((f"mean@{n}", f"{figures['mean@k']:.4f}"))
        rows += [(f"pass@{k}", f"{v:.4f}") for k, v in figures["pass@k"].items()]
        rows.append(("truncated", f"{figures['truncated_fraction']:.4f}"))
    rows.append(("seconds", f"{report['seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if n:
        lines.append(f"pass@k: {ESTIMATOR}, n={n}")
    return "\n".join(lines)
