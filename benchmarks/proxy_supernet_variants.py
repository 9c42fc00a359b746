"""The supernet proxy's training variants against its defaults, for ``proxy_supernet.py``'s report: training
only the archs meeting a cost bound (``--feasible-share``, ``train_on: feasible``) and the sandwich rule's largest
arch (``--sandwich``), each paired with the same configuration and supernet seed trained the default way."""

from __future__ import annotations

import numpy as np
from proxy_validity_report import ceiling_draws
from scipy.stats import kendalltau

from proxies.cost import arch_costs
from search_spaces import SearchSpace


def macs_bound(space: SearchSpace, share: float, text_len: int) -> float:
    """The MACs bound a share ``share`` of ``space``'s archs meets (its ``share`` quantile, archs enumerated)."""
    macs = [arch_costs(a, batch=1, text_len=text_len).macs for a in space.enumerate()]
    return float(np.quantile(macs, share, method="inverted_cdf"))


def subset_ceiling(losses: np.ndarray, sigma: float | None) -> float | None:
    """The tau two repeats of the ground truth would reach on these archs, with its measured per-run noise of log
    loss (as ``noise_figures`` computes it for the whole table): what any proxy can reach on them."""
    return None if sigma is None else float(np.mean(ceiling_draws(np.log(losses), sigma)))


def bounded_training(proxies: dict, truth: np.ndarray, others: dict, sigma: float | None) -> dict:
    """Supernets trained under a cost bound against the unbounded ones of the same configuration and seed, both
    judged on the table archs meeting the bound (the archs a search could pick): Kendall tau against the ground
    truth restricted to them, per seed, and the paired differences; ``others`` (name -> values over the table, the
    baselines) ranked on the same archs, for scale: inside a bound the archs are closer and every ranking is
    harder."""
    out: dict = {}
    for key, row in proxies.items():
        if "feasible_share" not in row:
            continue
        base = proxies.get(key.rsplit("/feasible", 1)[0])
        if base is None:
            continue
        meets = np.array(row["feasible_of_arch"])
        tau = lambda v, meets=meets: float(kendalltau(np.array(v)[meets], truth[meets]).statistic)  # noqa: E731
        entry = out.setdefault(key.rsplit("/", 1)[1], {
            "feasible_share": row["feasible_share"], "n_feasible": int(meets.sum()),
            "feasible_macs_bound": row["feasible_macs_bound"], "schedule": row.get("bounded_schedule"),
            "arch_steps": row.get("arch_steps"), "steps": row["steps"],
            "trained_groups": row.get("trained_groups"), "groups": base["groups"], "per_seed": {},
            "others_on_these_archs": {name: tau(values) for name, values in others.items()},
            "ground_truth_tau_ceiling_on_these_archs": subset_ceiling(truth[meets], sigma)})
        entry["per_seed"][str(row["supernet_seed"])] = {
            "config": key, "kendall_tau_bounded": tau(row["values"]), "kendall_tau_unbounded": tau(base["values"]),
            "kendall_tau_bounded_shared_only": tau(row["shared_values"]),
            "kendall_tau_unbounded_shared_only": tau(base["shared_values"]),
            "supernet_seconds_bounded": row["supernet_seconds"], "supernet_seconds_unbounded": base["supernet_seconds"]}
    for entry in out.values():
        seeds = list(entry["per_seed"].values())
        diff = [s["kendall_tau_bounded"] - s["kendall_tau_unbounded"] for s in seeds]
        entry.update(seeds=len(seeds),
                     kendall_tau_bounded_mean=float(np.mean([s["kendall_tau_bounded"] for s in seeds])),
                     kendall_tau_unbounded_mean=float(np.mean([s["kendall_tau_unbounded"] for s in seeds])),
                     difference_mean=float(np.mean(diff)), difference_min=min(diff), difference_max=max(diff),
                     bounded_better_seeds=sum(d > 0 for d in diff), ties=sum(d == 0 for d in diff))
    return out


def sandwich_rule(proxies: dict) -> dict:
    """Supernets trained with the sandwich rule's largest arch (each step also trains the group's supernet on the
    same batch) against the same configuration and seed without it: Kendall tau on the whole table, per seed,
    the paired differences, and the one-time seconds of both."""
    per_seed = {}
    for key, row in proxies.items():
        base = proxies.get(key[: -len("/sandwich")]) if key.endswith("/sandwich") else None
        if base is not None:
            per_seed[key] = {"kendall_tau_sandwich": row["kendall_tau"], "kendall_tau_without": base["kendall_tau"],
                             "supernet_seconds_sandwich": row["supernet_seconds"],
                             "supernet_seconds_without": base["supernet_seconds"],
                             "cost_fraction_sandwich": row["cost_fraction_of_ground_truth"],
                             "cost_fraction_without": base["cost_fraction_of_ground_truth"]}
    if not per_seed:
        return {}
    diff = [r["kendall_tau_sandwich"] - r["kendall_tau_without"] for r in per_seed.values()]
    return {"per_config": per_seed, "seeds": len(diff), "difference_mean": float(np.mean(diff)),
            "difference_min": min(diff), "difference_max": max(diff), "sandwich_better": sum(d > 0 for d in diff),
            "ties": sum(d == 0 for d in diff)}
