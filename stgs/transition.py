"""Plan transitions: what a plan change keeps, restarts, starts and stops, and the ordered steps
that carry it out. Pure: no backend, no processes, no clock.

The runtime carries the steps out (:meth:`stgs.runtime.Runtime.apply`), the simulator costs them
(``partitioner.sim.engine``: seconds per MIG and MPS step, worker starts, drains) and the
planner scores them (``partitioner.replan``: partitions started and stopped, GPUs that must
break first). One function, :func:`transition`, decides for all three.

**Identity** (:class:`PartitionKey`, the one definition): a partition is its GPU, its kind, its
MIG placement (profile and start slice), its MPS share and its models with their batches, in
plan order; an ordinal tells identical partitions of one GPU apart. **Restart rule**: two
partitions with the same key are the same worker, kept in place; anything in the key that
differs restarts it (a new worker beside the old one, the old one drained and stopped):

* restart: the model set or order, a batch, the MPS share, the MIG profile or start, the kind,
  the GPU;
* in place (``reweight``): the rates the plan assigns (routing weights), the predicted batch
  latencies (hang detection reads them) and the duty cycle (recorded: a running worker keeps the
  duty cycle it started with, its next restart takes the new one). A partition whose target
  entry is the same in every field is ``keep``.

**Steps**, in the order the runtime must do them (each step names its ``phase``):

1. ``keep`` / ``reweight`` every partition whose key the node runs live (ready or starting).
2. ``break``, per GPU of the target that has partitions, in plan order: a MIG mode change
   drains and stops every old partition of the GPU first (``route``, ``drain``, ``stop``, then
   ``mps_stop`` for daemons left without clients), destroys its instances (``mig_layout`` to
   none), switches the mode (``mig_mode``) and creates the new layout (``mig_layout``). Same
   mode with MIG on: new instances whose slices are free are created beside the old ones (make
   before break, one ``mig_layout``); where they are not, only the old instances in the way
   (those whose memory slices the new ones need, or all the old ones no longer wanted when the
   compute slices or counts still do not fit) are drained, stopped and destroyed first, then the
   new ones created (one ``mig_layout``: destroy, then create, atomic on the node). A GPU
   without MIG never breaks (MPS shares may add up to more than 100% for the overlap: a share
   is a limit, not a reservation). A GPU the target leaves idle keeps its mode, and its old
   partitions serve until the new ones are ready.
3. ``start``: ``mps_start`` for every MPS daemon a new partition needs (``running``: the node
   runs it already, nothing to do or to cost), then ``start`` every new worker, then ``ready``
   (every new worker must become ready).
4. ``switch``: ``route`` (routers elsewhere stop sending to the leaving partitions), then
   ``drain`` and ``stop`` every old partition not kept.
5. ``free``: ``mps_stop`` for the daemons left without clients, then ``mig_layout`` of every
   MIG GPU of the target that uses MIG or is idle: the instances no longer used are destroyed.

**Disagreements resolved** (three copies decided this before; the runtime's rule won, as it is
what happens on the machine):

* MPS shares over 100%: the planner counted a GPU whose kept, removed and added MPS shares add
  up to more than 100% (whole GPU or inside a kept MIG instance) as one that must stop first;
  the runtime starts the new MPS workers beside the old ones. Now no GPU without a MIG change
  breaks first, and the planner scores it so.
* What is the same partition: the planner compared shape and place only (a batch change cost
  nothing), the runtime restarts a worker whose models or batches change. Now the planner
  counts such a change as one partition stopped and one started.
* MIG instances destroyed: the simulator charged the destroy of instances it had already
  destroyed while breaking first a second time at the end, and charged GPUs the target does not
  list, which the runtime never touches. Now each destroy is costed once, where the runtime does
  it. The simulator also tracks each GPU's MIG mode across plans (:class:`NodeState`), as the
  node keeps it, instead of reading it from the previous plan alone.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from stgs.catalog import MigLayout, MigPlacement, canonical_layout, get_sku, layout_violation
from stgs.plan import GpuPlan, Partition, Plan

__all__ = [
    "GpuState",
    "Held",
    "NodeState",
    "PartitionKey",
    "Ref",
    "Step",
    "Transition",
    "gpu_layout",
    "node_state_of",
    "partition_keys",
    "transition",
]

Ref = tuple[int, int | None]
"""Where a worker runs: (GPU, MIG start slice or None); one MPS daemon per ref."""

Op = Literal[
    "keep",
    "reweight",
    "route",
    "drain",
    "stop",
    "mps_stop",
    "mig_layout",
    "mig_mode",
    "mps_start",
    "start",
    "ready",
]
Phase = Literal["keep", "break", "start", "switch", "free"]
HeldState = Literal["live", "down", "stopped"]


@dataclass(frozen=True, order=True)
class PartitionKey:
    """What makes two partitions the same worker: GPU, shape, place, models and batches."""

    gpu: int
    kind: str
    mig_profile: str | None
    mig_start: int | None
    mps_pct: int | None
    models: tuple[tuple[str, int], ...]
    ordinal: int = 0  # tells identical partitions of one GPU apart

    @property
    def ref(self) -> Ref:
        return (self.gpu, self.mig_start)

    @property
    def slot(self) -> tuple[int, str, str | None, int | None]:
        """GPU, kind and MIG instance: a partition replaced in the same slot (another share,
        batch or model set) is a worker restart."""
        return (self.gpu, self.kind, self.mig_profile, self.mig_start)

    @property
    def place(self) -> tuple[int, str, str | None, int | None, int | None]:
        """GPU, shape and place, without the models: where a model is served."""
        return (self.gpu, self.kind, self.mig_profile, self.mig_start, self.mps_pct)

    def __str__(self) -> str:
        place = "" if self.mig_start is None else f" {self.mig_profile}@{self.mig_start}"
        share = "" if self.mps_pct is None else f" mps{self.mps_pct}%"
        models = ",".join(f"{m}x{b}" for m, b in self.models)
        suffix = f"#{self.ordinal}" if self.ordinal else ""
        return f"gpu{self.gpu} {self.kind}{place}{share} [{models}]{suffix}"

    @property
    def short_id(self) -> str:
        """A short name of the partition, unique on its GPU, for metrics labels: its MIG place
        or kind, then 6 hex digits of a hash of the whole key (``mps-1a2b3c``,
        ``3g.40gb@4-9f00e1``, ``3g.40gb@4-mps-77ab10``). Like the key, it stays the same when a
        re-plan changes only rates (``reweight``) and changes when the worker is replaced."""
        digest = hashlib.blake2s(repr(self).encode(), digest_size=3).hexdigest()
        parts = [] if self.mig_start is None else [f"{self.mig_profile}@{self.mig_start}"]
        if self.kind != "mig":
            parts.append(self.kind)
        return "-".join([*parts, digest])


def partition_keys(plan: Plan) -> dict[PartitionKey, tuple[GpuPlan, Partition]]:
    """Every partition of ``plan`` by its key, in plan order."""
    out: dict[PartitionKey, tuple[GpuPlan, Partition]] = {}
    seen: Counter[PartitionKey] = Counter()
    for g, p in plan.partitions():
        base = PartitionKey(
            g.index,
            p.kind,
            p.mig_profile,
            p.mig_start,
            p.mps_pct,
            tuple((m.name, m.batch) for m in p.models),
        )
        key = replace(base, ordinal=seen[base])
        seen[base] += 1
        out[key] = (g, p)
    return out


def gpu_layout(g: GpuPlan) -> MigLayout:
    """The MIG instances a GPU's plan uses (none without MIG)."""
    if not g.mig:
        return ()
    starts = {
        p.mig_start: p.mig_profile
        for p in g.partitions
        if p.mig_start is not None and p.mig_profile
    }
    return canonical_layout(MigPlacement(s, prof) for s, prof in starts.items())


