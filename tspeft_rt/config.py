"""One run's configuration: a YAML file plus `--set key=value` overrides, every field documented here.

    tspeft-rt train configs/ts_lora_arc_easy.yaml --set steps=50 --set target_skip=0.3
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from tspeft_rt.errors import MAX_DEPTH, ConfigError, check_tree, read_text, shown

METHODS = ("ts-lora", "ts-dora", "lora", "dora")
DATA_FIELDS = ("prompt", "completion", "messages", "role", "content")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # model and adapter
    model: str = _f("smollm2-135m-instruct", "Base model: a local Hugging Face causal-LM folder, or "
                    "'smollm2-135m-instruct' for the bundled SmolLM2-135M-Instruct.")
    method: str = _f("ts-lora", "ts-lora | ts-dora (token-gated) or lora | dora (dense baselines, same runtime).")
    target_modules: Any = _f("all-linear", "Modules to adapt: a list of names (suffix match, e.g. q_proj), "
                             "a regex string matched against full module paths, or 'all-linear' (every "
                             "nn.Linear but the output head).")
    rank: int = _f(8, "LoRA rank r.")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).")
    rank_pattern: dict = _f({}, "Per-module rank overrides {regex: rank}, matched like PEFT's rank_pattern.")
    alpha_pattern: dict = _f({}, "Per-module alpha overrides {regex: alpha}.")
    use_rslora: bool = _f(False, "rsLoRA scaling alpha/sqrt(r).")
    dropout: float = _f(0.0, "Dropout on the adapter's input.")
    init_adapter: Any = _f(None, "Start from an existing LoRA or DoRA adapter directory (PEFT's save_pretrained "
                           "format, or a tspeft-rt export): its weights are loaded, and its target modules, "
                           "rank, alpha, rank/alpha patterns and rsLoRA replace this config's; its thresholds, if "
                           "any, are learned afresh. null: new adapters (B = 0).")
    train_weights: bool = _f(True, "Train the adapter weights. false (only with init_adapter): learn the thresholds "
                             "alone, the loaded weights frozen: a calibration that gates an existing LoRA at "
                             "target_skip.")
    # learning tau (docs/method.md, "Learning τ")
    target_skip: Any = _f(0.5, "Target fraction of token updates to skip (0..1), held by a PI controller "
                          "on lambda; null for a fixed sparsity_lambda.")
    sparsity_lambda: float = _f(0.0, "Weight lambda of the kept-fraction penalty: fixed when target_skip is "
                                "null, the starting value otherwise.")
    lambda_lr: float = _f(1.0, "Target mode, integral gain: lambda_I += lambda_lr * (keep - (1 - target_skip)).")
    lambda_p: float = _f(5.0, "Target mode, proportional gain: lambda = lambda_I + lambda_p * (keep - (1 - target_skip)).")
    lambda_i_max: float = _f(1.0, "Target mode, anti-windup: lambda_I is kept in [-lambda_i_max, lambda_i_max] "
                             "(sparsity_lambda included) and does not integrate while no module's tau can follow "
                             "the error (every log-tau step clipped that way, or no token near any threshold).")
    tau_lr: float = _f(1.0, "Step size of the proximal tau update, taken in log tau (scale-free across modules).")
    tau_max_step: float = _f(0.2, "Largest change of log tau in one step (a trust region for the surrogate).")
    gate_temperature: float = _f(1.0, "Temperature T of the sigmoid surrogate over log(r / tau).")
    tau_warmup_steps: int = _f(10, "Steps with tau frozen at 0 (dense) so that B leaves zero before gating.")
    tau_init_quantile: Any = _f(None, "When gating starts, each tau is set to this quantile of its module's "
                                "ratios r on that batch; null uses target_skip (or 0.05 with a fixed lambda).")
    # data
    tasks: list = _f(["arc_easy"], "Bundled commonsense tasks to train on (boolq, piqa, siqa, hellaswag, "
                     "winogrande, arc_easy, arc_challenge, openbookqa); ignored when data_files is set.")
    data_files: list = _f([], "Your own training data: files of {prompt, completion} or {messages} examples as "
                          "JSON lines (.jsonl), JSON, CSV, Parquet, or folders written by datasets' save_to_disk "
                          "(their train split).")
    data_columns: dict = _f({}, "Your data's own names for the fields, as {field: name}: prompt, completion, "
                            "messages, and role and content inside each message, e.g. {prompt: question, "
                            "completion: answer} or {messages: conversations, role: from, content: value}.")
    max_train_examples: Any = _f(None, "Use at most this many training examples (after a seeded shuffle).")
    prompt_format: str = _f("plain", "plain (prompt then completion) or chat (the tokenizer's chat template).")
    max_seq_len: int = _f(256, "Truncate examples to this many tokens.")
    # optimisation
    steps: int = _f(100, "Optimizer steps.")
    batch_size: int = _f(8, "Global batch: examples per optimizer step, over all processes.")
    micro_batch_size: int = _f(8, "Examples per forward/backward in one process (gradient accumulation "
                               "makes up the rest of batch_size).")
    lr: float = _f(3e-4, "Peak learning rate of the adapter weights (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay of the adapter weights (never applied to tau).")
    lr_schedule: str = _f("cosine", "cosine | linear | constant, after warmup_steps of linear warm-up.")
    warmup_steps: int = _f(5, "Linear learning-rate warm-up steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping of the adapter weights (0 disables).")
    distributed: str = _f("ddp", "Under torchrun: ddp (every process holds the whole model; DistributedDataParallel) "
                          "or fsdp (PyTorch FSDP2: the frozen base sharded across the processes, layer by layer; "
                          "the adapters and thresholds whole on each). Ignored with one process.")
    dtype: str = _f("fp32", "fp32 or bf16 (base weights in bf16, adapter weights and gate math in fp32).")
    seed: int = _f(0, "Seed of initialisation, data order and dropout.")
    # evaluation, logging, checkpoints
    eval_every: int = _f(0, "Evaluate every N steps (0: only at the end).")
    eval_tasks: list = _f([], "Tasks for multiple-choice evaluation; empty uses tasks.")
    eval_examples: int = _f(200, "Validation examples per task (the first N).")
    eval_batch_size: int = _f(16, "Sequences per evaluation forward.")
    output_dir: str = _f("runs/default", "Run folder: metrics.jsonl, gate_stats.jsonl, checkpoints/, config.yaml.")
    log_every: int = _f(5, "Write metrics and per-module gate statistics every N steps.")
    save_every: int = _f(50, "Write a checkpoint every N steps (and always at the end; 0: only at the end).")
    keep_checkpoints: int = _f(2, "How many recent checkpoints to keep.")
    progress: bool = _f(True, "Show a progress bar.")

    @property
    def gated(self) -> bool:
        return self.method.startswith("ts-")

    @property
    def dora(self) -> bool:
        return self.method.endswith("dora")

    def validate(self) -> "TrainConfig":
        checks = [
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}"),
            (self.rank > 0, "rank", "a positive integer"),
            (is_regex(self.target_modules) or is_str_list(self.target_modules), "target_modules",
             "'all-linear', a regular expression or a list of module names"),
            (is_pattern(self.rank_pattern, is_positive_int), "rank_pattern", "an object {regex: rank > 0}"),
            (is_pattern(self.alpha_pattern, is_positive_number), "alpha_pattern", "an object {regex: alpha > 0}"),
            (_in_range(self.target_skip, 0.0, 1.0), "target_skip", "null or a number in [0, 1)"),
            (self.sparsity_lambda >= 0, "sparsity_lambda", ">= 0"),
            (self.lambda_i_max > 0, "lambda_i_max", "> 0"),
            (_in_range(self.tau_init_quantile, 0.0, 1.0), "tau_init_quantile", "null or a number in [0, 1)"),
            (self.max_train_examples is None or isinstance(self.max_train_examples, int)
             and self.max_train_examples > 0, "max_train_examples", "null or a positive integer"),
            (self.gate_temperature > 0, "gate_temperature", "> 0"),
            (self.prompt_format in ("plain", "chat"), "prompt_format", "plain or chat"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule", "cosine, linear or constant"),
            (self.dtype in ("fp32", "bf16"), "dtype", "fp32 or bf16"),
            (self.distributed in ("ddp", "fsdp"), "distributed", "ddp or fsdp"),
            (self.steps > 0, "steps", "a positive integer"),
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.micro_batch_size > 0, "micro_batch_size", "a positive integer"),
            (self.max_seq_len > 1, "max_seq_len", "an integer > 1"),
            (self.log_every > 0, "log_every", "a positive integer"),
            (self.save_every >= 0, "save_every", ">= 0"),
            (self.eval_every >= 0, "eval_every", ">= 0"),
            (self.keep_checkpoints > 0, "keep_checkpoints", "a positive integer"),
            (0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            (self.init_adapter is None or isinstance(self.init_adapter, str) and bool(self.init_adapter),
             "init_adapter", "null or an adapter directory"),
            (self.train_weights or self.init_adapter is not None and self.gated, "train_weights",
             "true unless init_adapter is set and the method is ts-lora or ts-dora (there is nothing else to learn)"),
            (is_str_list(self.tasks), "tasks", "a list of task names"),
            (is_str_list(self.eval_tasks), "eval_tasks", "a list of task names"),
            (is_str_list(self.data_files), "data_files", "a list of file paths"),
            (isinstance(self.data_columns, dict) and set(self.data_columns) <= set(DATA_FIELDS)
             and all(isinstance(v, str) and v for v in self.data_columns.values()), "data_columns",
             f"an object {{field: column name}} with fields among {', '.join(DATA_FIELDS)}"),
            (bool(self.tasks) or bool(self.data_files), "tasks", "at least one task or data file"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"config key {key!r}: expected {expected}, got {shown(getattr(self, key))}", key)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def adapter_signature(self) -> dict:
        """The fields that fix the adapter's parameters: a checkpoint resumes only under equal values."""
        keys = ("model", "method", "target_modules", "rank", "alpha", "rank_pattern", "alpha_pattern", "use_rslora")
        return {k: getattr(self, k) for k in keys}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def field_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) with a finite float value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_positive_number(value: Any) -> bool:
    return is_finite_number(value) and value > 0


