"""The unified action space: embodiments, per-embodiment normalization, padding to ``D_max``.

Every robot speaks its own action language (a 4-D end-effector delta for a Sawyer in Meta-World, 7-D
joint targets for a KUKA arm...). The prior sees all of them through one lens:

1. ``EmbodimentSpec`` says what a robot's actions are (width, names, control mode, control rate).
2. ``ActionNormalizer`` maps raw actions into ``[-1, 1]`` with statistics measured on that robot's
   data (quantiles q01/q99 by default, mean/std as an option), pads them with zeros to ``D_max`` and
   returns a dimension mask; ``unnormalize`` is its exact inverse and cuts the padding off again.

Statistics are data: they are measured from a dataset, saved beside the weights as JSON
(``action_normalizer.json``) and loaded with the model. Nothing here hard-codes a robot's range.

This file is copied next to exported checkpoints for ``trust_remote_code`` loading, so it imports
nothing from the installed package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Union

import numpy as np
import torch

ACTION_NORMALIZER_NAME = "action_normalizer.json"
NORMALIZATION_MODES = ("quantile", "mean_std")
CONTROL_MODES = ("ee_delta", "ee_pose", "joint_position", "joint_delta", "joint_velocity", "other")

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]  # noqa: UP007 (a runtime alias)


class UnknownEmbodimentError(KeyError):
    """An embodiment name that neither the registry nor the data describe."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EmbodimentSpec:
    """What one robot's actions are.

    Args:
        name: lowercase, stable identifier (``"sawyer"``, ``"panda"``, ``"kuka_iiwa"``...).
        action_dim: width of the robot's raw action vector.
        action_names: one name per action dimension (``"x"``, ``"gripper"``, ``"joint_3"``...).
        control_mode: one of ``CONTROL_MODES``; what the numbers mean to the controller.
        fps: control rate in Hz at which the actions are executed.
        description: free text shown in model cards.
    """

    name: str
    action_dim: int
    action_names: tuple[str, ...]
    control_mode: str = "other"
    fps: float = 10.0
    description: str = ""

    def __post_init__(self):
        if not self.name or self.name != self.name.lower() or " " in self.name:
            raise ValueError(
                f"Embodiment names are lowercase without spaces (e.g. 'kuka_iiwa'); got {self.name!r}."
            )
        if int(self.action_dim) <= 0:
            raise ValueError(f"Embodiment {self.name!r}: action_dim must be positive, got {self.action_dim}.")
        object.__setattr__(self, "action_names", tuple(self.action_names))
        if len(self.action_names) != self.action_dim:
            raise ValueError(
                f"Embodiment {self.name!r}: {len(self.action_names)} action names for action_dim="
                f"{self.action_dim}; give exactly one name per action dimension."
            )
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(
                f"Embodiment {self.name!r}: control_mode {self.control_mode!r} is not one of {CONTROL_MODES}."
            )
        if not (float(self.fps) > 0):
            raise ValueError(f"Embodiment {self.name!r}: fps must be positive, got {self.fps}.")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["action_names"] = list(self.action_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> EmbodimentSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _joints(n: int) -> tuple[str, ...]:
    return tuple(f"joint_{i}" for i in range(n)) + ("gripper",)


_OSC_POSE = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")

# Robots shipped with the simulators we generate data from. Users add their own with
# `register_embodiment`, or get them registered from a LeRobot dataset's meta/info.json.
_BUILTIN_EMBODIMENTS = [
    EmbodimentSpec("sawyer", 4, ("x", "y", "z", "gripper"), "ee_delta", 80.0,
                   "Rethink Sawyer in Meta-World: end-effector delta xyz + gripper effort."),
    EmbodimentSpec("panda", 7, _OSC_POSE, "ee_delta", 20.0, "Franka Panda in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("robosuite_sawyer", 7, _OSC_POSE, "ee_delta", 20.0, "Sawyer in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("iiwa", 7, _OSC_POSE, "ee_delta", 20.0, "KUKA LBR iiwa in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("ur5e", 7, _OSC_POSE, "ee_delta", 20.0, "UR5e in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("jaco", 7, _OSC_POSE, "ee_delta", 20.0, "Kinova Jaco in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("kinova3", 7, _OSC_POSE, "ee_delta", 20.0, "Kinova Gen3 in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("xarm7", 7, _OSC_POSE, "ee_delta", 20.0, "UFactory xArm7 in robosuite, OSC_POSE deltas."),
    EmbodimentSpec("franka_joint", 8, _joints(7), "joint_position", 20.0,
                   "Franka Panda in pybullet: absolute joint targets (7) + gripper opening."),
    EmbodimentSpec("kuka_iiwa", 8, _joints(7), "joint_position", 20.0,
                   "KUKA iiwa in pybullet: absolute joint targets (7) + gripper command."),
    EmbodimentSpec("xarm6", 7, _joints(6), "joint_position", 20.0,
                   "UFactory xArm6 in pybullet: absolute joint targets (6) + gripper command."),
]

EMBODIMENT_REGISTRY: dict[str, EmbodimentSpec] = {spec.name: spec for spec in _BUILTIN_EMBODIMENTS}


def register_embodiment(spec: EmbodimentSpec, exist_ok: bool = True) -> EmbodimentSpec:
    """Add ``spec`` to the global registry.

    Registering the same spec twice is harmless; a *different* spec under a known name is an error,
    because two datasets would then silently disagree about what the numbers mean.
    """
    known = EMBODIMENT_REGISTRY.get(spec.name)
    if known is not None:
        if known == spec:
            return known
        defining = ("action_dim", "action_names", "control_mode", "fps")
        differ = [f for f in defining if getattr(known, f) != getattr(spec, f)]
        if differ or not exist_ok:
            raise ValueError(
                f"Embodiment {spec.name!r} is already registered with action_dim={known.action_dim} "
                f"({', '.join(known.action_names)}), {known.control_mode}, {known.fps:g} fps; the new spec has "
                f"action_dim={spec.action_dim} ({', '.join(spec.action_names)}), {spec.control_mode}, {spec.fps:g} fps "
                f"(differs in {', '.join(differ) or 'its description'}). Two robots under one name would be pooled "
                "as one: give the new robot its own name."
            )
        return known  # only the description differs
    EMBODIMENT_REGISTRY[spec.name] = spec
    return spec


def get_embodiment(name: str) -> EmbodimentSpec:
    """The registered spec for ``name``; a clear error listing the known names otherwise."""
    try:
        return EMBODIMENT_REGISTRY[name]
    except KeyError:
        raise UnknownEmbodimentError(
            f"Unknown embodiment {name!r}. Known embodiments: {', '.join(sorted(EMBODIMENT_REGISTRY))}. "
            "Register a new robot with modeling_actprior.register_embodiment(EmbodimentSpec(...)), or train "
            "on a LeRobot dataset whose meta/info.json describes it."
        ) from None


def check_finite(values: ArrayLike, what: str) -> None:
    """Raise a ValueError naming ``what`` and the first bad position if ``values`` holds NaN or inf."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(
            f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)}, value "
            f"{arr[tuple(bad)]}). Clean or drop those frames before training or inference."
        )


@dataclass
class EmbodimentStats:
    """Action statistics of one embodiment, per dimension (each a list of ``action_dim`` floats)."""

    mean: list[float]
    std: list[float]
    q01: list[float]
    q99: list[float]
    min: list[float] = field(default_factory=list)
    max: list[float] = field(default_factory=list)
    count: int = 0

    @classmethod
    def from_actions(cls, actions: ArrayLike) -> EmbodimentStats:
        """Measure statistics from raw actions of shape ``(N, action_dim)``."""
        a = np.asarray(actions.numpy() if isinstance(actions, torch.Tensor) else actions, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"Statistics need actions of shape (N, action_dim) with N > 0; got {a.shape}.")
        check_finite(a, "actions used for statistics")
        return cls(
            mean=a.mean(0).tolist(), std=a.std(0).tolist(),
            q01=np.quantile(a, 0.01, axis=0).tolist(), q99=np.quantile(a, 0.99, axis=0).tolist(),
            min=a.min(0).tolist(), max=a.max(0).tolist(), count=int(a.shape[0]),
        )

    @classmethod
    def from_dict(cls, d: Mapping) -> EmbodimentStats:
        missing = [k for k in ("mean", "std", "q01", "q99") if k not in d]
        if missing:
            raise ValueError(f"Action statistics lack {missing}; expected keys mean, std, q01, q99 (min, max, count optional).")
        out = cls(**{k: (np.asarray(d[k], dtype=np.float64).reshape(-1).tolist() if k != "count" else int(np.asarray(d[k]).reshape(-1)[0]))
                     for k in cls.__dataclass_fields__ if k in d})
        check_finite(np.asarray(out.mean + out.std + out.q01 + out.q99), "action statistics")
        q01, q99, std = np.asarray(out.q01), np.asarray(out.q99), np.asarray(out.std)
        # (mismatched widths are reported with the embodiment's action_dim where the statistics are attached)
        if len(q01) == len(q99) == len(std) and ((q01 > q99).any() or (std < 0).any()):
            d = int(np.flatnonzero((q01 > q99) | (std < 0))[0])
            raise ValueError(f"Action statistics are impossible at dimension {d}: q01={q01[d]:g}, q99={q99[d]:g}, "
                             f"std={std[d]:g} (expected q01 <= q99 and std >= 0). Recompute the statistics.")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class ActionNormalizer:
    """Per-embodiment normalization into the padded unified action space.

    ``normalize(actions, embodiment)`` takes raw actions ``(..., action_dim)`` and returns
    ``(normalized (..., D_max), dim_mask (D_max,) bool)`` where padded dims are exactly zero.
    ``unnormalize(normalized (..., D_max), embodiment)`` returns raw ``(..., action_dim)``.

    Quantile mode maps ``[q01, q99]`` affinely onto ``[-1, 1]`` (values outside stay outside, so the
    inverse is exact; clip with ``clip=True`` if a controller wants bounded outputs). Mean/std mode
    standardizes. Dimensions whose range is (near) zero — a gripper that never moved — map to 0 and
    back to their constant value.

    Args:
        max_action_dim: ``D_max``, the padded width shared by all embodiments.
        mode: ``"quantile"`` (default) or ``"mean_std"``.
        stats: ``{embodiment name: EmbodimentStats}``.
        embodiments: ``{name: EmbodimentSpec}`` for every embodiment in ``stats``; specs are saved with the
            stats, so a checkpoint knows its robots even where the global registry does not.
        eps: ranges below this are treated as constant.
    """

    def __init__(
        self,
        max_action_dim: int = 32,
        mode: str = "quantile",
        stats: Mapping[str, EmbodimentStats] | None = None,
        embodiments: Mapping[str, EmbodimentSpec] | None = None,
        eps: float = 1e-6,
    ):
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"Normalization mode must be one of {NORMALIZATION_MODES}; got {mode!r}.")
        if int(max_action_dim) <= 0:
            raise ValueError(f"max_action_dim must be positive; got {max_action_dim}.")
        self.max_action_dim = int(max_action_dim)
        self.mode = mode
        self.eps = float(eps)
        self.stats: dict[str, EmbodimentStats] = {}
        self.embodiments: dict[str, EmbodimentSpec] = {}
        self._affine_cache: dict[tuple[str, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, st in (stats or {}).items():
            spec = (embodiments or {}).get(name) or get_embodiment(name)
            self.add_embodiment(spec, st)

    # ----------------------------------------------------------------------------------------- setup
    def add_embodiment(self, spec: EmbodimentSpec, stats: EmbodimentStats | Mapping | ArrayLike) -> None:
        """Attach statistics for ``spec``: an ``EmbodimentStats``, a stats dict, or raw actions (N, A)."""
        if spec.action_dim > self.max_action_dim:
            raise ValueError(
                f"Embodiment {spec.name!r} has action_dim={spec.action_dim} > max_action_dim={self.max_action_dim}. "
                "Increase max_action_dim (D_max) in the model config."
            )
        if isinstance(stats, Mapping):
            stats = EmbodimentStats.from_dict(stats)
        elif not isinstance(stats, EmbodimentStats):
            stats = EmbodimentStats.from_actions(stats)
        for key in ("mean", "std", "q01", "q99"):
            if len(getattr(stats, key)) != spec.action_dim:
                raise ValueError(
                    f"Statistics for embodiment {spec.name!r}: {key} has {len(getattr(stats, key))} values but "
                    f"the embodiment has action_dim={spec.action_dim}. Recompute stats on this robot's actions."
                )
        self.stats[spec.name] = stats
        self.embodiments[spec.name] = spec
        self._affine_cache = {k: v for k, v in self._affine_cache.items() if k[0] != spec.name}

    @property
    def embodiment_names(self) -> list[str]:
        return sorted(self.stats)

    def spec(self, embodiment: str) -> EmbodimentSpec:
        if embodiment not in self.stats:
            hint = ("It is a known robot, but this checkpoint has no normalization statistics for it: "
                    "fine-tune on its data (the stats are measured then) or add them with add_embodiment()."
                    if embodiment in EMBODIMENT_REGISTRY else
                    "Add it with add_embodiment(EmbodimentSpec(...), stats) or train on its data.")
            raise UnknownEmbodimentError(
                f"Unknown embodiment {embodiment!r} for this normalizer. It has statistics for: "
                f"{', '.join(self.embodiment_names) or '(none)'}. {hint}"
            )
        return self.embodiments[embodiment]

    def _affine(self, embodiment: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offset, scale)`` of shape (action_dim,) with normalized = (raw - offset) / scale."""
        key = (embodiment, torch.device(device), dtype)
        if key not in self._affine_cache:
            st = self.stats[embodiment]
            if self.mode == "quantile":
                lo, hi = np.asarray(st.q01), np.asarray(st.q99)
                offset, scale = (hi + lo) / 2.0, (hi - lo) / 2.0
            else:
                offset, scale = np.asarray(st.mean), np.asarray(st.std)
            # A constant dimension maps to 0 and back to its constant; scale 1 keeps the map invertible.
            scale = np.where(np.abs(scale) < self.eps, 1.0, scale)
            self._affine_cache[key] = (
                torch.as_tensor(offset, dtype=dtype, device=device),
                torch.as_tensor(scale, dtype=dtype, device=device),
            )
        return self._affine_cache[key]

    # ----------------------------------------------------------------------------------------- maps
    def dim_mask(self, embodiment: str, device=None) -> torch.Tensor:
        """``(D_max,)`` bool, True for the embodiment's real action dimensions."""
        mask = torch.zeros(self.max_action_dim, dtype=torch.bool, device=device)
        mask[: self.spec(embodiment).action_dim] = True
        return mask

    def normalize(self, actions: ArrayLike, embodiment: str, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(..., action_dim)`` -> (normalized padded ``(..., D_max)`` float32, dim mask ``(D_max,)``)."""
        spec = self.spec(embodiment)
        a = _as_float_tensor(actions)
        if a.ndim == 0 or a.shape[-1] != spec.action_dim:
            raise ValueError(
                f"Actions for embodiment {embodiment!r} must have last dimension action_dim={spec.action_dim} "
                f"({', '.join(spec.action_names)}); got shape {tuple(a.shape)}."
            )
        check_finite(a, f"actions for embodiment {embodiment!r}")
        offset, scale = self._affine(embodiment, a.device, a.dtype)
        norm = (a - offset) / scale
        if clip:
            norm = norm.clamp(-1.0, 1.0)
        padded = torch.nn.functional.pad(norm, (0, self.max_action_dim - spec.action_dim))
        return padded, self.dim_mask(embodiment, device=a.device)

    def unnormalize(self, normalized: ArrayLike, embodiment: str) -> torch.Tensor:
        """Normalized padded ``(..., D_max)`` (or unpadded ``(..., action_dim)``) -> raw ``(..., action_dim)``."""
        spec = self.spec(embodiment)
        x = _as_float_tensor(normalized)
        if x.ndim == 0 or x.shape[-1] not in (self.max_action_dim, spec.action_dim):
            raise ValueError(
                f"Normalized actions must have last dimension D_max={self.max_action_dim} or "
                f"action_dim={spec.action_dim} for {embodiment!r}; got shape {tuple(x.shape)}."
            )
        x = x[..., : spec.action_dim]
        offset, scale = self._affine(embodiment, x.device, x.dtype)
        return x * scale + offset

    # ----------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        return {
            "max_action_dim": self.max_action_dim,
            "mode": self.mode,
            "eps": self.eps,
            "embodiments": {n: self.embodiments[n].to_dict() for n in self.embodiment_names},
            "stats": {n: self.stats[n].to_dict() for n in self.embodiment_names},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ActionNormalizer:
        try:
            specs = {n: EmbodimentSpec.from_dict(s) for n, s in d.get("embodiments", {}).items()}
            stats = {}
            for n, s in d["stats"].items():
                try:
                    stats[n] = EmbodimentStats.from_dict(s)
                except ValueError as e:
                    raise ValueError(f"Statistics of embodiment {n!r}: {e}") from None
            missing = sorted(set(stats) - set(specs))
            specs.update({n: get_embodiment(n) for n in missing})
            return cls(d["max_action_dim"], d.get("mode", "quantile"), stats, specs, d.get("eps", 1e-6))
        except KeyError as e:
            raise ValueError(f"Normalizer data lacks the field {e}; expected max_action_dim, mode, embodiments, stats.") from None

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ACTION_NORMALIZER_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs) -> ActionNormalizer:
        """Load ``action_normalizer.json`` from a folder, a file, or a Hub repo id."""
        path = str(path_or_repo)
        if os.path.isdir(path):
            path = os.path.join(path, ACTION_NORMALIZER_NAME)
        elif not os.path.isfile(path):
            from transformers.utils import cached_file

            path = cached_file(path, ACTION_NORMALIZER_NAME, **hub_kwargs)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {ACTION_NORMALIZER_NAME} at {path}: this checkpoint carries no action statistics. "
                "Compute them from the training data (ActionNormalizer.add_embodiment) and save them with the model."
            )
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); the file is damaged, re-save the normalizer.") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            if type(e) is not ValueError:  # e.g. UnknownEmbodimentError: keep its type
                raise
            raise ValueError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return (f"ActionNormalizer(max_action_dim={self.max_action_dim}, mode={self.mode!r}, "
                f"embodiments={self.embodiment_names})")


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.float()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def pad_actions(actions: torch.Tensor, max_action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(..., A)`` to ``(..., D_max)``; returns (padded, dim mask ``(D_max,)`` bool)."""
    a = actions.shape[-1]
    if a > max_action_dim:
        raise ValueError(f"Action width {a} exceeds max_action_dim={max_action_dim}; raise max_action_dim.")
    mask = torch.arange(max_action_dim, device=actions.device) < a
    return torch.nn.functional.pad(actions, (0, max_action_dim - a)), mask