# ------------------------------------------------------------------------------ node state
@dataclass(frozen=True)
class GpuState:
    """One GPU's MIG mode and instances. ``mig`` None: not known (a GPU no plan has used yet,
    to the planner and the simulator): taken to be in the mode its next plan wants."""

    mig: bool | None
    layout: MigLayout = ()


@dataclass(frozen=True)
class NodeState:
    """What the node runs besides the workers: per GPU its MIG state, and the MPS daemons."""

    gpus: Mapping[int, GpuState] = field(default_factory=dict)
    mps: frozenset[Ref] = frozenset()


def node_state_of(plan: Plan) -> NodeState:
    """The node as a plan leaves it, for the planner and the simulator: each GPU that serves in
    the plan is in the plan's mode with its instances; an idle GPU's mode is not known."""
    gpus = {
        g.index: GpuState(g.mig, gpu_layout(g)) if g.partitions else GpuState(None)
        for g in plan.gpus
    }
    mps = frozenset(k.ref for k in partition_keys(plan) if k.kind == "mps")
    return NodeState(gpus, mps)


@dataclass(frozen=True)
class Held:
    """A partition the node holds now. ``state``: ``live`` (ready or starting: may be kept),
    ``down`` (failed or not started: replaced, its record stopped), ``stopped`` (only
    forgotten)."""

    partition: Partition
    state: HeldState = "live"


