"""`noesis plan`: fit, time and cost of a run before anything starts, from `noesis train`'s overrides.

The model is counted on the meta device and the data prepared as training prepares it (training then
starts from the same cache); no weights load and no GPU is needed. Exit 2 with one line when the
memory does not fit (naming the largest term and the overrides that would fit) or the estimate is over
`budget.usd`; the figures go to plan.json in the run dir unless `write=false`.
"""

from __future__ import annotations

import sys

from noesis_accel.core.cli import Command, Option, command_line, parse
from noesis_accel.core.errors import ConfigError, exit_on_user_error, redact, safe_for_pipes

PLAN_COMMAND = Command(
    name="plan",
    summary="Print whether a run fits, how long it takes and what it costs, before any GPU starts.",
    options=(
        Option("write", "write the figures to the run dir's plan.json", bool, "true", True, ("--write",)),
        Option("json", "print the plan as JSON instead of text", bool, "true", False, ("--json",)),
    ),
    run_dir=False,
    overrides="conf/, the same overrides as noesis train",
    examples=(
        "noesis plan +experiment=demo",
        "noesis plan +experiment=noesis modal.gpu=[H100:8,H200:8]",
        "noesis plan +experiment=noesis budget.usd=60",
    ),
)


@safe_for_pipes
@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`noesis plan [key=value ...] [overrides]`: print the plan; exit 2 if it does not fit or is over budget."""
    import json

    from noesis_accel.core.env import quiet_known_noise
    from noesis_accel.rundir.layout import RunDir
    from noesis_accel.training.datacli import compose_checked
    from noesis_accel.training.plan import budget_problem, fit_problem, format_plan, make_plan, write_plan

    quiet_known_noise()
    args = parse(PLAN_COMMAND, command_line(argv))
    cfg = compose_checked(args.overrides)
    plan = make_plan(cfg)
    print(redact(json.dumps(plan.to_json(), indent=2) if args.options["json"] else format_plan(plan)), flush=True)
    if args.options["write"]:
        write_plan(RunDir.of(cfg.run).path, plan)
    problem = fit_problem(plan, cfg)
    if problem:
        raise ConfigError(problem)
    over = budget_problem(plan)
    if over:
        if cfg.budget.preflight == "refuse":
            raise ConfigError(over)
        print(f"warning: {over} (budget.preflight=warn)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
