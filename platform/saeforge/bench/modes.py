"""What `saeforge bench` measures: one mode per run, chosen by at most one mode flag.

(none)           stages.py       every stage's throughput side by side (plain vs Ray)
--same-work      same_work.py    a plain loop and `saeforge train` on the same work, timed whole
--layers A,B     layers.py       one run of several layers against one run per layer
--search N       search.py       an N-trial search against its trials as separate runs
--step-cost      per_variant.py  milliseconds per optimiser step of every variant
--variants LIST  per_variant.py  a full training run per variant and a comparison table
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from saeforge.errors import UserError
from saeforge.jobs.arguments import BenchArgs, check_ranges
from saeforge.jobs.validate import hook_points, variant_names

MODE_FLAGS = {
    "same_work": "--same-work",
    "layers": "--layers",
    "search": "--search",
    "step_cost": "--step-cost",
    "variants": "--variants",
}


def chosen_mode(args: BenchArgs) -> str:
    """The one mode the flags ask for ("stages" when none does), or one line naming the flags
    given together; every mode but --layers reads one layer."""
    check_ranges(args)
    given = [name for name in MODE_FLAGS if getattr(args, name)]
    if len(given) > 1:
        flags = " and ".join(MODE_FLAGS[name] for name in given)
        raise UserError(f"{flags}: choose one of them (each is a bench of its own)")
    mode = given[0] if given else "stages"
    if mode != "layers" and len(hook_points(SimpleNamespace(layer=args.layer, site="resid_post"))) > 1:
        raise UserError(
            f"--layer {args.layer}: this bench reads one layer (--layers {args.layer} compares a run of them all)"
        )
    return mode


def runner(args: BenchArgs) -> Callable[[], object]:
    """The bench the flags ask for, checked and ready to run (its figures as a dict or list)."""
    mode = chosen_mode(args)
    if mode == "layers":
        from saeforge.bench.layers import check_layers, run_layers_bench

        check_layers(args)
        return lambda: run_layers_bench(args)
    if mode == "same_work":
        from saeforge.bench.same_work import run_same_work

        return lambda: run_same_work(args)
    if mode == "search":
        from saeforge.bench.search import run_search_bench

        return lambda: run_search_bench(args)
    from saeforge.bench import per_variant, stages

    if mode == "step_cost":
        return lambda: per_variant.run_step_costs(args)
    if mode == "variants":
        names = variant_names(args.variants, "--variants")
        return lambda: per_variant.run_variant_table(args, list(names))
    return lambda: stages.run_stages(args)
