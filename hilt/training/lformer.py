"""A deterministic synthetic reasoning dataset for the L-Former heads, and the L-Former training hook.

Examples (byte-level text, at most ``max_len`` bytes), four kinds:

* ``tool``: a request naming exactly one tool of :data:`TOOLS` as a whole word, e.g.
  ``"please search cheap flights"``. **Rule**: the label is ``TOOLS.index(w)`` for the one word ``w``
  of the text (lower-case runs of ``a-z``) that is in ``TOOLS``. No other kind contains a tool word.
* ``value``: ``"what is 7 - 2 * 3?"`` with 2 or 3 one-digit operands and ``+ - *`` (usual precedence);
  the regression target is the expression's value (``value_targets`` hold ``value / VALUE_SCALE``).
* ``plan``: ``"plan: tea then mail"`` naming 1 to 3 tasks of :data:`PLAN_TASKS`; the plan target is the
  concatenation of the tasks' steps, then ``end``, as indices into :data:`PLAN_VOCAB`, padded with -100
  up to :data:`PLAN_LEN`.
* ``chat``: small talk (``"good morning sam"``) with no label at all.

Every kind but ``tool`` has tool label -100 (ignored by the tool loss); value targets are NaN except for
``value`` examples; plan targets are all -100 except for ``plan`` examples. Batches are right-padded with
byte 0 and a ``key_padding_mask`` (True = padding); LM targets of reasoning rows are all -100.

Generation is seeded (``random.Random(seed)``): the same seed gives the same examples. Train and held-out
examples never share a text: a text belongs to the held-out split when ``crc32(text) % 10 == 0``
(:func:`split_of`), so both splits follow the same distribution.

Training (``hilt train --model lformer``, :class:`LFormerTraining`): phase A (base frozen,
``freeze_base``) for ``--phase-a-steps`` (default ``--phase-a-fraction`` 0.5 of ``--max-steps``), then
phase B (``unfreeze_last_k(K)``, ``--phase-b-unfreeze K|all``) for the rest (``--phase-b-steps`` N sets
``max_steps`` to phase A + N). Every micro-batch is the corpus LM batch plus ``--reasoning-batch-size``
reasoning rows appended to it (one forward: the LM loss counts the corpus rows only, the head losses the
reasoning rows only; the reasoning rows are drawn from a seeded generator keyed by the step, so a resumed
run draws the same rows). Evaluation adds tool accuracy (tool examples only), value MAE (value examples,
in value units) and plan exact match (plan examples, greedy decoding) on held-out examples (the eval split).
"""
from __future__ import annotations

import dataclasses
import random
import re
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TOOLS", "PLAN_TASKS", "PLAN_VOCAB", "PLAN_END", "PLAN_LEN", "VALUE_SCALE", "KINDS", "Example",
           "ReasoningBatch", "tool_rule", "make_examples", "collate", "reasoning_metrics", "predict",
           "evaluate_reasoning", "lformer_head_config", "resolve_phases", "LFormerTraining"]

IGNORE = -100
TOOLS = ("calc", "search", "lookup", "weather")
PLAN_TASKS = {
    "tea": ("fetch", "boil", "pour"),
    "mail": ("write", "seal", "send"),
    "wash": ("fill", "scrub", "dry"),
    "bake": ("mix", "heat", "cool"),
    "plant": ("dig", "sow", "water"),
}
PLAN_END = "end"
PLAN_VOCAB = tuple(sorted({s for steps in PLAN_TASKS.values() for s in steps})) + (PLAN_END,)
PLAN_LEN = 3 * max(len(s) for s in PLAN_TASKS.values()) + 1  # three tasks + end
VALUE_SCALE = 10.0
KINDS = ("tool", "value", "plan", "chat")
KIND_WEIGHTS = (0.4, 0.2, 0.2, 0.2)

_PREFIX = ("", "please ", "now ", "hey ", "pls ", "can you ")
_TOPICS = ("cheap flights", "pasta", "news", "jobs", "hotels", "movies")
_WORDS = ("apple", "river", "tiger", "piano", "cloud", "salt")
_CITIES = ("oslo", "lima", "rome", "kyiv", "pune", "cairo")
_NAMES = ("sam", "ana", "li", "tom", "eva")
_CHAT = ("hello there", "thanks a lot", "good morning {n}", "how are you {n}", "nice to meet you", "bye {n}",
         "see you soon", "that was fun")


@dataclass(frozen=True)
class Example:
    text: str
    kind: str
    tool: int = IGNORE                 # index into TOOLS, or -100
    value: float = float("nan")        # the expression's value (value examples)
    plan: tuple = ()                   # indices into PLAN_VOCAB, ending with PLAN_END (plan examples)


