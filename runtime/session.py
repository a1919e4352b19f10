"""One exported model folder as an ONNX Runtime session, checked before it is trusted.

`OrtModel` verifies the folder (manifest, sizes, hashes), refuses external data that points
outside it, picks the execution provider, and offers one plain-numpy `forward` over the graph
contract of ARCHITECTURE.md. The Generator (generator.py) drives the same session through
OrtValues / IO binding so the KV cache never round-trips through numpy.

Provider choice: `cuda` means CUDA or an error (ProviderError); with `strict` (the default for
cuda) ONNX Runtime's silent CPU fallback for unsupported nodes is disabled
(`session.disable_cpu_ep_fallback`), so a model that would run partly on the CPU fails loudly
instead of running slowly. `auto` takes CUDA when it can start here, else the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import numpy as np

from edgellama.errors import ModelFolderError, ProviderError, RuntimeInputError
from edgellama import contract
from edgellama import folder as model_folder
from edgellama.export.config import LlamaConfig

PROVIDERS = ("auto", "cpu", "cuda")
_ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None,
              "tensor(int64)": np.int64}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ProviderError(f"onnxruntime is not installed ({e})") from None
    return onnxruntime


# -- providers ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cuda_status() -> tuple[bool, str]:
    """(available, reason): whether ONNX Runtime's CUDA provider can start on this machine.

    onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot load, and then silently
    runs on the CPU; so this loads the provider library (its dlopen error names the missing CUDA
    library) and starts a one-node session on it. Cached: the answer does not change in a process.
    """
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider (install onnxruntime-gpu)"
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if lib.is_file():
        try:
            ctypes.CDLL(str(lib), mode=getattr(os, "RTLD_LAZY", 1))
        except OSError as e:
            reason = str(e).removeprefix(f"{lib}: ").strip()
            return False, f"the CUDA provider cannot load: {reason}"
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any failure means "not available"
        return False, f"the CUDA provider failed to start ({str(e).splitlines()[0]})"
    if "CUDAExecutionProvider" not in sess.get_providers():
        return False, "the CUDA provider failed to start (no usable GPU or CUDA/cuDNN libraries)"
    return True, "ok"


def resolve_provider(provider: str, *, notice=None) -> str:
    """'cpu' or 'cuda' for a requested 'auto' | 'cpu' | 'cuda'; ProviderError when cuda cannot start."""
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return "cpu"
    ok, reason = cuda_status()
    if provider == "cuda":
        if not ok:
            raise ProviderError(f"CUDA is not available: {reason}")
        return "cuda"
    if ok:
        return "cuda"
    ort = _ort()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # A GPU build that cannot use the GPU: say so once, the user probably expected CUDA.
        (notice or _stderr_notice)(f"edgellama: running on CPU; CUDA is not available ({reason})")
    return "cpu"


class _StderrLine(logging.Handler):
    """One plain line on the current sys.stderr. The notice goes through logging, so an application
    silences it with `logging.getLogger("edgellama").setLevel(logging.ERROR)` or routes it with its own
    handlers (remove this one and set `propagate = True`)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


_log = logging.getLogger(__name__)
_log.addHandler(_StderrLine())
_log.propagate = False


def _stderr_notice(text: str) -> None:
    _log.warning(text)


