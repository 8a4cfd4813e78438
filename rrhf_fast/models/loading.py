"""Load the model and tokenizer a run trains, from `--model` (a save_pretrained directory, a hub id
or a GGUF file).

`load_model` is the one place that decides how the weights come in: dtype, device, quantisation
(`--load-in-4bit`, `--load-in-8bit`), LoRA adapters (`--lora-r`) and gradient checkpointing.
`finish_model` is its second half, shared with benchmarks/memory_fit.py, which builds its models in
memory instead of loading them. `load_pretrained` loads a model only to run it (sample, score,
ref-logps, iterate's policy), in eval mode. Every command reads a model through `reading_model`
(these, `load_config`, merge's base and adapter), so a crafted pickle, a corrupt safetensors file
or an unreadable config is the same sentence everywhere, naming the flag that gave the path; and
every model is read through `pretrained` (and its config and tokenizer through `load_config` and
`load_tokenizer`), so a GGUF file (models/gguf.py) works wherever a model path is taken.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from rrhf_fast.errors import UserError, first_line
from rrhf_fast.models import gguf
from rrhf_fast.models.wrapping import unwrap

# --dtype of the commands that only run a model (sample, score, ref-logps, iterate's policy): auto is
# bfloat16 on a CUDA GPU that has it. Training's --dtype (config.WEIGHT_DTYPES) differs: auto keeps
# fp32 master weights there.
INFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device of `--device`; under torchrun "auto" and "cuda" mean this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} but this machine has no CUDA GPU (torch sees none); use --device cpu"
        )
    if device.type == "cuda" and local_rank is not None:
        if device.index not in (None, local_rank):
            raise UserError(f"--device {name} under torchrun: give --device cuda; each rank takes its GPU")
        device = torch.device("cuda", local_rank)
    return device


def weight_dtype(name: str) -> torch.dtype:
    """auto -> float32: master weights in fp32, bf16 only inside autocast on CUDA."""
    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """An INFERENCE_DTYPES name as a torch dtype; auto: bfloat16 on a CUDA device that supports it, else
    float32."""
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise UserError(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    return names[dtype]


def load_pretrained(
    path: str, auto_class: Any, device: str = "auto", dtype: str = "auto", flag: str = "--model"
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) from what `from_pretrained` takes; `flag` is the
    option that named `path`, for the error.

    Weights the checkpoint lacks are an error, not a warning: a causal LM loaded as a reward model
    would otherwise score with a randomly initialised head.
    """
    dev = resolve_device(device)
    tokenizer = load_tokenizer(path, flag, require_eos=False)
    what = _KINDS.get(auto_class.__name__, "a model")
    model, info = pretrained(
        auto_class, path, flag, what, dtype=resolve_dtype(dtype, dev), output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"{named(flag, path)}: lacks weights a {type(model).__name__} needs ({', '.join(missing[:3])}); "
            "is it the right kind of model (a reward model for reward-model:, a causal LM otherwise)?"
        )
    return model.to(dev).eval(), tokenizer


_KINDS = {
    "AutoModelForCausalLM": "a causal LM",
    "AutoModelForSequenceClassification": "a one-label sequence-classification model",
}


def pretrained(auto_class: Any, path: str, flag: str = "--model", what: str = "a model", **kwargs) -> Any:
    """`auto_class.from_pretrained(path, **kwargs)` by every command's rule (`reading_model`); a GGUF
    file is loaded dequantised and returned as a plain model (models/gguf.py), so that it trains and
    saves as any other."""
    with reading_model(flag, path, what), quiet_progress_bars():
        if not gguf.is_gguf(path):
            return auto_class.from_pretrained(path, **kwargs)
        folder, extra = gguf.source(path)
        with gguf.quiet_dequantising():
            loaded = auto_class.from_pretrained(folder, **extra, **gguf.model_kwargs(), **kwargs)
        gguf.plain_model(loaded[0] if kwargs.get("output_loading_info") else loaded, path)
        return loaded