def is_rate(value: Any) -> bool:
    return is_finite_number(value) and 0 <= value <= 1


def is_pattern(value: Any, valid: Callable[[Any], bool]) -> bool:
    """A PEFT rank_pattern/alpha_pattern: {regex: value} with every value valid."""
    # inject.pattern_value matches a key as (.*\.)?(key)$, so the key must compile alone and there.
    return isinstance(value, dict) and all(
        is_regex(k) and is_regex(rf"(.*\.)?({k})$") and valid(v) for k, v in value.items())


def is_regex(regex: Any) -> bool:
    if not isinstance(regex, str):
        return False
    try:
        re.compile(regex)
    except re.error:
        return False
    return True


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _in_range(value: Any, lo: float, hi: float) -> bool:
    """None, or a number with lo <= value < hi."""
    return value is None or is_finite_number(value) and lo <= value < hi


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is Any:
        return value
    if typ is float:
        if is_finite_number(value):
            return float(value)
    elif isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    expected = "finite float" if typ is float else typ.__name__
    raise ConfigError(f"config key {key!r}: expected {expected}, got {shown(value)} ({type(value).__name__})", key)


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """YAML whose every defect raises ConfigError naming `where` (a config file or a --set pair)."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # a scalar that matched a type but does not convert: 2024-13-01, a 5000-digit int
        raise ConfigError(f"{where}: a value YAML cannot convert ({e})") from None
    check_tree(value, where, ConfigError)
    return value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: what is wrong and where (it prints a multi-line excerpt)."""
    mark = getattr(e, "problem_mark", None)
    if getattr(e, "problem", None) and mark is not None:
        return f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def build_config(values: dict, source: str, origins: dict[str, str] | None = None) -> TrainConfig:
    """A validated config from a mapping; unknown keys are an error listing the valid ones. Errors name
    where the key at fault was set: `origins[key]`, else `source`."""
    origins = origins or {}
    hints = get_type_hints(TrainConfig)
    unknown = sorted((k for k in values if k not in hints), key=str)  # YAML keys may be numbers or null
    if unknown:
        where = " and ".join(sorted({origins.get(k, source) for k in unknown}))
        raise ConfigError(
            f"{where}: unknown config key(s) {', '.join(map(shown, unknown))}; valid keys: {', '.join(hints)}"
        )
    try:
        return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()}).validate()
    except ConfigError as e:
        raise ConfigError(f"{origins.get(e.key, source)}: {e}", e.key) from None


def parse_overrides(pairs: tuple[str, ...] | list[str]) -> dict:
    """`key=value` strings, values parsed as YAML (`steps=10`, `tasks=[piqa,boolq]`, `target_skip=null`)."""
    return {key: value for key, (value, _) in _overrides(pairs).items()}


def _overrides(pairs: tuple[str, ...] | list[str]) -> dict[str, tuple[Any, str]]:
    """{key: (value, the --set option that gave it)}; a later --set of a key wins."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        where = f"--set {shown(pair)}"
        if not sep or not key:
            raise ConfigError(f"{where}: expected key=value")
        out[key.strip()] = (parse_yaml(raw, where), where)
    return out


def load_config(path: str | Path | None, overrides: tuple[str, ...] | list[str] = ()) -> TrainConfig:
    values: dict = {}
    source = "the defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        source = f"config file {str(path)!r}"
        values = parse_yaml(read_text(path, ConfigError), source)
        if values is None:  # an empty file
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, found {type(values).__name__}")
    sets = _overrides(overrides)
    values.update({key: value for key, (value, _) in sets.items()})
    return build_config(values, source, {key: where for key, (_, where) in sets.items()})