# ------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Step:
    """One thing the runtime does; see the module docstring for the order."""

    op: Op
    phase: Phase
    gpu: int | None = None
    key: PartitionKey | None = None
    partition: Partition | None = None  # keep, reweight, start: the target's entry
    leaving: frozenset[PartitionKey] = frozenset()  # route: the partitions about to drain
    ref: Ref | None = None  # mps_start, mps_stop, start
    running: bool = False  # mps_start: the daemon runs already
    layout: MigLayout = ()  # mig_layout: the GPU's instances after the step
    destroy: MigLayout = ()  # mig_layout: the instances it destroys, first
    create: MigLayout = ()  # mig_layout: then the ones it creates
    mig: bool | None = None  # mig_mode: the new mode

    def __str__(self) -> str:
        what = {
            "route": f"{len(self.leaving)} leaving",
            "mps_start": f"{self.ref}{' (running)' if self.running else ''}",
            "mps_stop": str(self.ref),
            "mig_layout": f"gpu{self.gpu} -{len(self.destroy)} +{len(self.create)}",
            "mig_mode": f"gpu{self.gpu} {'on' if self.mig else 'off'}",
        }.get(self.op, "" if self.key is None else str(self.key))
        return f"{self.phase}:{self.op} {what}".rstrip()


@dataclass(frozen=True)
class Transition:
    """The ordered steps from one plan to another, and the node state after them."""

    steps: tuple[Step, ...]
    node: NodeState

    def _keys(self, *ops: Op, phase: Phase | None = None) -> tuple[PartitionKey, ...]:
        return tuple(
            s.key
            for s in self.steps
            if s.op in ops and s.key is not None and (phase is None or s.phase == phase)
        )

    @property
    def kept(self) -> tuple[PartitionKey, ...]:
        """Kept in place (``keep`` and ``reweight``), in target order."""
        return self._keys("keep", "reweight")

    @property
    def reweighted(self) -> tuple[PartitionKey, ...]:
        return self._keys("reweight")

    @property
    def started(self) -> tuple[PartitionKey, ...]:
        return self._keys("start")

    @property
    def stopped(self) -> tuple[PartitionKey, ...]:
        """Every partition stopped (those that break first come first)."""
        return self._keys("stop")

    @property
    def early(self) -> tuple[PartitionKey, ...]:
        """Stopped before the new partitions are ready (break first)."""
        return self._keys("stop", phase="break")

    @property
    def restarted(self) -> frozenset[tuple[object, ...]]:
        """Slots (:attr:`PartitionKey.slot`) whose worker is replaced: stopped and started."""
        return frozenset(k.slot for k in self.started) & frozenset(k.slot for k in self.stopped)

    @property
    def disrupted(self) -> tuple[int, ...]:
        """GPUs that stop serving partitions before their new ones are ready."""
        return tuple(sorted({k.gpu for k in self.early}))

    @property
    def mode_changed(self) -> tuple[int, ...]:
        return tuple(s.gpu for s in self.steps if s.op == "mig_mode" and s.gpu is not None)

    @property
    def changes(self) -> bool:
        """Anything started or stopped (else only routing weights change)."""
        return any(s.op in ("start", "stop") for s in self.steps)


def _slices(sku_name: str, pl: MigPlacement) -> set[int]:
    prof = get_sku(sku_name).mig_profile(pl.profile)
    return set(range(pl.start, pl.start + int(prof.memory_slices)))


