"""How much per-image bits could buy: the shared weights at every uniform candidate, the oracle
that gives each image its cheapest right candidate, and how much of that the controller takes.

For a DQ model, every test image is classified by the controller's choice and, through
:meth:`~instaquant.convert.DynamicQuantModel.forced_bits`, with every dynamic layer at each
candidate in turn. From the ``[N, K]`` table of which candidates classify which image
correctly:

- *oracle*: each image at its cheapest right candidate (the cheapest overall where none is
  right). Part of its gain is luck: an image right at 2 bits and wrong at 4 counts as right.
- *monotone oracle*: each image at the cheapest candidate from which every higher one is
  right (the cheapest overall where the highest is wrong): the gain a controller could
  bank on.
- *front*: the uniform candidates' (BitOPs, top-1) points joined by straight lines; a
  model's gain is its top-1 minus the front's at its BitOPs. The controller's captured share
  is its gain over the oracle's.
- *layer policy*: every image at each layer's most frequent choice of the controller (a
  static mixed-precision network whose bits the controller chose). The controller's gain
  over it is what choosing per image buys; its gain over the front, what choosing per layer
  buys.
- *ranked allocations*: the images sorted by a difficulty score and split, easiest first,
  between the two uniform candidates around a BitOPs level so that the mean meets it. With
  the full-precision model's loss or the cheapest candidate's confidence as the score, it is
  what a controller that ranked images exactly as that signal does could buy at that level
  (a random order gives the front, on average): the ceiling of the signal, not of training.
- *cascade*: every image first runs at a cheap candidate; the least confident share runs
  again at a dearer one, from the tap on (the layers before it are static, their output is
  kept), and takes that answer. Unlike a ranked allocation it pays for both passes, so it is
  something a deployment could do, with the share set by the BitOPs level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .convert import DynamicQuantModel
from .policy import majority_policy, recorded_bits
from .stats import line_at, spearman


@dataclass
class Headroom:
    """Per-image outcomes of a DQ model's controller and of each uniform candidate."""

    candidates: tuple[int, ...]
    ref_bitops: float  # the static reference model's BitOPs (relative figures use it)
    uniform_bitops: Tensor  # [K] BitOPs per image with every dynamic layer at candidate k
    right: Tensor  # [N, K] bool: candidate k classifies image n correctly
    controller_right: Tensor  # [N] bool
    controller_bitops: Tensor  # [N] float64
    fp_loss: Tensor | None = None  # [N] the full-precision model's loss, when one was given
    confidence: Tensor | None = None  # [N, K] top softmax probability at each candidate
    policy_bits: list[list[int]] | None = None  # the layer policy: [bits_w, bits_a] per layer
    policy_right: Tensor | None = None  # [N] bool: the layer policy classifies image n
    policy_bitops: float | None = None  # BitOPs of one image under the layer policy
    shared_bitops: float = 0.0  # BitOPs of the static layers before the tap, run once per image

    @property
    def n(self) -> int:
        return int(self.right.shape[0])

    def uniform_top1(self) -> list[float]:
        return (100.0 * self.right.double().mean(0)).tolist()

    def cheapest_right(self) -> Tensor:
        """[N] index of each image's cheapest right candidate; K where none is right."""
        K = self.right.shape[1]
        first = self.right.to(torch.int8).argmax(1)
        return torch.where(self.right.any(1), first, torch.full_like(first, K))

    def monotone_start(self) -> Tensor:
        """[N] the cheapest candidate from which every higher one is right; K where the
        highest is wrong."""
        K = self.right.shape[1]
        # suffix[:, k]: every candidate from k up is right (a reversed cumulative "and").
        suffix = self.right.flip(1).to(torch.int8).cumprod(1).flip(1).bool()
        first = suffix.to(torch.int8).argmax(1)
        return torch.where(suffix[:, -1], first, torch.full_like(first, K))

    def _oracle(self, index: Tensor) -> tuple[float, float, list[float]]:
        """Top-1, mean BitOPs and per-candidate share (plus "none") of an assignment that runs
        image n at candidate ``index[n]`` (K: none right, run at the cheapest and wrong)."""
        K = self.right.shape[1]
        runs_at = torch.where(index < K, index, torch.zeros_like(index))
        top1 = 100.0 * float((index < K).double().mean())
        bitops = float(self.uniform_bitops.double()[runs_at].mean())
        shares = (torch.bincount(index, minlength=K + 1).double() / self.n).tolist()
        return top1, bitops, shares

    def front(self, bitops: float) -> float:
        """Top-1 of the uniform candidates' line at ``bitops`` (flat beyond its ends)."""
        points = zip(self.uniform_bitops.double().tolist(), self.uniform_top1(), strict=True)
        return line_at(list(points), bitops)

    def ranked(self, score: Tensor, bitops: float, pair: tuple[int, int]) -> float:
        """Top-1 when the images, easiest (lowest ``score``) first, run at candidate index
        ``pair[0]`` and the hardest share at ``pair[1]``, that share chosen so the mean BitOPs
        is ``bitops`` (to one image; clipped to 0..1 outside the pair). Ties keep image order."""
        lo, hi = pair
        xs = self.uniform_bitops.double()
        span = float(xs[hi] - xs[lo])
        hard_share = min(max((bitops - float(xs[lo])) / span, 0.0), 1.0) if span > 0 else 0.0
        n_hard = round(hard_share * self.n)
        order = torch.sort(score.double(), stable=True).indices
        at = torch.full((self.n,), lo, dtype=torch.long)
        at[order[self.n - n_hard :]] = hi
        return 100.0 * float(self.right.gather(1, at[:, None]).double().mean())

    def best_ranked(self, score: Tensor, bitops: float) -> tuple[float, list[int]]:
        """The best :meth:`ranked` top-1 at ``bitops`` over the candidate pairs around it, and
        that pair's bit-widths (the nearest pair when ``bitops`` is outside them all)."""
        xs = self.uniform_bitops.tolist()
        K = len(xs)
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if xs[i] <= bitops <= xs[j]]
        pairs = pairs or [(0, 1) if bitops < xs[0] else (K - 2, K - 1)]
        top1, (lo, hi) = max((self.ranked(score, bitops, p), p) for p in pairs)
        return top1, [self.candidates[lo], self.candidates[hi]]

    def cascade(self, bitops: float, pair: tuple[int, int]) -> tuple[float, float]:
        """Top-1 and escalated share of a cascade at mean BitOPs ``bitops``: every image at
        candidate index ``pair[0]``, then the least confident share there (by its top softmax
        probability; ties keep image order) again at ``pair[1]`` from the tap on, costing
        that candidate's BitOPs less :attr:`shared_bitops`. The share is clipped to 0..1 and
        rounded down to whole images, so the cascade never costs more than ``bitops``."""
        if self.confidence is None:
            raise ValueError("a cascade needs each candidate's confidence (measure_headroom)")
        lo, hi = pair
        first, second = float(self.uniform_bitops[lo]), self._second_pass_bitops(hi)
        share = min(max((bitops - first) / second, 0.0), 1.0) if second > 0 else 0.0
        n_again = math.floor(share * self.n + 1e-9)  # rounded down: never above ``bitops``
        order = torch.sort(self.confidence[:, lo].double(), stable=True).indices
        at = torch.full((self.n,), lo, dtype=torch.long)
        at[order[:n_again]] = hi
        return 100.0 * float(self.right.gather(1, at[:, None]).double().mean()), n_again / self.n

    def _second_pass_bitops(self, k: int) -> float:
        """BitOPs of running an image again at candidate index ``k`` from the tap on."""
        return float(self.uniform_bitops[k]) - self.shared_bitops

    def best_cascade(self, bitops: float) -> dict[str, Any]:
        """The best :meth:`cascade` at ``bitops`` over the candidate pairs whose first pass
        fits it: ``top1``, ``bits`` [cheap, dear], ``again`` (the share run twice) and
        ``bitops_rel`` (both passes, to the reference); empty when even the cheapest
        candidate costs more."""
        K, best = len(self.candidates), {}
        for lo in range(K - 1):
            if float(self.uniform_bitops[lo]) > bitops:
                continue
            for hi in range(lo + 1, K):
                top1, again = self.cascade(bitops, (lo, hi))
                if not best or top1 > best["top1"]:
                    cost = float(self.uniform_bitops[lo]) + again * self._second_pass_bitops(hi)
                    bits = [self.candidates[lo], self.candidates[hi]]
                    best = {"top1": top1, "bits": bits, "again": again}
                    best["bitops_rel"] = cost / self.ref_bitops
        return best

    def ranked_top1(self, bitops: float) -> dict[str, dict[str, Any]]:
        """:meth:`best_ranked` at ``bitops`` for each difficulty signal this measurement holds."""
        if len(self.candidates) < 2:
            return {}  # one candidate: nothing to split between
        start = self.monotone_start()
        # Images no candidate gets right are the easiest to place: bits spent there buy nothing.
        signals = {"monotone_oracle": torch.where(start == len(self.candidates), -1, start)}
        if self.fp_loss is not None:
            signals["fp_loss"] = self.fp_loss
        if self.confidence is not None:
            signals["cheapest_confidence"] = -self.confidence[:, 0]
        out = {}
        for name, score in signals.items():
            top1, bits = self.best_ranked(score, bitops)
            out[name] = {"top1": top1, "bits": bits}
        return out

    def summary(self) -> dict[str, Any]:
        """The figures in plain types (BitOPs also relative to the reference)."""
        ref = self.ref_bitops
        ctrl_top1 = 100.0 * float(self.controller_right.double().mean())
        ctrl_bitops = float(self.controller_bitops.mean())
        o_top1, o_bitops, o_shares = self._oracle(self.cheapest_right())
        m_top1, m_bitops, m_shares = self._oracle(self.monotone_start())

        def captured(top1: float, bitops: float) -> float | None:
            gain = top1 - self.front(bitops)
            return None if gain <= 0 else (ctrl_top1 - self.front(ctrl_bitops)) / gain

        need = self.cheapest_right().double()
        p10, p90 = torch.quantile(
            self.controller_bitops.double(), torch.tensor([0.1, 0.9]).double()
        )
        keys = [*map(str, self.candidates), "none"]
        out: dict[str, Any] = {
            "candidates": list(self.candidates),
            "uniform_top1": self.uniform_top1(),
            "uniform_bitops_rel": (self.uniform_bitops.double() / ref).tolist(),
            "controller_top1": ctrl_top1,
            "controller_bitops_rel": ctrl_bitops / ref,
            "controller_front_top1": self.front(ctrl_bitops),
            "oracle_top1": o_top1,
            "oracle_bitops_rel": o_bitops / ref,
            "oracle_share": dict(zip(keys, o_shares, strict=True)),
            "monotone_oracle_top1": m_top1,
            "monotone_oracle_bitops_rel": m_bitops / ref,
            "monotone_oracle_share": dict(zip(keys, m_shares, strict=True)),
            "captured_share": captured(o_top1, o_bitops),
            "captured_share_monotone": captured(m_top1, m_bitops),
            "rho_cheapest_right": _finite(spearman(self.controller_bitops, need)),
            "rho_fp_loss": None,
            # Each signal's ranked allocation at the controller's BitOPs (see the module doc).
            "ranked_top1": self.ranked_top1(ctrl_bitops),
            # What a cascade on the cheapest candidate's confidence gets for the same BitOPs.
            "cascade": self.best_cascade(ctrl_bitops) if self.confidence is not None else {},
            "bitops_p10_rel": float(p10) / ref,
            "bitops_p90_rel": float(p90) / ref,
            "bitops_p90_over_p10": float(p90 / p10),
        }
        if self.fp_loss is not None:
            out["rho_fp_loss"] = _finite(spearman(self.controller_bitops, self.fp_loss))
        if self.policy_right is not None and self.policy_bitops is not None:
            out["layer_policy_bits"] = self.policy_bits
            out["layer_policy_top1"] = 100.0 * float(self.policy_right.double().mean())
            out["layer_policy_bitops_rel"] = self.policy_bitops / ref
            out["layer_policy_front_top1"] = self.front(self.policy_bitops)
        return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


