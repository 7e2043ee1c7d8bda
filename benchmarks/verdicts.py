"""The results table's statistics: t-intervals, Welch's t-test, Holm–Bonferroni, and the
papers' claims as each paper states them (benchmarks/results.py writes them).

A claim "A > B" is one two-sided Welch t-test (``scipy.stats.ttest_ind(equal_var=False)``)
on the per-seed TEST accuracies; a claim with several links ("the gap shrinks as M, N
grow": (5,5) > (3,3) and (3,3) > (1,1)) is one test per link. Every link of every claim
of a table is one family, corrected with Holm–Bonferroni (:func:`holm`): the verdict of a
link reads its adjusted p at ALPHA. A link is *reproduced* when A's mean is higher with
adjusted p < ALPHA, *not reproduced* when B's is higher with adjusted p < ALPHA, *not
resolved* otherwise; a claim is reproduced when all its links are, not reproduced when
any is.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

#: Family-wise significance level of each table's claim tests (Holm–Bonferroni).
ALPHA = 0.05

DUO_MATCHED = "method=duo_binary,epochs_match=binaryduo"
#: A reference to BinaryDuo's coupled ternary network (before fine-tuning) in a claim.
DUO_COUPLED = "method=binaryduo#coupled"

IRNET = ("Qin et al. CVPR 2020, Table 2: on CIFAR-10, VGG-Small 1/1, IR-Net (90.4%, also in the official "
         "README, htqin/IR-Net f63a590 README.md:37) is above both BNN and XNOR-Net")
BINARYDUO = ("Kim et al. ICLR 2020, abstract: BinaryDuo \"outperforms state-of-the-art BNNs [...] with the "
             "same amount of parameters and computing cost\"")
ABC = ("Lin et al. NIPS 2017, its ImageNet ResNet-18 table over M and N: top-1 rises with M and N, 42.7% at M = N = 1 "
       "to 65.0% at M = N = 5 (full precision 69.3%)")
SB = ("Lahoud & Achanta 2019, abstract: self-binarizing networks \"show higher classification accuracy than "
      "existing state-of-the-art methods\"; tested against the table's classic 1/1 networks")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim: ``links`` are ``(higher, lower)`` row references that must all hold."""

    text: str
    source: str
    links: tuple[tuple[str, str], ...]


