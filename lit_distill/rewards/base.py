"""The Reward protocol, output validation, the registry and reward composition.

A reward scores a batch of generated images::

    reward(images, prompts, tasks, **metadata) -> Tensor[B]  (float32, on images.device)

- ``images``: float ``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3).
- ``prompts``: ``list[str]`` of length B; ``tasks``: ``list[str]`` of length B.
- ``metadata``: the other fields of the prompt batch, e.g. ``digit: LongTensor[B]``; rewards ignore
  fields they do not use.

Higher is better. Every reward has a ``name`` and a ``max_value`` (an upper bound or the best
achievable value, ``None`` if unbounded), which benchmarks use to report headroom.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Reward",
    "NonFiniteRewardError",
    "validate_rewards",
    "register_reward",
    "build_reward",
    "registered_rewards",
    "WeightedSum",
    "TaskRouted",
]

RewardSpec = Any  # str | dict | Reward

_REGISTRY: dict[str, type["Reward"]] = {}


class Reward(nn.Module, abc.ABC):
    """Base class of rewards: an ``nn.Module`` so networks inside move with ``.to(device)``.

    Subclasses implement ``forward(images, prompts, tasks, **metadata) -> Tensor[B]`` and set the
    class attributes ``name``, ``max_value`` and ``differentiable`` (True when gradients flow from the
    score back to ``images``, e.g. for reward backpropagation).

    Frozen by rule: a reward is never trained. ``build_reward`` calls ``freeze()`` on what it builds
    (``requires_grad_(False)`` + eval); a subclass that holds networks and may be built directly calls
    ``self.freeze()`` at the end of its ``__init__``. ``train(mode)`` always leaves it in eval mode,
    so a parent LightningModule's ``.train()`` does not switch on dropout inside reward models.
    """

    name: str = "reward"
    max_value: float | None = None
    differentiable: bool = False

    @abc.abstractmethod
    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        """Scores ``[B]`` of ``images`` ``[B, C, H, W]`` in [-1, 1] for their prompts and tasks."""

    def freeze(self) -> "Reward":
        """Make the reward untrainable: no parameter requires grad, modules in eval mode. Returns self."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Reward":  # noqa: ARG002 - rewards stay in eval mode
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, max_value={self.max_value}"


class NonFiniteRewardError(ValueError):
    """A reward returned NaN/inf (a ``ValueError``; methods with ``nan_policy='skip'`` skip the batch instead)."""


def validate_rewards(values: Any, batch_size: int, name: str = "reward") -> Tensor:
    """Check a reward output and return it as float32.

    Raises ``ValueError`` naming the reward ``name`` unless ``values`` is a tensor of shape
    ``[batch_size]``, and :class:`NonFiniteRewardError` (a ``ValueError``) if an entry is NaN/inf.
    """
    if not isinstance(values, Tensor):
        raise ValueError(
            f"reward {name!r}: must return a torch.Tensor of shape [{batch_size}], got {type(values).__name__}; "
            "wrap scores with torch.as_tensor(..., device=images.device)"
        )
    if values.shape != (batch_size,):
        raise ValueError(
            f"reward {name!r}: must return one score per image, shape [{batch_size}], got {tuple(values.shape)}; "
            "reduce over pixels/channels and squeeze trailing dims (e.g. scores.view(-1))"
        )
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()[:8]
        raise NonFiniteRewardError(
            f"reward {name!r}: returned NaN/inf at rows {rows} (of {batch_size}); check its inputs "
            "(images must be finite and in [-1, 1]) and guard divisions/logs inside the reward, or set the "
            "method's nan_policy='skip' to skip such batches"
        )
    return values.float()


def register_reward(name: str) -> Callable[[type[Reward]], type[Reward]]:
    """Class decorator: register a ``Reward`` subclass under ``name`` for ``build_reward``/configs."""

    def deco(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise ValueError(f"register_reward({name!r}): expected a subclass of Reward, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register_reward: the name {name!r} is already taken by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        if "name" not in cls.__dict__:
            cls.name = name
        return cls

    return deco


def registered_rewards() -> list[str]:
    """Sorted names accepted by ``build_reward``."""
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    from lit_distill.rewards import builtin, models  # noqa: F401 - registers the built-in rewards


def build_reward(spec: RewardSpec) -> Reward:
    """Build a reward from a registered name, a config dict ``{"name": ..., **kwargs}`` or an instance.

    Examples: ``"jpeg_compressibility"``, ``{"name": "brightness", "target": 0.35}``,
    ``{"name": "weighted_sum", "rewards": [{"name": "digit_correctness", "weight": 1.0}, ...]}``.
    The result is frozen (see ``Reward``).
    """
    if isinstance(spec, Reward):
        return spec.freeze()
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(
                f"reward spec: a dict needs a 'name' key (one of {registered_rewards()}), got keys {sorted(spec)}"
            )
        kwargs = dict(spec)
        name = kwargs.pop("name")
    else:
        raise ValueError(
            f"reward spec: expected a registered name, a dict {{'name': ..., **kwargs}} or a Reward instance, "
            f"got {type(spec).__name__}"
        )
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"reward spec: unknown reward name {name!r}; registered rewards: {sorted(_REGISTRY)}. A reward "
                         "of your own: register it with @register_reward and import its module first (lit-distill "
                         "--import your_module)")
    try:
        reward = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"reward spec {name!r}: bad arguments {sorted(kwargs)}: {e}") from e
    return reward.freeze()