def tool_rule(text: str) -> int:
    """The tool label of ``text``: the index in :data:`TOOLS` of its one tool word, -100 if none
    (raises if there are several: the generator never makes such texts)."""
    found = {w for w in re.findall(r"[a-z]+", text.lower()) if w in TOOLS}
    if len(found) > 1:
        raise ValueError(f"{text!r} names several tools: {sorted(found)}")
    return TOOLS.index(found.pop()) if found else IGNORE


def _value(nums: Sequence[int], ops: Sequence[str]) -> float:
    """Value of nums[0] ops[0] nums[1] ... with * before + and -."""
    terms, signs = [float(nums[0])], []
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(float(n))
            signs.append(1.0 if op == "+" else -1.0)
    return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


def _one(rng: random.Random) -> Example:
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    if kind == "tool":
        t = rng.randrange(len(TOOLS))
        pre = rng.choice(_PREFIX)
        body = {
            "calc": lambda: f"calc {rng.randrange(10)} {rng.choice('+-*')} {rng.randrange(10)}",
            "search": lambda: f"search {rng.choice(_TOPICS)}",
            "lookup": lambda: f"lookup {rng.choice(_WORDS)}",
            "weather": lambda: f"weather in {rng.choice(_CITIES)}",
        }[TOOLS[t]]()
        return Example(pre + body, "tool", tool=t)
    if kind == "value":
        n = rng.choice((2, 3))
        nums = [rng.randrange(10) for _ in range(n)]
        ops = [rng.choice("+-*") for _ in range(n - 1)]
        expr = " ".join(x for pair in zip(map(str, nums), ops + [""]) for x in pair if x)
        return Example(f"what is {expr}?", "value", value=_value(nums, ops))
    if kind == "plan":
        tasks = rng.sample(sorted(PLAN_TASKS), rng.choice((1, 2, 3)))
        steps = [s for task in tasks for s in PLAN_TASKS[task]] + [PLAN_END]
        return Example("plan: " + " then ".join(tasks), "plan", plan=tuple(PLAN_VOCAB.index(s) for s in steps))
    return Example(rng.choice(_CHAT).format(n=rng.choice(_NAMES)), "chat")


def split_of(text: str) -> str:
    """``"eval"`` for about 10% of the possible texts (by a stable hash), else ``"train"``."""
    return "eval" if zlib.crc32(text.encode()) % 10 == 0 else "train"


