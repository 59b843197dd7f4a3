"""What a peer takes from others is checked before it is used: the parts of every averaging round (gradients,
parameters, DiLoCo's pseudo-gradients).

hivemind 1.1.12 averages with a butterfly all-reduce: each peer of a group *reduces* one share of the flat vector
(the weighted mean of every sender's part of it, in `TensorPartReducer`) and sends each sender the difference
between that mean and the sender's part. A single peer can therefore spoil a round twice: as a sender (a NaN or
1e6x part enters a plain mean) and as a reducer (it returns whatever it likes for its share). Both are checked here:

- as a reducer, `CheckedPartReducer` refuses non-finite parts and non-finite or negative weights, and clips an
  update's part (gradients, pseudo-gradients) whose norm is above `CLIP_RATIO` times the group's scale down to that
  bound (its sender still counts, with a bounded pull: BTARD's CenteredClip without its iterations, see
  `robust_mean`); weights are capped likewise; in parameter rounds, a part farther than `PARAMETER_RADIUS` of its
  norm from this peer's own is refused;
- as a receiver, `CheckedAllReduceRunner` refuses a returned share that is non-finite or moves this peer's part by
  more than `RETURN_RATIO` times its scale (`PARAMETER_RADIUS` in parameter rounds): this peer keeps its own part
  for that share, as hivemind does when a reducer fails.

Every refusal names the sender's peer id: a warning in the log (one line per peer and round) and a record the
parent process drains (`CheckedAveraging.take_reports`) into the round records of swarm/health.py, with the share
of the vector whose reducer returned nothing (hivemind keeps this peer's own part there, and says only "received
N% results").

A peer caught sending what no honest peer sends (non-finite values or weights; in gradient rounds, a part or an
average more than FLAGRANT_RATIO times the group's scale) is *quarantined*: this peer's averagers (all of them:
`QuarantineBoard`) neither lead it, nor follow it, nor run a round in a group that holds it, for QUARANTINE_PERIOD
seconds (doubled on each repeat). Refusing its parts alone is not enough: the share it reduces in each round stays
unaveraged, and the honest peers drift apart on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import queue
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AsyncIterator  # noqa: UP035 (hivemind reads typing.AsyncIterator in RPC annotations)

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.control import StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aenumerate

from sdswarm.swarm.admission import GatedRPCs
from sdswarm.swarm.round_tensors import RoundTensors

log = logging.getLogger(__name__)

CLIP_RATIO = 4.0  # a part may be this many times the group's scale (honest gradient parts differ by ~2x at most)
WEIGHT_RATIO = 8.0  # a sender's weight (its samples) may be this many times the group's (batch sizes differ)
# an average a reducer returns may move this peer's part by at most this many times its size. Loose on purpose:
# refusing an honest average splits the swarm (this peer keeps its own part for that share), and honest updates
# differ by the peers' local work (a DiLoCo peer that just downloaded the state sends an update near zero, and
# returned averages were measured far beyond 9x its norm); what this catches is an absurd or non-finite average
RETURN_RATIO = 1000.0
# weights (parameter rounds): a part farther than this many times its norm from the reducer's own is refused
# (clipping would let a liar drag them round by round). Not tighter: honest peers' parts of a small, fast-moving
# model (the tiny one, lr 1e-3) were measured 0.2-0.7x apart after failed gradient rounds, and refusing them stops
# the very averaging that brings drifted peers back together. The same bound as a downloaded state's.
PARAMETER_RADIUS = 2.0
# no honest gradient part or average is this many times the group's scale (each is a mean gradient): its sender is
# quarantined. Not in DiLoCo's outer rounds: a peer that just downloaded the state sends an update near zero
FLAGRANT_RATIO = RETURN_RATIO
# seconds a flagrant peer stays out of this averager's groups, doubled on each repeat: not for good, as a peer is
# quarantined on this one peer's word (bans, swarm/admission.py, are the swarm owner's)
QUARANTINE_PERIOD = 300.0


@dataclass(frozen=True)
class Action:
    """What a reducer did to one sender's part: refused it (not averaged) or clipped it; `flagrant` when no honest
    peer could have sent that part (its sender is quarantined)."""

    text: str
    flagrant: bool = False

    @property
    def refused(self) -> bool:
        return self.text.startswith("refused")

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Refusal:
    """Parts of one sender in one averaging round that were refused (not averaged) or clipped."""

    sender: str  # its peer id
    role: str  # "sender": its parts to this peer's reducer; "reducer": the averages it returned
    refused: int
    clipped: int
    reason: str
    flagrant: bool = False  # what no honest peer sends: the sender is quarantined


@dataclass(frozen=True)
class Missing:
    """The share of one round's vector that no reducer returned (it failed or left): this peer kept its own part."""

    fraction: float


