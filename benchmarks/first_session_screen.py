"""Screen of the first-session prior (`mtkernels.cold_start.FirstSessionPrior`) on pseudo-cold users only.

    python -m benchmarks.first_session_screen [--folds 5] [--threads 1] [--out FILE]

Per fold f of `pseudo_cold_ml100k(folds=K, fold=f)` (a fifth of the warm users held out of
training, ranked over the whole catalogue against their whole training history, request time =
their first training timestamp; their rows are not in the fold's training rows the priors count):
the gender x age `ItemPrior` (`RECOMMENDED`'s groups, L2 and epochs, seed f), the time-aware
`RecentPopularityPrior` (half-life 10 days, mix 0.1: the recipe the first-session prior was
screened against, `TIME_AWARE`) and first-session priors over a small
grid (session length D, half-life, mix) are fitted on the fold's train split; each cold user's
score is ``a * log P(item | side) + b * log P(item | t0) + c * log P_first(item | t0)`` (shares
a + b + c = 1, the priors alone: `ColdStartModel` weight 1, the recipe's weight). No test split is
loaded. The table lists the best grid points by mean pseudo-cold NDCG@10 over the folds, with each
one's per-user difference to the time-aware recipe (0.5 gender x age + 0.5 time-aware), paired
over all held-out users.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch

from mtkernels import ops
from mtkernels.cold_start import (PSEUDO_COLD_SPLIT, RECOMMENDED, first_session_prior_for, fit_item_prior,
                                  item_prior_for, pseudo_cold_ml100k, recent_popularity_prior_for, request_times)
from mtkernels.data.movielens import read_movielens_100k
from mtkernels.transfer import select_tasks

from benchmarks.transfer_experiments import publish

SESSION_DAYS = (0.1, 1.0, 7.0)
HALF_LIVES = (7.0, 14.0, 30.0)
MIXES = (0.1, 0.3)
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP = 20
# the recipe before the first-session prior: 0.5 gender x age prior + 0.5 this time-aware prior (half-life, mix)
TIME_AWARE = (10.0, 0.1)
BASELINE = (0.5, 0.5, 0.0, None)  # shares (gender x age, time-aware, first-session), no first-session prior


def _per_user(log_prior: torch.Tensor, relevant: torch.Tensor):
    """Per user: NDCG@10 and Recall@10 (PROTOCOL.md §5, whole catalogue, ties by item id) of the
    ranking by ``log_prior`` ``[U, N]`` against the boolean relevance ``[U, N]``; the score passes
    through the sigmoid in float32 as `ColdStartModel` weight 1 computes it."""
    score = torch.sigmoid(log_prior.double()).float()
    _, top = ops.ensemble_topk(score.unsqueeze(0).contiguous(), torch.ones(1), 10)
    hits = relevant.gather(1, top.long()).double()
    discount = 1.0 / torch.log2(torch.arange(2, 12, dtype=torch.float64))
    count = relevant.sum(1)
    ideal = torch.cumsum(discount, 0)[count.clamp(max=10) - 1]
    return (hits * discount).sum(1) / ideal, hits.sum(1) / count


def _name(a: float, b: float, c: float, first) -> str:
    parts = []
    if a:
        parts.append(f"{a:g} gender x age")
    if b:
        parts.append(f"{b:g} time-aware ({TIME_AWARE[0]:g} d)")
    if c:
        d, h, m = first
        parts.append(f"{c:g} first-session (D {d:g} d, half-life {h:g} d, mix {m:g})")
    return " + ".join(parts)


def screen(folds: int, log) -> str:
    movielens = read_movielens_100k()
    firsts = list(itertools.product(SESSION_DAYS, HALF_LIVES, MIXES))
    shares = [(a, b, round(1.0 - a - b, 2)) for a in SHARES for b in SHARES if a + b <= 1.0 + 1e-9]
    results = {}
    for f in range(folds):
        data = select_tasks(pseudo_cold_ml100k(movielens=movielens, folds=folds, fold=f), ["click"])
        ev = data.topk_eval(PSEUDO_COLD_SPLIT)
        log_n = math.log(data.num_items)
        prior = fit_item_prior(item_prior_for(data, RECOMMENDED["features"]), data, l2=RECOMMENDED["l2"],
                               epochs=RECOMMENDED["epochs"], seed=f)
        at = request_times(data, PSEUDO_COLD_SPLIT)[ev.users]
        with torch.no_grad():
            side = prior(data.user_feature_rows(users=ev.users).sparse) + log_n
        recent = recent_popularity_prior_for(data, *TIME_AWARE)(at) + log_n
        assert ev.exclude_indices.numel() == 0  # pseudo-cold ranks the whole catalogue
        relevant = torch.zeros(len(ev), data.num_items, dtype=torch.bool)
        counts = ev.relevant_offsets[1:] - ev.relevant_offsets[:-1]
        relevant[torch.arange(len(ev)).repeat_interleave(counts), ev.relevant_indices.long()] = True
        for first in [None] + firsts:
            term = None if first is None else first_session_prior_for(data, first[1], first[2], first[0])(at) + log_n
            for a, b, c in shares:
                if (c > 0) != (first is not None):
                    continue
                log_prior = a * side + b * recent + (c * term if c > 0 else 0.0)
                ndcg, recall = _per_user(log_prior, relevant)
                key = (a, b, c, first if c > 0 else None)
                results.setdefault(key, {"ndcg": [], "recall": [], "users": []})
                results[key]["ndcg"].append(float(ndcg.mean()))
                results[key]["recall"].append(float(recall.mean()))
                results[key]["users"].append(ndcg)
        best = max(results, key=lambda k: results[k]["ndcg"][-1])
        log(f"fold {f}: {len(ev)} users; best NDCG@10 {results[best]['ndcg'][-1]:.4f} at {_name(*best)}; "
            f"time-aware recipe {results[BASELINE]['ndcg'][-1]:.4f}")
    order = sorted(results, key=lambda k: -statistics.mean(results[k]["ndcg"]))
    recipe = torch.cat(results[BASELINE]["users"])
    shown = order[:TOP] + [k for k in order[TOP:] if k == BASELINE or 1.0 in k[:3]]
    lines = [f"**First-session prior screen: priors alone on {folds} pseudo-cold folds (mean ± std over the folds); "
             f"session length D {SESSION_DAYS} days, half-life {HALF_LIVES} days, mix {MIXES}, shares {SHARES}; "
             f"the best {TOP} of {len(order)} points, then the time-aware recipe and each prior alone; paired "
             f"difference: per-user NDCG@10 minus the time-aware recipe's, mean ± standard error over all users**", "",
             "| cold-user score (log-prior shares) | pseudo-cold NDCG@10 | pseudo-cold Recall@10 | paired Δ NDCG@10 |",
             "|---|---|---|---|"]
    for k in shown:
        diff = torch.cat(results[k]["users"]) - recipe
        paired = f"{float(diff.mean()):+.4f} ± {float(diff.std() / math.sqrt(diff.numel())):.4f}"
        n, r = results[k]["ndcg"], results[k]["recall"]
        mark = " (time-aware recipe)" if k == BASELINE else ""
        lines.append(f"| {_name(*k)}{mark} | {statistics.mean(n):.4f} ± {statistics.stdev(n):.4f} | "
                     f"{statistics.mean(r):.4f} ± {statistics.stdev(r):.4f} | {paired} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the table here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    table = screen(args.folds, lambda line: print(line, flush=True))
    publish("First-session prior screen (issue 7)",
            f"python -m benchmarks.first_session_screen --folds {args.folds} --threads {args.threads}",
            args.threads, started, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
