"""One generation call's trip through the graph: prefill, then one token per step over the KV cache.

The exported graph returns `present = past ++ new` for every layer, so the cheapest loop hands
each call's present tensors back as the next call's past without looking at them. Three ways to
do that, one class each:

  numpy      `session.run` with numpy arrays: the reference path (every present is copied to numpy)
  ortvalue   `run_with_ort_values`: presents stay ONNX Runtime OrtValues, fed back untouched
  iobinding  an IO binding per call: presents are bound to the provider's device (CUDA memory on
             a GPU) and re-bound as the next past; only the logits come to the host

and one for a folder with the static KV cache contract (export/lower/ort_static.py):

  static     one buffer per layer bound once as past and present, written in place by the graph
             (runtime/static_loop.py); the left-padded rows the Generator builds are taken as
             their real tokens (the static cache is right-padded)

runtime/speculative.py's SpeculativeLoop has the same interface (`step`, `past_len`, `rewind`) over
a StaticCache, drafting and verifying several tokens per forward pass behind `step`.

All state lives in the object, one per call, so concurrent calls on one session never share it.
CUDA graphs are not used: the dynamic cache grows by one slot a step, and a captured graph needs
fixed shapes and addresses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgellama.errors import RuntimeInputError
from edgellama.runtime.session import OrtModel
from edgellama.runtime.static_loop import StaticCache, real_tokens

MODES = ("numpy", "ortvalue", "iobinding")   # the dynamic contract's loops
STATIC = "static"


def default_mode(model: OrtModel) -> str:
    if model.kv_cache == "static":
        return STATIC
    # Measured on CPU (see bench): OrtValues and IO binding both avoid copying the cache to numpy;
    # IO binding is the only way to keep it in GPU memory.
    return "iobinding" if model.provider == "cuda" else "ortvalue"


def check_mode(model: OrtModel, mode: str) -> None:
    """RuntimeInputError unless `mode` is a loop `model`'s KV cache contract can run."""
    if mode not in (*MODES, STATIC):
        raise RuntimeInputError(f"unknown KV loop mode {mode!r}; choose one of {', '.join((*MODES, STATIC))}")
    if (mode == STATIC) != (model.kv_cache == "static"):
        raise RuntimeInputError(f"KV loop mode {mode!r} does not fit {model.folder}, which has the "
                                f"{model.kv_cache} KV cache contract (its loop mode is {default_mode(model)!r})")


def make_loop(model: OrtModel, batch: int, *, mode: str | None = None, capacity: int | None = None) -> "_Loop":
    """A loop for one call; `capacity` (prompt + new tokens) sizes the static cache's buffers."""
    mode = mode or default_mode(model)
    check_mode(model, mode)
    if mode == STATIC:
        return StaticLoop(model, batch, capacity=capacity or model.max_positions)
    return {"numpy": NumpyLoop, "ortvalue": OrtValueLoop, "iobinding": IoBindingLoop}[mode](model, batch)