def norm_of(tensor: torch.Tensor) -> float:
    return float(tensor.double().norm())


def lower_median(values: Sequence[float]) -> float:
    """The median, or the lower of the two middle values: a single inflated value never raises it."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def robust_mean(parts: Sequence[torch.Tensor], weights: Sequence[float], *, own: int | None,
                kind: str = "gradients") -> tuple[torch.Tensor | None, list[Action | None]]:
    """The weighted mean of finite parts after clipping, and for each part what was done to it (None, or an Action:
    "refused: why", "clipped: why").

    The scale is the lower median of the parts' norms, and never below this peer's own part (`own`, which it
    trusts): with 2 or 3 peers a median alone is whatever the lone other peer says, and the lower median of two
    is the smaller, so a sender that sends zeros cannot make this peer clip its own honest part. A part longer
    than CLIP_RATIO x scale is scaled down to it (kept, with a bounded pull on the mean) rather than dropped:
    honest parts are noisy, and a hard cut would drop the unlucky ones. Clipping is around zero, not around an
    iterated centre as in CenteredClip: with 2 senders CenteredClip converges to their midpoint, and with 3 its centre
    is what the outlier moves; the bound is what matters. Weights are capped the same way (WEIGHT_RATIO x the lower
    median). In gradient rounds a part FLAGRANT_RATIO x the scale is refused: no honest peer sends it. In "parameters"
    rounds (weights, not updates) a part farther than PARAMETER_RADIUS x its norm from this peer's own is refused;
    the others are averaged as they are."""
    actions: list[Action | None] = [None] * len(parts)
    usable = []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        if not math.isfinite(weight) or weight < 0:
            actions[i] = Action(f"refused: weight {weight}", flagrant=True)
        elif not bool(torch.isfinite(part).all()):
            actions[i] = Action("refused: non-finite values", flagrant=True)
        else:
            usable.append(i)
    counted = [i for i in usable if weights[i] > 0]
    if not counted:
        return None, actions
    norms = {i: norm_of(parts[i]) for i in counted}
    scale = lower_median(list(norms.values()))
    max_weight = WEIGHT_RATIO * lower_median([weights[i] for i in counted])
    if own is not None and own in norms:
        scale, max_weight = max(scale, norms[own]), max(max_weight, WEIGHT_RATIO * weights[own])
    if kind == "gradients" and scale > 0:
        for i in list(counted):
            if norms[i] > FLAGRANT_RATIO * scale:
                actions[i] = Action(f"refused: norm {norms[i] / scale:.3g}x the group's", flagrant=True)
                counted.remove(i)
    if kind == "parameters" and own is not None and own in norms:
        for i in list(counted):
            distance = norm_of(parts[i].float() - parts[own].float()) / max(norms[own], 1e-30)
            if distance > PARAMETER_RADIUS:
                actions[i] = Action(f"refused: weights {distance:.3g}x their norm away from this peer's")
                counted.remove(i)
        scale = math.inf  # no clipping of weights
    if not counted:
        return None, actions
    total = torch.zeros_like(parts[counted[0]], dtype=torch.float32)
    denominator = 0.0
    for i in counted:
        part, weight = parts[i].float(), min(weights[i], max_weight)
        bound = CLIP_RATIO * scale
        if norms[i] > bound:
            actions[i] = Action(f"clipped: norm {norms[i] / max(scale, 1e-30):.3g}x the group's")
            part = part * (bound / norms[i])
        elif weight < weights[i]:
            actions[i] = Action(f"clipped: weight {weights[i]:.3g} over {max_weight:.3g}")
        total.add_(part, alpha=weight)
        denominator += weight
    return total.div_(denominator), actions


class CheckedPartReducer(TensorPartReducer):
    """hivemind's reducer, holding every sender's part until all are in and averaging them with `robust_mean`."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, own_sender: int | None,
                 kind: str = "gradients") -> None:
        self.own_sender, self.kind = own_sender, kind
        self.actions: list[Counter[Action]] = [Counter() for _ in range(num_senders)]  # per sender: action -> parts
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        self.received: dict[int, tuple[torch.Tensor, float]] = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        # as TensorPartReducer.accumulate_part, keeping the part instead of adding it to the sum at once
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self.received[sender_index] = (tensor_part, float(weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self) -> None:
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = sorted(self.received)
        own = senders.index(self.own_sender) if self.own_sender in self.received else None
        mean, actions = robust_mean([self.received[s][0] for s in senders], [self.received[s][1] for s in senders],
                                    own=own, kind=self.kind)
        for sender, action in zip(senders, actions, strict=True):
            if action is not None:
                self.actions[sender][action] += 1
        if mean is None:  # nothing usable (every part refused, or only weight-zero senders): keep the own part
            own_part = self.received.get(self.own_sender, (None,))[0]
            mean = own_part.float().clone() if own_part is not None else torch.zeros(
                self.part_shapes[self.current_part_index])
        self.current_part_future.set_result(mean)
        self.reset_accumulators()


class CheckedAllReduceRunner(AllReduceRunner):
    """hivemind's all-reduce with `CheckedPartReducer`, refusing averages a reducer returns that are non-finite
    or far from this peer's part; `refusals` are reported when the round ends."""

    def __init__(self, *, report: mp.Queue | None = None, quarantine: Quarantine | None = None,
                 kind: str = "averaging", **kwargs) -> None:
        super().__init__(**kwargs)
        # hivemind makes a plain reducer inline; it has received nothing, so it is finished quietly and replaced
        self.tensor_part_reducer.finished.set()
        own = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        parameters = kind == "parameters"
        self.tensor_part_reducer = CheckedPartReducer(tuple(part.shape for part in self.parts_for_local_averaging),
                                                      len(self.sender_peer_ids), own_sender=own, kind=kind)
        self.report, self.quarantine, self.kind = report, quarantine, kind
        self.returned: Counter[tuple[int, str]] = Counter()  # (reducer index, reason) -> shares refused
        container = self.tensor_part_container
        inputs = [parts for parts in container._input_parts_by_peer]  # (part, codec) per reducer: this peer's input
        values = sum(part.numel() for parts in inputs for part, _ in parts)
        rms = math.sqrt(sum(norm_of(part) ** 2 for parts in inputs for part, _ in parts) / max(values, 1))
        register = container.register_processed_part

        def register_checked(peer_index: int, part_index: int, delta: torch.Tensor) -> None:
            if self.ordered_peer_ids[peer_index] != self.peer_id:
                mine = inputs[peer_index][part_index][0]
                scale = max(norm_of(mine), rms * math.sqrt(mine.numel()))
                bound = PARAMETER_RADIUS if parameters else RETURN_RATIO
                # a peer tagging along with weight 0 (hivemind, after catching up) sends zeros: others' mean is
                # all it gets back, however far from its part
                judged = self.weight > 0 and scale > 0
                reason = ("non-finite" if not bool(torch.isfinite(delta).all()) else
                          f"moves this peer's part {norm_of(delta) / max(scale, 1e-30):.3g}x its norm"
                          if judged and norm_of(delta) > bound * scale else None)
                if reason is not None:
                    self.returned[peer_index, reason.split(" ")[0]] += 1
                    delta = torch.zeros_like(mine)  # keep this peer's own part for that share
            register(peer_index, part_index, delta)

        container.register_processed_part = register_checked

    def finalize(self, **kwargs) -> None:
        reported = self._future.done()
        super().finalize(**kwargs)
        if not reported:
            self._report()

    def _report(self) -> None:
        container = self.tensor_part_container
        if container.failed_size and self.report is not None:  # a reducer failed: its share kept this peer's part
            self.report.put(Missing(container.failed_size / max(container.total_size, 1)))
        refusals = []
        senders = self.sender_peer_ids
        for index, actions in enumerate(self.tensor_part_reducer.actions):
            if senders[index] == self.peer_id or not actions:
                continue
            refused = sum(n for action, n in actions.items() if action.refused)
            reasons = "; ".join(f"{n} {action}" for action, n in actions.most_common(3))
            refusals.append(Refusal(str(senders[index]), "sender", refused, sum(actions.values()) - refused, reasons,
                                    flagrant=any(action.flagrant for action in actions)))
        by_reducer: dict[int, Counter[str]] = {}
        for (index, reason), n in self.returned.items():
            by_reducer.setdefault(index, Counter())[reason] += n
        for index, reasons in by_reducer.items():
            text = "; ".join(f"{n} {'non-finite' if r == 'non-finite' else 'too far from ours'}"
                             for r, n in reasons.items())
            # an average 1000x a mean gradient is no honest reducer's (DiLoCo's and weights' bounds are looser)
            flagrant = "non-finite" in reasons or self.kind == "gradients"
            refusals.append(Refusal(str(self.ordered_peer_ids[index]), "reducer", sum(reasons.values()), 0, text,
                                    flagrant=flagrant))
        flagrant: dict[str, list[str]] = {}
        for refusal in refusals:
            log.warning("%s round: peer %s %s: %d parts refused, %d clipped (%s)", self.kind, refusal.sender,
                        "sent" if refusal.role == "sender" else "returned averages", refusal.refused,
                        refusal.clipped, refusal.reason)
            if refusal.flagrant:
                flagrant.setdefault(refusal.sender, []).append(refusal.reason)
            if self.report is not None:
                self.report.put(refusal)
        for sender, reasons in flagrant.items():  # one strike per round
            if self.quarantine is not None:
                self.quarantine.add(sender, f"{self.kind} round: {'; '.join(reasons)}")


class Quarantine:
    """Peers this averager keeps out of its groups, and until when (monotonic seconds). Lives in the averager's
    process, where its rounds run and its matchmaking happens. Copies made by one `QuarantineBoard` (one per peer,
    before its averagers fork) tell each other whom they caught: a peer caught sending NaN gradients is kept out of
    the parameter rounds too, where the share it reduces would otherwise stay unaveraged and the honest peers drift
    apart on it."""

    def __init__(self, period: float = QUARANTINE_PERIOD, board: QuarantineBoard | None = None, seat: int = 0) -> None:
        self.period, self.board, self.seat = period, board, seat
        self.until: dict[str, float] = {}
        self.strikes: Counter[str] = Counter()

    def add(self, peer_id: str, why: str) -> None:
        self.strikes[peer_id] += 1
        seconds = self.period * 2 ** (self.strikes[peer_id] - 1)
        self.until[peer_id] = time.monotonic() + seconds
        log.warning("peer %s is kept out of this peer's averaging groups for %.0f s: no honest peer sends what it "
                    "sent (%s)", peer_id, seconds, why)
        if self.board is not None:
            self.board.post(self.seat, peer_id, self.until[peer_id])

    def holds(self, peer: PeerID | str) -> bool:
        if self.board is not None:
            for peer_id, until in self.board.read(self.seat):  # caught by this peer's other averagers
                if until > self.until.get(peer_id, 0.0):
                    log.info("peer %s is kept out of these rounds too, for %.0f s", peer_id, until - time.monotonic())
                    self.until[peer_id] = until
        return self.until.get(peer.to_base58() if isinstance(peer, PeerID) else peer, 0.0) > time.monotonic()


class QuarantineBoard:
    """One peer's averagers (gradients and parameters, or DiLoCo's outer rounds and parameters) share whom they keep
    out: each takes a seat with `quarantine()` in the parent before it forks, and what one catches reaches the others
    through their inboxes (queues made here, so every averager's process inherits all of them)."""

    def __init__(self, seats: int = 2) -> None:
        self.inboxes: list[mp.Queue] = [mp.Queue() for _ in range(seats)]
        self.taken = 0

    def quarantine(self, period: float = QUARANTINE_PERIOD) -> Quarantine:
        if self.taken == len(self.inboxes):
            raise RuntimeError(f"a QuarantineBoard of {len(self.inboxes)} seats has none left: make it larger")
        self.taken += 1
        return Quarantine(period, board=self, seat=self.taken - 1)

    def post(self, seat: int, peer_id: str, until: float) -> None:
        for index, inbox in enumerate(self.inboxes):
            if index != seat:
                inbox.put((peer_id, until))

    def read(self, seat: int) -> list[tuple[str, float]]:
        posted = []
        while True:
            try:
                posted.append(self.inboxes[seat].get_nowait())
            except (queue.Empty, OSError, ValueError):
                return posted


class CheckedMatchmaking(Matchmaking):
    """hivemind's matchmaking that neither accepts a quarantined follower, nor asks a quarantined leader, nor runs
    a round in a group holding a quarantined peer (another leader may not know yet): the round is looked for again."""

    quarantine: Quarantine

    async def look_for_group(self, step: StepControl) -> GroupInfo | None:
        group = await super().look_for_group(step)
        held = [peer for peer in group.peer_ids if self.quarantine.holds(peer)] if group is not None else []
        if held:
            log.info("left an averaging group holding quarantined peer %s", held[0])
            return None
        return group

    async def _request_join_group(self, leader: PeerID) -> GroupInfo | None:
        return None if self.quarantine.holds(leader) else await super()._request_join_group(leader)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest,
                             context: P2PContext) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.quarantine.holds(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message


class CheckedAveraging(DecentralizedAverager):
    """Mixin for a hivemind averager: every all-reduce runs with `CheckedAllReduceRunner`. The refusals come back
    from the averager's process through a queue: `take_reports()` in the parent."""

    refusal_kind = "averaging"

    def __init__(self, *args, quarantine: Quarantine | None = None, **kwargs) -> None:
        self._refusals: mp.Queue = mp.Queue()  # before the process forks (hivemind starts it in __init__)
        # filled and read in the averager's process; a seat at the peer's QuarantineBoard shares it with the others
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        super().__init__(*args, **kwargs)

    # hivemind makes its Matchmaking inside the averager's process (`_run_internal`), with no factory to pass one:
    # the one it assigns becomes a CheckedMatchmaking sharing this averager's quarantine
    @property
    def _matchmaking(self) -> CheckedMatchmaking:
        try:
            return self.__dict__["_matchmaking"]
        except KeyError:  # the parent process, or before the averager runs
            raise AttributeError("_matchmaking") from None

    @_matchmaking.setter
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        matchmaking.__class__ = CheckedMatchmaking
        matchmaking.quarantine = self.quarantine
        self.__dict__["_matchmaking"] = matchmaking

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        """hivemind names an RPC handler after the averager's class: peers whose subclasses differ (a CPU peer's
        in-place averager, a GPU peer's) must still reach each other, so the name is hivemind's own class's."""
        hivemind_class = next(c for c in cls.__mro__ if c.__module__.startswith("hivemind."))
        handle_name = f"{hivemind_class.__name__}.{method_name}"
        return handle_name if namespace is None else f"{namespace}::{handle_name}"

    def take_reports(self) -> tuple[list[Refusal], float]:
        """What this peer's rounds reported since the last call (from the averager's process): the refusals, and the
        largest share of a vector that came back without an average."""
        refusals, missing = [], 0.0
        while True:
            try:
                report = self._refusals.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return refusals, missing
            if isinstance(report, Missing):
                missing = max(missing, report.fraction)
            else:
                refusals.append(report)

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: bytes | None = None, **kwargs) -> None:
        # as DecentralizedAverager._run_allreduce_inplace_ (hivemind 1.1.12), with the checked runner
        # and the tensors smaller than a part joined into one (round_tensors.py)
        group_id = group_info.group_id if group_id is None else group_id
        sent = RoundTensors(tensors, kwargs.pop("tensor_infos", None), compression=kwargs["compression"],
                            part_size_bytes=kwargs["part_size_bytes"])
        runner = CheckedAllReduceRunner(
            report=self._refusals, quarantine=self.quarantine, kind=self.refusal_kind, p2p=self._p2p,
            servicer_type=type(self), prefix=self.prefix, tensors=sent.sent, tensor_infos=sent.infos,
            group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for index, update in aenumerate(runner):
                sent.add_(index, update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class CheckedGradientAverager(GatedRPCs, CheckedAveraging, GradientAverager):
    """hivemind.Optimizer's gradient averager, checked (its `grad_averager_factory`)."""

    refusal_kind = "gradients"


class CheckedDecentralizedAverager(GatedRPCs, CheckedAveraging, DecentralizedAverager):
    """A plain averager, checked: DiLoCo's pseudo-gradients."""

    refusal_kind = "outer"