def transition(
    current: Plan | Mapping[PartitionKey, Held],
    target: Plan,
    node: NodeState | None = None,
) -> Transition:
    """The steps from ``current`` (a plan, every partition live, or the node's records by key,
    in the order they were made) to ``target`` on a node in state ``node`` (default: as
    ``current`` leaves it, :func:`node_state_of`). ``target`` is taken to be valid (the runtime
    checks it first)."""
    if isinstance(current, Plan):
        if node is None:
            node = node_state_of(current)
        held: Mapping[PartitionKey, Held] = {
            k: Held(p) for k, (_, p) in partition_keys(current).items()
        }
    else:
        held = current
    if node is None:
        node = NodeState()
    want = partition_keys(target)
    keep = [k for k in want if k in held and held[k].state == "live"]
    kept = set(keep)
    to_start = [k for k in want if k not in kept]
    to_stop = [k for k in held if k not in kept]
    stopped = {k for k, h in held.items() if h.state == "stopped"}
    gpus = dict(node.gpus)
    mps = set(node.mps)
    steps: list[Step] = []

    for k in keep:
        part = want[k][1]
        op: Op = "keep" if held[k].partition == part else "reweight"
        steps.append(Step(op, "keep", k.gpu, k, part))

    def in_use() -> set[Ref]:
        return {k.ref for k in held if k not in stopped and k.kind == "mps"}

    def stop_unused(phase: Phase, using: set[Ref]) -> None:
        for ref in sorted(mps - using, key=_ref_order):
            steps.append(Step("mps_stop", phase, ref[0], ref=ref))
            mps.discard(ref)

    def break_first(gpu: int, starts: set[int] | None) -> None:
        goners = [
            k
            for k in to_stop
            if k.gpu == gpu and k not in stopped and (starts is None or k.mig_start in starts)
        ]
        steps.append(Step("route", "break", gpu, leaving=frozenset(goners)))
        for k in goners:
            steps.append(Step("drain", "break", gpu, k))
            steps.append(Step("stop", "break", gpu, k))
            stopped.add(k)
        stop_unused("break", in_use())

    def set_layout(phase: Phase, gpu: int, layout: Iterable[MigPlacement]) -> None:
        now = gpus[gpu].layout
        after = canonical_layout(layout)
        destroy = tuple(pl for pl in now if pl not in after)
        create = tuple(pl for pl in after if pl not in now)
        steps.append(Step("mig_layout", phase, gpu, layout=after, destroy=destroy, create=create))
        gpus[gpu] = replace(gpus[gpu], layout=after)

    # 2. MIG: mode changes and instances whose slices are taken break first.
    for g in target.gpus:
        if not g.partitions:
            continue  # keeps its mode; its old partitions serve until the new ones are ready
        state = gpus.get(g.index, GpuState(None))
        if state.mig is None:
            state = GpuState(g.mig, state.layout)
        gpus[g.index] = state
        layout = gpu_layout(g)
        if state.mig != g.mig:
            break_first(g.index, None)
            if state.mig:
                set_layout("break", g.index, ())
            steps.append(Step("mig_mode", "break", g.index, mig=g.mig))
            gpus[g.index] = GpuState(g.mig, ())
            if g.mig:
                set_layout("break", g.index, layout)
            continue
        if not state.mig:
            continue
        have = state.layout
        new = [pl for pl in layout if pl not in have]
        if not new:
            continue
        sku = get_sku(g.sku)
        if layout_violation(sku, canonical_layout([*have, *new])) is None:
            set_layout("break", g.index, [*have, *new])  # make before break
            continue
        goners = [pl for pl in have if pl not in layout]
        taken = set().union(*(_slices(g.sku, pl) for pl in new))
        blocking = {pl.start for pl in goners if taken & _slices(g.sku, pl)}
        rest = [pl for pl in have if pl.start not in blocking]
        if layout_violation(sku, canonical_layout([*rest, *new])) is not None:
            blocking = {pl.start for pl in goners}
            rest = [pl for pl in have if pl.start not in blocking]
        break_first(g.index, blocking)
        set_layout("break", g.index, [*rest, *new])

    # 3. MPS daemons for the new MPS partitions, then the new workers.
    for k in to_start:
        if k.kind == "mps" and not any(s.op == "mps_start" and s.ref == k.ref for s in steps):
            steps.append(Step("mps_start", "start", k.gpu, ref=k.ref, running=k.ref in mps))
            mps.add(k.ref)
    for k in to_start:
        steps.append(Step("start", "start", k.gpu, k, want[k][1], ref=_worker_ref(want[k][0], k)))
    if to_start:
        steps.append(Step("ready", "start"))

    # 4. Routers move to the new partitions; the old ones drain and stop.
    leaving = [k for k in to_stop if k not in stopped]
    steps.append(Step("route", "switch", leaving=frozenset(leaving)))
    for k in leaving:
        steps.append(Step("drain", "switch", k.gpu, k))
        steps.append(Step("stop", "switch", k.gpu, k))

    # 5. Free the daemons and instances no longer used.
    stop_unused("free", {k.ref for k in [*keep, *to_start] if k.kind == "mps"})
    for g in target.gpus:
        state = gpus.get(g.index, GpuState(None))
        if state.mig and (g.mig or not g.partitions):
            set_layout("free", g.index, gpu_layout(g))
    return Transition(tuple(steps), NodeState(gpus, frozenset(mps)))


def _worker_ref(g: GpuPlan, k: PartitionKey) -> Ref:
    return (g.index, k.mig_start if g.mig else None)


def _ref_order(ref: Ref) -> tuple[int, int]:
    """DeviceRef's order: by GPU, then MIG start (None first)."""
    return (ref[0], -1 if ref[1] is None else ref[1])
