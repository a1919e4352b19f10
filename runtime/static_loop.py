"""One request's static KV cache: buffers allocated and bound once, written in place by the graph.

The static contract (export/lower/ort_static.py): per layer and kind one [B, kv_heads, M, D]
buffer bound as both `past_key_values.{i}.*` and `present.{i}.*`; GroupQueryAttention writes a
row's new keys at that row's length. Rows are RIGHT-padded: row b's tokens sit at slots
0..len_b-1; `attention_mask` [B, T] is read only for its row sums (the lengths) and its width.

Per request the buffers are sized to what it needs (prompt + max_new_tokens, rounded up; never the
model's whole context unless asked), the IO binding is set up once, and per decode step only the
token ids (written into a bound array) and the mask width change. A request longer than its
buffer grows it (a copy into a larger buffer, rebound) or, with `grow=False`, is refused in one
line: the graph is never given a length past the buffer.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgellama.errors import RuntimeInputError
from edgellama.runtime.session import OrtModel

# The static graph's overridable input (export/lower/ort_static.py): how many last positions'
# logits a call returns; runtime may import only export.config, so the name is repeated here.
LOGITS_TO_KEEP = "logits_to_keep"

ROUND_TO = 64


def buffer_slots(needed: int, *, limit: int, round_to: int = ROUND_TO) -> int:
    """Slots for a request of `needed` tokens: rounded up to `round_to`, at most `limit` (the context)."""
    return max(needed, min(-(-needed // round_to) * round_to, limit))


class StaticCache:
    """The cache buffers, the IO binding and the lengths of one request on a static-contract model."""

    def __init__(self, model: OrtModel, batch: int, capacity: int, *, grow: bool = True, round_to: int = ROUND_TO,
                 extra_outputs: Sequence[str] = ()):
        if model.kv_cache != "static":
            raise RuntimeInputError(f"{model.folder} has the dynamic KV cache contract; the static cache needs a "
                                    "folder exported with --kv-cache static")
        if capacity > model.max_positions:
            raise RuntimeInputError(f"the request needs {capacity} cache slots; the model's context is "
                                    f"{model.max_positions}")
        import onnxruntime as ort

        self._ort = ort
        self.model, self.batch, self.grow, self.round_to = model, batch, grow, round_to
        self.device = "cuda" if model.provider == "cuda" else "cpu"
        c = model.config
        self._shape = (batch, c.num_key_value_heads, 0, c.head_dim)
        self.binding = model.session.io_binding()
        self._session = model.session
        self.lengths = np.zeros(batch, np.int64)       # real tokens per row so far
        self._rows = np.arange(batch)
        self.width = 0                                  # mask width: the longest row (lengths.max())
        self.capacity = 0
        self.kv: list[Any] = [None] * len(model.past_names)
        self._host: list[np.ndarray | None] = [None] * len(model.past_names)   # CPU buffers the OrtValues borrow
        self.mask = np.zeros((batch, 0), np.int64)
        self._allocate(buffer_slots(capacity, limit=model.max_positions, round_to=round_to))
        self.step_ids = np.zeros((batch, 1), np.int64)
        self._step_ids = ort.OrtValue.ortvalue_from_numpy(self.step_ids)
        self.last_only, self.keeps = _head_kind(model)
        if self.last_only:
            self.logits = np.zeros((batch, 1, c.vocab_size), np.float32)
            self._logits = ort.OrtValue.ortvalue_from_numpy(self.logits)
            self.binding.bind_ortvalue_output("logits", self._logits)
        # K -> `logits_to_keep` as an OrtValue: bind_cpu_input refuses an input that is also an
        # initializer, bind_ortvalue_input takes it.
        self._counts = {1: ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))}
        if self.keeps:
            self.binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._counts[1])
        # Outputs ONNX Runtime shapes per call (bound again before each, or the last call's
        # allocation would be reused): all-position logits, further outputs such as parity's probes.
        self._per_call = ([] if self.last_only else ["logits"]) + list(extra_outputs)
        for name in self._per_call:
            self.binding.bind_output(name, "cpu")

    def outputs(self) -> list[np.ndarray]:
        """The last call's logits and extra outputs, in that order (after the bound caches)."""
        return [v.numpy() for v in self.binding.get_outputs()[len(self.kv):]]

    # -- buffers ----------------------------------------------------------------------------------
    def _allocate(self, slots: int) -> None:
        """(Re)allocate every buffer with `slots` slots, keeping what is cached, and bind it."""
        ov = self._ort.OrtValue
        shape = (*self._shape[:2], slots, self._shape[3])
        for j, (past, present) in enumerate(zip(self.model.past_names, self.model.present_names)):
            if self.device == "cpu":
                # np.zeros: pages nobody writes stay unallocated, so a generous buffer costs no memory.
                host = np.zeros(shape, self.model.kv_dtype)
                if self._host[j] is not None:
                    host[:, :, :self.capacity] = self._host[j]
                self._host[j] = host
                self.kv[j] = ov.ortvalue_from_numpy(host)
            else:
                host = np.zeros(shape, self.model.kv_dtype)
                if self.kv[j] is not None:
                    host[:, :, :self.capacity] = self.kv[j].numpy()
                self.kv[j] = ov.ortvalue_from_numpy(host, "cuda", 0)
            self.binding.bind_ortvalue_input(past, self.kv[j])
            self.binding.bind_ortvalue_output(present, self.kv[j])
        mask = np.zeros((self.batch, slots), np.int64)
        mask[:, :self.mask.shape[1]] = self.mask
        self.mask, self.capacity = mask, slots

    def _ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        limit = self.model.max_positions
        if not self.grow or needed > limit:
            raise RuntimeInputError(f"the request needs {needed} cache slots; its buffer holds {self.capacity} "
                                    f"({'growing is off' if not self.grow else f'the model context is {limit}'})")
        self._allocate(buffer_slots(max(needed, 2 * self.capacity), limit=limit, round_to=self.round_to))

    def key_values(self) -> list[np.ndarray]:
        """The buffers as numpy [B, kv_heads, capacity, D] (a copy on CUDA), flat [k0, v0, k1, ...]."""
        if self.device == "cpu":
            return list(self._host)
        return [v.numpy() for v in self.kv]

    # -- calls ------------------------------------------------------------------------------------
    def _run(self) -> None:
        # The mask's first `width` columns: at batch 1 a view of the buffer, contiguous as it is,
        # bound without a copy (the binding keeps it referenced until the next bind).
        mask = self.mask[:, :self.width]
        self.binding.bind_cpu_input("attention_mask", mask if self.batch == 1 else np.ascontiguousarray(mask))
        for name in self._per_call:
            self.binding.bind_output(name, "cpu")
        try:   # not model.run_errors(): entering a context manager each step costs as much as the rest of `step`
            self._session.run_with_iobinding(self.binding)
        except Exception as e:
            self.model.reraise(e)

    def append(self, rows: Sequence[Sequence[int]], *, keep: int | None = None) -> np.ndarray:
        """Several tokens per row (a prompt, or at batch 1 a further chunk), right-padded to the
        longest. Returns the graph's logits: [B, 1, V] (each row's last real position) on a
        last-position graph, else [B, S, V] (row b's real positions first); with `keep`=K,
        [B, K, V]: each row's last K real positions of this call (clamped at its first), one
        forward pass whatever the graph (older last-position folders can keep only 1)."""
        if len(rows) != self.batch or not all(rows):
            raise RuntimeInputError(f"expected {self.batch} non-empty rows of token ids")
        if keep is not None and (keep < 1 or (self.last_only and not self.keeps and keep != 1)):
            raise RuntimeInputError(f"cannot keep the logits of {keep} positions: "
                                    + ("keep at least 1" if keep < 1 else f"{self.model.folder} returns only the last "
                                       "position's (export it again for logits_to_keep)"))
        if self.width and self.batch > 1 and max(len(r) for r in rows) > 1:
            raise RuntimeInputError("several new tokens on a non-empty cache need batch 1 "
                                    "(ONNX Runtime's GroupQueryAttention refuses it for a batch)")
        longest = max(len(r) for r in rows)
        ids = np.zeros((self.batch, longest), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        self.model.check_ids(ids)
        self._ensure(int(self.lengths.max()) + longest)
        for i, r in enumerate(rows):
            self.mask[i, self.lengths[i]:self.lengths[i] + len(r)] = 1
            self.lengths[i] += len(r)
        # The first call's width is the longest prompt; then it follows the longest row.
        self.width = int(self.lengths.max())
        self._ids_now = ids
        self.binding.bind_cpu_input("input_ids", ids)
        several = keep is not None and keep != 1 and self.last_only
        if several:
            # The output is declared [B, 1, V], and ONNX Runtime refuses a bound [B, K, V] buffer
            # for it: it allocates this one call's logits itself.
            if keep not in self._counts:
                self._counts[keep] = self._ort.OrtValue.ortvalue_from_numpy(np.array([keep], np.int64))
            self.binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._counts[keep])
            self.binding.bind_output("logits", "cpu")
        try:
            self._run()
            if several:
                return self.binding.get_outputs()[len(self.kv)].numpy()
        finally:
            self.binding.bind_ortvalue_input("input_ids", self._step_ids)
            if several:   # back to the one position a step reads
                self.binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._counts[1])
                self.binding.bind_ortvalue_output("logits", self._logits)
        if self.last_only:
            return self.logits.copy()
        full = self.outputs()[0]
        if keep is None:
            return full
        pos = np.clip(np.array([len(r) for r in rows])[:, None] - keep + np.arange(keep), 0, longest - 1)
        return full[np.arange(self.batch)[:, None], pos]

    def prefill(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """`append`, then each row's last real position: logits [B, V]."""
        out = self.append(rows)
        if self.last_only:
            return out[:, 0]
        return out[np.arange(self.batch), [len(r) - 1 for r in rows]]

    def rewind(self, n: int | Sequence[int]) -> None:
        """Drop the last `n` tokens of every row (an int), or of each row (one count per row).

        Only the lengths, the mask and the width go back: the buffer slots past a row's new length
        are overwritten by the next tokens, and the graph never reads past a row's length. A count
        past a row's start (or negative) raises RuntimeInputError and changes nothing."""
        drop = np.asarray(n, np.int64)
        if drop.ndim > 1 or (drop.ndim == 1 and drop.shape[0] != self.batch):
            raise RuntimeInputError(f"rewind takes one count or {self.batch} counts (one per row)")
        drop = np.broadcast_to(drop, (self.batch,))
        if (drop < 0).any() or (drop > self.lengths).any():
            raise RuntimeInputError(f"cannot rewind {drop.tolist() if self.batch > 1 else int(drop[0])} tokens: "
                                    f"the cache holds {self.lengths.tolist() if self.batch > 1 else int(self.lengths[0])}")
        for i, (length, d) in enumerate(zip(self.lengths.tolist(), drop.tolist())):
            self.mask[i, length - d:length] = 0
        self.lengths = self.lengths - drop
        self.width = int(self.lengths.max())

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One token per row at that row's next slot; logits [B, V]: a view of the bound output, valid
        until the next call."""
        # Every row takes one token, so the longest row (the width) grows by one.
        width = self.width + 1
        if width > self.capacity:
            self._ensure(width)
        self.step_ids[:, 0] = tokens
        if self.batch == 1:     # its one row is the longest: plain item writes (a ufunc call costs more)
            self.mask[0, width - 1] = 1
            self.lengths[0] = width
        else:
            self.mask[self._rows, self.lengths] = 1
            self.lengths += 1
        self.width = width
        self._run()
        if not self.last_only:
            return self.outputs()[0][:, -1]
        return self.logits[:, 0]


def _head_kind(model: OrtModel) -> tuple[bool, bool]:
    """(last positions only, `logits_to_keep` fed): logits declared [B, 1, V] are each row's last
    position (K of them when the graph has the overridable `logits_to_keep` input; folders exported
    before it have not), else every position [B, S, V]."""
    out = next(o for o in model.session.get_outputs() if o.name == "logits")
    last = len(out.shape) == 3 and out.shape[1] == 1
    return last, last and LOGITS_TO_KEEP in {i.name for i in model.session.get_overridable_initializers()}


def real_tokens(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[list[int]]:
    """Rows of a padded batch (left or right) as their real tokens: what the static cache takes."""
    return [row[m.astype(bool)].tolist() for row, m in zip(np.asarray(input_ids), np.asarray(attention_mask))]