@contextlib.contextmanager
def dequantised_copy(path: str, flag: str = "--model"):
    """A GGUF file as a temporary save_pretrained folder (its causal LM, dequantised): for what
    from_pretrained cannot combine with gguf_file, bitsandbytes' --load-in-4bit / --load-in-8bit."""
    import tempfile

    from transformers import AutoModelForCausalLM

    model = pretrained(AutoModelForCausalLM, path, flag, "a causal LM", dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="rrhf-fast-gguf-") as folder:
        with quiet_progress_bars():
            model.save_pretrained(folder)
        del model
        yield folder


@contextlib.contextmanager
def reading_model(flag: str, path: str, what: str = "a model"):
    """Every command's rule for a model that cannot be read: one sentence naming `flag` and `path`.

    A corrupt, truncated or empty safetensors file and a pickled .bin that `torch.load(weights_only=
    True)` refuses (it is never run) say so; any other failure of from_pretrained (no such model, a
    config it cannot parse, weights of other shapes) says what could not be loaded."""
    _check_model_path(path, flag)
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if gguf.is_gguf(path):  # the GGUF reader's faults come in many types (struct, numpy, ...)
            raise UserError(
                f"{named(flag, path)}: cannot load {what} from this GGUF file ({first_line(err)}); give "
                "a whole GGUF of an architecture transformers reads (llama, mistral, qwen2, ...)"
            ) from None
        unreadable = _unreadable_weights(err)
        if unreadable is not None:
            suffix = ".bin" if "pickled" in unreadable else ".safetensors"
            files = sorted(p.name for p in Path(path).expanduser().glob(f"*{suffix}")) or ["its weights"]
            raise UserError(f"{named(flag, path)}: {', '.join(files)} cannot be read ({unreadable}); "
                            "save the model again with save_pretrained (safetensors)") from None  # fmt: skip
        if not isinstance(err, (OSError, ValueError, RuntimeError, KeyError)):
            raise
        raise UserError(
            f"{named(flag, path)}: cannot load {what} ({first_line(err)}); give a directory saved with "
            "save_pretrained or a hub id this machine can download"
        ) from None


def named(flag: str, path: Any) -> str:
    """How an error quotes the model a flag gave: "--model DIR", "--scorer reward-model:DIR"."""
    return f"{flag}{path}" if flag.endswith(":") else f"{flag} {path}"


def max_positions(config: Any) -> int | None:
    """The positions a model has (its text config's max_position_embeddings), None when unbounded."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def load_config(path: str, flag: str = "--model") -> Any:
    """The model's configuration alone (no weights), read by the same rule as the model itself."""
    from transformers import AutoConfig

    if gguf.is_gguf(path):  # the file's metadata: no tensor is read, none dequantised
        with reading_model(flag, path, "its config"):
            folder, extra = gguf.source(path)
            return AutoConfig.from_pretrained(folder, **extra)
    with reading_model(flag, path, "its config.json"):
        return AutoConfig.from_pretrained(path)


