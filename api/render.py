"""Readable tables for plans (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stgs.plan import Partition, Plan
from stgs.scenario import Scenario


def _where(p: Partition) -> str:
    if p.kind == "full":
        return "whole GPU"
    if p.kind == "mig":
        return f"MIG {p.mig_profile} @{p.mig_start}"
    if p.mig_profile:
        return f"MIG {p.mig_profile} @{p.mig_start} / MPS {p.mps_pct}%"
    return f"MPS {p.mps_pct}%"


def render_plan(plan: Plan, scenario: Scenario, console: Console | None = None) -> None:
    con = console or Console()
    if not con.is_terminal:
        con = Console(width=170)
    slo = {m.name: m.slo_ms for m in scenario.models}
    head = f"policy {plan.policy} · {'feasible' if plan.feasible else 'INFEASIBLE'}"
    head += f" · {plan.gpus_used}/{len(plan.gpus)} GPUs used"
    if plan.k is not None:
        head += f" · peak k = {plan.k:.3f}"
        bound = plan.info.get("fluid_bound_k")
        if bound:
            head += f" (fluid bound {bound:.3f}, {plan.k / bound:.0%})"
    if "solve_ms" in plan.info:
        head += f" · solved in {plan.info['solve_ms']:.0f} ms"
    t = Table(title=head, show_lines=False)
    for col in (
        "GPU",
        "mode",
        "partition",
        "SMs",
        "cycle ms",
        "model",
        "batch",
        "rate/s",
        "batch ms",
        "worst ms",
        "SLO ms",
    ):
        t.add_column(
            col, justify="left" if col in ("GPU", "mode", "partition", "model") else "right"
        )
    for g in plan.gpus:
        if not g.partitions:
            t.add_row(f"{g.index} {g.sku}", "idle", "", "", "", "", "", "", "", "", "")
            continue
        for pi, p in enumerate(g.partitions):
            for mi, m in enumerate(p.models):
                first = mi == 0
                t.add_row(
                    f"{g.index} {g.sku}" if pi == 0 and first else "",
                    g.mode if pi == 0 and first else "",
                    _where(p) if first else "",
                    str(p.sm_count) if first else "",
                    f"{p.duty_cycle_ms:.1f}" if first else "",
                    m.name,
                    str(m.batch),
                    f"{m.rate_rps:.0f}",
                    f"{m.latency_ms:.2f}",
                    f"{p.duty_cycle_ms + m.latency_ms:.1f}",
                    f"{slo.get(m.name, float('nan')):g}",
                )
    con.print(t)
    for u in plan.unserved:
        con.print(f"[red]unserved[/red] {u.name}: {u.rate_rps:.1f} req/s: {u.reason}")
    changes = plan.info.get("changes")
    if isinstance(changes, dict):
        con.print(
            "changes vs current plan: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v if not isinstance(v, list) else len(v)}"
                for k, v in changes.items()
            )
        )