def make_examples(n: int, seed: int = 0, max_len: Optional[int] = None,
                  split: Optional[str] = None) -> list[Example]:
    """``n`` examples from ``random.Random(seed)``; only texts of at most ``max_len`` bytes, and of
    :func:`split_of` ``split`` (``"train"`` / ``"eval"``; None: any) are kept. Deterministic."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    rng = random.Random(seed)
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot make {n} examples of at most {max_len} bytes"
                             + (f" in the {split} split" if split else ""))
        ex = _one(rng)
        if max_len is not None and len(ex.text.encode()) > max_len:
            continue
        if split is not None and split_of(ex.text) != split:
            continue
        out.append(ex)
    return out


@dataclass
class ReasoningBatch:
    """Tensors of a list of examples. ``value_targets`` are in value units (NaN = none)."""

    ids: Tensor               # (B, L) long, right-padded with 0
    key_padding_mask: Tensor  # (B, L) bool, True = padding
    tool_labels: Tensor       # (B,) long, -100 = not a tool example
    value_targets: Tensor     # (B,) float32, NaN = none
    plan_targets: Tensor      # (B, PLAN_LEN) long, -100 = padding / no plan

    def to(self, device) -> "ReasoningBatch":
        return ReasoningBatch(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def collate(examples: Sequence[Example], length: Optional[int] = None) -> ReasoningBatch:
    """Right-pad to ``length`` (default: the longest text)."""
    raw = [e.text.encode() for e in examples]
    L = max(len(r) for r in raw) if length is None else length
    if any(len(r) > L for r in raw):
        raise ValueError(f"an example is longer than {L} bytes")
    B = len(examples)
    ids = torch.zeros(B, L, dtype=torch.long)
    kpm = torch.ones(B, L, dtype=torch.bool)
    plan = torch.full((B, PLAN_LEN), IGNORE, dtype=torch.long)
    for i, (e, r) in enumerate(zip(examples, raw)):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        kpm[i, :len(r)] = False
        plan[i, :len(e.plan)] = torch.tensor(e.plan, dtype=torch.long)
    return ReasoningBatch(ids, kpm, torch.tensor([e.tool for e in examples], dtype=torch.long),
                          torch.tensor([e.value for e in examples], dtype=torch.float32), plan)


# ------------------------------------------------------------------------------------- evaluation

def reasoning_metrics(tool_pred: Optional[Tensor], value_pred: Optional[Tensor], plan_pred: Optional[Tensor],
                      batch: ReasoningBatch) -> dict:
    """Sums and counts over the right subsets: tool accuracy over rows with a tool label, value absolute
    error over rows with a finite target (value units), plan exact match over rows with a plan (every
    non -100 position right). Returns ``{"tool_correct", "n_tool", "value_abs_err", "n_value",
    "plan_exact", "n_plan"}`` (a metric's sum is 0 when its prediction is None)."""
    out = {}
    has_tool = batch.tool_labels != IGNORE
    out["n_tool"] = int(has_tool.sum())
    out["tool_correct"] = int((tool_pred[has_tool] == batch.tool_labels[has_tool]).sum()) if tool_pred is not None else 0
    has_value = torch.isfinite(batch.value_targets)
    out["n_value"] = int(has_value.sum())
    out["value_abs_err"] = (float((value_pred[has_value].float() - batch.value_targets[has_value]).abs().sum())
                            if value_pred is not None else 0.0)
    valid = batch.plan_targets != IGNORE
    has_plan = valid.any(1)
    out["n_plan"] = int(has_plan.sum())
    if plan_pred is not None:
        ok = ((plan_pred == batch.plan_targets) | ~valid).all(1)
        out["plan_exact"] = int((ok & has_plan).sum())
    else:
        out["plan_exact"] = 0
    return out


@torch.no_grad()
def predict(model: nn.Module, batch: ReasoningBatch) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(tool argmax (B,), values in value units (B,), greedy plans (B, PLAN_LEN)) of an LFormer; None for a
    head the model lacks."""
    out = model(batch.ids, key_padding_mask=batch.key_padding_mask)
    tool = out.tool_logits.argmax(-1) if out.tool_logits is not None else None
    value = out.values.float() * VALUE_SCALE if out.values is not None else None
    plan = None
    decoder = model.side.plan_decoder
    if decoder is not None:
        states = out.side_states
        if model.config.tap_mode == "token":
            memory, mmask = states[-1], batch.key_padding_mask
        else:
            memory, mmask = states.transpose(0, 1), None
        P = min(PLAN_LEN, model.config.plan_len)
        plan = torch.zeros(batch.ids.shape[0], P, dtype=torch.long, device=batch.ids.device)
        for t in range(P):  # position t's logits see plan[:, :t] only (a causal decoder)
            plan[:, t] = decoder(plan, memory, mmask)[:, t].argmax(-1)
        if P < PLAN_LEN:
            plan = torch.cat([plan, plan.new_full((plan.shape[0], PLAN_LEN - P), IGNORE)], 1)
    return tool, value, plan


@torch.no_grad()
def evaluate_reasoning(model: nn.Module, examples: Sequence[Example], batch_size: int = 64,
                       device=None) -> dict:
    """``{"tool_acc", "value_mae", "plan_em"}`` (NaN where a subset is empty) over ``examples``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    tot = {"tool_correct": 0, "n_tool": 0, "value_abs_err": 0.0, "n_value": 0, "plan_exact": 0, "n_plan": 0}
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size]).to(device)
            for k, v in reasoning_metrics(*predict(model, batch), batch).items():
                tot[k] += v
    finally:
        model.train(was_training)

    def ratio(a, b):
        return tot[a] / tot[b] if tot[b] else float("nan")

    return {"tool_acc": ratio("tool_correct", "n_tool"), "value_mae": ratio("value_abs_err", "n_value"),
            "plan_em": ratio("plan_exact", "n_plan")}


# ---------------------------------------------------------------------------------------- training

def lformer_head_config() -> dict:
    """The LFormer head sizes that fit this dataset (``hilt train --model lformer`` defaults)."""
    return {"n_tools": len(TOOLS), "value_head": True, "plan_vocab": len(PLAN_VOCAB), "plan_len": PLAN_LEN}


def _phase_a_steps(cfg) -> int:
    if cfg.phase_a_steps is not None:
        return cfg.phase_a_steps
    return int(round(cfg.phase_a_fraction * cfg.max_steps))


def resolve_phases(cfg):
    """The TrainConfig with ``max_steps`` = phase A + ``phase_b_steps`` when ``phase_b_steps`` is given."""
    if cfg.phase_b_steps is None:
        return cfg
    return dataclasses.replace(cfg, max_steps=_phase_a_steps(cfg) + cfg.phase_b_steps)