class _Loop:
    def __init__(self, model: OrtModel, batch: int):
        self.model = model
        self.batch = batch
        self.past_len = 0

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one call; returns the last position's logits [B, V] (float32, on the host)."""
        if attention_mask.shape[1] != self.past_len + input_ids.shape[1]:
            raise RuntimeInputError("attention_mask must cover past + new tokens")
        logits = self._run(np.ascontiguousarray(input_ids, np.int64), np.ascontiguousarray(attention_mask, np.int64),
                           np.ascontiguousarray(position_ids, np.int64))
        self.past_len = attention_mask.shape[1]
        return logits

    def _run(self, ids, mask, pos) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def rewind(self, n: int) -> None:
        """Forget the last `n` cached tokens (a chat session going back, a rejected draft)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= self.past_len:
            raise RuntimeInputError(f"cannot rewind {n!r} tokens: the cache holds {self.past_len}")
        if n:
            self._keep_first(self.past_len - int(n))
            self.past_len -= int(n)

    def _keep_first(self, length: int) -> None:
        # Dynamic loops: the past as host arrays cut to `length` slots, handed back in this loop's
        # own form (a rewind is rare next to steps, so the copy does not matter).
        arrays = [np.ascontiguousarray(_host(p)[:, :, :length]) for p in self.past]
        self.past = self._from_host(arrays)

    def _from_host(self, arrays: list[np.ndarray]) -> list[Any]:
        return arrays


class NumpyLoop(_Loop):
    def __init__(self, model: OrtModel, batch: int):
        super().__init__(model, batch)
        self.past: list[np.ndarray] = model.empty_past(batch)

    def _run(self, ids, mask, pos):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **dict(zip(self.model.past_names,
                                                                                            self.past))}
        out = self.model.session.run(["logits", *self.model.present_names], feeds)
        self.past = out[1:]
        return out[0][:, -1, :]


class OrtValueLoop(_Loop):
    def __init__(self, model: OrtModel, batch: int):
        super().__init__(model, batch)
        import onnxruntime as ort

        self._ov = ort.OrtValue
        self._keep: list[np.ndarray] = []   # numpy buffers the OrtValues of the current call borrow
        self.past: list[Any] = [self._wrap(a) for a in model.empty_past(batch)]

    def _wrap(self, array: np.ndarray) -> Any:
        self._keep.append(array)
        return self._ov.ortvalue_from_numpy(array)

    def _from_host(self, arrays):
        self._rewound = arrays      # the OrtValues borrow these until the next step replaces them
        return [self._ov.ortvalue_from_numpy(a) for a in arrays]

    def _run(self, ids, mask, pos):
        self._keep = []
        feeds = {"input_ids": self._wrap(ids), "attention_mask": self._wrap(mask), "position_ids": self._wrap(pos),
                 **dict(zip(self.model.past_names, self.past))}
        out = self.model.session.run_with_ort_values(["logits", *self.model.present_names], feeds)
        self.past = list(out[1:])
        logits = out[0].numpy()
        return logits[:, -1, :]


class IoBindingLoop(_Loop):
    def __init__(self, model: OrtModel, batch: int):
        super().__init__(model, batch)
        self.device = "cuda" if model.provider == "cuda" else "cpu"
        self.binding = model.session.io_binding()
        self.past: list[Any] | None = None
        self._empty = model.empty_past(batch)

    def _keep_first(self, length: int) -> None:
        if self.past is not None:
            super()._keep_first(length)

    def _from_host(self, arrays):
        import onnxruntime as ort

        self._rewound = arrays
        if self.device == "cuda":
            return [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]
        return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

    def _run(self, ids, mask, pos):
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        # Inputs of a few int64s: host arrays, copied to the device by ONNX Runtime when it needs them.
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        b.bind_cpu_input("position_ids", pos)
        for i, name in enumerate(self.model.past_names):
            if self.past is None:
                b.bind_cpu_input(name, self._empty[i])
            else:
                b.bind_ortvalue_input(name, self.past[i])
        b.bind_output("logits", "cpu")
        for name in self.model.present_names:
            b.bind_output(name, self.device)    # left on the device, shape chosen by ONNX Runtime
        self.model.session.run_with_iobinding(b)
        out = b.get_outputs()
        self.past = list(out[1:])
        return out[0].numpy()[:, -1, :]


class StaticLoop(_Loop):
    """The Generator's loop interface over a StaticCache: the first call's rows (left- or
    right-padded) go in as their real tokens, every later call is one token per row; position ids
    are not fed (the graph derives them from the lengths)."""

    def __init__(self, model: OrtModel, batch: int, *, capacity: int):
        super().__init__(model, batch)
        self.cache = StaticCache(model, batch, capacity)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        # A decode step (one token per row after a prefill): the ids go straight into the bound
        # buffer; the mask is only checked, and neither it nor the positions are copied.
        if self.past_len and input_ids.shape[1] == 1 and attention_mask.shape[1] == self.past_len + 1:
            return self.advance(input_ids[:, 0])
        return super().step(input_ids, attention_mask, position_ids)

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """One token per row (int64 [B]) after what the cache holds: `step` for a decode step without
        the mask and positions it would only check and drop (the graph derives both from the
        lengths). Logits [B, V]: a view of the bound output, valid until the next call."""
        logits = self.cache.step(tokens)
        self.past_len += 1
        return logits

    def _run(self, ids, mask, pos):
        if self.past_len and ids.shape[1] == 1:
            return self.cache.step(ids[:, 0])
        return self.cache.prefill(real_tokens(ids, mask[:, -ids.shape[1]:]))

    def _keep_first(self, length: int) -> None:
        self.cache.rewind(self.past_len - length)


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