def load_tokenizer(model: str, flag: str = "--model", require_eos: bool = True) -> Any:
    from transformers import AutoTokenizer

    _check_model_path(model, flag)
    folder, extra = gguf.source(model) if gguf.is_gguf(model) else (model, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    except Exception as err:  # OSError, ValueError; a corrupt tokenizer.json raises its own kinds
        source = " from this GGUF file" if extra else ""
        raise UserError(
            f"{named(flag, model)}: cannot load its tokenizer{source} ({first_line(err)})"
        ) from None
    if require_eos and tokenizer.eos_token_id is None:
        raise UserError(f"{named(flag, model)}: the tokenizer has no EOS token; responses need one to end")
    return tokenizer


def load_model(config: Any, device: torch.device, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """The causal LM of `config.model` on `device`, in training mode, ready for packed_logprobs;
    with task_type SEQ_CLS, the reward model built on it (AutoModelForSequenceClassification with
    one label: a causal-LM checkpoint's backbone loads, its lm_head is dropped, the score head starts
    from the config's initializer), ready for models.reward.packed_rewards."""
    quantization = quantization_config(config)
    kwargs: dict[str, Any] = {"dtype": weight_dtype(config.dtype)}
    if quantization is not None:
        import_bitsandbytes("--load-in-4bit" if config.load_in_4bit else "--load-in-8bit")
        # bf16 for what stays unquantised until prepare_model_for_kbit_training upcasts it.
        kwargs.update(quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device})
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto, what, quiet = AutoModelForCausalLM, "a causal LM", contextlib.nullcontext()
    if task_type == "SEQ_CLS":
        auto, what = AutoModelForSequenceClassification, "a one-label sequence-classification model"
        kwargs.update(num_labels=1, output_loading_info=True)
        quiet = _quiet_transformers()  # its load report lists the new head as MISSING: expected here
    if quantization is not None and gguf.is_gguf(config.model):
        with dequantised_copy(config.model) as folder, quiet:
            model = pretrained(auto, folder, "--model", what, **kwargs)
    else:
        with quiet:  # a RuntimeError: a score head of other shape
            model = pretrained(auto, config.model, "--model", what, **kwargs)
    if task_type == "SEQ_CLS":
        model, info = model
        _report_new_weights(config.model, info)
    if quantization is None:
        model.to(device)
        _warn_pure_bf16(config)
    return finish_model(model, config, task_type)


def _report_new_weights(model_path: str, info: dict[str, Any]) -> None:
    """A reward model built on a causal LM starts its score head from scratch and drops the lm_head;
    any other weight missing from the checkpoint means a backbone that does not match it."""
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("score.")]
    if missing:
        logging.getLogger(__name__).warning(
            f"warning: --model {model_path} lacks {len(missing)} backbone weight(s) of the reward model "
            f"(e.g. {missing[0]}), initialised at random: is it the checkpoint you meant?"
        )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _warn_pure_bf16(config: Any) -> None:
    """bf16 keeps 8 significant bits: without fp32 master weights, an update below half a weight's
    spacing (2**-8 of it, relative) rounds to zero, so small learning rates silently stop training.
    --bf16-update stochastic or kahan is the remedy chosen with its cost; "nearest" gets this warning.
    With LoRA only the adapters train, and peft keeps them in fp32 (autocast_adapter_dtype)."""
    if config.dtype == "bfloat16" and not config.lora_r and config.bf16_update == "nearest":
        logging.getLogger(__name__).warning(
            "warning: --dtype bfloat16 without --lora-r trains the bf16 weights themselves, and with "
            "--bf16-update nearest an update smaller than about 1/256 of a weight rounds to nothing, so "
            "small learning rates barely train; pass --bf16-update stochastic (unbiased rounding, no "
            "extra memory) or kahan (a bf16 compensation buffer, 2 bytes a weight), or keep fp32 master "
            "weights (--dtype auto, the default; 4 bytes a weight) or train LoRA adapters (--lora-r N)"
        )


def quantization_config(config: Any) -> Any:
    """bitsandbytes settings of --load-in-4bit (the QLoRA recipe) or --load-in-8bit; None for neither.

    The lm_head stays unquantised: transformers leaves the output embedding out by default, and
    `_check_head` makes sure of it, since the fused kernel needs its plain weight.
    """
    from transformers import BitsAndBytesConfig

    if getattr(config, "load_in_4bit", False):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if getattr(config, "load_in_8bit", False):
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def finish_model(model: Any, config: Any, task_type: str = "CAUSAL_LM") -> Any:
    """Quantised-training preparation, gradient checkpointing and LoRA adapters, in that order.

    A quantised base goes through peft's `prepare_model_for_kbit_training` (base frozen; norms,
    embeddings and lm_head upcast to fp32, the QLoRA recipe). Returns the model in training mode: a
    peft model when `config.lora_r`, else the transformers model itself. `task_type` is peft's:
    CAUSAL_LM (its lm_head must stay a plain weight), or SEQ_CLS for a reward model (peft then
    trains the `score` head whole beside the adapters).
    """
    causal = task_type == "CAUSAL_LM"
    model.config.use_cache = False
    if is_quantized(model):
        if causal:
            _check_head(model, config)
        # Our own non-reentrant checkpointing below: peft's would be reentrant.
        model = import_peft().prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        # Non-reentrant: works with inputs that need no grad and with autocast (PyTorch's advice).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.lora_r:
        model = add_lora(model, config, task_type)
    if causal:
        _check_head(model, config)
    return model.train()


