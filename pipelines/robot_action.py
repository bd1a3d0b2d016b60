"""``RobotActionPipeline``: camera image(s) + instruction + past actions -> the next action chunk in robot units.

```python
import modeling_actprior                      # registers the "robot-action" task
from transformers import pipeline

robot = pipeline("robot-action", model="org/actprior-vla")
out = robot(image, instruction="open the drawer", history=past_actions, embodiment="sawyer", seed=0)
out["actions"]        # (chunk_size, action_dim) float32 numpy, raw units of that robot
```

Inputs (one sample, or lists for a batch):

* ``images``: a PIL image, an ``(H, W, 3)`` uint8 array or an image path; or a dict ``{camera: image}`` (the VLA
  sees one camera: the dict's only entry, or the one named by ``camera=``).
* ``instruction``: the task in words.
* ``history``: raw past actions ``(K', action_dim)``, oldest first, in the robot's own units; ``K'`` may be 0
  (episode start) or shorter than the model's ``history_length`` K; longer histories keep their last K steps.
* ``embodiment``: the robot's name; the checkpoint must carry normalization statistics for it.
* ``state``: optional current state ``(S,)``, standardized as in training (``S <= max_state_dim``).
* ``num_inference_steps``: flow steps (default: the checkpoint's scheduler; a shortcut-trained checkpoint samples well
  in 1 or 2).
* ``previous_chunk``, ``inference_delay``, ``execution_horizon``, ``max_guidance_weight``: real-time chunking (Black et
  al. 2025). ``previous_chunk`` is what is left of the chunk being executed, ``(L, action_dim)`` raw actions, the next
  one to execute first (or the previous call's output dict, whose embodiment is then checked, sliced by the caller:
  ``{**out, "actions": out["actions"][executed:]}``). The robot keeps executing it while this chunk is computed, for
  ``inference_delay`` control steps: the new chunk's first ``inference_delay`` actions ARE those committed actions,
  exactly; the next ones, up to ``execution_horizon`` (default ``L``), are guided through the flow toward the previous
  chunk with a weight that decays over the horizon; the rest is free. ``max_guidance_weight`` (default 5) caps the
  guidance scale; 0 keeps only the committed prefix.
* ``seed`` (int, or one per sample) or ``generator`` (one, or one per sample): each sample draws its initial noise
  ``(chunk_size, max_action_dim)`` from its own generator, so a sample's actions do not depend on which batch it
  was in.

Output: a dict (a list of dicts for a batch) with ``actions`` ``(chunk_size, action_dim)`` raw, ``embodiment``,
``action_names``, ``fps``, ``chunk_size`` and ``control_mode``.

Every call samples with its own scheduler copy (``scheduler.for_run``), so one pipeline may serve many threads. The
model runs under ``torch.inference_mode`` (outputs are numpy arrays).

This file is copied next to exported checkpoints (``custom_pipelines`` in config.json) and loaded with
``trust_remote_code=True`` where ``modeling_actprior`` is not installed, so it imports only transformers, torch,
numpy and PIL.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Pipeline

TASK = "robot-action"


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class RobotActionPipeline(Pipeline):
    """Closed-loop inference for ``VLAWithPriorForAction`` checkpoints (see the module docstring for inputs)."""

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, camera: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "The robot-action pipeline needs the checkpoint's ActionPriorProcessor (image processor, tokenizer, "
                "action statistics); save it beside the model (processor.save_pretrained) or pass processor=."
            )
        self.camera = camera

    # ------------------------------------------------------------------------------------ call
    def __call__(self, images, instruction=None, history=None, embodiment=None, state=None, **kwargs):
        """Next action chunk(s); a list of images is one batch (one VLM forward) and returns a list of dicts."""
        inputs = {"images": images, "instruction": instruction, "history": history, "embodiment": embodiment,
                  "state": state}
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, num_inference_steps=None, seed=None, generator=None, camera=None,
                             previous_chunk=None, inference_delay=None, execution_horizon=None,
                             max_guidance_weight=None, **kwargs):
        if kwargs:
            raise TypeError(
                f"robot-action got unexpected arguments {sorted(kwargs)}; it takes images, instruction, history, "
                "embodiment, state, num_inference_steps, seed, generator, camera, and for real-time chunking "
                "previous_chunk, inference_delay, execution_horizon and max_guidance_weight."
            )
        if previous_chunk is None and any(v is not None for v in (inference_delay, execution_horizon,
                                                                   max_guidance_weight)):
            raise ValueError("inference_delay, execution_horizon and max_guidance_weight belong to real-time chunking "
                             "and need previous_chunk= (what is left of the chunk being executed).")
        preprocess = {k: v for k, v in (("seed", seed), ("generator", generator), ("camera", camera)) if v is not None}
        if previous_chunk is not None:
            preprocess["rtc"] = {"previous_chunk": previous_chunk, "inference_delay": inference_delay,
                                 "execution_horizon": execution_horizon, "max_guidance_weight": max_guidance_weight}
        forward = {"num_inference_steps": num_inference_steps} if num_inference_steps is not None else {}
        return preprocess, forward, {}

    def get_inference_context(self):
        """``torch.inference_mode``: the model's outputs leave the pipeline as numpy arrays, never into autograd."""
        return torch.inference_mode

    @property
    def normalizer(self):
        """The checkpoint's action statistics (the model's, else the processor's copy)."""
        norm = getattr(self.model, "normalizer", None) or getattr(self.processor, "action_normalizer", None)
        if norm is None:
            raise ValueError(
                "This checkpoint carries no action normalization statistics (action_normalizer.json), so its outputs "
                "cannot be turned into robot units. Save the normalizer fitted on the training data with the model."
            )
        return norm

    # ------------------------------------------------------------------------------------ steps
    def preprocess(self, inputs, seed=None, generator=None, camera=None, rtc=None):
        batched = isinstance(inputs["images"], (list, tuple))
        images = list(inputs["images"]) if batched else [inputs["images"]]
        b = len(images)
        if b == 0:
            raise ValueError("Got an empty list of images; pass at least one observation.")
        texts = self._per_sample(inputs["instruction"], b, "instruction", str)
        if any(not isinstance(t, str) for t in texts):
            raise TypeError("instruction must be a string (or a list of one string per image).")
        names = self._per_sample(inputs["embodiment"], b, "embodiment", str)
        norm = self.normalizer
        specs = [norm.spec(n) if isinstance(n, str) else self._no_embodiment(n) for n in names]
        histories = self._histories(inputs["history"], b, batched, specs)
        pixels = [self._load_image(img, i, camera or self.camera) for i, img in enumerate(images)]
        feats = dict(self.processor(images=pixels, text=texts, history=histories, embodiment=names))
        feats["pixel_values"] = feats["pixel_values"].to(self.model.dtype)
        state = self._states(inputs["state"], b, batched)
        if state is not None:
            feats["state"] = state
        feats["noise"] = self._noise(b, seed, generator)
        feats["embodiments"] = names
        feats["batched"] = batched
        feats["committed"] = None
        if rtc is not None:
            feats["guidance"], feats["committed"] = self._guidance(rtc, names, specs, b, batched)
        return feats

    def _forward(self, model_inputs, num_inference_steps=None):
        names, batched = model_inputs.pop("embodiments"), model_inputs.pop("batched")
        committed = model_inputs.pop("committed")
        chunk = self.model.predict_action(**model_inputs, num_inference_steps=num_inference_steps)
        return {"chunk": chunk, "embodiments": names, "batched": batched, "committed": committed}

    def postprocess(self, model_outputs):
        norm, chunk = self.normalizer, model_outputs["chunk"].float().cpu()
        committed = model_outputs.get("committed")
        out = []
        for i, name in enumerate(model_outputs["embodiments"]):
            spec = norm.spec(name)
            actions = norm.unnormalize(chunk[i], name).numpy().astype(np.float32)
            if committed is not None and len(committed[i]):
                actions[: len(committed[i])] = committed[i]  # the very values the robot executes, not a round trip
            out.append({
                "actions": actions,
                "embodiment": name,
                "action_names": list(spec.action_names),
                "fps": float(spec.fps),
                "chunk_size": int(chunk.shape[1]),
                "control_mode": spec.control_mode,
            })
        return out if model_outputs["batched"] else out[0]

    # ------------------------------------------------------------------------------------ input checks
    @staticmethod
    def _per_sample(value, b, what, kind):
        if isinstance(value, (list, tuple)):
            if len(value) != b:
                raise ValueError(f"Got {b} images but {len(value)} values of {what}; give one {what} per image "
                                 "(or a single one for all).")
            return list(value)
        return [value] * b

    def _no_embodiment(self, value):
        raise ValueError(
            f"embodiment must be the robot's name; got {value!r}. This checkpoint has statistics for: "
            f"{', '.join(self.normalizer.embodiment_names)}."
        )

    def _histories(self, history, b, batched, specs):
        if history is None:
            rows = [None] * b
        elif batched and (isinstance(history, (list, tuple)) or getattr(history, "ndim", 0) == 3):
            rows = list(history)
            if len(rows) != b:
                raise ValueError(f"Got {b} images but {len(rows)} histories; give one (steps, action_dim) history "
                                 "per image.")
        else:
            rows = [history] * b
        k = self.processor.history_length
        out = []
        for i, (h, spec) in enumerate(zip(rows, specs)):
            if h is None:
                h = np.zeros((0, spec.action_dim), np.float32)
            h = h.detach().cpu().float().numpy() if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.float32)
            if h.size == 0:
                h = h.reshape(0, spec.action_dim)
            if h.ndim == 1 and h.shape[0] == spec.action_dim:
                h = h[None]
            if h.ndim != 2 or h.shape[-1] != spec.action_dim:
                raise ValueError(
                    f"history{f' {i}' if batched else ''} for {spec.name!r} must be (steps, {spec.action_dim}) raw "
                    f"actions ({', '.join(spec.action_names)}), oldest first; got shape {tuple(h.shape)}."
                )
            out.append(h[-k:] if k > 0 else h[:0])
        return out

    def _guidance(self, rtc, names, specs, b, batched):
        """Real-time chunking inputs -> (guidance for the model in normalized units, committed raw prefixes)."""
        pc = self.model.config.prior_config
        horizon_len, d = pc.chunk_size, rtc["inference_delay"]
        d = 0 if d is None else d
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"inference_delay must be a whole number of control steps >= 0; got {d!r}.")
        if d >= horizon_len:
            raise ValueError(f"inference_delay={d} is not shorter than the chunk ({horizon_len} steps): the new chunk "
                             "would be all committed actions. Execute fewer steps per chunk or compute faster.")
        prev = rtc["previous_chunk"]
        rows = list(prev) if batched and (isinstance(prev, (list, tuple)) or getattr(prev, "ndim", 0) == 3) \
            else [prev] * b
        if len(rows) != b:
            raise ValueError(f"Got {b} images but {len(rows)} previous chunks; give one per image.")
        targets, horizons, committed = [], [], []
        for i, (row, name, spec) in enumerate(zip(rows, names, specs)):
            which = f"previous_chunk{f' {i}' if batched else ''}"
            if isinstance(row, dict):
                if row.get("embodiment") not in (None, name):
                    raise ValueError(f"{which} was made for embodiment {row.get('embodiment')!r}, but this call is "
                                     f"for {name!r}: real-time chunking continues a chunk of the same robot.")
                row = row.get("actions")
            a = row.detach().cpu().float().numpy() if isinstance(row, torch.Tensor) else np.asarray(row, np.float32)
            if a.ndim != 2 or a.shape[-1] != spec.action_dim or not 1 <= a.shape[0] <= horizon_len:
                raise ValueError(
                    f"{which} for {name!r} must be (steps, {spec.action_dim}) raw actions ({', '.join(spec.action_names)}"
                    f"), what is left of the executing chunk, 1 to {horizon_len} steps; got shape {tuple(a.shape)}.")
            if not np.isfinite(a).all():
                raise ValueError(f"{which} contains NaN or inf; pass the actions the robot is executing.")
            if d > a.shape[0]:
                raise ValueError(f"inference_delay={d} is longer than {which} ({a.shape[0]} steps left): the robot "
                                 "would run out of actions before the new chunk is ready.")
            h = a.shape[0] if rtc["execution_horizon"] is None else rtc["execution_horizon"]
            if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not d <= h <= a.shape[0]:
                raise ValueError(f"execution_horizon must be a whole number between inference_delay={d} and the "
                                 f"{a.shape[0]} steps of {which}; got {h!r}.")
            target = torch.zeros(horizon_len, pc.max_action_dim)
            target[: a.shape[0]] = self.normalizer.normalize(torch.from_numpy(a), name)[0]
            targets.append(target)
            horizons.append(int(h))
            committed.append(a[:d].astype(np.float32))
        beta = 5.0 if rtc["max_guidance_weight"] is None else float(rtc["max_guidance_weight"])
        if not np.isfinite(beta) or beta < 0:
            raise ValueError(f"max_guidance_weight must be a finite number >= 0; got {rtc['max_guidance_weight']!r}.")
        guidance = {"target": torch.stack(targets), "inference_delay": int(d), "execution_horizon": horizons,
                    "max_weight": beta}
        return guidance, committed

    def _states(self, state, b, batched):
        if state is None:
            return None
        width = int(getattr(self.model.config.prior_config, "max_state_dim", 0))
        if width == 0:
            raise ValueError("This checkpoint does not read states (prior max_state_dim=0); drop state=.")
        rows = list(state) if batched and (isinstance(state, (list, tuple)) or getattr(state, "ndim", 0) == 2) \
            else [state] * b
        out = torch.zeros(b, width)
        for i, s in enumerate(rows):
            s = torch.as_tensor(np.asarray(s, dtype=np.float32)).reshape(-1)
            if s.shape[0] > width:
                raise ValueError(f"state has {s.shape[0]} values; this checkpoint reads at most max_state_dim={width}.")
            if not torch.isfinite(s).all():
                d = int(torch.nonzero(~torch.isfinite(s))[0, 0])
                raise ValueError(f"state {i} contains NaN or inf (dimension {d}, value {s[d].item()}); pass the "
                                 "robot's measured state, finite in every dimension.")
            out[i, : s.shape[0]] = s
        return out

    def _load_image(self, img, i, camera):
        if isinstance(img, dict):
            if camera is not None:
                if camera not in img:
                    raise KeyError(f"Camera {camera!r} is not among the given cameras {sorted(img)}.")
                img = img[camera]
            elif len(img) == 1:
                img = next(iter(img.values()))
            else:
                raise ValueError(
                    f"Got {len(img)} cameras {sorted(img)} but this model sees one image; pick it with "
                    "camera='NAME' (in the call or when building the pipeline)."
                )
        if isinstance(img, (str, os.PathLike)):
            from PIL import Image

            if not os.path.isfile(img):
                raise FileNotFoundError(f"Image {i}: no file at {img}.")
            with Image.open(img) as f:
                return f.convert("RGB")
        if type(img).__module__.startswith("PIL."):
            return img.convert("RGB")
        if isinstance(img, torch.Tensor):
            raise TypeError(f"Image {i}: got a torch tensor {_describe(img)}; pass a PIL image or an (H, W, 3) uint8 "
                            "numpy array (img.permute(1, 2, 0).mul(255).byte().numpy() for a CHW float tensor).")
        if isinstance(img, np.ndarray):
            if img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8:
                return img
            hint = ""
            if img.dtype != np.uint8 and np.issubdtype(img.dtype, np.floating):
                hint = " For floats in [0, 1] use (img * 255).round().astype(np.uint8)."
            elif img.ndim == 3 and img.shape[0] == 3:
                hint = " For a channels-first image use img.transpose(1, 2, 0)."
            elif img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (1, 4)):
                hint = " Convert to RGB first (e.g. PIL.Image.fromarray(img).convert('RGB'))."
            raise ValueError(f"Image {i}: expected an (H, W, 3) uint8 RGB array; got {_describe(img)}.{hint}")
        raise TypeError(f"Image {i}: expected a PIL image, an (H, W, 3) uint8 array, a path, or a dict of cameras; "
                        f"got {_describe(img)}.")

    def _noise(self, b, seed, generator):
        pc = self.model.config.prior_config
        shape = (pc.chunk_size, pc.max_action_dim)
        if generator is not None and seed is not None:
            raise ValueError("Pass seed or generator, not both.")
        if seed is not None:
            seeds = self._per_sample(seed, b, "seed", int)
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        elif generator is not None:
            gens = self._per_sample(generator, b, "generator", torch.Generator)
        else:
            gens = [None] * b
        # Drawn on the CPU sample by sample: a sample's noise depends only on its own generator.
        return torch.stack([torch.randn(shape, generator=g) for g in gens])


__all__ = ["TASK", "RobotActionPipeline"]