class LFormerTraining:
    """The L-Former hook of :func:`hilt.training.loop.train`: :meth:`set_phase` at each step (freezing),
    :meth:`mix` appends reasoning rows to each micro-batch, :meth:`evaluate` gives the head metrics."""

    def __init__(self, cfg, model: nn.Module, seq_len: int, device, rank: int = 0, world_size: int = 1,
                 log=print) -> None:
        c = model.config
        self.phase_a = _phase_a_steps(cfg)
        if not 0 <= self.phase_a <= cfg.max_steps:
            raise ValueError(f"phase A steps ({self.phase_a}) must be in [0, max_steps={cfg.max_steps}]")
        u = str(cfg.phase_b_unfreeze).strip().lower()
        if u == "all":
            self.unfreeze: Optional[int] = None
        elif u.isdigit() and int(u) <= c.n_layers:
            self.unfreeze = int(u)
        else:
            raise ValueError(f"--phase-b-unfreeze must be 'all' or an int in [0, n_layers={c.n_layers}], "
                             f"got {cfg.phase_b_unfreeze!r}")
        self.heads = {"tool": c.n_tools > 0, "value": c.value_head, "plan": c.plan_vocab > 0}
        if self.heads["tool"] and c.n_tools != len(TOOLS):
            raise ValueError(f"the reasoning data has {len(TOOLS)} tools, the model n_tools={c.n_tools}")
        if self.heads["plan"] and (c.plan_vocab != len(PLAN_VOCAB) or c.plan_len < PLAN_LEN):
            raise ValueError(f"the reasoning data needs plan_vocab={len(PLAN_VOCAB)} and plan_len >= {PLAN_LEN}, "
                             f"got {c.plan_vocab} and {c.plan_len}")
        self.rows = cfg.reasoning_batch_size if cfg.reasoning_batch_size is not None else max(
            world_size, cfg.batch_size // 2)
        if self.rows < 0 or self.rows % world_size:
            raise ValueError(f"--reasoning-batch-size ({self.rows}) must be >= 0 and divisible by the number of "
                             f"processes ({world_size})")
        if self.rows == 0 and self.phase_a > 0 and not c.blend_into_lm:
            raise ValueError("phase A trains only the side path and heads: it needs reasoning rows "
                             "(--reasoning-batch-size > 0) or blend_into_lm")
        self.seed, self.rank, self.world = cfg.seed, rank, world_size
        self.seq_len, self.device = seq_len, device
        self.pool = make_examples(cfg.reasoning_examples, seed=cfg.seed, max_len=seq_len, split="train")
        self.eval_examples = make_examples(cfg.reasoning_eval_examples, seed=cfg.seed + 7919, max_len=seq_len,
                                           split="eval")
        self.current: Optional[str] = None
        log(f"lformer: phase A (base frozen) steps 1-{self.phase_a}, phase B (unfreeze "
            f"{'all' if self.unfreeze is None else f'last {self.unfreeze} layer(s)'}) steps "
            f"{self.phase_a + 1}-{cfg.max_steps}; {self.rows} reasoning rows per micro-batch from "
            f"{len(self.pool)} examples, {len(self.eval_examples)} held out")

    def phase(self, step: int) -> str:
        return "A" if step < self.phase_a else "B"

    def set_phase(self, model: nn.Module, step: int) -> str:
        """Freeze for the phase of (0-based) ``step``; a no-op when the phase has not changed."""
        ph = self.phase(step)
        if ph != self.current:
            model.unfreeze_last_k(None)  # everything trainable, then freeze per phase
            model.freeze_base()
            if ph == "B":
                model.unfreeze_last_k(self.unfreeze)
            self.current = ph
        return ph

    def mix(self, ids: Tensor, targets: Tensor, step: int, micro: int) -> tuple[Tensor, Tensor, dict]:
        """The corpus batch plus this rank's reasoning rows (drawn from a generator keyed by
        seed, step and micro-step): (ids, targets, forward kwargs)."""
        B, T = ids.shape
        if self.rows == 0:
            return ids, targets, {}
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        idx = torch.randint(0, len(self.pool), (self.rows,), generator=g)
        local = self.rows // self.world
        rb = collate([self.pool[i] for i in idx[self.rank * local:(self.rank + 1) * local].tolist()], T).to(ids.device)
        n = rb.ids.shape[0]
        kw = {"key_padding_mask": torch.cat([torch.zeros_like(ids, dtype=torch.bool), rb.key_padding_mask])}
        if self.heads["tool"]:
            kw["tool_labels"] = torch.cat([rb.tool_labels.new_full((B,), IGNORE), rb.tool_labels])
        if self.heads["value"]:
            kw["value_targets"] = torch.cat([rb.value_targets.new_full((B,), float("nan")),
                                             rb.value_targets / VALUE_SCALE])
        if self.heads["plan"]:
            plan = torch.full((B + n, PLAN_LEN), IGNORE, dtype=torch.long, device=ids.device)
            plan[B:] = rb.plan_targets
            kw["plan_targets"] = plan
        return (torch.cat([ids, rb.ids]), torch.cat([targets, torch.full_like(rb.ids, IGNORE)]), kw)

    def evaluate(self, model: nn.Module) -> dict:
        return evaluate_reasoning(model, self.eval_examples, device=self.device)