def add_lora(model: Any, config: Any, task_type: str = "CAUSAL_LM") -> Any:
    """peft LoRA adapters on `--lora-target-modules`; the base model's weights are frozen."""
    peft = import_peft()
    names = config.lora_target_modules
    targets = names if names == "all-linear" else [t.strip() for t in names.split(",")]
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
    )
    try:
        with peft_quietly():
            return peft.get_peft_model(model, lora)
    except ValueError as err:  # e.g. a target name that matches no module
        raise UserError(f"--lora-target-modules {names}: {first_line(err)}") from None


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _check_head(model: Any, config: Any) -> None:
    """The fused kernel reads the lm_head weight as a plain matrix: no adapter on it, no quantisation."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise UserError(f"--model {config.model}: no lm_head; give a causal LM")
    kind = type(head).__module__
    if kind.startswith("peft"):
        raise UserError(
            f"--lora-target-modules {config.lora_target_modules} puts an adapter on the lm_head, which the "
            "fused log-prob kernel reads as a plain weight (it would miss the adapter); leave lm_head out"
        )
    weight = getattr(head, "weight", None)
    plain = isinstance(weight, torch.Tensor) and weight.is_floating_point()
    if kind.startswith("bitsandbytes") or not plain:
        raise UserError(
            f"--model {config.model}: the lm_head was loaded as a {type(head).__name__}; the fused log-prob "
            "kernel needs it unquantised (keep lm_head out of the quantised modules)"
        )


def import_bitsandbytes(flag: str, alternative: str = "") -> Any:
    """bitsandbytes, imported without its irrelevant warning; a UserError naming `flag` if absent."""
    try:
        with _quiet_bitsandbytes():
            import bitsandbytes
    except ImportError as err:
        raise UserError(
            f"{flag} needs bitsandbytes ({err}); install it with `pip install bitsandbytes`{alternative}"
        ) from None
    return bitsandbytes


def import_peft() -> Any:
    """peft imports bitsandbytes when it is installed: do that quietly first."""
    with contextlib.suppress(ImportError), _quiet_bitsandbytes():
        import bitsandbytes  # noqa: F401
    import peft

    return peft


@contextlib.contextmanager
def peft_quietly():
    """peft 0.21 asks transformers 5 a deprecated question: a FutureWarning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextlib.contextmanager
def _quiet_bitsandbytes():
    # On a CPU with AVX512-BF16 (or without the hub's `kernels` package) its import warns that a
    # 4-bit GEMM kernel is missing: irrelevant here, and noise on every run.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpu_ops.setLevel(level)


def _check_model_path(model: str, flag: str = "--model") -> None:
    """A path-looking --model that does not exist is a typo, not a hub id: say so at once."""
    model = str(model)
    if gguf.is_gguf(model):
        gguf.check_file(model, named(flag, model))
        return
    looks_local = (
        model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1
    )
    if looks_local and not Path(model).expanduser().is_dir():
        raise UserError(
            f"{named(flag, model)}: no such directory; give a save_pretrained directory or a hub id"
        )


def _unreadable_weights(err: BaseException) -> str | None:
    """What a corrupt, truncated or empty safetensors file (SafetensorError) or a pickle that
    `torch.load(weights_only=True)` refuses (UnpicklingError: it is never run) raise, in words."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(err, SafetensorError):
        return f"a corrupt, truncated or empty .safetensors file: {first_line(err)}"
    if isinstance(err, pickle.UnpicklingError):
        return "a pickled .bin file holding more than tensors, refused without running it"
    return None


@contextlib.contextmanager
def quiet_progress_bars():
    """from_pretrained / save_pretrained draw progress bars: noise around our own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