@torch.no_grad()
def measure_headroom(
    model: DynamicQuantModel,
    loader: Iterable[tuple[Tensor, Tensor]],
    ref_bits: int,
    fp_model: nn.Module | None = None,
    progress: bool = False,
) -> Headroom:
    """Run ``loader`` through the controller, every uniform candidate and (optionally) the
    full-precision model; ``ref_bits`` names the static reference of relative BitOPs."""
    if not isinstance(model, DynamicQuantModel):
        raise TypeError("measure_headroom needs a DynamicQuantModel (a DQ run)")
    was_training = model.training
    model.eval()
    if fp_model is not None:
        fp_was_training = fp_model.training
        fp_model.eval()
    K, L = len(model.spec.bits), len(model.dynamic_layers)
    right: list[Tensor] = []
    ctrl_right: list[Tensor] = []
    ctrl_bitops: list[Tensor] = []
    fp_loss: list[Tensor] = []
    confidence: list[Tensor] = []
    uniform = torch.zeros(K, dtype=torch.float64)
    choices: Tensor | None = None  # [L, K] (or [L, 2, K]) choice counts of the controller
    policy_right: list[Tensor] = []
    policy_bitops = None
    try:
        for x, y in tqdm(loader, desc="headroom", leave=False, disable=None if progress else True):
            ctrl_right.append((model(x).argmax(1) == y).cpu())
            ctrl_bitops.append(model.last.bitops.double().cpu())
            if model.last.selection is not None:
                sel = model.last.selection.sum(0).double().cpu()
                choices = sel if choices is None else choices + sel
            per_candidate, top_prob = [], []
            for k, b in enumerate(model.spec.bits):
                with model.forced_bits([b] * L):
                    prob = model(x).softmax(1)
                per_candidate.append((prob.argmax(1) == y).cpu())
                top_prob.append(prob.amax(1).double().cpu())
                uniform[k] = float(model.last.bitops[0])
            right.append(torch.stack(per_candidate, 1))
            confidence.append(torch.stack(top_prob, 1))
            if fp_model is not None:
                loss = torch.nn.functional.cross_entropy(fp_model(x), y, reduction="none")
                fp_loss.append(loss.double().cpu())
        policy = None if choices is None else majority_policy(choices, model.spec.bits)
        if policy is not None:
            with model.forced_bits(*policy):  # a second pass: the policy needs every choice
                for x, y in loader:
                    policy_right.append((model(x).argmax(1) == y).cpu())
                    policy_bitops = float(model.last.bitops[0])
    finally:
        model.train(was_training)
        if fp_model is not None:
            fp_model.train(fp_was_training)
    return Headroom(
        candidates=tuple(model.spec.bits),
        ref_bitops=float(model.static_bitops(ref_bits)),
        uniform_bitops=uniform,
        right=torch.cat(right),
        controller_right=torch.cat(ctrl_right),
        controller_bitops=torch.cat(ctrl_bitops),
        fp_loss=torch.cat(fp_loss) if fp_loss else None,
        confidence=torch.cat(confidence),
        policy_bits=None if policy is None else recorded_bits(policy, model.spec.weight_bits),
        policy_right=torch.cat(policy_right) if policy_right else None,
        policy_bitops=policy_bitops,
        shared_bitops=_before_tap_bitops(model),
    )


def _before_tap_bitops(model: DynamicQuantModel) -> float:
    """BitOPs of the quantized layers before the tap: their output is the same at every
    candidate, so a second pass starts after them (a pinned last layer reruns)."""
    return float(
        sum(i.bitops_at(i.bits[0]) for i in model.layers if i.role == "static" and i.before_tap)
    )