CLAIMS = (
    Claim("IR-Net > XNOR-Net", IRNET, (("method=irnet", "method=xnor"),)),
    Claim("IR-Net > BNN", IRNET, (("method=irnet", "method=bnn"),)),
    Claim("BinaryDuo > the plain binary network at the same cost and the same total epochs", BINARYDUO,
          (("method=binaryduo", DUO_MATCHED),)),
    Claim("BinaryDuo's coupled network (before fine-tuning) > the plain binary network at the same cost and "
          "the same epochs", BINARYDUO, ((DUO_COUPLED, "method=duo_binary"),)),
    Claim("ABC-Net's gap to full precision shrinks as M, N grow", ABC,
          (("method=abc,m=5,n=5", "method=abc,m=3,n=3"), ("method=abc,m=3,n=3", "method=abc,m=1,n=1"))),
    Claim("Self-Binarizing > BNN at the same cost", SB, (("method=sb", "method=bnn"),)),
    Claim("Self-Binarizing > XNOR-Net at the same cost", SB, (("method=sb", "method=xnor"),)),
)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval at ``level``); half-width NaN for n < 2."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) - mean(b), two-sided Welch p); p NaN with fewer than 2 values on a side or
    both sides constant."""
    from scipy import stats

    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    return diff, float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order (NaN stays NaN, outside the family).

    With the m valid p-values sorted ascending, p(1) <= ... <= p(m), the i-th is adjusted to
    ``max over j <= i of min(1, (m - j + 1) p(j))``; rejecting where the adjusted p < alpha
    is Holm's step-down procedure at family-wise error rate alpha.
    """
    valid = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(valid)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(diff: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """One link "A > B" from A − B and its adjusted p."""
    if math.isnan(p_adjusted) or p_adjusted >= alpha:
        return "not resolved"
    return "reproduced" if diff > 0 else "not reproduced"


def claim_verdict(links: list[str]) -> str:
    """A claim's links: reproduced if all are, not reproduced if any is not."""
    if "not reproduced" in links:
        return "not reproduced"
    return "reproduced" if links and all(v == "reproduced" for v in links) else "not resolved"


def _p_text(p: float, p_adj: float, a: list, b: list) -> str:
    if len(a) < 2 or len(b) < 2:
        return f"no test with n = {len(a)} and {len(b)}"
    if math.isnan(p):
        return "no test: both rows constant"
    return f"p = {p:.3g}, Holm-adjusted p = {p_adj:.3g}"


def evaluate_claims(values: dict[str, list[float]], claims=CLAIMS, alpha: float = ALPHA) -> list[dict]:
    """Every claim's links with difference, raw and adjusted p and verdict, and the claim's
    verdict; ``values`` maps a row reference to its per-seed test accuracies (in %).
    Claims with a missing row get no test and are left out of the family."""
    tests = []
    for claim in claims:
        for hi, lo in claim.links:
            if values.get(hi) and values.get(lo):
                tests.append((hi, lo, *welch(values[hi], values[lo])))
    adjusted = holm([t[3] for t in tests])
    by_link = {(hi, lo): (diff, p, adj) for (hi, lo, diff, p), adj in zip(tests, adjusted)}
    out = []
    for claim in claims:
        links = []
        for hi, lo in claim.links:
            if (hi, lo) not in by_link:
                links = None
                break
            diff, p, adj = by_link[(hi, lo)]
            links.append(dict(hi=hi, lo=lo, diff=diff, p=p, p_adjusted=adj, verdict=verdict(diff, adj, alpha),
                              text=_p_text(p, adj, values[hi], values[lo])))
        out.append(dict(claim=claim, links=links,
                        verdict="not resolved" if links is None else claim_verdict([l["verdict"] for l in links])))
    return out


def rule_text(family_size: int, alpha: float = ALPHA) -> str:
    """The verdicts' rule, stated once above them."""
    return (
        f"Each link \"A > B\" is a two-sided Welch t-test on the per-seed TEST accuracies. The {family_size} tests "
        "of this table are one family, corrected with Holm–Bonferroni: with the m p-values sorted ascending, "
        "the i-th is multiplied by m − i + 1, then each takes the largest value so far (capped at 1). A link is "
        f"reproduced when A is higher with adjusted p < {alpha}, not reproduced when B is higher with adjusted "
        f"p < {alpha}, not resolved otherwise; a claim holds when all its links do. Settings were chosen on "
        "validation accuracy; the test accuracies are read only here."
    )


def verdict_lines(values: dict[str, list[float]], labels: dict[str, str], alpha: float = ALPHA) -> list[str]:
    """The verdicts section: the rule, then one bullet per claim citing its paper."""
    results = evaluate_claims(values, alpha=alpha)
    family = sum(len(r["links"]) for r in results if r["links"])
    lines = ["### Verdicts (test accuracy, Holm–Bonferroni over this table's claims)", "", rule_text(family, alpha), ""]
    for r in results:
        claim = r["claim"]
        if r["links"] is None:
            lines.append(f"- **{claim.text}: not resolved (rows missing).** {claim.source}.")
            continue
        texts = [
            f"{labels.get(l['hi'], l['hi'])} − {labels.get(l['lo'], l['lo'])} = {l['diff']:+.2f} points "
            f"({l['text']}): {l['verdict']}"
            for l in r["links"]
        ]
        lines.append(f"- **{claim.text}: {r['verdict']}.** {claim.source}. " + "; ".join(texts) + ".")
    return lines