def _split_weight(item: Any) -> tuple[RewardSpec, float]:
    """``{"name": ..., "weight": w, **kw}`` / ``(spec, w)`` / spec -> (spec, weight)."""
    if isinstance(item, Mapping) and "weight" in item:
        item = dict(item)
        return item, float(item.pop("weight"))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], float(item[1])
    return item, 1.0


def _unique_name(name: str, taken: Sequence[str]) -> str:
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    return out


@register_reward("weighted_sum")
class WeightedSum(Reward):
    """``sum_i w_i * reward_i(images, ...)``: several rewards in one score (multi-reward RL baselines).

    Args:
        rewards: ``{spec_name: weight}`` or a list of items, each ``{"name": ..., "weight": w, **kwargs}``,
            ``(spec, weight)`` or a spec (weight 1). Specs are anything ``build_reward`` accepts.

    ``max_value`` is ``sum_i w_i * max_i`` when every weight is >= 0 and every ``max_i`` is known,
    else ``None``. ``components(...)`` returns the unweighted scores by name, for logging.
    """

    name = "weighted_sum"

    def __init__(self, rewards: Mapping[str, float] | Sequence[Any]):
        super().__init__()
        items = list(rewards.items()) if isinstance(rewards, Mapping) else [_split_weight(r) for r in rewards]
        if not items:
            raise ValueError("rewards: WeightedSum needs at least one reward")
        self.rewards = nn.ModuleList([build_reward(spec) for spec, _ in items])
        self.weights = [float(w) for _, w in items]
        names: list[str] = []
        for r in self.rewards:
            names.append(_unique_name(r.name, names))
        self.names = names
        self.differentiable = all(r.differentiable for r in self.rewards)
        maxes = [r.max_value for r in self.rewards]
        ok = all(m is not None for m in maxes) and all(w >= 0 for w in self.weights)
        self.max_value = sum(w * m for w, m in zip(self.weights, maxes)) if ok else None

    def components(
        self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any
    ) -> dict[str, Tensor]:
        """Validated scores ``{name: Tensor[B]}`` of each reward, unweighted."""
        return {
            n: validate_rewards(r(images, prompts, tasks, **metadata), images.shape[0], n)
            for n, r in zip(self.names, self.rewards)
        }

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        parts = self.components(images, prompts, tasks, **metadata)
        return sum(w * v for w, v in zip(self.weights, parts.values()))


def _take_rows(value: Any, idx: list[int], batch_size: int) -> Any:
    """Rows ``idx`` of a batched metadata field (tensor or list of length B); other values unchanged."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value[torch.as_tensor(idx, device=value.device)]
    if isinstance(value, (list, tuple)) and len(value) == batch_size:
        return type(value)(value[i] for i in idx)
    return value


@register_reward("per_task")
class TaskRouted(Reward):
    """Score each row with the reward of its task: ``out[i] = rewards[tasks[i]](row i)``.

    Args:
        rewards: ``{task: spec}``, each spec anything ``build_reward`` accepts.

    Rows are grouped by task and each reward sees only its rows (and the matching rows of batched
    metadata). A task missing from the map raises ``ValueError``. ``max_values`` maps task -> max;
    ``max_value`` is their common value when all are equal, else ``None``.
    """

    name = "per_task"

    def __init__(self, rewards: Mapping[str, RewardSpec]):
        super().__init__()
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("rewards: TaskRouted needs a non-empty dict {task: reward spec}")
        self.tasks = [str(t) for t in rewards]
        self.rewards = nn.ModuleList([build_reward(s) for s in rewards.values()])
        self.max_values = {t: r.max_value for t, r in zip(self.tasks, self.rewards)}
        vals = set(self.max_values.values())
        self.max_value = vals.pop() if len(vals) == 1 else None
        self.differentiable = all(r.differentiable for r in self.rewards)

    def reward_for(self, task: str) -> Reward:
        """The reward that scores rows of ``task``."""
        if task not in self.tasks:
            raise ValueError(f"tasks: no reward for task {task!r}; known tasks: {self.tasks}; add it to the per_task map")
        return self.rewards[self.tasks.index(task)]

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        b = images.shape[0]
        if len(tasks) != b:
            raise ValueError(f"tasks: expected {b} task tags (one per image), got {len(tasks)}")
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            groups.setdefault(t, []).append(i)
        for t in groups:
            self.reward_for(t)  # fail before scoring anything
        out = torch.zeros(b, dtype=torch.float32, device=images.device)
        for t, idx in groups.items():
            r = self.reward_for(t)
            ix = torch.as_tensor(idx, device=images.device)
            meta = {k: _take_rows(v, idx, b) for k, v in metadata.items()}
            vals = r(images[ix], [prompts[i] for i in idx], [tasks[i] for i in idx], **meta)
            out = out.index_put((ix,), validate_rewards(vals, len(idx), f"{self.name}[{t}]:{r.name}"))
        return out