# -- the model ------------------------------------------------------------------------------------
class OrtModel:
    """An exported model folder on one ONNX Runtime session.

    `proto` runs a ModelProto in place of the folder's model.onnx (a graph edited in memory, its
    weights still external in the folder): ONNX Runtime is told where they live
    (`session.model_external_initializers_file_folder_path`), so nothing is written into the folder.
    Graph outputs beyond the contract come back from `forward` by name.
    """

    def __init__(self, folder: str | Path, *, provider: str = "auto", strict: bool | None = None,
                 threads: int | None = None, verify: bool = True, optimization: str = "all",
                 session_config: dict[str, str] | None = None, proto: Any = None):
        ort = _ort()
        self.folder = Path(folder)
        if verify:
            self.manifest = model_folder.verify_folder(self.folder)
        else:
            self.manifest = model_folder.read_manifest(self.folder)
        try:
            self.config = LlamaConfig.from_dict(self.manifest.config)
        except (KeyError, TypeError) as e:
            raise ModelFolderError(f"{self.folder}: the manifest has no usable config ({e})") from None
        # model.onnx is untrusted input: its external data must stay inside the folder, whichever
        # graph runs. The folder's own is read as an outline (protobuf only): importing onnx and
        # onnx_ir to read it cost every process ~50 MB of resident memory.
        if proto is None:
            graph = model_folder.load_model_outline(self.folder)
        else:
            model_folder.check_external_data(proto, self.folder)
            graph = proto
        self.provider = resolve_provider(provider)
        self.strict = (self.provider == "cuda") if strict is None else bool(strict)
        self.threads = threads
        opts = session_options(threads=threads, strict=self.strict and self.provider != "cpu",
                               optimization=optimization, config=session_config)
        providers = [_ORT_PROVIDER[self.provider]]
        if self.provider == "cuda" and not self.strict:
            providers.append("CPUExecutionProvider")
        try:
            if proto is not None:
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(self.folder.resolve()))
                self.session = ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
            else:
                self.session = ort.InferenceSession(str(self.folder / model_folder.MODEL), opts,
                                                    providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if self.provider == "cuda" and "fallback" in first.lower():
                raise ProviderError(f"{self.folder}: some nodes have no CUDA kernel and CPU fallback is "
                                    "disabled (pass strict=False / --no-strict to allow it)") from None
            raise ModelFolderError(f"{self.folder}: ONNX Runtime cannot load the model: {first}") from None
        if self.provider == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ProviderError("CUDA is not available: the session fell back to the CPU")
        self._check_io()
        model_folder.check_vocab(graph, vocab_size=self.config.vocab_size, folder=self.folder)

    # -- graph contract ---------------------------------------------------------------------------
    def _check_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        n = self.config.num_hidden_layers
        self.past_names = contract.past_names(n)
        self.present_names = contract.present_names(n)
        # The static KV cache contract (export/lower/ort_static.py) has no position_ids: positions
        # follow from each row's length. Which one a folder has is what its manifest records.
        self.kv_cache = self.manifest.kv_cache
        if self.kv_cache not in ("static", "dynamic"):
            raise ModelFolderError(f"{self.folder}: unknown KV cache contract {self.kv_cache!r} in the manifest")
        want_in = [name for name in contract.input_names(n)
                   if not (self.kv_cache == "static" and name == contract.POSITION_IDS)]
        if self.kv_cache == "static" and contract.POSITION_IDS in inputs:
            raise ModelFolderError(f"{self.folder}: the manifest says static KV cache, the graph has position_ids")
        missing = [name for name in want_in if name not in inputs]
        missing += [name for name in ["logits", *self.present_names] if name not in outputs]
        if missing:
            raise ModelFolderError(f"{self.folder}: model.onnx does not follow the edgellama graph contract "
                                   f"(missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
        self.input_names = list(inputs)
        contract_outputs = [contract.LOGITS, *self.present_names]
        self.output_names = contract_outputs + [o for o in outputs if o not in contract_outputs]
        kv_type = inputs[self.past_names[0]].type
        dtype = _NP_DTYPES.get(kv_type)
        if dtype is None:
            raise ModelFolderError(f"{self.folder}: unsupported KV cache type {kv_type}")
        self.kv_dtype = np.dtype(dtype)

    @contextlib.contextmanager
    def run_errors(self) -> Iterator[None]:
        """ONNX Runtime's own error types (Fail, InvalidArgument, ...) raised by a run, as one
        RuntimeInputError line: the API raises only edgellama's typed errors."""
        try:
            yield
        except Exception as e:
            self.reraise(e)

    def reraise(self, e: BaseException) -> NoReturn:
        """`run_errors` for a hot loop, called in its `except` (entering a context manager each step
        costs more than the step's own bookkeeping; `try` is free until something is raised): raises
        the RuntimeInputError that stands for ONNX Runtime's error `e`, or `e` itself when it is not
        ONNX Runtime's."""
        if not _from_onnxruntime(e):
            raise e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"{self.folder}: ONNX Runtime failed to run the model: {first}") from None

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def weight_bytes(self) -> int:
        """Bytes of model.onnx.data (what a decode step reads from memory, to first order)."""
        return self.manifest.weight_bytes

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The past of a first call: [k0, v0, k1, v1, ...], each [batch, kv_heads, 0, head_dim]."""
        c = self.config
        return contract.empty_past(batch=batch, n_layers=c.num_hidden_layers, kv_heads=c.num_key_value_heads,
                                   head_dim=c.head_dim, dtype=self.kv_dtype)

    # -- input checks -------------------------------------------------------------------------------
    def check_ids(self, input_ids: np.ndarray) -> None:
        """Token ids must index the embedding table: ONNX Runtime's Gather would fail obscurely."""
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)].ravel()[0]
            raise RuntimeInputError(f"token id {int(bad)} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def check_positions(self, position_ids: np.ndarray) -> None:
        if position_ids.size and position_ids.max() >= self.max_positions:
            raise RuntimeInputError(f"position {int(position_ids.max())} is past the model's context "
                                    f"({self.max_positions} tokens)")

    # -- plain numpy forward ----------------------------------------------------------------------------
    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                past: Sequence[Any]) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """One call of the graph: (logits [B, S, V], present [k0, v0, ...], other graph outputs by name).

        `past` is the flat list [k0, v0, k1, v1, ...] (or (key, value) pairs), as `empty_past` and
        the previous call's `present` give it.
        """
        if self.kv_cache == "static":
            raise RuntimeInputError(f"{self.folder} has the static KV cache contract (no position_ids, one shared "
                                    "cache buffer); forward needs the dynamic one: use the Generator, or export "
                                    "with --kv-cache dynamic")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        if ids.ndim != 2 or mask.ndim != 2 or pos.shape != ids.shape or mask.shape[0] != ids.shape[0]:
            raise RuntimeInputError(f"input shapes do not fit: input_ids {ids.shape}, attention_mask {mask.shape}, "
                                    f"position_ids {pos.shape}")
        self.check_ids(ids)
        self.check_positions(pos)
        flat = contract.flatten(past)
        if len(flat) != len(self.past_names):
            raise RuntimeInputError(f"expected {len(self.past_names)} past tensors, got {len(flat)}")
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for name, value in zip(self.past_names, flat):
            feeds[name] = np.ascontiguousarray(value, dtype=self.kv_dtype)
        if mask.shape[1] != flat[0].shape[2] + ids.shape[1]:
            raise RuntimeInputError(f"attention_mask covers {mask.shape[1]} positions; past ({flat[0].shape[2]}) "
                                    f"+ input ({ids.shape[1]}) is {flat[0].shape[2] + ids.shape[1]}")
        with self.run_errors():
            out = self.session.run(self.output_names, feeds)
        n = 1 + len(self.present_names)
        return out[0], list(out[1:n]), dict(zip(self.output_names[n:], out[n:]))


def _from_onnxruntime(e: BaseException) -> bool:
    """An error of ONNX Runtime's: its own types, or the RuntimeError its Python layer raises
    (`run_with_iobinding` reports a failed run as a plain RuntimeError)."""
    if type(e).__module__.split(".")[0] == "onnxruntime":
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return isinstance(e, RuntimeError) and tb is not None and "onnxruntime" in Path(tb.tb_frame.f_code.co_filename).parts


def session_options(*, threads: int | None = None, strict: bool = False, optimization: str = "all",
                    config: dict[str, str] | None = None) -> Any:
    """ONNX Runtime SessionOptions as edgellama uses them everywhere (runtime, bench, parity)."""
    ort = _ort()
    opts = ort.SessionOptions()
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise RuntimeInputError(f"unknown optimization level {optimization!r}; choose one of {', '.join(levels)}")
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise RuntimeInputError(f"threads must be at least 1, got {threads}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if strict:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts
